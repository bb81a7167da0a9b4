"""Refcount entries of 1 to 64 bits packed in a refcount block, and QEMU's sizing rule."""

from __future__ import annotations

import struct

_WIDE = {8: struct.Struct(">B"), 16: struct.Struct(">H"), 32: struct.Struct(">I"),
         64: struct.Struct(">Q")}


def get_refcount(block: bytearray, index: int, order: int) -> int:
    bits = 1 << order
    if bits >= 8:
        fmt = _WIDE[bits]
        return fmt.unpack_from(block, index * fmt.size)[0]
    # Sub-byte widths start at the least significant bit of each byte.
    bit = index * bits
    return (block[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1)


def set_refcount(block: bytearray, index: int, order: int, value: int) -> None:
    bits = 1 << order
    if bits >= 8:
        fmt = _WIDE[bits]
        fmt.pack_into(block, index * fmt.size, value)
        return
    bit = index * bits
    mask = ((1 << bits) - 1) << (bit & 7)
    block[bit >> 3] = (block[bit >> 3] & ~mask) | ((value << (bit & 7)) & mask)


def refcount_max(order: int) -> int:
    return (1 << (1 << order)) - 1


def refcount_metadata_clusters(clusters: int, cluster_size: int, order: int,
                               generous: bool) -> tuple[int, int]:
    """(refcount blocks, refcount table clusters) needed to count ``clusters``
    clusters plus themselves: the fixed point QEMU computes, optionally with half
    the table again as head room."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << order)
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
            continue
        if n == last:
            return blocks, table
