"""A bitmap of one bit per cluster, for the job drivers' dirty tracking.

QEMU's HBitmap spends about one bit per cluster; a byte per cluster made a backup of
a 1 TiB node hold 16 MiB (and 1000 backups of 16 GiB nodes 256 MiB). Here the bits
live in a ``bytearray``, least significant bit first (cluster ``i`` is bit ``i % 8``
of byte ``i // 8``); bits past ``size`` in the last byte stay 0.

Searches skip whole bytes at C speed with a compiled ``re`` pattern (``bytearray.find``
can only look for one byte value, and a searched byte may hold any mix of bits).
Ranges are read and written as one ``int`` built from their bytes, so a range of
``n`` clusters costs O(n / 8) in C, not n Python steps.
"""

from __future__ import annotations

import re

# A byte with at least one bit set / at least one bit clear.
_ANY_SET = re.compile(rb"[^\x00]")
_ANY_CLEAR = re.compile(rb"[^\xff]")


def _lowest_bit(byte: int) -> int:
    """Index of the lowest set bit of a non-zero byte."""
    return (byte & -byte).bit_length() - 1


class ClusterBitmap:
    """``size`` bits, all set or all clear at first; ``count`` is the number set."""

    __slots__ = ("size", "bits", "count")

    def __init__(self, size: int, fill: bool = False) -> None:
        self.size = size
        nbytes = -(-size // 8)
        if fill:
            # One allocation of the final size (``b"\xff" * n`` would make two).
            self.bits = bytearray(b"\xff") * nbytes
            if size % 8:
                self.bits[-1] = (1 << (size % 8)) - 1
            self.count = size
        else:
            self.bits = bytearray(nbytes)
            self.count = 0

    def get(self, index: int) -> bool:
        return bool(self.bits[index >> 3] >> (index & 7) & 1)

    def set_range(self, first: int, last: int, value: bool) -> None:
        """Set bits ``first`` to ``last - 1`` (clipped to the bitmap) to ``value``."""
        last = min(last, self.size)
        if first >= last:
            return
        lo, hi = first >> 3, ((last - 1) >> 3) + 1
        word = int.from_bytes(self.bits[lo:hi], "little")
        mask = ((1 << (last - first)) - 1) << (first & 7)
        was_set = (word & mask).bit_count()
        if value:
            word |= mask
            self.count += (last - first) - was_set
        else:
            word &= ~mask
            self.count -= was_set
        self.bits[lo:hi] = word.to_bytes(hi - lo, "little")

    def next_set(self, start: int, limit: int | None = None) -> int:
        """First set bit in ``[start, limit)`` (default: to the end), or -1."""
        return self._next(start, self.size if limit is None else min(limit, self.size), 0)

    def next_clear(self, start: int, limit: int | None = None) -> int:
        """First clear bit in ``[start, limit)`` (default: to the end), or -1."""
        return self._next(start, self.size if limit is None else min(limit, self.size), 0xFF)

    def _next(self, start: int, limit: int, flip: int) -> int:
        """First bit in ``[start, limit)`` that differs from ``flip``'s bits (0: set
        bits, 0xFF: clear bits), or -1."""
        if start >= limit:
            return -1
        # The partial byte holding ``start``: drop the bits below it.
        byte = ((self.bits[start >> 3] ^ flip) >> (start & 7)) << (start & 7)
        if byte:
            found = (start & ~7) + _lowest_bit(byte)
            return found if found < limit else -1
        pattern = _ANY_CLEAR if flip else _ANY_SET
        match = pattern.search(self.bits, (start >> 3) + 1, ((limit - 1) >> 3) + 1)
        if match is None:
            return -1
        at = match.start()
        found = at * 8 + _lowest_bit(self.bits[at] ^ flip)
        return found if found < limit else -1
