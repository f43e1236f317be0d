"""Prognosis baselines and figures (issue 17 items 3 and 5): no change, linear volume
extrapolation with a uniform front, and the Dice / HD95 / volume / ECE / coverage figures
the evaluation reports, checked on shapes whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation import prognosis_baselines as b
from models.evaluation import prognosis_metrics as m

SPACING = (2.0, 1.0, 1.0)  # (slice, row, column) mm
SHAPE = (40, 80, 80)


def sphere(radius_mm: float, centre: tuple[float, float, float] = (40.0, 40.0, 40.0)) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(SHAPE, SPACING, strict=True)), indexing="ij")
    return np.asarray((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius_mm**2)


def radius_for(volume_ml: float) -> float:
    return float((3 * volume_ml * 1000 / (4 * math.pi)) ** (1 / 3))


BRAIN = np.ones(SHAPE, bool)


def test_no_change_is_the_current_extent() -> None:
    visits = [b.Visit(0, sphere(6)), b.Visit(90, sphere(9))]
    forecast = b.no_change(visits, 180, SPACING)
    assert np.array_equal(forecast.probability > 0.5, sphere(9))
    assert forecast.volume_ml == pytest.approx(m.volume_ml(sphere(9), SPACING))


def test_linear_volume_extrapolates_a_linear_growth_with_a_uniform_front() -> None:
    # volumes 1, 2, 3 ml at days 0, 100, 200 → 4 ml at day 300, same centre
    visits = [b.Visit(d, sphere(radius_for(v))) for d, v in ((0, 1.0), (100, 2.0), (200, 3.0))]
    forecast = b.linear_volume(visits, 300, BRAIN, SPACING)
    assert forecast.volume_ml == pytest.approx(4.0, rel=0.03)
    truth = sphere(radius_for(4.0))
    assert m.dice(forecast.probability > 0.5, truth) > 0.95
    # a shrinking tumour shrinks, never below nothing
    shrinking = [b.Visit(0, sphere(radius_for(3.0))), b.Visit(100, sphere(radius_for(1.0)))]
    assert b.linear_volume(shrinking, 300, BRAIN, SPACING).volume_ml == 0.0


def test_the_front_stays_in_the_brain() -> None:
    brain = np.zeros(SHAPE, bool)
    brain[:, :, :42] = True  # a wall through the tumour's centre
    extent = sphere(6) & brain
    grown = b.front_to_volume(extent, 2 * m.volume_ml(extent, SPACING), brain, SPACING)
    assert not (grown & ~brain).any()
    assert m.volume_ml(grown, SPACING) == pytest.approx(2 * m.volume_ml(extent, SPACING), rel=0.03)
    assert (grown & extent).sum() == extent.sum()


def test_visits_out_of_order_or_a_past_follow_up_are_refused() -> None:
    with pytest.raises(ValueError, match="time order"):
        b.no_change([b.Visit(90, sphere(5)), b.Visit(0, sphere(5))], 200, SPACING)
    with pytest.raises(ValueError, match="not after the current visit"):
        b.no_change([b.Visit(0, sphere(5))], 0, SPACING)


def test_dice_and_hausdorff95_on_concentric_spheres() -> None:
    inner, outer = sphere(8), sphere(10)
    expected = 2 * inner.sum() / (inner.sum() + outer.sum())
    assert m.dice(inner, outer) == pytest.approx(expected, rel=1e-6)
    assert m.dice(inner, inner) == 1.0
    assert m.dice(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)) == 1.0
    hd = m.hausdorff95_mm(inner, outer, SPACING)
    assert 1.0 <= hd <= 3.0  # the surfaces are 2 mm apart, on a 1-2 mm grid
    assert m.hausdorff95_mm(inner, np.zeros(SHAPE, bool), SPACING) == math.inf


def test_ece_tells_calibrated_from_overconfident_probabilities() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, (60, 60, 60)).astype(np.float32)
    truth = rng.uniform(0, 1, p.shape) < p  # calibrated by construction
    mask = np.ones(p.shape, bool)
    calibrated = m.reliability([p], [truth], [mask])
    assert calibrated.ece < 0.01
    overconfident = m.reliability([(p > 0.5).astype(np.float32)], [truth], [mask])
    assert overconfident.ece > 0.2
    assert sum(calibrated.counts) == int(((p > 1e-3) | truth).sum())


def test_interval_coverage_and_growth_calls() -> None:
    assert m.interval_coverage([(1, 2), (1, 2), (3, 4), (0, 1)], [1.5, 2.0, 5.0, 0.5]) == 0.75
    assert m.growth_call(10, 12) == "growth"
    assert m.growth_call(10, 10.5) == "stable"
    assert m.growth_call(10, 5) == "shrinkage"
    assert m.growth_call(0, 0) == "stable"
