"""The drain-artefact table (qemu-versions.md section 5.3) replayed over real sockets
against qemu-storage-daemon of each version and qmpjobd --qemu-version of the same
version: the whole event sequence, replies and errors of every row must be equal.

An observer job ``ob`` (a backup of a 1 GiB null-co node at 1 MiB/s) keeps sleeping
on its rate limit on nodes no command touches, so every drain of every node shows
as an ``ob`` paused/running pair. Rows end at the command's reply, or, when an event
the row waits for comes after the reply, at that event; a ``query-jobs`` afterwards marks
the end of what belongs to the row (QEMU runs the job's own completion before it
reads the next command).
"""

from __future__ import annotations

from tests.support.oracles import SUPPORTED_VERSIONS

import json
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, RawClient

MiB = 1 << 20
VERSIONS = SUPPORTED_VERSIONS


def _compact(message: dict) -> str:
    if "event" in message:
        data = message.get("data", {})
        if message["event"] == "JOB_STATUS_CHANGE":
            return f"{data['id']}:{data['status']}"
        return f"{message['event']}({data.get('device', data.get('id', ''))})"
    if "error" in message:
        return f"<error: {message['error']['desc']}>"
    return "<reply>"


class Replayer:
    def __init__(self, client: RawClient) -> None:
        self.client = client

    def read(self) -> dict:
        return json.loads(self.client.recv_message())

    def command(self, name: str, args: dict | None = None, until: str | None = None) -> list[str]:
        """Send one command; what it caused, up to its reply (or to ``until``)."""
        message = {"execute": name, **({"arguments": args} if args is not None else {})}
        self.client.send(json.dumps(message) + "\n")
        seen: list[str] = []
        replied, reached = False, until is None
        while not (replied and reached):
            seen.append(_compact(self.read()))
            replied = replied or seen[-1].startswith("<")
            reached = reached or seen[-1] == until
        # A marker command: everything the row caused came before its reply.
        self.client.send(json.dumps({"execute": "query-jobs"}) + "\n")
        while True:
            marker = _compact(self.read())
            if marker.startswith("<"):
                break
            seen.append(marker)
        return seen


def backup(job_id: str, device: str, target: str, **extra) -> dict:
    return {"job-id": job_id, "device": device, "target": target, "sync": "full", **extra}


def rows(missing: str) -> list[tuple[str, str, dict, str | None]]:
    """(label, command, arguments, the event that ends the row if after the reply)."""
    return [
        ("add null-co", "blockdev-add", {"driver": "null-co", "node-name": "n1"}, None),
        ("add blkdebug", "blockdev-add",
         {"driver": "blkdebug", "node-name": "bd1", "image": {"driver": "null-co"}}, None),
        ("add raw inline", "blockdev-add",
         {"driver": "raw", "node-name": "r1", "file": {"driver": "null-co"}}, None),
        ("add raw chain", "blockdev-add",
         {"driver": "raw", "node-name": "r2",
          "file": {"driver": "blkdebug", "image": {"driver": "null-co"}}}, None),
        ("add file missing", "blockdev-add",
         {"driver": "file", "node-name": "f1", "filename": missing}, None),
        ("add raw missing file", "blockdev-add",
         {"driver": "raw", "node-name": "r3", "file": {"driver": "file", "filename": missing}},
         None),
        ("add raw missing ref", "blockdev-add",
         {"driver": "raw", "node-name": "r4", "file": "nosuchnode"}, None),
        ("add duplicate", "blockdev-add", {"driver": "null-co", "node-name": "n1"}, None),
        ("add raw ref", "blockdev-add", {"driver": "raw", "node-name": "r5", "file": "n1"}, None),
        ("del raw ref", "blockdev-del", {"node-name": "r5"}, None),
        ("del null-co", "blockdev-del", {"node-name": "n1"}, None),
        ("del raw implicit", "blockdev-del", {"node-name": "r1"}, None),
        ("del raw chain", "blockdev-del", {"node-name": "r2"}, None),
        ("backup ok", "blockdev-backup", backup("x1", "s1", "t1"), None),
        ("backup bad id", "blockdev-backup", backup("1x", "s2", "t2"), None),
        ("backup speed<0", "blockdev-backup", backup("x3", "s2", "t2", speed=-1), None),
        ("backup missing", "blockdev-backup", backup("x4", "nosuch", "t2"), None),
        ("backup same", "blockdev-backup", backup("x5", "s2", "s2"), None),
        ("backup manual", "blockdev-backup",
         backup("x6", "s2", "t2", **{"auto-finalize": False, "auto-dismiss": False}), None),
        ("finalize", "job-finalize", {"id": "x6"}, None),
        ("dismiss", "job-dismiss", {"id": "x6"}, None),
        ("backup slow", "blockdev-backup", backup("x7", "s3", "t3", speed=MiB), None),
        ("cancel backup", "job-cancel", {"id": "x7"}, None),
        ("txn empty", "transaction", {"actions": []}, None),
        ("txn abort", "transaction", {"actions": [{"type": "abort", "data": {}}]}, None),
        ("txn 2 backups", "transaction", {"actions": [
            {"type": "blockdev-backup", "data": backup("y2", "s4", "t4")},
            {"type": "blockdev-backup", "data": backup("y3", "s5", "t5")}]}, None),
        ("txn backup+abort", "transaction", {"actions": [
            {"type": "blockdev-backup", "data": backup("y4", "s4", "t4")},
            {"type": "abort", "data": {}}]}, None),
        ("mirror bad granularity", "blockdev-mirror",
         {"job-id": "m1", "device": "s7", "target": "t7", "sync": "full", "granularity": 3},
         None),
        ("mirror", "blockdev-mirror",
         {"job-id": "m2", "device": "s7", "target": "t7", "sync": "full"}, None),
        ("complete mirror", "job-complete", {"id": "m2"}, "m2:null"),
        ("mirror 2", "blockdev-mirror",
         {"job-id": "m3", "device": "s8", "target": "t8", "sync": "full"}, None),
        ("soft cancel mirror", "block-job-cancel", {"device": "m3"}, "m3:null"),
        # Section 5.2: a rate-limited mirror (2 MiB at 4 MiB/s: one 0.5 s sleep)
        # paused and resumed; 7.2 turns READY before the resume's reply, later
        # releases only once the limit allows.
        ("mirror limited", "blockdev-mirror",
         {"job-id": "m9", "device": "s9", "target": "t9", "sync": "full", "speed": 4 * MiB},
         None),
        ("pause limited", "job-pause", {"id": "m9"}, None),
        ("resume limited", "job-resume", {"id": "m9"}, "BLOCK_JOB_READY(m9)"),
        ("cancel limited", "block-job-cancel", {"device": "m9"}, "m9:null"),
        ("drive-backup", "drive-backup",
         {"job-id": "z1", "device": "s6", "target": "db.raw", "format": "raw",
          "sync": "full"}, "z1:null"),
    ]


def replay(kind: str, version: str, tmp: Path) -> list[str]:
    workdir = tmp / kind
    workdir.mkdir()
    with DaemonProcess(kind, version=version, workdir=workdir) as daemon:
        client = RawClient(daemon.sockets[0])
        try:
            player = Replayer(client)
            player.read()                                   # greeting
            player.command("qmp_capabilities")
            transcript = []
            for name, size in [("os", 1024 * MiB), ("ot", 1024 * MiB)] + [
                    (f"{p}{i}", 8 * MiB) for i in range(1, 9) for p in "st"] + [
                    ("s9", 2 * MiB), ("t9", 2 * MiB)]:
                player.command("blockdev-add", {"driver": "null-co", "node-name": name,
                                                "size": size})
            transcript.append("ob: " + " ".join(player.command(
                "blockdev-backup", backup("ob", "os", "ot", speed=MiB))))
            for label, name, args, until in rows(str(tmp / "does-not-exist")):
                transcript.append(f"{label}: " + " ".join(player.command(name, args, until)))
            return transcript
        finally:
            client.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_drain_artefact_rows_match_the_real_daemon(version, tmp_path) -> None:
    expected = replay("qsd", version, tmp_path)
    actual = replay("qmpjobd", version, tmp_path)
    mismatches = [f"qsd:     {e}\nqmpjobd: {a}" for e, a in zip(expected, actual) if e != a]
    assert not mismatches, f"qemu {version}:\n" + "\n".join(mismatches)
    # The rows really exercise the artefacts: QEMU 10.0 and later pause the observer
    # far more often than 7.2 does.
    pairs = sum(line.count("ob:paused") for line in expected)
    assert pairs > (100 if version != "7.2" else 10), pairs
