"""cache.direct=on: the O_DIRECT alignments are probed as QEMU probes them."""

from __future__ import annotations

import os
import tempfile

import pytest

from qmpjobd.block.drivers.file import probe_direct_alignment


def test_alignments_on_a_regular_file(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    request, memory = probe_direct_alignment(str(path))
    # Powers of two between a sector and a page, whatever the file system.
    assert request in (512, 1024, 2048, 4096)
    assert memory in (512, 1024, 2048, 4096)
    # The answer is the kernel's: a smaller O_DIRECT read than it must fail.
    if request > 512:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            buffer = mmap.mmap(-1, 4096)
            with pytest.raises(OSError):
                os.preadv(fd, [memoryview(buffer)[:request // 2]], 0)
        finally:
            os.close(fd)


def test_a_file_system_without_o_direct_refuses_the_open(tmp_path):
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    with tempfile.NamedTemporaryFile(dir=shm) as handle:
        try:
            fd = os.open(handle.name, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            with pytest.raises(OSError):
                probe_direct_alignment(handle.name)
        else:
            os.close(fd)     # a tmpfs that takes O_DIRECT (Linux 6.6+): nothing to refuse
            assert probe_direct_alignment(handle.name)[0] >= 512
