"""qcow2 cluster allocation: the one-pass free-run search of a refcount block gives
what a cluster-by-cluster first-fit walk gives (index and cursor), across refcount
widths, block boundaries and missing refcount blocks; and images whose free
space was fragmented by discards pass ``qemu-img check`` after multi-cluster
writes, with the layout the walk predicts."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from qmpjobd.block.formats.qcow2.image import Qcow2Image
from qmpjobd.block.formats.qcow2.refcount import (
    free_run_in_block,
    get_refcount,
    increase_refcounts,
    set_refcount,
)
from qmpjobd.block.formats.qcow2.storage import MemoryStorage

KiB = 1 << 10


def run(coro):
    return asyncio.run(coro)


def walk(blocks: list[bytearray | None], order: int, entries: int, cursor: int,
         count: int) -> tuple[int, int]:
    """The reference: QEMU's alloc_clusters_noref, one refcount per step (a None
    block counts nothing, so its clusters are free). Returns (start, new cursor)."""
    found = 0
    while found < count:
        index = cursor
        cursor += 1
        block = blocks[index // entries] if index // entries < len(blocks) else None
        free = block is None or get_refcount(block, index % entries, order) == 0
        found = found + 1 if free else 0
    return cursor - count, cursor


def search(blocks: list[bytearray | None], order: int, entries: int, cursor: int,
           count: int) -> tuple[int, int]:
    """The same search with free_run_in_block, as the image drives it."""
    found = 0
    while found < count:
        first = cursor % entries
        block = blocks[cursor // entries] if cursor // entries < len(blocks) else None
        if block is None:
            take = min(count - found, entries - first)
            found += take
            cursor += take
            continue
        end, found = free_run_in_block(block, order, first, found, count)
        cursor = cursor - first + end
    return cursor - count, cursor


def random_blocks(rng: random.Random, order: int, block_bytes: int,
                  nblocks: int) -> list[bytearray | None]:
    entries = block_bytes * 8 >> order
    top = (1 << (1 << order)) - 1
    density = rng.choice([0.0, 0.05, 0.3, 0.7, 0.95, 1.0])
    blocks: list[bytearray | None] = []
    for _ in range(nblocks):
        if rng.random() < 0.15:
            blocks.append(None)
            continue
        block = bytearray(block_bytes)
        for index in range(entries):
            if rng.random() < density:
                # Values whose bytes are partly zero catch a misaligned byte search.
                value = rng.choice([1, top, 1 << ((1 << order) - 1), 0x100 & top or 1])
                set_refcount(block, index, order, value)
        blocks.append(block)
    return blocks


@pytest.mark.parametrize("order", range(7))
def test_block_search_matches_the_cluster_walk(order: int) -> None:
    rng = random.Random(order)
    for _ in range(300):
        block_bytes = rng.choice([8, 16, 64])
        entries = block_bytes * 8 >> order
        blocks = random_blocks(rng, order, block_bytes, rng.randint(1, 5))
        span = entries * len(blocks)
        cursor = rng.randrange(0, span)
        count = rng.choice([1, 2, 3, entries - 1 or 1, entries, entries + 1, 2 * entries + 3])
        assert search(blocks, order, entries, cursor, count) == \
            walk(blocks, order, entries, cursor, count), (order, cursor, count)


def test_a_run_crossing_blocks_and_a_used_entry_in_the_carried_part() -> None:
    order, block_bytes = 4, 8           # 4 entries of 16 bits per block
    used = bytearray(block_bytes)
    set_refcount(used, 1, order, 1)
    tail_free = bytearray(block_bytes)
    set_refcount(tail_free, 0, order, 1)
    blocks: list[bytearray | None] = [tail_free, used, None, bytearray(block_bytes)]
    # Entries 1-4 free, 5 used: a run of 5 carried from the first block breaks,
    # the next one starts at 6 and runs on through the missing block.
    assert search(blocks, order, 4, 0, 5) == walk(blocks, order, 4, 0, 5) == (6, 11)
    assert search(blocks, order, 4, 0, 4) == walk(blocks, order, 4, 0, 4) == (1, 5)


# --- whole images ------------------------------------------------------------------------

# make test installs qemu-utils: a missing qemu-img is a failure, not a skip.
QEMU_IMG = shutil.which("qemu-img")


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    assert QEMU_IMG is not None
    return subprocess.run([QEMU_IMG, *args], capture_output=True, text=True)


@pytest.mark.parametrize("cluster_size, refcount_bits", [(65536, 16), (512, 16), (4096, 1), (2048, 64)])
def test_fragmented_image_allocates_first_fit_and_checks_clean(
        tmp_path: Path, cluster_size: int, refcount_bits: int) -> None:
    path = tmp_path / "frag.qcow2"
    size = 256 * cluster_size
    created = qemu_img("create", "-q", "-f", "qcow2", "-o",
                       f"cluster_size={cluster_size},refcount_bits={refcount_bits}",
                       str(path), str(size))
    assert created.returncode == 0, created.stderr
    storage = MemoryStorage(path.read_bytes())
    rng = random.Random(cluster_size + refcount_bits)
    model = bytearray(size)

    async def scenario() -> list[int]:
        image = await Qcow2Image.open(storage, read_only=False)
        cs = image.cluster_size
        # Fill, then punch holes of 1-5 clusters: free space in small pieces.
        for start in range(0, size // 2, 8 * cs):
            data = rng.randbytes(8 * cs)
            await image.write(start, data)
            model[start:start + len(data)] = data
        for start in range(0, size // 2, 8 * cs):
            length = rng.randint(1, 5) * cs
            await image.discard(start, length)
            model[start:start + length] = bytes(length)
        await image.flush()
        # Multi-cluster writes elsewhere fill the holes first fit.
        starts = []
        for start in range(size // 2, size, 6 * cs):
            length = min(rng.randint(1, 6) * cs, size - start)
            expected = await _walk_image(image, length // cs)
            data = rng.randbytes(length)
            await image.write(start, data)
            model[start:start + length] = data
            starts.append(expected)
            l2 = await image._l2_for_read(start)
            assert l2 is not None
            host = image._entry(l2, image._l2_index(start)) & ((1 << 56) - 1) & ~(cs - 1)
            assert host == expected, (start, host, expected)
        await image.flush()
        assert await image.read(0, size) == bytes(model)
        return starts

    run(scenario())
    path.write_bytes(bytes(storage.data))
    check = qemu_img("check", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found" in check.stdout


async def _walk_image(image: Qcow2Image, count: int) -> int:
    """Where a cluster-by-cluster walk from the image's cursor puts ``count``
    clusters (the image's cursor is left as it was)."""
    cursor = image.free_cluster_index
    found = 0
    while found < count:
        index = cursor
        cursor += 1
        found = found + 1 if await image.get_refcount(index) == 0 else 0
    return (cursor - count) * image.cluster_size


@pytest.mark.parametrize("order", range(7))
def test_increase_refcounts_matches_entry_by_entry(order: int) -> None:
    rng = random.Random(100 + order)
    top = (1 << (1 << order)) - 1
    for _ in range(200):
        block = bytearray(rng.randbytes(32))
        entries = 32 * 8 >> order
        first = rng.randrange(entries)
        count = rng.randint(1, entries - first)
        addend = rng.choice([1, 2, top])
        expected = bytearray(block)
        done_expected = count
        for i in range(count):
            value = get_refcount(expected, first + i, order) + addend
            if value > top:
                done_expected = i
                break
            set_refcount(expected, first + i, order, value)
        assert increase_refcounts(block, order, first, count, addend, top) == done_expected
        assert block == expected
