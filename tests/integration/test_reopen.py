"""blockdev-reopen as seen from outside the daemon: what the image locks let other
processes do after each reopen, and the node state the queries show, compared
between qmpjobd and qemu-storage-daemon of the same version."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.oracles import CONFORMANCE_VERSIONS, qemu_img_command

QEMU_IO = "/usr/bin/qemu-io"
AUTO_NAME = re.compile(r"#block\d+")


def tool(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    return f"rc={done.returncode} {done.stderr.strip()}"


def top(read_only: bool | None = None, **extra) -> dict:
    options = {"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "base",
               **extra}
    if read_only is not None:
        options["read-only"] = read_only
    return options


def reopen_flow(kind: str, version: str, directory: Path) -> list[str]:
    image, backing = directory / "top.qcow2", directory / "base.qcow2"
    img = qemu_img_command(version)
    seen: list[str] = []
    with DaemonProcess(kind, version=version) as daemon:
        qmp = QMPSession(daemon)

        def cmd(name: str, args: dict) -> None:
            seen.append(AUTO_NAME.sub("#block", qmp.command_raw(name, args).decode()))

        def outside() -> None:
            seen.extend([tool([*img, "info", str(image)]),
                         tool([QEMU_IO, "-c", "write 0 512", str(image)]),
                         tool([QEMU_IO, "-c", "write 0 512", str(backing)])])

        cmd("blockdev-add", {"driver": "qcow2", "node-name": "base", "read-only": True,
                             "backing": None,
                             "file": {"driver": "file", "node-name": "base-file",
                                      "filename": str(backing)}})
        cmd("blockdev-add", {"driver": "file", "node-name": "top-file", "filename": str(image)})
        cmd("blockdev-add", top())
        outside()
        cmd("blockdev-reopen", {"options": [top(True)]})
        outside()
        cmd("blockdev-reopen", {"options": [top(False)]})
        outside()
        # One list, one step: the second element fails, so the first is not applied.
        cmd("blockdev-reopen", {"options": [top(True), {"driver": "qcow2", "node-name": "base",
                                                        "file": "base-file", "backing": None,
                                                        "cache-size": 1, "size": 3}]})
        outside()
        # Base read-write, as libvirt does around bitmap merges, then back.
        cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "base",
                                             "file": "base-file", "backing": None,
                                             "read-only": False}]})
        outside()
        cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "base",
                                             "file": "base-file", "backing": None,
                                             "read-only": True}]})
        outside()
        cmd("x-debug-query-block-graph", {})
        nodes = json.loads(qmp.command_raw("query-named-block-nodes", {"flat": True}))
        seen.append(json.dumps([(n["node-name"], n["ro"]) for n in nodes["return"]]))
        qmp.close()
    return [line.replace(str(directory), "DIR") for line in seen]


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_reopen_changes_locks_as_qsd(tmp_path: Path, version: str) -> None:
    img = qemu_img_command(version)
    results = {}
    for kind in ("qsd", "qmpjobd"):
        directory = tmp_path / kind
        directory.mkdir()
        subprocess.run([*img, "create", "-q", "-f", "qcow2", str(directory / "base.qcow2"),
                        "1M"], check=True)
        subprocess.run([*img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                        str(directory / "top.qcow2"), "1M"], check=True)
        results[kind] = reopen_flow(kind, version, directory)
        # What was written through the reopened nodes is a valid image for QEMU.
        assert tool([*img, "check", str(directory / "top.qcow2")]).startswith("rc=0")
    assert results["qmpjobd"] == results["qsd"]
    # Read-only after the first reopen: qemu-img info gets in, a writer does not.
    assert results["qsd"][3].startswith("rc=1") and results["qsd"][7].startswith("rc=0")
    assert results["qsd"][8].startswith("rc=1")
