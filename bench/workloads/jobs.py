"""Workloads 5, 6, 8, 9: job churn, event fan-out, many running jobs, memory.

Jobs are backups between ``null-co`` nodes: no real I/O, so what is measured is the
job core, the event path and the monitor, which is what qmpjobd reimplements.
"""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from typing import Any, Iterator

from bench.client import CRLF, Conn, Stream, drive, is_event, is_status, request, socket_of
from bench.config import Config
from bench.procs import cpu_seconds, daemon, mib, pid, status_kib
from bench.stats import percentile

SMALL = 1 << 20          # a null-co node whose backup finishes at once
# A null-co node whose rate-limited backup never finishes within the run. Not
# 1 TiB: copy bitmaps cost per job ~4 MiB in QEMU and ~17 MiB in qmpjobd at that
# size, i.e. 4-17 GB for 1000 jobs on a shared machine.
HUGE = 16 << 30
# 64 KiB/s: QEMU copies a first 1 MiB chunk and then sleeps ~16 s per job, so the
# jobs stay RUNNING and a daemon that is idle in fact uses next to no CPU.
SCALE_SPEED = 64 * 1024


def add_null(conn: Conn, name: str, size: int) -> None:
    conn.cmd("blockdev-add", {"driver": "null-co", "node-name": name, "size": size})


def add_null_pairs(conn: Conn, count: int, size: int, prefix: str = "") -> None:
    """``count`` source/target pairs s0/t0, s1/t1, ... added with pipelined requests."""
    conn.pipeline([
        request("blockdev-add", {"driver": "null-co", "node-name": f"{prefix}{side}{i}", "size": size})
        for i in range(count) for side in ("s", "t")
    ])


def backup_args(job: str, src: str, tgt: str, **extra: object) -> dict:
    return {"job-id": job, "device": src, "target": tgt, "sync": "full", **extra}


@contextmanager
def small_pair_session(kind: str) -> Iterator[tuple[Any, Conn]]:
    """A fresh daemon, one negotiated connection, null-co nodes "s" and "t" of SMALL bytes."""
    with daemon(kind) as d, Conn(d.sockets[0]) as conn:
        conn.handshake()
        add_null(conn, "s", SMALL)
        add_null(conn, "t", SMALL)
        yield d, conn


# -- 5. job churn ---------------------------------------------------------------


def churn(kind: str, cfg: Config) -> dict[str, float]:
    """n manual jobs in a row: start, wait PENDING, finalize, dismiss (wait null)."""
    n = cfg.pick(full=1000, quick=100)
    with small_pair_session(kind) as (d, conn):
        start = time.perf_counter()
        for i in range(n):
            _one_manual_job(conn, f"j{i}")
        elapsed = time.perf_counter() - start
    return {"wall_s": elapsed, "jobs_per_s": n / elapsed}


def _one_manual_job(conn: Conn, job: str) -> None:
    conn.cmd("blockdev-backup", backup_args(job, "s", "t", **{"auto-finalize": False, "auto-dismiss": False}))
    conn.wait_event(is_event("BLOCK_JOB_PENDING", "id", job))
    conn.cmd("job-finalize", {"id": job})
    conn.wait_event(is_status(job, "concluded"))
    conn.cmd("job-dismiss", {"id": job})
    conn.wait_event(is_status(job, "null"))


# -- 6. event fan-out -----------------------------------------------------------


def fanout(kind: str, cfg: Config) -> dict[str, float]:
    """64 clients each get every event of n jobs; time until the last has the last."""
    clients = 64
    jobs = cfg.pick(full=200, quick=50)
    with daemon(kind, monitors=clients) as d:
        conns = [Conn(path).handshake() for path in d.sockets]
        try:
            driver = conns[0]
            add_null_pairs(driver, jobs, SMALL)
            # The driver's replies share its stream with the events: it expects
            # n replies more than the others, all counted as lines.
            starts = b"".join(request("blockdev-backup", backup_args(f"j{i}", f"s{i}", f"t{i}"))
                              for i in range(jobs))
            streams = [Stream(socket_of(c), memoryview(starts if c is driver else b""),
                              expect=jobs, count=_count_null_events) for c in conns]
            elapsed = drive(streams)
        finally:
            for c in conns:
                c.close()
    # Every line a listener got is an event; the fewest any listener got shows
    # that all of them received every event (QEMU sends 9 per auto backup).
    events = min(s.lines for s in streams[1:])
    return {"wall_ms": elapsed * 1e3, "events_per_client": events,
            "deliveries_per_s": events * clients / elapsed}


def _count_null_events(batch: bytes) -> int:
    """JOB_STATUS_CHANGE to null: one per job, the last event a job emits."""
    return sum(1 for line in batch.split(CRLF) if b'"null"' in line and b"JOB_STATUS_CHANGE" in line)


# -- 8. scale: many running jobs -----------------------------------------------


def scale(kind: str, cfg: Config) -> dict[str, float]:
    """n rate-limited jobs RUNNING: idle CPU of the daemon, then query-jobs latency."""
    n = cfg.pick(full=1000, quick=100)
    with daemon(kind) as d, Conn(d.sockets[0]) as conn:
        conn.handshake()
        add_null_pairs(conn, n, HUGE)
        conn.pipeline([request("blockdev-backup", backup_args(f"j{i}", f"s{i}", f"t{i}", speed=SCALE_SPEED))
                       for i in range(n)])
        conn.events.clear()
        running = sum(1 for j in conn.cmd("query-jobs") if j["status"] == "running")
        if running != n:
            raise RuntimeError(f"only {running} of {n} jobs running")
        time.sleep(0.5)  # let start-up work (first chunks) settle
        idle = _cpu_percent(pid(d), cfg.pick(full=3.0, quick=1.0))
        samples = [_timed(conn, "query-jobs") for _ in range(cfg.pick(full=100, quick=20))]
        rss = status_kib(pid(d), "VmRSS")
    return {"query_p50_ms": percentile(samples, 50) * 1e3, "idle_cpu_pct": idle, "rss_mib": mib(rss)}


def _cpu_percent(pid_: int, seconds: float) -> float:
    before = cpu_seconds(pid_)
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid_) - before) / seconds


def _timed(conn: Conn, name: str) -> float:
    start = time.perf_counter()
    conn.cmd(name)
    return time.perf_counter() - start


# -- 9. memory --------------------------------------------------------------------


def memory(kind: str, cfg: Config) -> dict[str, float]:
    return {**memory_concluded(kind, cfg), **memory_slow_reader(kind, cfg)}


def memory_concluded(kind: str, cfg: Config) -> dict[str, float]:
    """Peak RSS with n concluded, undismissed jobs (one node pair, reused)."""
    n = cfg.pick(full=10000, quick=1000)
    with small_pair_session(kind) as (d, conn):
        base = status_kib(pid(d), "VmRSS")
        for i in range(n):
            job = f"j{i}"
            conn.cmd("blockdev-backup", backup_args(job, "s", "t", **{"auto-dismiss": False}))
            conn.wait_event(is_status(job, "concluded"))
        listed = len(conn.cmd("query-jobs"))
        if listed != n:
            raise RuntimeError(f"query-jobs lists {listed} jobs, expected {n}")
        hwm = status_kib(pid(d), "VmHWM")
    return {"concluded_hwm_mib": mib(hwm), "concluded_growth_mib": mib(hwm - base)}


# The brief's 1000 events (~100 KB) fit in the kernel's unix-socket buffer, so the
# daemon never has to hold them; the second step (20 000 events, ~2 MB) makes it.
SLOW_READER_STEPS = (1000, 20000)


def memory_slow_reader(kind: str, cfg: Config) -> dict[str, float]:
    """A client that never reads while events pile up; others must keep service.

    Reports RSS growth of the daemon after each step, whether the slow client was
    cut off, and the query-jobs latency a third client sees afterwards.
    """
    steps = cfg.pick(full=SLOW_READER_STEPS, quick=SLOW_READER_STEPS[:1])
    result: dict[str, float] = {}
    with daemon(kind, monitors=3) as d:
        slow = Conn(d.sockets[0]).handshake()
        driver = Conn(d.sockets[1]).handshake()
        probe = Conn(d.sockets[2]).handshake()
        try:
            add_null(driver, "s", SMALL)
            add_null(driver, "t", SMALL)
            base = status_kib(pid(d), "VmRSS")
            for events in steps:
                _emit_events(driver, events)
                result[f"slow_reader_growth_{events}_mib"] = mib(status_kib(pid(d), "VmRSS") - base)
            samples = [_timed(probe, "query-jobs") for _ in range(50)]
            result["slow_reader_probe_ms"] = percentile(samples, 50) * 1e3
            result["slow_reader_cut_off"] = float(_was_cut_off(slow.sock))
        finally:
            for c in (slow, driver, probe):
                c.close()
    return result


def _emit_events(conn: Conn, total: int) -> None:
    """Run auto backups until the driver connection has seen ``total`` events."""
    i = 0
    while conn.event_count < total:
        job = f"e{conn.event_count}-{i}"
        conn.cmd("blockdev-backup", backup_args(job, "s", "t"))
        conn.wait_event(is_status(job, "null"))
        i += 1


def _was_cut_off(sock: socket.socket) -> bool:
    """True when the server closed the slow client (its stream ends in EOF)."""
    sock.settimeout(0.5)
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True

