"""The test controls over real sockets: each control's exact event sequence.

One qmpjobd process per module, started with ``--test-controls --clock virtual``,
so every scenario is deterministic and cheap enough to repeat 100 times in a row.
Where QEMU can be made to do the same (blkdebug errors), the sequence is compared
with qemu-storage-daemon's.
"""

from __future__ import annotations

import json

import pytest

from tests.support.daemons import DaemonProcess, RawClient

MiB = 1 << 20
SIZE = 16 * MiB
REPEAT = 100

NODES = [
    "--blockdev", f"null-co,node-name=src,size={SIZE}",
    "--blockdev", f"null-co,node-name=tgt,size={SIZE}",
    "--blockdev", f"null-co,node-name=tgt2,size={SIZE}",
    "--blockdev", f"null-co,node-name=zsrc,size={SIZE},read-zeroes=on",
    "--blockdev", f"null-co,node-name=ztgt,size={SIZE},read-zeroes=on",
]


class Client:
    """Line-oriented QMP client that splits what arrives into events and a reply."""

    def __init__(self, path: str) -> None:
        self.raw = RawClient(path)
        self.greeting = json.loads(self.raw.recv_message())
        self.backlog: list[dict] = []

    def negotiate(self) -> "Client":
        assert self.cmd("qmp_capabilities")[1] == {"return": {}}
        return self

    def send(self, name: str, args: dict | None = None, **extra: object) -> None:
        message: dict = {"execute": name, **extra}
        if args:
            message["arguments"] = args
        self.raw.send(json.dumps(message) + "\n")

    def receive(self) -> dict:
        return json.loads(self.raw.recv_message())

    def until_reply(self) -> tuple[list[dict], dict]:
        """Events (data only, no timestamps) and then the reply."""
        events = []
        while True:
            message = self.receive()
            if "event" in message:
                events.append({"event": message["event"], "data": message.get("data")})
            else:
                return events, message

    def until_reply_after(self, count: int) -> list[dict]:
        """The next ``count`` messages, which must all be events."""
        messages = [self.receive() for _ in range(count)]
        assert all("event" in m for m in messages), messages
        return [{"event": m["event"], "data": m.get("data")} for m in messages]

    def cmd(self, name: str, args: dict | None = None) -> tuple[list[dict], dict]:
        self.send(name, args)
        return self.until_reply()

    def ok(self, name: str, args: dict | None = None) -> list[dict]:
        events, reply = self.cmd(name, args)
        assert "return" in reply, (name, reply)
        return events

    def close(self) -> None:
        self.raw.close()


def status(job: str, *statuses: str) -> list[dict]:
    return [{"event": "JOB_STATUS_CHANGE", "data": {"id": job, "status": s}} for s in statuses]


def completed(job: str, offset: int, length: int = SIZE, error: str | None = None,
              speed: int = 0, kind: str = "BLOCK_JOB_COMPLETED") -> dict:
    data: dict = {"device": job, "len": length, "offset": offset, "speed": speed, "type": "backup"}
    if error is not None:
        data["error"] = error
    return {"event": kind, "data": data}


@pytest.fixture(scope="module")
def daemon():
    process = DaemonProcess("qmpjobd", ["--test-controls", "--clock", "virtual", *NODES],
                            monitors=2).start()
    yield process
    process.stop()


@pytest.fixture
def qmp(daemon):
    client = Client(daemon.sockets[0]).negotiate()
    yield client
    client.close()


def backup(job: str, target: str = "tgt", **options: object) -> dict:
    return {"job-id": job, "device": "src", "target": target, "sync": "full", **options}


# ---------------------------------------------------------------------- visibility


CONTROLS = ["x-qmpjobd-job-fault", "x-qmpjobd-job-hold", "x-qmpjobd-job-release",
            "x-qmpjobd-job-ready-lost", "x-qmpjobd-reply-delay", "x-qmpjobd-disconnect",
            "x-qmpjobd-clock-step", "x-qmpjobd-clock-query", "x-qmpjobd-fault-query"]


def test_controls_are_absent_without_the_option():
    with DaemonProcess("qmpjobd", list(NODES)) as plain:
        client = Client(plain.sockets[0]).negotiate()
        names = {c["name"] for c in client.cmd("query-commands")[1]["return"]}
        schema = {e["name"] for e in client.cmd("query-qmp-schema")[1]["return"]}
        assert not [n for n in names | schema if n.startswith("x-qmpjobd")]
        for name in CONTROLS:
            assert client.cmd(name)[1] == {"error": {
                "class": "CommandNotFound", "desc": f"The command {name} has not been found"}}
        client.close()


def test_controls_are_listed_with_the_option(qmp):
    names = [c["name"] for c in qmp.cmd("query-commands")[1]["return"]]
    entries = {e["name"]: e for e in qmp.cmd("query-qmp-schema")[1]["return"]}
    for name in CONTROLS:
        assert name in names
        assert entries[name]["features"] == ["unstable"]


def test_virtual_clock_needs_test_controls():
    process = DaemonProcess("qmpjobd", ["--clock", "virtual"])
    with pytest.raises(RuntimeError, match="--clock virtual: needs --test-controls"):
        process.start()


# ---------------------------------------------------------------------- run faults


def enospc_at_half(qmp: Client, job: str) -> None:
    qmp.ok("x-qmpjobd-job-fault", {"id": job, "phase": "run", "iotype": "write",
                                   "errno": 28, "at-progress": 0.5})
    events = qmp.ok("blockdev-backup", backup(job, **{"on-target-error": "enospc"}))
    assert events == status(job, "created", "running", "paused", "running") + [
        {"event": "BLOCK_JOB_ERROR", "data": {"device": job, "operation": "write", "action": "stop"}},
        *status(job, "paused")]
    info = qmp.cmd("query-block-jobs")[1]["return"][0]
    assert (info["status"], info["io-status"], info["offset"]) == ("paused", "nospace", SIZE // 2)
    events = qmp.ok("job-resume", {"id": job})
    assert events == status(job, "running", "waiting", "pending") + [
        completed(job, SIZE), *status(job, "concluded", "null")]


def test_enospc_at_half_with_stop_then_resume_100_times(qmp):
    for round_ in range(REPEAT):
        enospc_at_half(qmp, f"e{round_}")


def test_read_fault_reported_with_strerror(qmp):
    qmp.ok("x-qmpjobd-job-fault", {"type": "backup", "phase": "run", "iotype": "read",
                                   "at-progress": 0.25})
    events = qmp.ok("blockdev-backup", backup("r0"))
    assert events[-5:] == [
        {"event": "BLOCK_JOB_ERROR", "data": {"device": "r0", "operation": "read", "action": "report"}},
        *status("r0", "aborting"), completed("r0", SIZE // 4, error="Input/output error"),
        *status("r0", "concluded", "null")]
    fired = qmp.cmd("x-qmpjobd-fault-query")[1]["return"]
    assert fired[-1] == {"id": "r0", "phase": "run", "message": "Input/output error"}


def test_run_fault_without_iotype_fails_the_job_with_its_message(qmp):
    qmp.ok("x-qmpjobd-job-fault", {"id": "m0", "phase": "run", "message": "target went away",
                                   "at-progress": 0.5})
    events = qmp.ok("blockdev-backup", backup("m0"))
    assert events[-4:] == [*status("m0", "aborting"),
                           completed("m0", SIZE // 2, error="target went away"),
                           *status("m0", "concluded", "null")]
    assert not [e for e in events if e["event"] == "BLOCK_JOB_ERROR"]


def test_fault_arguments_are_checked(qmp):
    cases = [
        ({"phase": "run"}, "Exactly one of 'id' and 'type' must be given"),
        ({"id": "a", "phase": "prepare", "iotype": "read"},
         "Parameter 'iotype' is only valid with phase 'run'"),
        ({"id": "a", "phase": "run", "at-progress": 1.5},
         "Parameter 'at-progress' expects a value from 0 to 1"),
        ({"id": "a", "phase": "run", "count": 0}, "Parameter 'count' expects a value of at least 1"),
    ]
    for args, desc in cases:
        assert qmp.cmd("x-qmpjobd-job-fault", args)[1] == {
            "error": {"class": "GenericError", "desc": desc}}


# ---------------------------------------------------------------------- prepare / commit


def grouped_pair(qmp: Client, first: str, second: str, failing: str) -> None:
    qmp.ok("x-qmpjobd-job-fault", {"id": failing, "phase": "prepare", "errno": 28})
    manual = {"auto-finalize": False, "auto-dismiss": False}
    actions = [{"type": "blockdev-backup", "data": backup(first, "tgt", **manual)},
               {"type": "blockdev-backup", "data": backup(second, "tgt2", **manual)}]
    events = qmp.ok("transaction", {"actions": actions,
                                    "properties": {"completion-mode": "grouped"}})
    assert [e["data"]["id"] for e in events if e["event"] == "BLOCK_JOB_PENDING"] == [second, first]


def dismiss_all(qmp: Client, *jobs: str) -> None:
    for job in jobs:
        qmp.ok("job-dismiss", {"id": job})


def grouped_prepare_failure(qmp: Client, first: str, second: str) -> None:
    """job-finalize of the member whose prepare fails: it concludes with its
    error, the other is aborted (job-lifecycle.md 5.11 and 5.13.3)."""
    grouped_pair(qmp, first, second, failing=second)
    events, reply = qmp.cmd("job-finalize", {"id": second})
    assert reply == {"return": {}}
    assert events == [
        *status(second, "aborting"),
        completed(second, SIZE, error="No space left on device"), *status(second, "concluded"),
        *status(first, "aborting"),
        completed(first, SIZE, kind="BLOCK_JOB_CANCELLED"), *status(first, "concluded")]
    jobs = {j["id"]: j for j in qmp.cmd("query-jobs")[1]["return"]}
    assert jobs[second]["error"] == "No space left on device"
    assert jobs[first]["error"] == "Operation canceled"
    dismiss_all(qmp, first, second)


def test_prepare_failure_in_grouped_transaction_100_times(qmp):
    for round_ in range(REPEAT):
        grouped_prepare_failure(qmp, f"ga{round_}", f"gb{round_}")


def test_prepare_failure_of_another_member_than_the_finalized_one(qmp):
    """QEMU's job_do_finalize aborts the transaction on behalf of the job that
    job-finalize named: that job is not cancelled and commits (the prepare loop
    stopped before reaching it), while the member whose prepare failed is
    force-cancelled with it. qmpjobd keeps QEMU's algorithm."""
    grouped_pair(qmp, "qa", "qb", failing="qb")
    events = qmp.ok("job-finalize", {"id": "qa"})
    assert events == [
        *status("qb", "aborting"),
        {"event": "BLOCK_JOB_CANCELLED", "data": completed("qb", SIZE)["data"]},
        *status("qb", "concluded"), completed("qa", SIZE), *status("qa", "concluded")]
    dismiss_all(qmp, "qa", "qb")


def test_commit_fault_changes_no_event_and_is_recorded(qmp):
    clean = qmp.ok("blockdev-backup", backup("c0"))
    for round_ in range(REPEAT):
        job = f"c{round_ + 1}"
        qmp.ok("x-qmpjobd-job-fault", {"id": job, "phase": "commit", "message": "commit broke"})
        events = qmp.ok("blockdev-backup", backup(job))
        assert json.dumps(events).replace(f'"{job}"', '"c0"') == json.dumps(clean)
        assert qmp.cmd("x-qmpjobd-fault-query")[1]["return"][-1] == {
            "id": job, "phase": "commit", "message": "commit broke"}


# ---------------------------------------------------------------------- holds


def test_hold_before_pending_shows_waiting_until_released(qmp):
    qmp.ok("x-qmpjobd-job-hold", {"id": "h0", "before": "pending"})
    events = qmp.ok("blockdev-backup", backup("h0"))
    assert events[-1] == status("h0", "waiting")[0]
    assert qmp.cmd("query-jobs")[1]["return"][0]["status"] == "waiting"
    events = qmp.ok("x-qmpjobd-job-release", {"id": "h0"})
    assert events == status("h0", "pending") + [completed("h0", SIZE)] + status(
        "h0", "concluded", "null")
    assert qmp.cmd("x-qmpjobd-job-release", {"id": "h0"})[1] == {"error": {
        "class": "GenericError", "desc": "Job 'h0' has no hold to release"}}


def test_hold_before_ready_keeps_mirror_running(qmp):
    qmp.ok("x-qmpjobd-job-hold", {"id": "hm", "before": "ready"})
    qmp.ok("blockdev-mirror", {"job-id": "hm", "device": "zsrc", "target": "ztgt", "sync": "full"})
    assert qmp.cmd("query-jobs")[1]["return"][0]["status"] == "running"
    assert qmp.cmd("job-complete", {"id": "hm"})[1]["error"]["desc"] == (
        "Job 'hm' in state 'running' cannot accept command verb 'complete'")
    events = qmp.ok("x-qmpjobd-job-release", {"id": "hm", "before": "ready"})
    assert [e["event"] for e in events] == ["JOB_STATUS_CHANGE", "BLOCK_JOB_READY"]
    qmp.ok("job-cancel", {"id": "hm"})
    qmp.ok("x-qmpjobd-clock-step", {"until-idle": True})
    assert qmp.cmd("query-jobs")[1]["return"] == []


# ---------------------------------------------------------------------- ready lost


def test_ready_lost_and_regained_100_times(qmp):
    qmp.ok("blockdev-mirror", {"job-id": "rl", "device": "zsrc", "target": "ztgt",
                               "sync": "full", "speed": 4 * MiB})
    qmp.ok("x-qmpjobd-clock-step", {"until-idle": True})
    info = qmp.cmd("query-jobs")[1]["return"][0]
    assert info["status"] == "ready"
    base = info["total-progress"]
    for round_ in range(REPEAT):
        # Paused, so the loss stays visible until the mirror runs again.
        assert qmp.ok("job-pause", {"id": "rl"}) == status("rl", "standby")
        assert qmp.ok("x-qmpjobd-job-ready-lost", {"id": "rl", "bytes": 2 * MiB}) == []
        info = qmp.cmd("query-jobs")[1]["return"][0]
        lost_total = base + (round_ + 1) * 2 * MiB
        assert (info["status"], info["total-progress"]) == ("standby", lost_total)
        assert info["total-progress"] - info["current-progress"] == 2 * MiB
        events = qmp.ok("job-resume", {"id": "rl"})
        events += qmp.ok("x-qmpjobd-clock-step", {"until-idle": True})
        # QEMU never leaves READY: no running, no second BLOCK_JOB_READY.
        assert events == status("rl", "ready")
        info = qmp.cmd("query-jobs")[1]["return"][0]
        assert info["current-progress"] == info["total-progress"] == lost_total
    events = qmp.ok("job-complete", {"id": "rl"})
    events += qmp.ok("x-qmpjobd-clock-step", {"until-idle": True})
    assert [e["data"].get("status", e["event"]) for e in events] == [
        "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]


def test_ready_lost_needs_a_ready_mirror(qmp):
    qmp.ok("x-qmpjobd-job-hold", {"id": "nr", "before": "pending"})
    qmp.ok("blockdev-backup", backup("nr"))
    assert qmp.cmd("x-qmpjobd-job-ready-lost", {"id": "nr", "bytes": 1})[1] == {"error": {
        "class": "GenericError", "desc": "Job 'nr' is not a READY mirror"}}
    qmp.ok("x-qmpjobd-job-release", {"id": "nr"})


# ---------------------------------------------------------------------- replies


def test_reply_delay_times_out_and_recovers_100_times(daemon, qmp):
    other = Client(daemon.sockets[1]).negotiate()
    try:
        for round_ in range(REPEAT):
            qmp.ok("x-qmpjobd-reply-delay", {"ms": 1000})
            qmp.send("query-version", id=f"late{round_}")
            # Runs at once (in order) but its reply must queue behind the held one.
            qmp.send("x-qmpjobd-clock-query", id=f"next{round_}")
            before = other.ok("x-qmpjobd-clock-query")
            start = other.cmd("x-qmpjobd-clock-query")[1]["return"]["now-ns"]
            other.ok("x-qmpjobd-clock-step", {"ns": 1_000_000_000})
            late = qmp.receive()
            assert late["id"] == f"late{round_}" and "qemu" in late["return"]
            following = qmp.receive()
            assert following["id"] == f"next{round_}"
            # It ran before the clock moved: the reply was only held.
            assert following["return"]["now-ns"] == start
            assert before == []
    finally:
        other.close()


def test_dropped_reply_never_arrives(qmp):
    qmp.ok("x-qmpjobd-reply-delay", {"drop": True, "count": 2})
    qmp.send("query-version", id="gone1")
    qmp.send("query-jobs", id="gone2")
    qmp.send("query-version", id="back")
    assert qmp.receive()["id"] == "back"


def test_events_keep_flowing_while_a_reply_is_held(daemon, qmp):
    other = Client(daemon.sockets[1]).negotiate()
    try:
        qmp.ok("x-qmpjobd-reply-delay", {"ms": 5})
        qmp.send("query-version", id="held")
        other.ok("blockdev-backup", backup("ev"))
        first = qmp.receive()
        assert first["event"] == "JOB_STATUS_CHANGE" and first["data"] == {"id": "ev", "status": "created"}
        # The whole backup ran in that command: all its events reached us,
        # the held reply still has not.
        events = [first["data"]["status"]] + [e["data"].get("status", e["event"])
                                              for e in qmp.until_reply_after(8)]
        assert events[-1] == "null"
        other.ok("x-qmpjobd-clock-step", {"ns": 5_000_000})
        assert qmp.receive()["id"] == "held"
    finally:
        other.close()


# ---------------------------------------------------------------------- disconnect


def test_disconnect_and_reconnect_reconciles_query_jobs_100_times(daemon, qmp):
    qmp.ok("blockdev-backup", backup("dc", speed=MiB))
    qmp.ok("x-qmpjobd-clock-step", {"ns": 100_000_000})
    expected = qmp.cmd("query-jobs")[1]["return"]
    assert expected[0]["status"] == "running"
    client = qmp
    for _ in range(REPEAT):
        assert client.cmd("x-qmpjobd-disconnect")[1] == {"return": {}}
        with pytest.raises(EOFError):
            client.receive()
        client.close()
        client = Client(daemon.sockets[0]).negotiate()
        assert client.cmd("query-jobs")[1]["return"] == expected
    events = client.ok("x-qmpjobd-clock-step", {"until-idle": True})
    assert [e["data"].get("status", e["event"]) for e in events][-4:] == [
        "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    client.close()


def test_disconnect_except_caller_closes_the_others(daemon, qmp):
    other = Client(daemon.sockets[1]).negotiate()
    qmp.ok("x-qmpjobd-disconnect", {"except-caller": True})
    with pytest.raises(EOFError):
        other.receive()
    other.close()
    assert qmp.cmd("query-version")[1]["return"]["qemu"]


# ---------------------------------------------------------------------- against QEMU


def blkdebug_target(errno: int, sector: int) -> str:
    return json.dumps({"driver": "raw", "node-name": "tgt", "file": {
        "driver": "blkdebug", "image": {"driver": "null-co", "size": SIZE},
        "inject-error": [{"event": "write_aio", "errno": errno, "sector": sector, "once": True}]}})


def error_stop_transcript(kind: str, args: list[str], fault: dict | None) -> list:
    with DaemonProcess(kind, args, version="7.2" if kind == "qsd" else None) as process:
        client = Client(process.sockets[0]).negotiate()
        if fault is not None:
            client.ok("x-qmpjobd-job-fault", fault)
        events = client.ok("blockdev-backup", backup("q0", **{"on-target-error": "enospc"}))
        # On QEMU the error may come after the reply: read up to the pause it causes.
        while not [e for e in events if e["event"] == "BLOCK_JOB_ERROR"] or \
                events[-1] != status("q0", "paused")[0]:
            message = client.receive()
            events.append({"event": message["event"], "data": message.get("data")})
        info = client.cmd("query-block-jobs")[1]["return"][0]
        events_resume = client.ok("job-resume", {"id": "q0"})
        while events_resume[-1] != status("q0", "null")[0]:
            message = client.receive()
            events_resume.append({"event": message["event"], "data": message.get("data")})
        client.close()
    return [events, info["io-status"], info["status"], events_resume]


def test_enospc_fault_matches_blkdebug_on_qemu():
    sector = (SIZE // 2) // 512
    qsd = error_stop_transcript(
        "qsd", ["--blockdev", f"null-co,node-name=src,size={SIZE}",
                "--blockdev", blkdebug_target(28, sector)], None)
    ours = error_stop_transcript(
        "qmpjobd", ["--test-controls", "--blockdev", f"null-co,node-name=src,size={SIZE}",
                    "--blockdev", f"null-co,node-name=tgt,size={SIZE}"],
        {"id": "q0", "phase": "run", "iotype": "write", "errno": 28, "at-progress": 0.5})
    assert ours == qsd
