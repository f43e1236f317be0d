"""What runs when a job's input is refused: the rule's ``fallback``, as a job of its own.

A pipeline refuses an input outside its model's declared domain
(:class:`pipelines.base.InputRefused`); the job ends ``refused`` with the reasons. The
rule that made it said what happens then (``fallback``, frozen into the job's options):

- ``nothing`` (the default): nothing more;
- ``classical``: the shipped non-AI pipeline for the task (``pipelines.registry.CLASSICAL_OF``:
  restoration → denoise-classical). A pipeline without one (``sct``: no classical synthetic
  CT ships) behaves as ``nothing``, and the refusal says so;
- ``forward``: the refused series, unchanged, to the rule's destinations.

The follow-up is a new job, created in the transaction that refuses the first (so both
or neither are recorded): same study version, destinations, gate, QC limits and options,
on the refused job's input snapshot (``forward``: the refused series only), with
``fallback_of`` naming the refused job. It is a job like any other — claimed, run, gated,
delivered, visible and audited on its own — but never has a fallback of its own, so a
refusal cannot chain. Why a job of its own and not a second run inside the first: the
job table stays one pipeline per job (its provenance, outputs and deliveries belong to
the pipeline that made them), and a restart finds the follow-up queued like any job.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from audit import AuditEvent
from dicom_node.db import schema as t
from dicom_node.db.audited import AuditedWrite
from dicom_node.jobs.state import JobRef, JobState, create_job
from pipelines.base import InputRefused
from pipelines.registry import CLASSICAL_OF
from policies.model import FALLBACK_OF_OPTION, FALLBACK_OPTION


def fallback_pipeline(pipeline: str, fallback: str) -> tuple[str | None, str]:
    """The pipeline a refused ``pipeline`` job falls back to under ``fallback`` (None:
    none), and what to say when none runs."""
    if fallback == "forward":
        return "forward", ""
    if fallback == "classical":
        classical = CLASSICAL_OF.get(pipeline)
        if classical is None:
            return None, f"fallback classical: {pipeline} has no classical pipeline, so nothing runs instead"
        return classical, ""
    return None, "fallback nothing: nothing runs instead"


def queue_fallback(work: AuditedWrite, job: JobRef, refused: InputRefused, actor: str | None) -> str:
    """Create the refused ``job``'s fallback job, if its rule has one, in ``work``'s
    transaction (with its ``job-transition`` record); returns what happened, in words,
    for the refused job's reason."""
    row = work.conn.execute(select(t.jobs).where(t.jobs.c.id == job.job_id)).one()
    options: dict[str, Any] = dict(row.options or {})
    if FALLBACK_OF_OPTION in options:
        return f"no further fallback (this job is the fallback of job {options[FALLBACK_OF_OPTION]})"
    fallback = str(options.pop(FALLBACK_OPTION, "nothing"))
    pipeline, none_runs = fallback_pipeline(job.pipeline, fallback)
    if pipeline is None:
        return none_runs
    earlier = [
        other.id
        for other in work.conn.execute(
            select(t.jobs.c.id, t.jobs.c.options).where(
                t.jobs.c.study_fk == row.study_fk, t.jobs.c.pipeline == pipeline, t.jobs.c.id > job.job_id
            )
        )
        if (other.options or {}).get(FALLBACK_OF_OPTION) == job.job_id
    ]
    if earlier:  # refused again after an operator ran it again: its fallback ran the first time
        return (
            f"fallback {fallback}: job {earlier[0]} ({pipeline}) was queued at its first refusal; not again"
        )
    inputs = select(t.job_inputs.c.instance_fk).where(t.job_inputs.c.job_fk == job.job_id)
    if pipeline == "forward" and refused.series_uid:
        inputs = (
            inputs.join(t.instances, t.instances.c.id == t.job_inputs.c.instance_fk)
            .join(t.series, t.series.c.id == t.instances.c.series_fk)
            .where(t.series.c.series_uid == refused.series_uid)
        )
    instance_ids = list(work.conn.execute(inputs.order_by(t.job_inputs.c.instance_fk)).scalars())
    follow_up = create_job(
        work.conn,
        study_fk=row.study_fk,
        study_version=row.study_version,
        pipeline=pipeline,
        destinations=list(row.destinations),
        instance_ids=instance_ids,
        actor=actor,
        rule=row.rule,
        gate=row.gate,
        qc_policy=dict(row.qc_policy or {}),
        options={**options, FALLBACK_OF_OPTION: job.job_id},
        series_uid=refused.series_uid or row.series_uid,
        urgency=int(row.urgency),
    )
    work.record(
        AuditEvent.JOB_TRANSITION,
        actor=actor,
        study_uid=job.study_uid,
        patient_id=job.patient_id,
        job_id=follow_up,
        pipeline=pipeline,
        rule=row.rule,
        study_version=job.study_version,
        from_state=None,
        to_state=JobState.QUEUED.value,
        reason=f"fallback {fallback} of job {job.job_id} (its input was refused)",
        fallback_of=job.job_id,
    )
    return f"fallback {fallback}: job {follow_up} ({pipeline}) queued"
