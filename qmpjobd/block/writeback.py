"""Early writeback: start writing a host file's dirty pages before the flush asks.

A job that writes a whole image leaves the kernel holding its data as dirty page
cache; the fdatasync that follows (a qcow2 cache flush, the flush before READY or
at completion) then has to write all of it while the job waits. Every
``WRITEBACK_CHUNK`` bytes written, this starts writeback of the span written
since the last start (``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE`` only: it
queues the pages for the disk and returns; it waits for nothing and promises
nothing), so the disk works while the job copies and the flush finds little left.

Durability is unchanged: only the flush guarantees anything, as before. The cost
is I/O the kernel would have done anyway (a file rewritten many times before a
flush is written back more often). QEMU does not do this; it is an intentional
difference in host I/O pattern that QMP cannot see.

Thread safety: the kick runs in the thread pool and must never touch a descriptor
that was closed (its number may belong to another file by then), so the node's
descriptor is only read and replaced under ``lock`` (``switch``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
from typing import Callable

# Written bytes between two writeback starts. Small enough that the disk starts
# early, large enough that the kick (a pool hand-off and a syscall) is rare.
WRITEBACK_CHUNK = 8 << 20

SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range, or None where there is none (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Queue the dirty pages of ``[offset, offset + length)`` for writing; False
    where the call is not available or the file does not take it."""
    if _sync_file_range is None:
        return False
    # ctypes releases the GIL for the call.
    return _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0


class EarlyWriteback:
    """The written span of one host file descriptor since writeback last started."""

    def __init__(self, fd: int | None) -> None:
        self.lock = threading.Lock()
        self.fd = fd
        self.enabled = _sync_file_range is not None
        self._pending = 0           # bytes written since the last start
        self._start = 0             # the span they lie in
        self._end = 0
        self._running = False       # one kick in the pool at a time

    def written(self, offset: int, length: int) -> None:
        """Count a data write that completed (event loop thread)."""
        if not self.enabled or length <= 0:
            return
        end = offset + length
        if self._pending:
            self._start = min(self._start, offset)
            self._end = max(self._end, end)
        else:
            self._start, self._end = offset, end
        self._pending += length
        if self._pending >= WRITEBACK_CHUNK and not self._running:
            self._kick()

    def flushed(self) -> None:
        """A flush is about to write everything: nothing is pending any more."""
        self._pending = 0

    def _kick(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return      # a write driven without an event loop (run_now): no pool
        start, length = self._start, self._end - self._start
        self._pending = 0
        self._running = True
        future = loop.run_in_executor(None, self._run, start, length)
        future.add_done_callback(self._done)

    def _run(self, start: int, length: int) -> bool:
        with self.lock:
            if self.fd is None:
                return True
            return start_writeback(self.fd, start, length)

    def _done(self, future: "asyncio.Future[bool]") -> None:
        self._running = False
        # A file system or descriptor that refuses the call keeps refusing it.
        if future.cancelled() or future.exception() is not None or not future.result():
            self.enabled = False

    def switch(self, fd: int | None) -> int | None:
        """Replace the descriptor (None on close); returns the old one, which no
        kick uses any more and the caller may close."""
        with self.lock:
            old, self.fd = self.fd, fd
        return old

