"""An operator runs a failed or refused job again (``dicom-node jobs rerun``, the API).

The state machine always allowed it (``failed → queued``, ``refused → queued``); nothing
did it, so after fixing what made a job fail (a model that could not load, a full disk)
or refuse (a pin to a model whose input domain covers the series), the only way was to
send the study again from the scanner, which opens a new study version and audits a
second arrival. Now the same job goes back to ``queued`` on its own input snapshot, in
one audited transition naming who asked and why; the worker that takes it starts it
afresh, as it does a job whose worker was lost, and its output UIDs are the same as a
first run's would have been.

What is refused, with what to do instead:

* a job a reviewer rejected (``held → failed``): its run would make the same outputs, and
  under an ``auto`` gate they would leave without the review that refused them;
* a job that failed *delivering* (its outputs exist; a delivery was dead-lettered):
  ``dicom-node outbox retry`` sends them again, nothing needs to run;
* a job in any other state than failed or refused (held: ``review``; queued, running,
  fetching priors: it runs anyway; succeeded, delivering, delivered, superseded: it ran);
* a job whose study has a newer version with a job by the same rule — that job is the one
  to run (the claim would supersede this one);
* a job whose study's files the retention rule removed: send the study again.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from audit import AuditTrail
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.db.engine import Database
from dicom_node.db.queries import job_rows
from dicom_node.jobs.state import JobRef, JobState, move, newer_job

#: The states a job may be run again from.
RERUNNABLE = (JobState.FAILED, JobState.REFUSED)

_WHY_NOT = {
    JobState.HELD.value: "its outputs wait for review: `dicom-node review approve` or `reject`",
    JobState.QUEUED.value: "it is waiting for a worker already",
    JobState.RUNNING.value: "it is running",
    JobState.FETCHING_PRIORS.value: "it is waiting for its prior studies; it runs once they are here",
    JobState.SUCCEEDED.value: "it ran and succeeded",
    JobState.DELIVERING.value: "it ran and its outputs are being delivered",
    JobState.DELIVERED.value: "it ran and its outputs were delivered",
    JobState.SUPERSEDED.value: "a newer version of its study has its own job",
}


class NotRerunnable(ValueError):
    """The job may not run again; the message says why and what to do instead."""


def rerun_job(
    db: Database, audit: AuditTrail, job_id: int, actor: str, reason: str = "", **facts: Any
) -> str:
    """Put failed or refused job ``job_id`` back in the queue; returns what was done.

    Raises
    ------
    KeyError
        There is no such job.
    NotRerunnable
        Why not, and what to do instead.
    """
    with audited_write(db, audit) as work:
        row = work.conn.execute(
            job_rows().add_columns(t.jobs.c.study_fk, t.studies.c.purged_at).where(t.jobs.c.id == job_id)
        ).first()
        if row is None:
            raise KeyError(f"no job {job_id}")
        state = JobState(row.state)
        if state not in RERUNNABLE:
            raise NotRerunnable(
                f"job {job_id} is {state.value}: {_WHY_NOT.get(state.value, 'not failed or refused')}"
            )
        if state is JobState.FAILED:
            came_from = work.conn.execute(
                select(t.job_transitions.c.from_state)
                .where(t.job_transitions.c.job_fk == job_id)
                .order_by(t.job_transitions.c.id.desc())
                .limit(1)
            ).scalar()
            if came_from == JobState.HELD.value:
                raise NotRerunnable(
                    f"job {job_id} was rejected at review ({row.reason}): a rejected job never runs or "
                    "sends again; to process the study afresh, send it again"
                )
            deliveries = list(
                work.conn.execute(
                    select(t.deliveries.c.id)
                    .where(t.deliveries.c.job_fk == job_id)
                    .order_by(t.deliveries.c.id)
                ).scalars()
            )
            if deliveries:
                raise NotRerunnable(
                    f"job {job_id} failed delivering its outputs, which exist: `dicom-node outbox retry` "
                    f"sends them again (its deliveries: {', '.join(map(str, deliveries))})"
                )
        newer = newer_job(work.conn, row)
        if newer is not None:
            raise NotRerunnable(
                f"job {job_id}'s study has a newer version ({newer.study_version}) with job {newer.id} "
                f"({newer.state}) by the same rule: that is the job to run"
            )
        if row.purged_at is not None:
            raise NotRerunnable(
                f"job {job_id}'s study files were removed by the retention rule: send the study again"
            )
        said = f"run again by {actor}" + (f": {reason}" if reason else "")
        move(
            work,
            JobRef(job_id, row.study_uid, row.patient_id, row.pipeline, row.study_version),
            JobState.QUEUED,
            expect=state,
            reason=f"{said} (was {state.value}: {row.reason or 'no reason recorded'})"[:2000],
            actor=actor,
            audit_facts={"action": "rerun requested by operator", **facts},
            claimed_by=None,
            lease_until=None,
            dispatched_at=None,
        )
    return f"job {job_id} ({row.pipeline}) queued again; it was {state.value}"
