"""Resizing a qcow2 image (``block_resize``), step for step as QEMU's qcow2_co_truncate
with preallocation off.

Growing: a new L1 table of exactly the entries the new size needs, then (when the
backing file is longer than the old size, so its data would show through) the new
area made to read as zeroes: zero flags on whole clusters, zero data in a partial
cluster at the old end; then the size field of the header.

Shrinking (QEMU allows it for block_resize; only ``qemu-img resize`` asks for
``--shrink``): the clusters past the new end are discarded for good (their L2
entries cleared, the clusters freed, and the freed data clusters discarded on the
file too, as QEMU passes a QCOW2_DISCARD_ALWAYS down: a file that takes discards
gets holes there), L1 entries past the new end cleared and their L2 tables freed
(the L1 table keeps its length, as in QEMU), refcount blocks that no longer count
anything dropped, the file cut after its last used cluster, then the size field.

``resize`` works on a :class:`Qcow2Image` through its storage; ``resize_node``
runs it for a graph node from a command, synchronously (the node is drained), with
the node's file and backing read and written directly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from typing import Any, Iterator

from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.block.formats.qcow2.image import COMPRESSED, NORMAL, ZERO_ALLOC, Qcow2Image
from qmpjobd.errors import QMPError

_U64 = struct.Struct(">Q")
# Offset of the virtual size in the header.
_SIZE_FIELD = 24


async def resize(image: Qcow2Image, size: int, *, zero_new: bool = False) -> None:
    """Make the image ``size`` bytes long; QMPError with QEMU's texts."""
    if size % 512:
        raise QMPError("The new size must be a multiple of 512")
    header = image.header
    if header.nb_snapshots and header.version < 3:
        raise QMPError("Can't resize a v2 image which has snapshots")
    old = image.size
    l1_entries = -(-size // (image.cluster_size * image.l2_entries))
    if size < old:
        await _shrink(image, size, old, l1_entries)
    else:
        await _step("Failed to grow the L1 table", image.grow_l1(l1_entries))
    if zero_new and size > old:
        await _zero_new_area(image, old, size)
    header.size = size
    await _step("Failed to update the image size",
                _write_size(image, size))


async def _step(what: str, work: Any) -> Any:
    try:
        return await work
    except OSError as exc:
        raise QMPError(f"{what}: {os.strerror(exc.errno or 5)}") from None


async def _write_size(image: Qcow2Image, size: int) -> None:
    await image.flush()
    await image.storage.pwrite(_SIZE_FIELD, _U64.pack(size))
    await image.storage.flush()


async def _zero_new_area(image: Qcow2Image, old: int, size: int) -> None:
    """Hide the backing file's data past the old end: zero flags from the first
    whole cluster on, zero data in the partial cluster the old end lies in."""
    zero_start = -(-old // image.cluster_size) * image.cluster_size
    # The checks of the write paths look at the new size already.
    image.header.size = size
    if size > zero_start:
        await _step("Failed to zero out new clusters",
                    image.write_zeroes(zero_start, size - zero_start, False))
    if zero_start > old:
        await _step("Failed to zero out the new area",
                    image.write(old, bytes(min(zero_start, size) - old)))


async def _shrink(image: Qcow2Image, size: int, old: int, l1_entries: int) -> None:
    cs = image.cluster_size
    cut = -(-size // cs) * cs
    if cut < old:
        async with image.lock:
            await _step("Failed to discard cropped clusters", _crop(image, cut, old))
    await _step("Failed to reduce the number of L2 tables", _shrink_l1(image, l1_entries))
    await _step("Failed to discard unused refblocks", _shrink_reftable(image))
    await image.flush()
    file_size = image.storage.length()
    last = await _last_used_cluster(image, file_size)
    if (last + 1) * cs < file_size:
        try:
            await image.storage.truncate((last + 1) * cs)
        except OSError:
            pass        # QEMU only warns: the image is fine with a longer file


async def _crop(image: Qcow2Image, start: int, end: int) -> None:
    """Discard [start, end) for good; the data clusters it freed are then
    discarded on the file (QEMU passes discards of this kind down always, unlike
    freed metadata)."""
    mapped = await _mapped_host_clusters(image, start, end)
    await image._discard_clusters(start, end - start, full=True)
    for host in mapped:
        if await image.get_refcount(host >> image.cluster_bits) == 0:
            image.pending_discards.append(host)
    await image.process_discards()


async def _mapped_host_clusters(image: Qcow2Image, start: int, end: int) -> list[int]:
    """The host clusters the L2 entries of [start, end) point to (a compressed
    entry's every cluster)."""
    hosts: list[int] = []
    offset = start
    while offset < end:
        chunk = image._table_chunk(offset, end - offset)
        l2 = await image._l2_for_read(offset)
        index = image._l2_index(offset)
        for i in range(image._clusters(chunk) if l2 is not None else 0):
            entry = image._entry(l2, index + i)
            kind = image.cluster_kind(entry)
            if kind in (NORMAL, ZERO_ALLOC):
                hosts.append(entry & C.L2E_OFFSET_MASK)
            elif kind == COMPRESSED:
                first, length = image.compressed_range(entry)
                hosts.extend(range(first, first + length, image.cluster_size))
        offset += chunk
    return hosts


async def _shrink_l1(image: Qcow2Image, entries: int) -> None:
    """Clear the L1 entries from ``entries`` on (on disk first), then free their
    L2 tables, last first. The table keeps its size."""
    count = len(image.l1)
    if entries >= count:
        return
    await image.storage.pwrite(image.header.l1_table_offset + entries * 8,
                               bytes((count - entries) * 8))
    await image.storage.flush()
    for index in range(count - 1, entries - 1, -1):
        l2_offset = image.l1[index] & C.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        await image.free_clusters(l2_offset, image.cluster_size)
        image.l1[index] = 0
    image.metadata_changed()


async def _shrink_reftable(image: Qcow2Image) -> None:
    """Drop the refcount blocks that count nothing but (maybe) themselves: the
    table on disk first, then each block's own reference."""
    entries_per_block = image.refcount_block_entries
    kept: list[int] = []
    for index, entry in enumerate(image.reftable):
        block_offset = entry & C.REFT_OFFSET_MASK
        if not block_offset:
            kept.append(0)
            continue
        block = await image._cache_get(image.refcount_cache, block_offset)
        cluster = block_offset >> image.cluster_bits
        counts_itself = cluster // entries_per_block == index
        unused = _counts_nothing(block, cluster % entries_per_block if counts_itself else None,
                                 image.refcount_order)
        kept.append(0 if unused else entry)
    if kept == image.reftable:
        return
    await image.flush_cache(image.refcount_cache)
    table = struct.pack(f">{len(kept)}Q", *kept)
    await image.storage.pwrite(image.header.refcount_table_offset, table)
    await image.storage.flush()
    for index, entry in enumerate(list(image.reftable)):
        if entry and not kept[index]:
            await _discard_refcount_block(image, entry & C.REFT_OFFSET_MASK)
            image.reftable[index] = 0
    image.metadata_changed()


def _counts_nothing(block: bytearray, own_index: int | None, order: int) -> bool:
    from qmpjobd.block.formats.qcow2.refcount import get_refcount, set_refcount

    if own_index is None:
        return block.count(0) == len(block)
    saved = get_refcount(block, own_index, order)
    set_refcount(block, own_index, order, 0)
    empty = block.count(0) == len(block)
    set_refcount(block, own_index, order, saved)
    return empty


async def _discard_refcount_block(image: Qcow2Image, block_offset: int) -> None:
    """Clear a dropped block's own refcount (in the block that counts it, while
    the table still names it) and forget its cached copy."""
    from qmpjobd.block.formats.qcow2.refcount import get_refcount, set_refcount

    cluster = block_offset >> image.cluster_bits
    counting = image.reftable[cluster >> image.refcount_block_bits] & C.REFT_OFFSET_MASK
    if counting:
        block = await image._cache_get(image.refcount_cache, counting)
        index = cluster & (image.refcount_block_entries - 1)
        if get_refcount(block, index, image.refcount_order) == 1:
            set_refcount(block, index, image.refcount_order, 0)
            image.refcount_cache.mark_dirty(counting)
    image.free_cluster_index = min(image.free_cluster_index, cluster)
    image.refcount_cache.discard(block_offset)


async def _last_used_cluster(image: Qcow2Image, file_size: int) -> int:
    for index in range(-(-file_size // image.cluster_size) - 1, -1, -1):
        if await image.get_refcount(index) > 0:
            return index
    return -1


# --- the graph node's side -----------------------------------------------------------------


def resize_node(node: Any, size: int, zero_new: bool) -> None:
    """Resize a drained qcow2 node from a command: its image does its I/O on the
    file directly, without waiting, for the time of the resize."""
    from qmpjobd.block.drivers.qcow2 import run_now

    image = node.image
    if image is None:
        raise QMPError("Image format driver does not support resize")
    with _direct_io(node):
        run_now(resize(image, size, zero_new=zero_new))
    node.size = image.size


@contextlib.contextmanager
def _direct_io(node: Any) -> Iterator[None]:
    image = node.image
    saved = image.storage, image.backing
    image.storage = _resize_storage_class()(node.children["file"])
    if image.backing is not None:
        image.backing = _direct_backing_reader(node)
    try:
        yield
    finally:
        image.storage, image.backing = saved


def _direct_backing_reader(node: Any) -> Any:
    async def read(offset: int, length: int) -> bytes:
        backing = node.backing_node()
        if backing is None or offset >= backing.size:
            return bytes(length)
        inside = min(length, backing.size - offset)
        data = read_now(backing, offset, inside)
        return data + bytes(length - len(data))
    return read


def read_now(node: Any, offset: int, length: int) -> bytes:
    """Read a node's guest bytes without waiting (host files read directly)."""
    from qmpjobd.block.drivers.qcow2 import run_now

    image = getattr(node, "image", None)
    if image is not None:
        with _direct_io(node):
            return run_now(image.read(offset, length))
    host = node.host_file()
    if host is not None:
        fd, base = host
        data = os.pread(fd, length, base + offset)
        return data + bytes(length - len(data))
    child = node.file_child
    if child is not None:
        return read_now(child, offset + node.child_offset(), length)
    return bytes(length)


@functools.cache
def _resize_storage_class() -> type:
    """SyncStorage (the driver's direct host-file storage) that also truncates its
    host file directly; made on first use, the driver module imports this one."""
    from qmpjobd.block.drivers.qcow2 import SyncStorage

    class ResizeStorage(SyncStorage):
        async def truncate(self, length: int, preallocation: str = "off") -> None:
            if self.host is None or self.node.file_child is not None:
                await super().truncate(length, preallocation)
                return
            os.ftruncate(self.host[0], length)
            self.node.size = -(-length // 512) * 512

    return ResizeStorage
