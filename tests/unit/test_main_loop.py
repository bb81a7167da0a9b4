"""The main-loop model (JobManager bottom halves) and where the dispatcher puts the reply.

QEMU 7.2 facts the model follows (util/async.c aio_bh_poll, AIO_WAIT_WHILE, the QMP
dispatcher resumed through the iohandler context):
* a pass runs the bottom halves scheduled before it, newest first; what they
  schedule waits for the next pass, unless a poll inside them runs it;
* coroutines woken with aio_co_schedule share one bottom half and run in order;
* a command's reply goes out after one pass over what the command scheduled.
The transcripts at the end are the ones qemu-storage-daemon 7.2 produced
(tests/conformance/scenarios/jobs_main_loop.qmp and block_errors_backup.qmp).
"""

from __future__ import annotations

from typing import Any

import pytest

import qmpjobd.commands as commands
from qmpjobd.daemon import Daemon
from qmpjobd.dispatch import Dispatcher
from qmpjobd.job.manager import JobManager
from qmpjobd.qapi import Schema
from qmpjobd.wire.lexer import ParsedValue
from qmpjobd.wire.session import Session


def manager() -> JobManager:
    return JobManager(lambda name, data: None, clock=None)


# --------------------------------------------------------------------- passes

def test_pass_runs_newest_first_and_leaves_what_it_schedules() -> None:
    jobs = manager()
    ran: list[str] = []
    jobs.defer(lambda: ran.append("a"))
    jobs.defer(lambda: (ran.append("b"), jobs.defer(lambda: ran.append("b2"))))
    jobs.defer(lambda: ran.append("c"))
    assert jobs.main_loop_pass()
    assert ran == ["c", "b", "a"]
    assert jobs.has_bottom_halves
    assert jobs.main_loop_pass()
    assert ran == ["c", "b", "a", "b2"]
    assert not jobs.main_loop_pass()


def test_co_schedule_shares_one_bottom_half_in_order() -> None:
    jobs = manager()
    ran: list[str] = []
    jobs.co_schedule(lambda: ran.append("co1"))
    jobs.defer(lambda: ran.append("bh"))
    jobs.co_schedule(lambda: (ran.append("co2"), jobs.co_schedule(lambda: ran.append("co3"))))
    jobs.main_loop_pass()
    # The shared bottom half was scheduled before "bh", so it runs after it; a
    # coroutine it schedules again needs the next pass.
    assert ran == ["bh", "co1", "co2"]
    jobs.main_loop_pass()
    assert ran == ["bh", "co1", "co2", "co3"]


def test_nested_poll_finishes_the_outer_pass() -> None:
    jobs = manager()
    ran: list[str] = []
    done = {"flag": False}

    def polling() -> None:
        ran.append("poll")
        jobs.defer(lambda: (ran.append("inner"), done.update(flag=True)))
        assert jobs.poll_while(lambda: not done["flag"])

    jobs.defer(lambda: ran.append("older"))
    jobs.defer(polling)
    jobs.main_loop_pass()
    # aio_poll inside a bottom half runs the rest of the outer slice first.
    assert ran == ["poll", "older", "inner"]


def test_poll_stops_as_soon_as_its_condition_holds() -> None:
    jobs = manager()
    ran: list[str] = []
    state = {"done": False}
    jobs.defer(lambda: (ran.append("first"), state.update(done=True),
                        jobs.defer(lambda: ran.append("later"))))
    assert jobs.poll_while(lambda: not state["done"])
    assert ran == ["first"]
    assert jobs.has_bottom_halves


def test_poll_gives_up_when_only_io_could_help() -> None:
    jobs = manager()
    assert jobs.poll_while(lambda: True) is False


# --------------------------------------------------------------------- the reply

class Monitor:
    """One negotiated monitor on a dispatcher, recording events and replies in order."""

    def __init__(self, *blockdevs: dict) -> None:
        self.daemon = Daemon(schema=Schema.load())
        self.dispatcher = Dispatcher(self.daemon, commands.load_all())
        self.session = Session()
        self.log: list[str] = []
        self.daemon.sinks.append(self._event)
        self.command("qmp_capabilities")
        for options in blockdevs:
            self.command("blockdev-add", options)

    def _event(self, name: str, data: dict) -> None:
        if name == "JOB_STATUS_CHANGE":
            self.log.append(f"{data['id']}:{data['status']}")
        elif name == "BLOCK_JOB_ERROR":
            self.log.append(f"ERROR {data['device']}:{data['action']}")
        else:
            self.log.append(f"{name.removeprefix('BLOCK_JOB_')} {data.get('device')}")

    def command(self, name: str, arguments: dict | None = None) -> Any:
        request: dict = {"execute": name}
        if arguments is not None:
            request["arguments"] = arguments
        reply = self.dispatcher.handle(self.session, ParsedValue(request))
        assert "error" not in reply, reply
        self.log.append(f"reply {name}")
        return reply["return"]

    def settle(self) -> list[str]:
        """The main loop after the reply: everything left runs."""
        self.daemon.jobs.run_bottom_halves()
        log, self.log = self.log, []
        return log


def null(name: str) -> dict:
    return {"driver": "null-co", "node-name": name, "size": 8 << 20}


def failing_read(name: str) -> dict:
    return {"driver": "raw", "node-name": name,
            "file": {"driver": "blkdebug", "image": {"driver": "null-co", "size": 8 << 20},
                     "inject-error": [{"errno": 5, "event": "read_aio", "once": True}]}}


def backup(job_id: str, device: str, target: str, **extra: Any) -> dict:
    return {"type": "blockdev-backup",
            "data": {"device": device, "job-id": job_id, "sync": "full", "target": target,
                     **extra}}


def test_jobs_finished_by_the_command_complete_before_its_reply_newest_first() -> None:
    mon = Monitor(null("s1"), null("t1"), null("s2"), null("t2"))
    mon.settle()
    mon.command("transaction", {"actions": [backup("a1", "s1", "t1"),
                                            backup("a2", "s2", "t2")]})
    done = ["waiting", "pending", "COMPLETED", "concluded", "null"]
    assert mon.settle() == [
        "a1:created", "a2:created", "a1:running", "a1:paused", "a2:running", "a2:paused",
        "a1:running", "a2:running",
        *[f"a2:{s}" if s.islower() else f"{s} a2" for s in done],
        *[f"a1:{s}" if s.islower() else f"{s} a1" for s in done],
        "reply transaction",
    ]


def test_injected_read_errors_come_before_the_reply_completion_after() -> None:
    mon = Monitor(failing_read("e1"), failing_read("e2"), null("t1"), null("t2"))
    mon.settle()
    mon.command("transaction", {"actions": [backup("b1", "e1", "t1"),
                                            backup("b2", "e2", "t2")]})
    log = mon.settle()
    reply = log.index("reply transaction")
    assert log[reply - 2:reply] == ["ERROR b1:report", "ERROR b2:report"]
    assert log[reply + 1:] == ["b2:aborting", "COMPLETED b2", "b2:concluded", "b2:null",
                               "b1:aborting", "COMPLETED b1", "b1:concluded", "b1:null"]


def test_cancel_of_an_error_stopped_backup_replies_before_it_ends() -> None:
    write_fails = {"driver": "raw", "node-name": "e6",
                   "file": {"driver": "blkdebug", "image": {"driver": "null-co", "size": 8 << 20},
                            "inject-error": [{"errno": 5, "event": "write_aio", "once": False}]}}
    mon = Monitor(null("s6"), write_fails)
    mon.command("blockdev-backup", {"device": "s6", "job-id": "b6", "sync": "full",
                                    "target": "e6", "on-target-error": "stop"})
    assert mon.settle()[-3:] == ["ERROR b6:stop", "b6:paused", "reply blockdev-backup"]
    mon.command("job-cancel", {"id": "b6"})
    assert mon.settle() == ["b6:running", "reply job-cancel", "b6:aborting",
                            "CANCELLED b6", "b6:concluded", "b6:null"]


@pytest.mark.parametrize("verb", ["job-complete", "job-cancel"])
def test_mirror_leaves_run_after_the_reply(verb: str) -> None:
    mon = Monitor(null("src"), null("tgt"))
    mon.command("blockdev-mirror", {"device": "src", "job-id": "m", "sync": "full",
                                    "target": "tgt"})
    assert mon.settle()[-3:] == ["m:ready", "READY m", "reply blockdev-mirror"]
    mon.command(verb, {"id": "m"})
    log = mon.settle()
    assert log[0] == f"reply {verb}"
    assert log[-2:] == ["m:concluded", "m:null"]
