"""The deliveries table: a delivery's states, its facts, and how an outcome is written.

Shared by the outbox (which sends) and storage commitment (which confirms): both move a
delivery from the state they found it in to the next one, close its attempt, and settle
the job when its last delivery is done (every one ``delivered``: the job is
``delivered``; one ``dead``: the job ``failed``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Select, func, select, update

from audit import AuditEvent, Outcome
from dicom_node.config import Destination, NodeConfig, OutboxSection
from dicom_node.db import schema as t
from dicom_node.db.audited import AuditedWrite
from dicom_node.jobs.state import JobRef, JobState, StaleTransition, move
from pipelines.base import OutputInstance

log = logging.getLogger(__name__)


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    #: Sent; waiting for the peer's storage commitment result.
    COMMITTING = "committing"
    DELIVERED = "delivered"
    DEAD = "dead"


#: What an attempt's outcome is called, by the state the delivery moves to.
OUTCOMES = {
    DeliveryState.DELIVERED: "delivered",
    DeliveryState.COMMITTING: "committing",
    DeliveryState.PENDING: "retry",
    DeliveryState.DEAD: "dead",
}


@dataclass(frozen=True)
class DeliveryTask:
    """One attempt at one delivery: the series, where it goes, and the job it belongs to."""

    delivery_id: int
    attempt_id: int
    job: JobRef
    series_uid: str
    destination: str
    attempt: int
    files: tuple[OutputInstance, ...]
    #: Whether the job's destinations were checked before its gate (every job settled by
    #: this version was; one made by an older node that was not never reaches a TPS).
    checked: bool = True

    @property
    def job_id(self) -> int:
        return self.job.job_id

    @property
    def study_uid(self) -> str:
        return self.job.study_uid

    @property
    def patient_id(self) -> str | None:
        return self.job.patient_id


def delivery_rows() -> Select[Any]:
    """Deliveries with the facts of their job (the one query both sides read them by)."""
    return (
        select(
            t.deliveries,
            t.jobs.c.pipeline,
            t.jobs.c.study_version,
            t.jobs.c.destination_problems,
            t.studies.c.study_uid,
            t.patients.c.patient_id,
        )
        .join(t.jobs, t.jobs.c.id == t.deliveries.c.job_fk)
        .join(t.studies, t.studies.c.id == t.jobs.c.study_fk)
        .join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
    )


def job_of(row: Any) -> JobRef:
    """The :class:`JobRef` of a :func:`delivery_rows` row."""
    return JobRef(row.job_fk, row.study_uid, row.patient_id, row.pipeline, row.study_version)


def backoff_seconds(policy: OutboxSection, attempts: int) -> float:
    """Delay before the next try after ``attempts`` failed tries (1-based)."""
    delay = policy.backoff_initial_seconds * policy.backoff_factor ** max(attempts - 1, 0)
    return float(min(delay, policy.backoff_max_seconds))


class DeliveryLedger:
    """Writes delivery outcomes, their audit records, and the job's settlement."""

    def __init__(self, config: NodeConfig, worker_id: str) -> None:
        self.config = config
        self.worker_id = worker_id

    def next_state(
        self, ok: bool, *, retryable: bool, attempt: int, now: float
    ) -> tuple[DeliveryState, float]:
        """Where an attempt leaves the delivery: delivered, retried after the backoff, or dead."""
        policy = self.config.outbox
        if ok:
            return DeliveryState.DELIVERED, now
        if retryable and attempt < policy.max_attempts:
            return DeliveryState.PENDING, now + backoff_seconds(policy, attempt)
        return DeliveryState.DEAD, now

    def task_of(self, conn: Connection, delivery_id: int, attempt_id: int | None) -> DeliveryTask:
        """A delivery's facts for the audit (no files: nothing is sent from here)."""
        row = conn.execute(delivery_rows().where(t.deliveries.c.id == delivery_id)).one()
        return DeliveryTask(
            delivery_id=row.id,
            attempt_id=attempt_id or 0,
            job=job_of(row),
            series_uid=row.series_uid,
            destination=row.destination,
            attempt=row.attempts,
            files=(),
        )

    def facts(self, task: DeliveryTask, destination: Destination | None) -> dict[str, Any]:
        """The facts every delivery audit record carries."""
        return {
            "study_uid": task.study_uid,
            "patient_id": task.patient_id,
            "calling_ae": self.config.node.ae_title,
            "called_ae": destination.ae_title if destination else None,
            "peer_host": destination.host if destination else None,
            "job_id": task.job_id,
            "delivery_id": task.delivery_id,
            "destination": task.destination,
            "series_uid": task.series_uid,
            "attempt": task.attempt,
        }

    def write_outcome(
        self,
        work: AuditedWrite,
        task: DeliveryTask,
        state: DeliveryState,
        next_at: float,
        error: str | None,
        now: float,
        *,
        from_state: str,
        counts: dict[str, int] | None = None,
        note: str | None = None,
        **attempt_values: Any,
    ) -> str | None:
        """:meth:`move_delivery`, then :meth:`record_outcome` if it moved.

        ``note``: what the attempt did besides its outcome (e.g. transcoding), added to
        the attempt's detail and to its audit record.
        """
        outcome = self.move_delivery(
            work, task, state, next_at, error, now, from_state=from_state, note=note, **attempt_values
        )
        if outcome is not None:
            self.record_outcome(work, task, state, next_at, outcome, error, now, counts=counts, note=note)
        return outcome

    def move_delivery(
        self,
        work: AuditedWrite,
        task: DeliveryTask,
        state: DeliveryState,
        next_at: float,
        error: str | None,
        now: float,
        *,
        from_state: str,
        note: str | None = None,
        **attempt_values: Any,
    ) -> str | None:
        """Move the delivery (if still ``from_state``) and close its attempt; returns the
        outcome's name (None: someone else moved it first). The attempt's detail is the
        error, then ``note``."""
        outcome = OUTCOMES[state]
        moved = work.conn.execute(
            update(t.deliveries)
            .where(t.deliveries.c.id == task.delivery_id, t.deliveries.c.state == from_state)
            .values(
                state=state.value,
                next_attempt_at=next_at,
                last_error=error,
                claimed_by=None,
                lease_until=None,
                delivered_at=now if state == DeliveryState.DELIVERED else None,
            )
        )
        if moved.rowcount != 1:
            return None
        if task.attempt_id:
            work.conn.execute(
                update(t.delivery_attempts)
                .where(t.delivery_attempts.c.id == task.attempt_id)
                .values(
                    outcome=outcome, detail="; ".join(filter(None, (error, note))) or None, **attempt_values
                )
            )
        return outcome

    def record_outcome(
        self,
        work: AuditedWrite,
        task: DeliveryTask,
        state: DeliveryState,
        next_at: float,
        outcome: str,
        error: str | None,
        now: float,
        *,
        counts: dict[str, int] | None = None,
        note: str | None = None,
    ) -> None:
        """Queue the attempt's audit record: ``delivery-attempt``, or ``delivery-dead-letter``."""
        work.record(
            AuditEvent.DELIVERY_ATTEMPT if state != DeliveryState.DEAD else AuditEvent.DELIVERY_DEAD_LETTER,
            Outcome.SUCCESS
            if state in (DeliveryState.DELIVERED, DeliveryState.COMMITTING)
            else (Outcome.MINOR_FAILURE if state == DeliveryState.PENDING else Outcome.SERIOUS_FAILURE),
            **self.facts(task, self.config.destinations.get(task.destination)),
            result=outcome,
            **(counts or {}),
            error=error,
            **({"note": note} if note else {}),
            next_attempt_in=round(next_at - now, 1)
            if state in (DeliveryState.PENDING, DeliveryState.COMMITTING)
            else None,
        )

    @staticmethod
    def log_outcome(task: DeliveryTask, state: DeliveryState, outcome: str, error: str | None) -> None:
        log.log(
            logging.INFO if state in (DeliveryState.DELIVERED, DeliveryState.COMMITTING) else logging.WARNING,
            "delivery %d (job %d, series %s → %s) attempt %d: %s%s",
            task.delivery_id,
            task.job_id,
            task.series_uid,
            task.destination,
            task.attempt,
            outcome,
            f" — {error}" if error else "",
        )

    def settle_job(self, work: AuditedWrite, job: JobRef) -> None:
        """Move the job to delivered (all delivered) or failed (one dead), if due."""
        counts: dict[str, int] = dict(
            work.conn.execute(
                select(t.deliveries.c.state, func.count())
                .where(t.deliveries.c.job_fk == job.job_id)
                .group_by(t.deliveries.c.state)
            ).all()
        )
        total = sum(counts.values())
        if total and counts.get(DeliveryState.DELIVERED.value, 0) == total:
            target, reason = JobState.DELIVERED, None
        elif counts.get(DeliveryState.DEAD.value, 0):
            target, reason = (
                JobState.FAILED,
                f"{counts[DeliveryState.DEAD.value]} delivery(ies) dead-lettered",
            )
        else:
            return
        try:
            move(work, job, target, expect=JobState.DELIVERING, reason=reason, actor=self.worker_id)
        except StaleTransition:
            pass  # settled already (another worker's last delivery)
