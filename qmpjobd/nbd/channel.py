"""A client socket of the NBD server, driven by the event loop's reader and writer
callbacks instead of an asyncio transport.

Why not a transport: a read served from a plain file range goes to the socket
with ``os.sendfile`` (no copy through Python), and a transport owns its socket
(neither asyncio nor uvloop let anyone else write to it or watch it). So the
channel keeps its own ordered output queue of byte strings and file ranges,
writes straight away while the socket takes it, and finishes from a writer
callback when the socket is full. It tells its owner when the queue passes the
high-water mark and when it has drained below half of it, as a transport's
``pause_writing``/``resume_writing`` would.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections import deque
from typing import Callable, Union

RECV_SIZE = 256 * 1024
# A file range is sent in pieces of at most this much per sendfile call, so one
# big read does not hold the event loop while others wait.
SENDFILE_PIECE = 4 * 1024 * 1024


class FileRange:
    """``count`` bytes of file descriptor ``fd`` from ``offset``, to be sent as they are."""

    __slots__ = ("fd", "offset", "count")

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd = fd
        self.offset = offset
        self.count = count


Item = Union[memoryview, FileRange]


class SocketChannel:
    """One connected non-blocking socket: input to ``on_data``, ordered output."""

    def __init__(self, sock: socket.socket, *, on_data: Callable[[bytes], None],
                 on_eof: Callable[[], None], on_lost: Callable[[], None],
                 on_pause: Callable[[], None], on_resume: Callable[[], None],
                 high_water: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self._on_data = on_data
        self._on_eof = on_eof
        self._on_lost = on_lost
        self._on_pause = on_pause
        self._on_resume = on_resume
        self.high_water = high_water
        self._queue: deque[Item] = deque()
        self.buffered = 0
        self._paused = False
        self._reading = False
        self._writing = False
        self._closing = False
        self.closed = False

    # --- input -------------------------------------------------------------------------

    def resume_reading(self) -> None:
        if not self._reading and not self.closed and not self._closing:
            self.loop.add_reader(self.fd, self._readable)
            self._reading = True

    def pause_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def _readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if not data:
            self.pause_reading()
            self._on_eof()
            return
        self._on_data(data)

    # --- output ------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or self._closing or not data:
            return
        view = memoryview(data).cast("B")
        if not self._queue:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.abort()
                return
            if sent == len(view):
                return
            view = view[sent:]
        self._queue.append(view)
        self._grew(len(view))

    def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Queue ``count`` bytes of a file; the caller guarantees they exist."""
        if self.closed or self._closing or count <= 0:
            return
        item = FileRange(fd, offset, count)
        if not self._queue:
            try:
                if self._send_file(item):
                    return
            except OSError:
                self.abort()
                return
        self._queue.append(item)
        self._grew(item.count)

    def _send_file(self, item: FileRange) -> bool:
        """Send what the socket takes now; True once the range is all gone."""
        while item.count:
            try:
                sent = os.sendfile(self.fd, item.fd, item.offset, min(item.count, SENDFILE_PIECE))
            except (BlockingIOError, InterruptedError):
                return False
            if sent == 0:       # the file ended early (truncated under us)
                raise OSError(errno.EIO, "file range vanished")
            item.offset += sent
            item.count -= sent
        return True

    def _grew(self, size: int) -> None:
        self.buffered += size
        if not self._writing:
            self.loop.add_writer(self.fd, self._writable)
            self._writing = True
        if not self._paused and self.buffered > self.high_water:
            self._paused = True
            self._on_pause()

    def _writable(self) -> None:
        try:
            while self._queue:
                item = self._queue[0]
                if isinstance(item, FileRange):
                    before = item.count
                    done = self._send_file(item)
                    self.buffered -= before - item.count
                    if not done:
                        break
                else:
                    try:
                        sent = self.sock.send(item)
                    except (BlockingIOError, InterruptedError):
                        break
                    self.buffered -= sent
                    if sent < len(item):
                        self._queue[0] = item[sent:]
                        break
                self._queue.popleft()
        except OSError:
            self.abort()
            return
        if not self._queue:
            self.loop.remove_writer(self.fd)
            self._writing = False
            if self._closing:
                self._finish()
                return
        if self._paused and self.buffered <= self.high_water // 2:
            self._paused = False
            self._on_resume()

    # --- ending ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop reading; close once what is queued has gone out."""
        if self.closed or self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._queue:
            self._finish()

    def abort(self) -> None:
        """Close at once, dropping what is queued."""
        if self.closed:
            return
        self._queue.clear()
        self.buffered = 0
        self._finish()

    def _finish(self) -> None:
        self.pause_reading()
        if self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
        self.closed = True
        self.sock.close()
        self.loop.call_soon(self._on_lost)
