"""Differential wire fuzzing: hostile QMP input played against qemu-storage-daemon
and qmpjobd, compared byte for byte.

Each case is a byte string sent on a fresh connection, optionally negotiated first,
split into writes of generated sizes. A *sentinel* follows it: a 0xFF byte, which ends
every lexer state with an error and makes QEMU's streamer drop any partial message,
a newline, and a ``query-version`` with a fixed id. Reading stops at the sentinel's
reply (or at EOF), so nothing depends on how long a daemon takes: qemu-storage-daemon
needs about 5 microseconds per input byte, qmpjobd far less.

The cases are generated from a seed (``random.Random``), so a failure names a case
that can be replayed. Run more seeds by hand with
``python -m tests.conformance.wire_fuzz --seed N --count M``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

from tests.conformance.runner import MICRO, PACKAGE, TIMESTAMP
from tests.support.daemons import DaemonProcess, RawClient

SENTINEL_ID = "wire-fuzz-sentinel"
SENTINEL = b'\xff\n{"execute":"query-version","id":"' + SENTINEL_ID.encode() + b'"}'
NEGOTIATE = b'{"execute":"qmp_capabilities"}'
_SENTINEL_REPLY = b'"id": "' + SENTINEL_ID.encode() + b'"'    # compact and pretty alike

# Generated inputs stay small enough for qemu-storage-daemon's lexer speed: the whole
# default run sends well under 2 MB.
LONG = 12_000               # the largest generated token, mostly
HUGE = 120_000              # a few cases go this far (past CPython's 4300-digit limit)

# Commands whose replies do not depend on which daemon answers (no version strings in
# unknown places, no socket paths, no command lists that differ): the seeds of the
# mutation cases and the carriers of generated values.
SAFE_COMMANDS = (
    b'{"execute":"query-version","id":1}',
    b'{"execute":"query-jobs","id":"j"}',
    b'{"execute":"query-block-jobs"}',
    b'{"execute":"query-named-block-nodes","arguments":{"flat":true},"id":[1,{}]}',
    b'{"execute":"job-dismiss","arguments":{"id":"nope"},"id":{"a":1,"b":[2,3.5]}}',
    b'{"execute":"block-job-set-speed","arguments":{"device":"j0","speed":100},"id":-7}',
    b'{"execute":"job-cancel","arguments":{"id":"x"}}',
    b"{'execute':'query-jobs','id':'sq'}",
    b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":null}',
    b'{"exec-oob":"query-jobs","id":"o"}',
    b'{"execute":"nonexistent-command","id":true}',
    b'{"execute":"blockdev-backup","arguments":{"device":"d","target":"t","sync":"bogus"}}',
    b'{"execute":"query-blockstats","arguments":{"query-nodes":true},"id":"\\u00e9\\ud83d\\ude00"}',
)


@dataclass(frozen=True)
class Case:
    """One input: its bytes, how they are written, and on what kind of connection."""
    label: str
    data: bytes
    negotiate: bool = True
    chunks: tuple[int, ...] = ()        # write sizes; empty: one write

    def writes(self) -> Iterator[bytes]:
        pos = 0
        for size in self.chunks:
            if pos >= len(self.data):
                return
            yield self.data[pos:pos + size]
            pos += size
        if pos < len(self.data):
            yield self.data[pos:]


# ---------------------------------------------------------------------------------------
# Generators: each returns the bytes of one hostile value or message
# ---------------------------------------------------------------------------------------

def _length(rng: random.Random) -> int:
    """Token lengths that matter: tiny, the int64/uint64 edges, double range edges,
    QEMU's 1023-byte message buffer, CPython's 4300-digit limit, and long ones."""
    edges = (1, 2, 18, 19, 20, 21, 308, 309, 310, 1004, 1005, 1006, 1007, 1023,
             4299, 4300, 4301, 4302)
    roll = rng.random()
    if roll < 0.7:
        return rng.choice(edges)
    if roll < 0.97:
        return rng.randint(1, LONG)
    return rng.randint(LONG, HUGE)


def _digits(rng: random.Random, count: int, lead: str = "123456789") -> str:
    if count <= 0:
        return ""
    body = "".join(rng.choice("0123456789") for _ in range(min(count - 1, 64)))
    # Long runs repeat a random block: cheap to make, and still not all one digit.
    while len(body) < count - 1:
        body += body[: count - 1 - len(body)]
    return rng.choice(lead) + body


def gen_number(rng: random.Random) -> bytes:
    n = _length(rng)
    sign = rng.choice(("", "", "-"))
    forms: tuple[Callable[[], str], ...] = (
        lambda: sign + _digits(rng, n),
        lambda: sign + _digits(rng, n, "9"),
        lambda: sign + "1." + _digits(rng, n, "0123456789"),
        lambda: sign + "0." + "0" * n + "1",
        lambda: sign + "1e" + rng.choice(("", "+", "-")) + _digits(rng, min(n, 400)),
        lambda: sign + _digits(rng, n) + "e-" + _digits(rng, 3),
        lambda: sign + _digits(rng, 1) + "." + _digits(rng, n, "0123456789") + "E+" + _digits(rng, 2),
        lambda: rng.choice(("9223372036854775807", "9223372036854775808", "-9223372036854775808",
                            "-9223372036854775809", "18446744073709551615", "18446744073709551616",
                            "-0", "0", "-0.0", "1.7976931348623157e308", "1.7976931348623159e308",
                            "4.9e-324", "2.4e-324", "1e400", "-1e400", "00", "01", "-", "1.", "1e",
                            "1e+", ".5", "-.5", "0e5", "0.e1", "1.5e3", "+1", "0x10")),
    )
    return rng.choice(forms)().encode()


def gen_keyword(rng: random.Random) -> bytes:
    n = _length(rng)
    forms: tuple[Callable[[], bytes], ...] = (
        lambda: bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(min(n, 50))) * max(1, n // 50),
        lambda: rng.choice((b"true", b"false", b"null")) + b"e" * (n % 8),
        lambda: rng.choice((b"TRUE", b"Null", b"nul", b"tru", b"nan", b"inf", b"Infinity", b"NaN")),
        lambda: b"a" * n + "é".encode(),
        lambda: b"a" * n + rng.choice((b"\xff", b"\xc3", b"\x00", b"\x1f", b"_", b"1", b"-")),
    )
    return rng.choice(forms)()


_UTF8_SAMPLES = (
    "é".encode(), "€".encode(), "😀".encode(), b"\xc0\x80", b"\xc0\xaf", b"\xe0\x80\xaf",
    b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xef\xbf\xbe", b"\xef\xb7\x90", b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80", b"\xfc\x84\x80\x80\x80\x80", b"\x80", b"\xbf", b"\xc3", b"\xe2\x82",
    b"\xf0\x9f\x98", b"\xfe", b"\xff",
)
_ESCAPES = (
    b"\\n", b"\\t", b"\\\\", b'\\"', b"\\'", b"\\/", b"\\b", b"\\f", b"\\r", b"\\u00e9", b"\\u0000",
    b"\\u007f", b"\\uD83D\\uDE00", b"\\ud800", b"\\udc00", b"\\ud800\\u0041", b"\\ufffe",
    b"\\ufdd0", b"\\u12", b"\\u12g4", b"\\x", b"\\", b"\\\xc3\xa9", b"\\u\xc3\xa9",
)


def gen_string_body(rng: random.Random, n: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size < n:
        roll = rng.random()
        if roll < 0.6:
            piece = bytes(rng.choice(b"abcdefghij KLMNOP0123456789:,{}[]") for _ in range(rng.randint(1, 40)))
        elif roll < 0.8:
            piece = rng.choice(_UTF8_SAMPLES)
        elif roll < 0.97:
            piece = rng.choice(_ESCAPES)
        else:
            piece = bytes([rng.randrange(0x20)])
        parts.append(piece)
        size += len(piece)
    body = b"".join(parts)
    if len(body) < n // 4:
        return body
    # Long bodies: repeat what was built, so generating them stays cheap.
    return (body * (n // max(len(body), 1) + 1))[:n]


def gen_string(rng: random.Random) -> bytes:
    quote = rng.choice((b'"', b'"', b"'"))
    n = _length(rng) if rng.random() < 0.5 else rng.randint(0, 60)
    body = gen_string_body(rng, n)
    if rng.random() < 0.1:
        body = b"a" * n                # plain and long: the fast paths
    return quote + body + quote


def gen_nesting(rng: random.Random) -> bytes:
    depth = rng.choice((1022, 1023, 1024, 1025, 1026, rng.randint(1, 1100), rng.randint(190, 210)))
    opener = rng.choice(("list", "dict", "mixed"))
    opens, closes = [], []
    for level in range(depth):
        if opener == "list" or (opener == "mixed" and level % 2):
            opens.append(b"[")
            closes.append(b"]")
        else:
            opens.append(b'{"k":')
            closes.append(b"}")
    closes.reverse()
    inner = rng.choice((b"1", b"[]", b"{}", b'"x"', b""))
    tail = b"".join(closes)
    cut = rng.random()
    if cut < 0.2:
        tail = tail[: rng.randint(0, len(tail))]           # unbalanced
    elif cut < 0.3:
        tail += rng.choice((b"]", b"}", b"]]", b","))       # extra closers
    value = b"".join(opens) + inner + tail
    if rng.random() < 0.5:
        return b'{"execute":"query-version","id":' + value + b"}"
    return value


def gen_big_id(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.4:
        keys = rng.randint(2, 3000)
        members = {f"k{rng.randrange(10 ** 6)}\u00e9"[: rng.randint(1, 9)] + str(i): i for i in range(keys)}
        ident = json.dumps(members, ensure_ascii=rng.random() < 0.5).encode()
    elif roll < 0.7:
        ident = json.dumps([rng.choice((1, -1.5, "s", None, True, [], {}, 1e300, 2 ** 64))
                            for _ in range(rng.randint(1, 5000))]).encode()
    else:
        ident = b'"' + b"x" * rng.randint(1000, LONG * 4) + b'"'
    return b'{"execute":"query-version","id":' + ident + b"}"


def gen_carrier_of(rng: random.Random, value: Callable[[random.Random], bytes]) -> bytes:
    text = value(rng)
    template = rng.choice((
        b'{"execute":"query-version","id":%s}',
        b'{"execute":"block-job-set-speed","arguments":{"device":"j0","speed":%s},"id":1}',
        b'{"execute":"job-dismiss","arguments":{"id":%s}}',
        b'{"execute":"query-jobs","id":[%s,%s]}',
        b'{%s:1}',
        b'[%s]',
        b'%s ',
    ))
    return template.replace(b"%s", text)


def gen_value(rng: random.Random) -> bytes:
    return rng.choice((gen_number, gen_number, gen_keyword, gen_string, gen_string))(rng)


def gen_carrier(rng: random.Random) -> bytes:
    """A generated value in a place where QEMU looks at it."""
    return gen_carrier_of(rng, gen_value)


def gen_unterminated(rng: random.Random) -> bytes:
    value = rng.choice(SAFE_COMMANDS + (gen_carrier(rng),))
    return value[: rng.randint(1, max(1, len(value) - 1))]


def gen_invalid_utf8(rng: random.Random) -> bytes:
    bad = rng.choice(_UTF8_SAMPLES)
    command = rng.choice(SAFE_COMMANDS)
    pos = rng.randint(0, len(command))
    return command[:pos] + bad + command[pos:]


_INTERESTING_BYTES = b'{}[]:,"\'\\ \t\r\n\x00\x0c\x1f\x7f\x80\xc3\xfe\xffe-+.0123456789aeflnrstu'


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A few random edits of a valid message."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            out.extend(rng.choice(SAFE_COMMANDS))
        pos = rng.randrange(len(out) + 1)
        roll = rng.random()
        if roll < 0.3 and pos < len(out):
            out[pos] = rng.choice(_INTERESTING_BYTES)
        elif roll < 0.55:
            out[pos:pos] = bytes([rng.choice(_INTERESTING_BYTES)])
        elif roll < 0.75:
            del out[pos:pos + rng.randint(1, 8)]
        elif roll < 0.85:
            out[pos:pos] = out[pos:pos + rng.randint(1, 16)] * rng.randint(1, 3)
        elif roll < 0.95:
            out[pos:pos] = gen_value(rng)[:200]
        else:
            out[pos:pos] = rng.choice(SAFE_COMMANDS)
    return bytes(out)


def gen_mutation(rng: random.Random) -> bytes:
    return mutate(rng, rng.choice(SAFE_COMMANDS))


def gen_stream(rng: random.Random) -> bytes:
    """Several messages and stray bytes back to back, as one client's stream."""
    parts = [rng.choice((gen_mutation, gen_carrier, gen_unterminated,
                         lambda r: r.choice(SAFE_COMMANDS)))(rng) for _ in range(rng.randint(2, 6))]
    glue = rng.choice((b"", b" ", b"\n", b"\r\n", b"\t"))
    return glue.join(parts)


GENERATORS: tuple[tuple[str, Callable[[random.Random], bytes], int], ...] = (
    # name, generator, weight
    ("number", lambda r: gen_carrier_of(r, gen_number), 6),
    ("keyword", lambda r: gen_carrier_of(r, gen_keyword), 4),
    ("string", lambda r: gen_carrier_of(r, gen_string), 5),
    ("nesting", gen_nesting, 2),
    ("big-id", gen_big_id, 2),
    ("invalid-utf8", gen_invalid_utf8, 3),
    ("unterminated", gen_unterminated, 3),
    ("mutation", gen_mutation, 8),
    ("stream", gen_stream, 4),
)


def _chunks(rng: random.Random, size: int) -> tuple[int, ...]:
    if rng.random() < 0.7 or size < 2:
        return ()
    sizes = []
    left = size
    while left > 0 and len(sizes) < 12:
        step = rng.choice((1, 1, 2, 3, rng.randint(1, max(1, size // 3))))
        sizes.append(step)
        left -= step
    return tuple(sizes)


def generate_cases(seed: int, count: int) -> list[Case]:
    """``count`` cases, the same ones for the same seed."""
    rng = random.Random(seed)
    names = [name for name, _, weight in GENERATORS for _ in range(weight)]
    by_name = {name: gen for name, gen, _ in GENERATORS}
    cases = []
    for index in range(count):
        name = rng.choice(names)
        data = by_name[name](rng)
        negotiate = rng.random() < 0.9
        cases.append(Case(f"{index}:{name}", data, negotiate, _chunks(rng, len(data))))
    return cases


# ---------------------------------------------------------------------------------------
# Playing a case
# ---------------------------------------------------------------------------------------

def normalise(message: bytes) -> bytes:
    """The same normalisation as the conformance runner: time stamps and what names the
    daemon (``micro``, ``package``)."""
    message = TIMESTAMP.sub(b'"seconds": S, "microseconds": U', message)
    message = MICRO.sub(b'"micro": M', message)
    return PACKAGE.sub(b'"package": P', message)


def play(daemon: DaemonProcess, case: Case, monitor: int = 0) -> list[bytes]:
    """Everything the daemon writes for ``case`` on a fresh connection, normalised,
    up to and including the sentinel's reply; ``EOF`` if it hangs up first."""
    client = RawClient(daemon.sockets[monitor], timeout=120)
    received: list[bytes] = []
    try:
        received.append(normalise(client.recv_message()))
        if case.negotiate:
            client.send(NEGOTIATE)
            received.append(client.recv_message())
        for piece in case.writes():
            client.send(piece)
        client.send(SENTINEL)
        while True:
            try:
                message = client.recv_message()
            except (EOFError, ConnectionResetError):
                received.append(b"EOF")
                return received
            received.append(normalise(message))
            if _SENTINEL_REPLY in message:
                return received
    finally:
        client.close()


def describe_difference(case: Case, expected: list[bytes], actual: list[bytes]) -> str:
    """A readable account of where two transcripts part."""
    def short(message: bytes) -> str:
        text = repr(message)
        return text if len(text) <= 400 else f"{text[:300]}...({len(message)} bytes)...{text[-80:]}"

    lines = [f"case {case.label}: {len(case.data)} bytes, negotiate={case.negotiate}, "
             f"chunks={case.chunks}", f"input: {short(case.data)}"]
    for i in range(max(len(expected), len(actual))):
        left = expected[i] if i < len(expected) else b"<nothing>"
        right = actual[i] if i < len(actual) else b"<nothing>"
        mark = "  " if left == right else "!="
        lines.append(f"{mark} qsd     {short(left)}")
        if left != right:
            lines.append(f"{mark} qmpjobd {short(right)}")
    return "\n".join(lines)


def run(seed: int, count: int, version: str | None = None, qmpjobd_version: str | None = None,
        stop_at_first: bool = False) -> list[str]:
    """Play ``count`` cases on both daemons; the descriptions of the cases that differ."""
    failures = []
    oracle = DaemonProcess("qsd", monitors=2, pretty={1}, version=version)
    ours = DaemonProcess("qmpjobd", monitors=2, pretty={1}, version=qmpjobd_version)
    with oracle, ours:
        for index, case in enumerate(generate_cases(seed, count)):
            monitor = 1 if index % 5 == 4 else 0         # every fifth case in pretty mode
            expected = play(oracle, case, monitor)
            actual = play(ours, case, monitor)
            if expected != actual:
                failures.append(describe_difference(case, expected, actual))
                if stop_at_first:
                    break
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--version", default="7.2", help="QEMU version of both daemons")
    parser.add_argument("--first", action="store_true", help="stop at the first difference")
    args = parser.parse_args(argv)
    failures = run(args.seed, args.count, args.version, args.version, args.first)
    for failure in failures:
        print(failure, end="\n\n")
    print(f"{len(failures)} of {args.count} cases differ (seed {args.seed})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
