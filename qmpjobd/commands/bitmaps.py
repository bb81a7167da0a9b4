"""``block-dirty-bitmap-*`` and ``x-debug-block-dirty-bitmap-sha256``, and the bitmap
actions of ``transaction``.

The checks run in QEMU's order (block/monitor/bitmap-qmp-cmds.c, the bitmap
actions of blockdev.c, bdrv_create_dirty_bitmap and bdrv_merge_dirty_bitmap in
block/dirty-bitmap.c); the bitmaps themselves are :mod:`qmpjobd.block.dirty_bitmap`.

Transaction rollback is QEMU's: an added bitmap is removed again; a removed
bitmap stays in place, busy, until the commit releases it (so a later action of
the same transaction cannot use it), and a persistent one is already gone from
the image file, to be stored again at close; clear and merge restore the bits
they had; enable and disable restore the flag.

One difference: ``block-dirty-bitmap-merge`` with ``"bitmaps": []`` crashes
QEMU (7.2, 10.0 and 11.1); qmpjobd checks the target as for a merge and then
merges nothing.
"""

from __future__ import annotations

from typing import Any

from qmpjobd.block.dirty_bitmap import (
    CHECK_ALLOW_RO,
    CHECK_BUSY,
    CHECK_DEFAULT,
    CHECK_RO,
    MAX_NAME_SIZE,
    MIN_GRANULARITY,
    DirtyBitmap,
    default_granularity,
)
from qmpjobd.commands import Context, command
from qmpjobd.commands.transaction import ActionContext, TxnAction, register_action
from qmpjobd.errors import QMPError
from qmpjobd.versions import Behaviour

# Observed on 11.1 and not on 10.0 (qemu-storage-daemon 11.1.3, 10.0.13).
PERSISTENT_NEEDS_WRITABLE_NODE = Behaviour(
    "a persistent bitmap can only be added to, or removed from, a writable active node",
    since="11.1")


def _graph(daemon: Any) -> Any:
    return daemon.graph


def _writable(node: Any) -> bool:
    return not node.read_only and getattr(node, "active", True)


def lookup_bitmap(daemon: Any, node_name: str, name: str) -> tuple[Any, DirtyBitmap]:
    """block_dirty_bitmap_lookup: the node (by device or node name), then the bitmap."""
    node = _graph(daemon).find(node_name)
    if node is None:
        raise QMPError(f"Node '{node_name}' not found")
    bitmap = node.find_dirty_bitmap(name)
    if bitmap is None:
        raise QMPError(f"Dirty bitmap '{name}' not found")
    return node, bitmap


# --- persistence hooks (the format driver's part) -----------------------------------------


def _persistence(node: Any) -> Any:
    """The module that stores this node's persistent bitmaps, or None."""
    if node.driver == "qcow2":
        from qmpjobd.block.formats.qcow2 import bitmaps as qcow2_bitmaps
        return qcow2_bitmaps
    return None


def check_can_store(node: Any, name: str, granularity: int) -> None:
    """bdrv_can_store_new_dirty_bitmap."""
    store = _persistence(node)
    if store is None:
        raise QMPError(f"Can't store persistent bitmaps to {node.node_name}: "
                       f"Operation not supported")
    reason = store.can_store_new_bitmap(node, name, granularity)
    if reason is not None:
        raise QMPError(f"Can't make bitmap '{name}' persistent in '{node.node_name}': "
                       f"{reason}")


def remove_stored(node: Any, name: str) -> None:
    """bdrv_remove_persistent_dirty_bitmap: delete it from the image now."""
    store = _persistence(node)
    if store is not None:
        store.remove_stored_bitmap(node, name)


# --- the operations, shared by the commands and the transaction actions -------------------


def add_bitmap(daemon: Any, args: dict) -> DirtyBitmap:
    """qmp_block_dirty_bitmap_add."""
    name = args["name"]
    if not name:
        raise QMPError("Bitmap name cannot be empty")
    node = _graph(daemon).lookup(args["node"])
    if "granularity" in args:
        granularity = args["granularity"]
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise QMPError("Granularity must be power of 2 and at least 512")
    else:
        granularity = default_granularity(node)
    persistent = bool(args.get("persistent", False))
    if persistent:
        who = _graph(daemon).personality
        if who.has(PERSISTENT_NEEDS_WRITABLE_NODE) and not _writable(node):
            raise QMPError(f"Cannot add a persistent bitmap to read-only or inactive "
                           f"node '{node.node_name}'")
        check_can_store(node, name, granularity)
    bitmap = create_bitmap(node, granularity, name)
    if args.get("disabled", False):
        bitmap.recording = False
    bitmap.persistent = persistent
    return bitmap


def create_bitmap(node: Any, granularity: int, name: str | None) -> DirtyBitmap:
    """bdrv_create_dirty_bitmap: a new bitmap at the head of the node's list."""
    if name is not None:
        if node.find_dirty_bitmap(name) is not None:
            raise QMPError(f"Bitmap already exists: {name}")
        if len(name.encode()) > MAX_NAME_SIZE:
            raise QMPError(f"Bitmap name too long: {name}")
    bitmap = DirtyBitmap(node.size, granularity, name)
    node.add_dirty_bitmap(bitmap)
    return bitmap


def prepare_remove(daemon: Any, node_name: str, name: str) -> tuple[Any, DirtyBitmap]:
    """block_dirty_bitmap_remove up to the release: checks, and a persistent
    bitmap leaves the image file."""
    node, bitmap = lookup_bitmap(daemon, node_name, name)
    who = _graph(daemon).personality
    if bitmap.persistent and who.has(PERSISTENT_NEEDS_WRITABLE_NODE) and not _writable(node):
        raise QMPError(f"Cannot remove persistent bitmap '{name}': no write access to "
                       f"node '{node.node_name}'")
    bitmap.check(CHECK_BUSY | CHECK_RO)
    if bitmap.persistent:
        remove_stored(node, name)
    return node, bitmap


def merge_bitmaps(daemon: Any, args: dict) -> tuple[DirtyBitmap, Any]:
    """block_dirty_bitmap_merge: every source ORed into the target in order; on a
    failure the target gets back the bits it had. Returns the target and its
    bits from before (for a transaction's abort)."""
    node, target = lookup_bitmap(daemon, args["node"], args["target"])
    saved = None
    sources = args["bitmaps"]
    if not sources:
        target.check(CHECK_DEFAULT)
        return target, target.snapshot_bits()
    try:
        for source_ref in sources:
            if isinstance(source_ref, str):
                source = node.find_dirty_bitmap(source_ref)
                if source is None:
                    raise QMPError(f"Dirty bitmap '{source_ref}' not found")
            else:
                _, source = lookup_bitmap(daemon, source_ref["node"], source_ref["name"])
            target.check(CHECK_DEFAULT)
            source.check(CHECK_ALLOW_RO)
            if source.size != target.size:
                raise QMPError(f"Bitmaps are of different sizes (destination size is "
                               f"{target.size}, source size is {source.size}) and can't "
                               f"be merged")
            if saved is None:
                saved = target.snapshot_bits()
            target.merge_from(source)
    except QMPError:
        if saved is not None:
            target.restore_bits(saved)
        raise
    return target, saved


# --- commands ------------------------------------------------------------------------------


@command("block-dirty-bitmap-add")
def block_dirty_bitmap_add(ctx: Context, args: dict) -> dict:
    add_bitmap(ctx.daemon, args)
    return {}


@command("block-dirty-bitmap-remove")
def block_dirty_bitmap_remove(ctx: Context, args: dict) -> dict:
    node, bitmap = prepare_remove(ctx.daemon, args["node"], args["name"])
    node.remove_dirty_bitmap(bitmap)
    return {}


@command("block-dirty-bitmap-clear")
def block_dirty_bitmap_clear(ctx: Context, args: dict) -> dict:
    _, bitmap = lookup_bitmap(ctx.daemon, args["node"], args["name"])
    bitmap.check(CHECK_DEFAULT)
    bitmap.clear()
    return {}


def _set_recording(ctx: Context, args: dict, recording: bool) -> dict:
    _, bitmap = lookup_bitmap(ctx.daemon, args["node"], args["name"])
    bitmap.check(CHECK_ALLOW_RO)
    bitmap.recording = recording
    return {}


@command("block-dirty-bitmap-enable")
def block_dirty_bitmap_enable(ctx: Context, args: dict) -> dict:
    return _set_recording(ctx, args, True)


@command("block-dirty-bitmap-disable")
def block_dirty_bitmap_disable(ctx: Context, args: dict) -> dict:
    return _set_recording(ctx, args, False)


@command("block-dirty-bitmap-merge")
def block_dirty_bitmap_merge(ctx: Context, args: dict) -> dict:
    merge_bitmaps(ctx.daemon, args)
    return {}


@command("x-debug-block-dirty-bitmap-sha256")
def block_dirty_bitmap_sha256(ctx: Context, args: dict) -> dict:
    _, bitmap = lookup_bitmap(ctx.daemon, args["node"], args["name"])
    return {"sha256": bitmap.sha256()}


# --- transaction actions (blockdev.c's block_dirty_bitmap_*_action) -----------------------


def _action_add(actx: ActionContext, data: dict, action: TxnAction) -> None:
    bitmap = add_bitmap(actx.daemon, data)

    def undo() -> None:
        # QEMU's abort runs qmp_block_dirty_bitmap_remove.
        if bitmap.persistent:
            remove_stored(bitmap.node, bitmap.name)
        if bitmap.node is not None:
            bitmap.node.remove_dirty_bitmap(bitmap)

    action.on_abort(undo)


def _action_remove(actx: ActionContext, data: dict, action: TxnAction) -> None:
    node, bitmap = prepare_remove(actx.daemon, data["node"], data["name"])
    bitmap.skip_store = True
    bitmap.busy = True

    def commit() -> None:
        bitmap.busy = False
        node.remove_dirty_bitmap(bitmap)

    def abort() -> None:
        bitmap.skip_store = False
        bitmap.busy = False

    action.on_commit(commit)
    action.on_abort(abort)


def _action_clear(actx: ActionContext, data: dict, action: TxnAction) -> None:
    _, bitmap = lookup_bitmap(actx.daemon, data["node"], data["name"])
    bitmap.check(CHECK_DEFAULT)
    saved = bitmap.snapshot_bits()
    bitmap.clear()
    action.on_abort(lambda: bitmap.restore_bits(saved))


def _toggle_action(enable: bool) -> Any:
    def prepare(actx: ActionContext, data: dict, action: TxnAction) -> None:
        _, bitmap = lookup_bitmap(actx.daemon, data["node"], data["name"])
        bitmap.check(CHECK_ALLOW_RO)
        was = bitmap.recording
        bitmap.recording = enable

        def abort() -> None:
            bitmap.recording = was

        action.on_abort(abort)
    return prepare


def _action_merge(actx: ActionContext, data: dict, action: TxnAction) -> None:
    target, saved = merge_bitmaps(actx.daemon, data)
    if saved is not None:
        action.on_abort(lambda: target.restore_bits(saved))


register_action("block-dirty-bitmap-add", _action_add)
register_action("block-dirty-bitmap-remove", _action_remove)
register_action("block-dirty-bitmap-clear", _action_clear)
register_action("block-dirty-bitmap-enable", _toggle_action(True))
register_action("block-dirty-bitmap-disable", _toggle_action(False))
register_action("block-dirty-bitmap-merge", _action_merge)
