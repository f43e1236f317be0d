"""The per-study compliance report, read from the audit log alone.

"What came in, what ran with which model versions, what went out, where, and was it
confirmed" — assembled from the study's audit records, so the answer does not depend on
the operational database (which an operator can change) but on the verified chain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from audit.trail import AuditRecord

_STORED = ("instance-stored", "instance-new-version")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@dataclass
class DeliveryLine:
    job_id: int
    series_uid: str
    destination: str
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def result(self) -> str:
        return str(self.attempts[-1]["result"]) if self.attempts else "not attempted"

    @property
    def confirmed(self) -> str:
        last = self.attempts[-1] if self.attempts else {}
        commitment = last.get("storage_commitment")
        if commitment:
            return str(commitment)
        return "C-STORE success for every instance" if self.result == "delivered" else "no"


@dataclass
class JobLine:
    job_id: int
    pipeline: str
    study_version: int | None
    transitions: list[tuple[float, str, str | None]] = field(default_factory=list)
    provenance: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state(self) -> str:
        return self.transitions[-1][1] if self.transitions else "unknown"


@dataclass
class StudyReport:
    study_uid: str
    patient_id: str | None
    instances: set[str] = field(default_factory=set)
    new_versions: int = 0
    duplicates: int = 0
    rejected: int = 0
    senders: set[str] = field(default_factory=set)
    first_received: float | None = None
    last_received: float | None = None
    ready_versions: list[tuple[float, int, int]] = field(default_factory=list)
    jobs: dict[int, JobLine] = field(default_factory=dict)
    deliveries: dict[tuple[int, str, str], DeliveryLine] = field(default_factory=dict)
    records: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "received_instances": len(self.instances),
            "new_versions": self.new_versions,
            "duplicates": self.duplicates,
            "senders": sorted(self.senders),
            "first_received": self.first_received,
            "last_received": self.last_received,
            "jobs": [
                {
                    "job_id": j.job_id,
                    "pipeline": j.pipeline,
                    "study_version": j.study_version,
                    "state": j.state,
                    "transitions": [{"at": at, "to": to, "reason": why} for at, to, why in j.transitions],
                    "provenance": j.provenance,
                }
                for j in self.jobs.values()
            ],
            "deliveries": [
                {
                    "job_id": d.job_id,
                    "series_uid": d.series_uid,
                    "destination": d.destination,
                    "result": d.result,
                    "confirmed": d.confirmed,
                    "attempts": d.attempts,
                }
                for d in self.deliveries.values()
            ],
            "audit_records": self.records,
        }


def build_study_report(study_uid: str, records: list[AuditRecord]) -> StudyReport:
    """Fold a study's audit records (oldest first) into a report."""
    report = StudyReport(study_uid=study_uid, patient_id=None)
    for r in records:
        report.records += 1
        f = r.facts
        report.patient_id = report.patient_id or r.patient_id
        if r.event in _STORED:
            report.instances.add(str(f.get("sop_uid")))
            report.new_versions += r.event == "instance-new-version"
            if r.calling_ae:
                report.senders.add(f"{r.calling_ae}@{r.peer_host or '?'}")
            report.first_received = min(report.first_received or r.at, r.at)
            report.last_received = max(report.last_received or r.at, r.at)
        elif r.event == "instance-duplicate":
            report.duplicates += 1
        elif r.event == "study-ready":
            report.ready_versions.append((r.at, int(f.get("study_version", 0)), int(f.get("instances", 0))))
        elif r.event == "job-transition":
            job = report.jobs.setdefault(
                int(f["job_id"]), JobLine(int(f["job_id"]), str(f.get("pipeline")), f.get("study_version"))
            )
            job.transitions.append((r.at, str(f.get("to_state")), f.get("reason")))
        elif r.event == "provenance":
            job = report.jobs.setdefault(
                int(f["job_id"]), JobLine(int(f["job_id"]), str(f.get("pipeline")), f.get("study_version"))
            )
            job.provenance.append({**f, "at": r.at})
        elif r.event in ("delivery-attempt", "delivery-dead-letter") and "attempt" in f:
            key = (int(f["job_id"]), str(f.get("series_uid")), str(f.get("destination")))
            line = report.deliveries.setdefault(key, DeliveryLine(*key))
            line.attempts.append({**f, "at": r.at, "called_ae": r.called_ae, "peer_host": r.peer_host})
    return report


def render_text(report: StudyReport) -> str:
    """The human-readable report (what `dicom-node audit report --study` prints)."""
    out: list[str] = []
    add = out.append
    add(f"Study {report.study_uid}")
    add(f"  patient id: {report.patient_id or '-'}   audit records: {report.records}")
    add("")
    add("Received")
    add(
        f"  {len(report.instances)} instance(s) stored"
        + (f", {report.new_versions} new version(s)" if report.new_versions else "")
        + (f", {report.duplicates} duplicate re-send(s) stored once" if report.duplicates else "")
    )
    add(f"  from {', '.join(sorted(report.senders)) or '-'}")
    add(f"  first {_when(report.first_received)}, last {_when(report.last_received)}")
    for at, version, count in report.ready_versions:
        add(f"  ready as version {version} at {_when(at)} with {count} instance(s)")
    add("")
    add("Processing")
    if not report.jobs:
        add("  no job (no route matched, or not ready yet)")
    for job in report.jobs.values():
        add(
            f"  job {job.job_id}: pipeline {job.pipeline}, study version {job.study_version}, now {job.state}"
        )
        for at, to, why in job.transitions:
            add(f"    {_when(at)}  → {to}" + (f"  ({why})" if why else ""))
        for p in job.provenance:
            model = p.get("model")
            model_text = (
                f"{model['name']} {model['version']} (weights sha256 {model['weights_sha256']})"
                if model
                else "none — the pipeline uses no learned model"
            )
            add(f"    output series {p.get('output_series_uid')}")
            add(f"      pipeline {p.get('pipeline')} {p.get('pipeline_version')}; model: {model_text}")
            if p.get("parameters"):
                add(f"      parameters: {p['parameters']}")
            add(f"      inputs: {len(p.get('inputs', []))} instance(s) with their sha256")
            outputs = p.get("outputs", [])
            add(f"      outputs ({len(outputs)} SOP Instance UIDs):")
            out.extend(f"        {uid}" for uid in outputs)
            if p.get("qc"):
                add(f"      QC: {p['qc']}")
            add(f"      gate: {p.get('gate') or 'none (no gate for this pipeline yet)'}")
    add("")
    add("Delivered")
    if not report.deliveries:
        add("  nothing sent")
    for d in report.deliveries.values():
        add(
            f"  job {d.job_id}, series {d.series_uid} → {d.destination}: {d.result}; confirmed: {d.confirmed}"
        )
        for a in d.attempts:
            detail = "".join(f" — {a[k]}" for k in ("error", "note") if a.get(k))
            peer = f"{a.get('called_ae')}@{a.get('peer_host')}"
            add(
                f"    attempt {a.get('attempt')} at {_when(a['at'])} to {peer}: "
                f"{a.get('result')}, {a.get('instances_sent', 0)} sent{detail}"
            )
    return "\n".join(out) + "\n"
