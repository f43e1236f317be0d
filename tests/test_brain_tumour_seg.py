"""Brain and glioma segmentation against the simulator's truth, and its refusals.

The thresholds sit below what was measured on these visits (SIMULATED data; seed 5, visits 1 - 2:
core Dice 0.93 / 0.94, whole 0.95 / 0.95, brain 0.98 / 0.98, white matter (fraction >= 0.5) Dice
0.97 / 0.96, white-matter fraction MAE 0.05 / 0.06). Over 20 unseen patients the figures are
printed by ``python -m models.evaluation.brain_tumour_seg --patients 20`` (see that module's docstring).
"""

from __future__ import annotations

import numpy as np
import pytest

from models.brain_tumour_seg import BrainSegmentation, segment
from models.evaluation.brain_tumour_seg import dice, simulated_truth
from models.sim.prognosis import SimulatedPatient, make_patient


@pytest.fixture(scope="module")
def patient() -> SimulatedPatient:
    return make_patient(5, visits=2)


@pytest.fixture(scope="module")
def first_visit(patient: SimulatedPatient) -> BrainSegmentation:
    visit = patient.visits[0]
    return segment(visit.images["t1c"], visit.images["flair"], patient.spacing_mm)


@pytest.mark.parametrize("index", [0, 1])
def test_agrees_with_the_simulated_truth(patient: SimulatedPatient, index: int) -> None:
    visit = patient.visits[index]
    result = segment(visit.images["t1c"], visit.images["flair"], patient.spacing_mm)
    truth = simulated_truth(patient, visit)
    assert result.problems == []
    assert truth.core.any() and truth.whole.any()
    assert dice(result.brain, truth.brain) >= 0.97
    assert dice(result.core, truth.core) >= 0.85
    assert dice(result.whole, truth.whole) >= 0.88
    assert dice(result.white >= 0.5, truth.white >= 0.5) >= 0.92
    assert float(np.abs(result.white - truth.white)[truth.brain].mean()) <= 0.08
    assert result.qc["seconds"] < 10.0


def test_masks_and_fractions_are_consistent(first_visit: BrainSegmentation) -> None:
    r = first_visit
    assert r.core.dtype == bool and r.whole.dtype == bool and r.brain.dtype == bool
    assert not (r.core & ~r.whole).any(), "the whole tumour contains the core"
    assert not (r.whole & ~r.brain).any()
    assert r.white.dtype == np.float32 and r.grey.dtype == np.float32
    assert (r.white[~r.brain] == 0).all() and (r.grey[~r.brain] == 0).all()
    assert float((r.white + r.grey).max()) <= 1.0 + 1e-5
    # under the lesion the tissue counts as tissue (not the growth model's barrier)
    assert np.allclose((r.white + r.grey)[r.whole], 1.0, atol=1e-4)
    voxel_ml = float(np.prod((3.0, 1.875, 1.875))) / 1000.0
    assert r.qc["whole_ml"] == pytest.approx(float(r.whole.sum()) * voxel_ml)
    for key in ("t1c_white_level", "flair_white_level", "whole_threshold", "core_threshold"):
        assert key in r.qc


def test_intensity_scale_changes_nothing(patient: SimulatedPatient, first_visit: BrainSegmentation) -> None:
    visit = patient.visits[0]
    scaled = segment(visit.images["t1c"] * 37.5, visit.images["flair"] * 0.01, patient.spacing_mm)
    assert scaled.problems == []
    for name in ("brain", "core", "whole"):
        assert np.array_equal(getattr(scaled, name), getattr(first_visit, name)), name
    assert np.allclose(scaled.white, first_visit.white, atol=1e-3)
    assert scaled.qc["t1c_white_level"] == pytest.approx(37.5 * first_visit.qc["t1c_white_level"], rel=1e-3)


def test_tumour_at_the_edge_of_the_field_of_view_is_refused(patient: SimulatedPatient) -> None:
    visit = patient.visits[0]
    truth = simulated_truth(patient, visit)
    cols = np.nonzero(truth.whole.any(axis=(0, 1)))[0]
    shift = -int(cols.min()) + 1  # the tumour's first column lands next to the image edge
    t1c, flair = (np.roll(visit.images[k], shift, axis=2) for k in ("t1c", "flair"))
    result = segment(t1c, flair, patient.spacing_mm)
    assert any("field of view" in p or "field-of-view" in p for p in result.problems)


@pytest.mark.parametrize(
    "case",
    ["empty", "noise", "ct_hu", "ct_stored", "swapped", "mismatched", "flat_2d"],
)
def test_input_that_is_not_a_brain_mr_gives_problems(patient: SimulatedPatient, case: str) -> None:
    visit = patient.visits[0]
    shape = visit.images["t1c"].shape
    rng = np.random.default_rng(0)
    t1c, flair = visit.images["t1c"], visit.images["flair"]
    if case == "empty":
        t1c, flair = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    elif case == "noise":
        t1c = rng.rayleigh(100.0, shape).astype(np.float32)
        flair = rng.rayleigh(100.0, shape).astype(np.float32)
    elif case in ("ct_hu", "ct_stored"):
        # a head CT: air -1000 HU, brain ~35, a bright skull; in HU as both series, or stored
        # (HU + 1024, non-negative) in place of the T1c next to the real FLAIR
        _, y, x = np.indices(shape)
        r = np.hypot((y - shape[1] / 2) / (shape[1] * 0.38), (x - shape[2] / 2) / (shape[2] * 0.32))
        ct = np.where(r < 1.0, 35.0, -1000.0) + np.where((r > 0.9) & (r < 1.0), 1200.0, 0.0)
        offset = 1024.0 if case == "ct_stored" else 0.0
        t1c = (ct + offset + rng.normal(0, 5, shape)).astype(np.float32)
        flair = flair if offset else t1c
    elif case == "swapped":
        t1c, flair = flair, t1c
    elif case == "mismatched":
        flair = flair[:, :-8]
    elif case == "flat_2d":
        t1c, flair = t1c[0], flair[0]
    result = segment(t1c, flair, patient.spacing_mm)
    assert result.problems, case
    assert all(isinstance(p, str) and p for p in result.problems)
