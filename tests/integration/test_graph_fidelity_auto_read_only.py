"""auto-read-only against qemu-storage-daemon of each version, on an image the
daemon may open for reading but not for writing (an immutable file: even root gets
EPERM for O_RDWR, so the test needs no unprivileged user).

QEMU's file driver keeps a node with auto-read-only open read-only until a user
takes the write permission: the node opens, read-only users (a raw node above it, a
read-only export) work, a writer (a writable export, a qcow2 node, a backup into
it) fails with the open's error, and blockdev-reopen may take auto-read-only away
only by failing the same way. Inline children inherit auto-read-only from their
parent, at blockdev-add and at blockdev-reopen. Both daemons play the same steps;
every reply must be equal (generated node names masked)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.oracles import CONFORMANCE_VERSIONS

AUTO_NAME = re.compile(r"#block\d+")
MiB = 1 << 20

STEPS: list[tuple[str, dict]] = [
    ("blockdev-add", {"driver": "file", "node-name": "a", "filename": "imm.raw"}),
    ("blockdev-add", {"driver": "file", "node-name": "b", "filename": "imm.raw",
                      "auto-read-only": True}),
    ("blockdev-add", {"driver": "raw", "node-name": "rb", "file": "b"}),
    ("blockdev-add", {"driver": "raw", "node-name": "rc", "auto-read-only": True,
                      "file": {"driver": "file", "filename": "imm.raw"}}),
    ("blockdev-add", {"driver": "raw", "node-name": "rd", "auto-read-only": True,
                      "read-only": True, "file": {"driver": "file", "filename": "imm.raw"}}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "b"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "src", "size": MiB}),
    # A backup's copy-before-write filter cannot take the target: its creation fails.
    ("blockdev-backup", {"job-id": "bk", "device": "src", "target": "b", "sync": "full"}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}),
    ("block-export-add", {"type": "nbd", "id": "w", "node-name": "b", "writable": True}),
    ("block-export-add", {"type": "nbd", "id": "r", "node-name": "b"}),
    ("blockdev-reopen", {"options": [{"driver": "file", "node-name": "b",
                                      "filename": "imm.raw"}]}),
    ("blockdev-reopen", {"options": [{"driver": "file", "node-name": "b", "filename": "imm.raw",
                                      "auto-read-only": True, "read-only": True}]}),
    ("blockdev-reopen", {"options": [{"driver": "file", "node-name": "b", "filename": "imm.raw",
                                      "auto-read-only": True}]}),
    ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "rd", "auto-read-only": True,
                                      "file": {"driver": "file", "filename": "imm.raw"}}]}),
    ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "rd",
                                      "file": {"driver": "file", "filename": "imm.raw"}}]}),
    ("query-named-block-nodes", {"flat": True}),
]


def _immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True,
                   capture_output=True)


def replay(kind: str, version: str, workdir: Path) -> list[str]:
    image = workdir / "imm.raw"
    with open(image, "wb") as handle:
        handle.truncate(MiB)
    _immutable(image, True)
    try:
        with DaemonProcess(kind, version=version, workdir=workdir) as daemon:
            qmp = QMPSession(daemon)
            try:
                return [AUTO_NAME.sub("#block", qmp.command_raw(name, args).decode())
                        for name, args in STEPS]
            finally:
                qmp.close()
    finally:
        _immutable(image, False)


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_auto_read_only_matches_the_real_daemon(version, tmp_path) -> None:
    (tmp_path / "qsd").mkdir()
    (tmp_path / "ours").mkdir()
    expected = replay("qsd", version, tmp_path / "qsd")
    actual = replay("qmpjobd", version, tmp_path / "ours")
    mismatches = [f"{name}: qsd {e!r}\n   qmpjobd {a!r}"
                  for (name, _), e, a in zip(STEPS, expected, actual) if e != a]
    assert not mismatches, "\n".join(mismatches)
    # The steps really reach both sides of auto-read-only: the immutable image opens
    # only with it, and a writer fails on it.
    assert "Operation not permitted" in expected[0] and '"return"' in expected[1]
    assert "Could not create node: Could not open" in expected[7]
    assert "Operation not permitted" in expected[9]
