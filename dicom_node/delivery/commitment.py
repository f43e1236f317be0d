"""Storage commitment: the transactions that confirm a sent series, and their results.

Where the destination does storage commitment, a sent series goes ``sending →
committing`` and is ``delivered`` only when the peer's N-EVENT-REPORT commits every
instance. The transaction (``storage_commitments``: Transaction UID, references, deadline)
is written before the N-ACTION leaves, so the report is matched by its Transaction UID
whichever process receives it — the worker on the sending association, or the receiver on
a new one — and even after a restart. Failed or missing instances send the series again
(with the backoff); no report by the deadline does too (the transaction is
``timed_out``, and a report that still arrives while the retry waits completes the
delivery). The protocol itself (N-ACTION / N-EVENT-REPORT data sets) is
:mod:`dicom_node.net.commitment`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import func, insert, select, update

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import Destination, NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.audited import AuditedWrite, audited_write
from dicom_node.db.engine import Database
from dicom_node.delivery.ledger import DeliveryLedger, DeliveryState, DeliveryTask
from dicom_node.delivery.sender import CommitmentRequest, SendReport
from dicom_node.net.commitment import EVENT_FAILURES_EXIST, CommitmentReport, ReportStatus

log = logging.getLogger(__name__)

#: How long the sending association stays open after the N-ACTION for a report on it.
COMMITMENT_LINGER_SECONDS = 2.0


class CommitmentState(StrEnum):
    """A storage commitment transaction (one per attempt that reached the N-ACTION)."""

    REQUESTED = "requested"
    COMMITTED = "committed"
    #: The peer reported failures (or left instances out); the series is sent again.
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    #: The N-ACTION was refused or unanswered, or its worker was lost.
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SentOutcome:
    """How a send that asked for commitment stands once the association is closed."""

    ok: bool
    retryable: bool
    error: str | None
    #: Sent and accepted, the result not in yet: wait for it (until the deadline).
    committing: bool = False


@dataclass(frozen=True)
class _Evaluation:
    state: CommitmentState
    committed: int
    #: [{"sop_uid", "sop_class_uid", "reason"}]: failed, or left out of the report.
    failures: list[dict[str, Any]]
    detail: str | None


def _evaluate(report: CommitmentReport, references: list[tuple[str, ...]], destination: str) -> _Evaluation:
    """Committed only when every requested instance is in the report's committed list and
    none is in its Failed SOP Sequence (an instance in both is failed). A report of event
    type 2 (failures exist) that names no failure is contradictory: failed too."""
    requested = {uid: sop_class for sop_class, uid in references}
    failures: list[dict[str, Any]] = []
    for f in report.failed:
        if f.sop_uid in requested and f.sop_uid not in {x["sop_uid"] for x in failures}:
            failures.append({"sop_uid": f.sop_uid, "sop_class_uid": f.sop_class_uid, "reason": f.reason_text})
    failed_uids = {x["sop_uid"] for x in failures}
    committed = {uid for _, uid in report.committed if uid in requested and uid not in failed_uids}
    reported = committed | {f["sop_uid"] for f in failures}
    failures += [
        {"sop_uid": uid, "sop_class_uid": sop_class, "reason": "left out of the report"}
        for uid, sop_class in requested.items()
        if uid not in reported
    ]
    if not failures and report.event_type == EVENT_FAILURES_EXIST:
        detail = (
            f"{destination} sent a contradictory storage commitment report: event type 2 "
            f"(failures exist) but no failed instance among the {len(requested)} requested"
        )
        return _Evaluation(CommitmentState.FAILED, len(committed), [], detail)
    if not failures:
        return _Evaluation(CommitmentState.COMMITTED, len(committed), [], None)
    reasons = Counter(str(f["reason"]) for f in failures)
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
    detail = f"{destination} did not commit {len(failures)} of {len(requested)} instance(s): {why}"
    return _Evaluation(CommitmentState.FAILED, len(committed), failures, detail)


class StorageCommitments:
    """Opens commitment transactions, records their results, and expires overdue ones."""

    def __init__(self, config: NodeConfig, db: Database, audit: AuditTrail, ledger: DeliveryLedger) -> None:
        self.config = config
        self.db = db
        self.audit = audit
        self.ledger = ledger

    # -- asking -------------------------------------------------------------------------

    def request(self, task: DeliveryTask, destination: Destination) -> CommitmentRequest:
        """What the sender needs to ask ``destination`` to commit to the series of ``task``."""
        # UUID-derived (2.25.…): unique without a registered root, and accepted everywhere.
        transaction_uid = str(generate_uid(prefix=None))

        def on_report(report: CommitmentReport) -> int:
            return self.record_report(
                report, reported_by=destination.ae_title, peer_host=destination.host, via="same-association"
            )

        return CommitmentRequest(
            transaction_uid=transaction_uid,
            on_report=on_report,
            before_request=lambda: self._open(task, destination, transaction_uid),
            settled=lambda: self._settled(transaction_uid),
            linger_seconds=min(COMMITMENT_LINGER_SECONDS, destination.commitment_timeout_seconds),
            on_unusable=lambda why: self.record_unusable(task, destination, transaction_uid, why),
        )

    def record_unusable(
        self, task: DeliveryTask, destination: Destination, transaction_uid: str, why: str
    ) -> None:
        """Audit a report on the sending association that is not a usable result (the send
        then fails with ``why``)."""
        self.audit.record(
            AuditEvent.STORAGE_COMMITMENT_RESULT,
            Outcome.MINOR_FAILURE,
            **{
                **self.ledger.facts(task, destination),
                # on a report, the peer is the calling AE and this node the called one
                "calling_ae": destination.ae_title,
                "called_ae": self.config.node.ae_title,
                "peer_host": destination.host,
            },
            via="same-association",
            transaction_uid=transaction_uid,
            result="ignored",
            reason=why,
        )

    def _open(self, task: DeliveryTask, destination: Destination, transaction_uid: str) -> None:
        """Record the transaction before the N-ACTION leaves (the answer may come at once)."""
        with audited_write(self.db, self.audit) as work:
            work.conn.execute(
                insert(t.storage_commitments).values(
                    delivery_fk=task.delivery_id,
                    attempt_fk=task.attempt_id,
                    transaction_uid=transaction_uid,
                    state=CommitmentState.REQUESTED.value,
                    references=[[f.sop_class_uid, f.sop_uid] for f in task.files],
                    requested_at=time.time(),
                )
            )
            work.record(
                AuditEvent.STORAGE_COMMITMENT_REQUESTED,
                **self.ledger.facts(task, destination),
                transaction_uid=transaction_uid,
                instances=len(task.files),
            )

    def _settled(self, transaction_uid: str) -> bool:
        with self.db.read() as conn:
            state = conn.execute(
                select(t.storage_commitments.c.state).where(
                    t.storage_commitments.c.transaction_uid == transaction_uid
                )
            ).scalar()
        return state in (CommitmentState.COMMITTED.value, CommitmentState.FAILED.value)

    def after_send(
        self,
        conn: Any,
        transaction_uid: str,
        report: SendReport,
        destination: Destination | None,
        now: float,
    ) -> SentOutcome:
        """Where a send that opened ``transaction_uid`` stands (in the caller's transaction).

        Sent and committed already: delivered. Sent and reported failed: sent again.
        Sent, no result yet: committing until the deadline. Not sent (or the N-ACTION
        failed): the transaction is cancelled and the send's own outcome stands.
        """
        if report.ok and report.commitment_requested:
            commitment = conn.execute(
                select(t.storage_commitments.c.state, t.storage_commitments.c.detail).where(
                    t.storage_commitments.c.transaction_uid == transaction_uid
                )
            ).one()
            if commitment.state == CommitmentState.FAILED.value:
                return SentOutcome(False, True, commitment.detail)
            if commitment.state != CommitmentState.COMMITTED.value:
                timeout = destination.commitment_timeout_seconds if destination else 0.0
                conn.execute(
                    update(t.storage_commitments)
                    .where(t.storage_commitments.c.transaction_uid == transaction_uid)
                    .values(deadline=now + timeout)
                )
                return SentOutcome(True, report.retryable, report.error, committing=True)
            return SentOutcome(report.ok, report.retryable, report.error)
        conn.execute(
            update(t.storage_commitments)
            .where(
                t.storage_commitments.c.transaction_uid == transaction_uid,
                t.storage_commitments.c.state == CommitmentState.REQUESTED.value,
            )
            .values(state=CommitmentState.CANCELLED.value, detail=report.error)
        )
        return SentOutcome(report.ok, report.retryable, report.error)

    # -- results ------------------------------------------------------------------------

    def record_report(
        self, report: CommitmentReport, *, reported_by: str, peer_host: str | None, via: str
    ) -> int:
        """Record a storage commitment result and move its delivery on; returns the status
        to answer the N-EVENT-REPORT with.

        The result is matched by Transaction UID and must come from the AE the series was
        sent to. A delivery still ``sending`` (the report overtook the N-ACTION response)
        is settled by the outbox when the send returns; one ``committing`` is settled
        here; one ``pending`` after a timeout is completed by a late success.
        """
        now = time.time()
        # On a report, the peer is the calling AE and this node the called one.
        reporter = {
            "calling_ae": reported_by,
            "called_ae": self.config.node.ae_title,
            "peer_host": peer_host,
            "via": via,
        }
        with audited_write(self.db, self.audit) as work:
            row = work.conn.execute(
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
            task = (
                self.ledger.task_of(work.conn, row.delivery_fk, row.attempt_fk) if row is not None else None
            )
            refusal = None
            if row is None:
                refusal = "no delivery waits for this transaction UID"
            elif destination is not None and reported_by != destination.ae_title:
                refusal = f"reported by {reported_by}, not by {destination.ae_title} the series was sent to"
            elif row.state in (CommitmentState.COMMITTED.value, CommitmentState.FAILED.value):
                refusal = f"already recorded as {row.state}"
            if refusal is not None:
                log.warning(
                    "storage commitment report %s from %s ignored: %s",
                    report.transaction_uid,
                    reported_by,
                    refusal,
                )
                facts: dict[str, Any] = self.ledger.facts(task, destination) if task is not None else {}
                work.record(
                    AuditEvent.STORAGE_COMMITMENT_RESULT,
                    Outcome.MINOR_FAILURE,
                    **{**facts, **reporter},
                    transaction_uid=report.transaction_uid,
                    result="ignored",
                    reason=refusal,
                )
                duplicate = row is not None and refusal.startswith("already recorded")
                return ReportStatus.SUCCESS if duplicate else ReportStatus.PROCESSING_FAILURE
            assert row is not None and task is not None
            result = _evaluate(report, [tuple(r) for r in row.references], task.destination)
            work.conn.execute(
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
            work.record(
                AuditEvent.STORAGE_COMMITMENT_RESULT,
                Outcome.SUCCESS if result.state == CommitmentState.COMMITTED else Outcome.MINOR_FAILURE,
                **{**self.ledger.facts(task, destination), **reporter},
                transaction_uid=report.transaction_uid,
                result=result.state.value,
                event_type=report.event_type,
                instances=len(row.references),
                committed=result.committed,
                failed=len(result.failures),
                failures=result.failures[:10],
            )
            latest = work.conn.execute(
                select(func.max(t.storage_commitments.c.id)).where(
                    t.storage_commitments.c.delivery_fk == row.delivery_fk
                )
            ).scalar()
            ok = result.state == CommitmentState.COMMITTED
            moved = None
            if row.id == latest and (
                row.delivery_state == DeliveryState.COMMITTING.value
                or (row.delivery_state == DeliveryState.PENDING.value and ok)
            ):
                state, next_at = self.ledger.next_state(ok, retryable=True, attempt=row.attempts, now=now)
                outcome = self.ledger.write_outcome(
                    work, task, state, next_at, result.detail, now, from_state=row.delivery_state
                )
                if outcome is not None:
                    moved = (state, outcome)
                    self.ledger.settle_job(work, task.job)
        log.info(
            "storage commitment %s for delivery %d (%s via %s): %s",
            report.transaction_uid,
            task.delivery_id,
            reported_by,
            via,
            result.detail or "every instance committed",
        )
        if moved is not None:
            self.ledger.log_outcome(task, moved[0], moved[1], result.detail)
        return ReportStatus.SUCCESS

    def expire_overdue(self) -> int:
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
        expired: list[tuple[DeliveryTask, str, DeliveryState, str, str]] = []
        with audited_write(self.db, self.audit) as work:
            for delivery_id in due:
                found = self._expire(work, delivery_id, now)
                if found is not None:
                    expired.append(found)
        for task, txn, state, outcome, error in expired:
            log.warning("delivery %d: storage commitment %s timed out", task.delivery_id, txn)
            self.ledger.log_outcome(task, state, outcome, error)
        return len(expired)

    def _expire(
        self, work: AuditedWrite, delivery_id: int, now: float
    ) -> tuple[DeliveryTask, str, DeliveryState, str, str] | None:
        row = work.conn.execute(
            select(t.deliveries.c.attempts, t.deliveries.c.destination).where(
                t.deliveries.c.id == delivery_id,
                t.deliveries.c.state == DeliveryState.COMMITTING.value,
                t.deliveries.c.next_attempt_at <= now,
            )
        ).first()
        if row is None:
            return None  # the report came, or another worker took it
        commitment = work.conn.execute(
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
            work.conn.execute(
                update(t.storage_commitments)
                .where(
                    t.storage_commitments.c.id == commitment.id,
                    t.storage_commitments.c.state == CommitmentState.REQUESTED.value,
                )
                .values(state=CommitmentState.TIMED_OUT.value, detail=error)
            )
        task = self.ledger.task_of(work.conn, delivery_id, commitment.attempt_fk if commitment else None)
        state, next_at = self.ledger.next_state(False, retryable=True, attempt=row.attempts, now=now)
        outcome = self.ledger.move_delivery(
            work, task, state, next_at, error, now, from_state=DeliveryState.COMMITTING.value
        )
        if outcome is None:
            return None
        work.record(
            AuditEvent.STORAGE_COMMITMENT_TIMEOUT,
            Outcome.MINOR_FAILURE,
            **self.ledger.facts(task, destination),
            transaction_uid=txn,
            timeout_seconds=destination.commitment_timeout_seconds if destination else None,
        )
        self.ledger.record_outcome(work, task, state, next_at, outcome, error, now)
        self.ledger.settle_job(work, task.job)
        return task, txn, state, outcome, error

    def cancel_for(self, conn: Any, delivery_id: int, detail: str) -> None:
        """Cancel the open transaction of a delivery whose worker was lost (a late report
        of it is still recorded, and completes the delivery if it commits everything)."""
        conn.execute(
            update(t.storage_commitments)
            .where(
                t.storage_commitments.c.delivery_fk == delivery_id,
                t.storage_commitments.c.state == CommitmentState.REQUESTED.value,
            )
            .values(state=CommitmentState.CANCELLED.value, detail=detail)
        )
