"""DirtyBitmap against a one-flag-per-chunk reference, and QEMU's known digests."""

from __future__ import annotations

import random

import pytest

from qmpjobd.block.dirty_bitmap import DirtyBitmap, default_granularity
from qmpjobd.errors import QMPError

MiB = 1 << 20


def reference_chunks(size: int, granularity: int, writes: list[tuple[int, int]]) -> list[bool]:
    chunks = [False] * -(-size // granularity)
    for offset, length in writes:
        for index in range(offset // granularity, -(-(offset + length) // granularity)):
            if index < len(chunks):
                chunks[index] = True
    return chunks


@pytest.mark.parametrize("seed", range(6))
def test_random_writes_match_reference(seed):
    rng = random.Random(seed)
    granularity = 1 << rng.randint(9, 16)
    size = rng.randint(1, 64) * granularity - rng.randint(0, granularity - 1)
    bitmap = DirtyBitmap(size, granularity)
    writes = [(rng.randrange(size), rng.randint(1, 5 * granularity)) for _ in range(20)]
    for offset, length in writes:
        bitmap.set_dirty(offset, min(length, size - offset))
    chunks = reference_chunks(size, granularity, [(o, min(n, size - o)) for o, n in writes])
    assert [bitmap.is_dirty(i * granularity) for i in range(len(chunks))] == chunks
    assert bitmap.dirty_bytes == sum(chunks) * granularity
    runs = list(bitmap.extents(0, size))
    assert sum(length for _, length, _ in runs) == size
    assert all(a[2] != b[2] for a, b in zip(runs, runs[1:]))      # maximal runs
    for start, length, dirty in runs:
        assert all(chunks[i] == dirty for i in range(start // granularity,
                                                      -(-(start + length) // granularity)))
    first = next((i for i, d in enumerate(chunks) if d), None)
    assert bitmap.next_dirty(0) == (None if first is None else first * granularity)


def test_qemu_sha256_values():
    # Digests read from qemu-storage-daemon (bitmaps-and-nbd.md 1.4).
    assert DirtyBitmap(4 * MiB, 65536).sha256() == \
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
    assert DirtyBitmap(4 * MiB, 512).sha256() == \
        "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
    bitmap = DirtyBitmap(4 * MiB, 65536)
    bitmap.set_dirty(0, 1)
    bitmap.set_dirty(48 * 65536, 2 * 65536)
    assert bitmap.sha256() == "9cd5a55ff218a10dcc29b2fae117f27ecf963836a93e3612e3c60d608811e02e"


def test_count_is_whole_chunks_past_the_end():
    bitmap = DirtyBitmap(1000448, 65536)
    bitmap.set_dirty(0, 1000448)
    assert bitmap.dirty_bytes == 16 * 65536


def test_reset_rounds_inwards_and_clears_the_tail():
    bitmap = DirtyBitmap(1000, 512)
    bitmap.set_dirty(0, 1000)
    bitmap.reset_dirty(100, 400)          # inside chunk 0 only: nothing clears
    assert bitmap.dirty_bytes == 1024
    bitmap.reset_dirty(512, 488)          # reaches the end: the short chunk clears
    assert bitmap.dirty_bytes == 512 and not bitmap.is_dirty(600)


def test_next_dirty_and_clean_inside_a_chunk():
    bitmap = DirtyBitmap(1 * MiB, 65536)
    bitmap.set_dirty(65536, 65536)
    assert bitmap.next_dirty(70000) == 70000
    assert bitmap.next_dirty(0) == 65536
    assert bitmap.next_clean(65536) == 131072
    assert bitmap.next_dirty(131072) is None
    assert bitmap.next_dirty(0, 65536) is None


def test_merge_any_granularities():
    fine = DirtyBitmap(4 * MiB, 512)
    fine.set_dirty(70000, 10)
    coarse = DirtyBitmap(4 * MiB, MiB)
    coarse.merge_from(fine)
    assert coarse.dirty_bytes == MiB
    back = DirtyBitmap(4 * MiB, 512)
    back.merge_from(coarse)
    assert back.dirty_bytes == MiB
    same = DirtyBitmap(4 * MiB, 512)
    same.set_dirty(0, 512)
    same.merge_from(fine)
    assert same.dirty_bytes == 1024


def test_one_tebibyte_node_is_cheap():
    bitmap = DirtyBitmap(1 << 40, 65536)
    assert len(bitmap.bits.bits) == (1 << 24) // 8          # 2 MiB of bits
    bitmap.set_dirty(1 << 39, 1)
    assert bitmap.next_dirty(0) == 1 << 39
    assert len(bitmap.serialized()) == 2 * MiB


def test_successor_abdicate_and_reclaim():
    class Node:
        def __init__(self):
            self.dirty_bitmaps = []

        def add_dirty_bitmap(self, bitmap):
            bitmap.node = self
            self.dirty_bitmaps.insert(0, bitmap)

    node = Node()
    parent = DirtyBitmap(MiB, 65536, "b0")
    node.add_dirty_bitmap(parent)
    parent.set_dirty(0, 65536)
    successor = parent.create_successor()
    assert parent.busy and not parent.recording and parent.reported_recording
    assert node.dirty_bitmaps == [successor, parent]
    with pytest.raises(QMPError, match="'b0' is currently in use by another operation"):
        parent.create_successor()
    successor.set_dirty(131072, 1)
    parent.reclaim()
    assert node.dirty_bitmaps == [parent] and parent.dirty_bytes == 131072
    assert parent.recording and not parent.busy
    other = DirtyBitmap(MiB, 65536, "b1")
    node.add_dirty_bitmap(other)
    successor = parent.create_successor()
    successor.set_dirty(262144, 1)
    parent.abdicate()
    # The named bitmap now holds only the successor's bits, in its place.
    assert node.dirty_bitmaps == [parent, other]
    assert parent.dirty_bytes == 65536 and parent.is_dirty(262144)


def test_truncate_keeps_the_bits_below_the_new_end():
    bitmap = DirtyBitmap(MiB, 4096)
    bitmap.set_dirty(0, 12288)
    bitmap.set_dirty(MiB - 1, 1)
    bitmap.truncate(2 * MiB)
    assert bitmap.dirty_bytes == 4 * 4096 and bitmap.is_dirty(MiB - 1)
    bitmap.truncate(8192)
    assert bitmap.dirty_bytes == 8192


def test_default_granularity_from_cluster_size():
    class Image:
        def __init__(self, cluster_size):
            self.cluster_size = cluster_size

    class Node:
        is_filter = False
        file_child = None

        def __init__(self, driver, cluster_size=0):
            self.driver = driver
            self.image = Image(cluster_size)

    assert default_granularity(Node("null-co")) == 65536
    assert default_granularity(Node("qcow2", 512)) == 4096
    assert default_granularity(Node("qcow2", 2 * MiB)) == 65536
    assert default_granularity(Node("qcow2", 16384)) == 16384
