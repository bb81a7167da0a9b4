"""External snapshots and resizing below the command layer: the graph's append and
its undo, the read-only reopen, node truncation per driver, and the qcow2 resize
on an in-memory image (the socket-level behaviour is compared with
qemu-storage-daemon in the conformance scenarios and integration tests)."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from qmpjobd.block.formats.qcow2.create import CreateOptions, create_image
from qmpjobd.block.formats.qcow2.image import Qcow2Image
from qmpjobd.block.formats.qcow2.resize import resize
from qmpjobd.block.formats.qcow2.storage import MemoryStorage
from qmpjobd.block.graph import BlockGraph
from qmpjobd.commands.snapshot import (
    lookup_bs,
    qcow2_image_bytes,
    set_read_only,
    write_backing_name,
)
from qmpjobd.errors import QMPError
from qmpjobd.job.manager import JobManager

MiB = 1 << 20


@pytest.fixture
def graph() -> BlockGraph:
    return BlockGraph(jobs=JobManager(lambda name, data: None, clock=None))


def qcow2_file(path: Path, size: int = 4 * MiB, backing: str | None = None) -> None:
    path.write_bytes(qcow2_image_bytes(size, backing, "qcow2" if backing else None))


def error_of(fn, *args) -> str:
    with pytest.raises(QMPError) as info:
        fn(*args)
    return info.value.desc


# --- lookups ----------------------------------------------------------------------------


def test_lookup_never_finds_a_device(graph: BlockGraph) -> None:
    graph.add({"driver": "null-co", "node-name": "n"})
    assert lookup_bs(graph, None, "n").node_name == "n"
    assert error_of(lookup_bs, graph, "n", None) == "Cannot find device='n' nor node-name=''"
    assert error_of(lookup_bs, graph, None, "x") == "Cannot find device='' nor node-name='x'"


# --- append and undo ---------------------------------------------------------------------


def test_append_moves_parents_and_undo_restores_them(graph: BlockGraph, tmp_path: Path) -> None:
    qcow2_file(tmp_path / "base.qcow2")
    qcow2_file(tmp_path / "ov.qcow2")
    base = graph.add({"driver": "qcow2", "node-name": "base", "backing": None,
                      "file": {"driver": "file", "filename": str(tmp_path / "base.qcow2")}})
    raw = graph.add({"driver": "raw", "node-name": "r", "file": "base"})
    ov = graph.add({"driver": "qcow2", "node-name": "ov", "backing": None,
                    "file": {"driver": "file", "filename": str(tmp_path / "ov.qcow2")}})
    undo = graph.append_overlay(ov, base)
    assert raw.children["file"] is ov and ov.backing_node() is base
    assert list(ov.children) == ["backing", "file"]
    assert ov in base.parent_nodes and raw not in base.parent_nodes
    assert error_of(base.check_not_busy) == "Node 'base' is busy: node is used as backing hd of 'ov'"
    undo()
    assert raw.children["file"] is base and ov.backing_node() is None
    assert base.parent_nodes == [raw] and ov.parent_nodes == []
    base.check_not_busy()


def test_append_refuses_a_cycle(graph: BlockGraph, tmp_path: Path) -> None:
    qcow2_file(tmp_path / "q.qcow2")
    q = graph.add({"driver": "qcow2", "node-name": "q", "backing": None,
                   "file": {"driver": "file", "filename": str(tmp_path / "q.qcow2")}})
    r = graph.add({"driver": "raw", "node-name": "r", "file": "q"})
    assert error_of(graph.append_overlay, q, r) == \
        "Making 'r' a backing child of 'q' would create a cycle"
    assert q.backing_node() is None and r.children["file"] is q


def test_read_only_follows_implicit_children_only(graph: BlockGraph, tmp_path: Path) -> None:
    qcow2_file(tmp_path / "a.qcow2")
    qcow2_file(tmp_path / "b.qcow2")
    a = graph.add({"driver": "qcow2", "node-name": "a", "backing": None,
                   "file": {"driver": "file", "filename": str(tmp_path / "a.qcow2")}})
    graph.add({"driver": "file", "node-name": "bf", "filename": str(tmp_path / "b.qcow2")})
    b = graph.add({"driver": "qcow2", "node-name": "b", "file": "bf", "backing": None})
    set_read_only(a, True)
    set_read_only(b, True)
    assert a.read_only and a.children["file"].read_only and a.image.read_only
    assert b.read_only and not b.children["file"].read_only


def test_backing_name_written_and_empty_name_kept_as_qemu_does(graph: BlockGraph,
                                                                tmp_path: Path) -> None:
    qcow2_file(tmp_path / "t.qcow2", backing="old.qcow2")
    node = graph.add({"driver": "qcow2", "node-name": "t", "backing": None,
                      "file": {"driver": "file", "filename": str(tmp_path / "t.qcow2")}})
    write_backing_name(node, "new.qcow2", "qcow2")
    data = (tmp_path / "t.qcow2").read_bytes()
    offset, size = struct.unpack_from(">QI", data, 8)
    assert data[offset:offset + size] == b"new.qcow2"
    write_backing_name(node, "", "qcow2")
    data = (tmp_path / "t.qcow2").read_bytes()
    offset, size = struct.unpack_from(">QI", data, 8)
    # A name of length 0 right after the extensions; the format extension stays.
    assert offset != 0 and size == 0 and b"qcow2" in data[112:offset]
    assert node.image.header.backing_file is None
    assert "backing-filename" not in node.image_details()


# --- truncation by driver ---------------------------------------------------------------


def test_file_and_raw_truncate(graph: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "f.raw"
    path.write_bytes(bytes(4096))
    file = graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    file.truncate(1000)
    assert path.stat().st_size == 1000 and file.size == 1024
    raw = graph.add({"driver": "raw", "node-name": "r", "offset": 512,
                     "file": {"driver": "file", "filename": str(path)}})
    raw.truncate(8192)
    assert path.stat().st_size == 8704 and raw.size == 8192
    fixed = graph.add({"driver": "raw", "node-name": "w", "size": 512,
                       "file": {"driver": "file", "filename": str(path)}})
    assert error_of(fixed.truncate, 4096) == "Cannot resize fixed-size raw disks"
    assert error_of(file.truncate, -1) == "Cannot truncate to a negative size"
    assert error_of(file.truncate, 1 << 63) == \
        "offset(9223372036854775808) exceeds maximum(9223372035781033984)"


def test_null_and_read_only_nodes_refuse(graph: BlockGraph, tmp_path: Path) -> None:
    null = graph.add({"driver": "null-co", "node-name": "n"})
    assert error_of(null.truncate, 4096) == "Image format driver does not support resize"
    debug = graph.add({"driver": "blkdebug", "node-name": "d", "image": "n"})
    assert error_of(debug.truncate, 4096) == "Image format driver does not support resize"
    path = tmp_path / "ro.raw"
    path.write_bytes(bytes(512))
    ro = graph.add({"driver": "file", "node-name": "ro", "filename": str(path),
                    "read-only": True})
    assert error_of(ro.truncate, 4096) == "Image is read-only"


# --- qcow2 resize on an in-memory image -----------------------------------------------------


def open_image(storage: MemoryStorage) -> Qcow2Image:
    return asyncio.run(Qcow2Image.open(storage, read_only=False))


def fresh(size: int, **options) -> MemoryStorage:
    storage = MemoryStorage()
    asyncio.run(create_image(storage, CreateOptions(size=size, **options)))
    return storage


def test_qcow2_grow_equals_creating_at_the_new_size_plus_a_freed_l1() -> None:
    storage = fresh(MiB, cluster_size=512)
    image = open_image(storage)
    asyncio.run(resize(image, 64 * MiB))
    reopened = open_image(MemoryStorage(bytes(storage.data)))
    assert reopened.size == 64 * MiB
    assert len(reopened.l1) == 64 * MiB // (512 * 64)


def test_qcow2_unaligned_size_refused() -> None:
    image = open_image(fresh(MiB))
    with pytest.raises(QMPError) as info:
        asyncio.run(resize(image, MiB + 1))
    assert info.value.desc == "The new size must be a multiple of 512"


def test_qcow2_shrink_drops_data_and_keeps_the_l1_length() -> None:
    storage = fresh(4 * MiB, cluster_size=4096)
    image = open_image(storage)

    async def fill_then_shrink() -> None:
        await image.write(0, b"\x44" * (4 * MiB))
        await image.flush()
        await resize(image, MiB + 512)

    asyncio.run(fill_then_shrink())
    reopened = open_image(MemoryStorage(bytes(storage.data)))
    assert reopened.size == MiB + 512
    assert len(reopened.l1) == len(image.l1)
    assert all(entry == 0 for entry in reopened.l1[1:])
    data = asyncio.run(reopened.read(0, MiB + 512))
    assert data == b"\x44" * (MiB + 512)
    # The file ends after its last used cluster.
    last = max(index for index in range(len(storage.data) // 4096)
               if asyncio.run(reopened.get_refcount(index)))
    assert len(storage.data) == (last + 1) * 4096
