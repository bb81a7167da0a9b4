"""Tests for qmpjobd.wire.session: negotiation, request-object checks, replies, events.

The byte tables were captured from qemu-storage-daemon 7.2. A tiny fake dispatcher plays
the layers above the wire (command table, allow-oob check); everything else is the
Session under test plus the real lexer and encoder.
"""

from __future__ import annotations

import pytest

from qmpjobd.errors import QMPError
from qmpjobd.wire.encode import encode
from qmpjobd.wire.lexer import ParsedValue, ParseError, StreamParser
from qmpjobd.wire.session import Request, Session, event_message

QSD_VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 22},
               "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}


class FakeMonitor:
    """One connection: lexer -> Session -> a two-command dispatcher -> encoder."""

    def __init__(self, oob_offered: bool = True) -> None:
        self.parser = StreamParser()
        self.session = Session(oob_offered)

    def dispatch(self, req: Request) -> object:
        known = {"qmp_capabilities"} if not self.session.negotiated \
            else {"qmp_capabilities", "query-jobs"}
        if req.name not in known:
            raise QMPError(f"The command {req.name} has not been found", "CommandNotFound")
        if req.oob:
            raise QMPError(f"The command {req.name} does not support OOB")
        if req.name == "qmp_capabilities":
            self.session.negotiate(req.arguments.get("enable", []))
            return {}
        return []

    def send(self, data: bytes) -> bytes:
        out = b""
        for item in self.parser.feed(data):
            reply = self.session.take(item)
            if isinstance(reply, Request):
                try:
                    reply = self.session.reply(reply, self.dispatch(reply))
                except QMPError as err:
                    reply = self.session.error_reply(reply, err)
            out += encode(reply)
        return out


# ---------------------------------------------------------------------------------------
# negotiation mode (qmp-wire.md 1.2), observed bytes
# ---------------------------------------------------------------------------------------

NEGOTIATION = [
    (b'{"execute":"query-version"}',
     b'{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n'),
    (b'{"execute":"query-version","id":"x1"}',
     b'{"id": "x1", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n'),
    (b'{"execute":"nonexist","id":1}',
     b'{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n'),
    (b'{"exec-oob":"qmp_capabilities","id":"o0"}',
     b'{"id": "o0", "error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' is unexpected"}}\r\n'),
    (b'{"id":"p1"}',
     b'{"id": "p1", "error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}\r\n'),
    (b'{"execute":}',
     b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'),
    (b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":3}'
     b'{"execute":"qmp_capabilities","id":4}{"exec-oob":"query-jobs","id":"a"}{"exec-oob":5,"id":"b"}'
     b'{"exec-oob":"query-jobs","execute":"query-jobs","id":"c"}{"exec-oob":"query-jobs"}',
     b'{"return": {}, "id": 3}\r\n'
     b'{"id": 4, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}\r\n'
     b'{"id": "a", "error": {"class": "GenericError", "desc": "The command query-jobs does not support OOB"}}\r\n'
     b'{"id": "b", "error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' must be a string"}}\r\n'
     b'{"id": "c", "error": {"class": "GenericError", "desc": "QMP input member \'execute\' clashes with \'exec-oob\'"}}\r\n'
     b'{"error": {"class": "GenericError", "desc": "The command query-jobs does not support OOB"}}\r\n'),
    (b'{"execute":"qmp_capabilities","id":5}{"exec-oob":"query-jobs","id":"a"}'
     b'{"execute":"query-jobs","exec-oob":"query-jobs","id":"c"}{"execute":"query-jobs","id":"d"}',
     b'{"return": {}, "id": 5}\r\n'
     b'{"id": "a", "error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' is unexpected"}}\r\n'
     b'{"id": "c", "error": {"class": "GenericError", "desc": "QMP input member \'exec-oob\' is unexpected"}}\r\n'
     b'{"return": [], "id": "d"}\r\n'),
]


@pytest.mark.parametrize("data, expected", NEGOTIATION)
def test_negotiation_mode_matches_oracle(data: bytes, expected: bytes) -> None:
    assert FakeMonitor().send(data) == expected


# ---------------------------------------------------------------------------------------
# request-object checks on a negotiated monitor with OOB off (qmp-wire.md 3.2), observed
# ---------------------------------------------------------------------------------------

def _err(desc: str, id_json: bytes | None = None) -> bytes:
    body = b'"error": {"class": "GenericError", "desc": "' + desc.encode() + b'"}'
    return (b'{"id": ' + id_json + b", " + body if id_json else b"{" + body) + b"}\r\n"


REQUEST_CHECKS = [
    (b'{"execute":"query-jobs","id":"ok"}', b'{"return": [], "id": "ok"}\r\n'),
    (b'{"execute":"query-jobs"}', b'{"return": []}\r\n'),
    (b'[1,2]', _err("QMP input must be a JSON object")),
    (b'"str"', _err("QMP input must be a JSON object")),
    (b'3 ', _err("QMP input must be a JSON object")),
    (b'null ', _err("QMP input must be a JSON object")),
    (b'{}', _err("QMP input lacks member 'execute'")),
    (b'{"id":"p1"}', _err("QMP input lacks member 'execute'", b'"p1"')),
    (b'{"execute":5,"id":"a"}', _err("QMP input member 'execute' must be a string", b'"a"')),
    (b'{"execute":null,"id":"b"}', _err("QMP input member 'execute' must be a string", b'"b"')),
    (b'{"execute":"query-jobs","arguments":[],"id":"c"}',
     _err("QMP input member 'arguments' must be an object", b'"c"')),
    (b'{"execute":"query-jobs","arguments":null,"id":"d"}',
     _err("QMP input member 'arguments' must be an object", b'"d"')),
    (b'{"execute":"query-jobs","foo":1,"id":"e"}', _err("QMP input member 'foo' is unexpected", b'"e"')),
    (b'{"control":1,"execute":"query-jobs","id":"f"}',
     _err("QMP input member 'control' is unexpected", b'"f"')),
    (b'{"exec-oob":"query-jobs","id":"g"}', _err("QMP input member 'exec-oob' is unexpected", b'"g"')),
    (b'{"exec-oob":"query-jobs","execute":"query-jobs","id":"h"}',
     _err("QMP input member 'exec-oob' is unexpected", b'"h"')),
    (b'{"exec-oob":5,"execute":"query-jobs","id":"i"}',
     _err("QMP input member 'exec-oob' is unexpected", b'"i"')),
    (b'{"execute":5,"arguments":1,"id":"j"}', _err("QMP input member 'execute' must be a string", b'"j"')),
    (b'{"arguments":1,"foo":2,"id":"k"}', _err("QMP input member 'arguments' must be an object", b'"k"')),
    # hash order, not input order, decides which unknown key is named
    (b'{"zzz":1,"aaa":2,"execute":"query-jobs","id":"l"}',
     _err("QMP input member 'aaa' is unexpected", b'"l"')),
    (b'{"id":"m","arguments":{}}', _err("QMP input lacks member 'execute'", b'"m"')),
    (b'{"execute":"query-jobs","id":"n","execute2":1}',
     _err("QMP input member 'execute2' is unexpected", b'"n"')),
]


@pytest.mark.parametrize("data, expected", REQUEST_CHECKS)
def test_request_checks_match_oracle(data: bytes, expected: bytes) -> None:
    monitor = FakeMonitor()
    assert monitor.send(b'{"execute":"qmp_capabilities"}') == b'{"return": {}}\r\n'
    assert monitor.send(data) == expected


def test_greeting_matches_oracle() -> None:
    assert encode(Session().greeting(QSD_VERSION)) == (
        b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
        b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n')


def test_greeting_without_oob() -> None:
    greeting = Session(oob_offered=False).greeting(QSD_VERSION)
    assert greeting == {"QMP": {"version": QSD_VERSION, "capabilities": []}}


# ---------------------------------------------------------------------------------------
# take()
# ---------------------------------------------------------------------------------------

def test_take_builds_request() -> None:
    session = Session()
    req = session.take(ParsedValue({"execute": "job-pause", "arguments": {"id": "j"}, "id": None}))
    assert req == Request("job-pause", {"id": "j"}, oob=False, has_id=True, id=None)
    req = session.take(ParsedValue({"execute": "query-jobs"}))
    assert req == Request("query-jobs", {}, oob=False, has_id=False, id=None)


def test_take_exec_oob_when_enabled() -> None:
    session = Session()
    session.negotiate(["oob"])
    req = session.take(ParsedValue({"exec-oob": "query-jobs", "id": "o"}))
    assert req == Request("query-jobs", {}, oob=True, has_id=True, id="o")


def test_take_parse_error_has_no_id() -> None:
    reply = Session().take(ParseError("JSON parse error, expecting value"))
    assert reply == {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}


def test_take_keeps_id_of_any_type() -> None:
    session = Session()
    for ident in ["x", 1, 1.5, None, True, [1], {"a": {}}]:
        reply = session.take(ParsedValue({"id": ident}))
        assert reply["id"] == ident and "error" in reply


# ---------------------------------------------------------------------------------------
# negotiate() and error_reply()
# ---------------------------------------------------------------------------------------

def test_negotiate_without_oob_keeps_oob_off() -> None:
    session = Session()
    session.negotiate([])
    assert session.negotiated and not session.oob_enabled


def test_negotiate_duplicates_are_fine() -> None:
    session = Session()
    session.negotiate(["oob", "oob"])
    assert session.negotiated and session.oob_enabled


def test_negotiate_twice_is_command_not_found() -> None:
    session = Session()
    session.negotiate(["oob"])
    with pytest.raises(QMPError) as info:
        session.negotiate([])
    assert (info.value.error_class, info.value.desc) == (
        "CommandNotFound", "Capabilities negotiation is already complete, command ignored")
    # not rewritten: the monitor is out of negotiation mode
    reply = session.error_reply(Request("qmp_capabilities", {}, False, True, 4), info.value)
    assert encode(reply) == (b'{"id": 4, "error": {"class": "CommandNotFound", "desc": '
                             b'"Capabilities negotiation is already complete, command ignored"}}\r\n')


def test_negotiate_capability_not_offered() -> None:
    session = Session(oob_offered=False)
    with pytest.raises(QMPError) as info:
        session.negotiate(["oob", "oob"])
    assert (info.value.error_class, info.value.desc) == (
        "GenericError", "Capability oob, oob not available")
    assert not session.negotiated and not session.oob_enabled
    session.negotiate([])
    assert session.negotiated


def test_error_reply_rewrites_only_command_not_found_in_negotiation_mode() -> None:
    session = Session()
    req = Request("query-jobs", {}, False, True, "x")
    other = session.error_reply(req, QMPError("Parameter 'foo' is unexpected"))
    assert other == {"error": {"class": "GenericError", "desc": "Parameter 'foo' is unexpected"}, "id": "x"}
    missing = session.error_reply(None, QMPError("The command a has not been found", "CommandNotFound"))
    assert missing == {"error": {"class": "CommandNotFound",
                                 "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    session.negotiate([])
    missing = session.error_reply(req, QMPError("The command a has not been found", "CommandNotFound"))
    assert encode(missing) == (b'{"id": "x", "error": {"class": "CommandNotFound", '
                               b'"desc": "The command a has not been found"}}\r\n')


def test_reply_without_id() -> None:
    assert Session().reply(Request("x", {}, False, False, None), {}) == {"return": {}}


# ---------------------------------------------------------------------------------------
# events (observed: blockdev-backup of 1 MiB null-co, auto-dismiss off)
# ---------------------------------------------------------------------------------------

def test_event_message_matches_oracle() -> None:
    message = event_message("JOB_STATUS_CHANGE", {"status": "created", "id": "j0"}, now=1795849059.471465)
    assert encode(message) == (
        b'{"timestamp": {"seconds": 1795849059, "microseconds": 471465}, "event": "JOB_STATUS_CHANGE", '
        b'"data": {"status": "created", "id": "j0"}}\r\n')
    completed = event_message(
        "BLOCK_JOB_COMPLETED",
        {"type": "backup", "device": "j0", "len": 1048576, "offset": 1048576, "speed": 0},
        now=1795849059.47168)
    assert encode(completed) == (
        b'{"timestamp": {"seconds": 1795849059, "microseconds": 471680}, "event": "BLOCK_JOB_COMPLETED", '
        b'"data": {"device": "j0", "len": 1048576, "offset": 1048576, "speed": 0, "type": "backup"}}\r\n')


def test_event_message_pretty_matches_oracle() -> None:
    message = event_message("JOB_STATUS_CHANGE", {"status": "created", "id": "j0"}, now=1795849062.02924)
    assert encode(message, pretty=True) == (
        b'{\r\n    "timestamp": {\r\n        "seconds": 1795849062,\r\n        "microseconds": 29240\r\n'
        b'    },\r\n    "event": "JOB_STATUS_CHANGE",\r\n    "data": {\r\n        "status": "created",\r\n'
        b'        "id": "j0"\r\n    }\r\n}\r\n')


def test_event_without_data_and_from_the_clock() -> None:
    message = event_message("X", None)
    assert list(message) == ["timestamp", "event"]
    stamp = message["timestamp"]
    assert type(stamp["seconds"]) is int and stamp["seconds"] > 1_600_000_000
    assert type(stamp["microseconds"]) is int and 0 <= stamp["microseconds"] <= 999_999


def test_event_timestamp_split() -> None:
    assert event_message("X", {}, now=12.000001)["timestamp"] == {"seconds": 12, "microseconds": 1}
    assert event_message("X", {}, now=12.9999996)["timestamp"] == {"seconds": 13, "microseconds": 0}
