"""The synthesis hallucination map (models.synthesis_hallucination) and its evaluation.

Constructed phantoms (a brain of CSF, grey and white matter with one T2w-bright lesion) and
two tiny SIMULATED studies; every figure here is on simulated data.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from models.hallucination import suspect_regions
from models.synthesis_hallucination import MIN_REGION_MM3, SUSPECT_THRESHOLD, hallucination_score

SPACING = (3.0, 1.875, 1.875)
# Tissue values in white-matter units: (T1w, T2w, FLAIR).
CSF, GREY, WHITE, LESION = (0.3, 3.4, 0.15), (0.8, 1.25, 0.95), (1.0, 1.0, 1.0), (0.9, 1.9, 1.6)


def _phantom(seed: int = 0) -> dict[str, np.ndarray]:
    """16 × 64 × 64: a ball brain (grey rim, white core, CSF ventricle), one lesion, noise 2 %."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:16, :64, :64].astype(np.float32)
    r = np.sqrt(((z - 7.5) * 3.0 / 1.875) ** 2 + (y - 31.5) ** 2 + (x - 31.5) ** 2)
    brain = r < 28
    tissue = np.where(r < 22, 2, 1)  # 2 white, 1 grey
    ventricle = (((y - 31.5) / 8) ** 2 + ((x - 25.0) / 3) ** 2 < 1) & (np.abs(z - 7.5) < 5)
    tissue = np.where(ventricle, 0, tissue)
    lesion = ((z - 7.5) * 3.0 / 1.875) ** 2 + (y - 31.5) ** 2 + (x - 42.0) ** 2 < 3.5**2
    tissue = np.where(lesion, 3, tissue)
    values = np.array([CSF, GREY, WHITE, LESION], np.float32)
    images = {}
    for k, name in enumerate(("t1w", "t2w", "flair")):
        # partial volume at every tissue edge, as in an acquired image
        clean = np.where(brain, ndimage.gaussian_filter(values[tissue, k], (0, 1.0, 1.0)), 0.0)
        images[name] = (clean + rng.normal(0, 0.02, clean.shape)).astype(np.float32)
    images["brain"] = brain
    images["lesion"] = lesion & brain
    images["white"] = brain & (tissue == 2)
    images["sigma"] = np.where(brain, 0.05, 0.0).astype(np.float32)
    return images


def _score(
    p: dict[str, np.ndarray], mean: np.ndarray, inputs: tuple[str, ...] = ("t1w", "t2w")
) -> np.ndarray:
    return hallucination_score({c: p[c] for c in inputs}, mean, p["sigma"], p["brain"], SPACING)


def test_score_is_finite_nonnegative_and_zero_outside_the_brain() -> None:
    p = _phantom()
    s = _score(p, p["flair"])
    assert s.dtype == np.float32 and s.shape == p["brain"].shape
    assert np.isfinite(s).all() and (s >= 0).all()
    assert (s[~p["brain"]] == 0).all()


def test_faithful_output_scores_low() -> None:
    p = _phantom()
    s = _score(p, p["flair"])
    assert np.percentile(s[p["brain"]], 99) < SUSPECT_THRESHOLD
    assert s[p["lesion"]].max() < SUSPECT_THRESHOLD  # a lesion rendered on both sides cancels


def test_erased_lesion_scores_high_there_and_low_elsewhere() -> None:
    p = _phantom()
    erased = np.where(p["lesion"], WHITE[2], p["flair"]).astype(np.float32)  # painted as white matter
    s = _score(p, erased)
    assert np.percentile(s[p["lesion"]], 90) > 2 * SUSPECT_THRESHOLD
    far = p["brain"] & ~np.isin(np.arange(64), np.arange(34, 51))[None, None, :]
    assert np.percentile(s[far], 99) < SUSPECT_THRESHOLD
    voxel = float(np.prod(SPACING))
    suspect = suspect_regions(s, SUSPECT_THRESHOLD, min_voxels=math.ceil(MIN_REGION_MM3 / voxel))
    assert (suspect & p["lesion"]).any() and not (suspect & far).any()


def test_inserted_bright_blob_scores_high() -> None:
    p = _phantom()
    z, y, x = np.mgrid[:16, :64, :64]
    blob = p["white"] & (((z - 7.5) * 3.0 / 1.875) ** 2 + (y - 22.0) ** 2 + (x - 36.0) ** 2 < 3.5**2)
    inserted = np.where(blob, LESION[2], p["flair"]).astype(np.float32)
    s = _score(p, inserted)
    assert np.percentile(s[blob], 90) > 2 * SUSPECT_THRESHOLD
    assert np.percentile(_score(p, p["flair"])[blob], 90) < SUSPECT_THRESHOLD


def test_t1w_alone_works_and_flags_an_inserted_blob() -> None:
    p = _phantom()
    s = _score(p, p["flair"], ("t1w",))
    assert np.isfinite(s).all() and (s >= 0).all() and (s[~p["brain"]] == 0).all()
    z, y, x = np.mgrid[:16, :64, :64]
    blob = p["white"] & (((z - 7.5) * 3.0 / 1.875) ** 2 + (y - 22.0) ** 2 + (x - 36.0) ** 2 < 3.5**2)
    inserted = np.where(blob, LESION[2], p["flair"]).astype(np.float32)
    assert np.percentile(_score(p, inserted, ("t1w",))[blob], 90) > SUSPECT_THRESHOLD


def test_score_does_not_depend_on_the_scale_of_each_image() -> None:
    p = _phantom()
    erased = np.where(p["lesion"], WHITE[2], p["flair"]).astype(np.float32)
    a = _score(p, erased)
    b = hallucination_score(
        {"t1w": 300 * p["t1w"], "t2w": 7 * p["t2w"]}, 50 * erased, 50 * p["sigma"], p["brain"], SPACING
    )
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_missing_t1w_and_wrong_shapes_are_refused() -> None:
    p = _phantom()
    with pytest.raises(ValueError, match="t1w"):
        hallucination_score({"t2w": p["t2w"]}, p["flair"], p["sigma"], p["brain"], SPACING)
    with pytest.raises(ValueError, match="shape"):
        hallucination_score({"t1w": p["t1w"]}, p["flair"][:8], p["sigma"], p["brain"], SPACING)


def test_evaluation_on_a_tiny_simulated_study(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from models.evaluation import synthesis_hallucination_eval as he

    def truth_predictor(inputs, brain):  # type: ignore[no-untyped-def]
        # A stand-in "network" that renders FLAIR from T2w in white matter (no torch).
        from models.synthesis_norm import normalise_inputs

        norm = normalise_inputs(inputs, brain)
        t1, t2 = norm.images["t1w"], norm.images["t2w"]
        flair = np.where(t1 > 0.6, np.clip(t2, 0, 2.5) * 0.8, 0.1)
        return np.where(brain, flair, 0).astype(np.float32), np.where(brain, 0.05, 0).astype(np.float32)

    pairs, scores = [], []
    for seed in (20150,):  # 15 lesions; one study keeps the test fast (the atlas load is ~10 s)
        pair = he.make_pair(seed, truth_predictor, ("t1w", "t2w"), size=64, slices=16)
        pairs.append(pair)
        scores.append(he.score_pair(pair))
    result = he.pool(pairs, scores, SUSPECT_THRESHOLD, MIN_REGION_MM3)
    assert result["lesions_scored"] > 0
    for kind in ("erased", "inserted"):
        for value in result[kind].values():
            assert value is None or 0.0 <= value <= 1.0
    assert result["erased"]["auroc_vs_same_place"] is not None
    assert result["qc"]["clean_twins"]["largest_region_ml"]["max"] >= 0.0
    text = he.report(
        {
            "model": "stand-in",
            "test_seeds": [20150],
            "suspect_threshold": SUSPECT_THRESHOLD,
            "min_region_mm3": MIN_REGION_MM3,
            "variants": {"tiny": result},
        }
    )
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings and all("SIMULATED" in h for h in headings)
    with pytest.raises(ValueError, match="test seeds"):
        he.choose_constants([pairs[0].__class__(**{**pairs[0].__dict__, "seed": 30000})], scores[:1])


def test_auroc_is_the_mann_whitney_fraction() -> None:
    from models.evaluation.synthesis_hallucination_eval import auroc

    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auroc([1.0], [1.0]) == 0.5
    assert auroc([1.0, 3.0], [2.0]) == 0.5
    assert auroc([], [1.0]) is None


def _white_matter_flair(inputs, brain):  # type: ignore[no-untyped-def]
    """A stand-in "network" (no torch): FLAIR from the normalised T2w in white matter."""
    t1, t2 = inputs["t1w"], inputs["t2w"]
    flair = np.where(t1 > 0.6, np.clip(t2, 0, 2.5) * 0.8, 0.1)
    return np.where(brain, flair, 0).astype(np.float32), np.where(brain, 0.05, 0).astype(np.float32)


class _OnAGrid:
    """The stand-in run as the node runs a model whose card resamples the pixels: on cells
    twice the pixel size, its outputs back on the pixels (models.synthesis.predict_on_grid)."""

    def __call__(self, inputs, brain):  # type: ignore[no-untyped-def]
        raise AssertionError("the harness must ask for the whole output (full) with the spacing")

    def full(self, inputs, brain, spacing):  # type: ignore[no-untyped-def]
        from models.inplane_grid import InPlaneGrid
        from models.synthesis import SynthesisOutput
        from models.synthesis_norm import normalise_inputs

        grid = InPlaneGrid(tuple(brain.shape), tuple(spacing), 2 * spacing[1])
        cells_brain = grid.down_mask(brain)
        norm = normalise_inputs({c: grid.down(v) for c, v in inputs.items()}, cells_brain)
        mean, sigma = _white_matter_flair(norm.images, cells_brain)
        coarse = SynthesisOutput(mean, sigma, norm.scales, cells_brain, normalised=norm.images)
        up_mean = np.where(brain, np.maximum(grid.up(mean), 0), 0).astype(np.float32)
        up_sigma = np.where(brain, grid.up(sigma), 0).astype(np.float32)
        return SynthesisOutput(up_mean, up_sigma, norm.scales, brain, grid=grid, on_grid=coarse)


def test_a_model_on_a_coarser_grid_is_scored_as_the_node_scores_it() -> None:
    """--size 512 with the shipped card: the network and the map run on the cells. The
    harness scores what pipelines.synthesis delivers (the cells' map brought back onto the
    pixels), tampers on the cells, and (memory) may drop each pair's maps once its QC figures
    are taken, with the same pooled figures."""
    from models.evaluation import synthesis_hallucination_eval as he

    stand_in = _OnAGrid()
    pair = he.make_pair(20150, stand_in, ("t1w", "t2w"), size=64, slices=16)
    view = pair.on_grid
    assert view is not None and view.grid.cells == (32, 32)
    assert view.mean.shape == (16, 32, 32) and pair.mean.shape == (16, 64, 64)
    scored = he.score_pair(pair)
    on_cells = hallucination_score(view.inputs, view.mean, view.sigma, view.brain, view.grid.cell_spacing)
    delivered = np.where(pair.brain, np.maximum(view.grid.up(on_cells), 0), 0)  # pipelines.synthesis
    np.testing.assert_allclose(scored.maps["honest"], delivered, atol=1e-6)
    assert scored.erased and scored.maps["erased"].shape == pair.brain.shape
    # an erased lesion scores higher than the same place in the honest twin, on the whole
    assert np.mean(scored.erased) > np.mean(scored.same_place)

    kept = he.run_variant(stand_in, ("t1w", "t2w"), [20150], size=64, slices=16)
    light = he.run_variant(stand_in, ("t1w", "t2w"), [20150], size=64, slices=16, keep_maps=False)
    assert light[1][0].maps == {} and light[0][0].brain.size == 0
    a = he.pool(*kept, SUSPECT_THRESHOLD, MIN_REGION_MM3)
    b = he.pool(*light, SUSPECT_THRESHOLD, MIN_REGION_MM3)
    a.pop("seconds_per_map"), b.pop("seconds_per_map")  # a clock
    assert a == b and a["lesions_scored"] > 0
