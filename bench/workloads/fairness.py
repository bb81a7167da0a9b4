"""Workload: one client bursts, another client's round trips meanwhile.

Client A sends 260 [60] ``query-qmp-schema`` in one write (about 17 MB of replies,
more than qmpjobd's default 16 MiB output bound) and reads them as they come.
Client B, on its own monitor, runs sequential ``query-jobs`` round trips for as
long as A's burst lasts. What matters is B's worst round trip: a daemon that runs a
whole burst in one go makes B wait for all of it. A must get every reply.

Both clients live in one non-blocking ``selectors`` loop, so neither the client's
threads nor its GIL add to B's latency.
"""

from __future__ import annotations

import selectors
import socket
import time

from bench.client import CRLF, RECV_SIZE, Conn, request, socket_of
from bench.config import Config
from bench.procs import daemon
from bench.stats import percentile

PROBE = request("query-jobs")
WARM_UP_PROBES = 50


def fairness(kind: str, cfg: Config) -> dict[str, float]:
    bursts = cfg.pick(full=260, quick=60)
    with daemon(kind, monitors=2) as d, Conn(d.sockets[0]) as a, Conn(d.sockets[1]) as b:
        a.handshake().cmd("query-qmp-schema")  # raises if refused; warms lazy tables
        b.handshake()
        for _ in range(WARM_UP_PROBES):
            b.cmd("query-jobs")
        burst = b"".join(request("query-qmp-schema", ident=i) for i in range(bursts))
        run = _BurstRun(socket_of(a), socket_of(b), burst, bursts)
        run.drive()
    samples = run.probe_seconds
    return {
        "other_max_ms": max(samples) * 1e3,
        "other_p50_ms": percentile(samples, 50) * 1e3,
        "burst_wall_ms": run.burst_seconds * 1e3,
        "burst_complete": float(run.replies == bursts),
        "probes": float(len(samples)),
    }


class _BurstRun:
    """The selector loop: A's burst out and its replies in; B's probes one by one."""

    def __init__(self, a: socket.socket, b: socket.socket, burst: bytes, expect: int) -> None:
        self.a, self.b = a, b
        self.outgoing = memoryview(burst)
        self.expect = expect
        self.replies = 0
        self.a_tail = b""
        self.b_buffer = b""
        self.probe_started = 0.0
        self.probe_seconds: list[float] = []
        self.burst_seconds = 0.0

    def drive(self, timeout: float = 300.0) -> None:
        sel = selectors.DefaultSelector()
        for sock in (self.a, self.b):
            sock.setblocking(False)
        sel.register(self.a, selectors.EVENT_READ | selectors.EVENT_WRITE, "a")
        sel.register(self.b, selectors.EVENT_READ, "b")
        deadline = time.monotonic() + timeout
        start = time.perf_counter()
        self._send_probe()
        while self.replies < self.expect:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.replies} of {self.expect} burst replies")
            for key, mask in sel.select(timeout=1.0):
                if key.data == "a":
                    self._on_a(sel, mask)
                else:
                    self._on_b()
        self.burst_seconds = time.perf_counter() - start
        sel.close()
        for sock in (self.a, self.b):
            sock.setblocking(True)

    def _on_a(self, sel: selectors.BaseSelector, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and self.outgoing:
            sent = self.a.send(self.outgoing)
            self.outgoing = self.outgoing[sent:]
            if not self.outgoing:
                sel.modify(self.a, selectors.EVENT_READ, "a")
        if mask & selectors.EVENT_READ:
            chunk = self.a.recv(RECV_SIZE)
            if not chunk:
                raise EOFError(f"burst client cut off after {self.replies} replies")
            # A reply is one long line; its CRLF may straddle two reads.
            data = self.a_tail + chunk
            self.replies += data.count(CRLF)
            self.a_tail = data[-1:]

    def _on_b(self) -> None:
        chunk = self.b.recv(RECV_SIZE)
        if not chunk:
            raise EOFError("probe client cut off")
        self.b_buffer += chunk
        if self.b_buffer.endswith(CRLF):
            self.probe_seconds.append(time.perf_counter() - self.probe_started)
            self.b_buffer = b""
            self._send_probe()

    def _send_probe(self) -> None:
        self.probe_started = time.perf_counter()
        self.b.sendall(PROBE)
