"""Persistent bitmaps in qcow2, compared with qemu-storage-daemon and qemu-img.

The same steps run on qsd and on qmpjobd (same QEMU version), each on its own
copy of one qcow2 image:

1. open the image read-write, add persistent and plain bitmaps, write through an
   NBD export, delete the node: closing it stores the persistent bitmaps;
   ``qemu-img info``/``check`` must read both files alike;
2. open the stored image read-only: the bitmaps load (read-only) with the same
   counts and sha256, and the commands refuse to modify them with QEMU's texts;
3. bitmaps written by ``qemu-img bitmap`` load the same way.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.nbd_setup import uri
from tests.support.oracles import CONFORMANCE_VERSIONS

WRITES = ["-c", "write -P 0xcc 0 64k", "-c", "write -P 0xdd 1M 5000", "-c", "write -z 2M 64k",
          "-c", "write -P 1 3M 512", "-c", "flush"]


def _qcow2(path: Path, *options: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "4M"],
                   check=True)


def _daemon(kind: str, version: str, image: Path, read_only: bool = False) -> DaemonProcess:
    ro = ",read-only=on" if read_only else ""
    daemon = DaemonProcess(kind, [
        "--blockdev", f"driver=file,filename={image},node-name=df{ro}",
        "--blockdev", f"driver=qcow2,file=df,node-name=disk{ro}",
    ], version=version)
    return daemon.start()


def _img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    return done.stdout + done.stderr


def _bitmap_view(qmp: QMPSession, names: list[str]) -> list:
    nodes = qmp.command("query-named-block-nodes", {"flat": True})["return"]
    disk = next(n for n in nodes if n["node-name"] == "disk")
    out: list = [disk.get("dirty-bitmaps"),
                 disk["image"].get("format-specific", {}).get("data", {}).get("bitmaps")]
    for name in names:
        out.append(qmp.command("x-debug-block-dirty-bitmap-sha256",
                               {"node": "disk", "name": name}))
    return out


def _store_flow(kind: str, version: str, image: Path) -> list:
    """Step 1: returns what QMP and qemu-img showed."""
    daemon = _daemon(kind, version, image)
    out: list = []
    try:
        qmp = QMPSession(daemon)
        for args in ({"name": "p1", "persistent": True},
                     {"name": "p2", "persistent": True, "disabled": True,
                      "granularity": 131072},
                     {"name": "p3", "persistent": True, "granularity": 512},
                     {"name": "t1"},
                     {"name": "gone", "persistent": True}):
            out.append(qmp.command("block-dirty-bitmap-add", {"node": "disk", **args}))
        out.append(qmp.command("block-dirty-bitmap-remove", {"node": "disk", "name": "gone"}))
        sock = str(daemon.tmp / "nbd.sock")
        qmp.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        qmp.command("block-export-add", {"type": "nbd", "id": "w", "node-name": "disk",
                                         "writable": True})
        subprocess.run(["qemu-io", "-f", "raw", *WRITES, uri(sock, "disk")],
                       capture_output=True, check=True, timeout=60)
        out.append(_bitmap_view(qmp, ["p1", "p2", "p3", "t1"]))
        qmp.command("block-export-del", {"id": "w"})
        # Closing the node stores the bitmaps (QEMU's qcow2_inactivate).
        out.append(qmp.command("blockdev-del", {"node-name": "disk"}))
        qmp.close()
    finally:
        daemon.stop()
    info = json.loads(_img("info", "--output=json", str(image)))
    out.append(info["format-specific"])
    out.append(_img("check", str(image)))
    return out


def _reopen_read_only(kind: str, version: str, image: Path) -> list:
    """Step 2 (and 3): the stored bitmaps on a read-only node."""
    daemon = _daemon(kind, version, image, read_only=True)
    try:
        qmp = QMPSession(daemon)
        nodes = qmp.command("query-named-block-nodes", {"flat": True})["return"]
        disk = next(n for n in nodes if n["node-name"] == "disk")
        names = [b["name"] for b in disk.get("dirty-bitmaps", [])]
        out: list = [_bitmap_view(qmp, names)]
        for command in ("block-dirty-bitmap-clear", "block-dirty-bitmap-remove",
                        "block-dirty-bitmap-enable", "block-dirty-bitmap-disable"):
            out.append(qmp.command(command, {"node": "disk", "name": names[0]}))
        out.append(qmp.command("block-dirty-bitmap-merge", {"node": "disk", "target": names[0],
                                                            "bitmaps": names}))
        out.append(qmp.command("block-dirty-bitmap-add", {"node": "disk", "name": "new",
                                                          "persistent": True}))
        qmp.close()
        return out
    finally:
        daemon.stop()


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_persistent_bitmaps_stored_like_qemu(version, tmp_path):
    results = {}
    for kind in ("qsd", "qmpjobd"):
        image = tmp_path / f"{kind}.qcow2"
        _qcow2(image)
        results[kind] = _store_flow(kind, version, image)
        results[kind].append(_reopen_read_only(kind, version, image))
    assert results["qmpjobd"] == results["qsd"]
    stored = results["qsd"][-3]["data"]["bitmaps"]
    assert [b["name"] for b in stored] == ["p3", "p2", "p1"]
    # The counts after the reopen are the writes of the first run.
    reloaded = results["qsd"][-1][0][0]
    assert {b["name"]: b["count"] for b in reloaded}["p1"] == 4 * 65536


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_bitmaps_from_qemu_img_load_like_qemu(version, tmp_path):
    results = {}
    for kind in ("qsd", "qmpjobd"):
        image = tmp_path / f"{kind}.qcow2"
        _qcow2(image, "-o", "cluster_size=4096")
        _img("bitmap", "--add", str(image), "b1")
        _img("bitmap", "--add", "-g", "512", "--disable", str(image), "b2")
        subprocess.run(["qemu-io", "-f", "qcow2", *WRITES, str(image)], capture_output=True,
                       check=True)
        results[kind] = _reopen_read_only(kind, version, image)
    assert results["qmpjobd"] == results["qsd"]
    assert results["qsd"][0][0][1]["count"] > 0


def _leave_in_use(version: str, image: Path) -> None:
    """qsd stores two bitmaps, reopens the image (setting in_use on them) and is
    killed: what an unclean stop leaves."""
    daemon = _daemon("qsd", version, image)
    try:
        qmp = QMPSession(daemon)
        qmp.command("block-dirty-bitmap-add", {"node": "disk", "name": "p1",
                                               "persistent": True})
        qmp.command("block-dirty-bitmap-add", {"node": "disk", "name": "p2",
                                               "persistent": True, "disabled": True})
        qmp.command("blockdev-del", {"node-name": "disk"})
        qmp.command("blockdev-add", {"node-name": "again", "driver": "qcow2", "file": "df"})
        qmp.close()
        daemon.proc.kill()
        daemon.proc.wait()
    finally:
        daemon.stop()


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_unclean_stop_leaves_inconsistent_bitmaps(version, tmp_path):
    results = {}
    for kind in ("qsd", "qmpjobd"):
        image = tmp_path / f"{kind}.qcow2"
        _qcow2(image)
        _leave_in_use(version, image)
        results[kind] = _reopen_read_only(kind, version, image)
    assert results["qmpjobd"] == results["qsd"]
    assert all(b.get("inconsistent") for b in results["qsd"][0][0])


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_bitmap_that_cannot_be_stored_is_reported_on_close(version, tmp_path):
    """A persistent bitmap added to a read-only qcow2 node (7.2 and 10.0 accept
    it) is lost at close, with QEMU's line on stderr."""
    image = tmp_path / "ro.qcow2"
    _qcow2(image)
    seen = {}
    for kind in ("qsd", "qmpjobd"):
        daemon = _daemon(kind, version, image, read_only=True)
        try:
            qmp = QMPSession(daemon)
            replies = [qmp.command("block-dirty-bitmap-add",
                                   {"node": "disk", "name": "p", "persistent": True}),
                       qmp.command("blockdev-del", {"node-name": "disk"})]
            # A command after the close: its reply comes after the close's stderr.
            qmp.command("query-version")
            qmp.close()
            seen[kind] = (replies, [line for line in daemon.stderr().splitlines()
                                    if "bitmap" in line])
        finally:
            daemon.stop()
    assert seen["qmpjobd"] == seen["qsd"]
    if "error" not in seen["qsd"][0][0]:
        assert seen["qsd"][1] and "No write access" in seen["qsd"][1][0]


def _reopen_read_write_and_quit(kind: str, version: str, image: Path) -> list:
    """The stored image opened read-write: the bitmaps load (marked in-use in the
    file while open), more writes dirty them, and ``quit`` (not blockdev-del)
    stores them again: QEMU closes every node at exit."""
    daemon = _daemon(kind, version, image)
    out: list = []
    try:
        qmp = QMPSession(daemon)
        out.append(_bitmap_view(qmp, ["p1", "p2", "p3"]))
        info = json.loads(_img("info", "-U", "--output=json", str(image)))
        out.append(info["format-specific"]["data"].get("bitmaps"))
        sock = str(daemon.tmp / "nbd.sock")
        qmp.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        qmp.command("block-export-add", {"type": "nbd", "id": "w", "node-name": "disk",
                                         "writable": True})
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 3M 128k", uri(sock, "disk")],
                       capture_output=True, check=True, timeout=60)
        out.append(_bitmap_view(qmp, ["p1", "p2", "p3"]))
        out.append(qmp.command("quit"))
        qmp.close()
        daemon.proc.wait(timeout=30)
    finally:
        daemon.stop()
    info = json.loads(_img("info", "--output=json", str(image)))
    out.append(info["format-specific"])
    out.append(_img("check", str(image)))
    return out


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_bitmaps_reopened_read_write_are_stored_at_quit(version, tmp_path):
    results = {}
    for kind in ("qsd", "qmpjobd"):
        image = tmp_path / f"{kind}.qcow2"
        _qcow2(image)
        _store_flow(kind, version, image)
        results[kind] = _reopen_read_write_and_quit(kind, version, image)
    assert results["qmpjobd"] == results["qsd"]
    in_use = results["qsd"][1]
    assert in_use and all("in-use" in b["flags"] for b in in_use)
    stored = {b["name"]: b for b in results["qsd"][-2]["data"]["bitmaps"]}
    assert "in-use" not in stored["p1"]["flags"]
