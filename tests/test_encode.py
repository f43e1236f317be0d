"""The encode stage on a legacy series without a Frame of Reference UID: the slice-wise
pipelines (``denoise-classical``, ``restoration``) put every output on one frame derived
from the series under the job's UID root, the report says so, validation accepts it; a
series with its own frame keeps it and the report says nothing of it. Real legacy files
(pydicom-data) give dciodvfy-clean outputs whatever their demographics got wrong."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_node.lab.simulate import write_ct_series
from models.classical import ClassicalDenoiser, ClassicalParameters
from models.sim.phantom import PhantomSpec
from pipelines.base import InputInstance, RunEnvironment, StudyInput
from pipelines.denoise_classical import denoise_classical
from pipelines.encode import NEW_FRAME_OF_REFERENCE, Encode
from pipelines.restoration import restoration
from pipelines.stages import Context, StagedPipeline
from pipelines.steps import Gate, LoadVolume, Predict, ScoreHallucination
from pipelines.uids import derived_frame_of_reference
from pipelines.validate import Validate
from pipelines.writers import KIND_OVERLAY, KIND_REPORT, kind_of
from tests.conftest import require
from tests.peers import DCIODVFY

ROOT = "1.2.826.0.1.3680043.10.999"


def run(pipeline: StagedPipeline, files: list[Path], workdir: Path, job_id: int = 1) -> Context:
    instances = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        instances.append(
            InputInstance(
                str(ds.SOPInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPClassUID),
                str(ds.file_meta.TransferSyntaxUID),
                f,
                "",
            )
        )
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    return pipeline.execute(
        StudyInput(job_id, study, 1, tuple(instances)),
        RunEnvironment(workdir=workdir, uid_root=ROOT, node_version="test"),
    )


def frames(ctx: Context) -> dict[str, set[str]]:
    """Kind → the Frame of Reference UIDs its objects carry (SR and overlay carry none)."""
    found: dict[str, set[str]] = {}
    for out in ctx.outputs:
        ds = pydicom.dcmread(out.path, stop_before_pixels=True)
        found.setdefault(kind_of(ds), set()).add(str(ds.get("FrameOfReferenceUID", "")))
    return found


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A simulated 6-slice CT written the way legacy archives do: no Frame of Reference UID."""
    src = tmp_path_factory.mktemp("legacy")
    write_ct_series(src, PhantomSpec(rows=64, columns=64, slices=6, seed=43))
    files = sorted(src.iterdir())
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    return files


@pytest.mark.parametrize("build", [denoise_classical, restoration], ids=["denoise-classical", "restoration"])
def test_a_legacy_series_gets_a_frame_derived_from_it(
    build: Callable[[], StagedPipeline], legacy: list[Path], tmp_path: Path
) -> None:
    ctx = run(build(), legacy, tmp_path)
    series_uid = str(pydicom.dcmread(legacy[0], stop_before_pixels=True).SeriesInstanceUID)
    expected = derived_frame_of_reference(ROOT, series_uid)
    assert ctx.validation_errors == ()
    found = frames(ctx)
    assert {kind: uids for kind, uids in found.items() if kind not in (KIND_REPORT, KIND_OVERLAY)} == {
        "derived": {expected},
        "uncertainty": {expected},
        "hallucination": {expected},
        "suspect": {expected},
    }
    # the report says so (a QC fact of every output series), and the run's parameters name it
    assert ctx.qc[NEW_FRAME_OF_REFERENCE] == (1.0, "1")
    assert all(qc[NEW_FRAME_OF_REFERENCE] == 1.0 for qc in ctx.qc_by_series.values())
    assert ctx.parameters["derived_frame_of_reference_uid"] == expected
    report = next(o.path for o in ctx.outputs if kind_of(pydicom.dcmread(o.path)) == KIND_REPORT)
    assert "new frame of reference" in str(pydicom.dcmread(report)).lower()
    # the files received are untouched
    assert all("FrameOfReferenceUID" not in pydicom.dcmread(f, stop_before_pixels=True) for f in legacy)


def test_every_job_on_the_series_shares_the_frame(legacy: list[Path], tmp_path: Path) -> None:
    first = run(denoise_classical(), legacy, tmp_path / "a", job_id=1)
    again = run(denoise_classical(), legacy, tmp_path / "b", job_id=2)
    assert frames(first)["derived"] == frames(again)["derived"]
    assert {o.series_uid for o in first.outputs}.isdisjoint(o.series_uid for o in again.outputs)


def test_a_series_with_its_own_frame_keeps_it(tmp_path: Path) -> None:
    study = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=4, seed=44))
    files = sorted((tmp_path / "ct").iterdir())
    ctx = run(denoise_classical(), files, tmp_path / "out")
    assert frames(ctx)["derived"] == {study.frame_of_reference_uid}
    assert NEW_FRAME_OF_REFERENCE not in ctx.qc and "derived_frame_of_reference_uid" not in ctx.parameters


@pytest.mark.parametrize("name", ["693_UNCI.dcm", "bad_sequence.dcm"])
def test_a_real_legacy_ct_gives_dciodvfy_clean_outputs(name: str, tmp_path: Path) -> None:
    """pydicom-data's legacy CTs: no Frame of Reference; Patient Identity Removed YES with no
    De-identification Method (the outputs say it is unknown); bad_sequence.dcm also has an
    Age "22Y" and a 64-character Study ID (the outputs leave them out / empty).

    The stages alone, whatever input-domain checks the shipped pipeline runs first (693 is
    a DERIVED image); under new Study/Series/SOP UIDs, as bad_sequence's own are not UIDs.
    """
    require(DCIODVFY)
    path = get_testdata_file(name)
    assert isinstance(path, str), "pydicom-data is not installed (pip install -e '.[test]')"
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "in.dcm")
    source = InputInstance(
        str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), "", tmp_path / "in.dcm", ""
    )
    ctx = Context(
        study=StudyInput(4, str(ds.StudyInstanceUID), 1, (source,)),
        env=RunEnvironment(workdir=tmp_path, uid_root=ROOT, node_version="test"),
        pipeline="denoise-classical",
        pipeline_version="1.0",
        series=(source,),
    )
    for stage in (
        LoadVolume(),
        Predict(ClassicalDenoiser(ClassicalParameters(method="nlm"))),
        ScoreHallucination(),
        Gate(),
        Encode(derived_description="denoised (classical non-local means)"),
        Validate(),
    ):
        ctx = stage.run(ctx)
    assert ctx.validation_errors == ()
    assert frames(ctx)["derived"] == {derived_frame_of_reference(ROOT, str(ds.SeriesInstanceUID))}
    for out in ctx.outputs:
        result = subprocess.run([DCIODVFY, str(out.path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], out.path.name
    written = [pydicom.dcmread(o.path, stop_before_pixels=True) for o in ctx.outputs]
    stated = [w for w in written if w.get("PatientIdentityRemoved") == "YES"]
    assert any(kind_of(w) == "derived" for w in stated)
    assert all(str(w.DeidentificationMethod).startswith("not stated by the source") for w in stated)
    if name == "bad_sequence.dcm":
        assert all("PatientAge" not in w and w.get("StudyID", "") == "" for w in written)
