"""query-chardev over real sockets, against qemu-storage-daemon: TCP filenames with
the peer address, the disconnected form, a chardev without a monitor, and the order."""

from __future__ import annotations

import json
import re
import socket

from tests.support.daemons import DaemonProcess, RawClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpClient(RawClient):
    def __init__(self, port: int, timeout: float = 10.0) -> None:  # noqa: D107
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""


def negotiate(client: RawClient) -> RawClient:
    client.recv_message()
    client.send(b'{"execute":"qmp_capabilities"}')
    assert client.recv_message() == b'{"return": {}}\r\n'
    return client


def chardevs(client: RawClient) -> list[dict]:
    client.send(b'{"execute":"query-chardev"}')
    return json.loads(client.recv_message())["return"]


def normalised(infos: list[dict], daemon: DaemonProcess, ports: dict[int, str],
               peer_port: int) -> list[dict]:
    """Names for what differs between two runs: directories and port numbers."""
    out = []
    for info in infos:
        text = info["filename"].replace(str(daemon.tmp), "DIR")
        names = {**ports, peer_port: "PEER"}
        text = re.sub(r"\d+", lambda m: names.get(int(m.group()), m.group()), text)
        out.append({**info, "filename": text})
    return out


def test_query_chardev_matches_qemu_over_tcp_and_unix():
    results = {}
    for each in ("qsd", "qmpjobd"):
        tcp_port, idle_port = free_port(), free_port()
        args = ["--chardev", f"socket,id=tc,host=127.0.0.1,port={tcp_port},server=on,wait=off",
                "--monitor", "tc",
                "--chardev", f"socket,id=zidle,host=127.0.0.1,port={idle_port},server=on,wait=off",
                "--chardev", "socket,id=unused,path=unused.sock,server=on,wait=off"]
        with DaemonProcess(each, args) as daemon:
            unix = negotiate(RawClient(daemon.sockets[0]))
            before = chardevs(unix)
            tcp = negotiate(TcpClient(tcp_port))
            peer_port = tcp.sock.getsockname()[1]
            after_tcp = chardevs(unix)
            via_tcp = chardevs(tcp)
            ports = {tcp_port: "TCP", idle_port: "IDLE"}
            results[each] = [normalised(x, daemon, ports, peer_port)
                             for x in (before, after_tcp, via_tcp)]
            tcp.close()
            unix.close()
    assert results["qsd"] == results["qmpjobd"]
    before, after_tcp, _ = results["qmpjobd"]
    by_label = {info["label"]: info for info in after_tcp}
    assert by_label["tc"]["filename"] == "tcp:127.0.0.1:TCP,server=on <-> 127.0.0.1:PEER"
    assert by_label["unused"] == {"label": "unused", "frontend-open": False,
                                  "filename": "disconnected:unix:unused.sock,server=on"}
    assert {i["label"]: i["filename"] for i in before}["tc"] == "disconnected:tcp:127.0.0.1:TCP,server=on"
