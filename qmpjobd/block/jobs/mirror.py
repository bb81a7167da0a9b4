"""The mirror job: copy a source node onto a target node, stay in sync, then pivot.

Shape of QEMU 7.2's mirror.c (what the transcripts show):

* Creation inserts an implicit ``mirror_top`` filter above the source; the job's main
  node is that filter. Filter, source and target are blocked ("busy"); the target is
  held through a BlockBackend, so blockdev-del says "Node <t> is in use" for it.
* ``run()`` checks the sizes ("Source and target image have different sizes" is a
  run-time failure), marks the dirty bitmap (everything for full/top, nothing for
  none), then loops: dispatch one *iteration* (at most ``buf-size`` bytes of dirty
  chunks, split into operations of ``max(buf-size/16, 1 MiB)``, run as concurrent
  coroutines), wait for operations when the buffer or the 16 slots are used up, and
  sleep for the rate limit accounted for the iteration. When nothing is dirty and
  nothing is in flight, the target is flushed and the job becomes READY.
* A failed operation re-marks its chunk dirty and applies ``on-source-error`` (read)
  or ``on-target-error`` (write); the operations already dispatched still complete
  and count, which is why a failure of the first MiB reports ``offset`` 7340032 on
  an 8 MiB source. ``report`` ends the job at the next loop turn; ``stop`` pauses it
  (the chunk is retried after resume); ``ignore`` retries at once.
* A READY job with nothing to do waits until it is completed, cancelled or paused
  (QEMU polls every 100 ms; nothing can make it dirty here, as there are no guest
  writes).
* ``job-complete`` sets should-complete; the job leaves ``run()`` and its prepare
  step pivots: parents of the replaced node (default: the source) now use the
  target. A soft cancel (block-job-cancel without force) of a READY job also leaves
  ``run()`` successfully, but without pivot. Any other cancel is a force cancel.
* Between leaving ``run()`` and its prepare/abort step the source stays drained,
  which is why a PENDING mirror shows ``paused: true`` in query-block-jobs. The job
  begins that drain in its coroutine, which QEMU does from a bottom half: a
  job-complete, job-cancel or job-resume that lets the job finish is answered before
  ``waiting``/``aborting`` and the rest.

Zero extents of the source (holes of a sparse file, null-co with read-zeroes) are
written as zeroes, skipped when the target already reads as zero there, so a sparse
source gives a sparse-where-possible target with identical contents.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Iterable

from qmpjobd.block import permissions
from qmpjobd.block.bitmap import ClusterBitmap
from qmpjobd.block.drivers.mirror_top import MirrorTopNode
from qmpjobd.block.formats.qcow2.backing import (
    UNALLOCATED,
    cow_child,
    find_overlay,
    skip_filters,
    is_qcow2,
    layer_status,
    status_in_layers,
)
from qmpjobd.block.graph import freeze_chain, unfreeze_links
from qmpjobd.block.jobs.base import BlockJob
from qmpjobd.block.offload import copy_range, failed_on_read
from qmpjobd.block.status import depth as allocation_depth
from qmpjobd.errors import QMPError
from qmpjobd.job.coroutine import CoroutineRunner
from qmpjobd.versions import Behaviour

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.graph import BlockGraph
    from qmpjobd.block.node import BlockNode
    from qmpjobd.job.manager import JobManager

KiB = 1024
MiB = 1024 * KiB
MAX_IN_FLIGHT = 16
MAX_IO_BYTES = 1 * MiB
DEFAULT_BUF_SIZE = MAX_IN_FLIGHT * MAX_IO_BYTES
DEFAULT_GRANULARITY = 64 * KiB
GRANULARITY_MIN = 512
GRANULARITY_MAX = 64 * MiB
# Observed: 7.2 lists the job's bitmap on the source, recording; 10.0 and 11.1 on
# the mirror_top filter, not recording (the filter marks writes itself). The
# release in between that moved it was not pinned down; 10.0 is the first we
# impersonate that has it.
BITMAP_ON_FILTER = Behaviour("the mirror's dirty bitmap sits on mirror_top, disabled",
                             since="10.0")
# Observed: 11.1 leaves out the zero writes into a qcow2 target that read as all
# zeroes when the job began (QEMU 10.1's mirror learnt bdrv_co_is_all_zeroes);
# 7.2 and 10.0 write zero clusters there.
SKIPS_ZEROES_ON_ZERO_TARGET = Behaviour(
    "a mirror into a qcow2 target that reads as zeroes at the start skips its zero "
    "writes", since="10.1")
# How often QEMU's READY mirror wakes up when it has nothing to do (one slice).
READY_POLL_NS = 100_000_000


def check_granularity(granularity: int) -> None:
    """blockdev_mirror_common's checks, in QEMU's order (0 means default)."""
    if granularity and (granularity < GRANULARITY_MIN or granularity > GRANULARITY_MAX):
        raise QMPError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise QMPError("Parameter 'granularity' expects a power of 2")


class DirtyBitmap(ClusterBitmap):
    """Dirty chunks of ``granularity`` bytes (one bit each); counts are bytes of
    whole chunks."""

    __slots__ = ("length", "granularity")

    def __init__(self, length: int, granularity: int) -> None:
        super().__init__(-(-length // granularity))
        self.length = length
        self.granularity = granularity

    @property
    def dirty_chunks(self) -> int:
        return self.count

    @property
    def dirty_bytes(self) -> int:
        """Bytes covered by dirty chunks (the last chunk may be short)."""
        total = self.count * self.granularity
        if self.size and self.get(self.size - 1):
            total -= self.size * self.granularity - self.length
        return total

    def set(self, offset: int, length: int, dirty: bool) -> None:
        first = offset // self.granularity
        last = -(-(offset + length) // self.granularity)
        self.set_range(first, last, dirty)

    def next_dirty_run(self, start: int, max_bytes: int) -> tuple[int, int] | None:
        """First run of dirty chunks at or after byte ``start`` (wrapping once)."""
        first = self.next_set(start // self.granularity)
        if first < 0:
            first = self.next_set(0)
            if first < 0:
                return None
        limit = min(self.size, first + max(max_bytes // self.granularity, 1))
        clean = self.next_clear(first, limit)
        end = limit if clean < 0 else clean
        offset = first * self.granularity
        return offset, min(end * self.granularity, self.length) - offset


class _ObservedMirrorTop(MirrorTopNode):
    """mirror_top as a mirror job inserts it: exports of the source move onto it
    (QEMU's bdrv_append), and what they write there is marked dirty for the job
    to copy again, as QEMU's mirror_top write path does."""

    job: "MirrorJob | None" = None

    async def _pwritev(self, offset: int, data: bytes) -> None:
        try:
            await super()._pwritev(offset, data)
        finally:
            if self.job is not None:
                self.job.source_written(offset, len(data))


class _ObservedCommitTop(_ObservedMirrorTop):
    """mirror_top of an active commit (QEMU's is_commit): it neither reads its
    child consistently nor keeps others from writing it."""

    is_commit = True


def _lowest_copied_layer(source: "BlockNode", sync: str,
                         copy_base: "BlockNode | None") -> "BlockNode | None":
    """sync=top: the source's own layer; a commit base: the node just above it;
    else None (everything the chain holds). A source without backing copies all."""
    if copy_base is not None:
        return find_overlay(source, copy_base)
    if sync == "top" and cow_child(source) is not None:
        return source
    return None


def _zeroes_come_from_backing(target: "BlockNode", offset: int, length: int) -> bool:
    """The target reads zeroes there only through its backing file: its own layer
    must still record them (a qcow2 overlay gets zero clusters, as in QEMU)."""
    if cow_child(target) is None:
        return False
    kind, _count = layer_status(target, offset, length)
    return kind == UNALLOCATED


def _reads_as_zeroes(node: "BlockNode", length: int) -> bool:
    """The node's block status says zeroes for all of [0, length) (QEMU's
    bdrv_co_is_all_zeroes at the start of a mirror)."""
    offset = 0
    while offset < length:
        try:
            kind, count = node.block_status(offset, length - offset)
        except OSError:
            return False          # damaged: the copy meets it itself
        if kind != "zero":
            return False
        offset += max(count, 1)
    return True


class MirrorJob(BlockJob):
    """``blockdev-mirror`` / ``drive-mirror`` job (type ``mirror``)."""

    __slots__ = ("graph", "source", "target", "sync", "zero_target", "replaces",
                 "granularity", "buf_size", "max_io_bytes", "on_source_error",
                 "on_target_error", "length", "dirty", "should_complete", "synced",
                 "failure_ret", "_ops", "_bytes_in_flight", "_ops_changed",
                 "_source_drained", "_in_drain", "_errors_seen", "filter",
                 "source_backing_chain", "copy_mode", "actively_synced",
                 "reports_actively_synced", "target_is_zero", "copy_above",
                 "target_was_zero",
                 "_pivoted_source", "frozen_links", "target_perms")

    job_type = "mirror"
    can_complete = True

    def __init__(self, manager: "JobManager", graph: "BlockGraph", job_id: str | None,
                 source: "BlockNode", target: "BlockNode", *, sync: str = "full",
                 replaces: "BlockNode | None" = None, speed: int = 0, granularity: int = 0,
                 buf_size: int = 0, on_source_error: str = "report",
                 on_target_error: str = "report", auto_finalize: bool = True,
                 auto_dismiss: bool = True, filter_node_name: str | None = None,
                 zero_target: bool = True, source_backing_chain: bool = False,
                 copy_mode: str = "background", target_is_zero: bool = False,
                 reports_actively_synced: bool = False,
                 copy_base: "BlockNode | None" = None) -> None:
        """QEMU's mirror_start_job, from the buf-size check to the attached target.

        ``sync`` ``top`` copies what the source's own layer holds; ``copy_base``
        (active commit) what the layers above that node hold. Either way the
        rest of the chain is read through the source as it is.
        """
        if buf_size < 0:
            raise QMPError("Invalid parameter 'buf-size'")
        if source is target:
            raise QMPError("Can't mirror node into itself")
        self.graph = graph
        self.source = source
        self.target = target
        self.sync = sync
        # blockdev-mirror full: make the whole target equal (QEMU's zero_target);
        # drive-mirror onto a new image: the target reads zeroes already.
        self.zero_target = zero_target
        self.replaces = replaces if replaces is not None else source
        self.granularity = granularity or DEFAULT_GRANULARITY
        self.buf_size = buf_size or DEFAULT_BUF_SIZE
        self.max_io_bytes = max(self.buf_size // MAX_IN_FLIGHT, MAX_IO_BYTES)
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.length = source.size
        self.dirty = DirtyBitmap(self.length, self.granularity)
        self.should_complete = False
        self.synced = False
        self.failure_ret = 0
        # Operations in flight, oldest first (a dict keeps dispatch order, so a
        # drain finishes them in the order they were issued).
        self._ops: dict[CoroutineRunner, None] = {}
        self._bytes_in_flight = 0
        self._ops_changed = object()      # park reason: an operation finished
        self._source_drained = False
        self._in_drain = False            # QEMU's in_drain: run() is draining the source
        self._errors_seen = False
        # QEMU's MIRROR_SOURCE_BACKING_CHAIN (drive-mirror, absolute-paths): only
        # the graph changes at the job's end depend on it.
        self.source_backing_chain = source_backing_chain
        # MirrorCopyMode; write-blocking becomes actively synced once in sync.
        self.copy_mode = copy_mode
        self.actively_synced = False
        # query-block-jobs shows actively-synced (a personality decision).
        self.reports_actively_synced = reports_actively_synced
        # The caller promises the target reads as zeroes: never write zeroes.
        self.target_is_zero = target_is_zero
        # Whether the target read as zeroes when the copy began (set in run).
        self.target_was_zero = False
        # The lowest layer whose data counts as the source's (QEMU's base of
        # bdrv_is_allocated_above in mirror_dirty_init); None: the whole chain.
        self.copy_above = _lowest_copied_layer(source, sync, copy_base)
        self._pivoted_source = False       # exports follow a pivot of the source
        self.frozen_links: list = []
        # mirror_start_job: the target's BlockBackend writes; for an active commit
        # (the target is in the source's chain) it resizes a shorter base, and
        # it shares reads and writes (the base is in use below the source).
        self.target_perms = permissions.BACKEND_PERMS["mirror-target"]
        if copy_base is not None:
            resize = permissions.RESIZE if target.size < source.size else 0
            self.target_perms = (permissions.WRITE | resize,
                                 permissions.WRITE_UNCHANGED | permissions.CONSISTENT_READ
                                 | permissions.WRITE)
        top_class = _ObservedCommitTop if copy_base is not None else _ObservedMirrorTop
        self.filter = graph.insert_filter(top_class, filter_node_name, source)
        self.filter.job = self
        try:
            super().__init__(manager, job_id, self.filter, block_main=True, speed=speed,
                             auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        except BaseException:
            graph.drop_filter(self.filter)
            raise
        try:
            graph.graph_changes("backend-insert")         # the job's target BlockBackend
            if target.read_only:
                raise QMPError("Block node is read-only")
            if not target.active:
                raise QMPError("Permission 'write' unavailable on inactive node")
            with graph.graph_change("job-add-node"):
                self.attach_node(target, block=True)
                target.backend_users.append(self)
                self.attach_node(source, block=True)
            if copy_base is not None:
                # mirror_start_job of an active commit (target in the source's
                # chain): the links from the filter down to the target stay put.
                self.frozen_links = freeze_chain(self.filter, target)
        except QMPError:
            self._exit_common(abort=True)
            self.early_fail()
            raise
        self._bitmap_node().dirty_bitmaps.append(self._bitmap_info)

    # ------------------------------------------------------------------ hooks

    def backend_perms(self, node: "BlockNode") -> tuple[int, int]:
        """(perm, shared) of the job's target BlockBackend (s->target)."""
        return self.target_perms

    def cancel_is_forced(self, force: bool) -> bool:
        # A soft cancel only exists for a READY (or STANDBY) mirror.
        return force or not self.is_ready

    def complete_request(self) -> None:
        if not self.synced:
            raise QMPError(f"The active block job '{self.id}' cannot be completed")
        if self.replaces is not self.source and self.graph.find(self.replaces.node_name) is None:
            raise QMPError(f"Node name '{self.replaces.node_name}' not found")
        self.should_complete = True
        if not self.paused:
            self.enter()

    def drained_poll(self) -> bool:
        """QEMU's mirror_drained_poll: a mirror that is neither paused, cancelled nor
        draining itself may still issue requests; otherwise only its operations count.

        An operation in flight counts even while the job is parked for it: QEMU's
        job stays busy in that wait (a coroutine queue, not a job yield), and a
        drain waits for the operation's requests either way; the drain can then
        finish them (``request_runners``)."""
        if self.is_completed:
            return False
        if self._ops:
            return True
        return (super().drained_poll() and not self.paused and not self.is_cancelled
                and not self._in_drain)

    def request_runners(self) -> "Iterable[CoroutineRunner]":
        # The copy operations in flight (a drain finishes their thread-pool
        # requests one by one; the last one done wakes the job on to its pause
        # point), then the job itself.
        return (*self._ops, *super().request_runners())

    async def on_pause(self) -> None:
        # QEMU's mirror_pause: no operation may be in flight while paused.
        await self._wait_for_all_ops()

    def prepare(self) -> int:
        self._exit_common(pivot=self.should_complete and not self.is_cancelled)
        return 0

    def abort(self) -> None:
        self._exit_common(abort=True)

    def clean(self) -> None:
        self._exit_common()
        holder = self._bitmap_node()
        if self._bitmap_info in holder.dirty_bitmaps:
            holder.dirty_bitmaps.remove(self._bitmap_info)
        if self in self.target.backend_users:
            self.target.backend_users.remove(self)
        super().clean()

    def on_free(self) -> None:
        self.clean()
        super().on_free()

    def release_run_state(self) -> None:
        super().release_run_state()
        # clean() has taken the bitmap off the source and no operation is left.
        del self.dirty, self._ops

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        try:
            return await self._run()
        finally:
            await self._wait_for_all_ops()
            # The source stays drained until prepare/abort (mirror_exit_common).
            if not self._source_drained:
                await self._drain_source()

    async def _drain_source(self) -> None:
        """bdrv_drained_begin() called in the job coroutine: QEMU leaves the coroutine
        and drains from a bottom half (bdrv_co_yield_to_drain), so what follows, and
        the job's completion, come after the reply of a command that woke the job
        (job-complete, job-cancel, job-resume)."""
        self._in_drain = True            # drained_poll must not wait for ourselves
        await self.manager.bottom_half_turn()
        self._source_drained = True
        self.graph.drained_begin([self.source])

    async def _run(self) -> int:
        if self.job_type == "commit":
            # mirror_run of an active commit: a shorter base grows to the
            # source's length first, a longer one is left as it is.
            if self.target.size < self.length:
                from qmpjobd.block.jobs.commit import grow_base
                failure = grow_base(self.target, self.length)
                if failure:
                    return failure
        elif self.target.size != self.length:
            raise QMPError("Source and target image have different sizes")
        self.target_was_zero = (is_qcow2(self.target)
                                and self.graph.personality.has(SKIPS_ZEROES_ON_ZERO_TARGET)
                                and _reads_as_zeroes(self.target, self.length))
        if self.sync != "none" and self.length:
            await self._dirty_init()
        while True:
            if self.failure_ret:
                return self.failure_ret
            await self.pause_point()
            if self.is_cancelled:
                return 0
            dirty_bytes = self.dirty.dirty_bytes
            self.progress_set_remaining(self._bytes_in_flight + dirty_bytes)
            if self._ops and (len(self._ops) >= MAX_IN_FLIGHT or dirty_bytes == 0
                              or self._bytes_in_flight >= self.buf_size):
                await self._wait_for_any_op()
                continue
            delay_ns = await self._iteration() if dirty_bytes else 0
            should_complete = False
            # Decided on the count from before this turn's iteration, as QEMU does:
            # a rate-limited mirror sleeps once more before it becomes READY.
            if not self._ops and dirty_bytes == 0:
                if not self.synced:
                    if await self._flush_target():
                        continue
                    self.synced = True
                    self.ready()
                if self.copy_mode != "background":
                    self.actively_synced = True
                should_complete = self.should_complete or self.cancel_requested
            if should_complete and not self.dirty.dirty_chunks:
                return 0
            if self.synced and not should_complete and not self._ops \
                    and not self.dirty.dirty_chunks:
                # In sync and idle: wait for complete, cancel or pause.
                await self.yield_()
            elif delay_ns:
                await self.ratelimit_sleep(delay_ns)
            elif self._errors_seen:
                # A failing request is retried; give the loop a turn in between.
                self._errors_seen = False
                await self.park_until_woken(timeout_ns=0)
                await self.pause_point()
            else:
                # QEMU sleeps 0 ns here. Its timer fires in the same main-loop pass,
                # after the bottom halves, so the job goes on before the command's
                # reply, but what it schedules then (a null-aio flush) comes after.
                await self.manager.bottom_half_turn()
                await self.pause_point()
            if self.is_cancelled:
                return 0

    async def _dirty_init(self) -> None:
        """QEMU's mirror_dirty_init for full/top sync without backing files."""
        # target-is-zero: the target already reads as zeroes, nothing to clear.
        zero_target = self.zero_target and not self.target_is_zero
        if zero_target and not self.target.can_write_zeroes_with_unmap():
            self.dirty.set(0, self.length, dirty=True)
            return
        if zero_target:
            await self._zero_whole_target()
        offset = 0
        while offset < self.length:
            await self.pause_point()
            if self.copy_above is not None:
                layer, count = status_in_layers(self.source, self.copy_above, offset,
                                                self.length - offset)
                dirty = layer != UNALLOCATED
            else:
                # bdrv_is_allocated_above over the whole chain: what no layer
                # allocates (a qcow2's unallocated clusters) is not copied; a file's
                # holes are (a protocol node's zeroes count as allocated).
                level, count = allocation_depth(self.source, offset, self.length - offset)
                dirty = level > 0
            count = max(count, 1)
            if dirty:
                self.dirty.set(offset, count, dirty=True)
            offset += count

    async def _zero_whole_target(self) -> None:
        offset = 0
        while offset < self.length:
            size = min(self.max_io_bytes, self.length - offset)
            try:
                await self._write_zeroes(offset, size)
            except OSError as exc:
                # QEMU lets the copy loop find the error again: mark it dirty.
                self.dirty.set(offset, size, dirty=True)
                if exc.errno is None:
                    raise
            offset += size

    async def _flush_target(self) -> bool:
        """Flush before READY; True when it failed (the loop then checks again)."""
        try:
            await self.target.co_flush()
        except OSError as exc:
            error = exc.errno or errno.EIO
            self._errors_seen = True
            action = self.error_action(self.on_target_error, False, error)
            if action == "report" and not self.failure_ret:
                self.failure_ret = -error
            return True
        return False

    # ------------------------------------------------------------------ copying

    async def _iteration(self) -> int:
        """Dispatch up to buf-size bytes of dirty chunks; returns the rate-limit delay."""
        run = self.dirty.next_dirty_run(0, self.buf_size)
        if run is None:
            return 0
        offset, length = run
        end = offset + length
        accounted = 0
        zeroes_cheap = self.target.can_write_zeroes_with_unmap()
        while offset < end:
            size = min(self.max_io_bytes, end - offset)
            while self._ops and (len(self._ops) >= MAX_IN_FLIGHT
                                 or self._bytes_in_flight + size > self.buf_size):
                await self._wait_for_any_op()
            try:
                kind, status_bytes = self.source.block_status(offset, size)
            except OSError:
                # mirror_iteration copies what it cannot get a status for; the
                # read then meets the error, if it lasts.
                kind, status_bytes = "data", size
            if kind == "data" and status_bytes < size:
                # QEMU copies only the data extent (in whole chunks, at least one);
                # what follows is zeroed or discarded by the next operation.
                size = min(size, max(status_bytes - status_bytes % self.granularity,
                                     self.granularity))
            elif kind != "data" and status_bytes < size:
                # Zero or discard only whole chunks; a shorter extent is part of a
                # chunk holding data, which must be copied.
                whole = status_bytes - status_bytes % self.granularity
                if whole:
                    size = whole
                else:
                    kind = "data"
            # QEMU's mirror methods: copy data, write zeroes where the source reads
            # as zeroes, discard where it is neither (null-co without read-zeroes).
            method = {"zero": "zero", "unknown": "discard"}.get(kind, "copy")
            # The rate limit counts zeroing and discarding too, unless the target
            # can do them without writing data (QEMU's write_zeroes_ok).
            if method == "copy" or not zeroes_cheap:
                accounted += size
            self.dirty.set(offset, size, dirty=False)
            self._start_op(offset, size, method)
            offset += size
        return self.ratelimit_delay_ns(accounted)

    def _start_op(self, offset: int, length: int, method: str) -> None:
        self._bytes_in_flight += length
        runner = CoroutineRunner(self._op(offset, length, method), on_done=self._op_done,
                                 name=f"mirror {self.id} op {offset}")
        self._ops[runner] = None
        runner.enter()

    async def _op(self, offset: int, length: int, method: str) -> None:
        failure: tuple[bool, int] | None = None
        try:
            if method == "zero":
                await self._write_zeroes(offset, length)
            elif method == "discard":
                await self.target.co_pdiscard(offset, length)
            else:
                await copy_range(self.source, offset, self.target, offset, length)
        except OSError as exc:
            failure = (failed_on_read(exc), exc.errno or errno.EIO)
        self._bytes_in_flight -= length
        if failure is None:
            self.progress_update(length)
            return
        self._errors_seen = True
        self.dirty.set(offset, length, dirty=True)
        is_read, error = failure
        policy = self.on_source_error if is_read else self.on_target_error
        action = self.error_action(policy, is_read, error)
        if action == "report" and not self.failure_ret:
            self.failure_ret = -error

    async def _write_zeroes(self, offset: int, length: int) -> None:
        if self.target_is_zero:
            # Known zero (the user said so, and a mirror's target has no other
            # writer): QEMU skips the request altogether.
            return
        kind, count = self.target.block_status(offset, length)
        # A target that held data when the job began gets every zero request
        # (QEMU skips them only where it knows the target is zero).
        qcow2_target = is_qcow2(skip_filters(self.target))
        known_zero = self.target_was_zero or not qcow2_target
        if kind == "zero" and count >= length and known_zero:
            if _zeroes_come_from_backing(self.target, offset, length):
                # An overlay must record the zeroes itself (zero clusters).
                await self.target.co_pwrite_zeroes(offset, length)
                return
            # Nothing to change, but QEMU still sends the request down the chain.
            self.target.chain_write_started(offset, length)
            self.target.chain_write_finished(offset, length)
            return
        if qcow2_target:
            # QEMU's zero request with MAY_UNMAP (the mirror's unmap=true; the
            # node drops it unless opened with discard=unmap): zero clusters
            # replace the data, none is written.
            await self.target.co_pwrite_zeroes(offset, length, may_unmap=True)  # type: ignore[call-arg]
            return
        await self.target.co_pwrite(offset, bytes(length))

    def _op_done(self, runner: CoroutineRunner) -> None:
        self._ops.pop(runner, None)
        self.wake(self._ops_changed)

    async def _wait_for_any_op(self) -> None:
        if self._ops:
            await self.park_until_woken(self._ops_changed)

    async def _wait_for_all_ops(self) -> None:
        while self._ops:
            await self.park_until_woken(self._ops_changed)

    # ------------------------------------------------------------------ exit

    # ------------------------------------------------------------------ change

    def change_copy_mode(self, copy_mode: str) -> None:
        """block-job-change for a mirror: only background -> write-blocking exists.

        Like QEMU, the new mode takes effect at the job's next loop turn; a READY
        mirror idles in 100 ms sleeps there, so actively-synced turns true up to a
        slice after the reply, which a waker models here.
        """
        if copy_mode == self.copy_mode:
            return
        if copy_mode != "write-blocking":
            raise QMPError(f"Change to copy mode '{copy_mode}' is not implemented")
        self.copy_mode = copy_mode
        if self.synced:
            self.clock.call_later_ns(READY_POLL_NS, self._wake_if_idle)

    def source_written(self, offset: int, length: int) -> None:
        """A write through the filter (an export's): copy that range again. A READY
        mirror notices at its next idle slice, as QEMU's does."""
        dirty = getattr(self, "dirty", None)
        if dirty is None or not length:
            return
        dirty.set(offset, min(length, max(self.length - offset, 0)), dirty=True)
        if self.synced:
            self.clock.call_later_ns(READY_POLL_NS, self._wake_if_idle)

    def _wake_if_idle(self) -> None:
        # Only the READY idle wait: a paused job takes the new mode after resuming.
        self.enter_cond(lambda: self.status.value == "ready" and not self.paused)

    def block_job_info(self) -> dict:
        info = super().block_job_info()
        if self.reports_actively_synced:
            # The mirror branch of the BlockJobInfo union, after the base members.
            info["actively-synced"] = self.actively_synced
        return info

    def _exit_common(self, *, pivot: bool = False, abort: bool = False) -> None:
        """mirror_exit_common: pivot if asked, drop the filter and end the exit
        drain (idempotent: only the first call does anything)."""
        # The chain unfreezes before the job's own graph changes.
        unfreeze_links(self.frozen_links)
        self.frozen_links = []
        if self.filter.node_name in self.graph.nodes:
            self._exit_graph_changes(pivot=pivot, abort=abort)
        if self._source_drained:
            self._source_drained = False
            self.graph.drained_end([self.source])
        if self.filter.node_name in self.graph.nodes:
            # After a pivot of the source, the exports on the filter go where the
            # source's users went (bdrv_replace_node of the filter by its child,
            # whose link followed the source's replacement).
            self.graph.drop_filter(self.filter,
                                   self.target if self._pivoted_source else None)

    def _exit_graph_changes(self, *, pivot: bool, abort: bool) -> None:
        """The graph changes of mirror_exit_common before the filter goes, in QEMU's
        order (the filter's own follow in drop_filter; the job's edges are released
        in clean())."""
        self.graph.graph_changes("backend-remove")         # blk_unref(s->target)
        # Its write permission goes first: before a pivot, and before an aborted
        # active commit makes the base read-only again.
        if self in self.target.backend_users:
            self.target.backend_users.remove(self)
            permissions.refresh(self.graph, may_fail=False)
        if self.source_backing_chain and not abort:
            self.graph.graph_changes("mirror-source-backing")
        if pivot:
            self.graph.replace_node(self.replaces, self.target, keep=self.filter)
            self._pivoted_source = self.replaces is self.source
        self.graph.graph_changes("job-remove-nodes")

    def _bitmap_node(self) -> "BlockNode":
        """Where the job's dirty bitmap shows: on the source, or (10.0 on) on the
        mirror_top filter, which marks writes itself and keeps it disabled."""
        if self.graph.personality.has(BITMAP_ON_FILTER):
            return self.filter
        return self.source

    def _bitmap_info(self) -> dict:
        """BlockDirtyInfo of the job's bitmap (QAPI declaration order)."""
        return {"count": self.dirty.dirty_bytes, "granularity": self.granularity,
                "recording": not self.graph.personality.has(BITMAP_ON_FILTER),
                "busy": False, "persistent": False}
