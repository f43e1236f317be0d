"""The job's report as delivered: restated with the node's final verdict, and after review
a new, verified one in its place.

A pipeline's summary report (:mod:`pipelines.writers.report`) states the gate's
provisional verdict on the QC figures alone. Before the runner records a job's outputs,
:func:`final_verdict` decides the gate's final verdict (QC limits, output validation,
destination checks) and rewrites each report in place with it — the rule's gate, the
reasons, the limits it was judged against — and validates the rewritten report: the same
instance, since the draft never left the node. A report that cannot be restated, or does
not validate, holds the job like any failed validation.

When a reviewer approves a held job, :func:`approve_reports` writes a new instance in the
report's series (Verification Flag VERIFIED, the reviewer as Verifying Observer, the held
report as predecessor) and puts it in the job's outputs in the held one's place, in the
transaction that queues the deliveries: the outbox sends what ``job_outputs`` lists, so
the held report is never sent.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ComprehensiveSRStorage
from sqlalchemy import Connection, select, update

from dicom_node.db import schema as t
from dicom_node.safelog import describe_exception
from pipelines.base import GateLimit, GateOutcome, OutputInstance, PipelineResult, RunEnvironment, StudyInput
from pipelines.stages import Context
from pipelines.uids import derive_uid
from pipelines.validate import validate_outputs
from pipelines.writers import NODE_MANUFACTURER, file_name, save
from pipelines.writers.report import Approval, approved_report, is_summary_report, restate_verdict
from policies.engine import GateVerdict, gate_output, qc_limits
from policies.model import QcGates

log = logging.getLogger(__name__)


def gate_outcome(rule_gate: str, qc: QcGates, verdict: GateVerdict) -> GateOutcome:
    """The gate's final verdict as a report states it: the rule's gate, the reasons, the QC
    limits it was judged against and what holds whatever the figures say."""
    rules = {
        "review": "gate review: every output is held for a reviewer",
        "shadow": "gate shadow: the outputs are recorded and never sent",
    }.get(rule_gate, "gate auto: released when no limit is exceeded and nothing else holds")
    holds = [rules, "destination checks: a destination that would refuse the outputs holds them"]
    if qc.hold_on_failed_validation:
        holds.append("output validation: any problem with a written object holds the outputs")
    return GateOutcome(
        verdict.action,
        tuple(verdict.reasons),
        rule_gate=rule_gate,
        limits=tuple(GateLimit(q.label, q.maximum, q.figures, q.unit) for q in qc_limits(qc)),
        rules=tuple(holds),
        final=True,
    )


def _reports(outputs: Collection[OutputInstance], inputs: Collection[str]) -> list[OutputInstance]:
    """The outputs that may be summary reports of this node (never one of the job's inputs,
    e.g. an SR the ``forward`` pipeline passes on)."""
    return [o for o in outputs if o.sop_class_uid == ComprehensiveSRStorage and o.sop_uid not in inputs]


def _restate(result: PipelineResult, study: StudyInput, outcome: GateOutcome) -> list[str]:
    """Rewrite each report among the outputs with ``outcome`` and validate it; the problems."""
    problems: list[str] = []
    inputs = {i.sop_uid for i in study.instances}
    for out in _reports(result.outputs, inputs):
        try:
            draft = pydicom.dcmread(out.path)
        except (OSError, InvalidDicomError):
            continue  # not a report of ours to restate (reading the outputs back is validation's)
        if not is_summary_report(draft):
            continue
        try:
            report = restate_verdict(draft, outcome)
            if out.path.name != file_name(report):
                raise ValueError(f"it would be saved as {file_name(report)}, not {out.path.name}")
            save([report], out.path.parent)
        except (OSError, ValueError, InvalidDicomError) as exc:
            problems.append(f"{out.path.name}: the report could not state the final verdict: {exc}")
            continue
        except Exception as exc:  # a bug: hold the job with the reason rather than crash the worker
            log.error("job %d: restating report %s failed", study.job_id, out.sop_uid, exc_info=True)
            why = describe_exception(exc)
            problems.append(f"{out.path.name}: internal error restating the report: {why}")
            continue
        checked = Context(study=study, env=RunEnvironment(workdir=out.path.parent), outputs=(out,))
        problems += [f"restated report: {p}" for p in validate_outputs(checked)]
    return problems


def final_verdict(
    rule_gate: str,
    qc: QcGates,
    figures: Mapping[str, float],
    result: PipelineResult,
    study: StudyInput,
    destination_problems: list[str],
) -> tuple[GateVerdict, PipelineResult]:
    """The gate's final verdict on a finished job, stated in its report(s).

    Returns the verdict and the result, whose validation errors gain any problem with
    restating the report; such a problem holds the job whatever the rule says of failed
    validations (a report that does not state the verdict never leaves), and the report is
    restated once more to say so.
    """
    verdict = gate_output(
        rule_gate,  # type: ignore[arg-type]  # validated by the policy when the job was made
        qc,
        figures,
        list(result.validation_errors),
        destination_problems=destination_problems,
    )
    problems = _restate(result, study, gate_outcome(rule_gate, qc, verdict))
    if problems:
        result = replace(result, validation_errors=(*result.validation_errors, *problems))
        verdict = gate_output(
            rule_gate,  # type: ignore[arg-type]
            qc,
            figures,
            list(result.validation_errors),
            destination_problems=destination_problems,
        )
        if verdict.action == "release":
            verdict = GateVerdict("hold", tuple(f"output validation failed: {p}" for p in problems))
        _restate(result, study, gate_outcome(rule_gate, qc, verdict))
    return verdict, result


@dataclass(frozen=True)
class ApprovedReport:
    """A held job's report and the approved one that replaced it in the job's outputs."""

    held_sop_uid: str
    sop_uid: str
    path: Path


def approve_reports(
    conn: Connection,
    job_id: int,
    study_uid: str,
    *,
    reviewer: str,
    note: str | None,
    uid_root: str,
    at: dt.datetime | None = None,
) -> list[ApprovedReport]:
    """Write the approved report of each of the job's summary reports and put it in the job's
    outputs in the held one's place (within the caller's transaction).

    The new instance's UID is derived from the held one's, so an approval tried again after
    a failure writes the same object.

    Raises
    ------
    ValueError
        A report cannot be approved (it does not state a final held verdict, e.g. an older
        node wrote it), cannot be read, or the approved one does not validate.
    """
    when = at or dt.datetime.now().astimezone()
    inputs = set(
        conn.execute(
            select(t.instances.c.sop_uid)
            .join(t.job_inputs, t.job_inputs.c.instance_fk == t.instances.c.id)
            .where(t.job_inputs.c.job_fk == job_id)
        ).scalars()
    )
    rows = conn.execute(
        select(t.job_outputs).where(
            t.job_outputs.c.job_fk == job_id, t.job_outputs.c.sop_class_uid == ComprehensiveSRStorage
        )
    ).all()
    approved: list[ApprovedReport] = []
    for row in rows:
        if row.sop_uid in inputs:
            continue
        path = Path(row.path)
        try:
            held = pydicom.dcmread(path)
        except (OSError, InvalidDicomError) as exc:
            raise ValueError(f"the report {path.name} cannot be read: {exc}") from None
        if not is_summary_report(held):
            if str(held.get("Manufacturer", "")) == NODE_MANUFACTURER:  # an older node's: fail closed
                raise ValueError(f"the report {path.name} was written before reports stated their verdict")
            continue
        sop_uid = derive_uid(uid_root, "approved-report", row.sop_uid)
        report = approved_report(
            held, Approval(reviewer=reviewer, at=when, note=note), sop_instance_uid=sop_uid
        )
        (saved,) = save([report], path.parent)
        out = OutputInstance(
            sop_uid=sop_uid,
            series_uid=row.series_uid,
            sop_class_uid=row.sop_class_uid,
            transfer_syntax_uid=str(report.file_meta.TransferSyntaxUID),
            path=saved,
        )
        study = StudyInput(job_id=job_id, study_uid=study_uid, study_version=0, instances=())
        checked = Context(study=study, env=RunEnvironment(workdir=path.parent), outputs=(out,))
        problems = validate_outputs(checked)
        if problems:
            raise ValueError(f"the approved report does not validate: {'; '.join(problems)}")
        conn.execute(
            update(t.job_outputs)
            .where(t.job_outputs.c.id == row.id)
            .values(sop_uid=sop_uid, path=str(saved), transfer_syntax_uid=out.transfer_syntax_uid)
        )
        approved.append(ApprovedReport(row.sop_uid, sop_uid, saved))
    return approved
