"""Job core lifecycles with a virtual clock and a recording emit.

Event sequences are compared with the qsd 7.2 transcripts (s01, s02, s06, s08, s11);
drain artefacts are not involved here (no block graph).
"""

from __future__ import annotations

import asyncio

import pytest

from qmpjobd.block.jobs.base import BlockJob, RateLimit, error_action_for
from qmpjobd.errors import QMPError
from qmpjobd.job.clock import VirtualClock
from qmpjobd.job.coroutine import CoroutineRunner, park
from qmpjobd.job.job import Job
from qmpjobd.job.manager import JobManager
from qmpjobd.job.states import JobStatus
from qmpjobd.job.txn import JobTxn

SECOND = 1_000_000_000


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def __call__(self, name: str, data: dict) -> None:
        self.events.append((name, data))

    def take(self) -> list[str]:
        """Compact form: "j1:running" for status changes, "COMPLETED j1" for block events."""
        out = []
        for name, data in self.events:
            if name == "JOB_STATUS_CHANGE":
                out.append(f"{data['id']}:{data['status']}")
            else:
                short = name.removeprefix("BLOCK_JOB_")
                who = data.get("device", data.get("id"))
                out.append(f"{short} {who}" + (" error" if "error" in data else ""))
        self.events.clear()
        return out


class FakeNode:
    """What BlockJob needs from a node: user registration."""

    def __init__(self) -> None:
        self.users: list = []
        self.blockers: list = []

    def add_job_user(self, job, blocker=None) -> None:
        self.users.append(job)
        if blocker:
            self.blockers.append((job, blocker))

    def remove_job_user(self, job) -> None:
        self.users.remove(job)
        self.blockers = [b for b in self.blockers if b[0] is not job]


class HeldJob(BlockJob):
    """Runs until released (or cancelled); returns ``result``."""

    job_type = "backup"

    def __init__(self, manager: JobManager, job_id: str, result: int = 0, **kwargs) -> None:
        self.result = result
        self.released = False
        self.node = FakeNode()
        super().__init__(manager, job_id, self.node, **kwargs)
        self.progress_set_remaining(100)

    async def run(self) -> int:
        while not self.released and not self.is_cancelled:
            await self.yield_()
        if not self.is_cancelled:
            self.progress_update(100 if self.result == 0 else 40)
        return 0 if self.is_cancelled else self.result

    def release(self) -> None:
        self.released = True
        self.enter()
        self.manager.run_bottom_halves()


class SleepyJob(HeldJob):
    """Sleeps (a real job sleep) between steps of work, like a rate-limited copy."""

    async def run(self) -> int:
        for _ in range(3):
            if self.is_cancelled:
                return 0
            self.progress_update(10)
            await self.sleep_ns(SECOND)
        return 0


class ReadyJob(HeldJob):
    """A mirror-like job: READY once converged, finishes on complete or soft cancel."""

    job_type = "mirror"
    can_complete = True

    def __init__(self, *args, **kwargs) -> None:
        self.should_complete = False
        super().__init__(*args, **kwargs)

    async def run(self) -> int:
        self.ready()
        while not self.should_complete and not self.cancel_requested:
            await self.yield_()
        return 0

    def cancel_is_forced(self, force: bool) -> bool:
        return force or not self.is_ready

    def complete_request(self) -> None:
        self.should_complete = True
        # enter() would also end a pause (QEMU semantics); a paused job sees the
        # request when it is resumed.
        if not self.paused:
            self.enter()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def manager(rec: Recorder, clock: VirtualClock) -> JobManager:
    return JobManager(rec, clock)


def start(manager: JobManager, *jobs: Job) -> None:
    for job in jobs:
        job.start()
    manager.run_bottom_halves()


# ---------------------------------------------------------------- single jobs


@pytest.mark.parametrize("auto_finalize,auto_dismiss,expected,after_finalize,after_dismiss", [
    (True, True,
     ["j:created", "j:running", "j:waiting", "j:pending", "COMPLETED j", "j:concluded", "j:null"],
     None, None),
    (False, True,
     ["j:created", "j:running", "j:waiting", "j:pending", "PENDING j"],
     ["COMPLETED j", "j:concluded", "j:null"], None),
    (True, False,
     ["j:created", "j:running", "j:waiting", "j:pending", "COMPLETED j", "j:concluded"],
     None, ["j:null"]),
    (False, False,
     ["j:created", "j:running", "j:waiting", "j:pending", "PENDING j"],
     ["COMPLETED j", "j:concluded"], ["j:null"]),
])
def test_auto_finalize_dismiss_combinations(manager, rec, auto_finalize, auto_dismiss,
                                            expected, after_finalize, after_dismiss) -> None:
    job = HeldJob(manager, "j", auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
    start(manager, job)
    job.release()
    assert rec.take() == expected
    if after_finalize is not None:
        assert job.status == JobStatus.PENDING
        with pytest.raises(QMPError, match="cannot accept command verb 'dismiss'"):
            job.dismiss()
        job.finalize()
        assert rec.take() == after_finalize
    if after_dismiss is not None:
        assert manager.query_jobs() == [{
            "id": "j", "type": "backup", "status": "concluded",
            "current-progress": 100, "total-progress": 100}]
        job.dismiss()
        assert rec.take() == after_dismiss
    assert manager.query_jobs() == []
    assert job.node.users == []


def test_early_fail_on_negative_speed(manager, rec) -> None:
    with pytest.raises(QMPError, match="Parameter 'speed' expects a non-negative value"):
        HeldJob(manager, "neg", speed=-1)
    assert rec.take() == ["neg:created", "neg:null"]
    assert manager.jobs == []


@pytest.mark.parametrize("bad", ["1bad", "has space", "", "a/b", "é"])
def test_invalid_job_ids(manager, rec, bad) -> None:
    with pytest.raises(QMPError) as info:
        HeldJob(manager, bad)
    assert info.value.desc == f"Invalid job ID '{bad}'"
    assert rec.take() == []


def test_duplicate_id_until_null(manager, rec) -> None:
    job = HeldJob(manager, "dup", auto_dismiss=False)
    start(manager, job)
    job.release()
    with pytest.raises(QMPError, match="Job ID 'dup' already in use"):
        HeldJob(manager, "dup")
    job.dismiss()
    HeldJob(manager, "dup")


def test_lookup_errors(manager) -> None:
    with pytest.raises(QMPError) as info:
        manager.find_job("nope")
    assert (info.value.desc, info.value.error_class) == ("Job not found", "GenericError")
    with pytest.raises(QMPError) as info:
        manager.find_block_job("nope")
    assert (info.value.desc, info.value.error_class) == (
        "Block job 'nope' not found", "DeviceNotActive")


def test_generic_job_is_not_a_block_job(manager, rec) -> None:
    class CreateJob(Job):
        job_type = "create"

        async def run(self) -> int:
            return 0

    job = CreateJob(manager, "cr1", auto_dismiss=False)
    start(manager, job)
    assert rec.take() == ["cr1:created", "cr1:running", "cr1:waiting", "cr1:pending",
                          "cr1:concluded"]
    assert manager.query_block_jobs() == []
    with pytest.raises(QMPError, match="Block job 'cr1' not found"):
        manager.find_block_job("cr1")


def test_run_failure_reports_error_and_skips_pending(manager, rec) -> None:
    job = HeldJob(manager, "f", result=-5, auto_finalize=False, auto_dismiss=False)
    start(manager, job)
    job.release()
    assert rec.take() == ["f:created", "f:running", "f:aborting", "COMPLETED f error", "f:concluded"]
    assert manager.query_jobs()[0]["error"] == "Input/output error"
    info = manager.query_block_jobs()[0]
    assert info["error"] == "Input/output error" and info["offset"] == 40


def test_prepare_failure(manager, rec) -> None:
    class FailingPrepare(HeldJob):
        def prepare(self) -> int:
            return -5

    job = FailingPrepare(manager, "p", auto_finalize=False, auto_dismiss=False)
    start(manager, job)
    job.release()
    assert rec.take() == ["p:created", "p:running", "p:waiting", "p:pending", "PENDING p"]
    job.finalize()
    assert rec.take() == ["p:aborting", "COMPLETED p error", "p:concluded"]
    assert manager.query_jobs()[0]["error"] == "Input/output error"


# ---------------------------------------------------------------- pause / resume


def test_user_pause_resume_of_sleeping_job(manager, rec, clock) -> None:
    job = SleepyJob(manager, "s")
    start(manager, job)
    assert rec.take() == ["s:created", "s:running"]
    job.user_pause()
    assert rec.take() == ["s:paused"]
    with pytest.raises(QMPError, match="Job is already paused"):
        job.user_pause()
    job.set_speed(3)                      # allowed while paused, no wake-up
    assert rec.take() == [] and job.speed == 3
    assert manager.query_block_jobs()[0]["paused"] is True
    job.user_resume()
    assert rec.take() == ["s:running"]
    with pytest.raises(QMPError, match="Can't resume a job that was not paused"):
        job.user_resume()
    clock.run_timers()
    manager.run_bottom_halves()
    assert rec.take() == ["s:waiting", "s:pending", "COMPLETED s", "s:concluded", "s:null"]


def test_internal_pause_does_not_touch_user_flag(manager, rec) -> None:
    job = SleepyJob(manager, "d")
    start(manager, job)
    rec.take()
    job.pause()                           # a drained section
    assert rec.take() == ["d:paused"]
    with pytest.raises(QMPError, match="Can't resume a job that was not paused"):
        job.user_resume()
    job.resume()
    assert rec.take() == ["d:running"]


def test_pause_before_start_pauses_at_first_pause_point(manager, rec) -> None:
    job = HeldJob(manager, "c")
    job.pause()                           # e.g. attached to a drained node
    start(manager, job)
    assert rec.take() == ["c:created", "c:running", "c:paused"]
    job.resume()
    assert rec.take() == ["c:running"]


def test_resume_checks_come_before_verb(manager, rec) -> None:
    job = HeldJob(manager, "r", auto_finalize=False)
    start(manager, job)
    job.release()
    with pytest.raises(QMPError, match="Can't resume a job that was not paused"):
        job.user_resume()
    with pytest.raises(QMPError, match="in state 'pending' cannot accept command verb 'pause'"):
        job.user_pause()


# ---------------------------------------------------------------- cancel in each state


def test_cancel_created(manager, rec) -> None:
    job = HeldJob(manager, "c", auto_dismiss=False)
    job.cancel(force=True)
    # Never started: dismissed even with auto-dismiss=false, no BLOCK_JOB_CANCELLED.
    assert rec.take() == ["c:created", "c:aborting", "c:concluded", "c:null"]


def test_cancel_running(manager, rec) -> None:
    job = SleepyJob(manager, "j0", auto_dismiss=False, auto_finalize=False)
    start(manager, job)
    rec.take()
    job.user_cancel(force=False)          # backup: every cancel is forced
    manager.run_bottom_halves()
    assert rec.take() == ["j0:aborting", "CANCELLED j0", "j0:concluded"]
    assert manager.query_jobs()[0]["error"] == "Operation canceled"


def test_cancel_paused_resumes_first(manager, rec) -> None:
    job = SleepyJob(manager, "b1")
    start(manager, job)
    job.user_pause()
    rec.take()
    job.user_cancel(force=True)
    manager.run_bottom_halves()
    assert rec.take() == ["b1:running", "b1:aborting", "CANCELLED b1", "b1:concluded", "b1:null"]


def test_cancel_pending(manager, rec) -> None:
    job = HeldJob(manager, "p", auto_finalize=False)
    start(manager, job)
    job.release()
    rec.take()
    job.user_cancel(force=False)
    assert rec.take() == ["p:aborting", "CANCELLED p", "p:concluded", "p:null"]


def test_cancel_concluded_is_refused(manager, rec) -> None:
    job = HeldJob(manager, "e", auto_dismiss=False)
    start(manager, job)
    job.release()
    with pytest.raises(QMPError, match="Job 'e' in state 'concluded' cannot accept command verb 'cancel'"):
        job.user_cancel(force=True)


def test_ready_complete_and_soft_cancel(manager, rec) -> None:
    job = ReadyJob(manager, "m")
    start(manager, job)
    assert rec.take() == ["m:created", "m:running", "m:ready", "READY m"]
    job.user_pause()
    assert rec.take() == ["m:standby"]
    job.complete()                        # accepted in STANDBY, acts after resume
    assert rec.take() == []
    job.user_resume()
    manager.run_bottom_halves()
    assert rec.take() == ["m:ready", "m:waiting", "m:pending", "COMPLETED m", "m:concluded", "m:null"]

    soft = ReadyJob(manager, "m2")
    start(manager, soft)
    rec.take()
    soft.user_cancel(force=False)
    manager.run_bottom_halves()
    assert rec.take() == ["m2:waiting", "m2:pending", "COMPLETED m2", "m2:concluded", "m2:null"]


def test_force_cancel_from_standby(manager, rec) -> None:
    job = ReadyJob(manager, "m")
    start(manager, job)
    job.user_pause()
    rec.take()
    job.user_cancel(force=True)
    manager.run_bottom_halves()
    assert rec.take() == ["m:ready", "m:aborting", "CANCELLED m", "m:concluded", "m:null"]


def test_complete_refused_when_not_ready_or_cancelling(manager) -> None:
    job = HeldJob(manager, "b")
    start(manager, job)
    with pytest.raises(QMPError, match="in state 'running' cannot accept command verb 'complete'"):
        job.complete()


# ---------------------------------------------------------------- transactions (s06, s08)


def grouped(manager: JobManager, *specs: tuple[type, str, dict]) -> list[Job]:
    txn = JobTxn()
    return [cls(manager, job_id, txn=txn, **kwargs) for cls, job_id, kwargs in specs]


def test_grouped_success_walks_newest_first(manager, rec) -> None:
    a1, a2 = grouped(manager, (HeldJob, "a1", {}), (HeldJob, "a2", {}))
    start(manager, a1, a2)
    a1.release()
    rec.take()
    a2.release()
    assert rec.take() == ["a2:waiting", "a2:pending", "a1:pending",
                          "COMPLETED a2", "a2:concluded", "a2:null",
                          "COMPLETED a1", "a1:concluded", "a1:null"]


def test_grouped_mixed_finalize_waits_for_job_finalize(manager, rec) -> None:
    d3, d4 = grouped(manager, (HeldJob, "d3", {}), (HeldJob, "d4", {"auto_finalize": False}))
    start(manager, d3, d4)
    d3.release()
    d4.release()
    assert rec.take()[-5:] == ["d3:waiting", "d4:waiting", "d4:pending", "PENDING d4", "d3:pending"]
    d3.finalize()
    assert rec.take() == ["COMPLETED d4", "d4:concluded", "d4:null",
                          "COMPLETED d3", "d3:concluded", "d3:null"]


def test_grouped_failure_cancels_running_member(manager, rec) -> None:
    b1, b2 = grouped(manager, (HeldJob, "b1", {"result": -5}), (SleepyJob, "b2", {}))
    start(manager, b1, b2)
    rec.take()
    b1.release()
    assert rec.take() == ["b1:aborting", "b2:aborting", "CANCELLED b2", "b2:concluded", "b2:null",
                          "COMPLETED b1 error", "b1:concluded", "b1:null"]


def test_grouped_failure_after_member_waiting(manager, rec) -> None:
    c1, c2 = grouped(manager, (HeldJob, "c1", {}), (HeldJob, "c2", {"result": -5}))
    start(manager, c1, c2)
    c1.release()
    rec.take()
    c2.release()
    assert rec.take() == ["c2:aborting", "COMPLETED c2 error", "c2:concluded", "c2:null",
                          "c1:aborting", "CANCELLED c1", "c1:concluded", "c1:null"]


def test_grouped_user_cancel_running_member(manager, rec) -> None:
    i1, i2 = grouped(manager, (SleepyJob, "i1", {}), (SleepyJob, "i2", {}))
    start(manager, i1, i2)
    rec.take()
    i1.user_cancel(force=True)
    manager.run_bottom_halves()
    assert rec.take() == ["i1:aborting", "i2:aborting", "CANCELLED i2", "i2:concluded", "i2:null",
                          "CANCELLED i1", "i1:concluded", "i1:null"]


def test_grouped_cancel_waiting_member(manager, rec) -> None:
    k1, k2 = grouped(manager, (HeldJob, "k1", {}), (SleepyJob, "k2", {}))
    start(manager, k1, k2)
    k1.release()
    rec.take()
    with pytest.raises(QMPError, match="in state 'waiting' cannot accept command verb 'finalize'"):
        k1.finalize()
    k1.user_cancel(force=True)
    manager.run_bottom_halves()
    assert rec.take() == ["k2:aborting", "CANCELLED k2", "k2:concluded", "k2:null",
                          "k1:aborting", "CANCELLED k1", "k1:concluded", "k1:null"]


def test_grouped_cancel_pending_member(manager, rec) -> None:
    p1, p2 = grouped(manager, (HeldJob, "p1", {"auto_finalize": False}),
                     (HeldJob, "p2", {"auto_finalize": False}))
    start(manager, p1, p2)
    p1.release()
    p2.release()
    assert rec.take()[-5:] == ["p2:waiting", "p2:pending", "PENDING p2", "p1:pending", "PENDING p1"]
    p2.user_cancel(force=False)
    assert rec.take() == ["p2:aborting", "CANCELLED p2", "p2:concluded", "p2:null",
                          "p1:aborting", "CANCELLED p1", "p1:concluded", "p1:null"]


def test_grouped_failure_keeps_undismissed_members(manager, rec) -> None:
    l1, l2 = grouped(manager, (HeldJob, "l1", {"result": -5, "auto_dismiss": False}),
                     (SleepyJob, "l2", {"auto_dismiss": False}))
    start(manager, l1, l2)
    l1.release()
    errors = {info["id"]: info.get("error") for info in manager.query_jobs()}
    assert errors == {"l2": "Operation canceled", "l1": "Input/output error"}


def test_grouped_rollback_of_never_started_members(manager, rec) -> None:
    # QEMU 7.2 hangs on this one (waits for a job that never runs); we finish it.
    g1, g2 = grouped(manager, (HeldJob, "g1", {}), (HeldJob, "g2", {"auto_dismiss": False}))
    g2.cancel_sync(force=True)
    g1.cancel_sync(force=True)
    assert rec.take() == ["g1:created", "g2:created",
                          "g2:aborting", "g2:concluded", "g2:null",
                          "g1:aborting", "g1:concluded", "g1:null"]
    assert manager.jobs == []


def test_individual_members_are_independent(manager, rec) -> None:
    e1 = HeldJob(manager, "e1", result=-5)
    e2 = HeldJob(manager, "e2")
    start(manager, e1, e2)
    rec.take()
    e1.release()
    assert rec.take() == ["e1:aborting", "COMPLETED e1 error", "e1:concluded", "e1:null"]
    e2.release()
    assert rec.take() == ["e2:waiting", "e2:pending", "COMPLETED e2", "e2:concluded", "e2:null"]


# ---------------------------------------------------------------- block-job layer


def test_error_policies() -> None:
    assert error_action_for("report", 28) == "report"
    assert error_action_for("enospc", 28) == "stop"
    assert error_action_for("enospc", 5) == "report"
    assert error_action_for("auto", 28) == "stop"
    assert error_action_for("ignore", 5) == "ignore"
    assert error_action_for("stop", 5) == "stop"


def test_error_stop_is_a_user_pause_with_io_status(manager, rec) -> None:
    job = SleepyJob(manager, "b2")
    start(manager, job)
    rec.take()
    assert job.error_action("stop", True, 28) == "stop"
    assert rec.events[0] == ("BLOCK_JOB_ERROR", {"device": "b2", "operation": "read",
                                                 "action": "stop"})
    info = manager.query_block_jobs()[0]
    assert (info["io-status"], info["paused"]) == ("nospace", True)
    assert job.user_paused
    with pytest.raises(QMPError, match="Job is already paused"):
        job.user_pause()
    job.user_resume()
    assert manager.query_block_jobs()[0]["io-status"] == "ok"


def test_block_job_info_member_order(manager) -> None:
    job = HeldJob(manager, "o", speed=5)
    assert list(job.block_job_info()) == [
        "type", "device", "len", "offset", "busy", "paused", "speed", "io-status", "ready",
        "status", "auto-finalize", "auto-dismiss"]
    assert list(job.job_info()) == ["id", "type", "status", "current-progress", "total-progress"]


def test_set_speed_checks(manager) -> None:
    job = HeldJob(manager, "s", auto_finalize=False)
    with pytest.raises(QMPError, match="Parameter 'speed' expects a non-negative value"):
        job.set_speed(-5)
    start(manager, job)
    job.release()
    with pytest.raises(QMPError, match="in state 'pending' cannot accept command verb 'set-speed'"):
        job.set_speed(0)


def test_rate_limit_slices() -> None:
    limit = RateLimit()
    limit.set_speed(1024 * 1024)            # quota 104857 bytes per 100 ms slice
    assert limit.delay_ns(0, 0) == 0
    assert limit.delay_ns(0, 1024 * 1024) > 0   # the chunk that overspends goes through...
    # ...and the next one waits until the overspend is paid back (10 slices = 1 s).
    assert limit.delay_ns(0, 0) == int(1024 * 1024 / 104857 * 100_000_000)
    assert limit.delay_ns(2 * SECOND, 0) == 0   # a new slice starts afterwards
    limit.set_speed(0)
    assert limit.delay_ns(2 * SECOND, 10**12) == 0


# ---------------------------------------------------------------- the coroutine engine


def test_runner_runs_synchronously_until_park() -> None:
    trace = []

    async def body() -> str:
        trace.append("a")
        await park()
        trace.append("b")
        return "done"

    finished = []
    runner = CoroutineRunner(body(), on_done=lambda r: finished.append(r.result))
    runner.enter()
    assert trace == ["a"] and runner.parked
    runner.enter()
    assert trace == ["a", "b"] and finished == ["done"]
    with pytest.raises(AssertionError):
        runner.enter()


def test_runner_refuses_reentry_while_running() -> None:
    holder = {}

    async def body() -> None:
        holder["runner"].enter()

    runner = CoroutineRunner(body())
    holder["runner"] = runner
    with pytest.raises(AssertionError, match="entering a running coroutine"):
        runner.enter()


def test_runner_resumes_after_future_from_the_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        trace = []

        async def body() -> None:
            trace.append(await future)

        runner = CoroutineRunner(body())
        runner.enter()
        assert runner.waiting_for_future
        with pytest.raises(AssertionError):
            runner.enter()
        future.set_result(42)
        loop.run_until_complete(asyncio.sleep(0))
        assert trace == [42] and runner.finished
    finally:
        loop.close()


def test_virtual_clock_orders_timers(clock) -> None:
    fired = []
    clock.call_later_ns(20, lambda: fired.append("b"))
    clock.call_later_ns(10, lambda: fired.append("a"))
    cancelled = clock.call_later_ns(15, lambda: fired.append("x"))
    cancelled.cancel()
    clock.advance(15)
    assert fired == ["a"] and clock.now_ns() == 15
    clock.run_timers()
    assert fired == ["a", "b"]
