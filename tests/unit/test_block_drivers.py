"""Node drivers against real temp files: null-co, file, raw, blkdebug rules."""

from __future__ import annotations

import asyncio
import errno
import os
import pathlib

import pytest

from qmpjobd.block.graph import BlockGraph
from qmpjobd.job.coroutine import CoroutineRunner, Reschedule
from qmpjobd.job.manager import JobManager
from qmpjobd.errors import QMPError
from qmpjobd.job.clock import VirtualClock


def Jobs(clock) -> JobManager:
    """A job manager with no event consumer: these tests look at node I/O only."""
    return JobManager(emit=lambda name, data: None, clock=clock)


def finish_without_yielding(coro):
    """Step a coroutine once; it must complete (QEMU: no yield for null-co)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the request yielded")


@pytest.fixture
def graph() -> BlockGraph:
    return BlockGraph(Jobs(VirtualClock()))


def write_file(path: pathlib.Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# --- null-co -------------------------------------------------------------------

def test_null_defaults_and_rounding(graph: BlockGraph) -> None:
    assert graph.add({"driver": "null-co", "node-name": "a"}).size == 1 << 30
    assert graph.add({"driver": "null-co", "node-name": "b", "size": 1000}).size == 1024


def test_null_io_completes_without_yielding(graph: BlockGraph) -> None:
    node = graph.add({"driver": "null-co", "node-name": "n", "size": 8192})
    assert finish_without_yielding(node.co_pread(0, 4096)) == bytes(4096)
    assert finish_without_yielding(node.co_pwrite(0, b"x" * 512)) is None


def test_null_latency_waits_on_the_daemon_clock() -> None:
    async def scenario() -> None:
        clock = VirtualClock()
        graph = BlockGraph(Jobs(clock))
        node = graph.add({"driver": "null-co", "node-name": "n", "latency-ns": 5000})
        task = asyncio.ensure_future(node.co_pread(0, 512))
        await asyncio.sleep(0)
        assert not task.done()
        clock.advance(4999)
        await asyncio.sleep(0)
        assert not task.done()
        clock.advance(1)
        assert await task == bytes(512)
    asyncio.run(scenario())


def test_null_negative_latency(graph: BlockGraph) -> None:
    with pytest.raises(QMPError, match="latency-ns is invalid"):
        graph.add({"driver": "null-co", "node-name": "n", "latency-ns": -1})


# --- file ----------------------------------------------------------------------

def test_file_open_error(graph: BlockGraph, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.raw"
    with pytest.raises(QMPError) as info:
        graph.add({"driver": "file", "node-name": "f", "filename": str(missing)})
    assert info.value.desc == f"Could not open '{missing}': No such file or directory"


def test_file_read_write_and_rounded_tail(graph: BlockGraph, tmp_path: pathlib.Path) -> None:
    data = os.urandom(1000)
    path = write_file(tmp_path / "f.raw", data)
    node = graph.add({"driver": "file", "node-name": "f", "filename": path})
    assert node.size == 1024          # QEMU reports whole sectors

    async def scenario() -> None:
        assert await node.co_pread(0, 1024) == data + bytes(24)
        await node.co_pwrite(512, b"\xff" * 512)
        with pytest.raises(OSError) as info:
            await node.co_pwrite(1024, b"x")
        assert info.value.errno == errno.EIO
    asyncio.run(scenario())
    # Writing the rounded tail extends the host file, as QEMU does.
    assert pathlib.Path(path).read_bytes() == data[:512] + b"\xff" * 512


def test_file_read_only(graph: BlockGraph, tmp_path: pathlib.Path) -> None:
    path = write_file(tmp_path / "f.raw", bytes(4096))
    node = graph.add({"driver": "file", "node-name": "f", "filename": path, "read-only": True})

    async def scenario() -> None:
        with pytest.raises(OSError) as info:
            await node.co_pwrite(0, b"x" * 512)
        assert info.value.errno == errno.EPERM
    asyncio.run(scenario())


def test_file_block_status_sees_holes(graph: BlockGraph, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        f.seek(2 << 20)
        f.write(b"d" * 65536)
    node = graph.add({"driver": "file", "node-name": "f", "filename": str(path)})
    kind, length = node.block_status(0, 4 << 20)
    if kind == "data":
        pytest.skip("filesystem without SEEK_HOLE support")
    assert (kind, length) == ("zero", 2 << 20)
    assert node.block_status(2 << 20, 1 << 20)[0] == "data"


# --- raw -----------------------------------------------------------------------

def test_raw_window(graph: BlockGraph, tmp_path: pathlib.Path) -> None:
    data = os.urandom(1 << 20)
    path = write_file(tmp_path / "f.raw", data)
    node = graph.add({"driver": "raw", "node-name": "r", "offset": 512, "size": 4096,
                      "file": {"driver": "file", "filename": path}})
    assert node.size == 4096
    assert asyncio.run(node.co_pread(0, 4096)) == data[512:512 + 4096]


@pytest.mark.parametrize("extra, message", [
    ({"offset": 512, "size": 1000}, "Specified size is not multiple of 512"),
    ({"offset": 2000000}, "Offset (2000000) cannot be greater than size of the containing file (1048576)"),
    ({"offset": 1048576, "size": 512}, "The sum of offset (1048576) and size (512) has to be "
                                       "smaller or equal to the  actual size of the containing file (1048576)"),
])
def test_raw_option_errors(graph: BlockGraph, tmp_path: pathlib.Path, extra: dict, message: str) -> None:
    path = write_file(tmp_path / "f.raw", bytes(1 << 20))
    with pytest.raises(QMPError) as info:
        graph.add({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": path}, **extra})
    assert info.value.desc == message
    assert graph.nodes == {}


# --- blkdebug (each case reproduces a qemu-io run against QEMU 7.2) ----------------

def blkdebug_raw(graph: BlockGraph, rules: list, set_state: list | None = None):
    image = {"driver": "null-co", "size": 1 << 20}
    debug = {"driver": "blkdebug", "image": image, "inject-error": rules}
    if set_state:
        debug["set-state"] = set_state
    return graph.add({"driver": "raw", "node-name": "r", "file": debug})


def outcomes(node, ops: list[tuple[str, int, int]]) -> list[str]:
    """Run requests in order; 'ok' or the errno name for each."""
    async def scenario() -> list[str]:
        results = []
        for op, offset, length in ops:
            try:
                if op == "read":
                    await node.co_pread(offset, length)
                else:
                    await node.co_pwrite(offset, bytes(length))
                results.append("ok")
            except OSError as exc:
                results.append(errno.errorcode[exc.errno])
        return results

    async def in_job_engine() -> list[str]:
        # Node I/O runs inside job coroutines, stepped by the job engine.
        finished = asyncio.get_running_loop().create_future()
        runner = CoroutineRunner(scenario(), on_done=lambda r: finished.set_result(r.result))
        runner.enter()
        return await finished
    return asyncio.run(in_job_engine())


R0, R4K, R8K, W0 = ("read", 0, 4096), ("read", 4096, 4096), ("read", 8192, 4096), ("write", 0, 4096)


@pytest.mark.parametrize("rules, ops, expected", [
    ([{"event": "read_aio", "once": True}], [R0, R0], ["EIO", "ok"]),
    ([{"event": "read_aio"}], [R0, R0, W0], ["EIO", "EIO", "EIO"]),
    ([{"event": "none"}], [R0, W0], ["EIO", "EIO"]),
    ([{"event": "none", "once": True}], [R0, R0, W0], ["EIO", "ok", "ok"]),
    ([{"event": "read_aio", "iotype": "write"}], [R0, R0, W0, W0], ["ok", "ok", "EIO", "EIO"]),
    ([{"event": "read_aio", "sector": 8}], [R0, R4K, R0, R4K], ["ok", "EIO", "ok", "EIO"]),
    ([{"event": "read_aio", "sector": 8, "once": True}], [R0, R4K, R0, R4K], ["ok", "EIO", "ok", "ok"]),
    ([{"event": "write_aio", "once": True, "errno": 28}], [R0, W0, W0], ["ok", "ENOSPC", "ok"]),
    ([{"event": "write_aio", "errno": 28}], [R0, W0, R0], ["ok", "ENOSPC", "ENOSPC"]),
    ([{"event": "read_aio", "errno": 0}], [R0], ["ok"]),
    ([{"event": "read_aio", "sector": -5}], [R0], ["ok"]),
    # An event with rules replaces the active list: the "none" rule is dropped.
    ([{"event": "none", "sector": 8}, {"event": "read_aio", "sector": 16, "once": True}],
     [R4K, R0, R4K, R8K, R8K], ["ok", "ok", "ok", "EIO", "ok"]),
])
def test_blkdebug_rules(graph: BlockGraph, rules: list, ops: list, expected: list) -> None:
    assert outcomes(blkdebug_raw(graph, rules), ops) == expected


def test_blkdebug_state(graph: BlockGraph) -> None:
    node = blkdebug_raw(graph, [{"event": "read_aio", "state": 2}],
                        [{"event": "write_aio", "new_state": 2}])
    assert outcomes(node, [R0, W0, R0]) == ["ok", "ok", "EIO"]


def test_blkdebug_read_aio_needs_a_format_parent(graph: BlockGraph) -> None:
    node = graph.add({"driver": "blkdebug", "node-name": "b",
                      "image": {"driver": "null-co"}, "inject-error": [{"event": "read_aio"}]})
    assert outcomes(node, [R0, R0]) == ["ok", "ok"]


def test_blkdebug_pwritev_fires_on_own_writes(graph: BlockGraph) -> None:
    node = graph.add({"driver": "blkdebug", "node-name": "b",
                      "image": {"driver": "null-co"}, "inject-error": [{"event": "pwritev"}]})
    assert outcomes(node, [R0, W0, R0, W0]) == ["ok", "EIO", "EIO", "EIO"]


def test_blkdebug_immediately_decides_whether_the_error_yields(graph: BlockGraph) -> None:
    later = blkdebug_raw(graph, [{"event": "none"}])
    coro = later.co_pread(0, 512)
    # Not immediate: the failure completes from a main-loop bottom half.
    assert isinstance(coro.send(None), Reschedule)
    with pytest.raises(OSError):
        coro.send(None)
    graph2 = BlockGraph(Jobs(VirtualClock()))
    now = blkdebug_raw(graph2, [{"event": "none", "immediately": True}])
    with pytest.raises(OSError):
        now.co_pread(0, 512).send(None)


def test_blkdebug_bad_align(graph: BlockGraph) -> None:
    with pytest.raises(QMPError, match="Cannot meet constraints with align 3"):
        graph.add({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co"}, "align": 3})


# --- early writeback (qmpjobd.block.writeback) ----------------------------------

def recorded_writeback(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Replace the syscall with a recorder of (fd, offset, length)."""
    from qmpjobd.block import writeback

    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(writeback, "WRITEBACK_CHUNK", 1 << 20)
    monkeypatch.setattr(writeback, "start_writeback",
                        lambda fd, offset, length: calls.append((fd, offset, length)) or True)
    return calls


async def kicks_done(node) -> None:
    """Wait until the writeback start handed to the pool (if any) has run."""
    while node.writeback._running:
        await asyncio.sleep(0.001)


def test_writes_past_the_chunk_start_writeback_of_their_span(
        graph: BlockGraph, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = recorded_writeback(monkeypatch)
    path = write_file(tmp_path / "f.raw", bytes(8 << 20))
    node = graph.add({"driver": "file", "node-name": "f", "filename": path})
    half = 512 << 10

    async def scenario() -> None:
        await node.co_pwrite(4 << 20, b"a" * half)
        await node.co_pwrite(1 << 20, b"b" * half)
        await kicks_done(node)
        assert calls == [(node.fd, 1 << 20, (3 << 20) + half)]
        # A flush takes what was pending; zeroing without writing counts nothing.
        await node.co_pwrite(0, b"c" * half)
        await node.co_flush()
        await node.co_pwrite(half, b"d" * half)
        await node.co_pwrite_zeroes(2 << 20, 4 << 20)
        await kicks_done(node)
        assert len(calls) == 1
        await node.co_pwrite(6 << 20, b"e" * half)
        await kicks_done(node)
        assert calls[1] == (node.fd, half, 6 << 20)
    asyncio.run(scenario())


def test_copy_offload_counts_as_written_data(
        graph: BlockGraph, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qmpjobd.block.offload import copy_range

    calls = recorded_writeback(monkeypatch)
    source = graph.add({"driver": "file", "node-name": "s",
                        "filename": write_file(tmp_path / "s.raw", os.urandom(2 << 20))})
    target = graph.add({"driver": "file", "node-name": "t",
                        "filename": write_file(tmp_path / "t.raw", bytes(2 << 20))})

    async def scenario() -> None:
        await copy_range(source, 0, target, 0, 2 << 20)
        await kicks_done(target)
    asyncio.run(scenario())
    assert calls == [(target.fd, 0, 2 << 20)]


def test_writeback_after_close_touches_no_descriptor(tmp_path: pathlib.Path) -> None:
    from qmpjobd.block.writeback import EarlyWriteback, start_writeback

    fd = os.open(write_file(tmp_path / "f.raw", bytes(4096)), os.O_RDWR)
    try:
        assert start_writeback(fd, 0, 4096)       # the real call, on a real file
        writeback = EarlyWriteback(fd)
        assert writeback.switch(None) == fd
        # A kick that starts after the close sees no descriptor and stops there.
        assert writeback._run(0, 4096)
    finally:
        os.close(fd)


def test_writeback_without_an_event_loop_starts_nothing(tmp_path: pathlib.Path) -> None:
    from qmpjobd.block.writeback import WRITEBACK_CHUNK, EarlyWriteback

    fd = os.open(write_file(tmp_path / "f.raw", bytes(4096)), os.O_RDWR)
    try:
        writeback = EarlyWriteback(fd)
        writeback.written(0, WRITEBACK_CHUNK)     # no loop running: no pool to use
        assert not writeback._running
    finally:
        os.close(fd)
