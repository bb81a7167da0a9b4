"""``copy-before-write``: the filter that saves old data to a target before a write
overwrites it, and the block-copy state it shares with the backup job.

:class:`BlockCopyState` is QEMU's block-copy in the small: a bitmap of the
clusters still to copy from ``source`` to ``target`` (all of them at first, or
those of a dirty bitmap), the ranges being copied right now (a second copier of
the same cluster waits for the first instead of copying again), and, for the
point-in-time view that ``snapshot-access`` reads, which clusters were copied
(``done``) and which may be read at all (``access``).

Two users drive it:

* a backup job copies the dirty clusters in the background and installs
  :meth:`BlockCopyState.copy_before_write` as a before-write notifier of its
  source, so a write to the source (an NBD client's, another job's) first saves
  the clusters it touches that the job has not copied yet (QEMU's backup-top
  filter, which sits above the source and sees every write);
* the ``copy-before-write`` node (``blockdev-add``), whose own writes do the same
  before they reach its ``file`` child; it copies nothing in the background.

Options of the node (QAPI BlockdevOptionsCbw): ``file``, ``target``, ``bitmap``
(``{node, name}``: only the clusters dirty in that bitmap are protected and
readable through the snapshot; the bits are taken at open), ``on-cbw-error``
(``break-guest-write``: a failed copy fails the write; ``break-snapshot``: the
write goes on, later writes copy nothing and every later snapshot read fails
with EACCES; a backup job's filter takes the job's ``on-cbw-error``) and
``cbw-timeout`` (seconds; a write stops waiting for its copy at that deadline and
the copy counts as failed, though it goes on in the background).
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass, field
from typing import Any, Callable

from qmpjobd.block.bitmap import ClusterBitmap
from qmpjobd.block.node import BlockNode, io_error
from qmpjobd.block.offload import copy_range
from qmpjobd.errors import QMPError
from qmpjobd.versions import Behaviour

KiB = 1024
CLUSTER_SIZE_DEFAULT = 64 * KiB

# What differs per release in the copy path (DESIGN.md, decision 9).
SNAPSHOT_STATUS_FROM_TARGET = Behaviour(
    "snapshot-access block status of a cluster the filter has copied comes from "
    "the copy in the target (7.2 answers with the filtered node's current status: "
    "an overwritten hole maps as data; first seen in 10.0, the release in between "
    "is unverified)", since="10.0")
COPY_BITMAP_ON_FILTER = Behaviour(
    "block-copy's anonymous copy bitmap belongs to the copy-before-write filter node "
    "(7.2 keeps it on the filtered node, so queries list it there)", since="10.0")


class InternalBitmapView:
    """An anonymous, non-recording bitmap of block-copy as query-named-block-nodes
    lists it (QEMU shows block-copy's copy, done and access bitmaps), on top of a
    :class:`DirtyClusters`. It takes no writes: ``recording`` is False."""

    name = None
    recording = False
    busy = False
    persistent = False
    inconsistent = False
    readonly = False
    skip_store = False
    successor = None

    def __init__(self, clusters: "DirtyClusters", size: int) -> None:
        self.clusters = clusters
        self.size = size
        self.granularity = clusters.cluster_size
        self.node = None

    @property
    def reported_recording(self) -> bool:
        return False

    @property
    def dirty_bytes(self) -> int:
        """Dirty clusters times the cluster size; the last counts up to ``size``."""
        clusters = self.clusters
        total = clusters.count * clusters.cluster_size
        last = clusters.size - 1
        if last >= 0 and clusters.get(last):
            total -= clusters.size * clusters.cluster_size - self.size
        return total

    def set_dirty(self, offset: int, length: int) -> None:
        """Not recording: writes never reach it."""

    def info(self) -> dict:
        return {"count": self.dirty_bytes, "granularity": self.granularity,
                "recording": False, "busy": False, "persistent": False}


def target_cluster_size(target: BlockNode) -> int:
    """QEMU's block-copy cluster size: max(64 KiB, the target's cluster size when
    its driver reports one)."""
    reported = getattr(target, "cluster_size", None)
    if isinstance(reported, int) and reported > 0:
        return max(CLUSTER_SIZE_DEFAULT, reported)
    image = getattr(target, "image", None)
    reported = getattr(image, "cluster_size", None)
    if isinstance(reported, int) and reported > 0:
        return max(CLUSTER_SIZE_DEFAULT, reported)
    return CLUSTER_SIZE_DEFAULT


INT64_MAX = 2**63 - 1


def check_min_cluster_size(value: int, prefix: str = "") -> None:
    """``min-cluster-size`` (cbw option, backup's x-perf) as block-copy checks it."""
    prefix += "Cannot create block-copy-state: "
    if value & (value - 1):
        raise QMPError(f"{prefix}min-cluster-size needs to be a power of 2")
    if value > INT64_MAX:
        raise QMPError(f"{prefix}min-cluster-size too large: {value} > {INT64_MAX}")


def block_copy_cluster_size(target: BlockNode, min_cluster_size: int = 0) -> int:
    """The copy granularity: at least 64 KiB, the target's cluster size and
    ``min-cluster-size``."""
    return max(target_cluster_size(target), min_cluster_size)


class DirtyClusters(ClusterBitmap):
    """Which clusters still have to be copied (one bit each, all dirty at first);
    offsets and counts are in bytes of whole clusters."""

    __slots__ = ("cluster_size",)

    def __init__(self, length: int, cluster_size: int, fill: bool = True) -> None:
        super().__init__(-(-length // cluster_size), fill=fill)
        self.cluster_size = cluster_size

    @property
    def dirty_clusters(self) -> int:
        return self.count

    @property
    def dirty_bytes(self) -> int:
        return self.count * self.cluster_size

    def next_dirty_area(self, offset: int, max_bytes: int,
                        end: int | None = None) -> tuple[int, int] | None:
        """First dirty run at or after ``offset`` (and before ``end``), at most
        ``max_bytes`` long."""
        cs = self.cluster_size
        stop = self.size if end is None else min(self.size, -(-end // cs))
        first = self.next_set(offset // cs, stop)
        if first < 0:
            return None
        limit = min(stop, first + max(max_bytes // cs, 1))
        clean = self.next_clear(first, limit)
        last = limit if clean < 0 else clean
        return first * cs, (last - first) * cs

    def set(self, offset: int, length: int, dirty: bool) -> None:
        first = offset // self.cluster_size
        last = -(-(offset + length) // self.cluster_size)
        self.set_range(first, last, dirty)

    def is_set(self, offset: int) -> bool:
        return self.get(offset // self.cluster_size)

    def runs(self, offset: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """The dirty runs in bytes, clipped to ``[offset, end)``."""
        out: list[tuple[int, int]] = []
        total = self.size * self.cluster_size
        end = total if end is None else end
        while offset < end:
            area = self.next_dirty_area(offset, total, end)
            if area is None:
                break
            start, length = area
            start = max(start, offset)
            stop = min(start + length, end)
            out.append((start, stop - start))
            offset = stop
        return out


@dataclass
class _Copying:
    """A range being copied (or read) now; later copiers and writers wait for it."""

    start: int
    end: int
    # Futures of those waiting; made only when someone waits (most copies end
    # with nobody waiting, and a job stepped without a running loop makes none).
    waiters: list = field(default_factory=list)

    def overlaps(self, start: int, end: int) -> bool:
        return start < self.end and self.start < end

    async def wait(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        await future

    def finish(self) -> None:
        for future in self.waiters:
            if not future.done():
                future.set_result(None)
        self.waiters.clear()


class BlockCopyState:
    """The copy bitmap and the in-flight copies between ``source`` and ``target``."""

    def __init__(self, source: BlockNode, target: BlockNode, *,
                 cluster_size: int | None = None, status_from_target: bool = True) -> None:
        self.source = source
        self.target = target
        self.length = source.size
        self.cluster_size = cluster_size or target_cluster_size(target)
        self.copy_bitmap = DirtyClusters(self.length, self.cluster_size)
        # Copied to the target (read the snapshot from there) / readable at all.
        self.done = DirtyClusters(self.length, self.cluster_size, fill=False)
        self.access = DirtyClusters(self.length, self.cluster_size)
        self.status_from_target = status_from_target
        self._copying: list[_Copying] = []
        # Snapshot reads of the source in flight: a write waits for them.
        self._frozen_reads: list[_Copying] = []
        # Called with the bytes of every successful copy (the job's progress).
        self.on_copied: Callable[[int], None] | None = None
        # on-cbw-error: break-snapshot lets a write go on when its copy fails
        # (break-guest-write, the default, fails the write).
        self.break_snapshot = False
        # Set by the first failed copy under break-snapshot: from then on writes
        # copy nothing and snapshot reads fail (QEMU's snapshot_error).
        self.snapshot_broken = False
        self.cbw_timeout_ns = 0
        self.clock: Any = None

    # --- bitmap set-up ----------------------------------------------------------------

    def limit_to(self, runs: list[tuple[int, int]]) -> None:
        """Protect only the given byte runs (a dirty bitmap's dirty areas)."""
        self.copy_bitmap.set(0, self.length, dirty=False)
        self.access.set(0, self.length, dirty=False)
        for offset, length in runs:
            self.copy_bitmap.set(offset, length, dirty=True)
            self.access.set(offset, length, dirty=True)

    def align(self, offset: int, length: int) -> tuple[int, int]:
        """``[offset, offset+length)`` widened to whole clusters, clipped to the node."""
        cs = self.cluster_size
        start = offset // cs * cs
        end = min(-(-(offset + length) // cs) * cs, -(-self.length // cs) * cs)
        return start, end

    def set_on_cbw_error(self, policy: str | None) -> None:
        """``on-cbw-error`` of the filter (or of the backup job that made it)."""
        self.break_snapshot = policy == "break-snapshot"

    # --- in-flight bookkeeping --------------------------------------------------------

    def claim(self, start: int, end: int) -> _Copying:
        """Take ``[start, end)`` out of the copy bitmap and mark it in flight."""
        self.copy_bitmap.set(start, end - start, dirty=False)
        entry = _Copying(start, end)
        self._copying.append(entry)
        return entry

    def release(self, entry: _Copying, ok: bool, for_write: bool = False) -> None:
        """A copy ended: on failure its clusters are dirty again. Only a copy made
        for a write marks them ``done`` (the snapshot reads them from the target);
        a backup job's background copies leave the filter's done bitmap alone, as
        in QEMU."""
        self._copying.remove(entry)
        if ok:
            if for_write:
                self.done.set(entry.start, entry.end - entry.start, dirty=True)
        else:
            self.copy_bitmap.set(entry.start, entry.end - entry.start, dirty=True)
        entry.finish()

    async def wait_copies(self, start: int, end: int) -> None:
        """Wait until no copy overlapping ``[start, end)`` is in flight."""
        while True:
            busy = [entry for entry in self._copying if entry.overlaps(start, end)]
            if not busy:
                return
            await busy[0].wait()

    async def _wait_frozen_reads(self, start: int, end: int) -> None:
        while True:
            busy = [entry for entry in self._frozen_reads if entry.overlaps(start, end)]
            if not busy:
                return
            await busy[0].wait()

    # --- copying ----------------------------------------------------------------------

    def task_extent(self, offset: int, length: int) -> tuple[bool, int]:
        """How block-copy cuts a task at ``offset`` (at most ``length`` bytes): by
        the source's block status, whole clusters (rounded down, up at the end of
        the node, one data cluster when the status run is shorter); True when the
        task is a zero write."""
        cs = self.cluster_size
        try:
            kind, count = self.source.block_status(offset, length)
        except OSError:
            # As block-copy does: a status it cannot get means one data cluster
            # (whose read then meets the error, if it lasts).
            return False, min(cs, length)
        if count < cs:
            return False, min(cs, length)
        if offset + count >= self.length:
            count = -(-count // cs) * cs
        else:
            count = count // cs * cs
        return kind == "zero", min(count, length)

    async def copy_task(self, start: int, end: int, zero: bool) -> None:
        """Copy ``[start, end)`` (clipped to the node) source -> target, as a zero
        write when ``zero``. Raises OSError (``is_read`` set on read failures)."""
        end = min(end, self.length)
        if end <= start:
            return
        if zero:
            await self.target.co_pwrite_zeroes(start, end - start)
        else:
            await copy_range(self.source, start, self.target, start, end - start)

    async def copy_extent(self, start: int, end: int) -> None:
        """Copy ``[start, end)`` in block-copy's tasks (see ``task_extent``)."""
        position = start
        while position < end:
            zero, count = self.task_extent(position, end - position)
            await self.copy_task(position, position + count, zero)
            position += count

    async def copy_before_write(self, offset: int, length: int) -> None:
        """Save every not yet copied cluster of ``[offset, offset+length)`` to the
        target; the notifier a write awaits before it reaches the source."""
        if self.snapshot_broken:
            return
        start, end = self.align(offset, length)
        while True:
            await self.wait_copies(start, end)
            area = self.copy_bitmap.next_dirty_area(start, end - start, end)
            if area is None:
                break
            run_start, run_length = area
            zero, run_length = self.task_extent(run_start, run_length)
            entry = self.claim(run_start, run_start + run_length)
            try:
                await self._timed(self.copy_task(run_start, run_start + run_length, zero))
            except OSError:
                self.release(entry, ok=False)
                if not self.break_snapshot:
                    raise
                # break-snapshot: the write goes on, the snapshot is lost (a
                # backup job is not told: it copies what the write leaves). The
                # write still waits for snapshot reads in flight, as in QEMU.
                self.snapshot_broken = True
                break
            except BaseException:
                self.release(entry, ok=False)
                raise
            self.release(entry, ok=True, for_write=True)
            if self.on_copied is not None:
                self.on_copied(run_length)
        await self._wait_frozen_reads(start, end)

    async def _timed(self, coro: Any) -> None:
        """Run a copy; with ``cbw-timeout`` the caller gives up at the deadline (on
        the daemon clock) with ETIMEDOUT while the copy itself goes on in the
        background, as QEMU's block_copy with a timeout does."""
        if not self.cbw_timeout_ns or self.clock is None:
            await coro
            return
        copy = asyncio.ensure_future(coro)
        deadline = asyncio.get_running_loop().create_future()
        timer = self.clock.call_later_ns(
            self.cbw_timeout_ns, lambda: deadline.done() or deadline.set_result(None))
        try:
            await asyncio.wait((copy, deadline), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        if copy.done():
            copy.result()
            return
        # Nobody waits for the late copy any more; its failure has no one to tell.
        copy.add_done_callback(lambda task: task.cancelled() or task.exception())
        raise io_error(errno.ETIMEDOUT)

    # --- the point-in-time view (snapshot-access) -----------------------------------

    def _check_access(self, offset: int, length: int) -> None:
        if self.snapshot_broken:
            raise io_error(errno.EACCES)
        start, end = self.align(offset, length)
        first = start // self.cluster_size
        last = end // self.cluster_size
        if self.access.next_clear(first, last) >= 0:
            raise io_error(errno.EACCES)

    async def snapshot_read(self, offset: int, length: int) -> bytes:
        """Old content: copied clusters from the target, the rest from the source."""
        self._check_access(offset, length)
        pieces: list[bytes] = []
        position, end = offset, offset + length
        cs = self.cluster_size
        while position < end:
            # A copy in flight lands in the target first; read once it has.
            await self.wait_copies(position, min(end, (position // cs + 1) * cs))
            copied = self.done.is_set(position)
            run_end = min(end, (position // cs + 1) * cs)
            while run_end < end and self.done.is_set(run_end) == copied \
                    and not self._copying_at(run_end):
                run_end = min(end, run_end + cs)
            if copied:
                pieces.append(await self.target.co_pread(position, run_end - position))
            else:
                frozen = _Copying(position, run_end)
                self._frozen_reads.append(frozen)
                try:
                    pieces.append(await self.source.co_pread(position, run_end - position))
                finally:
                    self._frozen_reads.remove(frozen)
                    frozen.finish()
            position = run_end
        return b"".join(pieces)

    def _copying_at(self, offset: int) -> bool:
        return any(entry.overlaps(offset, offset + 1) for entry in self._copying)

    def snapshot_block_status(self, offset: int, length: int) -> tuple[str, int]:
        """Block status of the old content at ``offset``; EACCES where a read would
        fail (a broken snapshot, an area outside the bitmap), as QEMU's does."""
        self._check_access(offset, length)
        cs = self.cluster_size
        end = min(offset + length, self.length)
        copied = self.done.is_set(offset)
        run_end = min(end, (offset // cs + 1) * cs)
        while run_end < end and self.done.is_set(run_end) == copied:
            run_end = min(end, run_end + cs)
        node = self.target if copied and self.status_from_target else self.source
        kind, count = node.block_status(offset, run_end - offset)
        return kind, max(1, min(count, run_end - offset))

    async def snapshot_discard(self, offset: int, length: int) -> None:
        """Give up the snapshot's copy of whole clusters inside the range."""
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = (offset + length) // cs * cs
        if end <= start:
            return
        await self.wait_copies(start, end)
        self.access.set(start, end - start, dirty=False)
        self.copy_bitmap.set(start, end - start, dirty=False)
        self.done.set(start, end - start, dirty=False)
        await self.target.co_pdiscard(start, end - start)


class CopyBeforeWriteNode(BlockNode):
    """The ``copy-before-write`` filter of blockdev-add (and of backup's filter-node-name)."""

    driver = "copy-before-write"
    is_filter = True
    child_roles = ("file", "target")

    @classmethod
    def check_children(cls, children: dict[str, BlockNode]) -> None:
        # QAPI makes both members mandatory; nothing more to check here.
        return None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # QEMU lists a node's children newest first: target, then file.
        self.children = {role: self.children[role] for role in ("target", "file")
                         if role in self.children}

    @classmethod
    def for_backup(cls, graph: Any, name: str, auto_named: bool, source: BlockNode,
                   target: BlockNode, state: BlockCopyState) -> "CopyBeforeWriteNode":
        """The filter a backup job puts above its source (QEMU's bdrv_cbw_append),
        sharing the job's copy state; the source's parents and exports move up
        to it (remove_filter_from_chain moves them back)."""
        node = cls(graph, name, {"driver": cls.driver},
                   {"file": source, "target": target}, auto_named)
        node.size = source.size
        node.state = state
        node._show_internal_bitmaps(graph.personality)
        graph.nodes[name] = node
        for parent in [p for p in source.parent_nodes if p is not node]:
            # A parent below the target (a fleecing overlay backed by the source)
            # stays where it is: moving it would make a loop.
            if parent is target or parent in target_subtree(target):
                continue
            graph.relink_child(parent, source, node)
            relinked_first(parent, node)
        # Exports of the source (their BlockBackends) use the filter meanwhile.
        graph.move_exports(source, node)
        # Above a drained source (backup in a transaction) the filter is drained too.
        graph.join_drained_sections(node, source)
        return node

    def open(self) -> None:
        source = self.children["file"]
        target = self.children["target"]
        self.size = source.size
        who = self.graph.personality
        min_cluster_size = int(self.options.get("min-cluster-size", 0))
        check_min_cluster_size(min_cluster_size)
        self.state = BlockCopyState(
            source, target, cluster_size=block_copy_cluster_size(target, min_cluster_size),
            status_from_target=who.has(SNAPSHOT_STATUS_FROM_TARGET))
        self.state.clock = self.graph.clock
        self.state.cbw_timeout_ns = int(self.options.get("cbw-timeout", 0)) * 1_000_000_000
        self.state.set_on_cbw_error(self.options.get("on-cbw-error"))
        bitmap_ref = self.options.get("bitmap")
        if bitmap_ref is not None:
            self._limit_to_bitmap(bitmap_ref)
        self._show_internal_bitmaps(who)

    def _show_internal_bitmaps(self, who: Any) -> None:
        """List block-copy's bitmaps where QEMU does: the copy bitmap first (on
        the filter, or on ``file`` in 7.2), then the done and access bitmaps."""
        state = self.state
        self._views: list[tuple[BlockNode, InternalBitmapView]] = []
        copy_owner = self if who.has(COPY_BITMAP_ON_FILTER) else self.children["file"]
        for owner, clusters in ((copy_owner, state.copy_bitmap), (self, state.done),
                                (self, state.access)):
            view = InternalBitmapView(clusters, self.size)
            owner.dirty_bitmaps.insert(0, view)
            self._views.append((owner, view))

    def close(self) -> None:
        for owner, view in getattr(self, "_views", ()):
            if view in owner.dirty_bitmaps:
                owner.dirty_bitmaps.remove(view)
        self._views = []

    def _limit_to_bitmap(self, ref: dict) -> None:
        node = self.graph.find(ref["node"])
        if node is None:
            raise QMPError(f"Node '{ref['node']}' not found")
        find = getattr(node, "find_dirty_bitmap", None)
        bitmap = find(ref["name"]) if find is not None else None
        if bitmap is None:
            raise QMPError(f"Dirty bitmap '{ref['name']}' not found")
        problem = bitmap_use_problem(bitmap, check_readonly=False)
        if problem is not None:
            raise QMPError("Cannot create block-copy-state: Failed to merge bitmap "
                           f"'{ref['name']}' to internal copy-bitmap: {problem}")
        self.state.limit_to([(offset, length) for offset, length, dirty
                             in bitmap.extents(0, bitmap.size) if dirty])

    # --- guest I/O: copy first, then pass to file -----------------------------------

    async def _preadv(self, offset: int, length: int) -> bytes:
        return await self.children["file"].co_pread(offset, length)

    async def _pwritev(self, offset: int, data: bytes) -> None:
        await self.state.copy_before_write(offset, len(data))
        await self.children["file"].co_pwrite(offset, data)

    async def co_pwrite_zeroes(self, offset: int, length: int, *, no_fallback: bool = False,
                               may_unmap: bool = False) -> None:
        # The old data is saved first, then the request goes on as it came.
        await self.zeroes_to_child(offset, length, no_fallback=no_fallback, may_unmap=may_unmap,
                                   before=self.state.copy_before_write)

    async def _pdiscard(self, offset: int, length: int) -> None:
        await self.state.copy_before_write(offset, length)
        await self.children["file"].co_pdiscard(offset, length)

    def block_status(self, offset: int, length: int) -> tuple[str, int]:
        return self.children["file"].block_status(offset, length)

    # --- names QEMU reports -------------------------------------------------------

    def exact_filename(self) -> str | None:
        # A filter takes its filtered child's name.
        return self.children["file"].filename()

    def actual_size(self) -> int | None:
        return self.children["file"].actual_size()


def relinked_first(parent: BlockNode, child: BlockNode) -> None:
    """``parent``'s links to ``child``, just replaced, become its newest children:
    qsd lists a replaced child first in x-debug-query-block-graph (seen with one
    backup filter stacked above another, and when it goes again)."""
    moved = {role: node for role, node in parent.children.items() if node is child}
    parent.children = {**moved, **{role: node for role, node in parent.children.items()
                                   if role not in moved}}


def target_subtree(node: BlockNode) -> list[BlockNode]:
    """Every node below ``node`` (its children, theirs, ...)."""
    seen: list[BlockNode] = []
    stack = list(node.children.values())
    while stack:
        child = stack.pop()
        if child not in seen:
            seen.append(child)
            stack.extend(child.children.values())
    return seen


def bitmap_use_problem(bitmap: Any, *, check_readonly: bool = True) -> str | None:
    """QEMU's bdrv_dirty_bitmap_check (BUSY, RO, INCONSISTENT) as a message."""
    name = bitmap.name
    if bitmap.busy:
        return f"Bitmap '{name}' is currently in use by another operation and cannot be used"
    if check_readonly and bitmap.readonly:
        return f"Bitmap '{name}' is readonly and cannot be modified"
    if bitmap.inconsistent:
        return f"Bitmap '{name}' is inconsistent and cannot be used"
    return None
