"""A write-back cache of one-cluster metadata tables (L2 tables, refcount blocks).

Entries are bytearrays keyed by their host offset, in LRU order. The cache does
no I/O itself: the image reads a missing table and asks which entries are dirty
when it flushes, because the order of flushes between the two caches (refcount
blocks before the L2 tables that use them, L2 tables before the refcount blocks
that free what they dropped) is the image's business.
"""

from __future__ import annotations

from collections import OrderedDict


class TableCache:
    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = max(2, capacity)
        self.entries: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        # The cache that must reach the disk before this one (or None).
        self.depends_on: "TableCache | None" = None

    def lookup(self, offset: int) -> bytearray | None:
        table = self.entries.get(offset)
        if table is not None:
            self.entries.move_to_end(offset)
        return table

    def insert(self, offset: int, table: bytearray) -> bytearray:
        self.entries[offset] = table
        self.entries.move_to_end(offset)
        return table

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def discard(self, offset: int) -> None:
        """Forget an entry whose cluster was freed (its content no longer matters)."""
        self.entries.pop(offset, None)
        self.dirty.discard(offset)

    def full(self) -> bool:
        return len(self.entries) >= self.capacity

    def evict_clean(self) -> bool:
        """Drop the least recently used clean entry; False if every entry is dirty."""
        for offset in self.entries:
            if offset not in self.dirty:
                del self.entries[offset]
                return True
        return False

    def take_dirty(self) -> list[tuple[int, bytes]]:
        """The dirty entries in offset order, as bytes to write; they become clean."""
        out = [(offset, bytes(self.entries[offset])) for offset in sorted(self.dirty)
               if offset in self.entries]
        self.dirty.clear()
        return out
