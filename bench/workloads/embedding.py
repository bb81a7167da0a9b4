"""Workload "embedded": a test's daemon, from nothing to a negotiated connection.

qmpjobd runs embedded (``qmpjobd.testing.Daemon``) in the benchmark's own event
loop, as the pytest fixture runs it; qemu-storage-daemon, which cannot be
embedded, is spawned as a process, as a test suite would spawn it. Both with the
same setup (one unix monitor, two null-co nodes), both measured to the greeting
and to the reply of ``qmp_capabilities`` over a raw socket.

qmpjobd's numbers are medians over many starts in one process once the first
start has paid for the imports and the schema (``embedded_first_ms`` shows that
first start: it is paid once per test session, not per test).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import subprocess
import time

from bench import procs

from bench.client import CRLF, NEGOTIATE, connect_retry
from bench.config import Config

NODES = ["null-co,node-name=src,size=16777216", "null-co,node-name=tgt,size=16777216"]


def embedded(kind: str, cfg: Config) -> dict[str, float]:
    starts = cfg.pick(full=50, quick=5)
    if kind == "qmpjobd":
        return asyncio.run(_embedded_runs(starts))
    return _process_runs(kind, cfg.pick(full=10, quick=2))


async def _embedded_runs(starts: int) -> dict[str, float]:
    first = await _embedded_once()
    runs = [await _embedded_once() for _ in range(starts)]
    return {"to_greeting_ms": statistics.median(r[0] for r in runs) * 1e3,
            "to_negotiated_ms": statistics.median(r[1] for r in runs) * 1e3,
            "embedded_first_ms": first[1] * 1e3}


async def _embedded_once() -> tuple[float, float]:
    """Seconds from Daemon() to the greeting, and to qmp_capabilities' reply."""
    from qmpjobd.testing import Daemon

    begin = time.perf_counter()
    daemon = Daemon(version=procs.QEMU_VERSION, blockdevs=NODES)
    await daemon.start()
    try:
        reader, writer = await asyncio.open_unix_connection(daemon.socket_path)
        await reader.readuntil(CRLF)
        greeted = time.perf_counter() - begin
        writer.write(NEGOTIATE)
        reply = await reader.readuntil(CRLF)
        negotiated = time.perf_counter() - begin
        if b'"return"' not in reply:
            raise RuntimeError(f"qmp_capabilities failed: {reply!r}")
        writer.close()
        await writer.wait_closed()
    finally:
        await daemon.stop()
    return greeted, negotiated


def _process_runs(kind: str, starts: int) -> dict[str, float]:
    runs = [_process_once(kind) for _ in range(starts)]
    return {"to_greeting_ms": statistics.median(r[0] for r in runs) * 1e3,
            "to_negotiated_ms": statistics.median(r[1] for r in runs) * 1e3}


def _process_once(kind: str) -> tuple[float, float]:
    proc = procs.new_process(kind, [arg for node in NODES for arg in ("--blockdev", node)])
    argv = proc.argv()
    begin = time.perf_counter()
    proc.proc = subprocess.Popen(argv, cwd=proc.tmp, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock = connect_retry(proc.sockets[0], time.monotonic() + 60.0)
        sock.settimeout(60.0)
        buffer = _read_line(sock, b"")
        greeted = time.perf_counter() - begin
        sock.sendall(NEGOTIATE)
        reply = _read_line(sock, buffer.partition(CRLF)[2])
        negotiated = time.perf_counter() - begin
        if b'"return"' not in reply:
            raise RuntimeError(f"qmp_capabilities failed: {reply!r}")
        sock.close()
    finally:
        proc.stop()
    return greeted, negotiated


def _read_line(sock: socket.socket, buffer: bytes) -> bytes:
    while CRLF not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("closed before a whole line")
        buffer += chunk
    return buffer
