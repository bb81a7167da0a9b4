"""Seeded mutations of qcow2 images: header and table bytes changed at random,
each image opened and driven by fuzz/fuzz_qcow2.py's ``exercise`` (no exception
but refusals and I/O errors, no write into the header cluster but the header's
own), and the read-only open's verdict compared
with qemu-img's (``qemu-img info`` opens the same way): both open it, or both
refuse it with the same text.

The mutations are deterministic (one random.Random per case number), so a
failing case number reproduces; the fuzzer proper is ``make fuzz``.
"""

from __future__ import annotations

import importlib.util
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CASES = 120


def _load_fuzzer():
    sys.path.insert(0, str(REPO / "fuzz"))
    spec = importlib.util.spec_from_file_location("fuzz_qcow2", REPO / "fuzz" / "fuzz_qcow2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzzer = _load_fuzzer()

# Texts of ours that QEMU has no counterpart for (features qmpjobd refuses).
OWN_REFUSALS = ("qmpjobd",)


def _qemu_img(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[bytes]:
    """Small images of several shapes, made by qemu-img."""
    directory = tmp_path_factory.mktemp("bases")
    images = []
    for name, options, io in [
            ("plain", ["-o", "cluster_size=4096"], ["write -P 0x11 0 20k", "write -z 64k 8k"]),
            ("snap", ["-o", "cluster_size=512"], ["write -P 0x22 0 3k"]),
            ("comp", [], ["write -c -P 0x33 0 64k", "write -P 0x44 128k 4k"]),
            ("v2back", ["-o", "compat=0.10,cluster_size=4096", "-b", "base.raw", "-F", "raw"],
             ["write -P 0x55 4k 4k"]),
            ("rc1", ["-o", "refcount_bits=1,cluster_size=4096"], ["write -P 0x66 0 8k"])]:
        if name == "v2back":
            (directory / "base.raw").write_bytes(bytes(256 * 1024))
        _qemu_img("create", "-f", "qcow2", *options, f"{name}.qcow2", "256k", cwd=directory)
        argv = ["qemu-io", "-f", "qcow2"]
        for command in io:
            argv += ["-c", command]
        subprocess.run(argv + [f"{name}.qcow2"], cwd=directory, check=True, capture_output=True)
        if name == "snap":
            _qemu_img("snapshot", "-c", "one", "snap.qcow2", cwd=directory)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x23 1k 2k", "snap.qcow2"],
                           cwd=directory, check=True, capture_output=True)
            _qemu_img("snapshot", "-c", "two", "snap.qcow2", cwd=directory)
        images.append((directory / f"{name}.qcow2").read_bytes())
    return images


INTERESTING = (0, 1, 0x200, 0x1000, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1,
               1 << 40, 0x30000, 0x20000)


def _table_spans(data: bytes) -> list[tuple[int, int]]:
    """Where the header says its tables are (clamped to the file)."""
    bits = struct.unpack_from(">I", data, 20)[0]
    cluster = 1 << bits
    l1_size, l1 = struct.unpack_from(">IQ", data, 36)
    reftable, reftable_clusters, nb_snap, snaps = struct.unpack_from(">QIIQ", data, 48)
    spans = [(0, min(len(data), 512)), (l1, l1_size * 8), (reftable, reftable_clusters * cluster),
             (snaps, 256)]
    for index in range(min(l1_size, 4)):
        entry = struct.unpack_from(">Q", data, l1 + index * 8)[0] & 0x00FFFFFFFFFFFE00
        if entry:
            spans.append((entry, cluster))
    first_block = struct.unpack_from(">Q", data, reftable)[0] & ~0x1FF
    if first_block:
        spans.append((first_block, cluster))
    return [(start, length) for start, length in spans if 0 <= start < len(data) and length > 0]


def mutate(base: bytes, rng: random.Random) -> bytes:
    data = bytearray(base)
    spans = _table_spans(base)
    for _ in range(rng.randint(1, 3)):
        start, length = rng.choice(spans)
        length = min(length, len(data) - start)
        if rng.random() < 0.5 and length >= 8:
            at = start + rng.randrange(length // 8) * 8
            value = rng.choice(INTERESTING) if rng.random() < 0.6 else rng.getrandbits(64)
            if rng.random() < 0.3:
                value |= struct.unpack_from(">Q", data, at)[0]
            data[at:at + 8] = struct.pack(">Q", value & ((1 << 64) - 1))
        else:
            at = start + rng.randrange(length)
            data[at] = rng.randrange(256)
    if rng.random() < 0.1:
        del data[rng.randrange(len(data)):]         # a truncated file
    return bytes(data)


def qemu_verdict(path: Path) -> str:
    done = _qemu_img("info", "-U", path.name, cwd=path.parent)
    if done.returncode == 0:
        return "ok"
    prefix = f"qemu-img: Could not open '{path.name}': "
    first = done.stderr.strip().splitlines()[0] if done.stderr.strip() else ""
    return first[len(prefix):] if first.startswith(prefix) else first


@pytest.mark.parametrize("chunk", range(8))
def test_mutated_images(tmp_path: Path, bases: list[bytes], chunk: int) -> None:
    mismatches = []
    for case in range(chunk, CASES, 8):
        rng = random.Random(case)
        data = mutate(bases[case % len(bases)], rng)
        verdict = fuzzer.exercise(data, case)
        path = tmp_path / f"m{case}.qcow2"
        path.write_bytes(data)
        if case % len(bases) == 3:
            (tmp_path / "base.raw").write_bytes(bytes(256 * 1024))
        theirs = qemu_verdict(path)
        if any(own in verdict for own in OWN_REFUSALS):
            continue
        if (verdict == "ok") != (theirs == "ok") or (verdict != "ok" and verdict != theirs):
            mismatches.append((case, verdict, theirs))
    assert not mismatches, mismatches


def test_exercise_finds_a_broken_property() -> None:
    """The harness can fail: a storage that reports a header-cluster write is a bug."""
    storage = fuzzer.SparseStorage(b"", 65536)
    import asyncio
    asyncio.run(storage.pwrite(100, b"x"))
    assert storage.bad_writes == [(100, 1)]
    with pytest.raises(fuzzer.Bug):
        asyncio.run(storage.pwrite(-1, b"x"))


@pytest.mark.parametrize("chunk", range(4))
def test_mutated_dirty_images_repair_without_crashing(bases: list[bytes], chunk: int) -> None:
    """The same mutations on images with the dirty bit set (a version 3 header):
    the read-write open runs the repair (formats/qcow2/repair.py) over the damaged
    tables, which must end in the repaired image or a refusal, never in another
    exception or a write into the header cluster (``exercise`` checks both)."""
    for case in range(chunk, CASES, 4):
        rng = random.Random(1000 + case)
        base = bases[case % len(bases)]
        if struct.unpack_from(">I", base, 4)[0] < 3:
            continue
        data = bytearray(mutate(base, rng))
        if len(data) >= 80:
            data[79] |= 1
        fuzzer.exercise(bytes(data), case)
