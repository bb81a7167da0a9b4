"""Exports next to jobs, failing I/O and inactive nodes, against
qemu-storage-daemon of every version:

* the permission conflicts of block-export-add with running jobs (a mirror's
  target refuses every export; backup targets and mirror sources take one),
  and jobs started on an exported node;
* an export whose node fails reads or writes (blkdebug): the client gets
  QEMU's error reply, and no BLOCK_IO_ERROR event is emitted (QEMU emits it
  for guest devices only, never for an export);
* (10.0 on) exports of inactive nodes: without allow-inactive the node is
  activated; with it only READ is served, everything else fails with EPERM
  ``export is inactive``.
"""

from __future__ import annotations

import pytest

from tests.support import nbd_wire as w
from tests.support.daemons import DaemonProcess
from tests.support.nbd_setup import Qmp
from tests.support.oracles import SUPPORTED_VERSIONS

INACTIVE_VERSIONS = [v for v in SUPPORTED_VERSIONS if v != "7.2"]


def outcome(reply: dict) -> object:
    return reply["error"]["desc"] if "error" in reply else reply["return"]


def compare(session, version: str, setup=None) -> list:
    results = []
    for kind in ("qsd", "qmpjobd"):
        daemon = DaemonProcess(kind, [], version=version)
        if setup is not None:
            setup(daemon.tmp)
        daemon.start()
        qmp = Qmp(daemon.sockets[0])
        try:
            qmp.ok("nbd-server-start",
                   addr={"type": "unix", "data": {"path": str(daemon.tmp / "nbd.sock")}})
            results.append(session(daemon, qmp, str(daemon.tmp / "nbd.sock")))
        finally:
            qmp.close()
            daemon.stop()
    assert results[1] == results[0]
    return results[1]


def go(sock: str, export: str, structured: bool = True, *contexts: str) -> w.WireClient:
    client = w.WireClient(sock)
    client.greeting()
    client.client_flags(3)
    if structured:
        client.option(w.OPT_STRUCTURED_REPLY)
    if contexts:
        client.option(w.OPT_SET_META, w.meta_payload(export, *contexts))
    assert client.option(w.OPT_GO, w.name_payload(export))[-1][2] == hex(w.REP_ACK)
    return client


def jobs_session(daemon, qmp, sock) -> list:
    for node in ("src", "tgt", "m", "mt", "x"):
        qmp.ok("blockdev-add", driver="null-co", **{"node-name": node}, size=1 << 30)
    out: list = [
        outcome(qmp.cmd("blockdev-backup", **{"job-id": "b", "device": "src", "target": "tgt",
                                              "sync": "full", "speed": 1})),
        outcome(qmp.cmd("blockdev-mirror", **{"job-id": "mj", "device": "m", "target": "mt",
                                              "sync": "full", "speed": 1}))]
    for node in ("tgt", "mt", "m"):
        for writable in (True, False):
            name = f"{node}{int(writable)}"
            out.append((name, outcome(qmp.cmd("block-export-add", **{
                "type": "nbd", "id": name, "node-name": node, "writable": writable,
                "name": name}))))
    # The conflict comes before the NBD driver's own checks (a taken name).
    out.append(outcome(qmp.cmd("block-export-add", **{
        "type": "nbd", "id": "dup", "node-name": "mt", "name": "tgt1"})))
    out.append(outcome(qmp.cmd("query-block-exports")))
    qmp.ok("block-export-add", **{"type": "nbd", "id": "ex", "node-name": "x", "writable": True})
    out.append(outcome(qmp.cmd("blockdev-backup", **{"job-id": "b2", "device": "src",
                                                     "target": "x", "sync": "full", "speed": 1})))
    out.append(outcome(qmp.cmd("blockdev-mirror", **{"job-id": "m2", "device": "m",
                                                     "target": "x", "sync": "full", "speed": 1})))
    out.append(outcome(qmp.cmd("blockdev-del", **{"node-name": "x"})))
    for job in ("b", "mj", "b2"):
        qmp.cmd("block-job-cancel", device=job, force=True)
    return out


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_exports_and_running_jobs(version):
    out = compare(jobs_session, version)
    assert out[4][1].startswith("Permission conflict on node 'mt': permissions 'consistent read, write'")
    assert out[2] == ("tgt1", {})


def faulty_disk(tmp) -> None:
    (tmp / "d.raw").write_bytes(b"\x01" * (1 << 20))


def io_error_session(daemon, qmp, sock) -> list:
    image = {"driver": "file", "filename": str(daemon.tmp / "d.raw")}
    qmp.ok("blockdev-add", driver="raw", **{"node-name": "rd"}, file={
        "driver": "blkdebug", "image": image,
        "inject-error": [{"event": "read_aio", "errno": 5, "once": False}]})
    qmp.ok("blockdev-add", driver="raw", **{"node-name": "wr"}, file={
        "driver": "blkdebug", "image": image,
        "inject-error": [{"event": "write_aio", "errno": 28, "once": False}]})
    qmp.ok("block-export-add", type="nbd", id="rd", **{"node-name": "rd"})
    qmp.ok("block-export-add", type="nbd", id="wr", **{"node-name": "wr"}, writable=True)
    out: list = []
    for structured in (True, False):
        reader = go(sock, "rd", structured)
        # (A structured read that fails ends the connection: DF and CACHE first.)
        out += [reader.request(w.CMD_READ, 0, 4096, 4 if structured else 0),
                reader.request(w.CMD_CACHE, 0, 4096), reader.request(w.CMD_READ, 0, 4096),
                reader.request(w.CMD_FLUSH)]
        reader.close()
        writer = go(sock, "wr", structured)
        out += [writer.request(w.CMD_WRITE, 0, 4096, 0, b"\x02" * 4096),
                writer.request(w.CMD_WRITE, 4096, 512, 1, b"\x03" * 512),
                writer.request(w.CMD_READ, 0, 4096), writer.request(w.CMD_FLUSH)]
        writer.close()
    out.append(outcome(qmp.cmd("query-block-exports")))
    out.append(list(qmp.events))        # none: QEMU raises no BLOCK_IO_ERROR for exports
    return out


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_export_io_errors_and_no_block_io_error(version):
    out = compare(io_error_session, version, faulty_disk)
    assert out[0][0][4][0] == "error" and out[-1] == []


def inactive_session(daemon, qmp, sock) -> list:
    def active(node: str) -> object:
        return next(i.get("active") for i in qmp.ok("query-named-block-nodes", flat=True)
                    if i["node-name"] == node)

    out: list = [
        outcome(qmp.cmd("blockdev-add", **{"driver": "raw", "node-name": "a", "active": False,
                                           "file": {"driver": "file",
                                                    "filename": str(daemon.tmp / "d.raw")}})),
        outcome(qmp.cmd("blockdev-add", **{"driver": "null-co", "node-name": "b", "active": False,
                                           "size": 1 << 20, "read-zeroes": True})),
    ]
    out.append((outcome(qmp.cmd("block-export-add", **{"type": "nbd", "id": "ea",
                                                        "node-name": "a"})), active("a")))
    out.append((outcome(qmp.cmd("block-export-add", **{
        "type": "nbd", "id": "eb", "node-name": "b", "allow-inactive": True, "writable": True})),
        active("b")))
    client = go(sock, "b", True, "base:allocation")
    out += [client.request(w.CMD_READ, 0, 512), client.request(w.CMD_READ, 0, 512, 4),
            client.request(w.CMD_WRITE, 0, 512, 0, b"x" * 512),
            client.request(w.CMD_WRITE_ZEROES, 0, 512), client.request(w.CMD_TRIM, 0, 512),
            client.request(w.CMD_FLUSH), client.request(w.CMD_CACHE, 0, 512),
            client.request(w.CMD_BLOCK_STATUS, 0, 512),
            # The protocol's own checks come first.
            client.request(w.CMD_WRITE, 1 << 30, 512, 0, b"x" * 512)]
    out.append(outcome(qmp.cmd("blockdev-set-active", active=True)))
    out += [active("b"), client.request(w.CMD_WRITE, 0, 512, 0, b"y" * 512),
            client.request(w.CMD_READ, 0, 512)]
    client.close()
    out.append(outcome(qmp.cmd("blockdev-set-active", **{"node-name": "b", "active": False})))
    simple = go(sock, "b", False)
    out += [simple.request(w.CMD_WRITE, 0, 512, 0, b"z" * 512), simple.request(w.CMD_READ, 0, 512)]
    simple.close()
    # A read-only export (ea, made while "a" was inactive) lets its node go.
    out.append(outcome(qmp.cmd("blockdev-set-active", **{"node-name": "a", "active": False})))
    out.append(outcome(qmp.cmd("blockdev-set-active", active=False)))
    return out


@pytest.mark.parametrize("version", INACTIVE_VERSIONS)
def test_inactive_exports(version):
    out = compare(inactive_session, version, faulty_disk)
    assert out[2] == ({}, True) and out[3] == ({}, False)
    assert out[6][0][4] == ("error", 1, "export is inactive")


def writable_inactivation_session(daemon, qmp, sock) -> list:
    """A writable export without allow-inactive keeps its node active (by name and
    in the walk over every node); a read-only export lets its node go."""
    out = [outcome(qmp.cmd("blockdev-add", **{"driver": "null-co", "node-name": name,
                                              "size": 1 << 20}))
           for name in ("ro", "rw")]
    out.append(outcome(qmp.cmd("block-export-add", type="nbd", id="e-ro", **{"node-name": "ro"})))
    out.append(outcome(qmp.cmd("block-export-add", type="nbd", id="e-rw", writable=True,
                               **{"node-name": "rw"})))
    for args in ({"node-name": "ro"}, {"node-name": "rw"}, {}):
        out.append(outcome(qmp.cmd("blockdev-set-active", active=False, **args)))
    out.append([(i["node-name"], i.get("active"))
                for i in qmp.ok("query-named-block-nodes", flat=True)])
    return out


@pytest.mark.parametrize("version", INACTIVE_VERSIONS)
def test_writable_export_refuses_inactivation(version):
    out = compare(writable_inactivation_session, version)
    assert out[5] == "Failed to inactivate node: Operation not permitted"
    assert out[6] == "Failed to inactivate all nodes: Operation not permitted"
