"""Dirty bitmaps through NBD exports, against qemu-storage-daemon of every version:
``bitmaps`` of block-export-add with QEMU's errors (not found, enabled bitmap on a
read-only export, busy, bad node or name), the exported bitmap busy while the
export lives, writes of an NBD client dirtying it, and the qemu:dirty-bitmap
context as nbdinfo --map, qemu-img map with x-dirty-bitmap and libnbd see it.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.support.oracles import SUPPORTED_VERSIONS as VERSIONS
from tests.support.nbd_setup import nbd_daemon, normalise, uri

SYSTEM_PYTHON = "/usr/bin/python3"


def run(argv: list[str], daemon) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "ops/sec" not in line]
    return normalise(f"[exit {done.returncode}]\n" + "\n".join(lines), daemon)


def bitmaps_of(qmp, node: str) -> object:
    for info in qmp.ok("query-named-block-nodes", flat=True):
        if info["node-name"] == node:
            return info.get("dirty-bitmaps")
    return None


def errors(qmp, *exports: dict) -> list:
    out = []
    for number, arguments in enumerate(exports):
        reply = qmp.cmd("block-export-add", type="nbd", id=f"x{number}", **arguments)
        out.append(reply.get("error", reply))
    return out


def session(daemon, qmp, sock) -> list:
    qmp.ok("blockdev-add", driver="null-co", **{"node-name": "nw"}, size=1048576,
           **{"read-zeroes": True})
    qmp.ok("block-dirty-bitmap-add", node="disk", name="b0")
    qmp.ok("block-dirty-bitmap-add", node="disk", name="b1", disabled=True, granularity=4096)
    qmp.ok("block-dirty-bitmap-add", node="nw", name="bn")
    qmp.ok("block-dirty-bitmap-add", node="nw", name="bd", disabled=True)
    # A raw node's file is no filter: a name is not searched there.
    qmp.ok("block-dirty-bitmap-add", node="f0", name="bf")
    out: list = [qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk"},
                         writable=True, bitmaps=["b0", "bf"])]
    out.append(qmp.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk"},
                       writable=True, bitmaps=["b0", {"node": "f0", "name": "bf"}]))
    out.append(bitmaps_of(qmp, "disk"))
    out.append(errors(
        qmp,
        {"node-name": "nw", "bitmaps": ["zz"]},
        {"node-name": "nw", "bitmaps": ["bn"]},
        {"node-name": "nw", "bitmaps": ["bd", "bn"]},
        {"node-name": "nw", "bitmaps": [{"node": "disk", "name": "b0"}]},
        {"node-name": "nw", "bitmaps": ["b0"]},
        {"node-name": "nw", "bitmaps": [{"node": "nosuch", "name": "b0"}]},
        {"node-name": "nw", "bitmaps": [{"node": "disk", "name": "zz"}]},
        {"node-name": "nw", "bitmaps": ["bd"], "writable": True, "name": "disk"},
    ))
    # A failed export left its bitmaps as they were.
    out.append(bitmaps_of(qmp, "nw"))
    out.append(qmp.cmd("block-export-add", type="nbd", id="e2", **{"node-name": "nw"},
                       bitmaps=["bd", {"node": "disk", "name": "b1"}, "bn"], writable=True))
    out += [qmp.cmd(command, node="disk", name="b0") for command in (
        "block-dirty-bitmap-remove", "block-dirty-bitmap-clear", "block-dirty-bitmap-disable")]
    out.append(run(["qemu-io", "-f", "raw", "-c", "write -P 0xcc 2M 64k",
                    "-c", "write -P 0xdd 2304k 4k", "-c", "write -z 3M 8k", uri(sock)], daemon))
    out += [run(argv, daemon) for argv in (
        ["nbdinfo", "--list", f"nbd+unix://?socket={sock}"],
        ["nbdinfo", "--map=qemu:dirty-bitmap:b0", uri(sock)],
        ["nbdinfo", "--map=qemu:dirty-bitmap:bf", uri(sock)],
        ["nbdinfo", "--map=qemu:dirty-bitmap:b1", uri(sock, "nw")],
        ["nbdinfo", "--map=qemu:dirty-bitmap:bn", uri(sock, "nw")],
        ["nbdinfo", "--map=qemu:dirty-bitmap:zz", uri(sock)],
        ["qemu-img", "map", "--output=json", "--image-opts",
         f"driver=nbd,server.type=unix,server.path={sock},export=disk,"
         "x-dirty-bitmap=qemu:dirty-bitmap:b0"],
        ["qemu-nbd", "--list", "-k", sock],
    )]
    out.append(run([SYSTEM_PYTHON, "-c", PROBE, uri(sock)], daemon))
    out.append(qmp.ok("x-debug-block-dirty-bitmap-sha256", node="disk", name="b0"))
    out.append(bitmaps_of(qmp, "disk"))
    out.append(qmp.cmd("block-export-del", id="e0"))
    out.append(qmp.cmd("block-export-del", id="e2"))
    out.append(bitmaps_of(qmp, "disk"))
    out.append(bitmaps_of(qmp, "nw"))
    out.append(qmp.cmd("block-dirty-bitmap-remove", node="disk", name="b0"))
    out.append(list(qmp.events))
    return out


# Block status of two contexts at once, one extent each (REQ_ONE), and a range
# that starts inside a granule.
PROBE = r"""
import sys, nbd
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:b0")
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
seen = []
def cb(metacontext, offset, entries, err):
    seen.append((metacontext, offset, list(entries)))
h.block_status(4194304, 0, cb)
h.block_status(1048576, 2101248, cb)
h.block_status(1048576, 2101248, cb, nbd.CMD_FLAG_REQ_ONE)
for entry in sorted(seen):
    print(entry)
h.shutdown()
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_exported_bitmaps(version):
    results = []
    for kind in ("qsd", "qmpjobd"):
        with nbd_daemon(kind, version, exports=False) as (daemon, qmp, sock):
            qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
            results.append(session(daemon, qmp, sock))
    theirs, ours = results
    assert ours == theirs
    assert ours[0]["error"]["desc"] == "Bitmap 'bf' is not found"
    assert ours[1] == {"return": {}}
    assert "1  dirty" in ours[11]
