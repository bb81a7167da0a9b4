"""Tests for qmpjobd.wire.lexer: QEMU 7.2's JSON input stream, errors and recovery.

ORACLE_REPLIES holds bytes captured from qemu-storage-daemon 7.2 (negotiated monitor,
OOB off) for each input; the wire layer has to produce the same bytes when the only
command is ``query-jobs`` returning ``[]``.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpjobd.errors import QMPError
from qmpjobd.wire.encode import encode
from qmpjobd.wire.lexer import (
    MAX_NESTING,
    MAX_TOKEN_COUNT,
    MAX_TOKEN_SIZE,
    ParsedValue,
    ParseError,
    StreamParser,
)
from qmpjobd.wire.session import Request, Session

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def parse(data: bytes, fast_path: bool = True) -> list[ParsedValue | ParseError]:
    return StreamParser(fast_path).feed(data)


def parse_in_pieces(pieces: list[bytes], fast_path: bool = True) -> list:
    parser = StreamParser(fast_path)
    items: list = []
    for piece in pieces:
        items += parser.feed(piece)
    return items


def outcome(items: list) -> list:
    """Comparable form: errors by desc, values with exact types (-0.0 vs 0, 1 vs 1.0)."""
    return [("error", item.desc) if isinstance(item, ParseError) else ("value", canon(item.value))
            for item in items]


def canon(value: object) -> object:
    if isinstance(value, dict):
        return ("dict", [(k, canon(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [canon(v) for v in value])
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def descs(data: bytes) -> list[str]:
    return [item.desc if isinstance(item, ParseError) else f"value {item.value!r}"
            for item in parse(data)]


def respond(pieces: list[bytes], fast_path: bool = True) -> list[bytes]:
    """Replies of a negotiated monitor whose only command is query-jobs (returns [])."""
    parser = StreamParser(fast_path)
    session = Session()
    session.negotiate([])
    replies = []
    for piece in pieces:
        for item in parser.feed(piece):
            reply = session.take(item)
            if isinstance(reply, Request):
                if reply.name == "query-jobs":
                    reply = session.reply(reply, [])
                else:
                    err = QMPError(f"The command {reply.name} has not been found", "CommandNotFound")
                    reply = session.error_reply(reply, err)
            replies.append(encode(reply))
    return replies


# ---------------------------------------------------------------------------------------
# bytes captured from the oracle (qmp-wire.md 3.1 table and more)
# ---------------------------------------------------------------------------------------

EXPECTING_VALUE = b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'
NOT_OBJECT = b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\r\n'

ORACLE_REPLIES = [
    (b'{"execute": }', [EXPECTING_VALUE]),
    (b'{"execute":"query-jobs","id":4,}', [EXPECTING_VALUE]),
    (b'{"execute":"query-jobs","id":[1,]}', [EXPECTING_VALUE]),
    (b'}', [EXPECTING_VALUE]),
    (b']', [EXPECTING_VALUE]),
    (b':', [EXPECTING_VALUE]),
    (b'xyz\n',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword \'xyz\'"}}\r\n']),
    (b'{"execute":"query-jobs","id":nul}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword \'nul\'"}}\r\n']),
    (b'{"execute":"query-jobs","id":TRUE}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'T\'"}}\r\n',
      EXPECTING_VALUE]),
    (b'{"execute":"query-jobs","id":1,"id":2}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}\r\n']),
    (b'{1:2}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, key is not a string in object"}}\r\n']),
    (b'{"a" 1}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, missing : in object pair"}}\r\n']),
    (b'{"a":}', [EXPECTING_VALUE]),
    (b'{"a":1 "b":2}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in dict"}}\r\n']),
    (b'{"execute":"query-jobs","id":[1 2]}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in list"}}\r\n']),
    (b'{"execute":"query-jobs","id":"\\x"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid escape sequence in string"}}\r\n']),
    (b'{"execute":"query-jobs","id":"\\u12"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, \\\\u12\\" is not a valid Unicode character"}}\r\n']),
    (b'{"execute":"query-jobs","id":"\\ud800"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, \\\\ud800 is not a valid Unicode character"}}\r\n']),
    (b'{"execute":"query-jobs","id":"\\ud800\\u0041"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, \\\\ud800 is not a valid Unicode character"}}\r\n']),
    (b'{"execute":"query-jobs","id":"\\ud83f\\udffe"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, \\\\ud83f\\\\udffe is not a valid Unicode character"}}\r\n']),
    (b'{"execute":"query-jobs","id":"\\uffff"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, \\\\uffff is not a valid Unicode character"}}\r\n']),
    (b'{"execute":"query-jobs","id":"\\ufdd0"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, \\\\ufdd0 is not a valid Unicode character"}}\r\n']),
    (b'{"execute":"query-jobs","id":01}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'01\'"}}\r\n',
      EXPECTING_VALUE]),
    (b'{"execute":"query-jobs","id":%d}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'%\'"}}\r\n',
      EXPECTING_VALUE]),
    (b'{"execute":"query-jobs","id":"a\x01b"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\"a\\u0001\'"}}\r\n',
      EXPECTING_VALUE]),
    (b'{"execute":"query-jobs","id":"a\x00b"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\"a\'"}}\r\n',
      EXPECTING_VALUE]),
    (b'{"execute":"query-jobs","id":"a\xffb"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\"a\\uFFFD\'"}}\r\n',
      EXPECTING_VALUE]),
    (b'\xff',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\r\n']),
    (b'\x0c{"execute":"query-jobs","id":"ff"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\f\'"}}\r\n',
      b'{"return": [], "id": "ff"}\r\n']),
    (b'{"execute":"query-jobs","id":0e5}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in dict"}}\r\n']),
    (b'{"execute":"query-jobs","id":1ex}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'1ex\'"}}\r\n',
      EXPECTING_VALUE]),
    (b'{"execute":"query-jobs","id":NaN}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'N\'"}}\r\n',
      EXPECTING_VALUE]),
    (b'{"execute":"query-jobs","id":"\x80"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}\r\n']),
    (b'{"execute":"query-jobs","id":"\xef\xbf\xbf"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}\r\n']),
    (b'{"execute":"query-jobs","id":"a\xc3\x01"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\"a\\uFFFD\\u0001\'"}}\r\n',
      EXPECTING_VALUE]),
    (b'{"execute":"query-jobs","id":1\x80}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\r\n',
      EXPECTING_VALUE]),
    (b'null\xc2\xa0{"execute":"query-jobs","id":2}',
     [NOT_OBJECT,
      b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\r\n',
      b'{"return": [], "id": 2}\r\n']),
    (b'\x00{"execute":"query-jobs","id":3}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\'"}}\r\n',
      b'{"return": [], "id": 3}\r\n']),
    (b'{"execute":"query-jobs","id":{[1]:2}}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, key is not a string in object"}}\r\n']),
    (b'{"execute":"query-jobs","id":{"a":1,"a":x}}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword \'x\'"}}\r\n']),
    (b'{"execute":"query-jobs","id":{"a":1]',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in dict"}}\r\n']),
    (b'[{]}', [EXPECTING_VALUE]),
    (b'"str" 42 true [] {} nul -',
     [NOT_OBJECT, NOT_OBJECT, NOT_OBJECT, NOT_OBJECT,
      b'{"error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}\r\n',
      b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword \'nul\'"}}\r\n']),
    (b'42', []),                                        # a number needs its next byte
    (b'{"execute":"query-jobs","id":[1}', []),          # braces back to 0, bracket open
    (b'{\'execute\':\'query-jobs\',\'id\':\'it\\\'s "q"\'}',
     [b'{"return": [], "id": "it\'s \\"q\\""}\r\n']),
    (b'{"execute":"query-jobs","id":"a"}\r\n{"execute":"query-jobs","id":"b"}\n\n  \t'
     b'{"execute":"query-jobs","id":"c"}',
     [b'{"return": [], "id": "a"}\r\n',
      b'{"return": [], "id": "b"}\r\n',
      b'{"return": [], "id": "c"}\r\n']),
    (b'}}{"execute":"query-jobs","id":"x"}',
     [EXPECTING_VALUE, EXPECTING_VALUE, b'{"return": [], "id": "x"}\r\n']),
    (b'{"execute":"query-jobs","id":"x"} junk {"execute":"query-jobs","id":"y"}',
     [b'{"return": [], "id": "x"}\r\n',
      b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword \'junk\'"}}\r\n',
      b'{"return": [], "id": "y"}\r\n']),
    (b'x\ty{"execute":"query-jobs","id":"tabrec"}',
     [b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword \'x\'"}}\r\n',
      b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword \'y\'"}}\r\n',
      b'{"return": [], "id": "tabrec"}\r\n']),
]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "faithful"])
@pytest.mark.parametrize("data, expected", ORACLE_REPLIES)
def test_replies_match_oracle_bytes(data: bytes, expected: list[bytes], fast_path: bool) -> None:
    assert respond([data], fast_path) == expected


@pytest.mark.parametrize("data, expected", ORACLE_REPLIES)
def test_replies_match_oracle_bytes_one_byte_at_a_time(data: bytes, expected: list[bytes]) -> None:
    assert respond([data[i:i + 1] for i in range(len(data))]) == expected


# ---------------------------------------------------------------------------------------
# the 3.1 table at the level of ParseError descs
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    (b'{"execute": }', ["JSON parse error, expecting value"]),
    (b'}', ["JSON parse error, expecting value"]),
    (b'xyz ', ["JSON parse error, invalid keyword 'xyz'"]),
    (b'{"id":TRUE}', ["JSON parse error, stray 'T'", "JSON parse error, expecting value"]),
    (b'{"id":1,"id":2}', ["JSON parse error, duplicate key"]),
    (b'{1:2}', ["JSON parse error, key is not a string in object"]),
    (b'{"a" 1}', ["JSON parse error, missing : in object pair"]),
    (b'{"a":1 "b":2}', ["JSON parse error, expected separator in dict"]),
    (b'[1 2]', ["JSON parse error, expected separator in list"]),
    (b'["\\x"]', ["JSON parse error, invalid escape sequence in string"]),
    (b'["\\u12"]', ['JSON parse error, \\u12" is not a valid Unicode character']),
    (b'["\\ud800"]', ["JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b'["\\uDC00"]', ["JSON parse error, \\uDC00 is not a valid Unicode character"]),
    (b'{"id":01}', ["JSON parse error, stray '01'", "JSON parse error, expecting value"]),
    (b'{"id":%d}', ["JSON parse error, stray '%'", "JSON parse error, expecting value"]),
    (b'["a\x01b"]', ["JSON parse error, stray '\"a\x01'", "JSON parse error, expecting value"]),
    (b'["a\x00b"]', ["JSON parse error, stray '\"a'", "JSON parse error, expecting value"]),
    (b'["a\xffb"]', ["JSON parse error, stray '\"a\ufffd'", "JSON parse error, expecting value"]),
    (b'\xff', ["JSON parse error, stray '\ufffd'"]),
    (b'\x0c{}', ["JSON parse error, stray '\x0c'", "value {}"]),
    (b'\x0b{}', ["JSON parse error, stray '\x0b'", "value {}"]),
    (b'["\xc3\xa9\x01"]', ["JSON parse error, stray '\"\xe9\x01'", "JSON parse error, expecting value"]),
    (b'["\xed\xa0\x80\x01"]', ["JSON parse error, stray '\"\ufffd\x01'", "JSON parse error, expecting value"]),
    (b'["\xc0\x80\x01"]', ["JSON parse error, stray '\"\x00\x01'", "JSON parse error, expecting value"]),
    (b'[1.]', ["JSON parse error, stray '1.]'"]),
    (b'[-x]', ["JSON parse error, stray '-x'", "JSON parse error, expecting value"]),
    (b'[1e+]', ["JSON parse error, stray '1e+]'"]),
    (b'["\\u00e9", "\xe0\x80\x80"]', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b'[nul, "\\x"]', ["JSON parse error, invalid keyword 'nul'"]),          # first error wins
    (b'["\\x", nul]', ["JSON parse error, invalid escape sequence in string"]),
    (b'{"a":1,"a":nul}', ["JSON parse error, invalid keyword 'nul'"]),      # value before dup
    (b'[}', ["JSON parse error, expecting value"]),
    (b'["a"}', ["JSON parse error, expected separator in list"]),
    (b'{"a":1]', ["JSON parse error, expected separator in dict"]),
    (b'{"a"]', ["JSON parse error, missing : in object pair"]),
    (b'{]', ["JSON parse error, expecting value"]),
    (b'{[]:1]', ["JSON parse error, key is not a string in object"]),
    (b"'single' ", ["value 'single'"]),
    (b'"\\\'" ', ["value \"'\""]),
])
def test_error_descs(data: bytes, expected: list[str]) -> None:
    assert descs(data) == expected
    assert descs(data + b" ") == expected or data.endswith(b" ")  # trailing space changes nothing


# ---------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "faithful"])
@pytest.mark.parametrize("literal, expected", [
    (b"0", ("int", 0)),
    (b"-0", ("int", 0)),
    (b"-0.0", ("float", "-0.0")),
    (b"1.5e3", ("float", "1500.0")),
    (b"1E+2", ("float", "100.0")),
    (b"0.1", ("float", "0.1")),
    (b"1e400", ("float", "inf")),
    (b"-1e400", ("float", "-inf")),
    (b"1e-400", ("float", "0.0")),
    (b"9223372036854775807", ("int", 9223372036854775807)),
    (b"-9223372036854775808", ("int", -9223372036854775808)),
    (b"18446744073709551615", ("int", 18446744073709551615)),
    (b"18446744073709551616", ("float", "1.8446744073709552e+19")),
    (b"-9223372036854775809", ("float", "-9.223372036854776e+18")),
    (b"123456789012345678901234567890", ("float", "1.2345678901234568e+29")),
    (b"true", ("bool", True)),
    (b"false", ("bool", False)),
    (b"null", ("NoneType", None)),
    (b'"\\u00e9\\uD83D\\uDE00"', ("str", "\xe9\U0001F600")),
    (b'"\\u0000\\/\\b\\f\\n\\r\\t\\"\\\\"', ("str", "\x00/\b\f\n\r\t\"\\")),
    (b'"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"', ("str", "\xe9\u20ac\U0001F600")),
    (b'"\xc0\x80"', ("str", "\x00")),                  # modified UTF-8 NUL
    (b'"\x7f"', ("str", "\x7f")),
    (b"'it\\'s \"x\"'", ("str", "it's \"x\"")),
    (b'"\\\'"', ("str", "'")),
])
def test_scalar_values(literal: bytes, expected: tuple, fast_path: bool) -> None:
    items = parse(b"[" + literal + b"]", fast_path)
    assert outcome(items) == [("value", ("list", [expected]))]


def test_object_keeps_parse_order() -> None:
    [item] = parse(b'{"z":1,"a":{"y":2,"b":3},"m":[]}')
    assert list(item.value) == ["z", "a", "m"]
    assert list(item.value["a"]) == ["y", "b"]


# ---------------------------------------------------------------------------------------
# framing
# ---------------------------------------------------------------------------------------

def test_scalar_at_top_level_waits_for_the_next_byte() -> None:
    parser = StreamParser()
    assert parser.feed(b"42") == []
    assert parser.feed(b"\n") == [ParsedValue(42)]
    assert parser.feed(b"tru") == []
    assert parser.feed(b"e") == []
    assert parser.feed(b"{}") == [ParsedValue(True), ParsedValue({})]


def test_string_at_top_level_is_complete_at_its_quote() -> None:
    assert StreamParser().feed(b'"abc"') == [ParsedValue("abc")]


def test_messages_without_separators_and_split_anywhere() -> None:
    stream = b'{"execute":"a"}[1,2]{"execute":"b","arguments":{"x":[{}]}}"s"'
    whole = outcome(parse(stream))
    assert len(whole) == 4
    for cut in range(len(stream) + 1):
        assert outcome(parse_in_pieces([stream[:cut], stream[cut:]])) == whole


def test_blank_lines_and_stray_whitespace_produce_nothing() -> None:
    assert parse(b" \r\n\t\n  ") == []


def test_partial_message_then_rest() -> None:
    parser = StreamParser()
    assert parser.feed(b'{"execute":"query-') == []
    assert parser.feed(b'jobs"}{"exec') == [ParsedValue({"execute": "query-jobs"})]
    assert parser.feed(b'ute":"x"}') == [ParsedValue({"execute": "x"})]


def test_reset_discards_partial_input() -> None:
    parser = StreamParser()
    assert parser.feed(b'{"execute":"query-jobs","id":[') == []
    parser.reset()
    assert parser.feed(b'{"execute":"x"}') == [ParsedValue({"execute": "x"})]


def test_newline_resynchronises_only_after_an_error() -> None:
    parser = StreamParser()
    # inside a well-formed partial message a newline is just whitespace
    assert parser.feed(b'{"a":\n') == []
    # a bad byte throws the partial message away; recovery skips to the newline
    assert outcome(parser.feed(b'@garbage "x" \n{"b":1}')) == [
        ("error", "JSON parse error, stray '@'"),
        ("value", ("dict", [("b", ("int", 1))])),
    ]


def test_0xff_forces_a_reset() -> None:
    parser = StreamParser()
    assert parser.feed(b'{"a":[1,') == []
    assert outcome(parser.feed(b'\xff{"b":1}')) == [
        ("error", "JSON parse error, stray '\ufffd'"),
        ("value", ("dict", [("b", ("int", 1))])),
    ]


def test_recovery_keeps_skipping_tabs() -> None:
    assert descs(b"@a\tb c{}") == ["JSON parse error, stray '@'", "value {}"]


# ---------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "faithful"])
def test_nesting_limit(fast_path: bool) -> None:
    ok = b'{"id":' + b"[" * (MAX_NESTING - 1) + b"]" * (MAX_NESTING - 1) + b"}"
    [item] = parse(ok, fast_path)
    assert isinstance(item, ParsedValue)

    too_deep = b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1)
    items = parse(too_deep, fast_path)
    assert items[0] == ParseError("JSON nesting depth limit exceeded")
    assert items[1:] == [ParseError("JSON parse error, expecting value")] * (MAX_NESTING + 1)


def test_nesting_limit_then_the_rest_is_lexed_afresh() -> None:
    items = parse(b"[" * (MAX_NESTING + 1) + b'1]"s",')
    assert outcome(items) == [
        ("error", "JSON nesting depth limit exceeded"),
        ("value", ("int", 1)),
        ("error", "JSON parse error, expecting value"),
        ("value", ("str", "s")),
        ("error", "JSON parse error, expecting value"),
    ]


def test_token_count_limit() -> None:
    pairs = MAX_TOKEN_COUNT // 2
    # "[" + pairs-1 times "1," + "1" + "]" is MAX_TOKEN_COUNT + 1 tokens
    assert parse(b"[" + b"1," * (pairs - 1) + b"1]") == [
        ParseError("JSON token count limit exceeded")]
    [item] = parse(b"[" + b"1," * (pairs - 2) + b"1]")
    assert isinstance(item, ParsedValue) and len(item.value) == pairs - 1


def test_token_size_limit_counts_all_tokens_of_a_message() -> None:
    # a lone string token of MAX_TOKEN_SIZE - 1 bytes is the largest accepted
    body = b"a" * (MAX_TOKEN_SIZE - 3)
    [item] = parse(b'"' + body + b'"')
    assert isinstance(item, ParsedValue) and len(item.value) == len(body)
    assert parse(b'"a' + body + b'"') == [ParseError("JSON token size limit exceeded")]
    # inside a list the "[" counts too
    assert parse(b'["' + body + b'"]') == [
        ParseError("JSON token size limit exceeded"), ParseError("JSON parse error, expecting value")]


def test_oversized_token_is_cut_and_the_rest_lexed_afresh() -> None:
    items = parse(b'"' + b"a" * MAX_TOKEN_SIZE + b'bc {}')
    assert outcome(items) == [
        ("error", "JSON token size limit exceeded"),
        ("error", "JSON parse error, invalid keyword 'bc'"),
        ("value", ("dict", [])),
    ]


# ---------------------------------------------------------------------------------------
# fast path == faithful path (DESIGN.md decision 8)
# ---------------------------------------------------------------------------------------

def _is_noncharacter(ch: str) -> bool:
    cp = ord(ch)
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


_text = st.text(st.characters(blacklist_categories=("Cs",)).filter(lambda c: not _is_noncharacter(c)),
                max_size=12)
_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.integers(min_value=-1000, max_value=1000),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(_text, children, max_size=5)),
    max_leaves=25,
)
_documents = st.one_of(st.lists(_values, max_size=5), st.dictionaries(_text, _values, max_size=5))


def _expected(value: object) -> object:
    """What QEMU makes of json.dumps(value): out-of-range integers become doubles."""
    if isinstance(value, dict):
        return {k: _expected(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expected(v) for v in value]
    if type(value) is int and not -(1 << 63) <= value < (1 << 64):
        return float(value)
    return value


@st.composite
def _serialised(draw) -> tuple[bytes, list]:
    docs = draw(st.lists(_documents, min_size=1, max_size=4))
    chunks = []
    for doc in docs:
        text = json.dumps(
            doc,
            ensure_ascii=draw(st.booleans()),
            indent=draw(st.sampled_from([None, None, 0, 2, "\t"])),
            separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\r\n", " :\t")])),
        )
        chunks.append(text.encode("utf-8") + draw(st.sampled_from([b"", b"", b"\n", b" \r\n\t"])))
    return b"".join(chunks), [_expected(doc) for doc in docs]


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_serialised(), st.lists(st.integers(min_value=0), max_size=6))
def test_well_formed_input_gives_the_same_values_on_both_paths(sample, cuts) -> None:
    data, docs = sample
    expected = [("value", canon(doc)) for doc in docs]
    pieces = _split(data, cuts)
    assert outcome(parse(data)) == expected
    assert outcome(parse_in_pieces(pieces)) == expected
    assert outcome(parse_in_pieces(pieces, fast_path=False)) == expected


_ATOMS = [b"{", b"}", b"[", b"]", b":", b",", b" ", b"\n", b"\t", b"\x0c", b"\x00", b"\xff", b"\xc3",
          b"\xc3\xa9", b'"', b"'", b"\\", b"\\u", b"\\ud83d\\ude00", b"\\ud800", b"\\uffff", b"\\u0000",
          b"0", b"1", b"-", b".", b"e", b"E", b"+", b"01", b"0e5", b"1e400", b"18446744073709551616",
          b"true", b"nul", b"TRUE", b"NaN", b"Infinity", b"%", b'"a"', b'"id"', b"'sq'", b"x",
          b'{"execute":"query-jobs","id":1}', b'{"a":1,"a":2}', b"[[[[", b"]]]]"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_ATOMS), max_size=40), st.lists(st.integers(min_value=0), max_size=5))
def test_any_input_gives_the_same_results_on_both_paths(atoms, cuts) -> None:
    data = b"".join(atoms)
    faithful = outcome(parse(data, fast_path=False))
    assert outcome(parse(data)) == faithful
    assert outcome(parse_in_pieces(_split(data, cuts))) == faithful
    assert outcome(parse_in_pieces(_split(data, cuts), fast_path=False)) == faithful


def test_fast_path_rejects_what_qemu_rejects() -> None:
    # inputs the json module accepts but QEMU does not
    assert descs(b'{"a":NaN}')[0] == "JSON parse error, stray 'N'"
    assert descs(b'{"a":-Infinity}')[0] == "JSON parse error, stray '-I'"
    assert descs(b'{"a":0e1}') == ["JSON parse error, expected separator in dict"]
    assert descs(b'{"a":1,"a":1}') == ["JSON parse error, duplicate key"]
    assert descs(b'{"a":"\\udc00"}') == ["JSON parse error, \\udc00 is not a valid Unicode character"]
    assert math.isinf(parse(b"[1e999]")[0].value[0])


def test_large_feeds_cross_the_fast_decoder_window() -> None:
    # more than the fast path's 256 KiB window, with a message larger than its margin,
    # single-quoted messages, errors and a message cut between two feeds
    big_id = '"' + "x" * 100_000 + '"'
    parts = []
    for i in range(6000):
        if i % 1000 == 500:
            parts.append(b'{"execute":"big","id":' + big_id.encode() + b"}")
        elif i % 7 == 0:
            parts.append(b"{'execute':'sq','id':%d}" % i)
        elif i % 13 == 0:
            parts.append(b'{"execute":"bad","id":%d,}' % i)
        else:
            parts.append(b'{"execute":"query-jobs","arguments":{},"id":"__qmp#%05d"}\n' % i)
    stream = b"".join(parts)
    assert len(stream) > 3 * 256 * 1024
    expected = outcome(parse(stream, fast_path=False))
    assert len(expected) == 6000
    assert outcome(parse(stream)) == expected
    cut = len(stream) // 3
    assert outcome(parse_in_pieces([stream[:cut], stream[cut:]])) == expected


# ---------------------------------------------------------------------------------------
# Long literals (issue 8): QEMU's strtod past the int64/uint64 range, its 1024-byte
# message buffer, and no exception reaching the connection
# ---------------------------------------------------------------------------------------

QUERY_NEXT = b'{"execute":"query-version","id":"next"}'


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("digits", [1, 19, 20, 21, 308, 309, 4299, 4300, 4301, 4302, 20000, 100000])
@pytest.mark.parametrize("sign", ["", "-"])
def test_integer_literal_of_any_length(fast_path: bool, digits: int, sign: str) -> None:
    literal = sign + "1" * digits
    items = parse(b'{"execute":"query-version","id":%s}' % literal.encode() + QUERY_NEXT, fast_path)
    assert [type(item) for item in items] == [ParsedValue, ParsedValue]
    ident = items[0].value["id"]
    # int64, else uint64 when not negative, else the nearest double: inf past DBL_MAX
    number = int(literal) if digits <= 20 else None
    if number is not None and -(1 << 63) <= number < (1 << 64):
        assert ident == number and type(ident) is int
    else:
        assert type(ident) is float and ident == float(literal)
    if digits > 309:                     # 1.1e308 < DBL_MAX < 1.1e309
        assert ident == (-math.inf if sign else math.inf)
    assert items[1].value["id"] == "next"


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("literal", [
    "1." + "1" * 5000, "0." + "0" * 5000 + "1", "1e" + "1" * 5000, "1e-" + "9" * 5000,
    "-" + "9" * 5000 + ".5E+3", "1" * 5000 + "e-4990",
])
def test_float_literal_of_any_length(fast_path: bool, literal: str) -> None:
    items = parse(b"[%s]" % literal.encode() + QUERY_NEXT, fast_path)
    assert [type(item) for item in items] == [ParsedValue, ParsedValue]
    assert outcome(items[:1]) == outcome([ParsedValue([float(literal)])])


def test_huge_integer_id_is_echoed_as_qemu_does() -> None:
    items = parse(b'{"execute":"query-jobs","id":%s}' % (b"1" * 4301))
    request = Session().take(items[0])
    assert isinstance(request, Request)
    assert encode(Session().reply(request, [])) == b'{"return": [], "id": inf}\r\n'


def keyword_error(length: int) -> str:
    return parse(b"[" + b"a" * length + b"]", fast_path=False)[0].desc


@pytest.mark.parametrize("length", [1, 1000, 1004, 1005])
def test_invalid_keyword_error_keeps_short_words(length: int) -> None:
    assert keyword_error(length) == "JSON parse error, invalid keyword '" + "a" * length + "'"


@pytest.mark.parametrize("length", [1006, 1007, 1023, 5000, 1 << 20])
def test_invalid_keyword_error_is_cut_as_qemu_cuts_it(length: int) -> None:
    # QEMU formats "invalid keyword '%s'" into 1024 bytes: 1023 survive, the closing
    # quote goes first. Observed on qemu-storage-daemon 7.2: a 1091-byte error line.
    desc = keyword_error(length)
    assert desc == "JSON parse error, invalid keyword '" + "a" * 1006
    assert len(encode({"error": {"class": "GenericError", "desc": desc}})) == 1091


def test_invalid_keyword_then_the_next_message() -> None:
    items = parse(b"[" + b"a" * 200_000 + b"]" + QUERY_NEXT)
    assert len(items[0].desc) == len("JSON parse error, ") + 1023
    assert items[-1].value["id"] == "next"


def test_a_multibyte_character_cut_by_the_message_buffer_becomes_fffd() -> None:
    from qmpjobd.wire.lexer import _cut_message
    assert _cut_message("\u00e9" * 600) == "\u00e9" * 511 + "\ufffd"    # 1023 = 511*2 + 1
    assert _cut_message("x" + "\u00e9" * 600) == "x" + "\u00e9" * 511
    assert _cut_message("\u00e9" * 511) == "\u00e9" * 511


def test_stray_errors_are_not_cut() -> None:
    # The streamer's "stray" error does not go through the parser's buffer.
    items = parse(b'"' + b"a" * 3000 + b"\x01")
    assert items[0].desc == "JSON parse error, stray '\"" + "a" * 3000 + "\x01'"


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_bug_in_the_parser_is_an_internal_error_not_an_exception(monkeypatch, fast_path) -> None:
    import qmpjobd.wire.lexer as lexer_module

    def broken(kinds: list, texts: list) -> object:
        raise ValueError("boom")

    monkeypatch.setattr(lexer_module, "_parse_tokens", broken)
    monkeypatch.setattr(lexer_module, "_fast_decode", lambda text, pos: broken([], []))
    parser = StreamParser(fast_path)
    items = parser.feed(b'{"execute":"query-jobs"}')
    assert outcome(items) == [("error", "internal error in qmpjobd: ValueError")]
    monkeypatch.undo()
    assert parser.feed(QUERY_NEXT)[0].value["id"] == "next"


def test_a_bug_in_the_lexer_resets_it_and_reports_an_internal_error(monkeypatch) -> None:
    parser = StreamParser()
    parser.feed(b'{"execute":')
    monkeypatch.setattr(parser, "_lex", lambda *args: 1 // 0)
    assert outcome(parser.feed(b'"x"}')) == [("error", "internal error in qmpjobd: ZeroDivisionError")]
    monkeypatch.undo()
    assert parser.feed(QUERY_NEXT)[0].value["id"] == "next"
