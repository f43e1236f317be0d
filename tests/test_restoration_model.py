"""The shipped restoration model: its card, its weights hash check, its outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.restoration import RestorationModel, WeightsMismatch, sha256_of

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "zoo" / "ldct-restoration" / "1.0"


def test_card_is_complete_and_says_the_data_was_simulated() -> None:
    card = json.loads((SHIPPED / "card.json").read_text())
    for key in ("intended_use", "training_data", "metrics", "calibration", "weights_sha256", "sigma_scale"):
        assert card[key], key
    assert "simulated" in card["training_data"].lower() and "no patient data" in card["training_data"].lower()
    assert card["weights_sha256"] == sha256_of(SHIPPED / card["weights_file"])
    assert (SHIPPED / card["weights_file"]).stat().st_size <= 10 * 1024 * 1024


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(SHIPPED, copy)
    weights = copy / json.loads((copy / "card.json").read_text())["weights_file"]
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(WeightsMismatch, match="does not match the model card"):
        RestorationModel(copy)


def test_predicts_restored_hu_and_positive_sigma() -> None:
    model = RestorationModel.shipped()
    rng = np.random.default_rng(0)
    clean = np.full((2, 128, 128), 40.0, np.float32)
    clean[:, 40:90, 40:90] = -800.0
    noisy = clean + rng.normal(0, 40, clean.shape).astype(np.float32)
    prediction = model.predict(noisy, (1.0, 0.7, 0.7))
    assert prediction.mean.shape == noisy.shape and prediction.sigma.shape == noisy.shape
    assert (prediction.sigma > 0).all()
    assert np.abs(prediction.mean - clean).mean() < np.abs(noisy - clean).mean() / 2
    again = model.predict(noisy, (1.0, 0.7, 0.7))
    assert np.array_equal(again.mean, prediction.mean), "inference is deterministic"
