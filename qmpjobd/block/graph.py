"""The block graph: named nodes, their children, users, blockers and drained sections.

``BlockGraph.add`` is the body of ``blockdev-add``; ``delete`` of ``blockdev-del``.
Drained sections are the one mechanism behind QEMU's extra ``paused``/``running``
event pairs: draining a node quiesces it and every node above it (QEMU drains the
parents of a drained node), and each job registered as a user of a quiesced node gets
one internal pause per drained section, undone when the section ends.

Graph changes (``graph_change``) add the sections QEMU's block-graph lock takes from
8.0 on; ``qmpjobd.block.drain`` says, per personality, which change takes which kind.
A job paused by an outer section shows nothing for inner ones (its pause counter is
already above zero), which is QEMU's nesting rule.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterable, Iterator

from qmpjobd.block.drain import GRAPH_CHANGES, SectionKind, operation_changes, wait_until_quiet
from qmpjobd.block import permissions
from qmpjobd.block.drivers import driver_class
from qmpjobd.block.node import BlockNode, extract_child_options, flatten_options
from qmpjobd.confine import PathPolicy
from qmpjobd.errors import QMPError
from qmpjobd.versions import Personality, personality as personality_named

# QEMU keeps node names in a 32-byte buffer (31 characters and the NUL).
NODE_NAME_MAX = 31
# id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_WELLFORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
# QEMU's generated node names are "#block" + a process-wide counter + two random
# digits (util/id.c), e.g. "#block000", "#block143"; clients must not rely on them.
_AUTO_NAME_PREFIX = "#block"


class BlockGraph:
    """Every node of the daemon, by node name, in creation order."""

    def __init__(self, jobs: Any, options: Any = None,
                 personality: Personality | None = None) -> None:
        self.jobs = jobs
        self.options = options
        self._personality = personality
        # Section kind of every graph change, for the personality they were built for.
        self._section_kinds: tuple[Personality, dict[str, SectionKind]] | None = None
        self.nodes: dict[str, BlockNode] = {}
        self._auto_name_counter = 0
        # Stack of drained sections: each entry is the list of nodes it quiesced.
        # Open drained sections: (the nodes asked for, or None for all; quiesced nodes).
        self._drained_sections: list[tuple[tuple[BlockNode, ...] | None, list[BlockNode]]] = []
        self._path_policy = PathPolicy()
        # Whether an object-add secret of that id exists (set by the daemon).
        self.has_secret: Callable[[str], bool] = lambda ident: False

    # --- path confinement ----------------------------------------------------------

    @property
    def path_policy(self) -> PathPolicy:
        """The --allow-dir policy every host path of the block layer goes through
        (file nodes open with it, image creation creates with it)."""
        wanted = tuple(getattr(self.options, "allowed_dirs", ()) or ())
        if wanted != self._path_policy.requested:
            # Built on first use and whenever the options change; the directories
            # are resolved once per build, not per open.
            self._path_policy = PathPolicy(wanted)
        return self._path_policy

    # --- personality --------------------------------------------------------------

    @property
    def personality(self) -> Personality:
        """The QEMU release whose drain artefacts the graph reproduces."""
        if self._personality is None:
            # Without a daemon (unit tests of the graph alone): 7.2.
            self._personality = personality_named("7.2")
        return self._personality

    @personality.setter
    def personality(self, value: Personality) -> None:
        self._personality = value

    @property
    def shows_drain_artefacts(self) -> bool:
        """False when the user turned drain artefacts off (--no-drain-artefacts)."""
        return self.options is None or getattr(self.options, "drain_artefacts", True)

    def section_kind(self, change: str) -> SectionKind:
        """The section graph change ``change`` takes here (NONE when the user turned
        drain artefacts off with --no-drain-artefacts)."""
        if not self.shows_drain_artefacts:
            return SectionKind.NONE
        who = self.personality
        if self._section_kinds is None or self._section_kinds[0] is not who:
            self._section_kinds = (who, {name: change_.kind_for(who)
                                         for name, change_ in GRAPH_CHANGES.items()})
        return self._section_kinds[1][change]

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

    def _open_tree(self, options: dict, *, inline_child: bool = False) -> BlockNode:
        """Open a node and its inline children; on failure, forget all of them.
        ``inline_child``: a node another node opens (a backing chain member)."""
        created: list[BlockNode] = []
        try:
            node = self._open(options, created, inline_child=inline_child)
            # Permissions of every new edge, and the image locks they bring.
            permissions.refresh(self)
            return node
        except BaseException:
            for orphan in reversed(created):
                # A failed backing open may have closed some of them already.
                if self.nodes.get(orphan.node_name) is orphan:
                    self._forget(orphan)
            permissions.refresh(self, may_fail=False)
            raise

    def _open(self, options: dict, created: list[BlockNode],
              flat: dict | None = None, inline_child: bool = False) -> BlockNode:
        """Open one node. ``flat`` is how QEMU would hold its options (flattened,
        in QEMU's insertion order); it only shapes json: filenames.

        The graph changes are QEMU's bdrv_open_inherit: a protocol driver attaches
        each child as it opens it; a format driver reaches its file child through a
        temporary BlockBackend (inserted before the node is named, removed once it is
        open) and attaches it in its own open; a driver whose open fails drops its
        children (open_failed); and a node that fails to open at all is closed.
        A format's backing child comes last, once the BlockBackend is gone
        (``_open_backing``).
        """
        if flat is None:
            flat = flatten_options(options)
        cls = driver_class(options["driver"])
        # A child its parent opens defaults to discard=unmap (bdrv_inherited_options);
        # the default is not stored, so that only a user's own choice shows.
        default_discard = "unmap" if inline_child else None
        if not cls.is_format:
            check_generic_options(options, default_discard)
        try:
            node = self._open_named(cls, options, created, flat, default_discard)
        except BaseException:
            # bdrv_unref of the half-built node (QEMU created it before opening).
            self.graph_changes("close")
            raise
        self._open_backing(node, created)
        created.append(node)
        return node

    def _open_backing(self, node: BlockNode, created: list[BlockNode]) -> None:
        """bdrv_open_backing_file, after the format's own open: open or look up the
        backing node, then attach it (bdrv_set_backing_hd, a graph change of its
        own). A failure closes the node that did open (close_and_fail: one close,
        with the inline children only it held closed inside it)."""
        opener = getattr(node, "open_backing", None)
        if opener is None:
            return
        try:
            if opener():
                if not isinstance(node.options.get("backing"), str):
                    # Opened for this node (inline or from the image header).
                    node.children["backing"].inherits_from = node
                self.graph_changes("open-backing")
        except BaseException:
            with self.graph_change("close"):
                self.nodes.pop(node.node_name, None)
                node.close()
                self._forget_own_children(node.detach_children(), created)
            raise

    def _forget_own_children(self, children: Iterable[BlockNode],
                             created: list[BlockNode]) -> None:
        """Close the inline children of a node that failed to open which nothing
        else holds: their last reference goes inside the caller's graph change
        (QEMU's deferred unref runs in the bottom halves its wrunlock polls)."""
        for child in children:
            if child in created and not child.parent_nodes and not child.job_users:
                self._forget(child)

    def _open_named(self, cls: type[BlockNode], options: dict,
                    created: list[BlockNode], flat: dict,
                    default_discard: str | None) -> BlockNode:
        # QEMU opens a format driver's protocol child before naming the format node
        # (and before bdrv_open_common checks the generic options); other drivers
        # are checked and named (and listed) before they open their children.
        # Error precedence, generated names and the node list order follow from that.
        named_first = not cls.is_format
        if named_first:
            node_name, auto_named = self._claim_name(options.get("node-name"))
            self.nodes[node_name] = None  # type: ignore[assignment]  # keeps list position
        try:
            children = self._open_children(cls, options, created, flat)
            through_backend = cls.is_format and bool(children)
            if through_backend:
                self.graph_changes("backend-insert")
            try:
                if not named_first:
                    check_generic_options(options, default_discard)
                    node_name, auto_named = self._claim_name(options.get("node-name"))
                if cls.is_format:
                    self.graph_changes(*("attach-child" for _ in children))
                node = self._construct(cls, node_name, options, children, auto_named, flat)
                _mark_inherited(node, options, children)
            except BaseException:
                if through_backend:
                    # The temporary BlockBackend held the last reference to the
                    # file child the failed open dropped.
                    with self.graph_change("backend-remove"):
                        self._forget_own_children(children.values(), created)
                raise
            if through_backend:
                self.graph_changes("backend-remove")
        except BaseException:
            if named_first:
                del self.nodes[node_name]
            raise
        self.nodes[node_name] = node
        return node

    def _construct(self, cls: type[BlockNode], node_name: str, options: dict,
                   children: dict[str, BlockNode], auto_named: bool,
                   flat: dict) -> BlockNode:
        own_options = {k: v for k, v in options.items() if k not in cls.child_roles}
        node = cls(self, node_name, own_options, children, auto_named)
        node.flat_options = flat
        try:
            node.open()
        except BaseException:
            with self.graph_change("open-failed"):
                node.detach_children()
            raise
        return node

    def _open_children(self, cls: type[BlockNode], options: dict,
                       created: list[BlockNode], flat: dict) -> dict[str, BlockNode]:
        children: dict[str, BlockNode] = {}
        for role in cls.child_roles:
            if role in options:
                child_flat = extract_child_options(flat, role)
                children[role] = self._child(options[role], options, created, child_flat)
                if not cls.is_format:
                    # bdrv_open_child: a protocol driver attaches each child it opens.
                    self.graph_changes("attach-child")
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
        inherited = parent_options.get("read-only") and "read-only" not in child_options
        if inherited:
            child_options["read-only"] = True
        # ... and auto-read-only the same way (bdrv_inherited_options).
        if "auto-read-only" in parent_options and "auto-read-only" not in child_options:
            child_options["auto-read-only"] = parent_options["auto-read-only"]
        node = self._open(child_options, created, flat, inline_child=True)
        if inherited:
            # Not the user's own choice: a reopen read-write takes it along.
            node.read_only_inherited = True
        return node

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

    def skip_generated_names(self, count: int) -> None:
        """Nodes QEMU opens and drops inside one operation (an image creation's
        temporary nodes) use up generated names; later names count on from there."""
        self._auto_name_counter += count

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
        if self.nodes.get(node.node_name) is node and not node.monitor_owned \
                and not node.parent_nodes and not node.job_users and not node.backend_users:
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

        Parents of ``child`` move to the filter (QEMU's bdrv_append); a qmpjobd
        job only filters root nodes, so only exports (BlockBackends) move.
        """
        name, auto_named = self._claim_name(node_name)
        node = cls(self, name, {"driver": cls.driver}, {cls.child_roles[0]: child}, auto_named)
        with self.graph_change("append"):
            node.open()
            self.nodes[name] = node
            _move_backends(child, node)
        permissions.refresh(self, may_fail=False)
        return node

    def drop_filter(self, node: BlockNode, backends_to: BlockNode | None = None) -> None:
        """Remove an implicit filter inserted by ``insert_filter``: its parents move
        back to its child (exports: to ``backends_to`` if given, a mirror's pivot
        target), then its last reference goes. Dropping it twice is a no-op (a
        job's early failure and its caller may both ask)."""
        if self.nodes.get(node.node_name) is not node:
            return
        with self.graph_change("drop-filter"):
            destination = backends_to or node.backing_node() or node.file_child
            if destination is not None:
                _move_backends(node, destination)
            self.nodes.pop(node.node_name, None)
            children = node.detach_children()
        with self.graph_change("close"):
            node.close()
            # A child the daemon opened for a job (a drive-backup target) whose
            # last reference was the filter's goes inside the filter's close.
            for child in children:
                if child.release_when_unused:
                    self.release_implicit(child)
        permissions.refresh(self, may_fail=False)

    def replace_node(self, old: BlockNode, new: BlockNode, keep: BlockNode | None = None) -> None:
        """Point every parent of ``old`` (except ``keep``) at ``new`` (mirror pivot)."""
        self.graph_changes("replace-node")
        for parent in list(old.parent_nodes):
            if parent is keep:
                continue
            for role, child in list(parent.children.items()):
                if child is old:
                    parent.children[role] = new
            old.parent_nodes.remove(parent)
            new.parent_nodes.append(parent)
        _move_backends(old, new)
        permissions.refresh(self, may_fail=False)

    def move_exports(self, old: BlockNode, new: BlockNode) -> None:
        """The exports on ``old`` (BlockBackends that are not jobs) now use ``new``."""
        _move_backends(old, new)

    # --- external snapshots (bdrv_append) -------------------------------------------

    @staticmethod
    def set_backing(overlay: BlockNode, backing: BlockNode | None) -> None:
        """bdrv_set_backing_hd: make ``backing`` (None: nothing) the COW child of
        ``overlay``, listed first as QEMU lists the newest child, with the
        blocker a backing link puts on its child. The image header is not touched."""
        old = overlay.children.get("backing")
        if old is not backing:
            check_link_unfrozen(overlay, "backing")
        if old is not None:
            del overlay.children["backing"]
            if overlay in old.parent_nodes:
                old.parent_nodes.remove(overlay)
            old.remove_blockers(overlay)
        if backing is not None:
            overlay.children = {"backing": backing, **overlay.children}
            backing.parent_nodes.append(overlay)
            backing.add_blocker(overlay, f"node is used as backing hd of '{overlay.node_name}'")
        overlay.backing_linked()

    def append_overlay(self, overlay: BlockNode, node: BlockNode) -> Any:
        """bdrv_append: ``node`` becomes the backing of ``overlay`` and ``overlay``
        takes ``node``'s place for every parent (parent nodes, and the exports
        that reach it through a BlockBackend of their own). Returns the undo,
        QEMU's abort path: the backing link goes and every moved parent returns."""
        if reaches(node, overlay):
            raise QMPError(f"Making '{node.node_name}' a backing child of "
                           f"'{overlay.node_name}' would create a cycle")
        with self.graph_change("append"):
            self.set_backing(overlay, node)
            moved_parents = self._move_parents(node, overlay, keep=overlay)
            moved_backends = _move_backends(node, overlay)
        permissions.refresh(self, may_fail=False)

        def undo() -> None:
            self.set_backing(overlay, None)
            with self.graph_change("replace-node"):
                for parent in moved_parents:
                    _repoint(parent, overlay, node)
                _move_backends(overlay, node, only=moved_backends)
            permissions.refresh(self, may_fail=False)

        return undo

    @staticmethod
    def _move_parents(old: BlockNode, new: BlockNode, keep: BlockNode) -> list[BlockNode]:
        moved = [parent for parent in old.parent_nodes if parent is not keep]
        for parent in moved:
            _repoint(parent, old, new)
        return moved

    # --- filters above inner nodes (block-stream, block-commit) ---------------------

    def insert_filter_above(self, cls: type[BlockNode], node_name: str | None,
                            child: BlockNode, options: dict | None = None,
                            change: str = "insert-node") -> BlockNode:
        """bdrv_insert_node / bdrv_append of a job's filter: a new node of ``cls``
        above ``child`` that takes over ``child``'s parent nodes (their backing
        blockers move with them) and its exports. The filter is the newest node."""
        name, auto_named = self._claim_name(node_name)
        node = cls(self, name, {"driver": cls.driver, **(options or {})},
                   {cls.child_roles[0]: child}, auto_named)
        with self.graph_change(change):
            node.open()
            self.nodes[name] = node
            for parent in newest_first([p for p in child.parent_nodes if p is not node]):
                self.relink_child(parent, child, node)
            _move_backends(child, node)
        return node

    def join_drained_sections(self, node: BlockNode, child: BlockNode) -> None:
        """``node``, a new parent of ``child``, is quiesced by every open drained
        section that quiesces ``child`` (QEMU drains a parent whose new child is
        drained), so a job attaching to ``node`` meanwhile pauses at once."""
        for _key, quiesced in self._drained_sections:
            if child in quiesced and node not in quiesced:
                quiesced.append(node)
                node.quiesce_counter += 1

    def relink_child(self, parent: BlockNode, old: BlockNode, new: BlockNode) -> None:
        """``parent``'s links to ``old`` now go to ``new``, in place (QEMU's
        bdrv_replace_child); a backing blocker ``parent`` put on ``old`` moves too.
        On ``new`` it is the newest (QEMU detaches the child and attaches it again,
        and the attach puts its blocker at the head): "is busy" names ``parent``."""
        _repoint(parent, old, new)
        moved = [b for b in old.blockers if b.owner is parent]
        if moved:
            old.remove_blockers(parent)
            new.blockers[:0] = moved

    def remove_filter_from_chain(self, node: BlockNode) -> None:
        """The parents of filter ``node`` (exports too) go back to its child; the
        filter keeps its own child link and stays listed (a job holding it frees
        it later)."""
        child = node.backing_node() or node.file_child
        for parent in newest_first(node.parent_nodes):
            self.relink_child(parent, node, child)
        if child is not None:
            _move_backends(node, child)

    def forget_node(self, node: BlockNode) -> None:
        """Drop a node nothing references any more (and the children only it held)."""
        if self.nodes.get(node.node_name) is node:
            self._forget(node)

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
        if node.parent_nodes or node.job_users or node.holders:
            raise QMPError(f"Block device {node_name} is in use")
        self._forget(node)

    def _forget(self, node: BlockNode) -> None:
        """Drop ``node``; children only it held go with it (QEMU's refcounting).

        One close per node, parent first; where a close holds its section (10.1+)
        the children's closes happen inside the parent's."""
        with self.graph_change("close"):
            self.nodes.pop(node.node_name, None)
            node.close()
            for child in node.detach_children():
                if not child.monitor_owned and not child.parent_nodes and not child.job_users:
                    self._forget(child)
        # Edges went away: locks of the nodes that stay loosen.
        permissions.refresh(self, may_fail=False)

    def close_all(self) -> None:
        """Close every node at exit, parents first, as QEMU's bdrv_close_all does
        once the jobs are gone: what a format keeps in memory (qcow2 metadata,
        persistent dirty bitmaps) reaches the image. A node a job still uses
        (one that did not stop in time) is left open, with what lies below it."""
        while True:
            roots = [node for node in self.nodes.values()
                     if not node.parent_nodes and not node.job_users]
            if not roots:
                return
            for node in roots:
                if node.node_name in self.nodes:
                    self._forget(node)

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
        wait_until_quiet(self.jobs.poll_while, lambda: self._drain_busy(quiesced),
                         lambda: [job for node in quiesced for job in node.job_users])

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

    # --- graph changes (QEMU's block-graph write lock) ----------------------------

    def graph_change(self, change: str) -> contextlib.AbstractContextManager[None]:
        """``with graph.graph_change("close"): ...`` around the qmpjobd equivalent of
        a QEMU graph change: a PULSE comes before the body, a HELD section is open
        across it, a DRAIN_ALL comes before it; NONE does nothing."""
        kind = self.section_kind(change)
        if kind is SectionKind.NONE:
            return _NO_SECTION
        if kind is SectionKind.DRAIN_ALL:
            self.drained_begin(None)
            self.drained_end(None)
            return _NO_SECTION
        return self._write_locked(kind)

    @contextlib.contextmanager
    def _write_locked(self, kind: SectionKind) -> Iterator[None]:
        """bdrv_graph_wrlock[_drained] ... bdrv_graph_wrunlock around the body."""
        if kind is SectionKind.HELD:
            self.drained_begin(None)
        else:
            self.drain_pulse()
        try:
            yield
        finally:
            # bdrv_graph_wrunlock runs one pass of bottom halves (aio_bh_poll) for
            # the deferred unrefs; whatever else is due then runs too, such as
            # another job's completion (QEMU 10.0 finishes a second backup of a
            # transaction inside the first one's clean-up this way).
            self.jobs.main_loop_pass()
            if kind is SectionKind.HELD:
                self.drained_end(None)

    def graph_changes(self, *changes: str) -> None:
        """Graph changes with nothing of qmpjobd's inside them, one after another."""
        for change in changes:
            with self.graph_change(change):
                pass

    def graph_operation(self, operation: str) -> None:
        """A fixed sequence of graph changes (``qmpjobd.block.drain.OPERATIONS``)."""
        self.graph_changes(*operation_changes(operation))

    def drain_pulse(self) -> None:
        """bdrv_graph_wrlock's drain: quiesce every node, pausing every job that uses
        one, then undo it all, without running the main loop in between.

        Pauses come first and resumes second, both in node order, so a job pauses at
        its first node and resumes at its last. A job already paused (by an outer
        section or by its user) shows nothing, and a busy job (inside a request) is
        not entered, so it shows nothing either.
        """
        quiesced = self._drain_closure(None)
        for node in quiesced:
            node.quiesce_counter += 1
            for job in list(node.job_users):
                self.pause_job_for_drain(job)
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

    def artefact_drain(self, nodes: Iterable[BlockNode]) -> contextlib.AbstractContextManager[None]:
        """A drained section of ``nodes`` that QEMU takes only to quiesce them (a
        reopen, a BlockBackend's blk_drain): nothing when drain artefacts are off."""
        return self.drained(nodes) if self.shows_drain_artefacts else _NO_SECTION

    def _drain_closure(self, nodes: Iterable[BlockNode] | None) -> list[BlockNode]:
        if nodes is None:
            # A name claimed by a node still opening holds None (its list place).
            return [node for node in self.nodes.values() if node is not None]
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


_NO_SECTION: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


def _mark_inherited(node: BlockNode, options: dict, children: dict[str, BlockNode]) -> None:
    """QEMU's inherits_from: a child opened from inline options belongs to the node
    that opened it (blockdev-reopen reopens it with that parent's sub-options);
    a child named by reference does not."""
    for role, child in children.items():
        if isinstance(options.get(role), dict):
            child.inherits_from = node


def inherits_from(child: BlockNode, parent: BlockNode) -> bool:
    """Was ``child`` opened as part of ``parent`` (bdrv_open_inherit)?"""
    return getattr(child, "inherits_from", None) is parent


def reaches(top: BlockNode, wanted: BlockNode) -> bool:
    """``wanted`` is ``top`` or lies below it through any child (bdrv_recurse_has_child)."""
    stack, seen = [top], set()
    while stack:
        node = stack.pop()
        if node is wanted:
            return True
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.children.values())
    return False


def newest_first(parents: list[BlockNode]) -> list[BlockNode]:
    """A node's parents in the order QEMU's bdrv_replace_node moves them: its
    list of parents, newest first (``parent_nodes`` is oldest first). Each moved
    parent goes to the head of the new node's list, so the order turns round,
    and so does the order of the backing blockers the parents put on it."""
    return parents[::-1]


def _repoint(parent: BlockNode, old: BlockNode, new: BlockNode) -> None:
    """Every child link of ``parent`` to ``old`` now goes to ``new``."""
    for role, child in parent.children.items():
        if child is old and frozen_count(parent, role):
            # bdrv_replace_node_noperm's refusal, before anything moved.
            raise QMPError(f"Cannot change '{role}' link to '{old.node_name}'")
    for role, child in list(parent.children.items()):
        if child is old:
            parent.children[role] = new
    if parent in old.parent_nodes:
        old.parent_nodes.remove(parent)
    new.parent_nodes.append(parent)


# --- frozen links (QEMU's BdrvChild.frozen, bdrv_freeze_backing_chain) ---------------
#
# A block-stream or block-commit freezes the links of the chain it works on; every
# link change goes through set_backing or _repoint (and blockdev-reopen asks
# check_link_unfrozen before it plans one), so those are the only checks. A job
# unfreezes its links just before its own final graph change, as QEMU does.

FrozenLink = tuple[BlockNode, str]


def frozen_count(parent: BlockNode, role: str) -> int:
    """How many jobs froze ``parent``'s ``role`` link (0: it may change)."""
    return getattr(parent, "frozen_links", {}).get(role, 0)


def check_link_unfrozen(parent: BlockNode, role: str) -> None:
    """bdrv_set_file_or_backing_noperm's refusal to touch a frozen link."""
    if frozen_count(parent, role):
        child = parent.children[role]
        raise QMPError(f"Cannot change frozen '{role}' link from "
                       f"'{parent.node_name}' to '{child.node_name}'")


def chain_links(top: BlockNode, stop: BlockNode | None) -> list[FrozenLink]:
    """The filter-or-COW links from ``top`` down to (and into) ``stop``; to the
    bottom of the chain when ``stop`` is None or not below ``top``."""
    links: list[FrozenLink] = []
    node = top
    while node is not stop:
        child = node.filter_or_cow_child()
        if child is None:
            break
        role = "backing" if node.children.get("backing") is child else \
            next(r for r, c in node.children.items() if c is child)
        links.append((node, role))
        node = child
    return links


def freeze_chain(top: BlockNode, stop: BlockNode | None) -> list[FrozenLink]:
    """bdrv_freeze_backing_chain(top, stop): refuse if a link is frozen already
    (bdrv_is_backing_chain_frozen's text), else freeze them all; returns the
    links for ``unfreeze_links``."""
    links = chain_links(top, stop)
    for parent, role in links:
        if frozen_count(parent, role):
            raise QMPError(f"Cannot change '{role}' link from '{parent.node_name}' "
                           f"to '{parent.children[role].node_name}'")
    for parent, role in links:
        counts = parent.__dict__.setdefault("frozen_links", {})
        counts[role] = counts.get(role, 0) + 1
    return links


def unfreeze_links(links: list[FrozenLink]) -> None:
    """Undo ``freeze_chain`` (the caller clears its list: unfreezing is once)."""
    for parent, role in links:
        counts = parent.__dict__.get("frozen_links", {})
        if counts.get(role, 0) > 1:
            counts[role] -= 1
        else:
            counts.pop(role, None)


def _move_backends(old: BlockNode, new: BlockNode, only: list | None = None) -> list:
    """Hand the exports holding ``old`` through a BlockBackend over to ``new``
    (jobs keep their nodes: a node a job uses is busy for a snapshot anyway)."""
    moved = [user for user in old.backend_users
             if user not in old.job_users and (only is None or user in only)]
    for user in moved:
        old.backend_users.remove(user)
        new.backend_users.append(user)
        if getattr(user, "node", None) is old:
            user.node = new
    return moved


def check_generic_options(options: dict, default_discard: str | None = None) -> None:
    """Checks QEMU makes on BlockdevOptions members common to every driver
    (``default_discard``: what an absent ``discard`` means for this node)."""
    if options.get("detect-zeroes") == "unmap" \
            and options.get("discard", default_discard) != "unmap":
        raise QMPError("setting detect-zeroes to unmap is not allowed without "
                       "setting discard operation to unmap")
    if options.get("force-share") and not options.get("read-only"):
        raise QMPError("force-share=on can only be used with read-only images")
