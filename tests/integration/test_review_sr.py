"""Issue 14, item 7 end to end: the SR that reaches the PACS tells the truth.

A held job (the gate fire drill: a 6 mm disc the input does not contain) is approved with
``dicom-node review approve``: the one SR of the job that reaches Orthanc is a new,
verified instance that names the reviewer, when and the note, beside the held verdict's
reasons and the limits it was judged against — the held SR never arrives. A job the gate
releases reaches Orthanc with an SR that states the final verdict (after output validation
and the destination checks), not a provisional one. ``dciodvfy`` finds no error in the SR
and the SEG of either.

The studies are SIMULATED low-dose CTs (6 slices, 256²).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from pipelines.provenance import _walk_sr
from pipelines.writers.report import stated_verdict
from policies.loader import load_policy
from tests.conftest import audit_rows, db_rows, node_config, require
from tests.peers import DCIODVFY, STORESCU, NodeProcess, Orthanc, storescu

pytestmark = pytest.mark.integration

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
#: dicom3tools older than Synthetic Data (0008,001C) name it (Debian bookworm's build).
STALE_SYNTHETIC_DATA_ERROR = "Error - Attribute with an even group number is not a recognized standard"


def default_qc() -> dict[str, Any]:
    """The shipped default policy's QC limits for low-dose CT."""
    rule = load_policy(DEFAULT_POLICY).policy.rules[0]
    return {k: v for k, v in rule.qc.model_dump().items() if v is not None}


def two_rules() -> str:
    """The fire drill for studies from CT_DRILL, the plain rule for CT_PLAIN: both restoration
    to the PACS under the default QC limits."""

    def rule(name: str, caller: str, priority: int, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "priority": priority,
            "match": {"calling_ae": [caller], "modality": "CT"},
            "pipeline": "restoration",
            "destinations": ["pacs"],
            "gate": "auto",
            "qc": default_qc(),
            **extra,
        }

    rules = [
        rule("fire-drill", "CT_DRILL", 20, options={"inject_hallucination_hu": 200}),
        rule("plain", "CT_PLAIN", 10),
    ]
    return str(yaml.safe_dump({"version": 1, "mode": "first-match", "rules": rules}, sort_keys=False))


def simulate(out: Path, seed: int) -> Path:
    made = subprocess.run(
        [sys.executable, "-m", "dicom_node", "simulate", "ldct", "--out", str(out)]
        + ["--slices", "6", "--size", "256", "--dose", "0.25", "--seed", str(seed)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    return out / "low-dose"


def study_uid_of(series_dir: Path) -> str:
    return str(pydicom.dcmread(next(series_dir.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [e for e in lines if e.startswith("Error") and not e.startswith(STALE_SYNTHETIC_DATA_ERROR)]


def received(orthanc: Orthanc, study_uid: str, modality: str, into: Path) -> list[Path]:
    """The instances of ``modality`` Orthanc holds for the study, as files under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    files = []
    for series in orthanc.series_of_study(study_uid):
        if series["MainDicomTags"]["Modality"] != modality:
            continue
        for instance in orthanc.instances_of_series(series["MainDicomTags"]["SeriesInstanceUID"]):
            path = into / f"{instance['ID']}.dcm"
            path.write_bytes(orthanc.instance_file(instance["ID"]))
            files.append(path)
    return files


def job_report(node: NodeProcess, job_id: int) -> Path:
    (path,) = [
        Path(p)
        for (p,) in db_rows(
            node,
            "select path from job_outputs where job_fk = ? and sop_class_uid = ?",
            (job_id, pydicom.uid.ComprehensiveSRStorage),
        )
    ]
    return path


def states(node: NodeProcess) -> dict[int, str]:
    return dict(db_rows(node, "select id, state from jobs"))


def test_approved_sr_names_the_reviewer_and_the_held_reasons_and_no_stale_sr_arrives(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    require(STORESCU, str(DCIODVFY))
    drill = simulate(tmp_path / "drill", seed=31)
    plain = simulate(tmp_path / "plain", seed=32)
    node = NodeProcess(tmp_path / "node", node_config(orthanc, stable_seconds=1), policy=two_rules()).start()
    try:
        assert storescu(drill, node.port, node.ae_title, calling="CT_DRILL").returncode == 0
        node.wait_for(lambda: states(node) == {1: "held"}, timeout=240, what="the drill held")
        reason = db_rows(node, "select reason from jobs where id = 1")[0][0]
        held_reasons = reason.removeprefix("held for review: ").split("; ")
        assert any(r.startswith("largest suspect region") for r in held_reasons), reason

        # the held job's SR already states the final verdict (never the pipeline's provisional one)
        held_sr = pydicom.dcmread(job_report(node, 1))
        held = stated_verdict(held_sr)
        assert (held["verdict"], held["final"], held["rule_gate"]) == ("HELD", True, "auto")
        assert held["reasons"] == held_reasons
        assert held["limits"]["Largest suspect region limit"] == (default_qc()["max_suspect_region_ml"], "mL")
        assert held_sr.PreliminaryFlag == "PRELIMINARY" and held_sr.VerificationFlag == "UNVERIFIED"
        assert orthanc.statistics()["CountInstances"] == 0

        note = "disc checked against the original: a vessel"
        approved = node.cli("review", "approve", "1", "--reviewer", "dr-physicist", "--note", note)
        assert "approved by dr-physicist" in approved.stdout
        node.wait_for(lambda: states(node)[1] == "delivered", timeout=120, what="job 1 delivered")

        study = study_uid_of(drill)
        (sr_path,) = received(orthanc, study, "SR", tmp_path / "orthanc-sr")  # exactly one SR
        sr = pydicom.dcmread(sr_path)
        assert sr.SOPInstanceUID != held_sr.SOPInstanceUID, "the held SR reached the PACS"
        assert sr.SeriesInstanceUID == held_sr.SeriesInstanceUID and sr.InstanceNumber == 2
        assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("VERIFIED", "FINAL")
        assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "dr-physicist"
        predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert predecessor.ReferencedSOPInstanceUID == held_sr.SOPInstanceUID
        said = stated_verdict(sr)
        assert said["verdict"] == "HELD" and said["reasons"] == held_reasons
        assert said["limits"] == held["limits"]
        review = said["review"]
        assert (review["decision"], review["reviewer"], review["note"]) == ("APPROVED", "dr-physicist", note)
        assert review["at"][:8].isdigit()
        (fact,) = [json.loads(r[5]) for r in audit_rows(node, "review-approved")]
        assert fact["report"] == [sr.SOPInstanceUID] and fact["held_report"] == [held_sr.SOPInstanceUID]

        segs = received(orthanc, study, "SEG", tmp_path / "orthanc-seg")
        assert len(segs) == 1
        assert {p.name: dciodvfy_errors(p) for p in [sr_path, *segs]} == {
            p.name: [] for p in [sr_path, *segs]
        }

        # a released job: its SR states the final verdict the node reached
        assert storescu(plain, node.port, node.ae_title, calling="CT_PLAIN").returncode == 0
        node.wait_for(lambda: states(node).get(2) == "delivered", timeout=240, what="job 2 delivered")
        (released_path,) = received(orthanc, study_uid_of(plain), "SR", tmp_path / "orthanc-sr-2")
        released = pydicom.dcmread(released_path)
        verdict = stated_verdict(released)
        assert (verdict["verdict"], verdict["final"], verdict["review"]) == ("RELEASED", True, None)
        assert verdict["reasons"] == ["QC within the rule's limits"]
        assert (released.PreliminaryFlag, released.VerificationFlag) == ("FINAL", "UNVERIFIED")
        text = " ".join(str(i.get("TextValue", "")) for _, i in _walk_sr([released]))
        assert "before output validation" not in text
        assert dciodvfy_errors(released_path) == []
        assert node.cli("audit", "verify").returncode == 0
    finally:
        node.stop()
