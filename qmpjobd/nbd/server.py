"""The NBD export server: sockets in front of ``qmpjobd.nbd.protocol``.

One :class:`NbdServer` per daemon (``nbd-server-start``), serving any number
of :class:`NbdExport` objects, each on one block node. A client is a
:class:`NbdClient` on a :class:`~qmpjobd.nbd.channel.SocketChannel`: its bytes
go to a ``ServerConnection``, whose events become output or node I/O.

Node I/O goes through the node's public entry points (``co_pread``,
``co_pwrite``, ``co_pdiscard``, ``co_flush``), so an NBD client's writes pass
the same write path as a job's (write thresholds, ``wr_highest_offset``,
dirty bitmaps). Those coroutines are made for the job engine, which steps
coroutines by hand (a driver may yield a bottom-half reschedule rather than a
future), so each request is run by a ``CoroutineRunner`` whose result is
handed to the asyncio side through a future.

Reads whose bytes lie in plain host files (a file node, raw on one, the normal
clusters of a qcow2 chain on files: ``status.file_pieces``) skip that path:
the reply header is queued and the file ranges follow through ``sendfile``,
for simple replies and structured data chunks alike. Block status (and the
holes of a structured read) comes from ``qmpjobd.block.status``.

As in QEMU, at most 16 requests of one client are in flight: further requests
wait, and reading stops until one finishes. Replies go out as soon as their
request finishes, so they may overtake each other.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Iterator, Sequence

from qmpjobd.errors import QMPError
from qmpjobd.job.coroutine import CoroutineRunner
from qmpjobd.nbd import protocol as nbd
from qmpjobd.block import status
from qmpjobd.nbd.channel import SocketChannel
from qmpjobd.nbd.protocol import Cmd, ExportView, ProtocolFeatures, Request
from qmpjobd.sockets import listen_first_free, resolve_inet, unlink_if_same

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.node import BlockNode

log = logging.getLogger("qmpjobd.nbd")

# Stop reading a client whose unsent replies pass this; resume below half.
HIGH_WATER = 64 * 1024 * 1024
# The socket send buffer of a client: room for a few large read replies in the
# kernel, so sendfile moves big pieces per wake-up (capped by net.core.wmem_max).
SEND_BUFFER = 4 * 1024 * 1024


def run_node_io(coro: Coroutine[Any, Any, Any]) -> asyncio.Future:
    """Run a node coroutine the way the job engine does, as an asyncio future."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    async def guarded() -> tuple[bool, Any]:
        try:
            return True, await coro
        except Exception as exc:  # handed to the awaiting request
            return False, exc

    def finished(runner: CoroutineRunner) -> None:
        if future.cancelled():
            return
        ok, value = runner.result
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    CoroutineRunner(guarded(), on_done=finished, name="nbd-request").enter()
    return future


def _errno_of(exc: BaseException) -> int:
    return exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO


class NbdExport:
    """One NBD export of a node (block-export-add type=nbd)."""

    def __init__(self, export_id: str, name: str, node: "BlockNode", *, writable: bool,
                 description: str | None, writethrough: bool, allocation_depth: bool,
                 bitmaps: Sequence[Any], multi_conn: bool) -> None:
        self.id = export_id
        self.name = name
        self.node = node
        self.writable = writable
        self.description = description
        self.writethrough = writethrough
        self.allocation_depth = allocation_depth
        # Exported dirty bitmaps (objects with ``name`` and ``extents()``): the hook
        # for qemu:dirty-bitmap:NAME contexts.
        self.bitmaps = list(bitmaps)
        # QEMU rounds the exported size down to whole sectors.
        self.size = node.size // 512 * 512
        self.flags = nbd.export_flags(writable=writable, multi_conn=multi_conn)
        # allow-inactive (10.0+): the node may be (or become) inactive; only READ
        # is served then.
        self.allow_inactive = False
        self.clients: list[NbdClient] = []
        self.shutting_down = False
        self.on_deleted: Callable[["NbdExport"], None] | None = None

    def set_multi_conn(self, multi_conn: bool) -> None:
        self.flags = nbd.export_flags(writable=self.writable, multi_conn=multi_conn)

    def view(self) -> ExportView:
        limits = self.node.block_limits()
        return ExportView(name=self.name, size=self.size, flags=self.flags,
                          description=self.description,
                          request_alignment=limits["request-alignment"],
                          allocation_depth=self.allocation_depth,
                          bitmaps=tuple(b.name for b in self.bitmaps))

    def shut_down(self) -> None:
        """Disconnect every client; the export is deleted once the last is gone."""
        self.shutting_down = True
        for client in list(self.clients):
            client.close()
        self._maybe_deleted()

    def detach(self, client: "NbdClient") -> None:
        if client in self.clients:
            self.clients.remove(client)
        self._maybe_deleted()

    def _maybe_deleted(self) -> None:
        if self.shutting_down and not self.clients and self.on_deleted is not None:
            callback, self.on_deleted = self.on_deleted, None
            callback(self)


class NbdServer:
    """The listening socket, its clients, and the exports they can reach."""

    def __init__(self, features: ProtocolFeatures, *, max_connections: int,
                 handshake_timeout_s: float) -> None:
        self.features = features
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.exports: dict[str, NbdExport] = {}     # by export name, oldest first
        self.clients: list[NbdClient] = []
        self.listener: socket.socket | None = None
        self._created: tuple[str, int, int] | None = None
        self._accepting = False

    # --- the directory the protocol asks ------------------------------------------

    def find(self, name: str) -> ExportView | None:
        export = self.exports.get(name)
        return export.view() if export is not None and not export.shutting_down else None

    def listing(self) -> list[ExportView]:
        return [e.view() for e in self.exports.values() if not e.shutting_down]

    def export_named(self, name: str) -> NbdExport | None:
        return self.exports.get(name)

    # --- listening ---------------------------------------------------------------------

    def listen(self, addr: dict) -> None:
        """Open the listening socket for a SocketAddress; QMPError with QEMU's text."""
        kind = addr["type"]
        if kind == "unix":
            self.listener, self._created = listen_unix(addr)
        elif kind == "inet":
            self.listener = listen_inet(addr)
        else:
            raise QMPError(f"NBD server address type '{kind}' is not supported by qmpjobd")
        self.listener.setblocking(False)
        self._watch()

    def _watch(self) -> None:
        if self.listener is not None and not self._accepting:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._accept_ready)
            self._accepting = True

    def _unwatch(self) -> None:
        if self.listener is not None and self._accepting:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self._accepting = False

    def _update_watch(self) -> None:
        """QEMU stops accepting at max-connections: later clients wait in the backlog."""
        if self.max_connections and len(self.clients) >= self.max_connections:
            self._unwatch()
        else:
            self._watch()

    def _accept_ready(self) -> None:
        assert self.listener is not None
        while not self.max_connections or len(self.clients) < self.max_connections:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("NBD server: accept failed: %s", exc)
                break
            self._start_client(conn)
        self._update_watch()

    def _start_client(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = NbdClient(self)
        self.clients.append(client)
        client.start(conn)

    def client_gone(self, client: "NbdClient") -> None:
        if client in self.clients:
            self.clients.remove(client)
        self._update_watch()

    def close(self, unlink: bool = True) -> None:
        """Stop listening and disconnect every client (nbd-server-stop, exit).
        ``unlink=False`` (daemon exit) leaves a unix socket file behind, as
        qemu-storage-daemon does: only nbd-server-stop removes it."""
        self._unwatch()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._created is not None and unlink:
            unlink_if_same(*self._created)
        self._created = None
        for client in list(self.clients):
            client.close()


class NbdClient:
    """One connection: the protocol state and the requests in flight."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.conn = nbd.ServerConnection(server, server.features)
        self.channel: SocketChannel | None = None
        self.export: NbdExport | None = None
        self.in_flight = 0
        self.waiting: deque[Request] = deque()
        self.closed = False
        self._reading = True
        self._write_paused = False
        self._handshake_timer: asyncio.TimerHandle | None = None

    # --- the socket ----------------------------------------------------------------------

    def start(self, sock: socket.socket) -> None:
        self.channel = SocketChannel(sock, on_data=self.data_received, on_eof=self.close,
                                     on_lost=self.connection_lost, on_pause=self.pause_writing,
                                     on_resume=self.resume_writing, high_water=HIGH_WATER)
        self.channel.write(self.conn.greeting())
        self.channel.resume_reading()
        if self.server.handshake_timeout_s:
            self._handshake_timer = asyncio.get_running_loop().call_later(
                self.server.handshake_timeout_s, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive(data):
            self._handle(event)
        self._update_reading()

    def connection_lost(self) -> None:
        self.closed = True
        self._cancel_timer()
        self.server.client_gone(self)
        if self.export is not None:
            self.export.detach(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # --- events ------------------------------------------------------------------------

    def _handle(self, event: nbd.Event) -> None:
        if isinstance(event, nbd.Send):
            self.write(event.data)
        elif isinstance(event, Request):
            self.waiting.append(event)
            self._start_requests()
        elif isinstance(event, nbd.Started):
            self._started(event.export)
        elif isinstance(event, nbd.Close):
            log.debug("NBD client disconnected: %s", event.reason)
            self.close()

    def _started(self, view: ExportView) -> None:
        self._cancel_timer()
        export = self.server.export_named(view.name)
        if export is None or export.shutting_down:
            self.close()
            return
        self.export = export
        export.clients.append(self)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.conn.transmitting:
            log.debug("NBD client: handshake timed out")
            self.close()

    def _cancel_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.channel is not None and not self.closed:
            self.channel.write(data)

    def send_file_range(self, fd: int, offset: int, count: int) -> None:
        if self.channel is not None and not self.closed:
            self.channel.sendfile(fd, offset, count)

    def close(self) -> None:
        """Drop the connection; what was already queued still goes out."""
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        self.waiting.clear()
        if self.channel is not None:
            self.channel.close()
        else:
            self.server.client_gone(self)
        if self.export is not None:
            self.export.detach(self)

    # --- flow control --------------------------------------------------------------------

    def _update_reading(self) -> None:
        if self.channel is None or self.closed:
            return
        want = (self.in_flight < nbd.MAX_REQUESTS and not self.waiting
                and not self._write_paused)
        if want != self._reading:
            self._reading = want
            if want:
                self.channel.resume_reading()
            else:
                self.channel.pause_reading()

    def _start_requests(self) -> None:
        while self.waiting and self.in_flight < nbd.MAX_REQUESTS and not self.closed:
            request = self.waiting.popleft()
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._serve(request))
            task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task) -> None:
        self.in_flight -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("NBD request failed unexpectedly", exc_info=task.exception())
            self.close()
        self._start_requests()
        self._update_reading()

    # --- requests -----------------------------------------------------------------------

    async def _serve(self, request: Request) -> None:
        export = self.export
        if export is None or self.closed:
            return
        if request.command != Cmd.READ and not export.node.active:
            self.write(self.conn.error_reply(request, nbd.NBD_EPERM, "export is inactive"))
            return
        handler = _HANDLERS.get(request.command)
        if handler is None:  # unknown commands never pass the protocol's checks
            self.write(self.conn.error_reply(request, nbd.NBD_EINVAL,
                                             f"invalid request type ({request.command}) received"))
            return
        await handler(self, export, request)

    def _fail(self, request: Request, exc: BaseException, message: str) -> None:
        self.write(self.conn.error_reply(request, nbd.nbd_errno(_errno_of(exc)), message))

    async def _node_io(self, request: Request, coro: Coroutine[Any, Any, Any],
                       message: str) -> bool:
        """Run one node coroutine for ``request``. A failure is answered at once
        with QEMU's ``message`` for that step; the caller then stops (False)."""
        try:
            await run_node_io(coro)
        except OSError as exc:
            self._fail(request, exc, message)
            return False
        return True

    async def _pread(self, request: Request, node: "BlockNode", offset: int,
                     length: int) -> bytes | None:
        """Data for ``request``, or None once its failure has been answered."""
        try:
            return await run_node_io(node.co_pread(offset, length))
        except OSError as exc:
            self._fail(request, exc, "reading from file failed")
            return None

    async def _flush(self, export: NbdExport) -> None:
        await run_node_io(export.node.co_flush())

    async def _read(self, export: NbdExport, request: Request) -> None:
        if request.flags & nbd.CMD_FLAG_FUA and not await self._node_io(
                request, export.node.co_flush(), "flush failed"):
            return
        structured = self.conn.mode >= nbd.Mode.STRUCTURED
        if structured and not request.flags & nbd.CMD_FLAG_DF and request.length:
            await self._sparse_read(export, request)
            return
        if structured and not request.length:
            # QEMU still passes the empty read down the chain (a blkdebug rule
            # may fail it).
            if await self._pread(request, export.node, request.offset, 0) is not None:
                self.write(self.conn.done_chunk(request))
            return
        pieces = status.file_pieces(export.node, request.offset, request.length)
        if pieces is not None:
            header = (self.conn.data_chunk_header(request, request.offset, request.length, True)
                      if structured else self.conn.read_reply_header(request))
            self.write(header)
            self._send_pieces(pieces)
            return
        data = await self._pread(request, export.node, request.offset, request.length)
        if data is None:
            return
        if not structured:
            self.write(self.conn.read_reply_header(request))
        else:
            self.write(self.conn.data_chunk_header(request, request.offset, len(data), True))
        self.write(data)

    def _send_pieces(self, pieces: list[status.Piece]) -> None:
        """The bytes of a read, straight from the host files (sendfile) and zeroes."""
        for kind, fd, offset, count in pieces:
            if kind == "file":
                self.send_file_range(fd, offset, count)
            else:
                self.write(bytes(count))

    async def _sparse_read(self, export: NbdExport, request: Request) -> None:
        """Structured READ: areas that read as zeroes go out as holes (QEMU's
        nbd_co_send_sparse_read), the rest as data chunks, in order."""
        node = export.node
        position, end = request.offset, request.offset + request.length
        while position < end:
            try:
                flags, count = status.allocation(node, position, end - position)
            except OSError as exc:
                code = _errno_of(exc)
                self.write(self.conn.error_reply(request, nbd.nbd_errno(code),
                                                 f"unable to check for holes: {os.strerror(code)}"))
                return
            count = max(1, min(count, end - position))
            final = position + count == end
            if flags & nbd.STATE_ZERO:
                self.write(self.conn.hole_chunk(request, position, count, final))
            else:
                pieces = status.file_pieces(node, position, count)
                if pieces is not None:
                    self.write(self.conn.data_chunk_header(request, position, count, final))
                    self._send_pieces(pieces)
                else:
                    try:
                        data = await run_node_io(node.co_pread(position, count))
                    except OSError as exc:
                        # QEMU ends the connection: a failed read inside a
                        # structured reply that may have sent chunks already.
                        log.debug("NBD client disconnected: reading from file failed: %s", exc)
                        self.close()
                        return
                    self.write(self.conn.data_chunk_header(request, position, count, final))
                    self.write(data)
            position += count

    async def _write_and_reply(self, export: NbdExport, request: Request,
                               write: Coroutine[Any, Any, None]) -> None:
        """WRITE and WRITE_ZEROES: the write, then a flush where FUA or the
        export's writethrough asks; QEMU reports a failure of either alike."""
        try:
            await run_node_io(write)
            if request.flags & nbd.CMD_FLAG_FUA or export.writethrough:
                await self._flush(export)
        except OSError as exc:
            self._fail(request, exc, "writing to file failed")
            return
        self.write(self.conn.ok_reply(request))

    async def _write(self, export: NbdExport, request: Request) -> None:
        await self._write_and_reply(export, request,
                                    export.node.co_pwrite(request.offset, request.data))

    async def _write_zeroes(self, export: NbdExport, request: Request) -> None:
        fast = bool(request.flags & nbd.CMD_FLAG_FAST_ZERO)
        await self._write_and_reply(export, request, export.node.co_pwrite_zeroes(
            request.offset, request.length, no_fallback=fast))

    async def _trim(self, export: NbdExport, request: Request) -> None:
        discard = export.node.co_pdiscard(request.offset, request.length)
        if not await self._node_io(request, discard, "discard failed"):
            return
        if request.flags & nbd.CMD_FLAG_FUA and not await self._node_io(
                request, export.node.co_flush(), "discard failed"):
            return
        self.write(self.conn.ok_reply(request))

    async def _flush_command(self, export: NbdExport, request: Request) -> None:
        if await self._node_io(request, export.node.co_flush(), "flush failed"):
            self.write(self.conn.ok_reply(request))

    async def _cache(self, export: NbdExport, request: Request) -> None:
        """A prefetch: QEMU's block layer only acts on it where a copy-on-read filter
        would copy the data up; elsewhere it succeeds without reading."""
        if _has_copy_on_read(export.node) and not await self._node_io(
                request, export.node.co_pread(request.offset, request.length),
                "caching data failed"):
            return
        self.write(self.conn.ok_reply(request))

    async def _block_status(self, export: NbdExport, request: Request) -> None:
        limit = nbd.extent_limit(request)
        chunks: list[tuple[int, list[tuple[int, int]]]] = []
        try:
            for context in request.contexts:
                chunks.append((context, context_extents(export, context, request.offset,
                                                        request.length, limit)))
        except OSError as exc:
            self._fail(request, exc, "can't get block status")
            return
        for index, (context, extents) in enumerate(chunks):
            self.write(self.conn.block_status_chunk(request, context, extents,
                                                    index == len(chunks) - 1))


_HANDLERS = {
    Cmd.READ: NbdClient._read,
    Cmd.WRITE: NbdClient._write,
    Cmd.WRITE_ZEROES: NbdClient._write_zeroes,
    Cmd.TRIM: NbdClient._trim,
    Cmd.FLUSH: NbdClient._flush_command,
    Cmd.CACHE: NbdClient._cache,
    Cmd.BLOCK_STATUS: NbdClient._block_status,
}


def _has_copy_on_read(node: "BlockNode") -> bool:
    """A copy-on-read filter on the export's data path (a prefetch copies up there)."""
    return any(n.driver == "copy-on-read" for n, _ in node.data_chain())


# --- block status -------------------------------------------------------------------------

def _walk(answer: Callable[["BlockNode", int, int], tuple[int, int]], node: "BlockNode",
          offset: int, length: int) -> Iterator[tuple[int, int]]:
    """``(state, bytes)`` runs of one block-status question over a range."""
    end = offset + length
    while offset < end:
        state, count = answer(node, offset, end - offset)
        count = max(1, min(count, end - offset))
        yield state, count
        offset += count


def bitmap_runs(bitmap: Any, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """``(state, bytes)`` of a dirty bitmap over exactly ``[offset, offset+length)``:
    the bitmap's granularity-aligned runs, cut at the request's ends."""
    end = offset + length
    position = offset
    for start, count, dirty in bitmap.extents(offset, length):
        start, stop = max(start, position), min(start + count, end)
        if stop <= start:
            continue
        if start > position:        # a gap the bitmap did not describe is clean
            yield 0, start - position
        yield (nbd.STATE_DIRTY if dirty else 0), stop - start
        position = stop
    if position < end:
        yield 0, end - position


def context_extents(export: NbdExport, context: int, offset: int, length: int,
                    limit: int) -> list[tuple[int, int]]:
    """The extents of one meta context over a range, as QEMU collects them."""
    extents = nbd.ExtentList(limit)
    if context == nbd.META_ID_BASE_ALLOCATION:
        runs = _walk(status.allocation, export.node, offset, length)
    elif context == nbd.META_ID_ALLOCATION_DEPTH:
        runs = _walk(status.depth, export.node, offset, length)
    else:
        runs = bitmap_runs(export.bitmaps[context - nbd.META_ID_DIRTY_BITMAP], offset, length)
    for state, count in runs:
        if not extents.add(count, state):
            break
    return extents.extents


# --- sockets ----------------------------------------------------------------------------------

def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def listen_unix(addr: dict) -> tuple[socket.socket, tuple[str, int, int] | None]:
    """A listening unix socket as QEMU's socket layer opens one (a stale file of
    that name is replaced); returns it and (path, dev, ino) of the file made."""
    data = addr.get("data", addr)
    path = data["path"]
    abstract = data.get("abstract", False)
    if len(path.encode()) >= 108 - abstract:
        raise QMPError(f"UNIX socket path '{path}' is too long")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not abstract:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(path)
        name = "\0" + path if abstract else path
        try:
            sock.bind(name)
        except OSError as exc:
            raise QMPError(f"Failed to bind socket to {path}: {_strerror(exc)}") from None
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    created = None
    if not abstract:
        st = os.stat(path)
        created = (path, st.st_dev, st.st_ino)
    return sock, created


def listen_inet(addr: dict) -> socket.socket:
    """A listening TCP socket on exactly the host asked for."""
    infos = resolve_inet(addr.get("data", addr), passive=True)
    return listen_first_free(((family, kind, proto, sockaddr)
                              for family, kind, proto, _, sockaddr in infos), socket.SOMAXCONN)
