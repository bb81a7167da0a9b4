"""The backup job: a point-in-time copy of a source node onto a target node.

Copying follows QEMU's block-copy (what qemu-storage-daemon 7.2 really does, and what
the transcripts' offsets show): a bitmap of dirty *clusters* (64 KiB, or the target's
larger cluster size) is copied in *chunks* of up to 1 MiB, each chunk by a worker
coroutine (up to 64 in flight), with the rate limit accounted per chunk when it is
dispatched. So a job limited to 1 MiB/s copies its first MiB at once and then sleeps,
and a failed chunk does not stop chunks already dispatched (their progress counts).

Pausing and cancelling stop the dispatch of new chunks; the job waits for the
chunks in flight and then passes its pause point (QEMU's backup_pause cancels the
block-copy call the same way). Errors are handled per ``on-source-error`` (reads)
and ``on-target-error`` (writes): report fails the job, ignore retries at once,
stop pauses the job until resumed and then retries.

Progress is counted in whole clusters, as QEMU does: a 1000000-byte node reports
``len`` 1048576.

The job shares its copy bitmap with a copy-before-write filter it puts above the
source (``qmpjobd.block.drivers.copy_before_write``, shown in queries as QEMU
shows its backup-top node, named by ``filter-node-name``): a write to the source
by anybody else first saves the clusters the job has not copied yet, which counts
as job progress. That is all ``sync: none`` does; ``top`` skips what the source's
backing chain provides; ``bitmap`` (and ``incremental``) copies the clusters of a
dirty bitmap, which gets a successor at creation and, at the end, the successor's
bits (success, or ``always``) or the merge of both (failure, cancel, ``never``);
a failed ``always`` job adds the clusters it had not copied. Each copy task is
cut at a block-status boundary: areas the source reads as zeroes become zero
writes on the target.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from qmpjobd.block.drivers.copy_before_write import (
    BlockCopyState,
    CopyBeforeWriteNode,
    block_copy_cluster_size,
    check_min_cluster_size,
    DirtyClusters,
    bitmap_use_problem,
    relinked_first,
    target_cluster_size,
)
from qmpjobd.block import permissions
from qmpjobd.block.offload import failed_on_read
from qmpjobd.block.jobs.base import BlockJob
from qmpjobd.block.status import depth
from qmpjobd.errors import QMPError
from qmpjobd.job.coroutine import CoroutineRunner
from qmpjobd.job.txn import JobTxn

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.node import BlockNode
    from qmpjobd.job.manager import JobManager

KiB = 1024
MiB = 1024 * KiB
# Largest chunk one read+write copies (QEMU's BLOCK_COPY_MAX_BUFFER).
CHUNK_MAX = 1 * MiB
MAX_WORKERS_DEFAULT = 64
INT_MAX = 2**31 - 1
# Park reason of a job's rate-limit sleep (wake() only ever compares a job's own
# park reason, so one object serves every job).
_RATE_WAIT = object()


@dataclass
class BackupPerf:
    """The ``x-perf`` tuning knobs of QEMU 7.2."""

    use_copy_range: bool = False
    max_workers: int = MAX_WORKERS_DEFAULT
    max_chunk: int = 0            # 0: no limit beyond the copy method's own
    min_cluster_size: int = 0     # 10.0+: lower bound of the copy granularity


def target_knows_block_size(target: "BlockNode") -> bool:
    """Whether QEMU's bdrv_get_info() works on the target: file-backed nodes
    answer it (the same test decides ``dirty-flag`` in queries), null-co does not."""
    return target.has_dirty_flag()


def is_allocated(node: "BlockNode", offset: int, length: int) -> tuple[bool, int]:
    """Whether the top layer holds the extent at ``offset``, and for how many bytes
    (QEMU's bdrv_is_allocated: a qcow2 cluster its backing file provides is not)."""
    # The chain walk of qemu:allocation-depth answers exactly this: depth 1 is
    # "allocated in the node itself".
    level, count = depth(node, offset, length)
    return level == 1, max(count, 1)


__all__ = ["BackupJob", "BackupPerf", "DirtyClusters", "target_cluster_size"]


@dataclass
class _CopyFailure:
    is_read: bool
    error: int


class _WorkerPool:
    """Chunk copies in flight (QEMU's aio task pool); the job parks while it is full."""

    __slots__ = ("job", "max_workers", "active", "failure")

    def __init__(self, job: "BackupJob", max_workers: int) -> None:
        self.job = job
        self.max_workers = max_workers
        self.active: set[CoroutineRunner] = set()
        self.failure: _CopyFailure | None = None

    async def start(self, claim: Any, offset: int, length: int, zero: bool) -> bool:
        """Start one chunk copy; True when the pool was full and the job waited."""
        waited = False
        while len(self.active) >= self.max_workers:
            await self.job.park_until_woken(self)
            waited = True
        runner = CoroutineRunner(self.job._copy_chunk(self, claim, offset, length, zero),
                                 on_done=self._finished, name=f"backup chunk {offset}")
        self.active.add(runner)
        runner.enter()
        return waited

    def record_failure(self, is_read: bool, error: int) -> None:
        if self.failure is None:
            self.failure = _CopyFailure(is_read, error)

    def _finished(self, runner: CoroutineRunner) -> None:
        self.active.discard(runner)
        self.job.wake(self)

    async def wait_all(self) -> None:
        while self.active:
            await self.job.park_until_woken(self)


class BackupJob(BlockJob):
    """``blockdev-backup`` / ``drive-backup`` job (type ``backup``)."""

    __slots__ = ("source", "target", "sync", "on_source_error", "on_target_error", "perf",
                 "cluster_size", "length", "dirty", "_in_flight_bytes", "discard_source",
                 "bcs", "sync_bitmap", "bitmap_mode", "_notifier", "filter", "_pool")

    job_type = "backup"

    def __init__(self, manager: "JobManager", job_id: str | None,
                 source: "BlockNode", target: "BlockNode", *, sync: str = "full",
                 speed: int = 0, on_source_error: str = "report",
                 on_target_error: str = "report", auto_finalize: bool = True,
                 auto_dismiss: bool = True, txn: JobTxn | None = None,
                 perf: BackupPerf | None = None, compress: bool = False,
                 discard_source: bool = False,
                 warn_block_size: "Callable[[int], None] | None" = None,
                 bitmap: Any = None, bitmap_mode: str = "on-success",
                 filter_node_name: str | None = None,
                 on_cbw_error: str | None = None) -> None:
        """QEMU's backup_job_create, from its first check to the attached job.

        ``bitmap`` (a DirtyBitmap of the source) gets a successor here that records
        the writes made while the job runs; what happens to the two at the end is
        ``bitmap_mode``'s business (see ``_cleanup_sync_bitmap``). A failure after
        the successor exists merges it back, so the bitmap is as it was.
        """
        perf = perf or BackupPerf()
        check_backup_nodes(source, target, compress, perf)
        self.sync_bitmap = None
        self.bitmap_mode = bitmap_mode
        if bitmap is not None:
            freeze_sync_bitmap(bitmap, bitmap_mode)
            self.sync_bitmap = bitmap
        try:
            check_same_size(source, target)
            filter_name, filter_auto = claim_filter_name(source, filter_node_name)
            check_filter_attach(filter_name, source, target)
            check_min_cluster_size(perf.min_cluster_size, prefix="Could not create node: ")
            cluster_size = block_copy_cluster_size(target, perf.min_cluster_size)
            if warn_block_size is not None and not target_knows_block_size(target):
                # QEMU's warn_report when bdrv_get_info() of the target fails.
                warn_block_size(cluster_size)
            if perf.max_chunk and perf.max_chunk < cluster_size:
                raise QMPError(f"Required max-chunk ({perf.max_chunk}) is less than backup "
                               f"cluster size ({cluster_size})")
        except BaseException:
            if bitmap is not None:
                bitmap.reclaim()
            raise
        # Set before the base class applies the speed (on_speed_changed reads them).
        self.source = source
        self.target = target
        self.sync = sync
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.perf = perf
        self.cluster_size = cluster_size
        self.length = source.size
        # The copy state QEMU's copy-before-write filter and the job share: the
        # background copy and the copies made for writes to the source take
        # clusters out of the same bitmap.
        self.bcs = BlockCopyState(source, target, cluster_size=cluster_size)
        # The filter's on-cbw-error (11.1): with break-snapshot a write whose copy
        # fails goes on, and the job is not told; its clusters stay dirty, so the
        # job copies them later as the write left them (qsd 11.1 does the same).
        self.bcs.set_on_cbw_error(on_cbw_error)
        if bitmap is not None and sync == "bitmap":
            self.bcs.limit_to([(offset, length) for offset, length, dirty
                               in bitmap.extents(0, bitmap.size) if dirty])
        self.dirty = self.bcs.copy_bitmap
        self.bcs.on_copied = self._copied_for_write
        self._in_flight_bytes = 0
        self._notifier = self.bcs.copy_before_write
        # discard-source: give each copied range back to the source (it reaches
        # the image only on a node opened with discard=unmap, as in QEMU).
        self.discard_source = discard_source
        graph = source.graph
        # QEMU puts its copy-before-write filter above the source first (its
        # graph changes, then the node): the source's parents and exports move
        # up to it, and the job's main node is the filter (so draining the
        # source pauses the job, and the source itself is not blocked). The
        # job's own writes bypass the filter; writes by others through the
        # filter, or to the source from below it, save their old data first.
        graph.graph_operation("cbw-insert")
        self.filter = CopyBeforeWriteNode.for_backup(graph, filter_name, filter_auto,
                                                     source, target, self.bcs)
        try:
            # QEMU opens the filter before the job exists: what its edges cannot
            # have (a target that may not be written) fails the filter's creation.
            try:
                permissions.refresh(graph)
            except QMPError as exc:
                raise QMPError(f"Could not create node: {exc.desc}") from None
            super().__init__(manager, job_id, self.filter, speed=speed,
                             auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
                             txn=txn)
            if discard_source and source.read_only:
                # The filter wants write access to the source to discard it; QEMU
                # finds out once the job exists (``created``, ``null``).
                self.early_fail()
                raise QMPError("Block node is read-only")
        except BaseException:
            self._drop_filter()
            if bitmap is not None:
                bitmap.reclaim()
            raise
        # From here on every write to the source saves its old data first.
        source.before_write_notifiers.append(self._notifier)
        with graph.graph_change("job-add-node"):
            self.attach_node(target, block=True)

    # ------------------------------------------------------------------ hooks

    def on_speed_changed(self, speed: int) -> None:
        # A new limit applies at once: recompute the current rate-limit wait.
        self.wake(_RATE_WAIT)

    def request_runners(self) -> "Iterable[CoroutineRunner]":
        # The chunk copies in flight, then the job (which waits for them).
        pool = getattr(self, "_pool", None)
        return (*(pool.active if pool is not None else ()), *super().request_runners())

    def drained_poll(self) -> bool:
        """A chunk copy in flight is a request on the source and the target in
        QEMU: a drain waits for it (and the job then passes its pause point)."""
        return super().drained_poll() or (not self.is_completed and self._in_flight_bytes > 0)

    def commit(self) -> None:
        self._cleanup_sync_bitmap(0)

    def abort(self) -> None:
        self._cleanup_sync_bitmap(self.ret or -errno.ECANCELED)

    def _cleanup_sync_bitmap(self, ret: int) -> None:
        """QEMU's backup_cleanup_sync_bitmap: the successor replaces the bitmap
        (success, or ``always``), or is merged back into it (failure, ``never``);
        a failed ``always`` job adds what it had not copied yet."""
        bitmap = self.sync_bitmap
        if bitmap is None:
            return
        self.sync_bitmap = None
        mode = self.bitmap_mode
        if (ret == 0 or mode == "always") and mode != "never":
            bitmap.abdicate()
        else:
            bitmap.reclaim()
        if ret < 0 and mode == "always":
            for offset, length in self.bcs.copy_bitmap.runs(0, self.length):
                bitmap.set_dirty(offset, min(length, bitmap.size - offset))

    def clean(self) -> None:
        # backup_clean: the job's edges go, then the copy-before-write filter.
        if self._notifier in self.source.before_write_notifiers:
            self.source.before_write_notifiers.remove(self._notifier)
        self.release_nodes_locked()
        self._drop_filter()

    def _drop_filter(self) -> None:
        """bdrv_cbw_drop: parents go back to the source, then the filter goes."""
        graph = self.source.graph
        parents = list(self.filter.parent_nodes)
        graph.remove_filter_from_chain(self.filter)
        for parent in parents:
            relinked_first(parent, self.source)
        graph.drop_filter(self.filter)
        # A drive-backup target the daemon opened goes once nothing holds it.
        if self.target.release_when_unused:
            graph.release_implicit(self.target)

    def _copied_for_write(self, nbytes: int) -> None:
        """A write to the source made the filter copy ``nbytes``: job progress."""
        self.progress_update(nbytes)
        self.progress_set_remaining(self.dirty.dirty_bytes + self._in_flight_bytes)

    def release_run_state(self) -> None:
        super().release_run_state()
        # The copy bitmap is the big one (a bit per cluster of the source).
        del self.dirty, self.perf, self.bcs

    async def run(self) -> int:
        self.progress_set_remaining(self.dirty.dirty_bytes)
        if self.sync == "top":
            ret = await self._skip_unallocated()
            if ret:
                return ret
        if self.sync == "none":
            # Nothing to copy up front; QEMU's copy-before-write filter would copy
            # old data on guest writes. The job lives until it is cancelled.
            while not self.is_cancelled:
                await self.yield_()
            return 0
        return await self._copy_until_done()

    # ------------------------------------------------------------------ sync=top

    async def _skip_unallocated(self) -> int:
        offset = 0
        while offset < self.length:
            if self.is_cancelled:
                return -errno.ECANCELED
            await self.pause_point()
            if self.is_cancelled:
                return -errno.ECANCELED
            allocated, count = is_allocated(self.source, offset, self.length - offset)
            count = -(-count // self.cluster_size) * self.cluster_size
            if not allocated:
                self.dirty.set(offset, count, dirty=False)
                self.progress_set_remaining(self.dirty.dirty_bytes + self._in_flight_bytes)
            offset += count
        return 0

    # ------------------------------------------------------------------ copying

    async def _copy_until_done(self) -> int:
        while True:
            failure = await self._copy_pass()
            if self.is_cancelled or (failure is None and not self.dirty.dirty_clusters):
                return 0
            if failure is None:
                # The pass stopped for a pause request: pause, then copy the rest,
                # unless a cancel came meanwhile (backup_loop looks at the job's
                # cancel flag before it starts another block-copy call).
                await self.pause_point()
                if self.is_cancelled:
                    return 0
                continue
            policy = self.on_source_error if failure.is_read else self.on_target_error
            action = self.error_action(policy, failure.is_read, failure.error)
            if action == "report":
                return -failure.error
            if action == "stop":
                await self.pause_point()
            else:
                # ignore: retry. QEMU retries at once (and would spin forever on a
                # permanent error injected with ``immediately``); one main-loop turn
                # keeps the daemon responsive. It delays this job's completion by one
                # pass, which only shows against other work of the same passes.
                self.busy = False
                await self.manager.main_loop_turn()
                self.busy = True

    async def _copy_pass(self) -> _CopyFailure | None:
        """Dispatch dirty chunks until done, failed, cancelled or asked to pause."""
        pool = self._pool = _WorkerPool(self, self.perf.max_workers)
        chunk_limit = min(x for x in (max(self.cluster_size, CHUNK_MAX), self.perf.max_chunk) if x)
        offset = 0
        # QEMU's block-copy call runs in a coroutine of its own and the job looks
        # at its cancel flag only once the call first waits (block_copy_async
        # returns): a pass begun by an already cancelled job (resumed from an
        # error stop by job-cancel) still dispatches until then.
        job_looked = False
        try:
            while pool.failure is None and not self.should_pause \
                    and not (job_looked and self.is_cancelled):
                area = self.dirty.next_dirty_area(offset, chunk_limit)
                if area is None:
                    break
                start, length = area
                # A task covers one block-status run (QEMU's block_copy_task_shrink).
                zero, length = self.bcs.task_extent(start, length)
                delay = self.ratelimit_delay_ns(0)
                if delay > 0:
                    await self.park_until_woken(_RATE_WAIT, timeout_ns=delay)
                    job_looked = True
                    continue
                self.ratelimit_delay_ns(length)
                # Claimed now: a write to the source that meets these clusters waits
                # for this copy instead of copying them again.
                claim = self.bcs.claim(start, start + length)
                self._in_flight_bytes += length
                offset = start + length
                job_looked |= await pool.start(claim, start, length, zero)
        finally:
            # However the dispatch ended, no chunk may outlive the pass: each one
            # still uses the job's copy state.
            await pool.wait_all()
        return pool.failure

    async def _copy_chunk(self, pool: _WorkerPool, claim: Any, offset: int,
                          length: int, zero: bool) -> None:
        nbytes = min(offset + length, self.length) - offset
        failure: tuple[bool, int] | None = None
        try:
            # Areas the source reads as zeroes become zero writes (block-copy's
            # block status); the kernel copies the rest between plain files,
            # other nodes go through co_pread/co_pwrite, blkdebug rules included.
            await self.bcs.copy_task(offset, offset + nbytes, zero)
        except OSError as exc:
            failure = (failed_on_read(exc), exc.errno or errno.EIO)
        # A failed copy puts its clusters back into the copy bitmap.
        self.bcs.release(claim, ok=failure is None)
        self._in_flight_bytes -= length
        if failure is None:
            self.progress_update(length)
            if self.discard_source:
                await self._discard_source(offset, nbytes)
        else:
            pool.record_failure(*failure)
        self.progress_set_remaining(self.dirty.dirty_bytes + self._in_flight_bytes)


    async def _discard_source(self, offset: int, length: int) -> None:
        # Best effort, as QEMU's block-copy: a failed discard fails nothing.
        try:
            await self.source.co_pdiscard(offset, length)
        except OSError:
            pass


def claim_filter_name(source: "BlockNode", wanted: str | None) -> tuple[str, bool]:
    """The copy-before-write filter's node name: ``filter-node-name`` or one of
    QEMU's generated names; a bad or taken name fails the filter's creation."""
    try:
        return source.graph._claim_name(wanted)
    except QMPError as exc:
        raise QMPError(f"Could not create node: {exc}") from None


def check_filter_attach(filter_name: str, source: "BlockNode", target: "BlockNode") -> None:
    """The copy-before-write filter QEMU inserts takes the source as its ``file``
    child and the target as its ``target`` child: an inactive node cannot be
    either."""
    from qmpjobd.block.activation import check_child_attach

    for role, node in (("file", source), ("target", target)):
        if not node.active:
            check_child_attach(filter_name, role, node, prefix="Could not create node: ")


def check_backup_nodes(source: "BlockNode", target: "BlockNode", compress: bool,
                       perf: BackupPerf) -> None:
    """backup_job_create's checks before the job exists, in QEMU's order."""
    if source is target:
        raise QMPError("Source and target cannot be the same")
    if compress and not getattr(target, "supports_compressed_writes", False):
        # QEMU names the target's BlockBackend here, which storage-daemon nodes lack.
        raise QMPError("Compression is not supported for this drive ")
    check_backup_op(source)
    check_backup_op(target)
    if perf.max_workers < 1 or perf.max_workers > INT_MAX:
        raise QMPError(f"max-workers must be between 1 and {INT_MAX}")
    if perf.max_chunk < 0:
        raise QMPError("max-chunk must be zero (which means no limit) or positive")


# The blocker an overlay puts on its backing node (QEMU's backing_blocker) leaves
# backup source and backup target unblocked: fleecing backs up a node into an
# overlay whose backing it is.
_BACKING_BLOCKER = "node is used as backing hd of "


def check_backup_op(node: "BlockNode") -> None:
    """The BACKUP_SOURCE / BACKUP_TARGET op-blocker check."""
    for blocker in node.blockers:
        if not blocker.reason.startswith(_BACKING_BLOCKER):
            raise QMPError(f"Node '{node.node_name}' is busy: {blocker.reason}")


def freeze_sync_bitmap(bitmap: Any, bitmap_mode: str) -> None:
    """backup_job_create's bitmap step: a bitmap the job will change must be
    usable (BUSY, RO, INCONSISTENT), then it gets its successor."""
    if bitmap_mode != "never":
        problem = bitmap_use_problem(bitmap)
        if problem is not None:
            raise QMPError(problem)
    bitmap.create_successor()


def check_same_size(source: "BlockNode", target: "BlockNode") -> None:
    if target.size != source.size:
        raise QMPError("Source and target image have different sizes")
