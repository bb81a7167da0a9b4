"""``blockdev-create``: start a ``create`` job (see qmpjobd.block.jobs.create)."""

from __future__ import annotations

from qmpjobd.commands import Context, command


@command("blockdev-create")
def blockdev_create(ctx: Context, args: dict) -> dict:
    # Job drivers load on first use: a daemon's start-up does not need them.
    from qmpjobd.block.jobs.create import CreateJob

    job = CreateJob(ctx.daemon.jobs, ctx.daemon.graph, args["job-id"], args["options"])
    job.start()
    return {}
