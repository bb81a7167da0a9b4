"""The block graph: names, children, deletion rules, blockers and drained sections."""

from __future__ import annotations

import re

import pytest

from qmpjobd.block.graph import BlockGraph
from qmpjobd.errors import QMPError
from qmpjobd.job.manager import JobManager


class FakeJob:
    """Counts the internal pauses the graph applies (what the job core receives)."""

    def __init__(self) -> None:
        self.pauses = 0
        self.resumes = 0

    def pause(self) -> None:
        self.pauses += 1

    def resume(self) -> None:
        self.resumes += 1

    def drained_poll(self) -> bool:
        return False

    @property
    def pause_count(self) -> int:
        return self.pauses - self.resumes


@pytest.fixture
def graph() -> BlockGraph:
    return BlockGraph(jobs=JobManager(lambda name, data: None, clock=None))


def error_of(fn, *args) -> str:
    with pytest.raises(QMPError) as info:
        fn(*args)
    return info.value.desc


def test_add_and_lookup(graph: BlockGraph) -> None:
    node = graph.add({"driver": "null-co", "node-name": "n0", "size": 4096})
    assert graph.lookup("n0") is node
    assert graph.find("n0") is node and graph.find("zz") is None
    assert node.size == 4096 and node.driver == "null-co" and not node.read_only
    assert error_of(graph.lookup, "zz") == "Cannot find device='zz' nor node-name='zz'"


@pytest.mark.parametrize("options, message", [
    ({"driver": "null-co"}, "'node-name' must be specified for the root node"),
    ({"driver": "null-co", "node-name": "1x"}, "Invalid node-name: '1x'"),
    ({"driver": "null-co", "node-name": "a" * 32}, "Node name too long"),
    ({"driver": "vmdk", "node-name": "q", "file": "x"}, "Driver 'vmdk' is not supported by qmpjobd"),
    ({"driver": "raw", "node-name": "r", "file": "nonode"}, "Cannot find device='nonode' nor node-name='nonode'"),
])
def test_add_errors(graph: BlockGraph, options: dict, message: str) -> None:
    assert error_of(graph.add, options) == message
    assert graph.nodes == {}


def test_name_limits(graph: BlockGraph) -> None:
    graph.add({"driver": "null-co", "node-name": "a" * 31})
    graph.add({"driver": "null-co", "node-name": "n1"})
    assert error_of(graph.add, {"driver": "null-co", "node-name": "n1"}) == \
        "Duplicate nodes with node-name='n1'"


def test_inline_child_with_parent_name_is_duplicate(graph: BlockGraph) -> None:
    options = {"driver": "raw", "node-name": "x1", "file": {"driver": "null-co", "node-name": "x1"}}
    assert error_of(graph.add, options) == "Duplicate nodes with node-name='x1'"
    assert graph.nodes == {}, "the child created before the failure must be dropped"


def test_node_order_format_child_first_filter_parent_first(graph: BlockGraph) -> None:
    graph.add({"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "node-name": "c1"}})
    graph.add({"driver": "blkdebug", "node-name": "b", "image": {"driver": "null-co", "node-name": "c2"}})
    assert list(graph.nodes) == ["c1", "r", "b", "c2"]


def test_generated_names(graph: BlockGraph) -> None:
    graph.add({"driver": "raw", "node-name": "r", "file": {"driver": "null-co"}})
    graph.add({"driver": "raw", "node-name": "s", "file": {"driver": "null-co"}})
    generated = [name for name in graph.nodes if name.startswith("#")]
    assert [re.fullmatch(r"#block(\d+)(\d\d)", n).group(1) for n in generated] == ["0", "1"]


def test_delete_rules(graph: BlockGraph) -> None:
    graph.add({"driver": "null-co", "node-name": "n1"})
    graph.add({"driver": "raw", "node-name": "r1", "file": "n1"})
    graph.add({"driver": "raw", "node-name": "r2", "file": {"driver": "null-co", "node-name": "inl"}})
    assert error_of(graph.delete, "nope") == "Failed to find node with node-name='nope'"
    assert error_of(graph.delete, "n1") == "Block device n1 is in use"
    assert error_of(graph.delete, "inl") == "Node inl is not owned by the monitor"
    graph.delete("r2")
    assert "inl" not in graph.nodes, "an inline child goes with its only parent"
    graph.delete("r1")
    assert graph.find("n1") is not None, "a monitor-owned child stays"
    graph.delete("n1")
    assert graph.nodes == {}


def test_blockers_and_job_users(graph: BlockGraph) -> None:
    node = graph.add({"driver": "null-co", "node-name": "t"})
    job = FakeJob()
    node.add_job_user(job, backend=True, blocker="block device is in use by block job: mirror")
    assert error_of(node.check_not_busy) == \
        "Node 't' is busy: block device is in use by block job: mirror"
    assert error_of(graph.delete, "t") == "Node t is in use"
    node.remove_job_user(job)
    node.check_not_busy()
    graph.delete("t")


def test_drain_pauses_users_of_node_and_ancestors(graph: BlockGraph) -> None:
    base = graph.add({"driver": "null-co", "node-name": "base"})
    top = graph.add({"driver": "raw", "node-name": "top", "file": "base"})
    other = graph.add({"driver": "null-co", "node-name": "other"})
    on_top, on_base, on_other = FakeJob(), FakeJob(), FakeJob()
    top.add_job_user(on_top)
    base.add_job_user(on_base)
    other.add_job_user(on_other)
    with graph.drained([base]):
        # Draining a node quiesces its parents too, as QEMU does.
        assert (on_top.pause_count, on_base.pause_count, on_other.pause_count) == (1, 1, 0)
        with graph.drained():
            assert (on_top.pause_count, on_base.pause_count, on_other.pause_count) == (2, 2, 1)
        assert (on_top.pause_count, on_base.pause_count, on_other.pause_count) == (1, 1, 0)
    assert (on_top.pause_count, on_base.pause_count, on_other.pause_count) == (0, 0, 0)


def test_drain_begin_polls_until_users_are_quiet_and_no_longer(graph: BlockGraph) -> None:
    """BDRV_POLL_WHILE(bdrv_drain_poll): bottom halves run while a user of a drained
    node may still issue requests, and the poll stops as soon as none may."""
    node = graph.add({"driver": "null-co", "node-name": "src"})
    job = FakeJob()
    busy = {"value": True}
    job.drained_poll = lambda: busy["value"]
    node.add_job_user(job)
    ran: list[str] = []
    graph.jobs.defer(lambda: ran.append("unrelated"))
    graph.jobs.defer(lambda: (ran.append("job stops"), busy.update(value=False),
                              graph.jobs.defer(lambda: ran.append("after"))))
    with graph.drained([node]):
        assert ran == ["job stops", "unrelated"]
    assert graph.jobs.has_bottom_halves
    with graph.drained([node]):
        assert ran == ["job stops", "unrelated"]      # nothing to wait for: no poll


def test_job_attaching_to_drained_node_is_paused_until_drain_ends(graph: BlockGraph) -> None:
    node = graph.add({"driver": "null-co", "node-name": "src"})
    job = FakeJob()
    graph.drained_begin([node])
    node.add_job_user(job)
    assert job.pause_count == 1
    graph.drained_end([node])
    assert (job.pauses, job.resumes) == (1, 1)


def test_job_detaching_from_drained_node_is_resumed(graph: BlockGraph) -> None:
    node = graph.add({"driver": "null-co", "node-name": "src"})
    job = FakeJob()
    node.add_job_user(job)
    graph.drained_begin()
    node.remove_job_user(job)
    graph.drained_end()
    assert (job.pauses, job.resumes) == (1, 1)
