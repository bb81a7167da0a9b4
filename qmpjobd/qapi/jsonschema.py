"""Derive a JSON Schema (draft 2020-12) document from the QAPI type model.

One ``$defs`` entry per named type (implicit argument types keep QEMU's
``q_obj_<command>-arg`` names); the top-level object maps each command name
to its arguments, so ``{"job-pause": {"id": "j0"}}`` validates.  Property
order is declaration order; objects are closed (``additionalProperties:
false``); a flat union is a ``oneOf`` of closed objects, one per
discriminator value (the branch's members added to the base's), with the
discriminator pinned by ``const``; alternates are ``oneOf`` their branches.
Integer widths become ``minimum``/``maximum``; ``x-qapi-type`` records the
QAPI type of every schema, ``x-qapi-features`` any features.

uint64 and size accept negative int64 values, as QEMU does (it wraps them).
"""
from __future__ import annotations

from .model import (INT_RANGES, AlternateType, ArrayType, BuiltinType, EnumType,
                    ObjectType, QType, TypeModel)

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_I64_MIN = -(2**63)


def _builtin(t: BuiltinType) -> dict:
    name = t.name
    if name in INT_RANGES:
        lo, hi = INT_RANGES[name]
        if name in ("uint64", "size"):
            lo = _I64_MIN
        return {"type": "integer", "minimum": lo, "maximum": hi, "x-qapi-type": name}
    simple = {"str": {"type": "string"}, "bool": {"type": "boolean"},
              "number": {"type": "number"}, "null": {"type": "null"}, "any": {}}
    return {**simple[name], "x-qapi-type": name}


class _Deriver:
    def __init__(self, model: TypeModel) -> None:
        self.model = model
        self.defs: dict[str, dict] = {}

    def ref(self, t: QType) -> dict:
        if isinstance(t, BuiltinType):
            return _builtin(t)
        if isinstance(t, ArrayType):
            return {"type": "array", "items": self.ref(t.element)}  # type: ignore[arg-type]
        if t.name not in self.defs:
            self.defs[t.name] = {}          # placeholder: breaks recursion
            self.defs[t.name] = self._define(t)
        return {"$ref": f"#/$defs/{t.name}"}

    def _define(self, t: QType) -> dict:
        if isinstance(t, EnumType):
            out: dict = {"type": "string", "enum": t.values, "x-qapi-type": t.name}
        elif isinstance(t, AlternateType):
            out = {"oneOf": [self.ref(bt) for _, bt in t.branches], "x-qapi-type": t.name}
        else:
            assert isinstance(t, ObjectType)
            out = self._object(t)
        if getattr(t, "features", None):
            out["x-qapi-features"] = list(t.features)  # type: ignore[attr-defined]
        return out

    def _closed(self, members: list, name: str) -> dict:
        props: dict = {}
        for m in members:
            p = self.ref(m.type)
            if m.features:
                p = {**p, "x-qapi-features": list(m.features)}
            props[m.name] = p
        return {"type": "object", "properties": props,
                "required": [m.name for m in members if not m.optional],
                "additionalProperties": False, "x-qapi-type": name}

    def _object(self, t: ObjectType) -> dict:
        if t.tag is None:
            return self._closed(t.members, t.name)
        branches = []
        for case, vt in t.variants:
            obj = self._closed(t.members + vt.members, vt.name)  # type: ignore[attr-defined]
            obj["properties"][t.tag] = {"const": case}
            branches.append(obj)
        return {"type": "object", "x-qapi-type": t.name,
                "x-qapi-discriminator": t.tag, "oneOf": branches}


def derive(model: TypeModel) -> dict:
    """The whole document: every command's arguments, keyed by command name."""
    d = _Deriver(model)
    props = {}
    for name, cmd in model.commands.items():
        arg = cmd.arg_type or model.types["q_empty"]
        props[name] = d.ref(arg)
    return {
        "$schema": DRAFT,
        "$id": "urn:qmpjobd:qapi-arguments",
        "title": "qmpjobd QMP command arguments",
        "description": "Maps each QMP command to the JSON Schema of its 'arguments' "
                       "object. Derived from the QAPI files in schema/.",
        "type": "object",
        "properties": props,
        "additionalProperties": False,
        "$defs": d.defs,
    }


def command_schema(document: dict, command: str) -> dict:
    """A standalone schema for one command's arguments (shares ``$defs``)."""
    return {"$schema": DRAFT, **document["properties"][command], "$defs": document["$defs"]}
