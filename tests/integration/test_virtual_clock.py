"""--clock virtual: time moves only with x-qmpjobd-clock-step, so a rate-limited
job's progress after each step, its events and their timestamps are the same on
every run, and a job of seconds finishes in far less real time."""

from __future__ import annotations

import json

from tests.support.daemons import DaemonProcess, RawClient

MiB = 1 << 20
SIZE = 16 * MiB
# 1 MiB per 100 ms rate-limit slice, exactly (QEMU truncates a slice's quota, so
# most speeds give deadlines a few ns past a round number).
SPEED = 10 * MiB
# Backup dispatches 1 MiB chunks: each one uses up a slice, so one per 100 ms.
STEP_NS = 100_000_000
CHUNK = MiB


def transcript(raw: RawClient, message: dict) -> list[bytes]:
    """Send ``message``; every message up to and including its reply, as bytes."""
    raw.send(json.dumps(message) + "\n")
    out = []
    while True:
        line = raw.recv_message()
        out.append(line)
        if b'"return"' in line or b'"error"' in line:
            return out


def rate_limited_backup_run() -> tuple[list[bytes], list[int], int]:
    args = ["--test-controls", "--clock", "virtual",
            "--blockdev", f"null-co,node-name=src,size={SIZE}",
            "--blockdev", f"null-co,node-name=tgt,size={SIZE}"]
    with DaemonProcess("qmpjobd", args) as daemon:
        raw = RawClient(daemon.sockets[0])
        log = [raw.recv_message()]
        log += transcript(raw, {"execute": "qmp_capabilities"})
        log += transcript(raw, {"execute": "blockdev-backup", "arguments": {
            "job-id": "b0", "device": "src", "target": "tgt", "sync": "full", "speed": SPEED}})
        progress = []
        steps = 0
        while True:
            jobs = transcript(raw, {"execute": "query-jobs"})
            log += jobs
            reply = json.loads(jobs[-1])["return"]
            if not reply:
                break
            progress.append(reply[0]["current-progress"])
            steps += 1
            log += transcript(raw, {"execute": "x-qmpjobd-clock-step", "arguments": {"ns": STEP_NS}})
            assert steps < 100, "the backup does not finish"
        raw.close()
    return log, progress, steps


def test_rate_limited_backup_is_the_same_on_every_run_and_takes_the_steps_its_speed_implies():
    first_log, progress, steps = rate_limited_backup_run()
    # The first chunk goes at once, then one chunk per 100 ms step; the step
    # that lets the last chunk go also finishes the job (auto-dismiss).
    chunks = SIZE // CHUNK
    assert progress == [(k + 1) * CHUNK for k in range(chunks - 1)]
    assert steps == chunks - 1
    for _ in range(2):
        assert rate_limited_backup_run()[0] == first_log


def test_event_timestamps_are_virtual_time():
    args = ["--test-controls", "--clock", "virtual",
            "--blockdev", f"null-co,node-name=src,size={SIZE}",
            "--blockdev", f"null-co,node-name=tgt,size={SIZE}"]
    with DaemonProcess("qmpjobd", args) as daemon:
        raw = RawClient(daemon.sockets[0])
        raw.recv_message()
        transcript(raw, {"execute": "qmp_capabilities"})
        transcript(raw, {"execute": "x-qmpjobd-clock-step", "arguments": {"ns": 1_500_000_000}})
        created = json.loads(transcript(raw, {"execute": "blockdev-backup", "arguments": {
            "job-id": "t0", "device": "src", "target": "tgt", "sync": "full"}})[0])
        assert created["timestamp"] == {"seconds": 1, "microseconds": 500000}
        info = json.loads(transcript(raw, {"execute": "x-qmpjobd-clock-query"})[-1])["return"]
        assert info == {"clock": "virtual", "now-ns": 1_500_000_000, "timers": 0}
        raw.close()


def test_clock_step_refused_on_the_real_clock():
    with DaemonProcess("qmpjobd", ["--test-controls"]) as daemon:
        raw = RawClient(daemon.sockets[0])
        raw.recv_message()
        transcript(raw, {"execute": "qmp_capabilities"})
        reply = json.loads(transcript(raw, {"execute": "x-qmpjobd-clock-step",
                                            "arguments": {"ns": 1}})[-1])
        assert reply == {"error": {"class": "GenericError", "desc":
                                   "The clock is real: start the daemon with --clock virtual"}}
        info = json.loads(transcript(raw, {"execute": "x-qmpjobd-clock-query"})[-1])["return"]
        assert info["clock"] == "real" and sorted(info) == ["clock", "now-ns"]
        raw.close()
