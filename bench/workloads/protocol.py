"""Workloads 1-4: start-up, round-trip latency, pipelined and many-client throughput.

All of them use ``query-jobs`` with no jobs: it exists in both daemons, has no side
effects and returns a tiny reply (``[]``), so what is measured is the monitor path
(read, parse, dispatch, encode, write), not a command's own work.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from tests.support.daemons import REPO

from bench.client import CRLF, Conn, Stream, connect_retry, drive, request, socket_of
from bench.config import Config
from bench import procs
from bench.procs import daemon
from bench.stats import percentile

QUERY = request("query-jobs")


def startup(kind: str, cfg: Config) -> dict[str, float]:
    """Process start (just before exec) to greeting received on the socket.

    Two numbers for qmpjobd: ``startup_ms`` with its bytecode cached, as an
    installed package runs (pip compiles .pyc files at install), and
    ``startup_nocache_ms`` as this environment runs it by default
    (PYTHONDONTWRITEBYTECODE=1: every start compiles every module). The cache lives
    under ``Config.cache_dir``, outside the repository. qsd gets the same two runs.
    """
    pycache = cfg.cache_dir / "pycache"
    cached = _env(pycache_prefix=str(pycache))
    _spawn_to_greeting(kind, cached)  # untimed: fills the bytecode cache
    return {"startup_ms": _spawn_to_greeting(kind, cached) * 1e3,
            "startup_nocache_ms": _spawn_to_greeting(kind, _env(None)) * 1e3}


def _env(pycache_prefix: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if pycache_prefix is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache_prefix
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def _spawn_to_greeting(kind: str, env: dict[str, str]) -> float:
    """Seconds from Popen to the whole greeting line."""
    # DaemonProcess.start() polls for the socket file every 10 ms, too coarse
    # here: spawn with its command line and poll connect() every 0.5 ms instead.
    proc = procs.new_process(kind, [], monitors=1)
    argv = proc.argv()
    start = time.perf_counter()
    proc.proc = subprocess.Popen(argv, cwd=proc.tmp, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock = connect_retry(proc.sockets[0], time.monotonic() + 60.0)
        sock.settimeout(60.0)
        greeting = b""
        while not greeting.endswith(CRLF):
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("closed before the greeting")
            greeting += chunk
        elapsed = time.perf_counter() - start
        sock.close()
    finally:
        proc.stop()
    return elapsed


def latency(kind: str, cfg: Config) -> dict[str, float]:
    """Sequential query-jobs on one connection: each waits for its reply."""
    n = cfg.pick(full=5000, quick=500)
    with daemon(kind) as d, Conn(d.sockets[0]) as conn:
        conn.handshake().cmd("query-jobs")  # raises if the command is refused
        sock = socket_of(conn)
        for _ in range(200):  # warm-up: caches, lazily built tables
            _roundtrip(sock)
        samples = [_roundtrip(sock) for _ in range(n)]
    return {"p50_us": percentile(samples, 50) * 1e6, "p99_us": percentile(samples, 99) * 1e6}


def _roundtrip(sock: socket.socket) -> float:
    """One request and its reply (a reply is small enough to end one recv)."""
    start = time.perf_counter()
    sock.sendall(QUERY)
    data = sock.recv(65536)
    while not data.endswith(CRLF):
        data += sock.recv(65536)
    return time.perf_counter() - start


def pipelined(kind: str, cfg: Config) -> dict[str, float]:
    """One connection sends n requests without waiting; time until the last reply."""
    n = cfg.pick(full=20000, quick=3000)
    with daemon(kind) as d, Conn(d.sockets[0]) as conn:
        conn.handshake().cmd("query-jobs")  # raises if the command is refused
        stream = Stream(socket_of(conn), memoryview(QUERY * n), expect=n)
        elapsed = drive([stream])
    return {"cmds_per_s": n / elapsed}


def many_clients(kind: str, cfg: Config) -> dict[str, float]:
    """16 connections on 16 monitors, each pipelining its share; aggregate rate."""
    clients = 16
    per_client = cfg.pick(full=2000, quick=300)
    with daemon(kind, monitors=clients) as d:
        conns = [Conn(path).handshake() for path in d.sockets]
        conns[0].cmd("query-jobs")  # raises if the command is refused
        try:
            streams = [Stream(socket_of(c), memoryview(QUERY * per_client), expect=per_client)
                       for c in conns]
            elapsed = drive(streams)
        finally:
            for c in conns:
                c.close()
    return {"cmds_per_s": clients * per_client / elapsed}
