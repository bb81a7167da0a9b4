"""The copy offload's pieces: HostCopy slicing, the exact copy between host files,
and the choice between copy_file_range and the bounce buffer."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Iterator

from qmpjobd.block import offload
from qmpjobd.block.formats.qcow2.storage import HostCopy
from qmpjobd.block.offload import kernel_copy_exact


@contextmanager
def file_pair(tmp_path, source: bytes, target: bytes) -> Iterator[tuple[int, int, object]]:
    """``src`` and ``dst`` written with these bytes, open read-only and read-write:
    (source fd, target fd, target path); both closed afterwards."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(source)
    dst.write_bytes(target)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR)
    try:
        yield sfd, dfd, dst
    finally:
        os.close(sfd)
        os.close(dfd)


def test_slicing_spans_pieces_like_the_bytes_would(tmp_path):
    with file_pair(tmp_path, bytes(range(256)) * 4, b"") as (fd, _, _):
        copy = HostCopy([(fd, 0, 100), (fd, 500, 200), (fd, 900, 50)])
        whole = copy.read()
        assert len(copy) == 350
        for start, stop in [(0, 350), (50, 150), (100, 300), (299, 350), (10, 20)]:
            part = copy[start:stop]
            assert len(part) == stop - start
            assert part.read() == whole[start:stop]


def test_copy_to_writes_exact_length_and_zeroes_past_source_end(tmp_path):
    with file_pair(tmp_path, b"a" * 3000, b"x" * 8192) as (sfd, dfd, dst):
        HostCopy([(sfd, 1000, 1000), (sfd, 2500, 1500)]).copy_to(dfd, 4096)
    data = dst.read_bytes()
    assert data[:4096] == b"x" * 4096
    assert data[4096:5096] == b"a" * 1000
    # The second piece has 500 bytes of source, then the file ends: zeroes.
    assert data[5096:5596] == b"a" * 500
    assert data[5596:6596] == bytes(1000)
    assert data[6596:] == b"x" * (8192 - 6596)


def test_kernel_copy_exact_pads_past_the_source_end(tmp_path):
    with file_pair(tmp_path, b"q" * 100, b"") as (sfd, dfd, dst):
        kernel_copy_exact(sfd, 10, dfd, 0, 200)
    assert dst.read_bytes() == b"q" * 90 + bytes(110)


def _copy_between(tmp_path, shares: bool, monkeypatch) -> None:
    """host_copy of 3 MiB + a tail, with the filesystem's answer to the clone probe
    forced: the result must be the same bytes either way."""
    calls: list[str] = []

    def fake_ioctl(fd, request, arg):
        calls.append("probe")
        raise OSError(errno.EINVAL if shares else errno.EOPNOTSUPP, "probe")

    def counting_cfr(*args):
        calls.append("copy_file_range")
        return real_cfr(*args)

    real_cfr = os.copy_file_range
    monkeypatch.setattr(offload.fcntl, "ioctl", fake_ioctl)
    monkeypatch.setattr(offload.os, "copy_file_range", counting_cfr)
    monkeypatch.setattr(offload, "_SHARING", {})
    monkeypatch.setattr(offload, "_SHARING_BY_FDS", {})
    payload = os.urandom(3 * (1 << 20) + 1234)
    with file_pair(tmp_path, payload, b"") as (sfd, dfd, dst):
        assert offload.host_copy(sfd, 100, dfd, 7, len(payload)) == len(payload) - 100
        assert offload.host_copy(sfd, 0, dfd, 0, 7) == 7
    # One probe per pair of devices; copy_file_range only where extents are shared.
    assert calls.count("probe") == 1
    assert ("copy_file_range" in calls) == shares
    assert dst.read_bytes() == payload[:7] + payload[100:]
    # Later copies between the same descriptors ask nothing of the kernel.
    with file_pair(tmp_path, payload, b"") as (sfd, dfd, dst):
        fstats = []
        real_fstat = os.fstat
        monkeypatch.setattr(offload.os, "fstat", lambda fd: fstats.append(fd) or real_fstat(fd))
        offload.host_copy(sfd, 0, dfd, 0, 7)
        monkeypatch.setattr(offload.os, "fstat", real_fstat)
    assert fstats == [] and calls.count("probe") == 1


def test_host_copy_uses_a_bounce_buffer_where_extents_are_not_shared(tmp_path, monkeypatch):
    _copy_between(tmp_path, shares=False, monkeypatch=monkeypatch)


def test_host_copy_uses_copy_file_range_where_extents_are_shared(tmp_path, monkeypatch):
    _copy_between(tmp_path, shares=True, monkeypatch=monkeypatch)


def test_the_clone_probe_changes_nothing(tmp_path, monkeypatch):
    """The real probe on this filesystem: the target keeps its bytes and length."""
    monkeypatch.setattr(offload, "_SHARING", {})
    monkeypatch.setattr(offload, "_SHARING_BY_FDS", {})
    with file_pair(tmp_path, b"s" * 70000, b"d" * 5000) as (sfd, dfd, dst):
        assert offload._shares_extents(sfd, dfd) in (True, False)
    assert dst.read_bytes() == b"d" * 5000
