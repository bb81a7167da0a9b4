"""x-debug-query-block-graph and blockdev-reopen.

blockdev-reopen follows QEMU's bdrv_reopen_multiple: every element is looked up
first, then each is prepared (its new options checked against the old ones, child
links resolved) without changing anything, then all are applied together and the
graph's permissions (and image locks) refreshed; any failure puts every node back as
it was. What can change: ``read-only``, ``auto-read-only``, ``discard``,
``detect-zeroes``, ``cache.*`` on every node; ``offset``/``size`` of raw; qcow2's
runtime options (``lazy-refcounts``, the cache sizes, ``pass-discard-*``, ...);
``backing`` (a node name or null) of qcow2 and ``file`` (a node name) of formats.
Anything else must be given unchanged (``Cannot change the option '...'``) and
may not be left out (``Option '...' cannot be reset to its default value``).
Inline options of a child reopen that child if the node opened it itself (QEMU's
inherits_from; it also inherits read-only and auto-read-only); for any other child
they are options that cannot change. ``node-name`` may be left out but not changed,
and QEMU compares it with the options the node was last opened or reopened with.
A child that a changed link no longer reaches goes with its last reference.

The graph reply is built the way QEMU's bdrv_get_xdbg_block_graph walks it:
BlockBackends first (in creation order, each with its ``root`` edge), then block
jobs (newest first, each job's edges newest first), then every node in list
order with its children (newest first). A vertex gets its id the first time the
walk meets it, counting from 1; QEMU prepends every vertex and edge to its lists,
so both lists come out in the reverse of the walk.
"""

from __future__ import annotations

from typing import Any

import contextlib
from dataclasses import dataclass, field

from qmpjobd.block import permissions as P
from qmpjobd.block.formats.qcow2.header import check_runtime_options
from qmpjobd.block.formats.qcow2.image import Options, check_encryption
from qmpjobd.block.graph import check_generic_options, check_link_unfrozen, inherits_from, reaches
from qmpjobd.block.node import BlockNode, flatten_options
from qmpjobd.block.personality import QEMU_OPT_SIZE_RANGE_REWORDED
from qmpjobd.block.qjson import qdict_order
from qmpjobd.commands import Context, command
from qmpjobd.errors import QMPError


class _GraphBuilder:
    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self.nodes: list[dict] = []
        self.edges: list[dict] = []

    def vertex_id(self, thing: Any) -> int:
        key = id(thing)
        if key not in self.ids:
            self.ids[key] = len(self.ids) + 1
        return self.ids[key]

    def add_vertex(self, thing: Any, kind: str, name: str) -> None:
        self.nodes.append({"id": self.vertex_id(thing), "type": kind, "name": name})

    def add_edge(self, parent: Any, edge: Any) -> None:
        parent_id = self.vertex_id(parent)
        self.edges.append({"parent": parent_id, "child": self.vertex_id(edge.node),
                           "name": edge.name, "perm": P.qapi_perm_list(edge.perm),
                           "shared-perm": P.qapi_perm_list(edge.shared)})

    def result(self) -> dict:
        return {"nodes": self.nodes[::-1], "edges": self.edges[::-1]}


def block_graph(graph: Any, jobs: list) -> dict:
    """XDbgBlockGraph of ``graph`` with ``jobs`` (newest first, as the manager keeps them)."""
    nodes, parents, _ = P.compute(graph)
    builder = _GraphBuilder()
    users = P.user_edges(graph)
    # One vertex per BlockBackend: a backend's owner may hold several nodes
    # (never in qmpjobd) but each UserEdge of kind block-backend is one backend.
    for edge in users:
        if edge.kind == "block-backend":
            builder.add_vertex(edge, "block-backend", "")
            builder.add_edge(edge, edge)
    for job in jobs:
        if not getattr(job, "is_block_job", False):
            continue
        builder.add_vertex(job, "block-job", job.id if job.id is not None else "")
        own = [e for e in users if e.kind == "block-job" and e.owner is job]
        # QEMU walks a job's edges newest first.
        for edge in sorted(own, key=P.job_edge_rank, reverse=True):
            builder.add_edge(job, edge)
    listed = [n for n in graph.nodes.values() if n is not None]
    for node in listed:
        builder.add_vertex(node, "block-driver", node.node_name)
        for name, child in node.children.items():
            edge = _node_edge(parents, node, name, child)
            builder.add_edge(node, edge)
    return builder.result()


def _node_edge(parents: dict, node: Any, name: str, child: Any) -> Any:
    for edge in parents.get(id(child), ()):
        if isinstance(edge, P.NodeEdge) and edge.parent is node and edge.name == name:
            return edge
    return P.NodeEdge(node, name, child)


@command("x-debug-query-block-graph")
def x_debug_query_block_graph(ctx: Context, args: dict) -> dict:
    return block_graph(ctx.daemon.graph, list(ctx.daemon.jobs.jobs))


# --- blockdev-reopen -----------------------------------------------------------------

# bdrv_reset_options_allowed's common options: every driver handles them in
# bdrv_reopen_prepare, so they may be changed or left out.
COMMON_OPTIONS = ("node-name", "discard", "cache.direct", "cache.no-flush", "read-only",
                  "auto-read-only", "detect-zeroes")
# Driver options a reopen may change or reset (QEMU's BlockDriver.mutable_opts).
MUTABLE_OPTIONS: dict[str, tuple[str, ...]] = {
    "file": ("x-check-cache-dropped", "drop-cache"),
    "raw": ("offset", "size"),
    "qcow2": ("lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
              "pass-discard-other", "discard-no-unref", "overlap-check", "cache-size",
              "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
              "cache-clean-interval"),
}
# Drivers with a reopen step at all (the rest: "does not support reopening files";
# QEMU's copy-on-read filter has none, seen on 7.2, 10.0 and 11.1).
REOPENABLE = frozenset({"file", "raw", "qcow2", "null-co", "null-aio", "blkdebug"})
# Generic options a reopen rewrites in the node's stored options.
_GENERIC_KEYS = ("read-only", "auto-read-only", "discard", "detect-zeroes", "cache")
_KEPT_WHEN_OMITTED = ("discard",)


@dataclass
class _Plan:
    """One node's reopen, prepared: what it becomes, and how to undo it."""

    node: Any
    options: dict
    read_only: bool
    children: dict                       # role -> node (the new set)
    old_options: dict = field(default_factory=dict)
    old_read_only: bool = False
    old_children: dict = field(default_factory=dict)
    applied: bool = False


def _mutable(node: Any, key: str) -> bool:
    allowed = MUTABLE_OPTIONS.get(node.driver, ())
    return any(key == name or key.startswith(name + ".") for name in allowed)


def _common(key: str) -> bool:
    return key in COMMON_OPTIONS or key == "cache"


def _own_flat(node: Any, options: dict) -> dict:
    roles = set(node.child_roles) | {"backing"}
    return flatten_options({k: v for k, v in options.items() if k not in roles})


def _reopen_flat(node: Any, options: dict) -> dict:
    """The options a node's own reopen checks (bdrv_reopen_prepare), flattened:
    its own, plus the child options nothing else takes. ``file`` and ``backing``
    given as a node name (or null) are links the reopen may change; the inline
    options of a child the node opened itself go to that child's reopen; a child
    reference that names the current child is allowed. What is left (inline
    options of a child opened elsewhere, another node for a link that cannot
    change) must equal what the node was opened with, which it never does."""
    own = dict(options)
    for role in set(node.child_roles) | {"backing"}:
        if role not in own:
            continue
        ref, child = own.pop(role), node.children.get(role)
        if isinstance(ref, dict):
            if child is None or not inherits_from(child, node):
                own[role] = ref
        elif role in ("file", "backing"):
            continue
        elif child is None or ref != child.node_name:
            own[role] = ref
    return flatten_options(own)


def _lookup_child(graph: Any, name: str) -> Any:
    child = graph.find(name)
    if child is None:
        raise QMPError(f"Cannot find device='' nor node-name='{name}'")
    return child


class _Reopen:
    """The queue of one blockdev-reopen (QEMU's BlockReopenQueue)."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.plans: list[_Plan] = []

    def queue(self, node: Any, options: dict, inherited: "dict | None" = None) -> None:
        if any(plan.node is node for plan in self.plans):
            return
        # bdrv_inherited_options: what the child leaves out comes from its parent.
        options = {**(inherited or {}), **options}
        plan = _Plan(node, options, bool(options.get("read-only", False)), {})
        self.plans.append(plan)
        # Children come after their parent in the queue (bdrv_reopen_queue_child).
        for role, child in node.children.items():
            ref = options.get(role)
            if isinstance(ref, dict):
                # Only a child the node opened itself takes its inline options
                # (bdrv_reopen_queue_child skips the others: see _reopen_flat).
                if inherits_from(child, node):
                    self.queue(child, dict(ref), _inherited_options(options, plan.read_only))
            elif role != "backing" and (ref is None and role not in options
                                        or ref == child.node_name) \
                    and _inherits_read_only(node, role, child):
                # A child the options leave alone (or name as it is) follows the
                # parent's read-only state when it was opened with the parent
                # without a read-only of its own (QEMU's inherited options). One
                # named as it is keeps its old options (keep_old_opts), so only a
                # read-only the parent's options give reaches it.
                read_only = plan.read_only
                if ref is not None and "read-only" not in options:
                    read_only = child.read_only
                self.queue(child, _kept_options(child, read_only))

    # --- prepare: nothing changes yet ----------------------------------------------------

    def prepare(self) -> None:
        for plan in self.plans:
            self._prepare(plan)

    def _prepare(self, plan: _Plan) -> None:
        node, options = plan.node, plan.options
        check_generic_options({**{k: node.options[k] for k in _KEPT_WHEN_OMITTED
                                  if k in node.options}, **options})
        if node.driver not in REOPENABLE:
            raise QMPError(f"Block format '{node.driver}' used by node '{node.node_name}' "
                           "does not support reopening files")
        new_flat = _reopen_flat(node, options)
        old_flat = _own_flat(node, node.options)
        for key in qdict_order(list(old_flat)):
            if key not in new_flat and not _common(key.split(".")[0]) \
                    and key not in COMMON_OPTIONS and not _mutable(node, key):
                raise QMPError(f"Option '{key}' cannot be reset to its default value")
        if node.driver == "raw":
            _check_raw_window(node, options)
        elif node.driver == "qcow2" and getattr(node, "image", None) is not None:
            # qcow2_reopen_prepare checks the runtime options as the open does.
            check_runtime_options(node.image.header, options,
                                  self.graph.personality.has(QEMU_OPT_SIZE_RANGE_REWORDED))
            encrypt = options.get("encrypt")
            if isinstance(encrypt, dict):
                check_encryption(node.image.header, Options(encrypt_format=encrypt.get("format")))
        plan.children = dict(node.children)
        self._prepare_backing(plan)
        self._prepare_file(plan)
        for key in qdict_order(list(new_flat)):
            # node-name may be left out, but not changed: it is compared with the
            # name the node's options hold (none once a reopen left it out).
            if key != "node-name" and (key in COMMON_OPTIONS or _common(key.split(".")[0])
                                       or _mutable(node, key)):
                continue
            if key not in old_flat or old_flat[key] != new_flat[key]:
                raise QMPError(f"Cannot change the option '{key}'")

    def _prepare_backing(self, plan: _Plan) -> None:
        node, options = plan.node, plan.options
        supports_backing = node.driver == "qcow2"
        if supports_backing and "backing" not in options:
            header = getattr(getattr(node, "image", None), "header", None)
            if node.children.get("backing") is not None or \
                    getattr(header, "backing_file", None):
                raise QMPError(f"backing is missing for '{node.node_name}'")
            return
        if "backing" not in options:
            return
        ref = options["backing"]
        old = node.children.get("backing")
        if isinstance(ref, dict):
            return
        new = None if ref is None else _lookup_child(self.graph, ref)
        if new is old:
            return
        if old is not None and getattr(old, "implicit", False):
            # bdrv_reopen_parse_file_or_backing: naming what lies below an
            # implicit job filter keeps the link; anything else is refused.
            if new is not None and skip_implicit_filters(old) is new:
                return
            raise QMPError(f"Cannot replace implicit backing child of {node.node_name}")
        if not supports_backing:
            raise QMPError(f"Driver '{node.driver}' of node '{node.node_name}' does not "
                           "support backing files")
        check_link_unfrozen(node, "backing")
        if new is not None and reaches(new, node):
            raise QMPError(f"Making '{new.node_name}' a backing child of "
                           f"'{node.node_name}' would create a cycle")
        if new is None:
            plan.children.pop("backing", None)
        else:
            plan.children["backing"] = new

    def _prepare_file(self, plan: _Plan) -> None:
        node, options = plan.node, plan.options
        ref = options.get("file")
        if "file" not in node.child_roles or not isinstance(ref, str):
            return
        new = _lookup_child(self.graph, ref)
        if reaches(new, node):
            raise QMPError(f"Making '{new.node_name}' a file child of "
                           f"'{node.node_name}' would create a cycle")
        old = node.children.get("file")
        if new is old:
            return
        if old is not None and getattr(old, "implicit", False):
            if skip_implicit_filters(old) is new:
                return
            raise QMPError(f"Cannot replace implicit file child of {node.node_name}")
        # bdrv_set_file_or_backing_noperm: a job's frozen link stays.
        check_link_unfrozen(node, "file")
        plan.children["file"] = new

    # --- apply, all or nothing -------------------------------------------------------------

    def apply(self) -> None:
        try:
            # Children first: a format reopened read-write needs a writable file.
            for plan in reversed(self.plans):
                self._apply(plan)
            P.refresh(self.graph, made_read_only=[
                plan.node for plan in self.plans if plan.read_only and not plan.old_read_only])
        except BaseException:
            for plan in self.plans:
                self._undo(plan)
            P.refresh(self.graph, may_fail=False)
            raise
        for plan in self.plans:
            self._drop_replaced(plan)

    def _drop_replaced(self, plan: _Plan) -> None:
        """A child a link no longer reaches goes with its last reference, as in
        QEMU's reopen commit (a child the parent opened inline, say)."""
        for role, child in plan.old_children.items():
            if plan.node.children.get(role) is child or child.monitor_owned:
                continue
            if not child.parent_nodes and not child.job_users and not child.backend_users:
                self.graph.forget_node(child)

    def _apply(self, plan: _Plan) -> None:
        node = plan.node
        plan.old_options, plan.old_read_only = dict(node.options), node.read_only
        plan.old_children = dict(node.children)
        # The new options first: a file node's descriptor follows auto-read-only.
        node.options = _merged_options(node, plan.options)
        try:
            _set_read_only(node, plan.read_only)
        except BaseException:
            node.options = plan.old_options
            raise
        plan.applied = True
        _relink(node, plan.children)
        if node.driver == "raw":
            _set_raw_window(node)

    def _undo(self, plan: _Plan) -> None:
        if not plan.applied:
            return
        node = plan.node
        _relink(node, plan.old_children)
        node.options = plan.old_options
        with contextlib.suppress(QMPError, OSError):
            _set_read_only(node, plan.old_read_only)
        if node.driver == "raw":
            _set_raw_window(node)
        plan.applied = False


def _inherited_options(parent_options: dict, read_only: bool) -> dict:
    """The options a child reopened with its parent takes from it unless it sets
    them itself: read-only, and auto-read-only where the parent gives it."""
    inherited: dict = {"read-only": read_only}
    if "auto-read-only" in parent_options:
        inherited["auto-read-only"] = parent_options["auto-read-only"]
    return inherited


def _inherits_read_only(parent: Any, role: str, child: Any) -> bool:
    # Only a child opened as part of the parent reopens with it (not one added
    # by its own blockdev-add, nor an overlay a snapshot put in place).
    return inherits_from(child, parent) and f"{role}.read-only" not in parent.flat_options


def skip_implicit_filters(node: Any) -> Any:
    """bdrv_skip_implicit_filters: the first node below ``node`` that no job
    inserted on its own."""
    while node is not None and getattr(node, "implicit", False):
        node = node.filter_or_cow_child()
    return node


def _check_raw_window(node: Any, options: dict) -> None:
    child = node.children.get("file")
    if child is None:
        return
    offset = options.get("offset", 0)
    if offset > child.size:
        raise QMPError(f"Offset ({offset}) cannot be greater than size of the "
                       f"containing file ({child.size})")
    if "size" in options:
        size = options["size"]
        if offset + size > child.size:
            raise QMPError(f"The sum of offset ({offset}) and size ({size}) has to be "
                           "smaller or equal to the  actual size of the containing file "
                           f"({child.size})")
        if size % 512:
            raise QMPError("Specified size is not multiple of 512")


def _set_raw_window(node: Any) -> None:
    """raw's offset and size after a reopen (checked in prepare)."""
    child_size = node.children["file"].size
    node.offset = node.options.get("offset", 0)
    node.has_size = "size" in node.options
    window = node.options["size"] if node.has_size else child_size - node.offset
    node.window = window
    node.size = -(-window // 512) * 512


def _merged_options(node: Any, new: dict) -> dict:
    """The node's stored options after the reopen: the new generic and mutable
    options, everything else as it was (children stay out, as at open)."""
    # discard lives in the node's open flags in QEMU: a reopen that leaves them
    # out keeps them. node-name is kept as the reopen gave it: one left out is gone
    # (and a later reopen that names the node again changes the option).
    merged = {k: v for k, v in node.options.items()
              if (k in new if k == "node-name" else
                  k in _KEPT_WHEN_OMITTED or (k not in _GENERIC_KEYS and not _mutable(node, k)))}
    for key, value in new.items():
        if key in node.child_roles or key == "backing":
            continue
        if key in _GENERIC_KEYS or _mutable(node, key):
            merged[key] = value
    return merged


def _relink(node: Any, children: dict) -> None:
    """Make ``children`` the node's child set, fixing every parent list and the
    backing blocker."""
    if children == node.children and all(a is b for a, b in
                                          zip(children.values(), node.children.values())):
        return
    for role, child in node.children.items():
        if children.get(role) is not child:
            if node in child.parent_nodes:
                child.parent_nodes.remove(node)
            if role == "backing":
                child.remove_blockers(node)
    for role, child in children.items():
        if node.children.get(role) is not child:
            child.parent_nodes.append(node)
            if role == "backing":
                child.add_blocker(node, f"node is used as backing hd of '{node.node_name}'")
    # QEMU attaches a new link at the head of the parent's child list (and an
    # undone change puts the old link back there too).
    changed = {r: c for r, c in children.items() if node.children.get(r) is not c}
    node.children = {**changed, **{r: c for r, c in children.items() if r not in changed}}
    node.backing_linked()


def _set_read_only(node: Any, read_only: bool) -> None:
    """Switch one node between read-only and read-write."""
    if hasattr(node, "reopen_fd"):
        # Also without a change of read-only: auto-read-only may change the mode.
        node.reopen_fd(read_only)
        return
    if node.read_only == read_only:
        return
    if node.driver == "qcow2":
        _reopen_qcow2_image(node, read_only)
    node.read_only = read_only


def _reopen_qcow2_image(node: Any, read_only: bool) -> None:
    """qcow2 between read-only and read-write: cached metadata written back
    when it stops being writable, the image opened again in the new mode."""
    from qmpjobd.block.drivers import qcow2 as Q

    from qmpjobd.block.formats.qcow2 import bitmaps as qcow2_bitmaps

    image = node.image
    if image is not None and not image.read_only:
        qcow2_bitmaps.before_read_only(node)
        Q.write_back(node, image, mark_clean=True)
    node.image = node.read_image(read_only)
    if not read_only:
        qcow2_bitmaps.after_read_write(node)
        from qmpjobd.block.formats.qcow2.repair import repair_if_dirty
        repair_if_dirty(node)


def reopen_nodes(graph: Any, entries: list) -> None:
    """blockdev-reopen of ``entries`` (each a full BlockdevOptions)."""
    job = _Reopen(graph)
    queued: dict[str, dict] = {}
    for options in entries:
        name = options.get("node-name")
        if name is None:
            raise QMPError("node-name not specified")
        node = graph.find(name)
        if node is None:
            raise QMPError(f"Failed to find node with node-name='{name}'")
        # A node named twice keeps its first place in the queue with the options
        # of both, the later ones winning (bdrv_reopen_queue_child joins them).
        queued[name] = _joined(queued[name], options) if name in queued else dict(options)
    for name, options in queued.items():
        job.queue(graph.find(name), options)
    nodes = [plan.node for plan in job.plans]
    # The nodes are drained while they change (bdrv_reopen_multiple), so the jobs
    # on them show QEMU's paused/running pair.
    # bdrv_reopen_multiple commits, or aborts, under the graph write lock (8.0+):
    # every job of the daemon sees it, whatever the reopen changes or refuses.
    with graph.artefact_drain(nodes):
        try:
            job.prepare()
        except QMPError:
            graph.graph_changes("reopen")
            raise
        try:
            job.apply()
        except QMPError:
            graph.graph_changes("reopen-refresh-failed")
            graph.graph_changes("reopen")
            raise
        graph.graph_changes("reopen")


@command("blockdev-reopen")
def blockdev_reopen(ctx: Context, args: dict) -> dict:
    reopen_nodes(ctx.daemon.graph, args["options"])
    return {}


def _joined(old: dict, new: dict) -> dict:
    """``new`` over ``old``, nested option groups joined key by key."""
    joined = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(joined.get(key), dict):
            joined[key] = _joined(joined[key], value)
        else:
            joined[key] = value
    return joined


def _kept_options(child: BlockNode, read_only: bool) -> dict:
    """A child reopened with the options it has (QEMU's keep_old_opts): its current
    backing link counts as given, also where it was opened without one (an overlay
    made by blockdev-snapshot-sync is opened with no backing, then linked)."""
    options = {**child.options, "read-only": read_only}
    backing = child.children.get("backing")
    if backing is not None and options.get("backing") is None:
        options["backing"] = backing.node_name
    return options
