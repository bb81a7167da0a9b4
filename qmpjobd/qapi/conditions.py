"""QAPI ``'if'`` conditions: one schema text, one view per QEMU version.

QEMU's QAPI dialect lets a definition, a member, an enum value, a feature or
a union/alternate branch carry ``'if': COND``, where COND is a symbol
(``'QEMU_SINCE_10_0'``), ``{'all': [COND, ...]}``, ``{'any': [COND, ...]}``
or ``{'not': COND}``.  QEMU turns conditions into ``#if`` in generated C; we
evaluate them when loading, against the symbols a personality defines
(``qmpjobd.versions``), and hand the type model expressions without any
``'if'`` left.

Two extensions of the dialect, both needed to say how versions differ:

* ``{ 'include': 'x.json', 'if': COND }`` includes a file only when COND
  holds (handled by the parser).  Combined with include-once, it moves a
  whole module earlier in the definition order for some versions, which is
  how QEMU's own module order changed between releases.
* The same name may be defined more than once when the conditions of its
  definitions never hold together; after evaluation exactly one is left (the
  type model still rejects a real duplicate).  That expresses changes of
  member order or of a base type that per-member conditions cannot.
"""
from __future__ import annotations

from collections.abc import Set
from typing import Union

Condition = Union[str, dict]


class ConditionError(Exception):
    """A malformed ``'if'`` value."""


def check_condition(cond: object, known: Set[str] | None = None) -> None:
    """Raise ConditionError unless *cond* is well-formed; with *known*, also
    when it names a symbol outside that set (a typo would silently be false)."""
    if isinstance(cond, str):
        if known is not None and cond not in known:
            raise ConditionError(f"unknown condition symbol {cond!r}")
        return
    if not isinstance(cond, dict) or len(cond) != 1:
        raise ConditionError(f"condition must be a string or a one-key object: {cond!r}")
    (op, arg), = cond.items()
    if op == "not":
        check_condition(arg, known)
    elif op in ("all", "any"):
        if not isinstance(arg, list) or not arg:
            raise ConditionError(f"'{op}' needs a non-empty list: {cond!r}")
        for sub in arg:
            check_condition(sub, known)
    else:
        raise ConditionError(f"unknown condition operator {op!r}")


def holds(cond: Condition | None, symbols: Set[str]) -> bool:
    """Evaluate *cond* with *symbols* defined (absent condition: true)."""
    if cond is None:
        return True
    if isinstance(cond, str):
        return cond in symbols
    (op, arg), = cond.items()
    if op == "not":
        return not holds(arg, symbols)
    if op == "all":
        return all(holds(c, symbols) for c in arg)
    if op == "any":
        return any(holds(c, symbols) for c in arg)
    raise ConditionError(f"unknown condition operator {op!r}")


def _kept(spec: object, symbols: Set[str]) -> bool:
    return not isinstance(spec, dict) or holds(spec.get("if"), symbols)


def _without_if(spec: object, symbols: Set[str]) -> object:
    """A member/branch/value/feature spec with its own 'if' removed and its
    nested features evaluated; plain strings and lists pass through."""
    if not isinstance(spec, dict):
        return spec
    out = {k: v for k, v in spec.items() if k != "if"}
    if "features" in out:
        out["features"] = _features(out["features"], symbols)
    return out


def _features(raw: list, symbols: Set[str]) -> list:
    return [_without_if(f, symbols) for f in raw if _kept(f, symbols)]


def _members(data: dict, symbols: Set[str]) -> dict:
    return {name: _without_if(spec, symbols)
            for name, spec in data.items() if _kept(spec, symbols)}


def select(expr: dict, symbols: Set[str]) -> dict | None:
    """The view of one top-level definition with *symbols* defined: None when
    the definition itself is excluded, else a copy without any 'if'."""
    if not holds(expr.get("if"), symbols):
        return None
    out = {k: v for k, v in expr.items() if k != "if"}
    if "features" in out:
        out["features"] = _features(out["features"], symbols)
    data = out.get("data")
    if "enum" in out:
        out["data"] = [_without_if(v, symbols) for v in data if _kept(v, symbols)]
    elif isinstance(data, dict):
        # struct/command/event members, union and alternate branches alike
        out["data"] = _members(data, symbols)
    if isinstance(out.get("base"), dict):
        out["base"] = _members(out["base"], symbols)
    return out


def conditions_in(expr: dict) -> list[object]:
    """Every 'if' value in one top-level definition (for checking them)."""
    found: list[object] = []

    def visit(node: object, is_member_table: bool = False) -> None:
        # In a 'data'/'base' dict the keys are member names, and a member may be
        # called 'if' (QEMU has one): there it is a member, not a condition.
        if isinstance(node, dict):
            if "if" in node and not is_member_table:
                found.append(node["if"])
            for key, value in node.items():
                if key == "if" and not is_member_table:
                    continue
                visit(value, not is_member_table and key in ("data", "base")
                      and isinstance(value, dict))
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(expr)
    return found


__all__ = ["Condition", "ConditionError", "check_condition", "holds", "select",
           "conditions_in"]
