"""Job transactions: the success and abort algorithms of job-lifecycle.md section 11.

Every job belongs to a transaction; a standalone job (or an ``individual``-mode member)
has a one-job transaction of its own. Members are kept **newest first** (QEMU prepends)
and every "for all members" step walks that order, which is what orders the events of
a grouped transaction (s06_txn.log).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from qmpjobd.job.faults import faults_of
from qmpjobd.job.states import JobStatus, transition

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.job.job import Job


class JobTxn:
    """A group of jobs that succeed or fail together."""

    __slots__ = ("jobs", "aborting", "_abort_waits_for")

    def __init__(self) -> None:
        self.jobs: list["Job"] = []
        self.aborting = False
        # Member the abort loop waits for (it had to wait for I/O to stop).
        self._abort_waits_for: "Job | None" = None

    def __repr__(self) -> str:
        return f"<JobTxn {[j.id for j in self.jobs]} aborting={self.aborting}>"

    def add(self, job: "Job") -> None:
        self.jobs.insert(0, job)
        job.txn = self

    def remove(self, job: "Job") -> None:
        if job in self.jobs:
            self.jobs.remove(job)
        if job.txn is self:
            job.txn = None

    def _apply(self, fn: Callable[["Job"], int]) -> int:
        """Call ``fn`` on each member in list order; stop at the first non-zero result."""
        rc = 0
        for member in list(self.jobs):
            rc = fn(member)
            if rc:
                break
        return rc

    # ------------------------------------------------------------------ success

    def success(self, job: "Job") -> None:
        """``job``'s run() succeeded: wait for the others, then pending and finalize."""
        transition(job, JobStatus.WAITING)
        if any(not member.is_completed for member in self.jobs):
            return
        self._all_finished(job)

    def _all_finished(self, job: "Job") -> None:
        faults = faults_of(job)
        if faults is not None and faults.hold_group(self.jobs, JobStatus.PENDING,
                                                    lambda: self._released_before_pending(job)):
            return   # test controls: held before pending, the members stay waiting
        for member in list(self.jobs):
            assert member.ret == 0
            member.transition_to_pending()
        needs_manual_finalize = self._apply(lambda m: int(not m.auto_finalize))
        if not needs_manual_finalize:
            self.do_finalize(job)

    def _released_before_pending(self, job: "Job") -> None:
        # Unless something aborted the transaction while it was held.
        if self.jobs and all(m.status == JobStatus.WAITING for m in self.jobs):
            self._all_finished(job)

    def do_finalize(self, job: "Job") -> None:
        """Prepare every member; commit them all, or abort the whole transaction."""
        if self._apply(lambda m: m.run_prepare()):
            self.abort(job)
        else:
            for member in list(self.jobs):
                member.finalize_single()

    # ------------------------------------------------------------------ abort

    def abort(self, job: "Job") -> None:
        """``job`` failed or was force-cancelled: cancel the others and finalize all."""
        if self.aborting:
            # The member that started the abort is already handling everything.
            return
        self.aborting = True
        for other in list(self.jobs):
            if other is not job:
                other.cancel_async(force=True)
        self._finalize_aborted_members()

    def _finalize_aborted_members(self) -> None:
        while self.jobs:
            member = self.jobs[0]
            if not member.is_completed and not member.poll_until_completed():
                # Still waiting for its I/O: continue when its run() has returned.
                self._abort_waits_for = member
                return
            member.finalize_single()

    def member_exited(self, job: "Job") -> None:
        """Called after a member's completion bottom half ran."""
        if self._abort_waits_for is job:
            self._abort_waits_for = None
            self._finalize_aborted_members()
