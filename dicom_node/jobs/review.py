"""The review queue: outputs the gate held, waiting for a person.

A job lands in ``held`` when its rule says ``gate: review`` or when a QC limit of the rule
was exceeded (hallucination burden, calibrated uncertainty, failed validation). Nothing
of a held job is queued for delivery. A reviewer looks at the series and its maps
(:func:`previews`) and either approves — the job's deliveries are created and it moves
to ``delivering`` — or rejects with a reason — it moves to ``failed`` and nothing is ever
sent. Both are one transaction plus an audit record with the reviewer's identity; the
same functions serve the CLI (``dicom-node review``) and the web page (``/review``).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from sqlalchemy import select

from audit import AuditEvent, AuditTrail
from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.delivery.outbox import delivery_count, nothing_to_send, queue_deliveries
from dicom_node.jobs.state import JobState, StaleTransition, audit_transition, transition
from pipelines.writers import KIND_DERIVED, KIND_HALLUCINATION, KIND_UNCERTAINTY, kind_of

PREVIEW_KINDS = (KIND_DERIVED, KIND_UNCERTAINTY, KIND_HALLUCINATION)


class ReviewError(RuntimeError):
    """A review action that cannot be done (no such job, not held, no reason given)."""


@dataclass(frozen=True)
class HeldOutput:
    series_uid: str
    kind: str
    instances: int
    paths: tuple[Path, ...]


def _job_rows(conn: Any, job_id: int | None = None, state: str | None = JobState.HELD.value) -> list[Any]:
    query = (
        select(
            t.jobs.c.id,
            t.jobs.c.state,
            t.jobs.c.pipeline,
            t.jobs.c.rule,
            t.jobs.c.gate,
            t.jobs.c.destinations,
            t.jobs.c.reason,
            t.jobs.c.study_version,
            t.jobs.c.updated_at,
            t.studies.c.study_uid,
            t.studies.c.source_ae,
            t.patients.c.patient_id,
        )
        .join(t.studies, t.studies.c.id == t.jobs.c.study_fk)
        .join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
        .order_by(t.jobs.c.updated_at)
    )
    if job_id is not None:
        query = query.where(t.jobs.c.id == job_id)
    if state is not None:
        query = query.where(t.jobs.c.state == state)
    return list(conn.execute(query).all())


def _summary(row: Any) -> dict[str, Any]:
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
        "reasons": _reasons(row.reason),
        "held_since": row.updated_at,
    }


def _reasons(reason: str | None) -> list[str]:
    text = (reason or "").removeprefix("held for review: ")
    return [r for r in text.split("; ") if r]


def held_jobs(db: Database) -> list[dict[str, Any]]:
    """Jobs waiting for review, oldest first."""
    with db.read() as conn:
        return [_summary(r) for r in _job_rows(conn)]


def job_outputs(db: Database, job_id: int) -> list[HeldOutput]:
    """The job's output series, with their kind (read from the first file of each)."""
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
        raise ReviewError(f"no job {job_id}")
    detail = _summary(rows[0])
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


def approve(
    db: Database,
    audit: AuditTrail,
    job_id: int,
    reviewer: str,
    note: str | None = None,
    *,
    tps: Collection[str],
) -> int:
    """Release a held job: queue its deliveries and move it to ``delivering``.

    ``tps``: the destinations with profile ``tps`` (:func:`dicom_node.delivery.outbox.tps_destinations`),
    which are not sent the maps, SEG, SR and overlay.

    Returns the number of deliveries queued. Raises :class:`ReviewError` when the job is
    not held (already approved, rejected, or never held).
    """
    reason = f"approved by {reviewer}" + (f": {note}" if note else "")
    with db.write() as conn:
        rows = _job_rows(conn, job_id, state=None)
        if not rows:
            raise ReviewError(f"no job {job_id}")
        row = rows[0]
        if row.state != JobState.HELD.value:
            raise ReviewError(f"job {job_id} is {row.state}, not held: nothing to approve")
        if not row.destinations:
            raise ReviewError(f"job {job_id}: its rule names no destination to deliver to")
        try:
            n = queue_deliveries(conn, job_id, list(row.destinations), tps=tps)
            if delivery_count(conn, job_id) == 0:
                raise ReviewError(
                    f"job {job_id}: {nothing_to_send(row.destinations, tps)}; reject it, or change the "
                    "rule's destinations and run it again"
                )
            transition(
                conn,
                job_id,
                JobState.DELIVERING,
                expect=JobState.HELD,
                reason=f"{reason}; {n} delivery(ies) queued",
                actor=reviewer,
            )
        except StaleTransition:
            raise ReviewError(f"job {job_id} changed while approving; look again") from None
    audit.record(
        AuditEvent.REVIEW_APPROVED,
        actor=reviewer,
        study_uid=row.study_uid,
        patient_id=row.patient_id,
        job_id=job_id,
        rule=row.rule,
        pipeline=row.pipeline,
        destinations=list(row.destinations),
        deliveries=n,
        held_for=_reasons(row.reason),
        note=note,
    )
    with db.read() as conn:
        audit_transition(audit, conn, job_id, JobState.HELD, JobState.DELIVERING, reason, actor=reviewer)
    return n


def reject(db: Database, audit: AuditTrail, job_id: int, reviewer: str, reason: str) -> None:
    """Reject a held job: it moves to ``failed`` with the reason; nothing is ever sent."""
    reason = (reason or "").strip()
    if not reason:
        raise ReviewError("a rejection needs a reason (it goes into the audit trail)")
    why = f"rejected by {reviewer}: {reason}"
    with db.write() as conn:
        rows = _job_rows(conn, job_id, state=None)
        if not rows:
            raise ReviewError(f"no job {job_id}")
        row = rows[0]
        if row.state != JobState.HELD.value:
            raise ReviewError(f"job {job_id} is {row.state}, not held: nothing to reject")
        try:
            transition(conn, job_id, JobState.FAILED, expect=JobState.HELD, reason=why, actor=reviewer)
        except StaleTransition:
            raise ReviewError(f"job {job_id} changed while rejecting; look again") from None
    audit.record(
        AuditEvent.REVIEW_REJECTED,
        actor=reviewer,
        study_uid=row.study_uid,
        patient_id=row.patient_id,
        job_id=job_id,
        rule=row.rule,
        pipeline=row.pipeline,
        reason=reason,
        held_for=_reasons(row.reason),
    )
    with db.read() as conn:
        audit_transition(audit, conn, job_id, JobState.HELD, JobState.FAILED, why, actor=reviewer)


# -- previews --------------------------------------------------------------------------------


def _slices(paths: tuple[Path, ...]) -> list[tuple[float, np.ndarray]]:
    """(z, 2-D values) for every frame of a series, single- or multi-frame, rescaled."""
    out: list[tuple[float, np.ndarray]] = []
    for path in paths:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array, dtype=np.float32)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            pixels = pixels.reshape(frames, *pixels.shape[-2:])
            for i, frame in enumerate(pixels):
                groups = ds.PerFrameFunctionalGroupsSequence[i]
                z = float(groups.PlanePositionSequence[0].ImagePositionPatient[2])
                out.append((z, frame))
        else:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            z = float(ds.ImagePositionPatient[2]) if "ImagePositionPatient" in ds else float(len(out))
            out.append((z, pixels * slope + intercept))
    return sorted(out, key=lambda s: s[0])


def _png(values: np.ndarray, vmin: float, vmax: float, cmap: str) -> bytes:
    from matplotlib import image

    buffer = io.BytesIO()
    image.imsave(buffer, values, vmin=vmin, vmax=max(vmax, vmin + 1e-6), cmap=cmap, format="png")
    return buffer.getvalue()


@dataclass(frozen=True)
class Previews:
    """One slice of the output series and of both maps, as PNG; ``z`` is where it is."""

    z: float
    why: str
    images: dict[str, bytes]


class PreviewCache:
    """Rendering reads whole series; keep the last few jobs' previews in memory."""

    def __init__(self, size: int = 16) -> None:
        self._items: OrderedDict[int, Previews] = OrderedDict()
        self._lock = threading.Lock()
        self.size = size

    def get(self, db: Database, job_id: int) -> Previews:
        with self._lock:
            if job_id in self._items:
                self._items.move_to_end(job_id)
                return self._items[job_id]
        made = previews(db, job_id)
        with self._lock:
            self._items[job_id] = made
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return made


def previews(db: Database, job_id: int) -> Previews:
    """PNG previews of the derived series, the uncertainty and the hallucination map.

    All three at the same slice: the one where the hallucination map peaks (what the
    reviewer must look at), or the middle slice when there is no hallucination map.
    """
    series = {o.kind: _slices(o.paths) for o in job_outputs(db, job_id) if o.kind in PREVIEW_KINDS}
    if not series:
        raise ReviewError(f"job {job_id} has no output series to preview")
    if KIND_HALLUCINATION in series:
        peaks = [float(np.max(v)) for _z, v in series[KIND_HALLUCINATION]]
        index, reference = int(np.argmax(peaks)), KIND_HALLUCINATION
        why = f"slice where the hallucination map peaks ({peaks[index]:.3g})"
    else:
        reference = next(iter(series))
        index = len(series[reference]) // 2
        why = "middle slice"
    z = series[reference][index][0]
    images: dict[str, bytes] = {}
    for kind, slices in series.items():
        nearest = min(slices, key=lambda s: abs(s[0] - z))[1]
        if kind == KIND_DERIVED:
            lo, hi = (-160.0, 240.0) if float(np.min(nearest)) < -500 else np.percentile(nearest, [1, 99])
            images[kind] = _png(nearest, float(lo), float(hi), "gray")
        elif kind == KIND_UNCERTAINTY:
            images[kind] = _png(nearest, 0.0, float(np.percentile(nearest, 99.5)), "viridis")
        else:
            images[kind] = _png(nearest, 0.0, max(1.0, float(np.max(nearest))), "inferno")
    return Previews(z=z, why=why, images=images)
