"""The shipped restoration model: its card, its weights hash check, its outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.restoration import (
    BODY_HU,
    RestorationCard,
    RestorationModel,
    WeightsMismatch,
    adaptive_factor,
    data_consistent,
    sha256_of,
    slice_facts,
)

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


def _card(**overrides: object) -> RestorationCard:
    fields: dict[str, object] = dict(
        name="t",
        version="0",
        weights_file="w",
        weights_sha256="0",
        architecture={},
        intended_use="",
        training_data="",
        sigma_scale=1.5,
        calibration="",
        residual_lowpass_mm=0.8,
        putback_noise_hu=10.0,
        lowpass_noise_factor={"0.8": 0.6, "1.0": 0.45, "1.2": 0.35, "2.0": 0.18},
        sigma_scale_by_group={"thorax": 1.2},
    )
    fields.update(overrides)
    return RestorationCard(**fields)  # type: ignore[arg-type]


def test_noisier_slices_get_only_coarser_structure_back() -> None:
    card = _card()
    # put-back noise = factor x slice noise must stay <= 10 HU
    assert card.lowpass_for(15.0) == 0.8  # 0.6 * 15 = 9
    assert card.lowpass_for(20.0) == 1.0  # 0.6 * 20 = 12 > 10; 0.45 * 20 = 9
    assert card.lowpass_for(100.0) == 2.0  # nothing is quiet enough: the widest
    assert _card(putback_noise_hu=0.0).lowpass_for(100.0) == 0.8, "0: the fixed width"
    assert _card(residual_lowpass_mm=0.0).lowpass_for(15.0) == 0.0, "no put-back at all"
    assert _card(residual_lowpass_mm=1.0).lowpass_for(1.0) == 1.0, "never narrower than the card's width"


def test_group_scales_fall_back_to_the_pooled_scale() -> None:
    card = _card()
    assert card.scale_for("thorax") == 1.2
    assert card.scale_for("other") == 1.5


def test_blend_takes_one_width_per_slice() -> None:
    rng = np.random.default_rng(1)
    volume = rng.normal(0, 30, (3, 64, 64)).astype(np.float32)
    restored = np.zeros_like(volume)
    out = data_consistent(volume, restored, [0.0, 1.0, 3.0], (1.0, 1.0, 1.0))
    assert np.array_equal(out[0], restored[0]), "width 0 leaves the slice as it is"
    assert out[1].std() > out[2].std() > 0, "a wider low-pass puts back less noise"
    assert np.allclose(data_consistent(volume, restored, 1.0)[1], out[1])


def test_slice_facts_tell_a_chest_slice_from_a_head_slice() -> None:
    from models.sim.ldct import make_case

    chest = make_case("chest", 3, size=256, dose=0.25, level=0.5)
    head = make_case("head", 3, size=256, dose=0.25, level=0.5)
    low_dose = make_case("head", 3, size=256, dose=0.08, level=0.5)
    assert slice_facts(chest.low_dose_hu).group == "thorax"
    assert slice_facts(head.low_dose_hu).group == "other"
    assert slice_facts(low_dose.low_dose_hu).noise_hu > 1.3 * slice_facts(head.low_dose_hu).noise_hu


def test_prediction_uses_the_group_scale_and_records_the_slice_facts(tmp_path: Path) -> None:
    shipped = RestorationModel.shipped()
    copy = tmp_path / "model"
    shutil.copytree(shipped.directory, copy)
    card = json.loads((copy / "card.json").read_text())
    card.pop("sigma_adaptive", None)  # the group scale alone here; the adaptive factor below
    (copy / "card.json").write_text(json.dumps(card))
    rng = np.random.default_rng(0)
    volume = np.full((1, 96, 96), 40.0, np.float32) + rng.normal(0, 30, (1, 96, 96)).astype(np.float32)
    base = RestorationModel(copy).predict(volume, (1.0, 0.7, 0.7))
    card["sigma_scale_by_group"] = {"other": 2 * RestorationModel(copy).meta.scale_for("other")}
    (copy / "card.json").write_text(json.dumps(card))
    model = RestorationModel(copy)
    doubled = model.predict(volume, (1.0, 0.7, 0.7))
    assert [f.group for f in model.last_facts] == ["other"]
    assert np.allclose(doubled.sigma, 2 * base.sigma, rtol=1e-5)
    # the shipped card's σ also follows the slice's coarse noise: network σ × group scale ×
    # the adaptive factor of the slice's measured coarse noise over its median scaled σ
    if shipped.meta.sigma_adaptive:
        adaptive = shipped.predict(volume, (1.0, 0.7, 0.7))
        scaled = shipped.predict_raw(volume)[1][0] * shipped.meta.scale_for("other")
        median = float(np.median(scaled[volume[0] > BODY_HU]))
        factor = adaptive_factor(shipped.last_facts[0], median, shipped.meta.sigma_adaptive)
        assert shipped.last_facts[0].coarse_noise_hu > 0 and factor != 1.0
        assert np.allclose(adaptive.sigma[0], scaled * factor, rtol=1e-5)


def test_a_site_pins_the_restoration_model_in_the_config_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.config import ConfigError, load_config
    from models.zoo import version_dir, versions
    from pipelines.registry import get_pipeline

    def chosen() -> str:
        directory = load_config(None, tmp_path).config.models.directory("restoration")
        assert directory is not None
        return RestorationModel(directory).card.version

    assert chosen() == versions("ldct-restoration")[-1], "default: the newest version"
    (tmp_path / "dicom-node.toml").write_text('[models]\npin = { restoration = "1.1" }\n')
    assert chosen() == "1.1"
    monkeypatch.setenv("DICOM_NODE_RESTORATION_MODEL", str(version_dir("ldct-restoration", "1.0")))
    assert chosen() == "1.0", "the environment overrides the file"
    monkeypatch.setenv("DICOM_NODE_RESTORATION_MODEL", "/nonexistent/model")
    with pytest.raises(ConfigError, match="is not a model directory.*DICOM_NODE_RESTORATION_MODEL"):
        load_config(None, tmp_path)
    # the pipeline is built with the directory the config chose
    pipeline = get_pipeline("restoration", version_dir("ldct-restoration", "1.1"))
    assert {s.model.card.version for s in pipeline.stages if hasattr(s, "model")} == {"1.1"}
