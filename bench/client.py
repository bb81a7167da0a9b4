"""The benchmark's QMP clients: raw AF_UNIX sockets, identical for both daemons.

The client must cost far less than the server it measures, or every ratio drifts
towards 1. So it avoids parsing where it can: in compact mode (never pretty in the
benchmark) every server message is one line ending in CRLF, and a string can never
contain a raw CR or LF (QEMU escapes them), so framing is ``split(b"\\r\\n")``.
Messages are only decoded with ``json.loads`` when the workload needs their content
(events of jobs); replies to ``query-jobs`` are just counted.
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

CRLF = b"\r\n"
NEGOTIATE = b'{"execute":"qmp_capabilities"}'
RECV_SIZE = 1 << 20


def request(name: str, arguments: dict | None = None, ident: object = None) -> bytes:
    """One request as the client sends it: compact JSON, no trailing newline."""
    msg: dict = {"execute": name}
    if arguments is not None:
        msg["arguments"] = arguments
    if ident is not None:
        msg["id"] = ident
    return json.dumps(msg, separators=(",", ":")).encode()


class QMPError(RuntimeError):
    """The server answered a benchmark command with an error."""


@dataclass
class Conn:
    """A blocking QMP connection that collects events while waiting for replies."""

    path: str
    timeout: float = 60.0
    sock: socket.socket = field(init=False)
    buffer: bytes = field(init=False, default=b"")
    lines: list[bytes] = field(init=False, default_factory=list)
    events: list[dict] = field(init=False, default_factory=list)
    greeting: bytes = field(init=False, default=b"")
    event_count: int = field(init=False, default=0)   # events received, ever

    def __post_init__(self) -> None:
        # The socket file appears at bind(), a moment before listen(): a connect
        # in between is refused, so retry briefly instead of failing the run.
        self.sock = connect_retry(self.path, time.monotonic() + 10.0)
        self.sock.settimeout(self.timeout)

    # -- framing -------------------------------------------------------------

    def recv_line(self) -> bytes:
        """The next server message without its CRLF."""
        while not self.lines:
            chunk = self.sock.recv(RECV_SIZE)
            if not chunk:
                raise EOFError(f"{self.path}: connection closed by server")
            parts = (self.buffer + chunk).split(CRLF)
            self.buffer = parts.pop()
            self.lines.extend(reversed(parts))
        return self.lines.pop()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- protocol ------------------------------------------------------------

    def handshake(self) -> "Conn":
        """Read the greeting and leave negotiation mode."""
        self.greeting = self.recv_line()
        self.cmd_raw(NEGOTIATE)
        return self

    def cmd_raw(self, data: bytes) -> object:
        """Send one request and return its ``return`` value; events are kept."""
        self.send(data)
        return self.read_reply()

    def cmd(self, name: str, arguments: dict | None = None) -> object:
        return self.cmd_raw(request(name, arguments))

    def pipeline(self, requests: list[bytes], batch: int = 64) -> list[object]:
        """Send requests ``batch`` at a time without waiting between them.

        Batches keep what the server must buffer for us small: a client that
        sent everything before reading could fill both directions' socket
        buffers and deadlock, or be cut off by a server's output bound.
        """
        results: list[object] = []
        for start in range(0, len(requests), batch):
            chunk = requests[start:start + batch]
            self.send(b"".join(chunk))
            results.extend(self.read_reply() for _ in chunk)
        return results

    def read_reply(self) -> object:
        while True:
            line = self.recv_line()
            if line.startswith(b'{"timestamp"') or b'"event": ' in line[:64]:
                self._keep_event(line)
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise QMPError(f"{msg['error'].get('class')}: {msg['error'].get('desc')}")
            return msg.get("return")

    def wait_event(self, match: Callable[[dict], bool], timeout: float | None = None) -> dict:
        """Consume kept events up to and including the first one that matches."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            while self.events:
                event = self.events.pop(0)
                if match(event):
                    return event
            if time.monotonic() > deadline:
                raise TimeoutError("event did not arrive")
            self._keep_event(self.recv_line())

    def _keep_event(self, line: bytes) -> None:
        self.events.append(json.loads(line))
        self.event_count += 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_status(job_id: str, status: str) -> Callable[[dict], bool]:
    """Matcher for JOB_STATUS_CHANGE of ``job_id`` to ``status``."""

    def match(event: dict) -> bool:
        data = event.get("data") or {}
        return (event.get("event") == "JOB_STATUS_CHANGE"
                and data.get("id") == job_id and data.get("status") == status)

    return match


def is_event(name: str, key: str, job_id: str) -> Callable[[dict], bool]:
    def match(event: dict) -> bool:
        return event.get("event") == name and (event.get("data") or {}).get(key) == job_id

    return match


def connect_retry(path: str, deadline: float, poll: float = 0.0005) -> socket.socket:
    """Connect as soon as the socket accepts; used to time start-up finely."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} never accepted a connection")
            time.sleep(poll)


# -- many sockets at once -----------------------------------------------------


@dataclass
class Stream:
    """One connection in a selector loop: bytes still to send, lines still owed."""

    sock: socket.socket
    outgoing: memoryview
    expect: int                              # messages to receive before done
    count: Callable[[bytes], int] | None = None  # counts "messages that matter" in a line batch
    received: int = 0
    lines: int = 0                           # every message received
    tail: bytes = b""
    done_at: float = 0.0


def drive(streams: list[Stream], timeout: float = 120.0) -> float:
    """Pump every stream until each has received what it expects.

    Non-blocking sockets in one selector loop: sending never waits for replies
    (pipelining), and reading goes on while sending, so neither side can block the
    other on full socket buffers. Returns the wall time in seconds.
    """
    sel = selectors.DefaultSelector()
    for s in streams:
        s.sock.setblocking(False)
        sel.register(s.sock, _mask(s), s)
    remaining = sum(1 for s in streams if s.received < s.expect)
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    while remaining:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{remaining} connections still waiting")
        for key, mask in sel.select(timeout=1.0):
            s: Stream = key.data
            if mask & selectors.EVENT_WRITE and s.outgoing:
                sent = s.sock.send(s.outgoing[:1 << 18])
                s.outgoing = s.outgoing[sent:]
                if not s.outgoing:
                    sel.modify(s.sock, _mask(s), s)
            if mask & selectors.EVENT_READ:
                remaining -= _read(s, start)
    elapsed = time.perf_counter() - start
    for s in streams:
        sel.unregister(s.sock)
        s.sock.setblocking(True)
    return elapsed


def _mask(s: Stream) -> int:
    return selectors.EVENT_READ | (selectors.EVENT_WRITE if s.outgoing else 0)


def _read(s: Stream, start: float) -> int:
    """Read what is there; return 1 when this read completed the stream."""
    chunk = s.sock.recv(RECV_SIZE)
    if not chunk:
        raise EOFError("connection closed by server during the run")
    if s.received >= s.expect:
        return 0
    if s.count is None:
        # A CRLF may straddle two reads; the last byte of the previous read says.
        lines = (s.tail + chunk).count(CRLF) if s.tail == b"\r" else chunk.count(CRLF)
        s.lines += lines
        s.received += lines
        s.tail = chunk[-1:]
    else:
        data = s.tail + chunk
        cut = data.rfind(CRLF) + 2
        if cut >= 2:
            s.lines += data.count(CRLF, 0, cut)
            s.received += s.count(data[:cut])
            s.tail = data[cut:]
        else:
            s.tail = data
    if s.received >= s.expect:
        s.done_at = time.perf_counter() - start
        return 1
    return 0


def socket_of(conn: Conn) -> socket.socket:
    """Hand a handshaken connection to :func:`drive` (it must hold no unread data)."""
    if conn.buffer or conn.lines:
        raise RuntimeError("connection still holds unread messages")
    return conn.sock

