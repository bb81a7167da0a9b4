"""Internal snapshots (``blockdev-snapshot-internal-sync``, also as a transaction
action, and ``blockdev-snapshot-delete-internal-sync``) and ``x-blockdev-amend``.

The checks come in QEMU's order (blockdev.c's internal snapshot action and
qmp_blockdev_snapshot_delete_internal_sync), with QEMU's texts. The table work
itself is qmpjobd.block.formats.qcow2.snapshot, run inside the command on a
drained node as QEMU runs it. A snapshot taken by a transaction that then fails
is deleted again in the action's abort step.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from qmpjobd.commands import Context, command
from qmpjobd.commands.transaction import ActionContext, TxnAction, register_action, run_transaction
from qmpjobd.errors import QMPError

ACTION = "blockdev-snapshot-internal-sync"


def snapshot_target(node: Any) -> Any:
    """The qcow2 node a snapshot request reaches: the node itself, or the first
    qcow2 node down its ``file`` children (QEMU's fallback child), or None."""
    from qmpjobd.block.drivers.qcow2 import Qcow2Node

    while node is not None and not isinstance(node, Qcow2Node):
        node = node.children.get("file")
    if node is not None and node.image is None:
        return None
    return node


def _prepare_internal_snapshot(actx: ActionContext, data: dict, action: TxnAction) -> None:
    from qmpjobd.block.formats.qcow2.snapshot import create_snapshot, find_snapshot

    device, name = data["device"], data["name"]
    graph = actx.daemon.graph
    node = graph.lookup_root(device)
    graph.drained_begin([node])
    action.on_clean(lambda: graph.drained_end([node]))
    node.check_not_busy()
    if node.read_only:
        raise QMPError(f"Device '{device}' is read only")
    target = snapshot_target(node)
    if target is None or target.read_only:
        raise QMPError(f"Block format '{node.driver}' used by device '{device}' "
                       "does not support internal snapshots")
    if not name:
        raise QMPError("Name is empty")
    if find_snapshot(target.image.snapshots, None, name) >= 0:
        raise QMPError(f"Snapshot with name '{name}' already exists on device '{device}'")
    try:
        snapshot = target.run_metadata_operation(lambda image: create_snapshot(image, name))
    except OSError as exc:
        raise QMPError(f"Failed to create snapshot '{name}' on device '{device}': "
                       f"{os.strerror(exc.errno or errno.EIO)}") from None
    action.on_abort(lambda: _undo_snapshot(target, device, snapshot.id_str, snapshot.name))


def _undo_snapshot(target: Any, device: str, snapshot_id: str, name: str) -> None:
    """The abort step: delete the snapshot again (a failure is only reported on
    stderr, as QEMU does)."""
    from qmpjobd.block.formats.qcow2.snapshot import SnapshotError, delete_snapshot

    try:
        target.run_metadata_operation(lambda image: delete_snapshot(image, snapshot_id, name))
    except (SnapshotError, OSError) as exc:
        text = exc.desc if isinstance(exc, SnapshotError) else os.strerror(exc.errno or errno.EIO)
        sys.stderr.write(f"Failed to delete snapshot with id '{snapshot_id}' and name "
                         f"'{name}' on device '{device}' in abort: {text}\n")


register_action(ACTION, _prepare_internal_snapshot)


@command(ACTION)
def blockdev_snapshot_internal_sync(ctx: Context, args: dict) -> dict:
    # QEMU runs the command as a transaction of this one action.
    return run_transaction(ctx, [(ACTION, args)])


def _or_null(value: str | None) -> str:
    return "null" if value is None else value


@command("blockdev-snapshot-delete-internal-sync")
def blockdev_snapshot_delete_internal_sync(ctx: Context, args: dict) -> dict:
    from qmpjobd.block.formats.qcow2.snapshot import SnapshotError, delete_snapshot, find_snapshot

    device = args["device"]
    snapshot_id, name = args.get("id"), args.get("name")
    graph = ctx.daemon.graph
    # Newer releases drain every node before anything else, errors included.
    graph.graph_changes("snapshot-delete-drain-all")
    node = graph.lookup_root(device)
    if snapshot_id is None and name is None:
        raise QMPError("Name or id must be provided")
    node.check_not_busy()
    target = snapshot_target(node)
    if target is None:
        raise QMPError("Failed to get a snapshot list: Operation not supported")
    index = find_snapshot(target.image.snapshots, snapshot_id, name)
    if index < 0:
        raise QMPError(f"Snapshot with id '{_or_null(snapshot_id)}' and name "
                       f"'{_or_null(name)}' does not exist on device '{device}'")
    found = target.image.snapshots[index]
    if target.read_only:
        # QEMU drops the entry from its in-memory list before the write that
        # fails, and does not put it back: the node no longer shows it.
        del target.image.snapshots[index]
        target.image.metadata_changed()
        raise QMPError("Failed to remove snapshot from snapshot list: "
                       f"{os.strerror(errno.EPERM)}")
    graph.drained_begin([node])
    try:
        target.run_metadata_operation(lambda image: delete_snapshot(image, snapshot_id, name))
    except SnapshotError as exc:
        raise QMPError(exc.desc) from None
    except OSError as exc:
        raise QMPError(f"Failed to remove snapshot from snapshot list: "
                       f"{os.strerror(exc.errno or errno.EIO)}") from None
    finally:
        graph.drained_end([node])
    return found.info()


# --- x-blockdev-amend --------------------------------------------------------------------

@command("x-blockdev-amend")
def x_blockdev_amend(ctx: Context, args: dict) -> dict:
    """qmp_x_blockdev_amend: the node, then the driver checks, then a job."""
    from qmpjobd.block.formats.qcow2.amend import AmendJob

    node_name = args["node-name"]
    graph = ctx.daemon.graph
    node = graph.find(node_name)
    if node is None:
        raise QMPError(f"Cannot find device='' nor node-name='{node_name}'")
    options = args["options"]
    if node.driver != options["driver"]:
        raise QMPError("x-blockdev-amend doesn't support changing the block driver")
    if options["driver"] != "qcow2":
        raise QMPError("Driver does not support x-blockdev-amend")
    job = AmendJob(ctx.daemon.jobs, node, args["job-id"], options, bool(args.get("force")))
    job.start()
    return {}
