"""Any image size and the field of view (issue 14, items 2 and 3).

A 122×122 CT runs through ``restoration`` and ``denoise-classical``, a 484×484 and a
500×400 MR through ``sct``, and every image output keeps the input's rows, columns,
spacing and positions. A CT with −2000 outside its reconstruction circle is scored only
inside the circle, keeps its −2000 in the restored series, and passes the shipped default
gate; the gate fire drill's +100 HU 6 mm disc in the same study is held.

Every study here is SIMULATED (``dicom_node.lab.simulate``): the procedural torso
(122×122), the low-dose CT simulator (512×512, 4 slices, 25 % dose, −2000 written outside
the circle afterwards) and the MR / CT head simulator (484×484; 500×500 cropped to 500×400).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.lab.simulate import SctSpec, write_ct_series, write_sct_study
from models.padding import pad_planes, size_multiple
from models.sim.phantom import PhantomSpec
from pipelines.base import GatePolicy, Pipeline, RunEnvironment, StudyInput
from pipelines.fov import field_of_view, outside_reconstruction_circle
from pipelines.registry import get_pipeline
from pipelines.stages import Context, StagedPipeline
from pipelines.volume import Volume, load_series
from pipelines.writers import kind_of
from policies.engine import gate_output
from policies.loader import load_policy
from tests.conftest import study_of, write_circle_ct

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "policies" / "default.yaml"
#: What the simulated scanner writes outside its reconstruction circle (no Pixel Padding Value).
OUTSIDE_HU = -2000


# -- helpers ---------------------------------------------------------------------------------


def default_gate(rule_name: str) -> GatePolicy:
    """The shipped default policy's gate for one rule (as the job runner applies it)."""
    (rule,) = [r for r in load_policy(DEFAULT_POLICY).policy.rules if r.name == rule_name]

    def decide(figures: Mapping[str, float], problems: Sequence[str]) -> tuple[str, tuple[str, ...]]:
        verdict = gate_output(rule.gate, rule.qc, figures, list(problems))
        return verdict.action, verdict.reasons

    return decide


def figures_of(ctx: Context) -> dict[str, float]:
    return {k: float(v[0]) for k, v in ctx.qc.items()}


def images(out: Path) -> dict[str, list[Dataset]]:
    """The written image objects by kind (derived series, maps, SEG)."""
    found: dict[str, list[Dataset]] = {}
    for f in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        found.setdefault(kind_of(ds), []).append(ds)
    return found


def geometry(ds: Dataset) -> tuple[object, ...]:
    return (
        int(ds.Rows),
        int(ds.Columns),
        tuple(round(float(v), 4) for v in ds.PixelSpacing),
        tuple(round(float(v), 3) for v in ds.ImagePositionPatient),
        tuple(round(float(v), 4) for v in ds.ImageOrientationPatient),
    )


def assert_outputs_keep_the_geometry(sources: Sequence[Path], out: Path) -> None:
    source = sorted(geometry(pydicom.dcmread(f, stop_before_pixels=True)) for f in sources)
    written = images(out)
    assert sorted(geometry(ds) for ds in written["derived"]) == source
    rows, columns = source[0][:2]
    for kind in ("uncertainty", "hallucination", "suspect"):
        (ds,) = written[kind]
        assert (int(ds.Rows), int(ds.Columns)) == (rows, columns), kind
    for ds in written["derived"]:
        assert ds.pixel_array.shape == (rows, columns)


@dataclass(frozen=True)
class Timed:
    ctx: Context
    seconds: float


def execute(pipeline: Pipeline, study: StudyInput, out: Path) -> Timed:
    assert isinstance(pipeline, StagedPipeline)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ctx = pipeline.execute(study, RunEnvironment(workdir=out))
    return Timed(ctx, time.perf_counter() - started)


@pytest.fixture(scope="module")
def pipelines() -> dict[str, Pipeline]:
    return {name: get_pipeline(name, None) for name in ("restoration", "denoise-classical", "sct")}


# -- the padding helper ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 122, 122), (1, 500, 400), (3, 7, 33), (1, 1, 1), (2, 128, 64)])
@pytest.mark.parametrize("multiple", [8, 16])
def test_planes_are_padded_to_the_multiple_and_cropped_back_exactly(
    shape: tuple[int, int, int], multiple: int
) -> None:
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    padded, padding = pad_planes(array, multiple)
    assert padded.shape[0] == shape[0]
    assert padded.shape[1] % multiple == 0 and padded.shape[2] % multiple == 0
    assert padded.shape[1] - shape[1] < multiple and padded.shape[2] - shape[2] < multiple
    assert np.array_equal(padding.crop(padded), array)
    if not padding.needed:
        assert padded is array  # no copy when the size already fits


def test_the_multiple_follows_the_networks_strides() -> None:
    assert size_multiple((2, 2, 2)) == 8 and size_multiple((2, 2, 2, 2)) == 16


# -- any size --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_122(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    spec = PhantomSpec(rows=122, columns=122, slices=3, pixel_spacing_mm=0.78, seed=4)  # a targeted recon
    study = write_ct_series(tmp_path_factory.mktemp("ct122"), spec, series_description="SIMULATED 122x122")
    return list(study.files)


@pytest.mark.parametrize("name", ["restoration", "denoise-classical"])
def test_a_122_by_122_ct_runs_and_keeps_its_geometry(
    name: str, ct_122: list[Path], pipelines: dict[str, Pipeline], tmp_path: Path
) -> None:
    run = execute(pipelines[name], study_of(ct_122), tmp_path / "out")
    assert run.ctx.need_prediction().mean.shape == (3, 122, 122)
    assert_outputs_keep_the_geometry(ct_122, tmp_path / "out")
    assert run.seconds < 60


def crop_series(files: Sequence[Path], rows: int, columns: int) -> None:
    """Cut each slice to its central ``rows`` × ``columns``; the position follows the cut."""
    for f in files:
        ds = pydicom.dcmread(f)
        top, left = (int(ds.Rows) - rows) // 2, (int(ds.Columns) - columns) // 2
        pixels = ds.pixel_array[top : top + rows, left : left + columns]
        row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        col_dir = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        spacing = [float(v) for v in ds.PixelSpacing]  # (between rows, between columns)
        origin = np.array([float(v) for v in ds.ImagePositionPatient])
        origin = origin + left * spacing[1] * row_dir + top * spacing[0] * col_dir
        ds.ImagePositionPatient = [f"{v:.3f}" for v in origin]
        ds.Rows, ds.Columns = rows, columns
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.save_as(f, enforce_file_format=True)


@pytest.mark.parametrize(("rows", "columns"), [(484, 484), (500, 400)])
def test_an_mr_of_any_size_makes_an_sct_with_its_geometry(
    rows: int, columns: int, pipelines: dict[str, Pipeline], tmp_path: Path
) -> None:
    size = max(rows, columns)
    # the training pixel size (250 mm over 256 px): a head in a wider field of view
    spec = SctSpec(slices=4, size=size, seed=5, level=0.5, fov_mm=size * 250.0 / 256.0)
    mr, _reference = write_sct_study(tmp_path / "study", spec)
    if (rows, columns) != (size, size):
        crop_series(mr.files, rows, columns)
    run = execute(pipelines["sct"], study_of(mr.files), tmp_path / "out")
    sct = run.ctx.need_prediction().mean
    assert sct.shape == (4, rows, columns)
    body = run.ctx.need_volume().array > 0  # the MR's head, roughly: the sCT is not all air
    assert (sct > -900).sum() > 0.05 * body.sum()
    assert_outputs_keep_the_geometry(mr.files, tmp_path / "out")
    assert run.seconds < 120


# -- the field of view -----------------------------------------------------------------------
@dataclass(frozen=True)
class CircleStudy:
    files: list[Path]
    #: (rows, columns): True outside the reconstruction circle.
    outside: np.ndarray


@pytest.fixture(scope="module")
def circle_study(tmp_path_factory: pytest.TempPathFactory) -> CircleStudy:
    """A SIMULATED low-dose chest CT whose scanner writes −2000 outside its circle."""
    files, outside = write_circle_ct(
        tmp_path_factory.mktemp("fov"), slices=4, size=512, seed=11, outside_hu=OUTSIDE_HU
    )
    return CircleStudy(files, outside)


def test_the_field_of_view_is_the_circle_and_nothing_else(circle_study: CircleStudy) -> None:
    volume = load_series([pydicom.dcmread(f) for f in circle_study.files])
    found = field_of_view(volume)
    assert found.mask is not None
    assert np.array_equal(found.mask, np.broadcast_to(~circle_study.outside, found.mask.shape))
    assert "reconstruction circle" in found.causes


def test_a_ct_with_minus_2000_outside_its_circle_is_scored_inside_only_and_passes_the_gate(
    circle_study: CircleStudy, pipelines: dict[str, Pipeline], tmp_path: Path
) -> None:
    gate = default_gate("low-dose-ct-restoration")
    study = study_of(circle_study.files, gate_policy=gate)
    run = execute(pipelines["restoration"], study, tmp_path / "out")
    ctx, outside = run.ctx, circle_study.outside
    assert ctx.suspect is not None and ctx.hallucination is not None
    assert not ctx.suspect[:, outside].any()
    assert not ctx.hallucination[:, outside].any()
    prediction = ctx.need_prediction()
    assert (prediction.mean[:, outside] == OUTSIDE_HU).all() and not prediction.sigma[:, outside].any()
    action, reasons = gate(figures_of(ctx), ())
    assert action == "release", reasons
    # the delivered series has the scanner's value outside the circle, the restored image inside
    for ds in images(tmp_path / "out")["derived"]:
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert (hu[outside] == OUTSIDE_HU).all()
        assert hu[~outside].min() > OUTSIDE_HU
    assert run.seconds < 60


def test_the_same_ct_with_an_invented_disc_in_the_body_is_held(
    circle_study: CircleStudy, pipelines: dict[str, Pipeline], tmp_path: Path
) -> None:
    gate = default_gate("low-dose-ct-restoration")
    study = study_of(circle_study.files, gate_policy=gate, options={"inject_hallucination_hu": 100})
    ctx = execute(pipelines["restoration"], study, tmp_path / "out").ctx
    assert ctx.suspect is not None and ctx.suspect.any()
    assert not ctx.suspect[:, circle_study.outside].any()
    action, reasons = gate(figures_of(ctx), ())
    assert action == "hold"
    assert any("largest suspect region" in r for r in reasons), reasons


def test_declared_pixel_padding_is_outside_the_field_of_view(tmp_path: Path) -> None:
    spec = PhantomSpec(rows=64, columns=64, slices=2, pixel_spacing_mm=6.0, seed=2)
    files = write_ct_series(tmp_path, spec).files
    datasets = []
    for f in files:
        ds = pydicom.dcmread(f)
        stored = ds.pixel_array.copy()
        stored[:, :5] = -3000  # a band of padding, stored value −3000 (−4024 HU)
        ds.PixelData = stored.tobytes()
        ds.PixelPaddingValue = -3000
        datasets.append(ds)
    found = field_of_view(load_series(datasets))
    assert found.mask is not None and "Pixel Padding Value" in found.causes
    expected = np.ones((2, 64, 64), bool)
    expected[:, :, :5] = False
    assert np.array_equal(found.mask, expected)


def ct_volume(array: np.ndarray) -> Volume:
    return Volume(
        series_uid="1.2.3",
        study_uid="1.2",
        frame_of_reference_uid="1.2.4",
        modality="CT",
        array=array.astype(np.float32),
        spacing=(2.5, 0.8, 0.8),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        slices=(),
        datasets=(),
        units="HU",
    )


@pytest.mark.parametrize(
    ("radius", "outside_value", "is_circle"),
    [
        (60.0, -1000.0, True),  # air-valued outside, as the simulator writes it
        (80.0, -3024.0, True),  # a circle wider than the image: only the corners are outside
        (None, -1024.0, False),  # air clipped at −1024 around a body: no circle
    ],
)
def test_the_reconstruction_circle_is_found_by_its_constant_outside(
    radius: float | None, outside_value: float, is_circle: bool
) -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.ogrid[:128, :128]
    array = np.round(rng.normal(40.0, 20.0, (2, 128, 128)))
    if radius is None:
        body = ((yy - 64) / 40.0) ** 2 + ((xx - 64) / 55.0) ** 2 <= 1.0
        outside = ~body
    else:
        outside = (yy - 63.5) ** 2 + (xx - 63.5) ** 2 > radius**2
    array[:, outside] = outside_value
    found = outside_reconstruction_circle(ct_volume(array))
    if is_circle:
        assert found is not None and np.array_equal(found, outside)
    else:
        assert found is None
