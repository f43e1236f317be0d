"""Fitting the restoration σ that follows the input's noise (card ``sigma_adaptive``).

The network's σ was learnt on one noise texture, the simulator's filtered back-projection.
At the same fine-grained noise level (what Immerkær's estimator and the network see), other
textures carry other amounts of true noise: white noise less and much of it removable,
coarse noise (a smooth kernel, iterative reconstruction) more, and it passes through the
network and the put-back. The adaptive factor (:func:`models.restoration.adaptive_factor`)
makes the calibrated variance ``sigma_weight · σ² + coarse_weight · c²``, with ``c`` the
coarse noise measured in the input (the σ of the 4×4-binned slice, robust to edges).

The two weights are fitted by non-negative least squares of each calibration slice's
needed variance (the square of the scale that makes its own 90 % interval cover) on the
simulator's calibration-role slices and on noise of :data:`FIT_TEXTURES` added to their
references — never on the foreign test conditions. The form was chosen by
leave-one-family-out coverage on that fit family alone. Everything here is SIMULATED.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from models.evaluation.foreign_noise import FIT_TEXTURES, add_noise
from models.restoration import BODY_HU, Z90, RestorationCard, RestorationModel, SliceFacts

#: Bounds of the adaptive factor (fixed, not fitted): σ is never narrowed below 0.8 or
#: widened beyond 1.5 times the group-scaled σ, whatever the input's noise.
MIN_FACTOR = 0.8
MAX_FACTOR = 1.5
#: Window sizes of the hallucination score (its ``model_error_correlation``).
WINDOWS = (3, 5, 7, 9)


@dataclass(frozen=True)
class SliceRecord:
    """One calibration slice: its facts, median group-scaled σ and sorted ``|error| / σ``."""

    facts: SliceFacts
    sigma_median_hu: float
    ratios: np.ndarray  # sorted, body pixels
    #: Spread of a w×w window mean of the error in the inner body, per window (for the
    #: hallucination score's ``model_error_correlation``); empty when not measured.
    error_window_sd: dict[int, float] = field(default_factory=dict)
    #: Mean group-scaled σ in the inner body.
    sigma_inner_mean_hu: float = 0.0

    def needed_scale(self) -> float:
        """The factor on σ at which this slice's own 90 % interval covers 90 %."""
        return float(np.quantile(self.ratios, 0.9)) / Z90 if len(self.ratios) else 1.0


def coverage_at(records: Sequence[SliceRecord], coefficients: dict[str, float]) -> float:
    """Pooled 90 % coverage of the records under the adaptive factor."""
    from models.restoration import adaptive_factor

    inside = total = 0
    for r in records:
        limit = Z90 * adaptive_factor(r.facts, r.sigma_median_hu, coefficients)
        inside += int(np.searchsorted(r.ratios, limit, side="right"))
        total += len(r.ratios)
    return inside / max(total, 1)


def lowest_slice_at(records: Sequence[SliceRecord], coefficients: dict[str, float]) -> float:
    """The lowest per-slice 90 % coverage of the records under the adaptive factor."""
    from models.restoration import adaptive_factor

    return min(
        int(
            np.searchsorted(
                r.ratios, Z90 * adaptive_factor(r.facts, r.sigma_median_hu, coefficients), "right"
            )
        )
        / max(len(r.ratios), 1)
        for r in records
    )


def fit_adaptive(
    families: Mapping[str, Sequence[SliceRecord]],
    min_factor: float = MIN_FACTOR,
    max_factor: float = MAX_FACTOR,
) -> dict[str, float]:
    """``sigma_weight`` and ``coarse_weight`` by non-negative least squares of every slice's
    needed variance, ``(needed scale · s)² ≈ sigma_weight · s² + coarse_weight · c²`` (``s``
    its median σ, ``c`` its coarse noise), over all slices of all families."""
    from scipy.optimize import nnls

    rows = [r for rs in families.values() for r in rs if r.facts.coarse_noise_hu > 0]
    design = np.array([[r.sigma_median_hu**2, r.facts.coarse_noise_hu**2] for r in rows])
    target = np.array([(r.needed_scale() * r.sigma_median_hu) ** 2 for r in rows])
    (sigma_weight, coarse_weight), _ = nnls(design, target)
    return {
        "sigma_weight": round(float(sigma_weight), 4),
        "coarse_weight": round(float(coarse_weight), 4),
        "min_factor": min_factor,
        "max_factor": max_factor,
    }


def leave_one_family_out(families: Mapping[str, Sequence[SliceRecord]]) -> dict[str, float]:
    """Each family's coverage under coefficients fitted on the other families."""
    return {
        name: round(coverage_at(held, fit_adaptive({k: v for k, v in families.items() if k != name})), 4)
        for name, held in families.items()
    }


def error_correlation(records: Sequence[SliceRecord], coefficients: dict[str, float]) -> dict[str, float]:
    """The hallucination score's ``model_error_correlation`` against the adapted σ: the
    spread of a w×w window mean of the error over the mean adapted σ (inner body), as
    :func:`models.training.restoration.calibrate` measures it against the group-scaled σ."""
    from models.restoration import adaptive_factor

    sigma_means = [
        r.sigma_inner_mean_hu * adaptive_factor(r.facts, r.sigma_median_hu, coefficients) for r in records
    ]
    return {
        str(w): round(float(np.mean([r.error_window_sd[w] for r in records]) / np.mean(sigma_means)), 4)
        for w in WINDOWS
    }


def records(
    model: RestorationModel,
    low: np.ndarray,
    reference: np.ndarray,
    body: np.ndarray,
    pixel_mm: Sequence[float],
    *,
    window_stats: bool = False,
) -> list[SliceRecord]:
    """Per-slice records under the model's group scales alone (no adaptive factor)."""
    from scipy import ndimage

    card = model.meta
    model.meta = replace(card, sigma_adaptive={})
    try:
        p = model.predict(low, (1.0, 1.0, 1.0), pixel_mm=list(pixel_mm))
    finally:
        model.meta = card
    out = []
    for k, facts in enumerate(model.last_facts):
        in_body = low[k] > BODY_HU
        error = reference[k] - p.mean[k]
        ratios = np.sort((np.abs(error) / np.maximum(p.sigma[k], 1e-3))[body[k]]).astype(np.float32)
        windows: dict[int, float] = {}
        inner_mean = 0.0
        if window_stats:
            inner = ndimage.binary_erosion(body[k], iterations=12)
            if inner.sum() < 1000:
                inner = body[k]
            windows = {w: float(np.std(ndimage.uniform_filter(error, size=w)[inner])) for w in WINDOWS}
            inner_mean = float(np.mean(p.sigma[k][inner]))
        out.append(SliceRecord(facts, float(np.median(p.sigma[k][in_body])), ratios, windows, inner_mean))
    return out


def fit_on_simulation(
    model: RestorationModel, n_slices: int = 64, n_textured: int = 16, seed: int = 20261126
) -> dict[str, object]:
    """Simulate calibration-role slices, add the fitting textures to the first
    ``n_textured`` references, fit the coefficients; returns the fit and its figures."""
    from models.evaluation.restoration_eval import simulate_cases
    from models.training.restoration import case_plan

    cases = simulate_cases(case_plan("calib", n_slices, seed, size=512), 2)
    ref = np.stack([c.reference_hu for c in cases]).astype(np.float32)
    body = np.stack([c.body_mask for c in cases])
    px = [c.pixel_mm for c in cases]
    low = np.stack([c.low_dose_hu for c in cases]).astype(np.float32)
    families = {"simulator": records(model, low, ref, body, px, window_stats=True)}
    del low
    ref, body, px = ref[:n_textured], body[:n_textured], px[:n_textured]
    for i, texture in enumerate(FIT_TEXTURES):
        rng = np.random.default_rng([555, i])
        noisy = np.stack([add_noise(r, b, texture, rng) for r, b in zip(ref, body, strict=True)])
        families[texture.name] = records(model, noisy, ref, body, px)
    coef = fit_adaptive(families)
    return {
        "coefficients": coef,
        "model_error_correlation": error_correlation(families["simulator"], coef),
        "model_error_correlation_group_scaled": error_correlation(families["simulator"], {}),
        "coverage_by_family": {k: round(coverage_at(v, coef), 4) for k, v in families.items()},
        "lowest_slice_by_family": {k: round(lowest_slice_at(v, coef), 4) for k, v in families.items()},
        "coverage_by_family_before": {k: round(coverage_at(v, {}), 4) for k, v in families.items()},
        "lowest_slice_by_family_before": {k: round(lowest_slice_at(v, {}), 4) for k, v in families.items()},
        "coverage_leave_one_family_out": leave_one_family_out(families),
        "slices": {"simulator": n_slices, "each texture": n_textured},
    }


def write_card(
    source: Path, out_dir: Path, version: str, fit: dict[str, object], *, recalibrate_score: bool = True
) -> RestorationCard:
    """A new card next to the source's weights (copied, same sha256) with ``sigma_adaptive``
    (and, with ``recalibrate_score``, the hallucination score's ``model_error_correlation``
    measured against the adapted σ)."""
    card = RestorationCard.read_from(source)
    coef = fit["coefficients"]
    assert isinstance(coef, dict)
    training = dict(card.training)
    slices = fit.get("slices", {})
    training["sigma_adaptive_fit"] = {
        "fitted_on": (
            f"calibration-role simulated 512x512 slices (seed {card.training.get('seed')}): {slices} — "
            "the simulator's low-dose noise, and 8 image-domain NPS textures "
            "(models.evaluation.foreign_noise.FIT_TEXTURES) added to the references; "
            "the foreign test conditions were not used"
        ),
        "method": (
            "non-negative least squares of each slice's needed variance on sigma^2 and the coarse noise^2; "
            "factor bounds fixed"
        ),
        "coverage_by_family": fit["coverage_by_family"],
        "coverage_by_family_before": fit["coverage_by_family_before"],
        "lowest_slice_by_family": fit.get("lowest_slice_by_family"),
        "coverage_leave_one_family_out": fit.get("coverage_leave_one_family_out"),
        "recalibrated_from_version": card.version,
    }
    changes: dict[str, object] = {}
    if recalibrate_score:
        correlation = fit["model_error_correlation"]
        assert isinstance(correlation, dict)
        training["sigma_adaptive_fit"]["model_error_correlation_before"] = dict(card.model_error_correlation)
        changes["model_error_correlation"] = dict(correlation)
    new = replace(
        card,
        version=version,
        sigma_adaptive={k: float(v) for k, v in coef.items()},
        training=training,
        calibration=card.calibration
        + "; sigma follows the input: variance sigma_weight * sigma^2 + coarse_weight * (coarse noise)^2,"
        " factor bounded to [min_factor, max_factor]",
        **changes,  # type: ignore[arg-type]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if (source / card.weights_file).resolve() != (out_dir / card.weights_file).resolve():
        shutil.copyfile(source / card.weights_file, out_dir / card.weights_file)
    new.write_to(out_dir)
    return new


def main() -> None:  # pragma: no cover - a one-off, run by hand (about 3 CPU-minutes)
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=Path("models/zoo/ldct-restoration/1.2"))
    parser.add_argument("--out", type=Path, required=True, help="directory for the new card")
    parser.add_argument("--version", default="1.3")
    parser.add_argument(
        "--keep-score-correlation",
        action="store_true",
        help="keep the source's model_error_correlation (measured against the group-scaled sigma)",
    )
    parser.add_argument("--fit-json", type=Path, help="also write the fit's figures here")
    args = parser.parse_args()
    fit = fit_on_simulation(RestorationModel(args.source))
    print(json.dumps(fit, indent=2))
    if args.fit_json:
        args.fit_json.write_text(json.dumps(fit, indent=1) + "\n")
    card = write_card(
        args.source, args.out, args.version, fit, recalibrate_score=not args.keep_score_correlation
    )
    print(json.dumps(asdict(card)["sigma_adaptive"]))


if __name__ == "__main__":  # pragma: no cover
    main()
