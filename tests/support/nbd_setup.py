"""One NBD set-up, made the same way on qmpjobd and on qemu-storage-daemon.

Nodes: ``disk`` (raw on ``disk.raw``, 4 MiB: 0xaa over the first 64 KiB, 0xbb
over 128 KiB at 1 MiB, holes elsewhere) and ``nul`` (null-co, 1 MiB,
read-zeroes, read-only). Exports over ``nbd.sock`` in the daemon's directory:
``disk`` (id e0, writable, description "Test disk", allocation-depth) and
``nul`` (id e1, read-only).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

from tests.support.daemons import DaemonProcess, RawClient

DISK_SIZE = 4 * 1024 * 1024


def make_disk(path: Path) -> None:
    with open(path, "wb") as image:
        image.write(b"\xaa" * 65536)
        image.seek(1024 * 1024)
        image.write(b"\xbb" * 131072)
        image.truncate(DISK_SIZE)


class Qmp:
    """A blocking QMP client that keeps the events it reads past."""

    def __init__(self, path: str) -> None:
        self.raw = RawClient(path)
        self.raw.recv_message()
        self.events: list[dict] = []
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, /, **arguments: object) -> dict:
        message: dict = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.raw.send(json.dumps(message))
        while True:
            reply = json.loads(self.raw.recv_message())
            if "event" in reply:
                reply.pop("timestamp", None)
                self.events.append(reply)
                continue
            return reply

    def ok(self, name: str, /, **arguments: object) -> object:
        reply = self.cmd(name, **arguments)
        assert "return" in reply, reply
        return reply["return"]

    def close(self) -> None:
        self.raw.close()


@contextlib.contextmanager
def nbd_daemon(kind: str, version: str = "7.2", *, exports: bool = True,
               max_connections: int | None = None) -> Iterator[tuple[DaemonProcess, Qmp, str]]:
    """A started daemon with the set-up above; yields (daemon, qmp, nbd socket path)."""
    daemon = DaemonProcess(kind, [
        "--blockdev", "driver=file,filename=disk.raw,node-name=f0",
        "--blockdev", "driver=raw,file=f0,node-name=disk",
        "--blockdev", "driver=null-co,node-name=nul,size=1048576,read-zeroes=on,read-only=on",
    ], version=version)
    make_disk(daemon.tmp / "disk.raw")
    daemon.start()
    qmp = Qmp(daemon.sockets[0])
    sock = str(daemon.tmp / "nbd.sock")
    try:
        if exports:
            start: dict = {"addr": {"type": "unix", "data": {"path": sock}}}
            if max_connections is not None:
                start["max-connections"] = max_connections
            qmp.ok("nbd-server-start", **start)
            qmp.ok("block-export-add", type="nbd", id="e0", **{"node-name": "disk"},
                   writable=True, description="Test disk", **{"allocation-depth": True})
            qmp.ok("block-export-add", type="nbd", id="e1", **{"node-name": "nul"})
        yield daemon, qmp, sock
    finally:
        qmp.close()
        daemon.stop()


def uri(sock: str, export: str = "disk") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def normalise(text: str, daemon: DaemonProcess) -> str:
    """Output of a client with the daemon's directory replaced by DIR."""
    return text.replace(str(daemon.tmp), "DIR").replace(os.path.realpath(daemon.tmp), "DIR")
