"""The qcow2 format package on in-memory storage: header checks and packing, refcount
widths, the request paths against a byte model, the refcount invariant after every
operation, and a deterministic fuzz over header bytes."""

from __future__ import annotations

import asyncio
import random
import struct

import pytest

from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.block.formats.qcow2.create import CreateOptions, create_image
from qmpjobd.block.formats.qcow2.header import Extension, Qcow2OpenError, parse_header
from qmpjobd.block.formats.qcow2.image import COMPRESSED, NORMAL, ZERO_ALLOC, Qcow2Image
from qmpjobd.block.formats.qcow2.refcount import get_refcount, set_refcount
from qmpjobd.block.formats.qcow2.storage import MemoryStorage
from qmpjobd.errors import QMPError

MiB = 1 << 20


def run(coro):
    return asyncio.run(coro)


def new_image(size: int = 4 * MiB, **options) -> MemoryStorage:
    storage = MemoryStorage()
    run(create_image(storage, CreateOptions(size=size, **options)))
    return storage


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


# --- header ------------------------------------------------------------------------------

@pytest.mark.parametrize("offset, fmt, value, message", [
    (0, ">I", 0x12345678, "Image is not in qcow2 format"),
    (4, ">I", 4, "Unsupported qcow2 version 4"),
    (4, ">I", 1, "Unsupported qcow2 version 1"),
    (20, ">I", 8, "Unsupported cluster size: 2^8"),
    (20, ">I", 22, "Unsupported cluster size: 2^22"),
    (100, ">I", 100, "qcow2 header too short"),
    (8, ">Q", 0x20000, "Invalid backing file offset"),
    (72, ">Q", 1 << 5, "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"),
    (72, ">Q", (1 << 4) | (1 << 40),
     "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"),
    (96, ">I", 7, "Reference count entry width too large; may not exceed 64 bits"),
    (56, ">I", 0, "Image does not contain a reference count table"),
    (48, ">Q", 0x10001, "Reference count table offset invalid"),
    (56, ">I", 0x100000, "Reference count table too large"),
    (40, ">Q", 0x30008, "Active L1 table offset invalid"),
    (36, ">I", 0, "L1 table is too small"),
    (104, ">B", 2, "qcow2: unknown compression type: 2"),
    (72, ">Q", C.INCOMPAT_COMPRESSION,
     "qcow2: Compression type incompatible feature bit must not be set"),
])
def test_header_errors(offset: int, fmt: str, value: int, message: str) -> None:
    cluster0 = bytes(new_image().data[:65536])
    with pytest.raises(Qcow2OpenError) as err:
        parse_header(patched(cluster0, offset, fmt, value), read_write=True)
    assert err.value.desc == message


def test_header_too_long_and_corrupt_bit() -> None:
    small = bytes(new_image(cluster_size=512).data[:512])
    with pytest.raises(Qcow2OpenError, match="qcow2 header exceeds cluster size"):
        parse_header(patched(small, 100, ">I", 1024))
    cluster0 = bytes(new_image().data[:65536])
    corrupt = patched(cluster0, 72, ">Q", C.INCOMPAT_CORRUPT)
    with pytest.raises(Qcow2OpenError, match="Image is corrupt; cannot be opened read/write"):
        parse_header(corrupt, read_write=True)
    assert parse_header(corrupt, read_write=False).corrupt


def test_pack_keeps_unknown_extensions_and_fields() -> None:
    cluster0 = bytes(new_image(backing_file="b.qcow2", backing_fmt="qcow2").data[:65536])
    header = parse_header(cluster0)
    header.unknown_extensions.append(Extension(0x12345678, b"kept as is"))
    header.unknown_header_fields = b"\x01" * 8
    again = parse_header(header.pack())
    assert again.unknown_extensions == [Extension(0x12345678, b"kept as is")]
    assert again.unknown_header_fields == b"\x01" * 8
    assert again.header_length == 120
    assert (again.backing_file, again.backing_format) == ("b.qcow2", "qcow2")
    assert [name for _, _, name in again.feature_table][:2] == ["dirty bit", "corrupt bit"]


def test_unknown_feature_named_by_the_image_table() -> None:
    header = parse_header(bytes(new_image().data[:65536]))
    header.feature_table = []
    cluster0 = bytearray(header.pack())
    # Rename the table's "extended L2 entries" entry to describe bit 9 instead.
    at = cluster0.index(b"extended L2 entries") - 2
    cluster0[at + 1] = 9
    struct.pack_into(">Q", cluster0, 72, (1 << 9) | (1 << 12))
    with pytest.raises(Qcow2OpenError) as err:
        parse_header(bytes(cluster0))
    assert err.value.desc == ("Unsupported qcow2 feature(s): extended L2 entries, "
                              "Unknown incompatible feature: 1000")


def test_pack_refuses_a_backing_name_that_does_not_fit() -> None:
    header = parse_header(bytes(new_image(cluster_size=512).data[:512]))
    header.backing_file = "x" * 500
    with pytest.raises(QMPError):
        header.pack()


# --- refcounts --------------------------------------------------------------------------

@pytest.mark.parametrize("order", range(7))
def test_refcount_widths(order: int) -> None:
    block = bytearray(512)
    top = (1 << (1 << order)) - 1
    values = [(i * 7919) & top for i in range(64)]
    for index, value in enumerate(values):
        set_refcount(block, index, order, value)
    assert [get_refcount(block, i, order) for i in range(64)] == values
    if order < 3:       # narrow entries start at the least significant bit
        set_refcount(block, 0, order, 1)
        assert block[0] & 1 == 1


# --- the request paths --------------------------------------------------------------------

def references(image: Qcow2Image) -> dict[int, int]:
    """Clusters referenced by the metadata (what qemu-img check counts)."""
    async def walk() -> dict[int, int]:
        cs = image.cluster_size
        refs: dict[int, int] = {}

        def add(offset: int, length: int) -> None:
            for cluster in range(offset // cs, (offset + length - 1) // cs + 1):
                refs[cluster] = refs.get(cluster, 0) + 1
        add(0, cs)
        add(image.header.refcount_table_offset, len(image.reftable) * 8)
        for entry in image.reftable:
            if entry:
                add(entry, cs)
        add(image.header.l1_table_offset, len(image.l1) * 8)
        for l1 in image.l1:
            l2_offset = l1 & C.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            add(l2_offset, cs)
            table = await image._cache_get(image.l2_cache, l2_offset)
            for index in range(image.l2_entries):
                entry = image._entry(table, index)
                kind = image.cluster_kind(entry)
                if kind in (NORMAL, ZERO_ALLOC):
                    add(entry & C.L2E_OFFSET_MASK, cs)
                elif kind == COMPRESSED:
                    raise AssertionError("no compressed clusters are written")
        return refs
    return run(walk())


def assert_consistent(storage: MemoryStorage) -> None:
    """Reopened from the bytes alone: refcounts equal references, COPIED set."""
    image = run(Qcow2Image.open(MemoryStorage(bytes(storage.data)), read_only=True))
    refs = references(image)
    top = max(list(refs) + [len(storage.data) // image.cluster_size + 1])
    for cluster in range(top + 1):
        assert run(image.get_refcount(cluster)) == refs.get(cluster, 0), cluster


def random_ops(image: Qcow2Image, model: bytearray, rng: random.Random, count: int) -> None:
    size = len(model)
    for _ in range(count):
        offset = rng.randrange(0, size)
        length = min(size - offset, rng.choice([1, 512, 3000, 65536, 200000]))
        op = rng.random()
        if op < 0.6:
            data = rng.randbytes(length)
            run(image.write(offset, data))
            model[offset:offset + length] = data
        elif op < 0.8:
            run(image.write_zeroes(offset, length, may_unmap=rng.random() < 0.5))
            model[offset:offset + length] = bytes(length)
        else:
            run(image.discard(offset, length))
            start = -(-offset // image.cluster_size) * image.cluster_size
            end = offset + length
            if end != size:
                end -= end % image.cluster_size
            if end > start:
                model[start:end] = bytes(end - start)


@pytest.mark.parametrize("options", [
    {}, {"cluster_size": 512}, {"cluster_size": 4096, "refcount_bits": 1},
    {"version": 2, "cluster_size": 1024}, {"refcount_bits": 64, "cluster_size": 2048},
], ids=str)
def test_random_requests_match_a_byte_model(options: dict) -> None:
    size = 2 * MiB + 512 * 3
    storage = new_image(size, **options)
    image = run(Qcow2Image.open(storage, read_only=False))
    model = bytearray(size)
    rng = random.Random(repr(options))
    for _ in range(4):
        random_ops(image, model, rng, 25)
        run(image.flush())
        assert run(image.read(0, size)) == bytes(model)
        assert_consistent(storage)


def test_backing_reads_and_cow() -> None:
    backing = bytes(range(256)) * (4 * MiB // 256)

    async def from_backing(offset: int, length: int) -> bytes:
        return backing[offset:offset + length] + bytes(max(0, offset + length - len(backing)))

    storage = new_image(8 * MiB, backing_file="b", backing_fmt="raw")
    image = run(Qcow2Image.open(storage, read_only=False))
    image.backing = from_backing
    run(image.write(4096 + 17, b"\xaa" * 100))
    expected = bytearray(backing + bytes(4 * MiB))
    expected[4113:4213] = b"\xaa" * 100
    assert run(image.read(0, 8 * MiB)) == bytes(expected)
    # Discard and zero writes over a backing file read as zeroes, not backing data.
    run(image.discard(65536, 65536))
    run(image.write_zeroes(3 * 65536, 65536, may_unmap=False))
    expected[65536:131072] = bytes(65536)
    expected[3 * 65536:4 * 65536] = bytes(65536)
    run(image.flush())
    assert run(image.read(0, 8 * MiB)) == bytes(expected)
    assert_consistent(storage)


def test_zero_write_keeps_or_frees_the_host_cluster() -> None:
    storage = new_image(MiB)
    image = run(Qcow2Image.open(storage, read_only=False))
    run(image.write(0, b"\x01" * (2 * 65536)))
    run(image.write_zeroes(0, 65536, may_unmap=False))
    run(image.write_zeroes(65536, 65536, may_unmap=True))
    table = run(image._l2_for_read(0))
    assert image._entry(table, 0) == C.OFLAG_COPIED | 0x50000 | C.OFLAG_ZERO
    assert image._entry(table, 1) == C.OFLAG_ZERO
    run(image.flush())
    assert_consistent(storage)


def test_metadata_reaches_the_file_only_in_order() -> None:
    """Before a flush the file holds no L2 entry for the new data; after it, the
    refcount of every referenced cluster is on disk."""
    storage = new_image(MiB)
    image = run(Qcow2Image.open(storage, read_only=False))
    run(image.write(0, b"\x07" * 65536))
    snapshot = MemoryStorage(bytes(storage.data))
    # A crash now: the image reopens consistent (the data cluster is at most leaked).
    reopened = run(Qcow2Image.open(snapshot, read_only=True))
    for cluster, count in references(reopened).items():
        assert run(reopened.get_refcount(cluster)) >= count
    run(image.flush())
    assert_consistent(storage)


def test_read_only_image_refuses_writes() -> None:
    image = run(Qcow2Image.open(new_image(MiB), read_only=True))
    with pytest.raises(OSError):
        run(image.write(0, b"x"))


# --- fuzz --------------------------------------------------------------------------------

def test_header_fuzz_never_crashes() -> None:
    """Random byte changes in the header cluster, the refcount table and the L1
    table: opening fails with a QMP error or succeeds; reads then fail with an
    OSError at worst, never with anything else."""
    original = bytes(new_image(2 * MiB, cluster_size=4096).data)
    rng = random.Random(1234)
    outcomes = {"refused": 0, "opened": 0}
    for _ in range(400):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            where = rng.choice([rng.randrange(0, 112), rng.randrange(0, len(original))])
            data[where] = rng.randrange(256)
        try:
            image = run(Qcow2Image.open(MemoryStorage(bytes(data)), read_only=True))
        except QMPError:
            outcomes["refused"] += 1
            continue
        outcomes["opened"] += 1
        try:
            run(image.read(0, min(image.size, 2 * MiB)))
        except OSError:
            pass
    assert outcomes["refused"] and outcomes["opened"]
