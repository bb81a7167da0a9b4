"""``blockdev-create``: start a ``create`` job (see qmpjobd.block.jobs.create)."""

from __future__ import annotations

from qmpjobd.block.jobs.create import CreateJob
from qmpjobd.commands import Context, command
from qmpjobd.commands.jobs import flushing_bottom_halves


@command("blockdev-create")
@flushing_bottom_halves
def blockdev_create(ctx: Context, args: dict) -> dict:
    job = CreateJob(ctx.daemon.jobs, ctx.daemon.graph, args["job-id"], args["options"])
    job.start()
    return {}
