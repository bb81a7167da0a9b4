"""Where a qcow2 image's bytes live: the protocol child, seen as async byte storage.

The format code only needs positioned reads and writes (writes may extend the
file, as QEMU lets a format driver write past its file's end), a flush, the host
length and a truncate. :class:`NodeStorage` maps them onto a block node (a ``file``
node does its I/O in the thread pool); :class:`MemoryStorage` keeps the bytes in
memory, for unit tests and for building images.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.node import BlockNode


class Storage(Protocol):
    async def pread(self, offset: int, length: int) -> bytes: ...
    async def pwrite(self, offset: int, data: bytes) -> None: ...
    async def flush(self) -> None: ...
    def length(self) -> int: ...
    async def truncate(self, length: int, preallocation: str = "off") -> None: ...
    async def discard(self, offset: int, length: int) -> None: ...
    def debug_event(self, event: str) -> None: ...


class MemoryStorage:
    """A growable bytearray with the Storage interface (reads past the end: zeroes)."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)
        self.flushes = 0

    async def pread(self, offset: int, length: int) -> bytes:
        chunk = bytes(self.data[offset:offset + length])
        return chunk + bytes(length - len(chunk))

    async def pwrite(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    async def flush(self) -> None:
        self.flushes += 1

    def debug_event(self, event: str) -> None:
        """No blkdebug node to tell."""

    def length(self) -> int:
        return len(self.data)

    async def discard(self, offset: int, length: int) -> None:
        """Freed clusters handed back: they read as zeroes (as a file's do)."""
        end = min(offset + length, len(self.data))
        if end > offset:
            self.data[offset:end] = bytes(end - offset)

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        if length < len(self.data):
            del self.data[length:]
        else:
            self.data.extend(bytes(length - len(self.data)))


class NodeStorage:
    """A block node (the qcow2 node's ``file`` child) as Storage."""

    def __init__(self, node: "BlockNode") -> None:
        self.node = node

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.node.co_pread(offset, length)

    async def pwrite(self, offset: int, data: bytes) -> None:
        self.node.extend_for_write(offset + len(data))
        await self.node.co_pwrite(offset, data)

    async def flush(self) -> None:
        await self.node.co_flush()

    def debug_event(self, event: str) -> None:
        """QEMU's BLKDBG_EVENT on the qcow2 node's file child: a blkdebug node
        there switches its active rules on the events it was given."""
        self.node.debug_event(event)

    async def discard(self, offset: int, length: int) -> None:
        """Discard freed clusters on the file when it takes discards: opened with
        discard=unmap, or opened inline under the qcow2 node without a discard
        option (QEMU's children inherit "unmap" by default)."""
        if self.node.discard_unmap:
            end = min(offset + length, self.node.size)
            if end > offset:
                await self.node._pdiscard(offset, end - offset)

    async def copy_in(self, offset: int, copy: "HostCopy") -> None:
        """Write ``copy``'s host ranges at ``offset``: the kernel copies them when
        this node is a host file region, else the bytes go through pwrite."""
        host = self.node.host_file()
        loop = asyncio.get_running_loop()
        if host is None or self.node.read_only:
            data = await loop.run_in_executor(None, copy.read)
            if isinstance(copy, CheckedCopy) and is_zero(data):
                copy.zero = True
                return
            await self.pwrite(offset, data)
            return
        self.node.extend_for_write(offset + len(copy))
        fd, base = host
        # The write passes the file node (and any raw below) without its co_pwrite.
        self.node.chain_write_started(offset, len(copy))
        try:
            await loop.run_in_executor(None, copy.copy_to, fd, base + offset)
        finally:
            self.node.chain_write_finished(offset, len(copy))
        self.node.write_generation += 1

    def length(self) -> int:
        host = self.node.host_file()
        if host is not None and self.node.file_child is None:
            return os.fstat(host[0]).st_size
        return self.node.size

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        """Set the host file's length (growing with ``falloc``/``full`` allocates).

        Only plain host files can change length; elsewhere growing is a no-op
        (reads past the end are zeroes anyway) and shrinking is refused.
        """
        host = self.node.host_file()
        if host is None or self.node.file_child is not None:
            if length < self.node.size:
                raise OSError(95, os.strerror(95))
            return
        fd = host[0]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, resize_host_file, fd, length, preallocation)
        self.node.size = -(-length // 512) * 512


def resize_host_file(fd: int, length: int, preallocation: str) -> None:
    """Grow or shrink a host file; new bytes allocated for falloc, written for full."""
    old = os.fstat(fd).st_size
    if length <= old or preallocation == "off" or preallocation == "metadata":
        os.ftruncate(fd, length)
        return
    if preallocation == "falloc":
        os.posix_fallocate(fd, old, length - old)
        return
    os.ftruncate(fd, length)
    chunk = bytes(1 << 20)
    offset = old
    while offset < length:
        offset += os.pwrite(fd, chunk[:min(len(chunk), length - offset)], offset)


class HostCopy:
    """Write payload that is not bytes: ranges of host files, copied by the kernel.

    The qcow2 write path takes it where it takes guest data (``len`` and slicing
    are all it needs), so a copy offload allocates and links clusters exactly
    as a write of the same bytes would; only the data step differs
    (:meth:`NodeStorage.copy_in`). ``pieces`` are ``(fd, offset, length)``.
    """

    def __init__(self, pieces: list[tuple[int, int, int]]) -> None:
        self.pieces = pieces
        self.length = sum(length for _, _, length in pieces)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, span: slice) -> "HostCopy":
        start, stop, _ = span.indices(self.length)
        taken: list[tuple[int, int, int]] = []
        pos = 0
        for fd, offset, length in self.pieces:
            lo, hi = max(start, pos), min(stop, pos + length)
            if lo < hi:
                taken.append((fd, offset + lo - pos, hi - lo))
            pos += length
        return HostCopy(taken)

    def read(self) -> bytes:
        """The bytes (blocking; for the rare path that must merge them with others)."""
        parts = []
        for fd, offset, length in self.pieces:
            data = os.pread(fd, length, offset)
            parts.append(data + bytes(length - len(data)))
        return b"".join(parts)

    def copy_to(self, dst_fd: int, dst_offset: int) -> None:
        """Copy every piece to ``dst_fd`` from ``dst_offset`` on (blocking)."""
        from qmpjobd.block.offload import kernel_copy_exact

        for fd, offset, length in self.pieces:
            kernel_copy_exact(fd, offset, dst_fd, dst_offset, length)
            dst_offset += length


_ZEROES = bytes(1 << 20)


def is_zero(data: "bytes | bytearray | memoryview") -> bool:
    """QEMU's buffer_is_zero: memcmp against zeroes, which stops at the first
    byte that differs (counting zero bytes would read all of a data buffer)."""
    view = memoryview(data)
    step = len(_ZEROES)
    return all(_ZEROES.startswith(view[start:start + step])
               for start in range(0, len(view), step))


class MixedZeroes(Exception):
    """A CheckedCopy with granules found some of them zero and some not: nothing
    was written, the caller copies it granule by granule."""


class CheckedCopy(HostCopy):
    """A HostCopy written only if its bytes are not all zeroes (copy-on-read's
    rule, decided on the whole payload as QEMU decides on its bounce buffer).
    The check and the copy are one thread-pool task; ``zero`` tells
    afterwards that nothing was written. A part of it (a slice shorter than the
    whole) is an ordinary HostCopy: the decision is never made on a piece."""

    def __init__(self, pieces: list[tuple[int, int, int]], granule: int = 0,
                 on_kept: "Callable[[], None] | None" = None) -> None:
        super().__init__(pieces)
        self.zero = False
        # Called from the pool thread once the bytes are known to be written (not
        # zeroes): the clusters allocated for them stay allocated.
        self.on_kept = on_kept
        # With a granule, the decision is made per granule (each one a copy QEMU
        # would make on its own): all zero, none zero, or ``mixed``, in which case
        # nothing is written and the caller copies granule by granule.
        self.granule = granule
        self.mixed = False

    def __getitem__(self, span: slice) -> HostCopy:
        start, stop, _ = span.indices(self.length)
        if start == 0 and stop == self.length:
            return self
        return super().__getitem__(span)

    def copy_to(self, dst_fd: int, dst_offset: int) -> None:
        """Decide zero or data, then write (blocking); errors as the request paths
        raise them."""
        from qmpjobd.block.offload import kernel_copy_exact, one_writer

        units = self._units_zero()
        if any(units) and not all(units):
            self.mixed = True
            return
        self.zero = units[0]
        if self.zero:
            return
        if self.on_kept is not None:
            self.on_kept()
        with one_writer(dst_fd):
            for fd, offset, length in self.pieces:
                kernel_copy_exact(fd, offset, dst_fd, dst_offset, length, splice=True)
                dst_offset += length

    def _span(self, at: int, length: int) -> list[tuple[int, int, int]]:
        return HostCopy.__getitem__(self, slice(at, at + length)).pieces

    def _units_zero(self) -> list[bool]:
        """For each granule (or the whole payload without one): whether it reads
        as zeroes.

        A granule whose first bytes are not all zeroes is data (QEMU's
        buffer_is_zero says no at the first byte that differs): only those first
        bytes are read, and the kernel then copies the granule file to file
        without passing it through this process. Only a granule that starts with
        zeroes is read whole to decide."""
        unit = self.granule if self.granule and self.length > self.granule else self.length
        decisions = []
        for at in range(0, self.length, unit):
            size = min(unit, self.length - at)
            probe = min(size, ZERO_PROBE_BYTES)
            zero = is_zero(_read_into_buffer(self._span(at, probe)))
            if zero and size > probe:
                zero = is_zero(_read_into_buffer(self._span(at, size)))
            decisions.append(zero)
        return decisions


# How much of a copy-on-read granule is read to find it holds data: one page.
ZERO_PROBE_BYTES = 4096


def _read_into_buffer(pieces: list[tuple[int, int, int]]) -> memoryview:
    """The bytes of ``pieces`` in the pool thread's copy buffer when they fit, else
    in a new one; past a piece's file end, zeroes. Read errors come marked as
    reads."""
    from qmpjobd.block.offload import MAX_BOUNCE_BYTES, bounce_buffer, read_into

    total = sum(length for _, _, length in pieces)
    if total <= MAX_BOUNCE_BYTES:
        buffer = bounce_buffer(total)
    else:
        buffer = memoryview(bytearray(total))
    pos = 0
    for fd, offset, length in pieces:
        got = read_into(fd, buffer[pos:pos + length], offset)
        if got < length:
            buffer[pos + got:pos + length] = bytes(length - got)
        pos += length
    return buffer[:pos]
