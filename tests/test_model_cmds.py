"""`dicom-node models`: which versions exist, which one runs, and the weights hash check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from models import zoo

runner = CliRunner()


def test_list_says_which_version_each_pipeline_runs() -> None:
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    running = {r["name"]: r["version"] for r in rows if r["runs_in"]}
    assert running["ldct-restoration"] == zoo.versions("ldct-restoration")[-1]
    assert running["sct-head"] == zoo.versions("sct-head")[-1]
    assert {r["runs_in"] for r in rows if r["runs_in"]} >= {"restoration", "sct"}
    assert all(r["weights_ok"] for r in rows)
    assert sum(1 for r in rows if r["name"] == "ldct-restoration" and r["runs_in"]) == 1, (
        "older versions do not run"
    )


def test_a_pin_is_shown_instead_of_the_newest_and_its_weights_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "sct-site"
    shutil.copytree(zoo.version_dir("sct-head"), site)
    monkeypatch.setenv("DICOM_NODE_SCT_MODEL", str(site))
    rows = json.loads(runner.invoke(app, ["models", "list", "--json", "--home", str(tmp_path)]).output)
    shipped, pinned = [r for r in rows if r["name"] == "sct-head"]
    assert shipped["runs_in"] is None and shipped["directory"] == str(zoo.version_dir("sct-head"))
    assert (pinned["runs_in"], pinned["directory"]) == ("sct", str(site))
    assert pinned["pinned_by"] == f"DICOM_NODE_SCT_MODEL={site}" and pinned["weights_ok"]
    # a pin's weights are checked like the zoo's
    weights = site / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    result = runner.invoke(app, ["models", "list", "--home", str(tmp_path)])
    assert result.exit_code == 1
    assert f"weights do not match their model card: sct-head 1.0 ({site})" in result.output


def test_a_pin_in_the_config_file_and_a_pin_that_names_nothing(tmp_path: Path) -> None:
    (tmp_path / "dicom-node.toml").write_text('[models]\npin = { restoration = "1.1" }\n')
    rows = json.loads(runner.invoke(app, ["models", "list", "--json", "--home", str(tmp_path)]).output)
    running = {r["name"]: (r["version"], r["pinned_by"]) for r in rows if r["runs_in"] == "restoration"}
    assert running == {"ldct-restoration": ("1.1", "[models] pin.restoration = '1.1'")}
    (tmp_path / "dicom-node.toml").write_text('[models]\npin = { restoration = "9.9" }\n')
    result = runner.invoke(app, ["models", "list", "--home", str(tmp_path)])
    assert result.exit_code == 2
    assert "pin.restoration: no version '9.9' of ldct-restoration" in result.output
    assert "Traceback" not in result.output


def test_tampered_weights_are_reported_and_fail_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "zoo" / "ldct-restoration" / "9.9"
    shutil.copytree(zoo.version_dir("ldct-restoration"), copy)
    weights = copy / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    monkeypatch.setattr(zoo, "ZOO", tmp_path / "zoo")
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 1
    assert "MISMATCH" in result.output
    assert "weights do not match their model card: ldct-restoration 9.9" in result.output


def test_show_prints_the_card_and_the_evaluation() -> None:
    result = runner.invoke(app, ["models", "show", "ldct-restoration", "--version", "1.2"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["card"]["version"] == "1.2" and shown["check"]["weights_ok"]
    assert shown["evaluation"]["doses"]["dose 0.1"]["psnr_gain_over_input_db"] >= 6
    assert "SIMULATED" in shown["evaluation"]["note"]
    missing = runner.invoke(app, ["models", "show", "ldct-restoration", "--version", "0.1"])
    assert missing.exit_code == 1 and "has no version '0.1'" in missing.output
    unknown = runner.invoke(app, ["models", "show", "nope"])
    assert unknown.exit_code == 1 and "no model 'nope'" in unknown.output
