"""``drive-backup`` (deprecated in QEMU since 6.2, still accepted by 7.2), as a command
and as a transaction action.

Like QEMU's drive_backup_action: look up the source, drain it, refuse a busy source
before creating anything, create the target image (raw, file or qcow2: a qcow2 target records the
source's backing (sync=top) or the source (sync=none) as its backing file; ``mode`` existing
opens it as it is), open it with ``discard=unmap`` and ``detect-zeroes=unmap``, then
the steps shared with blockdev-backup. The target node is the daemon's: it is not
monitor-owned and disappears when the job lets go of it.
"""

from __future__ import annotations

from qmpjobd.commands import Context, command
from qmpjobd.commands.backup import create_backup_job, drain_source
from qmpjobd.commands.mirror import open_target_file
from qmpjobd.commands.transaction import (
    ActionContext,
    TxnAction,
    register_action,
    run_transaction,
)


def prepare_drive_backup(actx: ActionContext, data: dict, action: TxnAction) -> None:
    graph = actx.daemon.graph
    source = graph.lookup(data["device"])
    drain_source(actx, action, source)
    source.check_not_busy()
    backing = backup_backing_source(source, data)
    target, _created = open_target_file(actx.ctx, source, data,
                                        extra_options={"discard": "unmap",
                                                       "detect-zeroes": "unmap"},
                                        backing_source=backing,
                                        open_backing=data["sync"] == "top")
    try:
        graph.graph_changes("aio-context")     # bdrv_try_change_aio_context(target)
        if data["sync"] == "none" and target.driver == "qcow2":
            # QEMU sets the source as the new target's backing node.
            graph.set_backing(target, source)
            # A backing link does not block backing up its node (QEMU unblocks
            # BLOCK_OP_TYPE_BACKUP_SOURCE for it).
            source.remove_blockers(target)
        create_backup_job(actx, action, source, target, data)
    except BaseException:
        graph.release_implicit(target)
        raise


def backup_backing_source(source, data: dict):
    """drive-backup: the node a new target records as its backing file. sync=top
    takes the source's backing (a source without one backs up in full, as QEMU
    turns the mode into full); sync=none the source itself; full nothing."""
    if data["sync"] == "top":
        backing = source.backing_node()
        if backing is None:
            data["sync"] = "full"
        return backing
    if data["sync"] == "none":
        return source
    return None


register_action("drive-backup", prepare_drive_backup, supports_grouped=True)


@command("drive-backup")
def drive_backup(ctx: Context, args: dict) -> dict:
    return run_transaction(ctx, [("drive-backup", args)])
