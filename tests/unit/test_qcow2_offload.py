"""The copy offload's pieces: HostCopy slicing and the exact kernel copy."""

from __future__ import annotations

import os

from qmpjobd.block.formats.qcow2.storage import HostCopy
from qmpjobd.block.offload import kernel_copy_exact


def test_slicing_spans_pieces_like_the_bytes_would(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 4)
    fd = os.open(src, os.O_RDONLY)
    try:
        copy = HostCopy([(fd, 0, 100), (fd, 500, 200), (fd, 900, 50)])
        whole = copy.read()
        assert len(copy) == 350
        for start, stop in [(0, 350), (50, 150), (100, 300), (299, 350), (10, 20)]:
            part = copy[start:stop]
            assert len(part) == stop - start
            assert part.read() == whole[start:stop]
    finally:
        os.close(fd)


def test_copy_to_writes_exact_length_and_zeroes_past_source_end(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"a" * 3000)
    dst.write_bytes(b"x" * 8192)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR)
    try:
        HostCopy([(sfd, 1000, 1000), (sfd, 2500, 1500)]).copy_to(dfd, 4096)
    finally:
        os.close(sfd)
        os.close(dfd)
    data = dst.read_bytes()
    assert data[:4096] == b"x" * 4096
    assert data[4096:5096] == b"a" * 1000
    # The second piece has 500 bytes of source, then the file ends: zeroes.
    assert data[5096:5596] == b"a" * 500
    assert data[5596:6596] == bytes(1000)
    assert data[6596:] == b"x" * (8192 - 6596)


def test_kernel_copy_exact_pads_past_the_source_end(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"q" * 100)
    dst.write_bytes(b"")
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR)
    try:
        kernel_copy_exact(sfd, 10, dfd, 0, 200)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert dst.read_bytes() == b"q" * 90 + bytes(110)
