#!/usr/bin/env python3
"""Drive block jobs the way libvirt does, against qmpjobd or qemu-storage-daemon.

Usage: libvirt_flows.py SOCKET FLOW [--workdir DIR]

FLOW is one of:
  push-backup   S1: transaction of blockdev-backup actions (auto-finalize on,
                auto-dismiss off), wait for `concluded`, query-jobs, job-dismiss
  cancel-backup S1's cancel path: block-job-cancel force=true while running
  create        S3: blockdev-create of a raw file, query-jobs, job-dismiss
  mirror-pivot  S7: blockdev-mirror to READY, job-complete, concluded, dismiss
  mirror-abort  S7: blockdev-mirror to READY, block-job-cancel (no pivot)
  reconnect     S10: start a job, drop the connection, reconnect and reconcile
                from query-jobs alone

Like libvirt it tags every command with "id": "libvirt-N", ends each with CRLF,
reacts to JOB_STATUS_CHANGE only (ready, pending, concluded) and ignores the legacy
BLOCK_JOB_* events. It prints one line per step so that two runs can be compared.
libvirt_chain_flows.py (snapshot, blockcommit, blockpull) and libvirt_backup_flows.py
(checkpoints, push and pull backup) reuse this monitor for qcow2 chains and bitmaps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from typing import Any


class LibvirtStyleMonitor:
    """A small synchronous QMP client with libvirt's wire habits."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.buffer = b""
        self.counter = 0
        self.events: list[dict] = []
        greeting = self._read()
        assert "QMP" in greeting, greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("monitor closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return json.loads(line)

    def command(self, name: str, **arguments: Any) -> Any:
        """Send a command and return its value; raise RuntimeError on an error reply."""
        return self.execute(name, arguments)

    def execute(self, name: str, arguments: dict[str, Any]) -> Any:
        """``command`` with the arguments as one dict (for members called ``name``)."""
        self.counter += 1
        tag = f"libvirt-{self.counter}"
        message: dict[str, Any] = {"execute": name, "id": tag}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\r\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            assert reply.get("id") == tag, f"unexpected reply {reply}"
            if "error" in reply:
                raise RuntimeError(f"{reply['error']['class']}: {reply['error']['desc']}")
            return reply["return"]

    def wait_job_status(self, job: str, wanted: set[str]) -> str:
        """Wait for JOB_STATUS_CHANGE of ``job`` to one of ``wanted`` (libvirt's view).

        Events of other jobs stay queued for their own waiters."""
        while True:
            for index, event in enumerate(self.events):
                data = event.get("data", {})
                if event["event"] == "JOB_STATUS_CHANGE" and data.get("id") == job and data["status"] in wanted:
                    # Drop this job's events up to here; keep other jobs' events.
                    self.events = [e for i, e in enumerate(self.events)
                                   if i > index or e.get("data", {}).get("id") != job]
                    return data["status"]
            self.events.append(self._read())

    def close(self) -> None:
        self.sock.close()


def job_outcome(mon: LibvirtStyleMonitor, job: str) -> str:
    """What libvirt concludes on `concluded`: query-jobs decides failed vs completed."""
    for info in mon.command("query-jobs"):
        if info["id"] == job:
            if "error" in info:
                return f"{job}: failed ({info['error']})"
            return f"{job}: completed ({info['current-progress']}/{info['total-progress']})"
    return f"{job}: vanished"


def add_null_nodes(mon: LibvirtStyleMonitor, names: list[str], size: int) -> None:
    for name in names:
        mon.command("blockdev-add", driver="null-co", **{"node-name": name, "size": size})


def flow_push_backup(mon: LibvirtStyleMonitor, out: list[str], workdir: str) -> None:
    add_null_nodes(mon, ["vda-fmt", "vdb-fmt", "vda-store", "vdb-store"], 8 << 20)
    actions = [
        {"type": "blockdev-backup", "data": {"device": f"{disk}-fmt", "job-id": f"backup-{disk}-fmt",
                                              "target": f"{disk}-store", "sync": "full",
                                              "auto-finalize": True, "auto-dismiss": False}}
        for disk in ("vda", "vdb")
    ]
    out.append(f"transaction -> {mon.command('transaction', actions=actions)}")
    for disk in ("vda", "vdb"):
        job = f"backup-{disk}-fmt"
        out.append(f"{job}: {mon.wait_job_status(job, {'concluded'})}")
        out.append(job_outcome(mon, job))
        out.append(f"job-dismiss -> {mon.command('job-dismiss', id=job)}")
    for node in ("vda-store", "vdb-store"):
        out.append(f"blockdev-del {node} -> {mon.command('blockdev-del', **{'node-name': node})}")


def flow_cancel_backup(mon: LibvirtStyleMonitor, out: list[str], workdir: str) -> None:
    add_null_nodes(mon, ["vda-fmt", "vda-store"], 64 << 20)
    job = "backup-vda-fmt"
    action = {"type": "blockdev-backup", "data": {"device": "vda-fmt", "job-id": job, "target": "vda-store",
                                                  "sync": "full", "speed": 1 << 20,
                                                  "auto-finalize": True, "auto-dismiss": False}}
    out.append(f"transaction -> {mon.command('transaction', actions=[action])}")
    out.append(f"block-job-cancel -> {mon.command('block-job-cancel', device=job, force=True)}")
    out.append(f"{job}: {mon.wait_job_status(job, {'concluded'})}")
    out.append(job_outcome(mon, job))
    out.append(f"job-dismiss -> {mon.command('job-dismiss', id=job)}")


def flow_create(mon: LibvirtStyleMonitor, out: list[str], workdir: str) -> None:
    image = os.path.join(workdir, "created.raw")
    job = "create-vda-storage"
    options = {"driver": "file", "filename": image, "size": 4 << 20}
    out.append(f"blockdev-create -> {mon.command('blockdev-create', **{'job-id': job, 'options': options})}")
    out.append(f"{job}: {mon.wait_job_status(job, {'concluded'})}")
    out.append(job_outcome(mon, job))
    out.append(f"job-dismiss -> {mon.command('job-dismiss', id=job)}")
    out.append(f"image size: {os.path.getsize(image)}")
    bad = "create-bad"
    options = {"driver": "file", "filename": os.path.join(workdir, "no", "such", "dir.raw"), "size": 1 << 20}
    out.append(f"blockdev-create -> {mon.command('blockdev-create', **{'job-id': bad, 'options': options})}")
    out.append(f"{bad}: {mon.wait_job_status(bad, {'concluded'})}")
    out.append(job_outcome(mon, bad))
    out.append(f"job-dismiss -> {mon.command('job-dismiss', id=bad)}")


def make_image(path: str, size: int) -> None:
    with open(path, "wb") as f:
        block = os.urandom(1 << 16)
        for offset in range(0, size, len(block)):
            f.write(block[: min(len(block), size - offset)])


def flow_mirror(mon: LibvirtStyleMonitor, out: list[str], workdir: str, pivot: bool) -> None:
    src, dst = os.path.join(workdir, "src.raw"), os.path.join(workdir, "dst.raw")
    make_image(src, 4 << 20)
    make_image(dst, 4 << 20)
    for name, path in (("vda-src", src), ("vda-dst", dst)):
        mon.command("blockdev-add", driver="raw", **{"node-name": name},
                    file={"driver": "file", "filename": path})
    job = "copy-vda-src"
    out.append("blockdev-mirror -> " + str(mon.command(
        "blockdev-mirror", **{"job-id": job, "device": "vda-src", "target": "vda-dst", "sync": "full",
                              "auto-finalize": True, "auto-dismiss": False})))
    out.append(f"{job}: {mon.wait_job_status(job, {'ready'})}")
    if pivot:
        out.append(f"job-complete -> {mon.command('job-complete', id=job)}")
    else:
        out.append(f"block-job-cancel -> {mon.command('block-job-cancel', device=job)}")
    out.append(f"{job}: {mon.wait_job_status(job, {'concluded'})}")
    out.append(job_outcome(mon, job))
    out.append(f"job-dismiss -> {mon.command('job-dismiss', id=job)}")
    with open(src, "rb") as a, open(dst, "rb") as b:
        out.append(f"target identical to source: {a.read() == b.read()}")


def flow_reconnect(path: str, out: list[str]) -> None:
    first = LibvirtStyleMonitor(path)
    add_null_nodes(first, ["vda-fmt", "vda-store"], 8 << 20)
    job = "backup-vda-fmt"
    first.command("blockdev-backup", device="vda-fmt", target="vda-store", sync="full",
                  **{"job-id": job, "auto-finalize": True, "auto-dismiss": False})
    first.close()  # libvirtd goes away; the job finishes without anyone listening
    second = LibvirtStyleMonitor(path)
    for info in second.command("query-jobs"):
        out.append(f"reconnect sees {info['id']} {info['status']} error={info.get('error')}")
        if info["status"] == "concluded":
            out.append(f"job-dismiss -> {second.command('job-dismiss', id=info['id'])}")
    out.append(f"query-jobs -> {second.command('query-jobs')}")
    second.close()


def run(path: str, flow: str, workdir: str) -> list[str]:
    out: list[str] = []
    if flow == "reconnect":
        flow_reconnect(path, out)
        return out
    mon = LibvirtStyleMonitor(path)
    try:
        if flow == "push-backup":
            flow_push_backup(mon, out, workdir)
        elif flow == "cancel-backup":
            flow_cancel_backup(mon, out, workdir)
        elif flow == "create":
            flow_create(mon, out, workdir)
        elif flow in ("mirror-pivot", "mirror-abort"):
            flow_mirror(mon, out, workdir, pivot=flow == "mirror-pivot")
        else:
            raise SystemExit(f"unknown flow {flow}")
    finally:
        mon.close()
    return out


FLOWS = ("push-backup", "cancel-backup", "create", "mirror-pivot", "mirror-abort", "reconnect")


def cli_main(doc: str, flows: "tuple[str, ...]", run_one: Any) -> int:
    """The command line of every flow script: SOCKET FLOW [--workdir DIR]; prints
    the flow's step lines."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("socket")
    parser.add_argument("flow", choices=flows)
    parser.add_argument("--workdir", default=None, help="where image files go (default: a new temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="qmpjobd-example-")
    for line in run_one(args.socket, args.flow, workdir):
        print(line)
    return 0


def main() -> int:
    return cli_main(__doc__ or "", FLOWS, run)


if __name__ == "__main__":
    sys.exit(main())
