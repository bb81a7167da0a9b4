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


def free_run_in_block(block: bytes | bytearray, order: int, first: int, carried: int,
                      count: int) -> tuple[int, int]:
    """One refcount block's part of a first-fit search for ``count`` consecutive
    free (refcount 0) clusters, looking at entries from ``first`` on, with a run of
    ``carried`` free clusters ending just before ``first`` (from the block before).

    Returns ``(index, run)``: ``run == count`` when the search ends in this block
    (``index`` is then the entry after the run); otherwise ``index`` is the end of
    the block and ``run`` the free entries at its end, to carry into the next.
    The answer is the one a cluster-by-cluster walk gives, found with byte
    searches (one C call per run, not one refcount lookup per cluster)."""
    bits = 1 << order
    entries = len(block) * 8 // bits
    if bits < 8:
        return _free_run_walk(block, order, first, carried, count, entries)
    width = bits // 8
    if carried:
        # The run from the block before goes on while this block starts free.
        need = count - carried
        prefix = min(need, entries - first)
        zero_bytes = _leading_zero_bytes(block, first * width, prefix * width)
        if zero_bytes == prefix * width:
            if prefix == need:
                return first + need, count
            return entries, carried + prefix
        first += zero_bytes // width + 1      # past the first used entry
    pattern = bytes(width * count)
    pos = block.find(pattern, first * width)
    while pos != -1 and pos % width:
        # A zero run that starts inside an entry: look again from the next entry.
        pos = block.find(pattern, pos + width - pos % width)
    if pos != -1:
        return pos // width + count, count
    # No whole run here: the free entries at the end may begin one.
    tail = (len(block) - len(block.rstrip(b"\0"))) // width
    return entries, min(tail, entries - first, count - 1) if first < entries else 0


def _leading_zero_bytes(block: bytes | bytearray, start: int, length: int) -> int:
    piece = block[start:start + length]
    return len(piece) - len(piece.lstrip(b"\0"))


def _free_run_walk(block: bytes | bytearray, order: int, first: int, carried: int,
                   count: int, entries: int) -> tuple[int, int]:
    """free_run_in_block for sub-byte refcount widths, entry by entry."""
    run = carried
    index = first
    while index < entries:
        run = run + 1 if get_refcount(block, index, order) == 0 else 0
        index += 1
        if run == count:
            return index, count
    return entries, run


_RUNS: dict[tuple[int, int], struct.Struct] = {}


def increase_refcounts(block: bytearray, order: int, first: int, count: int, addend: int,
                       maximum: int) -> int:
    """Add ``addend`` (> 0) to ``count`` entries from ``first`` on, in one unpack
    and one pack where the width allows; stops before the first entry that would
    pass ``maximum`` and returns how many entries were changed."""
    bits = 1 << order
    if bits < 8:
        for i in range(count):
            value = get_refcount(block, first + i, order) + addend
            if value > maximum:
                return i
            set_refcount(block, first + i, order, value)
        return count
    key = (bits, count)
    run = _RUNS.get(key)
    if run is None:
        run = _RUNS[key] = struct.Struct(">" + _WIDE[bits].format[1:] * count)
    width = bits // 8
    values = [value + addend for value in run.unpack_from(block, first * width)]
    done = count
    if max(values) > maximum:
        done = next(i for i, value in enumerate(values) if value > maximum)
        values = values[:done]
        if not done:
            return 0
        run = struct.Struct(">" + _WIDE[bits].format[1:] * done)
    run.pack_into(block, first * width, *values)
    return done
