"""A ready study becomes jobs: one per rule the policy chooses (one per series it takes, for
a rule with ``select: {each: true}``), on a frozen snapshot.

:meth:`JobIntake.study_ready` runs in one transaction: it snapshots the study's current
instances into a job per plan of the router (with the rule's gate, QC limits, options and
selected series frozen into the job) and opens the next study version, so an instance
arriving later can only ever join a *new* job, never a finished one. The completeness
timers of :mod:`dicom_node.ingest.readiness` call it.

Only acquired instances open a study version: the node's own outputs sent back to it and
priors retrieved from an archive never do, and outputs of another AI node only when a rule
of the policy accepts them (``ai_outputs: accept``). A job's snapshot never holds the
node's own outputs or priors.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select, update

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.db.engine import Database
from dicom_node.jobs.routing import PolicyRouter, acquired_only, not_own_output
from dicom_node.jobs.state import JobState, create_job

log = logging.getLogger(__name__)


class JobIntake:
    """Turns ready studies into jobs by the policy ``router`` holds (None: no policy)."""

    def __init__(
        self, db: Database, audit: AuditTrail, router: PolicyRouter | None = None, actor: str | None = None
    ) -> None:
        self.db = db
        self.audit = audit
        self.router = router
        self.actor = actor

    def study_ready(self, study_uid: str) -> list[int]:
        """Snapshot the study into one job per plan of the policy (per rule, or per series of a
        rule with ``select: {each: true}``). Returns the new job ids."""
        job_ids: list[int] = []
        with audited_write(self.db, self.audit) as work:
            conn = work.conn
            study = conn.execute(
                select(t.studies.c.id, t.studies.c.open_version, t.studies.c.source_ae).where(
                    t.studies.c.study_uid == study_uid
                )
            ).one()
            opens_version = (
                not_own_output() if self.router and self.router.accepts_ai_outputs() else acquired_only()
            )
            new_count = conn.execute(
                select(func.count())
                .select_from(t.instances)
                .where(
                    t.instances.c.study_fk == study.id,
                    t.instances.c.study_version == study.open_version,
                    opens_version,
                )
            ).scalar_one()
            if new_count == 0:
                return []
            current = select(t.instances.c.id).where(
                t.instances.c.study_fk == study.id, t.instances.c.current.is_(True)
            )
            snapshot = list(conn.execute(current.where(acquired_only())).scalars())
            with_ai = list(conn.execute(current.where(not_own_output())).scalars())
            _view, decision, all_plans = self.router.plan(conn, study.id) if self.router else (None, None, [])
            plans = []
            skipped: set[tuple[str, str]] = set()  # (rule, destination): once, whatever its series
            for plan in all_plans:
                for name, ae in plan.skipped_destinations:
                    if (plan.rule, name) in skipped:
                        continue
                    skipped.add((plan.rule, name))
                    work.record(
                        AuditEvent.RETURN_TO_SENDER_SKIPPED,
                        Outcome.SUCCESS,
                        study_uid=study_uid,
                        calling_ae=study.source_ae,
                        rule=plan.rule,
                        destination=name,
                        ae_title=ae,
                        reason=f"{name} ({ae}) sent this study; the rule does not say return_to_sender: true",
                    )
                if plan.skipped_destinations and not plan.destinations:
                    continue  # its only destinations are the sender: no job
                plans.append(plan)
            for plan in plans:
                job_ids.append(
                    create_job(
                        conn,
                        study_fk=study.id,
                        study_version=study.open_version,
                        pipeline=plan.pipeline,
                        destinations=plan.destinations,
                        instance_ids=with_ai if plan.include_ai_outputs else snapshot,
                        actor=self.actor,
                        rule=plan.rule,
                        gate=plan.gate,
                        qc_policy=plan.qc_policy,
                        options=plan.options,
                        series_uid=plan.series_uid,
                        priors=plan.priors,
                        urgency=plan.urgency,
                    )
                )
            conn.execute(
                update(t.studies)
                .where(t.studies.c.id == study.id)
                .values(open_version=study.open_version + 1)
            )
            work.record(
                AuditEvent.STUDY_READY,
                study_uid=study_uid,
                calling_ae=study.source_ae,
                study_version=study.open_version,
                instances=len(snapshot),
                new_instances=new_count,
                jobs=job_ids,
                # which series each job takes (several jobs of one rule: one per series)
                job_series=[
                    {
                        "job_id": job_id,
                        "rule": plan.rule,
                        "series_uid": plan.series_uid,
                        "urgency": plan.urgency,
                    }
                    for job_id, plan in zip(job_ids, plans, strict=True)
                ],
            )
            if not plans:
                why = "no policy is configured" if decision is None else "no rule of the policy matches"
                if all_plans:
                    why = "every matching rule's destinations are the AE that sent the study"
                deciding = (
                    {
                        v.rule.name: v.deciding.condition + " → " + v.deciding.seen
                        for v in decision.verdicts
                        if v.deciding
                    }
                    if decision is not None
                    else {}
                )
                work.record(
                    AuditEvent.STUDY_NOT_ROUTED,
                    Outcome.SUCCESS,
                    study_uid=study_uid,
                    calling_ae=study.source_ae,
                    study_version=study.open_version,
                    reason=why,
                    deciding_conditions=deciding,
                )
            for job_id, plan in zip(job_ids, plans, strict=True):
                work.record(
                    AuditEvent.GATE_DECISION,
                    study_uid=study_uid,
                    job_id=job_id,
                    rule=plan.rule,
                    pipeline=plan.pipeline,
                    gate=plan.gate,
                    destinations=plan.destinations,
                    series_uid=plan.series_uid,
                    stage="routing",
                )
                work.record(
                    AuditEvent.JOB_TRANSITION,
                    study_uid=study_uid,
                    job_id=job_id,
                    pipeline=plan.pipeline,
                    rule=plan.rule,
                    study_version=study.open_version,
                    from_state=None,
                    to_state=(JobState.FETCHING_PRIORS if plan.priors else JobState.QUEUED).value,
                )
        log.info(
            "study %s v%d ready: %d instance(s), jobs %s",
            study_uid,
            study.open_version,
            len(snapshot),
            job_ids or "none (no rule matched)",
        )
        return job_ids
