"""Active and inactive nodes (QEMU's BDRV_O_INACTIVE), for ``blockdev-set-active``.

An inactive node is one whose image another process may own (QEMU uses it around
migration). What a client can observe, measured on qemu-storage-daemon 10.0/11.1:

* ``blockdev-add`` with ``active: false`` makes only that node inactive; inline
  children stay active.
* An inactive node cannot become the child of an active one:
  ``Inactive 'c' can't be a file child of active 'p'`` (role as QEMU names it).
* Inactivating a node also inactivates each child whose parents are then all
  inactive; a node that still has an active parent is refused
  (``Node has active parent node``). Inactivating an inactive node succeeds.
* Without ``node-name``, inactivation starts from every monitor-owned node
  without parents; activation always recurses into every child first.

* A node a writable NBD export uses cannot be inactivated unless the export has
  ``allow-inactive`` (``Failed to inactivate node: Operation not permitted``, or
  ``... all nodes: ...`` without ``node-name``); a read-only export lets go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from qmpjobd.errors import QMPError

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.graph import BlockGraph
    from qmpjobd.block.node import BlockNode


def check_child_attach(parent_name: str, role: str, child: "BlockNode",
                       prefix: str = "") -> None:
    """Refuse to attach an inactive ``child`` under an active parent."""
    if not child.active:
        raise QMPError(f"{prefix}Inactive '{child.node_name}' can't be a {role} child "
                       f"of active '{parent_name}'")


def has_active_parent(node: "BlockNode") -> bool:
    return any(parent.active for parent in node.parent_nodes)


def _collect_inactivation(node: "BlockNode", out: list["BlockNode"]) -> None:
    """The nodes inactivating ``node`` reaches: it, then children left with no
    active parent (a child is reached again from its last active parent)."""
    if not node.active or node in out:
        return
    if any(parent.active and parent not in out for parent in node.parent_nodes):
        return
    out.append(node)
    for child in node.children.values():
        _collect_inactivation(child, out)


def nodes_to_inactivate(graph: "BlockGraph", node: "BlockNode | None") -> list["BlockNode"]:
    """What blockdev-set-active active=false changes, checked first (no change on error)."""
    reached: list[BlockNode] = []
    if node is not None:
        if has_active_parent(node):
            raise QMPError("Node has active parent node")
        _collect_inactivation(node, reached)
    else:
        for candidate in list(graph.nodes.values()):
            # QEMU's walk covers monitor-owned nodes; one with any parent is left to
            # the recursion from that parent.
            if candidate.monitor_owned and not candidate.parent_nodes:
                _collect_inactivation(candidate, reached)
    _check_backends_allow(reached, "node" if node is not None else "all nodes")
    return reached


def _check_backends_allow(nodes: list["BlockNode"], what: str) -> None:
    """A block backend that writes (a writable NBD export) refuses to lose its node
    unless it was made with ``allow-inactive``: QEMU's blk_root_inactivate answers
    -EPERM while the backend holds the write permission. A read-only export lets go."""
    for node in nodes:
        for owner in node.backend_users:
            if (getattr(owner, "allow_inactive", True) is False
                    and getattr(owner, "writable", False)):
                raise QMPError(f"Failed to inactivate {what}: Operation not permitted")


def inactivate(nodes: Iterable["BlockNode"], graph: "BlockGraph | None" = None) -> None:
    """Inactivate ``nodes`` (parents before children, as nodes_to_inactivate lists
    them): each driver lets go of its image first (qcow2 stores its bitmaps and
    writes its caches), then the node drops the permissions an active node holds,
    so another process may take the image's locks."""
    changed = False
    for node in nodes:
        if not node.active:
            continue
        hook = getattr(node, "inactivate_image", None)
        if hook is not None:
            hook()
        node.active = False
        changed = True
    if changed and graph is not None:
        _refresh_permissions(graph, may_fail=False)


def activate(graph: "BlockGraph", node: "BlockNode | None") -> None:
    """blockdev-set-active active=true: children first, then the node itself."""
    roots: list[BlockNode] = [node] if node is not None else list(graph.nodes.values())
    for root in roots:
        _activate(graph, root)


def _activate(graph: "BlockGraph", node: "BlockNode") -> None:
    for child in node.children.values():
        _activate(graph, child)
    if node.active:
        return
    node.active = True
    # The permissions an active node needs come back first (another process
    # holding the image's write lock makes this fail, and the node stays inactive),
    # then the driver reads its image again.
    try:
        _refresh_permissions(graph, may_fail=True)
    except QMPError:
        node.active = False
        _refresh_permissions(graph, may_fail=False)
        raise
    hook = getattr(node, "activate_image", None)
    if hook is not None:
        hook()


def _refresh_permissions(graph: "BlockGraph", may_fail: bool) -> None:
    from qmpjobd.block.permissions import refresh
    refresh(graph, may_fail=may_fail)
