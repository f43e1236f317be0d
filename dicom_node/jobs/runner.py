"""Running one job: claim it, run its pipeline, check its destinations, gate, settle.

The steps, in order::

    claim (queued → running)  →  load the study snapshot  →  pipeline.run
      →  destination checks (would a destination refuse the outputs?)
      →  gate (the rule's gate, QC limits, validation, destination refusals)
      →  provenance records (with the priors the job used, if any)
      →  settle: held | succeeded (shadow) | delivering | failed

An input outside the model's declared domain ends the job ``refused`` (not ``failed``),
with the rule's fallback queued as a job of its own (:mod:`dicom_node.jobs.fallback`).

Settling goes through :func:`dicom_node.jobs.state.move` (transition and audit record,
recorded once committed). Destination checks and queueing deliveries are the delivery
layer's, reached through the :class:`~dicom_node.jobs.handover.Handover` the caller gives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node import __version__
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.db.engine import Database
from dicom_node.jobs.claims import orphan_test
from dicom_node.jobs.fallback import queue_fallback
from dicom_node.jobs.handover import Handover
from dicom_node.jobs.prior_registration import (
    ComputedRegistrations,
    PriorRegistrations,
    compute_registrations,
    prior_files,
    registered_priors,
    write_registrations,
)
from dicom_node.jobs.priors import job_prior_records, prior_references
from dicom_node.jobs.provenance import record_provenance
from dicom_node.jobs.report import final_verdict
from dicom_node.jobs.state import (
    JobRef,
    JobState,
    StaleTransition,
    job_ref,
    move,
    newer_job,
    record_outputs,
    runnable_now,
)
from dicom_node.paths import NodePaths
from dicom_node.safelog import describe_exception
from models.zoo import read_card
from pipelines.base import (
    GatePolicy,
    InputInstance,
    InputRefused,
    Pipeline,
    PipelineError,
    PipelineResult,
    RunEnvironment,
    StudyInput,
)
from pipelines.registry import get_pipeline
from policies.engine import GateVerdict, gate_output
from policies.model import Priors, QcGates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedJob:
    ref: JobRef
    destinations: list[str]
    rule: str | None = None
    gate: str = "auto"
    qc_policy: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    series_uid: str | None = None
    #: The rule's ``priors`` as frozen on the job (None: none asked).
    priors: dict[str, Any] | None = None

    @property
    def job_id(self) -> int:
        return self.ref.job_id

    @property
    def study_uid(self) -> str:
        return self.ref.study_uid

    @property
    def pipeline(self) -> str:
        return self.ref.pipeline

    @property
    def study_version(self) -> int:
        return self.ref.study_version


def _gate_policy(job: ClaimedJob) -> GatePolicy:
    """The job's rule gate as the pipeline sees it: figures and problems → (action, reasons)."""
    qc = QcGates(**job.qc_policy)

    def decide(figures: Mapping[str, float], problems: Sequence[str]) -> tuple[str, tuple[str, ...]]:
        verdict = gate_output(job.gate, qc, figures, list(problems))  # type: ignore[arg-type]
        return verdict.action, verdict.reasons

    return decide


def recover_jobs(db: Database, audit: AuditTrail, run_id: str, actor: str) -> int:
    """Put jobs whose worker is gone back to ``queued``; they resume from the start."""
    is_orphaned = orphan_test(run_id)
    now = time.time()
    moved = 0
    with audited_write(db, audit) as work:
        rows = work.conn.execute(
            select(t.jobs.c.id, t.jobs.c.claimed_by, t.jobs.c.lease_until).where(
                t.jobs.c.state == JobState.RUNNING.value
            )
        ).all()
        for row in rows:
            if is_orphaned(row.claimed_by, row.lease_until, now):
                move(
                    work,
                    job_ref(work.conn, row.id),
                    JobState.QUEUED,
                    expect=JobState.RUNNING,
                    reason="resumed: its worker was lost",
                    actor=actor,
                    claimed_by=None,
                    lease_until=None,
                    dispatched_at=None,
                )
                moved += 1
    return moved


#: A job that waited this long (s) for its pipeline's model to be loaded (a worker just
#: started and still preloading, or preload off) keeps the wait as its first stage time,
#: ``model-load``: in the job's stage times and in /metrics, so a slow first study says why.
MODEL_WAIT_SHOWN = 0.05


class JobRunner:
    """Claims queued jobs and runs them to a settled state."""

    def __init__(
        self,
        config: NodeConfig,
        paths: NodePaths,
        db: Database,
        audit: AuditTrail,
        worker_id: str,
        handover: Handover,
    ) -> None:
        self.config = config
        self.paths = paths
        self.db = db
        self.audit = audit
        self.worker_id = worker_id
        self.handover = handover
        #: Built pipelines by name: each model is loaded and its weights hash-checked once
        #: per worker process, not per job.
        self._pipelines: dict[str, Pipeline] = {}
        #: One lock per pipeline name: built once, even when a job and the preload ask at once.
        self._building: dict[str, threading.Lock] = {}
        self._building_guard = threading.Lock()

    def pipeline(self, name: str) -> Pipeline:
        """Pipeline ``name`` with the model the config chose (built on first use)."""
        with self._building_guard:
            building = self._building.setdefault(name, threading.Lock())
        with building:
            if name not in self._pipelines:
                self._build(name)
        return self._pipelines[name]

    def _build(self, name: str) -> None:
        try:
            model_dir = self.config.models.directory(name)
        except ValueError as exc:  # the pinned model went away since the config was loaded
            raise PipelineError(f"[models] {exc}") from None
        started = time.perf_counter()
        self._pipelines[name] = pipeline = get_pipeline(name, model_dir, self.config.models.precision)
        if model_dir is not None:
            card = read_card(model_dir)
            precision = getattr(pipeline, "precision", None)
            self.audit.record(
                AuditEvent.MODEL_LOADED,
                actor=self.worker_id,
                pipeline=name,
                model=card["name"],
                version=card["version"],
                weights_sha256=card["weights_sha256"],
                directory=str(model_dir),
                load_seconds=round(time.perf_counter() - started, 3),
                **({"precision": precision} if precision else {}),
            )

    def preload(self, names: Iterable[str]) -> dict[str, float | str]:
        """Build pipelines ``names`` now (see :meth:`pipeline`): name → seconds it took, or
        why it could not be built (the job that needs it then fails with that reason)."""
        done: dict[str, float | str] = {}
        for name in names:
            started = time.perf_counter()
            try:
                self.pipeline(name)
            except Exception as exc:  # a missing model or an unknown pipeline: the job will say so
                done[name] = describe_exception(exc)
            else:
                done[name] = round(time.perf_counter() - started, 2)
        return done

    def claim(self, job_id: int | None = None) -> ClaimedJob | None:
        """The most urgent queued job, oldest first among equals (or job ``job_id``, if it is
        queued), moved to ``running`` under this worker's claim; None when there is none.
        An ``offpeak`` job is taken only inside ``[workers] offpeak_hours``."""
        query = (
            select(t.jobs, t.studies.c.study_uid, t.patients.c.patient_id)
            .join(t.studies, t.studies.c.id == t.jobs.c.study_fk)
            .join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
            .where(t.jobs.c.state == JobState.QUEUED.value)
        )
        if job_id is not None:
            query = query.where(t.jobs.c.id == job_id)
        query = query.where(*runnable_now(self.config.workers))  # off-peak jobs wait for their hours
        with audited_write(self.db, self.audit, claim=True) as work:
            while True:
                row = work.conn.execute(
                    query.order_by(t.jobs.c.urgency.desc(), t.jobs.c.id)
                    .limit(1)
                    .with_for_update(skip_locked=True, of=t.jobs)
                ).first()
                if row is None:
                    return None
                ref = JobRef(row.id, row.study_uid, row.patient_id, row.pipeline, row.study_version)
                newer = newer_job(work.conn, row)
                if newer is None:
                    break
                move(
                    work,
                    ref,
                    JobState.SUPERSEDED,
                    expect=JobState.QUEUED,
                    actor=self.worker_id,
                    reason=(
                        f"superseded by job {newer.id} on study version {newer.study_version} "
                        f"(rule {row.rule or row.pipeline}): the study changed after this snapshot "
                        f"(version {row.study_version}); not run"
                    ),
                )
                log.info("job %d: superseded by job %d (study v%d)", row.id, newer.id, newer.study_version)
                if job_id is not None:
                    return None
            job = ClaimedJob(
                ref,
                list(row.destinations),
                rule=row.rule,
                gate=row.gate or "auto",
                qc_policy=dict(row.qc_policy or {}),
                options=dict(row.options or {}),
                series_uid=row.series_uid,
                priors=dict(row.priors) if row.priors else None,
            )
            move(
                work,
                job.ref,
                JobState.RUNNING,
                expect=JobState.QUEUED,
                actor=self.worker_id,
                claimed_by=self.worker_id,
                lease_until=time.time() + self.config.workers.lease_seconds,
                runs=row.runs + 1,
            )
        return job

    def load_input(self, job: ClaimedJob) -> StudyInput:
        with self.db.read() as conn:
            rows = conn.execute(
                select(t.instances, t.series.c.series_uid)
                .join(t.job_inputs, t.job_inputs.c.instance_fk == t.instances.c.id)
                .join(t.series, t.series.c.id == t.instances.c.series_fk)
                .where(t.job_inputs.c.job_fk == job.job_id)
                .order_by(
                    t.series.c.series_uid, t.instances.c.instance_number.asc().nulls_first(), t.instances.c.id
                )
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

    def register_priors(
        self, job: ClaimedJob, study: StudyInput, env: RunEnvironment
    ) -> tuple[ComputedRegistrations, dict[str, list[Path]], RunEnvironment]:
        """The priors registered to the input before the pipeline runs
        (:mod:`dicom_node.jobs.prior_registration`), and the environment that hands them
        to the pipeline; nothing without priors."""
        if not job.priors:
            return ComputedRegistrations(), {}, env
        priors = Priors.model_validate(job.priors)
        if priors.registration == "none":
            return ComputedRegistrations(), {}, env
        with self.db.read() as conn:
            files = prior_files(conn, job.job_id)
        files = {uid: [self.paths.data / p for p in paths] for uid, paths in files.items()}
        computed = compute_registrations(study, priors, files)
        env = replace(env, registered_priors=registered_priors(computed, env.priors, files))
        return computed, files, env

    def add_registrations(
        self,
        job: ClaimedJob,
        study: StudyInput,
        computed: ComputedRegistrations,
        files: dict[str, list[Path]],
        result: PipelineResult,
        env: RunEnvironment,
    ) -> PriorRegistrations:
        """The Spatial Registration objects of the registered priors, added to the outputs."""
        if not computed.registrations or not job.priors:
            return PriorRegistrations(result)
        return write_registrations(study, computed, files, result, env, Priors.model_validate(job.priors))

    def run(self, job: ClaimedJob) -> JobState:
        """Run the pipeline and move the job on. Returns the state it ends in."""
        log.info(
            "job %d: running %s on study %s v%d",
            job.job_id,
            job.pipeline,
            job.study_uid,
            job.study_version,
        )
        try:
            asked = time.perf_counter()
            pipeline = self.pipeline(job.pipeline)
            waited = time.perf_counter() - asked  # > 0 when the model was still loading
            workdir = self.paths.outputs / f"job-{job.job_id}"
            workdir.mkdir(parents=True, exist_ok=True)
            study = self.load_input(job)
            with self.db.read() as conn:
                priors = job_prior_records(conn, job.job_id)
            env = RunEnvironment(
                workdir=workdir,
                uid_root=self.config.node.uid_root,
                node_version=__version__,
                node_ae_title=self.config.node.ae_title,
                priors=prior_references(priors),
            )
            computed, files, env = self.register_priors(job, study, env)
            result = pipeline.run(study, env)
            if waited >= MODEL_WAIT_SHOWN:
                result = replace(result, timings={"model-load": round(waited, 3), **result.timings})
            registered = self.add_registrations(job, study, computed, files, result, env)
            result = registered.result
            with self.db.read() as conn:
                refusals = self.handover.problems(conn, job.job_id, job.destinations, result.outputs)
        except InputRefused as exc:
            return self._refuse(job, exc)
        except (PipelineError, KeyError) as exc:
            return self._fail(job, str(exc))
        except Exception as exc:
            log.error("job %d: pipeline crashed", job.job_id, exc_info=True)  # safelog withholds library text
            return self._fail(job, f"internal error in {job.pipeline}: {describe_exception(exc)}")
        figures: dict[str, float] = {}
        for series_qc in result.qc.values():
            figures.update({k: float(v) for k, v in series_qc.items() if isinstance(v, int | float)})
        # the final verdict, stated in the job's report before its outputs are recorded
        verdict, result = final_verdict(job.gate, QcGates(**job.qc_policy), figures, result, study, refusals)
        result = replace(result, gate=f"{job.gate}: {verdict.action}")
        for entry in priors:
            if (done := registered.entries.get(str(entry["series_uid"]))) is not None:
                entry["registration"] = done
        extra: dict[str, Any] = {"priors": priors} if priors else {}
        record_provenance(
            self.audit, study=study, pipeline=pipeline, result=result, patient_id=job.ref.patient_id, **extra
        )
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
        return self._settle(job, result, verdict, refusals)

    def _settle(
        self, job: ClaimedJob, result: PipelineResult, verdict: GateVerdict, refusals: list[str]
    ) -> JobState:
        """Commit what the gate decided: deliver, hold for review, or keep (shadow)."""
        reasons = "; ".join(verdict.reasons)
        # the claim ends, and the destination checks' findings stay with the job
        done: dict[str, Any] = {
            "actor": self.worker_id,
            "claimed_by": None,
            "lease_until": None,
            "destination_problems": refusals,
        }
        try:
            with audited_write(self.db, self.audit) as work:
                record_outputs(work.conn, job.job_id, result.outputs)
                if result.timings:
                    now = time.time()
                    work.conn.execute(
                        insert(t.job_stage_times),
                        [
                            {"job_fk": job.job_id, "stage": stage[:64], "seconds": float(seconds), "at": now}
                            for stage, seconds in result.timings.items()
                        ],
                    )
                if verdict.action == "hold":
                    held = f"held for review: {reasons}"
                    move(work, job.ref, JobState.HELD, expect=JobState.RUNNING, reason=held, **done)
                    return JobState.HELD
                release = verdict.action == "release"
                kept = reasons if verdict.action == "shadow" else None
                if release and not job.destinations:
                    kept = "no destinations for this rule"
                move(work, job.ref, JobState.SUCCEEDED, expect=JobState.RUNNING, reason=kept, **done)
                if not (release and job.destinations):
                    return JobState.SUCCEEDED
                queued = self.handover.queue(work.conn, job.job_id, job.destinations)
                why = f"{queued.new} delivery(ies) queued"
                move(
                    work,
                    job.ref,
                    JobState.DELIVERING,
                    expect=JobState.SUCCEEDED,
                    reason=why,
                    actor=self.worker_id,
                )
                if queued.total == 0:
                    # released, yet nothing its destinations accept: say so, and never
                    # leave the job waiting in `delivering` for nothing
                    why = self.handover.nothing_to_send(job.destinations)
                    move(
                        work,
                        job.ref,
                        JobState.FAILED,
                        expect=JobState.DELIVERING,
                        reason=why,
                        actor=self.worker_id,
                    )
                    return JobState.FAILED
                return JobState.DELIVERING
        except StaleTransition:
            log.warning("job %d was taken over while running; its result is discarded", job.job_id)
            return JobState.RUNNING

    def _fail(self, job: ClaimedJob, reason: str) -> JobState:
        log.warning("job %d failed: %s", job.job_id, reason)
        try:
            with audited_write(self.db, self.audit) as work:
                move(
                    work,
                    job.ref,
                    JobState.FAILED,
                    expect=JobState.RUNNING,
                    reason=reason,
                    actor=self.worker_id,
                    claimed_by=None,
                    lease_until=None,
                )
        except StaleTransition:
            return JobState.RUNNING
        return JobState.FAILED

    def _refuse(self, job: ClaimedJob, refused: InputRefused) -> JobState:
        """The input is outside the model's domain: ``refused`` with the reasons, and the
        rule's fallback queued as a job of its own (:mod:`dicom_node.jobs.fallback`)."""
        log.warning("job %d refused: %s", job.job_id, refused)
        try:
            with audited_write(self.db, self.audit) as work:
                then = queue_fallback(work, job.ref, refused, self.worker_id)
                move(
                    work,
                    job.ref,
                    JobState.REFUSED,
                    expect=JobState.RUNNING,
                    reason=f"{refused}; {then}",
                    actor=self.worker_id,
                    claimed_by=None,
                    lease_until=None,
                )
        except StaleTransition:
            return JobState.RUNNING
        return JobState.REFUSED
