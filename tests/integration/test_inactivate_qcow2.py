"""blockdev-set-active on a qcow2 node, against qemu-storage-daemon 10.0 and 11.1.

Inactivation must leave an image another process can open without ``-U`` (locks
dropped), clean, with the persistent bitmaps stored and not ``in-use``; that
process may write it; activation must then read everything again: the new data,
and the bitmaps (which the other writer dirtied) marked ``in-use`` again. An
inactive node that is deleted writes nothing. Both daemons must agree on every
step (allocation sizes on the host aside).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession

VERSIONS = ("10.0", "11.1")


def _tool(cwd: Path, *argv: str) -> tuple[int, str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, timeout=60)
    text = "\n".join(line for line in (done.stdout + done.stderr).splitlines()
                     if "ops/sec" not in line)
    # Host allocation may differ between the daemons (cluster placement).
    text = re.sub(r'"actual-size": \d+', '"actual-size": N', text)
    text = re.sub(r"disk size: .*", "disk size: N", text)
    return done.returncode, text


def _nbd_io(cwd: Path, sock: str, *commands: str) -> tuple[int, str]:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    return _tool(cwd, *argv, f"nbd+unix:///img?socket={sock}")


def _bitmaps(session: QMPSession) -> list:
    nodes = session.command("query-named-block-nodes", {"flat": True})["return"]
    return [(n["node-name"], n.get("dirty-bitmaps"), n.get("active")) for n in nodes]


def play(kind: str, version: str, work: Path) -> dict:
    _tool(work, "qemu-img", "create", "-f", "qcow2", "a.qcow2", "1M")
    sock = str(work / "nbd.sock")
    out: dict = {}
    with DaemonProcess(kind, workdir=work, version=version) as daemon:
        s = QMPSession(daemon, timeout=60)
        s.command("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {
            "driver": "file", "filename": "a.qcow2", "node-name": "qf"}})
        s.command("block-dirty-bitmap-add", {"node": "q", "name": "b0", "persistent": True})
        s.command("block-dirty-bitmap-add", {"node": "q", "name": "mem"})
        s.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        s.command("block-export-add", {"type": "nbd", "id": "e", "node-name": "q",
                                       "name": "img", "writable": True})
        out["nbd-write"] = _nbd_io(work, sock, "write -P 0x11 0 64k")
        s.command("block-export-del", {"id": "e"})
        s.wait_event("BLOCK_EXPORT_DELETED")
        out["inactivate"] = s.command("blockdev-set-active", {"active": False,
                                                              "node-name": "q"})
        out["inactive-nodes"] = _bitmaps(s)
        out["info-inactive"] = _tool(work, "qemu-img", "info", "--output=json", "a.qcow2")
        out["check-inactive"] = _tool(work, "qemu-img", "check", "a.qcow2")
        out["foreign-write"] = _tool(work, "qemu-io", "-f", "qcow2", "-c",
                                     "write -P 0x55 128k 64k", "a.qcow2")
        out["activate"] = s.command("blockdev-set-active", {"active": True})
        out["active-nodes"] = _bitmaps(s)
        out["info-active"] = _tool(work, "qemu-img", "info", "-U", "a.qcow2")
        out["locked"] = _tool(work, "qemu-img", "info", "a.qcow2")
        s.command("block-export-add", {"type": "nbd", "id": "e", "node-name": "q",
                                       "name": "img", "writable": True})
        out["nbd-read"] = _nbd_io(work, sock, "read -P 0x55 128k 64k",
                                  "read -P 0x11 0 64k", "write -P 0x66 256k 4k")
        s.command("block-export-del", {"id": "e"})
        s.wait_event("BLOCK_EXPORT_DELETED")
        out["sha256"] = s.command("x-debug-block-dirty-bitmap-sha256",
                                  {"node": "q", "name": "b0"})
        # Inactive again, changed by another writer, then deleted: the daemon
        # must not write its (stale) view back.
        s.command("blockdev-set-active", {"active": False})
        out["foreign-write-2"] = _tool(work, "qemu-io", "-f", "qcow2", "-c",
                                       "write -P 0x77 512k 64k", "a.qcow2")
        before = hashlib.sha256((work / "a.qcow2").read_bytes()).hexdigest()
        out["del"] = [s.command("blockdev-del", {"node-name": n}) for n in ("q", "qf")]
        out["unchanged-by-del"] = before == hashlib.sha256(
            (work / "a.qcow2").read_bytes()).hexdigest()
        s.close()
    out["info-final"] = _tool(work, "qemu-img", "info", "a.qcow2")
    out["check-final"] = _tool(work, "qemu-img", "check", "a.qcow2")
    out["content"] = _tool(work, "qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 64k",
                           "-c", "read -P 0x55 128k 64k", "-c", "read -P 0x66 256k 4k",
                           "-c", "read -P 0x77 512k 64k", "a.qcow2")
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_inactivation_hands_the_image_over_like_qsd(tmp_path: Path, version: str) -> None:
    results = {}
    for kind in ("qsd", "qmpjobd"):
        work = tmp_path / kind
        work.mkdir()
        results[kind] = play(kind, version, work)
    theirs, ours = results["qsd"], results["qmpjobd"]
    # What the test relies on, seen on the oracle itself.
    assert theirs["foreign-write"][0] == 0 and '"dirty-flag": false' in theirs["info-inactive"][1]
    assert theirs["nbd-read"][0] == 0 and theirs["content"][0] == 0
    assert ours == theirs, json.dumps({"qsd": theirs, "ours": ours}, indent=1)


def _nodes(session: QMPSession) -> list:
    nodes = session.command("query-named-block-nodes", {"flat": True})
    if "error" in nodes:
        return nodes
    return [(n["node-name"], n.get("dirty-bitmaps"), n.get("active"),
             n["image"].get("format-specific")) for n in nodes["return"]]


def play_opened_inactive(kind: str, version: str, work: Path) -> dict:
    """blockdev-add active=false: no bitmaps loaded (nor marked in-use) until the
    node is activated; an image broken while inactive fails the activation and
    leaves the node without its driver."""
    _tool(work, "qemu-img", "create", "-f", "qcow2", "a.qcow2", "1M")
    _tool(work, "qemu-img", "bitmap", "--add", "a.qcow2", "b1")
    _tool(work, "qemu-io", "-f", "qcow2", "-c", "write 0 64k", "a.qcow2")
    out: dict = {}
    with DaemonProcess(kind, workdir=work, version=version) as daemon:
        s = QMPSession(daemon, timeout=60)
        out["add"] = s.command("blockdev-add", {
            "driver": "qcow2", "node-name": "q", "active": False,
            "file": {"driver": "file", "filename": "a.qcow2", "node-name": "qf"}})
        out["inactive"] = _nodes(s)
        out["info-inactive"] = _tool(work, "qemu-img", "info", "a.qcow2")
        out["activate"] = s.command("blockdev-set-active", {"active": True, "node-name": "q"})
        out["active"] = _nodes(s)
        out["info-active"] = _tool(work, "qemu-img", "info", "-U", "a.qcow2")
        out["inactivate"] = s.command("blockdev-set-active", {"active": False})
        with open(work / "a.qcow2", "r+b") as image:
            image.write(b"XXXX")        # no longer a qcow2 image
        out["broken-activate"] = s.command("blockdev-set-active", {"active": True})
        out["after"] = _nodes(s)
        out["again"] = s.command("blockdev-set-active", {"active": True})
        s.close()
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_opened_inactive_like_qsd(tmp_path: Path, version: str) -> None:
    results = {}
    for kind in ("qsd", "qmpjobd"):
        work = tmp_path / kind
        work.mkdir()
        results[kind] = play_opened_inactive(kind, version, work)
    theirs, ours = results["qsd"], results["qmpjobd"]
    assert "error" in theirs["broken-activate"], theirs
    assert ours == theirs, json.dumps({"qsd": theirs, "ours": ours}, indent=1)
