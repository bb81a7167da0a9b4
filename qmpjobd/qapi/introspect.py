"""query-qmp-schema: the SchemaInfo list QEMU's introspect.py would build.

Commands and events come first, in definition order; then every type they
use, in order of first use (the work list grows while it is walked).  Type
names other than built-ins are masked as decimal strings numbered by first
use; every integer type shows as ``int`` and arrays as ``[element]``.
"""
from __future__ import annotations

from collections.abc import Set

from .model import (EMPTY_OBJECT, AlternateType, ArrayType, BuiltinType, CommandDef,
                    EnumType, EventDef, Member, ObjectType, QType, TypeModel)


class _Introspector:
    def __init__(self, model: TypeModel, unmask: bool,
                 commands: Set[str] | None) -> None:
        self.model, self.unmask, self.commands = model, unmask, commands
        self.used: list[QType] = []
        self.names: dict[str, str] = {}
        self.out: list[dict] = []

    def run(self) -> list[dict]:
        for ent in self.model.entities:
            if isinstance(ent, CommandDef):
                if self.commands is None or ent.name in self.commands:
                    self._command(ent)
            else:
                self._event(ent)
        i = 0
        while i < len(self.used):          # grows while we walk it
            self._type(self.used[i])
            i += 1
        return self.out

    def _name(self, name: str) -> str:
        if self.unmask:
            return name
        if name not in self.names:
            self.names[name] = str(len(self.names))
        return self.names[name]

    def _use(self, t: QType) -> str:
        # all integer widths collapse onto plain 'int', arrays of them on [int]
        if t.json_type == "int":
            t = self.model.types["int"]
        elif isinstance(t, ArrayType) and t.element.json_type == "int":  # type: ignore[union-attr]
            t = self.model.lookup(["int"])
        if t not in self.used:
            self.used.append(t)
        if isinstance(t, BuiltinType):
            return t.name
        if isinstance(t, ArrayType):
            return "[" + self._use(t.element) + "]"  # type: ignore[arg-type]
        return self._name(t.name)

    def _tree(self, name: str, meta: str, obj: dict, features: list[str] | None) -> None:
        if meta not in ("command", "event", "builtin", "array"):
            name = self._name(name)
        entry = {"name": name, **obj, "meta-type": meta}
        if features:
            entry["features"] = list(features)
        self.out.append(entry)

    def _member(self, m: Member) -> dict:
        obj: dict = {"name": m.name, "type": self._use(m.type)}
        if m.optional:
            obj["default"] = None
        if m.features:
            obj["features"] = list(m.features)
        return obj

    def _empty(self) -> ObjectType:
        return self.model.types[EMPTY_OBJECT]  # type: ignore[return-value]

    def _command(self, c: CommandDef) -> None:
        obj = {"arg-type": self._use(c.arg_type or self._empty()),
               "ret-type": self._use(c.ret_type or self._empty())}
        if c.allow_oob:
            obj["allow-oob"] = True
        self._tree(c.name, "command", obj, c.features)

    def _event(self, e: EventDef) -> None:
        self._tree(e.name, "event", {"arg-type": self._use(e.arg_type or self._empty())},
                   e.features)

    def _type(self, t: QType) -> None:
        if isinstance(t, BuiltinType):
            self._tree(t.name, "builtin", {"json-type": t.json}, None)
        elif isinstance(t, EnumType):
            members = [{"name": m.name, **({"features": list(m.features)} if m.features else {})}
                       for m in t.members]
            self._tree(t.name, "enum", {"members": members, "values": t.values}, t.features)
        elif isinstance(t, ArrayType):
            elem = self._use(t.element)  # type: ignore[arg-type]
            self._tree("[" + elem + "]", "array", {"element-type": elem}, None)
        elif isinstance(t, ObjectType):
            obj: dict = {"members": [self._member(m) for m in t.members]}
            if t.tag is not None:
                obj["tag"] = t.tag
                obj["variants"] = [{"case": case, "type": self._use(vt)}
                                   for case, vt in t.variants]
            self._tree(t.name, "object", obj, t.features)
        elif isinstance(t, AlternateType):
            self._tree(t.name, "alternate",
                       {"members": [{"type": self._use(bt)} for _, bt in t.branches]},
                       t.features)


def introspect(model: TypeModel, unmask: bool = False,
               commands: Set[str] | None = None) -> list[dict]:
    """Build the query-qmp-schema return value (masked unless *unmask*),
    describing only *commands* when given (every event regardless)."""
    return _Introspector(model, unmask, commands).run()
