"""The test controls' data: fault selection, request interposers, reply gates."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from qmpjobd.dispatch import ReplyGate
from qmpjobd.job.clock import VirtualClock
from qmpjobd.job.faults import FaultTable, JobFault


def stub_job(job_id: str = "j0", job_type: str = "backup", current: int = 0, total: int = 0):
    return SimpleNamespace(id=job_id, job_type=job_type, progress_current=current,
                           progress_total=total, started=False, cancelled=False,
                           force_cancel=False, deferred=False)


def test_a_type_fault_binds_to_the_next_job_of_that_type_only():
    table = FaultTable()
    fault = JobFault(phase="prepare", job_type="backup")
    table.arm(fault, None)
    mirror, first, second = stub_job("m", "mirror"), stub_job("a"), stub_job("b")
    for job in (mirror, first, second):
        table.job_created(job)
    assert fault.job is first
    assert table.prepare_fault(second) is None
    assert table.prepare_fault(first) is fault
    assert table.prepare_fault(first) is None      # count 1: fired once
    assert table.fired == [{"id": "a", "phase": "prepare", "message": "Input/output error"}]


def test_an_unsized_job_has_reached_no_fraction():
    fault = JobFault(phase="run", at_progress=0.5)
    assert not fault.progress_reached(stub_job(current=0, total=0))
    assert not fault.progress_reached(stub_job(current=49, total=100))
    assert fault.progress_reached(stub_job(current=50, total=100))
    assert JobFault(phase="run").progress_reached(stub_job())


class FakeNode:
    def __init__(self) -> None:
        self.reads: list[int] = []

    async def co_pread(self, offset: int, length: int) -> bytes:
        self.reads.append(offset)
        return bytes(length)

    def host_file(self):
        return (3, 0)


def test_io_fault_fails_one_request_then_restores_the_node():
    table = FaultTable()
    node = FakeNode()
    job = stub_job(current=0, total=4)
    job.started = True
    job.fault_node = lambda is_read: node if is_read else None
    table.arm(JobFault(phase="run", job_id="j0", iotype="read", errno=28, at_progress=0.5), job)
    assert node.host_file() is None          # copies must take the request path

    async def scenario():
        await node.co_pread(0, 1)
        job.progress_current = 2
        with pytest.raises(OSError) as failure:
            await node.co_pread(1, 1)
        assert failure.value.errno == 28
        await node.co_pread(2, 1)

    asyncio.run(scenario())
    assert node.reads == [0, 2]
    assert "co_pread" not in vars(node) and node.host_file() == (3, 0)


class Target:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def queue(self, data: bytes) -> None:
        self.sent.append(data)

    def flush(self) -> None:
        pass


def test_a_held_reply_is_never_overtaken():
    clock, target = VirtualClock(), Target()
    gate = ReplyGate(target, clock)
    gate.arm(count=1, delay_ns=10, drop=False)
    gate.deliver(b"armed")          # the arming command's own reply
    gate.deliver(b"held")
    gate.deliver(b"after")
    assert target.sent == [b"armed"]
    clock.advance(9)
    assert target.sent == [b"armed"]
    clock.advance(1)
    assert target.sent == [b"armed", b"held", b"after"]
    assert gate.idle


def test_dropped_replies_are_skipped():
    target = Target()
    gate = ReplyGate(target, VirtualClock())
    gate.arm(count=2, delay_ns=0, drop=True)
    for message in (b"armed", b"x", b"y", b"z"):
        gate.deliver(message)
    assert target.sent == [b"armed", b"z"]
