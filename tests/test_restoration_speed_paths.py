"""The faster restoration paths (issue 20) against the SciPy/NumPy code they replace.

Each fast path must give what the plain implementation gives — to float32 rounding — on
odd sizes, flat and noisy slices, ties and empty masks: the hallucination score (box
means as direct float32 row and column sums), the noise map (the Laplacian as two 1-D
passes), hole filling by labelling, the p99 without a full partition, labelling only the
box that holds the suspect voxels, the median of a masked map, the binned body test, and
the noise map computed once for the slice facts and the score. And the inference
precision: chosen only among those the model card lists as evaluated, and named in every
output's provenance.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from models.hallucination import (
    _BoxMeans,
    largest_region_voxels,
    local_noise_sigma,
    restoration_score,
    suspect_regions,
)
from models.restoration import (
    RestorationCard,
    RestorationModel,
    _bin,
    _bins_inside,
    choose_precision,
    fill_holes,
    masked_median,
)
from pipelines.provenance import OutputProvenance
from pipelines.quantiles import upper_percentile

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo" / "ldct-restoration"


def _scipy_noise(observed: np.ndarray, window: int = 31) -> np.ndarray:
    lap = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    out = np.empty(observed.shape, np.float32)
    for k, plane in enumerate(observed):
        response = np.abs(ndimage.convolve(plane, lap, mode="reflect"))
        out[k] = np.sqrt(np.pi / 2) / 6.0 * ndimage.uniform_filter(response, size=window)
    return np.maximum(out, 1e-3)


def _scipy_score(
    observed: np.ndarray,
    restored: np.ndarray,
    sigma: np.ndarray,
    correlation: dict[str, float] | None,
    model_correlation: dict[str, float] | None,
    windows: tuple[int, ...] = (3, 5, 7, 9),
) -> np.ndarray:
    """The score as it was written before issue 20: two uniform filters per window."""
    residual = observed - restored
    noise = _scipy_noise(observed)
    model = 0.5 * sigma
    best = np.zeros(residual.shape, np.float32)
    for w in windows:
        c = (correlation or {}).get(str(w), 1.0)
        local_mean = ndimage.uniform_filter(residual, size=(1, w, w))
        if model_correlation and str(w) in model_correlation:
            model = model_correlation[str(w)] * sigma
        spread = np.sqrt((noise * c / w) ** 2 + ndimage.uniform_filter(model, size=(1, w, w)) ** 2)
        np.maximum(best, np.abs(local_mean) / spread, out=best)
    return best


def _ct_like(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    body = np.hypot(yy - shape[1] / 2, xx - shape[2] / 2) < 0.4 * min(shape[1:])
    return (np.where(body, 40.0, -1000.0)[None] + rng.normal(0, 20, shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 37, 53), (1, 9, 9), (20, 40, 31)])
@pytest.mark.parametrize(
    "model_correlation",
    [None, {"3": 0.5, "5": 0.3, "7": 0.2, "9": 0.15}, {"5": 0.3}],
    ids=["lambda", "k_w", "partial"],
)
def test_score_matches_the_two_filter_version(
    shape: tuple[int, int, int], model_correlation: dict | None
) -> None:
    rng = np.random.default_rng(sum(shape))
    observed = _ct_like(rng, shape)
    restored = observed - rng.normal(0, 15, shape).astype(np.float32)
    restored[:, shape[1] // 3 : shape[1] // 3 + 4, 5:9] += 80.0  # an invented structure
    sigma = np.abs(rng.normal(8, 2, shape)).astype(np.float32)
    correlation = {"3": 1.46, "5": 1.10, "7": 0.95, "9": 0.84}
    fast = restoration_score(
        observed, restored, sigma, correlation=correlation, model_correlation=model_correlation
    )
    plain = _scipy_score(observed, restored, sigma, correlation, model_correlation)
    assert fast.dtype == np.float32 and fast.shape == plain.shape
    np.testing.assert_allclose(fast, plain, rtol=2e-5, atol=2e-5)
    row = shape[1] // 3
    if min(shape[1:]) >= 32:  # room for the structure and the noise around it
        assert fast[:, row : row + 4, 5:9].max() > np.percentile(
            fast, 99
        )  # the invented structure stands out


def test_box_means_match_uniform_filter_at_every_window_and_edge() -> None:
    rng = np.random.default_rng(3)
    plane = (rng.normal(0, 300, (23, 41)) + 1000).astype(np.float32)  # large offset: cancellation
    boxes = _BoxMeans(plane, 4)
    for w in (1, 3, 5, 7, 9):
        np.testing.assert_allclose(boxes.mean(w), ndimage.uniform_filter(plane, w), rtol=1e-6, atol=1e-3)


def test_box_means_in_any_order_and_too_wide_a_window() -> None:
    """The row sums grow with the window; a narrower window after a wider one starts them
    again, and a window wider than the padding is refused."""
    rng = np.random.default_rng(14)
    plane = (rng.normal(0, 200, (31, 20)) - 40).astype(np.float32)
    boxes = _BoxMeans(plane, 4)
    for w in (9, 3, 3, 7, 1, 5, 9):
        np.testing.assert_allclose(boxes.mean(w), ndimage.uniform_filter(plane, w), rtol=1e-6, atol=1e-3)
    with pytest.raises(ValueError, match="wider"):
        boxes.mean(11)


def test_even_windows_are_refused() -> None:
    x = np.zeros((1, 16, 16), np.float32)
    with pytest.raises(ValueError, match="odd"):
        restoration_score(x, x, x + 1, windows=(3, 4))


def test_noise_map_matches_the_convolution() -> None:
    rng = np.random.default_rng(4)
    observed = _ct_like(rng, (3, 50, 67))
    np.testing.assert_allclose(local_noise_sigma(observed), _scipy_noise(observed), rtol=1e-5)
    flat = np.zeros((1, 12, 12), np.float32)
    assert (local_noise_sigma(flat) == np.float32(1e-3)).all()


def test_fill_holes_is_binary_fill_holes() -> None:
    rng = np.random.default_rng(5)
    for density in (0.0, 0.3, 0.5, 0.7, 1.0):
        mask = ndimage.binary_opening(rng.random((40, 57)) < density)
        mask[10:20, 10:20] = True
        mask[13:16, 13:16] = False  # a hole
        assert (fill_holes(mask) == ndimage.binary_fill_holes(mask)).all(), density
    assert fill_holes(np.ones((5, 5), bool)).all() and not fill_holes(np.zeros((5, 5), bool)).any()


def test_masked_median_is_numpys_median() -> None:
    rng = np.random.default_rng(11)
    for size in (1, 2, 3, 10, 11, 1000, 1001):
        for dtype in (np.float32, np.float64):
            values = rng.normal(0, 30, size).astype(dtype)
            ties = np.round(values / 10)  # many equal values
            for data in (values, ties):
                mask = rng.random(size) < 0.7
                mask[0] = True
                assert masked_median(data, mask) == float(np.median(data[mask])), (size, dtype)
    plane = rng.normal(0, 1, (37, 53)).astype(np.float32)
    mask = plane > -0.3
    kept = plane.copy()
    assert masked_median(plane, mask) == float(np.median(plane[mask]))
    assert (plane == kept).all()  # the caller's array is not reordered
    plane[3, 4] = np.nan
    mask[3, 4] = True
    assert np.isnan(masked_median(plane, mask))


@pytest.mark.parametrize("shape", [(512, 512), (37, 53), (8, 9), (3, 3)])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_bins_inside_is_the_binned_mean_test(shape: tuple[int, int], factor: int) -> None:
    rng = np.random.default_rng(12)
    for density in (0.0, 0.9, 0.99, 1.0):
        mask = rng.random(shape) < density
        mask[: shape[0] // 2, : shape[1] // 2] = density > 0  # whole bins inside
        expected = _bin(mask.astype(np.float32), factor) > 0.99
        assert (_bins_inside(mask, factor) == expected).all(), (shape, factor, density)


def test_the_shared_noise_map_changes_no_output() -> None:
    """The pipeline computes each slice's noise map once, for ``finish_slice`` (the slice
    facts) and ``score``: the same restored image, σ, slice facts and score as
    :meth:`RestorationModel.predict` and :meth:`RestorationModel.score` give alone."""
    model = RestorationModel(ZOO / "1.3", precision="float32")
    rng = np.random.default_rng(13)
    volume = _ct_like(rng, (3, 96, 80))
    plain = model.predict(volume, (1.0, 0.7, 0.7))
    facts = list(model.last_facts)
    score = model.score(volume, plain.mean, plain.sigma)
    mean, sigma = model.predict_raw(volume)
    for k, plane in enumerate(volume):
        noise = local_noise_sigma(plane[None])[0]
        assert model.finish_slice(plane, mean[k], sigma[k], (0.7, 0.7), noise) == facts[k]
        assert (mean[k] == plain.mean[k]).all() and (sigma[k] == plain.sigma[k]).all()
        shared = model.score(plane[None], mean[k][None], sigma[k][None], noise[None])[0]
        assert (shared == score[k]).all()


def test_upper_percentile_is_numpy_percentile() -> None:
    rng = np.random.default_rng(6)
    cases = [
        rng.normal(size=100_000),
        rng.integers(0, 4, 50_000).astype(np.float32),  # ties at the percentile
        np.sort(rng.exponential(size=30_000)),  # sorted: the sample sees one end only
        np.zeros(10_000),
        rng.normal(size=100),  # small: numpy directly
    ]
    for values in cases:
        for q in (50.0, 95.0, 99.0, 99.9, 100.0):
            assert upper_percentile(values, q) == pytest.approx(
                float(np.percentile(values, q)), rel=1e-6, abs=1e-9
            )


def test_suspect_regions_label_only_where_suspects_are() -> None:
    rng = np.random.default_rng(7)
    score = ndimage.uniform_filter(rng.normal(size=(12, 48, 50)), 3) * 6
    for threshold in (2.5, 4.0, 50.0):
        mask = score > threshold
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        expected = (sizes >= 3)[labels] & mask
        got = suspect_regions(score, threshold, min_voxels=3)
        assert (got == expected).all()
        largest = int(sizes[1:][sizes[1:] >= 3].max()) if (sizes[1:] >= 3).any() else 0
        assert largest_region_voxels(got) == largest


def test_precision_is_chosen_among_the_evaluated_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.restoration as restoration

    assert choose_precision("float32", ["float32"]) == "float32"
    with pytest.raises(ValueError, match="evaluat"):
        choose_precision("bfloat16", ["float32"])
    with pytest.raises(ValueError, match="unknown inference precision"):
        choose_precision("fp8", ["float32", "bfloat16"])
    monkeypatch.setattr(restoration, "native_bfloat16", lambda: True)
    assert choose_precision("auto", ["float32", "bfloat16"]) == "bfloat16"
    assert choose_precision("auto", ["float32"]) == "float32"  # never one the card lacks
    monkeypatch.setattr(restoration, "native_bfloat16", lambda: False)
    assert choose_precision("auto", ["float32", "bfloat16"]) == "float32"  # emulated: slower


def test_a_card_without_bfloat16_refuses_it_and_writes_back_unchanged(tmp_path: Path) -> None:
    for version in ("1.2", "1.3"):  # written by RestorationCard: read and written back, the same bytes
        shutil.copytree(ZOO / version, tmp_path / version)
        before = (tmp_path / version / "card.json").read_bytes()
        RestorationCard.read_from(tmp_path / version).write_to(tmp_path / version)
        assert (tmp_path / version / "card.json").read_bytes() == before
    copy = tmp_path / "1.2"
    assert "inference_precisions" not in json.loads((copy / "card.json").read_text())
    with pytest.raises(ValueError, match="evaluated"):
        RestorationModel(copy, precision="bfloat16")
    assert RestorationModel(copy, precision="auto").precision == "float32"


def test_bfloat16_inference_stays_close_to_float32() -> None:
    """What the bfloat16 path computes (emulated where the CPU lacks it): the restored HU
    within a few HU of float32 in soft tissue, σ within a few per cent."""
    model = RestorationModel(ZOO / "1.3", precision="float32")
    rng = np.random.default_rng(8)
    volume = _ct_like(rng, (2, 96, 96))
    reference = model.predict(volume, (1.0, 0.7, 0.7))
    model.precision = "bfloat16"
    assert model.slices_per_pass((512, 512)) == 2
    low = model.predict(volume, (1.0, 0.7, 0.7))
    body = volume > -500
    assert float(np.median(np.abs(low.mean - reference.mean)[body])) < 2.0
    assert float(np.median(np.abs(low.sigma / reference.sigma - 1)[body])) < 0.05


def test_provenance_names_a_precision_other_than_float32() -> None:
    common = dict(
        pipeline="restoration",
        pipeline_version="1.0",
        model_name="ldct-restoration",
        model_version="1.3",
        weights_sha256="a" * 64,
        node_version="0.1",
        synthetic=False,
    )
    plain = OutputProvenance(**common)  # type: ignore[arg-type]
    assert "inference" not in plain.description()
    assert OutputProvenance.parse(plain.description())["precision"] == "float32"
    low = OutputProvenance(**common, precision="bfloat16")  # type: ignore[arg-type]
    assert low.description().endswith("; inference bfloat16")
    parsed = OutputProvenance.parse(low.description())
    assert parsed["precision"] == "bfloat16" and parsed["weights_sha256"] == "a" * 64


def _text_values(item: object) -> Iterator[str]:
    for child in getattr(item, "ContentSequence", []):
        if "TextValue" in child:
            yield str(child.TextValue)
        yield from _text_values(child)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_every_output_names_the_precision_it_was_computed_in(tmp_path: Path, precision: str) -> None:
    import pydicom

    from dicom_node.cli.run_cmds import _study_inputs
    from dicom_node.lab.simulate import LdctSpec, write_ldct_study
    from pipelines.base import RunEnvironment, StudyInput
    from pipelines.provenance import provenance_of
    from pipelines.registry import get_pipeline

    write_ldct_study(tmp_path / "study", LdctSpec(slices=3, size=128, dose=0.25, seed=5))
    ((study_uid, instances),) = _study_inputs([tmp_path / "study" / "low-dose"])[0].items()
    pipeline = get_pipeline("restoration", ZOO / "1.3", precision)
    assert pipeline.precision == precision  # type: ignore[attr-defined]
    out = tmp_path / "out"
    out.mkdir()
    result = pipeline.run(
        StudyInput(job_id=1, study_uid=study_uid, study_version=0, instances=tuple(instances)),
        RunEnvironment(workdir=out, uid_root="2.25.", node_version="test"),
    )
    assert result.parameters["inference_precision"] == precision
    files = sorted(out.glob("*.dcm"))
    assert len(files) >= 6
    for f in files:
        ds = pydicom.dcmread(f)
        assert provenance_of(ds)["precision"] == precision, f.name
        if ds.Modality == "SR":  # TID 4019 Algorithm Parameters in every measurement group
            texts = list(_text_values(ds))
            assert (f"inference precision {precision}" in texts) == (precision != "float32")


def test_shipped_card_lists_what_its_evaluations_cover() -> None:
    for version in sorted(p.name for p in ZOO.iterdir()):
        card = json.loads((ZOO / version / "card.json").read_text())
        for precision in card.get("inference_precisions", ["float32"]):
            name = "evaluation.json" if precision == "float32" else f"evaluation-{precision}.json"
            assert (ZOO / version / name).is_file(), (version, precision)


def test_integer_maps_read_back_within_half_a_step(tmp_path: Path) -> None:
    """A uint16 σ map through its Real World Value Mapping: every value within half a
    step of the float one; the step far below the smallest σ it has to tell apart."""
    import pydicom

    from dicom_node.lab.simulate import LdctSpec, write_ldct_study
    from pipelines.uids import UidFactory
    from pipelines.volume import load_series
    from pipelines.writers import HallucinationMapWriter, UncertaintyMapWriter, map_values

    write_ldct_study(tmp_path / "study", LdctSpec(slices=4, size=64, dose=0.25, seed=2))
    volume = load_series([pydicom.dcmread(f) for f in sorted((tmp_path / "study" / "low-dose").iterdir())])
    prov = OutputProvenance(
        pipeline="restoration",
        pipeline_version="1.0",
        model_name="ldct-restoration",
        model_version="1.3",
        weights_sha256="b" * 64,
        node_version="0.1",
        synthetic=False,
    )
    rng = np.random.default_rng(9)
    sigma = np.abs(rng.normal(12, 6, volume.array.shape)).astype(np.float32)
    sigma[0, 0, :3] = (0.0, 300.0, 2.5)
    uids = UidFactory("2.25.", "k")
    as_int = UncertaintyMapWriter(provenance=prov, uids=uids, series_number=2, units="HU").write(
        volume, sigma, tmp_path, integer=True
    )
    as_float = HallucinationMapWriter(provenance=prov, uids=uids, series_number=3).write(volume, sigma)
    read = pydicom.dcmread(tmp_path / next(p.name for p in tmp_path.glob("*.dcm")))
    assert read.BitsAllocated == 16 and read.pixel_array.dtype == np.uint16 and "FloatPixelData" not in read
    step = 300.0 / 65535
    frames = map_values(read)
    assert frames.dtype == np.float32 and frames.shape == sigma.shape
    # frames are in the map's own order: put them on the volume's slices by position
    at = {round(float(np.dot(s.position, volume.normal)), 2): k for k, s in enumerate(volume.slices)}
    values = np.empty_like(frames)
    for i, item in enumerate(read.PerFrameFunctionalGroupsSequence):
        xyz = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        values[at[round(float(np.dot(xyz, volume.normal)), 2)]] = frames[i]
    assert float(np.abs(values - sigma).max()) <= step / 2 + 1e-4
    assert step < 0.01  # HU; σ in a body is several HU
    assert as_int.BitsAllocated == 16
    assert as_float.BitsAllocated == 32 and np.array_equal(
        np.sort(map_values(as_float), None), np.sort(sigma, None)
    )


def test_slab_and_in_place_field_of_view_helpers_equal_the_whole_volume_ones(tmp_path: Path) -> None:
    """What the restoration stages now do a slice or a slab at a time (no volume-sized
    copies) gives exactly what the whole-volume helpers give."""
    from dataclasses import replace

    import pydicom

    from dicom_node.lab.simulate import LdctSpec, write_ldct_study
    from models.base import Prediction
    from pipelines import fov
    from pipelines.volume import load_series

    write_ldct_study(tmp_path / "study", LdctSpec(slices=5, size=64, dose=0.25, seed=4))
    volume = load_series([pydicom.dcmread(f) for f in sorted((tmp_path / "study" / "low-dose").iterdir())])
    rng = np.random.default_rng(10)
    inside = np.ones(volume.array.shape, bool)
    inside[:, :6, :] = False
    inside[2, 30:, 50:] = False
    volume = replace(volume, fov=inside)
    whole = fov.model_input(volume)
    lazy = fov.FilledSlices(volume)
    assert len(lazy) == 5 and lazy.shape == whole.shape
    assert np.array_equal(lazy[2], whole[2]) and np.array_equal(lazy[1:4], whole[1:4])
    assert np.array_equal(np.asarray(lazy), whole)
    mean = rng.normal(0, 50, volume.array.shape).astype(np.float32)
    sigma = np.abs(rng.normal(5, 1, volume.array.shape)).astype(np.float32)
    copied = fov.as_delivered(volume, Prediction(mean=mean.copy(), sigma=sigma.copy()))
    in_place = fov.as_delivered(volume, Prediction(mean=mean, sigma=sigma), inplace=True)
    assert in_place.mean is mean  # written into the prediction's own arrays
    assert np.array_equal(in_place.mean, copied.mean) and np.array_equal(in_place.sigma, copied.sigma)
    observed, restored = fov.scoring_pair(volume, in_place)
    for part in (slice(0, 2), slice(2, 5)):
        o, r = fov.scoring_pair(volume, in_place, part)
        assert np.array_equal(o, observed[part]) and np.array_equal(r, restored[part])
        score = rng.random(o.shape).astype(np.float32)
        assert np.array_equal(fov.clear_outside(volume, score, part), np.where(inside[part], score, 0))


def test_below_minimum_search_skips_only_what_cannot_be_padding() -> None:
    """The undeclared-padding search looks only around the low voxels and skips slices
    with too few of them to hold a 5×5 majority: the same masks as the whole-plane search."""
    from types import SimpleNamespace

    from pipelines import fov

    def whole_plane(array: np.ndarray) -> np.ndarray | None:
        found = None
        for k, plane in enumerate(array):
            low = plane < fov.PHYSICAL_MIN_HU - fov.BELOW_MINIMUM_MARGIN_HU
            if not low.any():
                continue
            core = ndimage.uniform_filter(low.astype(np.float32), size=5) > 0.5
            if core.any():
                found = np.zeros(array.shape, bool) if found is None else found
                found[k] = ndimage.binary_dilation(core, iterations=2, mask=low) | core
        return found

    rng = np.random.default_rng(11)
    for trial in range(120):
        array = rng.normal(-1000, 60 if trial % 2 else 30, (3, 40, 37)).astype(np.float32)
        if trial % 3 == 0:  # a padded block somewhere
            r, c = rng.integers(0, 40), rng.integers(0, 37)
            array[1, r : r + rng.integers(1, 12), c : c + rng.integers(1, 12)] = -2000
        if trial % 4 == 0:  # a few isolated low voxels, some at the edge (mirrored there)
            array[0, rng.integers(0, 40, 5), rng.integers(0, 37, 5)] = -3000
            array[2, 0:2, 0:2] = -3000
        if trial % 5 == 0:
            array[2, :3, :] = -3000
        volume = SimpleNamespace(modality="CT", units="HU", array=array)
        expected, got = whole_plane(array), fov.below_physical_minimum(volume)  # type: ignore[arg-type]
        assert (expected is None) == (got is None), trial
        if expected is not None:
            assert got is not None and (got == expected).all(), trial
