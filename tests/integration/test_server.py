"""The server over real sockets: many clients, fan-out, back-pressure, quit, CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from tests.support.daemons import REPO, DaemonProcess, RawClient

CAPS = b'{"execute":"qmp_capabilities"}'


def negotiated(path: str) -> RawClient:
    client = RawClient(path)
    greeting = json.loads(client.recv_message())
    assert greeting["QMP"]["capabilities"] == ["oob"]
    client.send(CAPS)
    assert client.recv_message() == b'{"return": {}}\r\n'
    return client


def test_greeting_names_qemu_version_and_qmpjobd(daemon):
    client = RawClient(daemon.sockets[0])
    greeting = json.loads(client.recv_message())
    assert greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 2, "major": 7}
    assert greeting["QMP"]["version"]["package"].startswith("qmpjobd ")


def test_one_socket_serves_many_clients_at_once(daemon):
    clients = [negotiated(daemon.sockets[0]) for _ in range(8)]
    for i, client in enumerate(clients):
        client.send(b'{"execute":"query-jobs","id":%d}' % i)
    for i, client in enumerate(clients):
        assert client.recv_message() == b'{"return": [], "id": %d}\r\n' % i


def test_events_reach_every_negotiated_client_but_not_others(daemon):
    a, b = negotiated(daemon.sockets[0]), negotiated(daemon.sockets[0])
    silent = RawClient(daemon.sockets[0])
    silent.recv_message()  # greeting only; never negotiates
    a.send(b'{"execute":"blockdev-backup","arguments":{"device":"src","target":"tgt","sync":"full","job-id":"j0"},"id":1}')
    seen_by_a = []
    while True:
        message = a.recv_message()
        if message.startswith(b'{"return"'):
            break
        seen_by_a.append(message)
    statuses = [json.loads(m)["data"].get("status") for m in seen_by_a]
    assert statuses[0] == "created" and statuses[-1] == "null"
    # Byte-identical, timestamps included: one event, encoded once, sent to all.
    seen_by_b = [b.recv_message() for _ in seen_by_a]
    assert seen_by_b == seen_by_a
    silent.send(b'{"execute":"qmp_capabilities"}')
    assert silent.recv_message() == b'{"return": {}}\r\n'  # no event was queued for it


def test_a_client_that_never_reads_is_cut_off_and_others_keep_working(qmpjobd_factory):
    daemon = qmpjobd_factory("--max-output-bytes", "1000000")
    hog = negotiated(daemon.sockets[0])
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    good = negotiated(daemon.sockets[0])
    request = b'{"execute":"query-qmp-schema"}' * 50
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(400):  # far more output than the bound
            hog.send(request)
            time.sleep(0.001)
    good.send(b'{"execute":"query-jobs","id":"ok"}')
    assert good.recv_message() == b'{"return": [], "id": "ok"}\r\n'
    assert "disconnecting client" in daemon.stderr()


def test_disconnect_mid_stream_loses_nothing_for_others(daemon):
    other = negotiated(daemon.sockets[0])
    leaver = negotiated(daemon.sockets[0])
    leaver.send(b'{"execute":"query-jobs","id":1}{"execute":"query-')
    leaver.close()
    other.send(b'{"execute":"query-jobs","id":2}')
    assert other.recv_message() == b'{"return": [], "id": 2}\r\n'


def test_quit_replies_closes_every_connection_and_removes_the_socket(daemon):
    a, b = negotiated(daemon.sockets[0]), negotiated(daemon.sockets[0])
    a.send(b'{"execute":"quit","id":"q"}')
    assert a.recv_message() == b'{"return": {}, "id": "q"}\r\n'
    for client in (a, b):
        with pytest.raises(EOFError):
            client.recv_message()
    assert daemon.proc.wait(10) == 0
    assert not os.path.exists(daemon.sockets[0])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly(daemon, signum):
    daemon.proc.send_signal(signum)
    assert daemon.proc.wait(10) == 0
    assert not os.path.exists(daemon.sockets[0])


def test_unix_socket_is_private(daemon):
    assert stat.S_IMODE(os.stat(daemon.sockets[0]).st_mode) == 0o600


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "qmpjobd", *args], capture_output=True, text=True, timeout=timeout, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_listener_and_pidfile(tmp_path):
    port = free_port()
    pidfile = tmp_path / "pid"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "qmpjobd", "--tcp", str(port), "--pidfile", str(pidfile)], env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        greeting = sock.recv(4096)
        assert greeting.startswith(b'{"QMP": {"version": ') and greeting.endswith(b"\r\n")
        assert pidfile.read_text().strip() == str(proc.pid)
        sock.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not pidfile.exists()


def test_qsd_style_command_line_with_two_monitors(qmpjobd_factory):
    daemon = qmpjobd_factory(monitors=2, pretty={1})
    compact = RawClient(daemon.sockets[0])
    pretty = RawClient(daemon.sockets[1])
    assert compact.recv_message().startswith(b'{"QMP": ')
    assert pretty.recv_message().startswith(b'{\r\n    "QMP": {\r\n')


@pytest.mark.parametrize("option", ["--daemonize", "--trace"])
def test_unsupported_qsd_options_fail_clearly(option):
    result = run_cli(option, "x", "--socket", "/tmp/never.sock")
    assert result.returncode == 1
    assert f"option {option} of qemu-storage-daemon is not supported" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--monitor", "chardev=nope"], 'chardev "nope" not found'),
    (["--chardev", "socket,id=c0,path=/tmp/x.sock,server=on,wait=off", "--monitor", "c0,mode=readline"], "Only QMP is supported"),
    (["--chardev", "socket,id=c0,path=/tmp/x.sock,server=on,wait=off", "--monitor", "c0", "--monitor", "c0"], "Device 'c0' is in use"),
    (["--chardev", "stdio,id=c0"], "chardev backend 'stdio' is not supported"),
])
def test_bad_command_lines(args, message):
    result = run_cli(*args)
    assert result.returncode == 1
    assert message in result.stderr


def test_version_and_help():
    assert "qemu-storage-daemon 7.2" in run_cli("--version").stdout
    assert "--chardev" in run_cli("--help").stdout


def test_demo_setup_has_every_driver_and_copies_bit_exact(qmpjobd_factory):
    daemon = qmpjobd_factory("--demo", "--demo-dir", "demo")
    client = negotiated(daemon.sockets[0])
    client.send(b'{"execute":"query-named-block-nodes","arguments":{"flat":true},"id":1}')
    drivers = {node["drv"] for node in json.loads(client.recv_message())["return"]}
    assert drivers == {"null-co", "file", "raw", "blkdebug"}
    client.send(b'{"execute":"blockdev-backup","arguments":{"job-id":"b","device":"demo-disk",'
                b'"target":"demo-backup","sync":"full"},"id":2}')
    while b'"status": "null"' not in client.recv_message():
        pass
    images = daemon.tmp / "demo"
    assert (images / "disk.raw").read_bytes() == (images / "backup.raw").read_bytes()
