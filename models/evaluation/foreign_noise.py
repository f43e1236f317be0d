"""Coverage of the restoration σ on noise the simulator never produced (SIMULATED data).

The simulator's low-dose noise is projection-domain Poisson + electronic noise through a
Shepp-Logan filtered back-projection: one texture, whose level follows the dose. A
scanner with another reconstruction kernel, or iterative reconstruction, or another
dose/size relation, gives noise of another texture at the same level. Here the noise is
synthesised in the image domain instead, on the simulator's full-dose reference slices:
white noise shaped by a radial noise power spectrum (NPS, frequency ``f`` in cycles per
pixel, Nyquist 0.5), scaled to a stated standard deviation in HU. The reference stays the
truth, so coverage is measured exactly as on the simulator's test set.

Test conditions (:data:`FOREIGN_CONDITIONS`) — never used to fit anything:

* ``white``: flat NPS, 20 HU (uncorrelated noise, e.g. a sharp kernel with heavy
  detector noise or a noise-injection tool);
* ``sharp kernel``: NPS ∝ f² up to Nyquist, 30 HU (an edge-enhancing bone/lung kernel:
  noise piled at the highest frequencies);
* ``soft kernel``: NPS ∝ f·exp(−(f/0.1)²), 12 HU (a smooth kernel or iterative
  reconstruction: coarse, blotchy noise);
* ``centre-heavy``: NPS ∝ f·exp(−(f/0.3)²), 25 HU at the body's centre falling to 0.4
  of that at its edge (another dose/size relation: a large patient without modulation).

The fitting family (:data:`FIT_TEXTURES`) uses other NPS shapes and levels, so the
adaptive σ is fitted on one family and tested on another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.evaluation import calibration as cal


@dataclass(frozen=True)
class NoiseTexture:
    """Radial NPS ``f^power · exp(−(f/cutoff)²)`` (cutoff 0: no roll-off), ``sigma_hu`` std."""

    name: str
    power: float
    cutoff: float
    sigma_hu: float
    #: Amplitude at the body's edge relative to its centre (1: stationary).
    edge_ratio: float = 1.0


FOREIGN_CONDITIONS: tuple[NoiseTexture, ...] = (
    NoiseTexture("white", 0.0, 0.0, 20.0),
    NoiseTexture("sharp kernel", 2.0, 0.0, 30.0),
    NoiseTexture("soft kernel", 1.0, 0.1, 12.0),
    NoiseTexture("centre-heavy", 1.0, 0.3, 25.0, edge_ratio=0.4),
)

#: The family the adaptive scale is fitted on (shapes and levels unlike the test ones).
FIT_TEXTURES: tuple[NoiseTexture, ...] = (
    NoiseTexture("fit f^0.5 c0.35 15", 0.5, 0.35, 15.0),
    NoiseTexture("fit f^0.5 c0.35 35", 0.5, 0.35, 35.0),
    NoiseTexture("fit f^1 c0.15 8", 1.0, 0.15, 8.0),
    NoiseTexture("fit f^1 c0.15 20", 1.0, 0.15, 20.0),
    NoiseTexture("fit f^1.5 c0.6 12", 1.5, 0.6, 12.0),
    NoiseTexture("fit f^1.5 c0.6 40", 1.5, 0.6, 40.0),
    NoiseTexture("fit f^0 c0.25 10", 0.0, 0.25, 10.0),
    NoiseTexture("fit f^0 c0.25 25", 0.0, 0.25, 25.0),
)


def shaped_noise(shape: tuple[int, int], texture: NoiseTexture, rng: np.random.Generator) -> np.ndarray:
    """Stationary noise with the texture's NPS and standard deviation (HU)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.hypot(fy, fx)
    nps = np.where(f > 0, f, 0.0) ** texture.power if texture.power > 0 else np.ones_like(f)
    if texture.cutoff > 0:
        nps = nps * np.exp(-((f / texture.cutoff) ** 2))
    white = np.fft.rfft2(rng.standard_normal(shape))
    noise = np.fft.irfft2(white * np.sqrt(nps), s=shape)
    return (noise / max(float(noise.std()), 1e-12) * texture.sigma_hu).astype(np.float32)


def add_noise(
    reference: np.ndarray, body: np.ndarray, texture: NoiseTexture, rng: np.random.Generator
) -> np.ndarray:
    """``reference`` + the texture's noise (non-stationary inside the body when asked)."""
    noise = shaped_noise(reference.shape, texture, rng)
    if texture.edge_ratio != 1.0 and body.any():
        depth = ndimage.distance_transform_edt(body)
        rel = depth / max(float(depth.max()), 1.0)
        noise = noise * (texture.edge_ratio + (1.0 - texture.edge_ratio) * rel).astype(np.float32)
    return (reference + noise).astype(np.float32)


def coverage(
    model: object,
    low: np.ndarray,
    reference: np.ndarray,
    body: np.ndarray,
    pixel_mm: Sequence[float],
) -> dict[str, float]:
    """90 % coverage (body pixels, pooled), lowest slice coverage and mean width of the
    shipped model's ``mean ± 1.645 σ`` on a stack of slices."""
    prediction = model.predict(low, (1.0, 1.0, 1.0), pixel_mm=list(pixel_mm))  # type: ignore[attr-defined]
    cov = cal.interval_coverage(prediction.mean, prediction.sigma, reference, body)
    return {
        "coverage": float(cov["coverage"]),
        "min_slice": float(np.nanmin(cov["per_slice_coverage"])),
        "width_hu": float(cov["mean_width_hu"]),
    }


def evaluate(
    model: object, n_cases: int = 16, seed: int = 7, size: int = 512, workers: int = 2
) -> dict[str, dict[str, float]]:
    """Coverage on the simulator's test set (doses 0.25 and 0.1, as the restoration
    evaluation draws it) and on each foreign condition added to the same test slices'
    full-dose references."""
    from models.evaluation.restoration_eval import simulate_cases
    from models.training.restoration import case_plan

    table: dict[str, dict[str, float]] = {}
    reference: np.ndarray | None = None
    for dose in (0.25, 0.1):
        cases = simulate_cases(case_plan("test", n_cases, seed, dose=dose, size=size), workers)
        low = np.stack([c.low_dose_hu for c in cases]).astype(np.float32)
        ref = np.stack([c.reference_hu for c in cases]).astype(np.float32)
        body = np.stack([c.body_mask for c in cases])
        px = [c.pixel_mm for c in cases]
        table[f"simulator test set, dose {dose:g}"] = coverage(model, low, ref, body, px)
        if reference is None:
            reference, ref_body, ref_px = ref, body, px
    assert reference is not None
    for i, texture in enumerate(FOREIGN_CONDITIONS):
        rng = np.random.default_rng([777, i])
        noisy = np.stack([add_noise(r, b, texture, rng) for r, b in zip(reference, ref_body, strict=True)])
        table[f"foreign: {texture.name}"] = coverage(model, noisy, reference, ref_body, ref_px)
    return table


def main() -> None:  # pragma: no cover - run by hand (about 2 CPU-minutes)
    import argparse
    import json
    from pathlib import Path

    from models.restoration import RestorationModel

    parser = argparse.ArgumentParser(description="90 % coverage on foreign noise (SIMULATED data)")
    parser.add_argument("--version", action="append", help="model versions (default: the newest)")
    parser.add_argument("--model-dir", action="append", type=Path, help="a model directory (repeatable)")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the table(s) here")
    parser.add_argument(
        "--precision", default="float32", choices=("float32", "bfloat16"), help="what the networks compute in"
    )
    args = parser.parse_args()
    models = {v or "newest": RestorationModel.shipped(version=v) for v in args.version or []}
    models.update({str(d): RestorationModel(d) for d in args.model_dir or []})
    if not models:
        models = {"newest": RestorationModel.shipped()}
    for model in models.values():
        model.precision = args.precision  # evaluating a precision is how a card comes to list it
    tables = {name: evaluate(model, args.cases) for name, model in models.items()}
    if args.json:
        args.json.write_text(json.dumps(tables, indent=1) + "\n")
    print("condition".ljust(40) + "".join(f"{v:>22}" for v in tables))
    for row in next(iter(tables.values())):
        cells = "".join(
            f"{t[row]['coverage']:>10.3f} (min {t[row]['min_slice']:.3f})" for t in tables.values()
        )
        print(row.ljust(40) + cells)


if __name__ == "__main__":  # pragma: no cover
    main()
