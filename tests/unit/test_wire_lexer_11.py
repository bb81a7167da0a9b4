"""QEMU 11.1's JSON input rules (qmpjobd/wire/push.py): positions, wording, recovery.

The expected strings are qemu-storage-daemon 11.1.3's own (qemu-versions.md 2.2 and 2.3,
and probes of the real daemon made for this file). 7.2 and 10.0 keep the rules tested in
test_wire_lexer.py; the last tests here check that their dialect did not move.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpjobd.versions import personality
from qmpjobd.wire.dialect import (
    QEMU_7_2_DIALECT, WireDialect, new_stream_parser, wire_dialect,
)
from qmpjobd.wire.lexer import MAX_NESTING, MAX_TOKEN_COUNT, ParsedValue, ParseError, StreamParser
from qmpjobd.wire.push import PushStreamParser
from qmpjobd.wire.session import Request, Session
from tests.unit.test_wire_lexer import _ATOMS, _serialised, _split, canon, outcome

DIALECT_11_1 = wire_dialect(personality("11.1"))

# What the oracle probes appended to every input: 0xFF (which ends any lexer state and,
# in 11.1, any skipped value) and a command whose reply proves the connection went on.
SENTINEL = b'\xff\n{"execute":"qmp_capabilities","id":"S"}'


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def feed_all(pieces: list[bytes], fast_path: bool = True) -> list[ParsedValue | ParseError]:
    parser = new_stream_parser(DIALECT_11_1, fast_path)
    items: list[ParsedValue | ParseError] = []
    for piece in pieces:
        items += parser.feed(piece)
    return items


def replies(pieces: list[bytes], fast_path: bool = True) -> list[str | tuple]:
    """What a fresh monitor answers, by error desc or ("id", id) of each command."""
    session = Session()
    answers: list[str | tuple] = []
    for item in feed_all(pieces, fast_path):
        reply = session.take(item)
        if isinstance(reply, Request):
            answers.append(("id", reply.id))
        else:
            answers.append(reply["error"]["desc"])
    return answers


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


# ---------------------------------------------------------------------------------------
# every input alone on a fresh connection, then SENTINEL (probed on qsd 11.1.3)
# ---------------------------------------------------------------------------------------

ORACLE_11_1 = [
    (b'{"execute": }', ['1:13: JSON parse error, expecting value', "1:14: JSON parse error, stray '\ufffd'"]),
    (b'{"a":1,}', ['1:8: JSON parse error, expecting key', "1:9: JSON parse error, stray '\ufffd'"]),
    (b'{,}', ['1:2: JSON parse error, expecting key', "1:4: JSON parse error, stray '\ufffd'"]),
    (b'{]', ['1:2: JSON parse error, expecting key', "1:3: JSON parse error, stray '\ufffd'"]),
    (b'{1:2}', ['1:2: JSON parse error, expecting key', "1:6: JSON parse error, stray '\ufffd'"]),
    (b'{"a" 1}', ["1:6: JSON parse error, expecting ':'", "1:8: JSON parse error, stray '\ufffd'"]),
    (b'{"a" "b"}', ["1:6: JSON parse error, expecting ':'", "1:10: JSON parse error, stray '\ufffd'"]),
    (b'{"a"}', ["1:5: JSON parse error, expecting ':'", "1:6: JSON parse error, stray '\ufffd'"]),
    (b'{"a",1}', ["1:5: JSON parse error, expecting ':'", "1:8: JSON parse error, stray '\ufffd'"]),
    (b'{"a":1 "b":2}', ["1:8: JSON parse error, expected ',' or '}'", "1:14: JSON parse error, stray '\ufffd'"]),
    (b'{"a":1 2}', ["1:8: JSON parse error, expected ',' or '}'", "1:10: JSON parse error, stray '\ufffd'"]),
    (b'{"a":1]', ["1:8: JSON parse error, expected ',' or '}'", "1:8: JSON parse error, stray '\ufffd'"]),
    (b'[1 2]', ["1:4: JSON parse error, expected ',' or ']'", "1:6: JSON parse error, stray '\ufffd'"]),
    (b'[1:2]', ["1:4: JSON parse error, expected ',' or ']'", "1:6: JSON parse error, stray '\ufffd'"]),
    (b'[1}', ["1:4: JSON parse error, expected ',' or ']'", "1:4: JSON parse error, stray '\ufffd'"]),
    (b'[1,,2]', ['1:4: JSON parse error, expecting value', "1:7: JSON parse error, stray '\ufffd'"]),
    (b'[}', ['1:2: JSON parse error, expecting value', "1:3: JSON parse error, stray '\ufffd'"]),
    (b'{"a":}', ['1:6: JSON parse error, expecting value', "1:7: JSON parse error, stray '\ufffd'"]),
    (b'}', ['1:1: JSON parse error, expecting value', "1:2: JSON parse error, stray '\ufffd'"]),
    (b']', ['1:1: JSON parse error, expecting value', "1:2: JSON parse error, stray '\ufffd'"]),
    (b':', ['1:1: JSON parse error, expecting value', "1:2: JSON parse error, stray '\ufffd'"]),
    (b'xyz ', ["1:1: JSON parse error, invalid keyword 'xyz'", "1:5: JSON parse error, stray '\ufffd'"]),
    (b'nul ', ["1:1: JSON parse error, invalid keyword 'nul'", "1:5: JSON parse error, stray '\ufffd'"]),
    (b'TRUE', ["1:1: JSON parse error, stray 'T'", "1:6: JSON parse error, stray '\ufffd'"]),
    (b'01', ["1:1: JSON parse error, stray '01'", "1:4: JSON parse error, stray '\ufffd'"]),
    (b'%', ["1:1: JSON parse error, stray '%'", "1:3: JSON parse error, stray '\ufffd'"]),
    (b'\x01', ["1:1: JSON parse error, stray '\x01'", "1:3: JSON parse error, stray '\ufffd'"]),
    (b'\x00', ["1:1: JSON parse error, stray ''", "1:3: JSON parse error, stray '\ufffd'"]),
    (b'"\xff"', ['1:1: JSON parse error, stray \'"\ufffd\'', "1:5: JSON parse error, stray '\ufffd'"]),
    (b'\xff', ["1:1: JSON parse error, stray '\ufffd'", "1:3: JSON parse error, stray '\ufffd'"]),
    (b'\x0c', ["1:1: JSON parse error, stray '\x0c'", "1:3: JSON parse error, stray '\ufffd'"]),
    (b'"\\x"', ['1:1: JSON parse error, invalid escape sequence in string', "1:5: JSON parse error, stray '\ufffd'"]),
    (b'"\\u12"', ['1:1: JSON parse error, \\u12" is not a valid Unicode character', "1:7: JSON parse error, stray '\ufffd'"]),
    (b'"\\ud800"', ['1:1: JSON parse error, \\ud800 is not a valid Unicode character', "1:9: JSON parse error, stray '\ufffd'"]),
    (b'{"a":1,"a":2}', ['1:12: JSON parse error, duplicate key', "1:14: JSON parse error, stray '\ufffd'"]),
    (b'{"a":1,"a":"longvalue"}', ['1:12: JSON parse error, duplicate key', "1:24: JSON parse error, stray '\ufffd'"]),
    (b'{"a":1,"a":[1]}', ['1:15: JSON parse error, duplicate key', "1:16: JSON parse error, stray '\ufffd'"]),
    (b'{"a":1,"a":{"b":1}}', ['1:19: JSON parse error, duplicate key', "1:20: JSON parse error, stray '\ufffd'"]),
    (b'TRUE}', ["1:1: JSON parse error, stray 'T'", '1:6: JSON parse error, expecting value', "1:6: JSON parse error, stray '\ufffd'"]),
    (b'TRUE }', ["1:1: JSON parse error, stray 'T'", '1:7: JSON parse error, expecting value', "1:7: JSON parse error, stray '\ufffd'"]),
    (b'01,', ["1:1: JSON parse error, stray '01'", '1:4: JSON parse error, expecting value', "1:4: JSON parse error, stray '\ufffd'"]),
    (b'xyz}', ["1:1: JSON parse error, invalid keyword 'xyz'", '1:5: JSON parse error, expecting value', "1:5: JSON parse error, stray '\ufffd'"]),
    (b'\xff\x0c', ["1:1: JSON parse error, stray '\ufffd'", "1:3: JSON parse error, stray '\x0c'", "1:4: JSON parse error, stray '\ufffd'"]),
    (b'TRUE}}', ["1:1: JSON parse error, stray 'T'", '1:6: JSON parse error, expecting value', '1:6: JSON parse error, expecting value', "1:7: JSON parse error, stray '\ufffd'"]),
    (b'TRUE}{"a" 1}', ["1:1: JSON parse error, stray 'T'", '1:6: JSON parse error, expecting value', "1:11: JSON parse error, expecting ':'", "1:13: JSON parse error, stray '\ufffd'"]),
    (b'\xc3\xa9\xc3\xa9 }', ["1:1: JSON parse error, stray '\ufffd'", '1:7: JSON parse error, expecting value', "1:7: JSON parse error, stray '\ufffd'"]),
    (b'\t\r}', ['1:3: JSON parse error, expecting value', "1:4: JSON parse error, stray '\ufffd'"]),
    (b'\n\n  }\n}', ['3:3: JSON parse error, expecting value', '4:1: JSON parse error, expecting value', "4:2: JSON parse error, stray '\ufffd'"]),
    (b'[1,2]\n]', ['QMP input must be a JSON object', '2:1: JSON parse error, expecting value', "2:2: JSON parse error, stray '\ufffd'"]),
    (b'1"a"', ['QMP input must be a JSON object', 'QMP input must be a JSON object', "1:5: JSON parse error, stray '\ufffd'"]),
    (b'"a"1}', ['QMP input must be a JSON object', 'QMP input must be a JSON object', '1:6: JSON parse error, expecting value', "1:6: JSON parse error, stray '\ufffd'"]),
    (b'{"a":tru}', ["1:6: JSON parse error, invalid keyword 'tru'", "1:10: JSON parse error, stray '\ufffd'"]),
    (b"{'a' 1}", ["1:6: JSON parse error, expecting ':'", "1:8: JSON parse error, stray '\ufffd'"]),
    (b'-x', ["1:1: JSON parse error, stray '-x'", "1:4: JSON parse error, stray '\ufffd'"]),
    (b'1.}', ["1:1: JSON parse error, stray '1.}'", "1:5: JSON parse error, stray '\ufffd'"]),
    (b'1e}', ["1:1: JSON parse error, stray '1e}'", "1:5: JSON parse error, stray '\ufffd'"]),
    (b'[1.5e3}', ["1:8: JSON parse error, expected ',' or ']'", "1:8: JSON parse error, stray '\ufffd'"]),
    (b'[-0}', ["1:5: JSON parse error, expected ',' or ']'", "1:5: JSON parse error, stray '\ufffd'"]),
    (b'[true]]', ['QMP input must be a JSON object', '1:7: JSON parse error, expecting value', "1:8: JSON parse error, stray '\ufffd'"]),
    (b'{"a":[1,{"b":2}]}}', ["QMP input member 'a' is unexpected", '1:18: JSON parse error, expecting value', "1:19: JSON parse error, stray '\ufffd'"]),
    (b'\x01\x02', ["1:1: JSON parse error, stray '\x01'", "1:3: JSON parse error, stray '\x02'", "1:4: JSON parse error, stray '\ufffd'"]),
    (b'TRUE\n}', ["1:1: JSON parse error, stray 'T'", '2:1: JSON parse error, expecting value', "2:2: JSON parse error, stray '\ufffd'"]),
    (b'TRUE\t}', ["1:1: JSON parse error, stray 'T'", '1:7: JSON parse error, expecting value', "1:7: JSON parse error, stray '\ufffd'"]),
    (b'["a\x01b"]', ['1:2: JSON parse error, stray \'"a\x01\'', '1:8: JSON parse error, expecting value', "1:8: JSON parse error, stray '\ufffd'"]),
    (b'{"\xc3\xa9":1 1}', ["1:9: JSON parse error, expected ',' or '}'", "1:11: JSON parse error, stray '\ufffd'"]),
    (b'{"a":"\\u00e9" 1}', ["1:15: JSON parse error, expected ',' or '}'", "1:17: JSON parse error, stray '\ufffd'"]),
]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "faithful"])
@pytest.mark.parametrize("data, expected", ORACLE_11_1)
def test_errors_match_the_11_1_oracle(data: bytes, expected: list[str], fast_path: bool) -> None:
    assert replies([data + SENTINEL], fast_path) == [*expected, ("id", "S")]


@pytest.mark.parametrize("data, expected", ORACLE_11_1)
def test_positions_do_not_depend_on_how_the_input_is_split(data: bytes, expected: list[str]) -> None:
    assert replies(one_byte_at_a_time(data + SENTINEL)) == [*expected, ("id", "S")]


# ---------------------------------------------------------------------------------------
# the position counter: per connection, bytes, never reset, fast path included
# ---------------------------------------------------------------------------------------

# Probed on qsd 11.1.3: the messages before the error are well formed, so qmpjobd's fast
# path takes them; the position must still count their bytes, lines and the é's two bytes.
CONNECTION_HISTORIES = [
    ([b'{"execute":"qmp_capabilities"}\n',
      b'{"execute":"query-jobs","id":1}\r\n{"execute":"query-jobs","id":"\xc3\xa9"}  {"a" 1}\n'],
     [("id", None), ("id", 1), ("id", "\xe9"), "3:42: JSON parse error, expecting ':'"]),
    ([b'{"execute":"qmp_capabilities"}\n{"execute":"query-jobs","id":[1,2,{"x":null}]}',
      b'\n\n   [1 2]'],
     [("id", None), ("id", [1, 2, {"x": None}]), "4:7: JSON parse error, expected ',' or ']'"]),
    # the counter runs on after errors and completed messages alike
    ([b'TRUE}', b'{"a" 1}\n', b'[1 2]'],
     ["1:1: JSON parse error, stray 'T'", "1:6: JSON parse error, expecting value",
      "1:11: JSON parse error, expecting ':'", "2:4: JSON parse error, expected ',' or ']'"]),
]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "faithful"])
@pytest.mark.parametrize("pieces, expected", CONNECTION_HISTORIES)
def test_position_counts_every_byte_of_the_connection(pieces, expected, fast_path) -> None:
    assert replies(pieces, fast_path) == expected
    assert replies(one_byte_at_a_time(b"".join(pieces)), fast_path) == expected


def test_each_connection_counts_from_1_1() -> None:
    first = new_stream_parser(DIALECT_11_1)
    first.feed(b'{"execute":"query-jobs"}\n\n')
    second = new_stream_parser(DIALECT_11_1)
    assert outcome(second.feed(b"}")) == [("error", "1:1: JSON parse error, expecting value")]
    assert outcome(first.feed(b"}")) == [("error", "3:1: JSON parse error, expecting value")]


def test_a_long_message_split_across_chunks_keeps_its_start_position() -> None:
    # The bad string starts in the first chunk and is reported when the second ends it.
    items = feed_all([b'\n  ["abc', b"def", b'\x01"]'])
    assert outcome(items) == [("error", "2:4: JSON parse error, stray '\"abcdef\x01'"),
                              ("error", "2:14: JSON parse error, expecting value")]


# ---------------------------------------------------------------------------------------
# recovery after an error or a limit (qemu-versions.md 2.3)
# ---------------------------------------------------------------------------------------

def command(ident: str) -> bytes:
    return b'{"execute":"qmp_capabilities","id":"%s"}' % ident.encode()


NESTING = "JSON nesting depth limit exceeded"
DEEP = MAX_NESTING + 1          # 1025: one past QEMU's nesting limit

RECOVERY_11_1 = [
    # the leftovers of an over-deep value are skipped silently
    ([b"[" * DEEP + b"]" * DEEP + command("a1")], [NESTING, ("id", "a1")]),
    ([b'{"a":' * DEEP + b"1" + b"}" * DEEP + command("a2")], [NESTING, ("id", "a2")]),
    # a4 gets no reply: it is still inside the skipped value
    ([b"[" * DEEP + b"1,2]", command("a4")], [NESTING]),
    ([b"[" * 1030 + b"\n" + command("a5"), b"]" * 1030, command("a6")], [NESTING, ("id", "a6")]),
    # a lexical error ends the skipping without being reported
    ([b"[" * DEEP + b"\xff" + command("a7")], [NESTING, ("id", "a7")]),
    # a parse error deep inside a command: the rest of that command is skipped
    ([b'{"execute":"qmp_capabilities","id":[' + b"[" * 1020 + b"1" + b"]" * 1020
      + b'{"a" 1}]}', command("a8")],
     ["1:2078: JSON parse error, expected ',' or ']'", ("id", "a8")]),
    # errors inside containers: skipped until balanced, or until an unmatched closer
    ([b"[1 2\n", command("S"), b"]\n", command("S2")],
     ["1:4: JSON parse error, expected ',' or ']'", ("id", "S2")]),
    ([b"[{]\n", command("S"), b"}\n", command("S2")],
     ["1:3: JSON parse error, expecting key", ("id", "S2")]),
    ([b'{"a" 1 ]\n', command("S")], ["1:6: JSON parse error, expecting ':'", ("id", "S")]),
    ([b"[[1}\n", command("S") + b"\n", b"]", command("S2")],
     ["1:5: JSON parse error, expected ',' or ']'", ("id", "S"),
      "3:1: JSON parse error, expecting value", ("id", "S2")]),
    ([b'{"a" 1 {"b":2}\n', command("S")], ["1:6: JSON parse error, expecting ':'"]),
    ([b'{"a" 1\n', b"TRUE" + command("S")], ["1:6: JSON parse error, expecting ':'", ("id", "S")]),
    # a lexical error inside a message that had no error yet ends it, as in 7.2
    ([b'{"a": TRUE, "b": 1}\n', command("S")],
     ["1:7: JSON parse error, stray 'T'", "1:12: JSON parse error, expecting value",
      "QMP input must be a JSON object", "1:16: JSON parse error, expecting value",
      "QMP input must be a JSON object", "1:20: JSON parse error, expecting value", ("id", "S")]),
    # the first error is reported at once, before the value is complete
    ([b'{"a":[1,2,{"b":nul}]'], ["1:16: JSON parse error, invalid keyword 'nul'"]),
]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "faithful"])
@pytest.mark.parametrize("pieces, expected", RECOVERY_11_1)
def test_recovery_matches_the_11_1_oracle(pieces, expected, fast_path) -> None:
    assert replies(pieces, fast_path) == expected


def test_the_first_error_is_reported_before_the_message_ends() -> None:
    parser = new_stream_parser(DIALECT_11_1)
    assert outcome(parser.feed(b'{"execute" "qmp_capabilities", "arguments": {')) == [
        ("error", "1:12: JSON parse error, expecting ':'")]
    assert parser.feed(b'"a": [1, 2]}}') == []
    assert outcome(parser.feed(b"}")) == [("error", "1:59: JSON parse error, expecting value")]


def test_token_count_limit_skips_the_rest_of_the_value() -> None:
    # qsd 11.1.3: "JSON token count limit exceeded" only (7.2 adds 6 "expecting value")
    pairs = MAX_TOKEN_COUNT // 2
    data = b'{"execute":"qmp_capabilities","id":[' + b"1," * pairs + b'1]}' + command("next")
    assert replies([data]) == ["JSON token count limit exceeded", ("id", "next")]


def test_limit_errors_carry_no_position() -> None:
    [error] = feed_all([b"\n\n" + b"[" * DEEP])
    assert error == ParseError(NESTING)


# ---------------------------------------------------------------------------------------
# fast path == faithful path, and 11.1 reads well-formed input as 7.2 does
# ---------------------------------------------------------------------------------------

def parse_11_1(pieces: list[bytes], fast_path: bool) -> list:
    return outcome(feed_all(pieces, fast_path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_serialised(), st.lists(st.integers(min_value=0), max_size=6))
def test_well_formed_input_gives_the_same_values_in_both_dialects(sample, cuts) -> None:
    data, docs = sample
    expected = [("value", canon(doc)) for doc in docs]
    pieces = _split(data, cuts)
    assert parse_11_1([data], fast_path=True) == expected
    assert parse_11_1(pieces, fast_path=True) == expected
    assert parse_11_1(pieces, fast_path=False) == expected


# 11.1-specific shapes: errors inside containers, unmatched closers, deep nesting, and
# well-formed messages (fast-path food) before and after them, across lines.
_ATOMS_11_1 = _ATOMS + [b"\r\n", b"\xc3\xa9", b'{"a" 1}', b"[1 2]", b'{"a":1,"a":[1]}', b"[{]",
                        b"[" * 600, b"]" * 600, b'{"execute":"qmp_capabilities","id":[1,2]}\n']


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_ATOMS_11_1), max_size=40),
       st.lists(st.integers(min_value=0), max_size=5))
def test_any_input_gives_the_same_results_on_both_paths_in_11_1(atoms, cuts) -> None:
    data = b"".join(atoms)
    faithful = parse_11_1([data], fast_path=False)
    assert parse_11_1([data], fast_path=True) == faithful
    assert parse_11_1(_split(data, cuts), fast_path=True) == faithful
    assert parse_11_1(_split(data, cuts), fast_path=False) == faithful


# ---------------------------------------------------------------------------------------
# which personality speaks which dialect
# ---------------------------------------------------------------------------------------

def test_7_2_and_10_0_keep_the_batch_parser_and_11_1_gets_the_push_parser() -> None:
    assert wire_dialect(personality("7.2")) == QEMU_7_2_DIALECT
    assert wire_dialect(personality("10.0")) == QEMU_7_2_DIALECT
    assert DIALECT_11_1 == WireDialect(push_parser=True, error_positions=True)
    assert type(new_stream_parser(wire_dialect(personality("10.0")))) is StreamParser
    assert type(new_stream_parser(DIALECT_11_1)) is PushStreamParser


def test_positions_need_the_push_parser() -> None:
    with pytest.raises(ValueError):
        WireDialect(error_positions=True)


def test_the_push_parser_without_positions_has_the_new_texts_only() -> None:
    parser = new_stream_parser(WireDialect(push_parser=True))
    assert outcome(parser.feed(b"{1:2}")) == [("error", "JSON parse error, expecting key")]


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_older_dialects_still_answer_as_7_2(version: str) -> None:
    parser = new_stream_parser(wire_dialect(personality(version)))
    items = parser.feed(b"{1:2}" + b"[" * DEEP + b"]" * 2)
    assert outcome(items) == [("error", "JSON parse error, key is not a string in object"),
                              ("error", NESTING),
                              ("error", "JSON parse error, expecting value"),
                              ("error", "JSON parse error, expecting value")]


def test_a_bug_in_the_push_parser_is_an_internal_error_not_an_exception(monkeypatch) -> None:
    import qmpjobd.wire.push as push_module

    def broken(self: object, kind: int, text: bytes) -> object:
        raise ValueError("boom")

    parser = new_stream_parser(DIALECT_11_1, fast_path=False)
    monkeypatch.setattr(push_module._PushParser, "feed", broken)
    assert outcome(parser.feed(b'{"execute":"query-jobs"}')) == [
        ("error", "internal error in qmpjobd: ValueError")]
    monkeypatch.undo()
    assert outcome(parser.feed(command("next")))[0][0] == "value"


# qsd 11.1.3: a lexical error's text now goes through the parser's 1024-byte buffer too,
# so "stray '...'" is cut to 1023 bytes (raw bytes; a cut character becomes U+FFFD).
STRAY_PREFIX = "1:1: JSON parse error, stray '\""


@pytest.mark.parametrize("data, expected", [
    (b'"' + b"a" * 2000 + b"\x01", STRAY_PREFIX + "a" * 1015),
    (b'"' + "\xe9".encode() * 1000 + b"\x01", STRAY_PREFIX + "\xe9" * 507 + "\ufffd"),
    (b'"' + b"a" * 1014 + b"\x01", STRAY_PREFIX + "a" * 1014 + "\x01"),
    (b'"' + b"a" * 1013 + "\xe9".encode() + b"\x01", STRAY_PREFIX + "a" * 1013 + "\xe9"),
    (b'"' + b"a" * 1012 + b"\x01", STRAY_PREFIX + "a" * 1012 + "\x01'"),
])
def test_stray_errors_are_cut_as_11_1_cuts_them(data: bytes, expected: str) -> None:
    assert outcome(feed_all([data])) == [("error", expected)]


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "byte-by-byte"])
def test_many_errors_in_one_chunk_each_get_their_own_line_and_column(split: bool) -> None:
    data = b"\n".join([b"}}}", b"", b"  ]]"]) + b"\n:"
    pieces = one_byte_at_a_time(data) if split else [data]
    positions = [item.desc.split(": JSON")[0] for item in feed_all(pieces)]
    assert positions == ["1:1", "1:2", "1:3", "3:3", "3:4", "4:1"]
