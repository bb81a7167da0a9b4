#!/usr/bin/env python3
"""libvirt's backup flows (checkpoints, push and pull mode) against qmpjobd or
qemu-storage-daemon.

Usage: libvirt_backup_flows.py SOCKET FLOW [--workdir DIR]

FLOW is one of:
  push          virsh backup-begin (push mode), twice: a full backup together with
                checkpoint c1 (transaction: block-dirty-bitmap-add c1 +
                blockdev-backup sync=full), guest writes, then an incremental backup
                since c1 together with checkpoint c2 (transaction: add c2, add the
                temporary backup-vda, merge c1 into it, blockdev-backup
                sync=incremental bitmap=backup-vda), job-dismiss, blockdev-del of the
                target, block-dirty-bitmap-remove backup-vda
  push-legacy   the same with the checkpoint scheme of older libvirt: the previous
                checkpoint's bitmap is disabled (block-dirty-bitmap-disable) in the
                transaction that starts the next one, so an incremental backup
                since c1 merges c1 and c2; a second incremental since c1 with c3
  pull          virsh backup-begin (pull mode), full, with checkpoint c1: scratch
                qcow2 backed by the disk, nbd-server-start, transaction [add c1,
                blockdev-backup sync=none], block-export-add of the scratch node;
                an NBD client (nbdcopy) reads the export before and after the guest
                overwrites the disk; then libvirt's teardown (nbd-server-stop,
                block-job-cancel force, job-dismiss, blockdev-del, scratch file removed)
  pull-incremental
                the same since checkpoint c1 (made before the guest's writes) with
                checkpoint c2: backup-vda is added on the scratch node, c1 merged
                into it, and the export carries it; nbdinfo reads the
                qemu:dirty-bitmap:backup-vda context
  pull-cbw      pull mode as QEMU's own image-fleecing test builds it (not what
                libvirt 11.3 sends): copy-before-write filter over the disk with a
                qcow2 fleecing target, the guest export on the filter,
                snapshot-access exported with a frozen copy of checkpoint c1

libvirt 11.3 keeps every checkpoint bitmap enabled (qemu_checkpoint.c: the bitmap
of a checkpoint holds every write since it), so `push` sends no
block-dirty-bitmap-disable; `push-legacy` shows the older disable-and-merge scheme.
A storage daemon has no guest: a writable NBD export ("guest"/"vda-guest") stands in
for it. In the pull flows libvirt's nbd-server-start also serves that stand-in, since
the daemon has one NBD server. Each flow ends with blockdev-del of every node, then
prints a digest of every image (guest-visible sha256, qemu-img map without host
offsets, qemu-img check, persistent bitmaps).

Commands and arguments are libvirt's (qemu_backup.c, qemu_checkpoint.c,
qemu_monitor_json.c as summarised in shared/reference/bitmaps-and-nbd.md section 6).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from libvirt_chain_flows import (  # noqa: E402
    QEMU_IMG, ChainMonitor, Disk, add_format_node, bitmap_lines, checked_tool, create_qcow2_image,
    detach, finish_job, flow_runner, fmt, guest_sha256, guest_write_through_nbd, open_chain, print_digests,
    qemu_io_writes, shut_down,
)
from libvirt_flows import cli_main  # noqa: E402

DISK_SIZE = 4 << 20
GRANULARITY = 64 << 10
DISK_WRITES = [(0x51, 0, 1 << 20), (0x52, 3 << 20, 128 << 10)]
# Writes after checkpoint c1: partial clusters on purpose, so the bitmap rounds them.
GUEST_WRITES_1 = [(0x61, 1 << 20, 64 << 10), (0x62, (2 << 20) + 4096, 8192)]
# Writes while a pull-mode backup is exported: the reader must not see them.
GUEST_WRITES_2 = [(0x71, 0, 128 << 10), (0x72, 1 << 20, 64 << 10), (0x73, (3 << 20) + (64 << 10), 4096)]

JOB = "backup-vda-libvirt-1-format"


def make_disk(workdir: str) -> str:
    path = os.path.join(workdir, "vda.qcow2")
    checked_tool(QEMU_IMG, "create", "-q", "-f", "qcow2", path, str(DISK_SIZE))
    qemu_io_writes(["-f", "qcow2", path], DISK_WRITES)
    return path


def bitmap_add(node: str, name: str, persistent: bool, disabled: bool,
               granularity: int = 0) -> dict[str, Any]:
    """qemuMonitorTransactionBitmapAdd: granularity only when non-zero."""
    data: dict[str, Any] = {"node": node, "name": name, "persistent": persistent, "disabled": disabled}
    if granularity:
        data["granularity"] = granularity
    return {"type": "block-dirty-bitmap-add", "data": data}


def bitmap_merge(node: str, target: str, sources: list[tuple[str, str]]) -> dict[str, Any]:
    """qemuMonitorTransactionBitmapMerge: always the {node, name} object form."""
    return {"type": "block-dirty-bitmap-merge",
            "data": {"node": node, "target": target,
                     "bitmaps": [{"node": n, "name": b} for n, b in sources]}}


def blockdev_backup(target: str, sync: str, bitmap: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"device": fmt(1), "job-id": JOB, "target": target, "sync": sync}
    if bitmap is not None:
        data["bitmap"] = bitmap
    data.update({"auto-finalize": True, "auto-dismiss": False})
    return {"type": "blockdev-backup", "data": data}


def transaction(mon: ChainMonitor, out: list[str], actions: list[dict[str, Any]]) -> None:
    out.append(f"transaction {[a['type'] for a in actions]} -> {mon.command('transaction', actions=actions)}")


# ---------------------------------------------------------------- push mode

def push_target(mon: ChainMonitor, out: list[str], disk: Disk, path: str, incremental: bool) -> int:
    """The push target: a new qcow2, backed by the disk for an incremental backup."""
    index = disk.next_index()
    create_qcow2_image(mon, out, index, path, disk.images[-1][1] if incremental else None)
    add_format_node(mon, index, fmt(1) if incremental else None)
    return index


def incremental_push(mon: ChainMonitor, out: list[str], disk: Disk, path: str, checkpoint: str,
                     since: list[str], disable: str | None) -> None:
    """One incremental push backup with a new checkpoint. ``since``: the checkpoint
    bitmaps whose union is "everything since the base checkpoint"; ``disable``: the
    bitmap the older libvirt scheme froze when the new checkpoint started."""
    target = push_target(mon, out, disk, path, incremental=True)
    actions = [{"type": "block-dirty-bitmap-disable", "data": {"node": fmt(1), "name": disable}}] if disable else []
    actions += [
        bitmap_add(fmt(1), checkpoint, True, False),
        bitmap_add(fmt(1), "backup-vda", False, True, GRANULARITY),
        bitmap_merge(fmt(1), "backup-vda", [(fmt(1), name) for name in since]),
        blockdev_backup(fmt(target), "incremental", "backup-vda"),
    ]
    transaction(mon, out, actions)
    finish_job(mon, out, JOB)
    detach(mon, out, target)
    out.append("block-dirty-bitmap-remove -> "
               f"{mon.execute('block-dirty-bitmap-remove', {'node': fmt(1), 'name': 'backup-vda'})}")
    out.extend(bitmap_lines(mon, [fmt(1)]))


def flow_push(mon: ChainMonitor, out: list[str], workdir: str, legacy: bool = False) -> None:
    """Full backup with c1, writes, incremental since c1 with c2. ``legacy`` is the
    scheme older libvirt releases used (each checkpoint bitmap disabled when the
    next one starts, so "since c1" is the merge of c1 and c2): it adds more writes and
    a second incremental backup since c1 with c3."""
    disk_path = make_disk(workdir)
    at_c1 = guest_sha256(disk_path)
    disk = Disk()
    open_chain(mon, disk, [disk_path])
    full_path = os.path.join(workdir, "vda.full.qcow2")
    full = push_target(mon, out, disk, full_path, incremental=False)
    transaction(mon, out, [bitmap_add(fmt(1), "c1", True, False), blockdev_backup(fmt(full), "full")])
    finish_job(mon, out, JOB)
    detach(mon, out, full)
    out.extend(bitmap_lines(mon, [fmt(1)]))

    guest_write_through_nbd(mon, workdir, fmt(1), GUEST_WRITES_1)
    out.extend(bitmap_lines(mon, [fmt(1)]))
    paths = [disk_path, full_path, os.path.join(workdir, "vda.inc1.qcow2")]
    incremental_push(mon, out, disk, paths[-1], "c2", ["c1"], "c1" if legacy else None)
    if legacy:
        guest_write_through_nbd(mon, workdir, fmt(1), GUEST_WRITES_2)
        paths.append(os.path.join(workdir, "vda.inc2.qcow2"))
        incremental_push(mon, out, disk, paths[-1], "c3", ["c1", "c2"], "c2")
    shut_down(mon, out, disk)
    out.append(f"full backup holds the disk as of c1: {guest_sha256(full_path) == at_c1}")
    print_digests(out, paths)


# ---------------------------------------------------------------- pull mode

def nbd_uri(sock: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def read_export(out: list[str], sock: str, export: str, dest: str, label: str) -> str:
    """What an NBD client copies from the export (nbdcopy, sparse-aware)."""
    if os.path.exists(dest):
        os.unlink(dest)
    checked_tool("nbdcopy", nbd_uri(sock, export), dest)
    digest = guest_sha256(dest, "raw")
    out.append(f"nbdcopy {label}: sha256={digest}")
    return digest


def export_map(out: list[str], sock: str, export: str, context: str) -> None:
    extents = json.loads(checked_tool("nbdinfo", "--json", f"--map={context}", nbd_uri(sock, export)))
    out.append(f"nbdinfo --map={context}: {json.dumps(extents)}")


def flow_pull(mon: ChainMonitor, out: list[str], workdir: str, incremental: bool) -> None:
    disk_path = make_disk(workdir)
    disk = Disk()
    open_chain(mon, disk, [disk_path])
    sock = os.path.join(workdir, "backup.sock")
    if incremental:
        transaction(mon, out, [bitmap_add(fmt(1), "c1", True, False)])  # checkpoint create
        guest_write_through_nbd(mon, workdir, fmt(1), GUEST_WRITES_1)
    checkpoint = "c2" if incremental else "c1"

    scratch_path = os.path.join(workdir, "vda.scratch.qcow2")
    scratch = disk.next_index()
    create_qcow2_image(mon, out, scratch, scratch_path, disk_path)
    add_format_node(mon, scratch, fmt(1))
    out.append("nbd-server-start -> "
               f"{mon.command('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})}")
    # The guest's device exists before the backup starts: the job's copy-before-write
    # filter takes over its writes (a writer attaching to the disk later is refused).
    out.append("block-export-add -> " + str(mon.execute("block-export-add", {
        "type": "nbd", "id": "vda-guest", "node-name": fmt(1), "name": "vda-guest", "writable": True})))
    actions = [bitmap_add(fmt(1), checkpoint, True, False)]
    if incremental:
        actions += [bitmap_add(fmt(scratch), "backup-vda", False, True, GRANULARITY),
                    bitmap_merge(fmt(scratch), "backup-vda", [(fmt(1), "c1")])]
    actions.append(blockdev_backup(fmt(scratch), "none"))
    transaction(mon, out, actions)
    export: dict[str, Any] = {"type": "nbd", "id": f"libvirt-nbd-{fmt(scratch)}", "node-name": fmt(scratch),
                              "writable": False, "name": "vda"}
    if incremental:
        export["bitmaps"] = ["backup-vda"]
    out.append(f"block-export-add -> {mon.execute('block-export-add', export)}")
    out.extend(bitmap_lines(mon, [fmt(scratch)]))

    copy_path = os.path.join(workdir, "vda.pull.raw")
    before = read_export(out, sock, "vda", copy_path, "before guest writes")
    # The guest keeps running: it overwrites the disk while the backup is exported.
    qemu_io_writes(["-f", "raw", nbd_uri(sock, "vda-guest")], GUEST_WRITES_2)
    after = read_export(out, sock, "vda", copy_path, "after guest writes")
    out.append(f"point-in-time view kept: {before == after}")
    if incremental:
        export_map(out, sock, "vda", "qemu:dirty-bitmap:backup-vda")
    export_map(out, sock, "vda", "base:allocation")
    out.extend(bitmap_lines(mon, [fmt(1)]))

    # virDomainAbortJob of a pull-mode backup.
    out.append(f"nbd-server-stop -> {mon.command('nbd-server-stop')}")
    out.append(f"block-job-cancel -> {mon.command('block-job-cancel', device=JOB, force=True)}")
    finish_job(mon, out, JOB)
    detach(mon, out, scratch)
    os.unlink(scratch_path)
    disk.images = [image for image in disk.images if image[0] != scratch]
    out.extend(bitmap_lines(mon, [fmt(1)]))
    shut_down(mon, out, disk)
    print_digests(out, [disk_path])
    out.append(f"pull copy: sha256={guest_sha256(copy_path, 'raw')}")


def flow_pull_cbw(mon: ChainMonitor, out: list[str], workdir: str) -> None:
    """Pull mode the way QEMU's image-fleecing test builds it (not libvirt 11.3's way):
    a copy-before-write filter over the disk, the guest writing through the filter,
    snapshot-access on top exported with a frozen copy of checkpoint c1."""
    disk_path = make_disk(workdir)
    disk = Disk()
    open_chain(mon, disk, [disk_path])
    transaction(mon, out, [bitmap_add(fmt(1), "c1", True, False)])
    guest_write_through_nbd(mon, workdir, fmt(1), GUEST_WRITES_1)

    fleece_path = os.path.join(workdir, "vda.fleece.qcow2")
    fleece = disk.next_index()
    create_qcow2_image(mon, out, fleece, fleece_path, None)
    add_format_node(mon, fleece, None)
    sock = os.path.join(workdir, "backup.sock")
    out.append("nbd-server-start -> "
               f"{mon.command('nbd-server-start', addr={'type': 'unix', 'data': {'path': sock}})}")
    transaction(mon, out, [
        bitmap_add(fmt(1), "c2", True, False),
        bitmap_add(fmt(1), "backup-vda", False, True, GRANULARITY),
        bitmap_merge(fmt(1), "backup-vda", [(fmt(1), "c1")]),
    ])
    out.append("blockdev-add copy-before-write -> " + str(mon.command(
        "blockdev-add", driver="copy-before-write", file=fmt(1), target=fmt(fleece),
        **{"node-name": "fleece-cbw"})))
    out.append("block-export-add -> " + str(mon.execute("block-export-add", {
        "type": "nbd", "id": "vda-guest", "node-name": "fleece-cbw", "name": "vda-guest", "writable": True})))
    out.append("blockdev-add snapshot-access -> " + str(mon.command(
        "blockdev-add", driver="snapshot-access", file="fleece-cbw", **{"node-name": "fleece-access"})))
    out.append("block-export-add -> " + str(mon.execute("block-export-add", {
        "type": "nbd", "id": "fleece", "node-name": "fleece-access", "name": "vda", "writable": False,
        "bitmaps": [{"node": fmt(1), "name": "backup-vda"}]})))

    copy_path = os.path.join(workdir, "vda.pull.raw")
    before = read_export(out, sock, "vda", copy_path, "before guest writes")
    qemu_io_writes(["-f", "raw", nbd_uri(sock, "vda-guest")], GUEST_WRITES_2)
    after = read_export(out, sock, "vda", copy_path, "after guest writes")
    out.append(f"point-in-time view kept: {before == after}")
    export_map(out, sock, "vda", "qemu:dirty-bitmap:backup-vda")
    export_map(out, sock, "vda", "base:allocation")
    out.extend(bitmap_lines(mon, [fmt(1)]))

    out.append(f"nbd-server-stop -> {mon.command('nbd-server-stop')}")
    for node in ("fleece-access", "fleece-cbw"):
        out.append(f"blockdev-del {node} -> {mon.command('blockdev-del', **{'node-name': node})}")
    detach(mon, out, fleece)
    disk.images = [image for image in disk.images if image[0] != fleece]
    out.append("block-dirty-bitmap-remove -> "
               f"{mon.execute('block-dirty-bitmap-remove', {'node': fmt(1), 'name': 'backup-vda'})}")
    out.extend(bitmap_lines(mon, [fmt(1)]))
    shut_down(mon, out, disk)
    print_digests(out, [disk_path, fleece_path])
    out.append(f"pull copy: sha256={guest_sha256(copy_path, 'raw')}")


FLOW_FUNCTIONS: dict[str, Callable[[ChainMonitor, list[str], str], None]] = {
    "push": flow_push,
    "push-legacy": lambda mon, out, workdir: flow_push(mon, out, workdir, legacy=True),
    "pull": lambda mon, out, workdir: flow_pull(mon, out, workdir, incremental=False),
    "pull-incremental": lambda mon, out, workdir: flow_pull(mon, out, workdir, incremental=True),
    "pull-cbw": flow_pull_cbw,
}
FLOWS = tuple(FLOW_FUNCTIONS)


run = flow_runner(FLOW_FUNCTIONS)


def main() -> int:
    return cli_main(__doc__ or "", FLOWS, run)


if __name__ == "__main__":
    sys.exit(main())
