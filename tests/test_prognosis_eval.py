"""The prognosis report (issue 17): its helpers on constructed inputs, the zoo writer, and one
tiny in-process run of ``dicom-node evaluate prognosis`` (one SIMULATED patient, a 4-member
ensemble so that it stays fast)."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from models import prognosis as pg
from models.evaluation import prognosis_eval as pe
from models.evaluation import prognosis_report as pr


def test_auroc_counts_ranks_and_ties() -> None:
    assert pr.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool)) == 1.0
    assert pr.auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1], bool)) == 0.0
    assert pr.auroc(np.full(4, 0.5), np.array([0, 1, 0, 1], bool)) == 0.5
    assert pr.auroc(np.array([0.3, 0.4]), np.array([True, True])) is None


def test_pseudo_hu_puts_the_brain_median_at_soft_tissue() -> None:
    assert np.allclose(pr.pseudo_hu(np.array([1.0, 2.0, 0.0])), [40.0, 140.0, -60.0])


def test_the_zoo_writer_writes_a_loadable_hash_checked_model(tmp_path: Path) -> None:
    calibration = pg.Calibration(prior_weight=0.02, temperature=0.08, interval_factor=1.4, n_training=4)
    figures = {
        "dice_mean": 0.9,
        "core_dice_mean": 0.7,
        "volume_error_ml_mean": 3.0,
        "ece": 0.04,
        "interval_coverage_90": 0.9,
    }
    results = {
        "summary": {
            m: dict(figures) for m in ("no change", "linear sphere", "linear volume", "FK fit", "model")
        },
        "meta": {"train_seeds": [7000, 7001, 7002, 7003], "test_seeds": [9000]},
    }
    pe.write_zoo(tmp_path / "1.0", calibration, results)
    model = pg.PrognosisModel(tmp_path / "1.0")
    assert model.calibration == calibration
    assert model.meta.metrics["voxel probability ECE"] == "0.040"
    assert json.loads((tmp_path / "1.0" / "evaluation.json").read_text())["meta"]["test_seeds"] == [9000]


@pytest.mark.timeout(120)
def test_evaluate_prognosis_cli_writes_every_level_labelled_simulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.cli import app

    small = functools.partial(pg.run_members, speeds=(0.035, 0.06), widths=(1.2, 2.0))
    monkeypatch.setattr(pg, "run_members", small)
    monkeypatch.setattr(pr, "PATCHES_PER_CASE", 4)
    report = tmp_path / "report"
    result = CliRunner().invoke(app, ["evaluate", "prognosis", "--report", str(report), "--test", "1"])
    assert result.exit_code == 0, result.output
    text = (report / "report.md").read_text()
    for heading in ("Pixel level", "Feature level", "Task and calibration levels", "Hallucination"):
        assert f"## {heading} (SIMULATED" in text
    assert "sim-encoder" in text and "SIMULATED" in text.splitlines()[2]
    payload = json.loads((report / "evaluation.json").read_text())
    assert payload["seeds"] == [9000] and "SIMULATED" in payload["data"]
    for method in ("model", "no change"):
        for value in payload["pixel"]["mae"][method].values():
            assert math.isfinite(value) and value >= 0.0
    # the growth grid lands on the reference grid exactly as the simulator maps it
    assert payload["pixel"]["frame_check_max_abs"] < 1e-4
    model = payload["task"]["summary"]["model"]
    assert 0.0 <= model["dice_mean"] <= 1.0 and math.isfinite(model["ece"])
    assert payload["feature"]["encoder"].startswith("sim-encoder")
    for contrast in pr.CONTRASTS:
        for figures in (payload["feature"][contrast] or {}).values():
            assert math.isfinite(figures["fid"])
    assert payload["hallucination"]["flagged_voxels"] >= 0
    assert payload["model"]["weights_sha256"] == pg.PrognosisModel.shipped().card.weights_sha256
