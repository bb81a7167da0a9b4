"""Tests for qmpjobd.wire.encode: QEMU 7.2's exact output bytes.

Expected bytes were captured from qemu-storage-daemon 7.2 unless a test says otherwise.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpjobd.wire.encode import _qemu_write, encode, format_double, qdict_bucket, qdict_order
from qmpjobd.wire.lexer import ParsedValue, StreamParser

INF = float("inf")

# id echoed by {"execute":"query-jobs","id":ID}: the parsed id, compact reply, pretty reply
ID_REPLIES = [
    ('str',
     b'{"return": [], "id": "str"}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": "str"\r\n}\r\n'),
    (42,
     b'{"return": [], "id": 42}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": 42\r\n}\r\n'),
    (-7,
     b'{"return": [], "id": -7}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": -7\r\n}\r\n'),
    (1500.0,
     b'{"return": [], "id": 1500}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": 1500\r\n}\r\n'),
    (0.1,
     b'{"return": [], "id": 0.10000000000000001}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": 0.10000000000000001\r\n}\r\n'),
    (-0.0,
     b'{"return": [], "id": -0}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": -0\r\n}\r\n'),
    (0,
     b'{"return": [], "id": 0}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": 0\r\n}\r\n'),
    (INF,
     b'{"return": [], "id": inf}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": inf\r\n}\r\n'),
    (-INF,
     b'{"return": [], "id": -inf}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": -inf\r\n}\r\n'),
    (18446744073709551615,
     b'{"return": [], "id": 18446744073709551615}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": 18446744073709551615\r\n}\r\n'),
    (1.8446744073709552e+19,
     b'{"return": [], "id": 1.8446744073709552e+19}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": 1.8446744073709552e+19\r\n}\r\n'),
    (-9.223372036854776e+18,
     b'{"return": [], "id": -9.2233720368547758e+18}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": -9.2233720368547758e+18\r\n}\r\n'),
    (1.2345678901234568e+29,
     b'{"return": [], "id": 1.2345678901234568e+29}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": 1.2345678901234568e+29\r\n}\r\n'),
    (None,
     b'{"return": [], "id": null}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": null\r\n}\r\n'),
    (True,
     b'{"return": [], "id": true}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": true\r\n}\r\n'),
    (False,
     b'{"return": [], "id": false}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": false\r\n}\r\n'),
    ([],
     b'{"return": [], "id": []}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": [\r\n    ]\r\n}\r\n'),
    ({},
     b'{"return": [], "id": {}}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": {\r\n    }\r\n}\r\n'),
    ([1, 'a', None, [True], {'k': False}],
     b'{"return": [], "id": [1, "a", null, [true], {"k": false}]}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": [\r\n        1,\r\n        "a",\r\n        null,\r\n        [\r\n            true\r\n        ],\r\n        {\r\n            "k": false\r\n        }\r\n    ]\r\n}\r\n'),
    ({'b': 1, 'a': 2, 'c': [], 'd': {}, 'id': None, 'return': True, 'error': False, 'micro': 1, 'minor': 2, 'major': 3},
     b'{"return": [], "id": {"d": {}, "minor": 2, "micro": 1, "a": 2, "b": 1, "return": true, "c": [], "major": 3, "id": null, "error": false}}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": {\r\n        "d": {\r\n        },\r\n        "minor": 2,\r\n        "micro": 1,\r\n        "a": 2,\r\n        "b": 1,\r\n        "return": true,\r\n        "c": [\r\n        ],\r\n        "major": 3,\r\n        "id": null,\r\n        "error": false\r\n    }\r\n}\r\n'),
    ({'minor': 2, 'micro': 1},
     b'{"return": [], "id": {"micro": 1, "minor": 2}}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": {\r\n        "micro": 1,\r\n        "minor": 2\r\n    }\r\n}\r\n'),
    ('é😀\x7f\x00/\x08\x0c\n\r\t"\\ /',
     b'{"return": [], "id": "\\u00E9\\uD83D\\uDE00\\u007F\\u0000/\\b\\f\\n\\r\\t\\"\\\\ /"}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": "\\u00E9\\uD83D\\uDE00\\u007F\\u0000/\\b\\f\\n\\r\\t\\"\\\\ /"\r\n}\r\n'),
    ('é€😀\x00',
     b'{"return": [], "id": "\\u00E9\\u20AC\\uD83D\\uDE00\\u0000"}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": "\\u00E9\\u20AC\\uD83D\\uDE00\\u0000"\r\n}\r\n'),
    (0.30000000000000004,
     b'{"return": [], "id": 0.30000000000000004}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": 0.30000000000000004\r\n}\r\n'),
    (5e-324,
     b'{"return": [], "id": 4.9406564584124654e-324}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": 4.9406564584124654e-324\r\n}\r\n'),
    (1.7976931348623157e+308,
     b'{"return": [], "id": 1.7976931348623157e+308}\r\n',
     b'{\r\n    "return": [\r\n    ],\r\n    "id": 1.7976931348623157e+308\r\n}\r\n'),
]


@pytest.mark.parametrize("ident, compact, pretty", ID_REPLIES)
def test_reply_with_id_matches_oracle(ident: object, compact: bytes, pretty: bytes) -> None:
    reply = {"return": [], "id": ident}
    assert encode(reply) == compact
    assert encode(reply, pretty=True) == pretty


@pytest.mark.parametrize("name, ident, expected", [
    ("bogus", [1, {}],
     b'{"id": [1, {}], "error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}}\r\n'),
    ("", "e",
     b'{"id": "e", "error": {"class": "CommandNotFound", "desc": "The command  has not been found"}}\r\n'),
    ("\xe9t\xe9", "u",
     b'{"id": "u", "error": {"class": "CommandNotFound", "desc": "The command \\u00E9t\\u00E9 has not been found"}}\r\n'),
])
def test_error_reply_puts_id_first(name: str, ident: object, expected: bytes) -> None:
    # QEMU inserts "error" before "id"; the hash order writes "id" first
    reply = {"error": {"class": "CommandNotFound", "desc": f"The command {name} has not been found"},
             "id": ident}
    assert encode(reply) == expected


def test_pretty_error_matches_oracle() -> None:
    reply = {"error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"},
             "id": [1, {}]}
    assert encode(reply, pretty=True) == (
        b'{\r\n    "id": [\r\n        1,\r\n        {\r\n        }\r\n    ],\r\n    "error": {\r\n'
        b'        "class": "CommandNotFound",\r\n        "desc": "The command bogus has not been found"\r\n'
        b'    }\r\n}\r\n')


def test_pretty_empty_containers_match_oracle() -> None:
    assert encode({"return": {}, "id": 1}, pretty=True) == b'{\r\n    "return": {\r\n    },\r\n    "id": 1\r\n}\r\n'
    assert encode({"return": []}, pretty=True) == b'{\r\n    "return": [\r\n    ]\r\n}\r\n'
    assert encode({"return": {}}) == b'{"return": {}}\r\n'


QSD_VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 22},
               "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}


def test_greeting_matches_oracle() -> None:
    greeting = {"QMP": {"version": QSD_VERSION, "capabilities": ["oob"]}}
    assert encode(greeting) == (
        b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
        b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n')
    assert encode(greeting, pretty=True) == (
        b'{\r\n    "QMP": {\r\n        "version": {\r\n            "qemu": {\r\n                "micro": 22,\r\n'
        b'                "minor": 2,\r\n                "major": 7\r\n            },\r\n'
        b'            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"\r\n        },\r\n'
        b'        "capabilities": [\r\n            "oob"\r\n        ]\r\n    }\r\n}\r\n')


def test_query_jobs_reply_matches_oracle() -> None:
    # JobInfo members in schema declaration order
    job = {"id": "j0", "type": "backup", "status": "concluded",
           "current-progress": 1048576, "total-progress": 1048576}
    reply = {"return": [job], "id": "qj"}
    assert encode(reply) == (
        b'{"return": [{"current-progress": 1048576, "status": "concluded", "total-progress": 1048576, '
        b'"type": "backup", "id": "j0"}], "id": "qj"}\r\n')
    assert encode(reply, pretty=True) == (
        b'{\r\n    "return": [\r\n        {\r\n            "current-progress": 1048576,\r\n'
        b'            "status": "concluded",\r\n            "total-progress": 1048576,\r\n'
        b'            "type": "backup",\r\n            "id": "j0"\r\n        }\r\n    ],\r\n    "id": "qj"\r\n}\r\n')


def test_events_match_oracle() -> None:
    event = {"timestamp": {"seconds": 1795849060, "microseconds": 473877},
             "event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "j0"}}
    assert encode(event) == (
        b'{"timestamp": {"seconds": 1795849060, "microseconds": 473877}, "event": "JOB_STATUS_CHANGE", '
        b'"data": {"status": "null", "id": "j0"}}\r\n')
    completed = {"timestamp": {"seconds": 1795849062, "microseconds": 29799},
                 "event": "BLOCK_JOB_COMPLETED",
                 "data": {"type": "backup", "device": "j0", "len": 1048576, "offset": 1048576, "speed": 0}}
    assert encode(completed, pretty=True) == (
        b'{\r\n    "timestamp": {\r\n        "seconds": 1795849062,\r\n        "microseconds": 29799\r\n'
        b'    },\r\n    "event": "BLOCK_JOB_COMPLETED",\r\n    "data": {\r\n        "device": "j0",\r\n'
        b'        "len": 1048576,\r\n        "offset": 1048576,\r\n        "speed": 0,\r\n'
        b'        "type": "backup"\r\n    }\r\n}\r\n')


# ---------------------------------------------------------------------------------------
# key order
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, bucket", [
    ("return", 401), ("id", 486), ("error", 489), ("timestamp", 26), ("event", 361), ("data", 505),
    ("seconds", 5), ("microseconds", 374), ("class", 211), ("desc", 377), ("micro", 225),
    ("minor", 225), ("major", 481), ("version", 184), ("capabilities", 216), ("exec-oob", 162),
    ("execute", 299), ("arguments", 447),
])
def test_bucket_of_known_keys(key: str, bucket: int) -> None:
    assert qdict_bucket(key) == bucket


def test_same_bucket_most_recent_first() -> None:
    assert qdict_order(["minor", "micro"]) == ("micro", "minor")
    assert qdict_order(["micro", "minor"]) == ("minor", "micro")


def test_object_id_order_matches_oracle() -> None:
    # {"b":1,"a":2,"c":[],"d":{},"id":null,"return":true,"error":false,"micro":1,"minor":2,"major":3}
    ident = {"b": 1, "a": 2, "c": [], "d": {}, "id": None, "return": True, "error": False,
             "micro": 1, "minor": 2, "major": 3}
    assert encode({"return": [], "id": ident}) == (
        b'{"return": [], "id": {"d": {}, "minor": 2, "micro": 1, "a": 2, "b": 1, "return": true, '
        b'"c": [], "major": 3, "id": null, "error": false}}\r\n')


def test_key_with_nul_hashes_as_modified_utf8() -> None:
    # QEMU stores U+0000 as C0 80: two bytes in the hash (from source)
    assert qdict_bucket("a\x00") != qdict_bucket("a")
    assert encode({"a\x00": 1}) == b'{"a\\u0000": 1}\r\n'


# ---------------------------------------------------------------------------------------
# strings and numbers
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("\xe9\U0001F600\x7f\x00/\b\f\n\r\t\"\\ /", b'"\\u00E9\\uD83D\\uDE00\\u007F\\u0000/\\b\\f\\n\\r\\t\\"\\\\ /"'),
    ("\x01\x1f\x80\u20ac\uffff\ufffe\ufdd0\ufdef\ufdcf\U0010FFFF\U0001FFFE",
     b'"\\u0001\\u001F\\u0080\\u20AC\\uFFFD\\uFFFD\\uFFFD\\uFFFD\\uFDCF\\uFFFD\\uFFFD"'),
    ("\udc00x\ud800", b'"\\uFFFDx\\uFFFD"'),                  # lone surrogates
    ("\\u00e9", b'"\\\\u00e9"'),                              # a backslash, not an escape
    ("\\\u00e9", b'"\\\\\\u00E9"'),
])
def test_string_escapes(text: str, expected: bytes) -> None:
    # Noncharacters and surrogates become U+FFFD because QEMU's writer decodes its
    # modified UTF-8 and replaces whatever it rejects (from source).
    assert encode({"return": text}) == b'{"return": ' + expected + b"}\r\n"
    assert encode({"return": text}, pretty=True) == b'{\r\n    "return": ' + expected + b"\r\n}\r\n"


@pytest.mark.parametrize("value, expected", [
    (1500.0, "1500"), (0.1, "0.10000000000000001"), (-0.0, "-0"), (INF, "inf"), (-INF, "-inf"),
    (1.8446744073709552e19, "1.8446744073709552e+19"), (5e-324, "4.9406564584124654e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"), (float("nan"), "nan"), (-float("nan"), "-nan"),
])
def test_doubles_use_percent_17g(value: float, expected: str) -> None:
    assert format_double(value) == expected
    assert encode({"return": [1, value, True]}) == f'{{"return": [1, {expected}, true]}}\r\n'.encode()


def test_ints_and_bools() -> None:
    assert encode({"return": [True, False, None, 0, -1, 18446744073709551615, -9223372036854775808]}) == (
        b'{"return": [true, false, null, 0, -1, 18446744073709551615, -9223372036854775808]}\r\n')


def test_deep_values_encode() -> None:
    deep: list = []
    inner = deep
    for _ in range(1500):
        inner.append([])
        inner = inner[0]
    assert encode({"id": deep}) == b'{"id": ' + b"[" * 1501 + b"]" * 1501 + b"}\r\n"
    assert encode({"id": deep}, pretty=True).count(b"\r\n") == 2 * 1501 + 2


def test_tuples_encode_like_lists() -> None:
    assert encode({"return": (1, "a")}) == encode({"return": [1, "a"]})


# ---------------------------------------------------------------------------------------
# fast path == QEMU-style writer; encoding round-trips through the lexer
# ---------------------------------------------------------------------------------------

_text = st.text(max_size=10)
_leaves = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
                    _text)
_values = st.recursive(
    _leaves,
    lambda kids: st.one_of(st.lists(kids, max_size=5), st.dictionaries(_text, kids, max_size=6)),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_text, _values, max_size=6))
def test_fast_encoder_equals_qemu_writer(message: dict) -> None:
    assert encode(message) == _qemu_write(message, False).encode("ascii") + b"\r\n"


def _surrogate_free(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF or 0xFDD0 <= ord(c) <= 0xFDEF or (ord(c) & 0xFFFE) == 0xFFFE
                   for c in text)


_clean_text = _text.filter(_surrogate_free)
_clean_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
              st.floats(allow_nan=False, allow_infinity=False), _clean_text),
    lambda kids: st.one_of(st.lists(kids, max_size=5), st.dictionaries(_clean_text, kids, max_size=6)),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_clean_text, _clean_values, max_size=6), st.booleans())
def test_output_parses_back_in_qdict_order(message: dict, pretty: bool) -> None:
    data = encode(message, pretty)
    assert data.isascii() and data.endswith(b"\r\n") and data.count(b"\r\n") == data.count(b"\n")
    if not pretty:
        assert data.count(b"\n") == 1
    [item] = StreamParser().feed(data)
    assert isinstance(item, ParsedValue)
    # every dict comes back in QDict order; %.17g doubles round-trip exactly, but an
    # integral double ("1500") comes back as an int
    assert _same_in_qdict_order(item.value, message)


def _same_in_qdict_order(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(qdict_order(b)) and all(_same_in_qdict_order(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_in_qdict_order(x, y) for x, y in zip(a, b))
    if isinstance(b, float) and not isinstance(a, bool):
        return float(a) == b
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------
# encode_event: the JOB_STATUS_CHANGE template must give encode()'s exact bytes
# ---------------------------------------------------------------------------------------

def test_job_status_change_template_matches_oracle() -> None:
    from qmpjobd.wire.encode import encode_event
    from qmpjobd.wire.session import event_message

    message = event_message("JOB_STATUS_CHANGE", {"status": "created", "id": "j0"},
                            now=1795849059.471465)
    assert encode_event(message) == (
        b'{"timestamp": {"seconds": 1795849059, "microseconds": 471465}, '
        b'"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "j0"}}\r\n')


@settings(max_examples=300)
@given(status=st.text(max_size=12), job_id=st.one_of(st.none(), st.text(max_size=20)),
       seconds=st.integers(0, 2**40), micros=st.integers(0, 999_999),
       pretty=st.booleans(), name=st.sampled_from(["JOB_STATUS_CHANGE", "BLOCK_JOB_READY"]))
def test_encode_event_equals_encode(status: str, job_id: str | None, seconds: int,
                                    micros: int, pretty: bool, name: str) -> None:
    from qmpjobd.wire.encode import encode_event

    message = {"timestamp": {"seconds": seconds, "microseconds": micros}, "event": name,
               "data": {"status": status, "id": job_id}}
    assert encode_event(message, pretty) == encode(message, pretty)
    extra = {**message, "data": {**message["data"], "x": 1}}
    assert encode_event(extra, pretty) == encode(extra, pretty)


# ---------------------------------------------------------------------------------------
# Issue 8: values from long literals, bounded key caches, no exception on a reply
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pretty", [False, True])
def test_values_of_long_literals_print_as_qemu_prints_them(pretty: bool) -> None:
    values = [float("inf"), float("-inf"), 1.7976931348623157e308, 5e-324, -0.0,
              -(1 << 63), (1 << 64) - 1]
    text = encode({"return": values}, pretty).replace(b"\r\n", b"").replace(b" ", b"")
    assert text == (b'{"return":[inf,-inf,1.7976931348623157e+308,4.9406564584124654e-324,-0,'
                    b'-9223372036854775808,18446744073709551615]}')


@pytest.mark.parametrize("pretty", [False, True])
def test_integers_beyond_64_bits_print_exactly_past_cpythons_digit_limit(pretty: bool) -> None:
    # QEMU has no such integers (its lexer makes them doubles); qmpjobd's own code
    # could still produce one, and printing it must not raise.
    big = 7 * 10 ** 5000 + 3
    assert encode({"return": [big, -big]}, pretty).replace(b"\r\n", b"").replace(b" ", b"") \
        == b'{"return":[7' + b"0" * 4999 + b"3,-7" + b"0" * 4999 + b"3]}"


@pytest.mark.parametrize("pretty", [False, True])
def test_a_reply_that_cannot_be_encoded_becomes_an_internal_error(pretty: bool) -> None:
    reply = encode({"return": {"x": {1, 2}}, "id": ["a", 1]}, pretty)
    assert reply.replace(b"\r\n", b"").replace(b" ", b"") == (
        b'{"id":["a",1],"error":{"class":"GenericError","desc":"internalerrorinqmpjobd:'
        b'TypeErrorwhileencodingthereply"}}')


def test_an_event_that_cannot_be_encoded_still_raises() -> None:
    with pytest.raises(TypeError):
        encode({"event": "X", "data": {1, 2}})


def test_key_caches_stay_bounded_after_huge_objects() -> None:
    from qmpjobd.wire import encode as encode_module
    # Many large objects with distinct keys, as a client may send as ids.
    for round_ in range(5):
        ident = {f"key-{round_}-{i}": i for i in range(50_000)}
        ident["long" * 10_000] = 1
        encode({"return": {}, "id": ident})
        encode({"return": {}, "id": [{f"a{round_}-{i}": 1, f"b{i}": 2} for i in range(20_000)]})
    held = encode_module.cache_footprint()
    assert held["order_cost"] <= encode_module._ORDER_CACHE_BUDGET
    assert held["bucket_entries"] <= encode_module._BUCKET_CACHE_ENTRIES
    assert held["bucket_chars"] <= encode_module._BUCKET_CACHE_ENTRIES * encode_module._BUCKET_CACHE_MAX_KEY
    # and the accounted cost is what the entries really hold
    assert held["order_cost"] == sum(encode_module._order_cost(keys) for keys in encode_module._order_cache)
    assert not any(len(keys) > 1000 for keys in encode_module._order_cache)


def test_small_orders_are_still_cached() -> None:
    from qmpjobd.wire import encode as encode_module
    keys = ("return", "id")
    assert qdict_order(keys) == ("return", "id")
    assert encode_module._order_cache.get(keys) == ("return", "id")
