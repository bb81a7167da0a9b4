"""Per-connection QMP rules: negotiation mode, request-object checks, replies, events.

Follows QEMU 7.2's monitor/qmp.c, qapi/qmp-dispatch.c and monitor/qmp-cmds-control.c:

* a JSON error becomes an error reply without ``id``;
* a value that is not an object: ``QMP input must be a JSON object`` (no ``id``);
* the members of the request object are checked in QDict iteration order (the same hash
  order the encoder writes keys in), so the first problem QEMU would report is the one
  reported here; the error reply carries the ``id`` when the object had one;
* in negotiation mode a ``CommandNotFound`` error gets QEMU's "Expecting capabilities
  negotiation" text.

Command lookup, the allow-oob check and argument validation belong to the layers above.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from qmpjobd.errors import QMPError
from qmpjobd.wire.encode import qdict_order
from qmpjobd.wire.lexer import ParsedValue, ParseError

__all__ = ["Request", "Session", "event_message"]

CAPABILITIES = ("oob",)         # QMPCapability: the only capability QEMU defines

NEGOTIATION_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED_DESC = "Capabilities negotiation is already complete, command ignored"


@dataclass(slots=True)
class Request:
    """A request object that passed QEMU's top-level checks."""
    name: str
    arguments: dict = field(default_factory=dict)
    oob: bool = False           # sent as exec-oob (only possible with OOB enabled)
    has_id: bool = False
    id: object = None


def _error(error_class: str, desc: str) -> dict:
    return {"error": {"class": error_class, "desc": desc}}


class Session:
    """One connection's negotiation state and request rules (sans-I/O)."""

    def __init__(self, oob_offered: bool = True) -> None:
        self.oob_offered = oob_offered
        self.negotiated = False
        self.oob_enabled = False

    # -- greeting and negotiation -----------------------------------------------------

    def greeting(self, version: dict) -> dict:
        """The greeting message; ``version`` is the query-version value."""
        offered = ["oob"] if self.oob_offered else []
        return {"QMP": {"version": version, "capabilities": offered}}

    def negotiate(self, enable: list[str]) -> None:
        """Body of ``qmp_capabilities`` once its arguments are validated."""
        if self.negotiated:
            raise QMPError(ALREADY_NEGOTIATED_DESC, "CommandNotFound")
        # QEMU lists every requested capability that is not offered, duplicates included.
        unavailable = [cap for cap in enable if not self._offered(cap)]
        if unavailable:
            raise QMPError(f"Capability {', '.join(unavailable)} not available")
        self.oob_enabled = "oob" in enable
        self.negotiated = True

    def _offered(self, capability: str) -> bool:
        return capability == "oob" and self.oob_offered

    # -- requests ---------------------------------------------------------------------

    def take(self, item: ParsedValue | ParseError) -> Request | dict:
        """Check one parsed input; a finished error reply, or the Request to dispatch."""
        if isinstance(item, ParseError):
            return _error("GenericError", item.desc)
        request = item.value
        if type(request) is not dict:
            return _error("GenericError", "QMP input must be a JSON object")
        problem = self._check_members(request)
        if problem is not None:
            reply = _error("GenericError", problem)
            if "id" in request:
                reply["id"] = request["id"]
            return reply
        name = request.get("execute")
        oob = name is None
        if oob:
            name = request["exec-oob"]
        has_id = "id" in request
        return Request(name, request.get("arguments", {}), oob, has_id,
                       request["id"] if has_id else None)

    def _check_members(self, request: dict) -> str | None:
        """qmp_dispatch_check_obj(): the first problem in QDict order, or None."""
        exec_key = None
        for key in qdict_order(request):
            value = request[key]
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if type(value) is not str:
                    return f"QMP input member '{key}' must be a string"
                if exec_key is not None:
                    return f"QMP input member '{key}' clashes with '{exec_key}'"
                exec_key = key
            elif key == "arguments":
                if type(value) is not dict:
                    return "QMP input member 'arguments' must be an object"
            elif key != "id":
                return f"QMP input member '{key}' is unexpected"
        if exec_key is None:
            return "QMP input lacks member 'execute'"
        return None

    # -- replies ----------------------------------------------------------------------

    def reply(self, req: Request, result: object) -> dict:
        message: dict = {"return": result}
        if req.has_id:
            message["id"] = req.id
        return message

    def error_reply(self, req: Request | None, err: QMPError) -> dict:
        desc = err.desc
        if not self.negotiated and err.error_class == "CommandNotFound":
            desc = NEGOTIATION_DESC
        message = _error(err.error_class, desc)
        if req is not None and req.has_id:
            message["id"] = req.id
        return message


def event_message(name: str, data: dict | None, now: float | None = None) -> dict:
    """An event as QEMU builds it; ``now`` is wall-clock seconds (default: the clock)."""
    if now is None:
        micros_total = time.time_ns() // 1000
    else:
        micros_total = round(now * 1_000_000)
    seconds, micros = divmod(micros_total, 1_000_000)
    message: dict = {
        "timestamp": {"seconds": seconds, "microseconds": micros},
        "event": name,
    }
    if data is not None:
        message["data"] = data
    return message
