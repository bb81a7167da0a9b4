"""chardev-add and friends over real sockets, against qemu-storage-daemon of every
version: what the conformance scenario cannot hold because it varies between runs
(TCP ports, pty names) or needs a client of our own on the chardev's socket.

Each test plays one sequence on qsd V and on qmpjobd --qemu-version V and requires
the same replies after naming what differs between two runs (ports, pty numbers,
the daemon's directory); then it checks the facts a client relies on (the socket
listens, the pty exists, the file was truncated) on both daemons.
"""

from __future__ import annotations

from tests.support.oracles import SUPPORTED_VERSIONS

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

from tests.integration.procs import negotiated, tcp_listening_ports
from tests.support.daemons import DaemonProcess, RawClient

VERSIONS = SUPPORTED_VERSIONS
LOOPBACK_V4 = "0100007F"


class Session:
    """One daemon and a negotiated client, with the names that vary between runs."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.client = negotiated(daemon.sockets[0])
        self.names: dict[str, str] = {}
        self.log: list[object] = []

    def name(self, value: str, label: str) -> None:
        self.names[value] = label

    def run(self, execute: str, **arguments: object) -> dict:
        self.client.send(json.dumps({"execute": execute, "arguments": arguments}))
        reply = json.loads(self.client.recv_message())
        self.log.append(reply)
        return reply

    def normalised_log(self) -> list[object]:
        # Named at the end: a name may be learnt from a reply after it is logged.
        return [self.normalised(reply) for reply in self.log]

    def normalised(self, value: object) -> object:
        text = json.dumps(value).replace(str(self.daemon.tmp), "DIR")
        for raw, label in sorted(self.names.items(), key=lambda item: -len(item[0])):
            text = re.sub(rf"(?<![\d/]){re.escape(raw)}(?!\d)", label, text)
        return json.loads(text)

    def filenames(self) -> dict[str, str]:
        infos = self.run("query-chardev")["return"]
        return {info["label"]: info["filename"] for info in infos}

    def filename_until(self, label: str, wanted: str, timeout: float = 10.0) -> str:
        """query-chardev until ``label`` shows ``wanted`` (after normalising): a
        peer's close reaches either daemon's main loop a moment after it happens.
        Only the last query stays in the log: how many polls it took is timing."""
        deadline = time.monotonic() + timeout
        first = len(self.log)
        while True:
            shown = self.normalised(self.filenames()[label])
            if shown == wanted or time.monotonic() > deadline:
                del self.log[first:-1]
                return shown
            time.sleep(0.02)


def play_both(version: str, sequence) -> dict[str, Session]:
    sessions = {}
    for kind in ("qsd", "qmpjobd"):
        with DaemonProcess(kind, version=version) as daemon:
            session = Session(daemon)
            sequence(session)
            session.client.close()
            sessions[kind] = session
    assert sessions["qmpjobd"].normalised_log() == sessions["qsd"].normalised_log()
    return sessions


def tcp_chardev(host: str, port: str = "0", **options: object) -> dict:
    return {"type": "socket",
            "data": {"addr": {"type": "inet", "data": {"host": host, "port": port}}, **options}}


def unix_chardev(path: str, **options: object) -> dict:
    return {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": path}}, **options}}


def listening_port(session: Session, label: str) -> int:
    filename = session.filenames()[label]
    return int(re.search(r":(\d+),server=on", filename).group(1))


@pytest.mark.parametrize("version", VERSIONS)
def test_tcp_chardev_listens_accepts_and_keeps_a_closed_peer(version):
    facts = {}

    def sequence(s: Session) -> None:
        s.run("chardev-add", id="t", backend=tcp_chardev("127.0.0.1"))
        port = listening_port(s, "t")
        s.name(str(port), "PORT")
        listening = {address for address, p in tcp_listening_ports() if p == port}
        peer = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.name(str(peer.getsockname()[1]), "PEER")
        connected = s.filename_until("t", "tcp:127.0.0.1:PORT,server=on <-> 127.0.0.1:PEER")
        qom_connected = s.run("qom-get", path="/chardevs/t", property="connected")["return"]
        # A second client to the same daemon: a chardev that connects.
        s.run("chardev-add", id="tc", backend=tcp_chardev("127.0.0.1", str(port), server=False))
        s.name(re.match(r"tcp:127\.0\.0\.1:(\d+) <-> ", s.filenames()["tc"]).group(1), "TC")
        peer.close()
        # Without a frontend QEMU never reads, and a TCP peer's close raises no HUP.
        after_close = s.filenames()
        s.run("chardev-add", id="taken", backend=tcp_chardev("127.0.0.1", str(port)))
        s.run("chardev-add", id="refused", backend=tcp_chardev("127.0.0.1", "1", server=False))
        s.run("chardev-add", id="bad", backend=tcp_chardev("127.0.0.1", "nosuchservice"))
        s.run("chardev-remove", id="t")
        s.run("chardev-remove", id="tc")
        facts[s.daemon.kind] = (listening, connected, qom_connected,
                                s.normalised(after_close["t"]), port)

    sessions = play_both(version, sequence)
    for kind, (listening, connected, qom_connected, after_close, port) in facts.items():
        assert listening == {LOOPBACK_V4}, kind          # loopback only, as asked
        assert connected == "tcp:127.0.0.1:PORT,server=on <-> 127.0.0.1:PEER", kind
        assert qom_connected is True
        assert after_close == connected
        assert port not in {p for _, p in tcp_listening_ports()}, kind
    log = sessions["qmpjobd"].normalised_log()
    assert log[-5]["error"]["desc"] == ("Failed to add chardev 'taken': Failed to find an "
                                        "available port: Address already in use")
    assert "Connection refused" in log[-4]["error"]["desc"]


@pytest.mark.parametrize("version", VERSIONS)
def test_unix_chardev_accepts_a_client_and_sees_it_go(version):
    facts = {}

    def sequence(s: Session) -> None:
        path = str(s.daemon.tmp / "u.sock")
        s.run("chardev-add", id="u", backend=unix_chardev(path))
        before = s.normalised(s.filenames()["u"])
        mode = os.stat(path).st_mode & 0o777
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        connected = s.filename_until("u", "unix:DIR/u.sock,server=on")
        client.close()
        gone = s.filename_until("u", "disconnected:unix:DIR/u.sock,server=on")
        s.run("chardev-remove", id="u")
        facts[s.daemon.kind] = (before, connected, gone, os.path.exists(path), mode)

    play_both(version, sequence)
    for kind, (before, connected, gone, exists, mode) in facts.items():
        assert before == "disconnected:unix:DIR/u.sock,server=on", kind
        assert connected == "unix:DIR/u.sock,server=on", kind
        assert gone == before, kind
        assert not exists, kind                     # chardev-remove unlinks the socket
        if kind == "qmpjobd":
            assert mode == 0o600


@pytest.mark.parametrize("version", VERSIONS)
def test_pty_chardev_names_a_real_terminal(version):
    facts = {}

    def sequence(s: Session) -> None:
        backend: dict = {"type": "pty", "data": {}}
        link = s.daemon.tmp / "pty.link"
        if version != "7.2":
            backend["data"]["path"] = str(link)
        reply = s.run("chardev-add", id="p", backend=backend)
        pty = reply["return"]["pty"]
        s.name(pty, "PTY")
        filename = s.normalised(s.filenames()["p"])
        is_tty = os.path.exists(pty) and os.isatty(fd := os.open(pty, os.O_RDWR | os.O_NOCTTY))
        os.close(fd)
        linked = os.path.realpath(link) == pty if version != "7.2" else None
        s.run("chardev-remove", id="p")
        facts[s.daemon.kind] = (filename, is_tty, linked, link.exists())

    play_both(version, sequence)
    for kind, (filename, is_tty, linked, link_left) in facts.items():
        assert filename == "pty:PTY", kind
        assert is_tty, kind
        assert linked in (None, True), kind
        assert not link_left, kind


@pytest.mark.parametrize("version", VERSIONS)
def test_file_chardev_truncates_or_appends(version):
    contents = {}

    def sequence(s: Session) -> None:
        tmp: Path = s.daemon.tmp
        for name in ("trunc.out", "append.out"):
            (tmp / name).write_bytes(b"old contents\n")
        s.run("chardev-add", id="t", backend={"type": "file", "data": {"out": str(tmp / "trunc.out")}})
        s.run("chardev-add", id="a", backend={"type": "file", "data": {
            "out": str(tmp / "append.out"), "append": True}})
        s.run("chardev-add", id="l", backend={"type": "null", "data": {
            "logfile": str(tmp / "null.log")}})
        s.run("query-chardev")
        contents[s.daemon.kind] = {name: (tmp / name).read_bytes()
                                   for name in ("trunc.out", "append.out", "null.log")}

    play_both(version, sequence)
    assert contents["qmpjobd"] == contents["qsd"] == {
        "trunc.out": b"", "append.out": b"old contents\n", "null.log": b""}


def test_commands_are_listed_only_with_handlers():
    wanted = {"chardev-add", "chardev-change", "chardev-remove", "chardev-send-break",
              "ringbuf-write", "ringbuf-read", "query-chardev"}
    listed = {}
    for kind in ("qsd", "qmpjobd"):
        with DaemonProcess(kind, version="11.1") as daemon:
            client: RawClient = negotiated(daemon.sockets[0])
            client.send(b'{"execute":"query-commands"}')
            names = {c["name"] for c in json.loads(client.recv_message())["return"]}
            listed[kind] = names & wanted
            client.close()
    assert listed["qmpjobd"] == listed["qsd"] == wanted


def test_allow_dir_confines_chardev_files_and_sockets(tmp_path):
    """qmpjobd's own --allow-dir (QEMU has none): nothing is created or reached
    outside the allowed directories, and inside everything works as before."""
    outside = tmp_path / "outside"
    outside.mkdir()
    confined = DaemonProcess("qmpjobd", version="11.1")
    inside = confined.tmp      # its monitor socket lives there too
    confined.extra_args = ["--allow-dir", str(inside)]
    with confined as daemon:
        s = Session(daemon)
        for chardev_id, backend in [
                ("f", {"type": "file", "data": {"out": str(outside / "f.out")}}),
                ("l", {"type": "null", "data": {"logfile": str(outside / "l.log")}}),
                ("u", unix_chardev(str(outside / "u.sock"))),
                ("c", unix_chardev(str(outside / "c.sock"), server=False)),
                ("p", {"type": "pty", "data": {"path": str(outside / "pty")}})]:
            desc = s.run("chardev-add", id=chardev_id, backend=backend)["error"]["desc"]
            assert desc.startswith(f"Failed to add chardev '{chardev_id}': Path '{outside}/")
            assert desc.endswith("' is outside the allowed directories")
        assert list(outside.iterdir()) == []
        assert s.run("chardev-add", id="ok", backend=unix_chardev(str(inside / "ok.sock"))) == {"return": {}}
        assert (inside / "ok.sock").is_socket()
        s.client.close()
