"""The σ that follows the input's noise (card ``sigma_adaptive``): fast unit checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.evaluation.foreign_noise import FOREIGN_CONDITIONS, NoiseTexture, shaped_noise
from models.restoration import (
    ADAPTIVE_KEYS,
    RestorationCard,
    SliceFacts,
    adaptive_factor,
    coarse_noise,
    slice_facts,
)
from models.training.restoration_adaptive import (
    MAX_FACTOR,
    MIN_FACTOR,
    SliceRecord,
    coverage_at,
    error_correlation,
    fit_adaptive,
    lowest_slice_at,
)
from models.zoo import read_card, sha256_of, version_dir

COEF = {"sigma_weight": 0.7, "coarse_weight": 0.3, "min_factor": 0.8, "max_factor": 1.5}


def facts(coarse: float) -> SliceFacts:
    return SliceFacts(10.0, "other", coarse)


def test_factor_is_one_without_coefficients_or_measurement() -> None:
    assert adaptive_factor(facts(10.0), 8.0, {}) == 1.0
    assert adaptive_factor(facts(0.0), 8.0, COEF) == 1.0
    assert adaptive_factor(facts(10.0), 0.0, COEF) == 1.0


def test_factor_adds_the_measured_coarse_noise_in_quadrature() -> None:
    sigma = 20.0
    for coarse in (5.0, 15.0, 25.0):
        expected = np.sqrt(0.7 + 0.3 * (coarse / sigma) ** 2)
        assert adaptive_factor(facts(coarse), sigma, COEF) == pytest.approx(expected)
    # little coarse noise next to σ narrows, much widens, and the factor grows with it
    low, mid, high = (adaptive_factor(facts(c), sigma, COEF) for c in (4.0, 20.0, 30.0))
    assert low < 1.0 < high
    assert mid == pytest.approx(1.0)


def test_factor_is_bounded_both_ways() -> None:
    narrow = {**COEF, "sigma_weight": 0.1}
    assert adaptive_factor(facts(1.0), 20.0, narrow) == COEF["min_factor"]
    assert adaptive_factor(facts(200.0), 20.0, COEF) == COEF["max_factor"]
    widen_only = {**COEF, "min_factor": 1.0}
    assert adaptive_factor(facts(1.0), 20.0, widen_only) == 1.0


def test_coarse_noise_reads_the_binned_sigma_and_ignores_edges() -> None:
    rng = np.random.default_rng(0)
    shape = (256, 256)
    body = np.ones(shape, bool)
    white = shaped_noise(shape, NoiseTexture("w", 0.0, 0.0, 20.0), rng)
    # a 4x4 mean of white noise has a quarter of its spread
    assert coarse_noise(white, body) == pytest.approx(5.0, rel=0.1)
    # a sharp edge through the slice barely moves the median
    edged = white + np.where(np.arange(256)[None, :] < 128, 0.0, 1000.0).astype(np.float32)
    assert coarse_noise(edged, body) == pytest.approx(coarse_noise(white, body), rel=0.05)
    coarse = shaped_noise(shape, NoiseTexture("c", 1.0, 0.1, 20.0), rng)
    assert coarse_noise(coarse, body) > 1.5 * coarse_noise(white, body)  # same σ, coarser grain
    assert coarse_noise(white, np.zeros(shape, bool)) == 0.0


def test_slice_facts_measure_coarse_noise_in_the_body() -> None:
    rng = np.random.default_rng(3)
    plane = np.full((256, 256), -1000.0, np.float32)
    plane[32:224, 32:224] = 40.0
    plane += shaped_noise(plane.shape, NoiseTexture("c", 1.0, 0.1, 20.0), rng)
    f = slice_facts(plane)
    assert f.group == "other" and f.coarse_noise_hu > 0


def test_foreign_noise_has_the_stated_level() -> None:
    rng = np.random.default_rng(1)
    for texture in FOREIGN_CONDITIONS:
        noise = shaped_noise((128, 128), texture, rng)
        assert float(noise.std()) == pytest.approx(texture.sigma_hu, rel=1e-3)


def _family(
    rng: np.random.Generator, sigma: float, coarse: float, spread: float, n: int = 6
) -> list[SliceRecord]:
    """Slices whose error has ``spread`` times σ (Gaussian): needed scale ``spread``."""
    return [
        SliceRecord(facts(coarse), sigma, np.sort(np.abs(rng.normal(0, spread, 4000))).astype(np.float32))
        for _ in range(n)
    ]


def test_fit_recovers_the_variance_weights() -> None:
    rng = np.random.default_rng(2)
    a, b = 0.6, 0.4
    families = {
        f"c{c}": _family(rng, 20.0, c, float(np.sqrt(a + b * (c / 20.0) ** 2))) for c in (5.0, 15.0, 30.0)
    }
    coef = fit_adaptive(families)
    assert set(coef) == set(ADAPTIVE_KEYS)
    assert coef["sigma_weight"] == pytest.approx(a, abs=0.05)
    assert coef["coarse_weight"] == pytest.approx(b, abs=0.05)
    assert (coef["min_factor"], coef["max_factor"]) == (MIN_FACTOR, MAX_FACTOR)
    for recs in families.values():
        assert coverage_at(recs, coef) == pytest.approx(0.9, abs=0.015)
        assert lowest_slice_at(recs, coef) <= coverage_at(recs, coef)
    # without the factor the family with little coarse noise is over-covered
    assert coverage_at(families["c5.0"], {}) > 0.93


def test_score_correlation_follows_the_adapted_sigma() -> None:
    rec = SliceRecord(facts(4.0), 20.0, np.ones(10, np.float32), {3: 5.0, 5: 3.0, 7: 2.0, 9: 1.5}, 10.0)
    plain = error_correlation([rec], {})
    adapted = error_correlation([rec], COEF)
    factor = adaptive_factor(rec.facts, 20.0, COEF)
    assert plain["3"] == pytest.approx(0.5)
    assert adapted["3"] == pytest.approx(0.5 / factor, rel=1e-3)


def test_the_card_writes_sigma_adaptive_only_when_set(tmp_path: Path) -> None:
    card = RestorationCard.read_from(version_dir("ldct-restoration", "1.2"))
    assert card.sigma_adaptive == {}
    (tmp_path / "plain").mkdir()
    (tmp_path / "adaptive").mkdir()
    card.write_to(tmp_path / "plain")
    assert "sigma_adaptive" not in read_card(tmp_path / "plain")
    adaptive = replace(card, version="t", sigma_adaptive=dict(COEF))
    adaptive.write_to(tmp_path / "adaptive")
    assert RestorationCard.read_from(tmp_path / "adaptive") == adaptive
    assert read_card(tmp_path / "adaptive")["sigma_adaptive"] == COEF


def test_shipped_13_is_12s_weights_with_an_adaptive_sigma(tmp_path: Path) -> None:
    v12, v13 = version_dir("ldct-restoration", "1.2"), version_dir("ldct-restoration", "1.3")
    old, new = RestorationCard.read_from(v12), RestorationCard.read_from(v13)
    assert new.weights_sha256 == old.weights_sha256 == sha256_of(v13 / new.weights_file)
    assert set(new.sigma_adaptive) == set(ADAPTIVE_KEYS)
    assert new.sigma_adaptive["min_factor"] >= 0.8 and new.sigma_adaptive["max_factor"] <= 1.5
    # the image is 1.2's: same put-back and group scales
    for key in ("residual_lowpass_mm", "putback_noise_hu", "lowpass_noise_factor", "sigma_scale_by_group"):
        assert getattr(new, key) == getattr(old, key)
    # reads and writes back byte-identically
    new.write_to(tmp_path)
    assert (tmp_path / "card.json").read_bytes() == (v13 / "card.json").read_bytes()
    # a slice with as much coarse noise as σ keeps about its group scale; less narrows
    body = np.ones((8, 8), bool)
    sigma = np.full((8, 8), 20.0 / new.scale_for("other"), np.float32)
    same = new.scale_for_slice(SliceFacts(10.0, "other", 20.0), sigma, body) / new.scale_for("other")
    less = new.scale_for_slice(SliceFacts(10.0, "other", 5.0), sigma, body) / new.scale_for("other")
    assert same == pytest.approx(1.0, abs=0.02)
    assert 0.8 <= less < same
