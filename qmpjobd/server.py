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
from collections import deque
from dataclasses import dataclass
from typing import Callable, cast

from qmpjobd.commands.control import begin_shutdown, version_info
from qmpjobd.daemon import Daemon
from qmpjobd.dispatch import Dispatcher
from qmpjobd.qapi.ghash import GHashSet
from qmpjobd.wire.encode import encode, encode_event
from qmpjobd.wire.lexer import ParsedValue, ParseError, StreamParser
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
        self.parser = StreamParser()
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
            self.queue(message)
            requests += 1
            produced += len(message)
            if requests >= SLICE_REQUESTS or produced >= SLICE_OUTPUT_BYTES:
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
