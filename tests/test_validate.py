"""Output validation: clean outputs pass; each kind of damage is named (and would hold the job)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.lab.simulate import write_ct_series
from models.classical import ClassicalDenoiser, ClassicalParameters
from models.sim.phantom import PhantomSpec
from pipelines.base import InputInstance, RunEnvironment, StudyInput
from pipelines.denoise_classical import denoise_classical
from pipelines.encode import Encode
from pipelines.stages import Context
from pipelines.steps import Gate, LoadVolume, Predict, ScoreHallucination
from pipelines.validate import validate_outputs
from pipelines.writers import KIND_DERIVED, KIND_UNCERTAINTY, kind_of


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Context:
    src = tmp_path_factory.mktemp("ct")
    study = write_ct_series(src, PhantomSpec(rows=64, columns=64, slices=6, seed=41))
    instances = []
    for f in sorted(src.iterdir()):
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
    out = tmp_path_factory.mktemp("out")
    return denoise_classical().execute(
        StudyInput(1, study.study_uid, 1, tuple(instances)),
        RunEnvironment(workdir=out, uid_root="2.25", node_version="test"),
    )


def _first(ctx: Context, kind: str) -> Path:
    return next(
        o.path for o in ctx.outputs if kind_of(pydicom.dcmread(o.path, stop_before_pixels=True)) == kind
    )


def _damaged(ctx: Context, tmp_path: Path, kind: str, damage: object) -> Context:
    """A copy of the outputs with one object of ``kind`` damaged by ``damage(ds)``."""
    target = _first(ctx, kind)
    outputs = []
    for o in ctx.outputs:
        copy = tmp_path / o.path.name
        copy.write_bytes(o.path.read_bytes())
        if o.path == target:
            ds = pydicom.dcmread(copy)
            damage(ds)  # type: ignore[operator]
            ds.save_as(copy)
        outputs.append(type(o)(o.sop_uid, o.series_uid, o.sop_class_uid, o.transfer_syntax_uid, copy))
    return ctx.evolve(outputs=tuple(outputs))


def test_clean_outputs_pass(ran: Context) -> None:
    assert ran.validation_errors == ()
    assert validate_outputs(ran) == []


def test_wrong_study_is_named(ran: Context, tmp_path: Path) -> None:
    def damage(ds: pydicom.Dataset) -> None:
        ds.StudyInstanceUID = "1.2.3.4"

    problems = validate_outputs(_damaged(ran, tmp_path, KIND_DERIVED, damage))
    assert any("Study Instance UID is not the input study's" in p for p in problems)


def test_nan_in_a_map_is_named(ran: Context, tmp_path: Path) -> None:
    def damage(ds: pydicom.Dataset) -> None:
        values = np.frombuffer(ds.FloatPixelData, dtype=np.float32).copy()
        values[3] = np.nan
        ds.FloatPixelData = values.tobytes()

    problems = validate_outputs(_damaged(ran, tmp_path, KIND_UNCERTAINTY, damage))
    assert any("NaN or infinite" in p for p in problems)


def test_unreadable_file_and_missing_slice_are_named(ran: Context, tmp_path: Path) -> None:
    broken = _damaged(ran, tmp_path, KIND_DERIVED, lambda ds: None)
    victim = _first(broken, KIND_DERIVED)
    victim.write_bytes(b"not DICOM at all")
    problems = validate_outputs(broken)
    assert any(p.startswith(f"{victim.name}: cannot be read back") for p in problems)
    assert any("derived series" in p and "has 5 images for 6 source slices" in p for p in problems)


def test_foreign_source_reference_is_named(ran: Context) -> None:
    problems = validate_outputs(ran.evolve(series=ran.series[:3]))
    assert any("references a source image that was not processed" in p for p in problems)


def test_no_outputs_is_a_problem(ran: Context) -> None:
    assert validate_outputs(ran.evolve(outputs=())) == ["the pipeline wrote no output objects"]


def test_a_frame_of_reference_not_the_sources_is_named(ran: Context, tmp_path: Path) -> None:
    def damage(ds: pydicom.Dataset) -> None:
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.999.1"

    problems = validate_outputs(_damaged(ran, tmp_path, KIND_UNCERTAINTY, damage))
    assert any("Frame of Reference UID is not the source's" in p for p in problems)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Context:
    """``denoise-classical`` on a series without a Frame of Reference UID (legacy files)."""
    src = tmp_path_factory.mktemp("legacy")
    study = write_ct_series(src, PhantomSpec(rows=64, columns=64, slices=4, seed=42))
    instances = []
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
        instances.append(
            InputInstance(str(ds.SOPInstanceUID), study.series_uid, str(ds.SOPClassUID), "", f, "")
        )
    return denoise_classical().execute(
        StudyInput(2, study.study_uid, 1, tuple(instances)),
        RunEnvironment(workdir=tmp_path_factory.mktemp("out"), uid_root="2.25", node_version="test"),
    )


def test_outputs_of_a_legacy_series_must_be_on_the_frame_derived_from_it(
    legacy: Context, tmp_path: Path
) -> None:
    assert legacy.validation_errors == () and validate_outputs(legacy) == []

    def another(ds: pydicom.Dataset) -> None:
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.999.1"

    def none(ds: pydicom.Dataset) -> None:
        del ds.FrameOfReferenceUID

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    problems = validate_outputs(_damaged(legacy, tmp_path / "a", KIND_UNCERTAINTY, another))
    assert any("Frame of Reference UID is not the source's" in p for p in problems)
    problems = validate_outputs(_damaged(legacy, tmp_path / "b", KIND_DERIVED, none))
    assert any(p.endswith(": no Frame of Reference UID") for p in problems)


def test_a_multi_frame_source_has_one_derived_image_per_frame(tmp_path: Path) -> None:
    """pydicom's enhanced CT: one file, two frames → two derived images, not a problem."""
    path = Path(str(get_testdata_file("eCT_Supplemental.dcm")))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    source = InputInstance(
        str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), "", path, ""
    )
    ctx = Context(
        study=StudyInput(3, str(ds.StudyInstanceUID), 1, (source,)),
        env=RunEnvironment(workdir=tmp_path, uid_root="2.25", node_version="test"),
        pipeline="denoise-classical",
        pipeline_version="1.0",
        series=(source,),
    )
    # the stages alone, whatever input-domain checks the shipped pipeline runs first
    for stage in (
        LoadVolume(),
        Predict(ClassicalDenoiser(ClassicalParameters(method="nlm"))),
        ScoreHallucination(),
        Gate(),
        Encode(derived_description="denoised (classical non-local means)"),
    ):
        ctx = stage.run(ctx)
    assert len(ctx.need_volume().slices) == 2
    assert validate_outputs(ctx) == []
