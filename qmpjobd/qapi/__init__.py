"""The QAPI layer: schema loading, validation, introspection, JSON Schema.

``schema/*.json`` (QEMU's QAPI dialect) is the single source of truth.  The
schema directory is looked up next to the source tree (``<repo>/schema``) and,
for an installed package, in ``qmpjobd/schema`` (see ``default_schema_dir``).

The files carry QEMU-style ``'if'`` conditions; ``Schema.load(version=...)``
evaluates them with the condition symbols of that QEMU personality
(``qmpjobd.versions``), so one loaded Schema is one version's view: its
commands, their order, validation, introspection and JSON Schema.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from ..errors import QMPError
from ..wire.lexer import integer_literal
from ..versions import ALL_SCHEMA_SYMBOLS, Personality, personality
from .introspect import introspect
from .jsonschema import derive
from .keyval import keyval_parse
from .model import CommandDef, EventDef, ObjectType, TypeModel
from .parser import parse_file
from .validate import Compiler

__all__ = ["Schema", "CommandDef", "EventDef", "QMPError", "default_schema_dir"]

TOP_FILE = "qapi-schema.json"

# The version Schema.load() gives when no version is named.  Existing callers
# rely on 7.2; switch this to versions.DEFAULT_VERSION once the daemon passes
# its personality explicitly.
SCHEMA_DEFAULT_VERSION = "7.2"


def default_schema_dir() -> Path:
    """``<repo>/schema`` when running from a checkout, else the copy shipped
    inside the package as ``qmpjobd/schema`` (pyproject's package-data)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "schema", here.parents[1] / "schema"):
        if (candidate / TOP_FILE).is_file():
            return candidate
    raise FileNotFoundError("no QAPI schema directory (schema/qapi-schema.json) found")


class Schema:
    """A loaded schema with per-command validators compiled up front."""

    def __init__(self, model: TypeModel, version: Personality | None = None) -> None:
        self.model = model
        self.personality = version if version is not None else personality(SCHEMA_DEFAULT_VERSION)
        self.commands: dict[str, CommandDef] = model.commands
        self.events: dict[str, EventDef] = model.events
        self._compiler = Compiler(model)
        self._kv_compiler = Compiler(model, keyval=True)
        empty = model.types["q_empty"]
        self._validators = {name: self._compiler.visitor(cmd.arg_type or empty)
                            for name, cmd in model.commands.items()}
        self._introspection: dict[frozenset[str] | None, list[dict]] = {}
        self._json_schema: dict | None = None

    @classmethod
    def load(cls, directory: Path | None = None,
             version: str | Personality | None = None) -> "Schema":
        """Read the schema files and build the view of QEMU *version*
        (``"7.2"``, ``"10.0"``, ``"11.1"`` or a Personality; default
        SCHEMA_DEFAULT_VERSION).  An unknown version raises
        ``versions.UnknownVersion``."""
        directory = Path(directory) if directory is not None else default_schema_dir()
        who = personality(SCHEMA_DEFAULT_VERSION if version is None else version)
        symbols = who.schema_conditions
        exprs = parse_file(directory / TOP_FILE, symbols=symbols,
                           known_symbols=ALL_SCHEMA_SYMBOLS)
        return cls(TypeModel(exprs, symbols, known_symbols=ALL_SCHEMA_SYMBOLS), who)

    @property
    def version(self) -> str:
        """The QEMU version this view is of (``"10.0"``)."""
        return self.personality.version

    def command_names_registration_order(self) -> list[str]:
        """Definition order, which is QEMU's registration order; query-commands
        lists the commands in the reverse of this."""
        return list(self.commands)

    def validate(self, command: str, arguments: dict) -> dict:
        """Check *arguments* of a known *command*; raise QMPError with QEMU's
        message, or return the arguments (uint64 wrap-around applied; no
        defaults filled in).  The input dict is never modified."""
        return self._validators[command](arguments, None, None)  # type: ignore[return-value]

    def validate_type(self, type_name: str, value: object, path: str = "") -> object:
        """Validate *value* against a named type, as QEMU's JSON input visitor
        would; *path* prefixes member paths in messages (e.g. ``"options"``)."""
        t = self.model.lookup(type_name)
        ctx, name = (None, path) if path else (None, None)
        return self._compiler.visitor(t)(value, ctx, name)

    def parse_keyval(self, type_name: str, text: str) -> dict:
        """Parse a command-line option such as ``--blockdev``: keyval syntax
        (the union discriminator is the implied key) converted to the schema's
        scalar types, or JSON when *text* starts with ``{``."""
        if text.lstrip().startswith("{"):
            try:
                # Integer literals as QEMU reads them (long ones become doubles),
                # never CPython's digit-limit error.
                value = json.loads(text, parse_int=integer_literal)
            except ValueError as exc:
                raise QMPError(f"JSON parse error, {exc}") from None
            return self.validate_type(type_name, value)  # type: ignore[return-value]
        t = self.model.lookup(type_name)
        implied = t.tag if isinstance(t, ObjectType) else None
        tree = keyval_parse(text, implied)
        return self._kv_compiler.visitor(t)(tree, None, None)  # type: ignore[return-value]

    def introspect(self, commands: Collection[str] | None = None) -> list[dict]:
        """The query-qmp-schema return value (built once per *commands*;
        callers must not modify it).  With *commands*, only those commands
        are described (pass the implemented ones, so that a command defined
        for a version but not yet handled is not advertised); events and
        types follow from what is described."""
        key = None if commands is None else frozenset(commands)
        if key not in self._introspection:
            self._introspection[key] = introspect(self.model, commands=key)
        return self._introspection[key]

    def json_schema(self) -> dict:
        """The derived JSON Schema document (built once)."""
        if self._json_schema is None:
            self._json_schema = derive(self.model)
        return self._json_schema
