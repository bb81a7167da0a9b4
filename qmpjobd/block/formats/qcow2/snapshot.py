"""Internal snapshots: the qcow2 snapshot table, and taking and deleting snapshots.

The table (docs/interop/qcow2, "Snapshot table") is a run of variable-length
entries, each 8-byte aligned: a 40-byte fixed part, ``extra_data_size`` bytes of
extra data (QEMU writes 24: the 64-bit VM state size, the disk size and the
icount; bytes past those are kept as they are), the id string and the name.

Taking a snapshot follows QEMU's steps, in QEMU's order, so that the same
sequence of commands gives the same image layout:

1. a copy of the active L1 table in newly allocated clusters;
2. the refcount of every cluster the active L1 reaches (L2 tables, data clusters,
   compressed sectors) goes up by one, and OFLAG_COPIED is cleared wherever a
   refcount is no longer exactly 1 (``update_snapshot_refcount``);
3. a new snapshot table is written in new clusters, the header is switched to it
   with one write, and the old table is freed.

Deleting one is the reverse: the table without the entry first, then the
snapshot's references dropped, its L1 table freed, and OFLAG_COPIED set again on
the active tables wherever a refcount went back to 1.

Writes into clusters a snapshot shares go through the ordinary allocating path:
an entry without OFLAG_COPIED is never written in place.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.block.formats.qcow2.header import Qcow2OpenError

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.formats.qcow2.image import Qcow2Image

_ENTRY = struct.Struct(">QIHHIIQII")           # the fixed 40 bytes
_EXTRA = struct.Struct(">QQQ")                 # vm_state_size_large, disk_size, icount
EXTRA_SIZE = _EXTRA.size
MAX_EXTRA_DATA = 1024                           # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_TABLE_SIZE = 1024 * C.MAX_SNAPSHOTS         # QEMU's QCOW_MAX_SNAPSHOTS_SIZE
NO_ICOUNT = (1 << 64) - 1


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int = 0
    icount: int = NO_ICOUNT
    extra_data_size: int = EXTRA_SIZE
    # Extra data past the fields qmpjobd knows, written back unchanged.
    unknown_extra: bytes = b""

    def info(self) -> dict:
        """SnapshotInfo, members in QAPI order (icount only when recorded)."""
        out = {"id": self.id_str, "name": self.name, "vm-state-size": self.vm_state_size,
               "date-sec": self.date_sec, "date-nsec": self.date_nsec,
               "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
               "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000}
        if self.icount != NO_ICOUNT:
            out["icount"] = self.icount
        return out


def _text(raw: bytes) -> str:
    # QEMU keeps the bytes as a C string: everything up to the first NUL.
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


async def read_snapshots(image: "Qcow2Image") -> tuple[list[Snapshot], int]:
    """The snapshot table the header names, with QEMU's open errors; returns the
    snapshots and the table's length in bytes."""
    header = image.header
    if not header.nb_snapshots:
        return [], 0
    start = header.snapshots_offset
    offset = start
    table_length = 0
    snapshots = []
    for index in range(header.nb_snapshots):
        table_length = -(-table_length // 8) * 8
        offset = -(-offset // 8) * 8
        fixed = await image.storage.pread(offset, _ENTRY.size)
        offset += _ENTRY.size
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock,
         vm_state_size, extra_size) = _ENTRY.unpack(fixed)
        if extra_size > MAX_EXTRA_DATA:
            raise Qcow2OpenError(f"Too much extra metadata in snapshot table entry {index}")
        known = min(EXTRA_SIZE, extra_size)
        extra = (await image.storage.pread(offset, known)) + bytes(EXTRA_SIZE - known)
        offset += known
        large, disk_size, icount = _EXTRA.unpack(extra)
        snapshot = Snapshot(l1_offset, l1_size, "", "", date_sec, date_nsec, vm_clock,
                            vm_state_size, image.size, NO_ICOUNT, extra_size)
        if extra_size >= 8:
            snapshot.vm_state_size = large
        if extra_size >= 16:
            snapshot.disk_size = disk_size
        if extra_size >= 24:
            snapshot.icount = icount
        if extra_size > EXTRA_SIZE:
            snapshot.unknown_extra = await image.storage.pread(offset, extra_size - EXTRA_SIZE)
            offset += extra_size - EXTRA_SIZE
        snapshot.id_str = _text(await image.storage.pread(offset, id_size))
        offset += id_size
        snapshot.name = _text(await image.storage.pread(offset, name_size))
        offset += name_size
        table_length += _ENTRY.size + extra_size + id_size + name_size
        if table_length > MAX_TABLE_SIZE or offset - start > 2 ** 31 - 1:
            raise Qcow2OpenError("Snapshot table is too big")
        snapshots.append(snapshot)
    return snapshots, offset - start


def table_size(snapshots: list[Snapshot]) -> int:
    size = 0
    for snapshot in snapshots:
        size = -(-size // 8) * 8
        size += _ENTRY.size + max(EXTRA_SIZE, snapshot.extra_data_size)
        size += len(snapshot.id_str.encode("utf-8", "surrogateescape"))
        size += len(snapshot.name.encode("utf-8", "surrogateescape"))
        if size > MAX_TABLE_SIZE:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    return size


def pack_table(snapshots: list[Snapshot]) -> bytes:
    out = bytearray()
    for s in snapshots:
        out += bytes(-len(out) % 8)
        ident = s.id_str.encode("utf-8", "surrogateescape")
        name = s.name.encode("utf-8", "surrogateescape")
        # A VM state too large for 32 bits reads as "disk only" to old readers.
        small_vm_state = s.vm_state_size if s.vm_state_size <= 0xFFFFFFFF else 0
        extra_size = max(EXTRA_SIZE, s.extra_data_size)
        out += _ENTRY.pack(s.l1_table_offset, s.l1_size, len(ident), len(name),
                           s.date_sec, s.date_nsec, s.vm_clock_nsec, small_vm_state,
                           extra_size)
        out += _EXTRA.pack(s.vm_state_size, s.disk_size, s.icount)
        out += s.unknown_extra[:extra_size - EXTRA_SIZE]
        out += ident + name
    return bytes(out)


def find_snapshot(snapshots: list[Snapshot], snapshot_id: str | None,
                  name: str | None) -> int:
    """QEMU's lookup: both must match when both are given; -1 when none does."""
    for index, snapshot in enumerate(snapshots):
        if snapshot_id is not None and snapshot.id_str != snapshot_id:
            continue
        if name is not None and snapshot.name != name:
            continue
        if snapshot_id is None and name is None:
            continue
        return index
    return -1


def new_snapshot_id(snapshots: list[Snapshot]) -> str:
    """One more than the largest numeric id (a non-numeric one counts as its
    leading digits, as strtoul reads it)."""
    highest = 0
    for snapshot in snapshots:
        digits = ""
        for ch in snapshot.id_str.lstrip():
            if not ch.isdigit():
                break
            digits += ch
        highest = max(highest, int(digits) if digits else 0)
    return str(highest + 1)


def wall_clock() -> tuple[int, int, int]:
    """(date_sec, date_nsec, vm_clock_nsec) as qemu-storage-daemon fills them: the
    time of day in microseconds, and (having no guest) the same for the VM clock."""
    micros = time.time_ns() // 1000
    return micros // 1_000_000, (micros % 1_000_000) * 1000, micros * 1000


# --- operations on an open image -------------------------------------------------------

async def write_snapshots(image: "Qcow2Image", snapshots: list[Snapshot]) -> None:
    """A new table for ``snapshots`` in new clusters, the header switched to it, the
    old table freed (QEMU's qcow2_write_snapshots)."""
    size = table_size(snapshots)
    offset = await image.alloc_clusters_bytes(size)
    await image.flush()
    data = pack_table(snapshots)
    if data:
        await image.checked_pwrite(offset, data, ignore=0)
    await image.flush()
    await image.storage.pwrite(60, struct.pack(">IQ", len(snapshots), offset))
    await image.storage.flush()
    old_offset, old_size = image.header.snapshots_offset, image.snapshots_size
    image.header.nb_snapshots = len(snapshots)
    image.header.snapshots_offset = offset
    image.snapshots = snapshots
    image.snapshots_size = size
    image.metadata_changed()
    await image.free_clusters(old_offset, old_size, snapshot_discard=True)
    await image.process_discards()


async def update_snapshot_refcount(image: "Qcow2Image", l1_offset: int, l1_size: int,
                                   addend: int) -> None:
    """Add ``addend`` (-1, 0 or 1) to the refcount of every cluster the L1 table at
    ``l1_offset`` reaches, and set OFLAG_COPIED exactly where a refcount is 1."""
    from qmpjobd.block.formats.qcow2.image import COMPRESSED, NORMAL, ZERO_ALLOC, eio

    active = l1_offset == image.header.l1_table_offset
    if active:
        l1 = image.l1
    else:
        raw = await image.storage.pread(l1_offset, l1_size * 8)
        l1 = list(struct.unpack(f">{l1_size}Q", raw))
    l1_modified = False
    for i in range(l1_size):
        old_l1_entry = l1[i]
        if not old_l1_entry:
            continue
        l2_offset = old_l1_entry & C.L1E_OFFSET_MASK
        if l2_offset % image.cluster_size:
            await image.signal_corruption(
                True, -1, -1, f"L2 table offset {c_hex(l2_offset)} unaligned (L1 index: {c_hex(i)})")
            raise eio()
        if not l2_offset:
            continue
        table = await image.cached_table(l2_offset)
        for j in range(image.l2_entries):
            old = image._entry(table, j)
            entry = old & ~C.OFLAG_COPIED
            kind = image.cluster_kind(entry)
            if kind == COMPRESSED:
                if addend:
                    first, length = image.compressed_range(entry)
                    await image.update_refcount(first, length, abs(addend), addend < 0,
                                                snapshot_discard=True)
                refcount = 2            # compressed clusters are never written in place
            elif kind in (NORMAL, ZERO_ALLOC):
                host = entry & C.L2E_OFFSET_MASK
                if host % image.cluster_size:
                    await image.signal_corruption(
                        True, -1, -1, f"Cluster allocation offset {c_hex(host)} unaligned "
                        f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(j)})")
                    raise eio()
                if addend:
                    await image.update_refcount(host, 1, abs(addend), addend < 0,
                                                snapshot_discard=True)
                refcount = await image.get_refcount(host >> image.cluster_bits)
            else:
                refcount = 0
            if refcount == 1:
                entry |= C.OFLAG_COPIED
            if entry != old:
                if addend > 0:
                    await image.l2_after_refcounts()
                # The table may have left the cache while refcounts were loaded.
                table = await image.cached_table(l2_offset)
                image._set_entry(table, j, entry)
                image.l2_cache.mark_dirty(l2_offset)
        if addend:
            await image.update_refcount(l2_offset, 1, abs(addend), addend < 0,
                                        snapshot_discard=True)
        new_l1_entry = l2_offset
        if await image.get_refcount(l2_offset >> image.cluster_bits) == 1:
            new_l1_entry |= C.OFLAG_COPIED
        if new_l1_entry != old_l1_entry:
            l1[i] = new_l1_entry
            l1_modified = True
    await image.flush()
    await image.process_discards()
    if addend >= 0 and l1_modified:
        await image.checked_pwrite(l1_offset, struct.pack(f">{l1_size}Q", *l1),
                                   ignore=OL_ACTIVE_L1 if active else OL_INACTIVE_L1)
        await image.storage.flush()
    if active:
        image.metadata_changed()


async def create_snapshot(image: "Qcow2Image", name: str) -> Snapshot:
    """Take snapshot ``name`` of the image's current state (QEMU's
    qcow2_snapshot_create). OSError on failure, as QEMU's errno."""
    date_sec, date_nsec, vm_clock = wall_clock()
    snapshot = Snapshot(0, image.header.l1_size, new_snapshot_id(image.snapshots), name,
                        date_sec, date_nsec, vm_clock, 0, image.size)
    if find_snapshot(image.snapshots, snapshot.id_str, None) >= 0:
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
    l1_size = image.header.l1_size
    snapshot.l1_table_offset = await image.alloc_clusters_bytes(l1_size * 8)
    if l1_size:
        await image.checked_pwrite(snapshot.l1_table_offset,
                                   struct.pack(f">{l1_size}Q", *image.l1), ignore=0)
    # Every cluster the snapshot shares counts once more, and the whole state is on
    # the disk before the table names the new L1 table (a crash before that leaks).
    await update_snapshot_refcount(image, image.header.l1_table_offset, l1_size, 1)
    await write_snapshots(image, image.snapshots + [snapshot])
    return snapshot


async def delete_snapshot(image: "Qcow2Image", snapshot_id: str | None,
                          name: str | None) -> Snapshot:
    """Delete a snapshot (QEMU's qcow2_snapshot_delete); raises SnapshotError
    with QEMU's message."""
    index = find_snapshot(image.snapshots, snapshot_id, name)
    if index < 0:
        raise SnapshotError("Can't find the snapshot")
    snapshot = image.snapshots[index]
    try:
        validate_snapshot_l1(image, snapshot)
    except Qcow2OpenError as exc:
        raise SnapshotError(exc.desc) from None
    remaining = image.snapshots[:index] + image.snapshots[index + 1:]
    try:
        await write_snapshots(image, remaining)
    except OSError as exc:
        raise SnapshotError(_with_errno("Failed to remove snapshot from snapshot list",
                                        exc)) from None
    try:
        await update_snapshot_refcount(image, snapshot.l1_table_offset, snapshot.l1_size, -1)
    except OSError as exc:
        raise SnapshotError(_with_errno("Failed to free the cluster and L1 table", exc)) from None
    await image.free_clusters(snapshot.l1_table_offset, snapshot.l1_size * 8,
                              snapshot_discard=True)
    await image.process_discards()
    image.metadata_changed()
    try:
        await update_snapshot_refcount(image, image.header.l1_table_offset,
                                       image.header.l1_size, 0)
    except OSError as exc:
        raise SnapshotError(_with_errno("Failed to update snapshot status in disk", exc)) from None
    return snapshot


def validate_snapshot_l1(image: "Qcow2Image", snapshot: Snapshot) -> None:
    """QEMU's qcow2_validate_table for a snapshot's L1 table."""
    if snapshot.l1_size > C.MAX_L1_SIZE_BYTES // 8:
        raise Qcow2OpenError("Snapshot L1 table too large")
    if ((2 ** 63 - 1) - snapshot.l1_size * 8 < snapshot.l1_table_offset
            or snapshot.l1_table_offset % image.cluster_size):
        raise Qcow2OpenError("Snapshot L1 table offset invalid")


class SnapshotError(Exception):
    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


def _with_errno(message: str, exc: OSError) -> str:
    return f"{message}: {os.strerror(exc.errno or errno.EIO)}"


def c_hex(value: int) -> str:
    """printf's %#x: 0x-prefixed, except that zero prints as a plain 0."""
    return f"{value:#x}" if value else "0"


# Overlap check bits, lowest first (QEMU's QCOW2_OL_*_BITNR order and names).
OL_MAIN_HEADER, OL_ACTIVE_L1, OL_ACTIVE_L2, OL_REFCOUNT_TABLE, OL_REFCOUNT_BLOCK, \
    OL_SNAPSHOT_TABLE, OL_INACTIVE_L1 = (1 << bit for bit in range(7))
OVERLAP_NAMES = ("qcow2_header", "active L1 table", "active L2 table", "refcount table",
                 "refcount block", "snapshot table", "inactive L1 table")
