"""``block-stream`` and ``block-commit`` (see qmpjobd.block.jobs.stream / .commit).

The checks run in the order of QEMU's qmp_block_stream and qmp_block_commit, with
their texts: argument conflicts, lookups, chain membership, busy nodes (only a
job's blocker counts: the blocker a backing link puts on its child does not block
streaming or committing, as in QEMU), then the job is created and started.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from qmpjobd.block.formats.qcow2.backing import chain_contains, cow_child, skip_filters
from qmpjobd.block.node import BlockNode
from qmpjobd.commands import Context, command
from qmpjobd.errors import QMPError

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.graph import BlockGraph


def check_not_busy_for_jobs(node: BlockNode) -> None:
    """bdrv_op_is_blocked for STREAM / COMMIT_*: job blockers, newest first."""
    for blocker in node.blockers:
        if not isinstance(blocker.owner, BlockNode):
            raise QMPError(f"Node '{node.node_name}' is busy: {blocker.reason}")


def lookup_node(graph: "BlockGraph", name: str) -> BlockNode:
    """bdrv_lookup_bs(NULL, name): a node name only."""
    node = graph.find(name)
    if node is None:
        raise QMPError(f"Cannot find device='' nor node-name='{name}'")
    return node


def find_backing_image(node: BlockNode, name: str) -> BlockNode | None:
    """QEMU's bdrv_find_backing_image: the node of ``node``'s chain that some
    overlay names ``name`` (its header string, or the same file resolved against
    the overlay's directory), or whose filename is ``name`` where the backing was
    overridden."""
    current = skip_filters(node)
    while current is not None:
        below = cow_child(current)
        if below is None:
            return None
        header = getattr(getattr(current, "image", None), "header", None)
        header_name = header.backing_file if header is not None else None
        overridden = getattr(current, "_backing_overridden", lambda: True)()
        if overridden or header_name is None:
            if name == below.filename():
                return below
        elif "://" in name or "://" in header_name:
            if name in (header_name, current._resolve(header_name)):  # type: ignore[attr-defined]
                return below
        else:
            wanted = os.path.realpath(current._resolve(name))          # type: ignore[attr-defined]
            named = os.path.realpath(current._resolve(header_name))    # type: ignore[attr-defined]
            if wanted == named:
                return below
        current = below
    return None


def _reopen(node: BlockNode, read_only: bool) -> None:
    """bdrv_reopen_set_read_only: the node and the children opened with it switch
    (a format writes its cached metadata back before going read-only; a host file
    is reopened with the new access mode, its image locks moving with it)."""
    from qmpjobd.commands.snapshot import _inheriting, _write_back

    members = _inheriting(node)
    if not read_only:
        members = _writable_members(node, members)
    node.graph.graph_changes("reopen")
    for member in members:
        if member.read_only == read_only:
            continue
        if read_only:
            _write_back(member)
        reopen_fd = getattr(member, "reopen_fd", None)
        if reopen_fd is not None and getattr(member, "fd", None) is not None:
            reopen_fd(read_only)
        member.read_only = read_only
        image = getattr(member, "image", None)
        if image is not None:
            image.read_only = read_only
    if not read_only:
        # Once every member (the files below too) is writable.
        from qmpjobd.block.formats.qcow2.repair import repair_if_dirty
        for member in members:
            repair_if_dirty(member)


def _writable_members(node: BlockNode, members: list) -> list:
    """Going read-write: a child that was given ``read-only`` explicitly keeps it
    (and so does what lies below it); a node whose data child stays read-only
    cannot take the write permission, QEMU's "Block node is read-only"
    (bdrv_node_refresh_perm), and nothing changes."""
    kept: set[int] = set()
    for member in members:
        explicit = "read-only" in member.options and \
            not getattr(member, "read_only_inherited", False)
        if member is not node and (id(member) in kept or explicit):
            kept.update(id(child) for child in member.children.values())
            kept.add(id(member))
    changing = [m for m in members if id(m) not in kept]
    for member in changing:
        child = member.file_child
        if child is not None and child.read_only and id(child) not in {id(m) for m in changing}:
            raise QMPError("Block node is read-only")
    return changing


def _job_flags(args: dict) -> dict[str, Any]:
    return {"speed": args.get("speed", 0), "on_error": args.get("on-error", "report"),
            "filter_node_name": args.get("filter-node-name"),
            "auto_finalize": args.get("auto-finalize", True),
            "auto_dismiss": args.get("auto-dismiss", True), "reopen": _reopen}


# ---------------------------------------------------------------------- block-stream

@command("block-stream")
def block_stream(ctx: Context, args: dict) -> dict:
    graph = ctx.daemon.graph
    if "base" in args and "base-node" in args:
        raise QMPError("'base' and 'base-node' cannot be specified at the same time")
    if "base" in args and "bottom" in args:
        raise QMPError("'base' and 'bottom' cannot be specified at the same time")
    if "bottom" in args and "base-node" in args:
        raise QMPError("'bottom' and 'base-node' cannot be specified at the same time")
    device = graph.lookup(args["device"])
    base = bottom = None
    if "base" in args:
        base = find_backing_image(device, args["base"])
        if base is None:
            raise QMPError(f"Can't find '{args['base']}' in the backing chain")
    if "base-node" in args:
        base = lookup_node(graph, args["base-node"])
        if base is device or not chain_contains(device, base):
            raise QMPError(f"Node '{args['base-node']}' is not a backing image of "
                           f"'{args['device']}'")
    if "bottom" in args:
        bottom = lookup_node(graph, args["bottom"])
        if bottom.is_filter:
            raise QMPError(f"Node '{args['bottom']}' is a filter, use a non-filter node "
                           "as 'bottom'")
        if not chain_contains(device, bottom):
            raise QMPError(f"Node '{args['bottom']}' is not in a chain starting from "
                           f"'{args['device']}'")
    end = bottom.filter_or_cow_child() if bottom is not None else base
    node: BlockNode | None = device
    while node is not None and node is not end:
        check_not_busy_for_jobs(node)
        node = node.filter_or_cow_child()
    if base is None and "backing-file" in args:
        raise QMPError("backing file specified, but streaming the entire chain")

    from qmpjobd.block.jobs.stream import StreamJob

    job = StreamJob(ctx.daemon.jobs, graph, args.get("job-id", ""), device, base,
                    bottom=bottom, backing_file=args.get("backing-file"),
                    backing_mask_protocol=args.get("backing-mask-protocol", False),
                    **_job_flags(args))
    job.start()
    return {}


# ---------------------------------------------------------------------- block-commit

def _commit_device(graph: "BlockGraph", name: str) -> BlockNode:
    """qmp_get_root_bs, with the DeviceNotFound class libvirt probes for."""
    node = graph.find(name)
    if node is None:
        raise QMPError(f"Device '{name}' not found", "DeviceNotFound")
    if not graph.is_root(node):
        raise QMPError("Need a root block node")
    if not node.is_inserted():
        raise QMPError("Device has no medium")
    return node


def _commit_top(graph: "BlockGraph", device: BlockNode, args: dict) -> BlockNode:
    if "top-node" in args and "top" in args:
        raise QMPError("'top-node' and 'top' are mutually exclusive")
    top: BlockNode | None = device
    if "top-node" in args:
        top = lookup_node(graph, args["top-node"])
        if not chain_contains(device, top):
            raise QMPError(f"'{args['top-node']}' is not in this backing file chain")
    elif "top" in args and device.filename() != args["top"]:
        top = find_backing_image(device, args["top"])
    if top is None:
        raise QMPError(f"Top image file {args['top']} not found")
    return top


def _commit_base(graph: "BlockGraph", top: BlockNode, args: dict) -> BlockNode:
    if "base-node" in args and "base" in args:
        raise QMPError("'base-node' and 'base' are mutually exclusive")
    if "base-node" in args:
        base = lookup_node(graph, args["base-node"])
        if not chain_contains(top, base):
            raise QMPError(f"'{args['base-node']}' is not in this backing file chain")
        return base
    if "base" in args:
        found = find_backing_image(top, args["base"])
        if found is None:
            raise QMPError(f"Can't find '{args['base']}' in the backing chain")
        return found
    # bdrv_find_base: the bottom of the chain (the node itself without backing).
    node = skip_filters(top)
    assert node is not None
    while cow_child(node) is not None:
        node = cow_child(node)  # type: ignore[assignment]
    return node


@command("block-commit")
def block_commit(ctx: Context, args: dict) -> dict:
    graph = ctx.daemon.graph
    device = _commit_device(graph, args["device"])
    check_not_busy_for_jobs(device)
    top = _commit_top(graph, device, args)
    base = _commit_base(graph, top, args)
    node: BlockNode | None = top
    while node is not None and node is not base:
        check_not_busy_for_jobs(node)
        node = node.filter_or_cow_child()
    if top is base:
        raise QMPError("cannot commit an image into itself")
    job_id = args.get("job-id", "")
    flags = _job_flags(args)
    is_active = skip_filters(top) is skip_filters(device)
    # QEMU commits actively (a mirror) also when someone writes to 'top' (a
    # writable export of an intermediate node), and such a commit cannot rewrite
    # an overlay's backing file name. (Without backing-file qmpjobd still starts
    # an inactive commit there, which the writer then makes fail.)
    if "backing-file" in args and (is_active or _has_writer(graph, top)):
        raise QMPError("'backing-file' specified, but 'top' is the active layer"
                       if is_active else
                       "'backing-file' specified, but 'top' has a writer on it")
    if is_active:
        from qmpjobd.block.jobs.commit import ActiveCommitJob

        job = ActiveCommitJob(ctx.daemon.jobs, graph, job_id, top, base, **flags)
    else:
        overlay = _overlay_of(device, top)
        if overlay is not None:
            check_not_busy_for_jobs(overlay)
        from qmpjobd.block.jobs.commit import CommitJob

        job = CommitJob(ctx.daemon.jobs, graph, job_id, device, top, base,
                        backing_file=args.get("backing-file"),
                        backing_mask_protocol=args.get("backing-mask-protocol", False),
                        **flags)
    job.start()
    return {}


def _has_writer(graph: Any, node: BlockNode) -> bool:
    """Whether the node's parents and users together hold the write permission
    (bdrv_get_cumulative_perm)."""
    from qmpjobd.block.permissions import WRITE, compute

    perm, _ = compute(graph)[2].get(id(node), (0, 0))
    return bool(perm & WRITE)


def _overlay_of(device: BlockNode, top: BlockNode) -> BlockNode | None:
    """bdrv_find_overlay(device, top)."""
    from qmpjobd.block.formats.qcow2.backing import find_overlay

    return find_overlay(device, top)
