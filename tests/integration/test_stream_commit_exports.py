"""An NBD export of a node that block-stream / block-commit work on, against
qemu-storage-daemon of every version in the same run.

QEMU's job filters (copy-on-read for a stream, commit_top for an inactive commit,
mirror_top for an active one) take over every parent of the node they go above,
the export's BlockBackend included: query-block-exports names the filter while the
job runs, a read through a streamed device's export copies up into it, writes
through the export of an actively committed top are copied into the base, and
after the pivot the export uses the base. The jobs are rate-limited to one step so
that the export's requests come while they run; the images are compared through
qemu-img map (host offsets dropped) and qemu-io pattern reads afterwards.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.integration.test_stream_commit import make_chain
from tests.support import nbd_wire as w
from tests.support.daemons import DaemonProcess
from tests.support.nbd_setup import Qmp
from tests.support.oracles import SUPPORTED_VERSIONS

MiB = 1 << 20
KiB64 = 65536


def outcome(reply: dict) -> object:
    return reply["error"]["desc"] if "error" in reply else reply["return"]


def wait_event(qmp: Qmp, name: str, **data: object) -> None:
    """Read events (also ones read past by earlier commands) until ``name``."""
    def matches(event: dict) -> bool:
        return event["event"] == name and all(event["data"].get(k) == v for k, v in data.items())
    while not any(matches(e) for e in qmp.events):
        message = json.loads(qmp.raw.recv_message())
        if "event" in message:
            message.pop("timestamp", None)
            qmp.events.append(message)


def exports(qmp: Qmp) -> list:
    # Implicit filter names carry pointer-derived digits in QEMU.
    return [(e["id"], re.sub(r"#block\d+", "#block", e["node-name"]))
            for e in qmp.ok("query-block-exports")]


def connect(sock: str, export: str) -> w.WireClient:
    client = w.WireClient(sock)
    client.greeting()
    client.client_flags(3)
    assert client.option(w.OPT_GO, w.name_payload(export))[-1][2] == hex(w.REP_ACK)
    return client


def image_map(directory, image: str) -> list:
    """qemu-img map without host offsets, adjacent alike extents merged."""
    done = subprocess.run(["qemu-img", "map", "--output=json", "-U", image], cwd=directory,
                          capture_output=True, text=True, check=True)
    merged: list[dict] = []
    for extent in json.loads(done.stdout):
        extent.pop("offset", None)
        if merged and all(merged[-1][k] == extent[k] for k in extent if k not in ("start", "length")):
            merged[-1]["length"] += extent["length"]
        else:
            merged.append(extent)
    return merged


def patterns(directory, image: str) -> list:
    """Which of the export's 64 KiB writes (0x55, 0x66, 0x77 from 3 MiB on) the
    image's own layer (or its chain) reads back."""
    found = []
    for index, pattern in enumerate((0x55, 0x66, 0x77)):
        done = subprocess.run(["qemu-io", "-f", "qcow2", "-U", "-r", "-c",
                               f"read -P {pattern:#x} {3 * MiB + index * KiB64} 64k", image],
                              cwd=directory, capture_output=True, text=True)
        if done.returncode == 0 and "verification failed" not in done.stdout:
            found.append(hex(pattern))
    return found


def add_chain(qmp: Qmp) -> None:
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        qmp.ok("blockdev-add", driver="file", filename=f"{name}.qcow2",
               **{"node-name": f"{name}-file"})
        qmp.ok("blockdev-add", driver="qcow2", file=f"{name}-file", backing=backing,
               **{"node-name": name})


def play(kind: str, version: str, session) -> list:
    daemon = DaemonProcess(kind, [], version=version)
    make_chain(daemon.tmp)
    daemon.start()
    qmp = Qmp(daemon.sockets[0])
    try:
        sock = str(daemon.tmp / "nbd.sock")
        qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        add_chain(qmp)
        out = session(qmp, sock)
        qmp.ok("block-export-del", id="e")
        wait_event(qmp, "BLOCK_EXPORT_DELETED", id="e")
        out.append([re.sub(r"#block\d+", "#block", n["node-name"])
                    for n in qmp.ok("query-named-block-nodes", flat=True)])
    finally:
        qmp.close()
        daemon.proc.terminate()
        daemon.proc.wait()
    for image in ("base", "mid", "top", "target"):
        if not (daemon.tmp / f"{image}.qcow2").exists():
            continue
        # The mirror target's map is left out: how a full mirror writes the
        # source's unallocated tail (zero clusters or nothing) is the mirror's own
        # matter, not the export's; its content is checked by the patterns.
        layout = image_map(daemon.tmp, f"{image}.qcow2") if image != "target" else None
        out.append((image, layout, patterns(daemon.tmp, f"{image}.qcow2")))
    daemon.stop()
    return out


def compare(version: str, session) -> list:
    oracle = play("qsd", version, session)
    ours = play("qmpjobd", version, session)
    assert ours == oracle
    return ours


def stream_then_cancel(qmp: Qmp, sock: str) -> list:
    out = [outcome(qmp.cmd("block-export-add", type="nbd", id="e", writable=True,
                           **{"node-name": "top"})),
           outcome(qmp.cmd("block-stream", device="top", speed=1, **{"job-id": "j"})),
           exports(qmp)]
    client = connect(sock, "top")
    # A read of mid's MiB through the filter copies it up into top.
    out.append(client.request(w.CMD_READ, MiB, MiB))
    out.append(client.request(w.CMD_WRITE, 3 * MiB, KiB64, payload=b"\x55" * KiB64))
    out.append(outcome(qmp.cmd("block-job-cancel", device="j")))
    wait_event(qmp, "JOB_STATUS_CHANGE", id="j", status="null")
    out.append(exports(qmp))
    out.append(client.request(w.CMD_WRITE, 3 * MiB + KiB64, KiB64, payload=b"\x66" * KiB64))
    client.close()
    return out


def stream_to_the_end(qmp: Qmp, sock: str) -> list:
    out = [outcome(qmp.cmd("block-export-add", type="nbd", id="e", writable=True,
                           **{"node-name": "top"})),
           outcome(qmp.cmd("block-stream", device="top", speed=1, **{"job-id": "j"})),
           exports(qmp)]
    client = connect(sock, "top")
    out.append(client.request(w.CMD_WRITE, 3 * MiB, KiB64, payload=b"\x55" * KiB64))
    out.append(outcome(qmp.cmd("block-job-set-speed", device="j", speed=0)))
    wait_event(qmp, "JOB_STATUS_CHANGE", id="j", status="null")
    out.append(exports(qmp))
    out.append(client.request(w.CMD_WRITE, 3 * MiB + 2 * KiB64, KiB64, payload=b"\x77" * KiB64))
    out.append(client.request(w.CMD_READ, 0, 4 * MiB))
    client.close()
    return out


def active_commit(qmp: Qmp, sock: str) -> list:
    out = [outcome(qmp.cmd("block-export-add", type="nbd", id="e", writable=True,
                           **{"node-name": "top"})),
           outcome(qmp.cmd("block-commit", device="top", speed=1, **{"job-id": "j"})),
           exports(qmp)]
    client = connect(sock, "top")
    out.append(client.request(w.CMD_READ, MiB, MiB))
    # Written while the mirror runs, then while it is READY: both reach the base.
    out.append(client.request(w.CMD_WRITE, 3 * MiB, KiB64, payload=b"\x55" * KiB64))
    out.append(outcome(qmp.cmd("block-job-set-speed", device="j", speed=0)))
    wait_event(qmp, "BLOCK_JOB_READY", device="j")
    out.append(client.request(w.CMD_WRITE, 3 * MiB + KiB64, KiB64, payload=b"\x66" * KiB64))
    out.append(outcome(qmp.cmd("job-complete", id="j")))
    wait_event(qmp, "JOB_STATUS_CHANGE", id="j", status="null")
    # After the pivot the export writes into the base.
    out.append(exports(qmp))
    out.append(client.request(w.CMD_WRITE, 3 * MiB + 2 * KiB64, KiB64, payload=b"\x77" * KiB64))
    out.append(client.request(w.CMD_READ, 0, 4 * MiB))
    client.close()
    return out


def inactive_commit(qmp: Qmp, sock: str) -> list:
    out = [outcome(qmp.cmd("block-export-add", type="nbd", id="e", **{"node-name": "mid"})),
           outcome(qmp.cmd("block-commit", device="top", speed=1,
                           **{"job-id": "j", "top-node": "mid"})),
           exports(qmp)]
    client = connect(sock, "mid")
    out.append(client.request(w.CMD_READ, 0, 2 * MiB))
    out.append(outcome(qmp.cmd("block-job-set-speed", device="j", speed=0)))
    wait_event(qmp, "JOB_STATUS_CHANGE", id="j", status="null")
    out.append(exports(qmp))
    out.append(client.request(w.CMD_READ, 0, 4 * MiB))
    client.close()
    return out


def mirror_pivot(qmp: Qmp, sock: str) -> list:
    """blockdev-mirror (the same mirror_top as an active commit): the export
    follows the source onto the filter and, with the pivot, onto the target."""
    directory = sock.rsplit("/", 1)[0]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "target.qcow2", "4M"],
                   cwd=directory, check=True)
    qmp.ok("blockdev-add", driver="qcow2", file={"driver": "file", "filename": "target.qcow2"},
           backing=None, **{"node-name": "target"})
    out = [outcome(qmp.cmd("block-export-add", type="nbd", id="e", writable=True,
                           **{"node-name": "top"})),
           outcome(qmp.cmd("blockdev-mirror", device="top", target="target", sync="full",
                           speed=1, **{"job-id": "j"})),
           exports(qmp)]
    client = connect(sock, "top")
    out.append(client.request(w.CMD_WRITE, 3 * MiB, KiB64, payload=b"\x55" * KiB64))
    out.append(outcome(qmp.cmd("block-job-set-speed", device="j", speed=0)))
    wait_event(qmp, "BLOCK_JOB_READY", device="j")
    out.append(client.request(w.CMD_WRITE, 3 * MiB + KiB64, KiB64, payload=b"\x66" * KiB64))
    out.append(outcome(qmp.cmd("job-complete", id="j")))
    wait_event(qmp, "JOB_STATUS_CHANGE", id="j", status="null")
    out.append(exports(qmp))
    out.append(client.request(w.CMD_WRITE, 3 * MiB + 2 * KiB64, KiB64, payload=b"\x77" * KiB64))
    client.close()
    return out


SESSIONS = [stream_then_cancel, stream_to_the_end, active_commit, inactive_commit,
            mirror_pivot]


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
@pytest.mark.parametrize("session", SESSIONS, ids=lambda s: s.__name__)
def test_export_follows_job_filter(version, session):
    out = compare(version, session)
    # The export was moved onto the filter while the job ran.
    assert ("e", "#block") in out[2]
