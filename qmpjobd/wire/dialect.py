"""The JSON input rules of each personality, as data (DESIGN.md decision 9).

The wire layer is told, when a connection's parser is created, which rules to follow;
it never asks for a version number. ``wire_dialect(personality)`` turns the behaviour
table below into a ``WireDialect``; ``new_stream_parser(dialect)`` builds the parser.

7.2 and 10.0 read QMP input alike (qemu-versions.md 2.2: identical on every case tried);
11.1 has a new parser (see ``push.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from qmpjobd.versions import Behaviour, Personality
from qmpjobd.wire.lexer import StreamParser
from qmpjobd.wire.push import PushStreamParser

__all__ = ["WireDialect", "QEMU_7_2_DIALECT", "wire_dialect", "new_stream_parser",
           "PUSH_JSON_PARSER", "PARSE_ERROR_POSITIONS"]

# -- what changed, and when -----------------------------------------------------------------

PUSH_JSON_PARSER = Behaviour(
    "the JSON parser takes one token at a time: the first error is reported at once, "
    "five messages are reworded ('expecting key', 'expecting \\':\\'', "
    "'expected \\',\\' or \\'}\\'', 'expected \\',\\' or \\']\\''), and after any error, "
    "limit errors included, the rest of the value is skipped until it balances",
    since="11.1")
PARSE_ERROR_POSITIONS = Behaviour(
    "every 'JSON parse error' starts with the 'line:column: ' of its token",
    since="11.1")


@dataclass(frozen=True)
class WireDialect:
    """How one personality's monitor reads JSON."""

    push_parser: bool = False           # PUSH_JSON_PARSER
    error_positions: bool = False       # PARSE_ERROR_POSITIONS

    def __post_init__(self) -> None:
        if self.error_positions and not self.push_parser:
            # QEMU added positions with the push parser; nothing to copy otherwise.
            raise ValueError("error positions exist only with the push parser")


QEMU_7_2_DIALECT = WireDialect()


@functools.cache
def wire_dialect(personality: Personality) -> WireDialect:
    """The dialect a personality's connections speak (computed once per personality)."""
    return WireDialect(push_parser=personality.has(PUSH_JSON_PARSER),
                       error_positions=personality.has(PARSE_ERROR_POSITIONS))


def new_stream_parser(dialect: WireDialect = QEMU_7_2_DIALECT,
                      fast_path: bool = True) -> StreamParser:
    """A fresh parser for one connection."""
    if dialect.push_parser:
        return PushStreamParser(fast_path, positions=dialect.error_positions)
    return StreamParser(fast_path)
