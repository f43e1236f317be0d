"""`train` is deterministic: the same seed gives byte-identical weights (tiny budget here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.restoration import RestorationModel
from models.training.restoration import TrainConfig, case_plan, simulate_all, train


def test_same_seed_same_weights_and_card(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    pairs = simulate_all(case_plan("train", 2, 5, size=128), workers=1)
    calib = simulate_all(case_plan("calib", 2, 5, size=128), workers=1)
    config = TrainConfig(
        seed=5, steps=3, batch=2, patch=48, lesion_patch_fraction=0.5, lesion_weight=10, lowpass_weight=2
    )
    a = train(config, tmp_path / "a", pairs=pairs, calib_pairs=calib, workers=1)
    b = train(config, tmp_path / "b", pairs=pairs, calib_pairs=calib, workers=1)
    assert a.card.weights_sha256 == b.card.weights_sha256
    assert a.card.sigma_scale == b.card.sigma_scale and a.card.sigma_scale > 0
    model = RestorationModel(tmp_path / "a")  # loads, with the hash check
    assert model.card.weights_sha256 == a.card.weights_sha256
    assert set(a.card.model_error_correlation) == {"3", "5", "7", "9"}
    assert a.card.training["lesion_weight"] == 10


def test_lesion_patches_are_centred_near_known_lesions() -> None:
    from models.training.restoration import _sample_batch

    pairs = simulate_all(case_plan("train", 2, 6, size=128), workers=1)
    assert any(p.lesion is not None and p.lesion.any() for p in pairs), "the simulator inserts lesions"
    _x, _y, masks = _sample_batch(pairs, np.random.default_rng(0), 16, 48, lesion_fraction=1.0)
    assert all(m.any() for m in masks), "every patch holds lesion pixels when the fraction is 1"
    _x, _y, masks = _sample_batch(pairs, np.random.default_rng(0), 16, 48, lesion_fraction=0.0)
    assert masks.shape == (16, 1, 48, 48)


def test_plan_keeps_test_levels_and_seeds_out_of_training() -> None:
    train_specs = case_plan("train", 200, 1)
    test_specs = case_plan("test", 50, 1)
    held = ((0.2, 0.3), (0.7, 0.8))
    assert all(any(lo <= s.level < hi for lo, hi in held) for s in test_specs)
    assert not any(any(lo <= s.level < hi for lo, hi in held) for s in train_specs)
    assert not {s.seed for s in train_specs} & {s.seed for s in test_specs}


def test_zero_steps_recalibrates_the_given_weights(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    pairs = simulate_all(case_plan("train", 2, 5, size=128), workers=1)
    calib = simulate_all(case_plan("calib", 4, 5, size=128), workers=1)
    first = train(
        TrainConfig(seed=5, steps=2, batch=2, patch=48), tmp_path / "a", pairs=pairs, calib_pairs=calib
    )
    config = TrainConfig(seed=5, steps=0, residual_lowpass_mm=0.8, putback_noise_hu=10.0, version="a.1")
    again = train(
        config, tmp_path / "b", calib_pairs=calib, init_weights=tmp_path / "a" / "weights.safetensors"
    )
    assert again.card.weights_sha256 == first.card.weights_sha256, "the weights are not touched"
    assert again.card.training["recalibrated_from_version"] == "1.0"
    assert again.card.training_data == first.card.training_data
    assert set(again.card.lowpass_noise_factor) >= {"0.8", "1.0", "2.0"}
    factors = [again.card.lowpass_noise_factor[w] for w in ("0.8", "1.0", "2.0")]
    assert factors == sorted(factors, reverse=True), "a wider low-pass keeps less of the noise"
    assert again.card.putback_noise_hu == 10.0
    # 4 calibration slices: too few for a group of its own, so every group uses the pooled scale
    assert again.card.sigma_scale_by_group == {}
    RestorationModel(tmp_path / "b")  # loads with the hash check


def test_zero_steps_without_weights_is_refused(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ValueError, match="give the weights"):
        train(TrainConfig(steps=0), tmp_path, pairs=[], calib_pairs=[])


def test_train_never_overwrites_a_model_without_being_told(tmp_path: Path) -> None:
    import hashlib
    import shutil

    from typer.testing import CliRunner

    from dicom_node.cli import app
    from models.zoo import ZOO, version_dir

    runner = CliRunner()
    shipped = version_dir("ldct-restoration", "1.0") / "weights.safetensors"
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    # no --out: the zoo directory of --version, which holds the shipped 1.0
    result = runner.invoke(app, ["train", "restoration", "--version", "1.0", "--steps", "1"])
    assert result.exit_code != 0
    assert "already holds a model (ldct-restoration 1.0)" in result.output and "--overwrite" in result.output
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == before
    assert (ZOO / "sct-head" / "1.0" / "card.json").exists()
    result = runner.invoke(app, ["train", "sct", "--version", "1.0", "--steps", "1"])
    assert result.exit_code != 0 and "already holds a model (sct-head 1.0)" in result.output
    # an explicit --out holding a model is refused the same way
    shutil.copytree(version_dir("ldct-restoration", "1.0"), tmp_path / "mine")
    result = runner.invoke(app, ["train", "restoration", "--out", str(tmp_path / "mine"), "--steps", "1"])
    assert result.exit_code != 0 and "already holds a model" in result.output
    # a new directory is written; writing it again needs --overwrite
    recalibrate = ["train", "restoration", "--steps", "0", "--calib-cases", "2", "--version", "t.1"]
    recalibrate += ["--init", str(version_dir("ldct-restoration")), "--residual-lowpass-mm", "0.8"]
    result = runner.invoke(app, [*recalibrate, "--out", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "new" / "card.json").read_text())["version"] == "t.1"
    again = runner.invoke(app, [*recalibrate, "--out", str(tmp_path / "new")])
    assert again.exit_code != 0 and "already holds a model (ldct-restoration t.1)" in again.output
    forced = runner.invoke(app, [*recalibrate, "--out", str(tmp_path / "new"), "--overwrite"])
    assert forced.exit_code == 0, forced.output


def test_a_site_recalibrates_the_shipped_model_on_all_of_its_own_pairs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicom_node.cli import app
    from models.zoo import version_dir

    runner = CliRunner()
    sim = runner.invoke(
        app,
        [
            "simulate",
            "ldct",
            "--dose",
            "0.25",
            "--slices",
            "3",
            "--size",
            "128",
            "--out",
            str(tmp_path / "site"),
        ],
    )
    assert sim.exit_code == 0, sim.output
    result = runner.invoke(
        app,
        [
            "train", "restoration", "--steps", "0", "--init", str(version_dir("ldct-restoration")),
            "--paired-low", str(tmp_path / "site" / "low-dose"),
            "--paired-reference", str(tmp_path / "site" / "reference"),
            "--residual-lowpass-mm", "0.8", "--putback-noise-hu", "11", "--version", "site.1",
            "--out", str(tmp_path / "model"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "site data: 0 training and 3 calibration slice pairs" in result.output
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["calibration"].startswith("split conformal on 3 held-out slices")
    shipped = json.loads((version_dir("ldct-restoration") / "card.json").read_text())
    assert card["weights_sha256"] == shipped["weights_sha256"]
    assert card["training_data"] == shipped["training_data"], (
        "the weights' training data, not the site's pairs"
    )
    factors = [*card["noise_correlation"].values(), *card["model_error_correlation"].values()]
    assert all(np.isfinite(v) and v > 0 for v in factors), factors
    RestorationModel(tmp_path / "model")
