"""Evaluation of the MR → synthetic CT model against two classical baselines, on simulated data.

Test cases come from :func:`models.training.sct.case_plan` with the ``"test"`` role: seeds
disjoint from training and calibration (checked against the model card) and stack levels
(bands 0.15–0.3 and 0.7–0.85 of the head) that training never saw. The baselines of
:mod:`models.evaluation.sct_baselines` are fitted on the first training-role cases of the model's own
training seed. Every number is computed on SIMULATED data (:mod:`models.sim.mrct`).

* intensity: mean absolute error and mean error (sCT − reference, HU) in the head and per
  tissue group (:data:`TISSUE_GROUPS`), PSNR and SSIM in the [−1000, 2000] HU window over the
  head mask (:func:`models.evaluation.pixel.pixel_metrics`), per case and pooled;
* dose proxy: water-equivalent path length (WEPL) from the image edge to targets in the brain
  along eight in-plane beam directions (every 45°), through the :data:`HU_TO_RSP` curve, sCT
  against reference CT (:func:`wepl_mm`);
* calibration of the model's σ: 90 % interval coverage overall, per tissue and per case, width,
  reliability curve and AUSE (:mod:`models.evaluation.calibration`);
* hallucination: bone-like (+600 HU) and air-like (−800 HU) discs inserted into the brain of
  the model's sCT, and real skull bone replaced by soft tissue; the hallucination map is
  recomputed with :meth:`models.sct.SctModel.score` and the AUROC of region-wise maxima
  against same-shaped unaltered regions is reported (protocol of
  :mod:`models.evaluation.hallucination`).

The head mask of every metric is the one the model and the baselines compute from the MR
(:func:`models.sct.head_mask`): all three methods are judged on the same voxels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from models.evaluation import calibration as cal
from models.evaluation import hallucination as hal
from models.evaluation.pixel import pixel_metrics
from models.evaluation.results import HallucinationResult
from models.evaluation.sct_baselines import BulkDensity, PiecewiseIntensity
from models.sct import BONE_HU, SctModel
from models.sim.mrct import HeadTissue
from models.training.sct import Role, SctPair, SctTrainConfig, case_plan, simulate_all

Progress = Callable[[str, int, int], None]

MODEL = "model"
BULK = BulkDensity.name
PIECEWISE = PiecewiseIntensity.name
METHODS = (MODEL, BULK, PIECEWISE)

#: HU window of PSNR and SSIM (images clipped to it; data range 3000 HU).
HU_WINDOW = (-1000.0, 2000.0)
#: Tissue groups of the per-tissue errors (reference labels, inside the MR head mask). "air"
#: is air inside the head mask: the frontal sinus and outside air that the closed mask takes in
#: at the skin.
TISSUE_GROUPS: dict[str, tuple[HeadTissue, ...]] = {
    "bone": (HeadTissue.CORTICAL_BONE, HeadTissue.CANCELLOUS_BONE),
    "soft tissue": (HeadTissue.FAT, HeadTissue.SOFT, HeadTissue.CSF, HeadTissue.GREY, HeadTissue.WHITE),
    "air": (HeadTissue.AIR, HeadTissue.SINUS_AIR),
}
BRAIN = (HeadTissue.GREY, HeadTissue.WHITE, HeadTissue.CSF)

#: HU → relative (to water) proton stopping power: a generic piecewise-linear curve of the
#: shape of a stoichiometric calibration (Schneider, Pedroni & Lomax 1996, Phys Med Biol 41:111;
#: air–lung, soft-tissue and bone segments, water at (0 HU, 1.0)). Rounded, illustrative, not any
#: scanner's calibration; it only has to weigh bone and air errors realistically. Clamped beyond
#: the end points.
HU_TO_RSP: tuple[tuple[float, float], ...] = (
    (-1000.0, 0.001),
    (-120.0, 0.93),
    (0.0, 1.0),
    (100.0, 1.07),
    (1500.0, 1.80),
    (3071.0, 2.62),
)
#: In-plane beam directions, IEC 61217 gantry angles for a head-first-supine patient: 0° from
#: anterior, 90° from the patient's left, 180° posterior, 270° right.
BEAM_ANGLES_DEG: tuple[float, ...] = tuple(float(a) for a in range(0, 360, 45))
#: Ray-sampling step of the WEPL integral (mm; midpoint rule on bilinearly interpolated RSP).
WEPL_STEP_MM = 0.5

#: Hallucination protocol: inserted disc contrasts (HU added to the sCT) and radii (px).
INSERTED = {"inserted bone-like +600 HU": 600.0, "inserted air-like -800 HU": -800.0}
INSERT_RADIUS_PX = (3.0, 5.0)
#: Removed real bone: discs of this radius in the skull, sCT bone in them set to soft tissue.
REMOVE_RADIUS_PX = 4.0
SOFT_TISSUE_HU = 40.0
_HALLUCINATION_SLICES = 3


class ErrorStats(TypedDict):
    """Errors of an sCT in one region: ``mae_hu`` = mean |sCT − ref|, ``me_hu`` = mean (sCT − ref)
    (positive: the sCT is too dense), ``n`` voxels. NaN when the region is empty."""

    mae_hu: float
    me_hu: float
    n: int


# -- metrics ---------------------------------------------------------------------------------------
def tissue_masks(labels: np.ndarray, head: np.ndarray) -> dict[str, np.ndarray]:
    """``{"head": head, "bone": ..., "soft tissue": ..., "air": ...}``, each within ``head``."""
    head = np.asarray(head, bool)
    out = {"head": head}
    for name, members in TISSUE_GROUPS.items():
        out[name] = np.isin(labels, [int(t) for t in members]) & head
    return out


def error_stats(pred_hu: np.ndarray, ref_hu: np.ndarray, mask: np.ndarray) -> ErrorStats:
    """MAE and mean error (sCT − reference) of ``pred_hu`` over ``mask``."""
    m = np.asarray(mask, bool)
    n = int(m.sum())
    if n == 0:
        return ErrorStats(mae_hu=float("nan"), me_hu=float("nan"), n=0)
    d = np.asarray(pred_hu, np.float64)[m] - np.asarray(ref_hu, np.float64)[m]
    return ErrorStats(mae_hu=float(np.abs(d).mean()), me_hu=float(d.mean()), n=n)


def tissue_errors(
    pred_hu: np.ndarray, ref_hu: np.ndarray, labels: np.ndarray, head: np.ndarray
) -> dict[str, ErrorStats]:
    """:func:`error_stats` in the head and in each of :data:`TISSUE_GROUPS`."""
    return {name: error_stats(pred_hu, ref_hu, m) for name, m in tissue_masks(labels, head).items()}


def stopping_power(hu: np.ndarray, curve: Sequence[tuple[float, float]] = HU_TO_RSP) -> np.ndarray:
    """Relative stopping power of each voxel from the piecewise-linear ``curve`` (clamped ends)."""
    xs, ys = zip(*curve, strict=True)
    return np.interp(np.asarray(hu, np.float64), xs, ys).astype(np.float32)


def wepl_mm(
    hu_slice: np.ndarray,
    target_rc: tuple[float, float],
    pixel_mm: tuple[float, float],
    angles_deg: Sequence[float] = BEAM_ANGLES_DEG,
    *,
    step_mm: float = WEPL_STEP_MM,
    curve: Sequence[tuple[float, float]] = HU_TO_RSP,
) -> np.ndarray:
    """Water-equivalent path length from the image edge to a target, one value per beam angle.

    The ray runs in-plane from the target towards the source (gantry angle θ: direction
    ``(−cos θ, sin θ)`` in (row, column), rows anterior → posterior, columns right → left) until
    it leaves the image (pixel edges at −0.5 and size − 0.5); the relative stopping power
    (:func:`stopping_power`) is interpolated bilinearly at the midpoints of ``step_mm`` steps and
    summed.

    Parameters
    ----------
    hu_slice : numpy.ndarray
        One axial slice in HU, ``(rows, cols)``.
    target_rc : tuple of float
        Target position (row, column) in pixels.
    pixel_mm : tuple of float
        Pixel spacing (row, column) in mm.
    angles_deg : sequence of float, optional
        Gantry angles (:data:`BEAM_ANGLES_DEG`: every 45°).
    step_mm : float, optional
        Sampling step along the ray.
    curve : sequence of (HU, RSP), optional
        HU → RSP curve (:data:`HU_TO_RSP`).

    Returns
    -------
    numpy.ndarray
        WEPL in mm, float64, one per angle.
    """
    img = np.asarray(hu_slice)
    if img.ndim != 2:
        raise ValueError(f"hu_slice: expected one 2-D slice, got shape {img.shape}")
    h, w = img.shape
    r0, c0 = float(target_rc[0]), float(target_rc[1])
    if not (-0.5 <= r0 <= h - 0.5 and -0.5 <= c0 <= w - 0.5):
        raise ValueError(f"target_rc {target_rc} lies outside the {h}x{w} slice")
    pr, pc = float(pixel_mm[0]), float(pixel_mm[1])
    rsp = stopping_power(img, curve)
    out = []
    for angle in angles_deg:
        theta = np.deg2rad(float(angle))
        dr, dc = -np.cos(theta), np.sin(theta)
        limits = []
        for pos, d, size, spacing in ((r0, dr, h, pr), (c0, dc, w, pc)):
            if d < -1e-12:
                limits.append((pos + 0.5) * spacing / -d)
            elif d > 1e-12:
                limits.append((size - 0.5 - pos) * spacing / d)
        length = min(limits)
        n = max(int(np.ceil(length / step_mm)), 1)
        ds = length / n
        t = (np.arange(n) + 0.5) * ds
        coords = np.vstack([r0 + t * dr / pr, c0 + t * dc / pc])
        out.append(float(ndimage.map_coordinates(rsp, coords, order=1, mode="nearest").sum() * ds))
    return np.asarray(out, np.float64)


def wepl_targets(
    labels: np.ndarray, head: np.ndarray, n: int = 3, min_brain_px: int = 200
) -> list[tuple[int, float, float]]:
    """Beam targets: the centroid of brain tissue (grey, white, CSF) in up to ``n`` slices spread
    over the stack (quartiles for ``n`` 3), skipping slices with less than ``min_brain_px``
    brain pixels. Returns ``(slice, row, col)``."""
    brain = np.isin(labels, [int(t) for t in BRAIN]) & np.asarray(head, bool)
    s = brain.shape[0]
    wanted = sorted({int(round(v)) for v in np.linspace(0, s - 1, n + 2)[1:-1]}) if n > 0 else []
    out = []
    for k in wanted:
        if brain[k].sum() >= min_brain_px:
            r, c = ndimage.center_of_mass(brain[k])
            out.append((k, float(r), float(c)))
    return out


def coverage_by_region(
    mean: np.ndarray, sigma: np.ndarray, ref: np.ndarray, regions: Mapping[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """90 % interval coverage and mean width (HU) of ``mean ± 1.645 σ`` in each region."""
    out = {}
    for name, m in regions.items():
        if not np.any(m):
            out[name] = {"coverage": float("nan"), "mean_width_hu": float("nan"), "n": 0}
            continue
        c = cal.interval_coverage(mean, sigma, ref, m)
        out[name] = {"coverage": c["coverage"], "mean_width_hu": c["mean_width_hu"], "n": int(np.sum(m))}
    return out


def roc_result(positive: Sequence[float], negative: Sequence[float]) -> HallucinationResult:
    """ROC and AUROC of region scores (positives: altered regions; negatives: controls)."""
    pos = np.asarray(positive, np.float64)
    neg = np.asarray(negative, np.float64)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("need at least one positive and one negative region score")
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    s = np.r_[pos, neg]
    fpr, tpr, _ = roc_curve(y, s)
    return HallucinationResult(
        auroc=float(roc_auc_score(y, s)),
        fpr=fpr.tolist(),
        tpr=tpr.tolist(),
        n_positive=int(pos.size),
        n_negative=int(neg.size),
        reduce="max",
    )


# -- orchestration ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SctEvalConfig:
    """What to evaluate on. ``fit_seed`` None: the model card's training seed (the baselines then
    see the first ``fit_cases`` of the model's own training cases)."""

    seed: int = SctTrainConfig().seed
    n_cases: int = 8
    slices: int = 12
    size: int = 256
    fit_cases: int = 8
    fit_seed: int | None = None
    workers: int = 2


@dataclass(frozen=True)
class SctExample:
    """One slice of one test case, for the report's example figure (not written to JSON)."""

    case_seed: int
    slice_index: int
    mr: np.ndarray
    reference: np.ndarray
    sct: dict[str, np.ndarray]
    sigma: np.ndarray
    score: np.ndarray
    head: np.ndarray
    targets_rc: list[tuple[float, float]]


@dataclass
class _CaseOutputs:
    seed: int
    pair: SctPair
    sct: dict[str, np.ndarray]
    sigma: np.ndarray
    score: np.ndarray


class OverlappingTestSet(ValueError):
    """The test seeds meet the model's training or calibration seeds."""


def check_held_out(model: SctModel, test_seeds: Sequence[int]) -> list[int]:
    """Raise :class:`OverlappingTestSet` if a test seed was one of the model's training or
    calibration seeds (recomputed from its card); returns those seeds."""
    training = model.meta.training or {}
    seed = training.get("seed")
    if seed is None:
        return []
    roles: tuple[tuple[Role, str], ...] = (("train", "train_cases"), ("calib", "calib_cases"))
    used = [s.seed for role, key in roles for s in case_plan(role, int(training.get(key, 0)), int(seed))]
    overlap = sorted(set(used) & set(test_seeds))
    if overlap:
        raise OverlappingTestSet(
            f"test seeds {overlap[:5]} were used to train or calibrate {model.card.name} "
            f"{model.card.version}; choose another --seed"
        )
    return used


def evaluate(
    model: SctModel,
    cfg: SctEvalConfig,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], dict[str, Any], SctExample]:
    """Run the sCT evaluation.

    Parameters
    ----------
    model : SctModel
        The model under test.
    cfg : SctEvalConfig
        Test and fitting set sizes and seeds.
    progress : callable, optional
        ``progress(stage, done, total)``.

    Returns
    -------
    tuple
        ``(results, summary, example)``: the nested results (JSON-able, see
        :func:`models.evaluation.sct_report.write_sct_report`), the acceptance summary, and one
        example slice for the figure.
    """

    def tell(stage: str, done: int = 0, total: int = 1) -> None:
        if progress:
            progress(stage, done, total)

    started = time.perf_counter()
    timings: dict[str, float] = {}
    fit_seed = cfg.fit_seed
    if fit_seed is None:
        fit_seed = int((model.meta.training or {}).get("seed", SctTrainConfig().seed))
    test_specs = case_plan("test", cfg.n_cases, cfg.seed, slices=cfg.slices, size=cfg.size)
    check_held_out(model, [s.seed for s in test_specs])
    fit_specs = case_plan("train", cfg.fit_cases, fit_seed, slices=cfg.slices, size=cfg.size)

    t0 = time.perf_counter()
    tell(f"simulating {cfg.n_cases} test and {cfg.fit_cases} fitting cases")
    test = simulate_all(test_specs, cfg.workers, keep_raw=True)
    fitting = simulate_all(fit_specs, cfg.workers)
    timings["simulation_s"] = time.perf_counter() - t0

    tell("fitting baselines")
    t0 = time.perf_counter()
    bulk = BulkDensity().fit(fitting)
    piecewise = PiecewiseIntensity().fit(fitting)
    timings["baseline_fit_s"] = time.perf_counter() - t0
    del fitting

    outputs: list[_CaseOutputs] = []
    model_s = baseline_s = 0.0
    for i, pair in enumerate(test):
        tell("predicting", i, len(test))
        assert pair.raw_mr is not None  # simulate_all(keep_raw=True)
        t0 = time.perf_counter()
        pred = model.predict_full(pair.raw_mr, pair.spacing)
        model_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        sct = {
            MODEL: pred.prediction.mean,
            BULK: bulk.predict(pair.raw_mr, pair.spacing),
            PIECEWISE: piecewise.predict(pair.raw_mr, pair.spacing),
        }
        baseline_s += time.perf_counter() - t0
        outputs.append(_CaseOutputs(test_specs[i].seed, pair, sct, pred.prediction.sigma, pred.score))
    n_slices = sum(len(o.pair.ct) for o in outputs)
    timings["model_s_per_slice_incl_maps"] = model_s / max(n_slices, 1)
    timings["baselines_s_per_slice"] = baseline_s / max(n_slices, 1)

    tell("intensity and dose-proxy metrics")
    t0 = time.perf_counter()
    intensity = _intensity_metrics(outputs)
    wepl = _wepl_metrics(outputs)
    timings["metrics_s"] = time.perf_counter() - t0

    tell("calibration")
    t0 = time.perf_counter()
    calibration, calibration_detail = _calibration_metrics(outputs)
    timings["calibration_s"] = time.perf_counter() - t0

    tell("hallucination tests")
    t0 = time.perf_counter()
    hallucination = hallucination_tests(model, outputs, np.random.default_rng(cfg.seed))
    timings["hallucination_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    spacing = test[0].spacing
    results: dict[str, Any] = {
        "meta": {
            "data": (
                f"SIMULATED: models.sim.mrct.make_pair (T1w MR / CT head pairs, MNI152-based), "
                f"{cfg.slices} slices of {cfg.size}x{cfg.size}, {spacing[1]:.2f} mm pixels, "
                f"{spacing[0]:.1f} mm slices"
            ),
            "n_cases": cfg.n_cases,
            "n_slices": n_slices,
            "seeds": [s.seed for s in test_specs],
            "levels": [round(s.level, 3) for s in test_specs],
            "fitting_cases": f"{cfg.fit_cases} training-role cases, seed {fit_seed}",
            "head_mask": "models.sct.head_mask of the MR (the same voxels for every method)",
            "hu_window_psnr_ssim": list(HU_WINDOW),
            "notes": (
                "test cases: seeds disjoint from the model's training/calibration seeds (checked) and "
                "held-out stack levels (0.15-0.3, 0.7-0.85)"
            ),
        },
        "baselines": {BULK: bulk.parameters(), PIECEWISE: piecewise.parameters()},
        "intensity": intensity,
        "wepl": wepl,
        "calibration": {MODEL: calibration},
        "calibration_detail": calibration_detail,
        "hallucination": hallucination,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    summary = acceptance_summary(results)
    return results, summary, _example(outputs)


def _intensity_metrics(outputs: Sequence[_CaseOutputs]) -> dict[str, Any]:
    ref = np.concatenate([o.pair.ct for o in outputs]).astype(np.float32)
    labels = np.concatenate([o.pair.labels for o in outputs])
    head = np.concatenate([o.pair.body for o in outputs])
    out: dict[str, Any] = {}
    for method in METHODS:
        pred = np.concatenate([o.sct[method] for o in outputs])
        pooled = pixel_metrics(pred, ref, head, HU_WINDOW, with_ms_ssim=False)
        per_case: dict[str, Any] = {"seed": [o.seed for o in outputs], "psnr_db": [], "ssim": []}
        for o in outputs:
            errs = tissue_errors(o.sct[method], o.pair.ct, o.pair.labels, o.pair.body)
            for region, e in errs.items():
                per_case.setdefault(f"{region} mae_hu", []).append(e["mae_hu"])
                per_case.setdefault(f"{region} me_hu", []).append(e["me_hu"])
            pix = pixel_metrics(o.sct[method], o.pair.ct, o.pair.body, HU_WINDOW, with_ms_ssim=False)
            per_case["psnr_db"].append(pix["psnr_db"])
            per_case["ssim"].append(pix["ssim"])
        out[method] = {
            "regions": tissue_errors(pred, ref, labels, head),
            "psnr_db": pooled["psnr_db"],
            "ssim": pooled["ssim"],
            "per_case": per_case,
        }
    return out


def _wepl_metrics(outputs: Sequence[_CaseOutputs]) -> dict[str, Any]:
    angles = list(BEAM_ANGLES_DEG)
    rays: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    refs: list[np.ndarray] = []
    case_of_target: list[int] = []
    for i, o in enumerate(outputs):
        pixel = (o.pair.spacing[1], o.pair.spacing[2])
        for k, r, c in wepl_targets(o.pair.labels, o.pair.body):
            ref = wepl_mm(o.pair.ct[k], (r, c), pixel, angles)
            refs.append(ref)
            case_of_target.append(i)
            for m in METHODS:
                rays[m].append(wepl_mm(o.sct[m][k], (r, c), pixel, angles) - ref)
    result: dict[str, Any] = {
        "hu_to_rsp": [list(p) for p in HU_TO_RSP],
        "hu_to_rsp_source": (
            "generic piecewise-linear curve of the stoichiometric kind (Schneider, Pedroni & Lomax "
            "1996); illustrative, not a scanner calibration"
        ),
        "angles_deg": angles,
        "step_mm": WEPL_STEP_MM,
        "targets": "centroid of grey/white/CSF in the slices at 1/4, 1/2, 3/4 of each stack",
        "n_targets": len(refs),
        "n_rays": len(refs) * len(angles),
        "methods": {},
    }
    if not refs:
        return result
    ref_all = np.stack(refs)
    cases = np.asarray(case_of_target)
    result["reference_wepl_mm_mean"] = float(ref_all.mean())
    for m in METHODS:
        d = np.stack(rays[m])
        rel = np.abs(d) / np.maximum(ref_all, 1e-6) * 100.0
        result["methods"][m] = {
            "mean_abs_error_mm": float(np.abs(d).mean()),
            "mean_error_mm": float(d.mean()),
            "max_abs_error_mm": float(np.abs(d).max()),
            "mean_abs_error_pct": float(rel.mean()),
            "per_angle_mean_abs_error_mm": np.abs(d).mean(axis=0).tolist(),
            "per_angle_mean_error_mm": d.mean(axis=0).tolist(),
            "per_case_mean_abs_error_mm": [
                float(np.abs(d[cases == i]).mean()) if np.any(cases == i) else float("nan")
                for i in range(len(outputs))
            ],
        }
    return result


def _calibration_metrics(outputs: Sequence[_CaseOutputs]) -> tuple[Any, dict[str, Any]]:
    ref = np.concatenate([o.pair.ct for o in outputs]).astype(np.float32)
    labels = np.concatenate([o.pair.labels for o in outputs])
    head = np.concatenate([o.pair.body for o in outputs])
    mean = np.concatenate([o.sct[MODEL] for o in outputs])
    sigma = np.concatenate([o.sigma for o in outputs])
    summary = cal.calibration_summary(mean, sigma, ref, head)
    per_case = [
        cal.interval_coverage(o.sct[MODEL], o.sigma, o.pair.ct.astype(np.float32), o.pair.body)
        for o in outputs
    ]
    detail = {
        "per_tissue": coverage_by_region(mean, sigma, ref, tissue_masks(labels, head)),
        "per_case_coverage": [c["coverage"] for c in per_case],
        "per_case_width_hu": [c["mean_width_hu"] for c in per_case],
    }
    return summary, detail


def _skull_discs(mean: np.ndarray, bone_ref: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where a real bone patch can be removed: the sCT's bone that is bone in the reference, and
    the skull zone (that bone dilated 2 px) the discs and their controls are drawn from."""
    bone = (mean > BONE_HU) & bone_ref & head
    zone = ndimage.binary_dilation(bone, iterations=2) & head if bone.any() else bone
    return bone, zone


def _disc(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.hypot(yy, xx) <= radius


def hallucination_tests(
    model: SctModel, outputs: Sequence[_CaseOutputs], rng: np.random.Generator
) -> dict[str, HallucinationResult]:
    """AUROC of the hallucination map for inserted and removed structures (see module doc).

    Per case, the three slices with the most brain are altered; the map of the altered volume is
    recomputed with :meth:`SctModel.score` (original MR and σ) and each region scores the
    maximum of the map over it. Negatives are unaltered regions of the same shapes in the same
    slices: in the brain for insertions, in the skull for removals.
    """
    scores: dict[str, tuple[list[float], list[float]]] = {
        name: ([], []) for name in (*INSERTED, "removed real bone")
    }
    brain_labels = [int(t) for t in BRAIN]
    bone_labels = [int(t) for t in TISSUE_GROUPS["bone"]]
    for o in outputs:
        p = o.pair
        assert p.raw_mr is not None
        mean = o.sct[MODEL]
        brain = np.isin(p.labels, brain_labels) & p.body
        chosen = [int(k) for k in np.argsort(-brain.sum(axis=(1, 2)), kind="stable")[:_HALLUCINATION_SLICES]]
        for name, contrast in INSERTED.items():
            altered = mean.copy()
            regions = []
            for k in chosen:
                radii = list(rng.uniform(*INSERT_RADIUS_PX, size=2))
                altered[k], blobs = hal.insert_blobs(mean[k], rng, 2, contrast, radii, brain[k], margin_px=4)
                if blobs:
                    regions.append((k, blobs, hal.control_regions(brain[k], blobs, 4, rng)))
            if not regions:
                continue
            score = model.score(p.raw_mr, altered, o.sigma, p.spacing)
            for k, blobs, controls in regions:
                scores[name][0].extend(hal.region_scores(score[k], blobs))
                scores[name][1].extend(hal.region_scores(score[k], controls))
        altered = mean.copy()
        regions = []
        template = _disc(REMOVE_RADIUS_PX)
        for k in chosen:
            bone, zone = _skull_discs(mean[k], np.isin(p.labels[k], bone_labels), p.body[k])
            if bone.sum() < 4 * template.sum():
                continue
            like = np.zeros(zone.shape, bool)
            like[: template.shape[0], : template.shape[1]] = template
            picks = hal.control_regions(zone, [like], 8, rng, margin_px=3)  # 2 removed, 6 controls
            removed = [d for d in picks[:2] if (d & bone).sum() >= 0.3 * d.sum()]
            controls = picks[2:]
            if not removed or not controls:
                continue
            for d in removed:
                altered[k][d & bone] = SOFT_TISSUE_HU
            regions.append((k, removed, controls))
        if regions:
            score = model.score(p.raw_mr, altered, o.sigma, p.spacing)
            for k, removed, controls in regions:
                scores["removed real bone"][0].extend(hal.region_scores(score[k], removed))
                scores["removed real bone"][1].extend(hal.region_scores(score[k], controls))
    out: dict[str, HallucinationResult] = {}
    for name, (pos, neg) in scores.items():
        if pos and neg:
            out[f"model: {name}"] = roc_result(pos, neg)
    return out


def _example(outputs: Sequence[_CaseOutputs]) -> SctExample:
    o = outputs[0]
    p = o.pair
    found = wepl_targets(p.labels, p.body)
    k = found[len(found) // 2][0] if found else len(p.ct) // 2
    return SctExample(
        case_seed=o.seed,
        slice_index=int(k),
        mr=p.mr[k],
        reference=p.ct[k].astype(np.float32),
        sct={m: o.sct[m][k] for m in METHODS},
        sigma=o.sigma[k],
        score=o.score[k],
        head=p.body[k],
        targets_rc=[(r, c) for kk, r, c in found if kk == k],
    )


def _round(v: Any, digits: int = 2) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return round(f, digits) if np.isfinite(f) else None


#: Acceptance targets stated in the summary.
TARGET_MAE_RATIO = 0.5
TARGET_COVERAGE = (0.88, 0.92)


def acceptance_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The acceptance figures: model MAE / bulk-density MAE (target ≤ 0.5), 90 % coverage (target
    0.88–0.92), bone MAE and WEPL error of all three methods, hallucination AUROCs."""
    inten = results["intensity"]
    wepl = results["wepl"].get("methods", {})
    mae = {m: inten[m]["regions"]["head"]["mae_hu"] for m in METHODS}
    ratio = mae[MODEL] / mae[BULK] if mae[BULK] > 0 else float("nan")
    cov = results["calibration"][MODEL]
    detail = results["calibration_detail"]
    coverage = float(cov["coverage"])
    per_case = [c for c in detail["per_case_coverage"] if np.isfinite(c)]
    return {
        "mae_head_hu": {m: _round(v, 1) for m, v in mae.items()},
        "me_head_hu": {m: _round(inten[m]["regions"]["head"]["me_hu"], 1) for m in METHODS},
        "bone_mae_hu": {m: _round(inten[m]["regions"]["bone"]["mae_hu"], 1) for m in METHODS},
        "soft_tissue_mae_hu": {m: _round(inten[m]["regions"]["soft tissue"]["mae_hu"], 1) for m in METHODS},
        "air_mae_hu": {m: _round(inten[m]["regions"]["air"]["mae_hu"], 1) for m in METHODS},
        "psnr_db": {m: _round(inten[m]["psnr_db"], 2) for m in METHODS},
        "ssim": {m: _round(inten[m]["ssim"], 4) for m in METHODS},
        "wepl_mean_abs_error_mm": {m: _round(w["mean_abs_error_mm"], 3) for m, w in wepl.items()},
        "wepl_mean_abs_error_pct": {m: _round(w["mean_abs_error_pct"], 3) for m, w in wepl.items()},
        "mae_ratio_model_to_bulk_density": _round(ratio, 3),
        "coverage_90": _round(coverage, 4),
        "coverage_90_per_tissue": {k: _round(v["coverage"], 4) for k, v in detail["per_tissue"].items()},
        "min_case_coverage_90": _round(min(per_case), 4) if per_case else None,
        "mean_interval_width_hu": _round(cov["mean_width_hu"], 1),
        "ause": _round(cov["sparsification"]["ause"], 4),
        "hallucination_auroc": {k: _round(v["auroc"], 4) for k, v in results["hallucination"].items()},
        "targets": {
            "mae_ratio_model_to_bulk_density": f"<= {TARGET_MAE_RATIO}",
            "coverage_90": f"{TARGET_COVERAGE[0]}-{TARGET_COVERAGE[1]}",
        },
        "pass": {
            "mae_ratio_model_to_bulk_density": bool(np.isfinite(ratio) and ratio <= TARGET_MAE_RATIO),
            "coverage_90": bool(TARGET_COVERAGE[0] <= coverage <= TARGET_COVERAGE[1]),
        },
        "baseline_parameters": results["baselines"],
        "timings_s": results["timings"],
    }
