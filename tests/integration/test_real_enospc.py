"""A real ENOSPC, not an injected one: a backup into a raw file on a 4 MiB tmpfs.

With on-target-error=stop the job reports the write error and pauses with io-status
`nospace`; after the file system grows (remount), job-resume finishes the copy. The
same scenario runs on qemu-storage-daemon and qmpjobd of each version, and the event
sequences, the io-status and the copied bytes must be the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.procs import negotiated, read_until, summary
from tests.support.daemons import DaemonProcess
from tests.support.oracles import SUPPORTED_VERSIONS

SIZE = 16 << 20

# Mounting needs root: a developer's unprivileged run skips; CI (root) must run it.
pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                                reason="mounting a tmpfs needs root")


@pytest.fixture
def small_fs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def raw_node(name: str, path: Path) -> list[str]:
    return ["--blockdev", json.dumps({"driver": "raw", "node-name": name,
                                      "file": {"driver": "file", "filename": str(path)}})]


def command(client, name: str, arguments: dict | None = None, until: str | None = None) -> list[str]:
    request = {"execute": name, **({"arguments": arguments} if arguments else {})}
    client.send(json.dumps(request))
    def done(seen: list[str]) -> bool:
        replied = any(line.startswith('{"return"') or line.startswith('{"error"') for line in seen)
        return replied and (until is None or until in seen)
    return read_until(client, done)


def play(kind: str, version: str, source: Path, mount: Path) -> tuple[list[str], str]:
    target = mount / f"{kind}.raw"
    target.write_bytes(b"")
    os.truncate(target, SIZE)
    paused = summary(b'{"event": "JOB_STATUS_CHANGE", "data": {"id": "b", "status": "paused"}}')
    concluded = summary(b'{"event": "JOB_STATUS_CHANGE", "data": {"id": "b", "status": "concluded"}}')
    with DaemonProcess(kind, raw_node("s", source) + raw_node("t", target), version=version) as daemon:
        client = negotiated(daemon.sockets[0])
        seen = command(client, "blockdev-backup", {"job-id": "b", "device": "s", "target": "t",
                                                   "sync": "full", "on-target-error": "stop",
                                                   "auto-dismiss": False})
        if paused not in seen[seen.index('{"return": {}}'):]:
            seen += read_until(client, lambda lines: paused in lines)
        jobs = json.loads(command(client, "query-block-jobs")[-1])["return"]
        seen.append(json.dumps({key: jobs[0][key] for key in ("io-status", "status", "paused")}))
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        seen += command(client, "job-resume", {"id": "b"}, until=concluded)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    target.unlink()
    subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
    return seen, digest


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_real_enospc_stops_the_job_and_resume_finishes_it(tmp_path, small_fs, version):
    source = tmp_path / "src.raw"
    source.write_bytes(os.urandom(SIZE))
    theirs, their_digest = play("qsd", version, source, small_fs)
    ours, our_digest = play("qmpjobd", version, source, small_fs)
    assert ours == theirs
    assert '{"io-status": "nospace", "status": "paused", "paused": true}' in ours
    assert our_digest == their_digest == hashlib.sha256(source.read_bytes()).hexdigest()
