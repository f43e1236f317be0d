"""Low-dose CT restoration end to end: simulate → `dicom-node run restoration` (every
object dciodvfy-clean) and the routed path (CTDIvol below the route's limit) → Orthanc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pipelines.provenance import provenance_of
from pipelines.writers import kind_of
from tests.conftest import db_rows, node_config, require
from tests.peers import DCIODVFY, STORESCU, NodeProcess, Orthanc, policy_yaml, storescu

pytestmark = pytest.mark.integration


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def ldct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ldct")
    made = cli(
        "simulate",
        "ldct",
        "--out",
        str(out),
        "--slices",
        "6",
        "--size",
        "256",
        "--dose",
        "0.25",
        "--seed",
        "3",
    )
    assert made.returncode == 0, made.stderr
    return out


def test_simulated_study_has_scanner_headers(ldct: Path) -> None:
    low = pydicom.dcmread(sorted((ldct / "low-dose").iterdir())[0], stop_before_pixels=True)
    ref = pydicom.dcmread(sorted((ldct / "reference").iterdir())[0], stop_before_pixels=True)
    assert low.StudyInstanceUID == ref.StudyInstanceUID and low.FrameOfReferenceUID == ref.FrameOfReferenceUID
    assert float(low.CTDIvol) == pytest.approx(0.25 * float(ref.CTDIvol))
    assert "SIMULATED" in low.SeriesDescription and str(low.PatientName) == "SIMULATED^PHANTOM"


def test_run_restoration_writes_five_clean_objects(ldct: Path, tmp_path: Path) -> None:
    require(DCIODVFY)
    out = tmp_path / "out"
    result = cli(
        "run", "restoration", str(ldct / "low-dose"), "--out", str(out), "--home", str(tmp_path), "--json"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)["studies"][0]
    assert summary["model"]["name"] == "ldct-restoration"
    kinds: dict[str, int] = {}
    for f in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        kinds[kind_of(ds)] = kinds.get(kind_of(ds), 0) + 1
        errors = [
            line
            for line in subprocess.run([DCIODVFY, str(f)], capture_output=True, text=True).stderr.splitlines()
            if line.startswith("Error")
        ]
        assert errors == [], f"{f.name}: {errors}"
        facts = provenance_of(ds)
        assert facts["pipeline"] == "restoration" and facts["model_name"] == "ldct-restoration"
    assert kinds["derived"] == 6
    assert all(kinds[k] == 1 for k in ("uncertainty", "hallucination", "suspect", "report"))


def test_low_dose_ct_is_routed_to_restoration_and_delivered(
    ldct: Path, tmp_path: Path, orthanc: Orthanc
) -> None:
    require(STORESCU)
    config = node_config(orthanc, stable_seconds=1)
    low_dose_ct = {"modality": "CT", "attributes": [{"keyword": "CTDIvol", "op": "<", "value": 5.0}]}
    node = NodeProcess(
        tmp_path / "node", config, policy=policy_yaml("restoration", match=low_dose_ct)
    ).start()
    try:
        assert storescu(ldct / "low-dose", node.port, node.ae_title).returncode == 0
        node.wait_for(
            lambda: db_rows(node, "select state from jobs") == [("delivered",)], timeout=300, what="delivered"
        )
        study_uid = db_rows(node, "select study_uid from studies")[0][0]
        modalities = sorted(
            s["MainDicomTags"].get("Modality", "") for s in orthanc.series_of_study(study_uid)
        )
        assert modalities.count("CT") == 1 and "SEG" in modalities and "SR" in modalities
        assert modalities.count("OT") >= 2  # uncertainty and hallucination maps (+ the SC overlay)
    finally:
        node.stop()
