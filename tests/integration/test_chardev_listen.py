"""Where a TCP --chardev listens, against qemu-storage-daemon: ``port=`` without
``host=`` listens nowhere (QEMU 7.2 makes an address-less chardev of it), an explicit
empty ``host=`` listens on every address, and query-chardev says so in both cases."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from tests.integration.procs import free_port, negotiated, tcp_listening_ports
from tests.support.daemons import REPO, DaemonProcess, qmpjobd_command

ANY_V4 = "00000000"


def query_chardev(path: str) -> list[dict]:
    client = negotiated(path)
    client.send(b'{"execute":"query-chardev"}')
    infos = json.loads(client.recv_message())["return"]
    client.close()
    return infos


def listeners_on(port: int) -> set[str]:
    return {address for address, listening in tcp_listening_ports() if listening == port}


def play(kind: str, chardev: str, with_monitor: bool) -> tuple[list[dict], set[str]]:
    args = ["--chardev", chardev] + (["--monitor", "t"] if with_monitor else [])
    with DaemonProcess(kind, args) as daemon:
        infos = query_chardev(daemon.sockets[0])
        port = int(chardev.rsplit("port=", 1)[1].split(",")[0])
        listening = listeners_on(port)
        tmp = str(daemon.tmp)
    for info in infos:
        info["filename"] = info["filename"].replace(tmp, "DIR")
    return infos, listening


@pytest.mark.parametrize("with_monitor", [False, True])
def test_port_without_host_listens_nowhere(with_monitor):
    results = {}
    for kind in ("qsd", "qmpjobd"):
        port = free_port()
        infos, listening = play(kind, f"socket,id=t,port={port},server=on,wait=off", with_monitor)
        results[kind] = (infos, listening)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert results["qmpjobd"] == results["qsd"]
    infos, listening = results["qmpjobd"]
    assert listening == set()
    assert {"label": "t", "filename": "disconnected:fd:,server=on",
            "frontend-open": with_monitor} in infos


def test_an_empty_host_listens_on_every_address():
    results = {}
    for kind in ("qsd", "qmpjobd"):
        port = free_port()
        infos, listening = play(kind, f"socket,id=t,host=,port={port},server=on,wait=off", True)
        for info in infos:
            info["filename"] = info["filename"].replace(str(port), "PORT")
        results[kind] = (infos, ANY_V4 in listening)
    assert results["qmpjobd"] == results["qsd"]
    infos, any_v4 = results["qmpjobd"]
    assert any_v4
    assert {"label": "t", "filename": "disconnected:tcp:0.0.0.0:PORT,server=on",
            "frontend-open": True} in infos


def test_tcp_shorthand_listens_on_loopback_only():
    port = free_port()
    with DaemonProcess("qmpjobd", ["--tcp", str(port)]):
        # The unix monitor DaemonProcess waits for is created first; then the TCP one.
        deadline = time.monotonic() + 20
        while not listeners_on(port) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listeners_on(port) == {"0100007F"}


def run_qmpjobd(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(qmpjobd_command() + list(args), env=env, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_allow_dir_confines_the_sockets_the_daemon_creates(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    result = run_qmpjobd("--allow-dir", str(inside), "--socket", str(inside / "ok.sock"),
                         "--chardev", f"socket,id=c,path={outside / 'bad.sock'},server=on,wait=off")
    assert result.returncode == 1
    assert result.stderr == (f"qmpjobd: socket of 'c': Path '{outside / 'bad.sock'}' "
                             "is outside the allowed directories\n")
    assert list(inside.iterdir()) == [] and list(outside.iterdir()) == []
    # Inside: the daemon starts and serves.
    daemon = DaemonProcess("qmpjobd")
    daemon.extra_args = ["--allow-dir", str(daemon.tmp)]
    with daemon:
        negotiated(daemon.sockets[0]).close()
