"""QEMU 11.1's JSON parser over real sockets: generated malformed input must get the same
bytes from qemu-storage-daemon 11.1 and from qmpjobd --qemu-version 11.1.

wire_fuzz's own hostile-input generators run against 11.1 in test_wire_fuzz.py like
every version; this file adds cases played the same way (tests/conformance/wire_fuzz.py:
a fresh connection per case, then its sentinel, compared after the runner's
normalisation), from the generator below, aimed at what 11.1 changed
(qemu-versions.md 2.2 and 2.3): errors
  inside containers followed by commands that must be skipped or answered, closers with
  no opener, lexical errors inside skipped values, nesting past the limit, and well-formed
  commands before and after them (qmpjobd's fast path takes those, and the position of a
  later error must count their bytes), over several lines and multibyte characters.
"""

from __future__ import annotations

import random
import re

from tests.conformance import wire_fuzz

VERSION = "11.1"
SEED = 11
RECOVERY_CASES = 300

# Requests whose answers do not depend on which daemon gives them.
_COMMANDS = (
    b'{"execute":"query-jobs","id":"%d"}',
    b'{"execute":"query-block-jobs","id":[%d]}',
    b'{"execute":"qmp_capabilities","id":%d}',
    b"{'execute':'query-jobs','id':'\xc3\xa9%d'}",
    b'{"execute":"job-cancel","arguments":{"id":"x%d"}}',
)

# Fragments of broken JSON, each one error of the kinds 11.1 reports or recovers from.
_BROKEN = (
    b'{"a" 1}', b'{"a":1,}', b"{1:2}", b'{"a":1 2}', b"[1 2]", b"[1:2]", b"[1}", b'{"a":1]',
    b"[}", b"{]", b'{"a":}', b"}", b"]", b":", b",", b"TRUE", b"xyz", b"nul", b"01", b"-x",
    b"1.}", b'"\\x"', b'"\\u12"', b'"\\ud800"', b'{"a":1,"a":[1]}', b'{"a":1,"a":{"b":1}}',
    b'"a\x01b"', b"\x00", b"\x0c", b"\xff", b"\xc3\xa9", b"%", b"[{]", b"{[}", b'{"a":[1,{"b":nul}]',
)

_OPENERS = (b"[", b"{", b'{"k":', b"[1,", b'{"execute":"query-jobs","id":[')
_CLOSERS = (b"]", b"}", b"]}", b"}]", b"]]", b"}}")
_SPACE = (b"", b"", b" ", b"\n", b"\r\n", b"\t", b"\n\n  ")


def _piece(rng: random.Random, index: int) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(_COMMANDS) % index
    if roll < 0.55:
        return rng.choice(_BROKEN)
    if roll < 0.7:
        return rng.choice(_OPENERS)
    if roll < 0.85:
        return rng.choice(_CLOSERS)
    if roll < 0.87:
        # a bad string whose "stray '...'" text reaches QEMU's 1023-byte message buffer
        body = rng.choice((b"a", b"\xc3\xa9", b"\xff")) * rng.randint(500, 1100)
        return b'"' + body + rng.choice((b"\x01", b"\n", b"\x00"))
    if roll < 0.9:
        # past the nesting limit of 1024, sometimes closed again
        depth = rng.choice((1024, 1025, 1027))
        opener = rng.choice((b"[", b'{"a":'))
        closer = b"]" if opener == b"[" else b"}"
        body = opener * depth + rng.choice((b"1", b"1,2", b"", b"\xff"))
        return body + closer * rng.choice((0, depth, depth - 3, depth + 2))
    return rng.choice((b"1", b'"s"', b"true", b"null", b"-0.5e3", b"[]", b"{}"))


def recovery_cases(seed: int, count: int) -> list[wire_fuzz.Case]:
    """``count`` generated cases; the same seed gives the same cases."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        parts = []
        for position in range(rng.randint(1, 12)):
            parts.append(_piece(rng, position))
            parts.append(rng.choice(_SPACE))
        data = b"".join(parts)
        chunks = () if rng.random() < 0.7 else tuple(rng.randint(1, 40) for _ in range(8))
        cases.append(wire_fuzz.Case(f"{index}:recovery", data, rng.random() < 0.8, chunks))
    return cases


def _differences(cases: list[wire_fuzz.Case]) -> list[str]:
    oracle = wire_fuzz.DaemonProcess("qsd", monitors=2, pretty={1}, version=VERSION)
    ours = wire_fuzz.DaemonProcess("qmpjobd", monitors=2, pretty={1}, version=VERSION)
    failures = []
    with oracle, ours:
        for index, case in enumerate(cases):
            monitor = 1 if index % 7 == 6 else 0          # some in pretty mode
            expected = wire_fuzz.play(oracle, case, monitor)
            actual = wire_fuzz.play(ours, case, monitor)
            if expected != actual:
                failures.append(wire_fuzz.describe_difference(case, expected, actual))
    return failures


def _report(failures: list[str], count: int) -> str:
    shown = "\n\n".join(failures[:5])
    return f"{len(failures)} of {count} inputs differ from qemu-storage-daemon {VERSION}:\n{shown}"


def test_recovery_and_positions_match_qemu_11_1() -> None:
    cases = recovery_cases(SEED, RECOVERY_CASES)
    failures = _differences(cases)
    assert not failures, _report(failures, len(cases))


_LONG_BAD_STRING = re.compile(rb'"(?:a|\xc3\xa9|\xff){500}')


def test_recovery_cases_reach_what_11_1_changed() -> None:
    # The generator must produce what the test is for: skipped commands (an error while
    # a container is open, then a command), nesting past the limit, multi-line input.
    data = [case.data for case in recovery_cases(SEED, RECOVERY_CASES)]
    assert len(set(data)) > RECOVERY_CASES * 9 // 10
    assert any(d.count(b"[") + d.count(b"{") > 1024 for d in data)
    assert sum(b"\n" in d for d in data) > RECOVERY_CASES // 2
    assert sum(bool(_LONG_BAD_STRING.search(d)) for d in data) > 10
    assert sum(any(b in d for b in (b"[1 2]", b'{"a" 1}', b"[{]")) and b'"execute"' in d
               for d in data) > 20
