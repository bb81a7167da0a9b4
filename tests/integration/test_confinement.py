"""``--allow-dir``: the block layer opens and creates files only inside the allowed
directories, over real sockets on a real daemon process.

qemu-storage-daemon has no such option, so there is nothing to compare with; each
test checks both what is refused and that the same request inside is served.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.test_file_driver import Monitor, file_node
from tests.support.daemons import DaemonProcess


def outside(path: str) -> str:
    return f"Path '{path}' is outside the allowed directories"


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    allowed = tmp_path / "allowed"
    elsewhere = tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    (allowed / "disk.raw").write_bytes(bytes(1 << 20))
    (elsewhere / "secret.raw").write_bytes(b"s" * (1 << 20))
    (allowed / "to-secret").symlink_to(elsewhere / "secret.raw")
    (allowed / "to-elsewhere").symlink_to(elsewhere)
    (allowed / "to-disk").symlink_to(allowed / "disk.raw")
    return {"allowed": allowed, "elsewhere": elsewhere}


@pytest.fixture
def confined(layout) -> Iterator[Monitor]:
    """qmpjobd allowed its own socket directory (its working directory) and allowed/."""
    daemon = DaemonProcess("qmpjobd", ["--blockdev", "null-co,node-name=src,size=1048576"])
    daemon.extra_args += ["--allow-dir", str(daemon.tmp), "--allow-dir", str(layout["allowed"])]
    with daemon:
        monitor = Monitor(daemon)
        yield monitor
        monitor.close()


def job_error(monitor: Monitor, job_id: str) -> str | None:
    jobs = json.loads(monitor.command_raw("query-jobs"))["return"]
    return next(job for job in jobs if job["id"] == job_id).get("error")


def error_of(reply: bytes) -> str:
    parsed = json.loads(reply)
    assert parsed["error"]["class"] == "GenericError", parsed
    return parsed["error"]["desc"]


def test_file_nodes_open_only_inside(confined, layout) -> None:
    allowed, elsewhere = layout["allowed"], layout["elsewhere"]
    for path in [str(elsewhere / "secret.raw"), str(allowed / "to-secret"),
                 str(allowed / "to-elsewhere" / "secret.raw"),
                 str(allowed / ".." / "elsewhere" / "secret.raw"), "/etc/passwd"]:
        assert error_of(confined.command_raw("blockdev-add", file_node(path))) == outside(path)
    for index, path in enumerate([str(allowed / "disk.raw"), str(allowed / "to-disk")]):
        reply = confined.command_raw("blockdev-add", file_node(path, f"ok{index}"))
        assert json.loads(reply) == {"return": {}}


def test_inline_children_and_relative_paths_are_checked(confined, layout) -> None:
    secret = str(layout["elsewhere"] / "secret.raw")
    raw = {"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": secret}}
    assert error_of(confined.command_raw("blockdev-add", raw)) == outside(secret)
    # Relative names resolve against the daemon's working directory (allowed here).
    (confined.daemon.tmp / "local.raw").write_bytes(bytes(4096))
    assert json.loads(confined.command_raw("blockdev-add", file_node("local.raw"))) == {"return": {}}
    assert error_of(confined.command_raw("blockdev-add", file_node("../x.raw", "n1"))) \
        == outside("../x.raw")


def test_refusal_does_not_even_reveal_the_kind_of_file(confined, layout) -> None:
    # Outside, a FIFO, a directory and a missing name all get the same answer.
    os.mkfifo(layout["elsewhere"] / "fifo")
    for name in ["fifo", ".", "missing"]:
        path = str(layout["elsewhere"] / name)
        assert error_of(confined.command_raw("blockdev-add", file_node(path, read_only=True))) \
            == outside(path)


def test_blockdev_create_creates_only_inside(confined, layout) -> None:
    target = layout["elsewhere"] / "new.raw"
    confined.command_raw("blockdev-create", {"job-id": "c0", "options": {
        "driver": "file", "filename": str(target), "size": 1 << 20}})
    confined.wait_event("JOB_STATUS_CHANGE", id="c0", status="concluded")
    assert job_error(confined, "c0") == outside(str(target))
    assert not target.exists()
    inside = layout["allowed"] / "new.raw"
    confined.command_raw("blockdev-create", {"job-id": "c1", "options": {
        "driver": "file", "filename": str(inside), "size": 1 << 20}})
    confined.wait_event("JOB_STATUS_CHANGE", id="c1", status="concluded")
    assert job_error(confined, "c1") is None
    assert inside.stat().st_size == 1 << 20


def test_create_through_a_symlink_pointing_outside_is_refused(confined, layout) -> None:
    link = layout["allowed"] / "dangling"
    link.symlink_to(layout["elsewhere"] / "would-be-created.raw")
    confined.command_raw("blockdev-create", {"job-id": "c0", "options": {
        "driver": "file", "filename": str(link), "size": 1 << 20}})
    confined.wait_event("JOB_STATUS_CHANGE", id="c0", status="concluded")
    assert job_error(confined, "c0") == outside(str(link))
    assert not (layout["elsewhere"] / "would-be-created.raw").exists()
    # The existing file behind the other symlink is left as it was (not truncated).
    confined.command_raw("blockdev-create", {"job-id": "c1", "options": {
        "driver": "file", "filename": str(layout["allowed"] / "to-secret"), "size": 0}})
    confined.wait_event("JOB_STATUS_CHANGE", id="c1", status="concluded")
    assert job_error(confined, "c1") == outside(str(layout["allowed"] / "to-secret"))
    assert (layout["elsewhere"] / "secret.raw").read_bytes() == b"s" * (1 << 20)


@pytest.mark.parametrize("command", ["drive-mirror", "drive-backup"])
def test_drive_targets_only_inside(confined, layout, command) -> None:
    target = str(layout["elsewhere"] / "target.raw")
    args = {"job-id": "d0", "device": "src", "target": target, "sync": "full", "format": "raw"}
    assert error_of(confined.command_raw(command, args)) == outside(target)
    assert not os.path.exists(target)
    existing = dict(args, target=str(layout["elsewhere"] / "secret.raw"), mode="existing")
    assert error_of(confined.command_raw(command, existing)) == outside(existing["target"])
    inside = dict(args, target=str(layout["allowed"] / "target.raw"))
    assert json.loads(confined.command_raw(command, inside)) == {"return": {}}


def test_refusals_leave_no_descriptor_behind(confined, layout) -> None:
    secret = str(layout["allowed"] / "to-secret")
    confined.command_raw("blockdev-add", file_node(secret))          # warm-up
    before = confined.open_fds()
    for _ in range(30):
        confined.command_raw("blockdev-add", file_node(secret))
        confined.command_raw("blockdev-add", file_node(str(layout["allowed"] / "missing")))
    assert confined.open_fds() == before


def test_a_blockdev_outside_at_start_up_stops_the_daemon(layout) -> None:
    secret = str(layout["elsewhere"] / "secret.raw")
    daemon = DaemonProcess("qmpjobd", ["--blockdev", f"driver=file,node-name=n0,filename={secret}"])
    daemon.extra_args += ["--allow-dir", str(daemon.tmp)]
    with pytest.raises(RuntimeError, match="outside the allowed directories"):
        daemon.start()
    daemon.stop()
