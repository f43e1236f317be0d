"""The classical sCT baselines recover known class HU on a constructed head and are deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation.sct_baselines import BulkDensity, NotFitted, PiecewiseIntensity
from models.sct import depth_mm, head_mask, normalise_mr
from models.training.sct import SctPair

SPACING = (2.5, 1.0, 1.0)
# Raw T1w signal and HU of each compartment of the constructed head. Normalised intensities
# (÷ the brain level, the 95th percentile in the head) are 1.0, 0.075 and 0.025.
BRAIN_MR, BRAIN_HU = 800.0, 30
SKULL_MR, SKULL_HU = 60.0, 1200
SINUS_MR, SINUS_HU = 20.0, -1000


def _constructed_head(shift: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Concentric head, 4 slices of 128²: scalp (r 46–50) and brain (r < 40) bright, skull (r 40–46)
    dark, an air sinus (r 8) very dark inside the brain; outside is air (0 signal, −1000 HU)."""
    yy, xx = np.mgrid[:128, :128]
    r = np.hypot(yy - 64 - shift, xx - 64)
    r_sinus = np.hypot(yy - 44 - shift, xx - 64)
    sinus = r_sinus < 8
    mr = np.zeros((128, 128), np.float32)
    ct = np.full((128, 128), -1000, np.int16)
    head, skull = r < 50, (r >= 40) & (r < 46)
    mr[head], ct[head] = BRAIN_MR, BRAIN_HU
    mr[skull], ct[skull] = SKULL_MR, SKULL_HU
    mr[sinus], ct[sinus] = SINUS_MR, SINUS_HU
    interiors = {
        "brain": (r < 36) & (r_sinus >= 12),
        "skull": (r >= 42) & (r < 44),
        "sinus": r_sinus < 5,
        "outside": r > 56,
    }
    return np.repeat(mr[None], 4, 0), np.repeat(ct[None], 4, 0), interiors


def _pair(raw: np.ndarray, ct: np.ndarray) -> SctPair:
    body = head_mask(raw)
    return SctPair(
        mr=normalise_mr(raw, body),
        ct=ct,
        body=body,
        labels=np.zeros(raw.shape, np.uint8),
        depth=depth_mm(body, SPACING),
        spacing=SPACING,
        raw_mr=raw,
    )


@pytest.fixture(scope="module")
def fitting_pairs() -> list[SctPair]:
    return [_pair(*_constructed_head(shift)[:2]) for shift in (0, 3)]


def test_constructed_head_normalises_to_the_designed_intensities(fitting_pairs: list[SctPair]) -> None:
    _, _, inside = _constructed_head()
    p = fitting_pairs[0]
    assert np.allclose(p.mr[0][inside["brain"]], 1.0)
    assert np.allclose(p.mr[0][inside["skull"]], SKULL_MR / BRAIN_MR)
    assert p.body[0][inside["sinus"]].all() and p.body[0][inside["skull"]].all()


def test_bulk_density_recovers_the_class_hu_exactly(fitting_pairs: list[SctPair]) -> None:
    baseline = BulkDensity().fit(fitting_pairs)
    params = baseline.parameters()
    assert params["soft_hu"] == BRAIN_HU
    assert params["bone_hu"] == SKULL_HU
    assert params["air_hu"] == SINUS_HU
    assert 0.025 < params["air_below"] <= 0.075 < params["bone_below"], params
    raw, _, inside = _constructed_head()
    hu = baseline.predict(raw, SPACING)
    assert hu.dtype == np.float32 and hu.shape == raw.shape
    for k in range(len(hu)):
        assert np.all(hu[k][inside["brain"]] == BRAIN_HU)
        assert np.all(hu[k][inside["skull"]] == SKULL_HU)
        assert np.all(hu[k][inside["sinus"]] == SINUS_HU)
        assert np.all(hu[k][inside["outside"]] == -1000.0)


def test_piecewise_map_hits_the_median_at_each_bin_centre(fitting_pairs: list[SctPair]) -> None:
    # Bin centres 0.025 (sinus), 0.075 (skull), 0.525 (edges only) and 1.0 (brain).
    baseline = PiecewiseIntensity(edges=(0.0, 0.05, 0.1, 0.95, 1.05)).fit(fitting_pairs)
    params = baseline.parameters()
    knots = dict(zip(params["knots_intensity"], params["knots_hu"], strict=True))
    assert knots[0.025] == SINUS_HU and knots[0.075] == SKULL_HU and knots[1.0] == BRAIN_HU
    # Linear between knots, flat beyond the end knots.
    assert baseline.map(np.array([0.05]))[0] == pytest.approx((SINUS_HU + SKULL_HU) / 2)
    assert baseline.map(np.array([0.0, 5.0])).tolist() == [SINUS_HU, BRAIN_HU]
    raw, _, inside = _constructed_head()
    hu = baseline.predict(raw, SPACING)
    # The map is continuous: the in-plane smoothing's tail (< 0.5 % of the contrast two pixels
    # from an edge) moves the thin skull and sinus by a few HU; deep brain is exact.
    assert np.all(hu[:, inside["brain"]] == BRAIN_HU)
    assert np.allclose(hu[:, inside["skull"]], SKULL_HU, atol=10.0)
    assert np.allclose(hu[:, inside["sinus"]], SINUS_HU, atol=10.0)
    assert np.all(hu[:, inside["outside"]] == -1000.0)


def test_fitting_is_deterministic(fitting_pairs: list[SctPair]) -> None:
    assert BulkDensity().fit(fitting_pairs).parameters() == BulkDensity().fit(fitting_pairs).parameters()
    a = PiecewiseIntensity().fit(fitting_pairs).parameters()
    assert a == PiecewiseIntensity().fit(fitting_pairs).parameters()


def test_unfitted_baselines_and_bad_input_say_what_to_do(fitting_pairs: list[SctPair]) -> None:
    raw, _, _ = _constructed_head()
    with pytest.raises(NotFitted, match="fit"):
        BulkDensity().predict(raw, SPACING)
    with pytest.raises(NotFitted, match="fit"):
        PiecewiseIntensity().predict(raw, SPACING)
    with pytest.raises(ValueError, match="raw_mr"):
        BulkDensity().fit(fitting_pairs).predict(raw[0], SPACING)
    with pytest.raises(ValueError, match="pairs"):
        BulkDensity().fit([])
    with pytest.raises(ValueError, match="edges"):
        PiecewiseIntensity(edges=(1.0, 0.5))
