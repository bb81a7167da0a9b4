"""The job state machine as data: statuses, verbs, and the two tables that govern them.

Everything that decides whether a job may change status, or may accept a command verb,
lives in this module (as QEMU keeps ``JobSTT`` and ``JobVerbTable`` side by side in
job.c). The tables are written as matrices so they can be compared cell by cell with
job-lifecycle.md sections 2 and 3.

``transition()`` is the only way a job's status changes. An illegal transition is a
bug in the job core, never a client error, so it raises ``IllegalTransition`` (an
AssertionError) instead of a QMP error.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Protocol

from qmpjobd.errors import QMPError


class JobStatus(str, Enum):
    """QAPI JobStatus, in declaration order (the order the tables use)."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(str, Enum):
    """QAPI JobVerb in declaration order (``change`` arrived in 8.2; only
    block-job-change uses it, and the schema offers that command from 10.0)."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    DISMISS = "dismiss"
    FINALIZE = "finalize"
    CHANGE = "change"


_STATUS_ORDER = list(JobStatus)

# Rows: from-status; columns: to-status, both in JobStatus order (U C R P Y S W D X E N).
_TRANSITION_MATRIX = {
    JobStatus.UNDEFINED: "0 1 0 0 0 0 0 0 0 0 0",
    JobStatus.CREATED:   "0 0 1 0 0 0 0 0 1 0 1",
    JobStatus.RUNNING:   "0 0 0 1 1 0 1 0 1 0 0",
    JobStatus.PAUSED:    "0 0 1 0 0 0 0 0 0 0 0",
    JobStatus.READY:     "0 0 0 0 0 1 1 0 1 0 0",
    JobStatus.STANDBY:   "0 0 0 0 1 0 0 0 0 0 0",
    JobStatus.WAITING:   "0 0 0 0 0 0 0 1 1 0 0",
    JobStatus.PENDING:   "0 0 0 0 0 0 0 0 1 1 0",
    JobStatus.ABORTING:  "0 0 0 0 0 0 0 0 1 1 0",
    JobStatus.CONCLUDED: "0 0 0 0 0 0 0 0 0 0 1",
    JobStatus.NULL:      "0 0 0 0 0 0 0 0 0 0 0",
}

# Rows: verb; columns: the status the job is in (U C R P Y S W D X E N).
_VERB_MATRIX = {
    JobVerb.CANCEL:    "0 1 1 1 1 1 1 1 0 0 0",
    JobVerb.PAUSE:     "0 1 1 1 1 1 0 0 0 0 0",
    JobVerb.RESUME:    "0 1 1 1 1 1 0 0 0 0 0",
    JobVerb.SET_SPEED: "0 1 1 1 1 1 0 0 0 0 0",
    JobVerb.COMPLETE:  "0 0 0 0 1 1 0 0 0 0 0",
    JobVerb.DISMISS:   "0 0 0 0 0 0 0 0 0 1 0",
    JobVerb.FINALIZE:  "0 0 0 0 0 0 0 1 0 0 0",
    JobVerb.CHANGE:    "0 1 1 1 1 1 0 0 0 0 0",
}


def _row_to_set(row: str) -> frozenset[JobStatus]:
    cells = row.split()
    assert len(cells) == len(_STATUS_ORDER), row
    return frozenset(s for s, cell in zip(_STATUS_ORDER, cells) if cell == "1")


TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    src: _row_to_set(row) for src, row in _TRANSITION_MATRIX.items()
}
VERB_ALLOWED_IN: dict[JobVerb, frozenset[JobStatus]] = {
    verb: _row_to_set(row) for verb, row in _VERB_MATRIX.items()
}

# QEMU's job_is_completed(): run() is over, successfully or not.
COMPLETED_STATUSES = frozenset({
    JobStatus.WAITING, JobStatus.PENDING, JobStatus.ABORTING,
    JobStatus.CONCLUDED, JobStatus.NULL,
})
# QEMU's job_is_ready(): converged (mirror, active commit), possibly paused.
READY_STATUSES = frozenset({JobStatus.READY, JobStatus.STANDBY})


class IllegalTransition(AssertionError):
    """A transition the table forbids was attempted: a bug in the job core."""


class StatefulJob(Protocol):
    """What ``transition`` and ``check_verb`` need from a job."""

    id: str | None
    status: JobStatus
    emit: Callable[[str, dict], None]


def is_legal_transition(src: JobStatus, dst: JobStatus) -> bool:
    return dst in TRANSITIONS[src]


def verb_allowed(verb: JobVerb, status: JobStatus) -> bool:
    return status in VERB_ALLOWED_IN[verb]


def transition(job: StatefulJob, new_status: JobStatus) -> None:
    """Move ``job`` to ``new_status``; announce it if it changed and the job has an id."""
    old_status = job.status
    if not is_legal_transition(old_status, new_status):
        raise IllegalTransition(
            f"job {job.id!r}: illegal transition {old_status.value} -> {new_status.value}")
    job.status = new_status
    # A self-transition (aborting -> aborting) is legal but silent; internal jobs
    # (no id) are never announced.
    if new_status != old_status and job.id is not None:
        job.emit("JOB_STATUS_CHANGE", {"id": job.id, "status": new_status.value})


def check_verb(job: StatefulJob, verb: JobVerb) -> None:
    """Raise QEMU's verb error unless ``job`` accepts ``verb`` in its current status."""
    if not verb_allowed(verb, job.status):
        raise QMPError(
            f"Job '{job.id}' in state '{job.status.value}' "
            f"cannot accept command verb '{verb.value}'")
