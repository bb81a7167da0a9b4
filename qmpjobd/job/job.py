"""The generic job: lifecycle, pause/cancel machinery and the hooks a job driver fills in.

This is the Python counterpart of QEMU's job.c (job-lifecycle.md section 11 is the
algorithm). A driver subclasses :class:`Job` (block jobs subclass
``qmpjobd.block.jobs.base.BlockJob``) and overrides the hooks:

=========================  ==================================================================
``async run() -> int``     the work; return 0 or a negative errno. Raising ``OSError`` counts
                           as ``-errno`` with its text; raising ``QMPError`` as ``-EINVAL``
                           with its desc. Set ``self.error`` for a custom error text.
``prepare() -> int``       finalisation step that may still fail (graph changes); 0 or -errno
``commit()``               the transaction succeeded (after every member's prepare)
``abort()``                the job failed or was cancelled
``clean()``                always, after commit/abort
``complete_request()``     ``job-complete`` on a READY/STANDBY job (set ``can_complete``)
``cancel_is_forced(f)``    driver's view of a cancel; default: every cancel is a force cancel
``async on_pause()``       quiesce driver work before the job pauses at a pause point
``async on_resume()``      after a pause point (whether or not it paused)
``on_user_resume()``       ``job-resume``/``block-job-resume`` accepted (block jobs reset io-status)
=========================  ==================================================================

Inside ``run()`` a driver waits only through the job: ``await self.pause_point()``,
``await self.sleep_ns(ns)``, ``await self.yield_()`` (until ``self.enter()``), or
``await self.park_until_woken(reason, timeout_ns)``. Awaiting an I/O future directly
is allowed too; the job then stays ``busy`` (as a QEMU job does while in a request).

Starting or entering a job runs it synchronously up to its next wait; when ``run()``
returns, the rest (waiting/pending/concluded...) happens in a main-loop bottom half
(``JobManager.defer``, QEMU's job_exit), which is why a fast job's completion follows
the events of jobs started after it in the same command. Whether that bottom half runs
before or after the reply of the command that ended ``run()`` depends on how deep in
the main loop's passes it was scheduled (``qmpjobd.job.manager``).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from qmpjobd.errors import QMPError
from qmpjobd.job.clock import Timer
from qmpjobd.job.coroutine import CoroutineRunner, park
from qmpjobd.job.faults import faults_of
from qmpjobd.job.states import (
    COMPLETED_STATUSES,
    READY_STATUSES,
    JobStatus,
    JobVerb,
    check_verb,
    transition,
    verb_allowed,
)
from qmpjobd.job.txn import JobTxn

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.job.manager import JobManager

log = logging.getLogger(__name__)


def error_text_for(ret: int) -> str:
    """The text QEMU puts in a job error when the driver supplied none (strerror)."""
    return os.strerror(-ret)


class Job:
    """One job. Creating the object is QEMU's job_create: the id is checked, the job is
    announced (``created``), listed (newest first) and put in a transaction."""

    # Slots, not a __dict__: 10 000 concluded jobs kept for query-jobs cost ~1.5 KiB
    # each in attribute dicts. Subclasses declare their own __slots__ too.
    __slots__ = (
        "manager", "emit", "clock", "id", "status", "auto_finalize", "auto_dismiss",
        "pause_count", "paused", "user_paused", "busy", "cancelled", "force_cancel",
        "deferred", "started", "ret", "error", "progress_current", "progress_total",
        "txn", "_runner", "_sleep_timer", "_park_reason",
    )

    job_type: ClassVar[str] = ""          # JobType value, e.g. "backup", "create"
    is_block_job: ClassVar[bool] = False
    can_complete: ClassVar[bool] = False  # has a complete step (mirror, active commit)

    def __init__(self, manager: "JobManager", job_id: str | None, *,
                 auto_finalize: bool = True, auto_dismiss: bool = True,
                 txn: JobTxn | None = None, internal: bool = False) -> None:
        manager.check_new_job_id(job_id, internal=internal)
        self.manager = manager
        self.emit = manager.emit
        self.clock = manager.clock
        self.id: str | None = job_id
        self.status = JobStatus.UNDEFINED
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        # Born paused with one pause reference, which start() drops.
        self.pause_count = 1
        self.paused = True
        self.user_paused = False
        self.busy = False
        self.cancelled = False           # a cancel was requested
        self.force_cancel = False        # ... and it is a real (force) cancel
        self.deferred = False            # run() is over; completion runs in a bottom half
        self.started = False             # start() ran (the runner is dropped at CONCLUDED)
        self.ret = 0
        self.error: str | None = None
        self.progress_current = 0
        self.progress_total = 0
        self.txn: JobTxn | None = None
        self._runner: CoroutineRunner | None = None
        self._sleep_timer: Timer | None = None
        self._park_reason: object | None = None
        transition(self, JobStatus.CREATED)
        manager.add(self)
        (txn if txn is not None else JobTxn()).add(self)
        faults = faults_of(self)
        if faults is not None:   # test controls: bind faults and holds armed by id/type
            faults.job_created(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {self.status.value}>"

    # ------------------------------------------------------------------ hooks

    async def run(self) -> int:
        raise NotImplementedError

    def prepare(self) -> int:
        return 0

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def clean(self) -> None:
        pass

    def complete_request(self) -> None:
        raise QMPError(f"The active block job '{self.id}' cannot be completed")

    def cancel_is_forced(self, force: bool) -> bool:
        return True

    async def on_pause(self) -> None:
        pass

    async def on_resume(self) -> None:
        pass

    def on_user_resume(self) -> None:
        pass

    # Events beyond JOB_STATUS_CHANGE; the block-job layer emits BLOCK_JOB_*.
    def on_ready_event(self) -> None:
        pass

    def on_pending_event(self) -> None:
        pass

    def on_completed_event(self) -> None:
        pass

    def on_cancelled_event(self) -> None:
        pass

    def on_free(self) -> None:
        """The job reached NULL and leaves the job list (release what it holds)."""

    def release_run_state(self) -> None:
        """The job concluded: drop what only a running job needs.

        A concluded job may stay listed for a long time (auto-dismiss=false), and
        query-jobs, query-block-jobs and job-dismiss need only its id, type, status,
        progress, speed, error and flags. Drivers extend this for their own state
        (copy bitmaps, arguments) by deleting the attributes: a use afterwards is a
        bug, and raises AttributeError instead of going unnoticed.
        """
        # run() has returned by now (CONCLUDED follows the completion bottom half),
        # so the coroutine and its frame are finished.
        assert self._runner is None or self._runner.finished, f"{self!r}: runner still live"
        self._runner = None
        self._cancel_sleep_timer()

    # ------------------------------------------------------------------ predicates

    @property
    def is_completed(self) -> bool:
        return self.status in COMPLETED_STATUSES

    @property
    def is_ready(self) -> bool:
        return self.status in READY_STATUSES

    @property
    def is_cancelled(self) -> bool:
        """QEMU's job_is_cancelled(): a *force* cancel was requested."""
        return self.cancelled and self.force_cancel

    @property
    def cancel_requested(self) -> bool:
        return self.cancelled

    @property
    def should_pause(self) -> bool:
        return self.pause_count > 0

    @property
    def sleep_timer_pending(self) -> bool:
        return self._sleep_timer is not None and self._sleep_timer.pending

    # ------------------------------------------------------------------ progress

    def progress_update(self, done: int) -> None:
        self.progress_current += done
        faults = faults_of(self)
        if faults is not None:   # test controls: a run fault due at this progress
            faults.progress(self)

    def progress_set_remaining(self, remaining: int) -> None:
        self.progress_total = self.progress_current + remaining

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Start the job: drop the birth pause reference and run to the first wait."""
        assert not self.started and self.paused, f"{self!r}: start() twice"
        self._runner = CoroutineRunner(self._co_entry(), name=f"job {self.id}")
        self.started = True
        self.pause_count -= 1
        self.busy = True
        self.paused = False
        transition(self, JobStatus.RUNNING)
        faults = faults_of(self)
        if faults is not None:   # test controls: the run phase begins
            faults.job_started(self)
        self._runner.enter()

    async def _co_entry(self) -> None:
        await self.pause_point()
        self.ret = await self._run_catching_errors()
        faults = faults_of(self)
        if faults is not None:   # test controls: a run fault decides the outcome
            faults.run_finished(self)
        self.deferred = True
        self.busy = True
        self.manager.defer(self._exit)

    async def _run_catching_errors(self) -> int:
        try:
            ret = await self.run()
        except OSError as exc:
            code = exc.errno or errno.EIO
            if self.error is None and exc.strerror and exc.strerror != os.strerror(code):
                self.error = exc.strerror
            return -code
        except QMPError as exc:
            if self.error is None:
                self.error = exc.desc
            return -errno.EINVAL
        assert isinstance(ret, int) and ret <= 0, f"{self!r}: run() returned {ret!r}"
        return ret

    def enter(self) -> None:
        """Wake the job if it waits at a job-level yield (QEMU's job_enter)."""
        self.enter_cond(None)

    def enter_cond(self, predicate: Callable[[], bool] | None) -> None:
        if not self.started or self.deferred or self.busy:
            return
        if predicate is not None and not predicate():
            return
        self._cancel_sleep_timer()
        self.busy = True
        assert self._runner is not None
        self._runner.enter()

    def wake(self, reason: object) -> None:
        """Enter the job only if it is parked waiting for ``reason``."""
        if self._park_reason is reason:
            self.enter()

    async def park_until_woken(self, reason: object = None, timeout_ns: int | None = None) -> None:
        """Job-level yield (not busy). Ends on ``enter()``, ``wake(reason)`` or the timeout.

        The timeout is private to this wait: it is *not* the job's sleep timer, so
        ``resume()`` and ``set-speed`` treat the job as not sleeping.
        """
        timer = None
        if timeout_ns is not None:
            token = object()
            reason = reason if reason is not None else token
            timer = self.clock.call_later_ns(timeout_ns, lambda: self.wake(reason))
        self._park_reason = reason
        self.busy = False
        try:
            await park()
        finally:
            self._park_reason = None
            if timer is not None:
                timer.cancel()
        assert self.busy, f"{self!r}: resumed without enter()"

    async def _do_yield(self, sleep_ns: int | None) -> None:
        if sleep_ns is not None:
            self._sleep_timer = self.clock.call_later_ns(sleep_ns, self.enter)
        await self.park_until_woken()

    def _cancel_sleep_timer(self) -> None:
        if self._sleep_timer is not None:
            self._sleep_timer.cancel()
            self._sleep_timer = None

    async def pause_point(self) -> None:
        """Pause here if a pause was requested (PAUSED, or STANDBY when READY)."""
        assert self.started
        if not self.should_pause or self.is_cancelled:
            return
        await self.on_pause()
        if self.should_pause and not self.is_cancelled:
            kept = self.status
            transition(self, JobStatus.STANDBY if kept == JobStatus.READY else JobStatus.PAUSED)
            self.paused = True
            await self._do_yield(None)
            self.paused = False
            transition(self, kept)
            faults = faults_of(self)
            if faults is not None:   # test controls: a hold released while paused
                faults.job_resumed(self)
        await self.on_resume()

    async def sleep_ns(self, ns: int) -> None:
        """Sleep ``ns`` (cut short by pause or cancel), then pass a pause point."""
        assert self.busy
        if self.is_cancelled:
            return
        if not self.should_pause:
            await self._do_yield(ns)
        await self.pause_point()

    async def yield_(self) -> None:
        """Wait until someone calls ``enter()`` (QEMU's job_yield), then pass a pause point."""
        assert self.busy
        if self.is_cancelled:
            return
        if not self.should_pause:
            await self._do_yield(None)
        await self.pause_point()

    def ready(self) -> None:
        """The job converged (mirror, active commit): READY, then BLOCK_JOB_READY."""
        faults = faults_of(self)
        if faults is not None and faults.hold(self, JobStatus.READY, self._released_before_ready):
            return
        transition(self, JobStatus.READY)
        self.on_ready_event()

    def _released_before_ready(self) -> None:
        """A hold before READY was released (test controls): a paused job turns
        READY once it runs again, a job that went on to fail never does."""
        if self.status == JobStatus.RUNNING:
            self.ready()
        elif self.status == JobStatus.PAUSED:
            faults = faults_of(self)
            assert faults is not None
            faults.after_pause[self] = self._released_before_ready

    # ------------------------------------------------------------------ pause / resume

    def pause(self) -> None:
        """Take a pause reference (user pause, error stop, drained section)."""
        self.pause_count += 1
        if not self.paused:
            self.enter()

    def resume(self) -> None:
        """Drop a pause reference; the job runs again when none is left."""
        assert self.pause_count > 0, f"{self!r}: resume without pause"
        self.pause_count -= 1
        if self.pause_count:
            return
        # A sleeping job wakes on its own timer.
        self.enter_cond(lambda: not self.sleep_timer_pending)

    # The block graph's drained sections use these names.
    pause_internal = pause
    resume_internal = resume

    def user_pause(self) -> None:
        check_verb(self, JobVerb.PAUSE)
        if self.user_paused:
            raise QMPError("Job is already paused")
        self.user_paused = True
        self.pause()

    def user_resume(self) -> None:
        # Checked before the verb: a PENDING job answers "Can't resume...".
        if not self.user_paused or self.pause_count <= 0:
            raise QMPError("Can't resume a job that was not paused")
        check_verb(self, JobVerb.RESUME)
        self.on_user_resume()
        self.user_paused = False
        self.resume()

    # ------------------------------------------------------------------ cancel

    def cancel_async(self, force: bool) -> None:
        force = self.cancel_is_forced(force)
        if self.user_paused:
            # The caller wakes the job; a cancel always undoes the user pause.
            self.on_user_resume()
            self.user_paused = False
            assert self.pause_count > 0
            self.pause_count -= 1
        # A soft cancel of a job whose run() is over means nothing.
        if force or not self.deferred:
            self.cancelled = True
            self.force_cancel |= force

    def cancel(self, force: bool) -> None:
        """QEMU's job_cancel (after the command's checks)."""
        faults = faults_of(self)
        if faults is not None and faults.is_held(self):
            # Test controls: a held job goes on first, and the cancel then acts
            # on where it stands, unless it has finished meanwhile.
            faults.release_reached(self)
            if self.status in (JobStatus.CONCLUDED, JobStatus.NULL) or not verb_allowed(
                    JobVerb.CANCEL, self.status):
                return
        if self.status == JobStatus.CONCLUDED:
            self._do_dismiss()
            return
        self.cancel_async(force)
        if not self.started:
            self._completed()
        elif self.deferred:
            if self.is_cancelled:
                assert self.txn is not None
                self.txn.abort(self)
        else:
            self.enter()

    def user_cancel(self, force: bool) -> None:
        check_verb(self, JobVerb.CANCEL)
        self.cancel(force)

    def cancel_sync(self, force: bool) -> None:
        """QEMU's job_cancel_sync (rollback of a transaction action): cancel, then
        poll the main loop until the job has completed, as far as that can go
        without waiting for I/O."""
        if self.status == JobStatus.NULL:
            return
        self.cancel(force)
        self.manager.poll_while(lambda: not self.is_completed)

    # ------------------------------------------------------------------ complete / finalize / dismiss

    def complete(self) -> None:
        check_verb(self, JobVerb.COMPLETE)
        if self.cancel_requested or not self.can_complete:
            raise QMPError(f"The active block job '{self.id}' cannot be completed")
        self.complete_request()

    def finalize(self) -> None:
        check_verb(self, JobVerb.FINALIZE)
        assert self.txn is not None
        self.txn.do_finalize(self)

    def dismiss(self) -> None:
        check_verb(self, JobVerb.DISMISS)
        self._do_dismiss()

    # ------------------------------------------------------------------ completion (txn.py drives these)

    def _exit(self) -> None:
        """Bottom half after run() returned (QEMU's job_exit)."""
        txn = self.txn
        self.busy = False
        faults = faults_of(self)
        if faults is not None:   # test controls: a hold before waiting/aborting
            after = JobStatus.ABORTING if self.ret or self.is_cancelled else JobStatus.WAITING
            if faults.hold(self, after, self._exit):
                return
        self._completed()
        if txn is not None:
            txn.member_exited(self)

    def _completed(self) -> None:
        assert self.txn is not None and not self.is_completed, f"{self!r}: completed twice"
        self.update_rc()
        if self.ret:
            self.txn.abort(self)
        else:
            self.txn.success(self)

    def update_rc(self) -> None:
        if not self.ret and self.is_cancelled:
            self.ret = -errno.ECANCELED
        if self.ret:
            if self.error is None:
                self.error = error_text_for(self.ret)
            transition(self, JobStatus.ABORTING)

    def transition_to_pending(self) -> None:
        transition(self, JobStatus.PENDING)
        if not self.auto_finalize:
            self.on_pending_event()

    def run_prepare(self) -> int:
        if self.ret == 0:
            faults = faults_of(self)
            fault = faults.prepare_fault(self) if faults is not None else None
            if fault is not None:
                # Test controls: the driver's prepare fails instead of running.
                self.ret = -fault.errno
                self.error = fault.message
            else:
                self.ret = self.prepare()
            self.update_rc()
        return self.ret

    def poll_until_completed(self) -> bool:
        """QEMU's job_finish_sync, as far as it can go without waiting for I/O."""
        if not self.started:
            # QEMU 7.2 waits forever here (a never-started member of an aborted
            # grouped transaction); completing it at once is the only sane outcome.
            self._completed()
            return self.is_completed
        return self.manager.poll_while(self._kick_unless_completed)

    def _kick_unless_completed(self) -> bool:
        """job_finish_sync's poll condition: enter the job, then test it."""
        self.enter()
        return not self.is_completed

    def finalize_single(self) -> None:
        assert self.is_completed and self.txn is not None
        self.update_rc()
        faults = faults_of(self)
        if self.ret == 0:
            self.commit()
        else:
            self.abort()
        if faults is not None:   # test controls: these steps cannot fail, only record
            faults.callback_done(self, "commit" if self.ret == 0 else "abort")
        self.clean()
        if faults is not None:
            faults.callback_done(self, "clean")
        if self.started:
            if self.is_cancelled:
                self.on_cancelled_event()
            else:
                self.on_completed_event()
        self.txn.remove(self)
        self._conclude()

    def _conclude(self) -> None:
        faults = faults_of(self)
        if faults is not None and faults.hold(self, JobStatus.CONCLUDED, self._conclude):
            return
        transition(self, JobStatus.CONCLUDED)
        self.release_run_state()
        if self.auto_dismiss or not self.started:
            self._do_dismiss()

    def _do_dismiss(self) -> None:
        self.busy = False
        self.paused = False
        self.deferred = True
        if self.txn is not None:
            self.txn.remove(self)
        transition(self, JobStatus.NULL)
        self.manager.remove(self)
        faults = faults_of(self)
        if faults is not None:
            faults.job_freed(self)
        self.on_free()

    def early_fail(self) -> None:
        """Creation failed after the object existed: ``created`` is followed by ``null``."""
        assert self.status == JobStatus.CREATED
        self._do_dismiss()

    # ------------------------------------------------------------------ queries

    def job_info(self) -> dict[str, Any]:
        """query-jobs element, members in JobInfo declaration order."""
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type,
            "status": self.status.value,
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    def close(self) -> None:
        """Daemon shutdown: abandon the coroutine and any timer."""
        self._cancel_sleep_timer()
        if self._runner is not None:
            self._runner.close()
