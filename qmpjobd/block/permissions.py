"""Block permissions as QEMU's block layer has them (BLK_PERM_*), and the one checker.

Every edge of the block graph (a node's child, a job's hold on a node, a
BlockBackend of an export or a job) takes some permissions on the node below it and
shares some with the other users of that node. QEMU computes a node's edge to its
child from the node's *cumulative* permissions (what all its parents take, and what
all of them share) through the child's role; that rule is data here
(:data:`CHILD_ROLES`: driver and child name -> role and rule; :data:`JOB_EDGES`:
job type and attach position -> edge name and permissions; :data:`BACKEND_PERMS`).

:func:`refresh` recomputes every edge, top-down, and for each node in that order:

1. checks each pair of its parents (``Permission conflict on node ...``, QEMU's
   bdrv_parent_perms_conflict, most recently attached parent first);
2. refuses write permissions on a read-only node (``Block node is read-only``);
3. lets the node's driver apply them (the file driver takes its OFD lock bytes,
   :mod:`qmpjobd.block.locking`), all or nothing: a failure puts every lock back
   as it was.

Callers attach first, call :func:`refresh`, and undo their attach when it raises.
The values computed last are what ``x-debug-query-block-graph`` shows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from qmpjobd.errors import QMPError

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.graph import BlockGraph
    from qmpjobd.block.node import BlockNode

# BlockPermission bits (QEMU's BLK_PERM_*, in bit order).
CONSISTENT_READ = 0x1
WRITE = 0x2
WRITE_UNCHANGED = 0x4
RESIZE = 0x8
ALL = 0xF
BITS = (CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE)
# The QAPI BlockPermission names (x-debug-query-block-graph) and the words QEMU's
# error messages use (bdrv_perm_names), both in bit order.
QAPI_NAMES = ("consistent-read", "write", "write-unchanged", "resize")
HUMAN_NAMES = ("consistent read", "write", "write unchanged", "resize")

# bdrv_filter_default_perms: what a filter passes through to its child.
PASSTHROUGH = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE
UNCHANGED = ALL & ~PASSTHROUGH

# BdrvChildRole bits.
ROLE_DATA = 0x1
ROLE_METADATA = 0x2
ROLE_FILTERED = 0x4
ROLE_COW = 0x8
ROLE_PRIMARY = 0x10
ROLE_IMAGE = ROLE_DATA | ROLE_METADATA | ROLE_PRIMARY


def perm_names(perm: int) -> str:
    """QEMU's bdrv_perm_names: ``"write, resize"``."""
    return ", ".join(name for bit, name in zip(BITS, HUMAN_NAMES) if perm & bit)


def qapi_perm_list(perm: int) -> list[str]:
    """The BlockPermission list x-debug-query-block-graph shows: QEMU prepends
    each bit it finds, so the highest bit comes first."""
    return [name for bit, name in zip(BITS, QAPI_NAMES) if perm & bit][::-1]


# --- the rules (bdrv_default_perms and the drivers' bdrv_child_perm) -----------------

def filter_perms(node: "BlockNode", perm: int, shared: int) -> tuple[int, int]:
    """bdrv_filter_default_perms."""
    return perm & PASSTHROUGH, (shared & PASSTHROUGH) | UNCHANGED


def cow_perms(node: "BlockNode", perm: int, shared: int) -> tuple[int, int]:
    """bdrv_default_perms_for_cow: a backing file is only ever read, and may change
    under a parent that copes with changing data."""
    perm &= CONSISTENT_READ
    shared = (WRITE | RESIZE) if shared & WRITE else 0
    shared |= CONSISTENT_READ | WRITE_UNCHANGED
    if not node.active:
        shared |= WRITE | RESIZE
    return perm, shared


def storage_perms(node: "BlockNode", role: int, perm: int, shared: int,
                  writable: bool) -> tuple[int, int]:
    """bdrv_default_perms_for_storage: a format's file child."""
    perm, shared = filter_perms(node, perm, shared)
    if role & ROLE_METADATA:
        # Metadata may change even when the guest does not write.
        if writable:
            perm |= WRITE | RESIZE
        perm |= CONSISTENT_READ
        shared &= ~(WRITE | RESIZE)
    if role & ROLE_DATA:
        shared &= ~RESIZE
        if perm & WRITE_UNCHANGED:
            perm |= WRITE
        if perm & WRITE:
            perm |= RESIZE
    if not node.active:
        shared |= WRITE | RESIZE
    return perm, shared


def default_perms(node: "BlockNode", role: int, perm: int, shared: int) -> tuple[int, int]:
    """bdrv_default_perms, dispatching on the child's role."""
    if role & ROLE_FILTERED:
        return filter_perms(node, perm, shared)
    if role & ROLE_COW:
        return cow_perms(node, perm, shared)
    return storage_perms(node, role, perm, shared, writable=node_writable(node))


def node_writable(node: "BlockNode") -> bool:
    """bdrv_is_writable: opened read-write and active."""
    return not node.read_only and node.active


def raw_rule(node: "BlockNode", role: int, perm: int, shared: int) -> tuple[int, int]:
    """raw_child_perm: write and resize only when a parent wants them."""
    nperm, nshared = default_perms(node, role, perm, shared)
    nperm &= ~(WRITE | RESIZE)
    nperm |= perm & (WRITE | RESIZE)
    return nperm, nshared


def blkdebug_rule(node: "BlockNode", role: int, perm: int, shared: int) -> tuple[int, int]:
    """blkdebug_child_perm: take-child-perms / unshare-child-perms on top."""
    nperm, nshared = default_perms(node, role, perm, shared)
    nperm |= _perm_option(node, "take-child-perms")
    nshared &= ~_perm_option(node, "unshare-child-perms")
    return nperm, nshared


def _perm_option(node: "BlockNode", name: str) -> int:
    bits = 0
    for entry in node.options.get(name, ()) or ():
        if entry in QAPI_NAMES:
            bits |= BITS[QAPI_NAMES.index(entry)]
    return bits


def cor_rule(node: "BlockNode", role: int, perm: int, shared: int) -> tuple[int, int]:
    """cor_child_perm: copy-on-read writes unchanged data to its child."""
    passthrough = CONSISTENT_READ | WRITE | RESIZE
    nperm, nshared = perm & passthrough, (shared & passthrough) | (ALL & ~passthrough)
    if node.active:
        nperm |= WRITE_UNCHANGED
    return nperm, nshared


def cbw_rule(node: "BlockNode", role: int, perm: int, shared: int) -> tuple[int, int]:
    """cbw_child_perm: the target is written and never resized; the source is read
    consistently and nobody may write or resize it behind the filter's back."""
    if not role & ROLE_FILTERED:
        return WRITE, ALL & ~RESIZE
    nperm, nshared = default_perms(node, role, perm, shared)
    if node.parent_nodes or _has_users(node):
        nperm |= CONSISTENT_READ
        nshared &= ~(WRITE | RESIZE)
    return nperm, nshared


def mirror_top_rule(node: "BlockNode", role: int, perm: int, shared: int) -> tuple[int, int]:
    """bdrv_mirror_top_child_perm: nothing once the job stops; a commit's filter
    neither reads consistently nor blocks writes below it."""
    if getattr(node, "stopped", False):
        return 0, ALL
    nperm, nshared = default_perms(node, role, perm, shared)
    if getattr(node, "is_commit", False):
        nperm &= ~CONSISTENT_READ
        nshared |= WRITE
    return nperm, nshared


def nothing_rule(node: "BlockNode", role: int, perm: int, shared: int) -> tuple[int, int]:
    """commit_top / snapshot-access: no permission needed, everything shared."""
    return 0, ALL


def raw_file_role(node: "BlockNode") -> int:
    """raw without offset and size limits behaves as a filter of its file."""
    if node.options.get("offset") or "size" in node.options:
        return ROLE_DATA | ROLE_PRIMARY
    return ROLE_FILTERED | ROLE_PRIMARY


Rule = Callable[["BlockNode", int, int, int], "tuple[int, int]"]
RoleOf = Callable[["BlockNode"], int]


@dataclass(frozen=True)
class ChildRole:
    """How a driver uses one of its children: the BdrvChildRole and the rule."""

    role: "int | RoleOf"
    rule: Rule = default_perms

    def role_of(self, node: "BlockNode") -> int:
        return self.role(node) if callable(self.role) else self.role


# (driver, child name) -> ChildRole. A driver or child not listed falls back to
# _fallback_role (filters: filtered; formats: their file is data+metadata).
CHILD_ROLES: dict[tuple[str, str], ChildRole] = {
    ("raw", "file"): ChildRole(raw_file_role, raw_rule),
    ("qcow2", "file"): ChildRole(ROLE_IMAGE),
    ("qcow2", "backing"): ChildRole(ROLE_COW),
    ("blkdebug", "image"): ChildRole(ROLE_FILTERED | ROLE_PRIMARY, blkdebug_rule),
    ("copy-on-read", "file"): ChildRole(ROLE_FILTERED | ROLE_PRIMARY, cor_rule),
    ("copy-before-write", "file"): ChildRole(ROLE_FILTERED | ROLE_PRIMARY, cbw_rule),
    ("copy-before-write", "target"): ChildRole(ROLE_DATA, cbw_rule),
    ("mirror_top", "backing"): ChildRole(ROLE_FILTERED | ROLE_PRIMARY, mirror_top_rule),
    ("commit_top", "backing"): ChildRole(ROLE_FILTERED | ROLE_PRIMARY, nothing_rule),
    ("snapshot-access", "file"): ChildRole(ROLE_FILTERED | ROLE_PRIMARY, nothing_rule),
}


def _fallback_role(node: "BlockNode", child_name: str) -> ChildRole:
    if child_name == "backing" and not node.is_filter:
        return ChildRole(ROLE_COW)
    if node.is_filter:
        return ChildRole(ROLE_FILTERED | ROLE_PRIMARY)
    return ChildRole(ROLE_IMAGE)


def child_role(node: "BlockNode", child_name: str) -> ChildRole:
    return CHILD_ROLES.get((node.driver, child_name)) or _fallback_role(node, child_name)


# Jobs: the edges block_job_create ("main node") and block_job_add_bdrv add, by job
# type, in the order qmpjobd's job drivers attach them. A job attaching more nodes
# than listed gets (the last name, nothing taken, everything shared).
JOB_EDGES: dict[str, tuple[tuple[str, int, int], ...]] = {
    # mirror_start_job: the mirror_top filter, then the target, then the source.
    "mirror": (("main node", CONSISTENT_READ, CONSISTENT_READ | WRITE | WRITE_UNCHANGED),
               ("target", 0, ALL),
               ("source", 0, CONSISTENT_READ | WRITE | WRITE_UNCHANGED)),
    # backup_job_create: the copy-before-write filter, then the target.
    "backup": (("main node", 0, ALL), ("target", 0, ALL)),
}
DEFAULT_JOB_EDGE = ("main node", 0, ALL)
# The order QEMU attaches a job's edges in, where it differs from qmpjobd's (QEMU's
# mirror adds the source before the target); x-debug-query-block-graph lists it.
QEMU_JOB_EDGE_ORDER: dict[str, tuple[str, ...]] = {
    "mirror": ("main node", "source", "target"),
}


def job_edge_kind(job: Any) -> str:
    """The key of :data:`JOB_EDGES` for ``job``: its ``edge_kind`` where its edges
    are another job type's (an active commit's are a mirror's), else its type."""
    return getattr(job, "edge_kind", None) or getattr(job, "job_type", "")


def job_edge_rank(edge: "UserEdge") -> tuple[int, int]:
    """Sort key of a job's edges in QEMU's attach order."""
    order = QEMU_JOB_EDGE_ORDER.get(job_edge_kind(edge.owner), ())
    return (order.index(edge.name) if edge.name in order else len(order), edge.seq)

# BlockBackends the daemon creates for its own users: (perm, shared). An owner
# with a ``backend_perms(node)`` method (a mirror's or an active commit's
# target BlockBackend) says itself instead.
BACKEND_PERMS: dict[str, tuple[int, int]] = {
    # blk_exp_add: read (and write when writable); resizing is not shared.
    "export": (CONSISTENT_READ, CONSISTENT_READ | WRITE | WRITE_UNCHANGED),
    "writable-export": (CONSISTENT_READ | WRITE, CONSISTENT_READ | WRITE | WRITE_UNCHANGED),
    # mirror_start_job's target BlockBackend (MirrorJob.backend_perms; an
    # active commit's shares more).
    "mirror-target": (WRITE, WRITE_UNCHANGED),
    # stream_start's BlockBackend on its copy-on-read filter (it reads through it).
    "stream-filter": (CONSISTENT_READ, CONSISTENT_READ | WRITE | WRITE_UNCHANGED),
}


# --- edges and the per-graph registry --------------------------------------------------

@dataclass(eq=False)
class UserEdge:
    """An edge from something that is not a node: a job's BdrvChild or a
    BlockBackend's root child."""

    owner: Any              # the job or the BlockBackend's owner (an export, a job)
    kind: str               # "block-job" or "block-backend"
    name: str               # "main node", "target", "root", ...
    node: "BlockNode"
    perm: int
    shared: int
    seq: int = 0            # attach order, across the whole graph

    def describe(self) -> str:
        """bdrv_child_user_desc."""
        if self.kind == "block-job":
            return f"{self.owner.job_type} job '{self.owner.id}'"
        return "an unnamed block device"


@dataclass(eq=False)
class NodeEdge:
    """A node's child edge, with the permissions computed by the last refresh."""

    parent: "BlockNode"
    name: str
    node: "BlockNode"
    perm: int = 0
    shared: int = ALL
    seq: int = 0

    def describe(self) -> str:
        return f"node '{self.parent.node_name}'"


@dataclass
class Registry:
    """What the graph itself does not keep: user edges and attach order."""

    users: list[UserEdge] = field(default_factory=list)
    counter: Any = field(default_factory=lambda: itertools.count(1))
    # (id(parent), child name, id(child)) -> attach sequence of node edges.
    node_seq: dict[tuple[int, str, int], int] = field(default_factory=dict)
    # Backend owners found on node.backend_users without registering (exports):
    # (id(owner), id(node)) -> UserEdge, kept so their order stays stable.
    derived: dict[tuple[int, int], UserEdge] = field(default_factory=dict)
    # Edges of the last successful refresh, per child node.
    edges: dict[int, list[Any]] = field(default_factory=dict)


def registry_of(graph: "BlockGraph") -> Registry:
    registry = getattr(graph, "_permission_registry", None)
    if registry is None:
        registry = Registry()
        graph._permission_registry = registry  # type: ignore[attr-defined]
    return registry


def _has_users(node: "BlockNode") -> bool:
    graph = getattr(node, "graph", None)
    if graph is None:
        return False
    return any(edge.node is node for edge in registry_of(graph).users)


# --- attaching users ---------------------------------------------------------------------

def job_edge_spec(job: Any, position: int) -> tuple[str, int, int]:
    specs = JOB_EDGES.get(job_edge_kind(job), ())
    if position < len(specs):
        return specs[position]
    if specs:
        return (specs[-1][0], 0, ALL)
    return DEFAULT_JOB_EDGE if position == 0 else ("node", 0, ALL)


def attach_user(graph: "BlockGraph", node: "BlockNode", owner: Any, kind: str, name: str,
                perm: int, shared: int) -> UserEdge:
    """Add a job's or a BlockBackend's edge to ``node`` and check the graph; on a
    conflict the edge is gone again and QEMU's error is raised."""
    registry = registry_of(graph)
    edge = UserEdge(owner, kind, name, node, perm, shared, next(registry.counter))
    registry.users.append(edge)
    try:
        refresh(graph)
    except BaseException:
        registry.users.remove(edge)
        refresh(graph, may_fail=False)
        raise
    return edge


def attach_job_node(job: Any, node: "BlockNode", position: int,
                    spec: "tuple[str, int, int] | None" = None) -> None:
    """A block job's hold on ``node`` (block_job_add_bdrv)."""
    graph = getattr(node, "graph", None)
    if graph is None or not hasattr(graph, "nodes"):
        return
    name, perm, shared = spec or job_edge_spec(job, position)
    attach_user(graph, node, job, "block-job", name, perm, shared)


def attach_backend(graph: "BlockGraph", node: "BlockNode", owner: Any, kind: str) -> UserEdge:
    """A BlockBackend of ``owner`` on ``node`` with the permissions of
    :data:`BACKEND_PERMS` ``kind`` (an export, a mirror's target)."""
    perm, shared = BACKEND_PERMS[kind]
    return attach_user(graph, node, owner, "block-backend", "root", perm, shared)


def detach_edge(graph: "BlockGraph", edge: UserEdge) -> None:
    """Drop one user edge (a job's BlockBackend that goes before the job)."""
    registry = registry_of(graph)
    if edge in registry.users:
        registry.users.remove(edge)
        refresh(graph, may_fail=False)


def detach_owner(graph: "BlockGraph", owner: Any) -> None:
    """Drop every edge of ``owner`` (a job that ends, an export that goes)."""
    registry = registry_of(graph)
    before = len(registry.users)
    registry.users = [edge for edge in registry.users if edge.owner is not owner]
    if len(registry.users) != before:
        refresh(graph, may_fail=False)


def _backend_kind(owner: Any) -> str:
    job_type = getattr(owner, "job_type", None)
    if job_type == "mirror":
        return "mirror-target"
    if job_type == "stream":
        return "stream-filter"
    return "writable-export" if getattr(owner, "writable", False) else "export"


def _backend_perms(owner: Any, node: "BlockNode") -> tuple[int, int]:
    """(perm, shared) of ``owner``'s BlockBackend on ``node``."""
    own = getattr(owner, "backend_perms", None)
    perms = own(node) if own is not None else None
    return perms if perms is not None else BACKEND_PERMS[_backend_kind(owner)]


def _derived_backends(graph: "BlockGraph", nodes: Iterable["BlockNode"]) -> list[UserEdge]:
    """BlockBackends that their owners recorded only on ``node.backend_users``
    (exports, a mirror's target): edges made up for them, in first-seen order."""
    registry = registry_of(graph)
    registered = {(id(e.owner), id(e.node)) for e in registry.users if e.kind == "block-backend"}
    # A BlockBackend keeps its place among the others when a filter takes its
    # node over and when it goes back (QEMU's list of BlockBackends is in
    # creation order): an owner's edge on another node lends its sequence.
    by_owner = {id(e.owner): e for e in registry.derived.values()}
    alive: dict[tuple[int, int], UserEdge] = {}
    for node in nodes:
        for owner in getattr(node, "backend_users", ()):
            key = (id(owner), id(node))
            if key in registered:
                continue
            edge = registry.derived.get(key)
            perm, shared = _backend_perms(owner, node)
            if edge is not None and edge.owner is owner:
                edge.perm, edge.shared = perm, shared
            else:
                before = by_owner.get(id(owner))
                seq = before.seq if before is not None and before.owner is owner \
                    else next(registry.counter)
                edge = UserEdge(owner, "block-backend", "root", node, perm, shared, seq)
            alive[key] = edge
    registry.derived = alive
    return sorted(alive.values(), key=lambda e: e.seq)


def user_edges(graph: "BlockGraph") -> list[UserEdge]:
    """Every user edge of the graph, in attach order."""
    nodes = all_nodes(graph)
    edges = list(registry_of(graph).users) + _derived_backends(graph, nodes)
    alive = set(map(id, nodes))
    return sorted((e for e in edges if id(e.node) in alive), key=lambda e: e.seq)


# --- computing and applying ---------------------------------------------------------------

def all_nodes(graph: "BlockGraph") -> list["BlockNode"]:
    """The graph's nodes in list order, plus any reached through parents or children
    that are not listed yet (a format node still opening)."""
    seen: dict[int, BlockNode] = {}
    stack = [n for n in graph.nodes.values() if n is not None][::-1]
    order: list[BlockNode] = []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        order.append(node)
        stack.extend(reversed([*node.parent_nodes, *node.children.values()]))
    return order


def _topological(nodes: list["BlockNode"]) -> list["BlockNode"]:
    """Parents before children (QEMU's bdrv_topological_dfs)."""
    done: set[int] = set()
    order: list[BlockNode] = []

    def visit(node: "BlockNode") -> None:
        if id(node) in done:
            return
        done.add(id(node))
        for child in node.children.values():
            visit(child)
        order.append(node)

    for node in nodes:
        visit(node)
    return order[::-1]


def _node_seq(registry: Registry, parent: "BlockNode", name: str, child: "BlockNode") -> int:
    key = (id(parent), name, id(child))
    seq = registry.node_seq.get(key)
    if seq is None:
        seq = registry.node_seq[key] = next(registry.counter)
    return seq


def compute(graph: "BlockGraph") -> tuple[list["BlockNode"], dict[int, list[Any]],
                                          dict[int, tuple[int, int]]]:
    """Every edge's permissions. Returns the nodes (parents first), the parent
    edges of each node (most recent first) and each node's cumulative (perm, shared)."""
    registry = registry_of(graph)
    nodes = _topological(all_nodes(graph))
    parents: dict[int, list[Any]] = {id(n): [] for n in nodes}
    for edge in user_edges(graph):
        parents.setdefault(id(edge.node), []).append(edge)
    cumulative: dict[int, tuple[int, int]] = {}
    for node in nodes:
        edges = parents.get(id(node), [])
        perm, shared = 0, ALL
        for edge in edges:
            perm |= edge.perm
            shared &= edge.shared
        cumulative[id(node)] = (perm, shared)
        for name, child in node.children.items():
            spec = child_role(node, name)
            nperm, nshared = spec.rule(node, spec.role_of(node), perm, shared)
            if force_share(child):
                nshared = ALL
            edge = NodeEdge(node, name, child, nperm, nshared,
                            _node_seq(registry, node, name, child))
            parents.setdefault(id(child), []).append(edge)
    live = {(id(e.parent), e.name, id(e.node)) for edges in parents.values()
            for e in edges if isinstance(e, NodeEdge)}
    _forget_stale(registry, live)
    for edges in parents.values():
        edges.sort(key=lambda e: -e.seq)
    return nodes, parents, cumulative


def force_share(node: "BlockNode") -> bool:
    """The node's force-share: its own option, else inherited from the parent that
    opened it inline (QEMU copies force-share into inline children's options)."""
    if "force-share" in node.options:
        return bool(node.options["force-share"])
    return not node.monitor_owned and any(force_share(parent) for parent in node.parent_nodes)


def _forget_stale(registry: Registry, live: set) -> None:
    """Drop attach sequences of edges that are gone (ids may be reused)."""
    registry.node_seq = {k: v for k, v in registry.node_seq.items() if k in live}


def _conflict(node: "BlockNode", edges: list[Any]) -> "QMPError | None":
    """bdrv_parent_perms_conflict: the first pair (a, b) where b takes what a
    does not share."""
    for a in edges:
        for b in edges:
            if a is b or (b.perm & a.shared) == b.perm:
                continue
            name = node.node_name
            return QMPError(
                f"Permission conflict on node '{name}': permissions "
                f"'{perm_names(b.perm & ~a.shared)}' are both required by {b.describe()} "
                f"(uses node '{name}' as '{b.name}' child) and unshared by {a.describe()} "
                f"(uses node '{name}' as '{a.name}' child).")
    return None


def refresh(graph: "BlockGraph", may_fail: bool = True,
            made_read_only: Iterable["BlockNode"] = ()) -> None:
    """Recompute and apply every permission (see the module docstring).

    With ``may_fail`` False (after edges went away, which only loosens things)
    errors are not raised and every node gets what it can. ``made_read_only``: the
    nodes a reopen is turning read-only, whose refusal QEMU words differently.
    """
    reopened = {id(node) for node in made_read_only}
    nodes, parents, cumulative = compute(graph)
    prepared: list[BlockNode] = []
    try:
        for node in nodes:
            perm, shared = cumulative[id(node)]
            if may_fail:
                error = _conflict(node, parents.get(id(node), []))
                if error is not None:
                    raise error
                if perm & (WRITE | WRITE_UNCHANGED) and node.read_only:
                    if id(node) in reopened:
                        raise QMPError(f"Read-only block node '{node.node_name}' cannot "
                                       "support read-write users")
                    raise QMPError("Block node is read-only")
            apply = getattr(node, "prepare_permissions", None)
            if apply is not None:
                try:
                    apply(perm, shared)
                except QMPError:
                    if may_fail:
                        raise
                prepared.append(node)
    except BaseException:
        for node in prepared:
            node.abort_permissions()
        raise
    for node in prepared:
        node.commit_permissions()
    registry_of(graph).edges = parents


def edges_to(graph: "BlockGraph", node: "BlockNode") -> list[Any]:
    """The parent edges of ``node`` as the last refresh computed them."""
    return registry_of(graph).edges.get(id(node), [])


def check_new_parent(parent: "BlockNode") -> None:
    """A node attaching its children (called from a driver's open): check and apply
    the graph's permissions with the new edges in place."""
    graph = getattr(parent, "graph", None)
    if graph is not None and hasattr(graph, "nodes"):
        refresh(graph)
