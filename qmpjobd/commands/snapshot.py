"""External snapshots and the chain commands: ``blockdev-snapshot``,
``blockdev-snapshot-sync`` (both also transaction actions), ``change-backing-file``
and ``block_resize``.

A snapshot is QEMU's external_snapshot action: look the node up and drain it
until the clean step, refuse a busy node, (``-sync``) create and open the overlay
image, check the overlay, then ``bdrv_append`` it: the node becomes the overlay's
backing and the overlay takes the node's place for every parent. Commit reopens
the node read-only; abort puts the graph back; clean ends the drain and drops the
action's reference to the overlay, so an overlay that ``-sync`` opened and that
nobody took over (the node had no parent) is gone again afterwards, exactly as in
qemu-storage-daemon. A created image file stays where it is after an abort, as in
QEMU. ``blockdev-snapshot`` leaves the overlay's header alone (libvirt writes the
backing name when it creates the overlay); ``-sync`` creates the image with the
node's filename and format as its backing, byte for byte as ``qemu-img create``.

A storage daemon has no BlockBackends, so a ``device`` argument never finds a
node: the error texts say so the way QEMU's lookup does.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from qmpjobd.block.drain import GRAPH_CHANGES
from qmpjobd.block.graph import inherits_from
from qmpjobd.commands import Context, command
from qmpjobd.commands.transaction import (
    ActionContext,
    TxnAction,
    register_action,
    run_transaction,
)
from qmpjobd.errors import QMPError
from qmpjobd.versions import Behaviour

# block_resize on a node a job or a backing link blocks: 7.2 says "Device '(null)'
# is in use", later releases give the blocker's own "Node '...' is busy: ..."
# (observed in 10.0; the release in between that changed it was not determined).
RESIZE_NAMES_BLOCKER = Behaviour(
    "block_resize reports the operation blocker's reason", since="10.0")
# A raw node above a resized node: 7.2 and 11.1 report the child's new length, 10.0
# keeps the length it had (observed; the releases in between were not checked).
RAW_LENGTH_CACHED = Behaviour(
    "a raw node keeps its length when the node below it is resized",
    since="10.0", until="10.1")

# The graph change a reopen makes: "reopen" once qmpjobd.block.drain lists it;
# until then the change with the same sections (a plain write lock since 8.0).
_REOPEN_CHANGE = "reopen" if "reopen" in GRAPH_CHANGES else "replace-node"

# The block drivers QEMU's bdrv_img_create can find by name (BlockdevDriver).
QEMU_FORMATS = frozenset((
    "blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write "
    "copy-on-read dmg file snapshot-access ftp ftps gluster host_cdrom host_device http "
    "https io_uring iscsi luks nbd nfs null-aio null-co nvme nvme-io_uring parallels "
    "preallocate qcow qcow2 qed quorum raw rbd replication ssh throttle vdi vhdx "
    "virtio-blk-vfio-pci virtio-blk-vhost-user virtio-blk-vhost-vdpa vmdk vpc vvfat").split())

# The formats qmpjobd creates images of for a snapshot or a drive-* target.
_CREATABLE = ("qcow2", "raw", "file")


def lookup_bs(graph: Any, device: str | None, node_name: str | None) -> Any:
    """bdrv_lookup_bs: ``device`` names a BlockBackend (qsd has none), then
    ``node_name`` a node."""
    node = graph.find(node_name) if node_name is not None else None
    if node is None:
        raise QMPError(f"Cannot find device='{device or ''}' nor "
                       f"node-name='{node_name or ''}'")
    return node


# --- read-only reopening ---------------------------------------------------------------


def _inheriting(node: Any) -> list[Any]:
    """The node and the children that reopen with it: those opened as part of it
    (not added by their own blockdev-add, nor put in place by a snapshot), not
    through a backing link (bdrv_reopen_queue_child follows inherits_from)."""
    members = [node]
    for role, child in node.children.items():
        if role != "backing" and inherits_from(child, node):
            members.extend(_inheriting(child))
    return members


def set_read_only(node: Any, read_only: bool) -> None:
    """bdrv_reopen_set_read_only: switch ``node`` and the children that inherit
    its options. Going read-only writes a format's cached metadata back first;
    going read-write reopens a host file opened read-only for writing."""
    members = [m for m in _inheriting(node) if m.read_only != read_only]
    if members:
        # bdrv_reopen_multiple changes the graph under its write lock (8.0+).
        node.graph.graph_changes(_REOPEN_CHANGE)
    for member in members:
        if read_only:
            _write_back(member)
        else:
            _reopen_writable(member)
        member.read_only = read_only
        image = getattr(member, "image", None)
        if image is not None:
            image.read_only = read_only
            if not read_only:
                _after_read_write(member)
    if not read_only:
        # Once every member (the files below too) is writable.
        from qmpjobd.block.formats.qcow2.repair import repair_if_dirty
        for member in members:
            repair_if_dirty(member)
    _refresh_permissions(node.graph)


def _try_read_only(node: Any) -> None:
    """external_snapshot_commit's reopen of the old node, whose error nobody
    sees: where a driver of it cannot reopen (a copy-on-read filter), the node
    just stays as it was."""
    from qmpjobd.commands.graph_debug import REOPENABLE

    if all(member.driver in REOPENABLE for member in _inheriting(node)):
        set_read_only(node, True)


def _refresh_permissions(graph: Any) -> None:
    """The permissions (and image locks) follow the nodes' new read-only state."""
    try:
        from qmpjobd.block import permissions
    except ImportError:          # a tree without the permission layer
        return
    permissions.refresh(graph, may_fail=False)


def _write_back(node: Any) -> None:
    """A qcow2 node about to become read-only (qcow2_reopen_prepare): its
    persistent bitmaps and dirty caches go to the file first (the node is
    drained: nothing is in flight)."""
    image = getattr(node, "image", None)
    if image is None or image.read_only:
        return
    from qmpjobd.block.drivers.qcow2 import write_back
    from qmpjobd.block.formats.qcow2.bitmaps import before_read_only

    before_read_only(node)
    write_back(node, image, mark_clean=True)


def _after_read_write(node: Any) -> None:
    """A qcow2 node writable again: its loaded bitmaps are in use again."""
    if getattr(node, "image", None) is not None:
        from qmpjobd.block.formats.qcow2.bitmaps import after_read_write
        after_read_write(node)


def _reopen_writable(node: Any) -> None:
    """A file node opened read-only holds an O_RDONLY descriptor: the file driver
    opens it again (its image locks move to the new descriptor)."""
    reopen = getattr(node, "reopen_fd", None)
    if reopen is not None and getattr(node, "fd", None) is not None:
        reopen(False)


@contextlib.contextmanager
def writable(node: Any) -> Iterator[None]:
    """change-backing-file's temporary read-write reopen of a read-only image."""
    was_read_only = node.read_only
    if was_read_only:
        set_read_only(node, False)
    try:
        yield
    finally:
        if was_read_only:
            set_read_only(node, True)


# --- image creation (bdrv_img_create) ---------------------------------------------------


def create_image(graph: Any, filename: str, fmt: str, size: int,
                 backing_file: str | None = None, backing_fmt: str | None = None) -> None:
    """Create ``filename`` as ``qemu-img create -f fmt [-b backing -F fmt]`` would
    (the checks of bdrv_img_create in its order, QEMU's default qcow2 options)."""
    from qmpjobd.commands.mirror import NO_CREATE

    if fmt not in QEMU_FORMATS:
        raise QMPError(f"Unknown file format '{fmt}'")
    if fmt in NO_CREATE:
        raise QMPError(f"Format driver '{fmt}' does not support image creation")
    if fmt not in _CREATABLE:
        raise QMPError(f"Driver '{fmt}' is not supported by qmpjobd")
    if backing_file is not None:
        if fmt != "qcow2":
            raise QMPError(f"Backing file not supported for file format '{fmt}'")
        if filename == backing_file:
            raise QMPError("Error: Trying to create an image with the same filename as "
                           "the backing file")
        if backing_file == "":
            raise QMPError("Expected backing file name, got empty string")
    from qmpjobd.block.jobs.create import check_not_in_use, create_file

    check_not_in_use(graph, filename)
    if fmt != "qcow2":
        create_file(filename, size, policy=graph.path_policy)
        return
    create_file(filename, 0, policy=graph.path_policy)
    _write_file(graph, filename, qcow2_image_bytes(size, backing_file, backing_fmt))
    _qcow2_create_graph_changes(graph)


def _qcow2_create_graph_changes(graph: Any) -> None:
    """The graph changes of QEMU's qcow2_co_create_opts, whose temporary nodes
    qmpjobd does without (it writes the bytes directly): a BlockBackend on the new
    file node, the qcow2 node opened on it twice (the second open flushes) and
    dropped each time with its BlockBackend, then the file's BlockBackend and node
    (each of the three nodes took a generated name). They show as drain artefacts
    of running jobs (none in 7.2; in 10.1+ a node's close happens inside its last
    BlockBackend's removal)."""
    def open_format_node() -> None:
        graph.graph_changes("backend-insert", "attach-child", "backend-remove",
                            "backend-insert")

    def drop_format_node() -> None:
        with graph.graph_change("backend-remove"):
            graph.graph_changes("close")

    graph.graph_changes("backend-insert")
    for _ in range(2):
        open_format_node()
        drop_format_node()
    graph.graph_changes("backend-remove", "close")
    # The file node and the two qcow2 nodes each had a generated name.
    graph.skip_generated_names(3)


def qcow2_image_bytes(size: int, backing_file: str | None, backing_fmt: str | None) -> bytes:
    """The bytes of a new qcow2 image with QEMU's default options."""
    from qmpjobd.block.drivers.qcow2 import run_now
    from qmpjobd.block.formats.qcow2.create import CreateOptions, create_image as build
    from qmpjobd.block.formats.qcow2.create import validate
    from qmpjobd.block.formats.qcow2.storage import MemoryStorage

    opts = CreateOptions(size=size, backing_file=backing_file, backing_fmt=backing_fmt)
    validate(opts)
    storage = MemoryStorage()
    run_now(build(storage, opts))
    return bytes(storage.data)


def _write_file(graph: Any, filename: str, data: bytes) -> None:
    fd = graph.path_policy.open(filename, os.O_WRONLY | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset:], offset)
    finally:
        os.close(fd)


# --- the external snapshot action ------------------------------------------------------


def _reads_consistently(node: Any) -> bool:
    """QEMU's BLK_PERM_CONSISTENT_READ in the node's cumulative permissions: an
    export, a job reading it, a format parent reading its metadata, or any
    parent that itself needs it (a write-only user, a mirror target, does not)."""
    for user in node.backend_users:
        if user not in node.job_users or getattr(user, "source", None) is node:
            return True
    if any(getattr(job, "source", None) is node for job in node.job_users):
        return True
    for parent in node.parent_nodes:
        roles = [role for role, child in parent.children.items() if child is node]
        if "file" in roles and parent.is_format and parent.driver != "raw":
            return True
        if _reads_consistently(parent):
            return True
    return False


def _check_overlay(overlay: Any) -> None:
    if _reads_consistently(overlay):
        raise QMPError("The overlay is already in use")
    if overlay.is_filter:
        raise QMPError("Filters cannot be used as overlays")
    if overlay.backing_node() is not None:
        raise QMPError("The overlay already has a backing image")
    if overlay.driver != "qcow2":
        raise QMPError("The overlay does not support backing images")


def _drain(actx: ActionContext, action: TxnAction, node: Any) -> None:
    """bdrv_drained_begin(node), paired with the clean step."""
    from qmpjobd.commands.backup import drain_source

    drain_source(actx, action, node)


def _open_sync_overlay(actx: ActionContext, data: dict, old: Any, node_name: str | None) -> Any:
    """blockdev-snapshot-sync's part: node names, the image, the new node."""
    graph = actx.daemon.graph
    snapshot_node_name = data.get("snapshot-node-name")
    if node_name is not None and snapshot_node_name is None:
        raise QMPError("New overlay node-name missing")
    if snapshot_node_name is not None and graph.find(snapshot_node_name) is not None:
        raise QMPError("New overlay node-name already in use")
    fmt = data.get("format", "qcow2")
    filename = data["snapshot-file"]
    if data.get("mode", "absolute-paths") != "existing":
        create_image(graph, filename, fmt, old.size, old.filename(), old.driver)
    if fmt not in _CREATABLE:
        raise QMPError(f"Driver '{fmt}' is not supported by qmpjobd")
    options: dict = {"driver": fmt}
    if snapshot_node_name is not None:
        options["node-name"] = snapshot_node_name
    if old.read_only:
        options["read-only"] = True
    if fmt == "file":
        options["filename"] = filename
    else:
        options["file"] = {"driver": "file", "filename": filename}
    if fmt == "qcow2":
        options["backing"] = None         # BDRV_O_NO_BACKING: attached below
    return graph.open_implicit(options)


def prepare_external_snapshot(actx: ActionContext, data: dict, action: TxnAction) -> None:
    graph = actx.daemon.graph
    sync = actx.kind == "blockdev-snapshot-sync"
    if sync:
        device, node_name = data.get("device"), data.get("node-name")
    else:
        device = node_name = data["node"]
    old = lookup_bs(graph, device, node_name)
    _drain(actx, action, old)
    old.check_not_busy()
    if sync:
        overlay = _open_sync_overlay(actx, data, old, node_name)
        # The action's own reference, dropped in clean (bdrv_unref(new_bs)).
        action.on_clean(lambda: _drop_if_unused(graph, overlay))
    else:
        overlay = graph.lookup(data["overlay"])
    _check_overlay(overlay)
    undo = graph.append_overlay(overlay, old)
    action.on_abort(undo)
    action.on_commit(lambda: _try_read_only(old))


def _drop_if_unused(graph: Any, overlay: Any) -> None:
    """bdrv_unref(new_bs) in clean: the overlay -sync opened lives on only if
    something took it over (a parent node, an export, a job)."""
    if graph.find(overlay.node_name) is not overlay or overlay.monitor_owned:
        return
    if overlay.parent_nodes or overlay.job_users or overlay.backend_users:
        return
    graph._forget(overlay)


register_action("blockdev-snapshot", prepare_external_snapshot)
register_action("blockdev-snapshot-sync", prepare_external_snapshot)


@command("blockdev-snapshot")
def blockdev_snapshot(ctx: Context, args: dict) -> dict:
    return run_transaction(ctx, [("blockdev-snapshot", args)])


@command("blockdev-snapshot-sync")
def blockdev_snapshot_sync(ctx: Context, args: dict) -> dict:
    return run_transaction(ctx, [("blockdev-snapshot-sync", args)])


# --- change-backing-file ---------------------------------------------------------------


def _chain_contains(top: Any, wanted: Any) -> bool:
    node = top
    while node is not None:
        if node is wanted:
            return True
        node = node.filter_or_cow_child()
    return False


@command("change-backing-file")
def change_backing_file(ctx: Context, args: dict) -> dict:
    graph = ctx.daemon.graph
    device = args["device"]
    root = graph.lookup_root(device)
    image_node = lookup_bs(graph, None, args["image-node-name"])
    if image_node.backing_node() is None:
        raise QMPError("not allowing backing file change on an image without a "
                       "backing file")
    root.check_not_busy()
    if not _chain_contains(root, image_node):
        raise QMPError(f"'{device}' and image file are not in the same chain")
    backing_file = args["backing-file"]
    with writable(image_node):
        try:
            write_backing_name(image_node, backing_file, image_node.driver)
        except OSError as exc:
            raise QMPError(f"Could not change backing file to '{backing_file}': "
                           f"{os.strerror(exc.errno or 5)}") from None
    return {}


def write_backing_name(node: Any, backing_file: str, backing_fmt: str) -> None:
    """bdrv_change_backing_file on a qcow2 node: the header's backing name and
    format; the node's json: rule then compares the new name with its backing
    node's filename."""
    image = getattr(node, "image", None)
    if image is None:
        raise OSError(95, os.strerror(95))
    if len(backing_file.encode()) > 1023:
        raise OSError(22, os.strerror(22))
    from qmpjobd.block.drivers.qcow2 import SyncStorage, run_now

    header = image.header
    # QEMU writes an empty name as a name of length 0, and the format extension
    # whatever the name; an empty name then counts as no backing file.
    header.backing_file = backing_file
    header.backing_format = backing_fmt
    storage = image.storage
    image.storage = SyncStorage(node.children["file"])
    try:
        run_now(image.write_header())
    finally:
        image.storage = storage
        if not backing_file:
            header.backing_file = None
    # QEMU's auto_backing_file is now the string written, not the backing's name.
    node.opened_backing_from_header = False


# --- block_resize ------------------------------------------------------------------------


@command("block_resize")
def block_resize(ctx: Context, args: dict) -> dict:
    graph = ctx.daemon.graph
    device = args.get("device")
    node = lookup_bs(graph, device, args.get("node-name"))
    size = args["size"]
    if size < 0:
        raise QMPError("Parameter 'size' expects a >0 size")
    if node.blockers:
        if graph.personality.has(RESIZE_NAMES_BLOCKER):
            node.check_not_busy()
        # QERR_DEVICE_IN_USE with the device name, NULL when a node-name was given.
        raise QMPError(f"Device '{device if device is not None else '(null)'}' is in use")
    with _resize_permission(graph, node), _drained(ctx, node):
        node.truncate(size)
    if not graph.personality.has(RAW_LENGTH_CACHED):
        _refresh_sizes_above(node)
    return {}


def _refresh_sizes_above(node: Any) -> None:
    """A raw node without a fixed size is as long as its child (QEMU asks the
    child each time); its parents above it follow in turn."""
    for parent in node.parent_nodes:
        if parent.driver == "raw" and not parent.has_size and parent.file_child is node:
            parent.window = max(0, node.size - parent.offset)
            parent.size = -(-parent.window // 512) * 512
            _refresh_sizes_above(parent)


@contextlib.contextmanager
def _resize_permission(graph: Any, node: Any) -> Iterator[None]:
    """blk_new_with_bs(bs, BLK_PERM_RESIZE, BLK_PERM_ALL): an unnamed BlockBackend
    taking the resize permission for the time of the command."""
    try:
        from qmpjobd.block.permissions import ALL, RESIZE, attach_user, detach_owner
    except ImportError:          # a tree without the permission layer
        check_resize_permission(node)
        yield
        return
    owner = object()
    graph.graph_changes("backend-insert")
    attach_user(graph, node, owner, "block-backend", "root", RESIZE, ALL)
    try:
        yield
    finally:
        detach_owner(graph, owner)
        graph.graph_changes("backend-remove")


def check_resize_permission(node: Any) -> None:
    """The resize permission block_resize's BlockBackend takes: a format parent
    (its metadata) and a raw window (offset/size) share it with nobody."""
    for parent in node.parent_nodes:
        roles = [role for role, child in parent.children.items() if child is node]
        if "file" not in roles:
            continue
        window = parent.driver == "raw" and ("offset" in parent.options
                                             or "size" in parent.options)
        if window or (parent.is_format and parent.driver != "raw"):
            raise QMPError(f"Permission conflict on node '{node.node_name}': permissions "
                           f"'resize' are both required by an unnamed block device (uses "
                           f"node '{node.node_name}' as 'root' child) and unshared by node "
                           f"'{parent.node_name}' (uses node '{node.node_name}' as 'file' "
                           "child).")


def _drained(ctx: Context, node: Any) -> contextlib.AbstractContextManager[None]:
    if not ctx.daemon.options.drain_artefacts:
        return contextlib.nullcontext()
    return ctx.daemon.graph.drained([node])
