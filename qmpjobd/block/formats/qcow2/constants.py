"""Numbers of the qcow2 format (docs/interop/qcow2 of QEMU, restated in our words)."""

from __future__ import annotations

MAGIC = 0x514649FB                    # "QFI\xfb"
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112                # what QEMU writes: up to compression_type + padding

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_SIZE = 65536
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_NAME = 1023

# Implementation limits QEMU enforces when opening.
MAX_L1_SIZE_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER_SIZE = 40             # fixed part of one snapshot table entry
MAX_CLUSTER_OFFSET = (1 << 56) - 1

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
# Compatible and autoclear bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_INCOMPATIBLE, FEATURE_COMPATIBLE, FEATURE_AUTOCLEAR = 0, 1, 2
FEATURE_NAME_LENGTH = 46
FEATURE_ENTRY_SIZE = 48
# The feature name table QEMU writes, in its order (type, bit, name).
FEATURE_TABLE = (
    (FEATURE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
)
# QEMU writes the table only when it leaves room for a backing name.
FEATURE_TABLE_MIN_CLUSTER = 4096

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1

# Table entries.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
# The flags that make an entry compressed or zero: an entry is a zero cluster when
# ``entry & OFLAG_KIND == OFLAG_ZERO``, a normal or unallocated one when it is 0.
OFLAG_KIND = OFLAG_COMPRESSED | OFLAG_ZERO
COMPRESSED_SECTOR = 512
