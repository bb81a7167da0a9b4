"""Creating a qcow2 image the way QEMU's ``blockdev-create`` does, step for step.

The steps (and so the bytes) are QEMU's: a bare header with an empty refcount
table and block, the image opened and its first three clusters allocated through
the normal allocator, the header rewritten in full, the image grown to its size
(a new L1 table; with ``metadata`` preallocation L2 tables and data clusters, with
``falloc``/``full`` a new refcount area first), and the backing file recorded.
Because the allocator follows QEMU's, every layout matches, including refcount
block and table growth for small clusters.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.block.formats.qcow2.header import Header
from qmpjobd.block.formats.qcow2.image import Qcow2Image
from qmpjobd.block.formats.qcow2.storage import Storage
from qmpjobd.errors import QMPError

_LEVEL = "compatibility level 1.1 and above (use version=v3 or greater)"


@dataclass
class CreateOptions:
    size: int
    version: int = 3
    cluster_size: int = C.DEFAULT_CLUSTER_SIZE
    preallocation: str = "off"
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    backing_file: str | None = None
    backing_fmt: str | None = None
    extended_l2: bool = False
    compression_type: str = "zlib"
    data_file: bool = False
    data_file_raw: bool = False
    encrypt: bool = False

    @classmethod
    def from_qapi(cls, options: dict) -> "CreateOptions":
        """From BlockdevCreateOptionsQcow2 members (already schema-checked)."""
        return cls(
            size=options["size"],
            version=2 if options.get("version") == "v2" else 3,
            cluster_size=options.get("cluster-size", C.DEFAULT_CLUSTER_SIZE),
            preallocation=options.get("preallocation", "off"),
            lazy_refcounts=options.get("lazy-refcounts", False),
            refcount_bits=options.get("refcount-bits", 16),
            backing_file=options.get("backing-file"),
            backing_fmt=options.get("backing-fmt"),
            extended_l2=options.get("extended-l2", False),
            compression_type=options.get("compression-type", "zlib"),
            data_file="data-file" in options,
            data_file_raw=options.get("data-file-raw", False),
            encrypt="encrypt" in options,
        )


def validate(opts: CreateOptions) -> None:
    """QEMU's option checks, in its order, with its messages."""
    if opts.size % 512:
        raise QMPError("Image size must be a multiple of 512 bytes")
    if opts.extended_l2 and opts.version < 3:
        raise QMPError(f"Extended L2 entries are only supported with {_LEVEL}")
    cs = opts.cluster_size
    if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
        raise QMPError("Cluster size must be a power of two between 512 and 2048k")
    if opts.extended_l2 and cs < 16384:
        raise QMPError("Extended L2 entries are only supported with cluster sizes "
                       "of at least 16384 bytes")
    if opts.backing_file is not None and opts.preallocation != "off" \
            and not opts.extended_l2:
        raise QMPError("Backing file and preallocation can only be used at the same "
                       "time if extended_l2 is on")
    if opts.backing_fmt is not None and opts.backing_file is None:
        raise QMPError("Backing format cannot be used without backing file")
    if opts.version < 3 and opts.lazy_refcounts:
        raise QMPError(f"Lazy refcounts only supported with {_LEVEL}")
    bits = opts.refcount_bits
    # QEMU tests the int64 as unsigned: INT64_MIN counts as a power of two and
    # passes (the image it writes then fails to open).
    unsigned = bits % 2 ** 64
    if bits > 64 or not unsigned or unsigned & (unsigned - 1):
        raise QMPError("Refcount width must be a power of two and may not exceed 64 bits")
    if opts.version < 3 and bits != 16:
        raise QMPError("Different refcount widths than 16 bits require compatibility "
                       "level 1.1 or above (use version=v3 or greater)")
    if opts.data_file_raw and not opts.data_file:
        raise QMPError("data-file-raw requires data-file")
    if opts.data_file_raw and opts.backing_file is not None:
        raise QMPError("Backing file and data-file-raw cannot be used at the same time")
    if opts.data_file and opts.version < 3:
        raise QMPError(f"External data files are only supported with {_LEVEL}")
    if opts.compression_type != "zlib" and opts.version < 3:
        raise QMPError(f"Non-zlib compression type is only supported with {_LEVEL}")


def refuse_unimplemented(opts: CreateOptions) -> None:
    """What QEMU can create and qmpjobd cannot (checked after QEMU's own checks)."""
    for wanted, what in ((opts.data_file, "external data files"),
                         (opts.extended_l2, "extended L2 entries"),
                         (opts.compression_type != "zlib", "zstd compression"),
                         (opts.encrypt, "encryption")):
        if wanted:
            raise QMPError(f"Creating qcow2 images with {what} is not supported by qmpjobd")


def refcount_order(bits: int) -> int:
    """QEMU's ctz32 of the width: its log2, and 32 for INT64_MIN (no low bit set)."""
    low = bits & 0xFFFFFFFF
    return (low & -low).bit_length() - 1 if low else 32


async def create_image(storage: Storage, opts: CreateOptions) -> None:
    """Write a new empty image; options must have passed ``validate``."""
    cs = opts.cluster_size
    cluster_bits = cs.bit_length() - 1
    order = refcount_order(opts.refcount_bits)
    bare = Header(version=opts.version, cluster_bits=cluster_bits,
                  refcount_table_offset=cs, refcount_table_clusters=1,
                  refcount_order=order,
                  compatible_features=C.COMPAT_LAZY_REFCOUNTS if opts.lazy_refcounts else 0)
    # Only the fixed fields: the full rewrite below adds the extensions.
    first = bare.pack_fixed()
    await storage.pwrite(0, first + bytes(cs - len(first)))
    await storage.pwrite(cs, struct.pack(">Q", 2 * cs) + bytes(2 * cs - 8))
    image = await Qcow2Image.open(storage, read_only=False)
    try:
        await _fill_in(image, opts)
    except BaseException:
        # QEMU closes the half-made image, which writes its caches back: the file
        # stays a consistent (empty) qcow2 image.
        try:
            await image.flush()
        except OSError:
            pass
        raise


async def _fill_in(image: Qcow2Image, opts: CreateOptions) -> None:
    """The allocations, the size and the backing name of a new image."""
    cs = opts.cluster_size
    offset = await image.alloc_clusters(3 * cs)
    if offset != 0:
        raise QMPError("Could not allocate clusters for qcow2 header and refcount table")
    await image.write_header()
    await _resize_new(image, opts.size, opts.preallocation)
    if opts.backing_file is not None:
        image.header.backing_file = opts.backing_file
        image.header.backing_format = opts.backing_fmt
        try:
            await image.write_header()
        except QMPError:
            raise QMPError(f"Could not assign backing file '{opts.backing_file}' with "
                           f"format '{opts.backing_fmt}': No space left on device") from None
    await image.flush()


async def _resize_new(image: Qcow2Image, size: int, preallocation: str) -> None:
    """qcow2_co_create's truncate of the new image (size 0) to ``size``, with its
    error texts: bdrv_co_truncate's generic checks first (the QAPI size is
    unsigned, QEMU's length signed), then qcow2's L1 growth."""
    from qmpjobd.block.node import MAX_LENGTH

    prefix = "Could not resize image: "
    if size >= 2 ** 63:
        raise QMPError(prefix + "Image size cannot be negative")
    if size > MAX_LENGTH:
        raise QMPError(prefix + f"offset({size}) exceeds maximum({MAX_LENGTH})")
    old_size = image.header.size
    l2_bytes = image.cluster_size * image.l2_entries
    try:
        await image.grow_l1(-(-size // l2_bytes))
    except OSError as exc:
        raise QMPError(prefix + f"Failed to grow the L1 table: {exc.strerror}") from None
    if preallocation == "metadata":
        await _preallocate_metadata(image, old_size, size)
    elif preallocation in ("falloc", "full"):
        await _preallocate_data(image, old_size, size, preallocation)
    image.header.size = size
    await image.storage.pwrite(24, struct.pack(">Q", size))
    await image.storage.flush()


async def _preallocate_metadata(image: Qcow2Image, start: int, end: int) -> None:
    """L2 tables and data clusters for [start, end), data left unwritten; the file
    is then extended (sparsely) to the end of the last data cluster's used part."""
    cs = image.cluster_size
    table_bytes = cs * image.l2_entries
    offset = start
    file_end = 0
    while offset < end:
        chunk = min(end - offset, table_bytes - offset % table_bytes)
        l2_offset, _ = await image._l2_for_write(offset)
        count = -(-(offset % cs + chunk) // cs)
        host = await image.alloc_clusters(count * cs)
        table = await image._cache_get(image.l2_cache, l2_offset)
        first = image._l2_index(offset)
        for i in range(count):
            image._set_entry(table, first + i, (host + i * cs) | C.OFLAG_COPIED)
        await image._set_dependency(image.l2_cache, image.refcount_cache)
        image.l2_cache.mark_dirty(l2_offset)
        # QEMU ends the file at the end of the last data cluster.
        file_end = host + count * cs
        offset += chunk
    await image.flush()
    if file_end > image.storage.length():
        await image.storage.truncate(file_end, "off")


async def _last_used_cluster(image: Qcow2Image, length: int) -> int:
    for index in range(-(-length // image.cluster_size) - 1, -1, -1):
        if await image.get_refcount(index) > 0:
            return index
    return -1


async def _preallocate_data(image: Qcow2Image, start: int, end: int, mode: str) -> None:
    """falloc/full: a refcount area sized for the new clusters, the data clusters
    right after it (allocated in the file), then the L2 tables that map them."""
    cs = image.cluster_size
    old_file_size = image.storage.length()
    last = await _last_used_cluster(image, old_file_size)
    old_file_size = (last + 1) * cs if last >= 0 else -(-old_file_size // cs) * cs
    new_data = (-(-end // cs) * cs - (start - start % cs)) // cs
    new_tables = -(-new_data // image.l2_entries) + 1
    allocation_start = await image.refcount_area(old_file_size, new_data + new_tables, True)
    allocated = await image.alloc_clusters_at(allocation_start, new_data)
    if allocated != new_data:
        raise QMPError("Failed to allocate data clusters")
    await image.flush()
    await image.storage.truncate(allocation_start + new_data * cs, mode)
    host, guest, remaining = allocation_start, start - start % cs, new_data
    while remaining:
        index = image._l2_index(guest)
        count = min(remaining, image.l2_entries - index)
        l2_offset, _ = await image._l2_for_write(guest)
        table = await image._cache_get(image.l2_cache, l2_offset)
        for i in range(count):
            image._set_entry(table, index + i, (host + i * cs) | C.OFLAG_COPIED)
        await image._set_dependency(image.l2_cache, image.refcount_cache)
        image.l2_cache.mark_dirty(l2_offset)
        guest += count * cs
        host += count * cs
        remaining -= count
    await image.flush()
