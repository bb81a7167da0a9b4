"""Mirror, create and drive-* jobs through their command handlers, on real files.

Event sequences are the ones qemu-storage-daemon 7.2 produced for the same commands
(transcripts s03, s05, s07, s08 and scratch runs against the oracle); data checks
compare sha256 digests of source and target.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib

import pytest

import qmpjobd.commands as commands
from qmpjobd.commands import Context
from qmpjobd.daemon import Daemon
from qmpjobd.errors import QMPError

if "drive" not in commands.MODULES:     # the lead adds it to the module list
    commands.MODULES = (*commands.MODULES, "drive")
HANDLERS = commands.load_all()
MiB = 1 << 20


class Harness:
    def __init__(self) -> None:
        self.daemon = Daemon(schema=None)
        self.events: list[tuple[str, dict]] = []
        self.daemon.sinks.append(lambda name, data: self.events.append((name, dict(data))))
        self.ctx = Context(daemon=self.daemon, session=None)

    def __call__(self, name: str, args: dict | None = None):
        """Run a handler, then let the main loop settle (every bottom half runs).
        Where the reply falls among the events is tested in test_main_loop.py."""
        try:
            return HANDLERS[name](self.ctx, args or {})
        finally:
            self.daemon.jobs.run_bottom_halves()

    def error(self, name: str, args: dict) -> str:
        with pytest.raises(QMPError) as info:
            self(name, args)
        return info.value.desc

    def take(self) -> list:
        """Events so far, compact: status strings and event names with key data."""
        out = []
        for name, data in self.events:
            if name == "JOB_STATUS_CHANGE":
                out.append(data["status"])
            elif name == "BLOCK_JOB_ERROR":
                out.append(f"ERROR:{data['operation']}:{data['action']}")
            else:
                out.append(name + (":" + data["error"] if "error" in data else ""))
        self.events.clear()
        return out

    async def until(self, predicate, turns: int = 5000) -> None:
        for _ in range(turns):
            if predicate():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("condition not reached")

    def seen(self, event: str) -> bool:
        return any(name == event or data.get("status") == event for name, data in self.events)

    def block_job(self, job_id: str) -> dict:
        return next(j for j in self("query-block-jobs") if j["device"] == job_id)


def sha(path: pathlib.Path, length: int | None = None) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data if length is None else data[:length]).hexdigest()


def sparse_random_file(path: pathlib.Path, size: int) -> None:
    """Random data with holes, at offsets and lengths that are not cluster-aligned."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, 3 * MiB + 512 * 7, size - 70000):
            f.seek(offset)
            f.write(os.urandom(min(600 * 1024 + 1536, size - offset)))


def mirror_nodes(h: Harness, tmp_path: pathlib.Path, size: int) -> tuple[pathlib.Path, pathlib.Path]:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    sparse_random_file(src, size)
    dst.write_bytes(os.urandom(size))          # garbage the mirror must overwrite
    h("blockdev-add", {"driver": "raw", "node-name": "s", "file": {"driver": "file", "filename": str(src)}})
    h("blockdev-add", {"driver": "raw", "node-name": "t", "file": {"driver": "file", "filename": str(dst)}})
    return src, dst


# --- mirror ------------------------------------------------------------------

@pytest.mark.parametrize("size", [8 * MiB + 512 * 3, 5 * MiB + 65536 * 3 + 1024])
async def test_mirror_full_is_bit_exact(tmp_path: pathlib.Path, size: int) -> None:
    h = Harness()
    src, dst = mirror_nodes(h, tmp_path, size)
    h("blockdev-mirror", {"job-id": "m", "device": "s", "target": "t", "sync": "full",
                          "granularity": 65536, "buf-size": 4 * MiB})
    await h.until(lambda: h.seen("BLOCK_JOB_READY"))
    h("job-complete", {"id": "m"})
    await h.until(lambda: h.seen("null"))
    assert h.take() == ["created", "running", "ready", "BLOCK_JOB_READY", "waiting", "pending",
                        "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert sha(dst) == sha(src)
    assert [n["node-name"] for n in h("query-named-block-nodes")][-4:] is not None
    assert "mirror_top" not in {n["drv"] for n in h("query-named-block-nodes")}


async def test_mirror_unaligned_file_grows_target_like_qemu(tmp_path: pathlib.Path) -> None:
    h = Harness()
    src, dst = tmp_path / "s.raw", tmp_path / "t.raw"
    src.write_bytes(os.urandom(1000))
    dst.write_bytes(bytes(1000))
    h("blockdev-add", {"driver": "file", "node-name": "s", "filename": str(src)})
    h("blockdev-add", {"driver": "file", "node-name": "t", "filename": str(dst)})
    h("blockdev-mirror", {"job-id": "m", "device": "s", "target": "t", "sync": "full"})
    await h.until(lambda: h.seen("BLOCK_JOB_READY"))
    assert h.block_job("m")["len"] == 1024
    h("job-complete", {"id": "m"})
    await h.until(lambda: h.seen("null"))
    # QEMU 7.2 writes whole sectors: the target becomes 1024 bytes, zero-padded.
    assert dst.read_bytes() == src.read_bytes() + bytes(24)


async def test_drive_mirror_creates_raw_target(tmp_path: pathlib.Path) -> None:
    h = Harness()
    src, target = tmp_path / "s.raw", tmp_path / "new.raw"
    sparse_random_file(src, 6 * MiB)
    h("blockdev-add", {"driver": "file", "node-name": "s", "filename": str(src)})
    h("drive-mirror", {"job-id": "m", "device": "s", "target": str(target), "sync": "full",
                       "format": "raw", "node-name": "tn"})
    assert h.error("blockdev-del", {"node-name": "tn"}) == "Node tn is in use"
    await h.until(lambda: h.seen("BLOCK_JOB_READY"))
    h("job-complete", {"id": "m"})
    await h.until(lambda: h.seen("null"))
    assert sha(target) == sha(src)
    assert "tn" not in {n["node-name"] for n in h("query-named-block-nodes")}


async def test_drive_mirror_refuses_null_co_format(tmp_path: pathlib.Path) -> None:
    h = Harness()
    h("blockdev-add", {"driver": "null-co", "node-name": "s", "size": MiB})
    assert h.error("drive-mirror", {"job-id": "m", "device": "s", "target": str(tmp_path / "x"),
                                    "sync": "full"}) == \
        "Format driver 'null-co' does not support image creation"
    assert not (tmp_path / "x").exists()


async def test_mirror_transcript_s03_rate_limited_pause_resume_complete_in_standby() -> None:
    h = Harness()
    for name in ("src", "t1"):
        h("blockdev-add", {"driver": "null-co", "node-name": name, "size": 8 * MiB})
    h("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "t1", "sync": "full",
                          "speed": 4 * MiB})
    assert h.take() == ["created", "running"]
    job = h.block_job("m0")
    assert (job["offset"], job["len"], job["ready"]) == (8 * MiB, 8 * MiB, False)
    assert h.error("job-complete", {"id": "m0"}) == \
        "Job 'm0' in state 'running' cannot accept command verb 'complete'"
    h("job-pause", {"id": "m0"})
    h("job-resume", {"id": "m0"})
    assert h.take() == ["paused", "running", "ready", "BLOCK_JOB_READY"]
    h("job-pause", {"id": "m0"})
    h("job-complete", {"id": "m0"})
    assert h.take() == ["standby"]
    h("job-resume", {"id": "m0"})
    await h.until(lambda: h.seen("null"))
    assert h.take() == ["ready", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]


async def test_mirror_soft_and_force_cancel_when_ready() -> None:
    h = Harness()
    for name in ("src", "t2", "t3"):
        h("blockdev-add", {"driver": "null-co", "node-name": name, "size": 8 * MiB})
    h("blockdev-mirror", {"job-id": "m1", "device": "src", "target": "t2", "sync": "full",
                          "auto-dismiss": False})
    assert h.take() == ["created", "running", "ready", "BLOCK_JOB_READY"]
    h("block-job-cancel", {"device": "m1"})
    await h.until(lambda: h.seen("concluded"))
    assert h.take() == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded"]
    assert "error" not in h.block_job("m1")
    h("job-dismiss", {"id": "m1"})
    h("blockdev-mirror", {"job-id": "m2", "device": "src", "target": "t3", "sync": "full",
                          "auto-dismiss": False})
    h.take()
    h("job-cancel", {"id": "m2"})
    await h.until(lambda: h.seen("concluded"))
    assert h.take() == ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
    assert h.block_job("m2")["error"] == "Operation canceled"


async def test_mirror_pending_shows_paused_from_exit_drain() -> None:
    h = Harness()
    for name in ("src", "t"):
        h("blockdev-add", {"driver": "null-co", "node-name": name, "size": 8 * MiB})
    h("blockdev-mirror", {"job-id": "m6", "device": "src", "target": "t", "sync": "full",
                          "auto-finalize": False})
    h("job-complete", {"id": "m6"})
    await h.until(lambda: h.seen("BLOCK_JOB_PENDING"))
    job = h.block_job("m6")
    assert (job["status"], job["paused"], job["ready"]) == ("pending", True, False)
    h("job-cancel", {"id": "m6"})
    await h.until(lambda: h.seen("null"))


@pytest.mark.parametrize("policy, expected_pause", [("stop", True), ("report", False)])
async def test_mirror_source_error_offsets_match_qemu(policy: str, expected_pause: bool,
                                                     tmp_path: pathlib.Path) -> None:
    # A source with data: over null-co (no read-zeroes) QEMU's mirror discards on the
    # target instead of reading, so an injected read error would never fire.
    image = tmp_path / "data.raw"
    image.write_bytes(b"\x5a" * (8 * MiB))
    h = Harness()
    h("blockdev-add", {"driver": "raw", "node-name": "e", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": str(image)},
        "inject-error": [{"errno": 5, "event": "read_aio", "once": True}]}})
    h("blockdev-add", {"driver": "null-co", "node-name": "t", "size": 8 * MiB})
    h("blockdev-mirror", {"job-id": "m", "device": "e", "target": "t", "sync": "full",
                          "on-source-error": policy, "auto-dismiss": False})
    await h.until(lambda: h.seen("paused") or h.seen("concluded"))
    job = h.block_job("m")
    assert (job["offset"], job["len"]) == (7 * MiB, 8 * MiB)
    if expected_pause:
        assert (job["status"], job["io-status"]) == ("paused", "failed")
        assert h.take() == ["created", "running", "ERROR:read:stop", "paused"]
        h("job-resume", {"id": "m"})
        await h.until(lambda: h.seen("BLOCK_JOB_READY"))
        assert h.take() == ["running", "ready", "BLOCK_JOB_READY"]
        h("job-cancel", {"id": "m"})
    else:
        assert h.take() == ["created", "running", "ERROR:read:report", "aborting",
                            "BLOCK_JOB_COMPLETED:Input/output error", "concluded"]


async def test_mirror_creation_errors(tmp_path: pathlib.Path) -> None:
    h = Harness()
    for name, size in (("src", 8 * MiB), ("t1", 8 * MiB), ("t2", 4 * MiB)):
        h("blockdev-add", {"driver": "null-co", "node-name": name, "size": size})
    h("blockdev-add", {"driver": "null-co", "node-name": "ro", "size": 8 * MiB, "read-only": True})
    base = {"job-id": "m", "device": "src", "target": "t1", "sync": "full"}
    cases = [
        ({"target": "nonode", "granularity": 1000}, "Cannot find device='nonode' nor node-name='nonode'"),
        ({"granularity": 1000, "buf-size": -1}, "Parameter 'granularity' expects a power of 2"),
        ({"granularity": 256}, "Parameter 'granularity' expects a value in range [512B, 64MB]"),
        ({"buf-size": -1, "speed": -1}, "Invalid parameter 'buf-size'"),
        ({"target": "src"}, "Can't mirror node into itself"),
        ({"sync": "incremental"}, "Sync mode 'incremental' not supported"),
        ({"replaces": "nonode"}, "Failed to find node with node-name='nonode'"),
        ({"replaces": "t2"}, "Cannot replace 't2' by a node mirrored from 'src', because it cannot "
                             "be guaranteed that doing so would not lead to an abrupt change of "
                             "visible data"),
        ({"job-id": "1bad"}, "Invalid job ID '1bad'"),
    ]
    for extra, message in cases:
        assert h.error("blockdev-mirror", {**base, **extra}) == message
    assert h.take() == []
    assert h.error("blockdev-mirror", {**base, "speed": -1}) == \
        "Parameter 'speed' expects a non-negative value"
    assert h.take() == ["created", "null"]
    assert h.error("blockdev-mirror", {**base, "target": "ro"}) == "Block node is read-only"
    assert h.take() == ["created", "null"]
    assert all(n["drv"] != "mirror_top" for n in h("query-named-block-nodes"))
    h("blockdev-mirror", {**base, "target": "t2"})
    await h.until(lambda: h.seen("null"))
    assert h.take() == ["created", "running", "aborting",
                        "BLOCK_JOB_COMPLETED:Source and target image have different sizes",
                        "concluded", "null"]


async def test_mirror_blocks_its_nodes() -> None:
    h = Harness()
    for name in ("src", "t1", "t3"):
        h("blockdev-add", {"driver": "null-co", "node-name": name, "size": 8 * MiB})
    h("blockdev-mirror", {"job-id": "m", "device": "src", "target": "t1", "sync": "full",
                          "filter-node-name": "mt"})
    assert h.error("blockdev-mirror", {"job-id": "m2", "device": "src", "target": "t3",
                                       "sync": "full"}) == "Need a root block node"
    assert h.error("blockdev-mirror", {"job-id": "m2", "device": "t3", "target": "t1",
                                       "sync": "full"}) == \
        "Node 't1' is busy: block device is in use by block job: mirror"
    assert h.error("blockdev-del", {"node-name": "t1"}) == "Node t1 is in use"
    assert h.error("blockdev-del", {"node-name": "src"}) == \
        "Node 'src' is busy: block device is in use by block job: mirror"
    nodes = {n["node-name"]: n for n in h("query-named-block-nodes")}
    assert nodes["mt"]["drv"] == "mirror_top" and nodes["mt"]["backing_file_depth"] == 1
    assert nodes["mt"]["image"]["backing-image"]["format"] == "null-co"
    assert nodes["src"]["dirty-bitmaps"] == [{"count": 0, "granularity": 65536, "recording": True,
                                              "busy": False, "persistent": False}]
    flat = {n["node-name"]: n for n in h("query-named-block-nodes", {"flat": True})}
    assert flat["mt"]["backing_file_depth"] == 0 and "backing-image" not in flat["mt"]["image"]
    h("job-cancel", {"id": "m"})
    await h.until(lambda: h.seen("null"))
    h("blockdev-del", {"node-name": "src"})


# --- blockdev-create -----------------------------------------------------------

async def test_blockdev_create_file(tmp_path: pathlib.Path) -> None:
    h = Harness()
    path = tmp_path / "new.raw"
    h("blockdev-create", {"job-id": "c1", "options": {"driver": "file", "filename": str(path),
                                                      "size": 1000}})
    await h.until(lambda: h.seen("concluded"))
    assert h.take() == ["created", "running", "waiting", "pending", "concluded"]
    assert h("query-jobs") == [{"id": "c1", "type": "create", "status": "concluded",
                                "current-progress": 1, "total-progress": 1}]
    assert h("query-block-jobs") == []
    assert h.error("block-job-dismiss", {"id": "c1"}) == "Block job 'c1' not found"
    assert path.stat().st_size == 1000
    h("job-dismiss", {"id": "c1"})
    assert h.take() == ["null"]


@pytest.mark.parametrize("options, error", [
    ({"driver": "file", "filename": "/nonexistent-dir/x.raw", "size": 4096},
     "Could not create '/nonexistent-dir/x.raw': No such file or directory"),
    ({"driver": "file", "filename": "PATH", "size": 4096, "preallocation": "metadata"},
     "Unsupported preallocation mode: metadata"),
    ({"driver": "qcow2", "file": "nonexist", "size": 4096},
     "Cannot find device='nonexist' nor node-name='nonexist'"),
    ({"driver": "vdi", "file": "n", "size": 4096}, "Driver 'vdi' is not supported by qmpjobd"),
])
async def test_blockdev_create_failures(tmp_path: pathlib.Path, options: dict, error: str) -> None:
    h = Harness()
    h("blockdev-add", {"driver": "null-co", "node-name": "n"})
    if options.get("filename") == "PATH":
        options = {**options, "filename": str(tmp_path / "p.raw")}
    h("blockdev-create", {"job-id": "c", "options": options})
    await h.until(lambda: h.seen("concluded"))
    assert h.take() == ["created", "running", "aborting", "concluded"]
    assert h("query-jobs")[0]["error"] == error
    assert h("query-jobs")[0]["current-progress"] == 1


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
async def test_blockdev_create_preallocation(tmp_path: pathlib.Path, prealloc: str) -> None:
    h = Harness()
    path = tmp_path / "p.raw"
    h("blockdev-create", {"job-id": "c", "options": {"driver": "file", "filename": str(path),
                                                     "size": MiB, "preallocation": prealloc}})
    await h.until(lambda: h.seen("concluded"))
    assert "error" not in h("query-jobs")[0]
    assert path.stat().st_size == MiB
    allocated = path.stat().st_blocks * 512
    assert (allocated >= MiB) == (prealloc != "off")


# --- drive-backup --------------------------------------------------------------------

async def test_drive_backup_copies_and_releases_target(tmp_path: pathlib.Path) -> None:
    h = Harness()
    src, target = tmp_path / "s.raw", tmp_path / "b.raw"
    sparse_random_file(src, 5 * MiB + 4096)
    h("blockdev-add", {"driver": "file", "node-name": "s", "filename": str(src)})
    h("drive-backup", {"job-id": "b", "device": "s", "target": str(target), "sync": "full",
                       "format": "raw", "node-name": "bt"})
    assert "bt" in {n["node-name"] for n in h("query-named-block-nodes")}
    await h.until(lambda: h.seen("null"))
    assert "BLOCK_JOB_COMPLETED" in h.take()
    assert sha(target) == sha(src)
    assert "bt" not in {n["node-name"] for n in h("query-named-block-nodes")}
