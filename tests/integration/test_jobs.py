"""Job lifecycles over a real socket with qemu.qmp: what the conformance scenarios
do not cover (many concurrent jobs, the --no-drain-artefacts option, reconnect)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from qemu.qmp import EventListener, ExecuteError, QMPClient

MiB = 1 << 20


async def connect(path: str) -> QMPClient:
    client = QMPClient("jobs-test")
    await client.connect(path)
    return client


async def statuses_until(listener: EventListener, done: set[str]) -> dict[str, list[str]]:
    """Collect JOB_STATUS_CHANGE per job until every job in ``done`` reached null."""
    seen: dict[str, list[str]] = defaultdict(list)
    remaining = set(done)
    async for event in listener:
        if event["event"] != "JOB_STATUS_CHANGE":
            continue
        job, status = event["data"]["id"], event["data"]["status"]
        seen[job].append(status)
        if status == "null":
            remaining.discard(job)
            if not remaining:
                return seen
    raise AssertionError("listener ended")


async def test_many_concurrent_jobs_each_follow_a_legal_path(qmpjobd_factory):
    jobs = [f"j{i}" for i in range(40)]
    args = []
    for i in range(len(jobs)):
        args += ["--blockdev", f"null-co,node-name=s{i},size={64 * MiB}",
                 "--blockdev", f"null-co,node-name=t{i},size={64 * MiB}"]
    daemon = qmpjobd_factory(*args)
    client = await connect(daemon.sockets[0])
    listener = EventListener()
    try:
        with client.listen(listener):
            for i, job in enumerate(jobs):
                await client.execute("blockdev-backup", {"job-id": job, "device": f"s{i}", "target": f"t{i}",
                                                         "sync": "full", "speed": 16 * MiB})
            assert len(await client.execute("query-jobs")) == len(jobs)
            # pause a quarter, cancel a quarter, speed up the rest
            for job in jobs[:10]:
                await client.execute("job-pause", {"id": job})
            for job in jobs[10:20]:
                await client.execute("job-cancel", {"id": job})
            for job in jobs[20:]:
                await client.execute("block-job-set-speed", {"device": job, "speed": 0})
            paused = {j["device"]: j["paused"] for j in await client.execute("query-block-jobs")}
            assert all(paused[job] for job in jobs[:10])
            for job in jobs[:10]:
                await client.execute("job-resume", {"id": job})
                await client.execute("block-job-set-speed", {"device": job, "speed": 0})
            seen = await asyncio.wait_for(statuses_until(listener, set(jobs)), 60)
    finally:
        await client.disconnect()
    for job in jobs:
        path = seen[job]
        assert path[-1] == "null"
        if job in jobs[10:20]:
            assert path[-3:] == ["aborting", "concluded", "null"], (job, path)
        else:
            assert path[-4:] == ["waiting", "pending", "concluded", "null"], (job, path)


async def one_backup_statuses(qmpjobd_factory, *options: str) -> list[str]:
    """Start a daemon with ``options``, run one 1 MiB backup, return its statuses."""
    daemon = qmpjobd_factory(*options,
                             "--blockdev", "null-co,node-name=a,size=1048576",
                             "--blockdev", "null-co,node-name=b,size=1048576")
    client = await connect(daemon.sockets[0])
    listener = EventListener()
    try:
        with client.listen(listener):
            await client.execute("blockdev-backup", {"job-id": "j", "device": "a", "target": "b", "sync": "full"})
            seen = await asyncio.wait_for(statuses_until(listener, {"j"}), 10)
    finally:
        await client.disconnect()
    return seen["j"]


async def test_no_drain_artefacts_option_leaves_out_the_extra_pause(qmpjobd_factory):
    assert await one_backup_statuses(qmpjobd_factory, "--no-drain-artefacts") == [
        "created", "running", "waiting", "pending", "concluded", "null"]


async def test_reconnect_finds_concluded_jobs_with_their_errors(daemon):
    first = await connect(daemon.sockets[0])
    await first.execute("blockdev-backup", {"job-id": "ok", "device": "src", "target": "tgt",
                                            "sync": "full", "auto-dismiss": False})
    await first.execute("blockdev-backup", {"job-id": "gone", "device": "src", "target": "tgt",
                                            "sync": "full", "speed": MiB, "auto-dismiss": False})
    await first.execute("job-cancel", {"id": "gone"})
    await first.disconnect()
    second = await connect(daemon.sockets[0])
    try:
        jobs = {j["id"]: j for j in await second.execute("query-jobs")}
        assert jobs["ok"]["status"] == "concluded" and "error" not in jobs["ok"]
        assert jobs["gone"]["status"] == "concluded" and jobs["gone"]["error"] == "Operation canceled"
        for job in jobs:
            await second.execute("job-dismiss", {"id": job})
        assert await second.execute("query-jobs") == []
        try:
            await second.execute("job-dismiss", {"id": "ok"})
        except ExecuteError as err:
            assert str(err) == "Job not found"
        else:
            raise AssertionError("a dismissed job was found again")
    finally:
        await second.disconnect()


async def test_plain_asyncio_event_loop_runs_jobs_too(qmpjobd_factory):
    """uvloop is used when installed; the pure-asyncio loop must work the same."""
    assert await one_backup_statuses(qmpjobd_factory, "--event-loop", "asyncio") == [
        "created", "running", "paused", "running", "waiting", "pending", "concluded", "null"]
