"""Reader for QEMU's QAPI schema dialect.

The dialect is JSON with Python flavour: strings in single quotes, ``#``
comments to the end of the line, ``true``/``false`` and no numbers.  A file is
a sequence of top-level objects ("expressions"); ``{ 'include': 'x.json' }``
pulls in another file (relative to the including one) at that point, once.
An include may carry an ``'if'`` condition (see ``conditions.py``), which is
evaluated here with the symbols the caller defines.
Doc comments (``##`` blocks) are ordinary comments here: qmpjobd does not
generate documentation from them.
"""
from __future__ import annotations

import re

from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

from .conditions import ConditionError, check_condition, holds


class QAPIParseError(Exception):
    """A syntax error or a bad include in a schema file."""

    def __init__(self, path: Path, line: int, msg: str) -> None:
        super().__init__(f"{path}:{line}: {msg}")


@dataclass
class Expression:
    """One top-level definition and where it came from."""

    expr: dict
    path: Path
    line: int


# Blanks, newlines and '#' comments between tokens.
_SKIP = re.compile(r"(?:[ \t\r\n]+|#[^\n]*)*")
# A string without escapes on one line: the common case, taken whole.
_PLAIN_STRING = re.compile(r"'([^'\\\n]*)'")


class _Lexer:
    """Splits one file into tokens: punctuation, strings and keywords."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text, self.pos, self.line = path, text, 0, 1

    def error(self, msg: str) -> QAPIParseError:
        return QAPIParseError(self.path, self.line, msg)

    def next(self) -> object:
        """Return the next token: a 1-char str for punctuation, ('str', s),
        True/False, or None at end of input."""
        text, n = self.text, len(self.text)
        # Whitespace and comments in one regex step (start-up reads ~10 000
        # tokens); a comment holds no newline, so counting them keeps the line.
        end = _SKIP.match(text, self.pos).end()
        if end != self.pos:
            self.line += text.count("\n", self.pos, end)
            self.pos = end
        if self.pos >= n:
            return None
        ch = text[self.pos]
        if ch in "{}[]:,":
            self.pos += 1
            return ch
        if ch == "'":
            plain = _PLAIN_STRING.match(text, self.pos)
            if plain is not None:
                self.pos = plain.end()
                return ("str", plain.group(1))
            return self._string()          # escapes, or an unterminated string
        if text.startswith("true", self.pos):
            self.pos += 4
            return True
        if text.startswith("false", self.pos):
            self.pos += 5
            return False
        raise self.error(f"stray {ch!r}")

    def _string(self) -> tuple[str, str]:
        out: list[str] = []
        self.pos += 1
        while True:
            if self.pos >= len(self.text):
                raise self.error("missing terminating \"'\"")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == "'":
                return ("str", "".join(out))
            if ch == "\n":
                raise self.error("missing terminating \"'\"")
            if ch == "\\":
                # QAPI strings only need to escape the quote and backslash
                esc = self.text[self.pos : self.pos + 1]
                self.pos += 1
                if esc not in ("'", "\\", '"', "/"):
                    raise self.error(f"unknown escape \\{esc}")
                ch = esc
            out.append(ch)


def _value(lex: _Lexer, tok: object) -> object:
    if isinstance(tok, tuple):
        return tok[1]
    if tok is True or tok is False:
        return tok
    if tok == "{":
        return _object(lex)
    if tok == "[":
        return _array(lex)
    raise lex.error(f"expected value, got {tok!r}")


def _object(lex: _Lexer) -> dict:
    out: dict = {}
    tok = lex.next()
    if tok == "}":
        return out
    while True:
        if not isinstance(tok, tuple):
            raise lex.error("expected string key")
        key = tok[1]
        if key in out:
            raise lex.error(f"duplicate key {key!r}")
        if lex.next() != ":":
            raise lex.error("expected ':'")
        out[key] = _value(lex, lex.next())
        tok = lex.next()
        if tok == "}":
            return out
        if tok != ",":
            raise lex.error("expected ',' or '}'")
        tok = lex.next()


def _array(lex: _Lexer) -> list:
    out: list = []
    tok = lex.next()
    if tok == "]":
        return out
    while True:
        out.append(_value(lex, tok))
        tok = lex.next()
        if tok == "]":
            return out
        if tok != ",":
            raise lex.error("expected ',' or ']'")
        tok = lex.next()


def parse_file(path: Path, seen: set[Path] | None = None,
               symbols: Set[str] = frozenset(),
               known_symbols: Set[str] | None = None) -> list[Expression]:
    """Parse *path* and, recursively, the files it includes (each only once,
    and only when the include's condition holds with *symbols* defined).
    Conditions inside definitions are kept; the type model evaluates them."""
    path = path.resolve()
    seen = set() if seen is None else seen
    seen.add(path)
    lex = _Lexer(path, path.read_text(encoding="utf-8"))
    exprs: list[Expression] = []
    while True:
        tok = lex.next()
        if tok is None:
            return exprs
        if tok != "{":
            raise lex.error("expected '{' at top level")
        line = lex.line
        expr = _object(lex)
        if "include" in expr:
            if not _include_wanted(expr, path, line, symbols, known_symbols):
                continue
            target = (path.parent / expr["include"]).resolve()
            if not target.is_file():
                raise QAPIParseError(path, line, f"can't include {expr['include']!r}")
            if target not in seen:
                exprs.extend(parse_file(target, seen, symbols, known_symbols))
        elif "pragma" not in expr:
            exprs.append(Expression(expr, path, line))


def _include_wanted(expr: dict, path: Path, line: int, symbols: Set[str],
                    known_symbols: Set[str] | None) -> bool:
    cond = expr.get("if")
    if cond is None:
        return True
    try:
        check_condition(cond, known_symbols)
    except ConditionError as exc:
        raise QAPIParseError(path, line, str(exc)) from None
    return holds(cond, symbols)
