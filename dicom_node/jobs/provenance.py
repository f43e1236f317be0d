"""Provenance records in the audit log: one per output series of a pipeline run.

Used by the worker (routed jobs) and by ``dicom-node run`` (files on disk), so both paths
are audited the same way.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from audit import AuditEvent, AuditTrail
from pipelines.base import Pipeline, PipelineResult, StudyInput


def record_provenance(
    audit: AuditTrail,
    *,
    study: StudyInput,
    pipeline: Pipeline,
    result: PipelineResult,
    patient_id: str | None,
    actor: str | None = None,
    **extra: Any,
) -> int:
    """Append one ``provenance`` record per output series; returns how many."""
    by_series: dict[str, list[str]] = {}
    for out in result.outputs:
        by_series.setdefault(out.series_uid, []).append(out.sop_uid)
    inputs = [{"sop_uid": i.sop_uid, "sha256": i.sha256} for i in study.instances]
    for series_uid, sop_uids in by_series.items():
        audit.record(
            AuditEvent.PROVENANCE,
            study_uid=study.study_uid,
            patient_id=patient_id,
            actor=actor,
            job_id=study.job_id,
            study_version=study.study_version,
            pipeline=pipeline.name,
            pipeline_version=pipeline.version,
            model=asdict(result.model) if result.model else None,
            parameters=result.parameters,
            inputs=inputs,
            output_series_uid=series_uid,
            outputs=sop_uids,
            qc=result.qc.get(series_uid, {}),
            gate=result.gate,
            **extra,
        )
    return len(by_series)
