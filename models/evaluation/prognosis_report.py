"""Prognosis evaluation at three levels, one report, on SIMULATED patients (issue 17):
``dicom-node evaluate prognosis --report DIR``.

Each test patient is :func:`models.sim.prognosis.make_patient` with four visits; visits 1–3
are the input, visit 4 the follow-up. The forecast (:func:`models.prognosis.combine`, the
shipped calibration unless another is given) is made on the 2 mm growth grid from the true
visible extents, as in :mod:`models.evaluation.prognosis_eval`.

Levels
    *pixel* — the predicted T1c and FLAIR images (:func:`models.prognosis_images.predict_images`,
    fed with the current visit's images and the forecast's core / whole-tumour probabilities
    resampled onto the current visit's image grid) against the acquired follow-up images, and
    no change (the current images) against them: mean absolute error inside the brain and inside
    the tumour region (today's, the follow-up's or the predicted whole-tumour extent). Frames:
    the probabilities go from the growth grid to the reference grid (the atlas-aligned image
    grid, the mapping the simulator uses for its reference density) and then into the current
    visit's scanner frame (:func:`models.sim.prognosis.to_visit_frame`); for the comparison the
    predicted, current and follow-up images are each brought back onto the reference grid with
    their own visit's pose (:func:`models.sim.prognosis.to_reference_frame`, trilinear), and the
    brain is where both visits' brain masks are. Each visit has its own receiver gain, so every
    image is divided by its median in that brain (the predicted image by the current image's);
    the visits' different bias fields are not removed and count against both methods alike.

    *feature* — the Fréchet distance (and KID) between sim-encoder features of 64 × 64 patches
    of the predicted and of the acquired follow-up slices (centres in the tumour region, the
    same positions for every image), and of no change against the follow-up. The encoder
    (:mod:`models.evaluation.features`) was trained on SIMULATED CT patches; MR intensities are
    put on a pseudo-HU scale (``40 + 100 (x − 1)`` for the median-normalised ``x``), so the
    distances compare the two methods with each other and mean nothing on their own.

    *task* and *calibration* — :func:`models.evaluation.prognosis_eval.evaluate`: Dice and HD95
    of the whole-tumour extent, core Dice, volume error, growth call, the 90 % interval's
    coverage and the voxel ECE, for the model and the baselines.

    *hallucination* — :func:`models.prognosis_images.hallucination_map` on the growth grid:
    over every voxel the forecast calls tumour (p ≥ 0.5) outside today's whole tumour, the
    AUROC of the map's value for "the follow-up has no tumour there".
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import prognosis as pg
from models.evaluation import prognosis_eval as pe

SIMULATED = pe.SIMULATED
FEATURE_LABEL = (
    "sim-encoder v1.0: a small CNN trained in this project on SIMULATED CT patches (not an MR encoder, "
    "not Inception); MR intensities on a pseudo-HU scale; compare the methods with each other only"
)
CONTRASTS = ("t1c", "flair")
#: Feature patches per patient and contrast.
PATCHES_PER_CASE = 8
Progress = Callable[[str, int, int], None]


def growth_to_reference(volume: np.ndarray, patient: Any, *, order: int = 1) -> np.ndarray:
    """A growth-grid volume (the 2 mm domain) resampled onto the patient's reference grid —
    the mapping :func:`models.sim.prognosis.make_patient` uses for ``Visit.density``."""
    from scipy import ndimage

    from models.sim.prognosis import _lps_grid

    d = patient.domain
    shape = patient.visits[0].density.shape
    x, y, z = _lps_grid(shape, patient.spacing_mm)
    centre = np.asarray(patient.stack_centre_mni_mm, np.float32)
    origin = np.asarray(d.origin_mni_mm, np.float32)
    coords = np.stack(
        [
            (centre[0] - x - origin[0]) / d.spacing_mm,
            (centre[1] - y - origin[1]) / d.spacing_mm,
            (centre[2] + z - origin[2]) / d.spacing_mm,
        ]
    )
    return np.asarray(
        ndimage.map_coordinates(
            np.asarray(volume, np.float32), coords, order=order, mode="constant", cval=0.0
        ),
        np.float32,
    )


def pseudo_hu(normalised: np.ndarray) -> np.ndarray:
    """Median-normalised MR intensity on the sim-encoder's HU-like scale (brain median → 40)."""
    return np.asarray(40.0 + 100.0 * (np.asarray(normalised, np.float32) - 1.0), np.float32)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positives`` (ties count half); ``None``
    when either class is empty."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, np.float64).ravel()
    positives = np.asarray(positives, bool).ravel()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass(frozen=True)
class ImageCase:
    """One patient's image-level figures and feature patches."""

    seed: int
    mae: dict[str, dict[str, float]]  # method -> "<contrast> brain" / "<contrast> tumour" -> MAE
    patches: dict[
        str, dict[str, np.ndarray]
    ]  # image ("model", "no change", "follow-up") -> contrast -> patches
    frame_check: float  # max |growth density mapped to the reference grid − Visit.density| at the follow-up
    flag_scores: np.ndarray  # hallucination map on the voxels flagged
    flag_false: np.ndarray  # the follow-up has no tumour there


def image_case(patient: Any, case: pe.Case, prognosis: pg.Prognosis) -> ImageCase:
    """Pixel, feature-patch and hallucination figures of one patient."""
    from models.evaluation.features import extract_patches
    from models.prognosis_images import hallucination_map, predict_images
    from models.sim.prognosis import to_reference_frame, to_visit_frame

    now, follow = patient.visits[2], patient.visits[3]
    spacing = patient.spacing_mm
    check = float(np.max(np.abs(growth_to_reference(follow.growth_density, patient) - follow.density)))
    # the forecast onto the current visit's image grid
    p_whole = to_visit_frame(growth_to_reference(prognosis.probability, patient), now.pose, spacing)
    p_core = to_visit_frame(growth_to_reference(prognosis.core_probability, patient), now.pose, spacing)
    density_now = to_visit_frame(now.density, now.pose, spacing)
    images = {k: now.images[k] for k in CONTRASTS}
    predicted = predict_images(
        images,
        brain=now.brain_mask,
        core_now=density_now >= pg.CORE_THRESHOLD,
        whole_now=density_now >= pg.WHOLE_THRESHOLD,
        p_core=p_core,
        p_whole=p_whole,
    )
    # the common frame: the reference grid
    brain = (to_reference_frame(now.brain_mask.astype(np.float32), now.pose, spacing) > 0.5) & (
        to_reference_frame(follow.brain_mask.astype(np.float32), follow.pose, spacing) > 0.5
    )
    predicted_extent = growth_to_reference(prognosis.probability, patient) >= pg.EXTENT_PROBABILITY
    tumour = brain & (
        (now.density >= pg.WHOLE_THRESHOLD) | (follow.density >= pg.WHOLE_THRESHOLD) | predicted_extent
    )
    mae: dict[str, dict[str, float]] = {"model": {}, "no change": {}}
    patches: dict[str, dict[str, np.ndarray]] = {"model": {}, "no change": {}, "follow-up": {}}
    for k in CONTRASTS:
        current = to_reference_frame(now.images[k], now.pose, spacing)
        scale = float(np.median(current[brain]))
        truth = to_reference_frame(follow.images[k], follow.pose, spacing)
        truth = truth / max(float(np.median(truth[brain])), 1e-6)
        views = {
            "model": to_reference_frame(predicted[k].mean, now.pose, spacing) / max(scale, 1e-6),
            "no change": current / max(scale, 1e-6),
        }
        for method, image in views.items():
            error = np.abs(image - truth)
            mae[method][f"{k} brain"] = float(error[brain].mean())
            mae[method][f"{k} tumour"] = float(error[tumour].mean()) if tumour.any() else float("nan")
        if tumour.any():
            for name, image in (*views.items(), ("follow-up", truth)):
                rng = np.random.default_rng(case.seed)  # the same positions in every image
                try:
                    patches[name][k] = extract_patches(
                        [pseudo_hu(s) for s in image], list(tumour), PATCHES_PER_CASE, rng
                    )
                except ValueError:  # no patch fits around this tumour (too near the image's edge)
                    break
    flagged = (prognosis.probability >= pg.EXTENT_PROBABILITY) & ~case.observations[-1].whole
    hallucination = hallucination_map(prognosis.probability, case.observations[-1].whole)
    return ImageCase(
        case.seed,
        mae,
        patches,
        check,
        hallucination[flagged],
        ~case.follow_up.whole[flagged],
    )


def _feature_level(image_cases: Sequence[ImageCase]) -> dict[str, Any]:
    from models.evaluation.features import embed, feature_distances

    out: dict[str, Any] = {"encoder": FEATURE_LABEL}
    for k in CONTRASTS:
        stacks = {
            name: [c.patches[name][k] for c in image_cases if k in c.patches[name]]
            for name in ("model", "no change", "follow-up")
        }
        if not stacks["follow-up"]:
            out[k] = None
            continue
        features = {name: embed(np.concatenate(s)) for name, s in stacks.items()}
        reference = features["follow-up"]
        out[k] = {}
        for method in ("model", "no change"):
            n = len(reference)
            r = feature_distances(
                features[method],
                reference,
                rng=np.random.default_rng(0),
                kid_subsets=20,
                kid_subset_size=min(1000, n),
            )
            out[k][method] = {"fid": r["fid"], "kid": r["kid"], "kid_std": r["kid_std"], "patches": n}
    return out


def _hallucination_level(image_cases: Sequence[ImageCase]) -> dict[str, Any]:
    scores = np.concatenate([c.flag_scores for c in image_cases]) if image_cases else np.zeros(0)
    false = np.concatenate([c.flag_false for c in image_cases]) if image_cases else np.zeros(0, bool)
    return {
        "auroc": auroc(scores, false),
        "flagged_voxels": int(scores.size),
        "false_fraction": float(false.mean()) if false.size else None,
        "mean_map_where_false": float(scores[false].mean()) if false.any() else None,
        "mean_map_where_true": float(scores[~false].mean()) if (~false).any() else None,
    }


def run(
    seeds: Sequence[int],
    calibration: pg.Calibration,
    *,
    cache: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every level over the patients ``seeds`` under ``calibration``."""
    from models.sim.prognosis import make_patient

    started = time.monotonic()
    cases, image_cases = [], []
    for n, seed in enumerate(seeds, 1):
        if progress is not None:
            progress(f"patient {seed}", n - 1, len(seeds))
        patient = make_patient(seed, visits=4)
        cached = None if cache is None else cache / f"case-{seed}.npz"
        case = pe._load(cached) if cached is not None and cached.exists() else None
        if case is None:
            case = pe.case_from_patient(patient)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                pe._save(case, cached)
        cases.append(case)
        prognosis = pg.combine(case.members, calibration, case.follow_up.day, case.anatomy.spacing_mm)
        image_cases.append(image_case(patient, case, prognosis))
    if progress is not None:
        progress("figures", len(seeds), len(seeds))
    task = pe.evaluate(cases, calibration)
    pixel: dict[str, dict[str, float]] = {}
    for method in ("model", "no change"):
        keys = image_cases[0].mae[method] if image_cases else {}
        pixel[method] = {key: float(np.nanmean([c.mae[method][key] for c in image_cases])) for key in keys}
    return {
        "data": SIMULATED,
        "seeds": [int(s) for s in seeds],
        "pixel": {
            "mae": pixel,
            "units": "intensity over the image's median in the brain",
            "frame_check_max_abs": max((c.frame_check for c in image_cases), default=0.0),
            "per_case": [{"seed": c.seed, **c.mae} for c in image_cases],
        },
        "feature": _feature_level(image_cases),
        "task": {"summary": task["summary"], "acceptance": task["acceptance"], "cases": task["cases"]},
        "hallucination": _hallucination_level(image_cases),
        "seconds": time.monotonic() - started,
    }


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def write_report(results: dict[str, Any], directory: Path, *, title: str) -> Path:
    """``report.md`` and ``evaluation.json`` in ``directory``; returns the report's path."""
    directory.mkdir(parents=True, exist_ok=True)
    from models.evaluation.results import to_jsonable

    (directory / "evaluation.json").write_text(json.dumps(to_jsonable(results), indent=1) + "\n")
    n = len(results["seeds"])
    seeds = results["seeds"]
    lines = [
        f"# {title}",
        "",
        f"**SIMULATED.** Every figure below was computed on {n} SIMULATED patients ({SIMULATED}; seeds "
        f"{seeds[0] if seeds else '-'}–{seeds[-1] if seeds else '-'}); none is a clinical validation.",
        "",
    ]
    model = results.get("model")
    if model:
        lines += [
            f"Model: {model['name']} {model['version']} (its calibration.json sha256 "
            f"{model['weights_sha256'][:12]}…). Calibration used: {model['calibration_source']}.",
            "",
        ]
    pixel = results["pixel"]
    lines += [
        "## Pixel level (SIMULATED)",
        "",
        "Mean absolute error of the predicted follow-up images against the acquired ones, each image over "
        "its median in the brain (both visits' brain masks, on the reference grid; every image brought there "
        "with its own visit's pose). Tumour region: today's, the follow-up's or the predicted whole tumour.",
        "",
        "| method | T1c brain | T1c tumour | FLAIR brain | FLAIR tumour |",
        "|---|---|---|---|---|",
    ]
    for method, m in pixel["mae"].items():
        lines.append(
            f"| {method} | {_f(m.get('t1c brain'), 4)} | {_f(m.get('t1c tumour'), 4)} | "
            f"{_f(m.get('flair brain'), 4)} | {_f(m.get('flair tumour'), 4)} |"
        )
    lines += [
        "",
        f"Frame check: the growth grid mapped onto the reference grid reproduces the simulator's "
        f"reference density to {_f(pixel['frame_check_max_abs'], 6)} (max abs).",
        "",
        "## Feature level (SIMULATED; sim-encoder)",
        "",
        f"Encoder: {results['feature']['encoder']}. Fréchet distance (FID) and KID between 64 × 64 patches "
        "of each method's images and of the acquired follow-up, centred in the tumour region.",
        "",
        "| contrast | method | FID (sim-encoder) | KID (sim-encoder) | patches |",
        "|---|---|---|---|---|",
    ]
    for k in CONTRASTS:
        block = results["feature"].get(k)
        if not block:
            lines.append(f"| {k} | – | – | – | 0 |")
            continue
        for method, r in block.items():
            lines.append(f"| {k} | {method} | {_f(r['fid'], 3)} | {_f(r['kid'], 4)} | {r['patches']} |")
    task = results["task"]
    lines += [
        "",
        "## Task and calibration levels (SIMULATED)",
        "",
        "Whole-tumour extent (probability ≥ 0.5) at the follow-up on the 2 mm growth grid; HD95 median; "
        "call: growth / stable / shrinkage right at a 10 % volume change; ECE over voxels where the method "
        "predicts any tumour or the truth has it.",
        "",
        "| method | Dice | HD95 (mm) | core Dice | volume error (ml) | call | ECE | 90 % interval coverage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, s in task["summary"].items():
        lines.append(
            f"| {method} | {_f(s['dice_mean'])} | {_f(s['hd95_mm_median'], 1)} | {_f(s['core_dice_mean'])} | "
            f"{_f(s['volume_error_ml_mean'], 2)} | {_f(s['growth_call_right'], 2)} | {_f(s['ece'])} | "
            f"{_f(s.get('interval_coverage_90'), 2)} |"
        )
    a = task["acceptance"]
    lines += [
        "",
        f"Acceptance (issue 17): Dice over no change {_f(a['dice_vs_no_change'])}, over linear sphere "
        f"{_f(a['dice_vs_linear_sphere'])}, over the FK fit {_f(a['dice_vs_fk_fit'])}; volume error "
        f"{_f(a['volume_error_ratio_vs_no_change'], 2)} × no change's; coverage "
        f"{_f(a['interval_coverage_90'], 2)}; ECE {_f(a['ece'])}; all hold: {a['holds']}.",
        "",
    ]
    h = results["hallucination"]
    lines += [
        "## Hallucination (SIMULATED)",
        "",
        "The hallucination map (1 − p on voxels predicted tumour outside today's whole tumour) against "
        "where the follow-up truly has no tumour, over every such voxel of every patient.",
        "",
        "| AUROC | flagged voxels | truly tumour-free | mean map where free | mean map where tumour |",
        "|---|---|---|---|---|",
        f"| {_f(h['auroc'])} | {h['flagged_voxels']} | {_f(h['false_fraction'])} | "
        f"{_f(h['mean_map_where_false'])} | {_f(h['mean_map_where_true'])} |",
        "",
        f"Run time {results.get('seconds', 0.0):.0f} s.",
        "",
    ]
    path = directory / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
