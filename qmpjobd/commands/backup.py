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
    perf.min_cluster_size = x_perf.get("min-cluster-size", perf.min_cluster_size)
    return perf


def check_bitmap_arguments(source: Any, args: dict) -> tuple[str, Any, str]:
    """do_backup_common's bitmap rules, in QEMU's order.

    Returns ``(sync, bitmap, bitmap_mode)`` as the job takes them: ``incremental``
    is ``bitmap`` with ``on-success``; ``bitmap`` is None without one.
    """
    from qmpjobd.block.drivers.copy_before_write import bitmap_use_problem

    sync = args["sync"]
    mode = args.get("bitmap-mode")
    if sync in BITMAP_SYNC_MODES and "bitmap" not in args:
        raise QMPError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise QMPError("Bitmap sync mode must be 'on-success' when using sync mode "
                           "'incremental'")
        sync, mode = "bitmap", "on-success"
    if "bitmap" not in args:
        if mode is not None:
            raise QMPError("Cannot specify bitmap sync mode without a bitmap")
        return sync, None, "on-success"
    find = getattr(source, "find_dirty_bitmap", None)
    bitmap = find(args["bitmap"]) if find is not None else None
    if bitmap is None:
        raise QMPError(f"Bitmap '{args['bitmap']}' could not be found")
    if mode is None:
        raise QMPError("Bitmap sync mode must be given when providing a bitmap")
    # BDRV_BITMAP_ALLOW_RO: a read-only bitmap may drive a backup.
    problem = bitmap_use_problem(bitmap, check_readonly=False)
    if problem is not None:
        raise QMPError(problem)
    if sync == "none":
        raise QMPError("sync mode 'none' does not produce meaningful bitmap outputs")
    if mode == "never" and sync != "bitmap":
        raise QMPError(f"Bitmap sync mode 'never' has no meaningful effect when combined "
                       f"with sync mode '{sync}'")
    return sync, bitmap, mode


def _block_size_warner(daemon: Any) -> Callable[[int], None]:
    """What prints the target block-size warning, worded for the daemon's release."""
    who = personality_of(daemon)
    return lambda size: warn(who, backup_block_size_warning(who, size))


def create_backup_job(actx: ActionContext, action: TxnAction, source: Any, target: Any,
                      args: dict) -> "BackupJob":
    """QEMU's do_backup_common + backup_job_create, plus the transaction steps."""
    # Job drivers load on first use: a daemon's start-up does not need them.
    from qmpjobd.block.jobs.backup import BackupJob

    sync, bitmap, bitmap_mode = check_bitmap_arguments(source, args)
    if source is not target:
        # backup_job_create, after "Source and target cannot be the same"; QEMU
        # names the BlockBackend, which a storage daemon's nodes never have.
        for node in (source, target):
            if not node.is_inserted():
                raise QMPError("Device is not inserted: ")
    job = BackupJob(
        actx.daemon.jobs,
        # Without job-id QEMU uses the BlockBackend name, which qsd nodes never have.
        args.get("job-id", ""),
        source,
        target,
        sync=sync,
        bitmap=bitmap,
        bitmap_mode=bitmap_mode,
        filter_node_name=args.get("filter-node-name"),
        # Only 11.1's schema has it (earlier releases refuse it by name).
        on_cbw_error=args.get("on-cbw-error"),
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
