"""Exit by `quit`, SIGTERM, SIGINT and SIGHUP with jobs in every state, against
qemu-storage-daemon: both daemons play the same scenario and must send the same
events (and `quit`'s reply) in the same order before they hang up, exit 0 and leave
no socket behind."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.integration.procs import Scenario, Step, negotiated, read_until_eof, status, summary
from tests.support.daemons import DaemonProcess

GIB = 1 << 30
NULL_NODES = [f"null-co,node-name={name},size={size}" for name, size in (
    ("s1", GIB), ("t1", GIB), ("s2", 1 << 20), ("t2", 1 << 20),
    ("s3", GIB), ("t3", GIB), ("s4", GIB), ("t4", GIB))]


def backup(job_id: str, device: str, target: str, **extra: object) -> dict:
    return {"execute": "blockdev-backup", "arguments": {
        "job-id": job_id, "device": device, "target": target, "sync": "full", **extra}}


def mirror(job_id: str, device: str, target: str, **extra: object) -> dict:
    return {"execute": "blockdev-mirror", "arguments": {
        "job-id": job_id, "device": device, "target": target, "sync": "full", **extra}}


def event(name: str, **data: object) -> str:
    return summary(json.dumps({"event": name, "data": data}).encode())


# Rate limits of 1 KiB/s keep a job running (asleep) for the whole test.
SCENARIOS = {
    "running-backup": [Step(backup("b", "s1", "t1", speed=1024))],
    "rate-limited-mirror": [Step(mirror("m", "s1", "t1", speed=1024))],
    "ready-mirror": [Step(mirror("m", "s2", "t2"),
                          until=[event("BLOCK_JOB_READY", device="m", speed=0, type="mirror")])],
    "paused-backup": [Step(backup("b", "s1", "t1", speed=1024)),
                      Step({"execute": "job-pause", "arguments": {"id": "b"}}, until=[status("b", "paused")])],
    "pending-backup": [Step(backup("p", "s2", "t2", **{"auto-finalize": False}),
                            until=[status("p", "pending")])],
    "concluded-backup": [Step(backup("c", "s2", "t2", **{"auto-dismiss": False}),
                              until=[status("c", "concluded")])],
    "several-with-group": [
        Step(backup("c", "s2", "t2", **{"auto-dismiss": False}), until=[status("c", "concluded")]),
        Step(mirror("m", "s1", "t1", speed=1024)),
        Step({"execute": "transaction", "arguments": {
            "actions": [{"type": "blockdev-backup", "data": backup(f"g{i}", f"s{i + 2}", f"t{i + 2}",
                                                                   speed=1024)["arguments"]}
                        for i in (1, 2)],
            "properties": {"completion-mode": "grouped"}}}),
    ],
}

CASES = [(name, finish) for name in SCENARIOS for finish in ("SIGTERM", "quit")]
CASES += [("several-with-group", "SIGINT"), ("several-with-group", "SIGHUP"),
          ("ready-mirror", "SIGHUP")]


@pytest.mark.parametrize("name, finish", CASES)
def test_exit_cancels_every_job_as_qemu_does(name, finish):
    scenario = Scenario(NULL_NODES, SCENARIOS[name])
    qsd = scenario.play("qsd", finish)
    ours = scenario.play("qmpjobd", finish)
    assert ours.shutdown == qsd.shutdown
    assert (ours.returncode, ours.socket_left) == (qsd.returncode, qsd.socket_left) == (0, False)
    assert "Traceback" not in ours.stderr and "Exception" not in ours.stderr
    # Every job that existed is gone, with a last event saying so; no SHUTDOWN event.
    assert not any(line.startswith("SHUTDOWN") for line in ours.shutdown)
    if finish == "quit":
        assert ours.shutdown[-1] == '{"id": "quit", "return": {}}'


LATENCY_NODES = ['{"driver":"null-co","node-name":"slow","size":1073741824,"latency-ns":300000000}',
                 "null-co,node-name=tgt,size=1073741824"]


@pytest.mark.parametrize("finish", ["SIGTERM", "quit"])
def test_exit_waits_for_requests_in_flight_as_qemu_does(finish):
    """A job inside a request when the signal (or quit) comes: the drain waits for
    the request, the job pauses, and then it is cancelled; quit's reply is last."""
    scenario = Scenario(LATENCY_NODES, [Step(backup("b", "slow", "tgt"))])
    qsd = scenario.play("qsd", finish)
    ours = scenario.play("qmpjobd", finish)
    assert ours.shutdown == qsd.shutdown
    last = -2 if finish == "quit" else -1
    assert ours.shutdown[0] == status("b", "paused") and ours.shutdown[last] == status("b", "null")
    assert ours.returncode == qsd.returncode == 0


def test_a_job_stuck_in_a_request_does_not_hold_the_exit_past_the_grace_period(tmp_path):
    """QEMU would wait for the request (here an hour); qmpjobd exits after
    --shutdown-timeout, says which job it left, and still cleans up."""
    pidfile = tmp_path / "pid"
    stuck = ['{"driver":"null-co","node-name":"slow","size":1073741824,"latency-ns":3600000000000}',
             "null-co,node-name=tgt,size=1073741824"]
    args = ["--shutdown-timeout", "0.2", "--pidfile", str(pidfile)]
    for blockdev in stuck:
        args += ["--blockdev", blockdev]
    with DaemonProcess("qmpjobd", args) as daemon:
        client = negotiated(daemon.sockets[0])
        Step(backup("b", "slow", "tgt")).run(client)
        assert pidfile.exists()
        daemon.proc.send_signal(signal.SIGTERM)
        assert read_until_eof(client) == []
        assert daemon.proc.wait(30) == 0
        assert not pidfile.exists()
        assert not os.path.exists(daemon.sockets[0])
        stderr = daemon.stderr()
    assert "exiting with 1 job(s) still stopping after 0.2 s: b" in stderr
    assert "Traceback" not in stderr and "Exception" not in stderr


def query_block_jobs(client) -> list[dict]:
    client.send(b'{"execute":"query-block-jobs","id":1}')
    while True:
        message = json.loads(client.recv_message())
        if "event" not in message:
            return message["return"]


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGPIPE", "SIGALRM"])
def test_signals_qemu_ignores_change_nothing(signame):
    """The daemon keeps running and its job keeps going, on both daemons."""
    seen = {}
    for kind in ("qsd", "qmpjobd"):
        args = sum((["--blockdev", node] for node in NULL_NODES[:2]), [])
        with DaemonProcess(kind, args) as daemon:
            client = negotiated(daemon.sockets[0])
            Step(backup("b", "s1", "t1", speed=1024)).run(client)
            # Until the job sleeps in its rate limit (its first chunk may still be
            # copying on a loaded machine): the state the signal must not change.
            while query_block_jobs(client)[0]["busy"]:
                time.sleep(0.01)
            daemon.proc.send_signal(getattr(signal, signame))
            # A round trip after the signal: the daemon handled it (or ignored it).
            jobs = query_block_jobs(client)
            seen[kind] = ([(job["device"], job["busy"], job["paused"]) for job in jobs],
                          daemon.proc.poll())
    assert seen["qmpjobd"] == seen["qsd"] == ([("b", False, False)], None)
