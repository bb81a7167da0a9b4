"""job-* and block-job-* commands, query-jobs and query-block-jobs.

Thin handlers: look the job up (job-* among all jobs, block-job-* among block jobs
only, with their different errors), then call the job core, which applies the checks
of job-lifecycle.md 3.1 in QEMU's order. Whether the events of a job the command
finishes come before or after the reply is decided by the main-loop model (see
``qmpjobd.job.manager``): a cancelled backup concludes before the reply, a mirror
(which drains its source from a bottom half) after it.
"""

from __future__ import annotations

from typing import Any

from qmpjobd.commands import Context, command
from qmpjobd.errors import QMPError

def _job(ctx: Context, job_id: str) -> Any:
    return ctx.daemon.jobs.find_job(job_id)


def _block_job(ctx: Context, job_id: str) -> Any:
    return ctx.daemon.jobs.find_block_job(job_id)


# --------------------------------------------------------------------- job-*

@command("job-pause")
def job_pause(ctx: Context, args: dict) -> dict:
    _job(ctx, args["id"]).user_pause()
    return {}


@command("job-resume")
def job_resume(ctx: Context, args: dict) -> dict:
    _job(ctx, args["id"]).user_resume()
    return {}


@command("job-cancel")
def job_cancel(ctx: Context, args: dict) -> dict:
    # job-cancel is always a force cancel.
    _job(ctx, args["id"]).user_cancel(force=True)
    return {}


@command("job-complete")
def job_complete(ctx: Context, args: dict) -> dict:
    _job(ctx, args["id"]).complete()
    return {}


@command("job-finalize")
def job_finalize(ctx: Context, args: dict) -> dict:
    # Succeeds even when a prepare step fails; that shows only as events.
    _job(ctx, args["id"]).finalize()
    return {}


@command("job-dismiss")
def job_dismiss(ctx: Context, args: dict) -> dict:
    _job(ctx, args["id"]).dismiss()
    return {}


@command("query-jobs")
def query_jobs(ctx: Context, args: dict) -> list:
    return ctx.daemon.jobs.query_jobs()


# --------------------------------------------------------------------- block-job-*

@command("block-job-pause")
def block_job_pause(ctx: Context, args: dict) -> dict:
    _block_job(ctx, args["device"]).user_pause()
    return {}


@command("block-job-resume")
def block_job_resume(ctx: Context, args: dict) -> dict:
    _block_job(ctx, args["device"]).user_resume()
    return {}


@command("block-job-cancel")
def block_job_cancel(ctx: Context, args: dict) -> dict:
    device = args["device"]
    job = _block_job(ctx, device)
    force = args.get("force", False)
    # Checked before the verb: a user-paused job needs force.
    if job.user_paused and not force:
        raise QMPError(f"The block job for device '{device}' is currently paused")
    job.user_cancel(force=force)
    return {}


@command("block-job-complete")
def block_job_complete(ctx: Context, args: dict) -> dict:
    _block_job(ctx, args["device"]).complete()
    return {}


@command("block-job-finalize")
def block_job_finalize(ctx: Context, args: dict) -> dict:
    _block_job(ctx, args["id"]).finalize()
    return {}


@command("block-job-dismiss")
def block_job_dismiss(ctx: Context, args: dict) -> dict:
    _block_job(ctx, args["id"]).dismiss()
    return {}


@command("block-job-set-speed")
def block_job_set_speed(ctx: Context, args: dict) -> dict:
    _block_job(ctx, args["device"]).set_speed(args["speed"])
    return {}


@command("query-block-jobs")
def query_block_jobs(ctx: Context, args: dict) -> list:
    return ctx.daemon.jobs.query_block_jobs()
