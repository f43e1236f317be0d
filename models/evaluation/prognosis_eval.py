"""Prognosis evaluation on SIMULATED patients: the calibrated growth-fit ensemble against
no change, linear volume extrapolation and the plain per-patient Fisher–Kolmogorov fit.

Protocol (``python -m models.evaluation.prognosis_eval --out DIR``)
    Each patient is :func:`models.sim.prognosis.make_patient` with four visits: visits 1–3
    are the input (two earlier visits and the current one), visit 4 is the follow-up whose
    extent is predicted (30–100 days later). Extents are the truth's visible ones (T1c
    ``c ≥ 0.8``, FLAIR ``c ≥ 0.16``) on the 2 mm growth grid, with its white/grey matter
    fractions: this level scores the *forecast* — segmentation and registration are the
    pipeline's and are measured on their own. Training seeds :data:`TRAIN_SEEDS` (the first
    :data:`PRIOR_PATIENTS` learn the population prior, its weight and the temperature, the
    rest the conformal interval factor); test seeds :data:`TEST_SEEDS`, never seen while
    learning. The prior weight and temperature are the pair of the grid with the lowest
    Brier score of the voxel probabilities on the prior patients.
Methods
    ``no change`` and ``linear volume`` (:mod:`models.evaluation.prognosis_baselines`), ``FK
    fit`` (the ensemble member that fits the input visits best, no prior, run forward:
    the per-patient growth-model fit) and ``model`` (:func:`models.prognosis.combine` with
    the learned :class:`models.prognosis.Calibration`).
Figures
    Per method: Dice and HD95 of the whole-tumour extent (probability ≥ 0.5) at the
    follow-up, Dice of the T1c-visible core, volume error (ml), growth / stability called
    right; for the model also the coverage of its 90 % volume interval and the ECE of its
    voxel probabilities (every method's ECE is given, the deterministic ones as 0/1).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from models import prognosis as pg
from models.evaluation import prognosis_baselines as pb
from models.evaluation import prognosis_metrics as pm

TRAIN_SEEDS = tuple(range(7000, 7080))
#: of the training patients, the first learn the prior and temperature, the rest the interval
PRIOR_PATIENTS = 30
TEST_SEEDS = tuple(range(9000, 9040))
SIMULATED = "SIMULATED data: models.sim.prognosis patients (MNI152 anatomy, Fisher-Kolmogorov growth)"
_PRIOR_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)
_TEMPERATURES = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3)
#: How the cached members were scored (a cache that says otherwise is recomputed; caches
#: from before this tag have this scoring).
SCORING = "1 - Dice of core and whole tumour, visits weighted equally"


@dataclass(frozen=True)
class Case:
    """One simulated patient, ready for every method."""

    seed: int
    observations: tuple[pg.Observation, ...]  # input visits
    follow_up: pg.Observation  # the truth
    anatomy: pg.Anatomy
    brain: np.ndarray
    effects: dict[str, Any]
    members: tuple[pg.Member, ...] = ()


def make_case(seed: int, *, with_members: bool = True) -> Case:
    """Simulate patient ``seed`` (4 visits) and, unless told not to, run the ensemble."""
    from models.sim.prognosis import make_patient

    return case_from_patient(make_patient(seed, visits=4), with_members=with_members)


def case_from_patient(patient: Any, *, with_members: bool = True) -> Case:
    """The :class:`Case` of a simulated 4-visit patient (:class:`models.sim.prognosis.SimulatedPatient`)."""
    d = patient.domain
    spacing = (float(d.spacing_mm),) * 3
    obs = tuple(
        pg.Observation(
            float(v.day), v.growth_density >= pg.CORE_THRESHOLD, v.growth_density >= pg.WHOLE_THRESHOLD
        )
        for v in patient.visits
    )
    anatomy = pg.Anatomy(d.white, d.grey, spacing)
    params = patient.params
    effects = {
        "treated": params.treatment is not None,
        "anisotropic": params.anisotropy > 1.0,
        "mass_effect": params.mass_effect > 0.0,
        "d_white": params.d_white,
        "rho": params.rho,
    }
    case = Case(int(patient.seed), obs[:3], obs[3], anatomy, ~d.barrier, effects)
    if with_members:
        unweighted = pg.Calibration(prior_weight=0.0)
        members = pg.run_members(case.observations, anatomy, case.follow_up.day, unweighted)
        case = replace(case, members=tuple(members))
    return case


def _brier(cases: Sequence[Case], calibration: pg.Calibration) -> float:
    total, count = 0.0, 0
    for case in cases:
        p = pg.combine(case.members, calibration, case.follow_up.day, case.anatomy.spacing_mm).probability
        truth = case.follow_up.whole
        open_q = (p > 1e-3) | truth
        total += float(np.sum((p[open_q] - truth[open_q]) ** 2))
        count += int(open_q.sum())
    return total / max(count, 1)


def _vote_scaling(cases: Sequence[Case], calibration: pg.Calibration) -> tuple[float, float]:
    """Platt scaling of the whole-tumour vote: the logistic regression of the truth on
    ``logit(vote)`` over the voxels the members vote for or the truth holds (Newton steps)."""
    xs, ys = [], []
    for case in cases:
        vote = pg.combine(
            case.members,
            replace(calibration, vote_scale=1.0, vote_shift=0.0),
            case.follow_up.day,
            case.anatomy.spacing_mm,
        ).probability
        truth = case.follow_up.whole
        open_q = (vote > 0.0) | truth
        xs.append(pg.vote_logit(vote[open_q].astype(np.float64)))
        ys.append(truth[open_q].astype(np.float64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    design = np.stack([x, np.ones_like(x)], axis=1)
    beta = np.array([1.0, 0.0])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        w = p * (1.0 - p) + 1e-9
        step = np.linalg.solve(design.T @ (design * w[:, None]) + 1e-6 * np.eye(2), design.T @ (y - p))
        beta = beta + step
        if float(np.abs(step).max()) < 1e-8:
            break
    return float(beta[0]), float(beta[1])


def learn_calibration(fit_cases: Sequence[Case], conformal_cases: Sequence[Case]) -> pg.Calibration:
    """Population prior, its weight and the temperature on ``fit_cases`` (weight and temperature:
    the lowest Brier score), then the vote's Platt scaling on the same patients; interval
    factor on ``conformal_cases``."""
    best = [min(c.members, key=lambda m: m.misfit) for c in fit_cases]
    x = np.array([[math.log(m.speed), math.log(m.width)] for m in best])
    mean = x.mean(axis=0)
    # plus the grid's own spacing, so one value is no certainty (one patient: a broad prior)
    cov = (np.cov(x.T) if len(x) > 1 else np.eye(2)) + np.diag([0.05, 0.05])
    base = pg.Calibration(
        prior_mean=(float(mean[0]), float(mean[1])),
        prior_cov=((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
    )
    grid = [(w, t) for w in _PRIOR_WEIGHTS for t in _TEMPERATURES]
    scores = {(w, t): _brier(fit_cases, replace(base, prior_weight=w, temperature=t)) for w, t in grid}
    weight, temperature = min(scores, key=lambda k: scores[k])
    chosen = replace(base, prior_weight=weight, temperature=temperature, interval_factor=1.0)
    scale, shift = _vote_scaling(fit_cases, chosen)
    chosen = replace(chosen, vote_scale=scale, vote_shift=shift)
    # split conformal: the factor by which the ensemble's own 90 % log-volume interval must
    # be widened to hold the truth in 90 % of the calibration patients
    ratios = []
    for case in conformal_cases:
        f = pg.combine(case.members, chosen, case.follow_up.day, case.anatomy.spacing_mm)
        truth = math.log(max(pm.volume_ml(case.follow_up.whole, case.anatomy.spacing_mm), 1e-3))
        centre = math.log(f.volume_ml)
        half = math.log(f.interval_ml[1]) - centre if truth >= centre else centre - math.log(f.interval_ml[0])
        ratios.append(abs(truth - centre) / max(half, 1e-6))
    n = len(ratios)
    level = min(1.0, math.ceil(0.9 * (n + 1)) / n)
    factor = float(np.quantile(ratios, level, method="higher")) if ratios else 1.0
    return replace(
        chosen,
        interval_factor=max(factor, 0.1),
        n_training=len(fit_cases) + len(conformal_cases),
        notes={"brier_fit": scores[(weight, temperature)], "conformal_patients": float(n)},
    )


def _forecasts(case: Case, calibration: pg.Calibration) -> dict[str, tuple[pb.Forecast, np.ndarray]]:
    """Per method: its whole-tumour forecast and its predicted T1c-visible core."""
    spacing = case.anatomy.spacing_mm
    whole = [pb.Visit(o.day, o.whole) for o in case.observations]
    core = [pb.Visit(o.day, o.core) for o in case.observations]
    day = case.follow_up.day
    fit = min(case.members, key=lambda m: m.misfit)
    model = pg.combine(case.members, calibration, day, spacing)

    def extent(f: pb.Forecast) -> np.ndarray:
        return f.probability >= pg.EXTENT_PROBABILITY

    return {
        "no change": (pb.no_change(whole, day, spacing), case.observations[-1].core),
        "linear volume": (
            pb.linear_volume(whole, day, case.brain, spacing),
            extent(pb.linear_volume(core, day, case.brain, spacing)),
        ),
        "linear sphere": (
            pb.linear_volume_sphere(whole, day, spacing),
            extent(pb.linear_volume_sphere(core, day, spacing)),
        ),
        "FK fit": (pb.Forecast(fit.whole.astype(np.float32), pm.volume_ml(fit.whole, spacing)), fit.core),
        "model": (
            pb.Forecast(model.probability, model.volume_ml, model.interval_ml),
            model.core_probability >= pg.EXTENT_PROBABILITY,
        ),
    }


def evaluate(cases: Sequence[Case], calibration: pg.Calibration) -> dict[str, Any]:
    """Per-method figures over ``cases`` (the test patients)."""
    methods = ("no change", "linear sphere", "linear volume", "FK fit", "model")
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    probabilities: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    truths, masks = [], []
    for case in cases:
        spacing = case.anatomy.spacing_mm
        truth = case.follow_up.whole
        true_ml = pm.volume_ml(truth, spacing)
        current_ml = pm.volume_ml(case.observations[-1].whole, spacing)
        truths.append(truth)
        masks.append(case.brain)
        for method, (f, core) in _forecasts(case, calibration).items():
            extent = f.probability >= pg.EXTENT_PROBABILITY
            row = {
                "seed": case.seed,
                "dice": pm.dice(extent, truth),
                "hd95_mm": pm.hausdorff95_mm(extent, truth, spacing),
                "core_dice": pm.dice(core, case.follow_up.core),
                "volume_ml": f.volume_ml,
                "true_volume_ml": true_ml,
                "volume_error_ml": abs(f.volume_ml - true_ml),
                "call_right": pm.growth_call(current_ml, f.volume_ml) == pm.growth_call(current_ml, true_ml),
                **case.effects,
            }
            if f.interval_ml is not None:
                row["interval_ml"] = f.interval_ml
                row["covered"] = f.interval_ml[0] <= true_ml <= f.interval_ml[1]
            rows[method].append(row)
            probabilities[method].append(f.probability)
    summary: dict[str, Any] = {}
    for method in methods:
        r = rows[method]
        rel = pm.reliability(probabilities[method], truths, masks)
        cores = [x["core_dice"] for x in r]
        summary[method] = {
            "dice_mean": float(np.mean([x["dice"] for x in r])),
            "dice_median": float(np.median([x["dice"] for x in r])),
            "hd95_mm_median": float(np.median([x["hd95_mm"] for x in r])),
            "core_dice_mean": float(np.mean(cores)) if cores else None,
            "volume_error_ml_mean": float(np.mean([x["volume_error_ml"] for x in r])),
            "volume_error_ml_median": float(np.median([x["volume_error_ml"] for x in r])),
            "growth_call_right": float(np.mean([x["call_right"] for x in r])),
            "ece": rel.ece,
            "reliability": {
                "mean_predicted": rel.mean_predicted,
                "observed": rel.observed,
                "counts": rel.counts,
            },
        }
        covered = [x["covered"] for x in r if "covered" in x]
        if covered:
            summary[method]["interval_coverage_90"] = float(np.mean(covered))
    model, others = summary["model"], {m: summary[m] for m in methods if m != "model"}
    acceptance = {
        "dice_vs_no_change": model["dice_mean"] - others["no change"]["dice_mean"],
        "dice_vs_linear_sphere": model["dice_mean"] - others["linear sphere"]["dice_mean"],
        "dice_vs_linear_uniform_front": model["dice_mean"] - others["linear volume"]["dice_mean"],
        "dice_vs_fk_fit": model["dice_mean"] - others["FK fit"]["dice_mean"],
        "volume_error_ratio_vs_no_change": model["volume_error_ml_mean"]
        / max(others["no change"]["volume_error_ml_mean"], 1e-9),
        "interval_coverage_90": model.get("interval_coverage_90"),
        "ece": model["ece"],
    }
    acceptance["holds_against_uniform_front_too"] = bool(acceptance["dice_vs_linear_uniform_front"] >= 0.05)
    acceptance["holds"] = bool(
        acceptance["dice_vs_no_change"] >= 0.05
        and acceptance["dice_vs_linear_sphere"] >= 0.05
        and acceptance["dice_vs_fk_fit"] >= 0.0
        and acceptance["volume_error_ratio_vs_no_change"] <= 0.5
        and 0.85 <= (acceptance["interval_coverage_90"] or 0.0) <= 0.95
        and acceptance["ece"] <= 0.05
    )
    return {"summary": summary, "acceptance": acceptance, "cases": rows}


def _save(case: Case, path: Path) -> None:
    arrays: dict[str, Any] = {
        f"obs{n}_{k}": np.packbits(getattr(o, k))
        for n, o in enumerate(case.observations)
        for k in ("core", "whole")
    }
    arrays |= {f"follow_{k}": np.packbits(getattr(case.follow_up, k)) for k in ("core", "whole")}
    arrays |= {
        f"m{n}_{k}": np.packbits(getattr(m, k)) for n, m in enumerate(case.members) for k in ("core", "whole")
    }
    meta = {
        "seed": case.seed,
        "days": [o.day for o in case.observations],
        "follow_day": case.follow_up.day,
        "spacing": case.anatomy.spacing_mm,
        "shape": case.brain.shape,
        "effects": case.effects,
        "members": [[m.speed, m.width, m.misfit, m.score] for m in case.members],
        "scoring": SCORING,
    }
    np.savez_compressed(
        path,
        white=case.anatomy.white,
        grey=case.anatomy.grey,
        brain=case.brain,
        meta=json.dumps(meta),
        **arrays,
    )


def _load(path: Path) -> Case | None:
    """A cached case, or ``None`` when its members were scored otherwise than now."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("scoring", SCORING) != SCORING:
            return None
        shape = tuple(meta["shape"])
        size = int(np.prod(shape))

        def mask(key: str) -> np.ndarray:
            return np.unpackbits(z[key], count=size).astype(bool).reshape(shape)

        obs = tuple(
            pg.Observation(day, mask(f"obs{n}_core"), mask(f"obs{n}_whole"))
            for n, day in enumerate(meta["days"])
        )
        follow = pg.Observation(meta["follow_day"], mask("follow_core"), mask("follow_whole"))
        members = tuple(
            pg.Member(sp, w, mis, sc, mask(f"m{n}_whole"), mask(f"m{n}_core"))
            for n, (sp, w, mis, sc) in enumerate(meta["members"])
        )
        anatomy = pg.Anatomy(z["white"], z["grey"], tuple(meta["spacing"]))
        return Case(meta["seed"], obs, follow, anatomy, z["brain"], meta["effects"], members)


def _cases(seeds: Iterable[int], label: str, cache: Path | None = None) -> list[Case]:
    out = []
    for n, seed in enumerate(seeds, 1):
        started = time.monotonic()
        cached = None if cache is None else cache / f"case-{seed}.npz"
        loaded = _load(cached) if cached is not None and cached.exists() else None
        if loaded is not None:
            out.append(loaded)
            continue
        out.append(make_case(seed))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            _save(out[-1], cached)
        print(f"{label} {n}: seed {seed} ({time.monotonic() - started:.1f} s)", flush=True)
    return out


_INTENDED_USE = (
    "Research use: a predicted brain-tumour follow-up (extent probability, volume with a 90% interval, "
    "predicted T1c/FLAIR images) from a current MR study and two or more registered priors, for a tumour "
    "board to weigh against the acquired follow-up. A prediction, never an acquisition; not for diagnosis."
)
_TRAINING_DATA = (
    "SIMULATED only: {n} models.sim.prognosis patients (seeds {seeds}; MNI152 anatomy, Fisher-Kolmogorov "
    "growth with D_white 0.02-0.25 mm2/day and rho 0.008-0.04 /day after Swanson et al. 2000, Harpold et al. "
    "2007, Konukoglu et al. 2010; anisotropy, treatment response and mass effect in some patients)"
)


def _seed_range(seeds: Sequence[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if seeds else "none"


def write_zoo(
    directory: Path,
    calibration: pg.Calibration,
    results: dict[str, Any],
    version: str = "1.0",
    *,
    like: Path | None = None,
) -> Path:
    """A zoo version directory: ``calibration.json`` (the weights), ``evaluation.json`` and
    ``card.json`` (:class:`models.prognosis.PrognosisCard`, its metrics from ``results``).

    What is set by hand rather than learned — the input domain, the intended use, the
    horizons — is carried over from the card in ``like`` (default: the shipped version).
    """
    from models.zoo import sha256_of, version_dir

    try:
        previous: pg.PrognosisCard | None = pg.PrognosisCard.read_from(like or version_dir(pg.ZOO_NAME))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        previous = None

    directory.mkdir(parents=True, exist_ok=True)
    calibration.save(directory / "calibration.json")
    (directory / "evaluation.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    s, meta = results["summary"], results["meta"]
    train, test = meta["train_seeds"], meta["test_seeds"]
    n_prior = min(PRIOR_PATIENTS, len(train) // 2)
    model = s["model"]
    card = pg.PrognosisCard(
        name=pg.ZOO_NAME,
        version=version,
        weights_file="calibration.json",
        weights_sha256=sha256_of(directory / "calibration.json"),
        architecture={
            "front_speeds_mm_per_day": list(pg.SPEEDS_MM_PER_DAY),
            "grey_over_white_diffusivity": 1.0 / pg.GREY_RATIO,
            "grid_mm": 2.0,
            "method": "per-patient Fisher-Kolmogorov fit as a weighted ensemble (models.prognosis)",
            "visibility_thresholds": {"flair": pg.WHOLE_THRESHOLD, "t1c": pg.CORE_THRESHOLD},
            "wave_widths_mm": list(pg.WIDTHS_MM),
        },
        intended_use=previous.intended_use if previous else _INTENDED_USE,
        training_data=_TRAINING_DATA.format(n=len(train), seeds=_seed_range(train)),
        calibration=(
            f"population prior over (log speed, log width), prior weight and ensemble temperature by Brier "
            f"score on {n_prior} training patients, then Platt scaling of the members' vote "
            f"(scale {calibration.vote_scale:.3f}, shift {calibration.vote_shift:.3f}) on the same patients; "
            f"5-95% log-volume range widened by a split-conformal "
            f"factor on {len(train) - n_prior} others"
        ),
        metrics={
            "90% volume interval coverage": f"{model.get('interval_coverage_90', float('nan')):.2f}",
            "core Dice (mean)": f"{model['core_dice_mean']:.3f}",
            "data": (
                f"SIMULATED: {len(test)} held-out models.sim.prognosis patients (seeds {_seed_range(test)}), "
                "truth extents on the 2 mm grid"
            ),
            "volume error (ml, mean)": (
                f"{model['volume_error_ml_mean']:.2f} "
                f"(no change {s['no change']['volume_error_ml_mean']:.2f})"
            ),
            "voxel probability ECE": f"{model['ece']:.3f}",
            "whole-tumour Dice at follow-up (mean)": (
                f"{model['dice_mean']:.3f} (no change {s['no change']['dice_mean']:.3f}, "
                f"linear sphere {s['linear sphere']['dice_mean']:.3f}, "
                f"linear uniform front {s['linear volume']['dice_mean']:.3f}, "
                f"FK fit {s['FK fit']['dice_mean']:.3f})"
            ),
        },
        training={
            "command": "python -m models.evaluation.prognosis_eval --out DIR --zoo DIR",
            "test_seeds": _seed_range(test),
            "train_seeds": _seed_range(train),
        },
        input_domain=dict(previous.input_domain) if previous else {},
        horizons_days=list(previous.horizons_days) if previous else [90],
    )
    card.write_to(directory)
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="writes calibration.json and evaluation.json")
    parser.add_argument(
        "--train",
        type=int,
        default=len(TRAIN_SEEDS),
        help=f"training patients (seeds from {TRAIN_SEEDS[0]} on; the first {PRIOR_PATIENTS} learn the "
        "prior, temperature and vote scaling, the rest the interval factor)",
    )
    parser.add_argument(
        "--test",
        type=int,
        default=len(TEST_SEEDS),
        help=f"test patients (seeds from {TEST_SEEDS[0]} on; beyond the default {len(TEST_SEEDS)}, "
        "the seeds that follow, never used while learning)",
    )
    parser.add_argument(
        "--test-first",
        type=int,
        default=TEST_SEEDS[0],
        help="the first test seed (a held-out set never used before: seeds from here on)",
    )
    parser.add_argument("--cache", type=Path, help="keep each simulated patient and its ensemble here")
    parser.add_argument(
        "--zoo",
        type=Path,
        help="also write a zoo version directory (card.json, calibration.json, evaluation.json)",
    )
    parser.add_argument("--version", default="1.0", help="the version the --zoo card names")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    train_seeds = tuple(range(TRAIN_SEEDS[0], TRAIN_SEEDS[0] + args.train))  # TRAIN_SEEDS up to 80
    if args.test_first < train_seeds[-1] + 1 and args.test_first + args.test > train_seeds[0]:
        parser.error("the test seeds overlap the training seeds")
    train = _cases(train_seeds, "train", args.cache)
    half = min(PRIOR_PATIENTS, len(train) // 2)
    calibration = learn_calibration(train[:half], train[half:])
    calibration.save(args.out / "calibration.json")
    test_seeds = tuple(
        range(args.test_first, args.test_first + args.test)
    )  # default: TEST_SEEDS[: args.test]
    test = _cases(test_seeds, "test", args.cache)
    results = evaluate(test, calibration)
    results["meta"] = {
        "data": SIMULATED,
        "train_seeds": list(train_seeds),
        "test_seeds": list(test_seeds),
        "seconds": time.monotonic() - started,
        "calibration": json.loads((args.out / "calibration.json").read_text()),
    }
    (args.out / "evaluation.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    if args.zoo is not None:
        write_zoo(args.zoo, calibration, results, args.version)
    print(f"{SIMULATED}\n")
    head = ("Dice", "HD95", "core", "vol err", "call", "ECE", "cov90")
    print(f"{'method':15} " + " ".join(f"{h:>6}" for h in head))
    for method, s in results["summary"].items():
        core = "-" if s["core_dice_mean"] is None else f"{s['core_dice_mean']:.3f}"
        cov = s.get("interval_coverage_90")
        print(
            f"{method:15} {s['dice_mean']:6.3f} {s['hd95_mm_median']:6.1f} {core:>6} "
            f"{s['volume_error_ml_mean']:8.2f} {s['growth_call_right']:5.2f} {s['ece']:6.3f} "
            f"{'-' if cov is None else f'{cov:.2f}':>6}"
        )
    print(json.dumps(results["acceptance"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
