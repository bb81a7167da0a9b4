"""The copy-before-write filter, snapshot-access and the block-copy state they share
with the backup job, on a real block graph over raw files (no sockets)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from qmpjobd.block.drivers.copy_before_write import BlockCopyState, DirtyClusters
from qmpjobd.block.dirty_bitmap import DirtyBitmap
from qmpjobd.block.graph import BlockGraph
from qmpjobd.errors import QMPError
from qmpjobd.job.clock import RealClock
from qmpjobd.job.manager import JobManager

KiB = 1024
MiB = 1024 * KiB
SIZE = 1 * MiB
CLUSTER = 64 * KiB


def make_graph(tmp_path: Path) -> BlockGraph:
    jobs = JobManager(lambda name, data: None, RealClock())
    graph = BlockGraph(jobs)
    for name, fill in (("disk", b"\x11"), ("scratch", b"\x00")):
        (tmp_path / f"{name}.raw").write_bytes(fill * SIZE)
        graph.add({"driver": "file", "node-name": name,
                   "filename": str(tmp_path / f"{name}.raw")})
    return graph


def failing_target(graph: BlockGraph) -> None:
    """``bad``: the scratch file behind blkdebug, every write failing with EIO."""
    graph.add({"driver": "blkdebug", "node-name": "bad", "image": "scratch",
               "inject-error": [{"event": "pwritev", "errno": errno.EIO}]})


def fleecing(graph: BlockGraph, target: str = "scratch", **cbw_options: object) -> tuple:
    cbw = graph.add({"driver": "copy-before-write", "node-name": "cbw", "file": "disk",
                     "target": target, **cbw_options})
    access = graph.add({"driver": "snapshot-access", "node-name": "access", "file": "cbw"})
    return cbw, access


def run(coro):
    """Step ``coro`` as the NBD server steps a client's request (blkdebug's errors
    come back through a main-loop turn, which only a stepped coroutine can take)."""
    from qmpjobd.nbd.server import run_node_io

    async def main():
        return await run_node_io(coro)
    return asyncio.run(main())


def test_write_through_the_filter_saves_old_data_once(tmp_path):
    graph = make_graph(tmp_path)
    cbw, access = fleecing(graph)
    copied: list[int] = []
    cbw.state.on_copied = copied.append

    async def scenario():
        await cbw.co_pwrite(70 * KiB, b"\x22" * 4 * KiB)     # inside cluster 1
        await cbw.co_pwrite(64 * KiB, b"\x33" * 8 * KiB)     # same cluster again
        return (await graph.find("disk").co_pread(64 * KiB, 16 * KiB),
                await access.co_pread(0, 192 * KiB),
                await graph.find("scratch").co_pread(64 * KiB, CLUSTER))

    source, snapshot, saved = run(scenario())
    assert copied == [CLUSTER]            # the second write found it copied
    assert source == b"\x33" * 8 * KiB + b"\x22" * 2 * KiB + b"\x11" * 6 * KiB
    assert snapshot == b"\x11" * 192 * KiB
    assert saved == b"\x11" * CLUSTER
    assert cbw.state.done.dirty_bytes == CLUSTER
    assert cbw.state.copy_bitmap.dirty_bytes == SIZE - CLUSTER


def test_zero_writes_and_discards_copy_first(tmp_path):
    graph = make_graph(tmp_path)
    cbw, access = fleecing(graph, discard="unmap")

    async def scenario():
        await cbw.co_pwrite_zeroes(0, CLUSTER)
        await cbw.co_pdiscard(3 * CLUSTER, CLUSTER)
        return await access.co_pread(0, 4 * CLUSTER)

    assert run(scenario()) == b"\x11" * 4 * CLUSTER
    assert cbw.state.done.dirty_bytes == 2 * CLUSTER


def test_snapshot_refuses_writes_and_discard_drops_access(tmp_path):
    graph = make_graph(tmp_path)
    _, access = fleecing(graph)

    async def write():
        await access.co_pwrite(0, b"x")

    with pytest.raises(OSError) as failure:
        run(write())
    assert failure.value.errno == errno.ENOTSUP

    async def discard_then_read():
        await access._pdiscard(0, 2 * CLUSTER + 5)     # whole clusters only: 0 and 1
        assert await access.co_pread(2 * CLUSTER, CLUSTER) == b"\x11" * CLUSTER
        await access.co_pread(CLUSTER, 1)

    with pytest.raises(OSError) as failure:
        run(discard_then_read())
    assert failure.value.errno == errno.EACCES


def test_bitmap_limits_what_is_protected_and_readable(tmp_path):
    graph = make_graph(tmp_path)
    disk = graph.find("disk")
    bitmap = DirtyBitmap(SIZE, CLUSTER, "b0")
    disk.add_dirty_bitmap(bitmap)
    bitmap.set_dirty(CLUSTER, CLUSTER)
    cbw, access = fleecing(graph, bitmap={"node": "disk", "name": "b0"})

    async def scenario():
        await cbw.co_pwrite(0, b"\x44" * 2 * CLUSTER)
        inside = await access.co_pread(CLUSTER, CLUSTER)
        try:
            await access.co_pread(0, 1)
        except OSError as exc:
            return inside, exc.errno
        return inside, 0

    inside, outside = run(scenario())
    assert inside == b"\x11" * CLUSTER and outside == errno.EACCES
    # Only the bitmap's cluster was saved.
    assert cbw.state.done.runs() == [(CLUSTER, CLUSTER)]


def test_bitmap_option_errors(tmp_path):
    graph = make_graph(tmp_path)
    bitmap = DirtyBitmap(SIZE, CLUSTER, "b0")
    graph.find("disk").add_dirty_bitmap(bitmap)
    with pytest.raises(QMPError, match="Dirty bitmap 'nosuch' not found"):
        fleecing(graph, bitmap={"node": "disk", "name": "nosuch"})
    with pytest.raises(QMPError, match="Node 'nope' not found"):
        fleecing(graph, bitmap={"node": "nope", "name": "b0"})
    bitmap.busy = True
    with pytest.raises(QMPError) as failure:
        fleecing(graph, bitmap={"node": "disk", "name": "b0"})
    assert str(failure.value) == (
        "Cannot create block-copy-state: Failed to merge bitmap 'b0' to internal "
        "copy-bitmap: Bitmap 'b0' is currently in use by another operation and cannot "
        "be used")


def test_break_snapshot_lets_the_write_through(tmp_path):
    graph = make_graph(tmp_path)
    failing_target(graph)                           # every copy fails
    cbw, access = fleecing(graph, "bad", **{"on-cbw-error": "break-snapshot"})

    async def scenario():
        await cbw.co_pwrite(0, b"\x55" * 512)
        data = await graph.find("disk").co_pread(0, 512)
        try:
            await access.co_pread(CLUSTER, 1)
        except OSError as exc:
            return data, exc.errno
        return data, 0

    assert run(scenario()) == (b"\x55" * 512, errno.EACCES)


def test_break_guest_write_fails_the_write_and_keeps_the_source(tmp_path):
    graph = make_graph(tmp_path)
    failing_target(graph)
    cbw, access = fleecing(graph, "bad")

    async def scenario():
        try:
            await cbw.co_pwrite(0, b"\x55" * 512)
        except OSError as exc:
            code = exc.errno
        return code, await graph.find("disk").co_pread(0, 512), await access.co_pread(0, 512)

    code, source, snapshot = run(scenario())
    assert code == errno.EIO and source == snapshot == b"\x11" * 512
    assert cbw.state.copy_bitmap.dirty_bytes == SIZE     # nothing lost: still to copy


def test_a_write_waits_for_a_copy_in_flight(tmp_path):
    """The backup job claims clusters before copying them; a write to those
    clusters waits for that copy instead of copying again."""
    graph = make_graph(tmp_path)
    disk, scratch = graph.find("disk"), graph.find("scratch")
    state = BlockCopyState(disk, scratch)
    order: list[str] = []

    async def job_copy(claim):
        await asyncio.sleep(0)
        await state.copy_extent(0, CLUSTER)
        order.append("job copied")
        state.release(claim, ok=True)

    async def guest_write():
        await state.copy_before_write(0, 512)
        order.append("guest may write")

    async def scenario():
        claim = state.claim(0, CLUSTER)
        await asyncio.gather(job_copy(claim), guest_write())

    run(scenario())
    assert order == ["job copied", "guest may write"]
    # Copied once, by the job; its copy is not the snapshot's ``done``.
    assert state.copy_bitmap.runs() == [(CLUSTER, SIZE - CLUSTER)]
    assert state.done.runs() == []


def test_dirty_cluster_runs():
    clusters = DirtyClusters(10 * CLUSTER + 5, CLUSTER, fill=False)
    clusters.set(CLUSTER, 2 * CLUSTER, dirty=True)
    clusters.set(10 * CLUSTER, 1, dirty=True)
    assert clusters.runs() == [(CLUSTER, 2 * CLUSTER), (10 * CLUSTER, CLUSTER)]
    assert clusters.runs(2 * CLUSTER, 3 * CLUSTER) == [(2 * CLUSTER, CLUSTER)]
    assert clusters.next_dirty_area(0, 4 * CLUSTER, end=CLUSTER) is None
