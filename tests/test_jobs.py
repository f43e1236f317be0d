"""The job state machine in SQL: transitions, their history rows, and the refusals."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from audit import AuditEvent, Outcome
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.db.engine import inserted_id
from dicom_node.delivery.profiles import DestinationProfiles
from dicom_node.jobs.runner import JobRunner
from dicom_node.jobs.state import (
    ALLOWED,
    IllegalTransition,
    JobState,
    StaleTransition,
    create_job,
    job_ref,
    move,
    transition,
)
from dicom_node.runtime import Runtime

STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
HAPPY_PATH = [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.DELIVERING, JobState.DELIVERED]


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    runtime = Runtime.open(None, tmp_path)
    try:
        yield runtime
    finally:
        runtime.close()


def _study_with_instances(rt: Runtime, n: int) -> tuple[int, list[int]]:
    """Index rows for a study with ``n`` instances (the files themselves are not needed here)."""
    now = time.time()
    with rt.db.write() as conn:
        patient = inserted_id(conn.execute(insert(t.patients).values(patient_id="P1", issuer="")))
        study = inserted_id(
            conn.execute(
                insert(t.studies).values(
                    study_uid=STUDY_UID, patient_fk=patient, first_received_at=now, open_version=1
                )
            )
        )
        series = inserted_id(
            conn.execute(insert(t.series).values(series_uid=STUDY_UID + ".1", study_fk=study))
        )
        ids = [
            inserted_id(
                conn.execute(
                    insert(t.instances).values(
                        sop_uid=f"{STUDY_UID}.1.{k}",
                        version=1,
                        current=True,
                        series_fk=series,
                        study_fk=study,
                        study_version=1,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path=f"studies/x/y/{k}.dcm",
                        size=1,
                        sha256="0" * 64,
                        received_at=now,
                        tags={},
                    )
                )
            )
            for k in range(n)
        ]
    return study, ids


def _new_job(rt: Runtime, n_inputs: int = 3) -> tuple[int, list[int]]:
    study, ids = _study_with_instances(rt, n_inputs)
    with rt.db.write() as conn:
        job_id = create_job(
            conn,
            study_fk=study,
            study_version=1,
            pipeline="forward",
            destinations=["pacs"],
            instance_ids=ids,
            actor="tester",
        )
    return job_id, ids


def _history(rt: Runtime, job_id: int) -> list[tuple[str | None, str]]:
    with rt.db.read() as conn:
        rows = conn.execute(
            select(t.job_transitions.c.from_state, t.job_transitions.c.to_state)
            .where(t.job_transitions.c.job_fk == job_id)
            .order_by(t.job_transitions.c.id)
        ).all()
    return [tuple(r) for r in rows]


def _job(rt: Runtime, job_id: int) -> dict:
    with rt.db.read() as conn:
        return dict(conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings().one())


def test_create_job_is_queued_with_its_input_snapshot(rt: Runtime) -> None:
    job_id, ids = _new_job(rt)
    job = _job(rt, job_id)
    assert job["state"] == "queued"
    assert job["pipeline"] == "forward"
    assert job["destinations"] == ["pacs"]
    assert job["study_version"] == 1
    assert job["runs"] == 0
    with rt.db.read() as conn:
        inputs = conn.execute(
            select(t.job_inputs.c.instance_fk).where(t.job_inputs.c.job_fk == job_id)
        ).scalars()
        assert sorted(inputs) == sorted(ids)
        first = conn.execute(select(t.job_transitions).where(t.job_transitions.c.job_fk == job_id)).one()
    assert (first.from_state, first.to_state, first.actor) == (None, "queued", "tester")


def test_happy_path_records_one_transition_per_move(rt: Runtime) -> None:
    job_id, _ = _new_job(rt)
    for src, dst in itertools.pairwise(HAPPY_PATH):
        before = time.time()
        with rt.db.write() as conn:
            transition(conn, job_id, dst, expect=src, reason=f"to {dst}", actor="worker-1")
        job = _job(rt, job_id)
        assert job["state"] == dst.value
        assert job["reason"] == f"to {dst}"
        assert job["updated_at"] >= before

    assert _history(rt, job_id) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
        ("succeeded", "delivering"),
        ("delivering", "delivered"),
    ]
    with rt.db.read() as conn:
        rows = (
            conn.execute(
                select(t.job_transitions)
                .where(t.job_transitions.c.job_fk == job_id, t.job_transitions.c.from_state.is_not(None))
                .order_by(t.job_transitions.c.id)
            )
            .mappings()
            .all()
        )
    assert [r["actor"] for r in rows] == ["worker-1"] * 4
    assert [r["reason"] for r in rows] == [f"to {s}" for s in HAPPY_PATH[1:]]
    ats = [r["at"] for r in rows]
    assert ats == sorted(ats)


def test_transition_sets_extra_columns(rt: Runtime) -> None:
    job_id, _ = _new_job(rt)
    with rt.db.write() as conn:
        transition(
            conn,
            job_id,
            JobState.RUNNING,
            expect=JobState.QUEUED,
            claimed_by="host/run/1",
            lease_until=123.0,
            runs=1,
        )
    job = _job(rt, job_id)
    assert (job["state"], job["claimed_by"], job["lease_until"], job["runs"]) == (
        "running",
        "host/run/1",
        123.0,
        1,
    )


def test_illegal_move_raises_and_changes_nothing(rt: Runtime) -> None:
    job_id, _ = _new_job(rt)
    before = _job(rt, job_id)
    with pytest.raises(IllegalTransition), rt.db.write() as conn:
        transition(conn, job_id, JobState.DELIVERED, expect=JobState.QUEUED)
    assert _job(rt, job_id) == before
    assert _history(rt, job_id) == [(None, "queued")]


_ILLEGAL = [
    (src, dst)
    for src in [None, *JobState]
    for dst in JobState
    if dst not in ALLOWED[src]  # type: ignore[index]
]


@pytest.mark.parametrize(("src", "dst"), _ILLEGAL, ids=[f"{s}->{d}" for s, d in _ILLEGAL])
def test_every_move_outside_allowed_is_illegal(rt: Runtime, src: JobState | None, dst: JobState) -> None:
    job_id, _ = _new_job(rt, n_inputs=0)
    with pytest.raises(IllegalTransition), rt.db.write() as conn:
        transition(conn, job_id, dst, expect=src)
    assert _history(rt, job_id) == [(None, "queued")]


def test_move_from_wrong_expected_state_is_stale(rt: Runtime) -> None:
    job_id, _ = _new_job(rt)
    before = _job(rt, job_id)
    # running → succeeded is a legal move, but the job is queued, not running
    with pytest.raises(StaleTransition), rt.db.write() as conn:
        transition(conn, job_id, JobState.SUCCEEDED, expect=JobState.RUNNING, reason="late worker")
    assert _job(rt, job_id) == before
    assert _history(rt, job_id) == [(None, "queued")]


def test_second_claim_of_the_same_move_is_stale(rt: Runtime) -> None:
    """Two workers race for one queued job: exactly one wins."""
    job_id, _ = _new_job(rt)
    with rt.db.write() as conn:
        transition(conn, job_id, JobState.RUNNING, expect=JobState.QUEUED, actor="w1", claimed_by="w1")
    with pytest.raises(StaleTransition), rt.db.write() as conn:
        transition(conn, job_id, JobState.RUNNING, expect=JobState.QUEUED, actor="w2", claimed_by="w2")
    job = _job(rt, job_id)
    assert (job["state"], job["claimed_by"]) == ("running", "w1")
    assert _history(rt, job_id) == [(None, "queued"), ("queued", "running")]


def test_unknown_job_is_stale(rt: Runtime) -> None:
    with pytest.raises(StaleTransition), rt.db.write() as conn:
        transition(conn, 4242, JobState.RUNNING, expect=JobState.QUEUED)
    with rt.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(t.job_transitions)).scalar_one() == 0


def test_allowed_covers_every_state() -> None:
    assert set(ALLOWED) == {None, *JobState}
    for src, targets in ALLOWED.items():
        assert targets <= set(JobState), src
    # a job is created queued, or fetching-priors when its rule asks for priors
    assert ALLOWED[None] == {JobState.QUEUED, JobState.FETCHING_PRIORS}
    assert ALLOWED[JobState.FETCHING_PRIORS] == {JobState.QUEUED, JobState.REFUSED}
    terminal = {JobState.DELIVERED, JobState.SUPERSEDED}
    assert {state for state in JobState if not ALLOWED[state]} == terminal
    # only a job no worker has taken yet can be superseded
    assert {src for src, targets in ALLOWED.items() if JobState.SUPERSEDED in targets} == {JobState.QUEUED}
    # every state is reachable from creation
    reachable: set[JobState] = set()
    frontier: list[JobState | None] = [None]
    while frontier:
        for nxt in ALLOWED[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(JobState)
    # every state but superseded can still reach delivered
    for state in set(JobState) - {JobState.SUPERSEDED}:
        seen, todo = {state}, [state]
        while todo:
            for nxt in ALLOWED[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert JobState.DELIVERED in seen, state


def test_move_records_job_facts_once_committed(rt: Runtime) -> None:
    job_id, _ = _new_job(rt)
    with rt.db.read() as conn:
        ref = job_ref(conn, job_id)
    assert (ref.study_uid, ref.pipeline, ref.study_version) == (STUDY_UID, "forward", 1)
    with audited_write(rt.db, rt.audit) as work:
        move(work, ref, JobState.RUNNING, expect=JobState.QUEUED)
        move(work, ref, JobState.FAILED, expect=JobState.RUNNING, reason="boom")
        assert rt.audit.events(AuditEvent.JOB_TRANSITION) == []  # not before the commit
    # a move whose transaction rolls back is not recorded
    with pytest.raises(StaleTransition), audited_write(rt.db, rt.audit) as work:
        move(work, ref, JobState.QUEUED, expect=JobState.FAILED, reason="operator retry")
        move(work, ref, JobState.RUNNING, expect=JobState.QUEUED)
        move(work, ref, JobState.RUNNING, expect=JobState.QUEUED)  # it is running by now: stale
    with rt.db.read() as conn:
        assert conn.execute(select(t.jobs.c.state).where(t.jobs.c.id == job_id)).scalar_one() == "failed"
    events = rt.audit.events(AuditEvent.JOB_TRANSITION, study_uid=STUDY_UID)
    assert [(e.facts["from_state"], e.facts["to_state"]) for e in events] == [
        ("queued", "running"),
        ("running", "failed"),
    ]
    assert [e.outcome for e in events] == [Outcome.SUCCESS, Outcome.SERIOUS_FAILURE]
    assert events[1].facts["reason"] == "boom"
    assert all(e.facts["job_id"] == job_id and e.facts["pipeline"] == "forward" for e in events)
    assert all(e.facts["study_version"] == 1 for e in events)


# --------------------------------------------------------------------------- superseded


def _runner(rt: Runtime) -> JobRunner:
    config = NodeConfig()
    return JobRunner(config, rt.paths, rt.db, rt.audit, "test-worker", DestinationProfiles(config))


def _version_job(
    rt: Runtime,
    study: int,
    version: int,
    ids: list[int],
    rule: str | None = "ldct",
    pipeline: str = "forward",
) -> int:
    with rt.db.write() as conn:
        return create_job(
            conn,
            study_fk=study,
            study_version=version,
            pipeline=pipeline,
            destinations=["pacs"],
            instance_ids=ids,
            actor="tester",
            rule=rule,
        )


def test_a_queued_job_of_an_older_study_version_is_superseded_not_run(rt: Runtime) -> None:
    """A study that went quiet mid-transfer became ready (version 1, a partial snapshot) and
    was sent again in full (version 2) before a worker took version 1's job: the worker
    settles version 1's job unrun, naming the job that replaces it, and runs version 2's."""
    study, ids = _study_with_instances(rt, 4)
    partial = _version_job(rt, study, 1, ids[:2])
    fallback = _version_job(rt, study, 1, ids[:2], pipeline="denoise-classical")  # the rule's fallback
    other_rule = _version_job(rt, study, 1, ids[:2], rule="another-rule")
    full = _version_job(rt, study, 2, ids)
    runner = _runner(rt)

    assert runner.claim(partial) is None  # asked for by id (a Celery task): not run either
    claimed = runner.claim()
    assert claimed is not None and claimed.job_id == other_rule  # another rule's job is its own
    claimed = runner.claim()
    assert claimed is not None and claimed.job_id == full and claimed.study_version == 2
    assert runner.claim() is None

    row = _job(rt, partial)
    assert (row["state"], row["runs"], row["claimed_by"]) == ("superseded", 0, None)
    assert row["reason"].startswith(f"superseded by job {full} on study version 2 (rule ldct)")
    assert _history(rt, partial) == [(None, "queued"), ("queued", "superseded")]
    assert _job(rt, fallback)["state"] == "superseded"  # the same rule's, though another pipeline
    (event,) = [e for e in rt.audit.events(AuditEvent.JOB_TRANSITION) if e.facts["job_id"] == partial]
    assert event.outcome == Outcome.SUCCESS and event.facts["to_state"] == "superseded"
    assert event.actor == "test-worker" and "superseded by job" in event.facts["reason"]


def test_a_job_already_running_when_the_study_changes_runs_on(rt: Runtime) -> None:
    """Only a job no worker has taken is superseded: one running (or done) when a newer
    version arrives keeps its run, and the newer version gets its own job as before."""
    study, ids = _study_with_instances(rt, 3)
    first = _version_job(rt, study, 1, ids, rule=None)
    runner = _runner(rt)
    claimed = runner.claim()
    assert claimed is not None and claimed.job_id == first
    second = _version_job(rt, study, 2, ids, rule=None)
    claimed = runner.claim()
    assert claimed is not None and claimed.job_id == second
    assert _job(rt, first)["state"] == "running"
    # a job without a rule is superseded by a newer job of the same pipeline only
    third = _version_job(rt, study, 3, ids, rule=None)
    fourth = _version_job(rt, study, 4, ids, rule="ldct")
    claimed = runner.claim()
    assert claimed is not None and claimed.job_id == third
    assert _job(rt, fourth)["state"] == "queued"


def test_a_held_job_of_an_older_study_version_says_so_and_cannot_be_approved(rt: Runtime) -> None:
    """The job of version 1 ran and was held; the study then changed and version 2 got a job
    by the same rule. The review queue says so, and approving version 1 is refused, naming
    the job to review instead (it holds every instance version 1 had and what came since)."""
    from dicom_node.jobs.review import ReviewError, approve, held_jobs, job_detail

    study, ids = _study_with_instances(rt, 3)
    old = _version_job(rt, study, 1, ids[:2])
    with rt.db.read() as conn:
        ref = job_ref(conn, old)
    with audited_write(rt.db, rt.audit) as work:
        move(work, ref, JobState.RUNNING, expect=JobState.QUEUED)
        move(work, ref, JobState.HELD, expect=JobState.RUNNING, reason="held for review: rule says review")
    (listed,) = held_jobs(rt.db)
    assert listed["id"] == old and listed["newer_version"] is None

    new = _version_job(rt, study, 2, ids)
    (listed,) = held_jobs(rt.db)
    assert listed["newer_version"] == {"job": new, "study_version": 2, "state": "queued"}
    assert job_detail(rt.db, rt.audit, old)["newer_version"] == listed["newer_version"]
    with pytest.raises(ReviewError, match=rf"review job {new}, and reject this one"):
        approve(rt.db, rt.audit, old, "dr-reviewer", handover=DestinationProfiles(NodeConfig()))
    assert _job(rt, old)["state"] == "held"
    assert rt.audit.events(AuditEvent.REVIEW_APPROVED) == []
