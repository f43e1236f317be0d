"""The σ that follows the input's noise (card ``sigma_adaptive``): fast unit checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.evaluation.foreign_noise import FOREIGN_CONDITIONS, NoiseTexture, shaped_noise
from models.restoration import RestorationCard, SliceFacts, adaptive_factor, slice_facts
from models.training.restoration_adaptive import SliceRecord, coverage_at, fit_adaptive
from models.zoo import read_card, version_dir

COEF = {"base": 0.9, "coarse": 1.5, "coarse_offset": 1.7}


def test_factor_is_one_without_coefficients_or_measurement() -> None:
    assert adaptive_factor(SliceFacts(10.0, "other", 0.5), 8.0, {}) == 1.0
    assert adaptive_factor(SliceFacts(10.0, "other", 0.0), 8.0, COEF) == 1.0


def test_factor_is_base_up_to_the_offset_then_grows_with_coarse_noise() -> None:
    sigma = 10.0
    assert adaptive_factor(SliceFacts(10.0, "other", 1.0), sigma, COEF) == pytest.approx(0.9)
    low = adaptive_factor(SliceFacts(10.0, "other", 2.0), sigma, COEF)
    high = adaptive_factor(SliceFacts(10.0, "other", 3.0), sigma, COEF)
    assert low == pytest.approx(np.hypot(0.9, 1.5 * 0.3))
    assert 0.9 < low < high


def test_texture_tells_coarse_from_white_noise() -> None:
    rng = np.random.default_rng(0)
    body = np.zeros((256, 256), np.float32)
    white = body + shaped_noise(body.shape, NoiseTexture("w", 0.0, 0.0, 20.0), rng)
    coarse = body + shaped_noise(body.shape, NoiseTexture("c", 1.0, 0.1, 20.0), rng)
    tw, tc = slice_facts(white).texture, slice_facts(coarse).texture
    assert tw == pytest.approx(0.25, abs=0.05)  # white: a 4x4 mean has a quarter of the spread
    assert tc > 2 * tw


def test_foreign_noise_has_the_stated_level() -> None:
    rng = np.random.default_rng(1)
    for texture in FOREIGN_CONDITIONS:
        noise = shaped_noise((128, 128), texture, rng)
        assert float(noise.std()) == pytest.approx(texture.sigma_hu, rel=1e-3)


def test_fit_widens_sigma_where_coarse_noise_is_unaccounted_for() -> None:
    rng = np.random.default_rng(2)

    def family(texture: float, spread: float) -> list[SliceRecord]:
        facts = SliceFacts(10.0, "other", texture)
        # |error| / σ of a Gaussian error whose true spread is `spread` times σ
        return [SliceRecord(facts, 10.0, np.sort(np.abs(rng.normal(0, spread, 4000))).astype(np.float32))]

    families = {"fine": family(1.0, 1.0), "coarse": family(3.0, 1.6)}
    coef = fit_adaptive(families, offset=1.0)
    assert coef["coarse"] > 0
    for recs in families.values():
        assert coverage_at(recs, coef) == pytest.approx(0.9, abs=0.02)


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
