"""NBD workloads: nbdcopy against an export of each daemon, 1 GiB.

* ``read_raw``: the random raw image (``data.image``) exported read-only
  (file + raw nodes), read with ``nbdcopy URI null:``;
* ``read_qcow2``: the same content as a qcow2 image (made once with
  ``qemu-img convert``, cached beside it), read the same way;
* ``write_raw``: a sparse raw file of the same size exported writable, filled
  with ``nbdcopy SOURCE URI`` (nbdcopy's default connections and requests).

Wall time is nbdcopy's run; CPU time is the daemon's utime+stime over it. Each
read is checked afterwards (untimed) by hashing what a second nbdcopy streams
to stdout; the written file is hashed once the daemon has stopped.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from bench.client import Conn
from bench.config import Config
from bench.procs import cpu_seconds, daemon, pid
from bench.workloads.data import CHUNK, add_raw_file, image, sha256


def qcow2_image(cfg: Config, raw: Path) -> Path:
    """The random image as qcow2 (64 KiB clusters), made on first use."""
    path = raw.with_suffix(".qcow2")
    if not path.exists() or path.stat().st_mtime < raw.stat().st_mtime:
        partial = path.with_suffix(".qcow2.part")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial)],
                       check=True, capture_output=True)
        partial.rename(path)
    else:
        sha256(path)  # warm the page cache
    return path


def _start_server(conn: Conn, sock: Path) -> None:
    conn.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})


def _export(conn: Conn, node: str, writable: bool) -> None:
    conn.cmd("block-export-add", {"type": "nbd", "id": node, "node-name": node,
                                  "writable": writable})


def _nbdcopy(args: list[str], pid_: int) -> tuple[float, float]:
    cpu0 = cpu_seconds(pid_)
    start = time.perf_counter()
    subprocess.run(["nbdcopy", *args], check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start, cpu_seconds(pid_) - cpu0


def _streamed_sha256(uri: str) -> str:
    digest = hashlib.sha256()
    with subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while block := proc.stdout.read(CHUNK):
            digest.update(block)
    if proc.returncode:
        raise RuntimeError(f"nbdcopy {uri} - exited {proc.returncode}")
    return digest.hexdigest()


def _read(kind: str, cfg: Config, name: str, path: Path, fmt: str, digest: str) -> dict[str, float]:
    with daemon(kind) as d, Conn(d.sockets[0], timeout=600.0) as conn:
        conn.handshake()
        conn.cmd("blockdev-add", {"driver": "file", "node-name": "img-file",
                                  "filename": str(path), "read-only": True})
        conn.cmd("blockdev-add", {"driver": fmt, "node-name": "img", "file": "img-file",
                                  "read-only": True})
        sock = d.tmp / "nbd.sock"
        _start_server(conn, sock)
        _export(conn, "img", writable=False)
        uri = f"nbd+unix:///img?socket={sock}"
        wall, cpu = _nbdcopy([uri, "null:"], pid(d))
        exact = _streamed_sha256(uri) == digest
    return {f"{name}_wall_s": wall, f"{name}_cpu_s": cpu, f"{name}_exact": float(exact)}


def _write(kind: str, cfg: Config, source: Path, digest: str) -> dict[str, float]:
    target = cfg.cache_dir / f"nbd-target-{kind}.raw"
    with open(target, "wb") as f:
        f.truncate(source.stat().st_size)
    try:
        with daemon(kind) as d, Conn(d.sockets[0], timeout=600.0) as conn:
            conn.handshake()
            add_raw_file(conn, "tgt", target)
            sock = d.tmp / "nbd.sock"
            _start_server(conn, sock)
            _export(conn, "tgt", writable=True)
            os.sync()
            wall, cpu = _nbdcopy([str(source), f"nbd+unix:///tgt?socket={sock}"], pid(d))
        exact = sha256(target) == digest
    finally:
        target.unlink(missing_ok=True)
    return {"write_raw_wall_s": wall, "write_raw_cpu_s": cpu, "write_raw_exact": float(exact)}


def nbd(kind: str, cfg: Config) -> dict[str, float]:
    raw, digest = image(cfg)
    qcow2 = qcow2_image(cfg, raw)
    result: dict[str, float] = {}
    result.update(_read(kind, cfg, "read_raw", raw, "raw", digest))
    result.update(_read(kind, cfg, "read_qcow2", qcow2, "qcow2", digest))
    result.update(_write(kind, cfg, raw, digest))
    return result
