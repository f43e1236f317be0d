"""Per-case coverage of the sCT's 90 % interval, and what the MR says about each case.

The sCT evaluation (:mod:`models.evaluation.sct_eval`) reports the coverage of
``mean ± 1.645 σ`` over the head, pooled and per case. This module measures only that, for
cheap runs on fresh test seeds, next to the per-case quantities that could make σ adapt per
case, measured on the MR alone (:func:`mr_case_features`): its noise level (Rayleigh
background outside the head over the bright-tissue level), how uneven its bright tissue is
after heavy smoothing (a bias-field proxy), its dark share inside the head (bone, air), the
head volume; and the model's own confident-voxel σ. All on SIMULATED data
(:mod:`models.sim.mrct`).

``python -m models.evaluation.sct_case_coverage --seed S --cases N`` prints one line per case
and the pooled coverage; test seeds that meet the model's training or calibration seeds are
refused (:func:`models.evaluation.sct_eval.check_held_out`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from models.evaluation import calibration as cal
from models.evaluation.sct_eval import check_held_out
from models.sct import SctModel
from models.training.sct import Role, case_plan, simulate_all

#: Background ring: voxels further than this (px) from the head are air.
BACKGROUND_MARGIN_PX = 6


@dataclass(frozen=True)
class CaseCoverage:
    """One case: its seed and stack level, coverage and mean width of the 90 % interval in the
    head, the MR's own figures (:func:`mr_case_features`) and the median model σ (HU) over the
    case's confident half of the head."""

    seed: int
    level: float
    coverage: float
    width_hu: float
    noise_rel: float
    bright_cv: float
    dark_fraction: float
    head_ml: float
    confident_sigma_hu: float


def mr_case_features(
    mr: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float]
) -> dict[str, float]:
    """What an MR volume says about itself, relative to its bright-tissue level (95th
    percentile in the head, as :func:`models.sct.normalise_mr`).

    ``noise_rel``: Rician noise σ from the Rayleigh background (median / sqrt(2 ln 2)) more
    than :data:`BACKGROUND_MARGIN_PX` outside the head; ``bright_cv``: spread of log intensity
    of bright tissue (normalised > 0.7) smoothed over 4 px (a bias-field proxy);
    ``dark_fraction``: share of the head below 0.25 (bone, air); ``head_ml``: head volume.
    """
    mr = np.asarray(mr, np.float32)
    body = np.asarray(body, bool)
    inside = mr[body]
    scale = float(np.percentile(inside, 95)) if inside.size else 1.0
    scale = max(scale, 1e-6)
    ring = ndimage.binary_dilation(body, structure=np.ones((1, 3, 3), bool), iterations=BACKGROUND_MARGIN_PX)
    background = mr[~ring]
    rayleigh = float(np.median(background)) / math.sqrt(2.0 * math.log(2.0)) if background.size else math.nan
    noise = rayleigh / scale
    norm = mr / scale
    smooth = ndimage.gaussian_filter(norm, (0, 4, 4))
    bright = body & (norm > 0.7)
    bright_cv = float(np.std(np.log(np.maximum(smooth[bright], 1e-3)))) if bright.any() else math.nan
    dark = float(np.mean(norm[body] < 0.25)) if body.any() else math.nan
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        "noise_rel": noise,
        "bright_cv": bright_cv,
        "dark_fraction": dark,
        "head_ml": float(body.sum()) * voxel_ml,
    }


def case_coverage(
    model: SctModel,
    seed: int,
    n_cases: int,
    *,
    role: Role = "test",
    slices: int = 12,
    size: int = 256,
    workers: int = 2,
    residuals: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[CaseCoverage]:
    """Simulate ``n_cases`` cases of ``role`` from ``seed`` (:func:`case_plan`), run the model
    and measure each case's coverage in the head mask the model computes. Test seeds are
    checked against the model's training and calibration seeds. ``residuals``, if given,
    receives each case's (|sCT − reference|, network σ before the card's scale) over the
    head, for :func:`floor_tradeoff`."""
    specs = case_plan(role, n_cases, seed, slices=slices, size=size)
    if role == "test":
        check_held_out(model, [s.seed for s in specs])
    pairs = simulate_all(specs, workers, keep_raw=True)
    out = []
    for spec, pair in zip(specs, pairs, strict=True):
        assert pair.raw_mr is not None  # keep_raw
        pred = model.predict_full(pair.raw_mr, pair.spacing)
        ref = pair.ct.astype(np.float32)
        c = cal.interval_coverage(pred.prediction.mean, pred.prediction.sigma, ref, pair.body)
        sigma = pred.prediction.sigma[pair.body]
        if residuals is not None:
            error = np.abs(pred.prediction.mean - ref)[pair.body]
            residuals.append((error, sigma / np.float32(model.meta.sigma_scale)))
        confident = float(np.median(sigma[sigma <= np.median(sigma)])) if sigma.size else math.nan
        out.append(
            CaseCoverage(
                seed=spec.seed,
                level=round(spec.level, 3),
                coverage=float(c["coverage"]),
                width_hu=float(c["mean_width_hu"]),
                confident_sigma_hu=confident,
                **mr_case_features(pair.raw_mr, pair.body, pair.spacing),
            )
        )
    return out


#: Network σ (HU, uncalibrated) above which a voxel counts as high-σ (bone and air interfaces).
HIGH_SIGMA_HU = 100.0


def floor_tradeoff(
    errors: Sequence[np.ndarray], sigmas: Sequence[np.ndarray], floors_hu: Sequence[float]
) -> list[dict[str, float]]:
    """What a σ floor, ``σ = max(scale · σ_net, floor)``, does to the 90 % interval.

    ``errors`` (|sCT − reference|) and ``sigmas`` (network σ) are per case, over the head. For
    each floor: ``scale_refit`` (the scale that keeps 90 % pooled coverage with the floor,
    by bisection) with the pooled, lowest-case and high-σ (> :data:`HIGH_SIGMA_HU`) coverage
    it gives, and the pooled and lowest-case coverage with the floor's scale-0 plain conformal
    scale kept (``*_kept``). Fit on calibration cases; apply to others with the same scale.
    """
    r_all = np.concatenate([np.asarray(e, np.float64) for e in errors])
    s_all = np.concatenate([np.asarray(s, np.float64) for s in sigmas])

    def covered(r: np.ndarray, s: np.ndarray, scale: float, floor: float) -> float:
        return float(np.mean(r <= cal.Z90 * np.maximum(scale * s, floor))) if r.size else math.nan

    def refit(floor: float) -> float:
        lo, hi = 0.0, 8.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if covered(r_all, s_all, mid, floor) < 0.9 else (lo, mid)
        return hi

    plain = refit(0.0)
    high = s_all > HIGH_SIGMA_HU
    rows = []
    for floor in floors_hu:
        scale = refit(float(floor))
        rows.append(
            {
                "floor_hu": float(floor),
                "scale_refit": scale,
                "pooled": covered(r_all, s_all, scale, floor),
                "lowest_case": min(covered(e, s, scale, floor) for e, s in zip(errors, sigmas, strict=True)),
                "high_sigma": covered(r_all[high], s_all[high], scale, floor),
                "pooled_kept": covered(r_all, s_all, plain, floor),
                "lowest_case_kept": min(
                    covered(e, s, plain, floor) for e, s in zip(errors, sigmas, strict=True)
                ),
            }
        )
    return rows


def pooled_coverage(cases: Sequence[CaseCoverage]) -> float:
    """Coverage pooled over the head voxels of all cases (each case weighted by its head
    volume: the cases of one plan share their voxel size)."""
    w = np.asarray([c.head_ml for c in cases], np.float64)
    return float(np.sum(w * np.asarray([c.coverage for c in cases])) / max(float(w.sum()), 1.0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="seed of the case plan (a fresh one)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--role", choices=("test", "calib"), default="test")
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--version", default=None, help="sct-head version (default: the newest)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument(
        "--floors", default=None, help="comma-separated σ floors (HU): print floor_tradeoff on these cases"
    )
    args = parser.parse_args(argv)
    model = SctModel.shipped("sct-head", args.version)
    residuals: list[tuple[np.ndarray, np.ndarray]] = []
    cases = case_coverage(
        model, args.seed, args.cases, role=args.role, slices=args.slices, size=args.size, residuals=residuals
    )
    for c in cases:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(c).items()}))
    pooled = pooled_coverage(cases)
    print(
        f"SIMULATED, sct-head {model.card.version}, {args.role} seed {args.seed}: pooled 90 % coverage "
        f"{pooled:.4f}, lowest case {min(c.coverage for c in cases):.4f}"
    )
    if args.floors:
        floors = [float(v) for v in args.floors.split(",")]
        errors, sigmas = [e for e, _ in residuals], [s for _, s in residuals]
        for row in floor_tradeoff(errors, sigmas, floors):
            print("floor", json.dumps({k: round(v, 4) for k, v in row.items()}))
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cases], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
