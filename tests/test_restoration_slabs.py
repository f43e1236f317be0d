"""The restoration job a slab at a time, its intermediates in spill files (issue 20: memory).

``PredictAndScore`` must give what the whole-volume stages gave (restored image, σ, score,
suspect regions, QC figures) — on a SIMULATED CT with a reconstruction circle outside its
field of view and the gate fire drill's invented disc — while every volume-sized array it
leaves behind lives in a file the pipeline deletes when it ends. The slab-wise helpers
(percentiles, samples, finiteness, extremes) must equal their whole-array NumPy forms.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from models.hallucination import suspect_regions
from models.restoration import RestorationModel
from pipelines import fov, spill
from pipelines.base import RunEnvironment, StudyInput
from pipelines.quantiles import upper_percentile_of_parts
from pipelines.registry import get_pipeline
from pipelines.restoration import PredictAndScore
from pipelines.stages import Context, StagedPipeline
from pipelines.steps import CT_CLASSES, LoadVolume, Predict, SelectSeries, suspect_figures
from tests.conftest import study_of, write_circle_ct

OUTSIDE_HU = -2000
THRESHOLD, MIN_VOXELS = 6.0, 6


@pytest.fixture(scope="module")
def circle_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A SIMULATED 7-slice low-dose CT whose scanner writes −2000 outside its circle."""
    out = tmp_path_factory.mktemp("slabs")
    files, _ = write_circle_ct(out, slices=7, size=256, seed=5, outside_hu=OUTSIDE_HU)
    return files


@pytest.fixture(scope="module")
def model() -> RestorationModel:
    return RestorationModel.shipped(precision="float32")


def drilled(files: list[Path], drill: float | None) -> StudyInput:
    return study_of(files, options={"inject_hallucination_hu": drill} if drill else None)


def loaded(files: list[Path], workdir: Path, *, spilled: bool, drill: float | None) -> Context:
    workdir.mkdir(parents=True, exist_ok=True)
    study = drilled(files, drill)
    ctx = Context(study=study, env=RunEnvironment(workdir=workdir), series=study.instances)
    ctx = LoadVolume(spilled=spilled).run(ctx)
    return fov.DetectFieldOfView().run(ctx)


def whole_volume(ctx: Context, model: RestorationModel) -> tuple[np.ndarray, ...]:
    """What the stages before issue 20's slabs computed, over the whole volume at once."""
    ctx = Predict(model).run(ctx)
    volume, prediction = ctx.need_volume(), ctx.need_prediction()
    observed, restored = fov.scoring_pair(volume, prediction)
    score = fov.clear_outside(volume, model.score(observed, restored, prediction.sigma))
    suspect = suspect_regions(score, THRESHOLD, min_voxels=MIN_VOXELS)
    return prediction.mean, prediction.sigma, score, suspect


@pytest.mark.parametrize("drill", [None, 300.0])
def test_slab_by_slab_gives_what_the_whole_volume_gave(
    circle_ct: list[Path], model: RestorationModel, tmp_path: Path, drill: float | None
) -> None:
    reference = loaded(circle_ct, tmp_path / "whole", spilled=False, drill=drill)
    mean, sigma, score, suspect = whole_volume(reference, model)
    ctx = loaded(circle_ct, tmp_path / "slabs", spilled=True, drill=drill)
    assert ctx.need_volume().fov is not None and spill.file_backed(ctx.need_volume().fov)
    # slabs of 3 over 7 slices: a short last slab, and slab edges inside the volume
    done = PredictAndScore(model, threshold=THRESHOLD, min_voxels=MIN_VOXELS, slab=3).run(ctx)
    prediction = done.need_prediction()
    np.testing.assert_allclose(prediction.mean, mean, atol=1e-3)
    np.testing.assert_allclose(prediction.sigma, sigma, atol=1e-3)
    assert done.hallucination is not None
    np.testing.assert_allclose(done.hallucination, score, atol=1e-3)
    assert done.suspect is not None and np.array_equal(done.suspect, suspect)
    assert bool(suspect.any()) == bool(drill)  # the drill's disc is found, and nothing else
    # the QC figures: those of the whole-volume score
    volume = reference.need_volume()
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    expected = suspect_figures(score, suspect, voxel_ml, THRESHOLD, within=volume.fov)
    for name, value in expected.items():
        assert done.qc[name] == pytest.approx(value, abs=2e-3), name
    body = fov.inside(volume, volume.array > -500)
    assert done.qc["mean calibrated sigma in body"][0] == pytest.approx(float(sigma[body].mean()), abs=2e-3)
    # every volume-sized array of the job lives in a spill file
    for array in (
        prediction.mean,
        prediction.sigma,
        done.hallucination,
        done.suspect,
        done.need_volume().array,
    ):
        assert spill.file_backed(array)


def test_the_pipeline_deletes_its_spill_files_and_its_outputs_stay_readable(
    circle_ct: list[Path], tmp_path: Path
) -> None:
    pipeline = get_pipeline("restoration", None)
    assert isinstance(pipeline, StagedPipeline)
    ctx = pipeline.execute(drilled(circle_ct, None), RunEnvironment(workdir=tmp_path))
    assert not spill.directory(tmp_path).exists()
    assert len(ctx.outputs) == len(circle_ct) + 5  # the series, both maps, SEG, overlay, SR
    assert all(o.path.is_file() and o.path.parent == tmp_path for o in ctx.outputs)
    assert float(np.abs(ctx.need_prediction().mean).max()) > 0  # still mapped after the unlink
    assert ctx.validation_errors == ()


def test_a_failed_stage_leaves_no_spill_files(circle_ct: list[Path], tmp_path: Path) -> None:
    class Boom:
        name = "boom"

        def run(self, ctx: Context) -> Context:
            assert spill.directory(tmp_path).is_dir()  # the volume was spilled
            raise RuntimeError("boom")

    pipeline = StagedPipeline("t", "1", (SelectSeries(CT_CLASSES), LoadVolume(spilled=True), Boom()))
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.execute(drilled(circle_ct, None), RunEnvironment(workdir=tmp_path))
    assert not spill.directory(tmp_path).exists()


def test_a_full_disk_is_an_error_that_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"no room for the job's working file .*score\.raw \(8 MB\)"):
        spill.Spill(tmp_path).array("score", (8, 512, 512))


def test_released_pages_leave_the_process_and_the_data_stay(tmp_path: Path) -> None:
    process = psutil.Process()
    array = spill.Spill(tmp_path).array("big", (64, 512, 512))  # 64 MB
    before = process.memory_info().rss
    array[:] = 3.0
    touched = process.memory_info().rss
    spill.release(array)
    released = process.memory_info().rss
    assert touched - before > 50e6 and touched - released > 50e6
    assert float(array[63, 511, 511]) == 3.0 and float(spill.read(array, slice(10, 12)).min()) == 3.0
    spill.release(np.zeros(3))  # an array in memory: nothing to do


@pytest.mark.parametrize("shape", [(70, 33, 17), (5, 1000), (3, 4, 5), (1, 1, 1)])
@pytest.mark.parametrize("step", [1, 2, 7, 19, 1000])
def test_a_slab_wise_sample_is_the_strided_sample(tmp_path: Path, shape: tuple[int, ...], step: int) -> None:
    values = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    kept = spill.Spill(tmp_path).copy("v", values)
    assert np.array_equal(spill.strided_sample(kept, step), values.ravel()[::step])
    assert spill.min_max(kept) == (float(values.min()), float(values.max()))


def test_finiteness_is_checked_in_every_slab(tmp_path: Path) -> None:
    values = np.zeros((70, 8, 8), np.float32)
    assert spill.all_finite(values) and spill.all_finite(np.zeros((3, 3), np.int16))
    values[69, 7, 7] = np.nan
    assert not spill.all_finite(spill.Spill(tmp_path).copy("v", values))


@pytest.mark.parametrize("q", [50.0, 95.0, 99.0, 99.9, 100.0])
@pytest.mark.parametrize("kind", ["normal", "ties", "skewed"])
def test_the_percentile_of_parts_is_numpys(q: float, kind: str) -> None:
    rng = np.random.default_rng(3)
    if kind == "normal":
        values = rng.normal(size=(40, 64, 64)).astype(np.float32)
    elif kind == "ties":
        values = rng.integers(0, 4, size=(40, 64, 64)).astype(np.float32)
    else:  # mostly zeros, a tail: a hallucination score
        values = np.where(rng.random((40, 64, 64)) < 0.97, 0.0, rng.exponential(5.0, (40, 64, 64)))
        values = values.astype(np.float32)
    within = rng.random(values.shape) < 0.8

    def parts() -> Iterator[np.ndarray]:
        for part in spill.slabs(len(values), 7):
            yield values[part][within[part]]

    assert upper_percentile_of_parts(parts, q) == pytest.approx(
        float(np.percentile(values[within], q)), abs=1e-6
    )
