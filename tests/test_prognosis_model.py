"""The prognosis model (issue 17 item 2): density rebuilt from visible extents, the growth-fit
ensemble recovering a known growth, its calibration, and the evaluation harness — on a small
homogeneous white-matter box (no atlas), so the answers are known and the tests fast."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models import prognosis as pg
from models.evaluation import prognosis_eval as pe
from models.evaluation.prognosis_metrics import dice
from models.growth import grow, tissue_diffusivity

SPACING = (2.0, 2.0, 2.0)
SHAPE = (30, 30, 30)


def box_anatomy() -> pg.Anatomy:
    white = np.zeros(SHAPE, np.float32)
    white[2:-2, 2:-2, 2:-2] = 1.0  # a white-matter box inside a barrier shell
    return pg.Anatomy(white, np.zeros(SHAPE, np.float32), SPACING)


def truth_history(speed: float, width: float, days: list[float]) -> list[pg.Observation]:
    """Visible extents of a tumour grown by the model itself with known speed and width."""
    anatomy = box_anatomy()
    d_white, rho = speed * width / 2.0, speed / (2.0 * width)
    diffusivity, barrier = tissue_diffusivity(anatomy.white, anatomy.grey, d_white, d_white / pg.GREY_RATIO)
    z, y, x = np.meshgrid(*(np.arange(n) * 2.0 - 29.0 for n in SHAPE), indexing="ij")
    r = np.sqrt(z**2 + y**2 + x**2)
    c = (1.0 / (1.0 + np.exp((r - 8.0) / width))).astype(np.float32)
    c[barrier] = 0
    out, now = [], 0.0
    for day in days:
        c = grow(c, diffusivity, rho, day - now, SPACING, barrier_mask=barrier)
        now = day
        out.append(pg.Observation(day, c >= pg.CORE_THRESHOLD, c >= pg.WHOLE_THRESHOLD))
    return out


@pytest.fixture(scope="module")
def grown() -> list[pg.Observation]:
    return truth_history(0.1, 2.0, [0.0, 40.0, 80.0, 130.0])


def test_the_rebuilt_density_has_the_extents_as_its_contours(grown: list[pg.Observation]) -> None:
    visit = grown[1]
    c = pg.density_from_extents(visit.core, visit.whole, SPACING, 2.0)
    assert dice(c >= pg.CORE_THRESHOLD, visit.core) > 0.9
    assert dice(c >= pg.WHOLE_THRESHOLD, visit.whole) > 0.95
    assert float(c.max()) <= 1.0 and float(c.min()) >= 0.0
    # no T1c-visible part: nothing is made T1c-visible
    c = pg.density_from_extents(np.zeros(SHAPE, bool), visit.whole, SPACING, 2.0)
    assert not (c >= pg.CORE_THRESHOLD).any() and dice(c >= pg.WHOLE_THRESHOLD, visit.whole) > 0.95


def test_the_ensemble_recovers_a_known_growth_and_forecasts_it(grown: list[pg.Observation]) -> None:
    calibration = pg.Calibration(prior_weight=0.0, temperature=0.02)
    result = pg.forecast(grown[:3], box_anatomy(), grown[3].day, calibration)
    best = result.best
    # the true speed is 0.1 mm/day: the best member is the grid's nearest (0.1), or a neighbour
    assert 0.06 <= best.speed <= 0.16, best
    truth = grown[3].whole
    assert dice(result.probability >= 0.5, truth) > 0.9
    assert dice(result.probability >= 0.5, truth) > dice(grown[2].whole, truth)  # beats no change
    lo, hi = result.interval_ml
    assert lo <= result.volume_ml <= hi
    assert math.isclose(float(result.weights.sum()), 1.0, rel_tol=1e-6)
    assert 0.0 <= float(result.probability.min()) and float(result.probability.max()) <= 1.0


def test_a_cold_ensemble_is_its_best_member(grown: list[pg.Observation]) -> None:
    members = pg.run_members(grown[:3], box_anatomy(), grown[3].day, pg.Calibration(prior_weight=0.0))
    cold = pg.combine(members, pg.Calibration(prior_weight=0.0, temperature=1e-6), grown[3].day, SPACING)
    best = min(members, key=lambda m: m.misfit)
    assert np.array_equal(cold.probability >= 0.5, best.whole)
    # a prior far from the truth moves the weight away from the best fit
    far = pg.Calibration(prior_mean=(math.log(0.01), math.log(0.7)), prior_weight=5.0, temperature=0.02)
    assert pg.combine(members, far, grown[3].day, SPACING).best.speed < best.speed


def test_inputs_the_fit_cannot_use_are_refused(grown: list[pg.Observation]) -> None:
    with pytest.raises(ValueError, match="at least two visits"):
        pg.forecast(grown[:1], box_anatomy(), 200.0, pg.Calibration())
    with pytest.raises(ValueError, match="time order"):
        pg.forecast([grown[1], grown[0]], box_anatomy(), 200.0, pg.Calibration())
    with pytest.raises(ValueError, match="not after the current visit"):
        pg.forecast(grown[:2], box_anatomy(), 40.0, pg.Calibration())


def test_the_calibration_round_trips(tmp_path: Path) -> None:
    calibration = pg.Calibration(prior_mean=(-2.5, 0.4), prior_weight=0.1, interval_factor=1.7, n_training=60)
    calibration.save(tmp_path / "calibration.json")
    assert pg.Calibration.load(tmp_path / "calibration.json") == calibration


def test_the_vote_scaling_is_monotone_keeps_zero_and_is_identity_by_default() -> None:
    vote = np.array([0.0, 0.1, 0.42, 0.5, 0.9, 1.0], np.float32)
    assert np.array_equal(pg.Calibration().probability(vote), vote)
    scaled = pg.Calibration(vote_scale=0.8, vote_shift=0.3).probability(vote)
    assert scaled[0] == 0.0 and np.all(np.diff(scaled) > 0) and scaled[-1] < 1.0
    # a positive shift lowers the vote the extent needs: 0.42 is in, as σ(0.8·logit(0.42)+0.3) > 0.5
    assert scaled[2] >= pg.EXTENT_PROBABILITY > vote[2]


def test_the_vote_scaling_learns_a_known_logistic_link() -> None:
    """Votes whose truth is drawn from σ(2·logit(vote) − 1): the Newton fit recovers 2 and −1."""
    rng = np.random.default_rng(3)
    shape = (40, 40, 40)
    vote = rng.uniform(0.02, 0.98, shape).astype(np.float32)
    truth = rng.uniform(size=shape) < 1.0 / (1.0 + np.exp(-(2.0 * np.log(vote / (1 - vote)) - 1.0)))
    member_a = pg.Member(0.05, 1.2, 0.0, 0.0, np.zeros(shape, bool), np.zeros(shape, bool))
    case = pe.Case(0, (), pg.Observation(10.0, truth, truth), box_anatomy(), np.ones(shape, bool), {})

    real_combine = pg.combine

    def fake_combine(members, calibration, day, spacing):  # type: ignore[no-untyped-def]
        return replace(real_combine([member_a], calibration, day, spacing), probability=vote)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pg, "combine", fake_combine)
        scale, shift = pe._vote_scaling([replace(case, members=(member_a,))], pg.Calibration())
    assert scale == pytest.approx(2.0, abs=0.1) and shift == pytest.approx(-1.0, abs=0.1)


def test_the_evaluation_reports_every_method_and_the_acceptance(grown: list[pg.Observation]) -> None:
    """The harness on two box patients (SIMULATED, tiny): every baseline and the model get
    the same inputs and every figure the issue asks for is reported."""
    cases = []
    for seed, (speed, width) in enumerate(((0.1, 2.0), (0.04, 1.2))):
        obs = truth_history(speed, width, [0.0, 40.0, 80.0, 130.0])
        anatomy = box_anatomy()
        case = pe.Case(seed, tuple(obs[:3]), obs[3], anatomy, anatomy.white > 0.5, {"treated": False})
        members = pg.run_members(case.observations, anatomy, obs[3].day, pg.Calibration(prior_weight=0.0))
        cases.append(replace(case, members=tuple(members)))
    calibration = pe.learn_calibration(cases[:1], cases[1:])
    assert calibration.n_training == 2 and calibration.interval_factor > 0
    assert math.isfinite(calibration.vote_scale) and calibration.vote_scale > 0
    results = pe.evaluate(cases, calibration)
    assert set(results["summary"]) == {"no change", "linear sphere", "linear volume", "FK fit", "model"}
    for figures in results["summary"].values():
        assert 0.0 <= figures["dice_mean"] <= 1.0 and figures["ece"] >= 0.0
    assert "interval_coverage_90" in results["summary"]["model"]
    assert {"dice_vs_no_change", "dice_vs_linear_sphere", "dice_vs_fk_fit", "ece", "holds"} <= set(
        results["acceptance"]
    )
    # on growth the model itself made, the fit beats standing still
    assert results["summary"]["model"]["dice_mean"] > results["summary"]["no change"]["dice_mean"]
