"""CheckedCopy: copy-on-read's zero-or-data decision in the pool (a probe of each
granule's first bytes, a whole read only when they are zeroes), then the kernel
copy, between real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qmpjobd.block.formats.qcow2.storage import ZERO_PROBE_BYTES, CheckedCopy

KiB = 1 << 10
GRANULE = 512 * KiB


@pytest.fixture
def files(tmp_path: Path):
    """files(source bytes) -> (source fd, empty target fd), closed afterwards."""
    opened: list[int] = []

    def make(source: bytes) -> tuple[int, int]:
        (tmp_path / "src").write_bytes(source)
        (tmp_path / "dst").write_bytes(b"")
        opened.extend((os.open(tmp_path / "src", os.O_RDONLY),
                       os.open(tmp_path / "dst", os.O_RDWR)))
        return opened[-2], opened[-1]
    yield make
    for fd in opened:
        os.close(fd)


def data_after_zeroes(length: int, zeroes: int) -> bytes:
    return bytes(zeroes) + b"\x5a" * (length - zeroes)


@pytest.mark.parametrize("zeroes", [0, 1, ZERO_PROBE_BYTES, 300 * KiB, GRANULE - 1])
def test_a_granule_with_any_data_byte_is_copied_whole(files, zeroes: int) -> None:
    source = data_after_zeroes(GRANULE, zeroes)
    src, dst = files(source)
    kept = []
    copy = CheckedCopy([(src, 0, GRANULE)], GRANULE, on_kept=lambda: kept.append(1))
    copy.copy_to(dst, 64 * KiB)
    assert not copy.zero and not copy.mixed
    assert kept == [1]
    assert os.pread(dst, GRANULE + 1, 64 * KiB) == source


def test_all_zero_bytes_write_nothing(files) -> None:
    src, dst = files(bytes(2 * GRANULE))
    kept = []
    copy = CheckedCopy([(src, 0, 2 * GRANULE)], GRANULE, on_kept=lambda: kept.append(1))
    copy.copy_to(dst, 0)
    assert copy.zero and not copy.mixed and kept == []
    assert os.fstat(dst).st_size == 0


@pytest.mark.parametrize("second_zeroes", [GRANULE, 0])
def test_granules_that_differ_are_mixed_and_nothing_is_written(files,
                                                               second_zeroes: int) -> None:
    first = bytes(GRANULE) if second_zeroes == 0 else data_after_zeroes(GRANULE, 100 * KiB)
    second = data_after_zeroes(GRANULE, second_zeroes) if second_zeroes < GRANULE \
        else bytes(GRANULE)
    src, dst = files(first + second)
    copy = CheckedCopy([(src, 0, 2 * GRANULE)], GRANULE, on_kept=lambda: pytest.fail("kept"))
    copy.copy_to(dst, 0)
    assert copy.mixed
    assert os.fstat(dst).st_size == 0


def test_pieces_and_a_short_source_copy_in_order_with_zeroes_past_its_end(files) -> None:
    source = data_after_zeroes(96 * KiB, 8 * KiB)
    src, dst = files(source)
    # Two pieces in the target's order, not the source's; no granule: the
    # decision covers the whole payload. Then one running 32 KiB past the end.
    copy = CheckedCopy([(src, 64 * KiB, 32 * KiB), (src, 0, 64 * KiB)], 0)
    copy.copy_to(dst, 0)
    assert not copy.zero
    assert os.pread(dst, 1 << 20, 0) == source[64 * KiB:] + source[:64 * KiB]
    tail = CheckedCopy([(src, 80 * KiB, 48 * KiB)], 0)
    tail.copy_to(dst, 256 * KiB)
    assert os.pread(dst, 1 << 20, 256 * KiB) == source[80 * KiB:] + bytes(32 * KiB)
