"""Which writes dirty which bitmaps, compared with qemu-storage-daemon.

Each daemon (qsd and qmpjobd, same QEMU version, same command line) gets the
same nodes: a raw format on a file node, both opened with discard=unmap, and a
qcow2 image on its file node. Bitmaps of several granularities sit on every
node; an NBD client (qemu-io) then writes, writes zeroes (with and without
unmap) and discards through exports of the raw and the qcow2 node. The
bitmaps' BlockDirtyInfo and their sha256 must be the same on both daemons:
format nodes see guest offsets, file nodes the host offsets of what the format
wrote (for qcow2 that includes its metadata).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.nbd_setup import make_disk, uri
from tests.support.oracles import CONFORMANCE_VERSIONS

BITMAPS = [("disk", "d64", None), ("disk", "d512", 512), ("disk", "d1m", 1048576),
           ("f0", "f64", None), ("f0", "f4k", 4096),
           ("q", "q64", None), ("q", "q512", 512), ("qf", "qf64", None)]

QEMU_IO_RAW = ["-c", "write -P 0xcc 2M 64k", "-c", "write -P 0xdd 2360000 5000",
               "-c", "write -z 3M 4k", "-c", "write -z -u 1M 128k", "-c", "discard 100k 1k",
               "-c", "write -P 1 4194000 304", "-c", "flush"]
QEMU_IO_QCOW2 = ["-c", "write -P 0xcc 0 64k", "-c", "write -P 0xdd 1M 5000",
                 "-c", "write -z 2M 64k", "-c", "write -z -u 3M 64k", "-c", "discard 0 4k",
                 "-c", "write -P 2 3145728 512", "-c", "flush"]


def _start(kind: str, version: str) -> DaemonProcess:
    daemon = DaemonProcess(kind, [
        "--blockdev", "driver=file,filename=disk.raw,node-name=f0,discard=unmap",
        "--blockdev", "driver=raw,file=f0,node-name=disk,discard=unmap",
        "--blockdev", "driver=file,filename=q.qcow2,node-name=qf",
        "--blockdev", "driver=qcow2,file=qf,node-name=q",
    ], version=version)
    make_disk(daemon.tmp / "disk.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(daemon.tmp / "q.qcow2"),
                    "4M"], check=True)
    return daemon.start()


def _session_results(kind: str, version: str) -> list:
    daemon = _start(kind, version)
    try:
        qmp = QMPSession(daemon)
        out: list = []
        for node, name, granularity in BITMAPS:
            args: dict = {"node": node, "name": name}
            if granularity is not None:
                args["granularity"] = granularity
            out.append(qmp.command("block-dirty-bitmap-add", args))
        sock = str(daemon.tmp / "nbd.sock")
        out.append(qmp.command("nbd-server-start",
                               {"addr": {"type": "unix", "data": {"path": sock}}}))
        for export in ("disk", "q"):
            out.append(qmp.command("block-export-add", {"type": "nbd", "id": export,
                                                        "node-name": export,
                                                        "writable": True}))
        for export, script in (("disk", QEMU_IO_RAW), ("q", QEMU_IO_QCOW2)):
            done = subprocess.run(["qemu-io", "-f", "raw", *script, uri(sock, export)],
                                  capture_output=True, text=True, timeout=60)
            out.append([line for line in done.stdout.splitlines() if "ops/sec" not in line])
        nodes = qmp.command("query-named-block-nodes", {"flat": True})["return"]
        out.append({n["node-name"]: n.get("dirty-bitmaps") for n in nodes})
        for node, name, _ in BITMAPS:
            out.append(qmp.command("x-debug-block-dirty-bitmap-sha256",
                                   {"node": node, "name": name}))
        qmp.close()
        return out
    finally:
        daemon.stop()


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_nbd_writes_dirty_like_qemu(version):
    oracle = _session_results("qsd", version)
    ours = _session_results("qmpjobd", version)
    assert json.dumps(ours, indent=1) == json.dumps(oracle, indent=1)
    # The writes did reach the bitmaps (the comparison is not between two empty sets).
    counts = ours[-len(BITMAPS) - 1]
    assert all(info[0]["count"] > 0 for info in counts.values() if info)
