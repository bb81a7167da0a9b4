"""qcow2 workloads: backup, mirror, active commit and stream on 1 GiB images.

Each workload starts a fresh daemon, adds the nodes with ``blockdev-add`` (``file``
+ ``qcow2``/``raw``, backing given as a node name as libvirt does), runs one job and
times it from the job command to the job's ``null`` event (after ``job-complete``
for mirror and commit); CPU is the daemon's utime+stime over the same span.
Afterwards the written images are checked with ``qemu-img check`` and their
guest-visible content with ``qemu-img compare`` against the input:

* ``qcow2_backup``: ``blockdev-backup sync=full`` of a raw file onto a qcow2 made by
  ``blockdev-create`` in the same daemon (creation is not timed);
* ``qcow2_mirror``: ``blockdev-mirror sync=full`` qcow2 -> new qcow2, READY,
  ``job-complete``;
* ``qcow2_commit``: active ``block-commit`` of an overlay holding half the size into
  its base, READY, ``job-complete`` (the base must then read as the chain did);
* ``qcow2_stream``: ``block-stream`` of the same two-image chain into the overlay
  (the base file is deleted before the compare, so an overlay that still needs it
  fails the check).

The inputs mix cluster kinds as a used disk does: extents of 64 KiB to 4 MiB, about
half data (random bytes), a fifth zeroes, the rest unallocated. The raw file has its
zero extents written as zero bytes and its unallocated ones as holes; the qcow2 base
has zero-flag clusters there and unallocated clusters. They are built once per size
with qemu-img/qemu-io and cached under ``Config.cache_dir``; each repetition works on
fresh copies (commit and stream change their images).

Sizes: 1 GiB, 64 MiB with ``--quick``, or ``QMPJOBD_BENCH_QCOW2_MIB`` (used by the
smoke test for a tiny run).
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.client import Conn, QMPError, is_event, is_status
from bench.config import Config
from bench.procs import cpu_seconds, daemon, pid

MiB = 1 << 20
CLUSTER = 64 << 10
SIZE_ENV = "QMPJOBD_BENCH_QCOW2_MIB"
JOB_TIMEOUT = 300.0   # a stuck job fails the repetition instead of the whole run
# Where the blockdev-commit/stream handlers of qmpjobd live (issue 11).
STREAM_COMMIT_MODULE = Path(__file__).resolve().parents[2] / "qmpjobd" / "commands" / "stream_commit.py"


def image_size(cfg: Config) -> int:
    override = os.environ.get(SIZE_ENV)
    if override:
        return int(override) * MiB
    return cfg.pick(full=1 << 30, quick=64 * MiB)


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    kind: str          # "data", "zero" or "hole"


def layout(size: int, seed: int, weights: dict[str, float]) -> list[Extent]:
    """Extents of whole clusters covering [0, size), kinds drawn with ``weights``."""
    rng = random.Random(seed)
    kinds, odds = list(weights), list(weights.values())
    extents, offset = [], 0
    while offset < size:
        length = min(rng.randint(1, 64) * CLUSTER, size - offset)
        extents.append(Extent(offset, length, rng.choices(kinds, odds)[0]))
        offset += length
    return extents


BASE_MIX = {"data": 0.5, "zero": 0.2, "hole": 0.3}
# The overlay holds about half the size: new data, a few zeroes, the rest from the base.
OVERLAY_MIX = {"data": 0.45, "zero": 0.05, "hole": 0.5}


@dataclass(frozen=True)
class Inputs:
    raw: Path            # the raw source: data, zero bytes, holes
    qcow2: Path          # the same content as qcow2: data, zero flags, unallocated
    chain: Path          # directory with base.qcow2 <- top.qcow2 (relative backing name)


def inputs(cfg: Config) -> Inputs:
    """The cached input images of this size (built on first use)."""
    size = image_size(cfg)
    root = cfg.cache_dir / f"qcow2-{size // MiB}M"
    made = Inputs(root / "mix.raw", root / "mix.qcow2", root / "chain")
    stamp = root / "complete"
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _build(made, size)
        stamp.write_text("ok\n")
    # Read everything once so the first daemon does not pay the disk.
    for path in (made.raw, made.qcow2, made.chain / "base.qcow2", made.chain / "top.qcow2"):
        _warm(path)
    return made


def _build(made: Inputs, size: int) -> None:
    base = layout(size, seed=11, weights=BASE_MIX)
    with open(made.raw, "wb") as f:
        f.truncate(size)
        for ext in base:
            if ext.kind != "hole":
                data = os.urandom(ext.length) if ext.kind == "data" else bytes(ext.length)
                os.pwrite(f.fileno(), data, ext.offset)
    # convert leaves zero bytes unallocated; the zero extents then get zero flags.
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(made.raw), str(made.qcow2))
    _qemu_io(made.qcow2, [f"write -z {e.offset} {e.length}" for e in base if e.kind == "zero"])
    made.chain.mkdir()
    shutil.copyfile(made.qcow2, made.chain / "base.qcow2")
    top = made.chain / "top.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         str(top), str(size))
    overlay = layout(size, seed=23, weights=OVERLAY_MIX)
    commands = []
    for i, ext in enumerate(overlay):
        if ext.kind == "data":
            commands.append(f"write -P {1 + i % 254} {ext.offset} {ext.length}")
        elif ext.kind == "zero":
            commands.append(f"write -z {ext.offset} {ext.length}")
    _qemu_io(top, commands)


def _qemu_io(path: Path, commands: list[str]) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    _run(*args, str(path))


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{argv[0]} failed: {(done.stderr or done.stdout).strip()[:300]}")
    return done.stdout


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def fresh_copy(source: Path, target: Path) -> None:
    """A copy with the same holes (qemu-img map must not change)."""
    target.unlink(missing_ok=True)
    _run("cp", "--sparse=always", str(source), str(target))


def images_equal(first: Path, first_fmt: str, second: Path, second_fmt: str) -> bool:
    """Same guest-visible content (qemu-img compare) and no errors in the written
    qcow2 (qemu-img check)."""
    if second_fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", "-q", str(second)], capture_output=True)
        if check.returncode:
            return False
    compare = subprocess.run(["qemu-img", "compare", "-q", "-f", first_fmt, "-F", second_fmt,
                              str(first), str(second)], capture_output=True)
    return compare.returncode == 0


# ---------------------------------------------------------------- QMP steps


def add_image(conn: Conn, name: str, path: Path, fmt: str, **extra: object) -> None:
    conn.cmd("blockdev-add", {"driver": "file", "node-name": f"{name}-file", "filename": str(path)})
    conn.cmd("blockdev-add", {"driver": fmt, "node-name": name, "file": f"{name}-file", **extra})


def create_qcow2(conn: Conn, name: str, path: Path, size: int) -> None:
    """An empty qcow2 made by the daemon (blockdev-create), then opened as ``name``."""
    path.unlink(missing_ok=True)
    path.touch()
    conn.cmd("blockdev-add", {"driver": "file", "node-name": f"{name}-file", "filename": str(path)})
    conn.cmd("blockdev-create", {"job-id": f"create-{name}",
                                 "options": {"driver": "qcow2", "file": f"{name}-file", "size": size}})
    conn.wait_event(is_status(f"create-{name}", "concluded"), timeout=120.0)
    conn.cmd("job-dismiss", {"id": f"create-{name}"})
    conn.cmd("blockdev-add", {"driver": "qcow2", "node-name": name, "file": f"{name}-file"})


def timed_job(conn: Conn, daemon_pid: int, command: str, args: dict,
              complete: bool, size: int) -> tuple[float, float]:
    """Run one job over images of ``size`` bytes to ``null``: (wall seconds, daemon
    CPU seconds). Raises when the job ends with an error."""
    job = args["job-id"]
    os.sync()   # writeback of the setup's copies must not be charged to the job
    prime_free_memory(size * 3 // 2)
    cpu0 = cpu_seconds(daemon_pid)
    start = time.perf_counter()
    conn.cmd(command, args)
    if complete:
        conn.wait_event(is_status(job, "ready"), timeout=JOB_TIMEOUT)
        conn.cmd("job-complete", {"id": job})
    done = conn.wait_event(is_event("BLOCK_JOB_COMPLETED", "device", job), timeout=JOB_TIMEOUT)
    conn.wait_event(is_status(job, "null"), timeout=JOB_TIMEOUT)
    wall = time.perf_counter() - start
    cpu = cpu_seconds(daemon_pid) - cpu0
    if "error" in done.get("data", {}):
        raise RuntimeError(f"{command} failed: {done['data']['error']}")
    return wall, cpu


# Set to 0 to leave the memory alone (see prime_free_memory).
PRIME_SWITCH_ENV = "QMPJOBD_BENCH_PRIME"


def prime_free_memory(nbytes: int) -> None:
    """Touch and free memory right before a timed job, so the job's page-cache pages
    are equally cheap for both daemons.

    Why: a VM whose balloon reports free pages to the host (virtio free page
    reporting; Firecracker and others) hands the memory of pages freed about two
    seconds earlier back to the host, and the first write to such a page costs a
    host fault. The previous repetition frees its images' page cache when its work
    directory goes; a daemon whose job starts later after that (qmpjobd's longer
    start-up) wrote into reported pages and took 2-5x the kernel time for the same
    copy. Pages freed just now are handed out first and are still backed, so
    after this both daemons write into backed memory. On bare metal it only costs
    the touch. ``nbytes``: what the job's page cache may take (the images' size
    and a half). ``QMPJOBD_BENCH_PRIME=0`` switches it off."""
    if os.environ.get(PRIME_SWITCH_ENV) == "0" or nbytes <= 0:
        return
    area = mmap.mmap(-1, nbytes)
    try:
        page = mmap.PAGESIZE
        view = memoryview(area)
        for offset in range(0, len(area), page):
            view[offset] = 1
        view.release()
    finally:
        area.close()


def close_nodes(conn: Conn) -> None:
    """blockdev-del every node, parents first, so each daemon writes its cached
    qcow2 metadata before the images are checked (untimed; qmpjobd does not close
    its nodes on SIGTERM, which is how the harness stops a daemon)."""
    while True:
        names = [n["node-name"] for n in conn.cmd("query-named-block-nodes")  # type: ignore[union-attr]
                 if not n["node-name"].startswith("#")]
        deleted = 0
        for name in names:
            try:
                conn.cmd("blockdev-del", {"node-name": name})
                deleted += 1
            except QMPError:  # still in use by a parent: next pass
                pass
        if not deleted:
            return


def _result(prefix: str, wall: float, cpu: float, exact: bool) -> dict[str, float]:
    return {f"{prefix}_wall_s": wall, f"{prefix}_cpu_s": cpu, f"{prefix}_exact": float(exact)}


def _workdir(cfg: Config, kind: str, name: str) -> Path:
    work = cfg.cache_dir / f"work-{kind}-{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


# ---------------------------------------------------------------- workloads


def backup(kind: str, cfg: Config) -> dict[str, float]:
    made = inputs(cfg)
    work = _workdir(cfg, kind, "backup")
    target = work / "target.qcow2"
    try:
        with daemon(kind) as d, Conn(d.sockets[0], timeout=JOB_TIMEOUT) as conn:
            conn.handshake()
            add_image(conn, "src", made.raw, "raw")
            create_qcow2(conn, "tgt", target, made.raw.stat().st_size)
            wall, cpu = timed_job(conn, pid(d), "blockdev-backup",
                                  {"job-id": "copy", "device": "src", "target": "tgt",
                                   "sync": "full"}, complete=False, size=image_size(cfg))
            close_nodes(conn)
        exact = images_equal(made.raw, "raw", target, "qcow2")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _result("backup", wall, cpu, exact)


def mirror(kind: str, cfg: Config) -> dict[str, float]:
    made = inputs(cfg)
    work = _workdir(cfg, kind, "mirror")
    target = work / "target.qcow2"
    try:
        with daemon(kind) as d, Conn(d.sockets[0], timeout=JOB_TIMEOUT) as conn:
            conn.handshake()
            add_image(conn, "src", made.qcow2, "qcow2")
            create_qcow2(conn, "tgt", target, image_size(cfg))
            wall, cpu = timed_job(conn, pid(d), "blockdev-mirror",
                                  {"job-id": "copy", "device": "src", "target": "tgt",
                                   "sync": "full"}, complete=True, size=image_size(cfg))
            close_nodes(conn)
        exact = images_equal(made.qcow2, "qcow2", target, "qcow2")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _result("mirror", wall, cpu, exact)


def _open_chain(conn: Conn, work: Path) -> None:
    add_image(conn, "base", work / "base.qcow2", "qcow2")
    add_image(conn, "top", work / "top.qcow2", "qcow2", backing="base")


def _copy_chain(made: Inputs, work: Path) -> None:
    for name in ("base.qcow2", "top.qcow2"):
        fresh_copy(made.chain / name, work / name)


def commit(kind: str, cfg: Config) -> dict[str, float]:
    require_chain_jobs(kind)
    made = inputs(cfg)
    work = _workdir(cfg, kind, "commit")
    try:
        _copy_chain(made, work)
        with daemon(kind) as d, Conn(d.sockets[0], timeout=JOB_TIMEOUT) as conn:
            conn.handshake()
            _open_chain(conn, work)
            wall, cpu = timed_job(conn, pid(d), "block-commit",
                                  {"job-id": "commit", "device": "top"}, complete=True,
                                  size=image_size(cfg))
            close_nodes(conn)
        # The base alone must now read as the whole chain did.
        exact = images_equal(made.chain / "top.qcow2", "qcow2", work / "base.qcow2", "qcow2")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _result("commit", wall, cpu, exact)


def stream(kind: str, cfg: Config) -> dict[str, float]:
    require_chain_jobs(kind)
    made = inputs(cfg)
    work = _workdir(cfg, kind, "stream")
    try:
        _copy_chain(made, work)
        with daemon(kind) as d, Conn(d.sockets[0], timeout=JOB_TIMEOUT) as conn:
            conn.handshake()
            _open_chain(conn, work)
            wall, cpu = timed_job(conn, pid(d), "block-stream",
                                  {"job-id": "stream", "device": "top"}, complete=False,
                                  size=image_size(cfg))
            close_nodes(conn)
        # The overlay must stand alone: without its old base it reads as the chain did.
        (work / "base.qcow2").unlink()
        exact = images_equal(made.chain / "top.qcow2", "qcow2", work / "top.qcow2", "qcow2")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _result("stream", wall, cpu, exact)


def require_chain_jobs(kind: str) -> None:
    """block-commit and block-stream come with qmpjobd/commands/stream_commit.py
    (issue 11); until it exists the row says why qmpjobd was not run."""
    if kind == "qmpjobd" and not STREAM_COMMIT_MODULE.exists():
        raise RuntimeError("block-commit/block-stream not implemented yet "
                           f"({STREAM_COMMIT_MODULE.name} missing)")
