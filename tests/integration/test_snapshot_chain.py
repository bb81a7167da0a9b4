"""External snapshots of a node that has a user (an NBD export), against
qemu-storage-daemon in the same test, for every personality.

``blockdev-snapshot-sync`` of an exported node: the export moves to the new
overlay, the overlay and its implicit ``file`` node stay in the graph, the old node
becomes read-only with its implicit children; then the errors that need a user
(an exported overlay is "in use"; the new overlay is in use for blockdev-del and
shares no resize permission with the export) and change-backing-file on the chain.
The replies must be identical once the two random digits of generated node names
(``#block`` + a counter + two random digits) are masked, and the overlay file qmpjobd created must
have the bytes of qsd's.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.oracles import CONFORMANCE_VERSIONS, qemu_img_command
from tests.support.image_runs import run_on_copies

MiB = 1 << 20
# "#block" + QEMU's process-wide counter + two random digits: the counter is kept.
GENERATED = re.compile(r"(#block\d*)\d\d")


def qemu_img(*args: str, cwd: Path) -> None:
    subprocess.run([*qemu_img_command("7.2"), *args], cwd=cwd, check=True,
                   capture_output=True)


def make_images(directory: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", str(4 * MiB), cwd=directory)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M",
                    str(directory / "base.qcow2")], check=True, capture_output=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
             str(4 * MiB), cwd=directory)
    qemu_img("create", "-q", "-f", "qcow2", "ov.qcow2", str(4 * MiB), cwd=directory)
    qemu_img("create", "-q", "-f", "qcow2", "other.qcow2", str(4 * MiB), cwd=directory)


def commands(directory: Path) -> list[tuple[str, dict]]:
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": "top.qcow2", "node-name": "tf"},
                          "backing": {"driver": "qcow2", "node-name": "base",
                                      "file": {"driver": "file", "filename": "base.qcow2"}}}),
        ("nbd-server-start", {"addr": {"type": "unix",
                                       "data": {"path": str(directory / "nbd.sock")}}}),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": "top"}),
        ("blockdev-snapshot-sync", {"node-name": "top", "snapshot-file": "s1.qcow2",
                                    "snapshot-node-name": "s1"}),
        ("query-block-exports", {}),
        ("query-named-block-nodes", {}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-del", {"node-name": "s1"}),
        ("block_resize", {"node-name": "s1", "size": 8 * MiB}),
        ("blockdev-snapshot-sync", {"node-name": "top", "snapshot-file": "s2.qcow2",
                                    "snapshot-node-name": "s2"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ov",
                          "file": {"driver": "file", "filename": "ov.qcow2"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "other",
                          "file": {"driver": "file", "filename": "other.qcow2"}}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "ov"}),
        ("blockdev-snapshot", {"node": "other", "overlay": "ov"}),
        ("change-backing-file", {"device": "s1", "image-node-name": "top",
                                 "backing-file": "base.qcow2"}),
        ("change-backing-file", {"device": "s1", "image-node-name": "s1",
                                 "backing-file": "renamed.qcow2"}),
        ("query-named-block-nodes", {"flat": True}),
    ]


def comparable(reply: dict) -> dict:
    text = GENERATED.sub(r"\1", json.dumps(reply))
    parsed = json.loads(text)
    if isinstance(parsed.get("return"), list):
        for node in parsed["return"]:
            if isinstance(node, dict):
                _drop_actual_size(node.get("image", {}))
    return parsed


def _drop_actual_size(image: dict) -> None:
    image.pop("actual-size", None)
    if "backing-image" in image:
        _drop_actual_size(image["backing-image"])


def run(kind: str, version: str, directory: Path) -> list[dict]:
    replies = []
    with DaemonProcess(kind, version=version, workdir=directory) as daemon:
        session = QMPSession(daemon, timeout=60)
        try:
            for name, arguments in commands(directory):
                reply = session.command(name, arguments)
                replies.append(comparable(json.loads(
                    json.dumps(reply).replace(str(directory), "DIR"))))
        finally:
            session.close()
    return replies


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_snapshot_of_exported_node_matches_qsd(tmp_path: Path, version: str) -> None:
    dirs, expected, actual = run_on_copies(tmp_path, version, make_images, run)
    for number, (want, got) in enumerate(zip(expected, actual)):
        assert got == want, f"reply {number} ({commands(tmp_path)[number][0]})"
    assert expected[4]["return"][0]["node-name"] == "s1"     # the export moved
    flat = {node["node-name"]: node for node in expected[6]["return"]}
    assert flat["top"]["ro"] and flat["tf"]["ro"] and not flat["s1"]["ro"]
    digests = [hashlib.sha256((dirs[k] / "s1.qcow2").read_bytes()).hexdigest()
               for k in ("qsd", "qmpjobd")]
    assert digests[0] == digests[1]
