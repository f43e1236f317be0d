"""The outbox: one delivery per output series per destination, queued, sent, confirmed.

Delivery states: ``pending → sending → delivered``, or back to ``pending`` with an
exponential backoff (capped) after a retryable failure, or ``dead`` (dead-letter) after
``max_attempts`` or a permanent failure. Every attempt is a row with its outcome
(:mod:`dicom_node.delivery.ledger`). A job is ``delivered`` only when all of its
deliveries are. Where the destination does storage commitment, a sent series waits in
``committing`` for the peer's result (:mod:`dicom_node.delivery.commitment`).

What a destination is sent, and what it would refuse, is its profile's business
(:mod:`dicom_node.delivery.profiles`), checked before the gate: by the time a series is
queued here, it may go.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, func, insert, select, update

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import Destination, NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.db.engine import Database, inserted_id
from dicom_node.delivery.commitment import StorageCommitments
from dicom_node.delivery.ledger import DeliveryLedger, DeliveryState, DeliveryTask, delivery_rows, job_of
from dicom_node.delivery.sender import SendReport, send_series
from dicom_node.delivery.stow import send_series_stow
from dicom_node.jobs.claims import OrphanTest
from dicom_node.jobs.state import JobState, job_ref, move, record_outputs
from dicom_node.net.tls import ClientTls
from pipelines.base import OutputInstance

log = logging.getLogger(__name__)


# -- queueing --------------------------------------------------------------------------------


def output_classes(conn: Connection, job_id: int) -> dict[str, set[str]]:
    """The SOP classes of each recorded output series of the job."""
    classes: dict[str, set[str]] = defaultdict(set)
    for series_uid, sop_class in conn.execute(
        select(t.job_outputs.c.series_uid, t.job_outputs.c.sop_class_uid).where(
            t.job_outputs.c.job_fk == job_id
        )
    ).all():
        classes[series_uid].add(sop_class)
    return classes


def queue_deliveries(
    conn: Connection,
    job_id: int,
    destinations: list[str],
    *,
    accepts: Callable[[str, set[str]], bool] = lambda _d, _c: True,
) -> int:
    """One pending delivery per recorded output series per destination (idempotent).

    ``accepts(destination, sop_classes)`` says whether a destination takes a series of
    those classes (a TPS takes image series only: :mod:`dicom_node.delivery.profiles`).
    """
    now = time.time()
    classes = output_classes(conn, job_id)
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
        for s in sorted(classes)
        for d in destinations
        if (s, d) not in existing and accepts(d, classes[s])
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


def create_deliveries(
    conn: Connection,
    job_id: int,
    outputs: tuple[OutputInstance, ...],
    destinations: list[str],
    *,
    accepts: Callable[[str, set[str]], bool] = lambda _d, _c: True,
) -> int:
    """Record the job's outputs and queue one delivery per series per destination."""
    record_outputs(conn, job_id, outputs)
    return queue_deliveries(conn, job_id, destinations, accepts=accepts)


# -- sending ---------------------------------------------------------------------------------


class Outbox:
    """Claims due deliveries, sends them, and records every attempt."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        audit: AuditTrail,
        worker_id: str,
        tls: ClientTls | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.audit = audit
        self.worker_id = worker_id
        #: The node's TLS client settings, for destinations with ``tls`` on.
        self.tls = tls
        self.ledger = DeliveryLedger(config, worker_id)
        self.commitments = StorageCommitments(config, db, audit, self.ledger)

    def claim_due(self) -> DeliveryTask | None:
        now = time.time()
        with self.db.claim() as conn:
            row = conn.execute(
                delivery_rows()
                .where(
                    t.deliveries.c.state == DeliveryState.PENDING.value,
                    t.deliveries.c.next_attempt_at <= now,
                    # defence in depth: a held, failed or shadow job never sends anything
                    t.jobs.c.state == JobState.DELIVERING.value,
                )
                # an urgent job's outputs first, then the longest due
                .order_by(t.jobs.c.urgency.desc(), t.deliveries.c.next_attempt_at, t.deliveries.c.id)
                .limit(1)
                .with_for_update(skip_locked=True, of=t.deliveries)
            ).first()
            if row is None:
                return None
            attempt = row.attempts + 1
            taken = conn.execute(
                update(t.deliveries)
                .where(t.deliveries.c.id == row.id, t.deliveries.c.state == DeliveryState.PENDING.value)
                .values(
                    state=DeliveryState.SENDING.value,
                    attempts=attempt,
                    claimed_by=self.worker_id,
                    lease_until=now + self.config.workers.lease_seconds,
                )
            )
            if taken.rowcount != 1:
                return None  # another worker took it between our read and our write
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
            job=job_of(row),
            series_uid=row.series_uid,
            destination=row.destination,
            attempt=attempt,
            checked=row.destination_problems is not None,
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
        if destination is not None and destination.profile == "tps" and not task.checked:
            return self._refuse(task, destination)
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
                if destination.protocol == "dicomweb":
                    home = self.tls.home if self.tls is not None else Path.cwd()
                    report = send_series_stow(destination, task.files, home)
                else:
                    if destination.storage_commitment:
                        commitment = self.commitments.request(task, destination)
                    report = send_series(
                        destination,
                        task.files,
                        calling_ae=self.config.node.ae_title,
                        commitment=commitment,
                        tls=self.tls,
                    )
        self.finish(task, report, transaction_uid=commitment.transaction_uid if commitment else None)
        return report

    def _refuse(self, task: DeliveryTask, destination: Destination) -> SendReport:
        """Fail closed: a TPS delivery of a job whose series were never checked (it was made
        by a node whose outbox checked at send time, before an upgrade) is not sent."""
        why = "its job was made before the TPS checks ran before the gate: run the job again so they do"
        log.warning(
            "delivery %d (series %s → %s) refused: %s",
            task.delivery_id,
            task.series_uid,
            task.destination,
            why,
        )
        self.audit.record(
            AuditEvent.DELIVERY_REFUSED,
            Outcome.SERIOUS_FAILURE,
            **self.ledger.facts(task, destination),
            instances=len(task.files),
            profile=destination.profile,
            problems=[why],
        )
        report = SendReport(error=f"refused before sending to a TPS: {why}")
        self.finish(task, report)
        return report

    def finish(self, task: DeliveryTask, report: SendReport, *, transaction_uid: str | None = None) -> None:
        """Record the attempt's outcome, and settle the job when it was its last delivery."""
        now = time.time()
        destination = self.config.destinations.get(task.destination)
        ok, retryable, error, committing = report.ok, report.retryable, report.error, False
        counts = {"instances_sent": report.sent, "instances_failed": len(report.failed)}
        if report.transcoded:
            counts["instances_transcoded"] = sum(report.transcoded.values())
        if report.warnings:
            counts["instances_warned"] = report.warnings
        # what the attempt did besides its outcome: transcoding, warning statuses (with codes)
        note = "; ".join(filter(None, (report.transcoding_note, report.warning_note))) or None
        with audited_write(self.db, self.audit) as work:
            if transaction_uid is not None:
                sent = self.commitments.after_send(work.conn, transaction_uid, report, destination, now)
                ok, retryable, error, committing = sent.ok, sent.retryable, sent.error, sent.committing
            if committing:
                timeout = destination.commitment_timeout_seconds if destination else 0.0
                state, next_at = DeliveryState.COMMITTING, now + timeout
            else:
                state, next_at = self.ledger.next_state(
                    ok, retryable=retryable, attempt=task.attempt, now=now
                )
            outcome = self.ledger.write_outcome(
                work,
                task,
                state,
                next_at,
                error,
                now,
                from_state=DeliveryState.SENDING.value,
                counts=counts,
                note=note,
                finished_at=now,
                instances_sent=report.sent,
                instances_failed=len(report.failed),
            )
            if outcome is not None:
                if report.ok:
                    work.record(
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
                self.ledger.settle_job(work, task.job)
        if outcome is None:
            log.warning(
                "delivery %d was taken over while sending; its result is not recorded", task.delivery_id
            )
            return
        self.ledger.log_outcome(task, state, outcome, error)

    def recover(self, is_orphaned_claim: OrphanTest) -> int:
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
                self.commitments.cancel_for(conn, row.id, "worker lost during send")
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

    def retry_dead(self, delivery_id: int, actor: str, **facts: Any) -> None:
        """Operator action: give a dead-lettered delivery a fresh set of attempts (audited
        with ``actor``, in the same transaction)."""
        with audited_write(self.db, self.audit) as work:
            row = work.conn.execute(
                select(t.deliveries.c.state, t.deliveries.c.job_fk, t.jobs.c.state.label("job_state"))
                .join(t.jobs, t.jobs.c.id == t.deliveries.c.job_fk)
                .where(t.deliveries.c.id == delivery_id)
            ).first()
            if row is None:
                raise KeyError(f"no delivery {delivery_id}")
            if row.state != DeliveryState.DEAD.value:
                raise ValueError(f"delivery {delivery_id} is {row.state}, not dead")
            purged = work.conn.execute(
                select(t.instances.c.purged_at)
                .join(t.job_inputs, t.job_inputs.c.instance_fk == t.instances.c.id)
                .where(t.job_inputs.c.job_fk == row.job_fk, t.instances.c.purged_at.is_not(None))
                .limit(1)
            ).scalar()
            if purged is not None:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(purged)))
                raise ValueError(
                    f"delivery {delivery_id}: the retention rule removed job {row.job_fk}'s study and "
                    f"outputs on {when}; nothing is left to send (send the study again to run it anew)"
                )
            work.conn.execute(
                update(t.deliveries)
                .where(t.deliveries.c.id == delivery_id)
                .values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=time.time())
            )
            work.record(
                AuditEvent.DELIVERY_ATTEMPT,
                actor=actor,
                delivery_id=delivery_id,
                action="retry requested by operator",
                **facts,
            )
            if row.job_state == JobState.FAILED.value:
                move(
                    work,
                    job_ref(work.conn, row.job_fk),
                    JobState.DELIVERING,
                    expect=JobState.FAILED,
                    reason="delivery retried by operator",
                    actor=actor,
                )
