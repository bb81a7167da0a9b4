"""block-stream with a copy still in the thread pool while the job looks up its
next step (no rate limit): pauses, drains and I/O errors see no copy in flight
and count the steps in order, over the embedded daemon's socket.

qemu-storage-daemon has one copy at a time and cannot fail a copy it makes
without blkdebug (which turns the overlap off), so the copy in flight is held or
failed here from the pool thread itself (``CheckedCopy.copy_to``); the result is
checked with qemu-img against the chain as it was.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from qmpjobd.block.formats.qcow2 import storage
from qmpjobd.testing import Daemon

MiB = 1 << 20
SIZE = 32 * MiB
# Which copy (counted from 1) the pool holds or fails: one in the middle.
NTH_COPY = 4


def build_chain(directory: Path) -> None:
    """base: random data in every odd MiB, zero-filled data in MiB 28 (copy-on-read
    makes zero clusters of it); top: its own data in MiB 0 and 9."""
    def run(*argv: str) -> None:
        subprocess.run(argv, cwd=directory, check=True, capture_output=True)
    with open(directory / "random.bin", "wb") as f:
        f.write(bytes(range(256)) * (4096 * 4))        # 4 MiB of a pattern
    run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", str(SIZE))
    writes = [f"write -s random.bin {m * MiB} 1M" for m in range(1, 32, 2)]
    run("qemu-io", "-f", "qcow2", *sum((["-c", w] for w in writes), []),
        "-c", f"write -P 0 {28 * MiB} 1M", "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        "top.qcow2", str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 1M", "-c",
        f"write -P 0x44 {9 * MiB} 1M", "top.qcow2")
    shutil.copytree(directory, directory / "before", ignore=shutil.ignore_patterns("before"))


def same_content_and_clean(directory: Path) -> bool:
    """The streamed top alone reads as the chain did, and qemu-img check is clean."""
    check = subprocess.run(["qemu-img", "check", "-q", "-U", str(directory / "top.qcow2")],
                           capture_output=True)
    compare = subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "qcow2",
                              str(directory / "before" / "top.qcow2"),
                              str(directory / "top.qcow2")], capture_output=True)
    return check.returncode == 0 and compare.returncode == 0


class PoolCopies:
    """Wraps CheckedCopy.copy_to: the NTH_COPY-th copy raises ``failure`` in its
    pool thread, or, once it has told the job that it keeps its clusters (the job
    then goes on to its next step), waits there for ``release``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.held = threading.Event()
        self.release = threading.Event()
        self.failure: OSError | None = None
        original = storage.CheckedCopy.copy_to

        def copy_to(copy: storage.CheckedCopy, fd: int, offset: int) -> None:
            self.calls += 1
            if self.calls == NTH_COPY:
                if self.failure is not None:
                    raise self.failure
                assert copy.on_kept is not None, "this copy does not overlap the next step"
                copy.on_kept = functools.partial(self._hold, copy.on_kept)
            original(copy, fd, offset)

        monkeypatch.setattr(storage.CheckedCopy, "copy_to", copy_to)

    def _hold(self, on_kept) -> None:
        on_kept()
        self.held.set()
        self.release.wait(30)

    async def wait_held(self) -> None:
        assert await asyncio.to_thread(self.held.wait, 30), "the copy never reached the pool"


async def open_chain(client: QMPClient, directory: Path) -> None:
    for name, backing in (("base", None), ("top", "base")):
        await client.execute("blockdev-add", {"driver": "file", "node-name": f"{name}-file",
                                              "filename": str(directory / f"{name}.qcow2")})
        await client.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                              "file": f"{name}-file", "backing": backing})


async def next_event(events, name: str, **data: object) -> dict:
    async def wait() -> dict:
        async for event in events:
            if event["event"] == name and all(event["data"].get(k) == v
                                              for k, v in data.items()):
                return event
        raise AssertionError("events ended")
    return await asyncio.wait_for(wait(), 30)


async def job_offset(client: QMPClient) -> int:
    jobs = await client.execute("query-block-jobs")
    return jobs[0]["offset"]


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    build_chain(tmp_path)
    return tmp_path


@pytest.mark.parametrize("version", ["7.2", "11.1"])
async def test_pause_waits_for_the_copy_in_flight(chain: Path, monkeypatch, version: str) -> None:
    copies = PoolCopies(monkeypatch)
    async with Daemon(version=version) as daemon:
        client = await daemon.client()
        events = client.events
        await open_chain(client, chain)
        await client.execute("block-stream", {"job-id": "s", "device": "top"})
        await copies.wait_held()
        await client.execute("block-job-pause", {"device": "s"})
        # The job may not show itself paused while its copy is still in the pool.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(next_event(events, "JOB_STATUS_CHANGE", status="paused"), 0.5)
        copies.release.set()
        await next_event(events, "JOB_STATUS_CHANGE", status="paused")
        # Paused: nothing in flight, so nothing moves the progress.
        first = await job_offset(client)
        await asyncio.sleep(0.2)
        assert await job_offset(client) == first
        await client.execute("block-job-resume", {"device": "s"})
        completed = await next_event(events, "BLOCK_JOB_COMPLETED", device="s")
        assert completed["data"]["offset"] == completed["data"]["len"] == SIZE
        assert "error" not in completed["data"]
        await next_event(events, "JOB_STATUS_CHANGE", status="null")
        for node in ("top", "top-file", "base", "base-file"):
            await client.execute("blockdev-del", {"node-name": node})
    (chain / "base.qcow2").unlink()
    assert same_content_and_clean(chain)


async def test_drain_finishes_the_copy_in_flight(chain: Path, monkeypatch) -> None:
    """A command that drains every node with a poll (11.1's blockdev-del: the close
    holds a drained section) while a copy is held: the drain waits for the copy
    inside the command, the job pauses and goes on."""
    copies = PoolCopies(monkeypatch)
    async with Daemon(version="11.1") as daemon:
        client = await daemon.client()
        events = client.events
        await open_chain(client, chain)
        await client.execute("blockdev-add", {"driver": "null-co", "node-name": "other"})
        await client.execute("block-stream", {"job-id": "s", "device": "top"})
        await copies.wait_held()
        threading.Timer(0.3, copies.release.set).start()
        await client.execute("blockdev-del", {"node-name": "other"})
        assert copies.release.is_set()        # the reply waited for the copy
        # The job was paused and resumed inside the command, as QEMU's is.
        await next_event(events, "JOB_STATUS_CHANGE", status="paused")
        await next_event(events, "JOB_STATUS_CHANGE", status="running")
        completed = await next_event(events, "BLOCK_JOB_COMPLETED", device="s")
        assert completed["data"]["offset"] == SIZE and "error" not in completed["data"]
        await next_event(events, "JOB_STATUS_CHANGE", status="null")
        for node in ("top", "top-file", "base", "base-file"):
            await client.execute("blockdev-del", {"node-name": node})
    (chain / "base.qcow2").unlink()
    assert same_content_and_clean(chain)


@pytest.mark.parametrize("policy", ["report", "ignore", "stop"])
async def test_a_failed_copy_in_flight_is_the_step_that_failed(chain: Path, monkeypatch,
                                                              policy: str) -> None:
    copies = PoolCopies(monkeypatch)
    copies.failure = OSError(errno.EIO, "Input/output error")
    async with Daemon(version="7.2") as daemon:
        client = await daemon.client()
        events = client.events
        await open_chain(client, chain)
        await client.execute("block-stream", {"job-id": "s", "device": "top",
                                              "on-error": policy})
        error = await next_event(events, "BLOCK_JOB_ERROR", device="s")
        assert error["data"]["operation"] == "read"
        assert error["data"]["action"] == policy
        if policy == "stop":
            await next_event(events, "JOB_STATUS_CHANGE", status="paused")
            # Counted in order: up to the failed copy, none of what came after it.
            stopped_at = await job_offset(client)
            assert stopped_at < SIZE
            copies.failure = None
            await client.execute("block-job-resume", {"device": "s"})
        completed = await next_event(events, "BLOCK_JOB_COMPLETED", device="s")
        data = completed["data"]
        if policy == "report":
            assert data["error"] == "Input/output error" and data["offset"] < SIZE
        elif policy == "ignore":
            # The failed step counts once, as every other: the total is exact.
            assert data["error"] == "Input/output error" and data["offset"] == SIZE
        else:
            assert "error" not in data and data["offset"] == SIZE
        await next_event(events, "JOB_STATUS_CHANGE", status="null")
        for node in ("top", "top-file", "base", "base-file"):
            await client.execute("blockdev-del", {"node-name": node})
    subprocess.run(["qemu-img", "check", "-q", str(chain / "top.qcow2")], check=True)
    if policy == "stop":
        (chain / "base.qcow2").unlink()
        assert same_content_and_clean(chain)
