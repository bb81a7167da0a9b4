"""The test controls (schema/testing.json): faults, holds and the virtual clock.

They exist only in a daemon started with ``--test-controls``: without it the
schema the daemon loads has no x-qmpjobd-* command, so the dispatcher answers
CommandNotFound and introspection lists none of them. Handlers stay thin: the
faults and holds are data in ``qmpjobd.job.faults``, consulted by the job core.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from qmpjobd.commands import Context, command
from qmpjobd.errors import QMPError
from qmpjobd.job.clock import VirtualClock
from qmpjobd.job.faults import HOLD_POINTS, FaultTable, Hold, JobFault
from qmpjobd.job.states import READY_STATUSES

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.daemon import Daemon

NS_PER_MS = 1_000_000


def _table(ctx: Context) -> FaultTable:
    table = ctx.daemon.faults
    # The commands exist only with --test-controls, which also makes the table.
    assert table is not None, "test controls without a fault table"
    return table


# ---------------------------------------------------------------------- faults


@command("x-qmpjobd-job-fault")
def job_fault(ctx: Context, args: dict) -> dict:
    fault = _fault_from(args)
    existing = ctx.daemon.jobs.get(fault.job_id) if fault.job_id is not None else None
    _table(ctx).arm(fault, existing)
    return {}


def _fault_from(args: dict) -> JobFault:
    if ("id" in args) == ("type" in args):
        raise QMPError("Exactly one of 'id' and 'type' must be given")
    phase = args["phase"]
    if phase != "run":
        for name in ("at-progress", "iotype"):
            if name in args:
                raise QMPError(f"Parameter '{name}' is only valid with phase 'run'")
    at_progress = args.get("at-progress", 0.0)
    if not 0.0 <= at_progress <= 1.0:
        raise QMPError("Parameter 'at-progress' expects a value from 0 to 1")
    if "iotype" in args and "message" in args:
        raise QMPError("Parameter 'message' cannot be used with 'iotype' "
                       "(an I/O error's text is the strerror of its errno)")
    errno = args.get("errno", 5)
    if errno <= 0:
        raise QMPError("Parameter 'errno' expects a positive error number")
    count = args.get("count", 1)
    if count < 1:
        raise QMPError("Parameter 'count' expects a value of at least 1")
    return JobFault(phase=phase, job_id=args.get("id"), job_type=args.get("type"),
                    at_progress=float(at_progress), iotype=args.get("iotype"),
                    errno=errno, message=args.get("message"), remaining=count)


@command("x-qmpjobd-fault-query")
def fault_query(ctx: Context, args: dict) -> list:
    return [dict(record) for record in _table(ctx).fired]


# ---------------------------------------------------------------------- holds


@command("x-qmpjobd-job-hold")
def job_hold(ctx: Context, args: dict) -> dict:
    hold = Hold(job_id=args["id"], before=HOLD_POINTS[args["before"]])
    _table(ctx).add_hold(hold, ctx.daemon.jobs.get(hold.job_id))
    return {}


@command("x-qmpjobd-job-release")
def job_release(ctx: Context, args: dict) -> dict:
    before = HOLD_POINTS[args["before"]] if "before" in args else None
    if not _table(ctx).release(args["id"], before):
        raise QMPError(f"Job '{args['id']}' has no hold to release")
    return {}


# ---------------------------------------------------------------------- ready lost


@command("x-qmpjobd-job-ready-lost")
def job_ready_lost(ctx: Context, args: dict) -> dict:
    """A READY mirror falls out of sync: ``bytes`` from the start of its source
    count as dirty again. QEMU has no way back from READY (its status table has
    no READY -> RUNNING), so the status stays ``ready``, no event is emitted, and
    the progress shows the loss: total-progress grows by what must be copied
    again, and current-progress catches up as the mirror copies it."""
    job = ctx.daemon.jobs.find_job(args["id"])
    dirty = getattr(job, "dirty", None)
    if job.job_type != "mirror" or dirty is None or job.status not in READY_STATUSES:
        raise QMPError(f"Job '{job.id}' is not a READY mirror")
    amount = args["bytes"]
    if amount <= 0:
        raise QMPError("Parameter 'bytes' expects a positive value")
    dirty.set(0, min(amount, job.length), True)   # type: ignore[attr-defined]
    job.progress_set_remaining(dirty.dirty_bytes + job._bytes_in_flight)  # type: ignore[attr-defined]
    if not job.paused:
        # An idle READY mirror waits to be woken, as a guest write wakes it in QEMU.
        job.enter()
    return {}


# ---------------------------------------------------------------------- connections


@command("x-qmpjobd-reply-delay")
def reply_delay(ctx: Context, args: dict) -> dict:
    drop = args.get("drop", False)
    if ("ms" in args) == drop:
        raise QMPError("Exactly one of 'ms' and 'drop' must be given")
    count = args.get("count", 1)
    if count < 1:
        raise QMPError("Parameter 'count' expects a value of at least 1")
    delay_ms = args.get("ms", 0)
    if delay_ms < 0:
        raise QMPError("Parameter 'ms' expects a non-negative value")
    connection = _connection(ctx)
    connection.server.dispatcher.delay_replies(connection, count, delay_ms * NS_PER_MS, drop)
    return {}


@command("x-qmpjobd-disconnect")
def disconnect(ctx: Context, args: dict) -> dict:
    """Close QMP connections as a monitor going away closes them; jobs go on."""
    caller = _connection(ctx)
    for connection in list(caller.server.connections):
        if connection is caller:
            continue
        connection.close()
    if not args.get("except-caller", False):
        # After this command's reply, which the current slice writes first.
        asyncio.get_running_loop().call_soon(caller.close)
    return {}


def _connection(ctx: Context) -> Any:
    if ctx.connection is None:
        raise QMPError("This command needs a client connection")
    return ctx.connection


# ---------------------------------------------------------------------- clock


@command("x-qmpjobd-clock-query")
def clock_query(ctx: Context, args: dict) -> dict:
    return clock_info(ctx.daemon)


@command("x-qmpjobd-clock-step")
def clock_step(ctx: Context, args: dict) -> dict:
    clock = ctx.daemon.clock
    if not isinstance(clock, VirtualClock):
        raise QMPError("The clock is real: start the daemon with --clock virtual")
    until_idle = args.get("until-idle", False)
    if ("ns" in args) == until_idle:
        raise QMPError("Exactly one of 'ns' and 'until-idle' must be given")
    settle = ctx.daemon.jobs.run_bottom_halves
    if until_idle:
        try:
            clock.advance_until_idle(settle, limit=STEP_LIMIT)
        except RuntimeError:
            raise QMPError(f"The clock is still not idle after {STEP_LIMIT} timers") from None
    else:
        if args["ns"] < 0:
            raise QMPError("Parameter 'ns' expects a non-negative value")
        clock.advance(args["ns"], settle)
        settle()
    return clock_info(ctx.daemon)


# until-idle gives up after this many timers (a job that re-arms a timer for ever).
STEP_LIMIT = 1_000_000


def clock_info(daemon: "Daemon") -> dict:
    clock = daemon.clock
    if not isinstance(clock, VirtualClock):
        return {"clock": "real", "now-ns": clock.now_ns()}
    info: dict = {"clock": "virtual", "now-ns": clock.now_ns(), "timers": clock.pending_timers}
    deadline = clock.next_deadline()
    if deadline is not None:
        info["next-deadline-ns"] = deadline
    return info
