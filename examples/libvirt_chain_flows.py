#!/usr/bin/env python3
"""libvirt's backing-chain flows (snapshot, blockcommit, blockpull) against qmpjobd or
qemu-storage-daemon.

Usage: libvirt_chain_flows.py SOCKET FLOW [--workdir DIR]

FLOW is one of:
  external-snapshot  virsh snapshot-create-as --disk-only: blockdev-add of the
                     pre-created overlay file, blockdev-create qcow2 with
                     backing-file/backing-fmt, blockdev-add with backing null,
                     transaction [blockdev-snapshot]; then guest writes through NBD
  external-snapshot-checkpoint
                     the same with checkpoint c1 on the disk, propagated to the
                     overlay by a block-dirty-bitmap-add in the snapshot transaction
  commit-inactive    virsh blockcommit --top mid --base base: block-commit with
                     top-node/base-node/backing-file, concluded, dismiss, blockdev-del
                     of the merged image
  snapshot-delete    virsh snapshot-delete of the non-active image mid: block-commit
                     with auto-finalize false, PENDING, job-finalize, concluded,
                     dismiss, blockdev-del, file removed
  commit-pivot       virsh blockcommit --active --pivot: READY, transaction with the
                     libvirt-tmp-activewrite bitmap, job-complete, concluded, dismiss,
                     blockdev-del of the old top
  commit-abort       virsh blockcommit --active, then blockjob --abort: READY,
                     block-job-cancel (no pivot), concluded, dismiss
  commit-pivot-live / commit-abort-live
                     the same while the guest (an NBD export of the top) writes
                     during READY and after the job ended
  commit-reconnect   libvirtd restarts while an active commit is READY: a new
                     connection reads query-jobs, sends job-complete, finishes
  pull               virsh blockpull: block-stream of the whole chain into the top
  pull-base          virsh blockpull --base base: block-stream down to base-node,
                     then blockdev-del of the image that left the chain
  refusals           QEMU's errors for libvirt-relevant mistakes (snapshot of a node
                     in use, commit without backing, stream with a base outside
                     the chain, ...) and a snapshot transaction rolled
                     back by a failing later action

The images are made with qemu-img and filled with qemu-io before the daemon opens
them, so every layer holds its own guest data. Every flow ends the way a VM shutdown
ends: blockdev-del of all nodes, so the images are closed and flushed; then it prints
a digest of every image (guest-visible sha256, qemu-img map without host offsets,
qemu-img check counts, backing file). Paths print as given, so two runs in different
work directories compare after replacing the directory.

The wire habits (ids, CRLF, JOB_STATUS_CHANGE only) are libvirt_flows.py's
LibvirtStyleMonitor; the commands and arguments are libvirt's (qemu_block.c,
qemu_blockjob.c, qemu_snapshot.c, qemu_monitor_json.c as summarised in
shared/reference/qcow2-and-chains.md section 6).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from libvirt_flows import LibvirtStyleMonitor, cli_main, job_outcome  # noqa: E402


class ChainMonitor(LibvirtStyleMonitor):
    """LibvirtStyleMonitor that remembers its socket path for a reconnect (commands
    with a member called ``name`` go through the base class's ``execute``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(path)


DISK_SIZE = 4 << 20
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")

# Guest data of each layer: (pattern byte, offset, length). The layers overlap so
# that which layer wins at an offset shows in the merged content.
LAYER_WRITES = {
    "base": [(0x11, 0, 1 << 20), (0x12, 2 << 20, 256 << 10)],
    "mid": [(0x21, 512 << 10, 1 << 20), (0x22, 3 << 20, 64 << 10)],
    "top": [(0x31, 768 << 10, 128 << 10), (0x32, (3 << 20) + (32 << 10), 64 << 10)],
}


# ---------------------------------------------------------------- images and tools

def run_tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def checked_tool(*argv: str) -> str:
    done = run_tool(*argv)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def qemu_io_writes(target: list[str], writes: list[tuple[int, int, int]]) -> None:
    """Write patterns with qemu-io; ``target`` is e.g. ["-f", "qcow2", path]."""
    commands: list[str] = []
    for pattern, offset, length in writes:
        commands += ["-c", f"write -q -P {pattern:#x} {offset} {length}"]
    checked_tool(QEMU_IO, *commands, *target)


def make_chain(workdir: str, layers: list[str]) -> dict[str, str]:
    """qcow2 images base <- ... <- last, each holding LAYER_WRITES[layer]."""
    paths: dict[str, str] = {}
    below: str | None = None
    for layer in layers:
        path = os.path.join(workdir, f"{layer}.qcow2")
        backing = ["-b", below, "-F", "qcow2"] if below else []
        checked_tool(QEMU_IMG, "create", "-q", "-f", "qcow2", *backing, path, str(DISK_SIZE))
        qemu_io_writes(["-f", "qcow2", path], LAYER_WRITES[layer])
        paths[layer] = path
        below = path
    return paths


def guest_sha256(path: str, fmt: str = "qcow2") -> str:
    """sha256 of the guest-visible content (the backing chain included)."""
    with tempfile.TemporaryDirectory() as scratch:
        raw = os.path.join(scratch, "content.raw")
        checked_tool(QEMU_IMG, "convert", "-f", fmt, "-O", "raw", path, raw)
        digest = hashlib.sha256()
        with open(raw, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def image_map(path: str) -> list[dict]:
    """qemu-img map --output=json without host offsets (they depend on timing)."""
    extents = json.loads(checked_tool(QEMU_IMG, "map", "--output=json", "-f", "qcow2", path))
    for extent in extents:
        extent.pop("offset", None)
    return extents


def image_check(path: str) -> str:
    done = run_tool(QEMU_IMG, "check", "--output=json", "-f", "qcow2", path)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        return f"rc={done.returncode} {done.stderr.strip()}"
    counts = {key: result.get(key, 0) for key in ("check-errors", "corruptions", "leaks")}
    return f"rc={done.returncode} {counts}"


def image_backing(path: str) -> str | None:
    info = json.loads(checked_tool(QEMU_IMG, "info", "--output=json", "-f", "qcow2", path))
    return info.get("backing-filename")


def persistent_bitmaps(path: str) -> str:
    """The bitmaps stored in the qcow2 file (name, granularity, flags)."""
    info = json.loads(checked_tool(QEMU_IMG, "info", "--output=json", "-f", "qcow2", path))
    return json.dumps(info.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def image_digest(path: str) -> list[str]:
    """The lines that say what an image holds, comparable between two runs."""
    name = os.path.basename(path)
    return [
        f"image {name}: backing={image_backing(path)} sha256={guest_sha256(path)}",
        f"image {name}: map={json.dumps(image_map(path))}",
        f"image {name}: check {image_check(path)}",
        f"image {name}: persistent bitmaps {persistent_bitmaps(path)}",
    ]


# ---------------------------------------------------------------- libvirt's steps

class Disk:
    """One disk's chain as libvirt names it: libvirt-N-storage / libvirt-N-format.

    ``images`` lists (node number, path) from the top down."""

    def __init__(self, target: str = "vda") -> None:
        self.target = target
        self.counter = 0
        self.images: list[tuple[int, str]] = []

    def next_index(self) -> int:
        self.counter += 1
        return self.counter


def storage(index: int) -> str:
    return f"libvirt-{index}-storage"


def fmt(index: int) -> str:
    return f"libvirt-{index}-format"


def add_storage_node(mon: ChainMonitor, index: int, path: str) -> None:
    mon.command("blockdev-add", driver="file", filename=path, **{
        "node-name": storage(index), "auto-read-only": True, "discard": "unmap"})


def add_format_node(mon: ChainMonitor, index: int, backing: str | None) -> None:
    # libvirt always terminates the chain itself (backing null), never letting QEMU
    # open backing files from the header.
    mon.command("blockdev-add", driver="qcow2", file=storage(index), backing=backing, **{
        "node-name": fmt(index), "read-only": False})


def open_chain(mon: ChainMonitor, disk: Disk, paths: list[str]) -> None:
    """blockdev-add of an existing chain, given bottom first (libvirt's -blockdev order)."""
    below: str | None = None
    for path in paths:
        index = disk.next_index()
        add_storage_node(mon, index, path)
        add_format_node(mon, index, below)
        below = fmt(index)
        disk.images.insert(0, (index, path))


def finish_job(mon: ChainMonitor, out: list[str], job: str) -> None:
    """libvirt on `concluded`: query-jobs decides the outcome, then job-dismiss."""
    out.append(f"{job}: {mon.wait_job_status(job, {'concluded'})}")
    out.append(job_outcome(mon, job))
    out.append(f"job-dismiss -> {mon.command('job-dismiss', id=job)}")


def create_qcow2_image(mon: ChainMonitor, out: list[str], index: int, path: str,
                       backing_path: str | None) -> None:
    """libvirt's qemuBlockStorageSourceCreate for a local qcow2 file."""
    open(path, "wb").close()  # libvirt creates local files itself (security labels)
    add_storage_node(mon, index, path)
    options: dict[str, Any] = {"driver": "qcow2", "file": storage(index), "size": DISK_SIZE}
    if backing_path is not None:
        options.update({"backing-file": backing_path, "backing-fmt": "qcow2"})
    job = f"create-{fmt(index)}"
    out.append(f"blockdev-create -> {mon.command('blockdev-create', **{'job-id': job, 'options': options})}")
    finish_job(mon, out, job)


def image_facts(image: dict[str, Any]) -> str:
    """The image members libvirt uses (qemuBlockGetNamedNodeData): capacity, and for
    qcow2 the cluster size and extended-L2 flag a new overlay inherits. actual-size
    is left out: it depends on how the file system allocated the file."""
    data = image.get("format-specific", {}).get("data", {})
    return (f"size={image.get('virtual-size')} cluster={image.get('cluster-size')} "
            f"extended-l2={data.get('extended-l2')} backing-filename={image.get('backing-filename')}")


def node_lines(mon: LibvirtStyleMonitor) -> list[str]:
    """What libvirt reads from query-named-block-nodes (flat), one line per node."""
    lines = []
    for node in sorted(mon.command("query-named-block-nodes", flat=True), key=lambda n: n["node-name"]):
        # An implicit node's number counts every node QEMU ever created: not comparable.
        name = re.sub(r"^#block\d+$", "#block<N>", node["node-name"])
        # A protocol node's size is the file's length: host layout, which may differ.
        facts = "" if node["drv"] == "file" else " " + image_facts(node["image"])
        lines.append(f"node {name}: drv={node['drv']} ro={node['ro']} file={node['file']} "
                     f"backing_file={node.get('backing_file')} depth={node['backing_file_depth']}{facts}")
    return lines


def bitmap_lines(mon: ChainMonitor, nodes: list[str]) -> list[str]:
    """The dirty-bitmaps members libvirt reads from query-named-block-nodes (flat)."""
    fields = ("name", "recording", "persistent", "busy", "granularity", "count", "inconsistent")
    found = {info["node-name"]: info for info in mon.command("query-named-block-nodes", flat=True)}
    lines = []
    for node in nodes:
        if node not in found:
            lines.append(f"bitmaps of {node}: no such node")
            continue
        bitmaps = [{k: b[k] for k in fields if k in b} for b in found[node].get("dirty-bitmaps", [])]
        lines.append(f"bitmaps of {node}: {json.dumps(bitmaps)}")
    return lines


def detach(mon: ChainMonitor, out: list[str], index: int) -> None:
    """qemuBlockStorageSourceChainDetach of one image: format node, then storage node."""
    for node in (fmt(index), storage(index)):
        out.append(f"blockdev-del {node} -> {mon.command('blockdev-del', **{'node-name': node})}")


def shut_down(mon: ChainMonitor, out: list[str], disk: Disk) -> None:
    """Close every image of the disk, top first, as when the VM goes away."""
    for index, _ in disk.images:
        detach(mon, out, index)


def print_digests(out: list[str], paths: list[str]) -> None:
    for path in paths:
        out.extend(image_digest(path))


# ---------------------------------------------------------------- the flows

def start_guest(mon: ChainMonitor, workdir: str, node: str) -> str:
    """A storage daemon has no guest: a writable NBD export stands in for it.
    Returns the URI the guest writes to."""
    sock = os.path.join(workdir, "guest.sock")
    mon.command("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    mon.execute("block-export-add", {"type": "nbd", "id": "guest", "node-name": node,
                                     "name": "guest", "writable": True})
    return f"nbd+unix:///guest?socket={sock}"


def guest_write_through_nbd(mon: ChainMonitor, workdir: str, node: str,
                            writes: list[tuple[int, int, int]]) -> None:
    qemu_io_writes(["-f", "raw", start_guest(mon, workdir, node)], writes)
    mon.command("nbd-server-stop")


def flow_external_snapshot(mon: ChainMonitor, out: list[str], workdir: str,
                           checkpoint: bool = False) -> None:
    paths = make_chain(workdir, ["base"])
    disk = Disk()
    open_chain(mon, disk, [paths["base"]])
    old_index, old_path = disk.images[0]
    actions: list[dict[str, Any]] = []
    if checkpoint:
        # A checkpoint on the disk: qemuSnapshotDiskBitmapsPropagate copies it to the
        # overlay inside the snapshot transaction.
        bitmap = {"node": fmt(old_index), "name": "c1", "persistent": True, "disabled": False}
        out.append(f"block-dirty-bitmap-add -> {mon.execute('block-dirty-bitmap-add', bitmap)}")
    overlay = os.path.join(workdir, "snap1.qcow2")
    index = disk.next_index()
    create_qcow2_image(mon, out, index, overlay, old_path)
    add_format_node(mon, index, None)
    if checkpoint:
        actions.append({"type": "block-dirty-bitmap-add",
                        "data": {"node": fmt(index), "name": "c1", "persistent": True,
                                 "disabled": False, "granularity": 65536}})
    actions.append({"type": "blockdev-snapshot", "data": {"node": fmt(old_index), "overlay": fmt(index)}})
    out.append(f"transaction -> {mon.command('transaction', actions=actions)}")
    disk.images.insert(0, (index, overlay))
    out.extend(node_lines(mon))
    guest_write_through_nbd(mon, workdir, fmt(index), [(0x41, 640 << 10, 256 << 10)])
    if checkpoint:
        out.extend(bitmap_lines(mon, [fmt(index), fmt(old_index)]))
    shut_down(mon, out, disk)
    print_digests(out, [overlay, paths["base"]])


def has_backing_mask_protocol(mon: ChainMonitor, command: str) -> bool:
    """libvirt's schema probe `<command>/arg-type/backing-mask-protocol` (QEMU 8.0+)."""
    schema = {entry["name"]: entry for entry in mon.command("query-qmp-schema")}
    arg_type = schema[command]["arg-type"]
    return any(member["name"] == "backing-mask-protocol" for member in schema[arg_type]["members"])


def block_commit(mon: ChainMonitor, out: list[str], disk: Disk, top: int, base: int,
                 backing_file: str | None, auto_finalize: bool = True) -> str:
    """qemuMonitorJSONBlockCommit with libvirt's arguments; returns the job id."""
    job = f"commit-{disk.target}-{fmt(top)}"
    arguments: dict[str, Any] = {"device": fmt(disk.images[0][0]), "job-id": job,
                                 "top-node": fmt(top), "base-node": fmt(base)}
    if backing_file is not None:
        arguments["backing-file"] = backing_file
    arguments.update({"auto-finalize": auto_finalize, "auto-dismiss": False})
    if has_backing_mask_protocol(mon, "block-commit"):
        arguments["backing-mask-protocol"] = True
    out.append(f"block-commit -> {mon.command('block-commit', **arguments)}")
    return job


def flow_commit_inactive(mon: ChainMonitor, out: list[str], workdir: str) -> None:
    paths = make_chain(workdir, ["base", "mid", "top"])
    disk = Disk()
    open_chain(mon, disk, [paths["base"], paths["mid"], paths["top"]])
    (_, _), (mid, _), (base, base_path) = disk.images
    job = block_commit(mon, out, disk, mid, base, base_path)
    finish_job(mon, out, job)
    out.extend(node_lines(mon))
    detach(mon, out, mid)  # the merged image leaves the chain
    disk.images = [image for image in disk.images if image[0] != mid]
    shut_down(mon, out, disk)
    print_digests(out, [paths["top"], paths["base"]])


def flow_snapshot_delete(mon: ChainMonitor, out: list[str], workdir: str) -> None:
    """qemuSnapshotDiscardExternal of a non-active snapshot image: the commit runs
    with auto-finalize false, libvirt waits for PENDING and sends job-finalize; the
    graph changes only then. With --delete the merged file is removed."""
    paths = make_chain(workdir, ["base", "mid", "top"])
    disk = Disk()
    open_chain(mon, disk, [paths["base"], paths["mid"], paths["top"]])
    (top, _), (mid, _), (base, base_path) = disk.images
    job = block_commit(mon, out, disk, mid, base, base_path, auto_finalize=False)
    out.append(f"{job}: {mon.wait_job_status(job, {'pending'})}")
    out.extend(node_lines(mon))  # still the old graph
    out.append(f"job-finalize -> {mon.command('job-finalize', id=job)}")
    finish_job(mon, out, job)
    out.extend(node_lines(mon))
    detach(mon, out, mid)
    os.unlink(paths["mid"])
    disk.images = [image for image in disk.images if image[0] != mid]
    shut_down(mon, out, disk)
    print_digests(out, [paths["top"], paths["base"]])


# Guest writes while an active commit is READY, and after it ended.
WRITES_WHILE_READY = [(0x81, 256 << 10, 64 << 10), (0x82, (2 << 20) + (128 << 10), 4096)]
WRITES_AFTER_JOB = [(0x91, 320 << 10, 64 << 10)]


def flow_commit_active(mon: ChainMonitor, out: list[str], workdir: str, pivot: bool,
                       live: bool = False) -> None:
    """With ``live`` the guest (an NBD export of the top, made before the job so the
    job's filter takes it over) writes while READY and again after the job: after a
    pivot those writes land in the base, after an abort in the top."""
    paths = make_chain(workdir, ["base", "top"])
    disk = Disk()
    open_chain(mon, disk, [paths["base"], paths["top"]])
    (top, _), (base, _) = disk.images
    guest = start_guest(mon, workdir, fmt(top)) if live else None
    job = block_commit(mon, out, disk, top, base, None)
    out.append(f"{job}: {mon.wait_job_status(job, {'ready'})}")
    if guest:
        qemu_io_writes(["-f", "raw", guest], WRITES_WHILE_READY)
    if pivot:
        # qemuBlockPivot: a temporary bitmap on the base catches writes around the
        # switch, then job-complete.
        bitmap = {"type": "block-dirty-bitmap-add",
                  "data": {"node": fmt(base), "name": "libvirt-tmp-activewrite",
                           "persistent": False, "disabled": False}}
        out.append(f"transaction -> {mon.command('transaction', actions=[bitmap])}")
        out.append(f"job-complete -> {mon.command('job-complete', id=job)}")
    else:
        out.append(f"block-job-cancel -> {mon.command('block-job-cancel', device=job)}")
    finish_job(mon, out, job)
    out.extend(node_lines(mon))
    if guest:
        qemu_io_writes(["-f", "raw", guest], WRITES_AFTER_JOB)
        out.append(f"nbd-server-stop -> {mon.command('nbd-server-stop')}")
    if pivot:
        detach(mon, out, top)  # the disk now runs on the base
        disk.images = disk.images[1:]
    shut_down(mon, out, disk)
    print_digests(out, [paths["top"], paths["base"]])


def flow_commit_reconnect(mon: ChainMonitor, out: list[str], workdir: str) -> None:
    """libvirtd restarts while an active commit is READY: the new connection learns
    the job's state from query-jobs alone (qemuBlockJobRefreshJobs), then pivots."""
    paths = make_chain(workdir, ["base", "top"])
    disk = Disk()
    open_chain(mon, disk, [paths["base"], paths["top"]])
    (top, _), (base, _) = disk.images
    job = block_commit(mon, out, disk, top, base, None)
    out.append(f"{job}: {mon.wait_job_status(job, {'ready'})}")
    # One more round trip before hanging up: its reply comes after the legacy
    # BLOCK_JOB_READY that follows JOB_STATUS_CHANGE. Hanging up in between, the
    # real daemon (seen with 11.1) can hand that event to the next connection
    # before its greeting, since the monitor outlives the connection.
    mon.command("query-jobs")
    mon.close()
    again = ChainMonitor(mon.path)
    try:
        for info in again.command("query-jobs"):
            out.append(f"reconnect sees {info['id']} {info['type']} {info['status']} "
                       f"{info['current-progress']}/{info['total-progress']} error={info.get('error')}")
        out.append(f"job-complete -> {again.command('job-complete', id=job)}")
        finish_job(again, out, job)
        out.extend(node_lines(again))
        detach(again, out, top)
        disk.images = disk.images[1:]
        shut_down(again, out, disk)
    finally:
        again.close()
    print_digests(out, [paths["top"], paths["base"]])


def flow_pull(mon: ChainMonitor, out: list[str], workdir: str, with_base: bool) -> None:
    paths = make_chain(workdir, ["base", "mid", "top"])
    disk = Disk()
    open_chain(mon, disk, [paths["base"], paths["mid"], paths["top"]])
    (top, _), (mid, _), (base, base_path) = disk.images
    job = f"pull-{disk.target}-{fmt(top)}"
    arguments: dict[str, Any] = {"device": fmt(top), "job-id": job}
    if with_base:
        arguments.update({"base-node": fmt(base), "backing-file": base_path})
    arguments.update({"auto-finalize": True, "auto-dismiss": False})
    if has_backing_mask_protocol(mon, "block-stream"):
        arguments["backing-mask-protocol"] = True
    out.append(f"block-stream -> {mon.command('block-stream', **arguments)}")
    finish_job(mon, out, job)
    out.extend(node_lines(mon))
    # The images between the top and the base (all of them without a base) left the chain.
    dropped = [mid] if with_base else [mid, base]
    for index in dropped:
        detach(mon, out, index)
    disk.images = [image for image in disk.images if image[0] not in dropped]
    shut_down(mon, out, disk)
    print_digests(out, [paths["top"], paths["mid"], paths["base"]])


def attempt(out: list[str], label: str, send: Callable[[], Any]) -> None:
    """A step libvirt can get wrong (or a user can): QEMU's refusal is the result."""
    try:
        out.append(f"{label} -> {send()}")
    except RuntimeError as error:
        out.append(f"{label} refused: {error}")


def flow_refusals(mon: ChainMonitor, out: list[str], workdir: str) -> None:
    """The refusals libvirt relays to the user for snapshot/commit/pull mistakes, and
    a snapshot transaction that a later action aborts (the chain must stay as it was)."""
    paths = make_chain(workdir, ["base", "top"])
    disk = Disk()
    open_chain(mon, disk, [paths["base"], paths["top"]])
    (top, _), (base, base_path) = disk.images
    attempt(out, "blockdev-snapshot of a backing image onto the top", lambda: mon.command(
        "blockdev-snapshot", node=fmt(base), overlay=fmt(top)))
    attempt(out, "block-commit of a top without backing", lambda: mon.command(
        "block-commit", device=fmt(top), **{"job-id": "commit-bad-1", "top-node": fmt(base)}))
    attempt(out, "block-commit with top == base", lambda: mon.command(
        "block-commit", device=fmt(top), **{"job-id": "commit-bad-2", "top-node": fmt(top),
                                            "base-node": fmt(top)}))
    attempt(out, "block-stream with a base outside the chain", lambda: mon.command(
        "block-stream", device=fmt(base), **{"job-id": "pull-bad", "base-node": fmt(top)}))
    attempt(out, "job-complete of no job", lambda: mon.command("job-complete", id="commit-vda-none"))
    attempt(out, "blockdev-del of a backing image", lambda: mon.command(
        "blockdev-del", **{"node-name": fmt(base)}))

    overlay = os.path.join(workdir, "snap1.qcow2")
    index = disk.next_index()
    create_qcow2_image(mon, out, index, overlay, paths["top"])
    add_format_node(mon, index, None)
    actions = [{"type": "blockdev-snapshot", "data": {"node": fmt(top), "overlay": fmt(index)}},
               {"type": "block-dirty-bitmap-add", "data": {"node": "no-such-node", "name": "c1",
                                                          "persistent": True, "disabled": False}}]
    attempt(out, "transaction [blockdev-snapshot, failing bitmap add]",
            lambda: mon.command("transaction", actions=actions))
    out.extend(node_lines(mon))
    disk.images.insert(0, (index, overlay))
    shut_down(mon, out, disk)
    print_digests(out, [overlay, paths["top"], paths["base"]])


FLOW_FUNCTIONS: dict[str, Callable[[ChainMonitor, list[str], str], None]] = {
    "external-snapshot": flow_external_snapshot,
    "external-snapshot-checkpoint":
        lambda mon, out, workdir: flow_external_snapshot(mon, out, workdir, checkpoint=True),
    "commit-inactive": flow_commit_inactive,
    "snapshot-delete": flow_snapshot_delete,
    "commit-pivot": lambda mon, out, workdir: flow_commit_active(mon, out, workdir, pivot=True),
    "commit-abort": lambda mon, out, workdir: flow_commit_active(mon, out, workdir, pivot=False),
    "commit-pivot-live": lambda mon, out, workdir: flow_commit_active(mon, out, workdir, pivot=True, live=True),
    "commit-abort-live": lambda mon, out, workdir: flow_commit_active(mon, out, workdir, pivot=False, live=True),
    "commit-reconnect": flow_commit_reconnect,
    "pull": lambda mon, out, workdir: flow_pull(mon, out, workdir, with_base=False),
    "pull-base": lambda mon, out, workdir: flow_pull(mon, out, workdir, with_base=True),
    "refusals": flow_refusals,
}
FLOWS = tuple(FLOW_FUNCTIONS)


def run_flow(path: str, function: Callable[[ChainMonitor, list[str], str], None],
             workdir: str) -> list[str]:
    """Run one flow; a command error ends it with an `error:` line (still comparable)."""
    out: list[str] = []
    mon = ChainMonitor(path)
    try:
        function(mon, out, workdir)
    except RuntimeError as error:
        out.append(f"error: {error}")
    finally:
        mon.close()
    return out


def flow_runner(functions: dict[str, Callable]) -> Callable[[str, str, str], list[str]]:
    """``run(path, flow, workdir)`` over a table of flow functions."""
    def run(path: str, flow: str, workdir: str) -> list[str]:
        if flow not in functions:
            raise SystemExit(f"unknown flow {flow}")
        return run_flow(path, functions[flow], workdir)
    return run


run = flow_runner(FLOW_FUNCTIONS)


def main() -> int:
    return cli_main(__doc__ or "", FLOWS, run)


if __name__ == "__main__":
    sys.exit(main())
