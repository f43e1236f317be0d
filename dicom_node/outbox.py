"""The outbox: one delivery per output series per destination, retried until confirmed.

Delivery states: ``pending → sending → delivered``, or back to ``pending`` with an
exponential backoff (capped) after a retryable failure, or ``dead`` (dead-letter) after
``max_attempts`` or a permanent failure. Every attempt is a row with its outcome. A job is
``delivered`` only when all of its deliveries are.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sqlalchemy import Connection, and_, func, insert, select, update

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import NodeConfig, OutboxSection
from dicom_node.db import schema as t
from dicom_node.db.engine import Database, inserted_id
from dicom_node.jobs import JobState, StaleTransition, audit_transition, transition
from dicom_node.net.sender import SendReport, send_series
from pipelines.base import OutputInstance

log = logging.getLogger(__name__)


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True)
class DeliveryTask:
    delivery_id: int
    attempt_id: int
    job_id: int
    study_uid: str
    patient_id: str | None
    series_uid: str
    destination: str
    attempt: int
    files: tuple[OutputInstance, ...]


def backoff_seconds(policy: OutboxSection, attempts: int) -> float:
    """Delay before the next try after ``attempts`` failed tries (1-based)."""
    delay = policy.backoff_initial_seconds * policy.backoff_factor ** max(attempts - 1, 0)
    return float(min(delay, policy.backoff_max_seconds))


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


def queue_deliveries(conn: Connection, job_id: int, destinations: list[str]) -> int:
    """One pending delivery per recorded output series per destination (idempotent)."""
    now = time.time()
    series_uids = sorted(
        set(
            conn.execute(select(t.job_outputs.c.series_uid).where(t.job_outputs.c.job_fk == job_id)).scalars()
        )
    )
    existing = set(
        conn.execute(
            select(t.deliveries.c.series_uid, t.deliveries.c.destination).where(
                t.deliveries.c.job_fk == job_id
            )
        ).all()
    )
    rows = [
        {
            "job_fk": job_id,
            "series_uid": s,
            "destination": d,
            "state": DeliveryState.PENDING.value,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for s in series_uids
        for d in destinations
        if (s, d) not in existing
    ]
    if rows:
        conn.execute(insert(t.deliveries), rows)
    return len(rows)


def create_deliveries(
    conn: Connection, job_id: int, outputs: tuple[OutputInstance, ...], destinations: list[str]
) -> int:
    """Record the job's outputs and queue one delivery per series per destination."""
    record_outputs(conn, job_id, outputs)
    return queue_deliveries(conn, job_id, destinations)


class Outbox:
    """Claims due deliveries, sends them, and records every attempt."""

    def __init__(self, config: NodeConfig, db: Database, audit: AuditTrail, worker_id: str) -> None:
        self.config = config
        self.db = db
        self.audit = audit
        self.worker_id = worker_id

    def claim_due(self) -> DeliveryTask | None:
        now = time.time()
        with self.db.write() as conn:
            row = conn.execute(
                select(t.deliveries, t.studies.c.study_uid, t.patients.c.patient_id)
                .join(t.jobs, t.jobs.c.id == t.deliveries.c.job_fk)
                .join(t.studies, t.studies.c.id == t.jobs.c.study_fk)
                .join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
                .where(
                    t.deliveries.c.state == DeliveryState.PENDING.value,
                    t.deliveries.c.next_attempt_at <= now,
                    # defence in depth: a held, failed or shadow job never sends anything
                    t.jobs.c.state == JobState.DELIVERING.value,
                )
                .order_by(t.deliveries.c.next_attempt_at, t.deliveries.c.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            attempt = row.attempts + 1
            conn.execute(
                update(t.deliveries)
                .where(t.deliveries.c.id == row.id)
                .values(
                    state=DeliveryState.SENDING.value,
                    attempts=attempt,
                    claimed_by=self.worker_id,
                    lease_until=now + self.config.workers.lease_seconds,
                )
            )
            attempt_id = inserted_id(
                conn.execute(insert(t.delivery_attempts).values(delivery_fk=row.id, started_at=now))
            )
            files = conn.execute(
                select(t.job_outputs)
                .where(
                    t.job_outputs.c.job_fk == row.job_fk,
                    t.job_outputs.c.series_uid == row.series_uid,
                )
                .order_by(t.job_outputs.c.id)
            ).all()
        return DeliveryTask(
            delivery_id=row.id,
            attempt_id=int(attempt_id),
            job_id=row.job_fk,
            study_uid=row.study_uid,
            patient_id=row.patient_id,
            series_uid=row.series_uid,
            destination=row.destination,
            attempt=attempt,
            files=tuple(
                OutputInstance(
                    sop_uid=f.sop_uid,
                    series_uid=f.series_uid,
                    sop_class_uid=f.sop_class_uid,
                    transfer_syntax_uid=f.transfer_syntax_uid,
                    path=Path(f.path),
                )
                for f in files
            ),
        )

    def send(self, task: DeliveryTask) -> SendReport:
        destination = self.config.destinations.get(task.destination)
        self.audit.record(
            AuditEvent.BEGIN_TRANSFERRING,
            study_uid=task.study_uid,
            patient_id=task.patient_id,
            calling_ae=self.config.node.ae_title,
            called_ae=destination.ae_title if destination else None,
            peer_host=destination.host if destination else None,
            job_id=task.job_id,
            delivery_id=task.delivery_id,
            destination=task.destination,
            series_uid=task.series_uid,
            instances=len(task.files),
            attempt=task.attempt,
        )
        if destination is None:
            report = SendReport(error=f"destination {task.destination!r} is no longer configured")
        else:
            missing = [f.path for f in task.files if not f.path.exists()]
            if missing:
                report = SendReport(error=f"{len(missing)} output file(s) missing, first {missing[0]}")
            else:
                report = send_series(destination, task.files, calling_ae=self.config.node.ae_title)
        self.finish(task, report)
        return report

    def finish(self, task: DeliveryTask, report: SendReport) -> None:
        now = time.time()
        policy = self.config.outbox
        destination = self.config.destinations.get(task.destination)
        if report.ok:
            state, next_at = DeliveryState.DELIVERED, now
        elif report.retryable and task.attempt < policy.max_attempts:
            state, next_at = DeliveryState.PENDING, now + backoff_seconds(policy, task.attempt)
        else:
            state, next_at = DeliveryState.DEAD, now
        outcome = "delivered" if report.ok else ("retry" if state == DeliveryState.PENDING else "dead")
        job_moved: tuple[JobState, JobState, str | None] | None = None
        with self.db.write() as conn:
            conn.execute(
                update(t.delivery_attempts)
                .where(t.delivery_attempts.c.id == task.attempt_id)
                .values(
                    finished_at=now,
                    outcome=outcome,
                    detail=report.error,
                    instances_sent=report.sent,
                    instances_failed=len(report.failed),
                )
            )
            conn.execute(
                update(t.deliveries)
                .where(t.deliveries.c.id == task.delivery_id)
                .values(
                    state=state.value,
                    next_attempt_at=next_at,
                    last_error=report.error,
                    claimed_by=None,
                    lease_until=None,
                    delivered_at=now if report.ok else None,
                )
            )
            job_moved = self._settle_job(conn, task.job_id)
        self.audit.record(
            AuditEvent.DELIVERY_ATTEMPT if state != DeliveryState.DEAD else AuditEvent.DELIVERY_DEAD_LETTER,
            Outcome.SUCCESS
            if report.ok
            else (Outcome.MINOR_FAILURE if state == DeliveryState.PENDING else Outcome.SERIOUS_FAILURE),
            study_uid=task.study_uid,
            patient_id=task.patient_id,
            calling_ae=self.config.node.ae_title,
            called_ae=destination.ae_title if destination else None,
            peer_host=destination.host if destination else None,
            job_id=task.job_id,
            delivery_id=task.delivery_id,
            destination=task.destination,
            series_uid=task.series_uid,
            attempt=task.attempt,
            result=outcome,
            instances_sent=report.sent,
            instances_failed=len(report.failed),
            error=report.error,
            next_attempt_in=round(next_at - now, 1) if state == DeliveryState.PENDING else None,
        )
        if report.ok:
            self.audit.record(
                AuditEvent.INSTANCES_TRANSFERRED,
                study_uid=task.study_uid,
                patient_id=task.patient_id,
                calling_ae=self.config.node.ae_title,
                called_ae=destination.ae_title if destination else None,
                peer_host=destination.host if destination else None,
                direction="sent",
                job_id=task.job_id,
                series_uid=task.series_uid,
                sop_uids=[f.sop_uid for f in task.files],
            )
        level = logging.INFO if report.ok else logging.WARNING
        log.log(
            level,
            "delivery %d (job %d, series %s → %s) attempt %d: %s%s",
            task.delivery_id,
            task.job_id,
            task.series_uid,
            task.destination,
            task.attempt,
            outcome,
            f" — {report.error}" if report.error else "",
        )
        if job_moved:
            with self.db.read() as conn:
                audit_transition(self.audit, conn, task.job_id, job_moved[0], job_moved[1], job_moved[2])

    def _settle_job(self, conn: Connection, job_id: int) -> tuple[JobState, JobState, str | None] | None:
        """Move the job to delivered (all delivered) or failed (one dead), if due."""
        counts: dict[str, int] = dict(
            conn.execute(
                select(t.deliveries.c.state, func.count())
                .where(t.deliveries.c.job_fk == job_id)
                .group_by(t.deliveries.c.state)
            ).all()
        )
        total = sum(counts.values())
        target: JobState | None = None
        reason = None
        if total and counts.get(DeliveryState.DELIVERED.value, 0) == total:
            target = JobState.DELIVERED
        elif counts.get(DeliveryState.DEAD.value, 0):
            target = JobState.FAILED
            reason = f"{counts[DeliveryState.DEAD.value]} delivery(ies) dead-lettered"
        if target is None:
            return None
        try:
            transition(
                conn,
                job_id,
                target,
                expect=JobState.DELIVERING,
                reason=reason,
                actor=self.worker_id,
            )
        except StaleTransition:
            return None
        return JobState.DELIVERING, target, reason

    def recover(self, is_orphaned_claim: Callable[[str | None, float | None, float], bool]) -> int:
        """Deliveries left in ``sending`` by a lost worker go back to ``pending``."""
        now = time.time()
        recovered = 0
        with self.db.write() as conn:
            rows = conn.execute(
                select(t.deliveries.c.id, t.deliveries.c.claimed_by, t.deliveries.c.lease_until).where(
                    t.deliveries.c.state == DeliveryState.SENDING.value
                )
            ).all()
            for row in rows:
                if not is_orphaned_claim(row.claimed_by, row.lease_until, now):
                    continue
                conn.execute(
                    update(t.delivery_attempts)
                    .where(
                        and_(
                            t.delivery_attempts.c.delivery_fk == row.id,
                            t.delivery_attempts.c.finished_at.is_(None),
                        )
                    )
                    .values(finished_at=now, outcome="interrupted", detail="worker lost during send")
                )
                conn.execute(
                    update(t.deliveries)
                    .where(t.deliveries.c.id == row.id)
                    .values(
                        state=DeliveryState.PENDING.value,
                        next_attempt_at=now,
                        claimed_by=None,
                        lease_until=None,
                    )
                )
                recovered += 1
        return recovered

    def retry_dead(self, delivery_id: int, actor: str) -> None:
        """Operator action: give a dead-lettered delivery a fresh set of attempts."""
        with self.db.write() as conn:
            row = conn.execute(
                select(t.deliveries.c.state, t.deliveries.c.job_fk).where(t.deliveries.c.id == delivery_id)
            ).first()
            if row is None:
                raise KeyError(f"no delivery {delivery_id}")
            if row.state != DeliveryState.DEAD.value:
                raise ValueError(f"delivery {delivery_id} is {row.state}, not dead")
            conn.execute(
                update(t.deliveries)
                .where(t.deliveries.c.id == delivery_id)
                .values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=time.time())
            )
            job_state = conn.execute(select(t.jobs.c.state).where(t.jobs.c.id == row.job_fk)).scalar_one()
            if job_state == JobState.FAILED.value:
                transition(
                    conn,
                    row.job_fk,
                    JobState.DELIVERING,
                    expect=JobState.FAILED,
                    reason="delivery retried by operator",
                    actor=actor,
                )


def deliveries_by_job(db: Database) -> dict[int, list[dict[str, object]]]:
    out: dict[int, list[dict[str, object]]] = defaultdict(list)
    with db.read() as conn:
        for row in conn.execute(select(t.deliveries).order_by(t.deliveries.c.id)).mappings():
            out[row["job_fk"]].append(dict(row))
    return out
