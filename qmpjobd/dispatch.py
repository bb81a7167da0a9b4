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
from typing import Any

from qmpjobd.commands import Context, Handler
from qmpjobd.daemon import Daemon
from qmpjobd.errors import QMPError
from qmpjobd.wire.session import Request, Session

log = logging.getLogger(__name__)

NEGOTIATION_COMMAND = "qmp_capabilities"


class Dispatcher:
    """Runs requests against the daemon; one instance serves every connection."""

    def __init__(self, daemon: Daemon, handlers: dict[str, Handler]) -> None:
        self.daemon = daemon
        self.schema = daemon.schema
        # Only commands that both the schema declares and a handler implements.
        self.handlers = {n: h for n, h in handlers.items() if n in self.schema.commands}

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
