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

qmpjobd keeps no image metadata that inactivation would flush, so the flag only
changes what queries show and which nodes a job or a new parent may take.
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
        return reached
    for candidate in list(graph.nodes.values()):
        # QEMU's walk covers monitor-owned nodes; one with any parent is left to
        # the recursion from that parent.
        if candidate.monitor_owned and not candidate.parent_nodes:
            _collect_inactivation(candidate, reached)
    return reached


def inactivate(nodes: Iterable["BlockNode"]) -> None:
    for node in nodes:
        node.active = False


def activate(graph: "BlockGraph", node: "BlockNode | None") -> None:
    """blockdev-set-active active=true: children first, then the node itself."""
    roots: list[BlockNode] = [node] if node is not None else list(graph.nodes.values())
    for root in roots:
        _activate(root)


def _activate(node: "BlockNode") -> None:
    for child in node.children.values():
        _activate(child)
    node.active = True
