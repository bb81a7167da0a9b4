"""QEMU's compact JSON text, for the ``json:{...}`` pseudo-filenames of block nodes.

QEMU prints a node whose options cannot be expressed as a plain filename as
``json:`` followed by its options dict serialised with ``qobject_to_json``: keys in
QDict hash order (tdb hash, 512 buckets, newest first inside a bucket), ``", "`` and
``": "`` separators, and its own string escaping. The string is a *value* inside a
reply, so the wire encoder cannot fix its order for us; we build it here.
"""

from __future__ import annotations

QDICT_BUCKETS = 512


def tdb_bucket(key: str) -> int:
    """The QDict bucket QEMU puts ``key`` in."""
    data = key.encode("utf-8")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % QDICT_BUCKETS


def qdict_order(keys: list[str]) -> list[str]:
    """``keys`` (in insertion order) in the order QEMU iterates a QDict."""
    indexed = list(enumerate(keys))
    # Bucket ascending; inside a bucket the key inserted last comes first.
    indexed.sort(key=lambda item: (tdb_bucket(item[1]), -item[0]))
    return [key for _, key in indexed]


def _escape(text: str) -> str:
    out = ['"']
    short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f",
             "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    for char in text:
        code = ord(char)
        if char in short:
            out.append(short[char])
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)))
        else:
            out.append("\\u%04X" % code)
    out.append('"')
    return "".join(out)


def to_json(value: object) -> str:
    """Serialise like QEMU's ``qobject_to_json`` (non-pretty)."""
    if value is None:
        return "null"
    if type(value) is bool:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "%.17g" % value
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, list):
        return "[" + ", ".join(to_json(item) for item in value) + "]"
    if isinstance(value, dict):
        members = (f"{_escape(key)}: {to_json(value[key])}" for key in qdict_order(list(value)))
        return "{" + ", ".join(members) + "}"
    raise TypeError(f"cannot serialise {type(value).__name__}")
