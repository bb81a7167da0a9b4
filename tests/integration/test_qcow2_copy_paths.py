"""The fast copy paths of block-stream and active block-commit give the images
qemu-storage-daemon 11.1 gives: the same ``qemu-img map`` (stream: host offsets
too, its copy is sequential; commit: the allocation, its copies run in parallel),
a clean ``qemu-img check`` and the chain's content.

The chain mixes what those paths decide on: data clusters with random bytes,
data clusters that hold only zero bytes (copy-on-read makes zero clusters of
them), data clusters whose first bytes are zeroes, zero clusters, unallocated
clusters, and an overlay whose zero clusters lie over data and over unallocated
clusters of the base (commit writes zero clusters in both).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession

KiB = 1 << 10
SIZE = 8 << 20

BASE = [
    "write -P 0x5a 0 1M",            # data
    "write -P 0 1M 512K",            # data clusters holding zeroes
    "write -z 1536K 256K",           # zero clusters
    "write -P 0x6b 2M 192K",         # data, then a gap (unallocated)
    "write -P 0 3M 64K",             # one zero-filled data cluster
    "write -P 0x7c 3136K 2M",        # data across the 4 MiB mark
    "write -P 0 6M 1M",              # zero-filled data, then data that starts with
    "write -P 0 7M 512K",            # 320 KiB of zero bytes (a copy decides on all
    "write -P 0x3c 7488K 4K",        # of its bytes, not on its first ones)
]
TOP = [
    "write -P 0x11 512K 256K",       # new data over base data
    "write -z 2M 128K",              # zero clusters over base data
    "write -z 2304K 256K",           # zero clusters over unallocated base clusters
    "write -P 0 5M 64K",             # zero-filled data in the overlay
]


def build(directory: Path) -> None:
    def run(*argv: str) -> None:
        subprocess.run(argv, cwd=directory, check=True, capture_output=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", str(SIZE))
    run("qemu-io", "-f", "qcow2", *sum((["-c", c] for c in BASE), []), "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        "top.qcow2", str(SIZE))
    run("qemu-io", "-f", "qcow2", *sum((["-c", c] for c in TOP), []), "top.qcow2")


def image_map(path: Path, offsets: bool) -> list[dict]:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-U", "-f", "qcow2", str(path)],
                         check=True, capture_output=True, text=True).stdout
    extents: list[dict] = []
    for extent in json.loads(out):
        if not offsets:
            # Where a cluster lies differs; whether it has a host cluster does not
            # (a zero write with unmap frees it only where discard is on).
            extent["allocated"] = extent.pop("offset", None) is not None
        last = extents[-1] if extents else None
        if last is not None and not offsets and all(
                last[k] == extent[k] for k in extent if k not in ("start", "length")):
            last["length"] += extent["length"]
        else:
            extents.append(extent)
    return extents


def run_job(kind: str, directory: Path, command: str, args: dict, complete: bool,
            from_header: bool = False) -> None:
    daemon = DaemonProcess(kind, version="11.1")
    daemon.workdir = directory
    with daemon:
        qmp = QMPSession(daemon)
        names: tuple[str, ...] = ("top", "top-file", "base", "base-file")
        if from_header:
            # The overlay opens its backing from the header: a node its parent
            # opened, which defaults to discard=unmap in QEMU.
            qmp.command("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": {
                "driver": "file", "filename": str(directory / "top.qcow2")}})
            names = ("top",)
        for name, backing in () if from_header else (("base", None), ("top", "base")):
            qmp.command("blockdev-add", {"driver": "file", "node-name": f"{name}-file",
                                         "filename": str(directory / f"{name}.qcow2")})
            qmp.command("blockdev-add", {"driver": "qcow2", "node-name": name,
                                         "file": f"{name}-file", "backing": backing})
        assert qmp.command(command, args) == {"return": {}}
        if complete:
            qmp.wait_status("j", "ready")
            qmp.command("job-complete", {"id": "j"})
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", device="j")
        assert "error" not in done["data"], done
        qmp.wait_status("j", "null")
        for name in names:
            qmp.command("blockdev-del", {"node-name": name})
        qmp.close()


def check_clean(path: Path) -> None:
    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("job", ["stream", "commit", "commit-header-chain"])
def test_copy_paths_match_qemu(tmp_path: Path, job: str) -> None:
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    build(pristine)
    results = {}
    for kind in ("qmpjobd", "qsd"):
        work = tmp_path / kind
        shutil.copytree(pristine, work)
        if job == "stream":
            run_job(kind, work, "block-stream", {"job-id": "j", "device": "top"}, False)
            (work / "base.qcow2").unlink()        # the overlay must stand alone now
            result = work / "top.qcow2"
        else:
            run_job(kind, work, "block-commit", {"job-id": "j", "device": "top"}, True,
                    from_header=job == "commit-header-chain")
            result = work / "base.qcow2"
        check_clean(result)
        same = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                               str(pristine / "top.qcow2"), str(result)],
                              cwd=pristine, capture_output=True, text=True)
        assert same.returncode == 0, same.stdout + same.stderr
        results[kind] = image_map(result, offsets=job == "stream")
    assert results["qmpjobd"] == results["qsd"]
