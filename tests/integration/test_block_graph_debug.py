"""x-debug-query-block-graph on graphs with generated node names, compared with
qemu-storage-daemon of the same version.

Generated names (``#block<counter><random>``) differ per run, so both replies are
normalised the same way before comparing: generated names become #1, #2, ... and
vertex ids 1, 2, ... in the order they first appear in the reply. Everything else
(the order of vertices and edges, edge names, permission lists) is compared as is.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.oracles import CONFORMANCE_VERSIONS, qemu_img_command

AUTO_NAME = re.compile(r"#block\d+")


def renumbered(reply: bytes) -> dict:
    """The graph with generated names and ids numbered by first appearance."""
    names: dict[str, str] = {}
    text = AUTO_NAME.sub(lambda m: names.setdefault(m.group(), f"#{len(names) + 1}"),
                         reply.decode())
    graph = json.loads(text)["return"]
    ids: dict[int, int] = {}

    def number(value: int) -> int:
        return ids.setdefault(value, len(ids) + 1)

    for vertex in graph["nodes"]:
        vertex["id"] = number(vertex["id"])
    for edge in graph["edges"]:
        edge["parent"], edge["child"] = number(edge["parent"]), number(edge["child"])
    return graph


def graphs(kind: str, version: str, directory: Path) -> list[dict]:
    seen: list[dict] = []
    with DaemonProcess(kind, version=version, workdir=directory) as daemon:
        qmp = QMPSession(daemon)

        def step(name: str, args: dict | None = None) -> None:
            reply = json.loads(qmp.command_raw(name, args))
            assert "error" not in reply, (name, reply)

        def snapshot() -> None:
            seen.append(renumbered(qmp.command_raw("x-debug-query-block-graph")))

        # A chain opened from the image headers: every node below top is generated.
        step("blockdev-add", {"driver": "qcow2", "node-name": "top",
                              "file": {"driver": "file", "filename": "top.qcow2"}})
        step("blockdev-add", {"driver": "blkdebug", "node-name": "dbg",
                              "image": {"driver": "raw",
                                        "file": {"driver": "file", "filename": "a.raw"}}})
        step("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1048576})
        snapshot()
        step("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}})
        step("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top"})
        step("block-export-add", {"type": "nbd", "id": "e1", "node-name": "dbg",
                                  "writable": True})
        snapshot()
        # A mirror with a generated filter name, rate-limited so it is still running.
        step("blockdev-add", {"driver": "null-co", "node-name": "n1", "size": 1048576})
        step("blockdev-mirror", {"job-id": "m0", "device": "n0", "target": "n1",
                                 "sync": "full", "speed": 1})
        snapshot()
        step("job-cancel", {"id": "m0"})
        qmp.wait_status("m0", "null")
        step("block-export-del", {"id": "e0"})
        step("blockdev-del", {"node-name": "top"})
        snapshot()
        qmp.close()
    return seen


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_graph_as_qsd_lists_it(tmp_path: Path, version: str) -> None:
    img = qemu_img_command(version)
    results = {}
    for kind in ("qsd", "qmpjobd"):
        directory = tmp_path / kind
        directory.mkdir()
        (directory / "a.raw").write_bytes(bytes(1 << 20))
        for args in (["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
                     ["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                      "mid.qcow2", "1M"],
                     ["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
                      "top.qcow2", "1M"]):
            subprocess.run([*img, *args], cwd=directory, check=True)
        results[kind] = graphs(kind, version, directory)
    assert results["qmpjobd"] == results["qsd"]
    # The chain really was listed: top, its file, and two generated levels below.
    first = results["qsd"][0]
    assert sum(v["name"].startswith("#") for v in first["nodes"]) >= 5
