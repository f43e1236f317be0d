"""`dicom-node train sct` machinery: deterministic, writes a loadable model with its card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.sct import SctArchitecture, SctModel
from models.training.sct import SctTrainConfig, case_plan, train

TINY = SctTrainConfig(
    train_cases=2,
    calib_cases=2,
    slices=4,
    steps=6,
    batch=2,
    patch=64,
    arch=SctArchitecture(channels=(4, 8, 16), strides=(2, 2)),
    version="0.0-test",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    train(TINY, a, workers=1)
    train(TINY, b, workers=1)
    return a, b


def test_same_seed_same_weights(trained: tuple[Path, Path]) -> None:
    a, b = trained
    assert (a / "weights.safetensors").read_bytes() == (b / "weights.safetensors").read_bytes()


def test_card_and_model_load(trained: tuple[Path, Path]) -> None:
    model = SctModel(trained[0])
    meta = model.meta
    assert meta.input_sequence == "t1w"
    assert meta.sigma_scale > 0
    assert "simulated" in meta.training_data
    assert meta.training["steps"] == 6 and meta.training["train_cases"] == 2
    table = meta.support_table
    assert len(table["median_hu"]) == len(table["intensity_edges"]) - 1
    rng = np.random.default_rng(0)
    mr = np.zeros((4, 64, 64), np.float32)
    mr[:, 12:52, 12:52] = 600 + rng.normal(0, 20, (4, 40, 40))
    full = model.predict_full(mr, (2.5, 1.0, 1.0))
    assert full.prediction.mean.shape == mr.shape
    assert np.all(full.prediction.mean[~full.body] == -1000.0)  # air outside the head
    assert np.all(full.prediction.sigma[full.body] > 0)


def test_roles_are_disjoint_and_test_levels_held_out() -> None:
    seeds = {role: {s.seed for s in case_plan(role, 40, 20261126)} for role in ("train", "calib", "test")}
    assert not seeds["train"] & seeds["test"] and not seeds["calib"] & seeds["test"]
    assert not seeds["train"] & seeds["calib"]
    for spec in case_plan("train", 40, 20261126):
        assert not (0.15 <= spec.level < 0.3 or 0.7 <= spec.level < 0.85)
    for spec in case_plan("test", 20, 20261126):
        assert 0.15 <= spec.level < 0.3 or 0.7 <= spec.level < 0.85
