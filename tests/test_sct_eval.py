"""The sCT evaluation: metric code on constructed inputs, the hallucination protocol, and one
tiny end-to-end run of ``dicom-node evaluate sct`` with the shipped model (SIMULATED data).

``DICOM_NODE_SCT_MODEL`` (a model directory) replaces the shipped model here, for development
before a model is shipped; the default is :meth:`SctModel.shipped`.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.evaluation.sct_eval import (
    BEAM_ANGLES_DEG,
    INSERTED,
    METHODS,
    MODEL,
    OverlappingTestSet,
    _CaseOutputs,
    check_held_out,
    coverage_by_region,
    error_stats,
    hallucination_tests,
    roc_result,
    stopping_power,
    tissue_errors,
    wepl_mm,
    wepl_targets,
)
from models.sct import SctModel
from models.sim.mrct import HeadTissue
from models.training.sct import SctCaseSpec, case_plan, simulate

_OVERRIDE = os.environ.get("DICOM_NODE_SCT_MODEL")


def _model() -> SctModel:
    return SctModel(Path(_OVERRIDE)) if _OVERRIDE else SctModel.shipped()


def _cylinder(hu: float, radius_mm: float = 40.0, size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), -1000.0, np.float32)
    img[np.hypot(yy - size // 2, xx - size // 2) <= radius_mm] = hu
    return img


# -- dose proxy -------------------------------------------------------------------------------------
def test_stopping_power_curve_passes_through_water_and_air_and_is_clamped() -> None:
    rsp = stopping_power(np.array([-2000.0, -1000.0, 0.0, 1500.0, 9000.0]))
    assert rsp.tolist() == pytest.approx([0.001, 0.001, 1.0, 1.8, 2.62], abs=1e-6)
    assert np.all(np.diff(stopping_power(np.linspace(-1000, 3071, 200))) >= 0)


def test_wepl_of_a_water_cylinder_is_its_radius_from_every_angle() -> None:
    wepl = wepl_mm(_cylinder(0.0), (64.0, 64.0), (1.0, 1.0))
    assert len(wepl) == len(BEAM_ANGLES_DEG) == 8
    # 40 mm of water plus ~25-40 mm of air at RSP 0.001; the disc edge is one pixel wide.
    assert np.allclose(wepl, 40.0, atol=0.75), wepl


def test_wepl_scales_with_stopping_power_and_pixel_size() -> None:
    bone = wepl_mm(_cylinder(1500.0), (64.0, 64.0), (1.0, 1.0))
    assert np.allclose(bone, 40.0 * 1.8, atol=1.5), bone
    # The same image with 0.5 mm pixels is half as wide: half the WEPL.
    half = wepl_mm(_cylinder(0.0), (64.0, 64.0), (0.5, 0.5))
    assert np.allclose(half, 20.0, atol=0.4), half


def test_wepl_follows_the_beam_direction_convention() -> None:
    # Target 20 px towards the patient's right (lower column) of the centre of the water disc:
    # the beam from the right (270°) crosses 20 mm of water, from the left (90°) 60 mm.
    wepl = wepl_mm(_cylinder(0.0), (64.0, 44.0), (1.0, 1.0), angles_deg=(90.0, 270.0))
    assert wepl == pytest.approx([60.0, 20.0], abs=0.75)
    with pytest.raises(ValueError, match="outside"):
        wepl_mm(_cylinder(0.0), (200.0, 64.0), (1.0, 1.0))


def test_wepl_targets_are_brain_centroids() -> None:
    labels = np.zeros((8, 64, 64), np.uint8)
    labels[:, 20:30, 30:40] = HeadTissue.GREY
    labels[2] = 0  # no brain in one of the wanted slices: skipped
    head = np.ones(labels.shape, bool)
    targets = wepl_targets(labels, head, n=3, min_brain_px=10)
    slices = [k for k, _, _ in targets]
    assert 2 not in slices and slices == sorted(slices) and len(slices) == 2
    for _, r, c in targets:
        assert (r, c) == pytest.approx((24.5, 34.5))


# -- HU errors --------------------------------------------------------------------------------------
def test_tissue_errors_on_constructed_arrays() -> None:
    labels = np.zeros((2, 10, 10), np.uint8)
    labels[:, :5] = HeadTissue.CORTICAL_BONE  # 100 voxels
    labels[:, 5:8] = HeadTissue.GREY  # 60 voxels
    labels[:, 8:] = HeadTissue.SINUS_AIR  # 40 voxels
    ref = np.zeros(labels.shape, np.float32)
    pred = ref.copy()
    pred[labels == HeadTissue.CORTICAL_BONE] = -300.0  # the sCT misses bone density
    pred[labels == HeadTissue.GREY] = 10.0
    head = np.ones(labels.shape, bool)
    head[:, 9] = False  # half of the air is outside the head mask: not counted
    errors = tissue_errors(pred, ref, labels, head)
    assert errors["bone"] == {"mae_hu": 300.0, "me_hu": -300.0, "n": 100}
    assert errors["soft tissue"] == {"mae_hu": 10.0, "me_hu": 10.0, "n": 60}
    assert errors["air"] == {"mae_hu": 0.0, "me_hu": 0.0, "n": 20}
    assert errors["head"]["n"] == 180
    assert errors["head"]["mae_hu"] == pytest.approx((100 * 300 + 60 * 10) / 180)
    assert errors["head"]["me_hu"] == pytest.approx((-100 * 300 + 60 * 10) / 180)
    empty = error_stats(pred, ref, np.zeros(labels.shape, bool))
    assert empty["n"] == 0 and math.isnan(empty["mae_hu"])


def test_coverage_per_region_on_gaussian_errors() -> None:
    rng = np.random.default_rng(0)
    shape = (4, 200, 200)
    sigma = np.where(np.arange(200)[None, None, :] < 100, 20.0, 200.0) * np.ones(shape)
    ref = rng.normal(0.0, sigma).astype(np.float32)
    mean = np.zeros(shape, np.float32)
    regions = {"narrow": sigma == 20.0, "wide": sigma == 200.0}
    honest = coverage_by_region(mean, sigma, ref, regions)
    for name in regions:
        assert honest[name]["coverage"] == pytest.approx(0.90, abs=0.01)
    assert honest["wide"]["mean_width_hu"] == pytest.approx(2 * 1.6449 * 200.0, rel=1e-3)
    overconfident = coverage_by_region(mean, sigma / 2, ref, regions)
    assert overconfident["narrow"]["coverage"] == pytest.approx(0.59, abs=0.015)  # 2Φ(0.82) − 1
    assert coverage_by_region(mean, sigma, ref, {"none": np.zeros(shape, bool)})["none"]["n"] == 0


def test_roc_result_separates_and_is_chance_on_ties() -> None:
    assert roc_result([3.0, 4.0], [1.0, 2.0])["auroc"] == 1.0
    tie = roc_result([1.0, 1.0], [1.0, 1.0, 1.0])
    assert tie["auroc"] == 0.5 and tie["n_positive"] == 2 and tie["n_negative"] == 3


# -- with the model ---------------------------------------------------------------------------------
def test_test_seeds_that_were_training_seeds_are_refused() -> None:
    model = _model()
    train_seed = int(model.meta.training["seed"])
    assert check_held_out(model, [s.seed for s in case_plan("test", 4, train_seed)])
    # a test set that reuses the model's own training (or calibration) cases is refused
    for role, key in (("train", "train_cases"), ("calib", "calib_cases")):
        reused = [s.seed for s in case_plan(role, int(model.meta.training[key]), train_seed)][-2:]
        with pytest.raises(OverlappingTestSet, match="--seed"):
            check_held_out(model, [*reused, 12345])


def test_hallucination_protocol_finds_positives_and_controls_in_every_test() -> None:
    """With the reference CT standing in for the sCT (real bone everywhere the skull is), all
    three alteration types produce altered regions and same-shaped controls."""
    model = _model()
    pair = simulate(SctCaseSpec(seed=2_000_017, level=0.75, slices=4, size=128), keep_raw=True)
    assert pair.raw_mr is not None
    ref = pair.ct.astype(np.float32)
    sigma = np.where(pair.body, 50.0, 0.0).astype(np.float32)
    score = model.score(pair.raw_mr, ref, sigma, pair.spacing)
    outputs = [_CaseOutputs(2_000_017, pair, {m: ref for m in METHODS}, sigma, score)]
    results = hallucination_tests(model, outputs, np.random.default_rng(0))
    assert set(results) == {f"model: {n}" for n in INSERTED} | {"model: removed real bone"}
    for name, r in results.items():
        assert r["n_positive"] > 0 and r["n_negative"] > 0, name
        assert 0.0 <= r["auroc"] <= 1.0 and r["reduce"] == "max"
    # Positives and controls are drawn deterministically from the generator.
    again = hallucination_tests(model, outputs, np.random.default_rng(0))
    assert {k: v["auroc"] for k, v in again.items()} == {k: v["auroc"] for k, v in results.items()}


@pytest.mark.timeout(300)
def test_evaluate_sct_cli_writes_results_and_a_labelled_report(tmp_path: Path) -> None:
    report = tmp_path / "report"
    extra = ["--model", _OVERRIDE] if _OVERRIDE else []
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "evaluate", "sct", "--report", str(report)]
        + ["--cases", "1", "--slices", "4", "--size", "128", "--fit-cases", "1", *extra],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((report / "results.json").read_text())
    assert payload["simulated_data"] is True and "simulated" in payload["note"]
    results = payload["results"]
    summary = results["summary"]
    assert "SIMULATED" in summary["note"]
    assert summary["model"]["weights_sha256"] == _model().card.weights_sha256
    for key in ("mae_head_hu", "bone_mae_hu", "wepl_mean_abs_error_mm", "psnr_db", "ssim"):
        assert set(summary[key]) == set(METHODS), key
        assert all(v is not None and math.isfinite(v) for v in summary[key].values()), key
    ratio = summary["mae_head_hu"][MODEL] / summary["mae_head_hu"]["bulk density"]
    assert summary["mae_ratio_model_to_bulk_density"] == pytest.approx(ratio, abs=2e-3)
    assert summary["pass"]["mae_ratio_model_to_bulk_density"] == (ratio <= 0.5)
    assert 0.0 <= summary["coverage_90"] <= 1.0
    assert set(summary["coverage_90_per_tissue"]) == {"head", "bone", "soft tissue", "air"}
    assert results["wepl"]["n_rays"] == 8 * results["wepl"]["n_targets"] > 0
    assert set(results["baselines"]) == {"bulk density", "piecewise intensity"}
    assert summary["hallucination_auroc"], "at least the insertion tests ran"
    assert summary["timings_s"]["total_s"] > 0
    page = (report / "report.html").read_text()
    figures = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert len(figures) >= 5 and all("simulated data" in f for f in figures)
    header, *sections = page.split("<h2>")
    assert "simulated data" in header and len(sections) >= 7
    for section in sections:  # every table sits in a section that says so
        assert "simulated data" in section.lower(), section[:80]
    captions = re.findall(r"<caption[^>]*>(.*?)</caption>", page)
    assert captions and all("simulated data" in c for c in captions)
