"""Block status over a node and its backing chain, as QEMU's NBD server and its
jobs (bdrv_is_allocated) see it.

Two questions are answered here, each as ``(value, bytes)`` for the run that
starts at an offset:

* ``allocation``: the ``base:allocation`` flags (HOLE, ZERO) of QEMU's
  bdrv_block_status_above over the whole chain. A qcow2 data cluster whose
  host range is a hole of the image file reads as zeroes: QEMU asks the file
  and adds ZERO without HOLE (a ``preallocation=metadata`` image maps as
  ``zero``, not ``data``). The same answer decides holes in a structured READ.
* ``depth``: ``qemu:allocation-depth`` (bdrv_is_allocated_above): 1 where the
  exported node itself allocates the range, 2 for its backing, and so on, 0
  where no layer does. A qcow2 zero cluster counts as allocated in its layer.

A qcow2 node is asked cluster by cluster through its image's L2 entries;
every other node through ``BlockNode.block_status`` (filters and raw pass it
to their child, the file driver asks SEEK_DATA/SEEK_HOLE). No I/O beyond the
small L2 table reads the qcow2 driver's own block status makes.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Any

from qmpjobd.block.drivers.qcow2 import SyncStorage, run_now
from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.block.formats.qcow2.image import CorruptionError, eio

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.node import BlockNode

# The base:allocation bits (the NBD protocol's NBD_STATE_HOLE and NBD_STATE_ZERO,
# which are also QEMU's own meaning of "hole" and "reads as zeroes"); the block layer
# names them here so that it need not import the NBD package.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# base:allocation flags of the generic node.block_status() kinds.
_GENERIC_FLAGS = {"data": 0, "zero": STATE_HOLE | STATE_ZERO, "unknown": STATE_HOLE}
ZEROED = STATE_HOLE | STATE_ZERO


def _qcow2_layer(node: "BlockNode") -> Any:
    """The qcow2 image of a node that has one (the qcow2 driver), else None."""
    image = getattr(node, "image", None)
    if image is None or not hasattr(image, "l2_cache") or not hasattr(node, "backing_node"):
        return None
    return image


def _table_entries(node: "BlockNode", image: Any, offset: int, clusters: int) -> tuple[int, ...]:
    """The L2 entries of up to ``clusters`` clusters from the one at ``offset``, as
    far as its L2 table goes; an uncached table is read (and kept if there is
    room), as the qcow2 driver's own block status does."""
    index = (offset >> image.cluster_bits) & (image.l2_entries - 1)
    count = max(1, min(clusters, image.l2_entries - index))
    l2_offset = image.l2_table_offset(offset)
    if not l2_offset:
        return (0,) * count
    table = image.l2_cache.lookup(l2_offset)
    if table is None:
        file = node.children["file"]
        file.debug_event("l2_load")
        table = run_now(SyncStorage(file).pread(l2_offset, image.cluster_size))
        image.remember_l2(l2_offset, table)
    return struct.unpack_from(f">{count}Q", table, index * 8)


def _cluster_class(entry: int) -> str:
    """"normal", "compressed", "zero" or "unallocated" for an L2 entry."""
    if entry & C.OFLAG_COMPRESSED:
        return "compressed"
    if entry & C.OFLAG_ZERO:
        return "zero"
    return "normal" if entry & C.L2E_OFFSET_MASK else "unallocated"


def _qcow2_run(node: "BlockNode", image: Any, offset: int, length: int) -> tuple[str, int, int]:
    """(class, bytes, host offset of ``offset`` or -1) for the clusters like the one
    at ``offset``; a run of normal clusters also stays contiguous in the file.

    Damaged metadata (an unaligned L2 table or cluster offset) is met as QEMU's
    block status meets it: the image is marked corrupt and the caller gets EIO;
    once it is, ENOMEDIUM."""
    try:
        return _unchecked_run(node, image, offset, length)
    except CorruptionError as exc:
        node.run_metadata_operation(
            lambda img, e=exc: img.signal_corruption(e.fatal, e.corrupt_offset,
                                                     e.corrupt_size, e.message))
        raise eio() from None


def _unchecked_run(node: "BlockNode", image: Any, offset: int,
                   length: int) -> tuple[str, int, int]:
    cs = image.cluster_size
    end = min(offset + length, image.size)
    cluster_start = offset - offset % cs
    clusters = max(1, -(-(end - cluster_start) // cs))
    entries = _table_entries(node, image, cluster_start, clusters)
    first = entries[0]
    # The run's first entry: every later one of a normal run lies at an aligned
    # distance from it, so one check covers the host range the run hands out.
    image.check_entry(first, cluster_start)
    kind = _cluster_class(first)
    first_host = first & C.L2E_OFFSET_MASK
    pos = cluster_start
    while True:
        for entry in entries:
            if _cluster_class(entry) != kind or (
                    kind == "normal" and entry & C.L2E_OFFSET_MASK != first_host + pos - cluster_start):
                return kind, max(1, min(pos, end) - offset), _host(kind, first_host, offset, cluster_start)
            pos += cs
        if pos >= end:
            break
        entries = _table_entries(node, image, pos, -(-(end - pos) // cs))
    return kind, max(1, min(pos, end) - offset), _host(kind, first_host, offset, cluster_start)


def _host(kind: str, first_host: int, offset: int, cluster_start: int) -> int:
    return first_host + offset - cluster_start if kind == "normal" else -1


def allocation(node: "BlockNode", offset: int, length: int) -> tuple[int, int]:
    """base:allocation flags and run length at ``offset`` (length > 0)."""
    image = _qcow2_layer(node)
    if image is None:
        kind, count = node.block_status(offset, length)
        return _GENERIC_FLAGS[kind], max(1, min(count, length))
    kind, count, host = _qcow2_run(node, image, offset, length)
    if kind == "normal":
        file = node.children.get("file")
        if file is None:
            return 0, count
        file_kind, file_count = file.block_status(host, count)
        flags = STATE_ZERO if file_kind == "zero" else 0
        return flags, max(1, min(count, file_count))
    if kind == "compressed":
        return 0, count
    if kind == "zero":
        return ZEROED, count
    backing = node.backing_node()
    if backing is None or offset >= backing.size:
        return ZEROED, count
    return allocation(backing, offset, min(count, backing.size - offset))


def depth(node: "BlockNode", offset: int, length: int, level: int = 1) -> tuple[int, int]:
    """qemu:allocation-depth and run length at ``offset`` (length > 0)."""
    image = _qcow2_layer(node)
    if image is None:
        kind, count = node.block_status(offset, length)
        return (0 if kind == "unknown" else level), max(1, min(count, length))
    kind, count, _ = _qcow2_run(node, image, offset, length)
    if kind != "unallocated":
        return level, count
    backing = node.backing_node()
    if backing is None or offset >= backing.size:
        return 0, count
    return depth(backing, offset, min(count, backing.size - offset), level + 1)


# --- where the bytes of a read lie ------------------------------------------------------

# A piece of a read: ("file", fd, host offset, bytes) to send from a host file as it
# is, or ("zero", 0, 0, bytes) for zeroes.
Piece = tuple[str, int, int, int]


def file_pieces(node: "BlockNode", offset: int, length: int) -> list[Piece] | None:
    """The host file ranges (and zero runs) a read of ``node`` consists of, or None
    when some of it must go through the node's read path (a driver that transforms
    data or injects errors, a compressed cluster, a file shorter than the range).

    Only plain files qualify: a file node, raw on one (with its offset), and the
    normal clusters of a qcow2 image on one, down its backing chain.
    """
    pieces: list[Piece] = []
    try:
        found = _collect(node, offset, length, pieces)
    except OSError:
        # Damaged or unusable metadata: the node's read path meets it and
        # answers as QEMU does (and no host range is trusted).
        return None
    return pieces if found else None


def _collect(node: "BlockNode", offset: int, length: int, pieces: list[Piece]) -> bool:
    host = node.host_file()
    if host is not None:
        fd, base = host
        try:
            file_size = os.fstat(fd).st_size
        except OSError:
            return False
        inside = max(0, min(length, file_size - base - offset))
        if inside:
            pieces.append(("file", fd, base + offset, inside))
        if inside < length:
            pieces.append(("zero", 0, 0, length - inside))
        return True
    image = _qcow2_layer(node)
    if image is None or node.in_flight:
        # (A qcow2 request in flight may be changing the mapping under us.)
        return False
    end = offset + length
    while offset < end:
        if offset >= image.size:
            pieces.append(("zero", 0, 0, end - offset))
            return True
        kind, count, host_offset = _unchecked_run(node, image, offset, end - offset)
        count = min(count, end - offset)
        if kind == "compressed":
            return False
        if kind == "normal":
            file = node.children.get("file")
            if file is None or not _collect(file, host_offset, count, pieces):
                return False
        elif kind == "zero":
            pieces.append(("zero", 0, 0, count))
        else:
            backing = node.backing_node()
            inside = 0 if backing is None else max(0, min(count, backing.size - offset))
            if inside and not _collect(backing, offset, inside, pieces):
                return False
            if inside < count:
                pieces.append(("zero", 0, 0, count - inside))
        offset += count
    return True
