"""The job runner builds each pipeline once per worker process, with the model the config chose."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from audit import AuditEvent
from dicom_node.config import NodeConfig
from dicom_node.delivery.profiles import DestinationProfiles
from dicom_node.jobs.runner import JobRunner
from dicom_node.runtime import Runtime
from models import zoo
from pipelines.base import PipelineError


def _runner(tmp_path: Path, config: NodeConfig) -> tuple[JobRunner, Runtime]:
    rt = Runtime.open(None, tmp_path / "home")
    return JobRunner(config, rt.paths, rt.db, rt.audit, "test-worker", DestinationProfiles(config)), rt


def test_a_model_is_loaded_and_hash_checked_once_per_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[Path] = []
    real = zoo.sha256_of
    monkeypatch.setattr(zoo, "sha256_of", lambda path: checks.append(Path(path)) or real(path))
    config = NodeConfig.model_validate({"models": {"pin": {"restoration": "1.1"}}})
    runner, rt = _runner(tmp_path, config)
    try:
        first = runner.pipeline("restoration")
        assert runner.pipeline("restoration") is first  # the next job reuses it
        assert checks == [zoo.version_dir("ldct-restoration", "1.1") / "weights.safetensors"]
        assert {s.model.card.version for s in first.stages if hasattr(s, "model")} == {"1.1"}
        (loaded,) = rt.audit.events(AuditEvent.MODEL_LOADED)
        assert (loaded.actor, loaded.facts["pipeline"], loaded.facts["version"]) == (
            "test-worker",
            "restoration",
            "1.1",
        )
        assert (
            loaded.facts["weights_sha256"]
            == zoo.read_card(zoo.version_dir("ldct-restoration", "1.1"))["weights_sha256"]
        )
    finally:
        rt.close()


def test_a_pinned_model_that_went_away_fails_the_job_in_one_line(tmp_path: Path) -> None:
    site = tmp_path / "site-model"
    shutil.copytree(zoo.version_dir("ldct-restoration"), site)
    config = NodeConfig.model_validate({"models": {"pin": {"restoration": str(site)}}})
    (site / "card.json").unlink()
    runner, rt = _runner(tmp_path, config)
    try:
        with pytest.raises(PipelineError, match=r"^\[models\] pin.restoration: .* is not a model directory"):
            runner.pipeline("restoration")
    finally:
        rt.close()
    tampered = tmp_path / "tampered"
    shutil.copytree(zoo.version_dir("ldct-restoration"), tampered)
    blob = bytearray((tampered / "weights.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (tampered / "weights.safetensors").write_bytes(bytes(blob))
    config = NodeConfig.model_validate({"models": {"pin": {"restoration": str(tampered)}}})
    runner, rt = _runner(tmp_path / "2", config)
    try:
        with pytest.raises(
            PipelineError, match="its model cannot be loaded: .* does not match the model card"
        ):
            runner.pipeline("restoration")
    finally:
        rt.close()
