"""Worker processes: run pipelines on queued jobs and drain the outbox.

Workers run in processes separate from the receiver, so inference never holds the
receiver's GIL. Each claim (job or delivery) carries ``claimed_by = host/run/pid`` and a
lease renewed while the work goes on; a claim whose process is gone (same host) or whose
lease ran out (any host) is orphaned and its work resumes from the last committed state.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import select, update

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node import __version__
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.delivery.outbox import (
    Outbox,
    delivery_count,
    nothing_to_send,
    queue_deliveries,
    record_outputs,
    tps_destinations,
)
from dicom_node.jobs.provenance import record_provenance
from dicom_node.jobs.state import JobState, StaleTransition, audit_transition, transition
from dicom_node.paths import NodePaths
from pipelines.base import (
    GatePolicy,
    InputInstance,
    Pipeline,
    PipelineError,
    PipelineResult,
    RunEnvironment,
    StudyInput,
)
from pipelines.registry import get_pipeline
from policies.engine import GateVerdict, gate_output
from policies.model import QcGates

log = logging.getLogger(__name__)

HOST = socket.gethostname()


def claim_id(run_id: str, pid: int | None = None) -> str:
    return f"{HOST}/{run_id}/{pid or os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphan_test(current_run_id: str) -> Callable[[str | None, float | None, float], bool]:
    """A predicate telling whether a claim's owner is gone."""

    def is_orphaned(claimed_by: str | None, lease_until: float | None, now: float) -> bool:
        if claimed_by is None:
            return True
        if lease_until is not None and lease_until < now:
            return True
        host, _, rest = claimed_by.partition("/")
        run_id, _, pid = rest.partition("/")
        if host != HOST:
            return False  # another machine's worker: only its lease can tell
        if run_id != current_run_id:
            return True  # claimed by an earlier run of this node
        return not (pid.isdigit() and pid_alive(int(pid)))

    return is_orphaned


def recover_jobs(db: Database, audit: AuditTrail, run_id: str, actor: str) -> int:
    """Put jobs whose worker is gone back to ``queued``; they resume from the start."""
    is_orphaned = orphan_test(run_id)
    now = time.time()
    moved: list[int] = []
    with db.write() as conn:
        rows = conn.execute(
            select(t.jobs.c.id, t.jobs.c.claimed_by, t.jobs.c.lease_until).where(
                t.jobs.c.state == JobState.RUNNING.value
            )
        ).all()
        for row in rows:
            if is_orphaned(row.claimed_by, row.lease_until, now):
                transition(
                    conn,
                    row.id,
                    JobState.QUEUED,
                    expect=JobState.RUNNING,
                    reason="resumed: its worker was lost",
                    actor=actor,
                    claimed_by=None,
                    lease_until=None,
                )
                moved.append(row.id)
    with db.read() as conn:
        for job_id in moved:
            audit_transition(
                audit,
                conn,
                job_id,
                JobState.RUNNING,
                JobState.QUEUED,
                "resumed: its worker was lost",
            )
    return len(moved)


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    study_uid: str
    study_version: int
    pipeline: str
    destinations: list[str]
    rule: str | None = None
    gate: str = "auto"
    qc_policy: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    series_uid: str | None = None


def _gate_policy(job: ClaimedJob) -> GatePolicy:
    """The job's rule gate as the pipeline sees it: figures and problems → (action, reasons)."""
    qc = QcGates(**job.qc_policy)

    def decide(figures: Mapping[str, float], problems: Sequence[str]) -> tuple[str, tuple[str, ...]]:
        verdict = gate_output(job.gate, qc, figures, list(problems))  # type: ignore[arg-type]
        return verdict.action, verdict.reasons

    return decide


class Worker:
    """One worker process: a job loop and a delivery loop, with leases kept alive."""

    def __init__(
        self,
        config: NodeConfig,
        paths: NodePaths,
        db: Database,
        audit: AuditTrail,
        run_id: str,
    ) -> None:
        self.config = config
        self.paths = paths
        self.db = db
        self.audit = audit
        self.run_id = run_id
        self.worker_id = claim_id(run_id)
        self.outbox = Outbox(config, db, audit, self.worker_id, data_dir=paths.data)
        self.stop_event = threading.Event()
        self._held_jobs: set[int] = set()
        self._held_deliveries: set[int] = set()
        self._held_lock = threading.Lock()

    # -- loops ------------------------------------------------------------------------

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._delivery_loop, name="outbox", daemon=True),
            threading.Thread(target=self._lease_loop, name="leases", daemon=True),
        ]
        for th in threads:
            th.start()
        log.info("worker %s started", self.worker_id)
        next_recovery = 0.0
        while not self.stop_event.is_set():
            now = time.time()
            if now >= next_recovery:
                self._recover()
                next_recovery = now + self.config.workers.lease_seconds / 2
            job = self.claim_job()
            if job is None:
                self.stop_event.wait(self.config.workers.poll_seconds)
                continue
            self.process(job)
        for th in threads:
            th.join(timeout=5)

    def _delivery_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.outbox.expire_commitments()
                task = self.outbox.claim_due()
            except Exception:
                log.exception("outbox: claim failed")
                task = None
            if task is None:
                self.stop_event.wait(self.config.workers.poll_seconds)
                continue
            with self._held_lock:
                self._held_deliveries.add(task.delivery_id)
            try:
                self.outbox.send(task)
            except Exception:
                log.exception("outbox: delivery %d crashed", task.delivery_id)
            finally:
                with self._held_lock:
                    self._held_deliveries.discard(task.delivery_id)

    def _lease_loop(self) -> None:
        period = self.config.workers.lease_seconds / 3
        while not self.stop_event.wait(period):
            until = time.time() + self.config.workers.lease_seconds
            with self._held_lock:
                jobs, deliveries = list(self._held_jobs), list(self._held_deliveries)
            if not jobs and not deliveries:
                continue
            try:
                with self.db.write() as conn:
                    if jobs:
                        conn.execute(update(t.jobs).where(t.jobs.c.id.in_(jobs)).values(lease_until=until))
                    if deliveries:
                        conn.execute(
                            update(t.deliveries)
                            .where(t.deliveries.c.id.in_(deliveries))
                            .values(lease_until=until)
                        )
            except Exception:
                log.exception("lease renewal failed")

    def _recover(self) -> None:
        try:
            recover_jobs(self.db, self.audit, self.run_id, self.worker_id)
            self.outbox.recover(orphan_test(self.run_id))
        except Exception:
            log.exception("recovery pass failed")

    # -- jobs -------------------------------------------------------------------------

    def claim_job(self) -> ClaimedJob | None:
        with self.db.write() as conn:
            row = conn.execute(
                select(t.jobs, t.studies.c.study_uid)
                .join(t.studies, t.studies.c.id == t.jobs.c.study_fk)
                .where(t.jobs.c.state == JobState.QUEUED.value)
                .order_by(t.jobs.c.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            transition(
                conn,
                row.id,
                JobState.RUNNING,
                expect=JobState.QUEUED,
                actor=self.worker_id,
                claimed_by=self.worker_id,
                lease_until=time.time() + self.config.workers.lease_seconds,
                runs=row.runs + 1,
            )
        with self._held_lock:
            self._held_jobs.add(row.id)
        with self.db.read() as conn:
            audit_transition(self.audit, conn, row.id, JobState.QUEUED, JobState.RUNNING)
        return ClaimedJob(
            row.id,
            row.study_uid,
            row.study_version,
            row.pipeline,
            list(row.destinations),
            rule=row.rule,
            gate=row.gate or "auto",
            qc_policy=dict(row.qc_policy or {}),
            options=dict(row.options or {}),
            series_uid=row.series_uid,
        )

    def load_input(self, job: ClaimedJob) -> StudyInput:
        with self.db.read() as conn:
            rows = conn.execute(
                select(t.instances, t.series.c.series_uid)
                .join(t.job_inputs, t.job_inputs.c.instance_fk == t.instances.c.id)
                .join(t.series, t.series.c.id == t.instances.c.series_fk)
                .where(t.job_inputs.c.job_fk == job.job_id)
                .order_by(t.series.c.series_uid, t.instances.c.instance_number, t.instances.c.id)
            ).all()
        return StudyInput(
            job_id=job.job_id,
            study_uid=job.study_uid,
            study_version=job.study_version,
            options=job.options,
            series_uid=job.series_uid,
            gate_policy=_gate_policy(job),
            instances=tuple(
                InputInstance(
                    sop_uid=r.sop_uid,
                    series_uid=r.series_uid,
                    sop_class_uid=r.sop_class_uid,
                    transfer_syntax_uid=r.transfer_syntax_uid,
                    path=self.paths.data / r.path,
                    sha256=r.sha256,
                )
                for r in rows
            ),
        )

    def process(self, job: ClaimedJob) -> JobState:
        """Run the pipeline and move the job on. Returns the state it ends in."""
        log.info(
            "job %d: running %s on study %s v%d",
            job.job_id,
            job.pipeline,
            job.study_uid,
            job.study_version,
        )
        try:
            pipeline = get_pipeline(job.pipeline)
            workdir = self.paths.outputs / f"job-{job.job_id}"
            workdir.mkdir(parents=True, exist_ok=True)
            study = self.load_input(job)
            result = pipeline.run(
                study,
                RunEnvironment(workdir=workdir, uid_root=self.config.node.uid_root, node_version=__version__),
            )
        except (PipelineError, KeyError) as exc:
            return self._fail(job, str(exc))
        except Exception as exc:
            log.error("job %d: pipeline crashed:\n%s", job.job_id, traceback.format_exc())
            return self._fail(job, f"internal error in {job.pipeline}: {type(exc).__name__}: {exc}")
        finally:
            with self._held_lock:
                self._held_jobs.discard(job.job_id)
        figures: dict[str, float] = {}
        for series_qc in result.qc.values():
            figures.update({k: float(v) for k, v in series_qc.items() if isinstance(v, int | float)})
        verdict = gate_output(
            job.gate,  # type: ignore[arg-type]  # validated by the policy when the job was made
            QcGates(**job.qc_policy),
            figures,
            list(result.validation_errors),
        )
        result = replace(result, gate=f"{job.gate}: {verdict.action}")
        self._record_provenance(job, study, pipeline, result)
        self.audit.record(
            AuditEvent.GATE_DECISION,
            Outcome.SUCCESS if verdict.action == "release" else Outcome.MINOR_FAILURE,
            study_uid=job.study_uid,
            job_id=job.job_id,
            rule=job.rule,
            gate=job.gate,
            action=verdict.action,
            reasons=list(verdict.reasons),
            qc=figures,
            stage="output",
        )
        return self._settle(job, result, verdict)

    def _settle(self, job: ClaimedJob, result: PipelineResult, verdict: GateVerdict) -> JobState:
        """Commit what the gate decided: deliver, hold for review, or keep (shadow)."""
        reasons = "; ".join(verdict.reasons)
        moves: list[tuple[JobState, JobState, str | None]] = []
        try:
            with self.db.write() as conn:
                record_outputs(conn, job.job_id, result.outputs)
                if verdict.action == "hold":
                    transition(
                        conn,
                        job.job_id,
                        JobState.HELD,
                        expect=JobState.RUNNING,
                        reason=f"held for review: {reasons}",
                        actor=self.worker_id,
                        claimed_by=None,
                        lease_until=None,
                    )
                    moves.append((JobState.RUNNING, JobState.HELD, f"held for review: {reasons}"))
                else:
                    why = reasons if verdict.action == "shadow" else None
                    if verdict.action == "release" and not job.destinations:
                        why = "no destinations for this rule"
                    transition(
                        conn,
                        job.job_id,
                        JobState.SUCCEEDED,
                        expect=JobState.RUNNING,
                        reason=why,
                        actor=self.worker_id,
                        claimed_by=None,
                        lease_until=None,
                    )
                    moves.append((JobState.RUNNING, JobState.SUCCEEDED, why))
                    if verdict.action == "release" and job.destinations:
                        tps = tps_destinations(self.config)
                        n = queue_deliveries(conn, job.job_id, job.destinations, tps=tps)
                        reason = f"{n} delivery(ies) queued"
                        transition(
                            conn,
                            job.job_id,
                            JobState.DELIVERING,
                            expect=JobState.SUCCEEDED,
                            reason=reason,
                            actor=self.worker_id,
                        )
                        moves.append((JobState.SUCCEEDED, JobState.DELIVERING, reason))
                        if delivery_count(conn, job.job_id) == 0:
                            # released, yet nothing its destinations accept: say so, and
                            # never leave the job waiting in `delivering` for nothing
                            failed = nothing_to_send(job.destinations, tps)
                            transition(
                                conn,
                                job.job_id,
                                JobState.FAILED,
                                expect=JobState.DELIVERING,
                                reason=failed,
                                actor=self.worker_id,
                            )
                            moves.append((JobState.DELIVERING, JobState.FAILED, failed))
        except StaleTransition:
            log.warning("job %d was taken over while running; its result is discarded", job.job_id)
            return JobState.RUNNING
        with self.db.read() as conn:
            for src, dst, why in moves:
                audit_transition(self.audit, conn, job.job_id, src, dst, why)
        return moves[-1][1]

    def _record_provenance(
        self, job: ClaimedJob, study: StudyInput, pipeline: Pipeline, result: PipelineResult
    ) -> None:
        record_provenance(
            self.audit, study=study, pipeline=pipeline, result=result, patient_id=self._patient_of(job)
        )

    def _patient_of(self, job: ClaimedJob) -> str | None:
        with self.db.read() as conn:
            return conn.execute(
                select(t.patients.c.patient_id)
                .join(t.studies, t.studies.c.patient_fk == t.patients.c.id)
                .where(t.studies.c.study_uid == job.study_uid)
            ).scalar()

    def _fail(self, job: ClaimedJob, reason: str) -> JobState:
        log.warning("job %d failed: %s", job.job_id, reason)
        try:
            with self.db.write() as conn:
                transition(
                    conn,
                    job.job_id,
                    JobState.FAILED,
                    expect=JobState.RUNNING,
                    reason=reason,
                    actor=self.worker_id,
                    claimed_by=None,
                    lease_until=None,
                )
        except StaleTransition:
            return JobState.RUNNING
        with self.db.read() as conn:
            audit_transition(self.audit, conn, job.job_id, JobState.RUNNING, JobState.FAILED, reason)
        return JobState.FAILED
