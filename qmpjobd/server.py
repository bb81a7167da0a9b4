"""asyncio listeners and connections: bytes in, replies and events out.

Everything protocol-shaped lives in ``wire/`` and everything stateful in the daemon;
this module only moves bytes. Three rules shape it:

* A command runs to completion inside ``data_received`` (handlers never await), so
  the events it raises are queued on every connection before its reply.
* Output is queued per connection and flushed in one write per batch. Events raised
  outside a command (by a running job) schedule one flush on the next loop turn.
* A client that stops reading never stalls anyone: reading from it pauses while its
  transport is above the high-water mark, and once its unsent output passes
  ``max_output_bytes`` it is disconnected and the fact is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable, cast

from qmpjobd.commands.control import version_info
from qmpjobd.daemon import Daemon
from qmpjobd.dispatch import Dispatcher
from qmpjobd.qapi.ghash import GHashSet
from qmpjobd.wire.encode import encode, encode_event
from qmpjobd.wire.lexer import StreamParser
from qmpjobd.wire.session import Session, event_message

log = logging.getLogger(__name__)

# Reading from a client pauses while this much output waits in its transport.
WRITE_HIGH_WATER = 256 * 1024


@dataclass
class MonitorSpec:
    """One listening endpoint, as given by --chardev/--monitor or --socket/--tcp."""

    chardev_id: str
    path: str | None = None
    host: str | None = None
    port: int | None = None
    pretty: bool = False
    # False for a --chardev that no --monitor uses: it listens (as in QEMU) and
    # accepts clients, but nothing speaks on it.
    frontend: bool = True

    def describe(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"tcp:{self.host}:{self.port}"


class Connection(asyncio.Protocol):
    """One client: its own session, parser and output queue."""

    def __init__(self, server: "Server", monitor: MonitorSpec) -> None:
        self.server = server
        self.monitor = monitor
        self.serial = next(server.connection_serials)   # connection order
        self.session = Session()
        self.parser = StreamParser()
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = False

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.server.connections.add(self)
        log.debug("client connected on %s", self.monitor.describe())
        self.queue(encode(self.session.greeting(version_info()), self.monitor.pretty))
        self.flush()

    def data_received(self, data: bytes) -> None:
        dispatcher = self.server.dispatcher
        for item in self.parser.feed(data):
            reply = dispatcher.handle(self.session, item, self)
            self.queue(encode(reply, self.monitor.pretty))
            if self.server.daemon.quit_requested:
                self.server.shutdown()
                return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()
        self.server.connections.discard(self)
        log.debug("client on %s disconnected", self.monitor.describe())

    def pause_writing(self) -> None:
        # The client reads slower than we write: stop taking its requests.
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- output ------------------------------------------------------------

    def queue(self, data: bytes) -> None:
        if self.closed:
            return
        self.pending.append(data)

    def flush(self) -> None:
        if self.closed or not self.pending or self.transport is None:
            return
        self.transport.writelines(self.pending)
        self.pending.clear()
        self.enforce_output_bound()

    def enforce_output_bound(self) -> None:
        assert self.transport is not None
        unsent = self.transport.get_write_buffer_size()
        limit = self.server.daemon.options.max_output_bytes
        if unsent > limit:
            log.warning(
                "disconnecting client on %s: %d bytes of output unsent (limit %d)",
                self.monitor.describe(), unsent, limit,
            )
            self.closed = True
            self.transport.abort()

    def close(self) -> None:
        self.flush()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


def listening_unix_socket(path: str) -> socket.socket:
    """A unix socket that is already listening when ``path`` appears, with mode 0600.

    Binding under a temporary name and renaming it into place means a client that
    sees the file can connect at once, and no other user ever could.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{os.getpid()}.tmp"
    old_umask = os.umask(0o177)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        sock.bind(staging)
        sock.listen(128)
        os.replace(staging, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    finally:
        os.umask(old_umask)
    return sock


def _bracketed(host: str | None) -> str:
    """An IPv6 address as QEMU prints it next to a port."""
    return f"[{host}]" if host and ":" in host else str(host)


class IdleConnection(asyncio.Protocol):
    """A client of a chardev without a monitor: held open, its bytes ignored."""

    def __init__(self, server: "Server", monitor: MonitorSpec) -> None:
        self.server = server
        self.monitor = monitor
        self.serial = next(server.connection_serials)
        self.transport: asyncio.BaseTransport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server.idle_connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.idle_connections.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Server:
    """All listeners and connections of one daemon, plus event fan-out."""

    def __init__(self, daemon: Daemon, dispatcher: Dispatcher, monitors: list[MonitorSpec]) -> None:
        self.daemon = daemon
        self.dispatcher = dispatcher
        self.monitors = monitors
        self.connections: set[Connection] = set()
        self.idle_connections: set[IdleConnection] = set()
        self.connection_serials = itertools.count()
        self.listeners: list[asyncio.AbstractServer] = []
        # chardev id -> its listener, for query-chardev.
        self.listener_of: dict[str, asyncio.AbstractServer] = {}
        self.stopped = asyncio.Event()
        self.flush_scheduled = False
        daemon.sinks.append(self.broadcast)

    async def start(self) -> None:
        for monitor in self.monitors:
            listener = await self.listen(monitor)
            self.listeners.append(listener)
            self.listener_of[monitor.chardev_id] = listener
            log.info("listening on %s (%s %s)", monitor.describe(),
                     "monitor" if monitor.frontend else "chardev without monitor",
                     monitor.chardev_id)

    async def listen(self, monitor: MonitorSpec) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.Protocol]
        if monitor.frontend:
            factory = lambda: Connection(self, monitor)
        else:
            factory = lambda: IdleConnection(self, monitor)
        if monitor.path is not None:
            return await loop.create_unix_server(factory, sock=listening_unix_socket(monitor.path))
        return await loop.create_server(factory, monitor.host, monitor.port, reuse_address=True)

    def broadcast(self, name: str, data: dict | None) -> None:
        """Queue one event on every negotiated connection; encode once per format."""
        message = event_message(name, data)
        encoded: dict[bool, bytes] = {}
        for connection in self.connections:
            if not connection.session.negotiated or connection.closed:
                continue
            pretty = connection.monitor.pretty
            if pretty not in encoded:
                encoded[pretty] = encode_event(message, pretty)
            connection.queue(encoded[pretty])
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_all)

    def flush_all(self) -> None:
        self.flush_scheduled = False
        for connection in list(self.connections):
            connection.flush()

    def chardev_info(self) -> list[dict]:
        """query-chardev: ChardevInfo per chardev, in QEMU's order (its /chardevs
        container is a GLib hash table keyed by id, filled in creation order, and the
        list is built backwards)."""
        order = GHashSet()
        for monitor in self.monitors:
            order.add(monitor.chardev_id)
        by_id = {monitor.chardev_id: monitor for monitor in self.monitors}
        # QEMU prepends each chardev to the answer while it walks the table.
        return [{"label": chardev_id, "filename": self.chardev_filename(by_id[chardev_id]),
                 "frontend-open": by_id[chardev_id].frontend}
                for chardev_id in reversed(list(order))]

    def chardev_filename(self, monitor: MonitorSpec) -> str:
        """QEMU's socket chardev filename: the listening address, prefixed with
        ``disconnected:`` while no client is connected; a TCP client adds
        ``<-> peer``. With several clients (QEMU has at most one) the oldest counts."""
        listener = self.listener_of.get(monitor.chardev_id)
        clients = [c for c in (*self.connections, *self.idle_connections)
                   if c.monitor is monitor and not c.closed]
        if monitor.path is not None:
            local = f"unix:{monitor.path},server=on"
            return local if clients else f"disconnected:{local}"
        host, port = monitor.host, monitor.port
        if listener is not None and listener.sockets:
            host, port = listener.sockets[0].getsockname()[:2]
        if not clients:
            return f"disconnected:tcp:{host}:{port},server=on"
        oldest = min(clients, key=lambda c: c.serial)
        peer = oldest.transport.get_extra_info("peername") if oldest.transport else None
        peer_host, peer_port = peer[:2] if peer else ("", 0)
        return (f"tcp:{_bracketed(host)}:{port},server=on"
                f" <-> {_bracketed(peer_host)}:{peer_port}")

    def shutdown(self) -> None:
        """Flush and close every connection, stop listening, remove socket files."""
        for listener in self.listeners:
            listener.close()
        for connection in list(self.connections):
            connection.close()
        for idle in list(self.idle_connections):
            idle.close()
        for monitor in self.monitors:
            if monitor.path is not None:
                try:
                    os.unlink(monitor.path)
                except FileNotFoundError:
                    pass
        self.stopped.set()

    async def serve_until_stopped(self) -> None:
        await self.stopped.wait()
        # Let the closing transports write what they still hold.
        await asyncio.sleep(0)
