"""asyncio listeners and connections: bytes in, replies and events out.

Everything protocol-shaped lives in ``wire/`` and everything stateful in the daemon;
this module only moves bytes. The rules that shape it:

* A command runs to completion without yielding (handlers never await), so the
  events it raises are queued on every connection before its reply.
* Requests are queued per connection and run a slice at a time: at most one lexer
  chunk and ``SLICE_REQUESTS`` requests or ``SLICE_OUTPUT_BYTES`` of replies, then
  every other connection with work gets its slice (round robin, one slice per loop
  turn, socket I/O in between). A burst in one write cannot make others wait for it.
* Output is queued per connection and flushed in one write per slice. Events raised
  outside a command (by a running job) schedule one flush on the next loop turn;
  they reach every connection whatever its state, without waiting.
* Back-pressure: while more than ``OUTPUT_HIGH_WATER`` bytes of a connection's
  output are unsent, its requests do not run and its input is not read; both resume
  once the client has read down to ``OUTPUT_LOW_WATER``.
* The output bound is for clients that do not read. A connection is cut off (and
  the fact logged) when its unsent output exceeds ``max_output_bytes`` plus the
  largest single message written since it was last drained to the low mark (so a
  reading client always gets a reply that is bigger than the bound by itself), or
  exceeds ``max_output_bytes`` after ``STALL_SECONDS`` without any reading
  progress. A stalled client's queued requests run again, so a client that sends
  without ever reading is cut off at the bound rather than left waiting for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import tty
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, cast

from qmpjobd.commands.char import NO_ADDRESS_FILENAME
from qmpjobd.commands.control import begin_shutdown, version_info
from qmpjobd.confine import PathPolicy
from qmpjobd.daemon import Daemon
from qmpjobd.dispatch import Dispatcher
from qmpjobd.errors import QMPError
from qmpjobd.qapi.ghash import GHashSet
from qmpjobd.sockets import ListenCandidate, listen_first_free, resolve_inet, unlink_if_same
from qmpjobd.versions import Behaviour
from qmpjobd.wire.encode import encode, encode_event
from qmpjobd.wire.lexer import ParsedValue, ParseError
from qmpjobd.wire.dialect import new_stream_parser, wire_dialect
from qmpjobd.wire.session import Session, event_message

log = logging.getLogger(__name__)

# Output above this many unsent bytes stops a connection's dispatch (and reading);
# it resumes once the client has read its output down to the low mark. These are the
# transport's flow-control marks, so asyncio tells us when each is crossed.
OUTPUT_HIGH_WATER = 256 * 1024
OUTPUT_LOW_WATER = 64 * 1024
# The work one connection may do before every other connection gets a turn: a burst
# of requests in one write is spread over loop turns instead of run in one callback.
SLICE_REQUESTS = 256
SLICE_OUTPUT_BYTES = 64 * 1024
# Input reaches the lexer at most this much per slice, so lexing one huge message
# (or megabytes of input the faithful slow path must take) is spread over turns too.
LEX_CHUNK = 64 * 1024
# A client whose unsent output has not shrunk at all for this long is not reading.
STALL_SECONDS = 1.0


def flow_control_marks(max_output_bytes: int) -> tuple[int, int]:
    """The transport's high and low marks: the defaults, or lower under a small
    bound, so that back-pressure starts well before a reading client nears it."""
    high = max(1, min(OUTPUT_HIGH_WATER, max_output_bytes // 4))
    return high, min(OUTPUT_LOW_WATER, high // 4)


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
    """One client: its own session, parser, request queue and output queue.

    Requests are queued as they arrive and run a slice at a time (see ``run_slice``);
    each request still runs to completion, so replies and events keep their order.
    """

    def __init__(self, server: "Server", monitor: MonitorSpec) -> None:
        self.server = server
        self.monitor = monitor
        self.serial = next(server.connection_serials)   # connection order
        self.session = Session()
        self.parser = new_stream_parser(wire_dialect(server.daemon.personality))
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # Input: bytes not yet lexed, and lexed items not yet dispatched.
        self.unlexed: deque[bytes] = deque()
        self.parsed: deque[ParsedValue | ParseError] = deque()
        self.reading_paused = False
        self.eof = False
        self.scheduled = False          # waiting in the server's ready queue
        # Output: messages of the current batch, and what the transport took so far.
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.pending_largest = 0
        self.written_bytes = 0
        # The transport is above its high-water mark (between pause_writing and
        # resume_writing): no requests run, unless the client is stalled.
        self.output_blocked = False
        # The client made no reading progress for STALL_SECONDS while output waited.
        self.stalled = False
        # The largest message written since the output was last at the low mark: a
        # reply can exceed the bound by itself, and a reading client must get it whole.
        self.allowance = 0
        self.watchdog: asyncio.TimerHandle | None = None
        self.progress_mark = 0
        self.low_water = OUTPUT_LOW_WATER
        self.output_limit = server.daemon.options.max_output_bytes

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        high, self.low_water = flow_control_marks(self.output_limit)
        transport.set_write_buffer_limits(high=high, low=self.low_water)
        self.server.connections.add(self)
        log.debug("client connected on %s", self.monitor.describe())
        self.queue(encode(self.session.greeting(version_info(self.server.daemon)), self.monitor.pretty))
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if len(data) <= LEX_CHUNK:
            self.unlexed.append(data)
        else:
            for start in range(0, len(data), LEX_CHUNK):
                self.unlexed.append(data[start:start + LEX_CHUNK])
        if not self.scheduled:
            # Run at once: a lone request is answered without waiting a loop turn.
            self.run_slice()

    def eof_received(self) -> bool:
        self.eof = True
        # Keep the transport open while queued requests still owe replies.
        return self.has_work()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()
        self.unlexed.clear()
        self.parsed.clear()
        self.cancel_watchdog()
        self.server.connections.discard(self)
        log.debug("client on %s disconnected", self.monitor.describe())

    def pause_writing(self) -> None:
        self.output_blocked = True
        self.arm_watchdog()
        self.update_flow()

    def resume_writing(self) -> None:
        # The client read its output down to the low mark: it is reading.
        self.output_blocked = False
        self.stalled = False
        self.allowance = 0
        self.cancel_watchdog()
        self.update_flow()

    # -- requests ----------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.parsed or self.unlexed)

    def may_dispatch(self) -> bool:
        # A stalled client's requests run anyway: its output then grows until the
        # bound cuts it off, as it would if it had never been paused.
        if self.closed or not self.server.serving():
            return False
        return not self.output_blocked or self.stalled

    def run_slice(self) -> None:
        """Lex at most one chunk and run a bounded number of requests, then flush."""
        dispatcher = self.server.dispatcher
        pretty = self.monitor.pretty
        requests = produced = 0
        lexed = False
        may_dispatch = self.may_dispatch()
        # Nothing in a slice can block its output or stop the server (flushing
        # waits for the slice's end; quit returns at once), so one check will do.
        while may_dispatch:
            if not self.parsed:
                if lexed or not self.unlexed:
                    break
                self.parsed.extend(self.parser.feed(self.unlexed.popleft()))
                lexed = True
                continue
            reply = dispatcher.handle(self.session, self.parsed.popleft(), self)
            message = encode(reply, pretty)
            if self.server.daemon.quit_requested:
                # quit's reply goes out after the events of the jobs it cancels,
                # including those still finishing a request (QEMU writes it last).
                self.server.shutdown(final_reply=(self, message))
                return
            dispatcher.deliver(self, message)
            requests += 1
            produced += len(message)
            # Events count too: one command may raise thousands (from 10.0 every
            # graph change pauses and resumes every running job), and the client
            # must get the chance to read them before the next command adds more.
            if (requests >= SLICE_REQUESTS or produced >= SLICE_OUTPUT_BYTES
                    or self.pending_bytes >= SLICE_OUTPUT_BYTES):
                break
        self.flush()
        self.update_flow()

    def update_flow(self) -> None:
        """Schedule more work, pause or resume reading, or finish after EOF."""
        if not (self.parsed or self.unlexed or self.reading_paused or self.eof):
            return  # the common case: everything done, reading on
        if self.closed or self.transport is None:
            return
        work = self.has_work()
        if work and self.may_dispatch():
            self.server.schedule(self)
        # Back-pressure: read more only when everything read so far has run and the
        # client keeps up with its output.
        self.set_reading(not work and self.may_dispatch())
        if self.eof and not work:
            self.close()

    def set_reading(self, reading: bool) -> None:
        assert self.transport is not None
        if reading == (not self.reading_paused) or self.eof:
            return
        self.reading_paused = not reading
        if reading:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    # -- output ------------------------------------------------------------

    def queue(self, data: bytes) -> None:
        if self.closed:
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if len(data) > self.pending_largest:
            self.pending_largest = len(data)

    def flush(self) -> None:
        if self.closed or not self.pending or self.transport is None:
            return
        if self.transport.get_write_buffer_size() <= self.low_water:
            self.allowance = 0
        self.allowance = max(self.allowance, self.pending_largest)
        self.written_bytes += self.pending_bytes
        batch, self.pending = self.pending, []
        self.pending_bytes = self.pending_largest = 0
        # May call pause_writing() when the transport passes its high-water mark.
        self.transport.writelines(batch)
        if self.transport.get_write_buffer_size() > self.output_limit:
            self.enforce_output_bound()

    def unsent_bytes(self) -> int:
        assert self.transport is not None
        return self.transport.get_write_buffer_size()

    def enforce_output_bound(self) -> None:
        """Cut off a client whose output is beyond the bound and is not its own
        single big reply: events (or replies, once stalled) piling up unread."""
        if self.closed:
            return
        unsent = self.unsent_bytes()
        limit = self.output_limit
        if unsent - self.allowance > limit or (self.stalled and unsent > limit):
            self.cut_off(unsent, limit)

    def cut_off(self, unsent: int, limit: int) -> None:
        assert self.transport is not None
        log.warning(
            "disconnecting client on %s: %d bytes of output unsent (limit %d)%s",
            self.monitor.describe(), unsent, limit,
            ", not reading" if self.stalled else "",
        )
        self.closed = True
        self.cancel_watchdog()
        self.transport.abort()

    # -- stall detection ---------------------------------------------------

    def arm_watchdog(self) -> None:
        if self.watchdog is None and not self.closed:
            self.progress_mark = self.written_bytes - self.unsent_bytes()
            self.watchdog = asyncio.get_running_loop().call_later(STALL_SECONDS, self.check_progress)

    def cancel_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None

    def check_progress(self) -> None:
        """Runs every STALL_SECONDS while output is blocked: did the client read?"""
        self.watchdog = None
        if self.closed:
            return
        sent = self.written_bytes - self.unsent_bytes()
        self.stalled = sent == self.progress_mark
        self.enforce_output_bound()
        if self.closed:
            return
        if self.output_blocked:
            self.arm_watchdog()
        self.update_flow()

    def close(self) -> None:
        self.flush()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.cancel_watchdog()


def staging_name(path: str) -> str:
    """Where ``listening_unix_socket`` binds before renaming: the kernel keeps this
    name as the socket's address, so peers see it (``public_unix_name``)."""
    return f"{path}.{os.getpid()}.tmp"


def listening_unix_socket(path: str) -> socket.socket:
    """A unix socket that is already listening when ``path`` appears, with mode 0600.

    Binding under a temporary name and renaming it into place means a client that
    sees the file can connect at once, and no other user ever could.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = staging_name(path)
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


# ---------------------------------------------------------------------------------------
# The chardev registry: every chardev, from the command line or chardev-add
# ---------------------------------------------------------------------------------------

class Chardev(Protocol):
    """What the registry, query-chardev and QOM need of any chardev."""

    chardev_id: str
    qom_type: str
    # A monitor uses it: it is busy (no chardev-remove) and cannot be hot-swapped.
    frontend: bool

    def filename(self) -> str: ...

    def qom_value(self, prop: str) -> object: ...

    def close(self) -> None: ...


# From 10.0 on, a connected unix *client* socket chardev names the server's path in
# query-chardev; 7.2 printed its own (unnamed) address, which is empty: "unix:".
CLIENT_NAMES_PEER_PATH = Behaviour("a connected unix client chardev's filename names "
                                   "the path it connected to", since="10.0")


def _c_string(name: object) -> str:
    """A sun_path as QEMU prints it with %s: up to its first NUL (an abstract
    name starts with one, so it prints as nothing)."""
    if isinstance(name, bytes):
        return name.split(b"\x00", 1)[0].decode("utf-8", "replace")
    return str(name).split("\x00", 1)[0]


class CommandLineChardev:
    """A ``--chardev``/``--socket``/``--tcp`` socket, possibly used by a monitor."""

    qom_type = "chardev-socket"

    def __init__(self, server: "Server", spec: MonitorSpec, listening: bool) -> None:
        self.server = server
        self.spec = spec
        self.chardev_id = spec.chardev_id
        self.listening = listening

    @property
    def frontend(self) -> bool:
        return self.spec.frontend

    def filename(self) -> str:
        if not self.listening:
            return NO_ADDRESS_FILENAME
        return self.server.chardev_filename(self.spec)

    def qom_value(self, prop: str) -> object:
        spec, server = self.spec, self.server
        if prop == "connected":
            return any(c.monitor is spec and not c.closed
                       for c in (*server.connections, *server.idle_connections))
        if spec.path is not None:
            return {"path": spec.path, "type": "unix"}
        return {"port": str(spec.port), "host": spec.host or "", "type": "inet"}

    def close(self) -> None:
        """Stop listening and drop the clients (only ever asked of a chardev without
        a monitor: chardev-remove and chardev-change refuse the others)."""
        server, spec = self.server, self.spec
        listener = server.listener_of.pop(spec.chardev_id, None)
        if listener is not None:
            listener.close()
            if listener in server.listeners:
                server.listeners.remove(listener)
        for idle in [c for c in server.idle_connections if c.monitor is spec]:
            idle.close()
        if spec in server.monitors:
            server.monitors.remove(spec)
            if spec.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spec.path)


class SocketChardev:
    """A socket chardev made by chardev-add: listening (``server``, QMP's default) or
    connected to a server, unix (also abstract) or TCP.

    Nothing reads or writes it (there is no frontend), so its clients are held open
    and their bytes dropped. What QEMU notices of a client going away is kept: a unix
    peer's close raises HUP and the chardev is disconnected again; a TCP peer's close
    (FIN) raises no HUP, and without a frontend QEMU never reads, so it goes on
    showing the peer as connected until the chardev is removed. Listening sockets
    accept every client (QEMU serves one and leaves the rest in the backlog); the
    filename names the oldest.
    """

    qom_type = "chardev-socket"
    frontend = False

    def __init__(self, server: "Server", chardev_id: str, addr: dict, listen: bool,
                 nodelay: bool, fds: list[int]) -> None:
        self.server = server
        self.chardev_id = chardev_id
        self.kind = addr["type"]
        self.address = dict(addr["data"])
        self.listen = listen
        self.nodelay = nodelay
        self.log_fds = fds
        self.listener: socket.socket | None = None
        self.peers: list[socket.socket] = []     # oldest first
        self.watched: set[int] = set()
        self.created: tuple[str, int, int] | None = None   # path, st_dev, st_ino

    # -- opening -----------------------------------------------------------

    def open(self, policy: PathPolicy) -> None:
        if self.kind == "unix":
            self._open_unix(policy)
        else:
            self._open_inet()

    def _unix_name(self) -> str | bytes:
        path = self.address["path"]
        if not self.address.get("abstract", False):
            return path
        if self.address.get("tight", True):
            return "\0" + path
        # Not tight: the name fills the whole sun_path, padded with NULs.
        return (b"\0" + path.encode()).ljust(108, b"\0")

    def _open_unix(self, policy: PathPolicy) -> None:
        path = self.address["path"]
        abstract = self.address.get("abstract", False)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if not abstract:
                # Under --allow-dir a socket is neither created nor reached outside.
                if self.listen:
                    policy.check_create(path)
                else:
                    policy.check_open(path)
            if not self.listen:
                self._connect_unix(sock, path)
                return
            self._bind_unix(sock, path, abstract)
        except BaseException:
            sock.close()
            raise

    def _connect_unix(self, sock: socket.socket, path: str) -> None:
        try:
            sock.connect(self._unix_name())
        except OSError as exc:
            raise QMPError(f"Failed to connect to '{path}': {_strerror(exc)}") from None
        self._add_peer(sock)

    def _bind_unix(self, sock: socket.socket, path: str, abstract: bool) -> None:
        if len(path.encode()) >= 108 - abstract:
            raise QMPError(f"UNIX socket path '{path}' is too long")
        if not abstract:
            # As QEMU: a stale socket (or any file) of that name is replaced.
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(path)
        old_umask = os.umask(0o177)     # mode 0600, as the command-line sockets
        try:
            sock.bind(self._unix_name())
        except OSError as exc:
            raise QMPError(f"Failed to bind socket to {path}: {_strerror(exc)}") from None
        finally:
            os.umask(old_umask)
        if not abstract:
            st = os.stat(path)
            self.created = (path, st.st_dev, st.st_ino)
        sock.listen(1)
        self._start_listening(sock)

    def _open_inet(self) -> None:
        infos = resolve_inet(self.address, passive=self.listen)
        if self.listen:
            self._listen_inet(infos)
        else:
            self._connect_inet(infos, self.address["host"], self.address["port"])

    def _listen_inet(self, infos: list) -> None:
        self._start_listening(listen_first_free(self._listen_candidates(infos), 1))

    def _listen_candidates(self, infos: list) -> Iterator[ListenCandidate]:
        """QEMU's order: each resolved address in turn, each port of ``port``..``to``
        (lazily, so the search stops at the first that binds)."""
        for family, kind, proto, _, sockaddr in infos:
            first = sockaddr[1]
            last = self.address.get("to", first) if first else first
            for port in range(first, max(first, last) + 1):
                yield family, kind, proto, (sockaddr[0], port, *sockaddr[2:])

    def _connect_inet(self, infos: list, host: str, port: str) -> None:
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                # Blocking, as QEMU's: the daemon waits for the connection.
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            if self.address.get("keep-alive"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self._add_peer(sock)
            return
        reason = _strerror(error) if error is not None else "no address"
        raise QMPError(f"Failed to connect to '{host}:{port}': {reason}")

    # -- clients -----------------------------------------------------------

    def _start_listening(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.listener = sock
        self._watch(sock, self._accept_ready)

    def _watch(self, sock: socket.socket, callback: Callable[..., None], *args: Any) -> None:
        asyncio.get_running_loop().add_reader(sock.fileno(), callback, *args)
        self.watched.add(sock.fileno())

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd in self.watched:
            self.watched.discard(fd)
            asyncio.get_running_loop().remove_reader(fd)

    def _accept_ready(self) -> None:
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # out of descriptors: try again later
                log.warning("chardev %s: accept failed: %s", self.chardev_id, exc)
                return
            self._add_peer(conn)

    def _add_peer(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if self.nodelay and conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peers.append(conn)
        self._watch(conn, self._peer_readable, conn)

    def _peer_readable(self, conn: socket.socket) -> None:
        try:
            if conn.recv(65536):
                return                       # no frontend: the bytes go nowhere
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._unwatch(conn)
        if conn.family == socket.AF_UNIX:    # HUP: QEMU sees the peer go
            self.peers.remove(conn)
            conn.close()

    # -- what QEMU shows ---------------------------------------------------

    def refresh(self) -> None:
        """Take in what the kernel already knows (clients waiting to be accepted,
        unix peers gone) before answering: QEMU's main loop has usually handled
        both before it reads the next command, and the reader callbacks of this
        loop may not have run yet when a query arrives in the same turn."""
        if self.listener is not None:
            self._accept_ready()
        for conn in list(self.peers):
            if conn.fileno() in self.watched:
                self._peer_readable(conn)

    def filename(self) -> str:
        self.refresh()
        if self.peers:
            return self._connected_filename(self.peers[0])
        return "disconnected:" + self._address_text()

    def _address_text(self) -> str:
        server = ",server=on" if self.listen else ""
        if self.kind == "unix":
            extra = ""
            if self.address.get("abstract", False):
                extra = ",abstract=on" + (",tight=on" if self.address.get("tight", True) else "")
            return f"unix:{self.address['path']}{extra}{server}"
        host, port = self._local_inet()
        return f"tcp:{host}:{port}{server}"

    def _local_inet(self) -> tuple[str, str]:
        """The listening address as bound (numeric), or the address asked for."""
        if self.listener is not None:
            host, port = self.listener.getsockname()[:2]
            return host, str(port)
        return self.address["host"], self.address["port"]

    def _connected_filename(self, conn: socket.socket) -> str:
        server = ",server=on" if self.listen else ""
        if conn.family == socket.AF_UNIX:
            if self.listen:
                name: object = self._unix_name()
            elif self.server.daemon.personality.has(CLIENT_NAMES_PEER_PATH):
                name = self.server.public_unix_name(_c_string(conn.getpeername()))
            else:
                name = conn.getsockname()
            return f"unix:{_c_string(name)}{server}"
        local, peer = conn.getsockname(), conn.getpeername()
        return (f"tcp:{_bracketed(local[0])}:{local[1]}{server}"
                f" <-> {_bracketed(peer[0])}:{peer[1]}")

    def qom_value(self, prop: str) -> object:
        if prop == "connected":
            self.refresh()
            return bool(self.peers)
        address = {"type": self.kind, **self.address}
        if self.kind == "inet" and self.listener is not None:
            # The listening address as the socket reports it, with its family.
            host, port = self._local_inet()
            family = "ipv6" if self.listener.family == socket.AF_INET6 else "ipv4"
            address = {"type": "inet", "host": host, "port": port, family: True}
        return address

    def close(self) -> None:
        for conn in self.peers:
            self._unwatch(conn)
            conn.close()
        self.peers = []
        if self.listener is not None:
            self._unwatch(self.listener)
            self.listener.close()
            self.listener = None
        if self.created is not None:
            unlink_if_same(*self.created)
            self.created = None
        for fd in self.log_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.log_fds = []


def _strerror(exc: OSError | None) -> str:
    if exc is None or exc.errno is None:
        return str(exc)
    return os.strerror(exc.errno)


class PtyChardev:
    """A pseudo-terminal (``pty``): the daemon holds the master, a client opens the
    slave named in chardev-add's reply. Nothing is read or written (no frontend).
    ``path`` (10.0 on) adds a symlink to the slave, removed with the chardev."""

    qom_type = "chardev-pty"
    frontend = False

    def __init__(self, chardev_id: str, fds: list[int]) -> None:
        self.chardev_id = chardev_id
        self.log_fds = fds
        self.master, slave = os.openpty()
        os.set_inheritable(self.master, False)
        self.pty_name = os.ttyname(slave)
        # QEMU keeps only the master, in raw mode.
        tty.setraw(self.master)
        os.close(slave)
        self.link: str | None = None

    def make_link(self, path: str, policy: PathPolicy) -> None:
        policy.check_create(path)
        try:
            os.symlink(self.pty_name, path)
        except OSError as exc:
            raise QMPError(f"Failed to create PTY symlink: {_strerror(exc)}") from None
        self.link = path

    def filename(self) -> str:
        return f"pty:{self.pty_name}"

    def qom_value(self, prop: str) -> object:
        raise QMPError(f"Property '{self.qom_type}.{prop}' not found")

    def close(self) -> None:
        for fd in [self.master, *self.log_fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.log_fds = []
        if self.link is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.link)
            self.link = None


# Socket options qemu-storage-daemon implements and qmpjobd does not: a client that
# connected would see telnet negotiation, a websocket handshake or TLS.
UNSUPPORTED_SOCKET_OPTIONS = ("telnet", "tn3270", "websocket")


# 10.0 lets ``reconnect-ms`` through in server mode (and ignores it); 11.1 refuses
# it there as ``reconnect`` always was.
RECONNECT_MS_REFUSED_IN_SERVER_MODE = Behaviour(
    "'reconnect-ms' is refused for a listening socket chardev", since="11.1")


def check_socket_options(daemon: Daemon, data: dict) -> tuple[bool, bool]:
    """QEMU's checks of a socket backend, in its order, then qmpjobd's refusals;
    returns (listen, nodelay)."""
    addr = data["addr"]
    listen = data.get("server", True)
    reconnect = next((k for k in ("reconnect", "reconnect-ms") if k in data), None)
    if (reconnect == "reconnect-ms" and listen
            and not daemon.personality.has(RECONNECT_MS_REFUSED_IN_SERVER_MODE)):
        reconnect = None
    if addr["type"] == "fd" and reconnect:
        raise QMPError(f"'{reconnect}' option is incompatible with 'fd' address type")
    if "tls-authz" in data and "tls-creds" not in data:
        raise QMPError("'tls_authz' option requires 'tls_creds' option")
    if listen and reconnect:
        raise QMPError(f"'{reconnect}' option is incompatible with socket in server listen mode")
    if not listen and data.get("websocket"):
        raise QMPError("Websocket client is not implemented")
    if not listen and "wait" in data:
        raise QMPError("'wait' option is incompatible with socket in client connect mode")
    if "tls-creds" in data:
        if daemon.objects.get(data["tls-creds"]) is None:
            raise QMPError(f"No TLS credentials with id '{data['tls-creds']}'")
        raise QMPError("TLS on chardevs is not supported by qmpjobd")
    for option in UNSUPPORTED_SOCKET_OPTIONS:
        if data.get(option):
            raise QMPError(f"socket chardev option '{option}' is not supported by qmpjobd")
    if listen and data.get("wait"):
        raise QMPError("wait=on is not supported by qmpjobd: it would block the daemon "
                       "until a client connects")
    if reconnect and data[reconnect]:
        raise QMPError(f"socket chardev option '{reconnect}' is not supported by qmpjobd")
    if addr["type"] == "fd":
        raise QMPError("only QEMU supports file descriptor passing")
    if addr["type"] == "vsock":
        raise QMPError("vsock chardevs are not supported by qmpjobd")
    if addr["type"] == "inet" and addr["data"].get("mptcp"):
        raise QMPError("mptcp is not supported by qmpjobd")
    return listen, data.get("nodelay", False)


class Server:
    """All listeners and connections of one daemon, plus event fan-out."""

    # How long an exit waits for cancelled jobs to stop (QEMU waits for ever).
    shutdown_grace_s: float = 10.0

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
        self._shutdown_task: asyncio.Task | None = None
        self._final_replies: list[tuple[Connection, bytes]] = []
        # Jobs still stopping when the shutdown grace period ran out.
        self.abandoned_jobs: list = []
        # Connections with requests left over after their last slice, served round
        # robin: one slice each per loop turn, with socket I/O in between.
        self.ready: deque[Connection] = deque()
        self.turn_scheduled = False
        # Every chardev by id, and the ids in the order of QEMU's /chardevs
        # container (a GLib hash table: creation and removal both move the order).
        self.chardevs: dict[str, Chardev] = {}
        self.chardev_order = GHashSet()
        daemon.sinks.append(self.broadcast)

    async def start(self) -> None:
        for monitor in self.monitors:
            listener = await self.listen(monitor)
            self.listeners.append(listener)
            self.listener_of[monitor.chardev_id] = listener
            log.info("listening on %s (%s %s)", monitor.describe(),
                     "monitor" if monitor.frontend else "chardev without monitor",
                     monitor.chardev_id)
        # Every --chardev, also those that listen nowhere (cli sets all_chardevs).
        listening = {id(spec) for spec in self.monitors}
        for spec in getattr(self, "all_chardevs", None) or list(self.monitors):
            self.register_chardev(CommandLineChardev(self, spec, id(spec) in listening))

    # -- the chardev registry ------------------------------------------------

    def public_unix_name(self, name: str) -> str:
        """The path a client connected to: a command-line socket's address is its
        staging name (see ``listening_unix_socket``), the path it was renamed to is
        what QEMU would show."""
        for spec in self.monitors:
            if spec.path is not None and name == staging_name(spec.path):
                return spec.path
        return name

    def find_chardev(self, chardev_id: str) -> Chardev | None:
        return self.chardevs.get(chardev_id)

    def register_chardev(self, chardev: Chardev) -> None:
        self.chardevs[chardev.chardev_id] = chardev
        self.chardev_order.add(chardev.chardev_id)

    def remove_chardev(self, chardev_id: str) -> None:
        chardev = self.chardevs.pop(chardev_id)
        self.chardev_order.remove(chardev_id)
        chardev.close()

    def chardev_entries(self) -> list[Chardev]:
        """The chardevs in the iteration order of QEMU's /chardevs container."""
        return [self.chardevs[chardev_id] for chardev_id in self.chardev_order]

    def open_socket_chardev(self, daemon: Daemon, chardev_id: str, data: dict,
                            policy: PathPolicy, log_fds: list[int]) -> SocketChardev:
        """A socket chardev for chardev-add: listening or connected when this returns."""
        listen, nodelay = check_socket_options(daemon, data)
        chardev = SocketChardev(self, chardev_id, data["addr"], listen, nodelay, log_fds)
        chardev.open(policy)
        return chardev

    def open_pty_chardev(self, chardev_id: str, data: dict, policy: PathPolicy,
                         log_fds: list[int]) -> PtyChardev:
        try:
            chardev = PtyChardev(chardev_id, log_fds)
        except OSError as exc:
            raise QMPError(f"Failed to create PTY: {_strerror(exc)}") from None
        if data.get("path") is not None:
            try:
                chardev.make_link(data["path"], policy)
            except BaseException:
                chardev.close()
                raise
        return chardev

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
        message = event_message(name, data, self.daemon.event_time())
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

    def serving(self) -> bool:
        """False once the daemon has begun to exit: queued requests stay unanswered."""
        return self._shutdown_task is None and not self.stopped.is_set()

    def schedule(self, connection: Connection) -> None:
        """Give ``connection`` a slice in the next loop turn."""
        if connection.scheduled:
            return
        connection.scheduled = True
        self.ready.append(connection)
        if not self.turn_scheduled:
            self.turn_scheduled = True
            asyncio.get_running_loop().call_soon(self.run_turn)

    def run_turn(self) -> None:
        self.turn_scheduled = False
        turn, self.ready = self.ready, deque()
        for connection in turn:
            connection.scheduled = False
            if not connection.closed:
                connection.run_slice()

    def flush_all(self) -> None:
        self.flush_scheduled = False
        for connection in list(self.connections):
            connection.flush()

    def chardev_info(self) -> list[dict]:
        """query-chardev: ChardevInfo per chardev, in QEMU's order (it prepends each
        chardev to the answer while it walks its /chardevs hash table)."""
        return [{"label": chardev.chardev_id, "filename": chardev.filename(),
                 "frontend-open": chardev.frontend}
                for chardev in reversed(self.chardev_entries())]

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

    def shutdown(self, final_reply: "tuple[Connection, bytes] | None" = None) -> None:
        """Begin the daemon's exit (quit, SIGTERM, SIGINT, SIGHUP); idempotent.

        As qemu-storage-daemon does when its main loop ends: no more commands are
        read, every job is cancelled (their events still reach the clients), and
        only then every connection is flushed and closed and the socket files go.
        ``final_reply`` (quit's reply, not yet queued) is queued after the events
        of jobs that had to wait for I/O: QEMU writes it last.
        """
        if final_reply is not None:
            self._final_replies.append(final_reply)
        if self._shutdown_task is not None:
            return
        for listener in self.listeners:
            listener.close()
        for connection in list(self.connections):
            # QEMU stops serving its monitors while it waits for the jobs.
            if connection.transport is not None and not connection.closed:
                connection.transport.pause_reading()
        try:
            begin_shutdown(self.daemon)
        except Exception:
            # A bug in a job's cancellation must not keep the daemon from exiting.
            log.exception("error while cancelling jobs at exit")
        self._shutdown_task = asyncio.get_running_loop().create_task(self._finish_shutdown())

    async def _finish_shutdown(self) -> None:
        try:
            self.abandoned_jobs = await self.daemon.jobs.finish_shutdown(self.shutdown_grace_s)
        except Exception:
            # A bug in a job's cancellation must not keep the daemon from exiting.
            log.exception("error while cancelling jobs at exit")
            self.abandoned_jobs = list(self.daemon.jobs.jobs)
        if self.abandoned_jobs:
            log.warning("exiting with %d job(s) still stopping after %g s: %s",
                        len(self.abandoned_jobs), self.shutdown_grace_s,
                        ", ".join(str(job.id) for job in self.abandoned_jobs))
        try:
            self.daemon.graph.close_all()
        except Exception:
            # A failing close must not keep the daemon from exiting (QEMU reports
            # a failed flush on stderr and goes on).
            log.exception("error while closing block nodes at exit")
        for connection, reply in self._final_replies:
            connection.queue(reply)
        self.flush_all()
        self.close_everything()

    def close_everything(self) -> None:
        """Flush and close every connection, stop listening, remove socket files."""
        for listener in self.listeners:
            listener.close()
        for connection in list(self.connections):
            connection.close()
        for idle in list(self.idle_connections):
            idle.close()
        for chardev in list(self.chardevs.values()):
            if not isinstance(chardev, CommandLineChardev):
                chardev.close()
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
