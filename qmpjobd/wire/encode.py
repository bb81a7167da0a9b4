"""QEMU's byte format for outgoing QMP messages.

Reproduces what qemu-storage-daemon 7.2 writes (qobject/json-writer.c plus the monitor
output layer):

* compact separators ``", "`` and ``": "``; every message ends with ``\\r\\n``;
* pretty mode: 4-space indentation, every newline written as ``\\r\\n``, empty containers
  printed as an opening bracket, a newline and the closing bracket;
* ASCII only: short escapes for ``\\b \\f \\n \\r \\t \\" \\\\``, every other code point below
  0x20 or from 0x7F up as ``\\uXXXX`` with *uppercase* hex, surrogate pairs above U+FFFF,
  ``\\uFFFD`` for anything QEMU's modified-UTF-8 decoder rejects (surrogates,
  noncharacters); ``/`` is not escaped;
* integers in decimal, doubles with C ``%.17g`` (``inf``, ``nan``, ``-0``);
* object members in QEMU's QDict iteration order (see :func:`qdict_order`).

Speed: the common case (compact, no floats) reorders the dicts in Python, lets the C
encoder of the standard ``json`` module produce the text, and only touches the result
again when it contains a ``\\u`` escape. Pretty mode and messages holding floats take a
pure-Python writer that follows QEMU's writer step by step.
"""

from __future__ import annotations

import decimal
import json
import json.encoder
import logging
import math
import re
from typing import Callable, Iterable

__all__ = ["encode", "encode_event", "qdict_bucket", "qdict_order", "cache_footprint"]

QDICT_BUCKETS = 512

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# QDict key order
# ---------------------------------------------------------------------------------------

# Both caches hold keys that clients choose (ids, arguments), so each is bounded by the
# memory it holds, not only by its number of entries: a key or key list too large to be
# worth caching is computed every time, and a cache that reaches its budget is emptied.
# The daemon's own keys (a few hundred, all short) fit many times over.
_BUCKET_CACHE_MAX_KEY = 64          # characters; longer keys are hashed every time
_BUCKET_CACHE_ENTRIES = 4096
# The order cache accounts each entry in approximate bytes: the characters of its keys
# plus, per key, a string object header and a slot in each of the two tuples.
_ORDER_KEY_OVERHEAD = 64
_ORDER_CACHE_MAX_COST = 8 << 10     # bytes; larger key lists are ordered every time
_ORDER_CACHE_BUDGET = 1 << 20       # bytes held by all entries together

_bucket_cache: dict[str, int] = {}
_order_cache: dict[tuple[str, ...], tuple[str, ...]] = {}
_order_cache_cost = 0


def _qemu_key_bytes(key: str) -> bytes:
    """The key as QEMU stores it: modified UTF-8 (U+0000 is ``C0 80``)."""
    return key.encode("utf-8", "surrogatepass").replace(b"\x00", b"\xc0\x80")


def _tdb_bucket(key: str) -> int:
    raw = _qemu_key_bytes(key)
    value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
    for i, byte in enumerate(raw):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % QDICT_BUCKETS


def qdict_bucket(key: str) -> int:
    """Bucket of ``key`` in a QEMU QDict (the tdb hash, 512 buckets); cached."""
    bucket = _bucket_cache.get(key)
    if bucket is None:
        bucket = _tdb_bucket(key)
        if len(key) <= _BUCKET_CACHE_MAX_KEY:
            if len(_bucket_cache) >= _BUCKET_CACHE_ENTRIES:
                _bucket_cache.clear()
            _bucket_cache[key] = bucket
    return bucket


def _compute_order(keys: tuple[str, ...]) -> tuple[str, ...]:
    # Buckets ascending; inside a bucket QEMU inserts at the list head, so the most
    # recently inserted key (highest insertion index) comes first.
    ranked = sorted((qdict_bucket(k), -i, k) for i, k in enumerate(keys))
    return tuple(k for _, _, k in ranked)


def _order_cost(keys: tuple[str, ...]) -> int:
    """Approximate bytes that caching ``keys`` and their order holds."""
    return _ORDER_KEY_OVERHEAD * len(keys) + sum(map(len, keys))


def _remember_order(keys: tuple[str, ...], order: tuple[str, ...]) -> None:
    global _order_cache_cost
    if _ORDER_KEY_OVERHEAD * len(keys) > _ORDER_CACHE_MAX_COST:
        return                          # too many keys (checked before summing lengths)
    cost = _order_cost(keys)
    if cost > _ORDER_CACHE_MAX_COST:
        return
    if _order_cache_cost + cost > _ORDER_CACHE_BUDGET:
        _order_cache.clear()
        _order_cache_cost = 0
    _order_cache[keys] = order
    _order_cache_cost += cost


def qdict_order(keys: Iterable[str]) -> tuple[str, ...]:
    """Iteration order of a QDict whose keys were inserted in the order given."""
    keys = tuple(keys)
    if len(keys) < 2:
        return keys
    order = _order_cache.get(keys)
    if order is None:
        order = _compute_order(keys)
        _remember_order(keys, order)
    return order


def cache_footprint() -> dict[str, int]:
    """What the key caches hold now (entries and the cost they are accounted at);
    for tests and diagnostics."""
    return {
        "bucket_entries": len(_bucket_cache),
        "bucket_chars": sum(map(len, _bucket_cache)),
        "order_entries": len(_order_cache),
        "order_cost": _order_cache_cost,
    }


# ---------------------------------------------------------------------------------------
# Strings
# ---------------------------------------------------------------------------------------

# The json module writes lowercase \uXXXX escapes and passes surrogates/noncharacters
# through; QEMU writes uppercase hex and turns what its decoder rejects into U+FFFD.
# The alternation consumes "\\" pairs first so an escaped backslash followed by "u" is
# never mistaken for an escape.
_JSON_ESCAPE = re.compile(
    r"\\(?:u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|u([0-9a-f]{4})|.)"
)


def _is_noncharacter(cp: int) -> bool:
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def _qemu_escape(match: re.Match[str]) -> str:
    high, low, single = match.group(1, 2, 3)
    if high is not None:
        cp = 0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00)
        if _is_noncharacter(cp):
            return "\\uFFFD"
        return "\\u" + high.upper() + "\\u" + low.upper()
    if single is not None:
        cp = int(single, 16)
        if 0xD800 <= cp <= 0xDFFF or _is_noncharacter(cp):
            return "\\uFFFD"
        return "\\u" + single.upper()
    return match.group(0)


def _fix_escapes(text: str) -> str:
    """Turn json-module escapes into QEMU's (no-op unless a \\u escape is present)."""
    if "\\u" not in text:
        return text
    return _JSON_ESCAPE.sub(_qemu_escape, text)


_ascii_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _quote(s: str) -> str:
    return _fix_escapes(_ascii_quote(s))


# ---------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1


def _int_text(value: int) -> str:
    """Decimal text of an integer of any size.

    QEMU's integers are int64 or uint64 (the lexer turns anything larger into a double),
    so a larger one can only come from qmpjobd's own code; it is still printed exactly,
    without tripping CPython's limit on digits in ``str(int)``.
    """
    if _INT64_MIN <= value <= _UINT64_MAX:
        return str(int(value))
    return str(decimal.Decimal(int(value)))


def format_double(value: float) -> str:
    """C's ``printf("%.17g")`` as glibc prints it."""
    if math.isnan(value):
        return "-nan" if math.copysign(1.0, value) < 0 else "nan"
    return "%.17g" % value


# ---------------------------------------------------------------------------------------
# Fast compact path: reorder, then the C encoder
# ---------------------------------------------------------------------------------------

class _NeedsQemuWriter(Exception):
    """Raised while reordering when the C encoder would print something differently."""


# Deeper values (ids can nest up to QEMU's input limit of 1024) go to the iterative writer
# instead of recursing here and in the C encoder.
_FAST_MAX_DEPTH = 200


def _reorder(value: object, depth: int = 0) -> object:
    kind = type(value)
    if kind is dict:
        if not value:
            return value
        if depth > _FAST_MAX_DEPTH:
            raise _NeedsQemuWriter()
        return {k: _reorder(value[k], depth + 1) for k in qdict_order(value)}
    if kind is list or kind is tuple:
        if depth > _FAST_MAX_DEPTH:
            raise _NeedsQemuWriter()
        return [_reorder(item, depth + 1) for item in value]
    if kind is float:
        raise _NeedsQemuWriter()      # json prints repr(); QEMU prints %.17g
    if kind is int and not _INT64_MIN <= value <= _UINT64_MAX:
        raise _NeedsQemuWriter()      # str() of a huge int may exceed CPython's digit limit
    return value


def _unsupported(value: object) -> object:
    raise TypeError(f"cannot encode {type(value).__name__} as QMP JSON")


_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)

if _c_make_encoder is not None:
    _c_iterencode = _c_make_encoder(
        None, _unsupported, _ascii_quote, None, ": ", ", ", False, False, True
    )

    def _c_encode(value: object) -> str:
        return "".join(_c_iterencode(value, 0))
else:                                      # pragma: no cover - CPython always has it
    _c_encode = json.JSONEncoder(
        separators=(", ", ": "), check_circular=False, default=_unsupported
    ).encode


# ---------------------------------------------------------------------------------------
# QEMU's writer, step by step (pretty mode, floats)
# ---------------------------------------------------------------------------------------

def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return _int_text(value)
    if isinstance(value, float):
        return format_double(value)
    if isinstance(value, str):
        return _quote(value)
    raise TypeError(f"cannot encode {type(value).__name__} as QMP JSON")


def _open(value: object) -> tuple[list[tuple[str | None, object]], str, str] | None:
    """Items, opening and closing bracket of a container; None for a scalar."""
    if isinstance(value, dict):
        return [(k, value[k]) for k in qdict_order(value)], "{", "}"
    if isinstance(value, (list, tuple)):
        return [(None, v) for v in value], "[", "]"
    return None


def _qemu_write(root: object, pretty: bool) -> str:
    """json-writer.c's output for ``root``, iteratively (values nest up to 1024 deep)."""
    out: list[str] = []
    stack: list[list] = []              # open containers: [items, next index, closer]
    value = root
    while True:
        container = _open(value)
        if container is None:
            out.append(_scalar(value))
        else:
            items, opener, closer = container
            out.append(opener)
            stack.append([items, 0, closer])
        while stack:                    # find the next value to write
            frame = stack[-1]
            items, index, closer = frame
            if index < len(items):
                frame[1] = index + 1
                indent = "\n" + "    " * len(stack) if pretty else ""
                if index:
                    out.append("," + indent if pretty else ", ")
                else:
                    out.append(indent)
                key, value = items[index]
                if key is not None:
                    out.append(_quote(key))
                    out.append(": ")
                break
            stack.pop()
            if pretty:
                # every container, even an empty one, closes on a new line at the
                # parent's indentation
                out.append("\n" + "    " * len(stack))
            out.append(closer)
        else:
            return "".join(out)


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------

# JOB_STATUS_CHANGE is most of the event traffic (every drain pauses and resumes
# every running job: ~10^6 events while 1000 backups start) and always has this
# shape, so it skips the generic reorder + encode (24 % of the daemon's CPU there).
# The member order is QEMU's QDict order, as encode() would produce it.
_JOB_STATUS_CHANGE = ('{"timestamp": {"seconds": %d, "microseconds": %d}, '
                      '"event": "JOB_STATUS_CHANGE", "data": {"status": %s, "id": %s}}\r\n')
_JOB_STATUS_CHANGE_KEYS = ("timestamp", "event", "data")


def encode_event(message: dict, pretty: bool = False) -> bytes:
    """``encode(message, pretty)`` for an event message, cheaper for the common one."""
    if not pretty and message.get("event") == "JOB_STATUS_CHANGE" \
            and tuple(message) == _JOB_STATUS_CHANGE_KEYS:
        data, stamp = message["data"], message["timestamp"]
        status, job_id = data.get("status"), data.get("id")
        if len(data) == 2 and type(status) is str and type(job_id) is str \
                and type(stamp["seconds"]) is int and type(stamp["microseconds"]) is int:
            text = _JOB_STATUS_CHANGE % (stamp["seconds"], stamp["microseconds"],
                                         _quote(status), _quote(job_id))
            return text.encode("ascii")
    return encode(message, pretty)


INTERNAL_ERROR_DESC = "internal error in qmpjobd: {} while encoding the reply"


def encode(value: dict, pretty: bool = False) -> bytes:
    """One QMP message as QEMU writes it, terminated by ``\\r\\n``.

    A reply (a message with ``return`` or ``error``) that cannot be encoded, which only
    a bug in qmpjobd can cause, becomes an internal error reply with the same ``id``, so
    the client still gets an answer and keeps its connection. Anything else that cannot
    be encoded raises ``TypeError``/``ValueError``.
    """
    try:
        return _encode(value, pretty)
    except Exception as exc:
        if not _is_reply(value):
            raise
        log.exception("internal error while encoding a reply")
        return _encode(_internal_error_reply(value, exc), pretty)


def _encode(value: dict, pretty: bool) -> bytes:
    if pretty:
        return _qemu_write(value, True).replace("\n", "\r\n").encode("ascii") + b"\r\n"
    try:
        ordered = _reorder(value)
    except _NeedsQemuWriter:
        text = _qemu_write(value, False)
    else:
        text = _fix_escapes(_c_encode(ordered))
    return text.encode("ascii") + b"\r\n"


def _is_reply(message: object) -> bool:
    return type(message) is dict and ("return" in message or "error" in message)


def _internal_error_reply(reply: dict, exc: Exception) -> dict:
    error = {"class": "GenericError", "desc": INTERNAL_ERROR_DESC.format(type(exc).__name__)}
    message: dict = {"error": error}
    if "id" in reply:
        try:
            _encode({"id": reply["id"]}, False)
        except Exception:
            return message             # the id itself is what cannot be encoded
        message["id"] = reply["id"]
    return message
