"""The job list: ids, lookup for the job commands, queries, and main-loop bottom halves.

Jobs are listed newest first, as QEMU prepends to its job list; query-jobs and
query-block-jobs walk that order.

Bottom halves model QEMU 7.2's main loop, because the position of a command's reply
among the events it causes is decided there:

* Work QEMU defers to the main loop is a bottom half: ``defer()`` is
  aio_bh_schedule_oneshot (a job's job_exit, a drain begun inside a coroutine via
  ``bottom_half_turn()``); ``co_schedule()`` is aio_co_schedule (blkdebug's
  non-immediate error, ``main_loop_turn()``), whose coroutines share one bottom half.
* ``main_loop_pass()`` is one aio_bh_poll(): it takes the bottom halves scheduled so
  far and runs them *newest first* (QEMU pushes onto a list and pops from its head);
  what they schedule waits for the next pass.
* ``poll_while(cond)`` is AIO_WAIT_WHILE: passes until ``cond`` is false, and not one
  more, so work scheduled by work that ran inside the poll may be left for later. A
  poll inside a bottom half also finishes the pass it interrupted (nested aio_bh_poll
  shares the slice list). Drains (``BlockGraph.drained_begin``) and job_finish_sync
  (``Job.cancel_sync``, the transaction abort) poll.
* The reply rule (``qmpjobd.dispatch``): QEMU runs a command in a bottom half and
  resumes the monitor dispatcher, which writes the reply, through the iohandler
  context, which the main loop serves after the block layer's context. So after a
  handler exactly one pass runs before the reply: a backup that finished inside the
  command completes before the reply, while blkdebug's rescheduled request fails
  before it and the job_exit that failure schedules runs after it.
* Everything still queued runs from the asyncio loop, one pass per loop turn, after
  the reply has been written (events raised then are queued behind it). Before a
  command runs, the dispatcher settles whatever is left (``run_bottom_halves()``):
  QEMU's main loop ran while the command was on its way.
"""

from __future__ import annotations

import asyncio
import logging
import string
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from qmpjobd.errors import QMPError
from qmpjobd.job.clock import Clock
from qmpjobd.job.coroutine import Reschedule

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.job.job import Job

log = logging.getLogger(__name__)

Emit = Callable[[str, dict], None]

# Main-loop passes one run_bottom_halves() or poll_while() call may run.
BOTTOM_HALF_BUDGET = 10_000

# How often finish_shutdown() looks again at jobs that are still stopping.
SHUTDOWN_RECHECK_S = 0.005


def _always_settled() -> bool:
    return True

_ID_FIRST = frozenset(string.ascii_letters)
_ID_REST = frozenset(string.ascii_letters + string.digits + "-._")


def id_wellformed(job_id: str) -> bool:
    """QEMU's id_wellformed(): an ASCII letter, then letters, digits, '-', '.', '_'."""
    return bool(job_id) and job_id[0] in _ID_FIRST and all(c in _ID_REST for c in job_id[1:])


class JobManager:
    """All jobs of the daemon, newest first."""

    def __init__(self, emit: Emit, clock: Clock) -> None:
        self.emit = emit
        self.clock = clock
        self.jobs: list["Job"] = []
        # The test controls' armed faults and holds (qmpjobd.job.faults.FaultTable);
        # None in a daemon without --test-controls, so the job core runs as ever.
        self.faults: Any = None
        # QEMU's bh_list (scheduled, not yet taken by a pass) and bh_slice_list
        # (taken by a pass that has not finished them yet).
        self._queued: list[Callable[[], None]] = []
        self._slices: deque[deque[Callable[[], None]]] = deque()
        # aio_co_schedule: coroutines waiting for the shared bottom half.
        self._scheduled_coroutines: list[Callable[[], None]] = []
        self._co_bh_queued = False
        self._flush_scheduled = False
        # Set by begin_shutdown(): whether the drain of every node has settled.
        self._shutdown_quiesced: Callable[[], bool] | None = None

    # ------------------------------------------------------------------ ids and the list

    def check_new_job_id(self, job_id: str | None, internal: bool = False) -> None:
        if job_id is None:
            if not internal:
                raise QMPError("An explicit job ID is required")
            return
        if internal:
            raise QMPError("Cannot specify job ID for internal job")
        if not id_wellformed(job_id):
            raise QMPError(f"Invalid job ID '{job_id}'")
        if self.get(job_id) is not None:
            raise QMPError(f"Job ID '{job_id}' already in use")

    def add(self, job: "Job") -> None:
        self.jobs.insert(0, job)

    def remove(self, job: "Job") -> None:
        if job in self.jobs:
            self.jobs.remove(job)

    def get(self, job_id: str) -> "Job | None":
        for job in self.jobs:
            if job.id == job_id:
                return job
        return None

    def find_job(self, job_id: str) -> "Job":
        """Lookup for job-* commands: every job with an id."""
        job = self.get(job_id)
        if job is None:
            raise QMPError("Job not found")
        return job

    def find_block_job(self, job_id: str) -> "Job":
        """Lookup for block-job-* commands: block jobs only."""
        job = self.get(job_id)
        if job is None or not job.is_block_job:
            raise QMPError(f"Block job '{job_id}' not found", "DeviceNotActive")
        return job

    # ------------------------------------------------------------------ queries

    def query_jobs(self) -> list[dict[str, Any]]:
        return [job.job_info() for job in self.jobs if job.id is not None]

    def query_block_jobs(self) -> list[dict[str, Any]]:
        return [job.block_job_info() for job in self.jobs  # type: ignore[attr-defined]
                if job.is_block_job and job.id is not None]

    # ------------------------------------------------------------------ bottom halves

    def defer(self, fn: Callable[[], None]) -> None:
        """Schedule ``fn`` as a one-shot main-loop bottom half (aio_bh_schedule_oneshot)."""
        self._queued.append(fn)
        self._schedule_flush()

    def co_schedule(self, resume: Callable[[], None]) -> None:
        """Resume a coroutine from the main loop (QEMU's aio_co_schedule).

        Every coroutine scheduled this way is entered, in scheduling order, by one
        shared bottom half; it is queued again only once it has started running.
        """
        self._scheduled_coroutines.append(resume)
        if not self._co_bh_queued:
            self._co_bh_queued = True
            self.defer(self._co_schedule_bh)

    def main_loop_turn(self) -> Reschedule:
        """``await jobs.main_loop_turn()``: aio_co_schedule(self) + yield.

        blkdebug completes a non-immediate injected error this way: the request
        goes on in the next main-loop pass.
        """
        return Reschedule(self.co_schedule)

    def bottom_half_turn(self) -> Reschedule:
        """``await jobs.bottom_half_turn()``: continue in a one-shot bottom half of
        its own, as bdrv_co_yield_to_drain() does for a drain begun in a coroutine."""
        return Reschedule(self.defer)

    def main_loop_pass(self) -> bool:
        """One aio_bh_poll(): run the bottom halves queued now, newest first.

        What they schedule waits for the next pass. A pass started inside a
        bottom half (a nested poll) also finishes what the outer pass had left,
        as QEMU's nested aio_bh_poll() does. Returns whether anything ran.
        """
        if self._queued:
            self._slices.append(deque(reversed(self._queued)))
            self._queued = []
        ran = False
        while self._slices:
            current = self._slices[0]
            if not current:
                self._slices.popleft()
                continue
            current.popleft()()
            ran = True
        return ran

    def poll_while(self, condition: Callable[[], bool]) -> bool:
        """AIO_WAIT_WHILE(condition): main-loop passes while ``condition()`` holds.

        Returns True once it no longer holds. Returns False when it still holds but
        no bottom half is left: QEMU would block for I/O or a timer there, which a
        synchronous caller cannot do, so it must continue from a callback instead.
        """
        for _ in range(BOTTOM_HALF_BUDGET):
            if not condition():
                return True
            if not self.main_loop_pass():
                return False
        log.debug("poll still waiting after %d passes; continuing later", BOTTOM_HALF_BUDGET)
        return not condition()

    def run_bottom_halves(self) -> None:
        """Run passes until no bottom half is left: the main loop with nothing else
        to do. The dispatcher calls this before each command (the loop ran while the
        command was on its way); unit tests use it to settle a scenario.

        A chain that keeps re-queueing itself (a job retrying a permanent error with
        on-error=ignore) is cut after BOTTOM_HALF_BUDGET passes and continued from
        the event loop, so the daemon stays responsive.
        """
        for _ in range(BOTTOM_HALF_BUDGET):
            if not self.main_loop_pass():
                return
        if self.has_bottom_halves:
            log.debug("bottom halves still queued after %d passes; continuing later",
                      BOTTOM_HALF_BUDGET)
            self._schedule_flush()

    @property
    def has_bottom_halves(self) -> bool:
        return bool(self._queued) or any(self._slices)

    def _co_schedule_bh(self) -> None:
        self._co_bh_queued = False
        resumes, self._scheduled_coroutines = self._scheduled_coroutines, []
        for resume in resumes:
            resume()

    def _schedule_flush(self) -> None:
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (unit tests step by hand and flush themselves)
        self._flush_scheduled = True
        loop.call_soon(self._flush_from_loop)

    def _flush_from_loop(self) -> None:
        """One pass per event-loop turn, so I/O and timers interleave as in QEMU."""
        self._flush_scheduled = False
        self.main_loop_pass()
        if self.has_bottom_halves:
            self._schedule_flush()

    # ------------------------------------------------------------------ shutdown

    def begin_shutdown(self, quiesce_all: Callable[[], None], quiesced: Callable[[], bool]) -> bool:
        """Daemon exit as QEMU does it: quiesce every node, then force-cancel every job.

        ``quiesce_all`` is the block graph's drain of all nodes (bdrv_drain_all_begin,
        which announces ``paused``/``standby``); it runs once, however often this is
        called. ``quiesced`` tells whether that drain has settled (no request left
        in flight). Goes as far as it can without waiting for I/O or timers, so
        that the events of jobs that can stop at once are queued before whatever
        the caller writes next (``quit``'s reply). Returns True once no job is left.
        """
        if self._shutdown_quiesced is None:
            self._shutdown_quiesced = quiesced
            quiesce_all()
        return self._shutdown_progress()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown_quiesced is not None

    async def finish_shutdown(self, grace_s: float) -> list["Job"]:
        """Let the jobs cancelled by begin_shutdown() finish; give up after ``grace_s``.

        QEMU waits as long as a request takes (a hung one blocks its exit for
        ever); qmpjobd bounds the wait. Returns the jobs still there at the end.
        """
        assert self._shutdown_quiesced is not None, "finish_shutdown before begin_shutdown"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while not self._shutdown_progress():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return list(self.jobs)
            # What we wait for finishes from thread-pool futures, clock timers or
            # bottom halves, with no single hook to wait on; shutdown is rare and
            # short, so re-checking every few milliseconds is the simple way.
            await asyncio.sleep(min(remaining, SHUTDOWN_RECHECK_S))
        return []

    def _shutdown_progress(self) -> bool:
        """QEMU's job_cancel_sync_all: force-cancel the first (newest) job and wait
        for it to complete, until the list is empty. Stops early, returning False,
        where QEMU would block for I/O; the next call continues from there."""
        assert self._shutdown_quiesced is not None
        if self.jobs and not self._shutdown_quiesced():
            return False   # bdrv_drain_all_begin still waits for requests
        # The drain has settled once; what the cancelled jobs do next is theirs.
        self._shutdown_quiesced = _always_settled
        while self.jobs:
            job = self.jobs[0]
            status = job.status
            job.cancel_sync(force=True)
            if self.jobs and self.jobs[0] is job and (not job.is_completed or job.status == status):
                # Its I/O (or a transaction member's) is still running.
                return False
        return True

    def close(self) -> None:
        """Abandon every job coroutine (daemon exit)."""
        for job in list(self.jobs):
            job.close()
