"""Backup of a qcow2 backing chain on qmpjobd and on qemu-storage-daemon of every
personality, in the same test: ``sync: top`` copies only what the top image
allocates, ``sync: full`` copies what the whole chain reads, and a write made
through an NBD export while a rate-limited ``sync: none`` job runs reaches the
target as the old data. Targets are compared with ``qemu-img map`` (allocation,
without host offsets) and ``qemu-img compare``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_backup_bitmaps import image_check, image_map, run, wait_job_end
from tests.support.daemons import DaemonProcess
from tests.support.nbd_setup import Qmp, normalise, uri
from tests.support.oracles import CONFORMANCE_VERSIONS

MiB = 1024 * 1024


def make_chain(tmp: Path) -> None:
    """base.qcow2 (data at 0 and 2 MiB) <- top.qcow2 (data at 1 MiB and over 2 MiB)."""
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 128k",
                    "-c", "write -P 0x12 2M 256k", str(base)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2",
                    "-F", "qcow2", str(top)], check=True, cwd=tmp)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 1M 64k",
                    "-c", "write -P 0x22 2112k 64k", "-c", "write -z 3M 64k", str(top)],
                   check=True, capture_output=True)


def target(daemon, qmp, name: str) -> Path:
    path = daemon.tmp / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M"], check=True)
    qmp.ok("blockdev-add", **{"node-name": name, "driver": "qcow2",
                              "file": {"driver": "file", "filename": str(path)}})
    return path


def both(version: str, session) -> tuple[object, object]:
    results = []
    for kind in ("qsd", "qmpjobd"):
        daemon = DaemonProcess(kind, [
            "--blockdev", "driver=file,filename=top.qcow2,node-name=top-file",
            "--blockdev", "driver=qcow2,file=top-file,node-name=disk",
        ], version=version)
        make_chain(daemon.tmp)
        with daemon:
            qmp = Qmp(daemon.sockets[0])
            try:
                results.append([normalise(json.dumps(item), daemon)
                                for item in session(daemon, qmp)])
            finally:
                qmp.close()
    return results[0], results[1]


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_sync_top_and_full_over_a_chain(version):
    def session(daemon, qmp):
        out: list[object] = []
        paths = {}
        for job, sync in (("jt", "top"), ("jf", "full")):
            paths[sync] = target(daemon, qmp, f"t-{sync}")
            out.append(qmp.cmd("blockdev-backup", device="disk", target=f"t-{sync}",
                               sync=sync, **{"job-id": job}))
            out.append(wait_job_end(qmp, job))
            out.append(qmp.cmd("blockdev-del", **{"node-name": f"t-{sync}"}))
            out.append(image_map(daemon, paths[sync]))
            out.append(image_check(daemon, paths[sync]))
        # top holds what the overlay holds; full reads as the whole chain.
        out.append(run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                        str(daemon.tmp / "top.qcow2"), str(paths["full"])], daemon))
        out.append(run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x21 1M 64k",
                        "-c", "read -P 0x22 2112k 64k", "-c", "read -P 0 0 128k",
                        "-c", "read -P 0 2M 64k", str(paths["top"])], daemon))
        return out

    theirs, ours = both(version, session)
    assert ours == theirs
    assert '"[exit 0]\\nImages are identical."' in ours


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_sync_none_saves_old_data_of_an_nbd_write(version):
    def session(daemon, qmp):
        out: list[object] = []
        sock = str(daemon.tmp / "nbd.sock")
        qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        qmp.ok("block-export-add", type="nbd", id="g", **{"node-name": "disk"},
               name="disk", writable=True)
        path = target(daemon, qmp, "tn")
        out.append(qmp.cmd("blockdev-backup", device="disk", target="tn", sync="none",
                           **{"job-id": "jn"}))
        out.append(run(["qemu-io", "-f", "raw", "-c", "write -P 0x31 0 64k",
                        "-c", "write -P 0x32 1M 64k", "-c", "write -P 0x33 2M 4k",
                        uri(sock, "disk")], daemon))
        out.append(qmp.cmd("query-block-jobs"))
        out.append(qmp.cmd("block-job-cancel", device="jn"))
        out.append(wait_job_end(qmp, "jn"))
        out.append(qmp.cmd("block-export-del", id="g"))
        out.append(qmp.cmd("blockdev-del", **{"node-name": "tn"}))
        out.append(image_map(daemon, path))
        out.append(run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x11 0 64k",
                        "-c", "read -P 0x21 1M 64k", "-c", "read -P 0x12 2M 64k",
                        str(path)], daemon))
        return out

    theirs, ours = both(version, session)
    assert ours == theirs
