"""Workload 7: copy a raw image of random content with backup and with mirror.

Source and target are ``file`` + ``raw`` node stacks added with ``blockdev-add``.
Wall time runs from the job command to the job's ``null`` event (after
``job-complete`` for mirror); CPU time is the daemon's utime+stime over the same
span. Each target is checked bit-exact against the source by sha256.

The source image is made once and cached (see ``Config.cache_dir``); it is read
once before the first run so that both daemons find it in the page cache.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from bench.client import Conn, is_status
from bench.config import Config
from bench.procs import cpu_seconds, daemon, pid
from bench.workloads.qcow2 import prime_free_memory

CHUNK = 8 << 20


def image(cfg: Config) -> tuple[Path, str]:
    """The cached random source image and its sha256 (made on first use)."""
    size = cfg.pick(full=1 << 30, quick=64 << 20)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.cache_dir / f"random-{size >> 20}M.raw"
    digest_file = path.with_suffix(".sha256")
    if not (path.exists() and digest_file.exists() and path.stat().st_size == size):
        digest = hashlib.sha256()
        with open(path, "wb") as f:
            for _ in range(size // CHUNK):
                block = os.urandom(CHUNK)
                digest.update(block)
                f.write(block)
        digest_file.write_text(digest.hexdigest())
    else:
        sha256(path)  # warm the page cache, as the first run would otherwise pay
    return path, digest_file.read_text().strip()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def add_raw_file(conn: Conn, name: str, path: Path) -> None:
    conn.cmd("blockdev-add", {"driver": "file", "node-name": f"{name}-file", "filename": str(path)})
    conn.cmd("blockdev-add", {"driver": "raw", "node-name": name, "file": f"{name}-file"})


def data(kind: str, cfg: Config) -> dict[str, float]:
    source, digest = image(cfg)
    result: dict[str, float] = {}
    for mode in ("backup", "mirror"):
        result.update(_copy_once(kind, cfg, mode, source, digest))
    return result


def _copy_once(kind: str, cfg: Config, mode: str, source: Path, digest: str) -> dict[str, float]:
    target = cfg.cache_dir / f"target-{kind}-{mode}.raw"
    with open(target, "wb") as f:
        f.truncate(source.stat().st_size)  # sparse, same size: required by backup
    try:
        with daemon(kind) as d, Conn(d.sockets[0], timeout=600.0) as conn:
            conn.handshake()
            add_raw_file(conn, "src", source)
            add_raw_file(conn, "tgt", target)
            # Start from no dirty pages, so writeback of an earlier run's output
            # is not charged to this one.
            os.sync()
            prime_free_memory(source.stat().st_size * 3 // 2)
            wall, cpu = _run_job(conn, pid(d), mode)
        exact = sha256(target) == digest
    finally:
        target.unlink(missing_ok=True)
    return {f"{mode}_wall_s": wall, f"{mode}_cpu_s": cpu, f"{mode}_bit_exact": float(exact)}


def _run_job(conn: Conn, pid_: int, mode: str) -> tuple[float, float]:
    """Run one copy job to its end; (wall seconds, daemon CPU seconds)."""
    args = {"job-id": "copy", "device": "src", "target": "tgt", "sync": "full"}
    cpu0 = cpu_seconds(pid_)
    start = time.perf_counter()
    if mode == "backup":
        conn.cmd("blockdev-backup", args)
    else:
        conn.cmd("blockdev-mirror", args)
        conn.wait_event(is_status("copy", "ready"), timeout=600.0)
        conn.cmd("job-complete", {"id": "copy"})
    conn.wait_event(is_status("copy", "null"), timeout=600.0)
    wall = time.perf_counter() - start
    return wall, cpu_seconds(pid_) - cpu0
