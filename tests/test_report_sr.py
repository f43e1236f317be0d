"""Tests for the summary report's content (pipelines.writers.report): a TID 1500 Imaging
Measurement Report with standard codes and UCUM units for the QC figures, complete local
codes for the rest, a verdict that says what it was judged on and against which limits,
the node's restated final verdict, and the approved report that names the reviewer.

Source: a 6-slice 64×64 simulated CT (dicom_node.lab.simulate), with the outputs the
writers make of stand-in maps.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.jobs.report import gate_outcome
from dicom_node.lab.simulate import write_ct_series
from models.sim.phantom import PhantomSpec
from pipelines.base import GateOutcome
from pipelines.encode import write_outputs
from pipelines.provenance import OutputProvenance, _walk_sr, provenance_of
from pipelines.uids import UidFactory
from pipelines.volume import Volume, load_series
from pipelines.writers import file_name, save
from pipelines.writers.common import LOCAL_SCHEME
from pipelines.writers.report import (
    Approval,
    approved_report,
    is_summary_report,
    reported_figures,
    restate_verdict,
    stated_verdict,
)
from policies.engine import gate_output
from policies.model import QcGates

DCIODVFY = Path("/usr/bin/dciodvfy")
PROVENANCE = OutputProvenance(
    pipeline="restoration",
    pipeline_version="1.0",
    model_name="ldct-restoration",
    model_version="2.0",
    weights_sha256="0123456789abcdef" * 4,
    node_version="0.1.0",
    synthetic=False,
)
#: The figures the restoration pipeline reports, in the units it gives them ("HU").
QC: dict[str, tuple[float, str]] = {
    "mean calibrated sigma in body": (7.25, "HU"),
    "hallucination score p99": (3.1, "1"),
    "suspect fraction": (0.0012, "1"),
    "suspect volume": (0.42, "mL"),
    "largest suspect region": (0.21, "mL"),
    "suspect threshold": (6.0, "1"),
    "a figure some future pipeline reports, with a long name": (1.5, "1"),
}
LIMITS = QcGates(max_suspect_region_ml=0.05, max_mean_sigma=20.0, max_suspect_fraction=0.01)
PROVISIONAL = GateOutcome("hold", ("largest suspect region 0.21 mL > 0.05 mL",), final=False)


def final(gate: str = "auto", problems: tuple[str, ...] = ()) -> GateOutcome:
    figures = {k: v for k, (v, _unit) in QC.items()}
    return gate_outcome(gate, LIMITS, gate_output(gate, LIMITS, figures, list(problems)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    study = write_ct_series(tmp_path_factory.mktemp("ct"), PhantomSpec(rows=64, columns=64, slices=6, seed=5))
    return load_series([pydicom.dcmread(p) for p in study.files])


@pytest.fixture(scope="module")
def draft(volume: Volume, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Dataset, Path]]:
    shape = volume.array.shape
    suspect = np.zeros(shape, dtype=bool)
    suspect[3, 30:34, 30:34] = True
    out = tmp_path_factory.mktemp("outputs")
    written = write_outputs(
        volume,
        provenance=PROVENANCE,
        uids=UidFactory("2.25.", "report-sr"),
        derived=volume.array.copy(),
        uncertainty=np.full(shape, 7.0, dtype=np.float32),
        hallucination=np.where(suspect, 8.0, 0.5).astype(np.float32),
        suspect=suspect,
        model_card={"intended use": "Noise reduction of low-dose CT.", "training data": "Simulated."},
        qc=QC,
        gate=PROVISIONAL,
        derived_description="restored low-dose CT",
        out_dir=out,
    )
    yield written.report, out / file_name(written.report)


def local_codes(ds: Dataset) -> Iterator[Dataset]:
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            if item.get("CodingSchemeDesignator") == LOCAL_SCHEME and "CodeValue" in item:
                yield item
            yield from local_codes(item)


def units(ds: Dataset) -> set[str]:
    return {
        str(item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
        for _, item in _walk_sr([ds])
        if item.get("ValueType") == "NUM"
    }


def dciodvfy_errors(path: Path) -> list[str]:
    if not DCIODVFY.exists():
        pytest.skip(f"not installed: {DCIODVFY}")
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def text_of(ds: Dataset) -> str:
    return " ".join(str(item.get("TextValue", "")) for _, item in _walk_sr([ds]))


# --------------------------------------------------------------------------- TID 1500


def test_the_report_is_a_tid_1500_measurement_report(draft: tuple[Dataset, Path]) -> None:
    sr, _ = draft
    title = sr.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("126000", "DCM")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    procedure = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058")
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"  # LN CT unspecified body region
    observer = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    assert observer["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"  # a device


def test_qc_figures_are_measurements_with_standard_codes_and_ucum(draft: tuple[Dataset, Path]) -> None:
    sr, _ = draft
    figures = reported_figures(sr)
    expected = {k: (v, "[hnsf'U]" if u == "HU" else u) for k, (v, u) in QC.items()}
    assert figures == expected
    assert "HU" not in units(sr)  # UCUM: [hnsf'U]
    measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    groups = {
        next(c.TextValue for c in g.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "112039"): g
        for g in measurements.ContentSequence
    }
    suspect = groups["AI suspect regions (possible hallucination)"]
    assert suspect.ContentTemplateSequence[0].TemplateIdentifier == "1411"
    names = [
        (c.ConceptNameCodeSequence[0].CodingSchemeDesignator, c.ConceptNameCodeSequence[0].CodeValue)
        for c in suspect.ContentSequence
        if c.ValueType == "NUM"
    ]
    assert names.count(("SCT", "118565006")) == 2  # Volume, and Volume with derivation Maximum
    segment = next(c for c in suspect.ContentSequence if c.ValueType == "IMAGE")
    facts = provenance_of(sr)
    assert segment.ReferencedSOPSequence[0].ReferencedSegmentNumber == 1
    assert (
        segment.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        in facts["referenced_output_sop_instance_uids"]
    )
    sigma = groups["AI calibrated uncertainty, inside the body"]
    (value,) = [c for c in sigma.ContentSequence if c.ValueType == "NUM"]
    assert value.ConceptNameCodeSequence[0].CodeValue == "386136009"  # SCT Standard Deviation
    assert value.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "373098007"  # derivation Mean
    algorithm = {c.ConceptNameCodeSequence[0].CodeMeaning: c for c in sigma.ContentSequence}
    assert algorithm["Algorithm Name"].TextValue == PROVENANCE.model_name


def test_local_codes_are_complete_short_and_declared(draft: tuple[Dataset, Path]) -> None:
    sr, _ = draft
    codes = {str(c.CodeValue): str(c.CodeMeaning) for c in local_codes(sr)}
    assert codes and all(len(v) <= 16 for v in codes)
    assert "QC-MEAN-CALIBRAT" not in codes  # the truncated value of the old report
    future = [v for v, meaning in codes.items() if meaning.startswith("a figure some future")]
    assert len(future) == 1 and future[0].startswith("QC-") and len(future[0]) == 11
    assert {"HALLUC-SCORE-P99", "SUSPECT-FRACTION", "GATE-VERDICT", "HELD"} <= set(codes)
    declared = [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence]
    assert LOCAL_SCHEME in declared


# --------------------------------------------------------------------------- the verdict


def test_the_pipeline_report_says_its_verdict_is_provisional(draft: tuple[Dataset, Path]) -> None:
    sr, _ = draft
    stated = stated_verdict(sr)
    assert stated["verdict"] == "HELD" and stated["final"] is False
    assert stated["reasons"] == list(PROVISIONAL.reasons)
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    assert "before output validation" not in text_of(sr)


def test_the_restated_report_states_the_final_verdict_and_its_limits(draft: tuple[Dataset, Path]) -> None:
    sr, _ = draft
    released = restate_verdict(sr, final("auto"))
    assert released.SOPInstanceUID == sr.SOPInstanceUID  # the draft never left: same instance
    stated = stated_verdict(released)
    # the fixture's figures exceed the region limit: the final verdict holds
    assert stated["verdict"] == "HELD" and stated["final"] is True and stated["rule_gate"] == "auto"
    assert stated["reasons"] == ["largest suspect region 0.21 mL > 0.05 mL"]
    assert stated["limits"] == {
        "Suspect fraction limit": (0.01, "1"),
        "Largest suspect region limit": (0.05, "mL"),
        "Mean calibrated sigma limit": (20.0, "[hnsf'U]"),  # the unit of the figure it reads
    }
    assert any("output validation" in rule for rule in stated["rules"])
    assert released.PreliminaryFlag == "PRELIMINARY"  # held: not final until reviewed
    relaxed = QcGates(max_suspect_region_ml=1.0)
    figures = {k: v for k, (v, _unit) in QC.items()}
    ok = gate_outcome("auto", relaxed, gate_output("auto", relaxed, figures, []))
    auto = stated_verdict(restate_verdict(sr, ok))
    assert (auto["verdict"], auto["reasons"]) == ("RELEASED", ["QC within the rule's limits"])
    assert restate_verdict(sr, ok).PreliminaryFlag == "FINAL"
    assert "before output validation" not in text_of(restate_verdict(sr, ok))


def test_a_failed_validation_is_a_reason_in_the_restated_report(draft: tuple[Dataset, Path]) -> None:
    sr, _ = draft
    stated = stated_verdict(restate_verdict(sr, final("review", ("x.dcm: cannot be read back",))))
    assert stated["rule_gate"] == "review" and stated["verdict"] == "HELD"
    assert "the rule requires review" in stated["reasons"]
    assert "output validation failed: x.dcm: cannot be read back" in stated["reasons"]


# --------------------------------------------------------------------------- approval


def approve(sr: Dataset, note: str | None = "checked the disc: a vessel") -> Dataset:
    at = dt.datetime(2025, 3, 4, 10, 30, tzinfo=dt.UTC)
    approval = Approval(reviewer="dr-physicist", at=at, note=note)
    return approved_report(restate_verdict(sr, final()), approval, sop_instance_uid="2.25.12345")


def test_the_approved_report_names_reviewer_time_and_note_beside_the_held_verdict(
    draft: tuple[Dataset, Path],
) -> None:
    sr, _ = draft
    approved = approve(sr)
    assert approved.SOPInstanceUID == "2.25.12345" != sr.SOPInstanceUID
    assert approved.SeriesInstanceUID == sr.SeriesInstanceUID and approved.InstanceNumber == 2
    assert (approved.VerificationFlag, approved.PreliminaryFlag, approved.CompletionFlag) == (
        "VERIFIED",
        "FINAL",
        "COMPLETE",
    )
    (observer,) = approved.VerifyingObserverSequence
    assert str(observer.VerifyingObserverName) == "dr-physicist"
    assert str(observer.VerificationDateTime).startswith("20250304103000")
    predecessor = (
        approved.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    )
    assert predecessor.ReferencedSOPInstanceUID == sr.SOPInstanceUID
    stated = stated_verdict(approved)
    assert stated["verdict"] == "HELD" and stated["reasons"] == ["largest suspect region 0.21 mL > 0.05 mL"]
    assert stated["review"] == {
        "decision": "APPROVED",
        "reviewer": "dr-physicist",
        "at": "20250304103000+0000",
        "note": "checked the disc: a vessel",
    }
    assert "Largest suspect region limit" in stated["limits"]
    assert is_summary_report(approved) and provenance_of(approved)["pipeline"] == "restoration"


def test_only_a_final_held_report_can_be_approved(draft: tuple[Dataset, Path]) -> None:
    sr, _ = draft
    approval = Approval(reviewer="dr-physicist", at=dt.datetime.now().astimezone())
    with pytest.raises(ValueError, match="provisional"):
        approved_report(sr, approval, sop_instance_uid="2.25.1")
    released = restate_verdict(sr, GateOutcome("release", ("QC within the rule's limits",)))
    with pytest.raises(ValueError, match="RELEASED"):
        approved_report(released, approval, sop_instance_uid="2.25.1")
    with pytest.raises(ValueError, match="no reviewer"):
        approved_report(restate_verdict(sr, final()), Approval(" ", approval.at), sop_instance_uid="2.25.1")


def test_a_plain_string_verdict_is_read_as_provisional(volume: Volume, draft: tuple[Dataset, Path]) -> None:
    sr, _ = draft
    stated = stated_verdict(restate_verdict(sr, "shadow: trial run"))  # type: ignore[arg-type]
    assert (stated["verdict"], stated["final"], stated["reasons"]) == ("SHADOW", False, ["shadow: trial run"])
    with pytest.raises(ValueError, match="does not start with"):
        restate_verdict(sr, "maybe")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- dciodvfy


def test_draft_restated_and_approved_reports_pass_dciodvfy(
    draft: tuple[Dataset, Path], tmp_path: Path
) -> None:
    sr, path = draft
    reports: dict[str, Any] = {
        "draft": path,
        "restated": save([restate_verdict(sr, final())], tmp_path / "restated")[0],
        "approved": save([approve(sr, note="Ärztin: ok … siehe Befund")], tmp_path / "approved")[0],
    }
    problems = {name: dciodvfy_errors(p) for name, p in reports.items()}
    assert problems == {"draft": [], "restated": [], "approved": []}
    reread = pydicom.dcmread(reports["approved"])
    assert stated_verdict(reread)["review"]["note"] == "Ärztin: ok … siehe Befund"
