"""Play a scenario file against a daemon and record its transcript.

A scenario is a text file of steps, one per line (``#`` starts a comment):

    args: ARGS...        daemon command-line arguments (shared by both daemons)
    monitors: N          open N monitors (default 1); ``pretty: I`` makes monitor I pretty
    image: NAME SIZE PAT create file NAME in the daemon's working directory before it
                         starts; PAT is ``zero``, ``random:SEED`` or ``sparse:SEED``
                         (random data with holes); same bytes for both daemons
    prepare: PROG ARGS   before the daemon starts, run qemu-img or qemu-io (PROG) with
                         ARGS (shell words) in its working directory (qcow2 chains)
    img: WHAT NAME       record qemu-img's view of image NAME, host layout left out:
                         ``check`` (error counts), ``map`` (extents without host
                         offsets, adjacent equal ones merged), ``info`` (backing
                         names, format, sizes) or ``content`` (sha256 of the guest
                         view through the backing chain)
    generated-names: on  mask the two random digits of generated node names
                         (``#block123`` becomes ``#block1??``; the counter stays)
    mask: KEY...         replace the numeric value of these keys by ``#`` from now on
    digest: NAME         record the sha256 of file NAME (target contents must match)
    conn: I              later steps use the client on monitor I
    send: TEXT           send TEXT exactly (UTF-8, no newline added)
    sendb: PYBYTES       send a Python bytes literal, e.g. b'{"execute":\\xff}'
    cmd: JSON            send it, then read until a reply (events before it are recorded)
    expect: N            read N messages
    wait: EVENT [k=v]... read until that event (data members k equal to v) has arrived
    settle: MS           read whatever arrives until MS milliseconds pass in silence
    sleep: MS            pause without reading

The transcript lists what was sent and every message received, in order. Before
comparing, the volatile parts are normalised: event timestamps, the version
numbers and ``package`` that identify the daemon, and the ``mask`` keys (progress of
running jobs, ``busy``): the documented short list in tests/conformance/README.md.

``Player(scenario, kind, version=V)`` plays against qemu-storage-daemon of QEMU V,
or qmpjobd started with ``--qemu-version V``. Both sides of a comparison are the
same V, so ``major`` and ``minor`` stay in the transcript (they must match) and
only ``micro`` and ``package`` are normalised. ``mask_series=True`` masks
``major`` and ``minor`` too, for comparing one version's transcript with another's.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.daemons import DaemonProcess, RawClient

TIMESTAMP = re.compile(rb'"seconds": \d+, "microseconds": \d+|"seconds": \d+,(\r\n *)"microseconds": \d+')
MICRO = re.compile(rb'"micro": \d+')
SERIES = re.compile(rb'"(major|minor)": \d+')
PACKAGE = re.compile(rb'"package": "[^"]*"')
GENERATED_NAME = re.compile(rb"#block(\d+)\d\d")
EVENT_START = re.compile(rb'^\{\s*"timestamp"')


@dataclass
class Scenario:
    name: str
    args: list[str] = field(default_factory=list)
    monitors: int = 1
    pretty: set[int] = field(default_factory=set)
    images: list[tuple[str, int, str]] = field(default_factory=list)
    prepare: list[list[str]] = field(default_factory=list)
    steps: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "Scenario":
        scenario = cls(path.stem)
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # Trailing white space is data (``send: 42 `` needs its delimiter).
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            verb, sep, rest = line.partition(":")
            if not sep:
                raise ValueError(f"{path}:{number}: expected 'verb: argument'")
            verb, rest = verb.strip(), rest[1:] if rest.startswith(" ") else rest
            if verb == "args":
                scenario.args += shlex.split(rest)
            elif verb == "monitors":
                scenario.monitors = int(rest)
            elif verb == "pretty":
                scenario.pretty.add(int(rest))
            elif verb == "image":
                name, size, pattern = rest.split()
                scenario.images.append((name, int(size), pattern))
            elif verb == "prepare":
                words = shlex.split(rest)
                if not words or words[0] not in ("qemu-img", "qemu-io"):
                    raise ValueError(f"{path}:{number}: prepare runs qemu-img or qemu-io")
                scenario.prepare.append(words)
            else:
                scenario.steps.append((verb, rest))
        return scenario


class Player:
    """Runs one scenario against one daemon and returns the normalised transcript.

    ``version`` None means qemu-storage-daemon 7.2, or qmpjobd's own default.
    """

    def __init__(self, scenario: Scenario, kind: str, version: str | None = None,
                 mask_series: bool = False) -> None:
        self.scenario = scenario
        self.kind = kind
        self.version = version
        self.mask_series = mask_series
        self.transcript: list[str] = []
        self.masks: list[re.Pattern[bytes]] = []
        self.events: list[dict] = []  # every event received, for ``wait``
        self.wait_cursor = 0
        self.stderr = ""
        self.mask_generated_names = False

    def play(self) -> list[str]:
        s = self.scenario
        daemon = DaemonProcess(self.kind, s.args, monitors=s.monitors, pretty=s.pretty,
                               version=self.version)
        for name, size, pattern in s.images:
            write_image(daemon.tmp / name, size, pattern)
        for words in s.prepare:
            subprocess.run(words, cwd=daemon.tmp, check=True, capture_output=True)
        self.workdir = daemon.tmp
        with daemon:
            # qemu-storage-daemon serves one client per socket: one client per monitor.
            clients = [RawClient(path) for path in daemon.sockets]
            try:
                for index, client in enumerate(clients):
                    self.record(index, client.recv_message())
                current = 0
                for verb, arg in s.steps:
                    if verb == "conn":
                        current = int(arg)
                    else:
                        self.step(verb, arg, clients[current], current)
            finally:
                for client in clients:
                    client.close()
                self.stderr = daemon.stderr()
        return self.transcript

    def step(self, verb: str, arg: str, client: RawClient, index: int) -> None:
        if verb == "send":
            self.sent(index, arg.encode())
            client.send(arg.encode())
        elif verb == "sendb":
            data = ast.literal_eval(arg)
            assert isinstance(data, bytes), arg
            self.sent(index, data)
            client.send(data)
        elif verb == "cmd":
            self.sent(index, arg.encode())
            client.send(arg.encode())
            while True:
                message = client.recv_message()
                self.record(index, message)
                if not EVENT_START.match(message):
                    break
        elif verb == "expect":
            for _ in range(int(arg)):
                self.record(index, client.recv_message())
        elif verb == "wait":
            self.wait(arg, client, index)
        elif verb == "settle":
            messages, closed = client.recv_until_quiet(int(arg) / 1000)
            for message in messages:
                self.record(index, message)
            if closed:
                self.transcript.append(f"[{index}] <- EOF")
        elif verb == "sleep":
            time.sleep(int(arg) / 1000)
        elif verb == "digest":
            digest = hashlib.sha256((self.workdir / arg).read_bytes()).hexdigest()
            self.transcript.append(f"[{index}] sha256({arg}) = {digest}")
        elif verb == "generated-names":
            self.mask_generated_names = arg.strip() == "on"
        elif verb == "img":
            what, name = arg.split()
            self.transcript.append(f"[{index}] qemu-img {what} {name} = "
                                   f"{image_view(self.workdir, what, name)}")
        elif verb == "mask":
            for key in arg.split():
                self.masks.append(re.compile(rb'("' + re.escape(key.encode()) + rb'": )-?\d+'))
        else:
            raise ValueError(f"unknown step '{verb}'")

    def wait(self, arg: str, client: RawClient, index: int) -> None:
        """Wait for an event; one that already arrived (e.g. before a reply) counts."""
        name, *conditions = arg.split()
        want = dict(c.split("=", 1) for c in conditions)

        def matches(event: dict) -> bool:
            data = event.get("data", {})
            return event["event"] == name and all(str(data.get(k)) == v for k, v in want.items())

        deadline = time.monotonic() + 30
        while True:
            for position in range(self.wait_cursor, len(self.events)):
                if matches(self.events[position]):
                    self.wait_cursor = position + 1
                    return
            self.wait_cursor = len(self.events)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.kind} {self.version or ''}: no {arg} within 30 s")
            self.record(index, client.recv_message(timeout=30))

    def sent(self, index: int, data: bytes) -> None:
        self.transcript.append(f"[{index}] -> {data!r}")

    def record(self, index: int, message: bytes) -> None:
        if EVENT_START.match(message):
            self.events.append(json.loads(message))
        message = TIMESTAMP.sub(b'"seconds": S, "microseconds": U', message)
        message = MICRO.sub(b'"micro": M', message)
        if self.mask_series:
            message = SERIES.sub(rb'"\1": V', message)
        message = PACKAGE.sub(b'"package": P', message)
        # Socket paths (query-chardev) lie in each daemon's own temporary directory.
        message = message.replace(str(self.workdir).encode(), b"DIR")
        for mask in self.masks:
            message = mask.sub(rb"\1#", message)
        if self.mask_generated_names:
            message = GENERATED_NAME.sub(rb"#block\1??", message)
        self.transcript.append(f"[{index}] <- {message.decode('latin-1')!r}")


def image_view(workdir: Path, what: str, name: str) -> str:
    """qemu-img's view of an image, without what depends on host offsets (those
    may differ between daemons: QEMU's follow request timing)."""
    def run(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run(["qemu-img", *words], cwd=workdir, capture_output=True,
                              text=True)

    if what == "check":
        done = run("check", "-U", "--output=json", name)
        report = json.loads(done.stdout) if done.stdout.strip() else {}
        keys = ("check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed")
        return json.dumps({"exit": done.returncode,
                           **{k: report[k] for k in keys if k in report}})
    if what == "map":
        done = run("map", "-U", "--output=json", name)
        merged: list[dict] = []
        for extent in json.loads(done.stdout or "[]"):
            extent.pop("offset", None)
            if merged and all(merged[-1].get(k) == extent.get(k) for k in extent
                              if k not in ("start", "length")) \
                    and merged[-1]["start"] + merged[-1]["length"] == extent["start"]:
                merged[-1]["length"] += extent["length"]
            else:
                merged.append(extent)
        return json.dumps(merged) if done.returncode == 0 else done.stderr.strip()
    if what == "info":
        done = run("info", "-U", "--output=json", name)
        if done.returncode:
            return done.stderr.strip().replace(str(workdir), "DIR")
        report = json.loads(done.stdout)
        keys = ("virtual-size", "format", "cluster-size", "backing-filename",
                "full-backing-filename", "backing-filename-format", "dirty-flag")
        view = {k: report[k] for k in keys if k in report}
        return json.dumps(view).replace(str(workdir), "DIR")
    if what == "content":
        out = workdir / f".{name}.content"
        done = run("convert", "-U", "-O", "raw", name, str(out))
        if done.returncode:
            return done.stderr.strip().replace(str(workdir), "DIR")
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        out.unlink()
        return digest
    raise ValueError(f"unknown img view '{what}'")


def write_image(path: Path, size: int, pattern: str) -> None:
    """Deterministic image contents, so both daemons start from the same bytes."""
    kind, _, seed = pattern.partition(":")
    rng = random.Random(int(seed or 0))
    with open(path, "wb") as f:
        f.truncate(size)
        if kind == "zero":
            return
        chunk = 1 << 16
        for offset in range(0, size, chunk):
            # sparse: every third chunk stays a hole
            if kind == "sparse" and (offset // chunk) % 3 == 1:
                continue
            f.seek(offset)
            f.write(rng.randbytes(min(chunk, size - offset)))


def scenario_paths() -> list[Path]:
    return sorted((Path(__file__).parent / "scenarios").glob("*.qmp"))
