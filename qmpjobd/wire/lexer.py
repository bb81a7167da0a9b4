"""Splits a QMP input byte stream into JSON values and errors, exactly as QEMU 7.2 does.

QEMU reads QMP input with three layers (qobject/json-lexer.c, json-streamer.c,
json-parser.c): a byte-level lexer with error recovery, a streamer that counts braces
and brackets to find the end of a message and enforces the size/count/nesting limits,
and a recursive-descent parser that runs once a message is complete. This module
reproduces all three (the *faithful path*) and puts a *fast path* in front of them:

* Fast path: at a message boundary, when the next byte opens an object or array, the C
  decoder of the ``json`` module parses one value and reports where it ended. The value is
  accepted only when the message is provably one QEMU treats the same way: pure ASCII, no
  ``\\u`` escape that QEMU rejects (surrogates, noncharacters), no duplicate key, no NaN or
  Infinity, short enough that the token limits cannot trigger and not deeper than the
  nesting limit. Integers outside int64/uint64 are turned into floats as QEMU does.
* Faithful path: anything else (scalars at top level, single quotes, control characters,
  non-ASCII, errors, a message cut off at the end of the data...) goes byte by byte
  through the QEMU-equivalent lexer, streamer and parser. As soon as that path is back at a
  clean message boundary the fast path takes over again.

Both paths give identical results on well-formed input; tests check that with generated
documents split into random chunks.

The streamer and parser here are 7.2's (10.0 reads input the same way). QEMU 11.1 has a
push parser with error positions and a different recovery: ``push.py`` keeps this lexer
and replaces the streamer methods (``_push_token``, ``_clear_message``); the ``end``
index handed to ``_push_token`` and the ``_recovered`` hook exist for its positions.
``dialect.py`` picks the class for a personality.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

__all__ = ["ParsedValue", "ParseError", "StreamParser", "integer_literal",
           "MAX_TOKEN_SIZE", "MAX_TOKEN_COUNT", "MAX_NESTING"]

MAX_TOKEN_SIZE = 64 << 20       # bytes in one token, and in all tokens of one message
MAX_TOKEN_COUNT = 2 << 20       # tokens in one message
MAX_NESTING = 1 << 10           # open braces + brackets

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1
# A literal with more digits than UINT64_MAX (20) cannot be an int64 or a uint64 (the
# lexer admits no leading zeros), so it goes straight to the double conversion. This also
# keeps int() away from CPython's limit on digits in int/str conversions (4300).
_MAX_INTEGER_DIGITS = len(str(_UINT64_MAX))
# json-parser.c formats its messages into a 1024-byte buffer (vsnprintf), so the text
# after "JSON parse error, " is cut to 1023 bytes; only the keyword error can get there.
_PARSE_MESSAGE_MAX_BYTES = 1023

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ParsedValue:
    """One complete top-level JSON value."""
    value: object


@dataclass(slots=True)
class ParseError:
    """One input error, with QEMU's exact description."""
    desc: str


# ---------------------------------------------------------------------------------------
# Token kinds (what the lexer hands to the streamer)
# ---------------------------------------------------------------------------------------

(T_LCURLY, T_RCURLY, T_LSQUARE, T_RSQUARE, T_COLON, T_COMMA,
 T_INTEGER, T_FLOAT, T_KEYWORD, T_STRING, T_ERROR, T_OVERSIZE) = range(12)

_STRUCTURAL = {
    ord("{"): T_LCURLY, ord("}"): T_RCURLY, ord("["): T_LSQUARE,
    ord("]"): T_RSQUARE, ord(":"): T_COLON, ord(","): T_COMMA,
}

# ---------------------------------------------------------------------------------------
# Lexer states (json-lexer.c)
# ---------------------------------------------------------------------------------------

(S_START, S_RECOVERY, S_DQ, S_DQ_ESC, S_SQ, S_SQ_ESC, S_ZERO, S_SIGN, S_DIGITS,
 S_MANTISSA, S_MANTISSA_DIGITS, S_EXP_E, S_EXP_SIGN, S_EXP_DIGITS, S_KEYWORD) = range(15)

_WHITESPACE = frozenset(b" \t\r\n")
_DIGITS = frozenset(b"0123456789")
_LOWER = frozenset(b"abcdefghijklmnopqrstuvwxyz")

# Runs of bytes that keep the lexer in the same state, consumed in one step.
_WS_RUN = re.compile(rb"[ \t\r\n]+")
_DQ_RUN = re.compile(rb"[^\"\\\x00-\x1f\xfe\xff]+")
_SQ_RUN = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]+")
_DIGIT_RUN = re.compile(rb"[0-9]+")
_KEYWORD_RUN = re.compile(rb"[a-z]+")
# Recovery skips everything but structural characters, control characters other than
# tab, and the impossible UTF-8 bytes 0xFE/0xFF.
_RECOVERY_RUN = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]+")


# ---------------------------------------------------------------------------------------
# Modified UTF-8 (util/unicode.c semantics)
# ---------------------------------------------------------------------------------------

_MIN_CODEPOINT = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _valid_codepoint(cp: int) -> bool:
    if cp > 0x10FFFF or cp < 0:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False                                   # noncharacter
    return not 0xD800 <= cp <= 0xDFFF                  # surrogate


def _utf8_codepoint(raw: bytes, i: int) -> tuple[int, int]:
    """Decode the sequence at ``raw[i]``: (code point or -1, index after it).

    Mirrors QEMU's rules, which decide how many bytes an invalid sequence swallows:
    a continuation byte or 0xFE/0xFF takes one byte, a truncated sequence takes its lead
    byte and the continuation bytes present, a well-formed but invalid one (overlong,
    surrogate, noncharacter, beyond U+10FFFF) takes all of its bytes. ``C0 80`` is
    U+0000 (modified UTF-8). The end of ``raw`` acts like QEMU's terminating NUL.
    """
    byte = raw[i]
    i += 1
    if byte < 0x80:
        return byte, i
    if byte >= 0xFE or not byte & 0x40:
        return -1, i
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(length - 1):
        if i >= len(raw) or raw[i] & 0xC0 != 0x80:
            return -1, i
        cp = (cp << 6) | (raw[i] & 0x3F)
        i += 1
    if not _valid_codepoint(cp):
        return -1, i
    if cp < _MIN_CODEPOINT[length - 2] and not (cp == 0 and length == 2):
        return -1, i                                   # overlong, except C0 80
    return cp, i


def _lossy_text(raw: bytes) -> str:
    """Bytes QEMU prints with ``%s`` as they come out of its JSON writer.

    The C string ends at the first NUL; invalid sequences become U+FFFD.
    """
    nul = raw.find(0)
    if nul >= 0:
        raw = raw[:nul]
    if raw.isascii():
        return raw.decode("ascii")
    chars: list[str] = []
    i = 0
    while i < len(raw):
        cp, i = _utf8_codepoint(raw, i)
        chars.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(chars)


# Public name for other layers (ringbuf-read prints guest bytes the same way).
c_string_text = _lossy_text


# ---------------------------------------------------------------------------------------
# Parser (json-parser.c) over a complete token list
# ---------------------------------------------------------------------------------------

class _JSONSyntaxError(Exception):
    """The first error the parser finds; QEMU reports only the first."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.desc = "JSON parse error, " + _cut_message(message)


def _cut_message(message: str) -> str:
    """The message as QEMU's fixed-size buffer holds it: at most 1023 bytes of UTF-8.

    A multibyte character split by the cut becomes U+FFFD, as QEMU's JSON writer prints
    the truncated sequence.
    """
    if len(message) <= _PARSE_MESSAGE_MAX_BYTES // 4:
        return message                  # cannot exceed the buffer even if all 4-byte
    raw = message.encode("utf-8", "surrogatepass")
    if len(raw) <= _PARSE_MESSAGE_MAX_BYTES:
        return message
    return _lossy_text(raw[:_PARSE_MESSAGE_MAX_BYTES])


_SHORT_ESCAPES = {
    ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
    ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t",
}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _hex4(raw: bytes, i: int) -> int:
    """Four hex digits at ``raw[i:]`` or -1 (stops at the first non-digit)."""
    for j in range(i, i + 4):
        if j >= len(raw) or raw[j] not in _HEX:
            return -1
    return int(raw[i:i + 4], 16)


def _parse_string(token: bytes) -> str:
    """Decode a string token (quotes included) or raise QEMU's error."""
    body = token[1:-1]
    if body.isascii() and b"\\" not in body:
        return body.decode("ascii")
    chars: list[str] = []
    i = 1
    end = len(token) - 1                # index of the closing quote
    while i < end:
        byte = token[i]
        if byte == 0x5C:                # backslash
            start = i
            kind = token[i + 1]
            i += 2
            short = _SHORT_ESCAPES.get(kind)
            if short is not None:
                chars.append(short)
                continue
            if kind != ord("u"):
                raise _JSONSyntaxError("invalid escape sequence in string")
            cp = _hex4(token, i)
            i += 4
            if 0xD800 <= cp <= 0xDBFF and token[i:i + 2] == b"\\u":
                trailing = _hex4(token, i + 2)
                if 0xDC00 <= trailing <= 0xDFFF:
                    cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
                    i += 6
                else:
                    cp = -1
            if not _valid_codepoint(cp):
                shown = _lossy_text(token[start:i])
                raise _JSONSyntaxError(f"{shown} is not a valid Unicode character")
            chars.append(chr(cp))
        elif byte < 0x80:
            stop = i + 1
            while stop < end and token[stop] < 0x80 and token[stop] != 0x5C:
                stop += 1
            chars.append(token[i:stop].decode("ascii"))
            i = stop
        else:
            cp, i = _utf8_codepoint(token, i)
            if cp < 0 or i > end:
                raise _JSONSyntaxError("invalid UTF-8 sequence in string")
            chars.append(chr(cp))
    return "".join(chars)


def integer_literal(literal: bytes | str) -> int | float:
    """An integer token as QEMU converts it: int64, else uint64 (when not negative),
    else the nearest double (``strtod``, which gives ``inf`` past DBL_MAX).

    ``float()`` rounds correctly, as glibc's ``strtod`` does, at any length.
    """
    sign = b"-" if isinstance(literal, bytes) else "-"
    digits = len(literal) - literal.startswith(sign)
    if digits > _MAX_INTEGER_DIGITS:
        return float(literal)
    value = int(literal)
    if _INT64_MIN <= value <= _UINT64_MAX:
        return value
    return float(literal)


def _parse_scalar(kind: int, token: bytes) -> object:
    if kind == T_STRING:
        return _parse_string(token)
    if kind == T_INTEGER:
        return integer_literal(token)
    if kind == T_FLOAT:
        return float(token)
    if kind == T_KEYWORD:
        if token == b"true":
            return True
        if token == b"false":
            return False
        if token == b"null":
            return None
        raise _JSONSyntaxError(f"invalid keyword '{token.decode('ascii')}'")
    raise _JSONSyntaxError("expecting value")


_NO_KEY = object()


def _parse_tokens(kinds: list[int], texts: list[bytes]) -> object:
    """QEMU's recursive-descent parser, run iteratively (nesting reaches 1024).

    Each open container is a frame ``[container, pending_key]``; ``pending_key`` is
    ``_NO_KEY`` while an object waits for its next key. Error checks happen in the order
    QEMU makes them, so the first error reported is QEMU's.
    """
    count = len(kinds)
    pos = 0
    stack: list[list] = []
    while True:
        # -- parse_value at pos -------------------------------------------------------
        if pos >= count:
            raise _JSONSyntaxError("premature EOI")
        kind = kinds[pos]
        if kind == T_LCURLY or kind == T_LSQUARE:
            pos += 1
            if pos >= count:
                raise _JSONSyntaxError("premature EOI")
            closer = T_RCURLY if kind == T_LCURLY else T_RSQUARE
            if kinds[pos] == closer:
                pos += 1
                value: object = {} if kind == T_LCURLY else []
            else:
                stack.append([{} if kind == T_LCURLY else [], _NO_KEY])
                continue
        else:
            value = _parse_scalar(kind, texts[pos])
            pos += 1
        # -- hand the finished value to the enclosing containers ----------------------
        while True:
            if not stack:
                return value
            frame = stack[-1]
            container = frame[0]
            if type(container) is dict:
                if frame[1] is _NO_KEY:
                    if type(value) is not str:
                        raise _JSONSyntaxError("key is not a string in object")
                    frame[1] = value
                    if pos >= count:
                        raise _JSONSyntaxError("premature EOI")
                    if kinds[pos] != T_COLON:
                        raise _JSONSyntaxError("missing : in object pair")
                    pos += 1
                    break                               # parse the member value
                key = frame[1]
                if key in container:
                    raise _JSONSyntaxError("duplicate key")
                container[key] = value
                frame[1] = _NO_KEY
                if pos >= count:
                    raise _JSONSyntaxError("premature EOI")
                kind = kinds[pos]
                pos += 1
                if kind == T_RCURLY:
                    stack.pop()
                    value = container
                    continue
                if kind != T_COMMA:
                    raise _JSONSyntaxError("expected separator in dict")
                if pos >= count:
                    raise _JSONSyntaxError("premature EOI")
                break                                   # parse the next key
            container.append(value)
            if pos >= count:
                raise _JSONSyntaxError("premature EOI")
            kind = kinds[pos]
            pos += 1
            if kind == T_RSQUARE:
                stack.pop()
                value = container
                continue
            if kind != T_COMMA:
                raise _JSONSyntaxError("expected separator in list")
            break                                       # parse the next element


# ---------------------------------------------------------------------------------------
# Fast path helpers
# ---------------------------------------------------------------------------------------

class _Reject(Exception):
    """The fast decoder met something QEMU may treat differently."""


def _pairs_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Reject()
    return result


def _reject_constant(name: str) -> object:
    raise _Reject()                     # NaN / Infinity are not JSON for QEMU


_fast_decode = json.JSONDecoder(
    object_pairs_hook=_pairs_without_duplicates,
    parse_constant=_reject_constant,
    parse_int=integer_literal,
).raw_decode

# \u escapes QEMU rejects or that need its surrogate-pair rules: surrogates and
# noncharacters. (A harmless "\\u..." after an escaped backslash also matches; that only
# costs a trip through the faithful path.)
_RISKY_ESCAPE = re.compile(rb"\\u(?:[dD][89a-fA-F]|[fF][dD][dDeE]|[fF][fF][fF][eEfF])")

# JSON allows "0e5"; QEMU's lexer has no exponent after a lone zero ("0e5" lexes as 0
# followed by the keyword "e"), so such input must take the faithful path.
_ZERO_EXPONENT = re.compile(rb"(?<=[-\s:,\[])0[eE]")

# Below these sizes a message cannot hit the nesting, token-count or token-size limits
# (every open bracket and every token takes at least one byte).
_FAST_MAX_LENGTH = MAX_TOKEN_COUNT
_SURELY_SHALLOW = MAX_NESTING


_WINDOW = 256 * 1024            # bytes the fast decoder sees at once
_WINDOW_MARGIN = 64 * 1024      # re-window when less than this is left ahead
_MAX_SKIP = 64                  # most fast attempts skipped after failures


def _fast_ok(segment: bytes, ascii_checked: bool) -> bool:
    if not ascii_checked and not segment.isascii():
        return False
    length = len(segment)
    if length > _SURELY_SHALLOW:
        if length >= _FAST_MAX_LENGTH:
            return False
        if segment.count(b"{") + segment.count(b"[") > MAX_NESTING:
            return False
    if b"\\u" in segment and _RISKY_ESCAPE.search(segment):
        return False
    if (b"0e" in segment or b"0E" in segment) and _ZERO_EXPONENT.search(segment):
        return False
    return True


# ---------------------------------------------------------------------------------------
# The stream parser
# ---------------------------------------------------------------------------------------

def _internal_error(exc: Exception) -> str:
    # The same wording as dispatch's internal errors; never reached on QEMU's inputs.
    return f"internal error in qmpjobd: {type(exc).__name__}"


class StreamParser:
    """One per connection: feed it bytes, get back complete values and errors in order.

    ``fast_path=False`` sends everything through the faithful lexer; it exists so tests
    can check that both paths agree.
    """

    def __init__(self, fast_path: bool = True) -> None:
        self._fast_path = fast_path
        self.reset()

    def reset(self) -> None:
        """Forget all partial input (QEMU does this when a client connects)."""
        self._state = S_START
        self._token = bytearray()
        self._kinds: list[int] = []
        self._texts: list[bytes] = []
        self._braces = 0
        self._brackets = 0
        self._token_bytes = 0

    # -- public ------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[ParsedValue | ParseError]:
        """Complete values and errors found in ``data`` (plus what came before it).

        Never raises: a bug in the lexer must not cost the client its connection. If one
        surfaces anyway, the partial message and the rest of ``data`` are dropped (the
        lexer state is not trustworthy any more) and an internal error is reported.
        """
        out: list[ParsedValue | ParseError] = []
        if not data:
            return out
        try:
            self._feed(bytes(data), out)
        except Exception as exc:
            log.exception("internal error in the QMP lexer")
            self.reset()
            out.append(ParseError(_internal_error(exc)))
        return out

    def _feed(self, data: bytes, out: list[ParsedValue | ParseError]) -> None:
        size = len(data)
        pos = 0
        if not self._fast_path:
            while pos < size:
                pos = self._lex(data, pos, out)
            return
        if not self._at_boundary():
            pos = self._lex(data, 0, out)
            if pos >= size:
                return
        all_ascii = data.isascii()
        fast_decode = _fast_decode
        # The fast decoder reads a window of the data decoded as latin-1 (one char per
        # byte, so indices map 1:1). A bounded window keeps a failed attempt cheap (json
        # counts the newlines before an error) and the total work linear.
        window_start = window_end = pos
        text = ""
        # After a failed attempt, skip a growing number of them: input the fast path
        # cannot take (e.g. a client that single-quotes) then costs little extra.
        skip = 0
        penalty = 1
        while pos < size:
            byte = data[pos]
            if byte in _WHITESPACE:
                pos = _WS_RUN.match(data, pos).end()
                continue
            if skip:
                skip -= 1
            elif byte == 0x7B or byte == 0x5B:  # '{' or '['
                if pos + _WINDOW_MARGIN > window_end and window_end < size or pos >= window_end:
                    window_start = pos
                    text = data[pos:pos + _WINDOW].decode("latin-1")
                    window_end = pos + len(text)
                try:
                    value, end = fast_decode(text, pos - window_start)
                except Exception:               # _Reject, JSONDecodeError, RecursionError
                    skip = penalty
                    penalty = min(2 * penalty, _MAX_SKIP)
                else:
                    end += window_start
                    if _fast_ok(data[pos:end], all_ascii):
                        out.append(ParsedValue(value))
                        pos = end
                        penalty = 1
                        continue
            # Anything else, including a message cut off by the end of the data or of
            # the window, goes through the faithful lexer up to the next boundary.
            pos = self._lex(data, pos, out)

    # -- streamer (json-streamer.c) -----------------------------------------------------

    def _at_boundary(self) -> bool:
        return self._state == S_START and not (self._braces or self._brackets)

    def _clear_message(self) -> None:
        self._kinds = []
        self._texts = []
        self._braces = 0
        self._brackets = 0
        self._token_bytes = 0

    def _push_token(self, kind: int, text: bytes, out: list, end: int) -> None:
        # ``end``: index in the chunk being lexed just past the token's last byte (the
        # 11.1 streamer derives error positions from it; this one does not need it).
        if kind == T_LCURLY:
            self._braces += 1
        elif kind == T_RCURLY:
            self._braces -= 1
        elif kind == T_LSQUARE:
            self._brackets += 1
        elif kind == T_RSQUARE:
            self._brackets -= 1
        elif kind == T_ERROR:
            self._clear_message()
            out.append(ParseError(f"JSON parse error, stray '{_lossy_text(text)}'"))
            return
        if self._token_bytes + len(text) + 1 > MAX_TOKEN_SIZE:
            self._clear_message()
            out.append(ParseError("JSON token size limit exceeded"))
            return
        if len(self._kinds) + 1 > MAX_TOKEN_COUNT:
            self._clear_message()
            out.append(ParseError("JSON token count limit exceeded"))
            return
        if self._braces + self._brackets > MAX_NESTING:
            self._clear_message()
            out.append(ParseError("JSON nesting depth limit exceeded"))
            return
        self._kinds.append(kind)
        self._texts.append(text)
        self._token_bytes += len(text)
        braces, brackets = self._braces, self._brackets
        if (braces > 0 or brackets > 0) and braces >= 0 and brackets >= 0:
            return                              # message not complete yet
        kinds, texts = self._kinds, self._texts
        self._clear_message()
        try:
            out.append(ParsedValue(_parse_tokens(kinds, texts)))
        except _JSONSyntaxError as err:
            out.append(ParseError(err.desc))
        except Exception as exc:        # a bug: report it, keep lexing what follows
            log.exception("internal error in the QMP parser")
            out.append(ParseError(_internal_error(exc)))

    # -- lexer (json-lexer.c) -----------------------------------------------------------

    def _lex(self, data: bytes, pos: int, out: list) -> int:
        """Run the faithful lexer from ``pos``; stop at the next clean message boundary.

        Consumes at least one byte. Returns the index of the first unconsumed byte (the
        end of ``data`` when the input ran out mid-message).
        """
        size = len(data)
        state = self._state
        token = self._token
        started = pos
        while pos < size:
            if state == S_START and pos > started and not (self._braces or self._brackets):
                break                           # clean boundary: back to the fast path
            byte = data[pos]
            if state == S_START:
                if byte in _WHITESPACE:
                    pos = _WS_RUN.match(data, pos).end()
                    continue
                kind = _STRUCTURAL.get(byte)
                if kind is not None:
                    pos += 1
                    self._push_token(kind, data[pos - 1:pos], out, pos)
                    continue
                token.append(byte)
                pos += 1
                if byte == 0x22:
                    state = S_DQ
                elif byte == 0x27:
                    state = S_SQ
                elif byte == 0x30:
                    state = S_ZERO
                elif byte in _DIGITS:
                    state = S_DIGITS
                elif byte == 0x2D:
                    state = S_SIGN
                elif byte in _LOWER:
                    state = S_KEYWORD
                else:
                    state = self._error(token, out, pos)
                continue
            if state == S_RECOVERY:
                match = _RECOVERY_RUN.match(data, pos)
                if match:
                    pos = match.end()
                else:
                    state = S_START             # resync byte: re-read it as a token start
                    self._recovered(pos)
                continue
            if state == S_DQ or state == S_SQ:
                match = (_DQ_RUN if state == S_DQ else _SQ_RUN).match(data, pos)
                if match:
                    end = min(match.end(), pos + MAX_TOKEN_SIZE + 1 - len(token))
                    token += data[pos:end]
                    pos = end
                    if len(token) > MAX_TOKEN_SIZE:
                        state = self._oversize(token, out, pos)
                    continue
                token.append(byte)
                pos += 1
                if byte == (0x22 if state == S_DQ else 0x27):
                    self._emit(T_STRING, token, out, pos)
                    state = S_START
                elif byte == 0x5C:
                    state = S_DQ_ESC if state == S_DQ else S_SQ_ESC
                else:
                    state = self._error(token, out, pos)
            elif state == S_DQ_ESC or state == S_SQ_ESC:
                token.append(byte)
                pos += 1
                if 0x20 <= byte <= 0xFD:
                    state = S_DQ if state == S_DQ_ESC else S_SQ
                else:
                    state = self._error(token, out, pos)
            elif state == S_DIGITS or state == S_MANTISSA_DIGITS or state == S_EXP_DIGITS:
                if byte in _DIGITS:
                    end = _DIGIT_RUN.match(data, pos).end()
                    end = min(end, pos + MAX_TOKEN_SIZE + 1 - len(token))
                    token += data[pos:end]
                    pos = end
                elif state != S_EXP_DIGITS and byte in b"eE":
                    token.append(byte)
                    pos += 1
                    state = S_EXP_E
                elif state == S_DIGITS and byte == 0x2E:
                    token.append(byte)
                    pos += 1
                    state = S_MANTISSA
                else:                           # lookahead ends the number
                    self._emit(T_INTEGER if state == S_DIGITS else T_FLOAT, token, out, pos)
                    state = S_START
                    continue
            elif state == S_KEYWORD:
                if byte in _LOWER:
                    end = _KEYWORD_RUN.match(data, pos).end()
                    end = min(end, pos + MAX_TOKEN_SIZE + 1 - len(token))
                    token += data[pos:end]
                    pos = end
                else:
                    self._emit(T_KEYWORD, token, out, pos)
                    state = S_START
                    continue
            elif state == S_ZERO:
                if byte == 0x2E:
                    token.append(byte)
                    pos += 1
                    state = S_MANTISSA
                elif byte in _DIGITS:           # leading zero: the digit is part of the error
                    token.append(byte)
                    pos += 1
                    state = self._error(token, out, pos)
                else:
                    self._emit(T_INTEGER, token, out, pos)
                    state = S_START
                    continue
            else:
                # S_SIGN, S_MANTISSA, S_EXP_E, S_EXP_SIGN: one specific byte must follow
                token.append(byte)
                pos += 1
                state = self._after_prefix(state, byte, token, out, pos)
            if len(token) > MAX_TOKEN_SIZE:
                state = self._oversize(token, out, pos)
        self._state = state
        return pos

    def _recovered(self, pos: int) -> None:
        """Error recovery ended at ``data[pos]`` (a lookahead byte, read again as a token
        start). Only the 11.1 streamer's positions care."""

    def _after_prefix(self, state: int, byte: int, token: bytearray, out: list,
                      end: int) -> int:
        if state == S_SIGN:
            if byte == 0x30:
                return S_ZERO
            if byte in _DIGITS:
                return S_DIGITS
        elif state == S_MANTISSA:
            if byte in _DIGITS:
                return S_MANTISSA_DIGITS
        elif state == S_EXP_E:
            if byte == 0x2B or byte == 0x2D:
                return S_EXP_SIGN
            if byte in _DIGITS:
                return S_EXP_DIGITS
        elif state == S_EXP_SIGN:
            if byte in _DIGITS:
                return S_EXP_DIGITS
        return self._error(token, out, end)

    def _emit(self, kind: int, token: bytearray, out: list, end: int) -> None:
        text = bytes(token)
        token.clear()
        self._push_token(kind, text, out, end)

    def _error(self, token: bytearray, out: list, end: int) -> int:
        """Lexical error: report the bad token (bad byte included) and start skipping."""
        self._emit(T_ERROR, token, out, end)
        return S_RECOVERY

    def _oversize(self, token: bytearray, out: list, end: int) -> int:
        # QEMU hands the over-long partial token to the streamer, which rejects it on
        # size, then lexes the rest of the input afresh.
        self._emit(T_OVERSIZE, token, out, end)
        return S_START
