"""The repair of qcow2 images left with the dirty bit (formats/qcow2/repair.py).

The images are made dirty with the real tools: ``qemu-io ... -c abort`` on an image
with lazy refcounts leaves its L2 entries on the disk but not the refcounts of the
new clusters (refcount 0 for clusters in use: a rebuild), and ``qemu-io -f raw``
edits refcounts and the header bit for leaks and refcounts too low. QEMU's own
repair of the same bytes (``qemu-img check -r all`` runs the check an open runs)
is the reference: qmpjobd's repaired image must be byte for byte the same, and
``qemu-img check`` must find nothing left. A kill at any write of the repair must
leave an image the next writable open repairs, with the guest data intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from qmpjobd.block.formats.qcow2 import constants as C
from qmpjobd.block.formats.qcow2.image import Qcow2Image
from qmpjobd.block.formats.qcow2.repair import FIX_LEAKS, check_refcounts
from qmpjobd.block.formats.qcow2.storage import MemoryStorage

# make test installs qemu-utils: a missing tool is a failure, not a skip.
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert QEMU_IMG is not None and QEMU_IO is not None
    program = QEMU_IMG if args[0] == "img" else QEMU_IO
    return subprocess.run([program, *args[1:]], cwd=cwd, capture_output=True, text=True)


# How each image is made dirty (commands run in order; "img"/"io" pick the tool).
RECIPES = {
    # Written with lazy refcounts, then abort(): the data clusters' refcounts are 0.
    "crash": [
        ("img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "t.qcow2", "16M"),
        ("io", "-c", "write -q -P 0x11 0 192k", "-c", "write -q -P 0x22 1M 64k",
         "-c", "abort", "t.qcow2"),
    ],
    # 512-byte clusters: each refcount block covers 128 KiB, the rebuilt
    # structure needs many blocks and a table of several clusters.
    "crash-small-clusters": [
        ("img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=512",
         "t.qcow2", "8M"),
        ("io", "-c", "write -q -P 0x55 0 1M", "-c", "write -q -P 0x56 3M 512k",
         "-c", "abort", "t.qcow2"),
    ],
    # Compressed clusters, an internal snapshot and a persistent bitmap, then a
    # crash with new allocations and a discard.
    "crash-snapshot-bitmap": [
        ("img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "t.qcow2", "64M"),
        ("io", "-c", "write -q -c -P 0x61 0 256k", "-c", "write -q -P 0x62 1M 128k",
         "t.qcow2"),
        ("img", "snapshot", "-c", "s1", "t.qcow2"),
        ("img", "bitmap", "--add", "t.qcow2", "bm0"),
        ("io", "-c", "write -q -P 0x63 64k 64k", "-c", "write -q -P 0x64 40M 128k",
         "-c", "discard -q 1M 64k", "-c", "abort", "t.qcow2"),
    ],
    # A refcount too high (2 for a cluster used once): a leak, fixed in place.
    "leak": [
        ("img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "t.qcow2", "16M"),
        ("io", "-c", "write -q -P 0x33 0 128k", "t.qcow2"),
        ("io", "-f", "raw", "-c", "write -q -P 2 0x2000d 1", "-c", "write -q -P 1 79 1",
         "t.qcow2"),
    ],
    # A refcount too low (1 for a cluster a snapshot shares): an error, fixed in place.
    "refcount-too-low": [
        ("img", "create", "-q", "-f", "qcow2", "t.qcow2", "16M"),
        ("io", "-c", "write -q -P 0x44 0 128k", "t.qcow2"),
        ("img", "snapshot", "-c", "s1", "t.qcow2"),
        ("io", "-f", "raw", "-c", "write -q -P 1 0x2000b 1", "-c", "write -q -P 1 79 1",
         "t.qcow2"),
    ],
}


@pytest.fixture(scope="module")
def dirty_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, bytes]]:
    """name -> (the dirty image, what ``qemu-img check -r all`` makes of it)."""
    out = {}
    for name, steps in RECIPES.items():
        work = tmp_path_factory.mktemp(name)
        for step in steps:
            tool(*step, cwd=work)          # abort() makes qemu-io exit with a signal
        dirty = (work / "t.qcow2").read_bytes()
        assert dirty[79] & C.INCOMPAT_DIRTY, name
        report = qemu_check(work, "t.qcow2")
        assert report.get("corruptions", 0) + report.get("leaks", 0) > 0, name
        fixed = tool("img", "check", "-q", "-r", "all", "t.qcow2", cwd=work)
        assert fixed.returncode == 0, fixed.stderr
        out[name] = (dirty, (work / "t.qcow2").read_bytes())
    return out


def qemu_check(work: Path, name: str) -> dict:
    done = tool("img", "check", "-U", "--output=json", name, cwd=work)
    return json.loads(done.stdout)


def open_rw(data: bytes) -> tuple[MemoryStorage, str]:
    """Open ``data`` writable (the repair runs); the storage and what went to stderr."""
    storage = MemoryStorage(data)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        asyncio.run(Qcow2Image.open(storage, read_only=False))
    return storage, err.getvalue()


def guest_content(data: bytes) -> bytes:
    async def read() -> bytes:
        image = await Qcow2Image.open(MemoryStorage(data), read_only=True)
        return await image.read(0, image.size)
    return asyncio.run(read())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_repair_matches_qemu_byte_for_byte(name: str, dirty_images: dict,
                                           tmp_path: Path) -> None:
    dirty, reference = dirty_images[name]
    storage, _ = open_rw(dirty)
    repaired = bytes(storage.data)
    assert not repaired[79] & C.INCOMPAT_DIRTY
    assert repaired == reference
    (tmp_path / "r.qcow2").write_bytes(repaired)
    report = qemu_check(tmp_path, "r.qcow2")
    assert report.get("corruptions", 0) == report.get("leaks", 0) == 0, report
    assert guest_content(repaired) == guest_content(dirty)


def test_crash_repair_reports_as_qemu(dirty_images: dict) -> None:
    storage, err = open_rw(dirty_images["crash"][0])
    assert err.splitlines() == [
        "ERROR cluster 5 refcount=0 reference=1",
        "ERROR cluster 6 refcount=0 reference=1",
        "ERROR cluster 7 refcount=0 reference=1",
        "ERROR cluster 8 refcount=0 reference=1",
        "Rebuilding refcount structure",
        "Repairing cluster 1 refcount=1 reference=0",
        "Repairing cluster 2 refcount=1 reference=0",
    ]


def test_low_refcount_is_fixed_in_place(dirty_images: dict) -> None:
    dirty, _ = dirty_images["refcount-too-low"]
    storage, err = open_rw(dirty)
    assert err.splitlines() == ["ERROR cluster 5 refcount=1 reference=2",
                                "Repairing cluster 5 refcount=1 reference=2"]
    # In place: the refcount table did not move.
    assert storage.data[48:60] == dirty[48:60]


def test_leak_is_fixed_in_place(dirty_images: dict) -> None:
    storage, err = open_rw(dirty_images["leak"][0])
    assert err.splitlines() == ["Leaked cluster 6 refcount=2 reference=1",
                                "Repairing cluster 6 refcount=2 reference=1"]


def test_read_only_open_leaves_the_image_alone(dirty_images: dict) -> None:
    dirty, _ = dirty_images["crash"]
    storage = MemoryStorage(dirty)
    image = asyncio.run(Qcow2Image.open(storage, read_only=True))
    assert image.header.dirty
    assert bytes(storage.data) == dirty
    # A writable open asked not to repair (the node repairs after its set-up, and
    # not at all when it opens inactive) leaves it too.
    asyncio.run(Qcow2Image.open(storage, read_only=False, repair=False))
    assert bytes(storage.data) == dirty


def test_check_without_repair_counts_what_qemu_counts(dirty_images: dict) -> None:
    storage = MemoryStorage(dirty_images["crash"][0])
    image = asyncio.run(Qcow2Image.open(storage, read_only=True))
    with contextlib.redirect_stderr(io.StringIO()):
        res = asyncio.run(check_refcounts(image, 0))
    assert (res.corruptions, res.leaks, res.check_errors) == (4, 0, 0)


class _Recording(MemoryStorage):
    """Every write of the repair, in order, so a kill can be replayed after each."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.writes: list[tuple[int, bytes]] = []

    async def pwrite(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))
        await super().pwrite(offset, data)

    async def discard(self, offset: int, length: int) -> None:
        self.writes.append((offset, bytes(min(length, max(0, len(self.data) - offset)))))
        await super().discard(offset, length)


@pytest.mark.parametrize("name", ["crash", "crash-small-clusters", "refcount-too-low",
                                  "leak"])
def test_a_kill_during_the_repair_leaves_a_repairable_image(
        name: str, dirty_images: dict, tmp_path: Path) -> None:
    dirty, reference = dirty_images[name]
    recording = _Recording(dirty)
    with contextlib.redirect_stderr(io.StringIO()):
        asyncio.run(Qcow2Image.open(recording, read_only=False))
    content = guest_content(dirty)
    writes = recording.writes
    assert writes
    # Kill after each write (the last prefix is the finished repair).
    for count in range(len(writes) + 1):
        image = bytearray(dirty)
        for offset, data in writes[:count]:
            end = offset + len(data)
            if end > len(image):
                image.extend(bytes(end - len(image)))
            image[offset:end] = data
        killed = bytes(image)
        assert guest_content(killed) == content, count
        if not killed[79] & C.INCOMPAT_DIRTY:
            # The bit goes last: whatever has it cleared is consistent.
            assert count == len(writes), count
            (tmp_path / "k.qcow2").write_bytes(killed)
            report = qemu_check(tmp_path, "k.qcow2")
            assert report.get("corruptions", 0) == report.get("leaks", 0) == 0
            continue
        storage, _ = open_rw(killed)
        again = bytes(storage.data)
        assert not again[79] & C.INCOMPAT_DIRTY, count
        assert guest_content(again) == content, count
        (tmp_path / "k.qcow2").write_bytes(again)
        report = qemu_check(tmp_path, "k.qcow2")
        assert report.get("corruptions", 0) == report.get("leaks", 0) == 0, (count, report)


def test_a_check_that_cannot_finish_fails_the_open(dirty_images: dict) -> None:
    """A refcount table entry with reserved bits needs a rebuild, which a check
    that may only fix leaks cannot do: it stops with EIO, as QEMU's does."""
    dirty = bytearray(dirty_images["leak"][0])
    storage = MemoryStorage(bytes(dirty))
    image = asyncio.run(Qcow2Image.open(storage, read_only=True))
    image.reftable[0] |= 0x100
    with contextlib.redirect_stderr(io.StringIO()) as err, \
            pytest.raises(OSError):
        asyncio.run(check_refcounts(image, FIX_LEAKS))
    assert "ERROR need to rebuild refcount structures" in err.getvalue()



def test_unaligned_preallocated_entry_becomes_a_zero_cluster(tmp_path: Path) -> None:
    """An unaligned preallocated (zero) cluster entry is rewritten as a plain zero
    cluster, as QEMU's repair does (an unaligned data cluster stays an error)."""
    for step in [
            ("img", "create", "-q", "-f", "qcow2", "t.qcow2", "16M"),
            ("io", "-c", "write -q -P 0x33 0 128k", "-c", "write -q -z 0 64k", "t.qcow2"),
            ("io", "-f", "raw", "-c", "write -q -P 2 0x40006 1", "-c", "write -q -P 1 79 1",
             "t.qcow2")]:
        tool(*step, cwd=tmp_path)
    dirty = (tmp_path / "t.qcow2").read_bytes()
    assert dirty[0x40000:0x40008] == bytes.fromhex("8000000000050201")
    assert tool("img", "check", "-q", "-r", "all", "t.qcow2", cwd=tmp_path).returncode == 0
    storage, err = open_rw(dirty)
    assert "Repairing offset=50200: Preallocated cluster is not properly aligned; " \
           "L2 entry corrupted." in err.splitlines()
    assert bytes(storage.data) == (tmp_path / "t.qcow2").read_bytes()


def _graph_with_dirty_node(tmp_path: Path, dirty: bytes, monkeypatch: pytest.MonkeyPatch):
    from qmpjobd.block.graph import BlockGraph
    from qmpjobd.job.manager import JobManager
    (tmp_path / "d.qcow2").write_bytes(dirty)
    monkeypatch.chdir(tmp_path)
    graph = BlockGraph(jobs=JobManager(lambda name, data: None, clock=None))
    graph.add({"driver": "file", "node-name": "f", "filename": "d.qcow2"})
    graph.add({"driver": "qcow2", "node-name": "q", "file": "f", "read-only": True})
    return graph


@pytest.mark.parametrize("how", ["blockdev-reopen", "job reopen", "snapshot reopen"])
def test_a_reopen_to_read_write_repairs(how: str, dirty_images: dict, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only dirty node made writable is repaired before anything writes
    (QEMU does not repair there, and its writes reuse clusters in use: see the
    README's deliberate differences)."""
    dirty, reference = dirty_images["crash"]
    graph = _graph_with_dirty_node(tmp_path, dirty, monkeypatch)
    node = graph.find("q")
    assert node.image.header.dirty
    with contextlib.redirect_stderr(io.StringIO()) as err:
        if how == "blockdev-reopen":
            from qmpjobd.commands.graph_debug import reopen_nodes
            reopen_nodes(graph, [{"driver": "qcow2", "node-name": "q", "file": "f",
                                  "read-only": False}])
        elif how == "job reopen":
            from qmpjobd.commands.stream_commit import _reopen
            _reopen(node, False)
        else:
            from qmpjobd.commands.snapshot import set_read_only
            set_read_only(node, False)
    assert "Rebuilding refcount structure" in err.getvalue()
    assert not node.image.header.dirty and not node.read_only
    repaired = (tmp_path / "d.qcow2").read_bytes()
    report = qemu_check(tmp_path, "d.qcow2")
    assert report.get("corruptions", 0) == report.get("leaks", 0) == 0, report
    assert guest_content(repaired) == guest_content(dirty)
    # QEMU's layout; the freed old table and block keep their bytes (the file
    # node does not pass discards by default), qemu-img's check zeroes them.
    cs = 65536
    assert repaired[3 * cs:] == reference[3 * cs:] and repaired[:cs] == reference[:cs]
