"""Per-case coverage of the sCT interval and the MR's own figures (SIMULATED data)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation.sct_case_coverage import (
    CaseCoverage,
    case_coverage,
    floor_tradeoff,
    mr_case_features,
    pooled_coverage,
)
from models.sct import SctModel, head_mask


def _head(noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright ellipse with a dark ring (skull) in Rician noise of ``noise`` × the bright level."""
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot((yy - 48) / 36, (xx - 48) / 30)
    clean = np.where(r < 1.0, 1000.0, 0.0) * np.where((r > 0.8) & (r < 0.9), 0.05, 1.0)
    clean = np.broadcast_to(clean, (4, 96, 96))
    sigma = noise * 1000.0
    re, im = clean + rng.normal(0, sigma, clean.shape), rng.normal(0, sigma, clean.shape)
    mr = np.hypot(re, im).astype(np.float32)
    return mr, head_mask(mr)


def test_the_mr_features_read_the_noise_and_the_dark_share() -> None:
    rng = np.random.default_rng(0)
    low, body_low = _head(0.02, rng)
    high, body_high = _head(0.06, rng)
    f_low = mr_case_features(low, body_low, (2.5, 1.0, 1.0))
    f_high = mr_case_features(high, body_high, (2.5, 1.0, 1.0))
    assert f_low["noise_rel"] == pytest.approx(0.02, rel=0.25)
    assert f_high["noise_rel"] == pytest.approx(0.06, rel=0.25)
    assert 0.1 < f_low["dark_fraction"] < 0.3  # the ring
    assert f_low["head_ml"] == pytest.approx(body_low.sum() * 2.5e-3)


def test_pooled_coverage_weights_cases_by_head_volume() -> None:
    def case(cov: float, ml: float) -> CaseCoverage:
        return CaseCoverage(1, 0.5, cov, 100.0, 0.02, 0.2, 0.1, ml, 5.0)

    assert pooled_coverage([case(0.9, 100.0), case(0.6, 300.0)]) == pytest.approx(0.675)


def test_one_case_of_a_fresh_seed_is_measured() -> None:
    (row,) = case_coverage(SctModel.shipped("sct-head"), 4141, 1, slices=3, size=128, workers=1)
    assert 0.5 < row.coverage <= 1.0 and row.width_hu > 0 and row.confident_sigma_hu > 0
    assert all(math.isfinite(v) for v in (row.noise_rel, row.bright_cv, row.dark_fraction, row.head_ml))


def test_a_floor_lifts_the_worst_case_at_the_cost_of_the_high_sigma_voxels() -> None:
    rng = np.random.default_rng(3)
    errors, sigmas = [], []
    for spread in (3.0, 3.0, 3.0, 8.0):  # one case whose confident voxels err more than σ says
        s = np.r_[np.full(3000, 5.0), np.full(1000, 200.0)]
        e = np.abs(np.r_[rng.normal(0, spread, 3000), rng.normal(0, 200.0, 1000)])
        errors.append(e)
        sigmas.append(s)
    plain, floored = floor_tradeoff(errors, sigmas, [0.0, 12.0])
    assert plain["pooled"] == pytest.approx(0.9, abs=0.002)
    assert floored["pooled"] == pytest.approx(0.9, abs=0.002)
    assert floored["lowest_case"] > plain["lowest_case"] + 0.1
    assert floored["high_sigma"] < plain["high_sigma"] - 0.05
    assert floored["pooled_kept"] > 0.93 and floored["lowest_case_kept"] >= floored["lowest_case"]
