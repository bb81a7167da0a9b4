"""QEMU's drain artefacts per release, as data (DESIGN.md decisions 4 and 9).

A running job shows a ``paused``/``running`` pair (``standby``/``ready`` when READY)
each time QEMU drains the node it uses.  Which operations drain, and how, changed
between releases:

* **7.2** drains only where a command asks for it: ``qmp_transaction()`` drains
  every node once (``bdrv_drain_all``), and backup actions drain their source.
* **8.0 and later** take the block-graph write lock around each graph change
  (``bdrv_graph_wrlock``).  Taking it pulses a drain of every node: every job that
  is not already paused pauses and resumes at once, with no main-loop work in
  between, and then the change is made undrained.  That is a ``PULSE``.
* **10.1 and later** (so 11.1) take many of those locks as
  ``bdrv_graph_wrlock_drained``: a polling drain of every node that stays open
  across the change, so events of the change (a job's ``created``) and nested
  graph changes fall *inside* the pair.  That is a ``HELD`` section.  The same
  releases drain every node in ``bdrv_try_change_aio_context`` (a ``DRAIN_ALL``,
  with nothing inside), which job-creating commands call on their target.

``GRAPH_CHANGES`` names each graph change qmpjobd reproduces after the QEMU
function that makes it, with the kind of section it takes from which release on.
``OPERATIONS`` names fixed sequences of changes (QEMU's copy-before-write filter
insertion is three of them).  Code calls ``BlockGraph.graph_change(name)`` at the
qmpjobd equivalent of that QEMU place; this module decides what, if anything, the
current personality shows there.  A new release is a new step in a table here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from qmpjobd.versions import Behaviour, Personality


class SectionKind(enum.Enum):
    """What one graph change does to the jobs of the daemon."""

    NONE = "none"            # nothing visible
    PULSE = "pulse"          # pause and resume every job, no poll, before the change
    HELD = "held"            # polling drain of every node, held across the change
    DRAIN_ALL = "drain-all"  # polling drain of every node, nothing inside


@dataclass(frozen=True)
class GraphChange:
    """One kind of graph change and the section it takes, release by release.

    ``steps`` pairs a release with the kind of section used from that release
    on, oldest first; before the first step the change takes none.
    """

    qemu_function: str
    steps: tuple[tuple[str, SectionKind], ...]

    def __post_init__(self) -> None:
        for since, _kind in self.steps:
            Behaviour(self.qemu_function, since)   # validates the release name

    def kind_for(self, personality: Personality) -> SectionKind:
        kind = SectionKind.NONE
        for since, step_kind in self.steps:
            if personality.has(Behaviour(self.qemu_function, since)):
                kind = step_kind
        return kind


# bdrv_graph_wrlock() arrived in 8.0 (commit aead9dc9d1, after v7.2.0).
_WRLOCK = "8.0"
# bdrv_graph_wrlock_drained() and the draining aio-context change: 10.1.
_WRLOCK_DRAINED = "10.1"

# A change under a plain write lock in every release that has one.
_PLAIN = ((_WRLOCK, SectionKind.PULSE),)
# A change whose lock became a held drain in 10.1.
_HELD_SINCE_10_1 = ((_WRLOCK, SectionKind.PULSE), (_WRLOCK_DRAINED, SectionKind.HELD))

GRAPH_CHANGES: dict[str, GraphChange] = {
    # Node open and close (blockdev-add, blockdev-del, drive-* targets).
    "attach-child": GraphChange("bdrv_open_child_common", _HELD_SINCE_10_1),
    "backend-insert": GraphChange("blk_insert_bs", _HELD_SINCE_10_1),
    "backend-remove": GraphChange("blk_remove_bs", _HELD_SINCE_10_1),
    "open-failed": GraphChange("bdrv_open_driver (open_failed)", _HELD_SINCE_10_1),
    # A close holds its children's closes inside it from 10.1 on (they run from
    # the bottom halves bdrv_graph_wrunlock polls); before, each is its own pulse.
    "close": GraphChange("bdrv_close", _HELD_SINCE_10_1),
    # Filters.
    "append": GraphChange("bdrv_append", _HELD_SINCE_10_1),
    "insert-node": GraphChange("bdrv_insert_node", _PLAIN),
    "drop-filter": GraphChange("bdrv_drop_filter", _PLAIN),
    "replace-node": GraphChange("bdrv_replace_node", _PLAIN),
    # block-stream's prepare: the streamed node's new backing child.
    "set-backing": GraphChange("bdrv_set_backing_hd_drained", _PLAIN),
    # A format node's backing link at open (bdrv_open_backing_file): a backing
    # named by reference, given inline or found in the image header.
    "open-backing": GraphChange("bdrv_set_backing_hd", _PLAIN),
    # A job's read-only <-> read-write switch of a node (stream's device,
    # commit's base): bdrv_reopen_set_read_only.
    "reopen": GraphChange("bdrv_reopen_multiple", _PLAIN),
    # blockdev-reopen whose permission refresh fails: before 10.1 the refresh has
    # a write-locked section of its own ahead of the abort's (seen on 10.0).
    "reopen-refresh-failed": GraphChange("bdrv_reopen_multiple (refresh failed)",
                                         ((_WRLOCK, SectionKind.PULSE),
                                          (_WRLOCK_DRAINED, SectionKind.NONE))),
    # Block jobs.
    "job-create": GraphChange("block_job_create", _HELD_SINCE_10_1),
    "job-add-node": GraphChange("block_job_add_bdrv", _HELD_SINCE_10_1),
    "job-remove-nodes": GraphChange("block_job_remove_all_bdrv", _HELD_SINCE_10_1),
    # mirror_exit_common with MIRROR_SOURCE_BACKING_CHAIN (drive-mirror in
    # absolute-paths mode) on success: 10.0 locks only when the target's backing
    # file differs, which it never does for qmpjobd's formats.
    "mirror-source-backing": GraphChange("mirror_exit_common (backing chain)",
                                         ((_WRLOCK_DRAINED, SectionKind.HELD),)),
    # Not graph changes, but drains of every node without a body:
    # qmp_transaction's "drain all i/o before any operations" (every release) ...
    "drain-all": GraphChange("bdrv_drain_all", (("7.2", SectionKind.DRAIN_ALL),)),
    # ... and the one blockdev-snapshot-delete-internal-sync starts with (seen on
    # 11.1, not on 10.0; the release between them is a guess).
    "snapshot-delete-drain-all": GraphChange("qmp_blockdev_snapshot_delete_internal_sync",
                                             ((_WRLOCK_DRAINED, SectionKind.DRAIN_ALL),)),
    # ... and the aio-context change job-creating commands make on their target.
    "aio-context": GraphChange("bdrv_try_change_aio_context",
                               ((_WRLOCK_DRAINED, SectionKind.DRAIN_ALL),)),
}

OPERATIONS: dict[str, tuple[str, ...]] = {
    # bdrv_cbw_append: cbw_open attaches its file and target children, then
    # bdrv_insert_node puts the filter above the source.
    "cbw-insert": ("attach-child", "attach-child", "insert-node"),
    # bdrv_cbw_drop: the filter leaves the graph, then its last reference goes.
    "cbw-drop": ("drop-filter", "close"),
}


def section_kind(personality: Personality, change: str) -> SectionKind:
    """The section ``change`` (a ``GRAPH_CHANGES`` key) takes in ``personality``."""
    return GRAPH_CHANGES[change].kind_for(personality)


def operation_changes(operation: str) -> tuple[str, ...]:
    """The graph changes of a fixed sequence (an ``OPERATIONS`` key), in order."""
    return OPERATIONS[operation]


def visible_sections(personality: Personality, changes: tuple[str, ...]) -> int:
    """How many pairs an unrelated running job shows for ``changes`` made one after
    the other, none inside another (what the tests count)."""
    return sum(section_kind(personality, c) is not SectionKind.NONE for c in changes)


def wait_until_quiet(poll_while: Callable[[Callable[[], bool]], bool],
                     busy: Callable[[], bool], jobs: Callable[[], Iterable[Any]]) -> bool:
    """A drained section's BDRV_POLL_WHILE(busy): main-loop passes, and where QEMU
    would block in aio_poll for a job's request (a rate-limited stream inside its
    chunk), that request is finished now and the job runs on to its pause point.
    False when ``busy`` still holds and nothing more can be finished here."""
    while not poll_while(busy):
        if not any(job.drained_poll() and _finish_request(job) for job in list(jobs())):
            return False
    return True


def _finish_request(job: Any) -> bool:
    finish = getattr(job, "finish_request_in_flight", None)   # block jobs only
    return finish is not None and finish()
