"""SIGKILL at seeded random moments while jobs and clients write into qcow2 images:
every image must stay consistent for ``qemu-img check`` (leaked clusters are
allowed, corruptions never) and every source must keep its content.

Each run starts qmpjobd, creates two qcow2 images with ``blockdev-create`` (4 KiB
clusters, so the jobs allocate L2 tables and refcount blocks and grow the
refcount table), and then, all at once: a rate-limited backup of a raw file into
the first, a rate-limited mirror of a qcow2 image into the second, and qemu-io
writing through an NBD export into a third qcow2 image that has an internal
snapshot (so its writes copy clusters the snapshot shares). After a delay drawn
from the run's seed the daemon is killed with SIGKILL.

The kill comes after the images were created: a half-written creation is not an
image yet (QEMU's is not either).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, QMPSession

MiB = 1 << 20
SIZE = 12 * MiB


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True)


def prepare(directory: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(SIZE)
    for start in range(0, SIZE, 64 * 1024):
        if rng.random() < 0.7:
            data[start:start + 64 * 1024] = rng.randbytes(64 * 1024)
    (directory / "src.raw").write_bytes(bytes(data))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
        "src.raw", "s.qcow2", cwd=directory)
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "n.qcow2", "12M",
        cwd=directory)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 6M", "n.qcow2", cwd=directory)
    run("qemu-img", "snapshot", "-c", "base", "n.qcow2", cwd=directory)
    for name in ("t.qcow2", "m.qcow2"):
        (directory / name).write_bytes(b"")


def content(path: Path) -> str:
    """sha256 of the guest-visible content."""
    out = path.with_suffix(".content")
    fmt = "raw" if path.suffix == ".raw" else "qcow2"
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", path.name, out.name, cwd=path.parent)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def create(session: QMPSession, name: str, node: str) -> None:
    assert "return" in session.command("blockdev-add", {"driver": "file",
                                                        "node-name": f"{node}f",
                                                        "filename": name})
    reply = session.command("blockdev-create", {"job-id": f"c{node}", "options": {
        "driver": "qcow2", "file": f"{node}f", "size": SIZE, "cluster-size": 4096}})
    assert "return" in reply, reply
    session.wait_status(f"c{node}", "concluded")
    session.command("job-dismiss", {"id": f"c{node}"})
    assert "return" in session.command("blockdev-add", {"driver": "qcow2", "node-name": node,
                                                        "file": f"{node}f"})


def start_writers(directory: Path, session: QMPSession) -> subprocess.Popen:
    for options in [
            {"driver": "raw", "node-name": "src",
             "file": {"driver": "file", "filename": "src.raw"}},
            {"driver": "qcow2", "node-name": "s",
             "file": {"driver": "file", "filename": "s.qcow2"}},
            {"driver": "qcow2", "node-name": "n",
             "file": {"driver": "file", "filename": "n.qcow2"}}]:
        assert "return" in session.command("blockdev-add", options)
    create(session, "t.qcow2", "t")
    create(session, "m.qcow2", "m")
    sock = str(directory / "nbd.sock")
    session.command("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    session.command("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                                         "writable": True})
    assert "return" in session.command("blockdev-backup", {
        "job-id": "b", "device": "src", "target": "t", "sync": "full", "speed": 8 * MiB})
    assert "return" in session.command("blockdev-mirror", {
        "job-id": "mi", "device": "s", "target": "m", "sync": "full", "speed": 8 * MiB})
    commands = []
    for index in range(60):
        commands += ["-c", f"write -P {index % 250 + 1} {(index * 197) % 2900 * 4}k 12k"]
        if index % 7 == 0:
            commands += ["-c", f"write -z {(index * 61) % 2900 * 4}k 8k", "-c", "flush"]
    return subprocess.Popen(["qemu-io", "-f", "raw", *commands,
                             f"nbd+unix:///n?socket={sock}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def check_image(path: Path) -> dict:
    done = run("qemu-img", "check", "--output=json", path.name, cwd=path.parent)
    assert done.returncode in (0, 3), (path.name, done.returncode, done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert report.get("corruptions", 0) == 0 and report["check-errors"] == 0, report
    return report


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_leaves_images_consistent(tmp_path: Path, seed: int) -> None:
    prepare(tmp_path, seed)
    sources = {name: content(tmp_path / name) for name in ("src.raw", "s.qcow2")}
    delay = random.Random(1000 + seed).uniform(0.0, 1.4)
    daemon = DaemonProcess("qmpjobd", workdir=tmp_path)
    daemon.start()
    writer = None
    try:
        session = QMPSession(daemon, timeout=60)
        writer = start_writers(tmp_path, session)
        time.sleep(delay)
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait()
    finally:
        if writer is not None:
            writer.wait(timeout=60)
        daemon.stop()
    for name in ("t.qcow2", "m.qcow2", "n.qcow2", "s.qcow2"):
        check_image(tmp_path / name)
    assert {name: content(tmp_path / name) for name in sources} == sources
    # The snapshot the NBD writes shared clusters with still reads what it held.
    run("qemu-img", "convert", "-l", "base", "-O", "raw", "n.qcow2", "base.raw", cwd=tmp_path)
    base = (tmp_path / "base.raw").read_bytes()
    assert base[:6 * MiB] == b"\x11" * (6 * MiB) and base[6 * MiB:] == bytes(6 * MiB)


def chain(directory: Path) -> str:
    """base.qcow2 (data) <- mid.qcow2 (some data) <- top.qcow2 (a little): the
    guest content of top, as a digest."""
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "base.qcow2", "4M",
        cwd=directory)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 3M", "base.qcow2", cwd=directory)
    for name, backing, pattern in (("mid", "base", "write -P 0x22 1M 1M"),
                                   ("top", "mid", "write -P 0x23 3M 64k")):
        run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b",
            f"{backing}.qcow2", "-F", "qcow2", f"{name}.qcow2", cwd=directory)
        run("qemu-io", "-f", "qcow2", "-c", pattern, f"{name}.qcow2", cwd=directory)
    return content(directory / "top.qcow2")


@pytest.mark.parametrize("job", ["block-stream", "block-commit"])
def test_sigkill_right_after_the_graph_change_keeps_the_content(tmp_path: Path,
                                                                 job: str) -> None:
    """The moment a stream or commit rewrites a header's backing file name is the
    dangerous one: were the clusters it copied still only in the metadata caches, a
    kill then would leave an image that no longer reads them from its old backing
    file. Killed as soon as the job has concluded, the chain reads as before."""
    expected = chain(tmp_path)
    daemon = DaemonProcess("qmpjobd", workdir=tmp_path)
    daemon.start()
    try:
        session = QMPSession(daemon, timeout=60)
        assert "return" in session.command("blockdev-add", {
            "driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": "top.qcow2"}})
        arguments = {"job-id": "j", "device": "top", "auto-finalize": False}
        if job == "block-stream":
            arguments["base"] = "base.qcow2"           # mid's clusters move up into top
        else:
            arguments.update({"top": "mid.qcow2", "base": "base.qcow2"})
        reply = session.command(job, arguments)
        assert "return" in reply, reply
        session.wait_status("j", "pending")
        session.command("job-finalize", {"id": "j"})
        session.wait_status("j", "concluded")
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait()
    finally:
        daemon.stop()
    for name in ("top.qcow2", "mid.qcow2", "base.qcow2"):
        check_image(tmp_path / name)
    info = json.loads(run("qemu-img", "info", "--output=json", "top.qcow2",
                          cwd=tmp_path).stdout)
    assert info.get("backing-filename") == "base.qcow2"     # mid is out of the chain
    assert content(tmp_path / "top.qcow2") == expected
