"""Three-level evaluation of the restoration model on held-out simulated cases.

Test cases come from :func:`models.training.restoration.case_plan` with the ``"test"``
role: seeds disjoint from training and calibration, and anatomy levels (bands 0.2–0.3 and
0.7–0.8) that training never saw. Every number is computed on SIMULATED data.

* pixel: RMSE, PSNR, SSIM, MS-SSIM in the [−1000, 1000] HU window, in body voxels, against
  the full-dose reference — for the low-dose input, a Gaussian filter, non-local means,
  BM3D (only where the non-commercial ``bm3d`` package is installed) and the model; the
  baselines' parameters are tuned for PSNR on separate calibration cases;
* feature/distribution: FID/KID/MMD on the shipped "sim-encoder" (trained here on
  simulated patches; not comparable to published FIDs);
* task: contrast of 10–20 HU lesions relative to their reference contrast, and the NPW
  model-observer detectability d′; grey/white matter contrast in head slices;
* calibration: coverage of the 90 % interval overall and per slice, width, AUSE;
* hallucination: AUROC of the hallucination map for structures inserted into the output
  (60 HU r 3 px, 30 HU r 2.5 px) and for real structures removed from it;
* speed: slices/s at 512×512 including the σ and hallucination maps;
* image panels (:func:`evaluate_with_example`): input, restored, reference, σ and
  hallucination map of one test slice.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from models.classical import ClassicalDenoiser, ClassicalParameters, immerkaer_sigma
from models.evaluation import calibration as cal
from models.evaluation import features as feat
from models.evaluation import hallucination as hal
from models.evaluation import lesions as les
from models.evaluation.pixel import pixel_metrics
from models.evaluation.results import RestorationExample
from models.restoration import RestorationModel
from models.sim.ctphysics import Tissue
from models.sim.ldct import Case, make_case, noise_power_spectrum
from models.training.restoration import CaseSpec, case_plan

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvalConfig:
    seed: int = 7
    n_cases: int = 16
    doses: tuple[float, ...] = (0.25, 0.1)
    size: int = 512
    tune_cases: int = 4
    bm3d: bool = True
    workers: int = 2


def _make(spec: CaseSpec) -> Case:
    return make_case(spec.anatomy, spec.seed, size=spec.size, dose=spec.dose, level=spec.level)


def simulate_cases(specs: Sequence[CaseSpec], workers: int) -> list[Case]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_make, specs))


def _stack(cases: Sequence[Case], attr: str) -> np.ndarray:
    return np.stack([getattr(c, attr) for c in cases]).astype(np.float32)


def _psnr(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    return float(pixel_metrics(x, ref, mask, with_ms_ssim=False)["psnr_db"])


def _gaussian(low: np.ndarray, sigma_mm: float, pixel_mm: Sequence[float]) -> np.ndarray:
    return np.stack(
        [ndimage.gaussian_filter(s, sigma=sigma_mm / p) for s, p in zip(low, pixel_mm, strict=True)]
    ).astype(np.float32)


def _nlm(low: np.ndarray, strength: float) -> np.ndarray:
    return (
        ClassicalDenoiser(ClassicalParameters(method="nlm", strength=strength)).predict(low, (1, 1, 1)).mean
    )


def _bm3d(low: np.ndarray, factor: float) -> np.ndarray:
    import bm3d  # optional, non-commercial licence: never a dependency

    return np.stack([bm3d.bm3d(s, sigma_psd=factor * immerkaer_sigma(s)) for s in low]).astype(np.float32)


def _tune(
    name: str, run: Callable[[np.ndarray, float], np.ndarray], grid: Sequence[float], cases: Sequence[Case]
) -> float:
    low, ref = _stack(cases, "low_dose_hu"), _stack(cases, "reference_hu")
    mask = np.stack([c.body_mask for c in cases])
    scores = {p: _psnr(run(low, p), ref, mask) for p in grid}
    return max(scores, key=lambda p: scores[p])


def _grey_white(image: np.ndarray, labels: np.ndarray) -> float | None:
    grey, white = labels == Tissue.GREY, labels == Tissue.WHITE
    grey = ndimage.binary_erosion(grey, iterations=2)
    white = ndimage.binary_erosion(white, iterations=2)
    if grey.sum() < 50 or white.sum() < 50:
        return None
    return float(image[grey].mean() - image[white].mean())


def _mean_nps(
    images: np.ndarray, reference: np.ndarray, pixel_mm: Any, regions: np.ndarray, bins: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """The NPS of ``image - reference`` averaged over slices (each slice has its own pixel
    size, so each slice's radial NPS is interpolated onto a common frequency grid up to the
    lowest Nyquist frequency). Slices where no ROI fits inside the body are skipped."""
    spacing = np.broadcast_to(np.asarray(pixel_mm, dtype=np.float64), (len(images),))
    grid = np.linspace(0.0, 0.5 / float(np.max(spacing)), bins)
    curves = []
    for image, ref, mm, region in zip(images, reference, spacing, regions, strict=True):
        try:
            f, nps = noise_power_spectrum(image, ref, float(mm), roi=region)
        except ValueError:
            continue
        curves.append(np.interp(grid, f, nps))
    if not curves:
        return grid, np.full(bins, np.nan)
    return grid, np.mean(curves, axis=0)


def evaluate(
    model: RestorationModel, cfg: EvalConfig, progress: Progress | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the evaluation; returns (results for the report, acceptance summary)."""
    results, summary, _example = evaluate_with_example(model, cfg, progress)
    return results, summary


def _example_index(specs: Sequence[CaseSpec]) -> int:
    """The slice of the report's image panels: the first chest slice (lung, bone and soft
    tissue in one view), else the first slice."""
    return next((k for k, s in enumerate(specs) if s.anatomy == "chest"), 0)


def evaluate_with_example(
    model: RestorationModel, cfg: EvalConfig, progress: Progress | None = None
) -> tuple[dict[str, Any], dict[str, Any], RestorationExample | None]:
    """:func:`evaluate`, and one test slice at the first dose for the report's image panels
    (input, restored, reference, σ and hallucination map of the same slice)."""
    example: RestorationExample | None = None

    def tell(stage: str, done: int = 0, total: int = 1) -> None:
        if progress:
            progress(stage, done, total)

    results: dict[str, Any] = {
        "pixel": {},
        "calibration": {},
        "hallucination": {},
        "lesions": {},
        "features": {},
        "nps": {},
    }
    summary: dict[str, Any] = {"doses": {}}
    have_bm3d = cfg.bm3d and importlib.util.find_spec("bm3d") is not None
    results["meta"] = {
        "data": (
            f"SIMULATED: models.sim.ldct.make_case, {cfg.size}x{cfg.size}, "
            "head (MNI152-based) and chest phantoms"
        ),
        "anatomies": ["head", "chest"],
        "doses": list(cfg.doses),
        "n_cases": cfg.n_cases,
        "notes": (
            "held-out seeds and anatomy levels (0.2-0.3, 0.7-0.8); baselines tuned for PSNR on separate "
            "calibration cases; BM3D "
            + ("included (non-commercial bm3d package)" if have_bm3d else "not installed")
        ),
    }
    for dose in cfg.doses:
        tag = f"dose {dose:g}"
        tell(f"{tag}: simulating {cfg.n_cases} test and {cfg.tune_cases} tuning cases")
        specs = case_plan("test", cfg.n_cases, cfg.seed, dose=dose, size=cfg.size)
        test = simulate_cases(specs, cfg.workers)
        tune = simulate_cases(
            case_plan("calib", cfg.tune_cases, cfg.seed + 1, dose=dose, size=cfg.size), cfg.workers
        )
        low, ref = _stack(test, "low_dose_hu"), _stack(test, "reference_hu")
        body = np.stack([c.body_mask for c in test])
        pixel_mm = [c.pixel_mm for c in test]

        tell(f"{tag}: tuning baselines")
        tune_spacing = [c.pixel_mm for c in tune]

        def gaussian_on_tuning(x: np.ndarray, s: float, spacing: list[float] = tune_spacing) -> np.ndarray:
            return _gaussian(x, s, spacing)

        sigma_g = _tune("Gaussian", gaussian_on_tuning, (0.4, 0.6, 0.8, 1.0, 1.3, 1.7), tune)
        h_nlm = _tune("non-local means", _nlm, (0.4, 0.6, 0.8, 1.0, 1.3, 1.7), tune)
        outputs: dict[str, np.ndarray] = {"low-dose input": low}
        tell(f"{tag}: baselines")
        outputs["Gaussian"] = _gaussian(low, sigma_g, pixel_mm)
        outputs["non-local means"] = _nlm(low, h_nlm)
        factor_bm3d = None
        if have_bm3d and dose == cfg.doses[0]:
            factor_bm3d = _tune("BM3D", _bm3d, (0.8, 1.0, 1.25), tune[:2])
            outputs["BM3D"] = _bm3d(low, factor_bm3d)

        tell(f"{tag}: model")
        started = time.perf_counter()
        prediction = model.predict(low, (1.0, 1.0, 1.0), pixel_mm=pixel_mm)
        score = model.score(low, prediction.mean, prediction.sigma)
        seconds = time.perf_counter() - started
        outputs["model"] = prediction.mean
        if example is None:
            k = _example_index(specs)
            example = RestorationExample(
                case_seed=specs[k].seed,
                anatomy=specs[k].anatomy,
                dose=dose,
                slice_index=k,
                low=low[k].copy(),
                restored=prediction.mean[k].copy(),
                reference=ref[k].copy(),
                sigma=prediction.sigma[k].copy(),
                score=score[k].copy(),
            )

        pix = {name: pixel_metrics(out, ref, body) for name, out in outputs.items()}
        for name, value in pix.items():
            results["pixel"][f"{name} ({tag})"] = value

        # Task: low-contrast lesions (10-20 HU) and grey/white matter.
        rng_l = np.random.default_rng(cfg.seed)
        lesion_sets = [c.lesions for c in test]
        controls = [les.host_tissue_mask(c.labels, c.lesions) for c in test]
        lesion_results = {}
        for name, out in outputs.items():
            lesion_results[name] = les.lesion_summary(
                list(out), lesion_sets, np.random.default_rng(cfg.seed), control_masks=controls
            )
            results["lesions"][f"{name} ({tag})"] = lesion_results[name]
        ref_lesions = les.lesion_summary(list(ref), lesion_sets, rng_l, control_masks=controls)
        results["lesions"][f"full-dose reference ({tag})"] = ref_lesions
        gw = {
            name: [
                g for g in (_grey_white(o, c.labels) for o, c in zip(out, test, strict=True)) if g is not None
            ]
            for name, out in {**outputs, "reference": ref}.items()
        }

        # Calibration.
        results["calibration"][f"model ({tag})"] = cal.calibration_summary(
            prediction.mean, prediction.sigma, ref, body
        )
        cov = cal.interval_coverage(prediction.mean, prediction.sigma, ref, body)

        # Features on the sim-encoder (same patch positions for every method).
        encoder = feat.load_sim_encoder()
        ref_feats = feat.embed(feat.extract_patches(ref, body, 512, np.random.default_rng(cfg.seed)), encoder)
        for name, out in outputs.items():
            x = feat.embed(feat.extract_patches(out, body, 512, np.random.default_rng(cfg.seed)), encoder)
            results["features"][f"{name} ({tag})"] = feat.feature_distances(
                x, ref_feats, rng=np.random.default_rng(0)
            )

        # NPS of what is left of the noise.
        inner = np.stack([ndimage.binary_erosion(b, iterations=16) for b in body])
        for name in ("low-dose input", "model"):
            f_, nps = _mean_nps(outputs[name], ref, pixel_mm, inner)
            results["nps"][f"{name} minus reference ({tag})"] = {
                "frequency_per_mm": list(map(float, f_)),
                "nps_hu2_mm2": list(map(float, nps)),
            }

        dose_summary: dict[str, Any] = {
            "psnr_db": {k: round(float(v["psnr_db"]), 2) for k, v in pix.items()},
            "ssim": {k: round(float(v["ssim"]), 4) for k, v in pix.items()},
            "psnr_gain_over_input_db": round(
                float(pix["model"]["psnr_db"] - pix["low-dose input"]["psnr_db"]), 2
            ),
            "psnr_gain_over_nlm_db": round(
                float(pix["model"]["psnr_db"] - pix["non-local means"]["psnr_db"]), 2
            ),
            "lesion_contrast_ratio": {k: round(float(v["mean_ratio"]), 3) for k, v in lesion_results.items()},
            "lesion_contrast_ratio_reference": round(float(ref_lesions["mean_ratio"]), 3),
            "grey_white_contrast_hu": {k: round(float(np.mean(v)), 2) if v else None for k, v in gw.items()},
            "dprime": {k: round(float(v["dprime"]), 3) for k, v in lesion_results.items()},
            "coverage_90": round(float(cov["coverage"]), 4),
            "min_slice_coverage_90": round(float(np.nanmin(cov["per_slice_coverage"])), 4),
            "mean_interval_width_hu": round(float(cov["mean_width_hu"]), 2),
            "baseline_parameters": {
                "Gaussian sigma mm": sigma_g,
                "NLM strength": h_nlm,
                "BM3D sigma factor": factor_bm3d,
            },
            "model_seconds_per_slice_incl_maps": round(seconds / len(low), 4),
        }
        if "BM3D" in pix:
            dose_summary["psnr_gain_over_bm3d_db"] = round(
                float(pix["model"]["psnr_db"] - pix["BM3D"]["psnr_db"]), 2
            )
            dose_summary["ssim_minus_bm3d"] = round(float(pix["model"]["ssim"] - pix["BM3D"]["ssim"]), 4)

        # Hallucination detection (at the first dose only: the acceptance's 0.25).
        if dose == cfg.doses[0]:
            tell(f"{tag}: hallucination tests")
            dose_summary["hallucination_auroc"] = _hallucination_tests(
                test, low, prediction.mean, prediction.sigma, model, results, cfg.seed
            )
        summary["doses"][tag] = dose_summary
    return results, summary, example


def _hallucination_tests(
    test: Sequence[Case],
    low: np.ndarray,
    mean: np.ndarray,
    sigma: np.ndarray,
    model: RestorationModel,
    results: dict[str, Any],
    seed: int,
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    aurocs: dict[str, float] = {}
    for label, contrast, radius in (("inserted 60 HU r3", 60.0, 3.0), ("inserted 30 HU r2.5", 30.0, 2.5)):
        pos_scores: list[float] = []
        neg_scores: list[float] = []
        for k, case in enumerate(test):
            avoid = [les_.mask for les_ in (*case.lesions, *case.nodules)]
            inner = ndimage.binary_erosion(case.body_mask, iterations=8)
            sign = rng.choice([-1.0, 1.0], size=4)
            altered, blobs = hal.insert_blobs(
                mean[k], rng, 4, list(contrast * sign), radius, inner, avoid=avoid
            )
            controls = hal.control_regions(inner, blobs, 8, rng, avoid=[*avoid, *blobs])
            score = model.score(low[k : k + 1], altered[None], sigma[k : k + 1])[0]
            pos_scores.extend(hal.region_scores(score, blobs))
            neg_scores.extend(hal.region_scores(score, controls))
        aurocs[label] = _auroc(pos_scores, neg_scores, results, f"model: {label}")
    pos_scores, neg_scores = [], []
    for k, case in enumerate(test):
        structures = [
            s
            for s in (*case.nodules, *case.lesions)
            if abs(s.contrast_hu) >= 60 and s.diameter_mm / case.pixel_mm >= 6.0
        ]
        if not structures:
            continue
        avoid = [s.mask for s in (*case.lesions, *case.nodules)]
        altered = hal.remove_structures(
            mean[k], [s.mask for s in structures], rng, body=case.body_mask, avoid=avoid
        )
        inner = ndimage.binary_erosion(case.body_mask, iterations=8)
        controls = hal.control_regions(
            inner, [s.mask for s in structures], 2 * len(structures), rng, avoid=avoid
        )
        score = model.score(low[k : k + 1], altered[None], sigma[k : k + 1])[0]
        pos_scores.extend(hal.region_scores(score, [s.mask for s in structures]))
        neg_scores.extend(hal.region_scores(score, controls))
    if pos_scores:
        aurocs["removed real structures (>=60 HU, r>=3 px)"] = _auroc(
            pos_scores, neg_scores, results, "model: removed real structures"
        )
    return aurocs


def _auroc(pos: Sequence[float], neg: Sequence[float], results: dict[str, Any], name: str) -> float:
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[np.asarray(pos, float), np.asarray(neg, float)]
    fpr, tpr, _ = roc_curve(y, s)
    auc = float(roc_auc_score(y, s))
    results["hallucination"][name] = {
        "auroc": auc,
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "n_positive": len(pos),
        "n_negative": len(neg),
        "reduce": "max",
    }
    return round(auc, 4)


def inference_speed(model: RestorationModel, slices: int = 16, size: int = 512) -> float:
    """Slices per second at ``size``×``size`` including σ and the hallucination map."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 30, (slices, size, size)).astype(np.float32)
    model.predict(volume[:2], (1.0, 0.7, 0.7))  # warm-up
    started = time.perf_counter()
    prediction = model.predict(volume, (1.0, 0.7, 0.7))
    model.score(volume, prediction.mean, prediction.sigma)
    return slices / (time.perf_counter() - started)
