"""Helpers for tests that drive whole daemon processes: scenarios played on both
qmpjobd and qemu-storage-daemon, transcripts read until the daemon hangs up, and the
normalisation that makes the two comparable."""

from __future__ import annotations

import json
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Callable

from tests.support.daemons import DaemonProcess, RawClient

CAPS = b'{"execute":"qmp_capabilities"}'

# Members of block-job events that depend on how far a job got (timing).
PROGRESS_MEMBERS = ("offset", "len")


def negotiated(path: str) -> RawClient:
    client = RawClient(path)
    client.recv_message()
    client.send(CAPS)
    assert client.recv_message() == b'{"return": {}}\r\n'
    return client


def summary(message: bytes) -> str:
    """One line per message: events without timestamps and progress; replies as sent."""
    value = json.loads(message)
    if "event" not in value:
        return json.dumps(value, sort_keys=True)
    data = {k: v for k, v in value.get("data", {}).items() if k not in PROGRESS_MEMBERS}
    return f"{value['event']} {json.dumps(data, sort_keys=True)}"


def read_until(client: RawClient, done: Callable[[list[str]], bool],
               timeout: float = 20.0) -> list[str]:
    """Messages until ``done(messages so far)`` holds."""
    seen: list[str] = []
    while not done(seen):
        seen.append(summary(client.recv_message(timeout=timeout)))
    return seen


def read_until_eof(client: RawClient, timeout: float = 30.0) -> list[str]:
    """Every message until the daemon closes the connection."""
    seen: list[str] = []
    while True:
        try:
            seen.append(summary(client.recv_message(timeout=timeout)))
        except EOFError:
            return seen


def status(job_id: str, value: str) -> str:
    return summary(json.dumps({"event": "JOB_STATUS_CHANGE",
                               "data": {"id": job_id, "status": value}}).encode())


@dataclass
class Step:
    """Send ``command``, then read until its reply and every line of ``until``
    (summary lines) have arrived."""

    command: dict
    until: list[str] = field(default_factory=list)

    def run(self, client: RawClient) -> list[str]:
        client.send(json.dumps(self.command))
        return read_until(client, lambda seen: has_reply(seen)
                          and all(line in seen for line in self.until))


def has_reply(seen: list[str]) -> bool:
    return any(line.startswith(('{"return"', '{"error"')) for line in seen)


@dataclass
class Outcome:
    setup: list[str]
    shutdown: list[str]
    returncode: int | None
    socket_left: bool
    stderr: str


@dataclass
class Scenario:
    """Block nodes, setup steps, and how the daemon is told to stop."""

    blockdevs: list[str]
    steps: list[Step]
    extra_args: list[str] = field(default_factory=list)

    def play(self, kind: str, finish: str) -> Outcome:
        args = list(self.extra_args)
        for blockdev in self.blockdevs:
            args += ["--blockdev", blockdev]
        with DaemonProcess(kind, args) as daemon:
            client = negotiated(daemon.sockets[0])
            setup: list[str] = []
            for step in self.steps:
                setup += step.run(client)
            finish_daemon(daemon, client, finish)
            shutdown = read_until_eof(client)
            assert daemon.proc is not None
            returncode = daemon.proc.wait(30)
            return Outcome(setup, shutdown, returncode,
                           socket_left=os.path.exists(daemon.sockets[0]), stderr=daemon.stderr())


def finish_daemon(daemon: DaemonProcess, client: RawClient, finish: str) -> None:
    """``quit`` over QMP, or the named signal."""
    assert daemon.proc is not None
    if finish == "quit":
        client.send(b'{"execute":"quit","id":"quit"}')
    else:
        daemon.proc.send_signal(getattr(signal, finish))


def tcp_listening_ports() -> set[tuple[str, int]]:
    """(local address in /proc/net/tcp{,6} hex form, port) of every listening TCP
    socket of this network namespace."""
    found: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    address, port = fields[1].split(":")
                    if fields[3] == "0A":   # TCP_LISTEN
                        found.add((address, int(port, 16)))
        except FileNotFoundError:
            continue
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
