"""Read-only views of the index, the jobs and the outbox (for the CLI and the web page)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, func, select

from dicom_node.db import schema as t
from dicom_node.db.engine import Database


def _paged(
    query: Select[Any], key: Any, cursor: int | None, limit: int | None, newest_first: bool
) -> Select[Any]:
    """Keyset paging on ``key`` (a row id): oldest first, or newest first below ``cursor``."""
    if newest_first:
        query = query.order_by(key.desc())
        if cursor is not None:
            query = query.where(key < cursor)
    else:
        query = query.order_by(key)
        if cursor is not None:
            query = query.where(key > cursor)
    return query.limit(limit) if limit is not None else query


def list_studies(
    db: Database,
    *,
    study_uid: str | None = None,
    patient_id: str | None = None,
    modality: str | None = None,
    source_ae: str | None = None,
    since: float | None = None,
    until: float | None = None,
    cursor: int | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """One dict per study: ids, patient, modalities, counts, and a state; every filter
    given must match (``since``/``until``: when its first instance arrived). Keyset
    paging on the study's row id (``id``): see :func:`_paged`.

    ``state`` is ``receiving`` while instances wait for the completeness timer, ``purged``
    once the retention rule removed its files, otherwise the state of the study's newest
    job, or ``stored`` when no route matched.
    """
    query = select(
        t.studies.c.id,
        t.studies.c.study_uid,
        t.studies.c.study_date,
        t.studies.c.accession_number,
        t.studies.c.description,
        t.studies.c.source_ae,
        t.studies.c.open_version,
        t.studies.c.first_received_at,
        t.studies.c.purged_at,
        t.patients.c.patient_id,
    ).join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
    if study_uid is not None:
        query = query.where(t.studies.c.study_uid == study_uid)
    if patient_id is not None:
        query = query.where(t.patients.c.patient_id == patient_id)
    if source_ae is not None:
        query = query.where(t.studies.c.source_ae == source_ae)
    if since is not None:
        query = query.where(t.studies.c.first_received_at >= since)
    if until is not None:
        query = query.where(t.studies.c.first_received_at <= until)
    if modality is not None:
        query = query.where(
            t.studies.c.id.in_(select(t.series.c.study_fk).where(t.series.c.modality == modality))
        )
    query = _paged(query, t.studies.c.id, cursor, limit, newest_first)
    with db.read() as conn:
        studies = conn.execute(query).all()
        ids = [s.id for s in studies]
        series = conn.execute(
            select(
                t.series.c.study_fk,
                t.series.c.modality,
                func.count(t.instances.c.id),
            )
            .join(t.instances, t.instances.c.series_fk == t.series.c.id)
            .where(t.instances.c.current.is_(True), t.series.c.study_fk.in_(ids))
            .group_by(t.series.c.id)
        ).all()
        pending: dict[int, int] = dict(
            conn.execute(
                select(t.instances.c.study_fk, func.count())
                .join(t.studies, t.studies.c.id == t.instances.c.study_fk)
                .where(t.instances.c.study_version == t.studies.c.open_version, t.studies.c.id.in_(ids))
                .group_by(t.instances.c.study_fk)
            ).all()
        )
        last = dict(
            conn.execute(
                select(t.instances.c.study_fk, func.max(t.instances.c.received_at))
                .where(t.instances.c.study_fk.in_(ids))
                .group_by(t.instances.c.study_fk)
            ).all()
        )
        latest_job = {
            row.study_fk: row.state
            for row in conn.execute(
                select(t.jobs.c.study_fk, t.jobs.c.state)
                .where(t.jobs.c.study_fk.in_(ids))
                .order_by(t.jobs.c.id)
            ).all()
        }
    by_study: dict[int, list[Any]] = {}
    for row in series:
        by_study.setdefault(row[0], []).append(row)
    out = []
    for s in studies:
        mine = by_study.get(s.id, [])
        state = "receiving" if pending.get(s.id) else latest_job.get(s.id, "stored")
        if s.purged_at is not None:
            state = "purged"  # its files were removed by the retention rule
        out.append(
            {
                "id": s.id,
                "study_uid": s.study_uid,
                "patient_id": s.patient_id,
                "study_date": s.study_date,
                "accession_number": s.accession_number,
                "description": s.description,
                "source_ae": s.source_ae,
                "modalities": sorted({m for _, m, _ in mine if m}),
                "series": len(mine),
                "instances": sum(n for _, _, n in mine),
                "version": s.open_version - (0 if pending.get(s.id) else 1),
                "state": state,
                "first_received_at": s.first_received_at,
                "last_received_at": last.get(s.id),
                "purged_at": s.purged_at,
            }
        )
    return out


def study_series(db: Database, study_uid: str) -> list[dict[str, Any]]:
    """The series of a study with their current instance counts, by series number."""
    with db.read() as conn:
        rows = conn.execute(
            select(
                t.series.c.series_uid,
                t.series.c.modality,
                t.series.c.series_number,
                t.series.c.description,
                t.series.c.body_part,
                t.series.c.frame_of_reference_uid,
                func.count(t.instances.c.id).label("instances"),
            )
            .join(t.studies, t.studies.c.id == t.series.c.study_fk)
            .outerjoin(
                t.instances,
                (t.instances.c.series_fk == t.series.c.id) & t.instances.c.current.is_(True),
            )
            .where(t.studies.c.study_uid == study_uid)
            .group_by(t.series.c.id)
            .order_by(t.series.c.series_number, t.series.c.id)
        ).all()
    return [dict(r._mapping) for r in rows]


def job_history(db: Database, job_id: int) -> dict[str, list[dict[str, Any]]]:
    """A job's state transitions and the seconds each stage of its runs took, in order."""
    with db.read() as conn:
        transitions = conn.execute(
            select(
                t.job_transitions.c.from_state,
                t.job_transitions.c.to_state,
                t.job_transitions.c.at,
                t.job_transitions.c.reason,
                t.job_transitions.c.actor,
            )
            .where(t.job_transitions.c.job_fk == job_id)
            .order_by(t.job_transitions.c.id)
        ).all()
        stages = conn.execute(
            select(t.job_stage_times.c.stage, t.job_stage_times.c.seconds, t.job_stage_times.c.at)
            .where(t.job_stage_times.c.job_fk == job_id)
            .order_by(t.job_stage_times.c.id)
        ).all()
    return {
        "transitions": [dict(r._mapping) for r in transitions],
        "stages": [dict(r._mapping) for r in stages],
    }


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
            #: the series the rule took (two jobs of one rule and study version differ here)
            t.jobs.c.series_uid,
            t.series.c.series_number,
            t.series.c.description.label("series_description"),
            t.jobs.c.gate,
            t.jobs.c.urgency,
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
        .outerjoin(t.series, t.series.c.series_uid == t.jobs.c.series_uid)
    )


def list_jobs(
    db: Database,
    state: str | None = None,
    study_uid: str | None = None,
    *,
    pipeline: str | None = None,
    patient_id: str | None = None,
    job_id: int | None = None,
    cursor: int | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    query = job_rows()
    if state:
        query = query.where(t.jobs.c.state == state)
    if study_uid:
        query = query.where(t.studies.c.study_uid == study_uid)
    if pipeline:
        query = query.where(t.jobs.c.pipeline == pipeline)
    if patient_id:
        query = query.where(t.patients.c.patient_id == patient_id)
    if job_id is not None:
        query = query.where(t.jobs.c.id == job_id)
    query = _paged(query, t.jobs.c.id, cursor, limit, newest_first)
    with db.read() as conn:
        rows = conn.execute(query).all()
        inputs: dict[int, int] = dict(
            conn.execute(
                select(t.job_inputs.c.job_fk, func.count())
                .where(t.job_inputs.c.job_fk.in_([r.id for r in rows]))
                .group_by(t.job_inputs.c.job_fk)
            ).all()
        )
    return [
        {**dict(row._mapping), "urgency": t.urgency_name(row.urgency), "inputs": inputs.get(row.id, 0)}
        for row in rows
    ]


def list_deliveries(
    db: Database,
    state: str | None = None,
    *,
    destination: str | None = None,
    job_id: int | None = None,
    delivery_id: int | None = None,
    cursor: int | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
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
    )
    if state:
        query = query.where(t.deliveries.c.state == state)
    if destination:
        query = query.where(t.deliveries.c.destination == destination)
    if job_id is not None:
        query = query.where(t.deliveries.c.job_fk == job_id)
    if delivery_id is not None:
        query = query.where(t.deliveries.c.id == delivery_id)
    query = _paged(query, t.deliveries.c.id, cursor, limit, newest_first)
    with db.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query).all()]
        counts: dict[int, int] = dict(
            conn.execute(
                select(t.job_outputs.c.job_fk.label("j"), func.count())
                .where(t.job_outputs.c.job_fk.in_({r["job_id"] for r in rows}))
                .group_by(t.job_outputs.c.job_fk)
            ).all()
        )
        # The latest storage commitment transaction of each delivery (where there is one).
        latest = (
            select(func.max(t.storage_commitments.c.id))
            .where(t.storage_commitments.c.delivery_fk.in_([r["id"] for r in rows]))
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


def dashboard_counts(db: Database, since: float) -> dict[str, Any]:
    """What the operator's home page shows: what arrived, ran and left since ``since``
    (today), and the queues now (jobs and deliveries by state)."""
    with db.read() as conn:
        received = conn.execute(
            select(func.count(), func.coalesce(func.sum(t.instances.c.size), 0)).where(
                t.instances.c.received_at >= since
            )
        ).one()
        studies = conn.execute(
            select(func.count()).select_from(t.studies).where(t.studies.c.first_received_at >= since)
        ).scalar_one()
        finished: dict[str, int] = dict(
            conn.execute(
                select(t.job_transitions.c.to_state, func.count())
                .where(t.job_transitions.c.at >= since)
                .group_by(t.job_transitions.c.to_state)
            ).all()
        )
        delivered = conn.execute(
            select(func.count()).select_from(t.deliveries).where(t.deliveries.c.delivered_at >= since)
        ).scalar_one()
        quarantined = conn.execute(
            select(func.count()).select_from(t.quarantine).where(t.quarantine.c.at >= since)
        ).scalar_one()
        jobs: dict[str, int] = dict(
            conn.execute(select(t.jobs.c.state, func.count()).group_by(t.jobs.c.state)).all()
        )
        deliveries: dict[str, int] = dict(
            conn.execute(select(t.deliveries.c.state, func.count()).group_by(t.deliveries.c.state)).all()
        )
    return {
        "today": {
            "instances": int(received[0]),
            "bytes": int(received[1]),
            "studies": int(studies),
            "quarantined": int(quarantined),
            "jobs_created": int(finished.get("queued", 0)),
            "jobs_held": int(finished.get("held", 0)),
            "jobs_delivered": int(finished.get("delivered", 0)),
            "jobs_failed": int(finished.get("failed", 0)) + int(finished.get("refused", 0)),
            "series_delivered": int(delivered),
        },
        "jobs": {str(k): int(v) for k, v in jobs.items()},
        "deliveries": {str(k): int(v) for k, v in deliveries.items()},
    }
