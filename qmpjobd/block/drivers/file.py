"""``file``: a host file (or block device) as a protocol node.

Options (QAPI BlockdevOptionsFile): ``filename`` (required), ``read-only``; ``aio``,
``aio-max-batch``, ``locking``, ``drop-cache``, ``x-check-cache-dropped`` are accepted
and do not change behaviour here; ``pr-manager`` is refused.

All I/O runs in the event loop's default thread pool (``run_in_executor``), so the
loop never blocks on the disk; each request yields the pool's future to the job
engine. Like QEMU, the node's length is the host length rounded up to 512 bytes:
reads past the host end return zeroes, and a write to that tail extends the file.
"""

from __future__ import annotations

import asyncio
import errno
import os

from qmpjobd.block.node import BlockNode, io_error
from qmpjobd.errors import QMPError

SECTOR = 512


class FileNode(BlockNode):
    driver = "file"
    strong_options = ("filename",)

    def open(self) -> None:
        if "pr-manager" in self.options:
            raise QMPError("Option 'pr-manager' is not supported by qmpjobd")
        self.path: str = self.options["filename"]
        flags = os.O_RDONLY if self.read_only else os.O_RDWR
        try:
            self.fd: int | None = os.open(self.path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise QMPError(f"Could not open '{self.path}': {os.strerror(exc.errno)}") from None
        host_length = os.lseek(self.fd, 0, os.SEEK_END)
        self.size = -(-host_length // SECTOR) * SECTOR

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _require_fd(self) -> int:
        if self.fd is None:
            raise io_error(errno.EBADF)
        return self.fd

    async def _preadv(self, offset: int, length: int) -> bytes:
        fd = self._require_fd()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, read_fully, fd, offset, length)

    async def _pwritev(self, offset: int, data: bytes) -> None:
        fd = self._require_fd()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, write_fully, fd, offset, data)

    async def _pdiscard(self, offset: int, length: int) -> None:
        # Zeroes written, not a punched hole: the range reads back the same.
        await self._pwritev(offset, bytes(min(length, max(0, self.size - offset))))

    async def _flush(self) -> None:
        fd = self._require_fd()
        if not self.read_only:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, os.fdatasync, fd)

    def block_status(self, offset: int, length: int) -> tuple[str, int]:
        """Data or hole, from the host file's SEEK_DATA/SEEK_HOLE map."""
        fd = self._require_fd()
        try:
            data_start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:      # no data at or after offset
                return ("zero", length)
            return ("data", length)           # no hole map: treat as data
        if data_start > offset:
            return ("zero", min(data_start - offset, length))
        hole_start = os.lseek(fd, offset, os.SEEK_HOLE)
        return ("data", max(1, min(hole_start - offset, length)))

    def supports_unmap(self) -> bool:
        return True

    def can_write_zeroes_with_unmap(self) -> bool:
        return self.discard_unmap

    def host_file(self) -> tuple[int, int] | None:
        return (self._require_fd(), 0)

    def exact_filename(self) -> str | None:
        return self.path

    def actual_size(self) -> int | None:
        try:
            return os.fstat(self._require_fd()).st_blocks * 512
        except OSError:
            return None

    def has_dirty_flag(self) -> bool:
        return True


def read_fully(fd: int, offset: int, length: int) -> bytes:
    """pread until ``length`` bytes or end of file (short reads are legal)."""
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


def write_fully(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]
