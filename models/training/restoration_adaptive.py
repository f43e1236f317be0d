"""Fitting the restoration σ that follows the input's noise (card ``sigma_adaptive``).

The network's σ was learnt on one noise texture, the simulator's filtered back-projection.
Coarse noise it never saw (a smooth kernel, iterative reconstruction) passes through the
network and the put-back largely unremoved, so the error grows while σ does not. The
adaptive factor (:func:`models.restoration.adaptive_factor`) widens σ by the slice's coarse
noise estimate in excess of the simulator's. Its two coefficients are fitted on
calibration-role reference slices with noise of :data:`FIT_TEXTURES` (and the simulator's
own low-dose slices) — never on the foreign test conditions. Everything here is SIMULATED.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from models.evaluation.foreign_noise import FIT_TEXTURES, add_noise
from models.restoration import BODY_HU, Z90, RestorationCard, RestorationModel, SliceFacts


@dataclass(frozen=True)
class SliceRecord:
    """One calibration slice: its facts, median group-scaled σ and sorted ``|error| / σ``."""

    facts: SliceFacts
    sigma_median_hu: float
    ratios: np.ndarray  # sorted, body pixels


def coverage_at(records: Sequence[SliceRecord], coefficients: dict[str, float]) -> float:
    """Pooled 90 % coverage of the records under the adaptive factor."""
    from models.restoration import adaptive_factor

    inside = total = 0
    for r in records:
        limit = Z90 * adaptive_factor(r.facts, r.sigma_median_hu, coefficients)
        inside += int(np.searchsorted(r.ratios, limit, side="right"))
        total += len(r.ratios)
    return inside / max(total, 1)


def fit_adaptive(
    families: Mapping[str, Sequence[SliceRecord]],
    offset: float,
    coarse_grid: Sequence[float] = tuple(np.linspace(0.0, 1.5, 16)),
) -> dict[str, float]:
    """``coarse`` from the grid and ``base`` (bisection: mean family coverage 0.9) that
    minimise the squared deviation of each family's coverage from 0.9."""
    best: tuple[float, dict[str, float]] | None = None
    for coarse in coarse_grid:
        lo, hi = 0.0, 3.0
        for _ in range(30):
            base = 0.5 * (lo + hi)
            coef = {"base": base, "coarse": float(coarse), "coarse_offset": offset}
            mean = float(np.mean([coverage_at(rs, coef) for rs in families.values()]))
            lo, hi = (base, hi) if mean < 0.9 else (lo, base)
        coef = {"base": round(0.5 * (lo + hi), 4), "coarse": round(float(coarse), 4), "coarse_offset": offset}
        err = sum((coverage_at(rs, coef) - 0.9) ** 2 for rs in families.values())
        if best is None or err < best[0]:
            best = (err, coef)
    assert best is not None
    return best[1]


def records(
    model: RestorationModel,
    low: np.ndarray,
    reference: np.ndarray,
    body: np.ndarray,
    pixel_mm: Sequence[float],
) -> list[SliceRecord]:
    """Per-slice records under the model's group scales alone (no adaptive factor)."""
    card = model.meta
    plain = replace(card, sigma_adaptive={})
    model.meta = plain
    try:
        p = model.predict(low, (1.0, 1.0, 1.0), pixel_mm=list(pixel_mm))
    finally:
        model.meta = card
    out = []
    for k, facts in enumerate(model.last_facts):
        in_body = low[k] > BODY_HU
        ratios = np.sort((np.abs(reference[k] - p.mean[k]) / np.maximum(p.sigma[k], 1e-3))[body[k]])
        out.append(SliceRecord(facts, float(np.median(p.sigma[k][in_body])), ratios.astype(np.float32)))
    return out


def fit_on_simulation(model: RestorationModel, n_slices: int = 16, seed: int = 20261126) -> dict[str, object]:
    """Simulate calibration-role slices, add the fitting textures, fit the coefficients."""
    from models.evaluation.restoration_eval import simulate_cases
    from models.training.restoration import case_plan

    cases = simulate_cases(case_plan("calib", n_slices, seed, size=512), 2)
    ref = np.stack([c.reference_hu for c in cases]).astype(np.float32)
    body = np.stack([c.body_mask for c in cases])
    px = [c.pixel_mm for c in cases]
    low = np.stack([c.low_dose_hu for c in cases]).astype(np.float32)
    families = {"simulator": records(model, low, ref, body, px)}
    for i, texture in enumerate(FIT_TEXTURES):
        rng = np.random.default_rng([555, i])
        noisy = np.stack([add_noise(r, b, texture, rng) for r, b in zip(ref, body, strict=True)])
        families[texture.name] = records(model, noisy, ref, body, px)
    # the simulator's own texture is what the network's σ learnt: only coarse noise in
    # excess of its median widens σ
    ratios = [r.facts.coarse_noise_hu / r.sigma_median_hu for r in families["simulator"]]
    offset = round(float(np.median(ratios)), 4)
    coef = fit_adaptive(families, offset)
    return {
        "coefficients": coef,
        "coverage_by_family": {k: round(coverage_at(v, coef), 4) for k, v in families.items()},
        "coverage_by_family_before": {k: round(coverage_at(v, {}), 4) for k, v in families.items()},
    }


def write_card(source: Path, out_dir: Path, version: str, fit: dict[str, object]) -> RestorationCard:
    """A new card next to the source's weights (copied, same sha256) with ``sigma_adaptive``."""
    card = RestorationCard.read_from(source)
    coef = fit["coefficients"]
    assert isinstance(coef, dict)
    training = dict(card.training)
    training["sigma_adaptive_fit"] = {
        "fitted_on": (
            f"16 calibration-role simulated 512x512 reference slices (seed {card.training.get('seed')}) "
            "with the simulator's low-dose noise and 8 image-domain NPS textures "
            "(models.evaluation.foreign_noise.FIT_TEXTURES); the foreign test conditions were not used"
        ),
        "coverage_by_family": fit["coverage_by_family"],
        "coverage_by_family_before": fit["coverage_by_family_before"],
        "recalibrated_from_version": card.version,
    }
    new = replace(
        card,
        version=version,
        sigma_adaptive={k: float(v) for k, v in coef.items()},
        training=training,
        calibration=card.calibration
        + "; sigma follows the input: times sqrt(base^2 + (coarse * excess coarse noise / sigma)^2)",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / card.weights_file, out_dir / card.weights_file)
    new.write_to(out_dir)
    return new


def main() -> None:  # pragma: no cover - a one-off, run by hand (about 2 CPU-minutes)
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=Path("models/zoo/ldct-restoration/1.2"))
    parser.add_argument("--out", type=Path, required=True, help="directory for the candidate card")
    parser.add_argument("--version", default="1.3")
    args = parser.parse_args()
    fit = fit_on_simulation(RestorationModel(args.source))
    print(json.dumps(fit, indent=2))
    card = write_card(args.source, args.out, args.version, fit)
    print(json.dumps(asdict(card)["sigma_adaptive"]))


if __name__ == "__main__":  # pragma: no cover
    main()
