"""The qcow2 header and its extensions: parsing with QEMU's checks, and packing.

``parse_header(cluster0)`` takes the bytes of the first cluster (zero-filled where
the file is shorter) and returns a :class:`Header`, or raises
:class:`Qcow2OpenError` with the message QEMU gives for the first problem it would
find, in QEMU's order. ``Header.pack()`` builds the first cluster the way QEMU
rewrites it: the fixed fields, unknown trailing header fields, the extensions in
QEMU's order (unknown ones kept), the end marker, then the backing file name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.errors import QMPError

_V2 = struct.Struct(">IIQIIQIIQQIIQ")        # the 72 bytes every version has
_V3 = struct.Struct(">QQQII")                # incompatible .. header_length (104)
_EXT = struct.Struct(">II")


class Qcow2OpenError(QMPError):
    """An image that QEMU would refuse to open, with QEMU's message."""


@dataclass
class Extension:
    """A header extension qmpjobd does not interpret, kept byte for byte."""

    magic: int
    data: bytes


@dataclass
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = C.V3_HEADER_LENGTH
    compression_type: int = C.COMPRESSION_ZLIB
    # Header bytes past what qmpjobd knows (header_length > 112), kept.
    unknown_header_fields: bytes = b""
    backing_file: str | None = None
    backing_format: str | None = None
    # (type, bit, name) entries of the image's own feature name table.
    feature_table: list[tuple[int, int, str]] = field(default_factory=list)
    data_file: str | None = None
    crypto_header: bytes | None = None
    bitmaps: bytes | None = None
    unknown_extensions: list[Extension] = field(default_factory=list)

    # --- derived values -------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & C.COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_CORRUPT)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_EXTL2)

    # --- packing ----------------------------------------------------------------------

    def pack_fixed(self) -> bytes:
        """The fixed fields: 72 bytes for v2, 112 (+ unknown fields) for v3."""
        fixed = _V2.pack(C.MAGIC, self.version, self.backing_file_offset,
                         self.backing_file_size, self.cluster_bits, self.size,
                         self.crypt_method, self.l1_size, self.l1_table_offset,
                         self.refcount_table_offset, self.refcount_table_clusters,
                         self.nb_snapshots, self.snapshots_offset)
        if self.version == 2:
            return fixed
        length = C.V3_HEADER_LENGTH + len(self.unknown_header_fields)
        tail = _V3.pack(self.incompatible_features, self.compatible_features,
                        self.autoclear_features, self.refcount_order, length)
        return (fixed + tail + bytes([self.compression_type]) + bytes(7)
                + self.unknown_header_fields)

    def pack(self) -> bytes:
        """The whole first cluster as QEMU's header update writes it.

        Updates ``backing_file_offset``/``backing_file_size`` and
        ``header_length``. Raises Qcow2OpenError("...") with ENOSPC's text when the
        extensions and the backing name do not fit into the cluster.
        """
        if self.version == 3:
            self.header_length = C.V3_HEADER_LENGTH + len(self.unknown_header_fields)
        body = bytearray()
        if self.backing_format is not None:
            body += _extension(C.EXT_BACKING_FORMAT, self.backing_format.encode())
        if self.data_file is not None and self.incompatible_features & C.INCOMPAT_DATA_FILE:
            body += _extension(C.EXT_DATA_FILE, self.data_file.encode())
        if self.crypto_header is not None:
            body += _extension(C.EXT_CRYPTO_HEADER, self.crypto_header)
        if self.version >= 3 and self.cluster_size > C.FEATURE_TABLE_MIN_CLUSTER:
            body += _extension(C.EXT_FEATURE_TABLE, feature_table_bytes(C.FEATURE_TABLE))
        if self.bitmaps is not None:
            body += _extension(C.EXT_BITMAPS, self.bitmaps)
        for ext in self.unknown_extensions:
            body += _extension(ext.magic, ext.data)
        body += _extension(C.EXT_END, b"")
        self.backing_file_offset = self.backing_file_size = 0
        prefix_length = len(self.pack_fixed())
        if self.backing_file is not None:
            self.backing_file_offset = prefix_length + len(body)
            name = self.backing_file.encode()
            self.backing_file_size = len(name)
            body += name
        if prefix_length + len(body) > self.cluster_size:
            raise QMPError("No space left on device")
        cluster = self.pack_fixed() + bytes(body)
        return cluster + bytes(self.cluster_size - len(cluster))


def _extension(magic: int, data: bytes) -> bytes:
    padding = -len(data) % 8
    return _EXT.pack(magic, len(data)) + data + bytes(padding)


def feature_table_bytes(table: tuple[tuple[int, int, str], ...]) -> bytes:
    out = bytearray()
    for kind, bit, name in table:
        raw = name.encode()[:C.FEATURE_NAME_LENGTH]
        out += bytes([kind, bit]) + raw + bytes(C.FEATURE_NAME_LENGTH - len(raw))
    return bytes(out)


# --- parsing -----------------------------------------------------------------------------

def header_cluster_bits(first_bytes: bytes) -> int | None:
    """cluster_bits of a header, to know how much to read; None if not qcow2."""
    if len(first_bytes) < 24 or struct.unpack_from(">I", first_bytes, 0)[0] != C.MAGIC:
        return None
    return struct.unpack_from(">I", first_bytes, 20)[0]


def parse_header(cluster0: bytes, *, read_write: bool = False) -> Header:
    """Parse and validate the header; ``cluster0`` holds at least the first cluster
    (or everything the file has, zero-padded to the cluster size)."""
    buf = cluster0 + bytes(max(0, C.V3_HEADER_LENGTH - len(cluster0)))
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt,
     l1_size, l1_offset, reftable_offset, reftable_clusters, nb_snapshots,
     snapshots_offset) = _V2.unpack_from(buf, 0)
    if magic != C.MAGIC:
        raise Qcow2OpenError("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise Qcow2OpenError(f"Unsupported qcow2 version {version}")
    if cluster_bits < C.MIN_CLUSTER_BITS or cluster_bits > C.MAX_CLUSTER_BITS:
        raise Qcow2OpenError(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    header = Header(version=version, backing_file_offset=backing_offset,
                    backing_file_size=backing_size, cluster_bits=cluster_bits, size=size,
                    crypt_method=crypt, l1_size=l1_size, l1_table_offset=l1_offset,
                    refcount_table_offset=reftable_offset,
                    refcount_table_clusters=reftable_clusters, nb_snapshots=nb_snapshots,
                    snapshots_offset=snapshots_offset)
    if version == 2:
        header.header_length = C.V2_HEADER_LENGTH
        header.refcount_order = 4
    else:
        (header.incompatible_features, header.compatible_features,
         header.autoclear_features, header.refcount_order,
         header.header_length) = _V3.unpack_from(buf, 72)
        if header.header_length < C.V3_MIN_HEADER_LENGTH:
            raise Qcow2OpenError("qcow2 header too short")
    if header.header_length > cluster_size:
        raise Qcow2OpenError("qcow2 header exceeds cluster size")
    buf = buf + bytes(max(0, cluster_size - len(buf)))
    if header.header_length > C.V3_HEADER_LENGTH:
        header.unknown_header_fields = bytes(buf[C.V3_HEADER_LENGTH:header.header_length])
    if backing_offset > cluster_size:
        raise Qcow2OpenError("Invalid backing file offset")
    ext_end = backing_offset if backing_offset else cluster_size
    if header.header_length > 104:
        header.compression_type = buf[104]
    _check_compression(header)
    unknown = header.incompatible_features & ~C.INCOMPAT_KNOWN
    if unknown:
        try:
            _read_extensions(header, buf, ext_end)
        except Qcow2OpenError:
            pass    # QEMU lists what it could read of the table
        raise Qcow2OpenError(unsupported_features_message(header.feature_table, unknown))
    if header.corrupt and read_write:
        raise Qcow2OpenError("qcow2: Image is corrupt; cannot be opened read/write")
    if header.refcount_order > C.MAX_REFCOUNT_ORDER:
        raise Qcow2OpenError("Reference count entry width too large; may not exceed 64 bits")
    if crypt > C.CRYPT_LUKS:
        raise Qcow2OpenError(f"Unsupported encryption method {crypt}")
    _check_tables(header)
    _read_extensions(header, buf, ext_end)
    if crypt == C.CRYPT_LUKS and header.crypto_header is None:
        # AES needs no header region; LUKS keeps its own in an extension.
        raise Qcow2OpenError(f"Missing CRYPTO header for crypt method {crypt}")
    if backing_offset:
        limit = min(C.MAX_BACKING_NAME, cluster_size - backing_offset)
        if backing_size > limit or backing_size >= C.MAX_BACKING_NAME + 1:
            raise Qcow2OpenError("Backing file name too long")
        raw = bytes(buf[backing_offset:backing_offset + backing_size])
        header.backing_file = raw.decode("utf-8", "surrogateescape")
    return header


def _check_compression(header: Header) -> None:
    kind = header.compression_type
    if kind not in (C.COMPRESSION_ZLIB, C.COMPRESSION_ZSTD):
        raise Qcow2OpenError(f"qcow2: unknown compression type: {kind}")
    flagged = bool(header.incompatible_features & C.INCOMPAT_COMPRESSION)
    if kind == C.COMPRESSION_ZLIB and flagged:
        raise Qcow2OpenError("qcow2: Compression type incompatible feature bit must not be set")
    if kind != C.COMPRESSION_ZLIB and not flagged:
        raise Qcow2OpenError("qcow2: Compression type incompatible feature bit must be set")


def unsupported_features_message(table: list[tuple[int, int, str]], mask: int) -> str:
    """QEMU's list: names from the image's table first, then the unnamed rest in hex."""
    names = []
    for kind, bit, name in table:
        if kind == C.FEATURE_INCOMPATIBLE and bit < 64 and mask & (1 << bit):
            names.append(name)
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def _validate_table(offset: int, entries: int, entry_len: int, max_bytes: int,
                    name: str, cluster_size: int) -> None:
    if entries > max_bytes // entry_len:
        raise Qcow2OpenError(f"{name} too large")
    if (2 ** 63 - 1) - entries * entry_len < offset or offset % cluster_size:
        raise Qcow2OpenError(f"{name} offset invalid")


def _check_tables(header: Header) -> None:
    cs = header.cluster_size
    if header.refcount_table_clusters == 0:
        raise Qcow2OpenError("Image does not contain a reference count table")
    _validate_table(header.refcount_table_offset, header.refcount_table_clusters, cs,
                    C.MAX_REFTABLE_SIZE_BYTES, "Reference count table", cs)
    _validate_table(header.snapshots_offset, header.nb_snapshots, C.SNAPSHOT_HEADER_SIZE,
                    C.SNAPSHOT_HEADER_SIZE * C.MAX_SNAPSHOTS, "Snapshot table", cs)
    _validate_table(header.l1_table_offset, header.l1_size, 8, C.MAX_L1_SIZE_BYTES,
                    "Active L1 table", cs)
    l2_bytes = cs * header.l2_entries
    # QEMU rounds up in 64-bit unsigned arithmetic: a size within one L2 span of
    # 2^64 wraps to a small count and passes (the open fails later, when the
    # node's length is taken: too_big_for_a_node).
    needed = ((header.size + l2_bytes - 1) % 2 ** 64) // l2_bytes
    if needed > 2 ** 31 - 1:
        raise Qcow2OpenError("Image is too big")
    if header.l1_size < needed:
        raise Qcow2OpenError("L1 table is too small")


def too_big_for_a_node(header: Header) -> bool:
    """A virtual size whose sector count does not fit QEMU's int64 byte length
    (bdrv_refresh_total_sectors: EFBIG, after the format's open succeeded)."""
    return header.size // 512 > (2 ** 63 - 1) // 512


def _read_extensions(header: Header, buf: bytes, end: int) -> None:
    offset = header.header_length
    while offset < end:
        if offset + 8 > len(buf):
            raise Qcow2OpenError("Header extension too large")
        magic, length = _EXT.unpack_from(buf, offset)
        offset += 8
        if offset > end or length > end - offset:
            raise Qcow2OpenError("Header extension too large")
        data = bytes(buf[offset:offset + length])
        if magic == C.EXT_END:
            return
        _take_extension(header, magic, data)
        offset += -(-length // 8) * 8


def _take_extension(header: Header, magic: int, data: bytes) -> None:
    if magic == C.EXT_BACKING_FORMAT:
        if len(data) >= 16:
            raise Qcow2OpenError(f"ERROR: ext_backing_format: len={len(data)} too large (>=16)")
        header.backing_format = data.decode("utf-8", "surrogateescape")
    elif magic == C.EXT_FEATURE_TABLE:
        header.feature_table = _parse_feature_table(data)
    elif magic == C.EXT_CRYPTO_HEADER:
        header.crypto_header = data
    elif magic == C.EXT_BITMAPS:
        header.bitmaps = data
    elif magic == C.EXT_DATA_FILE:
        header.data_file = data.decode("utf-8", "surrogateescape")
    else:
        header.unknown_extensions.append(Extension(magic, data))


def _parse_feature_table(data: bytes) -> list[tuple[int, int, str]]:
    table = []
    for start in range(0, len(data) - C.FEATURE_ENTRY_SIZE + 1, C.FEATURE_ENTRY_SIZE):
        entry = data[start:start + C.FEATURE_ENTRY_SIZE]
        name = entry[2:].split(b"\0", 1)[0]
        if not name:
            break         # QEMU stops at the first entry without a name
        table.append((entry[0], entry[1], name.decode("utf-8", "replace")))
    return table


# --- runtime options (qcow2_update_options_prepare) -----------------------------------

# QEMU's defaults and floors for the metadata caches.
_DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024
_MIN_REFCOUNT_CACHE_ENTRIES = 4
_INT_MAX = 2 ** 31 - 1
_UINT_MAX = 2 ** 32 - 1


# The qcow2 runtime options QEMU parses as sizes (the schema says int).
_SIZE_OPTIONS = ("l2-cache-size", "l2-cache-entry-size", "cache-size", "refcount-cache-size")


def check_runtime_options(header: Header, options: dict, sizes_reworded: bool) -> None:
    """Refuse the runtime options QEMU refuses once it has read the header and the
    L1 table, with its messages and in its order: negative sizes (the QemuOpts
    parse; ``sizes_reworded`` is the newer wording), the cache sizes, the cache
    clean interval, lazy refcounts and discard-no-unref on a version 2 image.
    (Types and enum values were checked against the schema before.)"""
    for name in _SIZE_OPTIONS:
        value = options.get(name, 0)
        if value < 0:
            raise QMPError(f"Value '{value}' is out of range for parameter '{name}'"
                           if sizes_reworded else
                           f"Parameter '{name}' expects a non-negative number below 2^64")
    _check_cache_sizes(header, options)
    # The schema's type is int, QEMU reads the option back as unsigned: a
    # negative interval is a huge one.
    interval = options.get("cache-clean-interval", 0)
    if interval < 0 or interval > _UINT_MAX:
        raise QMPError("Cache clean interval too big")
    if options.get("lazy-refcounts", header.lazy_refcounts) and header.version < 3:
        raise QMPError("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                       "compatibility level")
    if options.get("discard-no-unref") and header.version < 3:
        raise QMPError("discard-no-unref is only supported since qcow2 version 3")


def _check_cache_sizes(header: Header, options: dict) -> None:
    """read_cache_sizes: how cache-size, l2-cache-size and refcount-cache-size may
    be combined, and which L2 cache entry sizes are valid."""
    cluster = header.cluster_size
    # The L2 tables of the whole disk, in whole clusters.
    l2_tables = -(-header.size // cluster) * 8
    max_l2_cache = -(-l2_tables // cluster) * cluster
    combined = options.get("cache-size")
    l2_setting = options.get("l2-cache-size", _DEFAULT_L2_CACHE_MAX)
    refcount = options.get("refcount-cache-size", 0)
    l2_size = min(max_l2_cache, l2_setting)
    if combined is not None:
        if "l2-cache-size" in options and "refcount-cache-size" in options:
            raise QMPError("cache-size, l2-cache-size and refcount-cache-size may not "
                           "be set at the same time")
        if "l2-cache-size" in options and l2_setting > combined:
            raise QMPError("l2-cache-size may not exceed cache-size")
        if refcount > combined:
            raise QMPError("refcount-cache-size may not exceed cache-size")
        if "l2-cache-size" in options:
            refcount = combined - l2_size
        elif "refcount-cache-size" in options:
            l2_size = combined - refcount
        else:
            min_refcount = _MIN_REFCOUNT_CACHE_ENTRIES * cluster
            if combined >= max_l2_cache + min_refcount:
                l2_size = max_l2_cache
            else:
                l2_size = combined - min(combined, min_refcount)
            refcount = combined - l2_size
    entry = options.get("l2-cache-entry-size", cluster)
    if l2_size < max_l2_cache and "l2-cache-entry-size" not in options:
        entry = min(cluster, 4096)
    if entry < (1 << C.MIN_CLUSTER_BITS) or entry > cluster or entry & (entry - 1):
        raise QMPError("L2 cache entry size must be a power of two between "
                       f"{1 << C.MIN_CLUSTER_BITS} and the cluster size ({cluster})")
    if l2_size // entry > _INT_MAX:
        raise QMPError("L2 cache size too big")
    if refcount // cluster > _INT_MAX:
        raise QMPError("Refcount cache size too big")
