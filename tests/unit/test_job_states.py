"""The job state machine tables, checked cell by cell against job-lifecycle.md 2 and 3."""

from __future__ import annotations

import itertools

import pytest

from qmpjobd.errors import QMPError
from qmpjobd.job.states import (
    IllegalTransition,
    JobStatus,
    JobVerb,
    check_verb,
    is_legal_transition,
    transition,
    verb_allowed,
)

S = JobStatus
# The legal transitions, written out as pairs (independently of the module's matrix).
LEGAL = {
    (S.UNDEFINED, S.CREATED),
    (S.CREATED, S.RUNNING), (S.CREATED, S.ABORTING), (S.CREATED, S.NULL),
    (S.RUNNING, S.PAUSED), (S.RUNNING, S.READY), (S.RUNNING, S.WAITING), (S.RUNNING, S.ABORTING),
    (S.PAUSED, S.RUNNING),
    (S.READY, S.STANDBY), (S.READY, S.WAITING), (S.READY, S.ABORTING),
    (S.STANDBY, S.READY),
    (S.WAITING, S.PENDING), (S.WAITING, S.ABORTING),
    (S.PENDING, S.ABORTING), (S.PENDING, S.CONCLUDED),
    (S.ABORTING, S.ABORTING), (S.ABORTING, S.CONCLUDED),
    (S.CONCLUDED, S.NULL),
}

ACCEPTING = {
    JobVerb.CANCEL: {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.WAITING, S.PENDING},
    JobVerb.PAUSE: {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY},
    JobVerb.RESUME: {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY},
    JobVerb.SET_SPEED: {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY},
    JobVerb.COMPLETE: {S.READY, S.STANDBY},
    JobVerb.DISMISS: {S.CONCLUDED},
    JobVerb.FINALIZE: {S.PENDING},
    JobVerb.CHANGE: {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY},
}


class FakeJob:
    def __init__(self, status: JobStatus, job_id: str | None = "j") -> None:
        self.id = job_id
        self.status = status
        self.events: list[tuple[str, dict]] = []

    def emit(self, name: str, data: dict) -> None:
        self.events.append((name, data))


def test_enum_orders_match_qapi() -> None:
    assert [s.value for s in JobStatus] == [
        "undefined", "created", "running", "paused", "ready", "standby", "waiting",
        "pending", "aborting", "concluded", "null"]
    assert [v.value for v in JobVerb] == [
        "cancel", "pause", "resume", "set-speed", "complete", "dismiss", "finalize", "change"]


@pytest.mark.parametrize("src,dst", list(itertools.product(JobStatus, JobStatus)),
                         ids=lambda s: s.value)
def test_every_transition(src: JobStatus, dst: JobStatus) -> None:
    job = FakeJob(src)
    assert is_legal_transition(src, dst) == ((src, dst) in LEGAL)
    if (src, dst) in LEGAL:
        transition(job, dst)
        assert job.status == dst
        expected = [] if src == dst else [("JOB_STATUS_CHANGE", {"id": "j", "status": dst.value})]
        assert job.events == expected
    else:
        with pytest.raises(IllegalTransition):
            transition(job, dst)
        assert job.status == src
        assert job.events == []


def test_internal_job_transitions_silently() -> None:
    job = FakeJob(S.CREATED, job_id=None)
    transition(job, S.RUNNING)
    assert job.status == S.RUNNING and job.events == []


def test_status_change_data_is_in_declaration_order() -> None:
    job = FakeJob(S.CREATED)
    transition(job, S.RUNNING)
    assert list(job.events[0][1]) == ["id", "status"]


@pytest.mark.parametrize("verb,status", list(itertools.product(JobVerb, JobStatus)),
                         ids=lambda x: x.value)
def test_every_verb_in_every_state(verb: JobVerb, status: JobStatus) -> None:
    job = FakeJob(status, job_id="k1")
    allowed = status in ACCEPTING[verb]
    assert verb_allowed(verb, status) == allowed
    if allowed:
        check_verb(job, verb)
    else:
        with pytest.raises(QMPError) as info:
            check_verb(job, verb)
        assert info.value.error_class == "GenericError"
        assert info.value.desc == (
            f"Job 'k1' in state '{status.value}' cannot accept command verb '{verb.value}'")
