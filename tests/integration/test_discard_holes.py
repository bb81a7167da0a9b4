"""A discard that reaches a file punches a hole, as file-posix's does: after an NBD
client's discard through raw and file nodes opened with discard=unmap (directly, and
as an inline child, whose discard defaults to unmap), the image file has holes in
the same places on qmpjobd as on qemu-storage-daemon, and reads the same."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.oracles import CONFORMANCE_VERSIONS

MiB = 1 << 20


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The file's data extents by SEEK_DATA/SEEK_HOLE."""
    extents, fd = [], os.open(path, os.O_RDONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            offset = end
    finally:
        os.close(fd)
    return extents


NODES = {
    "named": [{"driver": "file", "node-name": "f", "filename": "disk.raw", "discard": "unmap"},
              {"driver": "raw", "node-name": "disk", "file": "f", "discard": "unmap"}],
    "inline": [{"driver": "raw", "node-name": "disk", "discard": "unmap",
                "file": {"driver": "file", "filename": "disk.raw"}}],
    "ignored": [{"driver": "raw", "node-name": "disk",
                 "file": {"driver": "file", "filename": "disk.raw"}}],
}


def play(kind: str, version: str, directory: Path, nodes: list[dict]) -> tuple:
    (directory / "disk.raw").write_bytes(b"\x5a" * (4 * MiB))
    sock = str(directory / "nbd.sock")
    with DaemonProcess(kind, version=version, workdir=directory) as daemon:
        qmp = QMPSession(daemon)
        for node in nodes:
            assert qmp.command("blockdev-add", node) == {"return": {}}
        qmp.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        qmp.command("block-export-add", {"type": "nbd", "id": "e", "node-name": "disk",
                                         "writable": True})
        done = subprocess.run(["qemu-io", "-f", "raw", "-c", "discard 64k 1M",
                               "-c", "discard 3M 512k", f"nbd+unix:///disk?socket={sock}"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        qmp.close()
    image = directory / "disk.raw"
    return data_extents(image), hashlib.sha256(image.read_bytes()).hexdigest()


@pytest.mark.parametrize("setup", sorted(NODES))
@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_discard_punches_the_holes_qemu_punches(tmp_path: Path, version: str,
                                                setup: str) -> None:
    results = {}
    for kind in ("qsd", "qmpjobd"):
        (tmp_path / kind).mkdir()
        results[kind] = play(kind, version, tmp_path / kind, NODES[setup])
    assert results["qmpjobd"] == results["qsd"]
    holes = results["qsd"][0] != [(0, 4 * MiB)]
    assert holes == (setup != "ignored"), results["qsd"]
