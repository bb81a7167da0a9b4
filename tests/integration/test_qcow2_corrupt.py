"""Damaged qcow2 metadata met during I/O, against qemu-storage-daemon 7.2.

Hostile images (an L2 entry pointing at the L1 table or the refcount table, a
misaligned data cluster or L2 table offset) are written through an NBD export with
qemu-io, or read by a backup job. Both daemons must send the same BLOCK_IMAGE_CORRUPTED
event, fail the requests with the same errors (EIO, then "No medium found" for
every request once the image is marked), leave the corrupt bit in the header exactly
where QEMU does, and refuse a read-write re-open with QEMU's text. The file
never grows and nothing outside the image's own bytes changes.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession

_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def peek(path: Path, offset: int) -> int:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return struct.unpack(">Q", handle.read(8))[0]


def poke(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack(">Q", value))


def hostile_image(path: Path, damage: str) -> None:
    subprocess.run(["qemu-img", "create", "-f", "qcow2", path.name, "1M"], cwd=path.parent,
                   check=True, capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 128k", path.name],
                   cwd=path.parent, check=True, capture_output=True)
    l1_offset = peek(path, 40)
    reftable_offset = peek(path, 48)
    l2_offset = peek(path, l1_offset) & _OFFSET_MASK
    first = peek(path, l2_offset)
    if damage == "data-on-l1":
        poke(path, l2_offset, l1_offset | (1 << 63))
    elif damage == "data-on-reftable":
        poke(path, l2_offset + 8, reftable_offset | (1 << 63))
    elif damage == "free-header":
        # The refcount block says the header's cluster is free: the next
        # allocation picks it.
        block = peek(path, reftable_offset) & _OFFSET_MASK
        poke(path, block, peek(path, block) & 0x0000FFFFFFFFFFFF)
    elif damage == "misaligned-data":
        poke(path, l2_offset, first | 0x200)
    elif damage == "misaligned-l2":
        poke(path, l1_offset, peek(path, l1_offset) | 0x200)
    else:
        raise ValueError(damage)


def qemu_io(sock: str, *commands: str) -> str:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run(argv + [f"nbd+unix:///img?socket={sock}"], capture_output=True,
                          text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "ops/sec" not in line]
    return "\n".join(lines)


def read_job(session: QMPSession, job_id: str) -> dict:
    """Read the whole node with a backup job into a null-co node; how it ended."""
    reply = session.command("blockdev-backup", {"job-id": job_id, "device": "h",
                                                "target": "null", "sync": "full"})
    if "error" in reply:
        return reply
    event = session.wait_event("BLOCK_JOB_COMPLETED", device=job_id)
    return {k: v for k, v in event["data"].items() if k in ("error", "offset", "len")}


def play(kind: str, directory: Path, damage: str, commands: tuple[str, ...],
         read_only: bool) -> dict:
    """``commands``: qemu-io commands through an NBD export, or () for a read by a
    job. Then a second read by a job, the events, and a read-write re-open."""
    image = directory / "h.qcow2"
    hostile_image(image, damage)
    before = image.read_bytes()
    sock = str(directory / "nbd.sock")
    with DaemonProcess(kind, workdir=directory) as daemon:
        session = QMPSession(daemon, timeout=60)
        assert session.command("blockdev-add", {
            "driver": "qcow2", "node-name": "h", "read-only": read_only,
            "file": {"driver": "file", "filename": "h.qcow2", "node-name": "hf"}}) == {"return": {}}
        session.command("blockdev-add", {"driver": "null-co", "node-name": "null",
                                         "size": 1 << 20})
        if commands:
            session.command("nbd-server-start", {"addr": {"type": "unix",
                                                          "data": {"path": sock}}})
            assert session.command("block-export-add", {
                "type": "nbd", "id": "e", "node-name": "h", "name": "img",
                "writable": True}) == {"return": {}}
            first: object = qemu_io(sock, *commands)
            session.command("block-export-del", {"id": "e"})
            session.wait_event("BLOCK_EXPORT_DELETED")
            session.command("nbd-server-stop")
        else:
            first = read_job(session, "r1")
        second = session.command("query-named-block-nodes", {"flat": True})
        session.command("query-version")
        events = [e["data"] for e in session.events if e["event"] == "BLOCK_IMAGE_CORRUPTED"]
        deleted = [session.command("blockdev-del", {"node-name": name}) for name in ("h", "hf")]
        reopen = session.command("blockdev-add", {
            "driver": "qcow2", "node-name": "h2",
            "file": {"driver": "file", "filename": "h.qcow2"}})
        session.close()
        # A job's chunk that outlived its job once raised in the event loop.
        assert "Traceback" not in daemon.stderr(), daemon.stderr()
    after = image.read_bytes()
    changed = [i for i in range(0, len(before), 512) if before[i:i + 512] != after[i:i + 512]]
    return {"first": first, "second": second, "events": events, "deleted": deleted,
            "reopen": reopen,
            "length": (len(before), len(after)), "changed": changed}


CASES = [
    ("data-on-l1", ("write -P 0x22 0 4k",), False),
    ("data-on-reftable", ("write -P 0x22 64k 4k",), False),
    ("free-header", ("write -P 0x22 512k 512",), False),
    ("misaligned-data", (), False),
    ("misaligned-l2", ("write -P 0x22 0 4k",), False),
    ("misaligned-l2", (), False),
    ("misaligned-data", (), True),
]


@pytest.mark.parametrize("damage, commands, read_only", CASES,
                         ids=[f"{c[0]}-{'ro' if c[2] else 'rw'}" for c in CASES])
def test_corruption_like_qsd(tmp_path: Path, damage: str, commands: tuple[str, ...],
                             read_only: bool) -> None:
    results = {}
    for kind in ("qsd", "qmpjobd"):
        directory = tmp_path / kind
        directory.mkdir()
        results[kind] = play(kind, directory, damage, commands, read_only)
    theirs, ours = results["qsd"], results["qmpjobd"]
    assert theirs["events"], theirs
    if not commands and not read_only:
        # A backup job reads in parallel in QEMU: the chunk that meets the damage
        # fails with EIO, the chunks still in flight when the driver goes with
        # ENOMEDIUM, and which error the job keeps depends on their timing.
        assert theirs["first"]["error"] in ("Input/output error", "No medium found")
        assert ours["first"]["error"] in ("Input/output error", "No medium found")
        del theirs["first"], ours["first"]
    assert ours == theirs, json.dumps({"qsd": theirs, "ours": ours}, indent=1)
