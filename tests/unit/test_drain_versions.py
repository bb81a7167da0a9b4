"""Drain artefacts, transaction order and the rate-limit wake-up per personality,
in-process (no sockets): the section table of qmpjobd.block.drain, the graph-lock
primitive of BlockGraph, and the pair counts of qemu-versions.md section 5.3.

The expected counts are what the real qemu-storage-daemon 7.2.22, 10.0.13 and
11.1.3 showed for an observer job on unrelated nodes (probe of drain-model.md,
reproduced on every version); tests/integration/test_drain_versions.py compares
against the live daemons.
"""

from __future__ import annotations

from tests.support.oracles import SUPPORTED_VERSIONS

import pytest

import qmpjobd.commands as commands
from qmpjobd.block.drain import (
    GRAPH_CHANGES,
    OPERATIONS,
    SectionKind,
    section_kind,
    visible_sections,
)
from qmpjobd.commands import Context
from qmpjobd.daemon import Daemon, DaemonOptions
from qmpjobd.errors import QMPError
from qmpjobd.job.clock import VirtualClock
from qmpjobd.qapi import Schema
from qmpjobd.versions import personality

if "drive" not in commands.MODULES:
    commands.MODULES = (*commands.MODULES, "drive")
HANDLERS = commands.load_all()
MiB = 1 << 20
VERSIONS = SUPPORTED_VERSIONS


_OPEN: list["Harness"] = []


@pytest.fixture(autouse=True)
def _close_daemons():
    """Abandon the jobs each test left running (their coroutines stay parked)."""
    yield
    while _OPEN:
        _OPEN.pop().daemon.jobs.close()


class Harness:
    """A daemon of one personality on a virtual clock, with an observer backup
    ``ob`` (64 MiB at 1 MiB/s) that keeps sleeping on its rate limit."""

    def __init__(self, version: str, *, drain_artefacts: bool = True,
                 observer: bool = True) -> None:
        self.clock = VirtualClock()
        self.daemon = Daemon(schema=Schema.load(version=version), clock=self.clock,
                             options=DaemonOptions(drain_artefacts=drain_artefacts))
        _OPEN.append(self)
        self.events: list[str] = []
        self.daemon.sinks.append(self._record)
        self.ctx = Context(daemon=self.daemon, session=None)
        if observer:
            for name in ("os", "ot"):
                self("blockdev-add", driver="null-co", **{"node-name": name}, size=64 * MiB)
            self("blockdev-backup", **{"job-id": "ob"}, device="os", target="ot",
                 sync="full", speed=MiB)
            self.take()

    def _record(self, name: str, data: dict) -> None:
        if name == "JOB_STATUS_CHANGE":
            self.events.append(f"{data['id']}:{data['status']}")
        else:
            self.events.append(f"{name}({data.get('device', data.get('id'))})")

    def __call__(self, name: str, **args) -> object:
        try:
            return HANDLERS[name](self.ctx, args)
        finally:
            self.daemon.jobs.run_bottom_halves()

    def attempt(self, name: str, **args) -> str | None:
        """Run a command; its error text, or None."""
        try:
            self(name, **args)
        except QMPError as err:
            return err.desc
        return None

    def take(self) -> list[str]:
        out, self.events = self.events, []
        return out

    def observer_pairs(self) -> int:
        events = self.take()
        paused = events.count("ob:paused")
        assert paused == events.count("ob:running"), events
        return paused


def null(h: Harness, *names: str, size: int = 8 * MiB) -> None:
    for name in names:
        h("blockdev-add", driver="null-co", **{"node-name": name}, size=size)
    h.take()


def backup(job_id: str, device: str, target: str, **extra) -> dict:
    return {"job-id": job_id, "device": device, "target": target, "sync": "full", **extra}


# --- the table ------------------------------------------------------------------


def test_7_2_has_no_graph_lock_sections() -> None:
    v72 = personality("7.2")
    for name in GRAPH_CHANGES:
        expected = SectionKind.DRAIN_ALL if name == "drain-all" else SectionKind.NONE
        assert section_kind(v72, name) is expected, name


@pytest.mark.parametrize("change, kinds", [
    ("close", (SectionKind.NONE, SectionKind.PULSE, SectionKind.HELD)),
    ("job-create", (SectionKind.NONE, SectionKind.PULSE, SectionKind.HELD)),
    ("insert-node", (SectionKind.NONE, SectionKind.PULSE, SectionKind.PULSE)),
    ("drop-filter", (SectionKind.NONE, SectionKind.PULSE, SectionKind.PULSE)),
    ("replace-node", (SectionKind.NONE, SectionKind.PULSE, SectionKind.PULSE)),
    ("aio-context", (SectionKind.NONE, SectionKind.NONE, SectionKind.DRAIN_ALL)),
    ("mirror-source-backing", (SectionKind.NONE, SectionKind.NONE, SectionKind.HELD)),
    ("drain-all", (SectionKind.DRAIN_ALL,) * 3),
])
def test_section_kind_per_version(change, kinds) -> None:
    assert tuple(section_kind(personality(v), change) for v in VERSIONS) == kinds


def test_copy_before_write_operations_count_per_version() -> None:
    assert [visible_sections(personality(v), OPERATIONS["cbw-insert"]) for v in VERSIONS] \
        == [0, 3, 3]
    assert [visible_sections(personality(v), OPERATIONS["cbw-drop"]) for v in VERSIONS] \
        == [0, 2, 2]


# --- the primitive --------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_drain_pulse_pauses_and_resumes_every_running_job_at_once(version) -> None:
    h = Harness(version)
    h.daemon.graph.drain_pulse()
    assert h.take() == ["ob:paused", "ob:running"]


def test_pulse_inside_an_outer_drain_shows_nothing() -> None:
    h = Harness("10.0")
    graph = h.daemon.graph
    source = graph.lookup("os")
    graph.drained_begin([source])
    assert h.take() == ["ob:paused"]
    graph.graph_changes("close", "attach-child", "job-create")
    assert h.take() == []
    graph.drained_end([source])
    assert h.take() == ["ob:running"]


def test_held_section_encloses_its_body_and_nested_sections() -> None:
    h = Harness("11.1")
    graph = h.daemon.graph
    with graph.graph_change("close"):
        h.daemon.emit("MARK", {"device": "inside"})
        graph.graph_changes("close", "replace-node")
    assert h.take() == ["ob:paused", "MARK(inside)", "ob:running"]


def test_pulse_comes_before_its_body() -> None:
    h = Harness("10.0")
    with h.daemon.graph.graph_change("job-create"):
        h.daemon.emit("MARK", {"device": "body"})
    assert h.take() == ["ob:paused", "ob:running", "MARK(body)"]


def test_several_jobs_pause_first_then_resume_in_node_order() -> None:
    h = Harness("10.0")
    null(h, "s2", "t2", size=64 * MiB)
    h("blockdev-backup", **backup("ob2", "s2", "t2", speed=MiB))
    h.take()
    h.daemon.graph.drain_pulse()
    assert h.take() == ["ob:paused", "ob2:paused", "ob:running", "ob2:running"]


@pytest.mark.parametrize("version", VERSIONS)
def test_no_drain_artefacts_turns_every_section_off(version) -> None:
    h = Harness(version, drain_artefacts=False)
    null(h, "s1", "t1")
    h("blockdev-add", driver="raw", **{"node-name": "r"}, file={"driver": "null-co"})
    h("blockdev-backup", **backup("x", "s1", "t1"))
    h("blockdev-del", **{"node-name": "r"})
    assert h.observer_pairs() == 0


# --- section 5.3 rows, in-process ---------------------------------------------------


def _blockdev_rows(h: Harness) -> dict[str, int]:
    counts = {}

    def row(label: str, name: str, **args) -> None:
        h.attempt(name, **args)
        counts[label] = h.observer_pairs()

    row("add null-co", "blockdev-add", driver="null-co", **{"node-name": "n1"})
    row("add blkdebug", "blockdev-add", driver="blkdebug", **{"node-name": "bd1"},
        image={"driver": "null-co"})
    row("add raw inline", "blockdev-add", driver="raw", **{"node-name": "r1"},
        file={"driver": "null-co"})
    row("add raw chain", "blockdev-add", driver="raw", **{"node-name": "r2"},
        file={"driver": "blkdebug", "image": {"driver": "null-co"}})
    row("add raw missing ref", "blockdev-add", driver="raw", **{"node-name": "r4"},
        file="nosuchnode")
    row("add duplicate", "blockdev-add", driver="null-co", **{"node-name": "n1"})
    row("add raw ref", "blockdev-add", driver="raw", **{"node-name": "r5"}, file="n1")
    row("add raw duplicate", "blockdev-add", driver="raw", **{"node-name": "n1"}, file="bd1")
    row("del raw ref", "blockdev-del", **{"node-name": "r5"})
    row("del null-co", "blockdev-del", **{"node-name": "n1"})
    row("del raw implicit", "blockdev-del", **{"node-name": "r1"})
    row("del raw chain", "blockdev-del", **{"node-name": "r2"})
    row("del missing", "blockdev-del", **{"node-name": "r2"})
    return counts


BLOCKDEV_ROWS = {
    "7.2": dict.fromkeys(["add null-co", "add blkdebug", "add raw inline", "add raw chain",
                          "add raw missing ref", "add duplicate", "add raw ref",
                          "add raw duplicate", "del raw ref", "del null-co",
                          "del raw implicit", "del raw chain", "del missing"], 0),
    "10.0": {"add null-co": 0, "add blkdebug": 1, "add raw inline": 3, "add raw chain": 4,
             "add raw missing ref": 1, "add duplicate": 1, "add raw ref": 3,
             "add raw duplicate": 3, "del raw ref": 1, "del null-co": 1,
             "del raw implicit": 2, "del raw chain": 3, "del missing": 0},
    "11.1": {"add null-co": 0, "add blkdebug": 1, "add raw inline": 3, "add raw chain": 4,
             "add raw missing ref": 1, "add duplicate": 1, "add raw ref": 3,
             "add raw duplicate": 3, "del raw ref": 1, "del null-co": 1,
             "del raw implicit": 1, "del raw chain": 1, "del missing": 0},
}


@pytest.mark.parametrize("version", VERSIONS)
def test_blockdev_add_and_del_pairs(version) -> None:
    assert _blockdev_rows(Harness(version)) == BLOCKDEV_ROWS[version]


def _job_rows(h: Harness) -> dict[str, int]:
    null(h, "s1", "t1", "s2", "t2", "s4", "t4", "s5", "t5", "s7", "t7")
    counts = {}

    def row(label: str, name: str, **args) -> None:
        h.attempt(name, **args)
        counts[label] = h.observer_pairs()

    # Backups of 8 MiB without a speed finish inside the command: these counts
    # include their completion (creation 1/6/7 + end 0/4/4).
    row("backup ok", "blockdev-backup", **backup("x1", "s1", "t1"))
    row("backup bad id", "blockdev-backup", **backup("1x", "s2", "t2"))
    row("backup speed<0", "blockdev-backup", **backup("x3", "s2", "t2", speed=-1))
    row("backup missing", "blockdev-backup", **backup("x4", "nosuch", "t2"))
    row("backup same", "blockdev-backup", **backup("x5", "s2", "s2"))
    row("backup manual", "blockdev-backup",
        **backup("x6", "s2", "t2", **{"auto-finalize": False, "auto-dismiss": False}))
    row("finalize", "job-finalize", id="x6")
    row("dismiss", "job-dismiss", id="x6")
    row("txn empty", "transaction", actions=[])
    row("txn abort", "transaction", actions=[{"type": "abort", "data": {}}])
    row("txn 2 backups", "transaction", actions=[
        {"type": "blockdev-backup", "data": backup("y2", "s4", "t4")},
        {"type": "blockdev-backup", "data": backup("y3", "s5", "t5")}])
    row("txn backup+abort", "transaction", actions=[
        {"type": "blockdev-backup", "data": backup("y4", "s4", "t4")},
        {"type": "abort", "data": {}}])
    row("mirror bad granularity", "blockdev-mirror", **{"job-id": "m1"}, device="s7",
        target="t7", sync="full", granularity=3)
    row("mirror", "blockdev-mirror", **{"job-id": "m2"}, device="s7", target="t7",
        sync="full")
    row("complete", "job-complete", id="m2")
    return counts


JOB_ROWS = {
    "7.2": {"backup ok": 1, "backup bad id": 1, "backup speed<0": 1, "backup missing": 1,
            "backup same": 1, "backup manual": 1, "finalize": 0, "dismiss": 0,
            "txn empty": 1, "txn abort": 1, "txn 2 backups": 1, "txn backup+abort": 1,
            "mirror bad granularity": 0, "mirror": 0, "complete": 0},
    "10.0": {"backup ok": 10, "backup bad id": 7, "backup speed<0": 8, "backup missing": 1,
             "backup same": 1, "backup manual": 6, "finalize": 3, "dismiss": 1,
             "txn empty": 1, "txn abort": 1, "txn 2 backups": 19, "txn backup+abort": 10,
             "mirror bad granularity": 0, "mirror": 4, "complete": 6},
    "11.1": {"backup ok": 11, "backup bad id": 8, "backup speed<0": 9, "backup missing": 1,
             "backup same": 2, "backup manual": 7, "finalize": 3, "dismiss": 1,
             "txn empty": 1, "txn abort": 1, "txn 2 backups": 17, "txn backup+abort": 11,
             "mirror bad granularity": 1, "mirror": 5, "complete": 6},
}


@pytest.mark.parametrize("version", VERSIONS)
def test_job_command_pairs(version) -> None:
    assert _job_rows(Harness(version)) == JOB_ROWS[version]


BACKUP_SEQUENCES = {
    "7.2": "ob:P ob:R x:created x:running x:paused x:running",
    "10.0": "ob:P ob:R " * 5 + "x:created ob:P ob:R x:running x:paused x:running",
    "11.1": "ob:P ob:R " * 5 + "ob:P x:created ob:R ob:P ob:R x:running x:paused x:running",
}


@pytest.mark.parametrize("version", VERSIONS)
def test_created_falls_inside_the_pair_only_where_the_lock_holds_a_drain(version) -> None:
    h = Harness(version)
    null(h, "s", "t", size=64 * MiB)
    h("blockdev-backup", **backup("x", "s", "t", speed=MiB))
    shown = " ".join(h.take()).replace("ob:paused", "ob:P").replace("ob:running", "ob:R")
    assert shown == BACKUP_SEQUENCES[version]


# --- transactions -----------------------------------------------------------------


START_ORDER = {
    "7.2": ["a1:created", "a2:created", "a1:running", "a1:paused", "a2:running", "a2:paused",
            "a1:running", "a2:running"],
    "10.0": ["a1:created", "a2:created", "a2:running", "a2:paused", "a1:running", "a1:paused",
             "a2:running", "a1:running"],
}


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_transaction_start_order(version) -> None:
    # No other job runs, so only the members' own events show: created in action
    # order, then the commit (running, and paused by the source drain) and the clean
    # (running, as the source drain ends).
    h = Harness(version, observer=False)
    null(h, "s1", "t1", "s2", "t2", size=64 * MiB)
    h("transaction", actions=[
        {"type": "blockdev-backup", "data": backup("a1", "s1", "t1", speed=MiB)},
        {"type": "blockdev-backup", "data": backup("a2", "s2", "t2", speed=MiB)}])
    assert h.take() == START_ORDER[version]


def test_grouped_check_per_version() -> None:
    actions = [{"type": "blockdev-backup", "data": backup("g1", "s1", "t1", speed=MiB)},
               {"type": "block-dirty-bitmap-add", "data": {"node": "s1", "name": "b"}}]
    texts = {}
    events = {}
    for version in ("7.2", "10.0"):
        h = Harness(version, observer=False)
        null(h, "s1", "t1")
        texts[version] = h.attempt("transaction", actions=actions,
                                   properties={"completion-mode": "grouped"})
        events[version] = h.take()
    assert texts["7.2"] == ("Action 'block-dirty-bitmap-add' does not support Transaction "
                            "property completion-mode = grouped")
    assert events["7.2"] == ["g1:created", "g1:aborting", "g1:concluded", "g1:null"]
    assert texts["10.0"] == ("Action 'block-dirty-bitmap-add' does not support transaction "
                             "property completion-mode = grouped")
    assert events["10.0"] == []


@pytest.mark.parametrize("version, refused", [("7.2", False), ("10.0", True)])
def test_abort_action_in_grouped_mode(version, refused) -> None:
    h = Harness(version, observer=False)
    text = h.attempt("transaction", actions=[{"type": "abort", "data": {}}],
                     properties={"completion-mode": "grouped"})
    assert text == ("Action 'abort' does not support transaction property completion-mode "
                    "= grouped" if refused else "Transaction aborted using Abort action")


# --- the rate limit after an early wake-up (section 5.2) ----------------------------


@pytest.mark.parametrize("version, ready_at_resume", [("7.2", True), ("10.0", False),
                                                      ("11.1", False)])
def test_rate_limited_mirror_resumed_from_pause(version, ready_at_resume) -> None:
    h = Harness(version, observer=False)
    null(h, "src", "tgt")
    h("blockdev-mirror", **{"job-id": "m"}, device="src", target="tgt", sync="full",
      speed=4 * MiB)
    assert h.take() == ["m:created", "m:running"]
    h("job-pause", id="m")
    assert h.take() == ["m:paused"]
    h("job-resume", id="m")
    resumed = h.take()
    ready = ["m:ready", "BLOCK_JOB_READY(m)"]
    assert resumed == ["m:running"] + (ready if ready_at_resume else [])
    if not ready_at_resume:
        h.clock.advance(10**9)          # within the 2 s the limit asks for 8 MiB
        h.daemon.jobs.run_bottom_halves()
        assert h.take() == []
        h.clock.run_timers(limit=10)
        h.daemon.jobs.run_bottom_halves()
        assert h.take() == ready
    # Finish the mirror (a parked mirror coroutine cannot simply be abandoned).
    h("job-complete", id="m")
    for _ in range(10):
        h.clock.run_timers(limit=10)
        h.daemon.jobs.run_bottom_halves()
    assert h.take()[-1] == "m:null"
