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
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from qmpjobd.block.bitmap import ClusterBitmap
from qmpjobd.block.offload import copy_range, failed_on_read
from qmpjobd.block.jobs.base import BlockJob
from qmpjobd.errors import QMPError
from qmpjobd.job.coroutine import CoroutineRunner
from qmpjobd.job.txn import JobTxn

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.node import BlockNode
    from qmpjobd.job.manager import JobManager

KiB = 1024
MiB = 1024 * KiB
CLUSTER_SIZE_DEFAULT = 64 * KiB
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


def target_cluster_size(target: "BlockNode") -> int:
    """QEMU: max(64 KiB, the target's cluster size when its driver reports one)."""
    reported = getattr(target, "cluster_size", None)
    if isinstance(reported, int) and reported > 0:
        return max(CLUSTER_SIZE_DEFAULT, reported)
    return CLUSTER_SIZE_DEFAULT


def target_knows_block_size(target: "BlockNode") -> bool:
    """Whether QEMU's bdrv_get_info() works on the target: file-backed nodes
    answer it (the same test decides ``dirty-flag`` in queries), null-co does not."""
    return target.has_dirty_flag()


def is_allocated(node: "BlockNode", offset: int, length: int) -> tuple[bool, int]:
    """Whether the top layer holds the extent at ``offset``, and for how many bytes."""
    kind, count = node.block_status(offset, length)
    return kind in ("data", "zero"), max(count, 1)


class DirtyClusters(ClusterBitmap):
    """Which clusters still have to be copied (one bit each, all dirty at first);
    offsets and counts are in bytes of whole clusters."""

    __slots__ = ("cluster_size",)

    def __init__(self, length: int, cluster_size: int) -> None:
        super().__init__(-(-length // cluster_size), fill=True)
        self.cluster_size = cluster_size

    @property
    def dirty_clusters(self) -> int:
        return self.count

    @property
    def dirty_bytes(self) -> int:
        return self.count * self.cluster_size

    def next_dirty_area(self, offset: int, max_bytes: int) -> tuple[int, int] | None:
        """First dirty run at or after ``offset``, at most ``max_bytes`` long."""
        first = self.next_set(offset // self.cluster_size)
        if first < 0:
            return None
        limit = min(self.size, first + max(max_bytes // self.cluster_size, 1))
        clean = self.next_clear(first, limit)
        end = limit if clean < 0 else clean
        return first * self.cluster_size, (end - first) * self.cluster_size

    def set(self, offset: int, length: int, dirty: bool) -> None:
        first = offset // self.cluster_size
        last = -(-(offset + length) // self.cluster_size)
        self.set_range(first, last, dirty)


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

    async def start(self, offset: int, length: int) -> bool:
        """Start one chunk copy; True when the pool was full and the job waited."""
        waited = False
        while len(self.active) >= self.max_workers:
            await self.job.park_until_woken(self)
            waited = True
        runner = CoroutineRunner(self.job._copy_chunk(self, offset, length),
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
                 "cluster_size", "length", "dirty", "_in_flight_bytes", "discard_source")

    job_type = "backup"

    def __init__(self, manager: "JobManager", job_id: str | None,
                 source: "BlockNode", target: "BlockNode", *, sync: str = "full",
                 speed: int = 0, on_source_error: str = "report",
                 on_target_error: str = "report", auto_finalize: bool = True,
                 auto_dismiss: bool = True, txn: JobTxn | None = None,
                 perf: BackupPerf | None = None, compress: bool = False,
                 discard_source: bool = False,
                 warn_block_size: "Callable[[int], None] | None" = None) -> None:
        """QEMU's backup_job_create, from its first check to the attached job."""
        perf = perf or BackupPerf()
        check_backup_nodes(source, target, compress, perf)
        check_filter_attach(source, target)
        cluster_size = target_cluster_size(target)
        if warn_block_size is not None and not target_knows_block_size(target):
            # QEMU's warn_report when bdrv_get_info() of the target fails.
            warn_block_size(cluster_size)
        if perf.max_chunk and perf.max_chunk < cluster_size:
            raise QMPError(f"Required max-chunk ({perf.max_chunk}) is less than backup "
                           f"cluster size ({cluster_size})")
        # Set before the base class applies the speed (on_speed_changed reads them).
        self.source = source
        self.target = target
        self.sync = sync
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.perf = perf
        self.cluster_size = cluster_size
        self.length = source.size
        self.dirty = DirtyClusters(self.length, cluster_size)
        self._in_flight_bytes = 0
        # discard-source: give each copied range back to the source (it reaches
        # the image only on a node opened with discard=unmap, as in QEMU).
        self.discard_source = discard_source
        # The job sits on the copy-before-write filter above the source in QEMU, so
        # draining the source pauses it but the source itself is not blocked.
        graph = source.graph
        # QEMU puts its copy-before-write filter above the source first; qmpjobd has
        # no such node, but makes the filter's graph changes here and at the end.
        graph.graph_operation("cbw-insert")
        try:
            super().__init__(manager, job_id, source, block_main=False, speed=speed,
                             auto_finalize=auto_finalize, auto_dismiss=auto_dismiss,
                             txn=txn)
            if discard_source and source.read_only:
                # The filter wants write access to the source to discard it; QEMU
                # finds out once the job exists (``created``, ``null``).
                self.early_fail()
                raise QMPError("Block node is read-only")
        except BaseException:
            graph.graph_operation("cbw-drop")
            raise
        with graph.graph_change("job-add-node"):
            self.attach_node(target, block=True)

    # ------------------------------------------------------------------ hooks

    def on_speed_changed(self, speed: int) -> None:
        # A new limit applies at once: recompute the current rate-limit wait.
        self.wake(_RATE_WAIT)

    def clean(self) -> None:
        # backup_clean: the job's edges go, then the copy-before-write filter.
        self.release_nodes_locked()
        self.block_graph.graph_operation("cbw-drop")

    def release_run_state(self) -> None:
        super().release_run_state()
        # The copy bitmap is the big one (a bit per cluster of the source).
        del self.dirty, self.perf

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
        pool = _WorkerPool(self, self.perf.max_workers)
        chunk_limit = min(x for x in (max(self.cluster_size, CHUNK_MAX), self.perf.max_chunk) if x)
        offset = 0
        # QEMU's block-copy call runs in a coroutine of its own and the job looks
        # at its cancel flag only once the call first waits (block_copy_async
        # returns): a pass begun by an already cancelled job (resumed from an
        # error stop by job-cancel) still dispatches until then.
        job_looked = False
        while pool.failure is None and not self.should_pause \
                and not (job_looked and self.is_cancelled):
            area = self.dirty.next_dirty_area(offset, chunk_limit)
            if area is None:
                break
            start, length = area
            delay = self.ratelimit_delay_ns(0)
            if delay > 0:
                await self.park_until_woken(_RATE_WAIT, timeout_ns=delay)
                job_looked = True
                continue
            self.ratelimit_delay_ns(length)
            self.dirty.set(start, length, dirty=False)
            self._in_flight_bytes += length
            offset = start + length
            job_looked |= await pool.start(start, length)
        await pool.wait_all()
        return pool.failure

    async def _copy_chunk(self, pool: _WorkerPool, offset: int, length: int) -> None:
        nbytes = min(offset + length, self.length) - offset
        failure: tuple[bool, int] | None = None
        try:
            # The kernel copies between plain files; other nodes go through
            # co_pread/co_pwrite inside copy_range, blkdebug rules included.
            await copy_range(self.source, offset, self.target, offset, nbytes)
        except OSError as exc:
            failure = (failed_on_read(exc), exc.errno or errno.EIO)
        self._in_flight_bytes -= length
        if failure is None:
            self.progress_update(length)
            if self.discard_source:
                await self._discard_source(offset, nbytes)
        else:
            pool.record_failure(*failure)
            self.dirty.set(offset, length, dirty=True)
        self.progress_set_remaining(self.dirty.dirty_bytes + self._in_flight_bytes)


    async def _discard_source(self, offset: int, length: int) -> None:
        # Best effort, as QEMU's block-copy: a failed discard fails nothing.
        try:
            await self.source.co_pdiscard(offset, length)
        except OSError:
            pass


def check_filter_attach(source: "BlockNode", target: "BlockNode") -> None:
    """The copy-before-write filter QEMU inserts takes the source as its ``file``
    child and the target as its ``target`` child: an inactive node cannot be
    either. QEMU names the filter by its generator; qmpjobd draws a name the same
    way, only for this message."""
    from qmpjobd.block.activation import check_child_attach

    for role, node in (("file", source), ("target", target)):
        if not node.active:
            filter_name, _ = source.graph._claim_name(None)
            check_child_attach(filter_name, role, node, prefix="Could not create node: ")


def check_backup_nodes(source: "BlockNode", target: "BlockNode", compress: bool,
                       perf: BackupPerf) -> None:
    """backup_job_create's checks before the job exists, in QEMU's order."""
    if source is target:
        raise QMPError("Source and target cannot be the same")
    if compress and not getattr(target, "supports_compressed_writes", False):
        # QEMU names the target's BlockBackend here, which storage-daemon nodes lack.
        raise QMPError("Compression is not supported for this drive ")
    source.check_not_busy()
    target.check_not_busy()
    if perf.max_workers < 1 or perf.max_workers > INT_MAX:
        raise QMPError(f"max-workers must be between 1 and {INT_MAX}")
    if perf.max_chunk < 0:
        raise QMPError("max-chunk must be zero (which means no limit) or positive")
    if target.size != source.size:
        raise QMPError("Source and target image have different sizes")
