"""The ``file`` driver on files that are not regular files, over real sockets, against
qemu-storage-daemon 7.2 in the same test; and no descriptor left behind by failures.

QEMU opens first and checks the kind of file afterwards, so a read-only FIFO blocks it
until a writer appears; that case runs on qmpjobd only (with QEMU's message for the
FIFO taken from qemu-storage-daemon's read-write answer).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from typing import Iterator

import pytest

from tests.support.daemons import DaemonProcess, QMPSession


class Monitor(QMPSession):
    """A negotiated client (replies as exact bytes with ``command_raw``) that can count
    the daemon's open descriptors."""

    def open_fds(self) -> int:
        assert self.daemon.proc is not None
        return len(os.listdir(f"/proc/{self.daemon.proc.pid}/fd"))


def file_node(path: str, node_name: str = "n0", read_only: bool = False) -> dict:
    options: dict = {"driver": "file", "node-name": node_name, "filename": path}
    if read_only:
        options["read-only"] = True
    return options


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """One file of every kind, at paths both daemons see."""
    root = tmp_path_factory.mktemp("kinds")
    (root / "regular").write_bytes(b"x" * 1000)
    (root / "directory").mkdir()
    os.mkfifo(root / "fifo")
    (root / "to-regular").symlink_to(root / "regular")
    (root / "to-fifo").symlink_to(root / "fifo")
    (root / "dangling").symlink_to(root / "nowhere")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "socket"))
    listener.close()                                    # the socket file stays
    (root / "no-permission").write_bytes(b"y" * 512)
    os.chmod(root / "no-permission", 0)
    paths = {p.name: str(p) for p in root.iterdir()}
    paths["missing"] = str(root / "missing")
    paths["under-a-file"] = str(root / "regular" / "x")
    return paths


def first_block_device() -> str | None:
    for entry in sorted(os.scandir("/dev"), key=lambda e: e.name):
        try:
            if stat.S_ISBLK(entry.stat().st_mode):
                return entry.path
        except OSError:
            continue
    return None


# (name in files or an absolute device path, read-only)
CASES = [
    ("regular", False), ("to-regular", False), ("directory", False), ("directory", True),
    ("fifo", False), ("to-fifo", False), ("/dev/null", False), ("/dev/null", True),
    ("/dev/zero", False), ("dangling", False), ("socket", False), ("socket", True),
    ("no-permission", False), ("missing", False), ("under-a-file", False),
]
if first_block_device() is not None:
    CASES += [(first_block_device(), False), (first_block_device(), True)]


@pytest.fixture(scope="module")
def both() -> Iterator[tuple[Monitor, Monitor]]:
    with DaemonProcess("qmpjobd") as ours, DaemonProcess("qsd") as oracle:
        pair = (Monitor(ours), Monitor(oracle))
        yield pair
        for monitor in pair:
            monitor.close()


def add_and_remove(monitor: Monitor, path: str, read_only: bool) -> list[bytes]:
    """blockdev-add, and on success what the node looks like and its removal."""
    replies = [monitor.command_raw("blockdev-add", file_node(path, read_only=read_only))]
    if b'"return"' in replies[0]:
        nodes = json.loads(monitor.command_raw("query-named-block-nodes", {"flat": True}))
        node = next(n for n in nodes["return"] if n["node-name"] == "n0")
        replies.append(json.dumps([node["image"]["virtual-size"], node["file"],
                                   node["ro"]]).encode())
        replies.append(monitor.command_raw("blockdev-del", {"node-name": "n0"}))
    return replies


@pytest.mark.parametrize("name,read_only", CASES,
                         ids=[f"{n.strip('/')}-{'ro' if ro else 'rw'}" for n, ro in CASES])
def test_blockdev_add_answers_as_qsd(both, files, name, read_only) -> None:
    ours, oracle = both
    path = files.get(name, name)
    assert add_and_remove(ours, path, read_only) == add_and_remove(oracle, path, read_only)


def test_non_regular_files_get_qemus_message(both, files) -> None:
    # Guards the comparison above against both daemons accepting everything.
    ours, _ = both
    for path in (files["directory"], files["fifo"], "/dev/null"):
        reply = json.loads(add_and_remove(ours, path, True)[0])
        assert reply["error"]["desc"] == f"'file' driver requires '{path}' to be a regular file"


@pytest.mark.parametrize("name", ["fifo", "to-fifo"])
def test_read_only_fifo_is_refused_without_blocking(both, files, name) -> None:
    """qemu-storage-daemon hangs here (its open waits for a writer); qmpjobd answers
    with the message qemu-storage-daemon gives for the same FIFO opened read-write,
    and keeps serving."""
    ours, oracle = both
    path = files[name]
    expected = oracle.command_raw("blockdev-add", file_node(path))
    assert b"regular file" in expected
    assert ours.command_raw("blockdev-add", file_node(path, read_only=True)) == expected
    assert b'"return"' in ours.command_raw("query-version")


def test_failures_leave_no_descriptor_behind(files) -> None:
    with DaemonProcess("qmpjobd") as daemon:
        monitor = Monitor(daemon)
        failing = [(files["fifo"], False), (files["fifo"], True), (files["to-fifo"], True),
                   (files["directory"], True), (files["directory"], False),
                   ("/dev/null", False), ("/dev/zero", True), (files["socket"], False),
                   (files["missing"], False), (files["under-a-file"], True)]
        cycle(monitor, failing, files, job="warm-up")     # first-use imports and pools
        before = monitor.open_fds()
        for round_number in range(20):
            cycle(monitor, failing, files, job=f"j{round_number}")
        assert monitor.open_fds() == before
        monitor.close()


def cycle(monitor: Monitor, failing: list[tuple[str, bool]], files: dict[str, str],
          job: str) -> None:
    """Every failing open once, a good node added and removed, a create job that
    fails in its truncation (FIFO) and a drive-mirror onto a device."""
    for path, read_only in failing:
        assert b'"error"' in monitor.command_raw("blockdev-add", file_node(path, read_only=read_only))
    assert b'"return"' in monitor.command_raw("blockdev-add", file_node(files["regular"]))
    assert b'"return"' in monitor.command_raw("blockdev-del", {"node-name": "n0"})
    monitor.command_raw("blockdev-create", {"job-id": job, "options": {
        "driver": "file", "filename": files["fifo"], "size": 1 << 20}})
    monitor.wait_event("JOB_STATUS_CHANGE", id=job, status="concluded")
    assert b'"return"' in monitor.command_raw("job-dismiss", {"id": job})


def test_create_on_non_regular_files_answers_as_qsd(files) -> None:
    """blockdev-create and drive-mirror onto a FIFO, a device and a directory."""
    null_source = "null-co,node-name=src,size=1048576"
    with DaemonProcess("qmpjobd", ["--blockdev", null_source]) as ours, \
            DaemonProcess("qsd", ["--blockdev", null_source]) as oracle:
        results = []
        for daemon in (ours, oracle):
            monitor = Monitor(daemon)
            results.append(create_outcomes(monitor, files))
            monitor.close()
        assert results[0] == results[1]


def create_outcomes(monitor: Monitor, files: dict[str, str]) -> list:
    outcomes: list = []
    for index, path in enumerate([files["fifo"], "/dev/null", files["directory"]]):
        job = f"c{index}"
        monitor.command_raw("blockdev-create", {"job-id": job, "options": {
            "driver": "file", "filename": path, "size": 1 << 20}})
        monitor.wait_event("JOB_STATUS_CHANGE", id=job, status="concluded")
        jobs = json.loads(monitor.command_raw("query-jobs"))["return"]
        outcomes.append([j for j in jobs if j["id"] == job])
        monitor.command_raw("job-dismiss", {"id": job})
        outcomes.append(monitor.command_raw("drive-mirror", {
            "job-id": f"m{index}", "device": "src", "target": path,
            "sync": "full", "format": "raw"}))
    return outcomes
