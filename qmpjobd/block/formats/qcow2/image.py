"""An open qcow2 image: L1/L2 lookup, refcounts, allocation, and the request paths.

The allocator follows QEMU's rules so that the same sequence of operations gives
the same layout (first fit from a cursor that moves back when a cluster is freed;
new refcount blocks placed where they can describe themselves; a new refcount
table built at the end of the image and switched to with one header write). That
is what makes ``blockdev-create`` write the bytes QEMU writes.

Crash safety (DESIGN.md decision 10), with write-back caches of L2 tables and
refcount blocks:

* a refcount increase reaches the disk before the L2 (or L1) entry that uses the
  cluster: the L2 cache depends on the refcount cache and is written only after
  it, with a flush in between;
* guest data reaches the disk before the L2 entry that points to it: writing the
  L2 cache is preceded by a flush when data was written since the last one;
* when a cluster is freed, the L2 change is written before the refcount decrease
  (the reverse dependency);
* a new L2 table, a new refcount block and a new refcount table are written in
  full (and flushed) before the single entry or header field that links them.

A kill at any instant therefore leaves leaked clusters at worst. Lazy refcounts
are accepted as an option but refcounts are always kept exact, so the dirty bit
is never set by qmpjobd (an image another program left dirty is repaired when
it is opened writable, as QEMU does: repair.py). (Taking or deleting an internal snapshot changes a
refcount and the OFLAG_COPIED bit of the entry using it in two different
clusters; a kill between those two writes leaves what ``qemu-img check`` calls
an OFLAG_COPIED error, exactly as QEMU's own ordering does.)

Damaged metadata met at run time is handled as QEMU's qcow2_signal_corruption
does: a misaligned table or cluster offset, or a write that would land on
metadata (the overlap check, QEMU's default "cached" set), fails the request
with EIO; on a writable image the corrupt bit is set in the header and the image
refuses every further request (QEMU drops the node's driver: "No medium found");
the ``corruption_listener`` (the node) sends BLOCK_IMAGE_CORRUPTED once.

Requests are serialised by one lock; guest data moves through the storage (the
thread pool for a ``file`` child) and never through the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Awaitable, Callable

from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.block.formats.qcow2.cache import TableCache
from qmpjobd.block.formats.qcow2.header import (
    Header,
    Qcow2OpenError,
    header_cluster_bits,
    parse_header,
    too_big_for_a_node,
)
from qmpjobd.block.formats.qcow2.refcount import (
    free_run_in_block,
    get_refcount,
    increase_refcounts,
    refcount_max,
    refcount_metadata_clusters,
    set_refcount,
)
from qmpjobd.block.formats.qcow2.storage import CheckedCopy, HostCopy, MixedZeroes, Storage

_U64 = struct.Struct(">Q")

# Cluster kinds of an L2 entry.
UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED = range(5)

# Reads through the backing chain: (offset, length) -> bytes, zeroes past its end.
BackingRead = Callable[[int, int], Awaitable[bytes]]


async def _open_read(storage: Storage, offset: int, length: int, what: str) -> bytes:
    """A read of the open path; its failure is the open's, in QEMU's words."""
    try:
        return await storage.pread(offset, length)
    except OSError as exc:
        raise Qcow2OpenError(f"{what}: {os.strerror(exc.errno or errno.EIO)}") from None


def eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


class _Again(OSError):
    """QEMU's -EAGAIN: metadata was allocated, restart the free-space search. The
    allocators retry; anyone else (a refcount change of a cluster a damaged
    refcount table does not cover) sees the errno, as in QEMU."""

    def __init__(self) -> None:
        super().__init__(errno.EAGAIN, os.strerror(errno.EAGAIN))


class CorruptionError(OSError):
    """Inconsistent metadata found inside a request: EIO to the caller, after the
    image has signalled the corruption (see ``Qcow2Image.signal_corruption``)."""

    def __init__(self, message: str, offset: int = -1, size: int = -1,
                 fatal: bool = True) -> None:
        super().__init__(errno.EIO, os.strerror(errno.EIO))
        self.message = message
        self.corrupt_offset = offset
        self.corrupt_size = size
        self.fatal = fatal


# Called as listener(fatal, offset, size, message) when corruption is signalled.
CorruptionListener = Callable[[bool, int, int, str], None]


@dataclass
class Options:
    """Runtime options of the qcow2 node that change behaviour here."""

    discard_no_unref: bool = False
    l2_cache_entries: int = 512          # 32 MiB of 64 KiB tables, QEMU's default cap
    refcount_cache_entries: int = 256
    # encrypt.format and encrypt.key-secret as given, and whether that secret exists.
    encrypt_format: str | None = None
    encrypt_secret: str | None = None
    has_secret: Callable[[str], bool] = lambda ident: False


class Qcow2Image:
    def __init__(self, storage: Storage, header: Header, l1: list[int],
                 reftable: list[int], read_only: bool, options: Options) -> None:
        self.storage = storage
        self.header = header
        self.read_only = read_only
        self.options = options
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_entries = header.l2_entries
        self.l2_bits = self.cluster_bits - 3
        self.refcount_order = header.refcount_order
        self.refcount_block_bits = self.cluster_bits + 3 - self.refcount_order
        self.refcount_block_entries = 1 << self.refcount_block_bits
        self.refcount_max = refcount_max(self.refcount_order)
        self.l1 = l1
        self.reftable = reftable
        self.free_cluster_index = 0
        # QEMU's pass-discard-request: whether clusters a guest discard or an
        # unmapping zero write frees are discarded on the file too (the node's
        # driver sets it; it defaults to the node's own discard=unmap).
        self.passes_request_discards: Callable[[], bool] = lambda: False
        self.l2_cache = TableCache("l2", options.l2_cache_entries)
        self.refcount_cache = TableCache("refcount", options.refcount_cache_entries)
        self.data_since_flush = False
        self.backing: BackingRead | None = None
        self.lock = asyncio.Lock()
        # Guest reads whose data moves outside the lock (see read()); clusters are
        # only freed once none is in flight.
        self._data_io = 0
        self._data_io_idle = asyncio.Event()
        self._data_io_idle.set()
        # Guest ranges [start, end) of whole clusters whose new data a write is
        # putting in place without the lock: their L2 entries are that write's
        # until it links them (QEMU's in-flight cluster allocations).
        self._allocating: list[tuple[int, int]] = []
        self._allocation_done = asyncio.Condition(self.lock)
        self.snapshots: list = []             # snapshot.Snapshot entries, table order
        self.snapshots_size = 0
        self.corruption_listener: CorruptionListener | None = None
        self.signaled_corruption = False
        # QEMU's "bs->drv = NULL" after a fatal corruption: every request fails.
        self.unusable = False
        self._overlap_clusters: dict[int, int] | None = None
        self.pending_discards: list[int] = []     # freed cluster offsets to discard
        self._overlap_ranges: list[tuple[int, int, int]] = []
        csize_shift = 62 - (self.cluster_bits - 8)
        self._csize_shift = csize_shift
        self._csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self._coffset_mask = (1 << csize_shift) - 1

    # --- opening ----------------------------------------------------------------------

    @classmethod
    async def open(cls, storage: Storage, *, read_only: bool,
                   options: Options | None = None, repair: bool = True) -> "Qcow2Image":
        """Read and check the header, the L1 table and the refcount table. A
        writable image with the dirty bit is repaired, as QEMU does (repair.py),
        unless ``repair`` is False (a node repairs it itself once its corruption
        listener is in place, and not when it opens inactive)."""
        first = await _open_read(storage, 0, 4096, "Could not read qcow2 header")
        bits = header_cluster_bits(first)
        if bits is not None and C.MIN_CLUSTER_BITS <= bits <= C.MAX_CLUSTER_BITS \
                and (1 << bits) > len(first):
            first = await _open_read(storage, 0, 1 << bits, "Could not read qcow2 header")
        header = parse_header(first, read_write=not read_only)
        refuse_unsupported(header, read_only, options or Options())
        l1_raw = await _open_read(storage, header.l1_table_offset, header.l1_size * 8,
                                  "Could not read L1 table")
        l1 = list(struct.unpack(f">{header.l1_size}Q", l1_raw))
        entries = header.refcount_table_clusters * header.cluster_size // 8
        storage.debug_event("reftable_load")
        rt_raw = await _open_read(storage, header.refcount_table_offset, entries * 8,
                                  "Could not initialize refcount handling")
        reftable = list(struct.unpack(f">{entries}Q", rt_raw))
        image = cls(storage, header, l1, reftable, read_only, options or Options())
        from qmpjobd.block.formats.qcow2.snapshot import read_snapshots
        image.snapshots, image.snapshots_size = await read_snapshots(image)
        # Autoclear bits qmpjobd does not know must go before the first write (an
        # older writer would leave the feature's data stale); the bitmaps bit stays
        # while the bitmaps extension is there, since qmpjobd keeps that data current.
        known = C.AUTOCLEAR_BITMAPS if header.bitmaps is not None else 0
        if not read_only and header.autoclear_features & ~known:
            header.autoclear_features &= known
            await image.write_header()
        if not read_only and repair and header.dirty:
            from qmpjobd.block.formats.qcow2.repair import repair_dirty
            await repair_dirty(image)
        if too_big_for_a_node(header):
            raise Qcow2OpenError("Could not refresh total sector count: File too large")
        return image

    @property
    def size(self) -> int:
        return self.header.size

    # --- small helpers ----------------------------------------------------------------

    def _offset_in_cluster(self, offset: int) -> int:
        return offset & (self.cluster_size - 1)

    def _start_of_cluster(self, offset: int) -> int:
        return offset & ~(self.cluster_size - 1)

    def _clusters(self, length: int) -> int:
        return (length + self.cluster_size - 1) >> self.cluster_bits

    def cluster_kind(self, entry: int) -> int:
        if entry & C.OFLAG_COMPRESSED:
            return COMPRESSED
        if entry & C.OFLAG_ZERO:
            return ZERO_ALLOC if entry & C.L2E_OFFSET_MASK else ZERO_PLAIN
        return NORMAL if entry & C.L2E_OFFSET_MASK else UNALLOCATED

    async def write_header(self) -> None:
        await self.storage.pwrite(0, self.header.pack())
        await self.storage.flush()

    # --- caches -----------------------------------------------------------------------

    async def _cache_get(self, cache: TableCache, offset: int) -> bytearray:
        table = cache.lookup(offset)
        if table is not None:
            return table
        await self._make_room(cache)
        self.storage.debug_event("l2_load" if cache is self.l2_cache else "refblock_load")
        data = await self.storage.pread(offset, self.cluster_size)
        table = cache.lookup(offset)      # another request may have loaded it
        if table is not None:
            return table
        return cache.insert(offset, bytearray(data))

    async def _cache_get_empty(self, cache: TableCache, offset: int) -> bytearray:
        await self._make_room(cache)
        return cache.insert(offset, bytearray(self.cluster_size))

    async def _make_room(self, cache: TableCache) -> None:
        if cache.full() and not cache.evict_clean():
            await self.flush_cache(cache)
            cache.evict_clean()

    async def flush_cache(self, cache: TableCache, *, trailing_flush: bool = True) -> None:
        """Write ``cache`` (after what it depends on) and flush the file; without
        ``trailing_flush`` only the flushes that order writes are made."""
        if cache.depends_on is not None:
            dependency = cache.depends_on
            cache.depends_on = None
            await self.flush_cache(dependency)
        if cache is self.l2_cache and self.data_since_flush and cache.dirty:
            await self.storage.flush()
            self.data_since_flush = False
        dirty = cache.take_dirty()
        ignore = _OL_ACTIVE_L2 if cache is self.l2_cache else _OL_REFCOUNT_BLOCK
        for index, (offset, data) in enumerate(dirty):
            try:
                self.check_overlap(offset, len(data), ignore)
            except CorruptionError:
                # What was not written stays dirty (QEMU keeps it in its cache).
                for rest, _ in dirty[index:]:
                    cache.mark_dirty(rest)
                raise
            self.storage.debug_event("l2_update" if cache is self.l2_cache
                                     else "refblock_update_part")
            await self.storage.pwrite(offset, data)
        if dirty and trailing_flush:
            await self.storage.flush()

    async def _set_dependency(self, cache: TableCache, dependency: TableCache) -> None:
        """``cache`` may only be written after ``dependency``."""
        if dependency.depends_on is not None:
            await self.flush_cache(dependency)
        if cache.depends_on is not None and cache.depends_on is not dependency:
            await self.flush_cache(cache)
        cache.depends_on = dependency

    async def flush(self, *, to_disk: bool = True) -> None:
        """Everything in the caches to the disk, in dependency order, then the
        file itself (nothing once the image is unusable: QEMU's flush of a node
        without a driver succeeds doing nothing). Without ``to_disk`` the caches
        are only written (QEMU's flush_to_os): the caller flushes the file."""
        if self.unusable:
            return
        try:
            await self._flush_all(to_disk)
        except CorruptionError as exc:
            await self._signal(exc)
            raise eio() from None

    async def _flush_all(self, to_disk: bool = True) -> None:
        await self.flush_cache(self.l2_cache, trailing_flush=to_disk)
        await self.flush_cache(self.refcount_cache, trailing_flush=to_disk)
        if self.data_since_flush and to_disk:
            await self.storage.flush()
            self.data_since_flush = False

    def pending_writes(self) -> list[tuple[int, bytes] | None]:
        """What a flush would write, in order, with None where a flush of the file
        must come in between (for a close that cannot await)."""
        first, second = self.l2_cache, self.refcount_cache
        if first.depends_on is second:
            first, second = second, first
        first.depends_on = second.depends_on = None
        plan: list[tuple[int, bytes] | None] = []
        if first is self.l2_cache and first.dirty and self.data_since_flush:
            plan.append(None)
        if self.unusable:
            # QEMU closes a node whose driver it dropped without writing anything.
            first.take_dirty()
            second.take_dirty()
            return []
        plan.extend(self._safe_writes(first))
        plan.append(None)
        if second is self.l2_cache and second.dirty and self.data_since_flush:
            plan.append(None)
        plan.extend(self._safe_writes(second))
        plan.append(None)
        self.data_since_flush = False
        return plan

    def _safe_writes(self, cache: TableCache) -> list[tuple[int, bytes]]:
        """The dirty tables of ``cache`` that pass the overlap check."""
        ignore = _OL_ACTIVE_L2 if cache is self.l2_cache else _OL_REFCOUNT_BLOCK
        out = []
        for offset, data in cache.take_dirty():
            try:
                self.check_overlap(offset, len(data), ignore)
            except CorruptionError:
                continue
            out.append((offset, data))
        return out

    def dirty_metadata(self) -> bool:
        return bool(self.l2_cache.dirty or self.refcount_cache.dirty)

    # --- damaged metadata ---------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.unusable:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))

    async def _signal(self, exc: CorruptionError) -> None:
        await self.signal_corruption(exc.fatal, exc.corrupt_offset, exc.corrupt_size,
                                     exc.message)

    async def signal_corruption(self, fatal: bool, offset: int, size: int,
                                message: str) -> None:
        """QEMU's qcow2_signal_corruption: tell the listener (once; a fatal one after
        non-fatal ones still counts), and for a fatal one on a writable image set
        the corrupt bit and make the image refuse every further request. A
        read-only image cannot be marked, so its corruption is never fatal."""
        if self.read_only:
            fatal = False
        if self.signaled_corruption and (not fatal or self.header.corrupt):
            return
        self.signaled_corruption = True
        if self.corruption_listener is not None:
            self.corruption_listener(fatal, offset, size, message)
        if not fatal:
            return
        self.header.incompatible_features |= C.INCOMPAT_CORRUPT
        self.unusable = True
        if self.header.version >= 3:
            try:
                await self.storage.pwrite(72, _U64.pack(self.header.incompatible_features))
                await self.storage.flush()
            except OSError:
                pass          # QEMU ignores a failure to mark the image, too

    def metadata_changed(self) -> None:
        """Where the tables live changed: rebuild the overlap map when next needed."""
        self._overlap_clusters = None

    def _build_overlap_map(self) -> dict[int, int]:
        from qmpjobd.block.formats.qcow2 import snapshot as S
        clusters: dict[int, int] = {0: S.OL_MAIN_HEADER}
        ranges: list[tuple[int, int, int]] = []

        def add_range(offset: int, length: int, bit: int) -> None:
            if length > 0:
                start = self._start_of_cluster(offset)
                ranges.append((start, offset + length, bit))

        add_range(self.header.l1_table_offset, len(self.l1) * 8, S.OL_ACTIVE_L1)
        for entry in self.l1:
            l2 = entry & C.L1E_OFFSET_MASK
            if l2:
                index = l2 >> self.cluster_bits
                clusters[index] = clusters.get(index, 0) | S.OL_ACTIVE_L2
        add_range(self.header.refcount_table_offset, len(self.reftable) * 8,
                  S.OL_REFCOUNT_TABLE)
        for entry in self.reftable:
            block = entry & C.REFT_OFFSET_MASK
            if block:
                index = block >> self.cluster_bits
                clusters[index] = clusters.get(index, 0) | S.OL_REFCOUNT_BLOCK
        add_range(self.header.snapshots_offset, self.snapshots_size, S.OL_SNAPSHOT_TABLE)
        for snap in self.snapshots:
            add_range(snap.l1_table_offset, snap.l1_size * 8, S.OL_INACTIVE_L1)
        self._overlap_ranges = ranges
        self._overlap_clusters = clusters
        return clusters

    def check_overlap(self, offset: int, length: int, ignore: int) -> None:
        """QEMU's pre-write overlap check ("cached" set): CorruptionError naming the
        first kind of metadata that [offset, offset+length) would overwrite."""
        if length <= 0:
            return
        clusters = self._overlap_clusters
        if clusters is None:
            clusters = self._build_overlap_map()
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        hit = 0
        if last - first + 1 <= len(clusters):
            for index in range(first, last + 1):
                hit |= clusters.get(index, 0)
        else:
            for index, bits in clusters.items():
                if first <= index <= last:
                    hit |= bits
        start, end = first << self.cluster_bits, (last + 1) << self.cluster_bits
        for range_start, range_end, bit in self._overlap_ranges:
            if range_start < end and start < range_end:
                hit |= bit
        hit &= ~ignore
        if hit:
            from qmpjobd.block.formats.qcow2 import snapshot as S
            lowest = (hit & -hit).bit_length() - 1
            raise CorruptionError("Preventing invalid write on metadata (overlaps with "
                                  f"{S.OVERLAP_NAMES[lowest]})", offset, length)

    async def checked_pwrite(self, offset: int, data: bytes, ignore: int) -> None:
        self.check_overlap(offset, len(data), ignore)
        await self._put(offset, data)

    async def _put(self, host: int, data: "bytes | memoryview | HostCopy") -> None:
        """Data to host offset ``host``: bytes written, a HostCopy copied by the kernel."""
        if isinstance(data, HostCopy):
            await self.storage.copy_in(host, data)   # type: ignore[attr-defined]
        else:
            await self.storage.pwrite(host, data)

    # --- helpers of the snapshot code ------------------------------------------------

    async def alloc_clusters_bytes(self, length: int) -> int:
        """alloc_clusters that, like QEMU's, also takes 0 bytes (the free cursor)."""
        if length <= 0:
            return await self._alloc_clusters_noref(0) << self.cluster_bits
        return await self.alloc_clusters(length)

    async def process_discards(self) -> None:
        """Discard the clusters queued by ``update_refcount``, merged into runs,
        once the refcounts saying they are free are on the disk."""
        if not self.pending_discards:
            return
        offsets = sorted(set(self.pending_discards))
        self.pending_discards.clear()
        await self.flush_cache(self.refcount_cache)
        start = previous = offsets[0]
        for offset in offsets[1:] + [None]:
            if offset is not None and offset == previous + self.cluster_size:
                previous = offset
                continue
            await self.storage.discard(start, previous + self.cluster_size - start)
            if offset is not None:
                start = previous = offset

    async def cached_table(self, offset: int) -> bytearray:
        return await self._cache_get(self.l2_cache, offset)

    async def l2_after_refcounts(self) -> None:
        await self._set_dependency(self.l2_cache, self.refcount_cache)

    def snapshot_list(self) -> list[dict]:
        return [snap.info() for snap in self.snapshots]

    # --- refcounts --------------------------------------------------------------------

    def _reftable_block(self, table_index: int) -> int:
        if table_index >= len(self.reftable):
            return 0
        block = self.reftable[table_index] & C.REFT_OFFSET_MASK
        if block % self.cluster_size:
            raise CorruptionError(f"Refblock offset {_c_hex(block)} unaligned "
                                  f"(reftable index: {_c_hex(table_index)})")
        return block

    async def get_refcount(self, cluster_index: int) -> int:
        block_offset = self._reftable_block(cluster_index >> self.refcount_block_bits)
        if not block_offset:
            return 0
        block = await self._cache_get(self.refcount_cache, block_offset)
        return get_refcount(block, cluster_index & (self.refcount_block_entries - 1),
                            self.refcount_order)

    async def _alloc_clusters_noref(self, count: int) -> int:
        """First fit: the index of ``count`` free clusters from the cursor on.

        The cursor moves as a cluster-by-cluster walk would move it (to the end
        of the run found), but each refcount block is searched in one pass."""
        found = 0
        entries = self.refcount_block_entries
        while found < count:
            index = self.free_cluster_index
            first = index & (entries - 1)
            try:
                block_offset = self._reftable_block(index >> self.refcount_block_bits)
            except CorruptionError:
                self.free_cluster_index = index + 1   # the walk got this far
                raise
            if not block_offset:
                # No refcount block: every cluster it would count is free.
                take = min(count - found, entries - first)
                found += take
                self.free_cluster_index = index + take
                continue
            self.free_cluster_index = index + 1       # the walk's step before its read
            block = await self._cache_get(self.refcount_cache, block_offset)
            end, found = free_run_in_block(block, self.refcount_order, first, found, count)
            self.free_cluster_index = index - first + end
        if (self.free_cluster_index - 1) > (C.MAX_CLUSTER_OFFSET >> self.cluster_bits):
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return self.free_cluster_index - count

    async def alloc_clusters(self, length: int) -> int:
        """Allocate clusters for ``length`` bytes; returns the host offset."""
        self.storage.debug_event("cluster_alloc")
        while True:
            index = await self._alloc_clusters_noref(self._clusters(length))
            try:
                await self.update_refcount(index << self.cluster_bits, length, 1, False)
            except _Again:
                continue
            return index << self.cluster_bits

    async def alloc_clusters_at(self, offset: int, count: int) -> int:
        """Allocate up to ``count`` clusters exactly at ``offset``; how many were free."""
        if count == 0:
            return 0
        while True:
            index = offset >> self.cluster_bits
            free = 0
            while free < count and await self.get_refcount(index + free) == 0:
                free += 1
            try:
                await self.update_refcount(offset, free << self.cluster_bits, 1, False)
            except _Again:
                continue
            return free

    async def free_clusters(self, offset: int, length: int, *,
                            snapshot_discard: bool = False) -> None:
        """Drop one reference; a failure leaks the clusters and is only reported
        on stderr, as QEMU's qcow2_free_clusters does."""
        try:
            await self.update_refcount(offset, length, 1, True,
                                       snapshot_discard=snapshot_discard)
        except CorruptionError as exc:
            await self._signal(exc)
            _report(f"qcow2_free_clusters failed: {os.strerror(errno.EIO)}")
        except OSError as exc:
            _report(f"qcow2_free_clusters failed: {os.strerror(exc.errno or errno.EIO)}")

    async def update_refcount(self, offset: int, length: int, addend: int,
                              decrease: bool, *, snapshot_discard: bool = False) -> None:
        """Change the refcounts of the clusters of [offset, offset+length).
        ``snapshot_discard``: clusters that become free are discarded on the file
        afterwards (QEMU's pass-discard-snapshot, on by default); the caller runs
        ``process_discards``."""
        if length <= 0:
            return
        if decrease:
            # A read in flight may still use a cluster about to be freed.
            await self._wait_data_io()
            await self._set_dependency(self.refcount_cache, self.l2_cache)
        start = self._start_of_cluster(offset)
        last = self._start_of_cluster(offset + length - 1)
        cluster_offset = start
        old_table_index = -1
        block_offset = 0
        delta = -addend if decrease else addend
        order = self.refcount_order
        entries_mask = self.refcount_block_entries - 1
        try:
            while cluster_offset <= last:
                cluster_index = cluster_offset >> self.cluster_bits
                table_index = cluster_index >> self.refcount_block_bits
                if table_index != old_table_index:
                    try:
                        block_offset = await self._alloc_refcount_block(cluster_index)
                    except _Again:
                        self.free_cluster_index = min(self.free_cluster_index,
                                                      start >> self.cluster_bits)
                        raise
                old_table_index = table_index
                block = await self._cache_get(self.refcount_cache, block_offset)
                self.refcount_cache.mark_dirty(block_offset)
                # The clusters this block counts, without awaiting in between.
                block_last = min(last, ((table_index + 1) << (self.refcount_block_bits
                                                              + self.cluster_bits)) - 1)
                if not decrease and addend > 0:
                    # An increase frees nothing: the block's range in one step.
                    first = (cluster_offset >> self.cluster_bits) & entries_mask
                    count = ((block_last - cluster_offset) >> self.cluster_bits) + 1
                    done = increase_refcounts(block, order, first, count, addend,
                                              self.refcount_max)
                    cluster_offset += done << self.cluster_bits
                    if done < count:
                        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
                    continue
                while cluster_offset <= block_last:
                    index = (cluster_offset >> self.cluster_bits) & entries_mask
                    refcount = get_refcount(block, index, order) + delta
                    if refcount < 0 or refcount > self.refcount_max:
                        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
                    set_refcount(block, index, order, refcount)
                    if refcount == 0:
                        self._cluster_freed(cluster_offset, block_offset, snapshot_discard)
                    cluster_offset += self.cluster_size
        except BaseException:
            # Undo what this call changed (QEMU does the same), then report.
            try:
                await self.update_refcount(offset, cluster_offset - offset, addend, not decrease)
            except (OSError, _Again):
                pass
            raise

    def _cluster_freed(self, cluster_offset: int, block_offset: int,
                       snapshot_discard: bool) -> None:
        """A cluster's refcount reached 0 (``block_offset``: the block counting it)."""
        if snapshot_discard:
            self.pending_discards.append(cluster_offset)
        self.free_cluster_index = min(self.free_cluster_index,
                                      cluster_offset >> self.cluster_bits)
        # A freed table's cached copy must never be written back.
        if cluster_offset != block_offset:
            self.refcount_cache.discard(cluster_offset)
        self.l2_cache.discard(cluster_offset)

    async def _alloc_refcount_block(self, cluster_index: int) -> int:
        """The refcount block for ``cluster_index``; allocates one (raising _Again
        afterwards) when there is none."""
        table_index = cluster_index >> self.refcount_block_bits
        existing = self._reftable_block(table_index)
        if existing:
            return existing
        # The refcount table will change: L2 tables first.
        await self.flush_cache(self.l2_cache)
        new_block = (await self._alloc_clusters_noref(1)) << self.cluster_bits
        if new_block == 0:
            raise CorruptionError("Preventing invalid allocation of refcount block at offset 0")
        block_shift = self.cluster_bits + self.refcount_block_bits
        if new_block >> block_shift == cluster_index >> self.refcount_block_bits:
            block = await self._cache_get_empty(self.refcount_cache, new_block)
            set_refcount(block, (new_block >> self.cluster_bits)
                         & (self.refcount_block_entries - 1), self.refcount_order, 1)
        else:
            await self.update_refcount(new_block, self.cluster_size, 1, False)
            await self.flush_cache(self.refcount_cache)
            await self._cache_get_empty(self.refcount_cache, new_block)
        self.refcount_cache.mark_dirty(new_block)
        await self.flush_cache(self.refcount_cache)
        if table_index < len(self.reftable):
            await self.storage.pwrite(self.header.refcount_table_offset + table_index * 8,
                                      _U64.pack(new_block))
            await self.storage.flush()
            self.reftable[table_index] = new_block
            self.metadata_changed()
            raise _Again()
        blocks_used = -(-max(cluster_index + 1, (new_block >> self.cluster_bits) + 1)
                        // self.refcount_block_entries)
        meta_offset = blocks_used * self.refcount_block_entries * self.cluster_size
        await self.refcount_area(meta_offset, 0, False, table_index, new_block)
        raise _Again()

    async def refcount_area(self, start_offset: int, additional_clusters: int,
                            exact_size: bool, new_index: int = 0,
                            new_block: int = 0) -> int:
        """Build a new refcount table (and the blocks it needs) at ``start_offset``,
        covering itself and ``additional_clusters`` more; switch the header to it;
        free the old table. Returns the offset after the new structures."""
        cs = self.cluster_size
        total_blocks, _ = refcount_metadata_clusters(
            start_offset // cs + additional_clusters, cs, self.refcount_order,
            not exact_size)
        if total_blocks > C.MAX_REFTABLE_SIZE_BYTES:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        area_index = (start_offset // cs) // self.refcount_block_entries
        table_size = total_blocks if exact_size else total_blocks + -(-total_blocks // 2)
        per_cluster = cs // 8
        table_size = -(-table_size // per_cluster) * per_cluster
        table_clusters = table_size * 8 // cs
        if table_size * 8 > C.MAX_REFTABLE_SIZE_BYTES:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        new_table = [0] * table_size
        keep = min(len(self.reftable), table_size)
        new_table[:keep] = self.reftable[:keep]
        if new_block:
            new_table[new_index] = new_block
        missing = sum(1 for i in range(area_index, total_blocks) if not new_table[i])
        table_offset = start_offset + missing * cs
        end_offset = table_offset + table_clusters * cs
        block_offset = start_offset
        for i in range(area_index, total_blocks):
            if new_table[i]:
                block = await self._cache_get(self.refcount_cache, new_table[i])
            else:
                block = await self._cache_get_empty(self.refcount_cache, block_offset)
                self.refcount_cache.mark_dirty(block_offset)
                new_table[i] = block_offset
                block_offset += cs
            first_covered = i * self.refcount_block_entries * cs
            if first_covered < end_offset:
                j = (start_offset - first_covered) // cs if first_covered < start_offset else 0
                end_index = min((end_offset - first_covered) // cs, self.refcount_block_entries)
                for index in range(j, end_index):
                    set_refcount(block, index, self.refcount_order, 1)
                self.refcount_cache.mark_dirty(new_table[i])
        await self._write_table(table_offset, new_table,
                                48, struct.pack(">QI", table_offset, table_clusters))
        old_offset, old_size = self.header.refcount_table_offset, len(self.reftable)
        self.reftable = new_table
        self.header.refcount_table_offset = table_offset
        self.header.refcount_table_clusters = table_clusters
        self.metadata_changed()
        await self.free_clusters(old_offset, old_size * 8)
        return end_offset

    async def _write_table(self, offset: int, entries: list[int],
                           header_at: int, header_fields: bytes) -> None:
        """Put a new table (reftable or L1) in place: the refcounts of its clusters
        first, then the table, then the header fields that point at it, each
        flushed, so the image on disk names either the old table or the complete
        new one, and never clusters it counts as free."""
        await self.flush_cache(self.refcount_cache)
        await self.storage.pwrite(offset, struct.pack(f">{len(entries)}Q", *entries))
        await self.storage.flush()
        await self.storage.pwrite(header_at, header_fields)
        await self.storage.flush()

    # --- L1 / L2 ----------------------------------------------------------------------

    def _l1_index(self, offset: int) -> int:
        return offset >> (self.cluster_bits + self.l2_bits)

    def _l2_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.l2_entries - 1)

    def _l2_offset(self, l1_index: int) -> int:
        # Lookups from outside the request paths (block status) end here too.
        self._check_usable()
        if l1_index >= len(self.l1):
            return 0
        entry = self.l1[l1_index]
        if entry & C.L1E_RESERVED_MASK & ~C.OFLAG_COPIED:
            raise eio()
        l2_offset = entry & C.L1E_OFFSET_MASK
        if l2_offset % self.cluster_size:
            raise CorruptionError(f"L2 table offset {_c_hex(l2_offset)} unaligned "
                                  f"(L1 index: {_c_hex(l1_index)})")
        return l2_offset

    async def _l2_for_read(self, offset: int) -> bytearray | None:
        l2_offset = self._l2_offset(self._l1_index(offset))
        if not l2_offset:
            return None
        return await self._cache_get(self.l2_cache, l2_offset)

    async def _l2_for_write(self, offset: int) -> tuple[int, bytearray]:
        """The L2 table for ``offset``, allocated (or copied, when shared) first."""
        l1_index = self._l1_index(offset)
        entry = self.l1[l1_index]
        l2_offset = self._l2_offset(l1_index)
        if l2_offset and entry & C.OFLAG_COPIED:
            return l2_offset, await self._cache_get(self.l2_cache, l2_offset)
        return await self._allocate_l2(l1_index, l2_offset)

    async def _allocate_l2(self, l1_index: int, old_offset: int) -> tuple[int, bytearray]:
        new_offset = await self.alloc_clusters(self.cluster_size)
        if new_offset == 0:
            raise CorruptionError("Preventing invalid allocation of L2 table at offset 0")
        old_entry = self.l1[l1_index]
        try:
            await self.flush_cache(self.refcount_cache)
            table = await self._cache_get_empty(self.l2_cache, new_offset)
            if old_offset:
                self.storage.debug_event("l2_alloc_cow_read")
                old = await self.storage.pread(old_offset, self.cluster_size)
                table[:] = old
            self.l2_cache.mark_dirty(new_offset)
            self.storage.debug_event("l2_alloc_write")
            await self.flush_cache(self.l2_cache)
            await self._write_l1_entry(l1_index, new_offset | C.OFLAG_COPIED)
        except OSError:
            # As QEMU's l2_allocate: the L1 entry keeps its old value and the new
            # table's cluster goes back, so the failed write leaks nothing.
            self.l1[l1_index] = old_entry
            await self.free_clusters(new_offset, self.cluster_size)
            raise
        if old_offset:
            await self.free_clusters(old_offset, self.cluster_size)
        return new_offset, table

    async def _write_l1_entry(self, index: int, value: int) -> None:
        self.l1[index] = value
        self.metadata_changed()
        self.storage.debug_event("l1_update")
        await self.checked_pwrite(self.header.l1_table_offset + index * 8, _U64.pack(value),
                                  ignore=_OL_ACTIVE_L1)
        await self.storage.flush()

    async def grow_l1(self, min_size: int) -> None:
        """A new L1 table of exactly ``min_size`` entries (creation and growth)."""
        if min_size <= len(self.l1):
            return
        if min_size > C.MAX_L1_SIZE_BYTES // 8:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        new_table = self.l1 + [0] * (min_size - len(self.l1))
        new_offset = await self.alloc_clusters(min_size * 8)
        await self._write_table(new_offset, new_table,
                                36, struct.pack(">IQ", min_size, new_offset))
        old_offset, old_size = self.header.l1_table_offset, len(self.l1)
        self.l1 = new_table
        self.header.l1_table_offset = new_offset
        self.header.l1_size = min_size
        self.metadata_changed()
        await self.free_clusters(old_offset, old_size * 8)

    def _entry(self, table: bytearray, index: int) -> int:
        return _U64.unpack_from(table, index * 8)[0]

    def _set_entry(self, table: bytearray, index: int, value: int) -> None:
        _U64.pack_into(table, index * 8, value)

    def _check_entry(self, entry: int, offset: int) -> None:
        kind = self.cluster_kind(entry)
        host = entry & C.L2E_OFFSET_MASK
        if kind in (NORMAL, ZERO_ALLOC) and host % self.cluster_size:
            l2_offset = self._l2_offset(self._l1_index(offset))
            raise CorruptionError(f"Cluster allocation offset {_c_hex(host)} unaligned "
                                  f"(L2 offset: {_c_hex(l2_offset)}, L2 index: "
                                  f"{_c_hex(self._l2_index(offset))})")

    # --- reading ----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        self._check_usable()
        async with self.lock:
            try:
                plan = await self._read_plan(offset, length)
            except CorruptionError as exc:
                await self._signal(exc)
                raise eio() from None
            # The data moves without the lock, as QEMU's qcow2 drops s->lock for
            # it: requests overlap in the thread pool instead of queueing behind
            # each other's I/O. update_refcount waits before it frees a cluster.
            self._data_io += 1
            self._data_io_idle.clear()
        try:
            parts = [await self._read_run(*step) for step in plan]
        finally:
            self._data_io -= 1
            if not self._data_io:
                self._data_io_idle.set()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def pin_host_runs(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """The host ``(offset, length)`` runs holding guest [offset, offset+length)
        when all of it is in normal data clusters (a copy offload's source), else
        None. Runs returned are pinned like a read in flight (no cluster of them
        is freed) until ``unpin_host_runs``."""
        self._check_usable()
        async with self.lock:
            try:
                plan = await self._read_plan(offset, length)
            except CorruptionError as exc:
                await self._signal(exc)
                raise eio() from None
            if any(kind != NORMAL for kind, _, _, _ in plan):
                return None
            self._data_io += 1
            self._data_io_idle.clear()
        return [((entry & C.L2E_OFFSET_MASK) + self._offset_in_cluster(guest), count)
                for _, entry, guest, count in plan]

    def unpin_host_runs(self) -> None:
        self._data_io -= 1
        if not self._data_io:
            self._data_io_idle.set()

    async def _wait_data_io(self) -> None:
        while self._data_io:
            await self._data_io_idle.wait()

    async def _read(self, offset: int, length: int) -> bytes:
        plan = await self._read_plan(offset, length)
        return b"".join([await self._read_run(*step) for step in plan])

    async def _read_plan(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(kind, entry, offset, length) of each run of like clusters in the range."""
        parts: list[tuple[int, int, int, int]] = []
        end = offset + length
        while offset < end:
            l2 = await self._l2_for_read(offset)
            # A run of clusters of one kind, inside one L2 table.
            index = self._l2_index(offset)
            table_end = min(end, (self._l1_index(offset) + 1) << (self.cluster_bits + self.l2_bits))
            entry = self._entry(l2, index) if l2 is not None else 0
            self._check_entry(entry, offset)
            kind = self.cluster_kind(entry)
            run_end = self._run_end(l2, index, offset, table_end, entry, kind)
            parts.append((kind, entry, offset, run_end - offset))
            offset = run_end
        return parts

    def _run_end(self, l2: bytearray | None, index: int, offset: int, limit: int,
                 entry: int, kind: int) -> int:
        """Where the run of clusters like the one at ``offset`` ends (at most ``limit``)."""
        cluster_end = self._start_of_cluster(offset) + self.cluster_size
        if kind == COMPRESSED or l2 is None:
            return min(limit, cluster_end) if l2 is not None else limit
        host = entry & C.L2E_OFFSET_MASK
        cs = self.cluster_size
        more = -(-(limit - cluster_end) // cs) if limit > cluster_end else 0
        step = 1 + _same_kind_count(table_entries(l2, index + 1, more), kind, host, cs) \
            if more else 1
        return min(cluster_end + (step - 1) * cs, limit)

    async def _read_run(self, kind: int, entry: int, offset: int, length: int) -> bytes:
        if kind == NORMAL:
            host = (entry & C.L2E_OFFSET_MASK) + self._offset_in_cluster(offset)
            self.storage.debug_event("read_aio")
            return await self.storage.pread(host, length)
        if kind == COMPRESSED:
            self.storage.debug_event("read_compressed")
            cluster = await self._read_compressed(entry)
            start = self._offset_in_cluster(offset)
            return cluster[start:start + length]
        if kind == UNALLOCATED and self.backing is not None:
            self.storage.debug_event("read_backing_aio")
            return await self.backing(offset, length)
        return bytes(length)

    async def _read_compressed(self, entry: int) -> bytes:
        coffset = entry & self._coffset_mask
        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        nbytes = sectors * C.COMPRESSED_SECTOR - (coffset & (C.COMPRESSED_SECTOR - 1))
        raw = await self.storage.pread(coffset, nbytes)
        try:
            inflater = zlib.decompressobj(-15)
            data = inflater.decompress(raw, self.cluster_size)
        except zlib.error:
            raise eio() from None
        if len(data) != self.cluster_size:
            raise eio()
        return data

    async def _cluster_content(self, entry: int, guest_cluster: int, start: int,
                               end: int) -> bytes:
        """Bytes [start, end) of a guest cluster as it reads now (for COW)."""
        if end <= start:
            return b""
        self.storage.debug_event("cow_read")
        kind = self.cluster_kind(entry)
        return await self._read_run(kind, entry, guest_cluster + start, end - start)

    # --- writing ----------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    async def write(self, offset: int, data: bytes) -> None:
        self._check_usable()
        self._check_writable()
        async with self.lock:
            try:
                await self._write_unlocked(offset, data, release=True)
            except CorruptionError as exc:
                await self._signal(exc)
                raise eio() from None

    def _table_chunk(self, offset: int, length: int) -> int:
        table_bytes = 1 << (self.cluster_bits + self.l2_bits)
        return min(length, table_bytes - (offset & (table_bytes - 1)))

    async def _write_in_table(self, offset: int, data: memoryview,
                              release: bool = False) -> None:
        """``release``: the data moves without the lock (guest writes; see
        _data_without_lock), so the L2 table is looked up again afterwards."""
        _, l2 = await self._l2_for_write(offset)
        end = offset + len(data)
        pos = offset
        while pos < end:
            if self._allocating and await self._wait_allocations(pos, end):
                _, l2 = await self._l2_for_write(pos)
                continue
            index = self._l2_index(pos)
            entry = self._entry(l2, index)
            self._check_entry(entry, pos)
            in_place = self.cluster_kind(entry) == NORMAL and entry & C.OFLAG_COPIED
            run_end = self._write_run_end(l2, index, pos, end, bool(in_place))
            part = data[pos - offset:run_end - offset]
            if in_place:
                host = (entry & C.L2E_OFFSET_MASK) + self._offset_in_cluster(pos)
                if isinstance(part, CheckedCopy):
                    # Clusters the image holds already get the bytes, zero or not.
                    part = HostCopy(part.pieces)
                # The caller's buffer as is: a copy would cost a memcpy per request.
                self.storage.debug_event("write_aio")
                if release:
                    self.check_overlap(host, len(part), 0)
                    await self._data_without_lock(host, part, None)
                else:
                    await self.checked_pwrite(host, part, ignore=0)
                self.data_since_flush = True
            else:
                l2_offset, l2 = await self._l2_for_write(pos)
                await self._write_allocating(l2_offset, l2, pos, part, release)
            pos = run_end
            if release and pos < end:
                _, l2 = await self._l2_for_write(pos)

    async def _data_without_lock(self, host: int, data: memoryview | bytes,
                                 span: tuple[int, int] | None) -> None:
        """Write guest data at ``host`` with the lock released, as QEMU's qcow2 drops
        s->lock for the data of a request: requests then overlap in the thread
        pool. ``span`` (new clusters) is held against other changes of those L2
        entries; an in-place write counts as I/O in flight (no cluster is freed
        under it). The counter drops before the lock is taken again: a request
        freeing clusters waits for it while holding the lock."""
        if span is not None:
            self._allocating.append(span)
        else:
            self._data_io += 1
            self._data_io_idle.clear()
        self.lock.release()
        try:
            await self._put(host, data)
        finally:
            if span is None:
                self._data_io -= 1
                if not self._data_io:
                    self._data_io_idle.set()
            await self.lock.acquire()
            if span is not None:
                self._allocating.remove(span)
                self._allocation_done.notify_all()

    async def _wait_allocations(self, start: int, end: int) -> bool:
        """Wait (the lock released meanwhile) until no allocation in flight overlaps
        [start, end); True if it waited (the caller's view of the tables is stale)."""
        def clear() -> bool:
            return not any(first < end and start < last for first, last in self._allocating)

        if clear():
            return False
        await self._allocation_done.wait_for(clear)
        return True

    def _write_run_end(self, l2: bytearray, index: int, pos: int, end: int,
                       in_place: bool) -> int:
        """End of the run of clusters that are all in place (and contiguous) or all
        in need of new clusters."""
        first = self._entry(l2, index)
        host = first & C.L2E_OFFSET_MASK
        cs = self.cluster_size
        run = self._start_of_cluster(pos) + cs
        more = -(-(end - run) // cs) if end > run else 0
        step = 1 + _in_place_count(table_entries(l2, index + 1, more), in_place, host, cs) \
            if more else 1
        return min(run + (step - 1) * cs, end)

    async def _write_allocating(self, l2_offset: int, l2: bytearray, pos: int,
                                part: memoryview, release: bool = False) -> None:
        """New clusters for [pos, pos+len): head/tail copied from what the guest
        sees now, data written, then the L2 entries, then old clusters freed."""
        first_cluster = self._start_of_cluster(pos)
        end = pos + len(part)
        last_end = self._start_of_cluster(end - 1) + self.cluster_size
        count = (last_end - first_cluster) >> self.cluster_bits
        index = self._l2_index(pos)
        old_entries = table_entries(l2, index, count)
        head = tail = b""
        if pos > first_cluster:
            head = await self._cluster_content(old_entries[0], first_cluster, 0,
                                               pos - first_cluster)
        tail_cluster = last_end - self.cluster_size
        if end < last_end:
            tail = await self._cluster_content(old_entries[-1], tail_cluster,
                                               end - tail_cluster, self.cluster_size)
        host = await self.alloc_clusters(count * self.cluster_size)
        # QEMU checks the guest data's part (its clusters hold the COW parts too).
        self.check_overlap(host + len(head), len(part), 0)
        if (head or tail) and isinstance(part, HostCopy):
            # Offloads come cluster-aligned; should one not, merge the bytes.
            part = memoryview(await asyncio.get_running_loop().run_in_executor(None, part.read))
        # Whole clusters (the common case) go out without a copy of the data.
        payload = head + bytes(part) + tail if head or tail else part
        # QEMU writes the COW parts with the data in one request when it can,
        # announced as a COW write instead of the data's.
        self.storage.debug_event("cow_write" if head or tail else "write_aio")
        try:
            if release:
                await self._data_without_lock(host, payload, (first_cluster, last_end))
            else:
                await self._put(host, payload)
        except OSError:
            # QEMU's qcow2_alloc_cluster_abort: a failed data write gives its new
            # clusters back, so a retry reuses them and nothing leaks.
            await self._unallocate(host, count)
            raise
        if isinstance(payload, CheckedCopy) and payload.mixed:
            await self._unallocate(host, count)
            raise MixedZeroes()
        if isinstance(payload, CheckedCopy) and payload.zero:
            # Copy-on-read data that reads as zeroes: a zero write instead, as
            # QEMU's copy-on-read makes it; the clusters go back unused.
            await self._unallocate(host, count)
            await self._zeroize(pos, len(part), may_unmap=False)
            return
        if release:
            # The table may have moved meanwhile (copied for a snapshot).
            l2_offset, l2 = await self._l2_for_write(pos)
        self.data_since_flush = True
        await self._set_dependency(self.l2_cache, self.refcount_cache)
        l2 = await self._cache_get(self.l2_cache, l2_offset)
        cs = self.cluster_size
        _entries_struct(count).pack_into(
            l2, index * 8, *[(host + i * cs) | C.OFLAG_COPIED for i in range(count)])
        self.l2_cache.mark_dirty(l2_offset)
        for old in old_entries:
            # Unallocated and plain zero entries held no reference.
            if old & (C.OFLAG_COMPRESSED | C.L2E_OFFSET_MASK):
                await self._release_entry(old)

    async def _unallocate(self, host: int, count: int) -> None:
        """Give back ``count`` clusters just allocated at ``host`` that no table
        ever pointed to: their refcounts drop to 0 again and the free cursor
        returns, without the ordering a free needs (no L2 entry, cached or on
        disk, names them; on disk they are at worst leaked)."""
        for i in range(count):
            cluster_offset = host + i * self.cluster_size
            cluster_index = cluster_offset >> self.cluster_bits
            block_offset = self._reftable_block(cluster_index >> self.refcount_block_bits)
            block = await self._cache_get(self.refcount_cache, block_offset)
            index = cluster_index & (self.refcount_block_entries - 1)
            set_refcount(block, index, self.refcount_order,
                         get_refcount(block, index, self.refcount_order) - 1)
            self.refcount_cache.mark_dirty(block_offset)
            self._cluster_freed(cluster_offset, block_offset, False)

    async def _release_entry(self, entry: int, discard: bool = False) -> None:
        """Drop the reference an L2 entry held (after the entry was changed);
        ``discard``: a cluster that becomes free is queued for the file's discard."""
        kind = self.cluster_kind(entry)
        if kind in (NORMAL, ZERO_ALLOC):
            await self.free_clusters(entry & C.L2E_OFFSET_MASK, self.cluster_size,
                                     snapshot_discard=discard)
        elif kind == COMPRESSED:
            first, length = self.compressed_range(entry)
            await self.free_clusters(first, length, snapshot_discard=discard)

    async def _release_freed(self, entries: list[int]) -> None:
        """Drop the references of entries a guest discard or an unmapping zero
        write replaced; with pass-discard-request the clusters that became free
        are discarded on the file too, once their refcounts are on the disk."""
        if not entries:
            return
        discard = self.passes_request_discards()
        for entry in entries:
            await self._release_entry(entry, discard)
        if discard:
            await self.process_discards()

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """(offset, length) of the host bytes a compressed entry's refcount covers."""
        coffset = entry & self._coffset_mask
        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        last = (coffset & ~(C.COMPRESSED_SECTOR - 1)) + sectors * C.COMPRESSED_SECTOR - 1
        first = self._start_of_cluster(coffset)
        return first, last - first + 1

    # --- zeroes and discard -------------------------------------------------------------

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make [offset, offset+length) read as zeroes, without writing data where
        the format can say so (QEMU's qcow2_co_pwrite_zeroes, with the generic
        layer's split into an unaligned head, whole clusters and a tail)."""
        self._check_usable()
        self._check_writable()
        try:
            await self._write_zeroes(offset, length, may_unmap)
        except CorruptionError as exc:
            await self._signal(exc)
            raise eio() from None

    async def _write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        end = offset + length
        aligned_start = min(end, -(-offset // self.cluster_size) * self.cluster_size)
        aligned_end = end if end == self.size else self._start_of_cluster(end)
        aligned_end = max(aligned_end, aligned_start)
        if offset < aligned_start:
            await self._zero_piece(self._start_of_cluster(offset), offset, aligned_start,
                                   may_unmap)
        if aligned_start < aligned_end:
            async with self.lock:
                await self._zeroize(aligned_start, aligned_end - aligned_start, may_unmap)
        if aligned_end < end:
            await self._zero_piece(aligned_end, aligned_end, end, may_unmap)

    async def _zero_piece(self, cluster: int, start: int, end: int, may_unmap: bool) -> None:
        async with self.lock:
            done = await self._zero_partial(cluster, start, end, may_unmap)
        if not done:
            await self.write(start, bytes(end - start))

    async def _zero_partial(self, cluster: int, start: int, end: int, may_unmap: bool) -> bool:
        """A zero write inside one cluster: done without data if the rest of the
        cluster already reads as zeroes and the cluster holds no data."""
        await self._wait_allocations(cluster, cluster + self.cluster_size)
        cluster_end = min(cluster + self.cluster_size, self.size)
        before = await self._read(cluster, start - cluster) if start > cluster else b""
        after = await self._read(end, cluster_end - end) if cluster_end > end else b""
        if before.count(0) != len(before) or after.count(0) != len(after):
            return False
        l2 = await self._l2_for_read(cluster)
        entry = self._entry(l2, self._l2_index(cluster)) if l2 is not None else 0
        if self.cluster_kind(entry) not in (UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC):
            return False
        await self._zeroize(cluster, self.cluster_size, may_unmap)
        return True

    async def _zeroize(self, offset: int, length: int, may_unmap: bool) -> None:
        await self._wait_allocations(offset, offset + length)
        if self.header.version < 3:
            if self.backing is None:
                await self._discard_clusters(offset, length, full=False)
                return
            # v2 with a backing file has no way to say "zero": write data.
            await self._write_zero_data(offset, length)
            return
        end = offset + length
        while offset < end:
            chunk = self._table_chunk(offset, end - offset)
            l2_offset, l2 = await self._l2_for_write(offset)
            index = self._l2_index(offset)
            freed = []
            for i in range(self._clusters(chunk)):
                old = self._entry(l2, index + i)
                kind = self.cluster_kind(old)
                unmap = kind == COMPRESSED or (may_unmap and kind in (NORMAL, ZERO_ALLOC))
                new = (0 if unmap else old) | C.OFLAG_ZERO
                if new == old:
                    continue
                if unmap:
                    await self._set_dependency(self.refcount_cache, self.l2_cache)
                self._set_entry(l2, index + i, new)
                self.l2_cache.mark_dirty(l2_offset)
                if unmap:
                    freed.append(old)
            await self._release_freed(freed)
            offset += chunk

    async def _write_zero_data(self, offset: int, length: int) -> None:
        step = 1 << 20
        end = offset + length
        while offset < end:
            n = min(step, end - offset)
            await self._write_unlocked(offset, bytes(n))
            offset += n

    async def _write_unlocked(self, offset: int, data: "bytes | HostCopy",
                              release: bool = False) -> None:
        # A HostCopy (copy offload) slices like a memoryview of its bytes would.
        view = data if isinstance(data, HostCopy) else memoryview(data)
        while view:
            chunk = self._table_chunk(offset, len(view))
            await self._write_in_table(offset, view[:chunk], release)
            offset += chunk
            view = view[chunk:]

    async def discard(self, offset: int, length: int) -> None:
        """Guest discard: whole clusters only (and the partial last one)."""
        self._check_usable()
        self._check_writable()
        if self.header.version < 3 and self.backing is not None:
            return                    # QEMU: not supported, silently dropped
        start = -(-offset // self.cluster_size) * self.cluster_size
        end = offset + length
        if end != self.size:
            end = self._start_of_cluster(end)
        if end <= start:
            return
        async with self.lock:
            try:
                await self._discard_clusters(start, end - start, full=False)
            except CorruptionError as exc:
                await self._signal(exc)
                raise eio() from None

    async def _discard_clusters(self, offset: int, length: int, full: bool) -> None:
        await self._wait_allocations(offset, offset + length)
        end = offset + length
        while offset < end:
            chunk = self._table_chunk(offset, end - offset)
            l2 = await self._l2_for_read(offset)
            if l2 is None and not full and self.backing is None:
                offset += chunk
                continue
            l2_offset, l2 = await self._l2_for_write(offset)
            index = self._l2_index(offset)
            freed = []
            for i in range(self._clusters(chunk)):
                old = self._entry(l2, index + i)
                kind = self.cluster_kind(old)
                keep = (kind != COMPRESSED and not full and self.options.discard_no_unref)
                new = old
                if full:
                    new = 0
                elif self.backing is not None or kind in (NORMAL, ZERO_ALLOC, COMPRESSED):
                    if self.header.version >= 3:
                        new = (old | C.OFLAG_ZERO) if keep else C.OFLAG_ZERO
                    else:
                        new = 0
                if new == old:
                    continue
                await self._set_dependency(self.refcount_cache, self.l2_cache)
                self._set_entry(l2, index + i, new)
                self.l2_cache.mark_dirty(l2_offset)
                if not (keep and new & C.L2E_OFFSET_MASK):
                    freed.append(old)
            await self._release_freed(freed)
            offset += chunk

    # --- block status -------------------------------------------------------------------

    def cached_entry(self, offset: int) -> int | None:
        """The L2 entry of ``offset`` if its table is cached (0: no table), else None."""
        l2_offset = self._l2_offset(self._l1_index(offset))
        if not l2_offset:
            return 0
        table = self.l2_cache.lookup(l2_offset)
        if table is None:
            return None
        return self._entry(table, self._l2_index(offset))

    def check_entry(self, entry: int, offset: int) -> None:
        """Raise CorruptionError for an L2 entry whose host offset is unaligned
        (for lookups outside the request paths: block status, NBD's file ranges)."""
        self._check_entry(entry, offset)

    def entry_from(self, table: bytes, offset: int) -> int:
        return _U64.unpack_from(table, self._l2_index(offset) * 8)[0]

    def l2_table_offset(self, offset: int) -> int:
        return self._l2_offset(self._l1_index(offset))

    def remember_l2(self, l2_offset: int, data: bytes) -> None:
        """Keep a table read outside the request path (block status) if there is room."""
        if self.l2_cache.lookup(l2_offset) is None and not self.l2_cache.full():
            self.l2_cache.insert(l2_offset, bytearray(data))


_ENTRY_STRUCTS: dict[int, struct.Struct] = {}


def _entries_struct(count: int) -> struct.Struct:
    """The struct of ``count`` big-endian table entries (kept per count)."""
    packer = _ENTRY_STRUCTS.get(count)
    if packer is None:
        packer = _ENTRY_STRUCTS[count] = struct.Struct(f">{count}Q")
    return packer


_IN_PLACE_TEST = C.OFLAG_KIND | C.OFLAG_COPIED


def _contiguous(entries: tuple[int, ...], host: int, cs: int, flags: int) -> bool:
    """Whether ``entries`` map, with exactly ``flags``, the clusters right after
    ``host`` one by one: the common case, tested at C speed."""
    first = host + cs
    return entries == tuple(range(first | flags, (first + len(entries) * cs) | flags, cs))


def _same_kind_count(entries: tuple[int, ...], kind: int, host: int, cs: int) -> int:
    """How many of ``entries`` continue a read run of ``kind`` (zero kinds mix;
    NORMAL clusters must follow ``host`` contiguously; COMPRESSED never runs)."""
    if kind == NORMAL:
        if _contiguous(entries, host, cs, C.OFLAG_COPIED) or _contiguous(entries, host, cs, 0):
            return len(entries)
        for i, entry in enumerate(entries):
            if entry & C.OFLAG_KIND or (entry & C.L2E_OFFSET_MASK) != host + (i + 1) * cs:
                return i
    elif kind == UNALLOCATED:
        for i, entry in enumerate(entries):
            if entry & C.OFLAG_KIND or entry & C.L2E_OFFSET_MASK:
                return i
    elif kind in (ZERO_PLAIN, ZERO_ALLOC):
        for i, entry in enumerate(entries):
            if entry & C.OFLAG_KIND != C.OFLAG_ZERO:
                return i
    else:
        return 0
    return len(entries)


def _in_place_count(entries: tuple[int, ...], in_place: bool, host: int, cs: int) -> int:
    """How many of ``entries`` continue a write run: clusters written in place
    (normal, COPIED, contiguous after ``host``), or clusters that all need new
    ones."""
    if in_place:
        if _contiguous(entries, host, cs, C.OFLAG_COPIED):
            return len(entries)
        for i, entry in enumerate(entries):
            if (entry & _IN_PLACE_TEST != C.OFLAG_COPIED
                    or (entry & C.L2E_OFFSET_MASK) != host + (i + 1) * cs):
                return i
        return len(entries)
    for i, entry in enumerate(entries):
        if entry & _IN_PLACE_TEST == C.OFLAG_COPIED and entry & C.L2E_OFFSET_MASK:
            return i
    return len(entries)


def table_entries(table: "bytes | bytearray", index: int, count: int) -> tuple[int, ...]:
    """``count`` table entries from ``index`` on, in one unpack."""
    return _entries_struct(count).unpack_from(table, index * 8)


def _report(line: str) -> None:
    import sys
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _c_hex(value: int) -> str:
    """printf's %#x: 0x-prefixed, but a plain 0 for zero."""
    return f"{value:#x}" if value else "0"


_OL_ACTIVE_L1, _OL_ACTIVE_L2, _OL_REFCOUNT_BLOCK = 1 << 1, 1 << 2, 1 << 4


def check_encryption(header: Header, options: Options) -> None:
    """QEMU's checks of the encrypt options against the header, up to where it
    would start decrypting: qmpjobd refuses encrypted images there."""
    wanted = options.encrypt_format
    if not header.crypt_method:
        if wanted is not None:
            raise Qcow2OpenError("No encryption in image header, but options specified "
                                 f"format '{wanted}'")
        return
    reported = "aes" if header.crypt_method == C.CRYPT_AES else "luks"
    if wanted is not None and wanted != reported:
        raise Qcow2OpenError(f"Header reported '{reported}' encryption format but options "
                             f"specify '{wanted}'")
    secret = options.encrypt_secret
    if secret is None:
        raise Qcow2OpenError("Parameter 'encrypt.key-secret' is required for cipher")
    if not options.has_secret(secret):
        raise Qcow2OpenError(f"No secret with id '{secret}'")
    raise Qcow2OpenError("qcow2 encryption is not supported by qmpjobd")


def refuse_unsupported(header: Header, read_only: bool, options: Options) -> None:
    """Features qmpjobd cannot handle: refused with a message naming them."""
    check_encryption(header, options)
    if header.incompatible_features & C.INCOMPAT_DATA_FILE:
        raise Qcow2OpenError("qcow2 images with an external data file are not "
                             "supported by qmpjobd")
    if header.incompatible_features & C.INCOMPAT_EXTL2:
        raise Qcow2OpenError("qcow2 images with extended L2 entries are not "
                             "supported by qmpjobd")
    if header.compression_type != C.COMPRESSION_ZLIB:
        raise Qcow2OpenError("qcow2 images with zstd compression are not supported by qmpjobd")
