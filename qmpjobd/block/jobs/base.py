"""The block-job layer (QEMU's blockjob.c) on top of the generic job core.

What this adds to :class:`qmpjobd.job.job.Job`:

* BLOCK_JOB_COMPLETED / CANCELLED / READY / PENDING / ERROR events, exact payloads
  (data dicts in QAPI declaration order);
* ``speed`` and QEMU's rate limiter (100 ms slices): ``set_speed()`` for the command,
  ``rate_limit.delay_ns(now, bytes)`` for drivers (QEMU's block_job_ratelimit_get_delay);
* the I/O error policies (``on-source-error``/``on-target-error``/``on-error``):
  ``error_action(policy, is_read, errno)`` emits BLOCK_JOB_ERROR and, for ``stop``,
  turns the pause into a user pause with ``io-status`` failed/nospace;
* node attachment: ``attach_node(node, block=...)`` registers the job as a user of a
  node (drained sections then pause it; ``block`` makes other operations on the node
  fail as "busy"). Everything attached is released in ``clean()`` and when freed.

Hooks for drivers (mirror, commit, stream, backup) are those of ``Job`` plus
``on_speed_changed(speed)`` (QEMU's BlockJobDriver.set_speed).
"""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING, Any, Iterable

from qmpjobd.block import iowait, permissions
from qmpjobd.errors import QMPError
from qmpjobd.job.job import Job, error_text_for
from qmpjobd.job.faults import faults_of
from qmpjobd.job.states import JobVerb, check_verb
from qmpjobd.job.txn import JobTxn
from qmpjobd.versions import Behaviour, personality as personality_named

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.node import BlockNode
    from qmpjobd.job.coroutine import CoroutineRunner
    from qmpjobd.job.manager import JobManager

NS_PER_SECOND = 1_000_000_000
# BLOCK_JOB_SLICE_TIME: the rate limiter's accounting period.
SLICE_NS = 100_000_000

IO_STATUS_OK = "ok"

# QEMU 8.1's block_job_ratelimit_sleep: a job woken before its rate-limit delay is
# over (by a pause, say) sleeps again for the rest of it. Before, it went on at once,
# so a rate-limited mirror resumed from a pause turned READY before the resume's reply.
RATE_LIMIT_SURVIVES_EARLY_WAKE = Behaviour(
    "a rate-limit sleep cut short sleeps again for the rest of the delay", since="8.1")


class RateLimit:
    """Byte budget per time slice; when a slice is overspent the next request waits.

    A request is always let through while the current slice still has budget; the
    request that overspends it pushes the end of the slice out in proportion to the
    overspend, and callers wait until that moment.
    """

    __slots__ = ("slice_ns", "slice_quota", "slice_start", "slice_end", "dispatched")

    def __init__(self) -> None:
        self.slice_ns = SLICE_NS
        self.slice_quota = 0          # bytes per slice; 0 = unlimited
        self.slice_start = 0
        self.slice_end = 0
        self.dispatched = 0

    def set_speed(self, bytes_per_second: int, slice_ns: int = SLICE_NS) -> None:
        self.slice_ns = slice_ns
        if bytes_per_second == 0:
            self.slice_quota = 0
        else:
            self.slice_quota = max(int(bytes_per_second * slice_ns / NS_PER_SECOND), 1)

    def delay_ns(self, now_ns: int, nbytes: int) -> int:
        """Account ``nbytes`` now; how long to wait before the next request (0: none)."""
        if not self.slice_quota:
            return 0
        if self.slice_end < now_ns:
            # The previous (maybe stretched) slice is over: start a fresh one.
            self.slice_start = now_ns
            self.slice_end = now_ns + self.slice_ns
            self.dispatched = 0
        self.dispatched += nbytes
        if self.dispatched < self.slice_quota:
            return 0
        overspend = self.dispatched / self.slice_quota
        self.slice_end = self.slice_start + int(overspend * self.slice_ns)
        return self.slice_end - now_ns


class _DetachedGraph:
    """The graph of nodes that belong to no BlockGraph (stand-ins that embed the
    job layer alone): it has no graph lock, so no graph change shows anything."""

    personality = personality_named("7.2")

    @staticmethod
    def graph_change(change: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def graph_changes(self, *changes: str) -> None:
        pass

    def graph_operation(self, operation: str) -> None:
        pass


def error_action_for(policy: str, error: int) -> str:
    """BlockdevOnError policy + errno -> BlockErrorAction (job-lifecycle.md 5.10)."""
    if policy in ("enospc", "auto"):
        return "stop" if error == errno.ENOSPC else "report"
    if policy in ("stop", "report", "ignore"):
        return policy
    raise ValueError(f"unknown on-error policy {policy!r}")


class BlockJob(Job):
    """A job that works on block nodes and speaks the BLOCK_JOB_* events."""

    __slots__ = ("speed", "iostatus", "rate_limit", "attached_nodes", "block_graph")

    is_block_job = True

    def __init__(self, manager: "JobManager", job_id: str | None, main_node: "BlockNode", *,
                 block_main: bool = True, speed: int = 0,
                 auto_finalize: bool = True, auto_dismiss: bool = True,
                 txn: JobTxn | None = None) -> None:
        """QEMU's block_job_create: job_create, attach the main node, apply the speed.

        A negative speed fails here after ``created`` was announced: the job is
        dismissed at once (``created, null``) and the QMPError propagates.
        """
        # The graph lock covers job_create and the main node's edge, not the speed:
        # a bad speed's ``null`` comes after the section (QEMU 10.1+ shows it).
        # The graph of the job's nodes: graph changes of the job go through it.
        self.block_graph = getattr(main_node, "graph", None) or _DetachedGraph()
        with self.block_graph.graph_change("job-create"):
            super().__init__(manager, job_id, auto_finalize=auto_finalize,
                             auto_dismiss=auto_dismiss, txn=txn)
            self.speed = 0
            self.iostatus = IO_STATUS_OK
            self.rate_limit = RateLimit()
            self.attached_nodes: tuple["BlockNode", ...] = ()
            self.attach_node(main_node, block=block_main)
        try:
            self.set_speed(speed)
        except QMPError:
            self.early_fail()
            raise

    # ------------------------------------------------------------------ nodes

    @property
    def blocker_reason(self) -> str:
        return f"block device is in use by block job: {self.job_type}"

    def attach_node(self, node: "BlockNode", *, block: bool = True,
                    edge: "tuple[str, int, int] | None" = None) -> None:
        """Use ``node`` (QEMU's block_job_add_bdrv); ``block`` installs the busy blocker.

        ``edge`` (name, perm, shared) is the job's hold on the node as
        x-debug-query-block-graph shows it; without it qmpjobd.block.permissions
        .JOB_EDGES decides by job type and attach order. A permission conflict
        raises QEMU's error with nothing attached."""
        permissions.attach_job_node(self, node, len(self.attached_nodes), edge)
        node.add_job_user(self, blocker=self.blocker_reason if block else None)
        # A tuple: a job attaches two or three nodes, and the empty tuple left
        # after release_nodes() costs a concluded job nothing.
        self.attached_nodes += (node,)

    def release_nodes(self) -> None:
        """Detach from every node (QEMU's block_job_remove_all_bdrv)."""
        nodes, self.attached_nodes = self.attached_nodes, ()
        for node in reversed(nodes):
            node.remove_job_user(self)
        graph = getattr(nodes[0], "graph", None) if nodes else None
        if graph is not None and hasattr(graph, "nodes"):
            permissions.detach_owner(graph, self)

    def release_nodes_locked(self) -> None:
        """block_job_remove_all_bdrv: release_nodes() under the graph lock (a section
        even when nothing is attached any more, as at block_job_free)."""
        with self.block_graph.graph_change("job-remove-nodes"):
            self.release_nodes()

    def clean(self) -> None:
        self.release_nodes()

    def drained_poll(self) -> bool:
        """QEMU's child_job_drained_poll: may this job still issue requests?

        A job that is not busy (paused, sleeping, yielded) will pass a pause point
        before doing anything, and a completed one does nothing. Drivers refine it.
        """
        return self.busy and not self.is_completed

    def finish_request_in_flight(self) -> bool:
        """A drain waits for this job (BDRV_POLL_WHILE blocking in aio_poll): when
        the job waits for a thread-pool request of its own, finish that request and
        run the job on from it now, to its next wait (a pause point, while the drain
        asks for a pause). False when there is no such request to wait for."""
        for runner in self.request_runners():
            if iowait.finish(runner.awaited_future):
                return runner.resume_if_done()
        return False

    def request_runners(self) -> "Iterable[CoroutineRunner]":
        """The coroutines that may wait for this job's requests: the job's own;
        drivers with copy workers (backup) put theirs first."""
        return () if self._runner is None else (self._runner,)

    def fault_node(self, is_read: bool) -> "BlockNode | None":
        """Where a test-control I/O fault fails this job's requests: reads of its
        source, writes to its target (the drivers' ``source``/``target``)."""
        return getattr(self, "source" if is_read else "target", None)

    def on_free(self) -> None:
        # block_job_free, after ``null``.
        self.release_nodes_locked()

    def release_run_state(self) -> None:
        super().release_run_state()
        # set-speed is refused from CONCLUDED on, so nothing asks for it again.
        del self.rate_limit

    # ------------------------------------------------------------------ speed

    def on_speed_changed(self, speed: int) -> None:
        """Driver hook: a new speed was applied (e.g. kick a rate-limit wait)."""

    def set_speed(self, speed: int) -> None:
        """block-job-set-speed (also used at creation)."""
        check_verb(self, JobVerb.SET_SPEED)
        if speed < 0:
            raise QMPError("Parameter 'speed' expects a non-negative value")
        old_speed = self.speed
        self.rate_limit.set_speed(speed, SLICE_NS)
        self.speed = speed
        self.on_speed_changed(speed)
        if speed and speed <= old_speed:
            return
        # Only a job asleep on its own timer is woken early.
        self.enter_cond(lambda: self.sleep_timer_pending)

    async def ratelimit_sleep(self, delay_ns: int) -> None:
        """Sleep ``delay_ns`` for the rate limit (QEMU's block_job_ratelimit_sleep).

        Where the personality has RATE_LIMIT_SURVIVES_EARLY_WAKE, a sleep cut short
        (pause, speed change) is followed by another for whatever the limit still
        asks, recomputed each time because the speed may have changed meanwhile.
        """
        await self.sleep_ns(delay_ns)
        if not self.block_graph.personality.has(RATE_LIMIT_SURVIVES_EARLY_WAKE):
            return
        while not self.is_cancelled:
            delay_ns = self.ratelimit_delay_ns(0)
            if delay_ns <= 0:
                return
            await self.sleep_ns(delay_ns)

    def ratelimit_delay_ns(self, nbytes: int) -> int:
        """Account ``nbytes`` copied; how long to sleep before copying more."""
        if not self.speed:
            return 0
        return self.rate_limit.delay_ns(self.clock.now_ns(), nbytes)

    # ------------------------------------------------------------------ errors

    def error_action(self, policy: str, is_read: bool, error: int) -> str:
        """React to an I/O error per ``policy``; returns "report", "ignore" or "stop".

        BLOCK_JOB_ERROR is announced first. For "stop" the job takes a *user* pause
        (unless already user-paused) and io-status records the error; the driver
        must then pass a pause point and retry the request once resumed.
        """
        faults = faults_of(self)
        if faults is not None and faults.fails_silently(self):
            # Test controls: a run fault without iotype fails the job without
            # asking its policy (the error is the job's, not an I/O error's).
            return "report"
        action = error_action_for(policy, error)
        if self.id is not None:
            self.emit("BLOCK_JOB_ERROR", {
                "device": self.id,
                "operation": "read" if is_read else "write",
                "action": action,
            })
        if action == "stop":
            if not self.user_paused:
                self.pause()
                self.user_paused = True
            if self.iostatus == IO_STATUS_OK:
                self.iostatus = "nospace" if error == errno.ENOSPC else "failed"
        return action

    def on_user_resume(self) -> None:
        self.iostatus = IO_STATUS_OK

    # ------------------------------------------------------------------ events

    def _progress_data(self) -> dict[str, Any]:
        return {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "speed": self.speed,
        }

    def on_completed_event(self) -> None:
        if self.id is None:
            return
        data = self._progress_data()
        if self.ret < 0:
            data["error"] = self.error if self.error is not None else error_text_for(self.ret)
        self.emit("BLOCK_JOB_COMPLETED", data)

    def on_cancelled_event(self) -> None:
        if self.id is not None:
            self.emit("BLOCK_JOB_CANCELLED", self._progress_data())

    def on_ready_event(self) -> None:
        if self.id is not None:
            self.emit("BLOCK_JOB_READY", self._progress_data())

    def on_pending_event(self) -> None:
        if self.id is not None:
            self.emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    # ------------------------------------------------------------------ queries

    def block_job_info(self) -> dict[str, Any]:
        """query-block-jobs element, members in BlockJobInfo declaration order."""
        info: dict[str, Any] = {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.pause_count > 0,
            "speed": self.speed,
            "io-status": self.iostatus,
            "ready": self.is_ready,
            "status": self.status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.ret:
            info["error"] = self.error if self.error is not None else error_text_for(self.ret)
        return info
