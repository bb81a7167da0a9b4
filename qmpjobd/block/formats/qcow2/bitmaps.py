"""Persistent dirty bitmaps in qcow2: the bitmaps header extension (0x23852875), the
bitmap directory, bitmap tables and data clusters (docs/interop/qcow2.txt).

When things happen is QEMU's (block/qcow2-bitmap.c):

* **open** -- every stored bitmap becomes a persistent in-memory bitmap; one whose
  ``in_use`` flag is already set (the last writer did not close the image) comes
  back *inconsistent*: empty and refused by everything but remove. On a writable
  image the others get ``in_use`` written at once (directory rewritten in place,
  with the autoclear bit dropped around the rewrite); on a read-only image they are
  loaded read-only.
* **running** -- nothing is written for bitmap changes, a flush stores nothing;
  ``block-dirty-bitmap-remove`` of a persistent bitmap deletes it from the file at
  once.
* **close** -- every persistent, consistent, writable bitmap is stored: data
  clusters for the parts with bits set, a new table, a new directory (``auto`` for a
  recording bitmap, ``in_use`` clear), refcounts flushed before the header points at
  them, then the old tables and directory are freed. Inconsistent bitmaps keep their
  stored entry (and its ``in_use``) until someone removes them.

The functions take the Qcow2Node (for its image, file child and bitmaps) and run
their I/O on storage that answers at once (the driver's SyncStorage), so they can
run inside a synchronous open, close or command, as in QEMU where these steps run
under the monitor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Coroutine

from qmpjobd.block.dirty_bitmap import DirtyBitmap
from qmpjobd.block.formats.qcow2 import constants as C

EXT_BITMAPS = 0x23852875
_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")

MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1 << 0
TYPE_DIRTY_TRACKING = 1


class BitmapFormatError(Exception):
    """The stored bitmaps are not usable; the text is QEMU's."""


@dataclass
class StoredBitmap:
    """One bitmap directory entry."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def pack(self) -> bytes:
        raw = self.name.encode()
        entry = _ENTRY.pack(self.table_offset, self.table_size, self.flags,
                            TYPE_DIRTY_TRACKING, self.granularity_bits, len(raw), 0) + raw
        return entry + bytes(-len(entry) % 8)


def entry_size(name: str) -> int:
    return -(-(_ENTRY.size + len(name.encode())) // 8) * 8


# --- running the format's coroutines synchronously ----------------------------------------


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    from qmpjobd.block.drivers.qcow2 import run_now
    return run_now(coro)


class _SyncImage:
    """The node's image with its storage swapped for one that answers at once."""

    def __init__(self, node: Any) -> None:
        from qmpjobd.block.drivers.qcow2 import SyncStorage
        self.image = node.image
        self._storage = SyncStorage(node.children["file"])

    def __enter__(self) -> Any:
        self._saved = self.image.storage
        self.image.storage = self._storage
        return self.image

    def __exit__(self, *exc: object) -> None:
        self.image.storage = self._saved


# --- reading -----------------------------------------------------------------------------


def extension_fields(header: Any) -> tuple[int, int, int] | None:
    """(nb_bitmaps, directory size, directory offset), or None without bitmaps.
    Without the autoclear bit the extension is stale (a program that does not
    know bitmaps wrote the image) and QEMU ignores it."""
    data = header.bitmaps
    if data is None or len(data) < _EXT.size:
        return None
    if not header.autoclear_features & C.AUTOCLEAR_BITMAPS:
        return None
    nb, _reserved, size, offset = _EXT.unpack_from(data, 0)
    return nb, size, offset


def _check_entry(entry: StoredBitmap, cluster_size: int, node_size: int) -> bool:
    if (entry.table_size == 0 or entry.table_offset == 0
            or entry.table_offset % cluster_size or entry.table_size > MAX_TABLE_SIZE
            or not MIN_GRANULARITY_BITS <= entry.granularity_bits <= MAX_GRANULARITY_BITS
            or entry.flags & RESERVED_FLAGS or len(entry.name.encode()) > MAX_NAME_SIZE):
        return False
    phys = entry.table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    return bool(entry.flags & FLAG_IN_USE) or node_size <= (phys * 8) << entry.granularity_bits


async def read_directory(image: Any) -> list[StoredBitmap]:
    """bitmap_list_load: the directory entries in their stored order."""
    fields = extension_fields(image.header)
    if fields is None or fields[0] == 0:
        return []
    nb, size, offset = fields
    if size == 0:
        raise BitmapFormatError("Requested bitmap directory size is zero")
    if size > MAX_DIRECTORY_SIZE:
        raise BitmapFormatError("Requested bitmap directory size is too big")
    raw = await image.storage.pread(offset, size)
    entries: list[StoredBitmap] = []
    pos = 0
    while pos < size:
        if pos + _ENTRY.size > size:
            raise BitmapFormatError("Broken bitmap directory")
        if len(entries) + 1 > nb:
            raise BitmapFormatError("More bitmaps found than specified in header extension")
        (table_offset, table_size, flags, kind, gbits, name_size,
         extra) = _ENTRY.unpack_from(raw, pos)
        end = pos + -(-(_ENTRY.size + name_size + extra) // 8) * 8
        if end > size:
            raise BitmapFormatError("Broken bitmap directory")
        if extra:
            raise BitmapFormatError("Bitmap extra data is not supported")
        name = raw[pos + _ENTRY.size:pos + _ENTRY.size + name_size].decode("utf-8", "replace")
        entry = StoredBitmap(name, table_offset, table_size, flags, gbits)
        if kind != TYPE_DIRTY_TRACKING or not _check_entry(entry, image.cluster_size,
                                                           image.size):
            raise BitmapFormatError(f"Bitmap '{name}' doesn't satisfy the constraints")
        entries.append(entry)
        pos = end
    if len(entries) != nb:
        raise BitmapFormatError("Less bitmaps found than specified in header extension")
    return entries


async def _read_table(image: Any, entry: StoredBitmap) -> list[int]:
    raw = await image.storage.pread(entry.table_offset, entry.table_size * 8)
    table = list(struct.unpack(f">{entry.table_size}Q", raw))
    for value in table:
        offset = value & TABLE_OFFSET_MASK
        if value & TABLE_RESERVED_MASK or (offset and (value & TABLE_ALL_ONES
                                                       or offset % image.cluster_size)):
            raise BitmapFormatError(f"Could not read bitmap_table table from image for "
                                    f"bitmap '{entry.name}': Invalid argument")
    return table


async def _load_data(image: Any, entry: StoredBitmap, bitmap: DirtyBitmap) -> None:
    table = await _read_table(image, entry)
    bits = bitmap.bits
    nbytes = len(bits.bits)
    cs = image.cluster_size
    if -(-nbytes // cs) != len(table):
        raise BitmapFormatError(f"Could not read bitmap '{entry.name}' from image: "
                                f"Invalid argument")
    for index, value in enumerate(table):
        start = index * cs
        length = min(cs, nbytes - start)
        offset = value & TABLE_OFFSET_MASK
        if offset:
            data = await image.storage.pread(offset, cs)
            bits.bits[start:start + length] = data[:length]
        elif value & TABLE_ALL_ONES:
            bits.bits[start:start + length] = b"\xff" * length
    # Bits past the end must be zero; keep them so whatever the file says.
    tail = bits.size % 8
    if tail and nbytes:
        bits.bits[-1] &= (1 << tail) - 1
    bits.count = int.from_bytes(bits.bits, "little").bit_count()


def load_persistent_bitmaps(node: Any) -> None:
    """qcow2_load_dirty_bitmaps, at open: attach the stored bitmaps to ``node``."""
    image = node.image
    if image is None or extension_fields(image.header) is None:
        return
    writable = not node.read_only and getattr(node, "active", True)
    with _SyncImage(node) as sync_image:
        entries = _run(read_directory(sync_image))
        loaded: list[DirtyBitmap] = []
        needs_update = False
        for entry in entries:
            if entry.flags & FLAG_IN_USE and node.find_dirty_bitmap(entry.name) is not None:
                continue
            bitmap = DirtyBitmap(node.size, entry.granularity, entry.name)
            if entry.flags & FLAG_IN_USE:
                bitmap.mark_inconsistent()
            else:
                _run(_load_data(sync_image, entry, bitmap))
                entry.flags |= FLAG_IN_USE
                needs_update = True
            bitmap.persistent = True
            if not entry.flags & FLAG_AUTO:
                bitmap.recording = False
            loaded.append(bitmap)
        if needs_update and writable:
            _run(_rewrite_directory_in_place(sync_image, entries))
    for bitmap in loaded:
        bitmap.readonly = not writable
        node.add_dirty_bitmap(bitmap)


# --- writing -----------------------------------------------------------------------------


def _extension(nb: int, size: int, offset: int) -> bytes:
    return _EXT.pack(nb, 0, size, offset)


def _directory_bytes(entries: list[StoredBitmap]) -> bytes:
    return b"".join(entry.pack() for entry in entries)


async def _rewrite_directory_in_place(image: Any, entries: list[StoredBitmap]) -> None:
    """update_ext_header_and_dir_in_place: the directory has the same size, so it is
    rewritten where it is, with the autoclear bit off while it changes."""
    nb, size, offset = extension_fields(image.header) or (0, 0, 0)
    data = _directory_bytes(entries)
    if len(entries) != nb or len(data) != size or not offset:
        raise BitmapFormatError("Can't update bitmap directory: Invalid argument")
    header = image.header
    header.autoclear_features &= ~C.AUTOCLEAR_BITMAPS
    await image.write_header()
    await image.storage.pwrite(offset, data)
    await image.storage.flush()
    await image.write_header()
    header.autoclear_features |= C.AUTOCLEAR_BITMAPS
    await image.write_header()


async def _write_directory(image: Any, entries: list[StoredBitmap]) -> None:
    """update_ext_header_and_dir: a new directory (or none), the header pointing at
    it, then the old directory freed."""
    header = image.header
    old = extension_fields(header)
    if entries:
        if len(entries) > MAX_BITMAPS:
            raise BitmapFormatError("Failed to update bitmap extension: Invalid argument")
        data = _directory_bytes(entries)
        offset = await image.alloc_clusters(len(data))
        await image.storage.pwrite(offset, data)
        # The refcounts of everything just allocated reach the file before the
        # header points at it.
        await image.flush()
        header.bitmaps = _extension(len(entries), len(data), offset)
        header.autoclear_features |= C.AUTOCLEAR_BITMAPS
    else:
        header.bitmaps = None
        header.autoclear_features &= ~C.AUTOCLEAR_BITMAPS
    await image.write_header()
    if old is not None and old[1] > 0:
        await image.free_clusters(old[2], old[1])


async def _free_bitmap_clusters(image: Any, entry: StoredBitmap) -> None:
    try:
        table = await _read_table(image, entry)
    except BitmapFormatError:
        return
    for value in table:
        offset = value & TABLE_OFFSET_MASK
        if offset:
            await image.free_clusters(offset, image.cluster_size)
    await image.free_clusters(entry.table_offset, entry.table_size * 8)


async def _store_bitmap(image: Any, bitmap: DirtyBitmap) -> tuple[int, int]:
    """store_bitmap: data clusters for the parts that have bits set, then the
    table; returns (table offset, table size)."""
    cs = image.cluster_size
    data = bytes(bitmap.bits.bits)
    size = max(1, -(-len(data) // cs))
    if size > MAX_TABLE_SIZE or size * cs > MAX_PHYS_SIZE:
        raise BitmapFormatError(f"Bitmap '{bitmap.name}' is too big")
    table = [0] * size
    for index in range(size):
        chunk = data[index * cs:(index + 1) * cs]
        if not chunk.strip(b"\0"):
            continue
        offset = await image.alloc_clusters(cs)
        await image.storage.pwrite(offset, chunk + bytes(cs - len(chunk)))
        table[index] = offset
    table_offset = await image.alloc_clusters(size * 8)
    await image.storage.pwrite(table_offset, struct.pack(f">{size}Q", *table))
    return table_offset, size


def _storable(bitmap: Any) -> bool:
    return (isinstance(bitmap, DirtyBitmap) and bitmap.persistent and not bitmap.skip_store
            and not bitmap.inconsistent and bitmap.name is not None)


async def _store_all(image: Any, bitmaps: list[DirtyBitmap]) -> None:
    """qcow2_store_persistent_dirty_bitmaps."""
    entries = await read_directory(image)
    by_name = {entry.name: entry for entry in entries}
    work: list[tuple[StoredBitmap, DirtyBitmap]] = []
    dropped: list[StoredBitmap] = []
    # QEMU walks the node's list (newest first): new entries are appended in
    # that order.
    for bitmap in bitmaps:
        if bitmap.readonly:
            continue
        entry = by_name.get(bitmap.name)
        if entry is None:
            entry = StoredBitmap(bitmap.name, 0, 0, 0, 0)
            entries.append(entry)
            by_name[bitmap.name] = entry
        elif not entry.flags & FLAG_IN_USE:
            raise BitmapFormatError(f"Bitmap '{bitmap.name}' already exists in the image")
        else:
            dropped.append(StoredBitmap(entry.name, entry.table_offset, entry.table_size,
                                        entry.flags, entry.granularity_bits))
        entry.flags = FLAG_AUTO if bitmap.recording else 0
        entry.granularity_bits = bitmap.granularity.bit_length() - 1
        work.append((entry, bitmap))
    if not work:
        return
    # Stored in directory order (the entries already in the file first).
    chosen = {id(entry): bitmap for entry, bitmap in work}
    for entry in entries:
        bitmap = chosen.get(id(entry))
        if bitmap is not None:
            entry.table_offset, entry.table_size = await _store_bitmap(image, bitmap)
    await _write_directory(image, entries)
    for entry in dropped:
        await _free_bitmap_clusters(image, entry)


def store_persistent_bitmaps(node: Any) -> str | None:
    """At close of a writable image: store the node's persistent bitmaps. Returns
    QEMU's reason text on failure (the caller reports it), else None."""
    image = node.image
    if image is None:
        return None
    bitmaps = [b for b in node.dirty_bitmaps if _storable(b)]
    if image.read_only:
        # A bitmap added to a read-only node cannot be stored (loaded ones are
        # read-only themselves and need no store).
        return "No write access" if any(not b.readonly for b in bitmaps) else None
    if not bitmaps and extension_fields(image.header) is None:
        return None
    try:
        with _SyncImage(node) as sync_image:
            _run(_store_all(sync_image, bitmaps))
    except (BitmapFormatError, OSError) as exc:
        return str(exc)
    return None


def remove_stored_bitmap(node: Any, name: str) -> None:
    """qcow2_co_remove_persistent_dirty_bitmap: drop ``name`` from the file now (a
    bitmap that was never stored is not an error)."""
    image = node.image
    if image is None or image.read_only or extension_fields(image.header) is None:
        return
    with _SyncImage(node) as sync_image:
        _run(_remove(sync_image, name))


async def _remove(image: Any, name: str) -> None:
    entries = await read_directory(image)
    found = next((entry for entry in entries if entry.name == name), None)
    if found is None:
        return
    entries.remove(found)
    await _write_directory(image, entries)
    await _free_bitmap_clusters(image, found)
    await image.flush()


# --- what QMP and qemu-img see -----------------------------------------------------------


def can_store_new_bitmap(node: Any, name: str, granularity: int) -> str | None:
    """qcow2_co_can_store_new_dirty_bitmap: None, or the reason it cannot."""
    image = node.image
    if image is None:
        return "Operation not supported"
    if image.header.version < 3:
        return "Cannot store dirty bitmaps in qcow2 v2 files"
    bits = granularity.bit_length() - 1
    if bits > MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    if bits < MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
    needed = -(-(-(-node.size // granularity)) // 8)
    if needed > MAX_PHYS_SIZE or needed > MAX_TABLE_SIZE * image.cluster_size:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name.encode()) > MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
    fields = extension_fields(image.header)
    if fields is None or fields[0] == 0:
        return None
    nb, size, _offset = fields
    if nb >= MAX_BITMAPS:
        return "Maximum number of persistent bitmaps is already reached"
    if size + entry_size(name) > MAX_DIRECTORY_SIZE:
        return "Not enough space in the bitmap directory"
    return None


def stored_bitmap_infos(node: Any) -> list[dict] | None:
    """Qcow2BitmapInfo of the bitmaps in the file (ImageInfoSpecificQCow2.bitmaps),
    or None when there are none or the directory cannot be read."""
    image = node.image
    if image is None or extension_fields(image.header) is None:
        return None
    try:
        with _SyncImage(node) as sync_image:
            entries = _run(read_directory(sync_image))
    except (BitmapFormatError, OSError):
        return None
    infos = []
    for entry in entries:
        flags = []
        if entry.flags & FLAG_IN_USE:
            flags.append("in-use")
        if entry.flags & FLAG_AUTO:
            flags.append("auto")
        infos.append({"name": entry.name, "granularity": entry.granularity, "flags": flags})
    return infos or None




# --- the driver's hooks ------------------------------------------------------------------


def report_lost(node: Any, reason: str) -> None:
    """QEMU's stderr line for persistent bitmaps that could not be stored."""
    from qmpjobd.block.stderr import report
    report(node.graph.personality,
           f"Lost persistent bitmaps during inactivation of node "
           f"'{node.node_name}': {reason}")


def before_read_only(node: Any) -> None:
    """qcow2_reopen_prepare going read-only: the persistent bitmaps are stored
    (in-use cleared) and stay loaded, read-only, as QEMU keeps them."""
    reason = store_persistent_bitmaps(node)
    if reason is not None:
        report_lost(node, reason)
        return
    for bitmap in node.dirty_bitmaps:
        if _storable(bitmap):
            bitmap.readonly = True


def after_read_write(node: Any) -> None:
    """qcow2_reopen_bitmaps_rw: the loaded bitmaps become writable again and are
    marked in-use in the file while the node may write."""
    image = node.image
    if image is None or image.read_only or extension_fields(image.header) is None:
        return
    loaded = {b.name: b for b in node.dirty_bitmaps if b.persistent and b.readonly}
    if not loaded:
        return
    with _SyncImage(node) as sync_image:
        entries = _run(read_directory(sync_image))
        for entry in entries:
            if entry.name in loaded:
                entry.flags |= FLAG_IN_USE
        _run(_rewrite_directory_in_place(sync_image, entries))
    for bitmap in loaded.values():
        bitmap.readonly = False


def on_open(node: Any) -> None:
    """Load the stored bitmaps while the node opens; a broken directory fails the
    open with QEMU's text."""
    from qmpjobd.errors import QMPError
    if not getattr(node, "active", True):
        # An image opened inactive is someone else's: QEMU loads its bitmaps
        # only when the node is activated (formats/qcow2/activation.py).
        return
    try:
        load_persistent_bitmaps(node)
    except BitmapFormatError as exc:
        raise QMPError(str(exc)) from None


def on_close(node: Any) -> None:
    """Store the persistent bitmaps as the node closes; a failure is reported on
    stderr as QEMU does, and the close goes on."""
    reason = store_persistent_bitmaps(node)
    if reason is not None:
        report_lost(node, reason)
