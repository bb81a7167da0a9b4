"""Test controls of the job core: armed faults and holds, as data.

Only a daemon started with ``--test-controls`` has a :class:`FaultTable`
(``JobManager.faults``); the job core asks :func:`faults_of` at its existing
phase boundaries and does nothing more when the answer is None, so a daemon
without test controls runs exactly the code it runs without this module.

What a fault does, per phase (docs/testing.md has the client's view):

* ``run`` with ``iotype``: the job's next read (of its source) or write (of its
  target) once its progress reaches ``at_progress`` fails with ``errno``; the
  driver handles it as any I/O error (BLOCK_JOB_ERROR, the on-error policy,
  io-status). The request is failed at the node, so the driver's own error path
  runs unchanged.
* ``run`` without ``iotype``: the job fails with the error once progress reaches
  ``at_progress``, without asking its error policy (no BLOCK_JOB_ERROR). A block
  job fails at its next request (read of its source or write to its target), so
  its progress stops exactly there; a job without nodes stops the way a
  cancelled job stops, but ends with the error instead of ECANCELED.
* ``prepare``: the job's prepare step fails with the error instead of running,
  as a QEMU driver's .prepare returning an error does; the transaction aborts.
* ``commit``, ``abort``, ``clean``: these steps return nothing in QEMU and cannot
  change the job's outcome; the fault is logged as a warning and recorded (see
  ``fired``), and the step itself still runs.

A hold stops a job just before it enters a status and keeps the rest of that
step (a continuation) until released.
"""

from __future__ import annotations

import errno as errno_codes
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from qmpjobd.job.states import JobStatus

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.job.job import Job

log = logging.getLogger(__name__)

PHASES = ("run", "prepare", "commit", "abort", "clean")
CALLBACK_PHASES = ("commit", "abort", "clean")
HOLD_POINTS = {status.value: status for status in (
    JobStatus.READY, JobStatus.WAITING, JobStatus.PENDING, JobStatus.ABORTING,
    JobStatus.CONCLUDED)}


def faults_of(job: "Job") -> "FaultTable | None":
    """The fault table of ``job``'s daemon, or None without test controls."""
    return getattr(job.manager, "faults", None)


@dataclass(eq=False)
class JobFault:
    """One armed fault. ``job_id`` or ``job_type`` selects the job; ``job`` is the
    job it is bound to once that exists (a type fault binds to the next job of
    that type created after it was armed)."""

    phase: str
    job_id: str | None = None
    job_type: str | None = None
    at_progress: float = 0.0
    iotype: str | None = None
    errno: int = errno_codes.EIO
    message: str | None = None
    remaining: int = 1
    job: "Job | None" = None
    # Set for a run fault without iotype on a block job: its failed request
    # bypasses the error policy (BlockJob.error_action asks ``failing``).
    silent: bool = False
    # Set when the fault stopped the job through its cancel flags.
    via_cancel: bool = False

    @property
    def text(self) -> str:
        return self.message if self.message is not None else os.strerror(self.errno)

    def selects(self, job: "Job") -> bool:
        if self.job is not None or self.remaining <= 0:
            return False
        if self.job_id is not None:
            return job.id == self.job_id
        return job.job_type == self.job_type

    def progress_reached(self, job: "Job") -> bool:
        if not self.at_progress:
            return True
        # A job that has not sized its work yet (total 0) has reached no fraction.
        return job.progress_total > 0 and \
            job.progress_current >= self.at_progress * job.progress_total


@dataclass(eq=False)
class Hold:
    """A hold of job ``job_id`` before ``before``; ``resume`` is set once reached."""

    job_id: str
    before: JobStatus
    resume: Callable[[], None] | None = None
    job: "Job | None" = None


class _RequestInterposer:
    """Fails requests of one node while I/O faults are armed on it.

    The node's ``co_pread``/``co_pwrite`` are shadowed by instance attributes,
    and ``host_file`` too (so copies go through the request path instead of the
    kernel). Removing the attributes restores the class's methods.
    """

    def __init__(self, node: Any, is_read: bool, table: "FaultTable") -> None:
        self.node = node
        self.is_read = is_read
        self.table = table
        self.faults: list[JobFault] = []
        self.method = "co_pread" if is_read else "co_pwrite"
        self.original = getattr(node, self.method)
        setattr(node, self.method, self._request)
        node.host_file = _no_host_file

    async def _request(self, offset: int, arg: Any) -> Any:
        for fault in self.faults:
            assert fault.job is not None
            if fault.remaining > 0 and fault.progress_reached(fault.job):
                self.table.fired_once(fault)
                if fault.silent:
                    self.table.failing[fault.job] = fault
                if fault.remaining <= 0:
                    self.table.drop_fault(fault)
                raise OSError(fault.errno, os.strerror(fault.errno))
        return await self.original(offset, arg)

    def remove(self) -> None:
        self.node.__dict__.pop(self.method, None)


def _no_host_file() -> None:
    return None


@dataclass
class FaultTable:
    """Every armed fault and hold of one daemon, and the faults that fired."""

    faults: list[JobFault] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    fired: list[dict] = field(default_factory=list)
    # Jobs stopping because of a run fault without iotype, with that fault.
    failing: dict[Any, JobFault] = field(default_factory=dict)
    interposers: dict[tuple[int, bool], _RequestInterposer] = field(default_factory=dict)
    # What a job does once it leaves its pause (a hold before READY released
    # while the job was paused).
    after_pause: dict[Any, Callable[[], None]] = field(default_factory=dict)
    shutting_down: bool = False

    # ------------------------------------------------------------------ arming

    def arm(self, fault: JobFault, existing: "Job | None") -> None:
        """Arm ``fault``; ``existing`` is the job its id names now, if any."""
        self.faults.append(fault)
        if existing is not None:
            self._bind(fault, existing)
            if existing.started:
                self._activate(fault)

    def add_hold(self, hold: Hold, existing: "Job | None") -> None:
        hold.job = existing
        self.holds.append(hold)

    def release(self, job_id: str, before: JobStatus | None) -> int:
        """Release the holds of ``job_id`` (all, or those before ``before``);
        reached holds continue now. Returns how many were released."""
        chosen = [h for h in self.holds
                  if h.job_id == job_id and (before is None or h.before == before)]
        for hold in chosen:
            self.holds.remove(hold)
        for hold in chosen:
            if hold.resume is not None:
                hold.resume()
        return len(chosen)

    def release_all(self) -> None:
        """Daemon exit: nothing may stay held (jobs must be able to stop)."""
        self.shutting_down = True
        held, self.holds = self.holds, []
        for hold in held:
            if hold.resume is not None:
                hold.resume()

    # ------------------------------------------------------------------ job life

    def job_created(self, job: "Job") -> None:
        for fault in self.faults:
            if fault.selects(job):
                self._bind(fault, job)
        for hold in self.holds:
            if hold.job is None and hold.job_id == job.id:
                hold.job = job

    def job_started(self, job: "Job") -> None:
        for fault in self._bound(job, "run"):
            self._activate(fault)

    def job_freed(self, job: "Job") -> None:
        """The job reached NULL: what was bound to it goes (a hold by id stays
        armed for a later job of the same id only if it was never reached)."""
        for fault in [f for f in self.faults if f.job is job]:
            self._disarm(fault)
        self.holds = [h for h in self.holds if h.job is not job or h.resume is None]
        for hold in self.holds:
            if hold.job is job:
                hold.job = None
        self.failing.pop(job, None)
        self.after_pause.pop(job, None)

    # ------------------------------------------------------------------ run phase

    def progress(self, job: "Job") -> None:
        """The job made progress: fire a due run fault of a job without nodes."""
        for fault in self._bound(job, "run"):
            if fault.iotype is None and not fault.silent and fault.progress_reached(job):
                self._fail_run(fault, job)
                return

    def run_finished(self, job: "Job") -> None:
        """run() returned: a job stopped by a run fault ends with its error."""
        fault = self.failing.pop(job, None)
        if fault is None:
            return
        if fault.via_cancel:
            job.cancelled = job.force_cancel = False
        job.ret = -fault.errno
        if fault.message is not None:
            job.error = fault.message

    def _activate(self, fault: JobFault) -> None:
        job = fault.job
        assert job is not None
        if fault.phase != "run":
            return
        sides = (True, False) if fault.iotype is None else (fault.iotype == "read",)
        nodes = [(job.fault_node(is_read), is_read) for is_read in sides] \
            if hasattr(job, "fault_node") else []
        nodes = [(node, is_read) for node, is_read in nodes if node is not None]
        if not nodes:
            # No block nodes, no requests to fail: the job fails as a whole.
            fault.iotype = None
            if fault.progress_reached(job):
                self._fail_run(fault, job)
            return
        fault.silent = fault.iotype is None
        for node, is_read in nodes:
            self._interposer(node, is_read).faults.append(fault)

    def _fail_run(self, fault: JobFault, job: "Job") -> None:
        if job.cancelled or job.deferred or job in self.failing:
            return   # a real cancel (or the end of run) came first
        self.fired_once(fault)
        fault.via_cancel = True
        self.failing[job] = fault
        # Stop the job the way a cancel stops it; run_finished() turns the
        # outcome into the fault's error.
        job.cancelled = job.force_cancel = True

    def _interposer(self, node: Any, is_read: bool) -> _RequestInterposer:
        key = (id(node), is_read)
        if key not in self.interposers:
            self.interposers[key] = _RequestInterposer(node, is_read, self)
        return self.interposers[key]

    def fails_silently(self, job: "Job") -> bool:
        """Did ``job``'s last request fail through a fault that bypasses its
        error policy (a run fault without iotype)?"""
        fault = self.failing.get(job)
        return fault is not None and fault.silent

    def drop_fault(self, fault: JobFault) -> None:
        """An exhausted fault leaves every node it was armed on."""
        for interposer in list(self.interposers.values()):
            if fault in interposer.faults:
                interposer.faults.remove(fault)
                self.drop_interposer_if_idle(interposer)

    def drop_interposer_if_idle(self, interposer: _RequestInterposer) -> None:
        if interposer.faults:
            return
        key = (id(interposer.node), interposer.is_read)
        if self.interposers.get(key) is interposer:
            del self.interposers[key]
            interposer.remove()
        if not any(i.node is interposer.node for i in self.interposers.values()):
            interposer.node.__dict__.pop("host_file", None)

    # ------------------------------------------------------------------ other phases

    def prepare_fault(self, job: "Job") -> JobFault | None:
        """The prepare fault that fires now for ``job``, if any."""
        for fault in self._bound(job, "prepare"):
            self.fired_once(fault)
            return fault
        return None

    def callback_done(self, job: "Job", phase: str) -> None:
        """``job``'s commit/abort/clean step ran: record a fault armed for it."""
        for fault in self._bound(job, phase):
            self.fired_once(fault)
            log.warning("test fault: %s of job '%s' failed: %s", phase, job.id, fault.text)
            return

    # ------------------------------------------------------------------ holds

    def hold(self, job: "Job", before: JobStatus, resume: Callable[[], None]) -> bool:
        """Is ``job`` held before ``before``? If so, ``resume`` continues on release."""
        if self.shutting_down:
            return False
        for hold in self.holds:
            if hold.job is job and hold.before == before and hold.resume is None:
                hold.resume = resume
                return True
        return False

    def is_held(self, job: "Job") -> bool:
        return any(h.job is job and h.resume is not None for h in self.holds)

    def release_reached(self, job: "Job") -> None:
        """A cancel acts on where the job really is: reached holds go first."""
        reached = [h for h in self.holds if h.job is job and h.resume is not None]
        for hold in reached:
            self.holds.remove(hold)
        for hold in reached:
            assert hold.resume is not None
            hold.resume()

    def hold_group(self, jobs: Iterable["Job"], before: JobStatus,
                   resume: Callable[[], None]) -> bool:
        """A transaction's members enter ``before`` together (PENDING): held when
        any of them is; ``resume`` continues on the release of that hold."""
        return any(self.hold(job, before, resume) for job in jobs)

    def job_resumed(self, job: "Job") -> None:
        callback = self.after_pause.pop(job, None)
        if callback is not None:
            callback()

    # ------------------------------------------------------------------ bookkeeping

    def fired_once(self, fault: JobFault) -> None:
        fault.remaining -= 1
        assert fault.job is not None
        self.fired.append({"id": fault.job.id or "", "phase": fault.phase,
                           "message": fault.text})
        if fault.remaining <= 0 and fault in self.faults:
            self.faults.remove(fault)

    def _bind(self, fault: JobFault, job: "Job") -> None:
        fault.job = job

    def _bound(self, job: "Job", phase: str) -> list[JobFault]:
        return [f for f in self.faults if f.job is job and f.phase == phase and f.remaining > 0]

    def _disarm(self, fault: JobFault) -> None:
        if fault in self.faults:
            self.faults.remove(fault)
        self.drop_fault(fault)
