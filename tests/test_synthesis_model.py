"""The synthesis network (models.synthesis) and its training (models.training.synthesis): a few
steps on two SIMULATED studies, then loaded from its directory like a shipped model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.synthesis import GROUPS, SynthesisModel, groups_of, stack_inputs
from models.training.synthesis import SynthesisTrainConfig, train


def test_inputs_are_stacked_with_their_neighbours_contrast_by_contrast() -> None:
    a = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((3, 2, 2), np.float32)
    b = a + 10
    x = stack_inputs([a, b])
    assert x.shape == (3, 6, 2, 2)
    assert x[0, :, 0, 0].tolist() == [0, 0, 1, 10, 10, 11]  # the edge slice repeats
    assert x[2, :, 0, 0].tolist() == [1, 2, 2, 11, 12, 12]
    assert groups_of(np.array([0.3, 0.8, 1.0])).tolist() == [0, 1, 2]


def test_a_trained_model_loads_checks_its_weights_and_predicts_in_the_brain(tmp_path: Path) -> None:
    from models.sim.synthesis import make_study

    config = SynthesisTrainConfig(train=1, calib=1, max_steps=3, minutes=1.0, channels=(4, 8), strides=(2,))
    card = train(config, tmp_path / "model")
    assert card.task == "t1w+t2w->flair" and set(card.sigma_scales) == set(GROUPS)
    model = SynthesisModel(tmp_path / "model")
    study = make_study(30039, size=64, slices=8)  # a test seed: never trained on
    mean, sigma = model.predict({"t1w": study.images["t1w"], "t2w": study.images["t2w"]}, study.brain)
    assert mean.shape == study.images["t1w"].shape
    assert np.all(mean[~study.brain] == 0) and np.all(sigma[~study.brain] == 0)
    assert np.all(sigma[study.brain] > 0) and np.isfinite(mean).all()
    with pytest.raises(ValueError, match="needs t2w"):
        model.predict({"t1w": study.images["t1w"]}, study.brain)
    # the evaluation scores it beside both baselines, every figure labelled SIMULATED
    from models.evaluation.synthesis_eval import run

    results = run(
        tmp_path / "report",
        "t1w+t2w->flair",
        train=1,
        test=1,
        model_dir=tmp_path / "model",
        size=64,
        slices=8,
    )
    assert list(results["methods"]) == [model.name, "tissue regression", "histogram matching"]
    assert results["methods"][model.name]["coverage_90"]["brain"] is not None
    assert "SIMULATED" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(ValueError, match="not t1w->t2w"):
        run(tmp_path / "r2", "t1w->t2w", train=1, test=1, model_dir=tmp_path / "model", size=64, slices=8)
    (tmp_path / "model" / "weights.safetensors").write_bytes(b"tampered")
    with pytest.raises(Exception, match="sha256"):
        SynthesisModel(tmp_path / "model")


def test_evaluate_synthesis_refuses_an_unknown_task(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicom_node.cli import app

    result = CliRunner().invoke(
        app, ["evaluate", "synthesis", "--report", str(tmp_path), "--task", "t1w->pd"]
    )
    assert result.exit_code != 0 and "one of t1w+t2w->flair, t1w->flair, t1w->t2w" in result.output
