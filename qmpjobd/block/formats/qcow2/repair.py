"""Repair of a qcow2 image left with the dirty bit (lazy refcounts after a crash).

QEMU opens such an image read-write only after its consistency check has run
with both repair modes (qcow2_do_open, "Repair image if dirty"); this module is
qmpjobd's version of that check, with QEMU's observable results: the same lines
on stderr, the same decisions, and the same rebuilt layout.

1. **Counting.** The references every cluster should have are counted from the
   metadata alone into an in-memory refcount table (``Counts``, one bytearray per
   refcount block, so that a rebuilt refblock is a slice of it): the header, the
   active L1 table with its L2 tables and the clusters they map (compressed ones
   by the host bytes they cover), each snapshot's L1 and L2 tables, the snapshot
   table, the refcount table, the persistent bitmaps (directory, tables, data)
   and the refcount blocks themselves.
2. **Comparing.** The refcounts on disk are compared with the counts, cluster by
   cluster (whole equal blocks at once). A count above the reference is a leak,
   one below it an error; each difference prints ``ERROR``/``Leaked cluster N
   refcount=R reference=C``. A cluster in use whose refcount is 0 (what a crash
   with lazy refcounts leaves: the L2 entry reached the disk, its refcount
   never did) cannot be fixed in place: the refcount structure is rebuilt.
3. **Fixing in place** (no rebuild needed): the same walk again, adjusting each
   differing refcount by its difference (``Repairing cluster ...``).
4. **Rebuilding**: new refcount blocks are written, each a slice of the counts,
   in clusters the counts show free (first fit, each counted in the block that
   covers it), then a new refcount table after them; once all of it is on the
   disk (flushed), one header write switches the image to it. The old table and
   blocks are then leaks, freed by a second count-and-compare that fixes leaks
   only.
5. **OFLAG_COPIED** is made to agree with the (now exact) refcounts in the
   active L1 and L2 tables.
6. Only then, with no error left, the dirty bit is cleared (caches flushed first).

A kill at any point leaves an image that still has the dirty bit (until step 6)
and whose header names either the old refcount structure or the complete new
one, so the next read-write open repairs it again; nothing in use is ever
overwritten (new structures only go where the counts say nothing lives).

Not reproduced (damaged images only, never what a crash leaves): QEMU's repairs
of the snapshot table (qcow2_check_fix_snapshot_table), and its growing of the
file to cover a refcount block that lies past the end (here that block is an
error and the structure is rebuilt).
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.block.formats.qcow2.header import Qcow2OpenError
from qmpjobd.block.formats.qcow2.refcount import get_refcount, set_refcount

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.formats.qcow2.image import CorruptionError, Qcow2Image

REFT_RESERVED_MASK = 0x1FF
_MAX_CLUSTERS = 2 ** 31 - 1          # QEMU's INT_MAX limit on the image's clusters
_U64 = struct.Struct(">Q")

# Repair modes (QEMU's BDRV_FIX_*).
FIX_LEAKS = 1
FIX_ERRORS = 2


@dataclass
class CheckResult:
    """BdrvCheckResult's counters."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0


def _say(line: str) -> None:
    """The check's own lines (QEMU prints them with fprintf: no program name)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _error_report(line: str) -> None:
    """A rebuild failure, which QEMU reports with error_report_err: the program
    name first, in every version."""
    from qmpjobd.block.stderr import PROGRAM_PREFIX
    _say(PROGRAM_PREFIX + line)


class Counts:
    """The in-memory refcount table: the refcount each cluster should have, kept
    as refcount-block-sized bytearrays in the image's refcount width."""

    def __init__(self, image: "Qcow2Image", clusters: int) -> None:
        self.order = image.refcount_order
        self.block_bits = image.refcount_block_bits
        self.block_size = image.cluster_size
        self.maximum = image.refcount_max
        self.blocks: dict[int, bytearray] = {}
        self.clusters = clusters                 # the table's size (it grows)

    def get(self, cluster: int) -> int:
        block = self.blocks.get(cluster >> self.block_bits)
        if block is None:
            return 0
        return get_refcount(block, cluster & ((1 << self.block_bits) - 1), self.order)

    def set(self, cluster: int, value: int) -> None:
        index = cluster >> self.block_bits
        block = self.blocks.get(index)
        if block is None:
            block = self.blocks[index] = bytearray(self.block_size)
        set_refcount(block, cluster & ((1 << self.block_bits) - 1), self.order, value)
        self.clusters = max(self.clusters, cluster + 1)

    def block_bytes(self, index: int) -> bytes:
        block = self.blocks.get(index)
        return bytes(block) if block is not None else bytes(self.block_size)

    def allocate(self, count: int, first_free: int) -> tuple[int, int]:
        """First fit of ``count`` clusters from ``first_free`` on, counted as used
        (the table grows past its end when needed). Returns (first cluster, the
        new first-free hint: the first free cluster met, even if too short a gap)."""
        cluster = first_free
        run = 0
        hint_set = False
        while cluster < self.clusters and run < count:
            if self.get(cluster) == 0:
                run += 1
                if not hint_set:
                    first_free, hint_set = cluster, True
            else:
                run = 0
            cluster += 1
        cluster -= run
        for i in range(count):
            self.set(cluster + i, 1)
        return cluster, first_free


class _Checker:
    def __init__(self, image: "Qcow2Image", file_length: int) -> None:
        self.image = image
        self.cs = image.cluster_size
        self.file_length = file_length

    # --- counting ---------------------------------------------------------------------

    def count_range(self, counts: Counts, res: CheckResult, offset: int, size: int) -> None:
        """One more reference to each cluster of [offset, offset+size)."""
        if size <= 0:
            return
        if offset + size - self.file_length >= self.cs:
            _say("ERROR: counting reference for region exceeding the end of the file by "
                 f"one cluster or more: offset {offset:#x} size {size:#x}")
            res.corruptions += 1
            return
        first = offset // self.cs
        last = (offset + size - 1) // self.cs
        for cluster in range(first, last + 1):
            value = counts.get(cluster)
            if value == counts.maximum:
                _say(f"ERROR: overflow cluster offset={cluster * self.cs:#x}")
                _say("Use qemu-img amend to increase the refcount entry width or qemu-img "
                     "convert to create a clean copy if the image cannot be opened for writing")
                res.corruptions += 1
                continue
            counts.set(cluster, value + 1)

    async def count_l1(self, counts: Counts, res: CheckResult, l1_offset: int,
                       l1_size: int, fix: int = 0, active: bool = True) -> None:
        if not l1_size:
            return
        self.count_range(counts, res, l1_offset, l1_size * 8)
        raw = await self.image.storage.pread(l1_offset, l1_size * 8)
        for entry in struct.unpack(f">{l1_size}Q", raw):
            if not entry:
                continue
            if entry & C.L1E_RESERVED_MASK:
                _say(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & C.L1E_OFFSET_MASK
            self.count_range(counts, res, l2_offset, self.cs)
            if l2_offset % self.cs:
                _say(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                     "L1 entry corrupted")
                res.corruptions += 1
            await self.count_l2(counts, res, l2_offset, fix, active)

    async def count_l2(self, counts: Counts, res: CheckResult, l2_offset: int,
                       fix: int = 0, active: bool = True) -> None:
        image = self.image
        raw = await image.storage.pread(l2_offset, self.cs)
        for index, entry in enumerate(struct.unpack(f">{self.cs // 8}Q", raw)):
            if not entry:
                continue
            if entry & C.OFLAG_COMPRESSED:
                if entry & C.OFLAG_COPIED:
                    _say(f"ERROR: coffset={entry & image._coffset_mask:#x}: copied flag "
                         "must never be set for compressed clusters")
                    entry &= ~C.OFLAG_COPIED
                    res.corruptions += 1
                coffset = entry & image._coffset_mask
                sectors = ((entry >> image._csize_shift) & image._csize_mask) + 1
                size = sectors * C.COMPRESSED_SECTOR - (coffset & (C.COMPRESSED_SECTOR - 1))
                self.count_range(counts, res, coffset, size)
                continue
            if entry & C.L2E_STD_RESERVED_MASK:
                _say(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            host = entry & C.L2E_OFFSET_MASK
            if not host:
                continue                      # unallocated, or a plain zero cluster
            if host % self.cs:
                res.corruptions += 1
                if entry & C.OFLAG_ZERO:
                    word = "Repairing" if fix & FIX_ERRORS else "ERROR"
                    _say(f"{word} offset={host:x}: Preallocated cluster is not properly "
                         "aligned; L2 entry corrupted.")
                    if fix & FIX_ERRORS:
                        fixed = await self._zero_entry(res, l2_offset, index, active)
                        if fixed is None:
                            return          # it would overwrite metadata: stop here
                        if fixed:
                            continue        # a plain zero cluster now: nothing to count
                else:
                    _say(f"ERROR offset={host:x}: Data cluster is not properly aligned; "
                         "L2 entry corrupted.")
            self.count_range(counts, res, host, self.cs)

    async def _zero_entry(self, res: CheckResult, l2_offset: int, index: int,
                          active: bool) -> bool | None:
        """fix_l2_entry_by_zero: the entry becomes a plain zero cluster. True when
        fixed, False when the write failed, None when the overlap check refused it."""
        from qmpjobd.block.formats.qcow2 import snapshot as S
        from qmpjobd.block.formats.qcow2.image import CorruptionError
        image = self.image
        at = l2_offset + index * 8
        try:
            image.check_overlap(at, 8, S.OL_ACTIVE_L2 if active else S.OL_INACTIVE_L2)
        except CorruptionError as exc:
            await self._signal(exc)
            _say("ERROR: Overlap check failed")
            res.check_errors += 1
            return None
        try:
            await image.storage.pwrite(at, _U64.pack(C.OFLAG_ZERO))
            await image.storage.flush()
        except OSError as exc:
            _say("ERROR: Failed to overwrite L2 table entry: "
                 f"{os.strerror(exc.errno or errno.EIO)}")
            res.check_errors += 1
            return False
        image.l2_cache.discard(l2_offset)
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return True

    async def count_bitmaps(self, counts: Counts, res: CheckResult) -> None:
        from qmpjobd.block.formats.qcow2 import bitmaps as B
        fields = B.extension_fields(self.image.header)
        if fields is None or fields[0] == 0:
            return
        _nb, size, offset = fields
        try:
            entries = await B.read_directory(self.image)
        except B.BitmapFormatError as exc:
            _say(str(exc))
            res.corruptions += 1
            return
        self.count_range(counts, res, offset, size)
        for entry in entries:
            self.count_range(counts, res, entry.table_offset, entry.table_size * 8)
            try:
                table = await B._read_table(self.image, entry)
            except B.BitmapFormatError as exc:
                _say(str(exc))
                res.corruptions += 1
                continue
            for value in table:
                data = value & B.TABLE_OFFSET_MASK
                if data:
                    self.count_range(counts, res, data, self.cs)

    def count_refblocks(self, counts: Counts, res: CheckResult) -> bool:
        """The refcount blocks themselves; True when the structure needs rebuilding."""
        rebuild = False
        for index, entry in enumerate(self.image.reftable):
            offset = entry & C.REFT_OFFSET_MASK
            cluster = offset // self.cs
            if entry & REFT_RESERVED_MASK:
                _say(f"ERROR refcount table entry {index} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset % self.cs:
                _say(f"ERROR refcount block {index} is not cluster aligned; refcount table "
                     "entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= counts.clusters:
                # QEMU grows the file to cover it; qmpjobd rebuilds the structure.
                _say(f"ERROR refcount block {index} is outside image")
                res.corruptions += 1
                rebuild = True
                continue
            if offset:
                self.count_range(counts, res, offset, self.cs)
                if counts.get(cluster) != 1:
                    _say(f"ERROR refcount block {index} refcount={counts.get(cluster)}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    async def calculate(self, res: CheckResult, clusters: int,
                        fix: int = 0) -> tuple[Counts, bool]:
        """calculate_refcounts: the counts, and whether a rebuild is needed."""
        image = self.image
        header = image.header
        counts = Counts(image, clusters)
        self.count_range(counts, res, 0, self.cs)
        await self.count_l1(counts, res, header.l1_table_offset, len(image.l1), fix, True)
        for snap in image.snapshots:
            if snap.l1_table_offset % self.cs:
                _say(f"ERROR snapshot {snap.id_str} ({snap.name}) "
                     f"l1_offset={snap.l1_table_offset:#x}: L1 table is not cluster "
                     "aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if snap.l1_size > C.MAX_L1_SIZE_BYTES // 8:
                _say(f"ERROR snapshot {snap.id_str} ({snap.name}) "
                     f"l1_size={snap.l1_size:#x}: L1 table is too large; snapshot table "
                     "entry corrupted")
                res.corruptions += 1
                continue
            await self.count_l1(counts, res, snap.l1_table_offset, snap.l1_size, fix, False)
        self.count_range(counts, res, header.snapshots_offset, image.snapshots_size)
        self.count_range(counts, res, header.refcount_table_offset, len(image.reftable) * 8)
        await self.count_bitmaps(counts, res)
        return counts, self.count_refblocks(counts, res)

    # --- comparing --------------------------------------------------------------------

    async def compare(self, res: CheckResult, counts: Counts, fix: int) -> bool:
        """compare_refcounts: report (and with ``fix``, repair) each difference;
        True when a cluster in use has no refcount (a rebuild is needed)."""
        image = self.image
        rebuild = False
        per_block = 1 << counts.block_bits
        cluster = 0
        while cluster < counts.clusters:
            index = cluster >> counts.block_bits
            end = min(counts.clusters, (index + 1) * per_block)
            if cluster == index * per_block and end == (index + 1) * per_block:
                same = await self._block_matches(index, counts)
                if same:
                    cluster = end
                    continue
            for k in range(cluster, end):
                rebuild |= await self._compare_one(res, counts, k, fix)
            cluster = end
        # Freed (leaked) clusters are handed back to the file at once, as QEMU's
        # QCOW2_DISCARD_ALWAYS does: nothing references them, so this needs no
        # refcount on the disk first (the fixed refcounts stay cached until the
        # dirty bit is cleared, as in QEMU, where a failed repair drops them).
        freed = sorted(set(image.pending_discards))
        image.pending_discards.clear()
        for offset in freed:
            await image.storage.discard(offset, self.cs)
        return rebuild

    async def _block_matches(self, index: int, counts: Counts) -> bool:
        """Whether refcount block ``index`` on disk holds exactly the counts."""
        image = self.image
        try:
            offset = image._reftable_block(index)
        except OSError:
            return False
        expected = counts.blocks.get(index)
        if not offset:
            return expected is None or not any(expected)
        block = await image._cache_get(image.refcount_cache, offset)
        if expected is None:
            return not any(block)
        return block == expected

    async def _compare_one(self, res: CheckResult, counts: Counts, k: int, fix: int) -> bool:
        from qmpjobd.block.formats.qcow2.image import CorruptionError
        image = self.image
        try:
            on_disk = await image.get_refcount(k)
        except CorruptionError as exc:
            # An unreadable refcount block marks the image corrupt (once).
            await image.signal_corruption(exc.fatal, exc.corrupt_offset, exc.corrupt_size,
                                          exc.message)
            _say(f"Can't get refcount for cluster {k}: {os.strerror(errno.EIO)}")
            res.check_errors += 1
            return False
        except OSError as exc:
            _say(f"Can't get refcount for cluster {k}: "
                 f"{os.strerror(exc.errno or errno.EIO)}")
            res.check_errors += 1
            return False
        wanted = counts.get(k)
        if on_disk == wanted:
            return False
        rebuild = False
        fixing = None
        if on_disk == 0:
            rebuild = True
        elif on_disk > wanted and fix & FIX_LEAKS:
            fixing = "leaks_fixed"
        elif on_disk < wanted and fix & FIX_ERRORS:
            fixing = "corruptions_fixed"
        word = "Repairing" if fixing else "ERROR" if on_disk < wanted else "Leaked"
        _say(f"{word} cluster {k} refcount={on_disk} reference={wanted}")
        if fixing:
            try:
                await image.update_refcount(k * self.cs, 1, abs(on_disk - wanted),
                                            on_disk > wanted, snapshot_discard=True)
            except OSError:
                pass
            else:
                setattr(res, fixing, getattr(res, fixing) + 1)
                return rebuild
        if on_disk < wanted:
            res.corruptions += 1
        else:
            res.leaks += 1
        return rebuild

    # --- rebuilding -------------------------------------------------------------------

    async def _write_refblocks(self, counts: Counts, first: int, end: int,
                               table: list[int]) -> bool:
        """Write the refblocks of the clusters in use in [first, end), allocating
        (in the counts) those not in ``table`` yet; True when ``table`` grew."""
        image = self.image
        per_block = 1 << counts.block_bits
        grown = False
        first_free = 0
        cluster = first
        while cluster < end:
            index = cluster >> counts.block_bits
            block_start = index * per_block
            block = counts.blocks.get(index)
            stop = min(end, block_start + per_block)
            whole = cluster == block_start and stop == block_start + per_block
            used = block is not None and (any(block) if whole else
                                          any(counts.get(k) for k in range(cluster, stop)))
            if not used:
                cluster = stop
                continue
            if index < len(table) and table[index]:
                block_offset = table[index]
            else:
                first_free = max(first_free, block_start)
                block_cluster, first_free = counts.allocate(1, first_free)
                block_offset = block_cluster * self.cs
                end = max(end, block_cluster + 1)
                if len(table) <= index:
                    entries = -(-(index + 1) * 8 // self.cs) * self.cs // 8
                    table.extend([0] * (entries - len(table)))
                    grown = True
                table[index] = block_offset
            await self._checked_write(block_offset, counts.block_bytes(index), "refblock")
            cluster = block_start + per_block
        return grown

    async def _signal(self, exc: "CorruptionError") -> None:
        """QEMU's qcow2_signal_corruption for what an overlap check refused."""
        await self.image.signal_corruption(exc.fatal, exc.corrupt_offset, exc.corrupt_size,
                                           exc.message)

    async def _checked_write(self, offset: int, data: bytes, what: str) -> None:
        """A write of the new structure after the overlap check against every
        kind of metadata; a refusal marks the image corrupt (QEMU's
        qcow2_signal_corruption) and fails the rebuild with QEMU's report."""
        from qmpjobd.block.formats.qcow2.image import CorruptionError
        image = self.image
        try:
            image.check_overlap(offset, len(data), 0)
            await image.storage.pwrite(offset, data)
        except CorruptionError as exc:
            await self._signal(exc)
            _error_report(f"ERROR writing {what}: {os.strerror(errno.EIO)}")
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None
        except OSError as exc:
            _error_report(f"ERROR writing {what}: {os.strerror(exc.errno or errno.EIO)}")
            raise

    async def rebuild(self, counts: Counts) -> None:
        """rebuild_refcount_structure: a new refcount structure from the counts;
        the old one is leaked (the caller frees it)."""
        image = self.image
        cache = image.refcount_cache
        cache.entries.clear()
        cache.dirty.clear()
        table: list[int] = []
        grown = await self._write_refblocks(counts, 0, counts.clusters, table)
        assert grown
        table_offset = table_clusters = 0
        while grown:
            table_clusters = -(-len(table) * 8 // self.cs)
            start, _ = counts.allocate(table_clusters, 0)
            table_offset = start * self.cs
            grown = await self._write_refblocks(counts, start, start + table_clusters, table)
        data = struct.pack(f">{len(table)}Q", *table)
        await self._checked_write(table_offset, data, "reftable")
        # Everything the new header fields will name is on the disk first.
        await image.storage.flush()
        await image.storage.pwrite(48, struct.pack(">QI", table_offset, table_clusters))
        await image.storage.flush()
        image.reftable = table
        image.header.refcount_table_offset = table_offset
        image.header.refcount_table_clusters = table_clusters
        image.metadata_changed()

    # --- OFLAG_COPIED -----------------------------------------------------------------

    async def fix_copied_flags(self, res: CheckResult) -> None:
        """check_oflag_copied in repair mode, over the active tables."""
        from qmpjobd.block.formats.qcow2.image import _OL_ACTIVE_L2, CorruptionError
        image = self.image
        for index, l1_entry in enumerate(list(image.l1)):
            l2_offset = l1_entry & C.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = await image.get_refcount(l2_offset // self.cs)
            except OSError:
                continue
            if (refcount == 1) != bool(l1_entry & C.OFLAG_COPIED):
                _say(f"Repairing OFLAG_COPIED L2 cluster: l1_index={index} "
                     f"l1_entry={l1_entry:x} refcount={refcount}")
                value = (l1_entry | C.OFLAG_COPIED if refcount == 1
                         else l1_entry & ~C.OFLAG_COPIED)
                try:
                    await image._write_l1_entry(index, value)
                except CorruptionError as exc:
                    await self._signal(exc)
                    res.check_errors += 1
                    return
                except OSError:
                    res.check_errors += 1
                    return
                res.corruptions_fixed += 1
            table = bytearray(await image.storage.pread(l2_offset, self.cs))
            changed = 0
            for j in range(self.cs // 8):
                entry = _U64.unpack_from(table, j * 8)[0]
                host = entry & C.L2E_OFFSET_MASK
                if entry & C.OFLAG_COMPRESSED or not host:
                    continue
                try:
                    refcount = await image.get_refcount(host // self.cs)
                except OSError:
                    continue
                if (refcount == 1) != bool(entry & C.OFLAG_COPIED):
                    _say(f"Repairing OFLAG_COPIED data cluster: l2_entry={entry:x} "
                         f"refcount={refcount}")
                    _U64.pack_into(table, j * 8, entry | C.OFLAG_COPIED if refcount == 1
                                   else entry & ~C.OFLAG_COPIED)
                    changed += 1
            if changed:
                try:
                    image.check_overlap(l2_offset, self.cs, _OL_ACTIVE_L2)
                except CorruptionError as exc:
                    await self._signal(exc)
                    _say("ERROR: Could not write L2 table; metadata overlap check failed: "
                         f"{os.strerror(errno.EIO)}")
                    res.check_errors += 1
                    return
                try:
                    await image.storage.pwrite(l2_offset, bytes(table))
                except OSError as exc:
                    _say(f"ERROR: Could not write L2 table: "
                         f"{os.strerror(exc.errno or errno.EIO)}")
                    res.check_errors += 1
                    return
                image.l2_cache.discard(l2_offset)
                res.corruptions_fixed += changed


async def check_refcounts(image: "Qcow2Image", fix: int) -> CheckResult:
    """qcow2_check_refcounts with repair mode ``fix``; raises OSError on an
    internal error."""
    res = CheckResult()
    checker = _Checker(image, image.storage.length())
    clusters = -(-checker.file_length // checker.cs)
    if clusters > _MAX_CLUSTERS:
        res.check_errors += 1
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    counts, rebuild = await checker.calculate(res, clusters, fix)
    before_compare = CheckResult(**vars(res))
    rebuild |= await checker.compare(res, counts, 0)
    if rebuild and fix & FIX_ERRORS:
        old = CheckResult(**vars(res))
        _say("Rebuilding refcount structure")
        await checker.rebuild(counts)
        res.corruptions = res.leaks = 0
        checker.file_length = image.storage.length()
        counts, _ = await checker.calculate(res, counts.clusters)
        fresh_leaks = 0
        if fix & FIX_LEAKS:
            saved = CheckResult(**vars(res))
            res = CheckResult()
            if await checker.compare(res, counts, FIX_LEAKS):
                _say("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = res.leaks
            res = saved
        if res.corruptions < old.corruptions:
            res.corruptions_fixed += old.corruptions - res.corruptions
        if res.leaks < old.leaks:
            res.leaks_fixed += old.leaks - res.leaks
        res.leaks += fresh_leaks
    elif fix:
        if rebuild:
            _say("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if res.leaks or res.corruptions:
            res = before_compare
            await checker.compare(res, counts, fix)
    if fix & FIX_ERRORS or (fix & FIX_LEAKS and not (res.check_errors or res.corruptions
                                                      or res.leaks)):
        await checker.fix_copied_flags(res)
    return res


async def repair_dirty(image: "Qcow2Image") -> None:
    """What QEMU does when it opens a writable image with the dirty bit: the check
    with both repairs, then (no error left) the dirty bit cleared. Fails the open
    with QEMU's message when the check could not finish."""
    try:
        res = await check_refcounts(image, FIX_LEAKS | FIX_ERRORS)
        if res.check_errors:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if res.corruptions == 0:
            await mark_clean(image)
    except OSError as exc:
        raise Qcow2OpenError("Could not repair dirty image: "
                             f"{os.strerror(exc.errno or errno.EIO)}") from None


async def mark_clean(image: "Qcow2Image") -> None:
    """qcow2_mark_clean: the caches on the disk, then the header without the bit."""
    if not image.header.dirty:
        return
    image.header.incompatible_features &= ~C.INCOMPAT_DIRTY
    await image._flush_all()
    await image.write_header()


def repair_if_dirty(node: object) -> None:
    """The repair of a qcow2 node's image when it has the dirty bit and is
    writable: at open (once the node listens for corruption, so an overlap the
    repair meets sends QEMU's event), and when a node becomes writable by a
    reopen. QEMU's reopens skip the repair and let writes allocate from the stale
    refcounts (clusters in use counted free would be handed out again); qmpjobd
    does not write on refcounts it knows to be unreliable."""
    image = getattr(node, "image", None)
    if image is None or image.read_only or not image.header.dirty \
            or not getattr(node, "active", True):
        return
    node.run_metadata_operation(repair_dirty)      # type: ignore[attr-defined]
