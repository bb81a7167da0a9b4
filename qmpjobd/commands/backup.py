"""``blockdev-backup``, as a command and as a transaction action.

The standalone command is a one-action transaction (QEMU runs it exactly so), which
is where its drain artefacts and its start in the commit phase come from.

``create_backup_job(actx, action, source, target, args)`` is the part shared with
``drive-backup``: QEMU's do_backup_common (argument rules in QEMU's order), the job
creation, and the commit (start) / abort (cancel) steps. The caller looks up its
nodes and drains the source first (``drain_source``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from qmpjobd.block.personality import personality_of
from qmpjobd.block.stderr import backup_block_size_warning, warn
from qmpjobd.commands import Context, command
from qmpjobd.commands.transaction import (
    ActionContext,
    TxnAction,
    register_action,
    run_transaction,
)
from qmpjobd.errors import QMPError

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.jobs.backup import BackupJob, BackupPerf

BITMAP_SYNC_MODES = ("bitmap", "incremental")


def drain_source(actx: ActionContext, action: TxnAction, source: Any) -> None:
    """Drain the source until the action's clean step (QEMU's paired drain)."""
    if not actx.daemon.options.drain_artefacts:
        return
    graph = actx.daemon.graph
    graph.drained_begin([source])
    action.on_clean(lambda: graph.drained_end([source]))


def _perf(args: dict) -> "BackupPerf":
    from qmpjobd.block.jobs.backup import BackupPerf

    x_perf = args.get("x-perf", {})
    perf = BackupPerf()
    perf.use_copy_range = x_perf.get("use-copy-range", perf.use_copy_range)
    perf.max_workers = x_perf.get("max-workers", perf.max_workers)
    perf.max_chunk = x_perf.get("max-chunk", perf.max_chunk)
    return perf


def check_bitmap_arguments(source: Any, args: dict) -> None:
    """do_backup_common's bitmap rules, in QEMU's order."""
    sync = args["sync"]
    if sync in BITMAP_SYNC_MODES and "bitmap" not in args:
        raise QMPError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental" and args.get("bitmap-mode", "on-success") != "on-success":
        raise QMPError("Bitmap sync mode must be 'on-success' when using sync mode "
                       "'incremental'")
    if "bitmap" in args:
        find = getattr(source, "find_dirty_bitmap", None)
        bitmap = find(args["bitmap"]) if find is not None else None
        if bitmap is None:
            raise QMPError(f"Bitmap '{args['bitmap']}' could not be found")
        # Dirty bitmaps are not modelled by the block layer yet.
        raise QMPError("Backup with a dirty bitmap is not supported by qmpjobd")
    if "bitmap-mode" in args:
        raise QMPError("Cannot specify bitmap sync mode without a bitmap")


def _block_size_warner(daemon: Any) -> Callable[[int], None]:
    """What prints the target block-size warning, worded for the daemon's release."""
    who = personality_of(daemon)
    return lambda size: warn(who, backup_block_size_warning(who, size))


def create_backup_job(actx: ActionContext, action: TxnAction, source: Any, target: Any,
                      args: dict) -> "BackupJob":
    """QEMU's do_backup_common + backup_job_create, plus the transaction steps."""
    # Job drivers load on first use: a daemon's start-up does not need them.
    from qmpjobd.block.jobs.backup import BackupJob

    check_bitmap_arguments(source, args)
    # on-cbw-error (11.1) is taken and has nothing to act on: it decides what a
    # guest write that fails to copy does, and nothing writes to a backup source
    # here (no exports, no guest).
    job = BackupJob(
        actx.daemon.jobs,
        # Without job-id QEMU uses the BlockBackend name, which qsd nodes never have.
        args.get("job-id", ""),
        source,
        target,
        sync=args["sync"],
        speed=args.get("speed", 0),
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True),
        txn=actx.job_txn,
        perf=_perf(args),
        compress=args.get("compress", False),
        discard_source=args.get("discard-source", False),
        warn_block_size=_block_size_warner(actx.daemon),
    )
    action.on_commit(job.start)
    action.on_abort(lambda: job.cancel_sync(force=True))
    return job


def prepare_blockdev_backup(actx: ActionContext, data: dict, action: TxnAction) -> None:
    graph = actx.daemon.graph
    source = graph.lookup(data["device"])
    target = graph.lookup(data["target"])
    graph.graph_changes("aio-context")     # bdrv_try_change_aio_context(target)
    drain_source(actx, action, source)
    create_backup_job(actx, action, source, target, data)


register_action("blockdev-backup", prepare_blockdev_backup, supports_grouped=True)


@command("blockdev-backup")
def blockdev_backup(ctx: Context, args: dict) -> dict:
    return run_transaction(ctx, [("blockdev-backup", args)])
