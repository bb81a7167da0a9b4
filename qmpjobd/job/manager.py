"""The job list: ids, lookup for the job commands, queries, and main-loop bottom halves.

Jobs are listed newest first, as QEMU prepends to its job list; query-jobs and
query-block-jobs walk that order.

Bottom halves: QEMU finishes a job (``job_exit``) in a main-loop bottom half, which
runs before the reply to the command that caused it but after everything else the
command did. ``defer()`` queues such work; ``run_bottom_halves()`` runs it. The
dispatcher calls ``run_bottom_halves()`` after every command handler (see
``qmpjobd.dispatch.Dispatcher``), and a loop callback is scheduled as
a fallback so work deferred outside a command (a job woken by a timer) runs on the
next loop turn.
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

# Bottom halves one run_bottom_halves() call may run before yielding to the loop.
BOTTOM_HALF_BUDGET = 10_000

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
        self._bottom_halves: deque[Callable[[], None]] = deque()
        self._flush_scheduled = False

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
        """Queue ``fn`` to run from the main loop, before the current command's reply."""
        self._bottom_halves.append(fn)
        self._schedule_flush()

    def run_bottom_halves(self) -> None:
        """Run every queued bottom half, including ones queued while running.

        A chain that keeps re-queueing itself (a job retrying a permanent error
        with on-error=ignore) is cut after BOTTOM_HALF_BUDGET calls and continued
        from the event loop, so the daemon stays responsive.
        """
        for _ in range(BOTTOM_HALF_BUDGET):
            if not self._bottom_halves:
                return
            self._bottom_halves.popleft()()
        if self._bottom_halves:
            log.debug("bottom halves still queued after %d calls; continuing later",
                      BOTTOM_HALF_BUDGET)
            self._schedule_flush()

    def main_loop_turn(self) -> Reschedule:
        """``await jobs.main_loop_turn()``: let the main loop run, resume in a bottom half.

        For drivers that model QEMU's ``aio_co_schedule`` + yield (blkdebug's error
        injection): the coroutine continues before the current command's reply.
        """
        return Reschedule(self.defer)

    @property
    def has_bottom_halves(self) -> bool:
        return bool(self._bottom_halves)

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
        self._flush_scheduled = False
        self.run_bottom_halves()

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Abandon every job coroutine (daemon exit)."""
        for job in list(self.jobs):
            job.close()
