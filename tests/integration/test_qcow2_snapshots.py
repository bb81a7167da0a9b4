"""Internal snapshots and x-blockdev-amend over real sockets, against
qemu-storage-daemon of every version in the same test.

The same command sequence runs on both daemons, each in its own directory with a
copy of the same image; the replies must be identical once the times a snapshot
records are masked, and so must the images afterwards (byte for byte, with the
snapshot table's time fields masked), ``qemu-img snapshot -l`` (times masked)
and ``qemu-img check``.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.oracles import SUPPORTED_VERSIONS

# The times a snapshot records, and the host file's allocation (file system business).
_MASKED_MEMBERS = re.compile(
    rb'"(date-sec|date-nsec|vm-clock-sec|vm-clock-nsec|actual-size)": \d+')


def mask_times(raw: bytes) -> bytes:
    return _MASKED_MEMBERS.sub(rb'"\1": #', raw)


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True)


def make_image(directory: Path, name: str, *options: str) -> None:
    run("qemu-img", "create", "-f", "qcow2", *options, name, "4M", cwd=directory)
    result = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -c 2M 64k",
                 "-c", "write -z 3M 64k", "-c", "write -P 0x33 3200k 4k", name, cwd=directory)
    assert result.returncode == 0, result.stderr


def masked_image(path: Path) -> bytes:
    """The image's bytes with every snapshot's date and VM clock zeroed."""
    data = bytearray(path.read_bytes())
    nb, offset = struct.unpack_from(">IQ", data, 60)
    for _ in range(nb):
        offset = -(-offset // 8) * 8
        _, _, id_size, name_size = struct.unpack_from(">QIHH", data, offset)
        extra = struct.unpack_from(">I", data, offset + 36)[0]
        data[offset + 16:offset + 32] = bytes(16)
        offset += 40 + extra + id_size + name_size
    return bytes(data)


def snapshot_list(path: Path) -> str:
    out = run("qemu-img", "snapshot", "-l", path.name, cwd=path.parent).stdout
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s*\S+", "<time>", out)


SEQUENCE = [
    ("blockdev-snapshot-internal-sync", {"device": "nosuch", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "qf", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "raw", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "ro", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": ""}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "s2"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "1"}),
    ("blockdev-snapshot-internal-sync", {"device": "r1", "name": "s1"}),
    ("query-named-block-nodes", {"flat": True}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "id": "9"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "zz"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "s1", "id": "2"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "nosuch", "name": "s1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "raw", "name": "s1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "ro", "name": "s1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "ro", "name": "old"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "qf", "name": "s1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "id": "2"}),
    ("transaction", {"actions": [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "q", "name": "t1"}},
        {"type": "abort", "data": {}}]}),
    ("transaction", {"actions": [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "q", "name": "t2"}}]}),
    ("transaction", {"actions": [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "q", "name": "t3"}}],
        "properties": {"completion-mode": "grouped"}}),
    ("query-named-block-nodes", {"flat": True}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "1"}),
]


def play(kind: str, version: str, directory: Path, sequence: list) -> list[bytes]:
    make_image(directory, "a.qcow2")
    make_image(directory, "r1.qcow2", "-o", "refcount_bits=1")
    make_image(directory, "ro.qcow2")
    run("qemu-img", "snapshot", "-c", "old", "ro.qcow2", cwd=directory)
    run("qemu-img", "create", "-f", "raw", "r.raw", "4M", cwd=directory)
    replies = []
    with DaemonProcess(kind, version=version, workdir=directory) as daemon:
        session = QMPSession(daemon, timeout=60)
        for options in [
                {"driver": "qcow2", "node-name": "q",
                 "file": {"driver": "file", "filename": "a.qcow2", "node-name": "qf"}},
                {"driver": "qcow2", "node-name": "ro", "read-only": True,
                 "file": {"driver": "file", "filename": "ro.qcow2", "node-name": "rof"}},
                {"driver": "qcow2", "node-name": "r1",
                 "file": {"driver": "file", "filename": "r1.qcow2", "node-name": "r1f"}},
                {"driver": "raw", "node-name": "raw",
                 "file": {"driver": "file", "filename": "r.raw", "node-name": "rawf"}}]:
            assert session.command("blockdev-add", options) == {"return": {}}
        for name, arguments in sequence:
            replies.append(mask_times(session.command_raw(name, arguments)))
        for node in ("q", "qf", "ro", "rof", "r1", "r1f", "raw", "rawf"):
            session.command("blockdev-del", {"node-name": node})
        session.close()
    return replies


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_internal_snapshots_like_qsd(tmp_path: Path, version: str) -> None:
    results = {}
    for kind in ("qsd", "qmpjobd"):
        directory = tmp_path / kind
        directory.mkdir()
        replies = play(kind, version, directory, SEQUENCE)
        images = {name: (masked_image(directory / name), snapshot_list(directory / name),
                         run("qemu-img", "check", name, cwd=directory).stdout)
                  for name in ("a.qcow2", "r1.qcow2", "ro.qcow2")}
        results[kind] = (replies, images)
    qsd_replies, qsd_images = results["qsd"]
    ours_replies, ours_images = results["qmpjobd"]
    for step, (ours, theirs) in enumerate(zip(ours_replies, qsd_replies)):
        assert ours == theirs, (step, SEQUENCE[step])
    assert b"snapshots" in qsd_replies[10]
    for name in qsd_images:
        assert ours_images[name][1:] == qsd_images[name][1:], name
        assert ours_images[name][0] == qsd_images[name][0], name
    assert "t2" in qsd_images["a.qcow2"][1] and "t1" not in qsd_images["a.qcow2"][1]


def test_writes_after_snapshot_keep_snapshot_content(tmp_path: Path) -> None:
    """Clusters a snapshot shares are copied on write: after overwriting the
    active image through qmpjobd, the snapshot still reads the old data
    (``qemu-img convert -l``), the image checks clean, and the active layer and
    the allocation map equal qsd's after the same writes."""
    results = {}
    for kind in ("qsd", "qmpjobd"):
        directory = tmp_path / kind
        directory.mkdir()
        make_image(directory, "a.qcow2")
        (directory / "new.raw").write_bytes(b"\x5a" * (4 << 20))
        with DaemonProcess(kind, workdir=directory) as daemon:
            session = QMPSession(daemon, timeout=60)
            session.command("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {
                "driver": "file", "filename": "a.qcow2"}})
            session.command("blockdev-add", {"driver": "raw", "node-name": "src", "file": {
                "driver": "file", "filename": "new.raw"}})
            assert session.command("blockdev-snapshot-internal-sync",
                                   {"device": "q", "name": "before"}) == {"return": {}}
            assert "return" in session.command("blockdev-backup", {
                "job-id": "b", "device": "src", "target": "q", "sync": "full"})
            session.wait_event("BLOCK_JOB_COMPLETED")
            session.command("blockdev-del", {"node-name": "q"})
            session.command("blockdev-del", {"node-name": "src"})
            session.close()
        check = run("qemu-img", "check", "--output=json", "a.qcow2", cwd=directory)
        assert check.returncode == 0, check.stdout + check.stderr
        run("qemu-img", "convert", "-l", "before", "-O", "raw", "a.qcow2", "snap.raw",
            cwd=directory)
        run("qemu-img", "convert", "-O", "raw", "a.qcow2", "active.raw", cwd=directory)
        results[kind] = ((directory / "snap.raw").read_bytes(),
                         (directory / "active.raw").read_bytes(), json.loads(check.stdout))
    assert results["qmpjobd"][0] == results["qsd"][0]
    assert results["qmpjobd"][0][:4096] == b"\x11" * 4096
    assert results["qmpjobd"][1] == results["qsd"][1] == b"\x5a" * (4 << 20)
    for key in ("allocated-clusters", "total-clusters", "check-errors"):
        assert results["qmpjobd"][2][key] == results["qsd"][2][key], key


def test_amend_like_qsd(tmp_path: Path) -> None:
    sequence = [
        ("x-blockdev-amend", {"job-id": "a0", "node-name": "nosuch",
                              "options": {"driver": "qcow2"}}),
        ("x-blockdev-amend", {"job-id": "a1", "node-name": "raw",
                              "options": {"driver": "qcow2"}}),
        ("x-blockdev-amend", {"job-id": "a2", "node-name": "q",
                              "options": {"driver": "luks", "state": "active",
                                          "new-secret": "x"}}),
        ("x-blockdev-amend", {"job-id": "a3", "node-name": "q",
                              "options": {"driver": "qcow2", "encrypt": {
                                  "format": "luks", "state": "active", "new-secret": "x"}}}),
        ("x-blockdev-amend", {"job-id": "a4", "node-name": "ro",
                              "options": {"driver": "qcow2"}}),
        ("x-blockdev-amend", {"job-id": "a4", "node-name": "q",
                              "options": {"driver": "qcow2"}}),
    ]
    results = {}
    for kind in ("qsd", "qmpjobd"):
        directory = tmp_path / kind
        directory.mkdir()
        make_image(directory, "a.qcow2")
        make_image(directory, "ro.qcow2")
        run("qemu-img", "create", "-f", "raw", "r.raw", "1M", cwd=directory)
        with DaemonProcess(kind, workdir=directory) as daemon:
            session = QMPSession(daemon, timeout=60)
            session.command("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {
                "driver": "file", "filename": "a.qcow2"}})
            session.command("blockdev-add", {"driver": "qcow2", "node-name": "ro",
                                             "read-only": True, "file": {
                                                 "driver": "file", "filename": "ro.qcow2"}})
            session.command("blockdev-add", {"driver": "raw", "node-name": "raw", "file": {
                "driver": "file", "filename": "r.raw"}})
            replies = [session.command_raw(name, args) for name, args in sequence]
            for job in ("a3", "a4"):
                session.wait_status(job, "concluded")
            replies.append(session.command_raw("query-jobs"))
            events = [(e["event"], e["data"]) for e in session.events]
            session.close()
        results[kind] = (replies, events)
    assert results["qmpjobd"] == results["qsd"]
    assert b"image is not encrypted" in results["qsd"][0][-1]
