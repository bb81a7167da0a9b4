"""The commit jobs (``block-commit``), both of type ``commit``.

**Inactive commit** (QEMU's block/commit.c, ``top`` below the active layer):

* Creation: the job is created on ``device``; a ``commit_top`` filter goes above
  ``top`` and takes over its parents (the overlay's backing child now points to
  it); ``top`` and every node down to the base ("intermediate node"), and the
  base ("base"), are attached and blocked. The intermediate nodes share writes
  but not consistent reads (other processes cannot read them: image locks),
  and the job's BlockBackends take write on the base and nothing on ``top``.
  A bad ``speed`` fails when the job exists (``created``, ``null``), a
  ``filter-node-name`` already in use as well.
* Run: 512 KiB steps; what a layer from ``top`` down to the node above the base
  holds is read from ``top`` and written into the base; from QEMU 10.0 on extents
  that read as zeroes become zero writes (MAY_UNMAP) instead of data. A base
  shorter than ``top`` is grown first.
* Prepare (gated by ``job-finalize``): the overlay's header names the base
  (``backing-file`` if given) and its format, then the overlay's backing child goes
  from the filter to the base. The header is written first: a failure leaves the
  chain exactly as it was. The merged nodes stay listed while the monitor owns
  them (their own links unchanged); nodes the daemon opened itself go.
* Abort (cancel, error, a failed or faulted prepare): the filter is replaced by
  ``top`` again; data already in the base stays.

**Active commit** (``top`` is the active layer): a mirror from ``top`` into the
base that copies what is allocated above the base, goes READY and pivots on
``job-complete`` (users of ``top`` move to the base), through a ``mirror_top``
filter: :class:`ActiveCommitJob`, the mirror job with type ``commit``.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Callable

from qmpjobd.block import permissions
from qmpjobd.block.drivers.commit_top import CommitTopNode
from qmpjobd.block.formats.qcow2.backing import (
    UNALLOCATED,
    change_backing_file,
    chain_nodes,
    is_qcow2,
    status_in_layers,
)
from qmpjobd.block.graph import freeze_chain, newest_first, unfreeze_links
from qmpjobd.block.jobs.base import BlockJob
from qmpjobd.block.jobs.mirror import MirrorJob
from qmpjobd.block.formats.qcow2.backing import find_overlay
from qmpjobd.block.jobs.stream import backing_format_name
from qmpjobd.errors import QMPError
from qmpjobd.versions import Behaviour

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.graph import BlockGraph
    from qmpjobd.block.node import BlockNode
    from qmpjobd.job.manager import JobManager

COMMIT_BUFFER_SIZE = 512 * 1024

# "block: allow commit to unmap zero blocks" (10.1, backported to 10.0.7): zero
# extents above the base are written into it as zero writes, not as data.
COMMIT_WRITES_ZEROES = Behaviour("inactive commit writes zero extents as zero writes",
                                 since="10.0")

# "block/mirror: Reopen the base image in RO mode when aborting blockcommit"
# (2024, QEMU 9.1): an aborted active commit (cancelled, failed) makes a base it
# switched to read-write read-only again. 7.2 leaves it read-write (observed:
# job-cancel before READY and in READY); 10.0 and 11.1 restore it.
ACTIVE_COMMIT_ABORT_RESTORES_READ_ONLY = Behaviour(
    "an aborted active commit makes a read-only base read-only again", since="9.1")

# commit_start's holds (name, perm, shared), as x-debug-query-block-graph shows
# them: nothing taken; the nodes that leave the chain share writes only (no
# consistent read: other readers of the chain would see half-committed data),
# those that are filters above the base share reads as well.
# (The main node's, block_job_create's ("main node", 0, ALL), is the default.)
BASE_EDGE = ("base", 0, permissions.ALL)
INTERMEDIATE_SHARED = permissions.WRITE_UNCHANGED | permissions.WRITE
# The job's BlockBackend on the base writes into it (and resizes a shorter one).
COMMIT_BASE_PERM = permissions.CONSISTENT_READ | permissions.WRITE
COMMIT_BASE_SHARED = permissions.CONSISTENT_READ | permissions.WRITE_UNCHANGED


def intermediate_edges(top: "BlockNode", base: "BlockNode",
                       base_overlay: "BlockNode | None") -> list[tuple["BlockNode", tuple]]:
    """The "intermediate node" holds of a commit on the nodes from ``top`` down to,
    not including, ``base``: from the base's overlay's direct backing on (filters
    above the base) consistent reads are shared too."""
    filtered_base = base_overlay.backing_node() if base_overlay is not None else None
    shared = INTERMEDIATE_SHARED
    edges = []
    for node in chain_nodes(top, base):
        if node is filtered_base:
            shared |= permissions.CONSISTENT_READ
        edges.append((node, ("intermediate node", 0, shared)))
    return edges


class CommitJob(BlockJob):
    """Inactive ``block-commit`` job (type ``commit``)."""

    job_type = "commit"

    def __init__(self, manager: "JobManager", graph: "BlockGraph", job_id: str | None,
                 device: "BlockNode", top: "BlockNode", base: "BlockNode", *,
                 backing_file: str | None = None, backing_mask_protocol: bool = False,
                 speed: int = 0, on_error: str = "report",
                 filter_node_name: str | None = None, auto_finalize: bool = True,
                 auto_dismiss: bool = True,
                 reopen: "Callable[[BlockNode, bool], None] | None" = None) -> None:
        """QEMU's commit_start; ``reopen(node, read_only)`` switches a read-only
        base to read-write for the job (and back in clean)."""
        self.graph = graph
        self.reopen = reopen
        self.base_read_only = False
        self.device = device
        self.top = top
        self.base = base
        self.backing_file = backing_file
        self.backing_mask_protocol = backing_mask_protocol
        self.on_error = on_error
        self.source = top          # test-control faults: reads of top, writes to base
        self.target = base
        self.filter: CommitTopNode | None = None
        self._backends: list[tuple[BlockNode, permissions.UserEdge]] = []
        self.frozen_links: list = []
        # commit_start: the base's BlockBackend resizes it when it is shorter.
        base_resize = permissions.RESIZE if base.size < top.size else 0
        super().__init__(manager, job_id, device, block_main=True, speed=speed,
                         auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        try:
            if base.read_only:
                if reopen is None:
                    raise QMPError(f"Node '{base.node_name}' is read-only")
                reopen(base, False)
                self.base_read_only = True
            self.filter = graph.insert_filter_above(CommitTopNode, filter_node_name, top,
                                                    change="append")
            # commit_start: the links from the filter down to base stay put
            # while the job runs.
            self.filter.implicit = filter_node_name is None
            self.frozen_links = freeze_chain(self.filter, base)
            self.base_overlay = find_overlay(top, base)
            for node, edge in intermediate_edges(top, base, self.base_overlay):
                with graph.graph_change("job-add-node"):
                    self.attach_node(node, block=True, edge=edge)
            with graph.graph_change("job-add-node"):
                self.attach_node(base, block=True, edge=BASE_EDGE)
            # The job's BlockBackends on base and top (blockdev-del: "in use").
            # qemu-storage-daemon 10.0 and 11.1 show one graph-lock section for
            # the two to other jobs (counted, not read in the source).
            graph.graph_changes("backend-insert")
            self._insert_backend(base, COMMIT_BASE_PERM | base_resize, COMMIT_BASE_SHARED)
            # The top's: its permissions are the job's intermediate-node edge.
            self._insert_backend(top, 0, permissions.ALL)
        except QMPError:
            self._unfreeze()
            self.early_fail()
            self._restore_chain()
            self._restore_base()
            raise

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        length = self.top.size
        self.progress_set_remaining(length)
        if self.base.size < length:
            failure = self._grow_base(length)
            if failure:
                return failure
        zero_writes = self.graph.personality.has(COMMIT_WRITES_ZEROES)
        offset = 0
        delay_ns = 0
        while offset < length:
            await self.ratelimit_sleep(delay_ns)
            if self.is_cancelled:
                break
            size = min(COMMIT_BUFFER_SIZE, length - offset)
            kind, count = status_in_layers(self.top, self.base_overlay, offset, size)
            copy = kind != UNALLOCATED
            failure = await self._copy(offset, count, kind == "zero" and zero_writes) \
                if copy else None
            if failure is not None:
                is_read, code = failure
                action = self.error_action(self.on_error, is_read, code)
                if action == "report":
                    return -code
                delay_ns = 0
                continue
            self.progress_update(count)
            delay_ns = self.ratelimit_delay_ns(count) if copy else 0
            offset += count
        return 0

    async def _copy(self, offset: int, count: int, as_zeroes: bool) -> tuple[bool, int] | None:
        """Copy one extent from top to base; (is_read, errno) when it failed."""
        if as_zeroes:
            try:
                # With MAY_UNMAP, as QEMU's commit asks; a filter above the base
                # passes the request on (nodes without zero clusters ignore it).
                await self.base.co_pwrite_zeroes(offset, count, may_unmap=True)
            except OSError as exc:
                return False, exc.errno or errno.EIO
            return None
        try:
            data = await self.top.co_pread(offset, count)
        except OSError as exc:
            return True, exc.errno or errno.EIO
        try:
            await self.base.co_pwrite(offset, data)
        except OSError as exc:
            return False, exc.errno or errno.EIO
        return None

    def _grow_base(self, length: int) -> int:
        """commit_run: a base shorter than top grows to top's length first (no
        preallocation); a base that cannot grow fails the job, as its -errno."""
        return grow_base(self.base, length)

    # ------------------------------------------------------------------ finish

    def prepare(self) -> int:
        """commit_prepare / bdrv_drop_intermediate: the filter's parents now use the
        base, and each COW parent's header names it."""
        assert self.filter is not None
        self._unfreeze()
        self._drop_backend(self.base)                         # blk_unref(s->base)
        # bdrv_drop_intermediate: the filter's parents, newest first.
        parents = newest_first(self.filter.parent_nodes)
        overlays = [p for p in parents if p.backing_node() is self.filter]
        name = self.backing_file or self.base.filename()
        fmt = backing_format_name(self.base, self.backing_mask_protocol)
        written: list[tuple[BlockNode, str | None, str | None]] = []
        for overlay in overlays:
            if not is_qcow2(overlay):
                continue
            header = overlay.image.header  # type: ignore[attr-defined]
            old = (header.backing_file, header.backing_format)
            try:
                change_backing_file(overlay, name, fmt)
            except (OSError, QMPError):
                # Put back what was already rewritten: the chain stays as it was.
                for done, old_name, old_fmt in reversed(written):
                    try:
                        change_backing_file(done, old_name, old_fmt)
                    except (OSError, QMPError):
                        pass
                return -errno.EPERM
            written.append((overlay, *old))
        with self.graph.graph_change("replace-node"):
            for parent in parents:
                self.graph.relink_child(parent, self.filter, self.base)
            # bdrv_replace_node(top, base): exports of top follow too.
            self.graph.move_exports(self.filter, self.base)
        self._drop_filter()
        self._release_dropped()
        return 0

    def abort(self) -> None:
        # commit_abort: the job lets go of its nodes, then the filter goes.
        self._unfreeze()
        self._drop_backend(self.base)
        self.release_nodes_locked()
        self._restore_chain()

    def _unfreeze(self) -> None:
        """bdrv_unfreeze_backing_chain, once: just before the job's own change."""
        unfreeze_links(self.frozen_links)
        self.frozen_links = []

    def clean(self) -> None:
        self._unfreeze()
        self._drop_backend(self.top)                          # blk_unref(s->top)
        self._restore_base()
        super().clean()

    def _restore_base(self) -> None:
        if self.base_read_only and self.reopen is not None:
            self.base_read_only = False
            self.reopen(self.base, True)

    def on_free(self) -> None:
        for node in (self.base, self.top):
            self._drop_backend(node)
        super().on_free()

    def _insert_backend(self, node: "BlockNode", perm: int, shared: int) -> None:
        """blk_new + blk_insert_bs: a BlockBackend of the job on ``node`` (a
        permission conflict fails the job's creation with QEMU's error)."""
        edge = permissions.attach_user(self.graph, node, self, "block-backend", "root",
                                       perm, shared)
        node.backend_users.append(self)
        self._backends.append((node, edge))

    def _drop_backend(self, node: "BlockNode") -> None:
        """blk_unref of the job's BlockBackend on ``node`` (once)."""
        for held in self._backends:
            if held[0] is node:
                self._backends.remove(held)
                self.graph.graph_changes("backend-remove")
                permissions.detach_edge(self.graph, held[1])
                break
        if self in node.backend_users:
            node.backend_users.remove(self)

    def _restore_chain(self) -> None:
        """Replace the filter by ``top`` for its parents and drop it (idempotent)."""
        if self.filter is None or self.graph.nodes.get(self.filter.node_name) is not self.filter:
            return
        with self.graph.graph_change("replace-node"):
            self.graph.remove_filter_from_chain(self.filter)
        self._drop_filter()

    def _drop_filter(self) -> None:
        node = self.filter
        if node is None or self.graph.nodes.get(node.node_name) is not node:
            return
        self.graph.nodes.pop(node.node_name, None)
        node.detach_children()
        with self.graph.graph_change("close"):
            node.close()

    def _release_dropped(self) -> None:
        """The nodes from top down to the base left the chain: those the daemon
        opened itself go once the job lets go of them."""
        for node in chain_nodes(self.top, self.base):
            if not node.monitor_owned and not node.parent_nodes:
                node.release_when_unused = True
                self.graph.release_implicit(node)


def grow_base(base: "BlockNode", length: int) -> int:
    """blk_co_truncate(base, length) of commit_run / mirror_run: 0, or the -errno
    the job ends with (the driver's refusal is an EINVAL/ENOTSUP there, QEMU's
    error text is not shown)."""
    try:
        base.truncate(length)
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    except QMPError as exc:
        return -_truncate_errno(exc.desc)
    return 0


def _truncate_errno(text: str) -> int:
    """The errno behind a truncate refusal's message (bdrv_co_truncate's checks
    return EACCES for read-only, ENOTSUP for a driver that cannot resize)."""
    if text == "Image is read-only":
        return errno.EACCES
    if text.startswith("Could not resize file: "):
        reason = text.split(": ", 1)[1]
        for code in (errno.ENOSPC, errno.EFBIG, errno.EPERM, errno.EACCES, errno.EIO):
            if os.strerror(code) == reason:
                return code
        return errno.EIO
    return errno.ENOTSUP


class ActiveCommitJob(MirrorJob):
    """Active ``block-commit``: a mirror of the active layer into its base."""

    job_type = "commit"
    # mirror_start_job's edges: "main node", "source", "target" as a mirror's.
    edge_kind = "mirror"

    def __init__(self, manager: "JobManager", graph: "BlockGraph", job_id: str | None,
                 top: "BlockNode", base: "BlockNode", *, speed: int = 0,
                 on_error: str = "report", filter_node_name: str | None = None,
                 auto_finalize: bool = True, auto_dismiss: bool = True,
                 reopen: "Callable[[BlockNode, bool], None] | None" = None) -> None:
        """commit_active_start: a read-only base is reopened read-write first and
        made read-only again if the job fails to start, or (QEMU 9.1 on) is
        aborted."""
        self.reopen = reopen
        self.base_read_only = base.read_only
        if base.read_only:
            if reopen is None:
                raise QMPError(f"Node '{base.node_name}' is read-only")
            reopen(base, False)
        try:
            self._start_mirror(manager, graph, job_id, top, base, speed=speed,
                               on_error=on_error, filter_node_name=filter_node_name,
                               auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        except QMPError:
            self._restore_base(base)
            raise

    def _start_mirror(self, manager: "JobManager", graph: "BlockGraph", job_id: str | None,
                      top: "BlockNode", base: "BlockNode", *, speed: int, on_error: str,
                      filter_node_name: str | None, auto_finalize: bool,
                      auto_dismiss: bool) -> None:
        super().__init__(manager, graph, job_id, top, base, sync="full",
                         speed=speed, on_source_error=on_error, on_target_error=on_error,
                         auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
                         filter_node_name=filter_node_name, zero_target=False,
                         copy_base=base)
        # The intermediate nodes disappear from the chain with the pivot: blocked,
        # with the holds of an inactive commit's.
        below = top.filter_or_cow_child()
        if below is None:
            return
        try:
            for node, edge in intermediate_edges(below, base, find_overlay(top, base)):
                with graph.graph_change("job-add-node"):
                    self.attach_node(node, block=True, edge=edge)
        except QMPError:
            # A user of an intermediate node that reads it consistently (an
            # export): mirror_start_job's failure path, as for the target.
            self._exit_common(abort=True)
            self.early_fail()
            raise

    def abort(self) -> None:
        super().abort()
        # mirror_exit_common: before QEMU 9.1 nothing made the base read-only
        # again once the job existed (only a failed start did).
        if self.graph.personality.has(ACTIVE_COMMIT_ABORT_RESTORES_READ_ONLY):
            self._restore_base(self.target)

    def _restore_base(self, base: "BlockNode") -> None:
        if self.base_read_only and self.reopen is not None:
            self.base_read_only = False
            self.reopen(base, True)
