"""Read-only views of the index, the jobs and the outbox (for the CLI and the web page)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, func, select

from dicom_node.db import schema as t
from dicom_node.db.engine import Database


def list_studies(db: Database) -> list[dict[str, Any]]:
    """One dict per study: ids, patient, modalities, counts, and a state.

    ``state`` is ``receiving`` while instances wait for the completeness timer, otherwise
    the state of the study's newest job, or ``stored`` when no route matched.
    """
    with db.read() as conn:
        studies = conn.execute(
            select(
                t.studies.c.id,
                t.studies.c.study_uid,
                t.studies.c.study_date,
                t.studies.c.description,
                t.studies.c.source_ae,
                t.studies.c.open_version,
                t.studies.c.first_received_at,
                t.patients.c.patient_id,
            )
            .join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
            .order_by(t.studies.c.first_received_at)
        ).all()
        series = conn.execute(
            select(
                t.series.c.study_fk,
                t.series.c.modality,
                func.count(t.instances.c.id),
            )
            .join(t.instances, t.instances.c.series_fk == t.series.c.id)
            .where(t.instances.c.current.is_(True))
            .group_by(t.series.c.id)
        ).all()
        pending: dict[int, int] = dict(
            conn.execute(
                select(t.instances.c.study_fk, func.count())
                .join(t.studies, t.studies.c.id == t.instances.c.study_fk)
                .where(t.instances.c.study_version == t.studies.c.open_version)
                .group_by(t.instances.c.study_fk)
            ).all()
        )
        last = dict(
            conn.execute(
                select(t.instances.c.study_fk, func.max(t.instances.c.received_at)).group_by(
                    t.instances.c.study_fk
                )
            ).all()
        )
        latest_job = {
            row.study_fk: row.state
            for row in conn.execute(select(t.jobs.c.study_fk, t.jobs.c.state).order_by(t.jobs.c.id)).all()
        }
    out = []
    for s in studies:
        mine = [row for row in series if row[0] == s.id]
        state = "receiving" if pending.get(s.id) else latest_job.get(s.id, "stored")
        out.append(
            {
                "study_uid": s.study_uid,
                "patient_id": s.patient_id,
                "study_date": s.study_date,
                "description": s.description,
                "source_ae": s.source_ae,
                "modalities": sorted({m for _, m, _ in mine if m}),
                "series": len(mine),
                "instances": sum(n for _, _, n in mine),
                "version": s.open_version - (0 if pending.get(s.id) else 1),
                "state": state,
                "first_received_at": s.first_received_at,
                "last_received_at": last.get(s.id),
            }
        )
    return out


def job_rows() -> Select[Any]:
    """Jobs with their study and patient: what job listings, the review queue and audit
    records name (one query for all of them)."""
    return (
        select(
            t.jobs.c.id,
            t.studies.c.study_uid,
            t.jobs.c.study_version,
            t.jobs.c.pipeline,
            t.jobs.c.rule,
            t.jobs.c.gate,
            t.jobs.c.destinations,
            t.jobs.c.state,
            t.jobs.c.reason,
            t.jobs.c.destination_problems,
            t.jobs.c.runs,
            t.jobs.c.created_at,
            t.jobs.c.updated_at,
            t.studies.c.source_ae,
            t.patients.c.patient_id,
        )
        .join(t.studies, t.studies.c.id == t.jobs.c.study_fk)
        .join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
    )


def list_jobs(db: Database, state: str | None = None, study_uid: str | None = None) -> list[dict[str, Any]]:
    query = job_rows().order_by(t.jobs.c.id)
    if state:
        query = query.where(t.jobs.c.state == state)
    if study_uid:
        query = query.where(t.studies.c.study_uid == study_uid)
    with db.read() as conn:
        inputs: dict[int, int] = dict(
            conn.execute(select(t.job_inputs.c.job_fk, func.count()).group_by(t.job_inputs.c.job_fk)).all()
        )
        return [{**dict(row._mapping), "inputs": inputs.get(row.id, 0)} for row in conn.execute(query).all()]


def list_deliveries(db: Database, state: str | None = None) -> list[dict[str, Any]]:
    query = (
        select(
            t.deliveries.c.id,
            t.deliveries.c.job_fk.label("job_id"),
            t.studies.c.study_uid,
            t.deliveries.c.series_uid,
            t.deliveries.c.destination,
            t.deliveries.c.state,
            t.deliveries.c.attempts,
            t.deliveries.c.next_attempt_at,
            t.deliveries.c.last_error,
            t.deliveries.c.delivered_at,
        )
        .join(t.jobs, t.jobs.c.id == t.deliveries.c.job_fk)
        .join(t.studies, t.studies.c.id == t.jobs.c.study_fk)
        .order_by(t.deliveries.c.id)
    )
    if state:
        query = query.where(t.deliveries.c.state == state)
    with db.read() as conn:
        counts: dict[int, int] = dict(
            conn.execute(
                select(t.job_outputs.c.job_fk.label("j"), func.count()).group_by(t.job_outputs.c.job_fk)
            ).all()
        )
        rows = [dict(r._mapping) for r in conn.execute(query).all()]
        # The latest storage commitment transaction of each delivery (where there is one).
        latest = (
            select(func.max(t.storage_commitments.c.id))
            .group_by(t.storage_commitments.c.delivery_fk)
            .scalar_subquery()
        )
        commitments = {
            c.delivery_fk: {"transaction_uid": c.transaction_uid, "state": c.state, "detail": c.detail}
            for c in conn.execute(
                select(
                    t.storage_commitments.c.delivery_fk,
                    t.storage_commitments.c.transaction_uid,
                    t.storage_commitments.c.state,
                    t.storage_commitments.c.detail,
                ).where(t.storage_commitments.c.id.in_(latest))
            ).all()
        }
    for r in rows:
        r["job_outputs"] = counts.get(r["job_id"], 0)
        r["commitment"] = commitments.get(r["id"])
    return rows


def list_delivery_attempts(db: Database, delivery_id: int) -> list[dict[str, Any]]:
    with db.read() as conn:
        return [
            dict(r._mapping)
            for r in conn.execute(
                select(t.delivery_attempts)
                .where(t.delivery_attempts.c.delivery_fk == delivery_id)
                .order_by(t.delivery_attempts.c.id)
            ).all()
        ]


def list_quarantine(db: Database) -> list[dict[str, Any]]:
    with db.read() as conn:
        return [
            dict(r._mapping) for r in conn.execute(select(t.quarantine).order_by(t.quarantine.c.id)).all()
        ]
