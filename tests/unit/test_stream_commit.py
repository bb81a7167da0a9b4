"""The chain helpers of block-stream/block-commit below the command layer: layer
allocation, overlays, the header rewrite (read back by qemu-img), and the graph
relinking of the filters (the socket-level behaviour is compared with
qemu-storage-daemon in tests/conformance/scenarios/block_stream*.qmp and
block_commit*.qmp)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qmpjobd.block.drivers.commit_top import CommitTopNode
from qmpjobd.block.drivers.copy_on_read import CopyOnReadNode
from qmpjobd.block.formats.qcow2.backing import (
    UNALLOCATED,
    chain_contains,
    change_backing_file,
    cow_child,
    find_overlay,
    layer_status,
    status_in_layers,
)
from qmpjobd.block.graph import BlockGraph
from qmpjobd.commands.stream_commit import find_backing_image
from qmpjobd.errors import QMPError
from qmpjobd.job.manager import JobManager

MiB = 1 << 20


def run(*words: str, cwd: Path) -> None:
    subprocess.run(list(words), cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[BlockGraph, Path]:
    """base (0x11 in MiB 0) <- mid (0x22 in MiB 1, zero clusters in MiB 3) <- top
    (0x33 in MiB 2), opened as six nodes."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=tmp_path)
    run("qemu-io", "-c", "write -P 0x11 0 1M", "base.qcow2", cwd=tmp_path)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        "mid.qcow2", "4M", cwd=tmp_path)
    run("qemu-io", "-c", "write -P 0x22 1M 1M", "-c", "write -z 3M 1M", "mid.qcow2",
        cwd=tmp_path)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
        "top.qcow2", "4M", cwd=tmp_path)
    run("qemu-io", "-c", "write -P 0x33 2M 1M", "top.qcow2", cwd=tmp_path)
    # Relative names, as the images' headers have them (a daemon's working directory).
    monkeypatch.chdir(tmp_path)
    graph = BlockGraph(jobs=JobManager(lambda name, data: None, clock=None))
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        graph.add({"driver": "file", "node-name": f"{name}-file",
                   "filename": f"{name}.qcow2"})
        graph.add({"driver": "qcow2", "node-name": name, "file": f"{name}-file",
                   "backing": backing})
    return graph, tmp_path


def test_layers_answer_for_themselves(chain) -> None:
    graph, _ = chain
    top, mid, base = (graph.find(n) for n in ("top", "mid", "base"))
    assert layer_status(top, 0, 4 * MiB) == (UNALLOCATED, 2 * MiB)
    assert layer_status(top, 2 * MiB, 2 * MiB) == ("data", MiB)
    assert layer_status(mid, 3 * MiB, MiB) == ("zero", MiB)
    # Down the chain: the first layer holding the extent answers.
    assert status_in_layers(top, base, 0, MiB) == ("data", MiB)
    assert status_in_layers(top, mid, 0, MiB) == (UNALLOCATED, MiB)
    assert status_in_layers(mid, mid, 3 * MiB, MiB) == ("zero", MiB)


def test_overlays_and_chain_membership(chain) -> None:
    graph, _ = chain
    top, mid, base = (graph.find(n) for n in ("top", "mid", "base"))
    assert cow_child(top) is mid and cow_child(base) is None
    assert find_overlay(top, base) is mid
    assert find_overlay(top, None) is base
    assert find_overlay(mid, top) is None
    assert chain_contains(top, base) and not chain_contains(mid, top)
    assert find_backing_image(top, "base.qcow2") is base
    assert find_backing_image(top, "mid.qcow2") is mid
    assert find_backing_image(top, "top.qcow2") is None


def test_header_rewrite_is_what_qemu_img_reads(chain) -> None:
    graph, directory = chain
    top = graph.find("top")
    change_backing_file(top, "base.qcow2", "qcow2")
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", "top.qcow2"],
                                     cwd=directory, capture_output=True, check=True).stdout)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("base.qcow2", "qcow2")
    change_backing_file(top, None, None)
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", "top.qcow2"],
                                     cwd=directory, capture_output=True, check=True).stdout)
    assert "backing-filename" not in info
    # No backing name means no backing-format extension either (offset 0).
    assert (directory / "top.qcow2").read_bytes()[8:16] == bytes(8)
    with pytest.raises(OSError):
        change_backing_file(top, "x" * 1024, "qcow2")
    assert top.image.header.backing_file is None


def test_filter_insertion_takes_over_parents_and_gives_them_back(chain) -> None:
    graph, _ = chain
    top, mid = graph.find("top"), graph.find("mid")
    blocker = [b.reason for b in mid.blockers]
    node = graph.insert_filter_above(CommitTopNode, None, mid)
    assert top.backing_node() is node and node.backing_node() is mid
    assert top in node.parent_nodes and top not in mid.parent_nodes
    assert node.filename() == "mid.qcow2" and node.read_only
    # top's backing blocker went with its link.
    assert [b.reason for b in node.blockers] == blocker
    graph.remove_filter_from_chain(node)
    assert top.backing_node() is mid and [b.reason for b in mid.blockers] == blocker


def test_copy_on_read_options(chain) -> None:
    graph, _ = chain
    with pytest.raises(QMPError, match="Bottom node 'nosuch' not found"):
        graph.add({"driver": "copy-on-read", "node-name": "c", "file": "top",
                   "bottom": "nosuch"})
    node = graph.add({"driver": "copy-on-read", "node-name": "c", "file": "top",
                      "bottom": "mid"})
    assert isinstance(node, CopyOnReadNode) and node.bottom is graph.find("mid")
    assert node.filename().startswith('json:{"driver": "copy-on-read"')
