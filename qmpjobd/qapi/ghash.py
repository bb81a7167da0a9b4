"""Which unexpected member QEMU names first.

QEMU's input visitor copies the keys of an argument object into a GLib
GHashTable (in the order its QDict iterates them), removes every key it
consumes, and finally reports the first key left in the table.  To name the
same key we replay both containers:

* QDict: 512 buckets chosen by the "tdb" hash; a bucket lists its most
  recently inserted key first; iteration walks buckets in index order.
* GHashTable (GLib 2.74): open addressing with quadratic probing over a
  power-of-two array, start index ``(g_str_hash(key) * 11) % prime``,
  tombstones on removal, and the grow/shrink rules of g_hash_table_resize().
"""
from __future__ import annotations

from typing import Iterator

_M32 = 0xFFFFFFFF
_PRIME_MOD = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191,
              16381, 32749, 65521, 131071, 262139, 524287, 1048573, 2097143,
              4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
              268435399, 536870909, 1073741789, 2147483647]
_MIN_SHIFT = 3
_UNUSED, _TOMBSTONE = 0, 1


def tdb_hash(key: str) -> int:
    """QDict bucket index (qobject/qdict.c, 512 buckets)."""
    data = key.encode("utf-8")
    value = (0x238F13AF * len(data)) & _M32
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & _M32
    return ((1103515243 * value + 12345) & _M32) % 512


def qdict_order(keys: list[str]) -> list[str]:
    """Iteration order of a QDict whose keys were inserted in *keys* order."""
    buckets: dict[int, list[str]] = {}
    for k in keys:
        buckets.setdefault(tdb_hash(k), []).insert(0, k)
    return [k for b in sorted(buckets) for k in buckets[b]]


def g_str_hash(key: str) -> int:
    h = 5381
    for byte in key.encode("utf-8"):
        signed = byte - 256 if byte >= 128 else byte   # GLib hashes signed chars
        h = (h * 33 + signed) & _M32
    return h


class GHashSet:
    """A string set that iterates exactly like a GLib 2.74 GHashTable."""

    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _lookup(self, key: str) -> tuple[int, int]:
        h = g_str_hash(key)
        if h <= 1:
            h = 2
        idx = ((h * 11) & _M32) % self.mod   # guint arithmetic wraps
        step, tomb = 0, None
        while self.hashes[idx] != _UNUSED:
            if self.hashes[idx] == h and self.keys[idx] == key:
                return idx, h
            if self.hashes[idx] == _TOMBSTONE and tomb is None:
                tomb = idx
            step += 1
            idx = (idx + step) & self.mask
        return (tomb if tomb is not None else idx), h

    def add(self, key: str) -> None:
        idx, h = self._lookup(key)
        if self.hashes[idx] > _TOMBSTONE:
            return
        was_unused = self.hashes[idx] == _UNUSED
        self.hashes[idx], self.keys[idx] = h, key
        self.nnodes += 1
        if was_unused:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        idx, _ = self._lookup(key)
        if self.hashes[idx] <= _TOMBSTONE:
            return
        self.hashes[idx], self.keys[idx] = _TOMBSTONE, None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        size, occ = self.size, self.noccupied
        if (size > self.nnodes * 4 and size > 1 << _MIN_SHIFT) or size <= occ + occ // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        target = int(self.nnodes * 1.333)
        shift = max(target.bit_length(), _MIN_SHIFT)
        self._set_shift(shift)
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        for i in range(old_size):          # GLib's in-place rehash (resize_set)
            node_hash = self.hashes[i]
            if node_hash <= _TOMBSTONE:
                self.hashes[i] = _UNUSED
                continue
            if moved[i]:
                continue
            self.hashes[i] = _UNUSED
            key = self.keys[i]
            self.keys[i] = None
            while True:
                idx = ((node_hash * 11) & _M32) % self.mod
                step = 0
                while moved[idx]:
                    step += 1
                    idx = (idx + step) & self.mask
                moved[idx] = True
                replaced_hash, replaced_key = self.hashes[idx], self.keys[idx]
                self.hashes[idx], self.keys[idx] = node_hash, key
                if replaced_hash <= _TOMBSTONE:
                    break
                node_hash, key = replaced_hash, replaced_key
        if self.size < old_size:
            del self.hashes[self.size:]
            del self.keys[self.size:]
        self.noccupied = self.nnodes

    def __iter__(self) -> Iterator[str]:
        """Keys in GLib's iteration order (bucket order)."""
        for h, k in zip(self.hashes, self.keys):
            if h > _TOMBSTONE:
                yield k  # type: ignore[misc]

    def first(self) -> str | None:
        for h, k in zip(self.hashes, self.keys):
            if h > _TOMBSTONE:
                return k
        return None


def first_unexpected(input_keys: list[str], consumed: list[str]) -> str:
    """The leftover key QEMU reports: *input_keys* in parse order, *consumed*
    in the order the visitor took them."""
    table = GHashSet()
    for k in qdict_order(input_keys):
        table.add(k)
    for k in consumed:
        table.remove(k)
    left = table.first()
    assert left is not None
    return left
