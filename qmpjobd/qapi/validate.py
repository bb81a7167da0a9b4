"""Argument checking with QEMU's exact messages, compiled once per type.

Each QAPI type becomes a closure ``visit(value, ctx, name) -> value`` that
behaves like QEMU's generated visitor driving the QObject input visitor:
members in declaration order (a flat union's discriminator where its base
declares it, then the branch members), "missing" before "unexpected", and
the unexpected key chosen by replaying GLib's hash table (see ghash.py).

A value's location is ``(ctx, name)`` when *name* is a member name and
``ctx`` itself for list elements (ctx then ends with the index).  Paths are
only turned into strings when an error is reported, so the hot path pays for
a tuple per nested object and nothing else.

Message families, as in qapi/qobject-input-visitor.c and qapi-visit-core.c:
the full dotted path for missing members, JSON type errors and uint64 errors;
the bare member name (``null`` inside lists) for enum values, narrow integer
ranges and alternates.

The keyval flavour (``keyval=True``) is the same walk over the all-strings
tree that QEMU's keyval parser builds (``--blockdev driver=...``): scalars
are converted from strings with QEMU's rules, list indices print as ``.N``.
"""
from __future__ import annotations

import math
import re
from typing import Callable

from ..errors import QMPError
from .ghash import first_unexpected
from .model import (INT_RANGES, AlternateType, ArrayType, BuiltinType, EnumType,
                    ObjectType, QType, TypeModel)

Visitor = Callable[[object, object, "str | None"], object]
_U64 = 2**64
_I64_MIN = -(2**63)


def full_name(loc: object, keyval: bool = False) -> str:
    """Format a location chain the way QEMU's full_name() does."""
    segs: list[object] = []
    while loc is not None:
        loc, seg = loc  # type: ignore[misc]
        segs.append(seg)
    out = ""
    for seg in reversed(segs):
        if isinstance(seg, int):
            out += f".{seg}" if keyval else f"[{seg}]"
        else:
            out += f".{seg}" if out else seg
    return out


def _loc(ctx: object, name: str | None) -> object:
    return (ctx, name) if name is not None else ctx


def _type_error(ctx: object, name: str | None, expected: str, keyval: bool) -> QMPError:
    return QMPError(f"Invalid parameter type for '{full_name(_loc(ctx, name), keyval)}', "
                    f"expected: {expected}")


def _value_error(what: str, expected: str) -> QMPError:
    return QMPError(f"Parameter '{what}' expects {expected}")


# --- QEMU's string-to-number helpers (util/cutils.c), for keyval input ----

_INT_RE = re.compile(r"[ \t\n\r\f\v]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


# The longest digit string a 64-bit value can need (octal: 22 digits).
_MAX_SIGNIFICANT_DIGITS = 22


def _strtoint(text: str) -> int | None:
    """strtoll/strtoull with base 0 and nothing left over; None if invalid."""
    m = _INT_RE.match(text)
    if not m:
        return None
    digits = m.group(2)
    body = digits[2:] if digits[:2] in ("0x", "0X") else digits
    if len(body.lstrip("0")) > _MAX_SIGNIFICANT_DIGITS:
        # Beyond every 64-bit range whatever the base (and before CPython's limit
        # on int() digits): out of range, as strtoull's ERANGE.
        return 2**64 if m.group(1) != "-" else -(2**64)
    if digits[:2] in ("0x", "0X"):
        val = int(digits, 16)
    elif len(digits) > 1 and digits[0] == "0":
        # base 0: a leading zero means octal, and strtoll stops at an 8 or 9
        if not set(digits) <= set("01234567"):
            return None
        val = int(digits, 8)
    else:
        val = int(digits)
    return -val if m.group(1) == "-" else val


def strtoi64(text: str) -> int | None:
    val = _strtoint(text)
    if val is None or not _I64_MIN <= val < 2**63:
        return None
    return val


def strtou64(text: str) -> int | None:
    val = _strtoint(text)
    if val is None or abs(val) >= _U64:
        return None
    return val % _U64        # strtoull wraps a leading minus


_SIZE_RE = re.compile(r"([0-9]+)(\.[0-9]*)?([bBkKmMgGtTpPeE]?)\Z")
_SUFFIX = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def strtosz(text: str) -> int | None:
    """qemu_strtosz(): decimal with optional fraction and B/K/M/G/T/P/E suffix
    (powers of 1024), or plain hex without either."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    m = _SIZE_RE.match(text)
    if not m:
        return None
    mul = 1024 ** _SUFFIX[m.group(3).lower()] if m.group(3) else 1
    frac = float("0" + m.group(2)) if m.group(2) else 0.0
    if frac and mul == 1:
        return None          # a fraction needs a scale
    val = int(m.group(1)) * mul + int(frac * mul)
    return val if val < _U64 else None


_BOOL = {"on": True, "yes": True, "true": True, "y": True,
         "off": False, "no": False, "false": False, "n": False}


class Compiler:
    """Builds (and caches) one visitor closure per type."""

    def __init__(self, model: TypeModel, keyval: bool = False) -> None:
        self.model, self.keyval = model, keyval
        self.cache: dict[int, Visitor] = {}

    def visitor(self, t: QType) -> Visitor:
        key = id(t)
        fn = self.cache.get(key)
        if fn is None:
            # late binding through a cell so recursive types (BlockdevRef ->
            # BlockdevOptions -> BlockdevRef) compile without infinite recursion
            cell: list[Visitor] = []
            self.cache[key] = lambda v, c, n: cell[0](v, c, n)
            fn = self._build(t)
            cell.append(fn)
            self.cache[key] = fn
        return fn

    def _build(self, t: QType) -> Visitor:
        if isinstance(t, BuiltinType):
            return self._builtin(t.name)
        if isinstance(t, EnumType):
            return self._enum(t)
        if isinstance(t, ArrayType):
            return self._array(t)
        if isinstance(t, AlternateType):
            return self._alternate(t)
        assert isinstance(t, ObjectType)
        return self._object(t)

    # -- scalars -----------------------------------------------------------
    def _builtin(self, name: str) -> Visitor:
        kv = self.keyval
        if name == "str":
            def visit_str(v, c, n):
                if type(v) is not str:
                    raise _type_error(c, n, "string", kv)
                return v
            return visit_str
        if name == "bool":
            return self._bool()
        if name == "number":
            return self._number()
        if name == "any":
            return lambda v, c, n: v
        if name == "null":
            def visit_null(v, c, n):
                if v is None or (kv and v == ""):
                    return None
                raise _type_error(c, n, "null", kv)
            return visit_null
        if name in ("uint64", "size"):
            return self._uint64(name == "size")
        if name.startswith("uint"):
            return self._narrow_uint(name)
        if name in ("int", "int64"):
            return self._int64()
        return self._narrow_int(name)

    def _bool(self) -> Visitor:
        if self.keyval:
            def visit_bool_kv(v, c, n):
                if type(v) is not str:
                    raise _type_error(c, n, "string", True)
                if v not in _BOOL:
                    raise _value_error(full_name(_loc(c, n), True), "'on' or 'off'")
                return _BOOL[v]
            return visit_bool_kv

        def visit_bool(v, c, n):
            if type(v) is not bool:
                raise _type_error(c, n, "boolean", False)
            return v
        return visit_bool

    def _number(self) -> Visitor:
        if self.keyval:
            def visit_number_kv(v, c, n):
                if type(v) is not str:
                    raise _type_error(c, n, "string", True)
                try:
                    val = float(v)
                except ValueError:
                    val = math.inf
                if not math.isfinite(val):
                    raise _value_error(full_name(_loc(c, n), True), "number")
                return val
            return visit_number_kv

        def visit_number(v, c, n):
            if type(v) is not int and type(v) is not float:
                raise _type_error(c, n, "number", False)
            return v
        return visit_number

    def _int64(self) -> Visitor:
        if self.keyval:
            def visit_int_kv(v, c, n):
                if type(v) is not str:
                    raise _type_error(c, n, "string", True)
                val = strtoi64(v)
                if val is None:
                    raise _value_error(full_name(_loc(c, n), True), "integer")
                return val
            return visit_int_kv

        def visit_int(v, c, n):
            if type(v) is not int or not _I64_MIN <= v < 2**63:
                raise _type_error(c, n, "integer", False)
            return v
        return visit_int

    def _uint64(self, is_size: bool) -> Visitor:
        if self.keyval:
            conv, what = (strtosz, "size") if is_size else (strtou64, "integer")

            def visit_u64_kv(v, c, n):
                if type(v) is not str:
                    raise _type_error(c, n, "string", True)
                val = conv(v)
                if val is None:
                    raise _value_error(full_name(_loc(c, n), True), what)
                return val
            return visit_u64_kv

        def visit_u64(v, c, n):
            if type(v) is int:
                if 0 <= v < _U64:
                    return v
                if _I64_MIN <= v < 0:
                    return v + _U64        # QEMU accepts negative int64 and wraps
            raise _value_error(full_name(_loc(c, n)), "uint64")
        return visit_u64

    def _narrow_uint(self, name: str) -> Visitor:
        base = self._uint64(False)
        hi = INT_RANGES[name][1]
        label = name + "_t"

        def visit_uint(v, c, n):
            val = base(v, c, n)
            if val > hi:
                raise _value_error(n if n is not None else "null", label)
            return val
        return visit_uint

    def _narrow_int(self, name: str) -> Visitor:
        base = self._int64()
        lo, hi = INT_RANGES[name]
        label = name + "_t"

        def visit_intn(v, c, n):
            val = base(v, c, n)
            if not lo <= val <= hi:
                raise _value_error(n if n is not None else "null", label)
            return val
        return visit_intn

    def _enum(self, t: EnumType) -> Visitor:
        values = frozenset(t.values)
        kv = self.keyval

        def visit_enum(v, c, n):
            if type(v) is not str:
                raise _type_error(c, n, "string", kv)
            if v not in values:
                raise QMPError(f"Parameter '{n if n is not None else 'null'}' "
                               f"does not accept value '{v}'")
            return v
        return visit_enum

    # -- containers ----------------------------------------------------------
    def _array(self, t: ArrayType) -> Visitor:
        elem = self.visitor(t.element)  # type: ignore[arg-type]
        kv = self.keyval

        def visit_list(v, c, n):
            if type(v) is not list:
                raise _type_error(c, n, "array", kv)
            here = _loc(c, n)
            out = v
            for i, item in enumerate(v):
                new = elem(item, (here, i), None)
                if new is not item:
                    if out is v:
                        out = list(v)
                    out[i] = new
            return out
        return visit_list

    def _alternate(self, t: AlternateType) -> Visitor:
        by_json: dict[type, Visitor] = {}
        for _, bt in t.branches:
            fn = self.visitor(bt)
            jt = bt.json_type
            if jt == "object":
                by_json[dict] = fn
            elif jt == "array":
                by_json[list] = fn
            elif jt == "string":
                by_json[str] = fn
            elif jt == "boolean":
                by_json[bool] = fn
            elif jt in ("int", "number"):
                by_json.setdefault(int, fn)
                by_json.setdefault(float, fn)
            elif jt == "null":
                by_json[type(None)] = fn
        alt_name = t.name

        def visit_alternate(v, c, n):
            fn = by_json.get(type(v))
            if fn is None:
                raise QMPError(f"Invalid parameter type for "
                               f"'{n if n is not None else 'null'}', expected: {alt_name}")
            return fn(v, c, n)
        return visit_alternate

    def _specs(self, t: ObjectType) -> list[tuple[str, bool, Visitor]]:
        return [(m.name, m.optional, self.visitor(m.type)) for m in t.members]

    def _object(self, t: ObjectType) -> Visitor:
        kv = self.keyval
        base_specs = self._specs(t)
        tag = t.tag
        branches: dict[str, list[tuple[str, bool, Visitor]]] = {}
        if tag is not None:
            branches = {case: self._specs(vt) for case, vt in t.variants}

        def visit_members(specs, v, out, here):
            used = 0
            for mname, optional, fn in specs:
                if mname in v:
                    old = v[mname]
                    new = fn(old, here, mname)
                    used += 1
                    if new is not old:
                        if out is v:
                            out = dict(v)
                        out[mname] = new
                elif not optional:
                    raise QMPError(f"Parameter '{full_name((here, mname), kv)}' is missing")
            return out, used

        def visit_object(v, c, n):
            if type(v) is not dict:
                raise _type_error(c, n, "object", kv)
            here = _loc(c, n)
            out, used = visit_members(base_specs, v, v, here)
            specs = base_specs
            if tag is not None:
                specs = branches[out[tag]]
                out, more = visit_members(specs, v, out, here)
                used += more
                specs = base_specs + specs
            if used != len(v):
                consumed = [m for m, _, _ in specs if m in v]
                extra = first_unexpected(list(v), consumed)
                raise QMPError(f"Parameter '{full_name((here, extra), kv)}' is unexpected")
            return out
        return visit_object
