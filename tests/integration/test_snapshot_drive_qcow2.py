"""drive-backup and drive-mirror with ``format: qcow2`` targets, against
qemu-storage-daemon in the same test, for every personality.

The target image is created by the daemon the way QEMU's bdrv_img_create makes it:
sync=full without a backing file, sync=top with the source's backing file
(filename and format in the header), sync=none with the source itself; ``mode:
existing`` opens a prepared image. After each job has concluded (event order is
not compared here: the conformance scenarios cover it where it is deterministic),
the replies and the final query-jobs entries (progress aside) must be identical, and for each target
``qemu-img info`` must name the same backing file, ``qemu-img check`` must find
qmpjobd's clean and ``qemu-img compare`` equal to qsd's.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession
from tests.support.oracles import CONFORMANCE_VERSIONS, qemu_img_command
from tests.support.image_runs import run_on_copies

MiB = 1 << 20


def qemu_img(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*qemu_img_command("7.2"), *args], cwd=cwd, capture_output=True,
                          text=True, check=False)


def make_images(directory: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", str(4 * MiB), cwd=directory)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 2M",
                    str(directory / "base.qcow2")], check=True, capture_output=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2",
             str(4 * MiB), cwd=directory)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 2M",
                    str(directory / "top.qcow2")], check=True, capture_output=True)
    qemu_img("create", "-q", "-f", "qcow2", "existing.qcow2", str(4 * MiB), cwd=directory)


JOBS = [
    ("drive-backup", {"job-id": "b-full", "device": "top", "target": "b-full.qcow2",
                      "format": "qcow2", "sync": "full", "auto-dismiss": False}),
    ("drive-backup", {"job-id": "b-top", "device": "top", "target": "b-top.qcow2",
                      "format": "qcow2", "sync": "top", "auto-dismiss": False}),
    ("drive-mirror", {"job-id": "m-top", "device": "top", "target": "m-top.qcow2",
                      "format": "qcow2", "sync": "top", "auto-dismiss": False}),
    ("drive-mirror", {"job-id": "m-ex", "device": "top", "target": "existing.qcow2",
                      "format": "qcow2", "sync": "full", "mode": "existing",
                      "auto-dismiss": False}),
]
TARGETS = ("b-full.qcow2", "b-top.qcow2", "m-top.qcow2", "existing.qcow2")


def wait_for(session: QMPSession, job_id: str, statuses: tuple[str, ...]) -> dict:
    """The job's query-jobs entry once it is in one of ``statuses``, without its
    progress figures: how a mirror counts them (11.1 skips zero areas of an
    existing target) is the job's business, not the target creation's."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = {j["id"]: j for j in session.command("query-jobs")["return"]}
        if jobs[job_id]["status"] in statuses:
            return {k: v for k, v in jobs[job_id].items() if not k.endswith("-progress")}
        time.sleep(0.01)
    raise TimeoutError(job_id)


def run(kind: str, version: str, directory: Path) -> list:
    results: list = []
    with DaemonProcess(kind, version=version, workdir=directory) as daemon:
        session = QMPSession(daemon, timeout=60)
        try:
            results.append(session.command("blockdev-add", {
                "driver": "qcow2", "node-name": "top",
                "file": {"driver": "file", "filename": "top.qcow2"}}))
            for name, arguments in JOBS:
                results.append(session.command(name, arguments))
                job_id = arguments["job-id"]
                job = wait_for(session, job_id, ("concluded", "ready"))
                if job["status"] == "ready":
                    # A soft cancel in READY completes the mirror without a pivot.
                    results.append(session.command("job-cancel", {"id": job_id}))
                    job = wait_for(session, job_id, ("concluded",))
                results.append(job)
                results.append(session.command("job-dismiss", {"id": job_id}))
            # sync=none: the target names the source itself as its backing file.
            results.append(session.command("drive-backup", {
                "job-id": "b-none", "device": "top", "target": "b-none.qcow2",
                "format": "qcow2", "sync": "none", "auto-dismiss": False}))
            results.append(session.command("job-cancel", {"id": "b-none"}))
            results.append(wait_for(session, "b-none", ("concluded",)))
            results.append(session.command("blockdev-del", {"node-name": "top"}))
        finally:
            session.close()
    return results


def backing_of(image: Path) -> tuple:
    info = json.loads(qemu_img("info", "-U", "--output=json", str(image),
                               cwd=image.parent).stdout)
    return (info.get("backing-filename"), info.get("backing-filename-format"),
            info["virtual-size"])


@pytest.mark.parametrize("version", CONFORMANCE_VERSIONS)
def test_drive_jobs_with_qcow2_targets_match_qsd(tmp_path: Path, version: str) -> None:
    dirs, expected, actual = run_on_copies(tmp_path, version, make_images, run)
    assert actual == expected
    for name in (*TARGETS, "b-none.qcow2"):
        ours, theirs = dirs["qmpjobd"] / name, dirs["qsd"] / name
        assert backing_of(ours) == backing_of(theirs), name
        check = qemu_img("check", str(ours), cwd=ours.parent)
        assert check.returncode == 0, name + check.stdout + check.stderr
        compare = qemu_img("compare", str(theirs), str(ours), cwd=ours.parent)
        assert compare.returncode == 0, name + compare.stdout + compare.stderr
    assert backing_of(dirs["qsd"] / "b-top.qcow2")[:2] == ("base.qcow2", "qcow2")
    assert backing_of(dirs["qsd"] / "b-none.qcow2")[:2] == ("top.qcow2", "qcow2")
