"""The qcow2 snapshot table, snapshot refcounts and the corruption handling, on
images qemu-img made, in memory (the daemon-level comparison with
qemu-storage-daemon is tests/integration/test_qcow2_snapshots.py)."""

from __future__ import annotations

import asyncio
import struct
import subprocess
from pathlib import Path

import pytest

from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.block.formats.qcow2 import snapshot as S
from qmpjobd.block.formats.qcow2.header import Qcow2OpenError
from qmpjobd.block.formats.qcow2.image import Qcow2Image
from qmpjobd.block.formats.qcow2.storage import MemoryStorage


def qemu_image(tmp_path: Path, *io: str, options: tuple[str, ...] = (),
               snapshots: tuple[str, ...] = ()) -> bytes:
    path = tmp_path / "i.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", *options, path.name, "1M"],
                   cwd=tmp_path, check=True, capture_output=True)
    argv = ["qemu-io", "-f", "qcow2"]
    for command in io:
        argv += ["-c", command]
    if io:
        subprocess.run(argv + [path.name], cwd=tmp_path, check=True, capture_output=True)
    for name in snapshots:
        subprocess.run(["qemu-img", "snapshot", "-c", name, path.name], cwd=tmp_path,
                       check=True, capture_output=True)
    return path.read_bytes()


def check(tmp_path: Path, data: bytes) -> subprocess.CompletedProcess:
    path = tmp_path / "out.qcow2"
    path.write_bytes(data)
    return subprocess.run(["qemu-img", "check", path.name], cwd=tmp_path,
                          capture_output=True, text=True)


def snapshot_names(tmp_path: Path, data: bytes) -> list[str]:
    path = tmp_path / "out.qcow2"
    path.write_bytes(data)
    out = subprocess.run(["qemu-img", "snapshot", "-l", path.name], cwd=tmp_path,
                         capture_output=True, text=True).stdout
    return [line.split()[1] for line in out.splitlines()[2:]]


def open_image(data: bytes, read_only: bool = False) -> tuple[MemoryStorage, Qcow2Image]:
    storage = MemoryStorage(data)
    return storage, asyncio.run(Qcow2Image.open(storage, read_only=read_only))


# --- the table --------------------------------------------------------------------------

def test_table_round_trip_keeps_unknown_extra_data() -> None:
    snaps = [S.Snapshot(0x30000, 1, "1", "a", 5, 6, 7, 0, 1 << 20),
             S.Snapshot(0x50000, 2, "2", "bee", extra_data_size=40,
                        unknown_extra=b"\x01" * 16, vm_state_size=1 << 33)]
    data = S.pack_table(snaps)
    assert len(data) == S.table_size(snaps)
    # Entry 2 starts 8-aligned after entry 1 (40 + 24 + 1 + 1 bytes).
    assert data[66:72] == bytes(6) and struct.unpack_from(">Q", data, 72)[0] == 0x50000
    # A VM state above 4 GiB leaves the 32-bit field 0 and sits in the extra data.
    assert struct.unpack_from(">I", data, 72 + 32)[0] == 0

    async def read_back():
        storage = MemoryStorage(bytes(0x70000) + data)

        class Fake:
            pass
        image = Fake()
        image.storage = storage
        image.size = 1 << 20
        image.header = type("H", (), {"nb_snapshots": 2, "snapshots_offset": 0x70000})()
        return await S.read_snapshots(image)
    parsed, size = asyncio.run(read_back())
    assert parsed == snaps and size == len(data)


def test_ids_and_lookup() -> None:
    snaps = [S.Snapshot(0, 0, "1", "x"), S.Snapshot(0, 0, "7abc", "y"), S.Snapshot(0, 0, "q", "z")]
    assert S.new_snapshot_id(snaps) == "8"
    assert S.new_snapshot_id([]) == "1"
    assert S.find_snapshot(snaps, "1", None) == 0
    assert S.find_snapshot(snaps, None, "z") == 2
    assert S.find_snapshot(snaps, "1", "y") == -1
    assert S.find_snapshot(snaps, None, None) == -1


def test_info_splits_the_vm_clock() -> None:
    info = S.Snapshot(0, 0, "3", "n", 10, 20, 5_123_456_789).info()
    assert info == {"id": "3", "name": "n", "vm-state-size": 0, "date-sec": 10,
                    "date-nsec": 20, "vm-clock-sec": 5, "vm-clock-nsec": 123_456_789}
    assert "icount" in S.Snapshot(0, 0, "1", "n", icount=0).info()


@pytest.mark.parametrize("field, value, message", [
    (36, struct.pack(">I", 1025), "Too much extra metadata in snapshot table entry 0"),
])
def test_read_errors(tmp_path: Path, field: int, value: bytes, message: str) -> None:
    data = bytearray(qemu_image(tmp_path, "write 0 4k", snapshots=("one",)))
    table = struct.unpack_from(">Q", data, 64)[0]
    data[table + field:table + field + len(value)] = value
    with pytest.raises(Qcow2OpenError) as err:
        open_image(bytes(data), read_only=True)
    assert err.value.desc == message


# --- taking and deleting ----------------------------------------------------------------

def test_create_write_delete_keeps_image_clean(tmp_path: Path) -> None:
    data = qemu_image(tmp_path, "write -P 0x11 0 256k", "write -c -P 0x22 512k 64k",
                      "write -z 768k 64k")
    storage, image = open_image(data)

    async def steps():
        first = await S.create_snapshot(image, "a")
        assert first.id_str == "1" and image.header.nb_snapshots == 1
        # Everything is shared now: no entry may keep OFLAG_COPIED.
        assert not any(e & C.OFLAG_COPIED for e in image.l1 if e)
        await image.write(4096, b"\x33" * 4096)
        await image.flush()
        return first
    asyncio.run(steps())
    assert check(tmp_path, bytes(storage.data)).returncode == 0
    assert snapshot_names(tmp_path, bytes(storage.data)) == ["a"]
    # The snapshot still reads the old data.
    out = tmp_path / "snap.raw"
    (tmp_path / "out.qcow2").write_bytes(bytes(storage.data))
    subprocess.run(["qemu-img", "convert", "-l", "a", "-O", "raw", "out.qcow2", out.name],
                   cwd=tmp_path, check=True)
    assert out.read_bytes()[4096:8192] == b"\x11" * 4096

    async def delete():
        await S.delete_snapshot(image, None, "a")
        await image.flush()
    asyncio.run(delete())
    assert check(tmp_path, bytes(storage.data)).returncode == 0
    assert snapshot_names(tmp_path, bytes(storage.data)) == []
    # With the snapshot gone, the active tables own their clusters again.
    assert all(e & C.OFLAG_COPIED for e in image.l1 if e)


def test_refcount_overflow_fails_like_qemu(tmp_path: Path) -> None:
    storage, image = open_image(qemu_image(tmp_path, "write 0 64k",
                                           options=("-o", "refcount_bits=1")))
    with pytest.raises(OSError) as err:
        asyncio.run(S.create_snapshot(image, "a"))
    assert err.value.errno == 22
    asyncio.run(image.flush())
    result = check(tmp_path, bytes(storage.data))
    # QEMU leaks the snapshot's L1 table the same way.
    assert result.returncode == 3 and "1 leaked clusters" in result.stdout


def test_delete_refuses_a_misaligned_snapshot_l1(tmp_path: Path) -> None:
    data = bytearray(qemu_image(tmp_path, "write 0 4k", snapshots=("one",)))
    table = struct.unpack_from(">Q", data, 64)[0]
    data[table:table + 8] = struct.pack(">Q", 0x10200)
    _, image = open_image(bytes(data))
    with pytest.raises(S.SnapshotError) as err:
        asyncio.run(S.delete_snapshot(image, "1", None))
    assert err.value.desc == "Snapshot L1 table offset invalid"


# --- corruption -------------------------------------------------------------------------

def test_overlapping_write_marks_the_image_corrupt(tmp_path: Path) -> None:
    data = bytearray(qemu_image(tmp_path, "write -P 0x11 0 64k"))
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & C.L1E_OFFSET_MASK
    reftable = struct.unpack_from(">Q", data, 48)[0]
    data[l2:l2 + 8] = struct.pack(">Q", reftable | C.OFLAG_COPIED)
    storage, image = open_image(bytes(data))
    events = []
    image.corruption_listener = lambda *args: events.append(args)
    before = bytes(storage.data[reftable:reftable + 65536])
    with pytest.raises(OSError) as err:
        asyncio.run(image.write(0, b"x" * 512))
    assert err.value.errno == 5
    assert events == [(True, reftable, 512, "Preventing invalid write on metadata "
                                            "(overlaps with refcount table)")]
    assert bytes(storage.data[reftable:reftable + 65536]) == before
    incompatible = struct.unpack_from(">Q", storage.data, 72)[0]
    assert incompatible & C.INCOMPAT_CORRUPT
    with pytest.raises(OSError) as err:
        asyncio.run(image.read(0, 512))
    assert err.value.errno == 123          # ENOMEDIUM: the node has no driver any more
    assert len(events) == 1


def test_read_only_corruption_is_not_fatal(tmp_path: Path) -> None:
    data = bytearray(qemu_image(tmp_path, "write -P 0x11 0 64k"))
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & C.L1E_OFFSET_MASK
    data[l2 + 6] |= 0x02                    # bit 9: the cluster offset is misaligned
    storage, image = open_image(bytes(data), read_only=True)
    events = []
    image.corruption_listener = lambda *args: events.append(args)
    for _ in range(2):
        with pytest.raises(OSError):
            asyncio.run(image.read(0, 512))
    assert asyncio.run(image.read(65536, 512)) == bytes(512)
    assert [e[0] for e in events] == [False]
    assert events[0][3].startswith("Cluster allocation offset 0x")
    assert bytes(storage.data) == bytes(data)
