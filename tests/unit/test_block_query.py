"""query-named-block-nodes values, as qemu-storage-daemon 7.2 reported them for the
same blockdev-add arguments (recorded with scratch scripts against the oracle)."""

from __future__ import annotations

import pathlib

import pytest

from qmpjobd.block.graph import BlockGraph
from qmpjobd.block.query import named_block_nodes

THROTTLE = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}
CACHE = {"writeback": True, "direct": False, "no-flush": False}


def info(file: str, name: str, drv: str, image: dict, ro: bool = False) -> dict:
    return {"file": file, "node-name": name, "ro": ro, "drv": drv, "backing_file_depth": 0,
            "encrypted": False, "detect_zeroes": "off", **THROTTLE, "image": image,
            "cache": CACHE, "write_threshold": 0}


@pytest.fixture
def graph() -> BlockGraph:
    return BlockGraph(jobs=None)


def test_null_nodes(graph: BlockGraph) -> None:
    graph.add({"driver": "null-co", "node-name": "n0"})
    graph.add({"driver": "null-co", "node-name": "n1", "size": 1000})
    graph.add({"driver": "null-co", "node-name": "n2", "read-zeroes": True, "latency-ns": 5})
    got = named_block_nodes(graph, flat=True)
    rz = 'json:{"read-zeroes": true, "driver": "null-co"}'
    sz = 'json:{"driver": "null-co", "size": 1000}'
    assert got == [
        info(rz, "n2", "null-co", {"filename": rz, "format": "null-co", "actual-size": 0,
                                   "virtual-size": 1 << 30}),
        info(sz, "n1", "null-co", {"filename": sz, "format": "null-co", "actual-size": 0,
                                   "virtual-size": 1024}),
        info("null-co://", "n0", "null-co", {"filename": "null-co://", "format": "null-co",
                                             "actual-size": 0, "virtual-size": 1 << 30}),
    ]
    # Built in QAPI declaration order (the encoder derives QEMU's wire order from it).
    assert list(got[0]) == ["file", "node-name", "ro", "drv", "backing_file_depth", "encrypted",
                            "detect_zeroes", "bps", "bps_rd", "bps_wr", "iops", "iops_rd",
                            "iops_wr", "image", "cache", "write_threshold"]


def test_raw_names(graph: BlockGraph) -> None:
    graph.add({"driver": "null-co", "node-name": "n0"})
    graph.add({"driver": "raw", "node-name": "pass", "file": "n0"})
    graph.add({"driver": "raw", "node-name": "inl", "file": {"driver": "null-co", "size": 1000}})
    files = {i["node-name"]: i["file"] for i in named_block_nodes(graph)}
    assert files["pass"] == "null-co://"
    assert files["inl"] == 'json:{"driver": "raw", "file": {"driver": "null-co", "size": 1000}}'


def test_file_raw_blkdebug(graph: BlockGraph, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "d.raw"
    path.write_bytes(b"\1" * (1 << 20))
    graph.add({"driver": "raw", "node-name": "win", "offset": 512, "size": 4096,
               "file": {"driver": "file", "filename": str(path), "aio": "threads"}})
    graph.add({"driver": "blkdebug", "node-name": "b1", "image": {"driver": "file", "filename": str(path)}})
    graph.add({"driver": "blkdebug", "node-name": "b2",
               "image": {"driver": "file", "filename": str(path)},
               "inject-error": [{"event": "read_aio", "once": True},
                                {"event": "write_aio", "errno": 28, "sector": 5, "iotype": "write"}]})
    graph.add({"driver": "raw", "node-name": "r8", "read-only": True,
               "file": {"driver": "blkdebug", "inject-error": [{"event": "read_aio", "errno": 5}],
                        "image": {"driver": "file", "filename": str(path)}}})
    nodes = {i["node-name"]: i for i in named_block_nodes(graph)}
    p = str(path)
    assert nodes["win"]["file"] == ('json:{"offset": 512, "driver": "raw", "size": 4096, '
                                    f'"file": {{"driver": "file", "filename": "{p}"}}}}')
    assert nodes["win"]["image"]["virtual-size"] == 4096
    assert nodes["b1"]["file"] == f"blkdebug::{p}"
    # Not flat: a filter shows the node below it as its backing image (checked
    # against qemu-storage-daemon 7.2).
    file_image = {"filename": p, "format": "file", "dirty-flag": False,
                  "actual-size": 1 << 20, "virtual-size": 1 << 20}
    assert nodes["b1"]["image"] == {"filename": f"blkdebug::{p}", "format": "blkdebug",
                                    "dirty-flag": False, "virtual-size": 1 << 20,
                                    "backing-image": file_image}
    assert nodes["b1"]["backing_file_depth"] == 1
    flat = {i["node-name"]: i for i in named_block_nodes(graph, flat=True)}
    assert "backing-image" not in flat["b1"]["image"]
    assert flat["b1"]["backing_file_depth"] == 0
    assert nodes["b2"]["file"] == (
        'json:{"inject-error.0.once": true, "image": {"driver": "file", "filename": "' + p + '"}, '
        '"driver": "blkdebug", "inject-error.1.iotype": "write", "inject-error.0.event": "read_aio", '
        '"inject-error.1.event": "write_aio", "inject-error.1.errno": 28, "inject-error.1.sector": 5}')
    assert nodes["r8"]["file"] == (
        'json:{"driver": "raw", "file": {"image": {"driver": "file", "filename": "' + p + '"}, '
        '"driver": "blkdebug", "inject-error.0.errno": 5, "inject-error.0.event": "read_aio"}}')
    assert nodes["r8"]["ro"] is True
    assert "actual-size" not in nodes["r8"]["image"]
    children = [i for name, i in nodes.items() if name.startswith("#")]
    assert all(c["drv"] in ("file", "blkdebug") for c in children)
    assert [c["ro"] for c in children if c["drv"] == "file"].count(True) == 1
