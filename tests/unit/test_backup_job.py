"""blockdev-backup and transaction handlers on a real block graph, without sockets.

A virtual clock drives the rate limit; event sequences are those of s01/s02/s06.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import pytest

from qmpjobd.block.graph import BlockGraph
from qmpjobd.commands import Context, load_all
from qmpjobd.errors import QMPError
from qmpjobd.job.clock import Clock, RealClock, VirtualClock
from qmpjobd.job.manager import JobManager

MiB = 1024 * 1024
HANDLERS = load_all()


@dataclass
class Options:
    drain_artefacts: bool = True


@dataclass
class FakeDaemon:
    clock: Clock
    options: Options = field(default_factory=Options)
    events: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.jobs = JobManager(self.emit, self.clock)
        self.graph = BlockGraph(self.jobs, options=self.options)

    def emit(self, name: str, data: dict) -> None:
        self.events.append((name, data))

    def take(self) -> list[str]:
        out = [f"{d['id']}:{d['status']}" if n == "JOB_STATUS_CHANGE"
               else f"{n.removeprefix('BLOCK_JOB_')} {d.get('device', d.get('id'))}"
               for n, d in self.events]
        self.events.clear()
        return out


def call(daemon: FakeDaemon, name: str, **args) -> object:
    """Run a handler as the dispatcher does: bottom halves run before the reply."""
    try:
        return HANDLERS[name](Context(daemon, session=None), args)
    finally:
        daemon.jobs.run_bottom_halves()


def null_nodes(daemon: FakeDaemon, size: int, *names: str) -> None:
    for name in names:
        daemon.graph.add({"driver": "null-co", "node-name": name, "size": size})


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def daemon(clock) -> FakeDaemon:
    d = FakeDaemon(clock)
    null_nodes(d, 16 * MiB, "src", "tgt", "tgt2")
    return d


def test_unlimited_backup_runs_inside_the_command(daemon) -> None:
    call(daemon, "blockdev-backup", **{"job-id": "j", "device": "src", "target": "tgt",
                                       "sync": "full", "auto-dismiss": False})
    assert daemon.take() == ["j:created", "j:running", "j:paused", "j:running", "j:waiting",
                             "j:pending", "COMPLETED j", "j:concluded"]
    assert call(daemon, "query-jobs") == [{
        "id": "j", "type": "backup", "status": "concluded",
        "current-progress": 16 * MiB, "total-progress": 16 * MiB}]


def test_without_drain_artefacts(daemon) -> None:
    daemon.options.drain_artefacts = False
    call(daemon, "blockdev-backup", **{"job-id": "j", "device": "src", "target": "tgt",
                                       "sync": "full"})
    assert daemon.take() == ["j:created", "j:running", "j:waiting", "j:pending",
                             "COMPLETED j", "j:concluded", "j:null"]


def test_rate_limited_backup_copies_one_chunk_then_sleeps(daemon, clock) -> None:
    call(daemon, "blockdev-backup", **{"job-id": "j0", "device": "src", "target": "tgt",
                                       "sync": "full", "speed": 8 * MiB})
    assert daemon.take() == ["j0:created", "j0:running", "j0:paused", "j0:running"]
    info = call(daemon, "query-block-jobs")[0]
    assert (info["offset"], info["len"], info["busy"], info["speed"]) == (MiB, 16 * MiB, False, 8 * MiB)
    # 1 MiB at 8 MiB/s: the next chunk is due 125 ms later (quota rounding aside).
    assert 125_000_000 <= clock.next_deadline() - clock.now_ns() < 125_001_000
    clock.advance(clock.next_deadline() - clock.now_ns())
    assert call(daemon, "query-jobs")[0]["current-progress"] == 2 * MiB
    clock.run_timers()
    daemon.jobs.run_bottom_halves()
    assert daemon.take() == ["j0:waiting", "j0:pending", "COMPLETED j0", "j0:concluded", "j0:null"]


def test_other_jobs_see_transaction_drains_and_id_errors(daemon) -> None:
    call(daemon, "blockdev-backup", **{"job-id": "dup", "device": "src", "target": "tgt",
                                       "sync": "full", "speed": MiB})
    daemon.take()
    with pytest.raises(QMPError, match="Job ID 'dup' already in use"):
        call(daemon, "blockdev-backup", **{"job-id": "dup", "device": "src", "target": "tgt2",
                                           "sync": "full"})
    assert daemon.take() == ["dup:paused", "dup:running", "dup:paused", "dup:running"]
    with pytest.raises(QMPError, match="Parameter 'speed' expects a non-negative value"):
        call(daemon, "blockdev-backup", **{"job-id": "neg", "device": "src", "target": "tgt2",
                                           "sync": "full", "speed": -1})
    assert daemon.take() == ["dup:paused", "dup:running", "dup:paused", "neg:created",
                             "neg:null", "dup:running"]
    with pytest.raises(QMPError, match="Node 'tgt' is busy: block device is in use by block job: backup"):
        call(daemon, "blockdev-backup", **{"job-id": "x6", "device": "src", "target": "tgt",
                                           "sync": "full"})
    with pytest.raises(QMPError, match="Invalid job ID ''"):
        call(daemon, "blockdev-backup", device="src", target="tgt2", sync="full")
    daemon.take()
    call(daemon, "job-cancel", id="dup")
    assert daemon.take() == ["dup:aborting", "CANCELLED dup", "dup:concluded", "dup:null"]


@pytest.mark.parametrize("args,message", [
    ({"target": "src"}, "Source and target cannot be the same"),
    ({"target": "small"}, "Source and target image have different sizes"),
    ({"compress": True}, "Compression is not supported for this drive "),
    ({"sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"),
    ({"bitmap": "nob"}, "Bitmap 'nob' could not be found"),
    ({"bitmap-mode": "never"}, "Cannot specify bitmap sync mode without a bitmap"),
    ({"x-perf": {"max-workers": 0}}, "max-workers must be between 1 and 2147483647"),
    ({"x-perf": {"max-chunk": 4096}},
     "Required max-chunk (4096) is less than backup cluster size (65536)"),
    ({"device": "nonode"}, "Cannot find device='nonode' nor node-name='nonode'"),
])
def test_creation_errors(daemon, args, message) -> None:
    null_nodes(daemon, MiB, "small")
    full = {"job-id": "b", "device": "src", "target": "tgt", "sync": "full", **args}
    with pytest.raises(QMPError) as info:
        call(daemon, "blockdev-backup", **full)
    assert info.value.desc == message
    assert call(daemon, "query-jobs") == []


def test_unaligned_length_counts_whole_clusters(clock) -> None:
    daemon = FakeDaemon(clock)
    null_nodes(daemon, 1000000, "u1", "u2")
    call(daemon, "blockdev-backup", **{"job-id": "u", "device": "u1", "target": "u2",
                                       "sync": "full", "auto-dismiss": False})
    assert call(daemon, "query-jobs")[0]["total-progress"] == 1048576


def test_sync_top_of_null_copies_nothing_and_none_waits_for_cancel(daemon) -> None:
    call(daemon, "blockdev-backup", **{"job-id": "tp", "device": "src", "target": "tgt",
                                       "sync": "top", "auto-dismiss": False})
    assert call(daemon, "query-jobs")[0]["total-progress"] == 0
    call(daemon, "job-dismiss", id="tp")
    call(daemon, "blockdev-backup", **{"job-id": "nn", "device": "src", "target": "tgt",
                                       "sync": "none"})
    assert call(daemon, "query-jobs")[0]["status"] == "running"
    daemon.take()
    call(daemon, "job-cancel", id="nn")
    assert daemon.take() == ["nn:aborting", "CANCELLED nn", "nn:concluded", "nn:null"]


def test_transaction_rollback_and_grouped_check(daemon) -> None:
    null_nodes(daemon, 16 * MiB, "s2", "t2")
    backup = lambda jid, dev, tgt: {"type": "blockdev-backup",  # noqa: E731
                                    "data": {"job-id": jid, "device": dev, "target": tgt,
                                             "sync": "full"}}
    with pytest.raises(QMPError, match="Transaction aborted using Abort action"):
        call(daemon, "transaction", actions=[backup("x1", "src", "tgt"),
                                             backup("x2", "s2", "t2"),
                                             {"type": "abort", "data": {}}])
    assert daemon.take() == ["x1:created", "x2:created", "x2:aborting", "x2:concluded",
                             "x2:null", "x1:aborting", "x1:concluded", "x1:null"]
    with pytest.raises(QMPError) as info:
        call(daemon, "transaction", actions=[
            backup("g1", "src", "tgt"),
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "bm0"}}],
            properties={"completion-mode": "grouped"})
    assert info.value.desc == ("Action 'block-dirty-bitmap-add' does not support "
                               "Transaction property completion-mode = grouped")
    assert daemon.take() == ["g1:created", "g1:aborting", "g1:concluded", "g1:null"]
    assert call(daemon, "query-jobs") == []


def test_error_stop_then_resume_retries(clock) -> None:
    daemon = FakeDaemon(clock)
    null_nodes(daemon, 8 * MiB, "t")
    daemon.graph.add({"driver": "raw", "node-name": "e", "file": {
        "driver": "blkdebug", "image": {"driver": "null-co", "size": 8 * MiB},
        "inject-error": [{"errno": 28, "event": "read_aio", "once": True,
                          "immediately": True}]}})
    call(daemon, "blockdev-backup", **{"job-id": "b", "device": "e", "target": "t",
                                       "sync": "full", "on-source-error": "enospc"})
    assert daemon.take()[-2:] == ["ERROR b", "b:paused"]
    info = call(daemon, "query-block-jobs")[0]
    # The error is immediate, so no other chunk was dispatched before it.
    assert (info["io-status"], info["paused"], info["offset"]) == ("nospace", True, 0)
    with pytest.raises(QMPError, match="The block job for device 'b' is currently paused"):
        call(daemon, "block-job-cancel", device="b")
    call(daemon, "job-resume", id="b")
    assert daemon.take() == ["b:running", "b:waiting", "b:pending", "COMPLETED b",
                             "b:concluded", "b:null"]


async def test_backup_copies_file_data_bit_exact(tmp_path) -> None:
    size = 3 * MiB + 3 * 512
    payload = os.urandom(size)
    (tmp_path / "src.img").write_bytes(payload)
    (tmp_path / "tgt.img").write_bytes(bytes(size))
    daemon = FakeDaemon(RealClock())
    for name in ("src", "tgt"):
        daemon.graph.add({"driver": "file", "node-name": name,
                          "filename": str(tmp_path / f"{name}.img")})
    call(daemon, "blockdev-backup", **{"job-id": "f", "device": "src", "target": "tgt",
                                       "sync": "full"})
    for _ in range(1000):
        if not daemon.jobs.jobs:
            break
        await asyncio.sleep(0.01)
    assert "COMPLETED f" in daemon.take()
    assert (tmp_path / "tgt.img").read_bytes() == payload


def test_concluded_job_keeps_only_what_queries_need(daemon) -> None:
    """A job kept after CONCLUDED (auto-dismiss=false) drops its coroutine, copy
    bitmap, rate limiter and arguments, and has no attribute dict; the queries and
    job-dismiss still work."""
    call(daemon, "blockdev-backup", **{"job-id": "j", "device": "src", "target": "tgt",
                                       "sync": "full", "speed": MiB, "auto-dismiss": False})
    job = daemon.jobs.get("j")
    daemon.clock.run_timers()
    daemon.jobs.run_bottom_halves()
    assert job.status.value == "concluded"
    assert not hasattr(job, "__dict__")
    assert job._runner is None and job.started
    for released in ("dirty", "perf", "rate_limit"):
        assert not hasattr(job, released), released
    assert call(daemon, "query-jobs")[0]["status"] == "concluded"
    assert call(daemon, "query-block-jobs")[0]["speed"] == MiB
    call(daemon, "job-dismiss", id="j")
    assert call(daemon, "query-jobs") == []
