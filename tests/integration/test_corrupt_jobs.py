"""A qcow2 node marked corrupt, read over NBD and then given to jobs and exports,
against qemu-storage-daemon 7.2, 10.0 and 11.1.

The image's first data cluster has an unaligned host offset. The first read of it
over NBD must fail with EIO (the image is then marked corrupt) and every later one
with EINVAL (QEMU's NBD mapping of "No medium found"), whichever path the read
takes in the server: a structured read that looks for holes first (qemu-io), a
structured read with the DF flag, and a simple reply (libnbd), the last two going
through qmpjobd's host-range shortcut, which must not send the bytes at the
unaligned offset. Then the commands that refuse a node without a driver must give
QEMU's answers: the backup ("Device is not inserted: "), mirror and commit ("Device
has no medium") and export ones (7.2: the export's length; 10.0 on: the silent
activation failure, success without an export).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_qcow2_corrupt import hostile_image
from tests.support.daemons import DaemonProcess, QMPSession

VERSIONS = ("7.2", "10.0", "11.1")

# Reads by the system python3's libnbd (the venv does not see the Debian module).
LIBNBD_READS = r"""
import json, sys, nbd
uri, mode = sys.argv[1], sys.argv[2]
h = nbd.NBD()
if mode == "simple":
    h.set_request_structured_replies(False)
h.connect_uri(uri)
flags = nbd.CMD_FLAG_DF if mode == "df" else 0
out = []
for offset in (0, 65536, 0, 131072):
    try:
        data = h.pread(4096, offset, flags=flags)
        out.append(["ok", data[:16].hex()])
    except nbd.Error as exc:
        out.append(["error", exc.errno])
out.append(h.get_structured_replies_negotiated())
print(json.dumps(out))
"""


def _qemu_io(sock: str, *commands: str) -> str:
    argv = ["qemu-io", "-r", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run(argv + [f"nbd+unix:///img?socket={sock}"], capture_output=True,
                          text=True, timeout=60)
    return "\n".join(line for line in (done.stdout + done.stderr).splitlines()
                     if "ops/sec" not in line)


def _libnbd(sock: str, mode: str) -> object:
    done = subprocess.run(["/usr/bin/python3", "-c", LIBNBD_READS,
                           f"nbd+unix:///img?socket={sock}", mode],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _commands(work: Path) -> list[tuple[str, dict]]:
    return [
        ("blockdev-backup", {"job-id": "j1", "device": "h", "target": "null",
                             "sync": "full"}),
        ("blockdev-backup", {"job-id": "j2", "device": "t", "target": "h",
                             "sync": "full"}),
        ("blockdev-backup", {"job-id": "j2", "device": "h", "target": "h",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "j3", "device": "h", "target": "null",
                             "sync": "full"}),
        ("drive-mirror", {"job-id": "j6", "device": "h", "target": str(work / "dm.raw"),
                          "format": "raw", "sync": "full"}),
        ("block-commit", {"job-id": "j8", "device": "h"}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "h",
                              "name": "img1"}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "h",
                              "name": "img2", "writable": True}),
        ("nbd-server-add", {"device": "h", "name": "img3"}),
        ("query-block-exports", {}),
        ("query-block-jobs", {}),
    ]


def play(kind: str, version: str, work: Path, reader: str) -> dict:
    hostile_image(work / "h.qcow2", "misaligned-data")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "t.qcow2", "1M"], cwd=work,
                   check=True, capture_output=True)
    sock = str(work / "nbd.sock")
    out: dict = {}
    with DaemonProcess(kind, workdir=work, version=version) as daemon:
        s = QMPSession(daemon, timeout=60)
        s.command("blockdev-add", {"driver": "qcow2", "node-name": "h", "file": {
            "driver": "file", "filename": "h.qcow2", "node-name": "hf"}})
        s.command("blockdev-add", {"driver": "null-co", "node-name": "null",
                                   "size": 1 << 20})
        s.command("blockdev-add", {"driver": "qcow2", "node-name": "t", "file": {
            "driver": "file", "filename": "t.qcow2", "node-name": "tf"}})
        s.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        s.command("block-export-add", {"type": "nbd", "id": "e0", "node-name": "h",
                                       "name": "img"})
        if reader == "qemu-io":
            out["reads"] = [_qemu_io(sock, "read 0 4k", "read 64k 4k", "map"),
                            _qemu_io(sock, "read 0 4k", "readv 0 512 512")]
        else:
            out["reads"] = _libnbd(sock, reader)
        s.command("block-export-del", {"id": "e0"})
        s.wait_event("BLOCK_EXPORT_DELETED")
        if reader == "qemu-io":
            out["commands"] = [[name, s.command(name, args)]
                               for name, args in _commands(work)]
        out["corrupted"] = [e["data"] for e in s.events
                            if e["event"] == "BLOCK_IMAGE_CORRUPTED"]
        s.close()
        # Every failure was an answer to the client, none an internal error.
        out["internal-errors"] = "unexpectedly" in daemon.stderr()
    return out


@pytest.mark.parametrize("reader", ("qemu-io", "df", "simple"))
@pytest.mark.parametrize("version", VERSIONS)
def test_corrupt_node_like_qsd(tmp_path: Path, version: str, reader: str) -> None:
    results = {}
    for kind in ("qsd", "qmpjobd"):
        work = tmp_path / kind
        work.mkdir()
        results[kind] = play(kind, version, work, reader)
    theirs, ours = results["qsd"], results["qmpjobd"]
    # The oracle refused every read (and marked the image, for the readers
    # whose reads reach the image at all).
    assert len(theirs["corrupted"]) == (0 if reader == "df" else 1), theirs
    assert "ok" not in json.dumps(theirs["reads"]), theirs
    assert ours == theirs, json.dumps({"qsd": theirs, "ours": ours}, indent=1)
