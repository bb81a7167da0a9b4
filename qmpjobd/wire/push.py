"""QEMU 11.1's JSON input rules: a push parser, error positions and value-skipping recovery.

QEMU 11.1 replaced the batch parser of 7.2/10.0 (collect a whole message, then parse it)
with a *push parser* that takes one token at a time. The lexer in front of it is the same
(``lexer.py`` runs it for every dialect); what changes is seen on the wire
(qemu-versions.md 2.2 and 2.3, observed on qemu-storage-daemon 11.1.3):

* **The first error is reported at the token that causes it,** without waiting for the
  brackets to balance, and five texts are reworded (``expecting key``, ``expecting ':'``,
  ``expected ',' or '}'``, ``expected ',' or ']'``; a non-string key is ``expecting key``).
* **Every ``JSON parse error`` carries ``line:column: ``** of that token. The position
  counts bytes per connection from 1:1 and is never reset. QEMU takes a token's position
  when its lexer last returned to the start state, i.e. just after the byte that ended the
  previous token. A number or keyword ends at a lookahead byte (and so does error
  recovery), and when that byte starts the next token, the next token is reported one
  column further right than it is.
* **A lexical error is reported by the parser too,** so its ``stray '...'`` text is cut to
  the same 1023 bytes as every other parse message (7.2 printed it whole).
* **After an error the rest of the value is skipped:** tokens are counted but not parsed
  until braces and brackets balance again. A closer with no opener of its kind left, or a
  lexical error, also ends the skipping. Nothing inside the skipped part is reported, not
  even a lexical error. After a nesting or token-count limit error the same happens, so
  the leftovers of an over-deep value no longer produce errors of their own.

Positions cost nothing on the fast path: they are reconstructed, only when an error is
reported, from the byte offset of the token and per-chunk line counts.
"""

from __future__ import annotations

import logging

from qmpjobd.wire.lexer import (
    MAX_NESTING, MAX_TOKEN_COUNT, MAX_TOKEN_SIZE, ParsedValue, ParseError, StreamParser,
    T_COLON, T_COMMA, T_ERROR, T_FLOAT, T_INTEGER, T_KEYWORD, T_LCURLY, T_LSQUARE,
    T_RCURLY, T_RSQUARE, T_STRING, _PARSE_MESSAGE_MAX_BYTES, _JSONSyntaxError,
    _internal_error, _lossy_text, _parse_scalar, _parse_string,
)

__all__ = ["PushStreamParser"]

log = logging.getLogger(__name__)

# What the innermost open container waits for next.
(_FIRST_KEY_OR_CLOSE,       # just after '{'
 _KEY,                      # after ',' in an object
 _COLON,                    # after a key
 _VALUE,                    # after ':' or after ',' in an array
 _FIRST_VALUE_OR_CLOSE,     # just after '['
 _SEPARATOR_OR_CLOSE) = range(6)   # after a member or element

# Frame slots: [container, what it waits for, pending key]
_CONTAINER, _WAIT, _KEY_SLOT = range(3)

# Returned by the parser while the top-level value is not complete yet.
_INCOMPLETE = object()

# Token kinds that end on a lookahead byte (the byte after them is read twice).
_ENDS_ON_LOOKAHEAD = frozenset({T_INTEGER, T_FLOAT, T_KEYWORD})


def _stray_desc(token: bytes) -> str:
    """The message for a lexical error: QEMU formats the raw token bytes with ``%s``
    (which stops at a NUL) into its 1024-byte buffer, then prints invalid UTF-8 as U+FFFD."""
    nul = token.find(0)
    if nul >= 0:
        token = token[:nul]
    message = (b"stray '" + token + b"'")[:_PARSE_MESSAGE_MAX_BYTES]
    return "JSON parse error, " + _lossy_text(message)


class _PushParser:
    """Builds one top-level JSON value from tokens fed one at a time.

    Raises ``_JSONSyntaxError`` at the first token that cannot continue the value; the
    caller then discards the parser's state with ``reset``.
    """

    __slots__ = ("_stack",)

    def __init__(self) -> None:
        self._stack: list[list] = []

    def reset(self) -> None:
        self._stack.clear()

    def feed(self, kind: int, text: bytes) -> object:
        """The completed top-level value, or ``_INCOMPLETE``."""
        stack = self._stack
        if not stack:
            return self._value(kind, text)
        frame = stack[-1]
        wait = frame[_WAIT]
        if wait == _SEPARATOR_OR_CLOSE:
            return self._separator(frame, kind)
        if wait == _FIRST_KEY_OR_CLOSE:
            if kind == T_RCURLY:
                stack.pop()
                return self._complete(frame[_CONTAINER])
            wait = _KEY
        if wait == _KEY:
            if kind != T_STRING:
                raise _JSONSyntaxError("expecting key")
            frame[_KEY_SLOT] = _parse_string(text)
            frame[_WAIT] = _COLON
            return _INCOMPLETE
        if wait == _COLON:
            if kind != T_COLON:
                raise _JSONSyntaxError("expecting ':'")
            frame[_WAIT] = _VALUE
            return _INCOMPLETE
        if wait == _FIRST_VALUE_OR_CLOSE and kind == T_RSQUARE:
            stack.pop()
            return self._complete(frame[_CONTAINER])
        return self._value(kind, text)

    def _separator(self, frame: list, kind: int) -> object:
        container = frame[_CONTAINER]
        if type(container) is dict:
            if kind == T_COMMA:
                frame[_WAIT] = _KEY
                return _INCOMPLETE
            if kind != T_RCURLY:
                raise _JSONSyntaxError("expected ',' or '}'")
        else:
            if kind == T_COMMA:
                frame[_WAIT] = _VALUE
                return _INCOMPLETE
            if kind != T_RSQUARE:
                raise _JSONSyntaxError("expected ',' or ']'")
        self._stack.pop()
        return self._complete(container)

    def _value(self, kind: int, text: bytes) -> object:
        if kind == T_LCURLY:
            self._stack.append([{}, _FIRST_KEY_OR_CLOSE, None])
            return _INCOMPLETE
        if kind == T_LSQUARE:
            self._stack.append([[], _FIRST_VALUE_OR_CLOSE, None])
            return _INCOMPLETE
        # Scalars, and "expecting value" for any other token.
        return self._complete(_parse_scalar(kind, text))

    def _complete(self, value: object) -> object:
        """Hand a finished value to the enclosing container (or return it at top level).

        A duplicate key is found here, so QEMU reports it at the token that finished the
        member's value.
        """
        stack = self._stack
        if not stack:
            return value
        frame = stack[-1]
        container = frame[_CONTAINER]
        if type(container) is dict:
            key = frame[_KEY_SLOT]
            if key in container:
                raise _JSONSyntaxError("duplicate key")
            container[key] = value
        else:
            container.append(value)
        frame[_WAIT] = _SEPARATOR_OR_CLOSE
        return _INCOMPLETE


class PushStreamParser(StreamParser):
    """The 11.1 streamer on top of the shared lexer (see the module docstring).

    ``positions=False`` leaves out the ``line:column: `` prefix; the wire dialect of a
    personality decides.
    """

    def __init__(self, fast_path: bool = True, positions: bool = True) -> None:
        self._positions = positions
        # Where the chunk being fed starts in the connection's byte stream, the line
        # number at that point, and the offset at which that line starts.
        self._chunk = b""
        self._chunk_base = 0
        self._line = 1
        self._line_start = 0
        # How far into the chunk lines were counted for the last error, so that many
        # errors in one chunk cost one pass over it, not one pass each.
        self._scanned = 0
        self._scanned_line = 1
        self._scanned_line_start = 0
        # Offset of the last lookahead byte that ended a number, keyword or recovery.
        self._lookahead_at = -1
        self._parser = _PushParser()
        super().__init__(fast_path)

    def reset(self) -> None:
        """Forget all partial input; the position count goes on (it is per connection)."""
        super().reset()
        self._skipping = False
        self._token_count = 0
        self._parser.reset()

    def _clear_message(self) -> None:
        self._braces = 0
        self._brackets = 0
        self._token_bytes = 0
        self._token_count = 0
        self._skipping = False
        self._parser.reset()

    # -- byte positions -----------------------------------------------------------------

    def _feed(self, data: bytes, out: list[ParsedValue | ParseError]) -> None:
        self._chunk = data
        self._scanned = 0
        self._scanned_line = self._line
        self._scanned_line_start = self._line_start
        try:
            super()._feed(data, out)
        finally:
            self._advance_over(data)

    def _advance_over(self, data: bytes) -> None:
        newlines = data.count(b"\n")
        if newlines:
            self._line += newlines
            self._line_start = self._chunk_base + data.rfind(b"\n") + 1
        self._chunk_base += len(data)
        self._chunk = b""

    def _line_and_column(self, offset: int) -> tuple[int, int]:
        relative = offset - self._chunk_base
        if relative <= 0:
            # A token that began in an earlier chunk has no newline between its start
            # and this chunk (tokens never contain one): it is on the chunk's first line.
            return self._line, offset - self._line_start + 1
        if relative < self._scanned:    # errors come in stream order; never seen, but safe
            self._scanned = 0
            self._scanned_line = self._line
            self._scanned_line_start = self._line_start
        newlines = self._chunk.count(b"\n", self._scanned, relative)
        if newlines:
            self._scanned_line += newlines
            last = self._chunk.rfind(b"\n", self._scanned, relative)
            self._scanned_line_start = self._chunk_base + last + 1
        self._scanned = relative
        return self._scanned_line, offset - self._scanned_line_start + 1

    def _located(self, start: int, shifted: bool, desc: str) -> str:
        """``desc`` with the position QEMU gives a token starting at ``start``; ``shifted``
        when that token began on the lookahead byte that ended the previous one."""
        if not self._positions:
            return desc
        line, column = self._line_and_column(start)
        return f"{line}:{column + shifted}: {desc}"

    def _recovered(self, pos: int) -> None:
        self._lookahead_at = self._chunk_base + pos

    # -- streamer -----------------------------------------------------------------------

    def _push_token(self, kind: int, text: bytes, out: list, end: int) -> None:
        start = self._chunk_base + end - len(text)
        shifted = start == self._lookahead_at
        if kind == T_ERROR:
            # A lexical error always ends the message; inside a skipped value it is
            # not even reported.
            if not self._skipping:
                out.append(ParseError(self._located(start, shifted, _stray_desc(text))))
            self._clear_message()
            return
        if kind in _ENDS_ON_LOOKAHEAD:
            self._lookahead_at = start + len(text)
        unmatched_closer = self._count_brackets(kind)
        if not self._skipping:
            self._token_bytes += len(text)
            self._token_count += 1
            self._take(kind, text, start, shifted, out)
        if unmatched_closer or not (self._braces or self._brackets):
            self._clear_message()

    def _count_brackets(self, kind: int) -> bool:
        """Track nesting for recovery; True for a closer with no opener of its kind."""
        if kind == T_LCURLY:
            self._braces += 1
        elif kind == T_LSQUARE:
            self._brackets += 1
        elif kind == T_RCURLY:
            if not self._braces:
                return True
            self._braces -= 1
        elif kind == T_RSQUARE:
            if not self._brackets:
                return True
            self._brackets -= 1
        return False

    def _take(self, kind: int, text: bytes, start: int, shifted: bool, out: list) -> None:
        """Check the limits, then feed the parser; the first error starts skipping."""
        if self._token_bytes > MAX_TOKEN_SIZE:
            error = "JSON token size limit exceeded"
        elif self._token_count > MAX_TOKEN_COUNT:
            error = "JSON token count limit exceeded"
        elif self._braces + self._brackets > MAX_NESTING:
            error = "JSON nesting depth limit exceeded"
        else:
            try:
                value = self._parser.feed(kind, text)
            except _JSONSyntaxError as err:
                error = self._located(start, shifted, err.desc)
            except Exception as exc:    # a bug: report it, skip the rest of the value
                log.exception("internal error in the QMP parser")
                error = _internal_error(exc)
            else:
                if value is not _INCOMPLETE:
                    out.append(ParsedValue(value))
                return
        out.append(ParseError(error))
        self._skipping = True
