"""The block graph: named nodes, their children, users, blockers and drained sections.

``BlockGraph.add`` is the body of ``blockdev-add``; ``delete`` of ``blockdev-del``.
Drained sections are the one mechanism behind QEMU's extra ``paused``/``running``
event pairs: draining a node quiesces it and every node above it (QEMU drains the
parents of a drained node), and each job registered as a user of a quiesced node gets
one internal pause per drained section, undone when the section ends.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterable, Iterator

from qmpjobd.block.drivers import driver_class
from qmpjobd.block.node import BlockNode, extract_child_options, flatten_options
from qmpjobd.errors import QMPError

# QEMU keeps node names in a 32-byte buffer (31 characters and the NUL).
NODE_NAME_MAX = 31
# id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_WELLFORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
# QEMU's generated node names are "#block" + a process-wide counter + two random
# digits (util/id.c), e.g. "#block000", "#block143"; clients must not rely on them.
_AUTO_NAME_PREFIX = "#block"


class BlockGraph:
    """Every node of the daemon, by node name, in creation order."""

    def __init__(self, jobs: Any, options: Any = None) -> None:
        self.jobs = jobs
        self.options = options
        self.nodes: dict[str, BlockNode] = {}
        self._auto_name_counter = 0
        # Stack of drained sections: each entry is the list of nodes it quiesced.
        # Open drained sections: (the nodes asked for, or None for all; quiesced nodes).
        self._drained_sections: list[tuple[tuple[BlockNode, ...] | None, list[BlockNode]]] = []

    # --- clock ------------------------------------------------------------------

    @property
    def clock(self) -> Any:
        """The daemon clock (all waits in node I/O go through it)."""
        return self.jobs.clock

    # --- lookup -----------------------------------------------------------------

    def find(self, node_name: str) -> BlockNode | None:
        return self.nodes.get(node_name)

    def lookup(self, name: str) -> BlockNode:
        """Find by device or node name (the storage daemon has no devices)."""
        node = self.nodes.get(name)
        if node is None:
            raise QMPError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    # --- blockdev-add -----------------------------------------------------------

    def add(self, options: dict) -> BlockNode:
        """Create a node (and its inline children) from blockdev-add arguments."""
        if "node-name" not in options:
            raise QMPError("'node-name' must be specified for the root node")
        node = self._open_tree(options)
        node.monitor_owned = True
        return node

    def _open_tree(self, options: dict) -> BlockNode:
        """Open a node and its inline children; on failure, forget all of them."""
        created: list[BlockNode] = []
        try:
            return self._open(options, created)
        except BaseException:
            for orphan in reversed(created):
                self._forget(orphan)
            raise

    def _open(self, options: dict, created: list[BlockNode],
              flat: dict | None = None) -> BlockNode:
        """Open one node. ``flat`` is how QEMU would hold its options (flattened,
        in QEMU's insertion order); it only shapes json: filenames."""
        if flat is None:
            flat = flatten_options(options)
        cls = driver_class(options["driver"])
        check_generic_options(options)
        # QEMU opens a format driver's protocol child before naming the format node;
        # other drivers are named (and listed) before they open their children.
        # Error precedence and the node list order follow from that.
        named_first = not cls.is_format
        if named_first:
            node_name, auto_named = self._claim_name(options.get("node-name"))
            self.nodes[node_name] = None  # type: ignore[assignment]  # keeps list position
        try:
            children = self._open_children(cls, options, created, flat)
            if not named_first:
                node_name, auto_named = self._claim_name(options.get("node-name"))
            own_options = {k: v for k, v in options.items() if k not in cls.child_roles}
            node = cls(self, node_name, own_options, children, auto_named)
            node.flat_options = flat
            try:
                node.open()
            except BaseException:
                node.detach_children()
                raise
        except BaseException:
            if named_first:
                del self.nodes[node_name]
            raise
        self.nodes[node_name] = node
        created.append(node)
        return node

    def _open_children(self, cls: type[BlockNode], options: dict,
                       created: list[BlockNode], flat: dict) -> dict[str, BlockNode]:
        children: dict[str, BlockNode] = {}
        for role in cls.child_roles:
            if role in options:
                child_flat = extract_child_options(flat, role)
                children[role] = self._child(options[role], options, created, child_flat)
        cls.check_children(children)
        return children

    def _child(self, ref: dict | str, parent_options: dict,
               created: list[BlockNode], flat: dict) -> BlockNode:
        """Open an inline child or resolve a reference to an existing node."""
        if isinstance(ref, str):
            node = self.find(ref)
            if node is None:
                raise QMPError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            return node
        child_options = dict(ref)
        # A read-only parent opens its inline children read-only (QEMU inherits it).
        if parent_options.get("read-only") and "read-only" not in child_options:
            child_options["read-only"] = True
        return self._open(child_options, created, flat)

    def _claim_name(self, wanted: str | None) -> tuple[str, bool]:
        if wanted is None:
            import random  # only here: importing it costs start-up ~1 ms

            name = f"{_AUTO_NAME_PREFIX}{self._auto_name_counter}{random.randrange(100):02d}"
            self._auto_name_counter += 1
            return name, True
        if not _WELLFORMED.match(wanted):
            raise QMPError(f"Invalid node-name: '{wanted}'")
        if wanted in self.nodes:
            raise QMPError(f"Duplicate nodes with node-name='{wanted}'")
        if len(wanted.encode()) > NODE_NAME_MAX:
            raise QMPError("Node name too long")
        return wanted, False

    def open_implicit(self, options: dict) -> BlockNode:
        """Open a node the daemon needs itself (drive-mirror/drive-backup targets):
        not owned by the monitor, so blockdev-del refuses it, and named by QEMU's
        generator unless ``node-name`` is given."""
        node = self._open_tree(options)
        # Like QEMU's bdrv_unref after the job took its reference: the node lives
        # as long as a job uses it.
        node.release_when_unused = True
        return node

    def release_implicit(self, node: BlockNode) -> None:
        """Drop an ``open_implicit`` node once nothing uses it any more."""
        if node.node_name in self.nodes and not node.monitor_owned \
                and not node.parent_nodes and not node.job_users:
            self._forget(node)

    def is_root(self, node: BlockNode) -> bool:
        """QEMU's bdrv_is_root_node: no parent node and no job holding it."""
        return not node.parent_nodes and not node.job_users

    def lookup_root(self, name: str) -> BlockNode:
        """qmp_get_root_bs: look up ``name`` and require a root node."""
        node = self.lookup(name)
        if not self.is_root(node):
            raise QMPError("Need a root block node")
        return node

    def insert_filter(self, cls: type[BlockNode], node_name: str | None,
                      child: BlockNode) -> BlockNode:
        """Create an implicit filter node above ``child`` (mirror's mirror_top).

        Parents of ``child`` would move to the filter (QEMU's bdrv_append); a
        qmpjobd job only filters root nodes, so there are none to move.
        """
        name, auto_named = self._claim_name(node_name)
        node = cls(self, name, {"driver": cls.driver}, {cls.child_roles[0]: child}, auto_named)
        node.open()
        self.nodes[name] = node
        return node

    def drop_filter(self, node: BlockNode) -> None:
        """Remove an implicit filter inserted by ``insert_filter``."""
        self.nodes.pop(node.node_name, None)
        node.detach_children()
        node.close()

    def replace_node(self, old: BlockNode, new: BlockNode, keep: BlockNode | None = None) -> None:
        """Point every parent of ``old`` (except ``keep``) at ``new`` (mirror pivot)."""
        for parent in list(old.parent_nodes):
            if parent is keep:
                continue
            for role, child in list(parent.children.items()):
                if child is old:
                    parent.children[role] = new
            old.parent_nodes.remove(parent)
            new.parent_nodes.append(parent)

    # --- blockdev-del -----------------------------------------------------------

    def delete(self, node_name: str) -> None:
        """Remove a monitor-owned node that nothing else uses (blockdev-del)."""
        node = self.find(node_name)
        if node is None:
            raise QMPError(f"Failed to find node with node-name='{node_name}'")
        if node.backend_users:
            raise QMPError(f"Node {node_name} is in use")
        node.check_not_busy()
        if not node.monitor_owned:
            raise QMPError(f"Node {node_name} is not owned by the monitor")
        if node.parent_nodes or node.job_users:
            raise QMPError(f"Block device {node_name} is in use")
        self._forget(node)

    def _forget(self, node: BlockNode) -> None:
        """Drop ``node``; children only it held go with it (QEMU's refcounting)."""
        self.nodes.pop(node.node_name, None)
        node.close()
        for child in node.detach_children():
            if not child.monitor_owned and not child.parent_nodes and not child.job_users:
                self._forget(child)

    # --- drained sections -------------------------------------------------------

    def drained_begin(self, nodes: Iterable[BlockNode] | None = None) -> None:
        """Quiesce ``nodes`` (None: all) and every node above them."""
        key = None if nodes is None else tuple(nodes)
        quiesced = self._drain_closure(key)
        self._drained_sections.append((key, quiesced))
        for node in quiesced:
            node.quiesce_counter += 1
            for job in list(node.job_users):
                self.pause_job_for_drain(job)
        # BDRV_POLL_WHILE(bdrv_drain_poll): the main loop runs until nothing on
        # the quiesced nodes is in flight and no job using them can issue more.
        self.jobs.poll_while(lambda: self._drain_busy(quiesced))

    @staticmethod
    def _drain_busy(quiesced: list[BlockNode]) -> bool:
        return any(node.in_flight or any(job.drained_poll() for job in node.job_users)
                   for node in quiesced)

    def drained_end(self, nodes: Iterable[BlockNode] | None = None) -> None:
        """End the latest drained section begun on the same ``nodes``.

        Sections are per node set, not a stack: as in QEMU, a transaction's clean-up
        ends its actions' drains in action order, not in reverse.
        """
        key = None if nodes is None else tuple(nodes)
        for index in range(len(self._drained_sections) - 1, -1, -1):
            if self._drained_sections[index][0] == key:
                break
        else:
            raise RuntimeError("drained_end without a matching drained_begin")
        _, quiesced = self._drained_sections.pop(index)
        # No poll here: QEMU 7.2 polls at drained_end only for drivers with a
        # bdrv_co_drain_end callback (throttle, nbd, qed), none of which qmpjobd has.
        for node in quiesced:
            node.quiesce_counter -= 1
            for job in list(node.job_users):
                self.resume_job_after_drain(job)

    @contextlib.contextmanager
    def drained(self, nodes: Iterable[BlockNode] | None = None) -> Iterator[None]:
        self.drained_begin(nodes)
        try:
            yield
        finally:
            self.drained_end(nodes)

    def _drain_closure(self, nodes: Iterable[BlockNode] | None) -> list[BlockNode]:
        if nodes is None:
            return list(self.nodes.values())
        closure: list[BlockNode] = []
        for node in nodes:
            for member in [node, *node.ancestors()]:
                if member not in closure:
                    closure.append(member)
        return closure

    # The job core's pause counter is driven through these two calls only, so a
    # drained section and a job attaching to a quiesced node behave identically.
    @staticmethod
    def pause_job_for_drain(job: Any) -> None:
        job.pause()

    @staticmethod
    def resume_job_after_drain(job: Any) -> None:
        job.resume()


def check_generic_options(options: dict) -> None:
    """Checks QEMU makes on BlockdevOptions members common to every driver."""
    if options.get("detect-zeroes") == "unmap" and options.get("discard") != "unmap":
        raise QMPError("setting detect-zeroes to unmap is not allowed without "
                       "setting discard operation to unmap")
    if options.get("force-share") and not options.get("read-only"):
        raise QMPError("force-share=on can only be used with read-only images")
    if options.get("cache", {}).get("direct"):
        # O_DIRECT needs aligned buffers end to end; not offered rather than faked.
        raise QMPError("cache.direct=on is not supported by qmpjobd")
