"""ClusterBitmap (one bit per cluster) against a one-byte-per-bit reference."""

from __future__ import annotations

import random

import pytest

from qmpjobd.block.bitmap import ClusterBitmap
from qmpjobd.block.jobs.backup import DirtyClusters
from qmpjobd.block.jobs.mirror import DirtyBitmap


def _ref_next(ref: list[int], value: int, start: int, limit: int) -> int:
    for index in range(start, min(limit, len(ref))):
        if ref[index] == value:
            return index
    return -1


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 63, 64, 65, 200, 1031])
@pytest.mark.parametrize("fill", [False, True])
def test_random_operations_match_reference(size: int, fill: bool) -> None:
    rng = random.Random(size * 2 + fill)
    bitmap = ClusterBitmap(size, fill=fill)
    ref = [int(fill)] * size
    for _ in range(300):
        first = rng.randrange(size + 3)
        last = first + rng.randrange(0, 40) if rng.random() < 0.8 else size + 5
        value = rng.random() < 0.5
        bitmap.set_range(first, last, value)
        for index in range(first, min(last, size)):
            ref[index] = int(value)
        assert bitmap.count == sum(ref)
        start = rng.randrange(size + 2)
        limit = rng.choice([None, start + rng.randrange(0, 30)])
        end = size if limit is None else limit
        assert bitmap.next_set(start, limit) == _ref_next(ref, 1, start, end)
        assert bitmap.next_clear(start, limit) == _ref_next(ref, 0, start, end)
    assert [int(bitmap.get(i)) for i in range(size)] == ref
    # Bits past the end stay clear, so the bytes hold exactly ``count`` set bits.
    assert sum(bin(b).count("1") for b in bitmap.bits) == bitmap.count


def test_one_bit_per_cluster() -> None:
    # 16 GiB at 64 KiB clusters: 262144 clusters in 32 KiB.
    dirty = DirtyClusters(16 * 2**30, 64 * 1024)
    assert len(dirty.bits) == 32 * 1024
    assert dirty.dirty_bytes == 16 * 2**30


def test_dirty_clusters_areas() -> None:
    dirty = DirtyClusters(1_000_000, 65536)          # 16 clusters, the last one short
    assert dirty.dirty_bytes == 16 * 65536
    assert dirty.next_dirty_area(0, 2**20) == (0, 16 * 65536)
    dirty.set(0, 3 * 65536, dirty=False)
    dirty.set(5 * 65536, 1, dirty=False)
    assert dirty.dirty_clusters == 12
    assert dirty.next_dirty_area(0, 2**20) == (3 * 65536, 2 * 65536)
    assert dirty.next_dirty_area(6 * 65536, 65536) == (6 * 65536, 65536)
    dirty.set(0, 1_000_000, dirty=False)
    assert dirty.next_dirty_area(0, 2**20) is None


def test_mirror_bitmap_short_last_chunk_and_wrap() -> None:
    bitmap = DirtyBitmap(1000, 512)                  # two chunks, the last 488 bytes
    assert bitmap.dirty_bytes == 0 and bitmap.next_dirty_run(0, 4096) is None
    bitmap.set(600, 1, dirty=True)
    assert bitmap.dirty_chunks == 1 and bitmap.dirty_bytes == 488
    assert bitmap.next_dirty_run(0, 4096) == (512, 488)
    bitmap.set(0, 1, dirty=True)
    assert bitmap.dirty_bytes == 1000
    assert bitmap.next_dirty_run(512, 512) == (512, 488)
    bitmap.set(512, 488, dirty=False)
    assert bitmap.next_dirty_run(512, 4096) == (0, 512)   # wraps once
