"""The outbox: one delivery per output series per destination, retried until confirmed.

Delivery states: ``pending → sending → delivered``, or back to ``pending`` with an
exponential backoff (capped) after a retryable failure, or ``dead`` (dead-letter) after
``max_attempts`` or a permanent failure. Every attempt is a row with its outcome. A job is
``delivered`` only when all of its deliveries are.

A ``tps`` destination's series is validated before anything is sent (:mod:`dicom_node.delivery.tps`);
one that fails is dead-lettered unsent with the reasons — retrying cannot change it. A
``tps`` destination is not sent the AI companions of an image series (Parametric Maps,
Segmentation, SR, Secondary Capture: :data:`NOT_FOR_TPS`): a planning system plans on
the image series; the companions stay with the job and go to the rule's other destinations.

Where the destination does storage commitment, a sent series goes ``sending → committing``
and is ``delivered`` only when the peer's N-EVENT-REPORT commits every instance. The
transaction (``storage_commitments``: Transaction UID, references, deadline) is written
before the N-ACTION leaves, so the report is matched by its Transaction UID whichever
process receives it — the worker on the sending association, or the receiver on a new
one — and even after a restart. Failed or missing instances send the series again (with
the backoff); no report by the deadline does too (the transaction is ``timed_out``, and
a report that still arrives while the retry waits completes the delivery).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom.uid import (
    ComprehensiveSRStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)
from sqlalchemy import Connection, and_, func, insert, select, update

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import Destination, NodeConfig, OutboxSection
from dicom_node.db import schema as t
from dicom_node.db.engine import Database, inserted_id
from dicom_node.delivery.sender import CommitmentRequest, SendReport, send_series
from dicom_node.delivery.tps import validate_for_tps, validate_input_series
from dicom_node.jobs.state import JobState, StaleTransition, audit_transition, transition
from dicom_node.net.commitment import CommitmentReport, ReportStatus
from pipelines.base import OutputInstance

log = logging.getLogger(__name__)


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    #: Sent; waiting for the peer's storage commitment result.
    COMMITTING = "committing"
    DELIVERED = "delivered"
    DEAD = "dead"


class CommitmentState(StrEnum):
    """A storage commitment transaction (one per attempt that reached the N-ACTION)."""

    REQUESTED = "requested"
    COMMITTED = "committed"
    #: The peer reported failures (or left instances out); the series is sent again.
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    #: The N-ACTION was refused or unanswered, or its worker was lost.
    CANCELLED = "cancelled"


#: Output SOP classes a ``tps`` destination is not sent (no delivery is queued): the maps,
#: suspect-region SEG, report and overlay that accompany an AI image series.
NOT_FOR_TPS = frozenset(
    {ParametricMapStorage, SegmentationStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage}
)


def tps_destinations(config: NodeConfig) -> frozenset[str]:
    """Names of the configured destinations with profile ``tps``."""
    return frozenset(name for name, d in config.destinations.items() if d.profile == "tps")


#: How long the sending association stays open after the N-ACTION for a report on it.
COMMITMENT_LINGER_SECONDS = 2.0


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


def queue_deliveries(
    conn: Connection, job_id: int, destinations: list[str], *, tps: Collection[str] = ()
) -> int:
    """One pending delivery per recorded output series per destination (idempotent).

    A destination named in ``tps`` (profile ``tps``, see :func:`tps_destinations`) gets
    no delivery for a series of the :data:`NOT_FOR_TPS` classes.
    """
    now = time.time()
    classes: dict[str, set[str]] = defaultdict(set)
    for series_uid, sop_class in conn.execute(
        select(t.job_outputs.c.series_uid, t.job_outputs.c.sop_class_uid).where(
            t.job_outputs.c.job_fk == job_id
        )
    ).all():
        classes[series_uid].add(sop_class)
    series_uids = sorted(classes)
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
        if (s, d) not in existing and not (d in tps and classes[s] <= NOT_FOR_TPS)
    ]
    if rows:
        conn.execute(insert(t.deliveries), rows)
    return len(rows)


def delivery_count(conn: Connection, job_id: int) -> int:
    """How many deliveries the job has, in any state."""
    return int(
        conn.execute(
            select(func.count()).select_from(t.deliveries).where(t.deliveries.c.job_fk == job_id)
        ).scalar_one()
    )


def nothing_to_send(destinations: Collection[str], tps: Collection[str]) -> str:
    """Why a released job with outputs got no delivery at all (said to the operator)."""
    why = f"nothing to deliver: none of the job's output series is accepted by {', '.join(destinations)}"
    if set(destinations) <= set(tps):
        why += " (a TPS is sent image series only, not maps, SEG, SR or overlays)"
    return why


def create_deliveries(
    conn: Connection,
    job_id: int,
    outputs: tuple[OutputInstance, ...],
    destinations: list[str],
    *,
    tps: Collection[str] = (),
) -> int:
    """Record the job's outputs and queue one delivery per series per destination."""
    record_outputs(conn, job_id, outputs)
    return queue_deliveries(conn, job_id, destinations, tps=tps)


class Outbox:
    """Claims due deliveries, sends them, and records every attempt."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        audit: AuditTrail,
        worker_id: str,
        *,
        data_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.audit = audit
        self.worker_id = worker_id
        #: Where received instances live (``NodePaths.data``): lets a ``tps`` delivery check
        #: the job's source MR series as well. None: only the series being sent is checked.
        self.data_dir = data_dir

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
        if (
            destination is not None
            and destination.profile == "tps"
            and all(f.path.exists() for f in task.files)
        ):
            problems = self.tps_problems(task)
            if problems:
                return self._refuse(task, destination, problems)
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
        commitment = None
        if destination is None:
            report = SendReport(error=f"destination {task.destination!r} is no longer configured")
        else:
            missing = [f.path for f in task.files if not f.path.exists()]
            if missing:
                report = SendReport(error=f"{len(missing)} output file(s) missing, first {missing[0]}")
            else:
                if destination.storage_commitment:
                    commitment = self._commitment_request(task, destination)
                report = send_series(
                    destination, task.files, calling_ae=self.config.node.ae_title, commitment=commitment
                )
        self.finish(task, report, transaction_uid=commitment.transaction_uid if commitment else None)
        return report

    # -- TPS validation ---------------------------------------------------------------

    def tps_problems(self, task: DeliveryTask) -> list[str]:
        """Why the series must not go to a TPS: its own checks, and its source MR's."""
        with self.db.read() as conn:
            selected = conn.execute(select(t.jobs.c.series_uid).where(t.jobs.c.id == task.job_id)).scalar()
            inputs = conn.execute(
                select(
                    t.series.c.series_uid,
                    t.series.c.modality,
                    t.series.c.frame_of_reference_uid,
                    t.instances.c.path,
                )
                .join(t.instances, t.instances.c.series_fk == t.series.c.id)
                .join(t.job_inputs, t.job_inputs.c.instance_fk == t.instances.c.id)
                .where(t.job_inputs.c.job_fk == task.job_id)
                .order_by(t.instances.c.id)
            ).all()
        if selected:
            inputs = [r for r in inputs if r.series_uid == selected]
        frames = {r.frame_of_reference_uid for r in inputs if r.frame_of_reference_uid}
        mr_frames = {
            r.frame_of_reference_uid for r in inputs if r.modality == "MR" and r.frame_of_reference_uid
        }
        # The planning MR's frame of reference (the only input frame, or the only MR one).
        expected = next(iter(frames)) if len(frames) == 1 else None
        if expected is None and len(mr_frames) == 1:
            expected = next(iter(mr_frames))
        problems: list[str] = []
        if self.data_dir is not None:
            sources: dict[str, list[Path]] = {}
            for r in inputs:
                if r.modality == "MR":
                    sources.setdefault(r.series_uid, []).append(self.data_dir / r.path)
            for series_uid, paths in sources.items():
                problems += validate_input_series(paths, what=f"the source MR series {series_uid}")
        problems += validate_for_tps([f.path for f in task.files], expected)
        return problems

    def _refuse(self, task: DeliveryTask, destination: Destination, problems: list[str]) -> SendReport:
        """Nothing is sent: dead-letter at once (the series will not get better by waiting)."""
        log.warning(
            "delivery %d (series %s → %s) refused before sending: %s",
            task.delivery_id,
            task.series_uid,
            task.destination,
            "; ".join(problems),
        )
        self.audit.record(
            AuditEvent.DELIVERY_REFUSED,
            Outcome.SERIOUS_FAILURE,
            study_uid=task.study_uid,
            patient_id=task.patient_id,
            calling_ae=self.config.node.ae_title,
            called_ae=destination.ae_title,
            peer_host=destination.host,
            job_id=task.job_id,
            delivery_id=task.delivery_id,
            destination=task.destination,
            series_uid=task.series_uid,
            instances=len(task.files),
            profile=destination.profile,
            problems=problems,
        )
        report = SendReport(error=f"refused before sending to a TPS: {'; '.join(problems)}")
        self.finish(task, report)
        return report

    # -- storage commitment -----------------------------------------------------------

    def _commitment_request(self, task: DeliveryTask, destination: Destination) -> CommitmentRequest:
        # UUID-derived (2.25.…): unique without a registered root, and accepted everywhere.
        transaction_uid = str(generate_uid(prefix=None))

        def on_report(report: CommitmentReport) -> int:
            return self.record_commitment_report(
                report, reported_by=destination.ae_title, peer_host=destination.host, via="same-association"
            )

        return CommitmentRequest(
            transaction_uid=transaction_uid,
            on_report=on_report,
            before_request=lambda: self._open_commitment(task, destination, transaction_uid),
            settled=lambda: self._commitment_settled(transaction_uid),
            linger_seconds=min(COMMITMENT_LINGER_SECONDS, destination.commitment_timeout_seconds),
        )

    def _open_commitment(self, task: DeliveryTask, destination: Destination, transaction_uid: str) -> None:
        """Record the transaction before the N-ACTION leaves (the answer may come at once)."""
        with self.db.write() as conn:
            conn.execute(
                insert(t.storage_commitments).values(
                    delivery_fk=task.delivery_id,
                    attempt_fk=task.attempt_id,
                    transaction_uid=transaction_uid,
                    state=CommitmentState.REQUESTED.value,
                    references=[[f.sop_class_uid, f.sop_uid] for f in task.files],
                    requested_at=time.time(),
                )
            )
        self.audit.record(
            AuditEvent.STORAGE_COMMITMENT_REQUESTED,
            **self._facts(task, destination),
            transaction_uid=transaction_uid,
            instances=len(task.files),
        )

    def _commitment_settled(self, transaction_uid: str) -> bool:
        with self.db.read() as conn:
            state = conn.execute(
                select(t.storage_commitments.c.state).where(
                    t.storage_commitments.c.transaction_uid == transaction_uid
                )
            ).scalar()
        return state in (CommitmentState.COMMITTED.value, CommitmentState.FAILED.value)

    def record_commitment_report(
        self, report: CommitmentReport, *, reported_by: str, peer_host: str | None, via: str
    ) -> int:
        """Record a storage commitment result and move its delivery on; returns the status
        to answer the N-EVENT-REPORT with.

        The result is matched by Transaction UID and must come from the AE the series was
        sent to. A delivery still ``sending`` (the report overtook the N-ACTION response)
        is settled by :meth:`finish`; one ``committing`` is settled here; one ``pending``
        after a timeout is completed by a late success.
        """
        now = time.time()
        # On a report, the peer is the calling AE and this node the called one.
        reporter = {
            "calling_ae": reported_by,
            "called_ae": self.config.node.ae_title,
            "peer_host": peer_host,
            "via": via,
        }
        requested = 0
        with self.db.write() as conn:
            row = conn.execute(
                select(
                    t.storage_commitments,
                    t.deliveries.c.state.label("delivery_state"),
                    t.deliveries.c.destination,
                    t.deliveries.c.attempts,
                )
                .join(t.deliveries, t.deliveries.c.id == t.storage_commitments.c.delivery_fk)
                .where(t.storage_commitments.c.transaction_uid == report.transaction_uid)
            ).first()
            destination = self.config.destinations.get(row.destination) if row is not None else None
            refusal = None
            if row is None:
                refusal = "no delivery waits for this transaction UID"
            elif destination is not None and reported_by != destination.ae_title:
                refusal = f"reported by {reported_by}, not by {destination.ae_title} the series was sent to"
            elif row.state in (CommitmentState.COMMITTED.value, CommitmentState.FAILED.value):
                refusal = f"already recorded as {row.state}"
            if refusal is not None:
                task = self._task_of(conn, row.delivery_fk, row.attempt_fk) if row is not None else None
            else:
                assert row is not None
                task = self._task_of(conn, row.delivery_fk, row.attempt_fk)
                requested = len(row.references)
                result = _evaluate(report, [tuple(r) for r in row.references], task.destination)
                conn.execute(
                    update(t.storage_commitments)
                    .where(t.storage_commitments.c.id == row.id)
                    .values(
                        state=result.state.value,
                        reported_at=now,
                        reported_by=reported_by,
                        reported_via=via,
                        committed=result.committed,
                        failed=len(result.failures),
                        failures=result.failures or None,
                        detail=result.detail,
                    )
                )
                latest = conn.execute(
                    select(func.max(t.storage_commitments.c.id)).where(
                        t.storage_commitments.c.delivery_fk == row.delivery_fk
                    )
                ).scalar()
                moved: tuple[DeliveryState, float, str] | None = None
                job_moved = None
                ok = result.state == CommitmentState.COMMITTED
                if row.id == latest and (
                    row.delivery_state == DeliveryState.COMMITTING.value
                    or (row.delivery_state == DeliveryState.PENDING.value and ok)
                ):
                    state, next_at = self._next_state(ok, retryable=True, attempt=row.attempts, now=now)
                    outcome = self._write_outcome(
                        conn, task, state, next_at, result.detail, now, from_state=row.delivery_state
                    )
                    if outcome is not None:
                        moved = (state, next_at, outcome)
                        job_moved = self._settle_job(conn, task.job_id)
        if refusal is not None:
            log.warning(
                "storage commitment report %s from %s ignored: %s",
                report.transaction_uid,
                reported_by,
                refusal,
            )
            duplicate = row is not None and refusal.startswith("already recorded")
            facts: dict[str, Any] = self._facts(task, destination) if task is not None else {}
            self.audit.record(
                AuditEvent.STORAGE_COMMITMENT_RESULT,
                Outcome.MINOR_FAILURE,
                **{**facts, **reporter},
                transaction_uid=report.transaction_uid,
                result="ignored",
                reason=refusal,
            )
            return ReportStatus.SUCCESS if duplicate else ReportStatus.PROCESSING_FAILURE
        assert task is not None
        self.audit.record(
            AuditEvent.STORAGE_COMMITMENT_RESULT,
            Outcome.SUCCESS if result.state == CommitmentState.COMMITTED else Outcome.MINOR_FAILURE,
            **{**self._facts(task, destination), **reporter},
            transaction_uid=report.transaction_uid,
            result=result.state.value,
            event_type=report.event_type,
            instances=requested,
            committed=result.committed,
            failed=len(result.failures),
            failures=result.failures[:10],
        )
        log.info(
            "storage commitment %s for delivery %d (%s via %s): %s",
            report.transaction_uid,
            task.delivery_id,
            reported_by,
            via,
            result.detail or "every instance committed",
        )
        if moved is not None:
            self._audit_outcome(task, destination, moved[0], moved[1], moved[2], result.detail, now)
        if job_moved:
            with self.db.read() as conn:
                audit_transition(self.audit, conn, task.job_id, job_moved[0], job_moved[1], job_moved[2])
        return ReportStatus.SUCCESS

    def expire_commitments(self) -> int:
        """Deliveries whose commitment result is overdue are sent again (or dead-lettered)."""
        now = time.time()
        with self.db.read() as conn:
            due = (
                conn.execute(
                    select(t.deliveries.c.id).where(
                        t.deliveries.c.state == DeliveryState.COMMITTING.value,
                        t.deliveries.c.next_attempt_at <= now,
                    )
                )
                .scalars()
                .all()
            )
        if not due:
            return 0
        expired: list[tuple[DeliveryTask, str, DeliveryState, float, str, str, Any]] = []
        with self.db.write() as conn:
            for delivery_id in due:
                row = conn.execute(
                    select(t.deliveries.c.attempts, t.deliveries.c.destination).where(
                        t.deliveries.c.id == delivery_id,
                        t.deliveries.c.state == DeliveryState.COMMITTING.value,
                        t.deliveries.c.next_attempt_at <= now,
                    )
                ).first()
                if row is None:
                    continue  # the report came, or another worker took it
                commitment = conn.execute(
                    select(t.storage_commitments)
                    .where(t.storage_commitments.c.delivery_fk == delivery_id)
                    .order_by(t.storage_commitments.c.id.desc())
                    .limit(1)
                ).first()
                destination = self.config.destinations.get(row.destination)
                txn = commitment.transaction_uid if commitment is not None else "?"
                waited = f"{now - commitment.requested_at:.0f} s" if commitment is not None else "too long"
                peer = destination.ae_title if destination else row.destination
                error = f"no storage commitment result from {peer} after {waited} (transaction {txn})"
                if commitment is not None:
                    conn.execute(
                        update(t.storage_commitments)
                        .where(
                            t.storage_commitments.c.id == commitment.id,
                            t.storage_commitments.c.state == CommitmentState.REQUESTED.value,
                        )
                        .values(state=CommitmentState.TIMED_OUT.value, detail=error)
                    )
                task = self._task_of(conn, delivery_id, commitment.attempt_fk if commitment else None)
                state, next_at = self._next_state(False, retryable=True, attempt=row.attempts, now=now)
                outcome = self._write_outcome(
                    conn, task, state, next_at, error, now, from_state=DeliveryState.COMMITTING.value
                )
                if outcome is None:
                    continue
                expired.append(
                    (task, txn, state, next_at, outcome, error, self._settle_job(conn, task.job_id))
                )
        for task, txn, state, next_at, outcome, error, job_moved in expired:
            destination = self.config.destinations.get(task.destination)
            log.warning("delivery %d: storage commitment %s timed out", task.delivery_id, txn)
            self.audit.record(
                AuditEvent.STORAGE_COMMITMENT_TIMEOUT,
                Outcome.MINOR_FAILURE,
                **self._facts(task, destination),
                transaction_uid=txn,
                timeout_seconds=destination.commitment_timeout_seconds if destination else None,
            )
            self._audit_outcome(task, destination, state, next_at, outcome, error, now)
            if job_moved:
                with self.db.read() as conn:
                    audit_transition(self.audit, conn, task.job_id, job_moved[0], job_moved[1], job_moved[2])
        return len(expired)

    # -- outcomes -----------------------------------------------------------------------

    def _next_state(
        self, ok: bool, *, retryable: bool, attempt: int, now: float
    ) -> tuple[DeliveryState, float]:
        policy = self.config.outbox
        if ok:
            return DeliveryState.DELIVERED, now
        if retryable and attempt < policy.max_attempts:
            return DeliveryState.PENDING, now + backoff_seconds(policy, attempt)
        return DeliveryState.DEAD, now

    def _write_outcome(
        self,
        conn: Connection,
        task: DeliveryTask,
        state: DeliveryState,
        next_at: float,
        error: str | None,
        now: float,
        *,
        from_state: str,
        **attempt_values: Any,
    ) -> str | None:
        """Move the delivery (if still ``from_state``) and close its attempt; the outcome name."""
        outcome = {
            DeliveryState.DELIVERED: "delivered",
            DeliveryState.COMMITTING: "committing",
            DeliveryState.PENDING: "retry",
            DeliveryState.DEAD: "dead",
        }[state]
        moved = conn.execute(
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
            values: dict[str, Any] = {"outcome": outcome, "detail": error, **attempt_values}
            conn.execute(
                update(t.delivery_attempts)
                .where(t.delivery_attempts.c.id == task.attempt_id)
                .values(**values)
            )
        return outcome

    def _task_of(self, conn: Connection, delivery_id: int, attempt_id: int | None) -> DeliveryTask:
        """A delivery's facts for the audit (no files: nothing is sent from here)."""
        row = conn.execute(
            select(t.deliveries, t.studies.c.study_uid, t.patients.c.patient_id)
            .join(t.jobs, t.jobs.c.id == t.deliveries.c.job_fk)
            .join(t.studies, t.studies.c.id == t.jobs.c.study_fk)
            .join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
            .where(t.deliveries.c.id == delivery_id)
        ).one()
        return DeliveryTask(
            delivery_id=row.id,
            attempt_id=attempt_id or 0,
            job_id=row.job_fk,
            study_uid=row.study_uid,
            patient_id=row.patient_id,
            series_uid=row.series_uid,
            destination=row.destination,
            attempt=row.attempts,
            files=(),
        )

    def _facts(self, task: DeliveryTask, destination: Destination | None) -> dict[str, Any]:
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

    def finish(self, task: DeliveryTask, report: SendReport, *, transaction_uid: str | None = None) -> None:
        now = time.time()
        destination = self.config.destinations.get(task.destination)
        ok, retryable, error = report.ok, report.retryable, report.error
        committing = False
        with self.db.write() as conn:
            if transaction_uid is not None and report.ok and report.commitment_requested:
                commitment = conn.execute(
                    select(t.storage_commitments.c.state, t.storage_commitments.c.detail).where(
                        t.storage_commitments.c.transaction_uid == transaction_uid
                    )
                ).one()
                if commitment.state == CommitmentState.FAILED.value:
                    ok, retryable, error = False, True, commitment.detail
                elif commitment.state != CommitmentState.COMMITTED.value:
                    committing = True
                    timeout = destination.commitment_timeout_seconds if destination else 0.0
                    conn.execute(
                        update(t.storage_commitments)
                        .where(t.storage_commitments.c.transaction_uid == transaction_uid)
                        .values(deadline=now + timeout)
                    )
            elif transaction_uid is not None:
                conn.execute(
                    update(t.storage_commitments)
                    .where(
                        t.storage_commitments.c.transaction_uid == transaction_uid,
                        t.storage_commitments.c.state == CommitmentState.REQUESTED.value,
                    )
                    .values(state=CommitmentState.CANCELLED.value, detail=report.error)
                )
            if committing:
                timeout = destination.commitment_timeout_seconds if destination else 0.0
                state, next_at = DeliveryState.COMMITTING, now + timeout
            else:
                state, next_at = self._next_state(ok, retryable=retryable, attempt=task.attempt, now=now)
            outcome = self._write_outcome(
                conn,
                task,
                state,
                next_at,
                error,
                now,
                from_state=DeliveryState.SENDING.value,
                finished_at=now,
                instances_sent=report.sent,
                instances_failed=len(report.failed),
            )
            job_moved = self._settle_job(conn, task.job_id) if outcome is not None else None
        if outcome is None:
            log.warning(
                "delivery %d was taken over while sending; its result is not recorded", task.delivery_id
            )
            return
        self._audit_outcome(task, destination, state, next_at, outcome, error, now, report=report)
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
        if job_moved:
            with self.db.read() as conn:
                audit_transition(self.audit, conn, task.job_id, job_moved[0], job_moved[1], job_moved[2])

    def _audit_outcome(
        self,
        task: DeliveryTask,
        destination: Destination | None,
        state: DeliveryState,
        next_at: float,
        outcome: str,
        error: str | None,
        now: float,
        *,
        report: SendReport | None = None,
    ) -> None:
        counts: dict[str, Any] = {}
        if report is not None:
            counts = {"instances_sent": report.sent, "instances_failed": len(report.failed)}
        self.audit.record(
            AuditEvent.DELIVERY_ATTEMPT if state != DeliveryState.DEAD else AuditEvent.DELIVERY_DEAD_LETTER,
            Outcome.SUCCESS
            if state in (DeliveryState.DELIVERED, DeliveryState.COMMITTING)
            else (Outcome.MINOR_FAILURE if state == DeliveryState.PENDING else Outcome.SERIOUS_FAILURE),
            **self._facts(task, destination),
            result=outcome,
            **counts,
            error=error,
            next_attempt_in=round(next_at - now, 1)
            if state in (DeliveryState.PENDING, DeliveryState.COMMITTING)
            else None,
        )
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
        """Deliveries left in ``sending`` by a lost worker go back to ``pending``.

        A transaction that worker opened is cancelled (a late report of it is still
        recorded, and completes the delivery if it commits everything). ``committing``
        deliveries are left alone: their report or their deadline settles them.
        """
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
                    update(t.storage_commitments)
                    .where(
                        t.storage_commitments.c.delivery_fk == row.id,
                        t.storage_commitments.c.state == CommitmentState.REQUESTED.value,
                    )
                    .values(state=CommitmentState.CANCELLED.value, detail="worker lost during send")
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


@dataclass(frozen=True)
class _Evaluation:
    state: CommitmentState
    committed: int
    #: [{"sop_uid", "sop_class_uid", "reason"}]: failed, or left out of the report.
    failures: list[dict[str, Any]]
    detail: str | None


def _evaluate(report: CommitmentReport, references: list[tuple[str, ...]], destination: str) -> _Evaluation:
    """Committed only when every requested instance is in the report's committed list."""
    requested = {uid: sop_class for sop_class, uid in references}
    committed = {uid for _, uid in report.committed if uid in requested}
    failures: list[dict[str, Any]] = [
        {"sop_uid": f.sop_uid, "sop_class_uid": f.sop_class_uid, "reason": f.reason_text}
        for f in report.failed
        if f.sop_uid in requested and f.sop_uid not in committed
    ]
    reported = committed | {f["sop_uid"] for f in failures}
    failures += [
        {"sop_uid": uid, "sop_class_uid": sop_class, "reason": "left out of the report"}
        for uid, sop_class in requested.items()
        if uid not in reported
    ]
    if not failures:
        return _Evaluation(CommitmentState.COMMITTED, len(committed), [], None)
    reasons = Counter(str(f["reason"]) for f in failures)
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
    detail = f"{destination} did not commit {len(failures)} of {len(requested)} instance(s): {why}"
    return _Evaluation(CommitmentState.FAILED, len(committed), failures, detail)


def deliveries_by_job(db: Database) -> dict[int, list[dict[str, object]]]:
    out: dict[int, list[dict[str, object]]] = defaultdict(list)
    with db.read() as conn:
        for row in conn.execute(select(t.deliveries).order_by(t.deliveries.c.id)).mappings():
            out[row["job_fk"]].append(dict(row))
    return out
