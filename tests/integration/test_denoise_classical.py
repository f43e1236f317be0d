"""`denoise-classical` end to end: `dicom-node run` on a 30-slice CT and on pydicom's
enhanced MR test file (every object dciodvfy-clean, re-readable, same geometry,
provenance recoverable from each one), Orthanc files every object under the original
study, and the routed path storescu → node → Orthanc delivers all of them. pydicom's
enhanced CT is a perfusion map: refused, with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pipelines.provenance import provenance_of
from pipelines.writers import kind_of
from tests.conftest import db_rows, node_config, require
from tests.peers import DCIODVFY, STORESCU, NodeProcess, Orthanc, policy_yaml, storescu
from tests.test_writers import complete_emri

pytestmark = pytest.mark.integration

KINDS = {"derived", "uncertainty", "hallucination", "suspect", "report"}


def run_pipeline(src: Path, out: Path, home: Path) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "run",
            "denoise-classical",
            str(src),
            "--out",
            str(out),
            "--home",
            str(home),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module", params=["ct30", "enhanced-mr"])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp(request.param)
    if request.param == "ct30":
        from dicom_node.lab.simulate import write_ct_series
        from models.sim.phantom import PhantomSpec

        write_ct_series(src, PhantomSpec(rows=96, columns=96, slices=30, seed=11))
    else:
        # pydicom's enhanced MR test file has no functional groups (no patient geometry);
        # the test completes it with plausible ones (see tests/test_writers.py).
        complete_emri(pydicom.dcmread(get_testdata_file("emri_small.dcm"))).save_as(src / "emr.dcm")
    return src


def test_the_enhanced_ct_perfusion_map_is_refused_with_its_reason(tmp_path: Path) -> None:
    src = tmp_path / "ect"
    src.mkdir()
    pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm")).save_as(src / "ect.dcm")
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "run", "denoise-classical", str(src)]
        + ["--out", str(tmp_path / "out"), "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "PERFUSION" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert not list((tmp_path / "out").glob("*.dcm"))


@pytest.fixture(scope="module")
def outputs(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out")
    summary = run_pipeline(source, out, tmp_path_factory.mktemp("home"))
    return out, summary


def test_run_writes_every_object_dciodvfy_clean(outputs: tuple[Path, dict]) -> None:
    require(DCIODVFY)
    out, summary = outputs
    files = sorted(out.glob("*.dcm"))
    kinds = {kind_of(pydicom.dcmread(f, stop_before_pixels=True)) for f in files}
    assert KINDS <= kinds
    for f in files:
        assert dciodvfy_errors(f) == [], f.name
    model = summary["studies"][0]["model"]
    assert model["name"] == "classical-nlm" and len(model["weights_sha256"]) == 64


def test_objects_reread_and_keep_geometry(source: Path, outputs: tuple[Path, dict]) -> None:
    out, _ = outputs
    src = [pydicom.dcmread(f) for f in sorted(source.iterdir())]
    from pipelines.volume import load_series

    volume = load_series(src)
    positions = np.array([s.position for s in volume.slices])
    for f in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        kind = kind_of(ds)
        assert ds.StudyInstanceUID == volume.study_uid
        if kind == "derived":
            assert ds.FrameOfReferenceUID == volume.frame_of_reference_uid
            k = int(ds.InstanceNumber) - 1
            assert np.allclose(np.array(ds.ImagePositionPatient, float), positions[k], atol=1e-3)
        elif kind in ("uncertainty", "hallucination", "suspect"):
            cls = hd.seg.Segmentation if kind == "suspect" else hd.pm.ParametricMap
            obj = cls.from_dataset(ds)
            assert obj.FrameOfReferenceUID == volume.frame_of_reference_uid
            frame_positions = np.array(
                [
                    fg.PlanePositionSequence[0].ImagePositionPatient
                    for fg in obj.PerFrameFunctionalGroupsSequence
                ],
                float,
            )
            for p in frame_positions:
                assert np.abs(positions - p).sum(axis=1).min() < 1e-3
        elif kind == "report":
            assert hd.sr.srread(f).SOPClassUID == pydicom.uid.ComprehensiveSRStorage


def test_provenance_recoverable_from_any_single_object(source: Path, outputs: tuple[Path, dict]) -> None:
    out, _ = outputs
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in source.iterdir()}
    for f in sorted(out.glob("*.dcm")):
        facts = provenance_of(pydicom.dcmread(f))
        # every object names input instances it came from (the overlay also names its map)
        assert set(facts["source_sop_instance_uids"]) & sources, f.name
        assert facts["pipeline"] == "denoise-classical"
        assert facts["model_version"] == "1.0"
        assert len(facts["weights_sha256"]) == 64


def test_orthanc_files_every_object_under_the_original_study(
    source: Path, outputs: tuple[Path, dict], orthanc: Orthanc
) -> None:
    out, _ = outputs
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "send",
            str(out),
            "--to",
            f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
            "--json",
            "--home",
            str(out.parent / "sendhome"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    study_uid = str(pydicom.dcmread(next(source.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    in_pacs = orthanc.series_of_study(study_uid)
    written = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in out.glob("*.dcm")}
    assert written <= {s["MainDicomTags"]["SeriesInstanceUID"] for s in in_pacs}
    assert orthanc.statistics()["CountInstances"] == len(list(out.glob("*.dcm")))


def test_routed_denoise_classical_reaches_orthanc(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    study = write_ct_series(tmp_path / "ct", PhantomSpec(rows=96, columns=96, slices=12, seed=12))
    config = node_config(orthanc, stable_seconds=1)
    node = NodeProcess(tmp_path / "node", config, policy=policy_yaml("denoise-classical")).start()
    try:
        assert storescu(tmp_path / "ct", node.port, node.ae_title).returncode == 0
        node.wait_for(
            lambda: db_rows(node, "select state from jobs") == [("delivered",)],
            timeout=180,
            what="job delivered",
        )
        modalities = sorted(
            s["MainDicomTags"].get("Modality", "") for s in orthanc.series_of_study(study.study_uid)
        )
        # derived CT, two parametric maps (OT), the SEG, the SR, the SC overlay (OT)
        assert modalities.count("CT") == 1 and "SEG" in modalities and "SR" in modalities
        assert modalities.count("OT") == 3
        deliveries = db_rows(node, "select state from deliveries")
        assert len(deliveries) == 6 and all(d == ("delivered",) for d in deliveries)
        report = node.cli("audit", "report", "--study", study.study_uid).stdout
        assert "pipeline denoise-classical 1.0; model: classical-nlm 1.0 (weights sha256" in report
    finally:
        node.stop()
