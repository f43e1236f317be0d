"""Evaluation of the synthesis hallucination map on SIMULATED studies (issue 18, item 4).

The map is :func:`models.synthesis_hallucination.hallucination_score`; the network is the
T1w + T2w → FLAIR :class:`models.synthesis.SynthesisModel`. Every number comes from SIMULATED
studies (:mod:`models.sim.synthesis`); none is a clinical performance claim.

Studies and twins
    Each seed gives a study (``make_study(seed)``) and its **erased twin**
    (``make_study(seed, n_lesions=0)``: the same study, lesions erased, pixel-identical
    elsewhere). The network's output on a study's own inputs is its **honest** output.
    Lesion regions: each lesion of diameter ≥ :data:`MIN_LESION_MM` (the simulator's truth),
    its label mask dilated by one voxel (6-connectivity) inside the brain.
Region score
    The :data:`REGION_PERCENTILE`-th percentile of the map over the region.
Erased lesions (AUROC)
    *Tampered* output: the honest output of the study, with every lesion region replaced by
    the honest output of the erased twin (mean and σ): the inputs show lesions the output
    lacks. Positives: the lesion regions on the tampered map. Negatives, each set as large as
    the positives: (a) the same regions on the twin's honest map (same place, no lesion in the
    inputs, nothing tampered); (b) the same region shapes moved to a random white-matter place
    of the twin (no lesion, tumour or oedema there; fixed-seed draw). AUROC against (a), (b)
    and (a) ∪ (b).
Inserted lesions (AUROC)
    The twin's inputs and honest output, with the lesioned study's normalised true FLAIR
    pasted into each lesion region (σ kept): the output shows lesions the inputs lack.
    Positives: those regions; negatives: (a) and (b) above.
The network's own misses
    The fixed detector (:mod:`models.evaluation.wm_lesions`) on the honest synthetic FLAIR of
    the lesioned study: lesions ≥ 5 mm it misses versus those it finds, the mean region score
    and the mean σ inside the lesion (undilated) per group, and the AUROC of the region score
    for "missed" (the issue asks to show the maps are high where the network erases).
QC limits
    Suspect regions (:func:`models.hallucination.suspect_regions` with
    :data:`~models.synthesis_hallucination.SUSPECT_THRESHOLD`, ``min_voxels = ceil(MIN_REGION_MM3 /
    voxel volume)``) on clean honest outputs — the twins (no lesion: every suspect region is a
    false alarm unless the network mis-renders a tumour) and, separately, the lesioned studies
    (where a suspect region may be a real erasure by the network): per study the largest
    suspect region (ml) and the suspect fraction of the brain, reported as median, 95th
    percentile and maximum; and at the same operating point the fraction of tampered lesion
    regions (erased / inserted) that a suspect region overlaps.
Choosing the two constants (:func:`choose_constants`, training-role seeds only)
    On seeds 20150–20199 (training role of :mod:`models.evaluation.synthesis_eval`, used by
    neither the network's training, 20000–20119, nor its calibration, 20120–20149), a grid of
    thresholds × minimum region sizes; kept: the setting with the most tampered regions
    (erased + inserted) overlapped by a suspect region among those with at most
    :data:`MAX_FALSE_REGIONS_PER_STUDY` suspect regions per clean twin on average (ties: the
    higher threshold, then the larger region). Test seeds are never used for this.
Other pixel sizes (``--size``)
    The studies are simulated at ``size``² over the same 240 mm field (128: 1.875 mm, the
    training's; 256: 0.94 mm; 512: 0.47 mm). Where the model's card resamples such pixels
    (:class:`models.inplane_grid.Resampling`), everything is scored as the node scores it
    (:mod:`pipelines.synthesis`): the network, its σ and the map run on the cells, and the
    map comes back onto the pixels by interpolation; the tampering (a region's output
    replaced, a lesion pasted in) is done on the cells the region half covers, the network's
    own grid. Regions, region scores, the detector and the QC limits are on the pixels, as
    delivered. At sizes above 128 each pair's maps are dropped once its figures are taken
    (memory).
T1w alone (optional, ``--t1w-only``)
    There is no trained T1w → FLAIR network: the per-tissue regression baseline
    (:class:`models.evaluation.synthesis_baselines.TissueRegression`, task ``t1w->flair``)
    fitted on training seeds 20000–20019 stands in, with σ per tissue class the robust spread
    of its training residuals. Labelled as such; the same figures.

Command line::

    python -m models.evaluation.synthesis_hallucination_eval --out DIR [--test N] [--model DIR]
        [--size 128|256|512] [--t1w-only] [--choose]

writes ``DIR/evaluation.json`` and ``DIR/report.md`` (every heading says SIMULATED).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from models.evaluation.synthesis_baselines import TissueRegression
from models.evaluation.synthesis_eval import (
    TEST_SEEDS,
    TRAIN_SEEDS,
    fmt,
    json_safe,
    make_case,
    training_studies,
)
from models.evaluation.wm_lesions import detect
from models.hallucination import suspect_regions
from models.inplane_grid import InPlaneGrid
from models.sim.synthesis import SynthLabel, make_study
from models.synthesis_hallucination import (
    MIN_REGION_MM3,
    SUSPECT_THRESHOLD,
    hallucination_score,
    hallucination_score_on_grid,
)
from models.synthesis_norm import normalise_inputs

SIMULATED = "SIMULATED data (models.sim.synthesis): not a clinical performance claim"
#: Lesions of at least this diameter (mm) are scored.
MIN_LESION_MM = 5.0
#: Percentile of the map that scores a region.
REGION_PERCENTILE = 90.0
#: Seeds the two constants are chosen on (training role, unused by the network's fit and calibration).
CHOICE_SEEDS = range(20150, 20200)
#: Training seeds of the T1w-only stand-in predictor.
T1W_FIT_SEEDS = range(20000, 20020)
#: Grid of :func:`choose_constants`.
THRESHOLD_GRID = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
REGION_MM3_GRID = (20.0, 40.0, 65.0, 100.0, 150.0)
#: Largest mean number of suspect regions per clean (lesion-free) study allowed when choosing.
MAX_FALSE_REGIONS_PER_STUDY = 0.2
DEFAULT_MODEL = Path("models/zoo/synthesis-t1w-t2w-to-flair/1.0")

Predict = Callable[[Mapping[str, np.ndarray], np.ndarray], tuple[np.ndarray, np.ndarray]]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class GridView:
    """A pair as the network saw it on its grid (see the module: other pixel sizes)."""

    grid: InPlaneGrid
    brain: np.ndarray  # the cells the study's brain half covers
    inputs: dict[str, np.ndarray]  # normalised on the cells, as the network saw them
    twin_inputs: dict[str, np.ndarray]
    mean: np.ndarray  # on the cells
    sigma: np.ndarray
    twin_mean: np.ndarray
    twin_sigma: np.ndarray


@dataclass(frozen=True)
class TwinPair:
    """A study, its erased twin, and the predictor's honest outputs on each."""

    seed: int
    spacing_mm: tuple[float, float, float]
    brain: np.ndarray
    inputs: dict[str, np.ndarray]  # lesioned study, white-matter units
    twin_inputs: dict[str, np.ndarray]
    mean: np.ndarray
    sigma: np.ndarray
    twin_mean: np.ndarray
    twin_sigma: np.ndarray
    truth: np.ndarray  # lesioned study's true FLAIR, white-matter units
    lesion_labels: np.ndarray
    diameters_mm: dict[int, float]
    t1_visible: dict[int, bool]
    avoid: np.ndarray  # lesions, tumour core and oedema: no random negative goes there
    white: np.ndarray  # white matter of the twin (simulator's labels)
    on_grid: GridView | None = None  # the network ran on a coarser grid (its card resamples)


def make_pair(
    seed: int, predict: Predict, inputs: Sequence[str], *, size: int = 128, slices: int = 32
) -> TwinPair:
    """Simulate a study and its erased twin and run ``predict`` on both."""
    study = make_study(seed, size=size, slices=slices)
    twin = make_study(seed, size=size, slices=slices, n_lesions=0)
    case = make_case(study, "t1w+t2w->flair")
    names = tuple(inputs)
    raw = {c: study.images[c] for c in names}
    twin_raw = {c: twin.images[c] for c in names}
    full = getattr(predict, "full", None)
    view = None
    if full is not None:  # the network: where its card resamples these pixels, on its grid
        out, twin_out = full(raw, study.brain, study.spacing_mm), full(twin_raw, twin.brain, study.spacing_mm)
        mean, sigma, twin_mean, twin_sigma = out.mean, out.sigma, twin_out.mean, twin_out.sigma
        if out.grid is not None:
            cells, twin_cells = out.on_grid, twin_out.on_grid
            assert cells is not None and twin_cells is not None
            view = GridView(
                grid=out.grid,
                brain=cells.brain,
                inputs=cells.normalised,
                twin_inputs=twin_cells.normalised,
                mean=cells.mean,
                sigma=cells.sigma,
                twin_mean=twin_cells.mean,
                twin_sigma=twin_cells.sigma,
            )
    else:
        mean, sigma = predict(raw, study.brain)
        twin_mean, twin_sigma = predict(twin_raw, twin.brain)
    ignore = (study.tissue == SynthLabel.TUMOUR_CORE) | (study.tissue == SynthLabel.OEDEMA)
    return TwinPair(
        seed=seed,
        spacing_mm=study.spacing_mm,
        brain=study.brain,
        inputs=normalise_inputs(raw, study.brain).images,
        twin_inputs=normalise_inputs(twin_raw, twin.brain).images,
        mean=np.asarray(mean, np.float32),
        sigma=np.asarray(sigma, np.float32),
        twin_mean=np.asarray(twin_mean, np.float32),
        twin_sigma=np.asarray(twin_sigma, np.float32),
        truth=case.truth,
        lesion_labels=study.lesion_labels,
        diameters_mm={les.id: les.diameter_mm for les in study.lesions},
        t1_visible={les.id: les.t1_visible for les in study.lesions},
        avoid=(study.lesion_labels > 0) | ignore,
        white=twin.brain & (twin.tissue == SynthLabel.WHITE),
        on_grid=view,
    )


def lesion_regions(pair: TwinPair) -> dict[int, np.ndarray]:
    """Lesion id → its region (label mask dilated by one voxel, in the brain), lesions ≥ 5 mm."""
    out = {}
    cross = ndimage.generate_binary_structure(3, 1)
    for lesion, diameter in sorted(pair.diameters_mm.items()):
        mask = pair.lesion_labels == lesion
        if diameter >= MIN_LESION_MM and mask.any():
            out[lesion] = ndimage.binary_dilation(mask, cross) & pair.brain
    return out


def region_score(score: np.ndarray, region: np.ndarray) -> float:
    """:data:`REGION_PERCENTILE`-th percentile of the map over a region."""
    return float(np.percentile(score[region], REGION_PERCENTILE))


def random_white_region(pair: TwinPair, region: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """The region's shape moved to a random white-matter place of the twin away from any abnormality."""
    centre = np.round(np.argwhere(region).mean(axis=0)).astype(int)
    candidates = np.argwhere(pair.white & ~ndimage.binary_dilation(pair.avoid, iterations=2))
    if not len(candidates):
        return None
    for _ in range(50):
        target = candidates[rng.integers(len(candidates))]
        moved = np.roll(region, tuple(int(v) for v in target - centre), axis=(0, 1, 2))
        if (moved & pair.brain).sum() >= 0.9 * region.sum() and not (moved & pair.avoid).any():
            return moved & pair.brain
    return None


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann–Whitney, ties count one half); None when a class is empty."""
    if not positives or not negatives:
        return None
    p = np.asarray(positives, np.float64)[:, None]
    n = np.asarray(negatives, np.float64)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def min_voxels(pair: TwinPair, region_mm3: float) -> int:
    voxel = float(np.prod(pair.spacing_mm))
    return max(1, math.ceil(region_mm3 / voxel))


@dataclass
class PairScores:
    """Per-pair scores: region scores and the maps the QC limits need."""

    seed: int
    erased: list[float] = field(default_factory=list)
    inserted: list[float] = field(default_factory=list)
    same_place: list[float] = field(default_factory=list)
    random_place: list[float] = field(default_factory=list)
    lesions: list[dict[str, Any]] = field(default_factory=list)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    regions: dict[int, np.ndarray] = field(default_factory=dict)
    seconds_per_map: float = 0.0
    #: The QC figures at (threshold, minimum region mm³), taken before the maps were dropped.
    qc: dict[tuple[float, float], dict[str, Any]] = field(default_factory=dict)


def _maps(pair: TwinPair, union: np.ndarray | None) -> tuple[dict[str, np.ndarray], float]:
    """The honest and twin maps, and with lesion regions (``union``) the erased and inserted
    ones; the seconds the honest map took."""
    view = pair.on_grid
    if view is None:
        inputs, twin_inputs = pair.inputs, pair.twin_inputs
        mean, sigma, twin_mean, twin_sigma = pair.mean, pair.sigma, pair.twin_mean, pair.twin_sigma
        tampered = union

        def score(images: Mapping[str, np.ndarray], target: np.ndarray, spread: np.ndarray) -> np.ndarray:
            return hallucination_score(images, target, spread, pair.brain, pair.spacing_mm)

    else:  # as pipelines.synthesis scores a resampled series: on the cells, then back up
        inputs, twin_inputs = view.inputs, view.twin_inputs
        mean, sigma, twin_mean, twin_sigma = view.mean, view.sigma, view.twin_mean, view.twin_sigma
        tampered = None if union is None else view.grid.down_mask(union) & view.brain

        def score(images: Mapping[str, np.ndarray], target: np.ndarray, spread: np.ndarray) -> np.ndarray:
            return hallucination_score_on_grid(view.grid, images, target, spread, view.brain, pair.brain)

    t0 = time.perf_counter()
    maps = {"honest": score(inputs, mean, sigma)}
    seconds = time.perf_counter() - t0
    maps["twin"] = score(twin_inputs, twin_mean, twin_sigma)
    if tampered is not None:
        # the true FLAIR where the network ran: on the cells, as a scanner at that pixel size would show it
        truth = pair.truth if view is None else view.grid.down(pair.truth)
        maps["erased"] = score(
            inputs, np.where(tampered, twin_mean, mean), np.where(tampered, twin_sigma, sigma)
        )
        maps["inserted"] = score(twin_inputs, np.where(tampered, truth, twin_mean), twin_sigma)
    return maps, seconds


def score_pair(pair: TwinPair, *, detect_misses: bool = True) -> PairScores:
    """Erased, inserted and honest maps of one pair and their region scores."""
    sp = pair.spacing_mm
    regions = lesion_regions(pair)
    union = np.any(list(regions.values()), axis=0) if regions else None
    maps, seconds = _maps(pair, union)
    honest, twin = maps["honest"], maps["twin"]
    out = PairScores(pair.seed, maps=maps, regions=regions)
    if regions:
        tampered, inserted = maps["erased"], maps["inserted"]
        rng = np.random.default_rng(pair.seed)
        found = detect(pair.mean, pair.brain, sp).labels if detect_misses else None
        for lesion, region in regions.items():
            out.erased.append(region_score(tampered, region))
            out.inserted.append(region_score(inserted, region))
            out.same_place.append(region_score(twin, region))
            moved = random_white_region(pair, region, rng)
            if moved is not None and moved.any():
                out.random_place.append(region_score(twin, moved))
            core = pair.lesion_labels == lesion
            out.lesions.append(
                {
                    "seed": pair.seed,
                    "lesion": lesion,
                    "diameter_mm": pair.diameters_mm[lesion],
                    "t1_visible": pair.t1_visible[lesion],
                    "found": None if found is None else bool((found[core] > 0).any()),
                    "score": region_score(honest, region),
                    "sigma": float(pair.sigma[core].mean()),
                }
            )
    out.seconds_per_map = seconds
    return out


def qc_figures(pair: TwinPair, scores: PairScores, threshold: float, region_mm3: float) -> dict[str, Any]:
    """Suspect regions of the honest maps and tampered-region hits at one operating point."""
    voxel_ml = float(np.prod(pair.spacing_mm)) / 1000.0
    n_min = min_voxels(pair, region_mm3)
    brain_voxels = max(int(pair.brain.sum()), 1)
    row: dict[str, Any] = {"seed": pair.seed}
    for name in ("twin", "honest"):
        suspect = suspect_regions(scores.maps[name], threshold, min_voxels=n_min)
        labels, count = ndimage.label(suspect)
        sizes = np.bincount(labels.ravel())[1:] if count else np.zeros(0, int)
        row[name] = {
            "regions": int(count),
            "largest_ml": float(sizes.max() * voxel_ml) if count else 0.0,
            "fraction": float(suspect.sum() / brain_voxels),
        }
    for name in ("erased", "inserted"):
        if name in scores.maps:
            suspect = suspect_regions(scores.maps[name], threshold, min_voxels=n_min)
            row[f"{name}_hit"] = [bool((suspect & r).any()) for r in scores.regions.values()]
        else:
            row[f"{name}_hit"] = []
    return row


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p95": None, "max": None}
    v = np.asarray(values, np.float64)
    return {"median": float(np.median(v)), "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def pool(
    pairs: Sequence[TwinPair], scores: Sequence[PairScores], threshold: float, region_mm3: float
) -> dict[str, Any]:
    """AUROCs, the misses analysis and the QC limits over studies."""
    erased = [v for s in scores for v in s.erased]
    inserted = [v for s in scores for v in s.inserted]
    same = [v for s in scores for v in s.same_place]
    rand = [v for s in scores for v in s.random_place]
    lesions = [row for s in scores for row in s.lesions]
    missed = [r for r in lesions if r["found"] is False]
    found = [r for r in lesions if r["found"] is True]
    qc = [
        s.qc.get((threshold, region_mm3)) or qc_figures(p, s, threshold, region_mm3)
        for p, s in zip(pairs, scores, strict=True)
    ]
    hits = {k: [h for row in qc for h in row[f"{k}_hit"]] for k in ("erased", "inserted")}

    def mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
        return float(np.mean([r[key] for r in rows])) if rows else None

    return {
        "studies": len(pairs),
        "lesions_scored": len(erased),
        "erased": {
            "auroc_vs_same_place": auroc(erased, same),
            "auroc_vs_random_white": auroc(erased, rand),
            "auroc_vs_both": auroc(erased, same + rand),
        },
        "inserted": {
            "auroc_vs_same_place": auroc(inserted, same),
            "auroc_vs_random_white": auroc(inserted, rand),
            "auroc_vs_both": auroc(inserted, same + rand),
        },
        "region_scores": {
            "erased": _summary(erased),
            "inserted": _summary(inserted),
            "negatives_same_place": _summary(same),
            "negatives_random_white": _summary(rand),
        },
        "network_misses": {
            "missed": len(missed),
            "found": len(found),
            "mean_score_missed": mean(missed, "score"),
            "mean_score_found": mean(found, "score"),
            "mean_sigma_missed": mean(missed, "sigma"),
            "mean_sigma_found": mean(found, "sigma"),
            "auroc_score_missed_vs_found": auroc([r["score"] for r in missed], [r["score"] for r in found]),
            "auroc_sigma_missed_vs_found": auroc([r["sigma"] for r in missed], [r["sigma"] for r in found]),
        },
        "qc": {
            "suspect_threshold": threshold,
            "min_region_mm3": region_mm3,
            "clean_twins": {
                "largest_region_ml": _summary([r["twin"]["largest_ml"] for r in qc]),
                "suspect_fraction": _summary([r["twin"]["fraction"] for r in qc]),
                "regions_per_study": float(np.mean([r["twin"]["regions"] for r in qc])) if qc else None,
                "studies_with_a_region": int(sum(r["twin"]["regions"] > 0 for r in qc)),
            },
            "lesioned_honest": {
                "largest_region_ml": _summary([r["honest"]["largest_ml"] for r in qc]),
                "suspect_fraction": _summary([r["honest"]["fraction"] for r in qc]),
                "regions_per_study": float(np.mean([r["honest"]["regions"] for r in qc])) if qc else None,
            },
            "erased_regions_flagged": float(np.mean(hits["erased"])) if hits["erased"] else None,
            "inserted_regions_flagged": float(np.mean(hits["inserted"])) if hits["inserted"] else None,
        },
        "lesions": lesions,
        "seconds_per_map": float(np.mean([s.seconds_per_map for s in scores])) if scores else None,
    }


def choose_constants(pairs: Sequence[TwinPair], scores: Sequence[PairScores]) -> dict[str, Any]:
    """Grid of threshold × minimum region on training-role pairs (see the module); refuses test seeds."""
    clash = sorted({p.seed for p in pairs} & set(TEST_SEEDS))
    if clash:
        raise ValueError(f"choose_constants: test seeds {clash[:5]} may not choose constants")
    grid = []
    for threshold in THRESHOLD_GRID:
        for region_mm3 in REGION_MM3_GRID:
            qc = [qc_figures(p, s, threshold, region_mm3) for p, s in zip(pairs, scores, strict=True)]
            hits = [h for row in qc for k in ("erased_hit", "inserted_hit") for h in row[k]]
            grid.append(
                {
                    "threshold": threshold,
                    "min_region_mm3": region_mm3,
                    "tampered_flagged": float(np.mean(hits)) if hits else 0.0,
                    "false_regions_per_clean_study": float(np.mean([r["twin"]["regions"] for r in qc])),
                }
            )
    ok = [g for g in grid if g["false_regions_per_clean_study"] <= MAX_FALSE_REGIONS_PER_STUDY]
    best = max(ok, key=lambda g: (g["tampered_flagged"], g["threshold"], g["min_region_mm3"])) if ok else None
    return {"seeds": sorted(p.seed for p in pairs), "grid": grid, "chosen": best}


class NetworkPredictor:
    """The synthesis network's (mean, σ)."""

    def __init__(self, directory: Path) -> None:
        from models.synthesis import SynthesisModel  # torch: only when the network is asked for

        self.model = SynthesisModel(directory)
        self.name = self.model.name

    def __call__(self, inputs: Mapping[str, np.ndarray], brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.model.predict_full(inputs, brain)
        return out.mean, out.sigma

    def full(self, inputs: Mapping[str, np.ndarray], brain: np.ndarray, spacing: Sequence[float]) -> Any:
        """The model's whole output for a series of ``spacing``: on its grid where its card
        resamples such pixels (a :class:`models.synthesis.SynthesisOutput`)."""
        return self.model.predict_full(inputs, brain, spacing)


class T1wRegressionPredictor:
    """T1w-only stand-in: per-tissue regression (t1w → FLAIR) with σ per class from training residuals."""

    name = "tissue regression t1w->flair (stand-in: no T1w-only network)"

    def __init__(self, seeds: Sequence[int] = T1W_FIT_SEEDS, *, size: int = 128, slices: int = 32) -> None:
        studies = training_studies(list(seeds), "t1w+t2w->flair", size=size, slices=slices)
        self.regression = TissueRegression("t1w->flair").fit(studies)
        spreads = []
        for k in range(self.regression.n_classes):
            residuals = []
            for s in studies:
                inputs = {"t1w": s.images["t1w"]}
                norm = normalise_inputs(inputs, s.brain)
                truth = s.images["flair"] / np.float32(np.median(s.images["flair"][norm.white]))
                cls = self.regression.classes(inputs, s.brain)
                pred = self.regression.predict(inputs, s.brain)
                residuals.append((truth - pred)[cls == k])
            r = np.concatenate(residuals)
            spreads.append(1.4826 * float(np.median(np.abs(r - np.median(r)))))
        self.class_sigma = np.asarray(spreads, np.float32)

    def __call__(self, inputs: Mapping[str, np.ndarray], brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t1 = {"t1w": inputs["t1w"]}
        mean = self.regression.predict(t1, brain)
        cls = self.regression.classes(t1, brain)
        sigma = np.where(cls >= 0, self.class_sigma[np.maximum(cls, 0)], 0.0).astype(np.float32)
        return mean, sigma


def run_variant(
    predict: Predict,
    inputs: Sequence[str],
    seeds: Sequence[int],
    *,
    progress: Progress | None = None,
    keep_maps: bool = True,
    **sim: int,
) -> tuple[list[TwinPair], list[PairScores]]:
    """Pairs and their scores. ``keep_maps=False``: each pair's QC figures are taken at the
    shipped operating point at once and its maps dropped (the pairs keep only what
    :func:`pool` reads then), so a 512² run holds one pair's maps at a time."""
    pairs, scores = [], []
    for i, seed in enumerate(seeds):
        pair = make_pair(seed, predict, inputs, **sim)
        scored = score_pair(pair)
        if not keep_maps:
            at = (SUSPECT_THRESHOLD, MIN_REGION_MM3)
            scored.qc[at] = qc_figures(pair, scored, *at)
            scored.maps, scored.regions = {}, {}
        pairs.append(pair if keep_maps else _light(pair))
        scores.append(scored)
        if progress:
            progress(f"{'+'.join(inputs)} seed {seed} ({i + 1}/{len(seeds)})")
    return pairs, scores


def _light(pair: TwinPair) -> TwinPair:
    """The pair without its volumes (its figures are taken; see :func:`run_variant`)."""
    e = np.zeros((0,), np.float32)
    return replace(
        pair, brain=e, mean=e, sigma=e, twin_mean=e, twin_sigma=e, truth=e, lesion_labels=e, avoid=e, white=e,
        inputs={}, twin_inputs={}, on_grid=None,
    )  # fmt: skip


def report(results: Mapping[str, Any]) -> str:
    """Markdown report, every heading SIMULATED."""
    lines = [
        "# SIMULATED — hallucination map of MR contrast synthesis (issue 18, item 4)",
        "",
        f"{SIMULATED}. {results.get('pixels', '128² (1.875 mm)')}. "
        f"Model {results['model']}; test seeds {results['test_seeds'][0]}–"
        f"{results['test_seeds'][-1]} ({len(results['test_seeds'])} studies); constants "
        f"SUSPECT_THRESHOLD = {results['suspect_threshold']}, MIN_REGION_MM3 = {results['min_region_mm3']} "
        "(chosen on training-role seeds 20150–20199). Definitions: module docstring of "
        "`models.evaluation.synthesis_hallucination_eval`.",
    ]
    for name, r in results["variants"].items():
        qc = r["qc"]
        miss = r["network_misses"]
        lines += [
            "",
            f"## SIMULATED — {name}",
            "",
            f"{r['studies']} studies, {r['lesions_scored']} lesions ≥ {MIN_LESION_MM:g} mm; "
            f"map {fmt(r['seconds_per_map'], 2)} s per study.",
            "",
            "| AUROC (SIMULATED) | vs same place | vs random white matter | vs both |",
            "|---|---|---|---|",
        ]
        for kind in ("erased", "inserted"):
            a = r[kind]
            lines.append(
                f"| {kind} | {fmt(a['auroc_vs_same_place'])} | {fmt(a['auroc_vs_random_white'])} "
                f"| {fmt(a['auroc_vs_both'])} |"
            )
        lines += [
            "",
            "| the network's own lesions (SIMULATED) | n | mean map score | mean σ |",
            "|---|---|---|---|",
            f"| missed by the detector on the synthetic FLAIR | {miss['missed']} | "
            f"{fmt(miss['mean_score_missed'], 2)} | {fmt(miss['mean_sigma_missed'])} |",
            f"| found | {miss['found']} | {fmt(miss['mean_score_found'], 2)} "
            f"| {fmt(miss['mean_sigma_found'])} |",
            "",
            f"AUROC missed vs found: map {fmt(miss['auroc_score_missed_vs_found'])}, "
            f"σ {fmt(miss['auroc_sigma_missed_vs_found'])}.",
            "",
            "| QC on honest outputs (SIMULATED) | largest suspect region ml: median / p95 / max "
            "| suspect fraction: median / p95 / max | regions per study |",
            "|---|---|---|---|",
        ]
        for label, key in (
            ("erased twins (no lesions)", "clean_twins"),
            ("lesioned studies", "lesioned_honest"),
        ):
            q = qc[key]
            lr, sf = q["largest_region_ml"], q["suspect_fraction"]
            lines.append(
                f"| {label} | {fmt(lr['median'], 2)} / {fmt(lr['p95'], 2)} / {fmt(lr['max'], 2)} "
                f"| {fmt(sf['median'], 4)} / {fmt(sf['p95'], 4)} / {fmt(sf['max'], 4)} "
                f"| {fmt(q['regions_per_study'], 2)} |"
            )
        lines += [
            "",
            f"Tampered regions overlapped by a suspect region: erased {fmt(qc['erased_regions_flagged'])}, "
            f"inserted {fmt(qc['inserted_regions_flagged'])}.",
        ]
    if results.get("choice"):
        chosen = results["choice"]["chosen"]
        lines += [
            "",
            "## SIMULATED — choice of the constants (training-role seeds 20150–20199)",
            "",
            f"Chosen: {chosen}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--test", type=int, default=30, help="first N test seeds (30000-)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument(
        "--size",
        type=int,
        default=128,
        choices=(128, 256, 512),
        help="in-plane pixels over the same 240 mm field (128: 1.875 mm, the training's)",
    )
    parser.add_argument("--t1w-only", action="store_true", help="also the T1w-only stand-in predictor")
    parser.add_argument(
        "--choose", action="store_true", help="also rerun the constants' choice (seeds 20150-20199)"
    )
    parser.add_argument(
        "--t1w-model", type=Path, help="a T1w-only network (task t1w->flair) for the T1w-alone variant"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.test <= len(TEST_SEEDS):
        parser.error(f"--test {args.test}: choose 1-{len(TEST_SEEDS)}")
    seeds = list(TEST_SEEDS)[: args.test]
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    network = NetworkPredictor(args.model)
    sim = {"size": args.size}
    keep_maps = args.size <= 128
    pixel_mm = 240.0 / args.size
    grid = network.model.grid_for((1, args.size, args.size), (3.0, pixel_mm, pixel_mm))
    pixels = f"{args.size}² ({pixel_mm:.4g} mm pixels)" + (
        f", the network, σ and map on its {max(grid.cell_spacing[1:]):.4g} mm grid"
        if grid is not None
        else ""
    )
    results: dict[str, Any] = {
        "size": args.size,
        "pixels": pixels,
        "simulated_data": True,
        "note": SIMULATED,
        "model": network.name,
        "test_seeds": seeds,
        "suspect_threshold": SUSPECT_THRESHOLD,
        "min_region_mm3": MIN_REGION_MM3,
        "variants": {},
    }
    if args.choose:
        assert set(CHOICE_SEEDS) <= set(TRAIN_SEEDS)
        pairs, scores = run_variant(network, ("t1w", "t2w"), list(CHOICE_SEEDS), progress=progress)
        results["choice"] = choose_constants(pairs, scores)
    pairs, scores = run_variant(network, ("t1w", "t2w"), seeds, progress=progress, keep_maps=keep_maps, **sim)
    name = f"T1w + T2w → FLAIR, network {network.name}"
    results["variants"][name] = pool(pairs, scores, SUSPECT_THRESHOLD, MIN_REGION_MM3)
    if args.t1w_only:
        stand_in = T1wRegressionPredictor()
        pairs, scores = run_variant(stand_in, ("t1w",), seeds, progress=progress, keep_maps=keep_maps, **sim)
        results["variants"][f"T1w alone → FLAIR, {stand_in.name}"] = pool(
            pairs, scores, SUSPECT_THRESHOLD, MIN_REGION_MM3
        )
    if args.t1w_model is not None:
        t1w_network = NetworkPredictor(args.t1w_model)
        if t1w_network.model.inputs != ("t1w",) or t1w_network.model.target != "flair":
            parser.error(f"--t1w-model {args.t1w_model}: {t1w_network.name} is not a t1w->flair model")
        pairs, scores = run_variant(
            t1w_network, ("t1w",), seeds, progress=progress, keep_maps=keep_maps, **sim
        )
        results["variants"][f"T1w alone → FLAIR, network {t1w_network.name}"] = pool(
            pairs, scores, SUSPECT_THRESHOLD, MIN_REGION_MM3
        )
    results["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(json_safe(results), indent=1))
    text = report(results)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
