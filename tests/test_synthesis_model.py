"""The synthesis network (models.synthesis) and its training (models.training.synthesis): a few
steps on two SIMULATED studies, then loaded from its directory like a shipped model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.synthesis import (
    BRAIN_EDGE,
    GROUPS,
    T2W_HYPERINTENSE,
    SigmaRule,
    SynthesisCard,
    SynthesisModel,
    groups_of,
    sigma_groups,
    stack_inputs,
)
from models.training.synthesis import SIGMA_RULE, SynthesisTrainConfig, main, recalibrate, train

ZOO_MODEL = "synthesis-t1w-t2w-to-flair"


def test_inputs_are_stacked_with_their_neighbours_contrast_by_contrast() -> None:
    a = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((3, 2, 2), np.float32)
    b = a + 10
    x = stack_inputs([a, b])
    assert x.shape == (3, 6, 2, 2)
    assert x[0, :, 0, 0].tolist() == [0, 0, 1, 10, 10, 11]  # the edge slice repeats
    assert x[2, :, 0, 0].tolist() == [1, 2, 2, 11, 12, 12]
    assert groups_of(np.array([0.3, 0.8, 1.0])).tolist() == [0, 1, 2]


def test_sigma_groups_come_from_the_inputs_and_the_brain_mask_only() -> None:
    brain = np.zeros((1, 9, 9), bool)
    brain[0, 1:8, 1:8] = True
    t1w = np.full(brain.shape, 1.0, np.float32)  # white-like
    t2w = np.full(brain.shape, 1.0, np.float32)
    t1w[0, 4, 4], t2w[0, 4, 4] = 0.85, 1.8  # grey-like T1w, bright T2w: hyperintense by 0.6
    t1w[0, 4, 5], t2w[0, 4, 5] = 0.4, 3.0  # CSF-like: bright T2w is expected there
    t1w[0, 5, 4] = 0.8  # grey-like, ordinary T2w
    rule = SigmaRule(t2w_threshold=1.2, t2w_excess_weight=3.0, edge_px=2)
    groups = sigma_groups({"t1w": t1w, "t2w": t2w}, brain, rule)
    assert groups.names == (*GROUPS, T2W_HYPERINTENSE, BRAIN_EDGE)
    named = np.asarray(groups.names)[groups.index[0]]
    assert named[4, 4] == T2W_HYPERINTENSE and groups.t2w_excess[0, 4, 4] == pytest.approx(0.6)
    assert named[4, 5] == "csf-like" and groups.t2w_excess[0, 4, 5] == 0
    assert named[5, 4] == "grey-like" and named[3, 3] == "white-like"
    assert named[1, 4] == BRAIN_EDGE and named[2, 2] == BRAIN_EDGE  # within 2 voxels of the border
    # T1w-only task: the same call, no T2w group, no widening
    t1_only = sigma_groups({"t1w": t1w}, brain, rule)
    assert t1_only.names == (*GROUPS, BRAIN_EDGE) and not t1_only.t2w_excess.any()
    assert np.asarray(t1_only.names)[t1_only.index[0, 4, 4]] == "grey-like"
    # a version-1.0 rule: the tissue groups by T1w alone
    plain = sigma_groups({"t1w": t1w, "t2w": t2w}, brain, SigmaRule())
    assert plain.names == GROUPS and np.array_equal(plain.index, groups_of(t1w))


def test_a_version_1_0_card_still_loads_and_scales_sigma_by_tissue_group_only() -> None:
    from models.sim.synthesis import make_study
    from models.synthesis_norm import normalise_inputs

    model = SynthesisModel.shipped(ZOO_MODEL, "1.0")
    assert model.meta.sigma_rule == {} and model.sigma_rule == SigmaRule()
    study = make_study(30039, size=64, slices=8)  # a test seed: never calibrated on
    inputs = {c: study.images[c] for c in ("t1w", "t2w")}
    out = model.predict_full(inputs, study.brain)
    norm = normalise_inputs(inputs, study.brain)
    _, raw = model.predict_normalised([norm.images["t1w"], norm.images["t2w"]])
    scales = np.asarray([model.meta.sigma_scales[g] for g in GROUPS], np.float32)
    expected = np.where(study.brain, raw * scales[groups_of(norm.images["t1w"])], 0.0)
    np.testing.assert_allclose(out.sigma, expected, rtol=1e-6)


def test_version_1_1_keeps_the_weights_and_declares_its_input_domain_and_groups() -> None:
    from models.zoo import version_dir
    from pipelines.domain import InputDomain

    old, new = SynthesisModel.shipped(ZOO_MODEL, "1.0"), SynthesisModel.shipped(ZOO_MODEL, "1.1")
    assert new.meta.weights_sha256 == old.meta.weights_sha256
    assert (version_dir(ZOO_MODEL, "1.1") / "weights.safetensors").read_bytes() == (
        version_dir(ZOO_MODEL, "1.0") / "weights.safetensors"
    ).read_bytes()
    assert new.sigma_rule == SIGMA_RULE
    assert set(new.meta.sigma_scales) == {*GROUPS, T2W_HYPERINTENSE, BRAIN_EDGE}
    domain = InputDomain(**new.meta.input_domain)
    assert domain.modality == "MR" and domain.sequence == "t1w" and domain.image_check == "mr-head"
    use = new.meta.intended_use
    assert "Research use" in use and "Not acquired" in use and "reviewed" in use
    assert "no pipeline" not in use
    assert "SIMULATED" in new.meta.metrics["data"] and "90% coverage in lesions" in new.meta.metrics


def test_a_t1w_only_model_trains_calibrates_and_predicts_without_t2w(tmp_path: Path) -> None:
    from models.sim.synthesis import make_study

    config = SynthesisTrainConfig(
        task="t1w->t2w", train=1, calib=1, max_steps=2, minutes=1.0, channels=(4, 8), strides=(2,)
    )
    card = train(config, tmp_path / "model")
    assert set(card.sigma_scales) == {*GROUPS, BRAIN_EDGE}  # the T2w group does not apply
    model = SynthesisModel(tmp_path / "model")
    study = make_study(30039, size=64, slices=8)
    mean, sigma = model.predict({"t1w": study.images["t1w"]}, study.brain)
    assert np.all(sigma[study.brain] > 0) and np.all(sigma[~study.brain] == 0) and np.isfinite(mean).all()


def test_recalibration_keeps_the_weights_and_writes_a_loadable_card(tmp_path: Path) -> None:
    config = SynthesisTrainConfig(train=1, calib=1, max_steps=2, minutes=1.0, channels=(4, 8), strides=(2,))
    source = tmp_path / "1.0"
    old = train(config, source)
    card = recalibrate(source, tmp_path / "1.1", "1.1", calib=2, size=64, slices=8)
    assert card.version == "1.1" and card.weights_sha256 == old.weights_sha256
    assert set(card.sigma_scales) == {*GROUPS, T2W_HYPERINTENSE, BRAIN_EDGE}
    assert all(v > 0 for v in card.sigma_scales.values())
    assert card.training["recalibrated_from"] == "1.0" and "20001-20002" in card.training_data
    model = SynthesisModel(tmp_path / "1.1")
    assert model.name.endswith(" 1.1") and SynthesisCard.read_from(tmp_path / "1.1") == card
    with pytest.raises(SystemExit):  # writing over the source is refused
        main(["--recalibrate", str(source), "--out", str(source), "--version", "1.1"])


def test_a_trained_model_loads_checks_its_weights_and_predicts_in_the_brain(tmp_path: Path) -> None:
    from models.sim.synthesis import make_study

    config = SynthesisTrainConfig(train=1, calib=1, max_steps=3, minutes=1.0, channels=(4, 8), strides=(2,))
    card = train(config, tmp_path / "model")
    assert card.task == "t1w+t2w->flair"
    assert set(card.sigma_scales) == {*GROUPS, T2W_HYPERINTENSE, BRAIN_EDGE}
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
