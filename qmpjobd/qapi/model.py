"""The QAPI type model: definitions resolved into linked Python objects.

Mirrors the parts of QEMU's scripts/qapi/schema.py that matter at run time:
implicit types for inline argument/base dictionaries, bases flattened into
members, flat-union variants (with an implicit empty branch for every
discriminator value no branch names), alternates, arrays and the built-ins.

``'if'`` conditions are evaluated first (``conditions.select``) with the
symbols of one QEMU version, so a model is always one version's view.
"""
from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field, replace

from .conditions import ConditionError, check_condition, conditions_in, select
from .parser import Expression

# Built-in types: name -> JSON type as introspection reports it.
INT_RANGES: dict[str, tuple[int, int]] = {
    "int": (-(2**63), 2**63 - 1),
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "size": (0, 2**64 - 1),
}
BUILTIN_JSON_TYPES: dict[str, str] = {
    "str": "string",
    "number": "number",
    "bool": "boolean",
    "null": "null",
    "any": "value",
    **{name: "int" for name in INT_RANGES},
}
EMPTY_OBJECT = "q_empty"


class SchemaError(Exception):
    """The schema files are inconsistent (unknown type, clash, ...)."""


@dataclass(eq=False)
class QType:
    name: str

    @property
    def meta(self) -> str:
        raise NotImplementedError

    @property
    def json_type(self) -> str:
        raise NotImplementedError


@dataclass(eq=False)
class BuiltinType(QType):
    json: str = "value"

    meta = "builtin"  # type: ignore[assignment]

    @property
    def json_type(self) -> str:
        return self.json


@dataclass(eq=False)
class EnumMember:
    name: str
    features: list[str] = field(default_factory=list)


@dataclass(eq=False)
class EnumType(QType):
    members: list[EnumMember] = field(default_factory=list)
    features: list[str] = field(default_factory=list)

    meta = "enum"  # type: ignore[assignment]
    json_type = "string"  # type: ignore[assignment]

    @property
    def values(self) -> list[str]:
        return [m.name for m in self.members]


@dataclass(eq=False)
class ArrayType(QType):
    element: QType | None = None

    meta = "array"  # type: ignore[assignment]
    json_type = "array"  # type: ignore[assignment]


@dataclass(eq=False)
class Member:
    name: str
    type: QType
    optional: bool = False
    features: list[str] = field(default_factory=list)


@dataclass(eq=False)
class ObjectType(QType):
    base: "ObjectType | None" = None
    local_members: list[Member] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    tag: str | None = None                       # flat unions only
    variants: list[tuple[str, "ObjectType"]] = field(default_factory=list)
    implicit: bool = False

    meta = "object"  # type: ignore[assignment]
    json_type = "object"  # type: ignore[assignment]

    @property
    def members(self) -> list[Member]:
        """All members, base members first (QEMU's flattened view)."""
        inherited = self.base.members if self.base else []
        return inherited + self.local_members

    @property
    def tag_member(self) -> Member | None:
        if self.tag is None:
            return None
        return next(m for m in self.members if m.name == self.tag)


@dataclass(eq=False)
class AlternateType(QType):
    branches: list[tuple[str, QType]] = field(default_factory=list)
    features: list[str] = field(default_factory=list)

    meta = "alternate"  # type: ignore[assignment]
    json_type = "value"  # type: ignore[assignment]


@dataclass(eq=False)
class CommandDef:
    name: str
    allow_oob: bool
    features: list[str]
    arg_type: ObjectType | None
    ret_type: QType | None
    boxed: bool


@dataclass(eq=False)
class EventDef:
    name: str
    features: list[str]
    arg_type: ObjectType | None
    boxed: bool


def _features(raw: object) -> list[str]:
    out = []
    for f in raw or []:
        out.append(f["name"] if isinstance(f, dict) else f)
    return out


def select_view(exprs: list[Expression], symbols: Set[str],
                known_symbols: Set[str] | None = None) -> list[Expression]:
    """The expressions that exist with *symbols* defined, stripped of their
    'if' conditions (which are checked first; with *known_symbols*, a symbol
    outside that set is an error rather than silently false)."""
    out = []
    for e in exprs:
        try:
            for cond in conditions_in(e.expr):
                check_condition(cond, known_symbols)
        except ConditionError as exc:
            raise SchemaError(f"{e.path}:{e.line}: {exc}") from None
        view = select(e.expr, symbols)
        if view is not None:
            out.append(replace(e, expr=view))
    return out


class TypeModel:
    """Resolves parsed expressions into types, commands and events, for the
    QEMU version whose condition symbols are *symbols*."""

    def __init__(self, exprs: list[Expression], symbols: Set[str] = frozenset(),
                 known_symbols: Set[str] | None = None) -> None:
        exprs = select_view(exprs, symbols, known_symbols)
        self.types: dict[str, QType] = {}
        self.commands: dict[str, CommandDef] = {}
        self.events: dict[str, EventDef] = {}
        self.entities: list[CommandDef | EventDef] = []   # definition order
        self._raw: dict[str, Expression] = {}
        self._arrays: dict[str, ArrayType] = {}
        for name, json in BUILTIN_JSON_TYPES.items():
            self.types[name] = BuiltinType(name, json)
        self.types[EMPTY_OBJECT] = ObjectType(EMPTY_OBJECT, implicit=True)
        self._declare(exprs)
        self._resolve_all()

    # -- pass 1: create empty shells so references can be linked in any order
    def _declare(self, exprs: list[Expression]) -> None:
        for e in exprs:
            x = e.expr
            kind = next(iter(x))
            name = x[kind]
            if kind in ("struct", "union"):
                self._add_type(ObjectType(name, features=_features(x.get("features"))), e)
            elif kind == "enum":
                members = [EnumMember(m["name"], _features(m.get("features")))
                           if isinstance(m, dict) else EnumMember(m) for m in x["data"]]
                self._add_type(EnumType(name, members, _features(x.get("features"))), e)
            elif kind == "alternate":
                self._add_type(AlternateType(name, features=_features(x.get("features"))), e)
            elif kind in ("command", "event"):
                self._raw[f"{kind}:{name}"] = e
            else:
                raise SchemaError(f"{e.path}:{e.line}: unknown definition kind {kind!r}")

    def _add_type(self, t: QType, e: Expression) -> None:
        if t.name in self.types:
            raise SchemaError(f"{e.path}:{e.line}: {t.name} is defined twice")
        self.types[t.name] = t
        self._raw[t.name] = e

    # -- pass 2: link everything
    def _resolve_all(self) -> None:
        # structs first: a union's discriminator may live in a named base
        for kind in ("struct", "union", "alternate"):
            for name, e in list(self._raw.items()):
                x = e.expr
                if kind not in x:
                    continue
                t = self.types[name]
                if kind == "struct":
                    self._fill_struct(t, x)  # type: ignore[arg-type]
                elif kind == "union":
                    self._fill_union(t, x)  # type: ignore[arg-type]
                else:
                    t.branches = [(b, self._ref(v, e))  # type: ignore[attr-defined]
                                  for b, v in x["data"].items()]
        for key, e in self._raw.items():
            if key.startswith("command:"):
                self._add_command(e)
            elif key.startswith("event:"):
                self._add_event(e)

    def lookup(self, ref: object, where: Expression | None = None) -> QType:
        return self._ref(ref, where)

    def _ref(self, ref: object, where: Expression | None) -> QType:
        if isinstance(ref, dict):
            ref = ref["type"]
        if isinstance(ref, list):
            elem = self._ref(ref[0], where)
            arr = self._arrays.get(elem.name)
            if arr is None:
                arr = self._arrays[elem.name] = ArrayType(elem.name + "List", elem)
            return arr
        t = self.types.get(ref)  # type: ignore[arg-type]
        if t is None:
            loc = f"{where.path}:{where.line}: " if where else ""
            raise SchemaError(f"{loc}unknown type {ref!r}")
        return t

    def _members(self, data: dict, e: Expression) -> list[Member]:
        out = []
        for key, spec in data.items():
            optional = key.startswith("*")
            feats = _features(spec.get("features")) if isinstance(spec, dict) else []
            out.append(Member(key.lstrip("*"), self._ref(spec, e), optional, feats))
        return out

    def _implicit(self, name: str, data: dict, e: Expression) -> ObjectType:
        t = ObjectType(name, implicit=True)
        t.local_members = self._members(data, e)
        self.types[name] = t
        return t

    def _fill_struct(self, t: ObjectType, x: dict) -> None:
        e = self._raw[t.name]
        if "base" in x:
            t.base = self._ref(x["base"], e)  # type: ignore[assignment]
        t.local_members = self._members(x.get("data", {}), e)
        self._check_clash(t, e)

    def _fill_union(self, t: ObjectType, x: dict) -> None:
        e = self._raw[t.name]
        base = x["base"]
        if isinstance(base, dict):
            t.base = self._implicit(f"q_obj_{t.name}-base", base, e)
        else:
            t.base = self._ref(base, e)  # type: ignore[assignment]
        t.tag = x["discriminator"]
        tag = t.tag_member
        if tag is None or not isinstance(tag.type, EnumType) or tag.optional:
            raise SchemaError(f"{e.path}:{e.line}: bad discriminator {t.tag!r}")
        explicit = [(case, self._ref(v, e)) for case, v in x["data"].items()]
        unknown = [case for case, _ in explicit if case not in tag.type.values]  # type: ignore[attr-defined]
        if unknown:
            # e.g. a branch left in for an enum value that a condition removed
            raise SchemaError(f"{e.path}:{e.line}: {t.name} has branches for values "
                              f"its discriminator lacks: {', '.join(unknown)}")
        covered = {case for case, _ in explicit}
        empty = self.types[EMPTY_OBJECT]
        # like QEMU, values without a branch get an implicit empty one, last
        t.variants = explicit + [(m.name, empty) for m in tag.type.members
                                 if m.name not in covered]  # type: ignore[misc]

    def _check_clash(self, t: ObjectType, e: Expression) -> None:
        names = [m.name for m in t.members]
        if len(names) != len(set(names)):
            raise SchemaError(f"{e.path}:{e.line}: member clash in {t.name}")

    def _args(self, name: str, x: dict, e: Expression) -> ObjectType | None:
        data = x.get("data")
        if data is None:
            return None
        if isinstance(data, dict):
            # As in QEMU, no members means no argument type at all: a command
            # whose only member a condition removed looks like one without.
            return self._implicit(f"q_obj_{name}-arg", data, e) if data else None
        t = self._ref(data, e)
        if not isinstance(t, ObjectType):
            raise SchemaError(f"{e.path}:{e.line}: 'data' of {name} must be an object type")
        return t

    def _add_command(self, e: Expression) -> None:
        x = e.expr
        name = x["command"]
        ret = x.get("returns")
        cmd = CommandDef(
            name=name,
            allow_oob=bool(x.get("allow-oob", False)),
            features=_features(x.get("features")),
            arg_type=self._args(name, x, e),
            ret_type=self._ref(ret, e) if ret is not None else None,
            boxed=bool(x.get("boxed", False)),
        )
        self.commands[name] = cmd
        self.entities.append(cmd)

    def _add_event(self, e: Expression) -> None:
        x = e.expr
        name = x["event"]
        ev = EventDef(name, _features(x.get("features")), self._args(name, x, e),
                      bool(x.get("boxed", False)))
        self.events[name] = ev
        self.entities.append(ev)
