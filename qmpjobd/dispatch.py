"""From a parsed message to a reply: QEMU's order of checks after the request object.

The wire Session has already checked the request object itself (qmp-wire.md 3.2
steps 1-2). What is left, in QEMU's order: look the command up (the table depends
on the negotiation state), refuse OOB for commands that do not allow it, validate
the arguments against the QAPI schema, run the handler.

When the reply goes out relative to the events a command causes follows QEMU 7.2's
main loop (see ``qmpjobd.job.manager``): the bottom halves left from earlier work
run first (the main loop was idle while the command travelled), the handler runs,
then exactly one main-loop pass runs the bottom halves the handler scheduled, then
the reply is written. What those bottom halves schedule runs after the reply.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from qmpjobd.commands import Context, Handler
from qmpjobd.daemon import Daemon
from qmpjobd.errors import QMPError
from qmpjobd.wire.session import Request, Session

log = logging.getLogger(__name__)

NEGOTIATION_COMMAND = "qmp_capabilities"
NS_PER_MS = 1_000_000


class ReplyTarget(Protocol):
    """What a reply gate needs of a connection (server.Connection)."""

    closed: bool

    def queue(self, data: bytes) -> None: ...

    def flush(self) -> None: ...


@dataclass
class _HeldReply:
    message: bytes
    released: bool = False


class ReplyGate:
    """x-qmpjobd-reply-delay on one connection: the replies to its next ``count``
    commands are held for ``delay_ns`` of the daemon's clock, or dropped.

    Commands still run in order as they arrive (so do their events); only their
    replies wait. A reply never overtakes an earlier one of the same connection:
    while a held reply is out, later replies queue behind it.
    """

    def __init__(self, target: ReplyTarget, clock: Any) -> None:
        self.target = target
        self.clock = clock
        self.held: deque[_HeldReply] = deque()
        self.remaining = 0
        self.delay_ns = 0
        self.drop = False
        # The reply of the command that armed the gate is not one of "the next".
        self.skip_next = False

    def arm(self, count: int, delay_ns: int, drop: bool) -> None:
        self.remaining, self.delay_ns, self.drop = count, delay_ns, drop
        self.skip_next = True

    @property
    def idle(self) -> bool:
        return not self.remaining and not self.held

    def deliver(self, message: bytes) -> None:
        if self.skip_next:
            self.skip_next = False
            self._in_order(_HeldReply(message, released=True))
            return
        if self.remaining:
            self.remaining -= 1
            if self.drop:
                return
            held = _HeldReply(message)
            self._in_order(held)
            self.clock.call_later_ns(self.delay_ns, lambda: self._release(held))
            return
        self._in_order(_HeldReply(message, released=True))

    def _in_order(self, reply: _HeldReply) -> None:
        self.held.append(reply)
        self._send_released()

    def _release(self, reply: _HeldReply) -> None:
        reply.released = True
        if self._send_released():
            # Outside a command (a timer): nothing else would flush it.
            self.target.flush()

    def _send_released(self) -> bool:
        sent = False
        while self.held and self.held[0].released:
            self.target.queue(self.held.popleft().message)
            sent = True
        return sent


class Dispatcher:
    """Runs requests against the daemon; one instance serves every connection."""

    def __init__(self, daemon: Daemon, handlers: dict[str, Handler]) -> None:
        self.daemon = daemon
        self.schema = daemon.schema
        # Only commands that both the schema declares and a handler implements.
        self.handlers = {n: h for n, h in handlers.items() if n in self.schema.commands}
        # Connections whose replies are delayed or dropped (test controls).
        self.reply_gates: "weakref.WeakKeyDictionary[Any, ReplyGate]" = weakref.WeakKeyDictionary()

    def deliver(self, connection: Any, message: bytes) -> None:
        """Queue a reply on ``connection``, unless a reply gate holds it back."""
        gate = self.reply_gates.get(connection)
        if gate is None:
            connection.queue(message)
            return
        gate.deliver(message)
        if gate.idle:
            del self.reply_gates[connection]

    def delay_replies(self, connection: Any, count: int, delay_ns: int, drop: bool) -> None:
        """Hold back (or drop) the replies to ``connection``'s next ``count`` commands."""
        gate = self.reply_gates.get(connection)
        if gate is None:
            gate = self.reply_gates[connection] = ReplyGate(connection, self.daemon.clock)
        gate.arm(count, delay_ns, drop)

    def handle(self, session: Session, item: Any, connection: Any = None) -> dict:
        """Turn one parsed item (value or parse error) into the reply to send."""
        request = session.take(item)
        if not isinstance(request, Request):
            return request
        try:
            result = self.run(session, request, connection)
        except QMPError as err:
            return session.error_reply(request, err)
        except Exception as exc:  # a bug: keep the connection and the daemon alive
            log.exception("internal error in command %s", request.name)
            return session.error_reply(request, QMPError(f"internal error in qmpjobd: {exc}"))
        return session.reply(request, result)

    def run(self, session: Session, request: Request, connection: Any) -> Any:
        handler = self.lookup(session, request.name)
        if request.oob and not self.schema.commands[request.name].allow_oob:
            raise QMPError(f"The command {request.name} does not support OOB")
        jobs = self.daemon.jobs
        jobs.run_bottom_halves()
        try:
            arguments = self.schema.validate(request.name, request.arguments)
            return handler(Context(self.daemon, session, connection), arguments)
        finally:
            # QEMU 7.2 runs a non-coroutine command in a bottom half and resumes the
            # monitor dispatcher, which writes the reply, through the iohandler
            # context: the main loop first makes one pass over the bottom halves the
            # command scheduled (a job's job_exit, blkdebug's aio_co_schedule, a
            # drain begun in a job). Whatever those schedule comes after the reply.
            jobs.main_loop_pass()

    def lookup(self, session: Session, name: str) -> Handler:
        # Before negotiation the command table holds qmp_capabilities alone.
        if not session.negotiated and name != NEGOTIATION_COMMAND:
            handler = None
        else:
            handler = self.handlers.get(name)
        if handler is None:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        return handler
