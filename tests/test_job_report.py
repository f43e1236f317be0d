"""Tests for dicom_node.jobs.report: the runner's final verdict is stated in the job's report
before its outputs are recorded, and a report that cannot state it holds the job.

(Approval's new report in the job's outputs is tested end to end, with Orthanc, in
tests/integration/test_review_sr.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.jobs.report import final_verdict, gate_outcome
from dicom_node.lab.simulate import write_ct_series
from models.sim.phantom import PhantomSpec
from pipelines.base import GateOutcome, InputInstance, OutputInstance, PipelineResult, StudyInput
from pipelines.encode import write_outputs
from pipelines.provenance import OutputProvenance
from pipelines.uids import UidFactory
from pipelines.volume import load_series
from pipelines.writers import file_name
from pipelines.writers.report import stated_verdict
from policies.engine import GateVerdict
from policies.model import QcGates

PROVENANCE = OutputProvenance(
    pipeline="restoration",
    pipeline_version="1.0",
    model_name="ldct-restoration",
    model_version="2.0",
    weights_sha256="fedcba9876543210" * 4,
    node_version="0.1.0",
    synthetic=False,
)
QC = {"largest suspect region": (0.01, "mL"), "mean calibrated sigma in body": (9.0, "HU")}


def job(tmp_path: Path) -> tuple[PipelineResult, StudyInput]:
    """A finished job: its outputs written with the pipeline's provisional verdict."""
    study = write_ct_series(tmp_path / "ct", PhantomSpec(rows=32, columns=32, slices=3, seed=2))
    volume = load_series([pydicom.dcmread(p) for p in study.files])
    shape = volume.array.shape
    written = write_outputs(
        volume,
        provenance=PROVENANCE,
        uids=UidFactory("2.25.", "job-report"),
        derived=volume.array.copy(),
        uncertainty=np.full(shape, 9.0, dtype=np.float32),
        hallucination=np.zeros(shape, dtype=np.float32),
        suspect=np.zeros(shape, dtype=bool),
        model_card={"intended use": "tests"},
        qc=QC,
        gate=GateOutcome("release", ("QC within the rule's limits",), final=False),
        derived_description="restored low-dose CT",
        out_dir=tmp_path / "out",
    )
    outputs = tuple(
        OutputInstance(
            str(ds.SOPInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPClassUID),
            str(ds.file_meta.TransferSyntaxUID),
            tmp_path / "out" / file_name(ds),
        )
        for ds in written.datasets()
    )
    inputs = tuple(
        InputInstance(str(ds.SOPInstanceUID), volume.series_uid, str(ds.SOPClassUID), "", Path(p), "")
        for ds, p in zip(volume.datasets, study.files, strict=True)
    )
    return PipelineResult(outputs=outputs), StudyInput(1, volume.study_uid, 1, inputs)


def report_of(result: PipelineResult) -> pydicom.Dataset:
    (sr,) = [o for o in result.outputs if o.sop_class_uid == pydicom.uid.ComprehensiveSRStorage]
    return pydicom.dcmread(sr.path)


def test_the_final_verdict_is_stated_in_the_report_in_place(tmp_path: Path) -> None:
    result, study = job(tmp_path)
    draft = report_of(result)
    qc = QcGates(max_suspect_region_ml=0.05)
    verdict, after = final_verdict("auto", qc, {k: v for k, (v, _) in QC.items()}, result, study, [])
    assert verdict.action == "release" and after == result  # nothing to add: outputs as they were
    report = report_of(result)
    assert report.SOPInstanceUID == draft.SOPInstanceUID
    stated = stated_verdict(report)
    assert (stated["verdict"], stated["final"], stated["rule_gate"]) == ("RELEASED", True, "auto")
    assert stated["limits"] == {"Largest suspect region limit": (0.05, "mL")}


def test_a_destination_refusal_is_in_the_stated_verdict(tmp_path: Path) -> None:
    result, study = job(tmp_path)
    refusal = "tps (profile tps) would refuse it: not CT Image Storage"
    verdict, _ = final_verdict("auto", QcGates(), {}, result, study, [refusal])
    assert verdict == GateVerdict("hold", (refusal,))
    assert stated_verdict(report_of(result))["reasons"] == [refusal]


def test_a_report_that_cannot_state_the_verdict_holds_the_job_whatever_the_rule_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, study = job(tmp_path)

    def broken(*_args: object) -> None:
        raise ValueError("cannot")

    monkeypatch.setattr("dicom_node.jobs.report.restate_verdict", broken)
    lenient = QcGates(hold_on_failed_validation=False)
    verdict, after = final_verdict("auto", lenient, {}, result, study, [])
    assert verdict.action == "hold"
    assert verdict.reasons[0].startswith("output validation failed: ")
    assert "could not state the final verdict: cannot" in after.validation_errors[0]
    assert stated_verdict(report_of(result))["final"] is False  # still the draft, held: never sent


def test_gate_outcome_names_the_rules_gate_and_what_holds() -> None:
    outcome = gate_outcome("review", QcGates(max_mean_sigma=30.0), GateVerdict("hold", ("r",)))
    assert outcome.final and outcome.rule_gate == "review" and outcome.reasons == ("r",)
    (limit,) = outcome.limits
    assert (limit.label, limit.maximum, limit.unit) == ("mean calibrated sigma", 30.0, None)
    assert limit.figures == ("mean calibrated sigma in body", "mean uncertainty")
    assert outcome.rules[0].startswith("gate review")
    assert any(r.startswith("output validation") for r in outcome.rules)
