"""Output validation: clean outputs pass; each kind of damage is named (and would hold the job)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.lab.simulate import write_ct_series
from models.sim.phantom import PhantomSpec
from pipelines.base import InputInstance, RunEnvironment, StudyInput
from pipelines.denoise_classical import denoise_classical
from pipelines.stages import Context
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
    assert any("derived series has 5 images for 6 source slices" in p for p in problems)


def test_foreign_source_reference_is_named(ran: Context) -> None:
    problems = validate_outputs(ran.evolve(series=ran.series[:3]))
    assert any("references a source image that was not processed" in p for p in problems)


def test_no_outputs_is_a_problem(ran: Context) -> None:
    assert validate_outputs(ran.evolve(outputs=())) == ["the pipeline wrote no output objects"]
