"""Backups with dirty bitmaps, written by a real NBD client, on qmpjobd and on
qemu-storage-daemon of every personality, in the same test.

The set-up is tests/support/nbd_setup.py (``disk``: raw on a 4 MiB file, exported
writable as ``disk``). qemu-io writes through that export, so the bitmap gets
dirty the way a guest would make it dirty; the backups then go to qcow2 targets
that ``qemu-img map`` and ``qemu-img compare`` inspect. Each session returns what
a client can observe (QMP replies and events, bitmap lists, tool output), and the
two daemons must agree on all of it.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.nbd_setup import nbd_daemon, normalise, uri
from tests.support.oracles import CONFORMANCE_VERSIONS

QEMU_IMG = "qemu-img"


def run(argv: list[str], daemon) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "ops/sec" not in line]
    return normalise(f"[exit {done.returncode}]\n" + "\n".join(lines), daemon)


def bitmaps(qmp, node: str = "disk") -> object:
    for info in qmp.ok("query-named-block-nodes", flat=True):
        if info["node-name"] == node:
            return info.get("dirty-bitmaps")
    return "no such node"


def qcow2_target(daemon, qmp, name: str, size: int = 4 * 1024 * 1024) -> Path:
    path = daemon.tmp / f"{name}.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    qmp.ok("blockdev-add", **{"node-name": name, "driver": "qcow2",
                              "file": {"driver": "file", "filename": str(path)}})
    return path


def wait_job_end(qmp, job_id: str) -> dict:
    """The BLOCK_JOB_COMPLETED / _CANCELLED event of ``job_id`` (reading events)."""
    while True:
        for event in qmp.events:
            if event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") \
                    and event["data"]["device"] == job_id:
                qmp.events.remove(event)
                event.pop("timestamp", None)
                return event
        qmp.events.append(json.loads(qmp.raw.recv_message()))


def both(version: str, session) -> tuple[object, object]:
    results = []
    for kind in ("qsd", "qmpjobd"):
        with nbd_daemon(kind, version) as (daemon, qmp, sock):
            results.append(session(daemon, qmp, sock))
    return results[0], results[1]


def image_map(daemon, path: Path) -> list[dict] | str:
    """qemu-img map without host offsets, which differ by design (QEMU's depend on
    request timing): neighbouring extents alike but for their host placement merge."""
    done = subprocess.run([QEMU_IMG, "map", "--output=json", "-f", "qcow2", str(path)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode:
        return normalise(done.stderr, daemon)
    merged: list[dict] = []
    for extent in json.loads(done.stdout):
        extent.pop("offset", None)
        last = merged[-1] if merged else None
        if last is not None and all(last[k] == extent[k] for k in extent
                                    if k not in ("start", "length")):
            last["length"] += extent["length"]
        else:
            merged.append(extent)
    return merged


def image_check(daemon, path: Path) -> str:
    """qemu-img check without the fragmentation figure (host placement)."""
    text = run([QEMU_IMG, "check", str(path)], daemon)
    return re.sub(r"[0-9.]+% fragmented", "#% fragmented", text)


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_incremental_backup_holds_exactly_the_written_clusters(version):
    def session(daemon, qmp, sock):
        out: list[object] = []
        qmp.ok("block-dirty-bitmap-add", node="disk", name="b0")
        out.append(run(["qemu-io", "-f", "raw", "-c", "write -P 0xcc 0 4k",
                        "-c", "write -P 0xcd 3M 128k", "-c", "write -P 0xce 2100k 8k",
                        uri(sock)], daemon))
        out.append(bitmaps(qmp))
        out.append(qmp.ok("x-debug-block-dirty-bitmap-sha256", node="disk", name="b0"))
        t1 = qcow2_target(daemon, qmp, "t1")
        out.append(qmp.cmd("blockdev-backup", device="disk", target="t1", sync="incremental",
                           bitmap="b0", **{"job-id": "j1"}))
        out.append(wait_job_end(qmp, "j1"))
        out.append(bitmaps(qmp))
        # A second incremental has nothing to copy; the clusters are in t1 only.
        out.append(qmp.ok("blockdev-del", **{"node-name": "t1"}))
        out.append(image_map(daemon, t1))
        out.append(image_check(daemon, t1))
        # Where t1 has data it equals the disk (its holes read as zeroes).
        out.append(run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0xcc 0 4k",
                        "-c", "read -P 0xaa 4k 60k", "-c", "read -P 0xcd 3M 128k",
                        "-c", "read -P 0xce 2100k 8k", str(t1)], daemon))
        return out

    theirs, ours = both(version, session)
    assert ours == theirs
    # The target holds exactly the written clusters (64 KiB granularity).
    data = [(e["start"], e["length"]) for e in ours[7] if e["data"]]
    assert data == [(0, 65536), (2097152, 65536), (3145728, 131072)]


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_bitmap_argument_errors(version):
    def session(daemon, qmp, sock):
        qmp.ok("block-dirty-bitmap-add", node="disk", name="b0")
        qmp.ok("block-dirty-bitmap-add", node="disk", name="bd", disabled=True)
        qcow2_target(daemon, qmp, "t1")
        calls = [
            {"sync": "incremental"},
            {"sync": "bitmap"},
            {"sync": "incremental", "bitmap": "b0", "bitmap-mode": "always"},
            {"sync": "incremental", "bitmap": "b0", "bitmap-mode": "never"},
            {"sync": "bitmap", "bitmap": "nosuch", "bitmap-mode": "always"},
            {"sync": "bitmap", "bitmap": "b0"},
            {"sync": "full", "bitmap": "b0"},
            {"sync": "none", "bitmap": "b0", "bitmap-mode": "on-success"},
            {"sync": "full", "bitmap": "b0", "bitmap-mode": "never"},
            {"sync": "top", "bitmap": "b0", "bitmap-mode": "never"},
            {"sync": "full", "bitmap-mode": "always"},
            {"sync": "none", "bitmap-mode": "never"},
            {"sync": "bitmap", "bitmap": "nosuch"},
        ]
        out = [qmp.cmd("blockdev-backup", device="disk", target="t1", **{"job-id": "j"}, **c)
               for c in calls]
        # drive-backup shares the checks.
        out.append(qmp.cmd("drive-backup", device="disk", target=str(daemon.tmp / "d.raw"),
                           sync="incremental", format="raw", **{"job-id": "j"}))
        out.append(qmp.cmd("drive-backup", device="disk", target=str(daemon.tmp / "d.raw"),
                           sync="bitmap", bitmap="b0", format="raw", **{"job-id": "j"}))
        # A disabled, empty bitmap: nothing to copy; len 0.
        out.append(qmp.cmd("blockdev-backup", device="disk", target="t1", sync="bitmap",
                           bitmap="bd", **{"bitmap-mode": "on-success", "job-id": "j2"}))
        out.append(wait_job_end(qmp, "j2"))
        out.append(bitmaps(qmp))
        return [normalise(json.dumps(item), daemon) for item in out]

    theirs, ours = both(version, session)
    assert ours == theirs


FAILING_TARGET = {"node-name": "tfail", "driver": "raw",
                  "file": {"driver": "blkdebug",
                           "image": {"driver": "file", "filename": "fail.raw"},
                           "inject-error": [{"event": "write_aio", "errno": 5}]}}


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_bitmap_modes_on_failure_success_and_cancel(version):
    def session(daemon, qmp, sock):
        out: list[object] = []
        (daemon.tmp / "fail.raw").write_bytes(bytes(4 * 1024 * 1024))
        options = json.loads(json.dumps(FAILING_TARGET))
        options["file"]["image"]["filename"] = str(daemon.tmp / "fail.raw")
        qmp.ok("blockdev-add", **options)
        for name in ("b0", "ba", "bn", "bs"):
            qmp.ok("block-dirty-bitmap-add", node="disk", name=name)
        out.append(run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k",
                        "-c", "write -P 0x12 1M 64k", uri(sock)], daemon))
        # Failure: on-success keeps the bits, always keeps what was not copied.
        for job, name, mode in (("j4", "b0", "on-success"), ("j5", "ba", "always"),
                                ("j6", "bn", "never")):
            out.append(qmp.cmd("blockdev-backup", device="disk", target="tfail",
                               sync="bitmap", bitmap=name,
                               **{"bitmap-mode": mode, "job-id": job}))
            out.append(wait_job_end(qmp, job))
            out.append(bitmaps(qmp))
        # A failure after the first cluster was copied: ``always`` drops what was
        # copied, ``on-success`` keeps everything.
        late = json.loads(json.dumps(options))
        late["node-name"] = "tlate"
        late["file"]["inject-error"] = [{"event": "write_aio", "errno": 5, "sector": 2048}]
        qmp.ok("blockdev-add", **late)
        for job, name, mode in (("j4b", "b0", "on-success"), ("j5b", "ba", "always")):
            out.append(qmp.cmd("blockdev-backup", device="disk", target="tlate",
                               sync="bitmap", bitmap=name,
                               **{"bitmap-mode": mode, "job-id": job}))
            out.append(wait_job_end(qmp, job))
            out.append(bitmaps(qmp))
        out.append(qmp.ok("x-debug-block-dirty-bitmap-sha256", node="disk", name="ba"))
        # Success with sync=full and a bitmap: it holds only what came later.
        qcow2_target(daemon, qmp, "t2")
        out.append(qmp.cmd("blockdev-backup", device="disk", target="t2", sync="full",
                           bitmap="bs", **{"bitmap-mode": "on-success", "job-id": "j7"}))
        out.append(wait_job_end(qmp, "j7"))
        out.append(bitmaps(qmp))
        # Cancel of a slow incremental: the bitmap is restored, shown busy meanwhile.
        qcow2_target(daemon, qmp, "t3")
        out.append(qmp.cmd("blockdev-backup", device="disk", target="t3",
                           sync="incremental", bitmap="b0", speed=4096,
                           **{"job-id": "j8"}))
        named = [b for b in bitmaps(qmp) if "name" in b]
        out.append(named)
        out.append(qmp.cmd("block-dirty-bitmap-remove", node="disk", name="b0"))
        out.append(qmp.cmd("blockdev-backup", device="disk", target="t2",
                           sync="incremental", bitmap="b0", **{"job-id": "j9"}))
        out.append(qmp.cmd("job-cancel", id="j8"))
        end = wait_job_end(qmp, "j8")
        out.append((end["event"], end["data"]["len"]))
        out.append(bitmaps(qmp))
        return [normalise(json.dumps(item), daemon) for item in out]

    theirs, ours = both(version, session)
    assert ours == theirs


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_drive_backup_incremental_and_top(version):
    """drive-backup creates its raw target and copies the bitmap's clusters
    (``incremental``) or everything the raw disk holds (``top``)."""
    def session(daemon, qmp, sock):
        out: list[object] = []
        qmp.ok("block-dirty-bitmap-add", node="disk", name="b0")
        out.append(run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 2M 64k", uri(sock)],
                       daemon))
        for job, sync, extra in (("d1", "incremental", {"bitmap": "b0"}), ("d2", "top", {})):
            target = daemon.tmp / f"{job}.raw"
            out.append(qmp.cmd("drive-backup", device="disk", target=str(target), sync=sync,
                               format="raw", **{"job-id": job}, **extra))
            out.append(wait_job_end(qmp, job))
            out.append(run(["qemu-img", "map", "--output=json", "-f", "raw", str(target)],
                           daemon))
            out.append(run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x61 2M 64k",
                            str(target)], daemon))
        out.append(bitmaps(qmp))
        return [normalise(json.dumps(item), daemon) for item in out]

    theirs, ours = both(version, session)
    assert ours == theirs
