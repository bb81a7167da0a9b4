"""Dirty bitmaps: which parts of a node were written, one bit per granularity chunk.

This is QEMU's BdrvDirtyBitmap (block/dirty-bitmap.c) as qmpjobd needs it: the
bits live in a :class:`~qmpjobd.block.bitmap.ClusterBitmap` (one bit per chunk,
so a 1 TiB node at 64 KiB granularity costs 2 MiB), and the flags are QEMU's:

* ``recording`` -- QEMU's "enabled": writes to the node set bits. (What
  ``query-named-block-nodes`` reports as ``recording`` is this, *or* a recording
  successor: a bitmap frozen by a backup still says it records.)
* ``busy`` -- owned by an operation (a backup, an export); QMP refuses it.
* ``readonly`` -- loaded from an image opened read-only; never modified.
* ``persistent`` -- stored in the image (qcow2) when the node is closed.
* ``inconsistent`` -- loaded from an image that was not closed cleanly; empty,
  not recording, refused by everything but remove and the sha256 debug command.

A node keeps its bitmaps newest first (``BlockNode.dirty_bitmaps``); every write,
write-zeroes or discard that reaches the node sets the bits of each recording
bitmap through ``BlockNode.mark_dirty``, whether the request succeeded or not,
as QEMU's bdrv_co_write_req_finish does.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Iterator

from qmpjobd.block.bitmap import ClusterBitmap
from qmpjobd.errors import QMPError

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.node import BlockNode

# QEMU's BDRV_BITMAP_MAX_NAME_SIZE.
MAX_NAME_SIZE = 1023
MIN_GRANULARITY = 512
DEFAULT_GRANULARITY = 64 * 1024
# Default granularity from a driver's cluster size is clamped to this range
# (bdrv_get_default_bitmap_granularity).
_DEFAULT_MIN = 4096
_DEFAULT_MAX = 64 * 1024

# The permission checks of bdrv_dirty_bitmap_check, as flag sets.
CHECK_BUSY = 1
CHECK_RO = 2
CHECK_INCONSISTENT = 4
CHECK_DEFAULT = CHECK_BUSY | CHECK_RO | CHECK_INCONSISTENT
CHECK_ALLOW_RO = CHECK_BUSY | CHECK_INCONSISTENT


class DirtyBitmap:
    """One dirty bitmap of ``size`` bytes at ``granularity`` bytes per bit."""

    __slots__ = ("name", "granularity", "size", "recording", "busy", "persistent",
                 "inconsistent", "readonly", "skip_store", "node", "successor",
                 "_bits")

    def __init__(self, size: int, granularity: int, name: str | None = None, *,
                 recording: bool = True) -> None:
        if granularity < 1 or granularity & (granularity - 1):
            raise ValueError(f"granularity {granularity} is not a power of two")
        self.name = name
        self.granularity = granularity
        self.size = size
        self.recording = recording
        self.busy = False
        self.persistent = False
        self.inconsistent = False
        self.readonly = False
        # A persistent bitmap being removed inside a transaction is not stored
        # at close (QEMU's skip_store).
        self.skip_store = False
        # The node whose list holds this bitmap (set by BlockNode.add_dirty_bitmap).
        self.node: "BlockNode | None" = None
        self.successor: DirtyBitmap | None = None
        self._bits = ClusterBitmap(self._chunks(size))

    def _chunks(self, size: int) -> int:
        return -(-size // self.granularity)

    # --- bits -------------------------------------------------------------------------

    @property
    def bits(self) -> ClusterBitmap:
        """The chunk bits (bit ``i`` covers bytes ``[i*g, (i+1)*g)``)."""
        return self._bits

    def set_dirty(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset+length)`` dirty, rounded out to whole chunks."""
        if length <= 0:
            return
        g = self.granularity
        self._bits.set_range(offset // g, -(-(offset + length) // g), True)

    def reset_dirty(self, offset: int, length: int) -> None:
        """Mark the chunks wholly inside the range clean (a range that reaches the
        end also clears the last, short chunk). Callers pass aligned ranges, as
        QEMU requires; rounding inwards never loses a dirty byte otherwise."""
        if length <= 0:
            return
        g = self.granularity
        end = offset + length
        last = self._bits.size if end >= self.size else end // g
        self._bits.set_range(-(-offset // g), last, False)

    def is_dirty(self, offset: int) -> bool:
        if offset < 0 or offset >= self.size:
            return False
        return self._bits.get(offset // self.granularity)

    def next_dirty(self, offset: int, end: int | None = None) -> int | None:
        """First dirty byte in ``[offset, end)``: ``offset`` itself if its chunk is
        dirty, else the start of the next dirty chunk; None if there is none."""
        return self._next(offset, end, dirty=True)

    def next_clean(self, offset: int, end: int | None = None) -> int | None:
        """First clean byte in ``[offset, end)``, like :meth:`next_dirty`."""
        return self._next(offset, end, dirty=False)

    def _next(self, offset: int, end: int | None, dirty: bool) -> int | None:
        end = self.size if end is None else min(end, self.size)
        offset = max(offset, 0)
        if offset >= end:
            return None
        g = self.granularity
        first, limit = offset // g, -(-end // g)
        found = (self._bits.next_set(first, limit) if dirty
                 else self._bits.next_clear(first, limit))
        if found < 0:
            return None
        return max(offset, found * g)

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Runs ``(offset, length, dirty)`` covering ``[offset, offset+length)``
        (clipped to the bitmap's size), each as long as possible."""
        end = min(offset + length, self.size)
        pos = max(offset, 0)
        while pos < end:
            dirty = self.is_dirty(pos)
            following = self._next(pos, end, dirty=not dirty)
            stop = end if following is None else following
            yield pos, stop - pos, dirty
            pos = stop

    @property
    def dirty_bytes(self) -> int:
        """QEMU's count (hbitmap_count): dirty chunks times the granularity. The
        last chunk counts whole even where it reaches past the end (observed on
        7.2, 10.0 and 11.1: a 1000448-byte node fully dirty at 64 KiB shows
        1048576)."""
        return self._bits.count * self.granularity

    @property
    def count(self) -> int:
        return self.dirty_bytes

    def clear(self) -> None:
        self._bits = ClusterBitmap(self._bits.size)

    def set_all(self) -> None:
        self._bits = ClusterBitmap(self._bits.size, fill=True)

    def merge_from(self, other: "DirtyBitmap") -> None:
        """OR ``other``'s dirty bytes into this bitmap (any granularities; equal
        granularities merge word-wise)."""
        if other.granularity == self.granularity and other._bits.size == self._bits.size:
            mine, theirs = self._bits, other._bits
            merged = int.from_bytes(mine.bits, "little") | int.from_bytes(theirs.bits, "little")
            mine.bits[:] = merged.to_bytes(len(mine.bits), "little")
            mine.count = merged.bit_count()
            return
        for start, length, dirty in other.extents(0, other.size):
            if dirty:
                self.set_dirty(start, min(length, max(self.size - start, 0)))

    def copy(self, name: str | None = None) -> "DirtyBitmap":
        """An unattached copy of the bits (flags are left at their defaults)."""
        clone = DirtyBitmap(self.size, self.granularity, name, recording=self.recording)
        clone._bits.bits[:] = self._bits.bits
        clone._bits.count = self._bits.count
        return clone

    def snapshot_bits(self) -> tuple[bytes, int]:
        """The bits as they are now, for :meth:`restore_bits` (a rollback)."""
        return bytes(self._bits.bits), self._bits.count

    def restore_bits(self, saved: tuple[bytes, int]) -> None:
        data, count = saved
        self._bits.bits[:] = data
        self._bits.count = count

    def truncate(self, size: int) -> None:
        """Follow a node resize (bdrv_dirty_bitmap_truncate): bits past the new end
        go, new chunks start clean."""
        old = self._bits
        self.size = size
        new = ClusterBitmap(self._chunks(size))
        keep = min(old.size, new.size)
        nbytes = keep // 8
        new.bits[:nbytes] = old.bits[:nbytes]
        new.count = int.from_bytes(new.bits[:nbytes], "little").bit_count()
        for index in range(nbytes * 8, keep):
            if old.get(index):
                new.set_range(index, index + 1, True)
        self._bits = new

    def serialized(self) -> bytes:
        """The bits as QEMU's HBitmap keeps its lowest level: 64-bit little-endian
        words, bit ``i`` of the bitmap at bit ``i % 64`` of word ``i // 64``, at
        least one word."""
        data = bytes(self._bits.bits)
        words = max(1, -(-len(data) // 8))
        return data + bytes(words * 8 - len(data))

    def sha256(self) -> str:
        """x-debug-block-dirty-bitmap-sha256: SHA-256 of :meth:`serialized`."""
        return hashlib.sha256(self.serialized()).hexdigest()

    # --- flags and checks ---------------------------------------------------------------

    @property
    def reported_recording(self) -> bool:
        """QEMU's bdrv_dirty_bitmap_recording: enabled, or a successor records."""
        return self.recording or (self.successor is not None and self.successor.recording)

    def check(self, flags: int = CHECK_DEFAULT) -> None:
        """bdrv_dirty_bitmap_check: raise QEMU's error for the first failed test."""
        if flags & CHECK_BUSY and self.busy:
            raise QMPError(f"Bitmap '{self.name}' is currently in use by another "
                           f"operation and cannot be used")
        if flags & CHECK_RO and self.readonly:
            raise QMPError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if flags & CHECK_INCONSISTENT and self.inconsistent:
            raise QMPError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    def mark_inconsistent(self) -> None:
        """bdrv_dirty_bitmap_set_inconsistent: an empty, disabled, persistent bitmap."""
        self.inconsistent = True
        self.recording = False
        self.persistent = True

    def info(self) -> dict:
        """BlockDirtyInfo, members in QAPI declaration order."""
        info: dict = {}
        if self.name is not None:
            info["name"] = self.name
        info.update({"count": self.dirty_bytes, "granularity": self.granularity,
                     "recording": self.reported_recording, "busy": self.busy,
                     "persistent": self.persistent})
        if self.inconsistent:
            info["inconsistent"] = True
        return info

    # --- QEMU's successor protocol (backup) -----------------------------------------

    def create_successor(self) -> "DirtyBitmap":
        """bdrv_dirty_bitmap_create_successor: freeze this bitmap (busy, not
        recording) and add an anonymous bitmap that records in its place."""
        self.check(CHECK_BUSY)
        if self.successor is not None:
            raise QMPError("Cannot create a successor for a bitmap that already has one")
        successor = DirtyBitmap(self.size, self.granularity, recording=self.recording)
        if self.node is not None:
            self.node.add_dirty_bitmap(successor)
        self.successor = successor
        self.recording = False
        self.busy = True
        return successor

    def abdicate(self) -> None:
        """bdrv_dirty_bitmap_abdicate: the successor's bits replace the frozen ones
        and this bitmap takes the successor's place in the node's list."""
        successor = self._take_successor()
        self._bits = successor._bits
        self.recording = successor.recording
        node = self.node
        if node is not None and successor in node.dirty_bitmaps:
            bitmaps = node.dirty_bitmaps
            if self in bitmaps:
                bitmaps.remove(self)
            bitmaps[bitmaps.index(successor)] = self
        self.busy = False

    def reclaim(self) -> None:
        """bdrv_reclaim_dirty_bitmap: merge the successor back (nothing is lost)."""
        successor = self._take_successor()
        self.merge_from(successor)
        self.recording = successor.recording
        node = self.node
        if node is not None and successor in node.dirty_bitmaps:
            node.dirty_bitmaps.remove(successor)
        self.busy = False

    def _take_successor(self) -> "DirtyBitmap":
        successor = self.successor
        if successor is None:
            raise RuntimeError(f"dirty bitmap {self.name!r} has no successor")
        self.successor = None
        return successor

    def __repr__(self) -> str:
        return (f"<DirtyBitmap {self.name!r} g={self.granularity} size={self.size} "
                f"dirty={self.dirty_bytes}>")


# --- node-side helpers --------------------------------------------------------------------


def driver_cluster_size(node: Any) -> int:
    """What bdrv_get_info reports as cluster size: a qcow2 image's, through raw
    formats and filters to the node below; 0 when the driver has none."""
    seen = 0
    while node is not None and seen < 64:
        seen += 1
        image = getattr(node, "image", None)
        cluster = getattr(image, "cluster_size", 0) if node.driver == "qcow2" else 0
        if cluster:
            return int(cluster)
        if node.driver == "raw" or node.is_filter:
            node = node.file_child
            continue
        return 0
    return 0


def default_granularity(node: Any) -> int:
    """bdrv_get_default_bitmap_granularity."""
    cluster = driver_cluster_size(node)
    if cluster > 0:
        return min(max(cluster, _DEFAULT_MIN), _DEFAULT_MAX)
    return DEFAULT_GRANULARITY


def named_bitmaps(node: Any) -> list[DirtyBitmap]:
    """The node's DirtyBitmap objects (a mirror job may still register a plain
    info provider in the same list)."""
    return [b for b in node.dirty_bitmaps if isinstance(b, DirtyBitmap)]


def truncate_bitmaps(node: Any, size: int) -> None:
    """Resize every bitmap of ``node`` with it (block_resize)."""
    for bitmap in named_bitmaps(node):
        bitmap.truncate(size)
