"""Block status and reads of qcow2 exports, against qemu-storage-daemon of every
version: base:allocation over a backing chain (data, zero clusters with and
without an allocation, unallocated clusters falling through to the backing
file, a preallocated image whose data clusters are holes of the file), the
qemu:allocation-depth of each layer, qemu-img map over NBD, and what the
clients read (the direct sendfile path and holes of structured reads).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess
from tests.support.nbd_setup import Qmp, normalise, uri
from tests.support.oracles import SUPPORTED_VERSIONS


def make_images(tmp: Path) -> None:
    def qemu_img(*args: str) -> None:
        subprocess.run(["qemu-img", *args], check=True, capture_output=True, cwd=tmp)

    def qemu_io(image: str, *commands: str) -> None:
        argv = ["qemu-io", "-f", "qcow2"]
        for command in commands:
            argv += ["-c", command]
        subprocess.run(argv + [image], check=True, capture_output=True, cwd=tmp)

    qemu_img("create", "-f", "qcow2", "base.qcow2", "4M")
    qemu_io("base.qcow2", "write -P 0x11 0 128k", "write -P 0x22 1M 64k", "write -z 2M 64k",
            "write -P 0x33 3M 64k")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("top.qcow2", "write -P 0x44 64k 128k", "write -z 1M 64k", "write -z -u 3M 64k",
            "write -P 0x55 3584k 64k")
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", "pre.qcow2", "1M")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "small.qcow2", "1M")
    qemu_io("small.qcow2", "write -P 0x66 4k 12k", "write -P 0x77 512k 4k")


NODES = [
    "--blockdev", "driver=file,filename=top.qcow2,node-name=tf",
    "--blockdev", "driver=qcow2,file=tf,node-name=top",
    "--blockdev", "driver=file,filename=pre.qcow2,node-name=pf",
    "--blockdev", "driver=qcow2,file=pf,node-name=pre",
    "--blockdev", "driver=file,filename=small.qcow2,node-name=sf",
    "--blockdev", "driver=qcow2,file=sf,node-name=small",
]


def run(argv: list[str], daemon: DaemonProcess) -> str:
    done = subprocess.run(argv, capture_output=True, timeout=60)
    text = done.stdout.decode() + done.stderr.decode()
    lines = [line for line in text.splitlines() if "ops/sec" not in line]
    return normalise(f"[exit {done.returncode}]\n" + "\n".join(lines), daemon)


def streamed(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, timeout=60)
    return f"[exit {done.returncode}] {hashlib.sha256(done.stdout).hexdigest()}"


def session(kind: str, version: str) -> list[str]:
    daemon = DaemonProcess(kind, NODES, version=version)
    make_images(daemon.tmp)
    daemon.start()
    qmp = Qmp(daemon.sockets[0])
    sock = str(daemon.tmp / "nbd.sock")
    out: list[str] = []
    try:
        qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        for node in ("top", "pre", "small"):
            qmp.ok("block-export-add", type="nbd", id=node, **{"node-name": node},
                   **{"allocation-depth": True})
        for node in ("top", "pre", "small"):
            for argv in (["nbdinfo", "--map", uri(sock, node)],
                         ["nbdinfo", "--map=qemu:allocation-depth", uri(sock, node)],
                         ["qemu-img", "map", "--output=json", uri(sock, node)]):
                out.append(run(argv, daemon))
            out.append(streamed(["nbdcopy", uri(sock, node), "-"]))
        out.append(run(["qemu-io", "-r", "-f", "raw",
                        "-c", "read -P 0x11 0 64k", "-c", "read -P 0x44 64k 128k",
                        "-c", "read -P 0 1M 64k", "-c", "read -P 0 2M 64k",
                        "-c", "read -P 0 3M 64k", "-c", "read -P 0x55 3584k 64k",
                        "-c", "read -P 0 3648k 64k", "-c", "read -P 0x11 60k 8k",
                        uri(sock, "top")], daemon))
        # Reads without structured replies (simple replies carry the zeroes too).
        out.append(run(["/usr/bin/python3", "-c", SIMPLE_READS, uri(sock, "top")], daemon))
    finally:
        qmp.close()
        daemon.stop()
    return out


SIMPLE_READS = r"""
import hashlib, sys, nbd
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
for offset, length in ((0, 4194304), (61440, 8192), (1040384, 16384), (3145728, 524288)):
    print(offset, length, hashlib.sha256(h.pread(length, offset)).hexdigest())
h.shutdown()
"""


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_qcow2_block_status_and_reads(version):
    theirs = session("qsd", version)
    ours = session("qmpjobd", version)
    assert ours == theirs
    assert "backing depth 2" in ours[1] and "zero" in ours[4]
