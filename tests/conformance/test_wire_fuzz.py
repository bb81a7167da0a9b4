"""Generated hostile input (long numbers and keywords, deep nesting, huge strings and ids,
invalid UTF-8, unterminated values, mutated commands) must get byte-identical answers
from qemu-storage-daemon and qmpjobd, and must never cost qmpjobd the connection where
QEMU keeps it. See wire_fuzz.py for the generators and how a case is played."""

from __future__ import annotations

import pytest

from tests.conformance import wire_fuzz
from tests.support.oracles import CONFORMANCE_VERSIONS

# Every personality: 7.2 and 10.0 share one parser; 11.1's (positions, new wording, new
# recovery) is qmpjobd/wire/push.py, with cases of its own in test_wire_fuzz_11.py.
WIRE_FUZZ_VERSIONS = CONFORMANCE_VERSIONS

# Fixed, so that a failure names a case anyone can replay with
# `python -m tests.conformance.wire_fuzz --seed 8 --count 250 --version V`.
SEED = 8
CASES = 250


@pytest.mark.parametrize("version", WIRE_FUZZ_VERSIONS)
def test_hostile_input_matches_qemu(version: str) -> None:
    ours = version
    failures = wire_fuzz.run(SEED, CASES, version=version, qmpjobd_version=ours)
    if failures:
        shown = "\n\n".join(failures[:5])
        pytest.fail(f"{len(failures)} of {CASES} generated inputs differ from "
                    f"qemu-storage-daemon {version} (seed {SEED}):\n{shown}")


NEXT = b'{"execute":"query-version","id":"next"}'
# The reproductions of issue 8, items 1 and 2, around every boundary that matters.
REPRODUCTIONS = [
    wire_fuzz.Case(f"int-{sign}{digits}", b'{"execute":"query-version","id":%s%s}%s'
                   % (sign, b"1" * digits, NEXT))
    for digits in (20, 21, 4300, 4301, 20_000) for sign in (b"", b"-")
] + [
    wire_fuzz.Case(f"float-{name}", b'{"execute":"query-version","id":%s}%s' % (literal, NEXT))
    for name, literal in (("fraction", b"1." + b"7" * 5000), ("exponent", b"1e" + b"9" * 5000),
                          ("tiny", b"0." + b"0" * 5000 + b"1"), ("mantissa", b"3" * 5000 + b"e-4990"))
] + [
    wire_fuzz.Case(f"keyword-{length}", b'{"execute":"query-version","id":%s}%s' % (b"a" * length, NEXT))
    for length in (1005, 1006, 1007, 30_000)
] + [
    wire_fuzz.Case("keyword-split", b"[" + b"b" * 3000 + b"]" + NEXT, chunks=(1, 1000, 1, 1999)),
]


@pytest.mark.parametrize("version", WIRE_FUZZ_VERSIONS)
def test_issue8_long_literals_match_qemu_and_keep_the_connection(version: str) -> None:
    ours = version
    oracle = wire_fuzz.DaemonProcess("qsd", version=version)
    qmpjobd = wire_fuzz.DaemonProcess("qmpjobd", version=ours)
    with oracle, qmpjobd:
        for case in REPRODUCTIONS:
            expected = wire_fuzz.play(oracle, case)
            actual = wire_fuzz.play(qmpjobd, case)
            assert actual == expected, wire_fuzz.describe_difference(case, expected, actual)
            # The command after the long literal is answered: the connection survived.
            assert b'"id": "next"' in actual[-3] and b"EOF" not in actual


def test_generated_cases_are_reproducible_and_hostile() -> None:
    # The same seed gives the same cases, and they include what the test is for:
    # numbers past CPython's 4300-digit limit, keywords past QEMU's 1023-byte message
    # buffer, and nesting past QEMU's limit of 1024.
    first = wire_fuzz.generate_cases(SEED, CASES)
    assert first == wire_fuzz.generate_cases(SEED, CASES)
    labels = {case.label.split(":")[1] for case in first}
    assert {"number", "keyword", "string", "nesting", "big-id", "invalid-utf8",
            "unterminated", "mutation", "stream"} <= labels
    data = [case.data for case in first]
    assert any(_longest_run(d, b"0123456789") > 4300 for d in data)
    assert any(_longest_run(d, b"abcdefghijklmnopqrstuvwxyz") > 1006 for d in data)
    assert any(d.count(b"[") + d.count(b"{") > 1024 for d in data)


def _longest_run(data: bytes, alphabet: bytes) -> int:
    best = run = 0
    allowed = set(alphabet)
    for byte in data:
        run = run + 1 if byte in allowed else 0
        best = max(best, run)
    return best
