"""Start qmpjobd or qemu-storage-daemon as a subprocess on a unix socket.

Both take the same command line (qmpjobd accepts qemu-storage-daemon's --chardev,
--monitor and --blockdev), which is what lets one scenario run against both.
``version`` picks the QEMU version: the real daemon of that version for "qsd"
(default 7.2), and ``--qemu-version`` for qmpjobd when it is given explicitly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.oracles import DEFAULT_VERSION, oracle_command

REPO = Path(__file__).resolve().parents[2]


def oracle_path() -> str:
    """The 7.2 oracle's binary, for callers that need a single path; its absence
    is a test failure, never a skip. Other versions: tests.support.oracles."""
    command = oracle_command(DEFAULT_VERSION)
    if len(command) != 1:
        raise RuntimeError(f"the {DEFAULT_VERSION} oracle runs through a loader "
                           f"({' '.join(command)}); use tests.support.oracles.oracle_command")
    return command[0]


def is_listening(path: str) -> bool:
    """True once a unix socket at ``path`` accepts connections (the file alone can
    appear a moment before the server listens)."""
    if not os.path.exists(path):
        return False
    with open("/proc/net/unix") as table:
        for line in table:
            fields = line.split()
            # Flags 00010000 is __SO_ACCEPTCON: a listening socket.
            if len(fields) >= 8 and fields[-1] == path and fields[3] == "00010000":
                return True
    return False


def qmpjobd_command() -> list[str]:
    return [sys.executable, "-m", "qmpjobd"]


@dataclass
class DaemonProcess:
    """One running daemon with ``monitors`` unix sockets (c0, c1, ...)."""

    kind: str  # "qmpjobd" or "qsd"
    extra_args: list[str] = field(default_factory=list)
    monitors: int = 1
    pretty: set[int] = field(default_factory=set)
    workdir: Path | None = None
    # None: qsd 7.2, and qmpjobd without --qemu-version (its own default).
    version: str | None = None

    def __post_init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.kind}-"))
        self.sockets = [str(self.tmp / f"c{i}.sock") for i in range(self.monitors)]
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        if self.kind == "qmpjobd":
            base = qmpjobd_command()
            if self.version is not None:
                base += ["--qemu-version", self.version]
        else:
            base = oracle_command(self.version or DEFAULT_VERSION)
        args = list(self.extra_args)
        for i, path in enumerate(self.sockets):
            args += ["--chardev", f"socket,id=c{i},path={path},server=on,wait=off"]
            args += ["--monitor", f"chardev=c{i}" + (",pretty=on" if i in self.pretty else "")]
        return base + args

    def start(self, timeout: float = 20.0) -> "DaemonProcess":
        if self.proc is not None:
            raise RuntimeError(f"{self.kind} daemon started twice (a second process would be orphaned)")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.stderr_path = self.tmp / "stderr.log"
        self.proc = subprocess.Popen(
            self.argv(), cwd=self.workdir or self.tmp, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "wb"),
        )
        deadline = time.monotonic() + timeout
        while not all(self.ready(p) for p in self.sockets):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start-up: {self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.kind} did not create its sockets: {self.stderr()}")
            time.sleep(0.01)
        return self

    def ready(self, path: str) -> bool:
        # qmpjobd renames an already listening socket into place, so the file
        # existing is enough; qemu-storage-daemon creates the file before listen().
        return os.path.exists(path) if self.kind == "qmpjobd" else is_listening(path)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RawClient:
    """A blocking raw-socket QMP client: exact bytes in, exact messages out."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv_message(self, timeout: float | None = None) -> bytes:
        """The next whole message, including its final CRLF (pretty ones span lines)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            end = self._message_end()
            if end is not None:
                message, self.buffer = self.buffer[:end], self.buffer[end:]
                return message
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self.buffer += chunk

    def _message_end(self) -> int | None:
        # A message ends at a CRLF that follows a top-level closing brace: in
        # compact mode that is every CRLF; in pretty mode the closing "}" sits at
        # the start of its line.
        start = 0
        while True:
            idx = self.buffer.find(b"\r\n", start)
            if idx < 0:
                return None
            line_start = self.buffer.rfind(b"\n", 0, idx) + 1
            line = self.buffer[line_start:idx]
            if line.endswith(b"}") and (line == b"}" or line.startswith(b"{")):
                return idx + 2
            start = idx + 2

    def recv_until_quiet(self, quiet: float) -> tuple[list[bytes], bool]:
        """Messages that arrive until ``quiet`` seconds pass without one, and
        whether the server closed the connection."""
        messages = []
        # The short timeout is for this call only: a later recv_message() without
        # one would otherwise give up after ``quiet`` seconds (a slow reply under load).
        previous = self.sock.gettimeout()
        try:
            while True:
                try:
                    messages.append(self.recv_message(timeout=quiet))
                except (socket.timeout, TimeoutError):
                    return messages, False
                except EOFError:
                    return messages, True
        finally:
            self.sock.settimeout(previous)

    def close(self) -> None:
        self.sock.close()


class QMPSession:
    """One negotiated connection to a daemon: a command in, its reply out (exact
    bytes with ``command_raw``, parsed with ``command``); events met on the way are
    kept in ``events``."""

    def __init__(self, daemon: DaemonProcess, timeout: float = 30.0) -> None:
        self.daemon = daemon
        self.client = RawClient(daemon.sockets[0], timeout=timeout)
        self.events: list[dict] = []
        self.client.recv_message()                       # greeting
        self.command("qmp_capabilities")

    def command_raw(self, name: str, arguments: dict | None = None) -> bytes:
        request: dict = {"execute": name}
        if arguments is not None:
            request["arguments"] = arguments
        self.client.send(json.dumps(request))
        while True:
            message = self.client.recv_message()
            parsed = json.loads(message)
            if "event" not in parsed:
                return message
            self.events.append(parsed)

    def command(self, name: str, arguments: dict | None = None) -> dict:
        return json.loads(self.command_raw(name, arguments))

    def wait_event(self, name: str, **data: object) -> dict:
        """The first event ``name`` whose data has ``data``'s members, taken out of
        ``events`` (read from the socket until it comes)."""
        while True:
            for index, event in enumerate(self.events):
                if event["event"] == name and all(event.get("data", {}).get(k) == v
                                                  for k, v in data.items()):
                    return self.events.pop(index)
            self.events.append(json.loads(self.client.recv_message()))

    def wait_status(self, job_id: str, status: str) -> None:
        """Until JOB_STATUS_CHANGE of ``job_id`` to ``status`` has arrived (kept in ``events``)."""
        wanted = {"id": job_id, "status": status}
        while not any(e["event"] == "JOB_STATUS_CHANGE" and e["data"] == wanted for e in self.events):
            message = json.loads(self.client.recv_message())
            if "event" in message:
                self.events.append(message)

    def close(self) -> None:
        self.client.close()
