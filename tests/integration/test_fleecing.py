"""Pull-mode backup (fleecing) read by real NBD clients while the source changes,
on qmpjobd and on qemu-storage-daemon of every personality, in the same test.

Both set-ups libvirt uses:

* legacy: a qcow2 overlay whose backing is the source, ``blockdev-backup
  sync=none`` from the source into it, and an NBD export of the overlay;
* copy-before-write: a ``copy-before-write`` filter over the source with a
  scratch target, the writer pointed at the filter, a ``snapshot-access`` node
  over the filter, and an NBD export of that.

The source (``disk`` of tests/support/nbd_setup.py) is changed by qemu-io through
a writable export while qemu-io, nbdinfo, nbdcopy and qemu-img read the fleecing
export; they must see the content the source had when the backup started, and
every observation must be the same on both daemons.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest

from tests.integration.test_backup_bitmaps import bitmaps, image_check, run, wait_job_end
from tests.support.nbd_setup import nbd_daemon, normalise, uri
from tests.support.oracles import CONFORMANCE_VERSIONS


def both(version: str, session) -> tuple[object, object]:
    results = []
    for kind in ("qsd", "qmpjobd"):
        with nbd_daemon(kind, version) as (daemon, qmp, sock):
            # The disk as it was before anybody wrote: what a fleecing reader must see.
            shutil.copyfile(daemon.tmp / "disk.raw", daemon.tmp / "orig.raw")
            results.append([normalise(json.dumps(item), daemon)
                            for item in session(daemon, qmp, sock)])
    return results[0], results[1]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_back(daemon, sock: str) -> list[object]:
    """What a backup reader gets from export ``fleece`` against the original disk."""
    out: list[object] = []
    out.append(run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xaa 0 64k",
                    "-c", "read -P 0 3M 64k", "-c", "read -P 0xbb 1M 128k",
                    "-c", "read -P 0 2M 64k", "-c", "read -P 0xbb 1088k 64k",
                    uri(sock, "fleece")], daemon))
    out.append(run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                    str(daemon.tmp / "orig.raw"), uri(sock, "fleece")], daemon))
    copy = daemon.tmp / "copy.raw"
    out.append(run(["nbdcopy", uri(sock, "fleece"), str(copy)], daemon))
    out.append(sha(copy) == sha(daemon.tmp / "orig.raw"))
    return out


def guest_writes(daemon, sock: str, export: str) -> str:
    return run(["qemu-io", "-f", "raw", "-c", "write -P 0xdd 0 64k",
                "-c", "write -P 0xde 3M 64k", "-c", "write -P 0xdf 1M 4k",
                "-c", "write -P 0xe0 1088k 64k", uri(sock, export)], daemon)


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_legacy_fleecing_overlay_with_sync_none(version):
    def session(daemon, qmp, sock):
        out: list[object] = []
        overlay = daemon.tmp / "fleece.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(overlay), "4M"],
                       check=True)
        out.append(qmp.cmd("blockdev-add", **{
            "node-name": "tmp", "driver": "qcow2", "backing": "disk",
            "file": {"driver": "file", "filename": str(overlay)}}))
        out.append(qmp.cmd("blockdev-backup", device="disk", target="tmp", sync="none",
                           **{"job-id": "fleecing"}))
        out.append(bitmaps(qmp))
        out.append(qmp.cmd("block-export-add", type="nbd", id="fleece",
                           **{"node-name": "tmp"}, name="fleece"))
        out.append(qmp.cmd("query-block-jobs"))
        out.append(guest_writes(daemon, sock, "disk"))
        out.append(run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xdd 0 64k",
                        "-c", "read -P 0xdf 1M 4k", uri(sock, "disk")], daemon))
        out.append(qmp.cmd("query-block-jobs"))
        out.append(bitmaps(qmp))
        out.extend(read_back(daemon, sock))
        out.append(qmp.cmd("block-export-del", id="fleece"))
        out.append(qmp.cmd("block-job-cancel", device="fleecing"))
        end = wait_job_end(qmp, "fleecing")
        out.append(end)
        out.append(qmp.cmd("blockdev-del", **{"node-name": "tmp"}))
        out.append(image_check(daemon, overlay))
        return out

    theirs, ours = both(version, session)
    assert ours == theirs
    # The reader saw the old content: identical images, identical copy.
    assert ours.count('"[exit 0]\\nImages are identical."') == 1 and "true" in ours


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_copy_before_write_and_snapshot_access(version):
    def session(daemon, qmp, sock):
        out: list[object] = []
        scratch = daemon.tmp / "scratch.raw"
        scratch.write_bytes(b"")
        with open(scratch, "r+b") as f:
            f.truncate(4 * 1024 * 1024)
        # The writer goes through the filter, not to the disk directly.
        out.append(qmp.cmd("block-export-del", id="e0"))
        out.append(qmp.cmd("blockdev-add", **{"node-name": "temp", "driver": "file",
                                              "filename": str(scratch)}))
        out.append(qmp.cmd("blockdev-add", driver="copy-before-write",
                           **{"node-name": "fl-cbw"}, file="disk", target="temp"))
        out.append(qmp.cmd("block-export-add", type="nbd", id="guest",
                           **{"node-name": "fl-cbw"}, name="guest", writable=True))
        out.append(qmp.cmd("blockdev-add", driver="snapshot-access",
                           **{"node-name": "fl-access"}, file="fl-cbw"))
        out.append(qmp.cmd("block-export-add", type="nbd", id="fleece",
                           **{"node-name": "fl-access"}, name="fleece"))
        out.append([bitmaps(qmp, node) for node in ("fl-cbw", "disk", "fl-access")])
        out.append(run(["nbdinfo", "--map", uri(sock, "fleece")], daemon))
        out.append(guest_writes(daemon, sock, "guest"))
        out.append([bitmaps(qmp, node) for node in ("fl-cbw", "disk")])
        out.append(run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xdd 0 64k",
                        "-c", "read -P 0xde 3M 64k", uri(sock, "guest")], daemon))
        out.extend(read_back(daemon, sock))
        out.append(run(["nbdinfo", "--map", uri(sock, "fleece")], daemon))
        for step in (("block-export-del", {"id": "fleece"}),
                     ("blockdev-del", {"node-name": "fl-access"}),
                     ("block-export-del", {"id": "guest"}),
                     ("blockdev-del", {"node-name": "fl-cbw"}),
                     ("blockdev-del", {"node-name": "temp"})):
            out.append(qmp.cmd(step[0], **step[1]))
        out.append(list(qmp.events))
        out.append(bitmaps(qmp))
        return out

    theirs, ours = both(version, session)
    assert ours == theirs
    assert ours.count('"[exit 0]\\nImages are identical."') == 1 and "true" in ours


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_snapshot_stays_while_a_mirror_rewrites_the_source(version):
    """A mirror job whose target is the copy-before-write filter overwrites the
    whole disk; the snapshot export still reads the disk as it was."""
    def session(daemon, qmp, sock):
        out: list[object] = []
        (daemon.tmp / "new.raw").write_bytes(b"\x77" * 4 * 1024 * 1024)
        with open(daemon.tmp / "scratch.raw", "wb") as f:
            f.truncate(4 * 1024 * 1024)
        out.append(qmp.cmd("block-export-del", id="e0"))
        out.append(qmp.cmd("blockdev-add", **{"node-name": "new", "driver": "file",
                                              "filename": str(daemon.tmp / "new.raw")}))
        out.append(qmp.cmd("blockdev-add", **{"node-name": "temp", "driver": "file",
                                              "filename": str(daemon.tmp / "scratch.raw")}))
        out.append(qmp.cmd("blockdev-add", driver="copy-before-write",
                           **{"node-name": "fl-cbw"}, file="disk", target="temp"))
        out.append(qmp.cmd("blockdev-add", driver="snapshot-access",
                           **{"node-name": "fl-access"}, file="fl-cbw"))
        out.append(qmp.cmd("block-export-add", type="nbd", id="fleece",
                           **{"node-name": "fl-access"}, name="fleece"))
        out.append(qmp.cmd("blockdev-mirror", device="new", target="fl-cbw", sync="full",
                           **{"job-id": "m"}))
        while not any(e["event"] == "BLOCK_JOB_READY" for e in qmp.events):
            qmp.events.append(json.loads(qmp.raw.recv_message()))
        out.append(run(["qemu-io", "-U", "-r", "-f", "raw", "-c", "read -P 0x77 0 4M",
                        str(daemon.tmp / "disk.raw")], daemon))
        out.extend(read_back(daemon, sock))
        out.append([bitmaps(qmp, node) for node in ("fl-cbw", "disk")])
        out.append(qmp.cmd("block-job-cancel", device="m"))
        out.append(wait_job_end(qmp, "m"))
        return out

    theirs, ours = both(version, session)
    assert ours == theirs
    assert ours.count('"[exit 0]\\nImages are identical."') == 1


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_zero_writes_to_a_qcow2_source_are_fleeced(version):
    """Zero writes (with and without unmap) to a qcow2 source save the old data
    first, like data writes: the qcow2 driver's own zero path must notify too."""
    def session(daemon, qmp, sock):
        out: list[object] = []
        source, overlay = daemon.tmp / "src.qcow2", daemon.tmp / "fleece.qcow2"
        for path in (source, overlay):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M"],
                           check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(source)],
                       check=True, capture_output=True)
        out.append(qmp.cmd("blockdev-add", **{
            "node-name": "src", "driver": "qcow2", "discard": "unmap",
            "file": {"driver": "file", "filename": str(source)}}))
        out.append(qmp.cmd("blockdev-add", **{
            "node-name": "tmp", "driver": "qcow2", "backing": "src",
            "file": {"driver": "file", "filename": str(overlay)}}))
        # The writer's export comes first: QEMU refuses a new writer on a node
        # whose backup filter does not share write.
        out.append(qmp.cmd("block-export-add", type="nbd", id="w", writable=True,
                           **{"node-name": "src"}, name="src"))
        out.append(qmp.cmd("blockdev-backup", device="src", target="tmp", sync="none",
                           **{"job-id": "fleecing"}))
        out.append(qmp.cmd("block-export-add", type="nbd", id="fleece",
                           **{"node-name": "tmp"}, name="fleece"))
        out.append(run(["qemu-io", "-f", "raw", "-c", "write -z 0 64k",
                        "-c", "write -z -u 256k 128k", uri(sock, "src")], daemon))
        out.append(run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 0 1M",
                        uri(sock, "fleece")], daemon))
        out.append(run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 64k",
                        "-c", "read -P 0 256k 128k", uri(sock, "src")], daemon))
        for step in (("block-export-del", {"id": "fleece"}), ("block-export-del", {"id": "w"}),
                     ("block-job-cancel", {"device": "fleecing"})):
            out.append(qmp.cmd(step[0], **step[1]))
        out.append(wait_job_end(qmp, "fleecing"))
        return out

    theirs, ours = both(version, session)
    assert ours == theirs
    assert "Pattern verification failed" not in " ".join(ours)


# A target write that hangs for an hour: blkdebug's delay-ns (10.0+) on the scratch.
HANGING_TARGET = {"driver": "raw", "node-name": "temp", "file": {
    "driver": "blkdebug", "node-name": "temp-dbg",
    "inject-error": [{"event": "write_aio", "delay-ns": 3600 * 10**9, "errno": 0}],
    "image": {"driver": "file", "filename": "scratch.raw"}}}


@pytest.mark.parametrize("policy", ["break-snapshot", "break-guest-write"])
@pytest.mark.parametrize("version", [v for v in CONFORMANCE_VERSIONS if v != "7.2"])
def test_cbw_timeout_gives_up_on_a_hanging_copy_at_the_deadline(version, policy):
    """With ``cbw-timeout`` a guest write waits for its copy-before-write only until
    the deadline, though the copy itself never finishes: break-snapshot lets the
    write through and spoils the snapshot, break-guest-write fails the write. (Were
    the timeout judged when the copy ends, the guest write would hang for an hour.)"""
    def session(daemon, qmp, sock):
        out: list[object] = []
        with open(daemon.tmp / "scratch.raw", "wb") as f:
            f.truncate(4 * 1024 * 1024)
        out.append(qmp.cmd("block-export-del", id="e0"))
        out.append(qmp.cmd("blockdev-add", **HANGING_TARGET))
        out.append(qmp.cmd("blockdev-add", driver="copy-before-write", file="disk",
                           target="temp", **{"node-name": "fl-cbw", "on-cbw-error": policy,
                                             "cbw-timeout": 1}))
        out.append(qmp.cmd("block-export-add", type="nbd", id="guest",
                           **{"node-name": "fl-cbw"}, name="guest", writable=True))
        out.append(qmp.cmd("blockdev-add", driver="snapshot-access",
                           **{"node-name": "fl-access"}, file="fl-cbw"))
        out.append(qmp.cmd("block-export-add", type="nbd", id="fleece",
                           **{"node-name": "fl-access"}, name="fleece"))
        out.append(run(["qemu-io", "-f", "raw", "-c", "write -P 0xdd 0 64k",
                        uri(sock, "guest")], daemon))
        out.append(run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xdd 0 64k",
                        uri(sock, "guest")], daemon))
        out.append(run(["qemu-io", "-r", "-f", "raw", "-c", "read 1M 64k",
                        uri(sock, "fleece")], daemon))
        # The copy still hangs in the target: don't wait for the daemon to drain it.
        daemon.proc.kill()
        return out

    theirs, ours = both(version, session)
    assert ours == theirs
    write = json.loads(theirs[6])
    assert write.startswith("[exit 0]") == (policy == "break-snapshot"), write
