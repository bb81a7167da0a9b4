"""block_resize of qcow2 images holding data, against qemu-storage-daemon in the same
test, for every personality.

The same images (written by qemu-io) are resized by both daemons: an overlay grown
past its old end while its backing file is longer (the new area must hide the
backing file's data: zero clusters, and zero data in the partial cluster at the old
end), an image shrunk to a size that is not cluster aligned and grown again. The
replies must be identical; afterwards ``qemu-img check`` must find each image clean,
``qemu-img compare`` must find qmpjobd's equal to qsd's, ``qemu-img map`` must show
the same allocation (host offsets aside) and ``qemu-img info`` the same size.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.oracles import CONFORMANCE_VERSIONS, qemu_img_command
from tests.support.image_runs import run_on_copies

MiB = 1 << 20
KiB = 1 << 10


def qemu_img(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*qemu_img_command("7.2"), *args], cwd=cwd, capture_output=True,
                          text=True, check=False)


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run(argv + [str(image)], check=True, capture_output=True)


def make_images(directory: Path) -> None:
    """base 8 MiB (data at 0 and 3 MiB), top over it 2 MiB + 1.5 KiB (data at 0),
    d 4 MiB full of data, 4 KiB clusters (so the shrink frees L2 tables and
    refcount blocks)."""
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", str(8 * MiB), cwd=directory)
    qemu_io(directory / "base.qcow2", "write -P 0x11 0 1M", "write -P 0x33 3M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
             str(2 * MiB + 1536), cwd=directory)
    qemu_io(directory / "top.qcow2", "write -P 0x22 0 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "d.qcow2",
             str(4 * MiB), cwd=directory)
    qemu_io(directory / "d.qcow2", "write -P 0x44 0 4M")


COMMANDS = [
    ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                      "file": {"driver": "file", "filename": "top.qcow2", "node-name": "tf"}}),
    ("block_resize", {"node-name": "top", "size": 6 * MiB}),
    ("block_resize", {"node-name": "top", "size": 6 * MiB + 100}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "d",
                      "file": {"driver": "file", "filename": "d.qcow2", "node-name": "df"}}),
    ("block_resize", {"node-name": "d", "size": MiB + 512}),
    ("query-named-block-nodes", {"flat": True}),
    ("block_resize", {"node-name": "d", "size": 4 * MiB}),
    ("blockdev-del", {"node-name": "top"}),
    ("blockdev-del", {"node-name": "d"}),
]


def normalised(reply: dict) -> dict:
    """Generated node names carry random digits; actual-size is the host's."""
    text = json.dumps(reply)
    for node in reply.get("return", []) if isinstance(reply.get("return"), list) else []:
        if node.get("node-name", "").startswith("#block"):
            text = text.replace(node["node-name"], "#block")
    parsed = json.loads(text)
    if isinstance(parsed.get("return"), list):
        for node in parsed["return"]:
            node.get("image", {}).pop("actual-size", None)
    return parsed


def run(kind: str, version: str, directory: Path) -> list[dict]:
    replies = []
    with DaemonProcess(kind, version=version, workdir=directory) as daemon:
        session = QMPSession(daemon, timeout=60)
        try:
            for name, arguments in COMMANDS:
                replies.append(normalised(session.command(name, arguments)))
        finally:
            session.close()
    return replies


def extents(image: Path) -> list[dict]:
    out = qemu_img("map", "--output=json", str(image), cwd=image.parent)
    assert out.returncode == 0, out.stderr
    return [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(out.stdout)]


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_qcow2_resize_matches_qsd(tmp_path: Path, version: str) -> None:
    dirs, expected, actual = run_on_copies(tmp_path, version, make_images, run)
    assert actual == expected
    # Only the unaligned size is refused; everything else happened.
    assert [i for i, reply in enumerate(expected) if "error" in reply] == [2], expected
    for name in ("top.qcow2", "d.qcow2"):
        ours, theirs = dirs["qmpjobd"] / name, dirs["qsd"] / name
        check = qemu_img("check", str(ours), cwd=ours.parent)
        assert check.returncode == 0, check.stdout + check.stderr
        compare = qemu_img("compare", str(theirs), str(ours), cwd=ours.parent)
        assert compare.returncode == 0, compare.stdout + compare.stderr
        assert extents(ours) == extents(theirs)
        info = [json.loads(qemu_img("info", "--output=json", str(p), cwd=p.parent).stdout)
                for p in (ours, theirs)]
        assert info[0]["virtual-size"] == info[1]["virtual-size"]
    # The overlay's new area hides the backing file: [2 MiB + 1.5 KiB, 6 MiB) reads
    # zeroes although base has data at 3 MiB.
    data = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 3M 1M",
                           str(dirs["qmpjobd"] / "top.qcow2")],
                          capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in data.stdout, data.stdout
