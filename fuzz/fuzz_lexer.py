"""Coverage-guided fuzzing of the QMP lexer, the session checks and the encoder.

Properties checked on every input:
* the fast path and the faithful path give the same values and errors, whole and when
  the input arrives in pieces (the piece sizes come from the input's first bytes);
* no internal error (the lexer reports one instead of raising);
* every parsed value goes through the request checks and is echoed as an ``id``
  without an exception, and an echoed value parses back to the same bytes.
"""

from __future__ import annotations

import math

from _harness import Bug, run

lexer = session = encode = None


def _load() -> None:
    global lexer, session, encode
    from qmpjobd.wire import encode as encode_module, lexer as lexer_module
    from qmpjobd.wire import session as session_module
    lexer, session, encode = lexer_module, session_module, encode_module


def _pieces(data: bytes, sizes: bytes) -> list[bytes]:
    out, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        out.append(data[pos:pos + 1 + size % 64])
        pos += 1 + size % 64
    if pos < len(data):
        out.append(data[pos:])
    return out


def _results(fast: bool, pieces: list[bytes]) -> list[bytes]:
    """Everything the parser produced, as the bytes a client would receive."""
    parser = lexer.StreamParser(fast_path=fast)
    replies = []
    for piece in pieces:
        for item in parser.feed(piece):
            if isinstance(item, lexer.ParseError) and item.desc.startswith("internal error"):
                raise Bug(item.desc)
            replies.append(_reply_bytes(item))
    return replies


def _reply_bytes(item: object) -> bytes:
    reply = session.Session().take(item)
    if isinstance(reply, session.Request):
        reply = {"return": {}, "id": reply.id} if reply.has_id else {"return": {}}
    if isinstance(item, lexer.ParsedValue):
        reply = {"return": {}, "id": item.value, "original": reply}
    return encode.encode(reply) + encode.encode(reply, pretty=True)


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _echo_round_trip(pieces: list[bytes]) -> None:
    parser = lexer.StreamParser()
    for piece in pieces:
        for item in parser.feed(piece):
            if not isinstance(item, lexer.ParsedValue) or not _finite(item.value):
                continue                # inf and nan print as QEMU does: not JSON
            first = encode.encode({"id": item.value})
            again = lexer.StreamParser().feed(first)
            if len(again) != 1 or not isinstance(again[0], lexer.ParsedValue):
                raise Bug(f"echo does not parse back: {first[:200]!r}")
            if encode.encode(again[0].value) != first:
                raise Bug(f"echo changes on a second round: {first[:200]!r}")


def one_input(data: bytes) -> None:
    sizes, body = data[:8], data[8:]
    whole = [body]
    pieces = _pieces(body, sizes)
    reference = _results(False, whole)
    for fast, split in ((True, whole), (True, pieces), (False, pieces)):
        if _results(fast, split) != reference:
            raise Bug(f"fast={fast} pieces={len(split)} differs from the faithful path")
    _echo_round_trip(whole)


if __name__ == "__main__":
    run(one_input, _load)
