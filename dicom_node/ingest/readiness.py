"""Study completeness: a study becomes *ready* after ``stable_seconds`` without a new instance.

The C-STORE handler only notes the time (a dict write); one APScheduler timer per study
fires at ``last + stable``, re-arms itself if something arrived meanwhile, and otherwise
makes the study ready in one transaction: it snapshots the study's current instances into
a job per matching route and opens the next study version, so an instance arriving later
can only ever join a *new* job, never a finished one. After a restart the timers are
rebuilt from the index.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select, update

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.ingest.indexer import PendingInstance
from dicom_node.jobs.routing import PolicyRouter
from dicom_node.jobs.state import JobState, create_job

log = logging.getLogger(__name__)


class StudyReadiness:
    """Tracks when studies stop changing and turns them into jobs."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        audit: AuditTrail,
        actor: str | None = None,
        router: PolicyRouter | None = None,
    ) -> None:
        self.router = router
        self.config = config
        self.db = db
        self.audit = audit
        self.actor = actor
        self._last_seen: dict[str, tuple[float, str | None]] = {}
        self._armed: set[str] = set()
        self._lock = threading.Lock()
        self._scheduler = BackgroundScheduler(
            timezone=UTC, job_defaults={"misfire_grace_time": None, "coalesce": True}
        )

    def start(self) -> None:
        self._scheduler.start()
        self._resume_pending()

    def shutdown(self) -> None:
        self._scheduler.shutdown(wait=True)

    def instance_arrived(self, study_uid: str, calling_ae: str | None) -> None:
        """Called by the receiver after each newly stored instance (cheap: no I/O)."""
        now = time.time()
        with self._lock:
            self._last_seen[study_uid] = (now, calling_ae)
            if study_uid in self._armed:
                return
            self._armed.add(study_uid)
        self._arm(study_uid, now + self.config.stable_seconds_for(calling_ae))

    def instances_indexed(self, batch: list[PendingInstance]) -> None:
        """Indexer callback: the instances of ``batch`` are now in the index."""
        for item in batch:
            self.instance_arrived(item.facts.study_uid, item.calling_ae)

    def _arm(self, study_uid: str, at: float) -> None:
        self._scheduler.add_job(
            self._check,
            "date",
            run_date=datetime.fromtimestamp(at, UTC),
            args=[study_uid],
            id=f"ready:{study_uid}",
            replace_existing=True,
        )

    def _check(self, study_uid: str) -> None:
        with self._lock:
            last, calling_ae = self._last_seen.get(study_uid, (0.0, None))
            due = last + self.config.stable_seconds_for(calling_ae)
            if time.time() < due:
                self._arm(study_uid, due)
                return
            self._armed.discard(study_uid)
            self._last_seen.pop(study_uid, None)
        try:
            self.make_ready(study_uid)
        except Exception:
            log.exception("study %s: could not be made ready; retrying in 5 s", study_uid)
            with self._lock:
                self._armed.add(study_uid)
            self._arm(study_uid, time.time() + 5)

    def _resume_pending(self) -> None:
        """Re-arm timers for studies with instances not yet in any job (after a restart)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(
                    t.studies.c.study_uid,
                    t.studies.c.source_ae,
                    func.max(t.instances.c.received_at),
                )
                .join(t.instances, t.instances.c.study_fk == t.studies.c.id)
                .where(t.instances.c.study_version == t.studies.c.open_version)
                .group_by(t.studies.c.id)
            ).all()
        for study_uid, source_ae, last in rows:
            with self._lock:
                self._last_seen[study_uid] = (last, source_ae)
                self._armed.add(study_uid)
            self._arm(study_uid, last + self.config.stable_seconds_for(source_ae))
        if rows:
            log.info("readiness: re-armed %d pending stud(ies) from the index", len(rows))

    def make_ready(self, study_uid: str) -> list[int]:
        """Snapshot the study into one job per rule the policy chooses. Returns the new job ids."""
        job_ids: list[int] = []
        with self.db.write() as conn:
            study = conn.execute(
                select(t.studies.c.id, t.studies.c.open_version, t.studies.c.source_ae).where(
                    t.studies.c.study_uid == study_uid
                )
            ).one()
            new_count = conn.execute(
                select(func.count())
                .select_from(t.instances)
                .where(
                    t.instances.c.study_fk == study.id,
                    t.instances.c.study_version == study.open_version,
                )
            ).scalar_one()
            if new_count == 0:
                return []
            snapshot = list(
                conn.execute(
                    select(t.instances.c.id).where(
                        t.instances.c.study_fk == study.id, t.instances.c.current.is_(True)
                    )
                ).scalars()
            )
            _view, decision, plans = self.router.plan(conn, study.id) if self.router else (None, None, [])
            for plan in plans:
                job_ids.append(
                    create_job(
                        conn,
                        study_fk=study.id,
                        study_version=study.open_version,
                        pipeline=plan.pipeline,
                        destinations=plan.destinations,
                        instance_ids=snapshot,
                        actor=self.actor,
                        rule=plan.rule,
                        gate=plan.gate,
                        qc_policy=plan.qc_policy,
                        options=plan.options,
                        series_uid=plan.series_uid,
                    )
                )
            conn.execute(
                update(t.studies)
                .where(t.studies.c.id == study.id)
                .values(open_version=study.open_version + 1)
            )
        self.audit.record(
            AuditEvent.STUDY_READY,
            study_uid=study_uid,
            calling_ae=study.source_ae,
            study_version=study.open_version,
            instances=len(snapshot),
            new_instances=new_count,
            jobs=job_ids,
        )
        if not plans:
            why = "no policy is configured" if decision is None else "no rule of the policy matches"
            deciding = (
                {
                    v.rule.name: v.deciding.condition + " → " + v.deciding.seen
                    for v in decision.verdicts
                    if v.deciding
                }
                if decision is not None
                else {}
            )
            self.audit.record(
                AuditEvent.STUDY_NOT_ROUTED,
                Outcome.SUCCESS,
                study_uid=study_uid,
                calling_ae=study.source_ae,
                study_version=study.open_version,
                reason=why,
                deciding_conditions=deciding,
            )
        for job_id, plan in zip(job_ids, plans, strict=True):
            self.audit.record(
                AuditEvent.GATE_DECISION,
                study_uid=study_uid,
                job_id=job_id,
                rule=plan.rule,
                pipeline=plan.pipeline,
                gate=plan.gate,
                destinations=plan.destinations,
                stage="routing",
            )
            self.audit.record(
                AuditEvent.JOB_TRANSITION,
                study_uid=study_uid,
                job_id=job_id,
                pipeline=plan.pipeline,
                rule=plan.rule,
                study_version=study.open_version,
                from_state=None,
                to_state=JobState.QUEUED.value,
            )
        log.info(
            "study %s v%d ready: %d instance(s), jobs %s",
            study_uid,
            study.open_version,
            len(snapshot),
            job_ids or "none (no rule matched)",
        )
        return job_ids
