"""The review queue: outputs the gate held, waiting for a person.

A job lands in ``held`` when its rule says ``gate: review``, when a QC limit of the rule
was exceeded (hallucination burden, calibrated uncertainty, failed validation), or when a
destination would refuse its outputs (the checks before the gate). Nothing of a held job
is queued for delivery. A reviewer looks at the series and its maps
(:mod:`dicom_node.jobs.previews`) and either approves — the job's deliveries are created
and it moves to ``delivering``; refused while a destination would refuse the outputs — or
rejects with a reason — it moves to ``failed`` and nothing is ever sent. Both are one
transaction plus an audit record with the reviewer's identity; the same functions serve
the CLI (``dicom-node review``) and the web page (``/review``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from audit import AuditEvent, AuditTrail
from dicom_node.db import queries
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.db.engine import Database
from dicom_node.db.queries import job_rows
from dicom_node.jobs.handover import Handover
from dicom_node.jobs.report import approve_reports
from dicom_node.jobs.state import JobRef, JobState, StaleTransition, move, newer_job
from pipelines.writers import kind_of


class ReviewError(RuntimeError):
    """A review action that cannot be done (no such job, not held, no reason given)."""


class UnknownJob(ReviewError):
    """There is no job with that id."""


@dataclass(frozen=True)
class HeldOutput:
    series_uid: str
    kind: str
    instances: int
    paths: tuple[Path, ...]


def _job_rows(conn: Any, job_id: int | None = None, state: str | None = JobState.HELD.value) -> list[Any]:
    if job_id is not None and not 0 < job_id <= t.MAX_ROW_ID:
        return []
    query = job_rows().add_columns(t.jobs.c.study_fk).order_by(t.jobs.c.updated_at)
    if job_id is not None:
        query = query.where(t.jobs.c.id == job_id)
    if state is not None:
        query = query.where(t.jobs.c.state == state)
    return list(conn.execute(query).all())


def _summary(row: Any, conn: Any) -> dict[str, Any]:
    newer = newer_job(conn, row)
    return {
        "id": row.id,
        "state": row.state,
        "study_uid": row.study_uid,
        "patient_id": row.patient_id,
        "from": row.source_ae,
        "study_version": row.study_version,
        "rule": row.rule,
        "pipeline": row.pipeline,
        "gate": row.gate,
        "destinations": list(row.destinations or []),
        "reasons": held_reasons(row.reason),
        "destination_problems": list(row.destination_problems or []),
        "held_since": row.updated_at,
        # a later version of the study has a job by the same rule: this one cannot be approved
        "newer_version": (
            None
            if newer is None
            else {"job": newer.id, "study_version": newer.study_version, "state": newer.state}
        ),
    }


def _ref(row: Any) -> JobRef:
    return JobRef(row.id, row.study_uid, row.patient_id, row.pipeline, row.study_version)


def held_reasons(reason: str | None) -> list[str]:
    text = (reason or "").removeprefix("held for review: ")
    return [r for r in text.split("; ") if r]


def held_jobs(db: Database) -> list[dict[str, Any]]:
    """Jobs waiting for review, oldest first."""
    with db.read() as conn:
        return [_summary(r, conn) for r in _job_rows(conn)]


def job_outputs(db: Database, job_id: int) -> list[HeldOutput]:
    """The job's output series, with their kind (read from the first file of each)."""
    if not 0 < job_id <= t.MAX_ROW_ID:
        return []
    with db.read() as conn:
        rows = conn.execute(
            select(t.job_outputs.c.series_uid, t.job_outputs.c.path)
            .where(t.job_outputs.c.job_fk == job_id)
            .order_by(t.job_outputs.c.id)
        ).all()
    by_series: dict[str, list[Path]] = {}
    for series_uid, path in rows:
        by_series.setdefault(series_uid, []).append(Path(path))
    outputs = []
    for series_uid, paths in by_series.items():
        try:
            kind = kind_of(pydicom.dcmread(paths[0], stop_before_pixels=True))
        except (OSError, ValueError, pydicom.errors.InvalidDicomError):
            kind = "unreadable"
        outputs.append(HeldOutput(series_uid, kind, len(paths), tuple(paths)))
    return outputs


def job_detail(db: Database, audit: AuditTrail, job_id: int) -> dict[str, Any]:
    """One job (any state) with its outputs and the QC figures the gate saw."""
    with db.read() as conn:
        rows = _job_rows(conn, job_id, state=None)
        if not rows:
            raise UnknownJob(f"no job {job_id}")
        detail = _summary(rows[0], conn)
    qc: dict[str, Any] = {}
    for record in audit.search(study_uid=detail["study_uid"], events=[AuditEvent.GATE_DECISION.value]):
        if record.facts.get("job_id") == job_id and record.facts.get("stage") == "output":
            qc = dict(record.facts.get("qc") or {})
    detail["qc"] = qc
    detail["outputs"] = [
        {"series_uid": o.series_uid, "kind": o.kind, "instances": o.instances}
        for o in job_outputs(db, job_id)
    ]
    return detail


def job_overview(db: Database, audit: AuditTrail, job_id: int) -> dict[str, Any]:
    """Everything about one job (the job page and ``/api/v1/jobs/{id}``): its row, the
    gate's reasons (from its last move to ``held``), QC figures, outputs, state history,
    stage times and deliveries. Raises :class:`ReviewError` when there is no such job."""
    detail = job_detail(db, audit, job_id)
    row = queries.list_jobs(db, job_id=job_id)[0]
    history = queries.job_history(db, job_id)
    held = [step for step in history["transitions"] if step["to_state"] == JobState.HELD.value]
    return {
        **row,
        "gate_reasons": held_reasons(held[-1]["reason"]) if held else [],
        "destination_problems": detail["destination_problems"],
        "qc": detail["qc"],
        "outputs": detail["outputs"],
        **history,
        "deliveries": queries.list_deliveries(db, job_id=job_id),
    }


def _held(conn: Any, job_id: int, action: str) -> Any:
    """The job's row, if it is held (else why not, as a :class:`ReviewError`)."""
    rows = _job_rows(conn, job_id, state=None)
    if not rows:
        raise UnknownJob(f"no job {job_id}")
    if rows[0].state != JobState.HELD.value:
        raise ReviewError(f"job {job_id} is {rows[0].state}, not held: nothing to {action}")
    return rows[0]


def approve(
    db: Database,
    audit: AuditTrail,
    job_id: int,
    reviewer: str,
    note: str | None = None,
    *,
    handover: Handover,
    uid_root: str = "2.25.",
    **facts: Any,
) -> int:
    """Release a held job: queue its deliveries and move it to ``delivering``.

    ``handover``: the delivery side (:class:`dicom_node.delivery.profiles.DestinationProfiles`),
    which knows what each destination takes (a TPS is not sent the maps, SEG, SR and overlay).

    The job's summary report is replaced, in its outputs, by a new, verified one that names
    the reviewer, when and the note, beside the held verdict's reasons and limits
    (:func:`dicom_node.jobs.report.approve_reports`; its UID under ``uid_root``): the held
    report is never sent.

    ``facts``: more to record in the approval's audit record (the API token used).

    Returns the number of deliveries queued. Raises :class:`ReviewError` when the job is
    not held (already approved, rejected, or never held), or when a destination would
    refuse its outputs (the checks before the gate found problems).
    """
    reason = f"approved by {reviewer}" + (f": {note}" if note else "")
    with audited_write(db, audit) as work:
        row = _held(work.conn, job_id, "approve")
        newer = newer_job(work.conn, row)
        if newer is not None:
            raise ReviewError(
                f"job {job_id} was made from version {row.study_version} of the study; job {newer.id} "
                f"({newer.state}) from version {newer.study_version}, by the same rule, holds every "
                f"instance this one had and what arrived since: review job {newer.id}, and reject this one"
            )
        if not row.destinations:
            raise ReviewError(f"job {job_id}: its rule names no destination to deliver to")
        if row.destination_problems:
            raise ReviewError(
                f"job {job_id}: {row.destination_problems[0]}"
                + (
                    f" (and {len(row.destination_problems) - 1} more)"
                    if len(row.destination_problems) > 1
                    else ""
                )
                + "; it cannot be approved: reject it, and send a series the destination accepts"
            )
        queued = handover.queue(work.conn, job_id, list(row.destinations))
        if queued.total == 0:
            raise ReviewError(
                f"job {job_id}: {handover.nothing_to_send(row.destinations)}; reject it, or change the "
                "rule's destinations and run it again"
            )
        try:  # the same transaction: a delivery reads the job's outputs when it is sent
            reports = approve_reports(
                work.conn, job_id, row.study_uid, reviewer=reviewer, note=note, uid_root=uid_root
            )
        except ValueError as exc:
            raise ReviewError(
                f"job {job_id}: {exc}; reject it and run it again, so its report states its verdict"
            ) from None
        work.record(
            AuditEvent.REVIEW_APPROVED,
            actor=reviewer,
            study_uid=row.study_uid,
            patient_id=row.patient_id,
            job_id=job_id,
            rule=row.rule,
            pipeline=row.pipeline,
            destinations=list(row.destinations),
            deliveries=queued.new,
            held_for=held_reasons(row.reason),
            note=note,
            report=[r.sop_uid for r in reports],
            held_report=[r.held_sop_uid for r in reports],
            **facts,
        )
        try:
            move(
                work,
                _ref(row),
                JobState.DELIVERING,
                expect=JobState.HELD,
                reason=f"{reason}; {queued.new} delivery(ies) queued",
                actor=reviewer,
            )
        except StaleTransition:
            raise ReviewError(f"job {job_id} changed while approving; look again") from None
    return queued.new


def reject(db: Database, audit: AuditTrail, job_id: int, reviewer: str, reason: str, **facts: Any) -> None:
    """Reject a held job: it moves to ``failed`` with the reason; nothing is ever sent."""
    reason = (reason or "").strip()
    if not reason:
        raise ReviewError("a rejection needs a reason (it goes into the audit trail)")
    why = f"rejected by {reviewer}: {reason}"
    with audited_write(db, audit) as work:
        row = _held(work.conn, job_id, "reject")
        work.record(
            AuditEvent.REVIEW_REJECTED,
            actor=reviewer,
            study_uid=row.study_uid,
            patient_id=row.patient_id,
            job_id=job_id,
            rule=row.rule,
            pipeline=row.pipeline,
            reason=reason,
            held_for=held_reasons(row.reason),
            **facts,
        )
        try:
            move(work, _ref(row), JobState.FAILED, expect=JobState.HELD, reason=why, actor=reviewer)
        except StaleTransition:
            raise ReviewError(f"job {job_id} changed while rejecting; look again") from None
