"""The stream job (``block-stream``): copy into a node what its backing chain holds
above a base, then make the base its backing (QEMU's block/stream.c).

* **Creation** (stream_start): a ``copy-on-read`` filter goes above the device,
  with ``bottom`` set to the node just above the base (implicit ``#blockNNN``
  unless ``filter-node-name``); the job is created on the filter; the device
  ("active node") and every node below it down to the base are attached and
  blocked (``block device is in use by block job: stream``).
* **Run**: 512 KiB steps. An extent the device itself holds is skipped; one a
  layer between the device's backing and the base holds is populated through the
  filter (data written into the device, zero extents as zero writes); one no layer
  above the base holds is skipped. Progress counts every byte, in order, the rate
  limit only copied ones. A failed copy asks ``on-error`` (always as a read, as
  QEMU does).
* **Overlap** (no rate limit; a deliberate difference in timing only): a copy the
  pool makes in one task stays in flight while the job looks up the next step and
  starts its copy, so the event loop's work overlaps the pool's. The next copy
  starts once those before it are known to keep their clusters (QEMU's allocation
  order), at most STREAM_COPIES_IN_FLIGHT are in flight, and a pause, a drain, an
  error or the end waits for them: QEMU's job has no copy in flight at a pause
  point, nor does this one when it shows itself paused.
* **Prepare** (what ``job-finalize`` gates): the filter leaves the chain, the
  device's backing becomes the base (or nothing), and the device's header names the
  new backing file (``backing-file`` if given, else the base's filename) and its
  format (``raw`` for a protocol node with ``backing-mask-protocol``). The header
  is written before the graph changes, so a failed write leaves the chain as it
  was. The filter stays listed until the job is freed, as in QEMU 10.0+.
* **Abort / cancel**: no graph change; data already copied stays (it equals what
  the chain held).
"""

from __future__ import annotations

import asyncio
import errno
import functools
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from qmpjobd.block import permissions
from qmpjobd.block.drivers.copy_on_read import CopyOnReadNode
from qmpjobd.block.formats.qcow2.backing import (
    UNALLOCATED,
    change_backing_file,
    chain_nodes,
    cow_child,
    find_overlay,
    is_qcow2,
    layer_status,
    skip_filters,
)
from qmpjobd.block.graph import freeze_chain, unfreeze_links
from qmpjobd.block.jobs.base import BlockJob
from qmpjobd.errors import QMPError
from qmpjobd.job.coroutine import CoroutineRunner
from qmpjobd.versions import Behaviour

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.drivers.copy_on_read import _Below
    from qmpjobd.block.graph import BlockGraph
    from qmpjobd.block.node import BlockNode
    from qmpjobd.job.manager import JobManager

STREAM_CHUNK = 512 * 1024
# Without a rate limit, up to this much that the pool copies in one task (data
# clusters between host files, or known zeroes) is one step: QEMU's 512 KiB steps
# with the same bytes and allocation, each still deciding zero or data alone
# (CheckedCopy granules), with fewer trips through the event loop.
STREAM_BATCH = 8 * STREAM_CHUNK

# Without a rate limit, how many one-task copies may be in the pool at once (the
# job looks up the next step and starts its copy while those before it write).
# 1 GiB bench chain, median of 12 in-process runs: 0.125 s with 2, 0.112 s with 4.
STREAM_COPIES_IN_FLIGHT = 4

# stream_start's holds on the device and on the nodes down to the base (name,
# perm, shared): nothing taken, and resize (and below the device, writes) not
# shared, as x-debug-query-block-graph shows them.
_BASIC_SHARED = permissions.CONSISTENT_READ | permissions.WRITE_UNCHANGED
ACTIVE_NODE_EDGE = ("active node", 0, _BASIC_SHARED | permissions.WRITE)
INTERMEDIATE_NODE_EDGE = ("intermediate node", 0, _BASIC_SHARED)

# Observed: 7.2 makes a device that was read-only read-only again after the job;
# 10.0 and 11.1 leave it read-write (the release in between was not pinned down).
STREAM_RESTORES_READ_ONLY = Behaviour("block-stream restores a read-only device",
                                      since="7.2", until="10.0")


def backing_format_name(base: "BlockNode", mask_protocol: bool) -> str:
    """The format a header records for ``base`` (``raw`` for a protocol node when
    backing-mask-protocol asks for it)."""
    if mask_protocol and base.file_child is None and not base.is_filter:
        return "raw"
    return base.driver


@dataclass
class _Piece:
    """One stream step's range, counted in order once its copy is done (or
    found to have failed: the step the job's error policy then answers for)."""

    offset: int
    count: int
    copied: bool
    errno: int = 0
    running: bool = False     # its copy is still in the pool
    kept: bool = False        # its copy is known to write data (clusters stay)


class StreamJob(BlockJob):
    """``block-stream`` job (type ``stream``)."""

    job_type = "stream"

    def __init__(self, manager: "JobManager", graph: "BlockGraph", job_id: str | None,
                 device: "BlockNode", base: "BlockNode | None", *,
                 bottom: "BlockNode | None" = None, backing_file: str | None = None,
                 backing_mask_protocol: bool = False, speed: int = 0,
                 on_error: str = "report", filter_node_name: str | None = None,
                 auto_finalize: bool = True, auto_dismiss: bool = True,
                 reopen: "Callable[[BlockNode, bool], None] | None" = None) -> None:
        """QEMU's stream_start. ``reopen(node, read_only)`` switches a node's
        read-only state (the caller's; needed only for a read-only device)."""
        if bottom is not None:
            base_overlay = bottom
            base = cow_child(bottom)
        else:
            base_overlay = find_overlay(device, base)
            if base_overlay is None:
                assert base is not None
                raise QMPError(f"'{base.node_name}' is not in the backing chain of "
                               f"'{device.node_name}'")
        self.graph = graph
        self.reopen = reopen
        # A read-only device is reopened read-write for the job (QEMU's
        # bdrv_reopen_set_read_only); 7.2 makes it read-only again at the end.
        self.device_read_only = device.read_only
        if self.device_read_only:
            if reopen is None:
                raise QMPError(f"Node '{device.node_name}' is read-only")
            reopen(device, False)
        self.device = device
        self.base = base
        self.base_overlay = base_overlay
        self.backing_file = backing_file
        self.backing_mask_protocol = backing_mask_protocol
        self.on_error = on_error
        # Where test-control I/O faults act: the populate reads and writes the device.
        self.source = device
        self.target = device
        # Steps not yet counted, in order, and the copies still in the pool.
        self._pieces: deque[_Piece] = deque()
        self._copies: dict[CoroutineRunner, _Piece] = {}
        self._copies_changed = object()      # park reason: a copy finished
        try:
            # bdrv_insert_node opens the filter (its file child attaches), then
            # puts it above the device.
            graph.graph_changes("attach-child")
            self.filter = graph.insert_filter_above(
                CopyOnReadNode, filter_node_name, device, {"bottom": base_overlay.node_name})
        except QMPError as exc:
            self._restore_read_only()
            # bdrv_insert_node's wording for a filter that cannot be opened.
            raise QMPError(f"Could not create node: {exc.desc}") from None
        self.filter.implicit = filter_node_name is None
        self.filter_in_chain = True
        self.frozen_links: list = []
        try:
            # stream_start: the links from the filter down to the base's overlay
            # may not change while the job runs (the base's own link may).
            self.frozen_links = freeze_chain(self.filter, base_overlay)
            super().__init__(manager, job_id, self.filter, block_main=True, speed=speed,
                             auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        except BaseException:
            self._unfreeze()
            self._drop_filter(close=True)
            self._restore_read_only()
            raise
        # The job's populate reads go through a BlockBackend of its own on the
        # filter (QEMU's s->blk): blockdev-del of the filter then says "is in use",
        # and x-debug-query-block-graph shows it. It goes in clean().
        self.filter.backend_users.append(self)
        with graph.graph_change("job-add-node"):
            self.attach_node(device, block=True, edge=ACTIVE_NODE_EDGE)
        for node in chain_nodes(device.filter_or_cow_child(), base) \
                if device.filter_or_cow_child() is not None else []:
            with graph.graph_change("job-add-node"):
                self.attach_node(node, block=True, edge=INTERMEDIATE_NODE_EDGE)

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        device = self.device
        if skip_filters(device) is self.base_overlay:
            return 0          # nothing to stream: the device has no backing
        length = device.size
        self.progress_set_remaining(length)
        offset = 0
        delay_ns = 0
        error = 0
        while offset < length or self._pieces:
            if offset < length:
                # Even without a rate limit the job yields here once per step.
                await self.ratelimit_sleep(delay_ns)
                delay_ns = 0
                if self.is_cancelled:
                    break
                piece = await self._step(offset, min(STREAM_CHUNK if self.speed else STREAM_BATCH,
                                                     length - offset))
                self._pieces.append(piece)
                offset += piece.count
            # The next step is looked up while this copy is in the pool, unless
            # nothing is left to look up.
            if offset >= length:
                await self._wait_for_copies(0)
            delay_ns += self._count_finished()
            failed = self._pieces[0] if self._pieces else None
            if failed is None or failed.running:
                continue
            # A failed step: what was started after it finishes and is looked up
            # again later (its data stays; it equals what the chain held).
            await self._wait_for_copies(0)
            self._pieces.clear()
            offset = failed.offset
            action = self.error_action(self.on_error, True, failed.errno)
            if action == "stop":
                delay_ns = 0
                continue
            if not error:
                error = -failed.errno
            if action == "report":
                break
            self.progress_update(failed.count)
            offset += failed.count
        # Cancelled or failed: the copies in flight finish first (QEMU's job has
        # none in flight at its pause points).
        await self._wait_for_copies(0)
        self._count_finished()
        self._pieces.clear()
        # An error that was ignored still keeps the backing file.
        return error

    async def _step(self, offset: int, size: int) -> "_Piece":
        """One stream step. A copy the pool makes in one task is left running
        (without a rate limit); the piece says when it is done."""
        try:
            kind, count = layer_status(self.device, offset, size)
            if kind != UNALLOCATED:
                return _Piece(offset, count, copied=False)
            # What the layers down to the base's overlay hold decides; the filter
            # copies it as its populate would (one look at those layers for both).
            below = self.filter.extent_below(offset, count)
        except OSError as exc:
            # A metadata read of the block status failed (an L2 table): a read
            # error of the step, which covers nothing.
            return _Piece(offset, 0, copied=False, errno=exc.errno or errno.EIO)
        piece = _Piece(offset, below.count, copied=below.copy)
        if not below.copy:
            return piece
        one_task = self.filter.copies_in_one_task(offset, below)
        if below.count > STREAM_CHUNK and not one_task:
            # Read into the loop and written back: QEMU's step size (an error then
            # stops the job where QEMU's would).
            below.count = piece.count = STREAM_CHUNK
        background = one_task and not self.speed
        if background:
            # The copies before this one must first keep their clusters (or
            # finish): clusters are then allocated in QEMU's order, since a copy
            # that reads as zeroes gives its clusters back before the next allocates.
            while len(self._copies) >= STREAM_COPIES_IN_FLIGHT \
                    or any(not p.kept for p in self._copies.values()):
                await self.park_until_woken(self._copies_changed)
        else:
            await self._wait_for_copies(0)
        if any(earlier.errno for earlier in self._pieces):
            return _Piece(offset, 0, copied=False)     # looked up again after it
        if not background:
            await self._copy(piece, below)
            return piece
        copy = CoroutineRunner(self._copy(piece, below, background=True),
                               on_done=self._copy_done, name=f"stream {self.id} copy {offset}")
        self._copies[copy] = piece
        copy.enter()
        return piece

    async def _copy(self, piece: "_Piece", below: "_Below", background: bool = False) -> None:
        on_kept = None
        if background:
            on_kept = functools.partial(self._kept_in_pool, asyncio.get_running_loop(), piece)
        piece.running = True
        try:
            await self.filter.copy_extent(piece.offset, below, STREAM_CHUNK, on_kept)
        except OSError as exc:
            piece.errno = exc.errno or errno.EIO
        piece.running = False

    def _kept_in_pool(self, loop: asyncio.AbstractEventLoop, piece: "_Piece") -> None:
        """CheckedCopy.on_kept, in the pool thread: tell the job in its loop."""
        try:
            loop.call_soon_threadsafe(self._copy_kept, piece)
        except RuntimeError:
            pass          # the loop has closed (shutdown): no job waits any more

    def _copy_kept(self, piece: "_Piece") -> None:
        piece.kept = True
        self.wake(self._copies_changed)

    def _copy_done(self, runner: CoroutineRunner) -> None:
        self._copies.pop(runner, None)
        self.wake(self._copies_changed)

    async def _wait_for_copies(self, running: int) -> None:
        """Until at most ``running`` copies are still in the pool."""
        while len(self._copies) > running:
            await self.park_until_woken(self._copies_changed)

    def _count_finished(self) -> int:
        """Progress for the steps done, in order, up to one that failed or is still
        running; returns the rate limit's delay for what they copied."""
        delay_ns = 0
        while self._pieces and not self._pieces[0].running and not self._pieces[0].errno:
            piece = self._pieces.popleft()
            self.progress_update(piece.count)
            if piece.copied:
                delay_ns = self.ratelimit_delay_ns(piece.count)
        return delay_ns

    async def on_pause(self) -> None:
        # Nothing in flight while paused, and the progress shown counts it.
        await self._wait_for_copies(0)
        self._count_finished()

    def drained_poll(self) -> bool:
        # A copy in flight is a request on the device in QEMU: a drain waits for
        # it, even while the job itself sleeps or waits for it.
        return super().drained_poll() or (not self.is_completed and bool(self._copies))

    def request_runners(self) -> "Iterable[CoroutineRunner]":
        # A drain finishes the copies in flight, then the job's own wait.
        return (*self._copies, *super().request_runners())

    # ------------------------------------------------------------------ finish

    def prepare(self) -> int:
        """stream_prepare: filter out of the chain, new backing, header rewritten."""
        self._unfreeze()
        device = skip_filters(self.device)
        base = skip_filters(self.base)
        if device is not None and device.backing_node() is not None:
            if is_qcow2(device):
                name = fmt = None
                if base is not None:
                    name = self.backing_file or base.filename()
                    fmt = backing_format_name(base, self.backing_mask_protocol)
                try:
                    change_backing_file(device, name, fmt)
                except (OSError, QMPError):
                    return -errno.EPERM
        # Three graph-lock sections, as qemu-storage-daemon 10.0 and 11.1 show
        # them to other jobs: the filter's parents go back to the device, the
        # filter is dropped, the device gets its new backing.
        self.filter_in_chain = False
        self.graph.graph_changes("replace-node")
        with self.graph.graph_change("drop-filter"):
            self.graph.remove_filter_from_chain(self.filter)
        if device is not None and device.backing_node() is not None:
            old = device.backing_node()
            with self.graph.graph_change("set-backing"):
                self.graph.set_backing(device, base)
            self._release_dropped(old)
        return 0

    def _release_dropped(self, old: "BlockNode | None") -> None:
        """Nodes the chain no longer reaches go once nothing holds them, unless the
        monitor owns them (QEMU's reference counting)."""
        stop = skip_filters(self.base)
        node = old
        while node is not None and node is not stop:
            below = node.backing_node()
            if not node.monitor_owned:
                node.release_when_unused = True
                self.graph.release_implicit(node)
            node = below

    def _unfreeze(self) -> None:
        """bdrv_unfreeze_backing_chain, once: just before the job's own change."""
        unfreeze_links(self.frozen_links)
        self.frozen_links = []

    def clean(self) -> None:
        self._unfreeze()
        if self.filter_in_chain:
            # Not finalized (cancelled, failed): the filter still sits in the
            # chain and goes now, with prepare's first two sections.
            self.filter_in_chain = False
            self.graph.graph_changes("replace-node")
            with self.graph.graph_change("drop-filter"):
                self.graph.remove_filter_from_chain(self.filter)
        # stream_clean's blk_unref(s->blk), after the filter left the chain.
        self._drop_backend()
        if self.graph.personality.has(STREAM_RESTORES_READ_ONLY):
            self._restore_read_only()
        super().clean()

    def _drop_backend(self) -> None:
        if self in self.filter.backend_users:
            self.filter.backend_users.remove(self)

    def _restore_read_only(self) -> None:
        if self.device_read_only and self.reopen is not None:
            self.device_read_only = False
            self.reopen(self.device, True)

    def on_free(self) -> None:
        # block_job_free: the job lets go of its nodes, and with its hold on the
        # filter the filter's last reference goes (its close nested inside).
        self._drop_backend()      # a job that failed before it ran keeps none
        with self.block_graph.graph_change("job-remove-nodes"):
            self.release_nodes()
            if self.graph.nodes.get(self.filter.node_name) is self.filter:
                self.graph.remove_filter_from_chain(self.filter)
                self.graph.nodes.pop(self.filter.node_name, None)
                self.filter.detach_children()
                with self.graph.graph_change("close"):
                    self.filter.close()

    def _drop_filter(self, *, close: bool) -> None:
        if self.graph.nodes.get(self.filter.node_name) is not self.filter:
            return
        with self.graph.graph_change("drop-filter"):
            self.graph.remove_filter_from_chain(self.filter)
            self.graph.nodes.pop(self.filter.node_name, None)
            self.filter.detach_children()
        if close:
            with self.graph.graph_change("close"):
                self.filter.close()
