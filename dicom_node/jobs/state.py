"""The job state machine, kept in SQL.

``queued → running → (succeeded | failed | refused | held) → delivering → delivered``

A job whose rule asks for priors starts in ``fetching-priors`` and goes to ``queued`` (with
what arrived) or ``refused`` (the rule's ``on_missing: refuse``), see
:mod:`dicom_node.jobs.prior_fetch`.

Every transition is committed before the work it announces starts, so a restart — even
after kill -9 — finds each job in a state that says what to do next: ``queued`` and an
orphaned ``running`` are (re)run (work is idempotent), ``delivering`` waits on its
deliveries. ``failed`` and ``held`` can be retried/released by an operator. ``refused``
means the input is outside the model's declared domain (not a failure): the rule's
fallback has run as a job of its own (:mod:`dicom_node.jobs.fallback`); an operator may
queue a refused job again, e.g. after pinning a model whose domain covers the input.
``queued → superseded``: when a worker takes a job whose study has since had a newer
version routed by the same rule, the job is settled unrun (its snapshot holds a subset of
the newer job's instances: a study that went quiet mid-transfer and was sent again must
not also be processed half).

:func:`move` is how a job is settled: the transition and its audit record, recorded once
the transaction commits (:mod:`dicom_node.db.audited`), from facts the caller already has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Connection, insert, select, update

from audit import AuditEvent, Outcome
from dicom_node.config import WorkersSection
from dicom_node.db import schema as t
from dicom_node.db.audited import AuditedWrite
from dicom_node.db.engine import inserted_id
from dicom_node.db.queries import job_rows
from pipelines.base import OutputInstance


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HELD = "held"
    #: The input is outside the model's declared input domain (the reasons are the job's).
    REFUSED = "refused"
    #: The rule asked for priors: the job waits for them (then queued, or refused when the
    #: rule says ``on_missing: refuse`` and they did not all arrive in time).
    FETCHING_PRIORS = "fetching-priors"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    #: Never run: a newer version of its study got a job by the same rule before a worker
    #: took this one (its snapshot is a subset of the newer one's; the reason names it).
    SUPERSEDED = "superseded"


ALLOWED: dict[JobState | None, frozenset[JobState]] = {
    None: frozenset({JobState.QUEUED, JobState.FETCHING_PRIORS}),
    JobState.FETCHING_PRIORS: frozenset({JobState.QUEUED, JobState.REFUSED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.SUPERSEDED}),
    # running → queued: the worker was lost; the job resumes from the start.
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.REFUSED, JobState.HELD, JobState.QUEUED}
    ),
    JobState.SUCCEEDED: frozenset({JobState.DELIVERING, JobState.DELIVERED}),
    JobState.HELD: frozenset({JobState.DELIVERING, JobState.FAILED}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.DELIVERING}),
    # refused → queued: an operator runs it again (e.g. a model whose domain covers the input).
    JobState.REFUSED: frozenset({JobState.QUEUED}),
    # delivering → failed: a delivery was dead-lettered; an operator retry goes back.
    JobState.DELIVERING: frozenset({JobState.DELIVERED, JobState.FAILED}),
    JobState.DELIVERED: frozenset(),
    JobState.SUPERSEDED: frozenset(),
}


#: The audit outcome of a move to these states (any other: success).
_OUTCOME = {JobState.FAILED: Outcome.SERIOUS_FAILURE, JobState.REFUSED: Outcome.MINOR_FAILURE}


class IllegalTransition(RuntimeError):
    pass


class StaleTransition(RuntimeError):
    """The job is no longer in the state the caller expected (someone else moved it)."""


def transition(
    conn: Connection,
    job_id: int,
    to_state: JobState,
    *,
    expect: JobState | None,
    reason: str | None = None,
    actor: str | None = None,
    **values: object,
) -> None:
    """Move a job from ``expect`` to ``to_state`` in the caller's transaction.

    Raises :class:`StaleTransition` when the row is not in ``expect`` any more and
    :class:`IllegalTransition` when the state machine does not allow the move.
    """
    if to_state not in ALLOWED[expect]:
        raise IllegalTransition(f"job {job_id}: {expect} → {to_state} is not allowed")
    now = time.time()
    result = conn.execute(
        update(t.jobs)
        .where(t.jobs.c.id == job_id, t.jobs.c.state == (expect.value if expect else None))
        .values(state=to_state.value, reason=reason, updated_at=now, **values)
    )
    if result.rowcount != 1:
        raise StaleTransition(f"job {job_id} is not {expect}")
    conn.execute(
        insert(t.job_transitions).values(
            job_fk=job_id,
            from_state=expect.value if expect else None,
            to_state=to_state.value,
            at=now,
            reason=reason,
            actor=actor,
        )
    )


def runnable_now(workers: WorkersSection) -> list[ColumnElement[bool]]:
    """Conditions on ``jobs`` a queued job must meet to be run (claimed or published) now:
    outside ``[workers] offpeak_hours``, that it is not an ``offpeak`` job; none inside."""
    return [] if workers.in_offpeak() else [t.jobs.c.urgency >= t.URGENCY["normal"]]


def create_job(
    conn: Connection,
    *,
    study_fk: int,
    study_version: int,
    pipeline: str,
    destinations: list[str],
    instance_ids: list[int],
    actor: str | None = None,
    rule: str | None = None,
    gate: str = "auto",
    qc_policy: dict[str, object] | None = None,
    options: dict[str, object] | None = None,
    series_uid: str | None = None,
    priors: dict[str, object] | None = None,
    urgency: str | int = "normal",
) -> int:
    """Insert a job with its input snapshot, in the caller's transaction: ``queued``, or
    ``fetching-priors`` when the rule asked for ``priors``. ``urgency``: the rule's
    (``normal``, ``urgent``, ``offpeak``) or the stored number (a follow-up job keeps its job's)."""
    state = JobState.FETCHING_PRIORS if priors else JobState.QUEUED
    now = time.time()
    job_id = int(
        inserted_id(
            conn.execute(
                insert(t.jobs).values(
                    study_fk=study_fk,
                    study_version=study_version,
                    pipeline=pipeline,
                    destinations=destinations,
                    rule=rule,
                    gate=gate,
                    qc_policy=qc_policy or {},
                    options=options or {},
                    series_uid=series_uid,
                    priors=priors,
                    urgency=urgency if isinstance(urgency, int) else t.URGENCY[urgency],
                    state=state.value,
                    runs=0,
                    created_at=now,
                    updated_at=now,
                )
            )
        )
    )
    if instance_ids:
        conn.execute(insert(t.job_inputs), [{"job_fk": job_id, "instance_fk": i} for i in instance_ids])
    conn.execute(
        insert(t.job_transitions).values(
            job_fk=job_id, from_state=None, to_state=state.value, at=now, actor=actor
        )
    )
    return job_id


@dataclass(frozen=True)
class JobRef:
    """The facts every audit record of a job names, read once (with the claim or the row)."""

    job_id: int
    study_uid: str
    patient_id: str | None
    pipeline: str
    study_version: int


def job_ref(conn: Connection, job_id: int) -> JobRef:
    """The job's :class:`JobRef` (raises ``NoResultFound`` when there is no such job)."""
    row = conn.execute(job_rows().where(t.jobs.c.id == job_id)).one()
    return JobRef(job_id, row.study_uid, row.patient_id, row.pipeline, row.study_version)


def move(
    work: AuditedWrite,
    job: JobRef,
    to_state: JobState,
    *,
    expect: JobState,
    reason: str | None = None,
    actor: str | None = None,
    audit_facts: dict[str, Any] | None = None,
    **values: object,
) -> None:
    """Move a job (:func:`transition`) and queue its ``job-transition`` audit record, which
    is appended once ``work`` commits. Every settling of a job goes through here.
    ``audit_facts``: more facts for the record (how a web caller was authenticated)."""
    transition(work.conn, job.job_id, to_state, expect=expect, reason=reason, actor=actor, **values)
    work.record(
        AuditEvent.JOB_TRANSITION,
        _OUTCOME.get(to_state, Outcome.SUCCESS),
        actor=actor,
        study_uid=job.study_uid,
        patient_id=job.patient_id,
        job_id=job.job_id,
        pipeline=job.pipeline,
        study_version=job.study_version,
        from_state=expect.value,
        to_state=to_state.value,
        reason=reason,
        **(audit_facts or {}),
    )


def record_outputs(conn: Connection, job_id: int, outputs: tuple[OutputInstance, ...]) -> None:
    """Record the files a job produced (whether or not they may leave yet)."""
    if outputs:
        conn.execute(
            insert(t.job_outputs),
            [
                {
                    "job_fk": job_id,
                    "series_uid": o.series_uid,
                    "sop_uid": o.sop_uid,
                    "sop_class_uid": o.sop_class_uid,
                    "transfer_syntax_uid": o.transfer_syntax_uid,
                    "path": str(o.path),
                }
                for o in outputs
            ],
        )


def newer_job(conn: Connection, job: Any) -> Any:
    """The newest job (``id``, ``study_version``, ``state``) made from a later version of
    the study of ``job`` (a row with ``study_fk``, ``pipeline``, ``rule`` and
    ``study_version``) by the same rule — whatever its pipeline, so a fallback of the older
    version counts too — or, for a job without a rule, with the same pipeline; None when
    there is none. A queued job that has one is :data:`JobState.SUPERSEDED` at the claim
    (its snapshot is a subset of that job's); a held one cannot be approved. A job with a
    ``series_uid`` names the newer job of the same series first (a rule with ``select:
    {each: true}`` makes one job per series of each version)."""
    lineage = (
        (t.jobs.c.rule.is_(None), t.jobs.c.pipeline == job.pipeline)
        if job.rule is None
        else (t.jobs.c.rule == job.rule,)
    )
    newer = (
        select(t.jobs.c.id, t.jobs.c.study_version, t.jobs.c.state)
        .where(t.jobs.c.study_fk == job.study_fk, *lineage, t.jobs.c.study_version > job.study_version)
        .order_by(t.jobs.c.study_version.desc(), t.jobs.c.id.desc())
        .limit(1)
    )
    series_uid = getattr(job, "series_uid", None)
    if series_uid:  # a rule that makes one job per series: the job of the same series
        same = conn.execute(newer.where(t.jobs.c.series_uid == series_uid)).first()
        if same is not None:
            return same
    return conn.execute(newer).first()
