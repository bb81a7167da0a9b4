"""The permission rules, the conflict checker and the OFD lock bytes, without a daemon.

The expected values are the ones qemu-storage-daemon shows in
x-debug-query-block-graph for the same graphs (the conformance scenarios
block_graph/block_locking/block_reopen compare the daemons themselves).
"""

from __future__ import annotations

import fcntl
import os
import struct

import pytest

from qmpjobd.block import permissions as P
from qmpjobd.block.graph import BlockGraph
from qmpjobd.block.locking import PERM_BASE, SHARED_BASE, ImageLocks, byte_locked_by_others
from qmpjobd.commands.graph_debug import block_graph
from qmpjobd.errors import QMPError
from qmpjobd.job.clock import VirtualClock
from qmpjobd.job.manager import JobManager

CR, W, WU, RS = P.CONSISTENT_READ, P.WRITE, P.WRITE_UNCHANGED, P.RESIZE


@pytest.fixture
def graph() -> BlockGraph:
    return BlockGraph(JobManager(emit=lambda name, data: None, clock=VirtualClock()))


def edge(graph, node, name):
    _, parents, _ = P.compute(graph)
    child = node.children[name]
    return next(e for e in parents[id(child)] if getattr(e, "parent", None) is node)


def test_names_in_qemu_order():
    assert P.perm_names(W | RS) == "write, resize"
    assert P.perm_names(CR) == "consistent read"
    # x-debug-query-block-graph lists the highest bit first.
    assert P.qapi_perm_list(P.ALL) == ["resize", "write-unchanged", "write", "consistent-read"]
    assert P.qapi_perm_list(0) == []


def test_raw_without_window_takes_nothing_on_its_file(graph, tmp_path):
    image = tmp_path / "a.raw"
    image.write_bytes(bytes(65536))
    graph.add({"driver": "file", "node-name": "f0", "filename": str(image)})
    raw = graph.add({"driver": "raw", "node-name": "r0", "file": "f0"})
    file_edge = edge(graph, raw, "file")
    assert (file_edge.perm, file_edge.shared) == (0, P.ALL)
    window = graph.add({"driver": "raw", "node-name": "r1", "file": "f0", "offset": 512,
                        "size": 4096})
    window_edge = edge(graph, window, "file")
    assert (window_edge.perm, window_edge.shared) == (0, P.ALL & ~RS)


def test_storage_and_cow_rules():
    class Node:
        read_only = False
        active = True
        options: dict = {}
        parent_nodes: list = []

    node = Node()
    # A writable qcow2 root: its file (data + metadata) edge, and its backing edge.
    assert P.default_perms(node, P.ROLE_IMAGE, 0, P.ALL) == (CR | W | RS, CR | WU)
    assert P.default_perms(node, P.ROLE_COW, 0, P.ALL) == (0, P.ALL)
    node.read_only = True
    assert P.default_perms(node, P.ROLE_IMAGE, 0, P.ALL) == (CR, CR | WU)
    # A backing file below a parent that does not share writes: nobody may write it.
    assert P.default_perms(node, P.ROLE_COW, CR, CR | WU) == (CR, CR | WU)
    # An inactive node shares write and resize on its children.
    node.active = False
    assert P.default_perms(node, P.ROLE_IMAGE, 0, P.ALL)[1] == CR | W | WU | RS


def test_conflict_names_the_older_user_first():
    class Node:
        node_name = "f"

    class Parent:
        def __init__(self, name):
            self.node_name = name

    older = P.NodeEdge(Parent("a"), "file", Node(), CR | W | RS, CR | WU, seq=1)
    newer = P.NodeEdge(Parent("b"), "file", Node(), CR | W | RS, CR | WU, seq=2)
    error = P._conflict(Node(), [newer, older])
    assert error is not None
    assert error.desc == (
        "Permission conflict on node 'f': permissions 'write, resize' are both required "
        "by node 'a' (uses node 'f' as 'file' child) and unshared by node 'b' (uses node "
        "'f' as 'file' child).")
    reader = P.NodeEdge(Parent("c"), "file", Node(), CR, P.ALL, seq=3)
    assert P._conflict(Node(), [reader]) is None


def other_fd_holds(path, offset) -> bool:
    """Whether a lock of the holder is visible from a third open file description."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return byte_locked_by_others(fd, offset)
    finally:
        os.close(fd)


def test_lock_bytes_are_qemus(tmp_path):
    path = str(tmp_path / "img")
    with open(path, "wb") as handle:
        handle.write(bytes(4096))
    holder_fd, other_fd = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        holder = ImageLocks(holder_fd, enabled=True)
        holder.prepare(CR | W | RS, CR | WU)
        holder.commit(CR | W | RS, CR | WU)
        assert [other_fd_holds(path, PERM_BASE + i) for i in range(4)] == [True, True, False, True]
        assert [other_fd_holds(path, SHARED_BASE + i) for i in range(4)] == [False, True, False, True]
        other = ImageLocks(other_fd, enabled=True)
        with pytest.raises(QMPError, match='^Failed to get "write" lock$'):
            other.prepare(CR | W | RS, CR | WU)
        with pytest.raises(QMPError, match='^Failed to get shared "write" lock$'):
            other.prepare(CR, CR | WU)
        # A refused prepare leaves no byte of its own behind.
        assert (other.locked_perm, other.locked_unshared) == (0, 0)
        other.prepare(CR, P.ALL)            # a reader that shares everything fits
        other.commit(CR, P.ALL)
        # Loosening unlocks: the holder becomes a plain reader.
        holder.prepare(CR, P.ALL)
        holder.commit(CR, P.ALL)
        assert not other_fd_holds(path, PERM_BASE + 1)
        assert not other_fd_holds(path, SHARED_BASE + 1)
    finally:
        os.close(holder_fd)
        os.close(other_fd)


def test_locking_off_takes_and_tests_nothing(tmp_path):
    path = str(tmp_path / "img")
    with open(path, "wb") as handle:
        handle.write(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    try:
        ImageLocks(fd, enabled=False).prepare(P.ALL, 0)
        assert not any(other_fd_holds(path, PERM_BASE + i) for i in range(4))
    finally:
        os.close(fd)


def test_users_on_two_file_nodes_of_one_image_see_each_others_locks(graph, tmp_path):
    image = tmp_path / "a.raw"
    image.write_bytes(bytes(65536))
    graph.add({"driver": "raw", "node-name": "r0",
               "file": {"driver": "file", "filename": str(image), "node-name": "f0"}})
    graph.add({"driver": "raw", "node-name": "r1",
               "file": {"driver": "file", "filename": str(image), "node-name": "f1"}})

    class Job:
        job_type, id, is_block_job = "mirror", "m0", True

    job = Job()
    # A mirror's target BlockBackend writes and shares only unchanged writes.
    P.attach_backend(graph, graph.find("r0"), job, "mirror-target")
    assert other_fd_holds(str(image), PERM_BASE + 1)
    assert other_fd_holds(str(image), SHARED_BASE)
    export = object()
    with pytest.raises(QMPError, match='^Failed to get "consistent read" lock$'):
        P.attach_backend(graph, graph.find("r1"), export, "export")
    # The refused user is gone; once the writer goes, the reader fits.
    assert all(e.owner is not export for e in P.registry_of(graph).users)
    P.detach_owner(graph, job)
    assert not other_fd_holds(str(image), PERM_BASE + 1)
    P.attach_backend(graph, graph.find("r1"), export, "export")
    assert other_fd_holds(str(image), PERM_BASE)


def test_graph_ids_follow_qemus_walk(graph, tmp_path):
    image = tmp_path / "a.raw"
    image.write_bytes(bytes(65536))
    graph.add({"driver": "file", "node-name": "f0", "filename": str(image)})
    graph.add({"driver": "raw", "node-name": "r0", "file": "f0"})
    graph.add({"driver": "null-co", "node-name": "n0"})
    result = block_graph(graph, [])
    assert result["nodes"] == [
        {"id": 3, "type": "block-driver", "name": "n0"},
        {"id": 2, "type": "block-driver", "name": "r0"},
        {"id": 1, "type": "block-driver", "name": "f0"}]
    assert result["edges"] == [{"parent": 2, "child": 1, "name": "file", "perm": [],
                                "shared-perm": ["resize", "write-unchanged", "write",
                                                "consistent-read"]}]


def test_lock_struct_layout_matches_the_kernel():
    # struct flock is 32 bytes on the 64-bit Linux ABIs QEMU runs on.
    assert struct.calcsize("hhqqi4x") == 32
    assert fcntl.F_OFD_SETLK and fcntl.F_OFD_GETLK
