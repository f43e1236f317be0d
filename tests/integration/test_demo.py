"""`dicom-node demo` runs the main job end to end and exits 0 (what `make demo` runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# the embedded defaults (SQLite in the home), whatever --database says
pytestmark = [pytest.mark.integration, pytest.mark.own_database]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "demo", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # 12 restored slices + uncertainty map, hallucination map, SEG, SR and overlay
    assert "job 1 ran `restoration`, PACS confirms 17 instances in 6 series" in out
    assert "SIMULATED" in out  # every figure shown is labelled as computed on simulated data
    assert "delivered after 1 attempt(s)" in out
    assert str(home / "var" / "audit.db") in out
    # It cleans up after itself: nothing it started is left running.
    leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def reviewed_demo(tmp_path: Path, pipeline: str) -> str:
    """Run `dicom-node demo --pipeline PIPELINE`; its stdout once it exited 0 and left nothing
    running."""
    home = tmp_path / "demo-home"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "demo", "--home", str(home), "--pipeline", pipeline],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
    return result.stdout


def test_the_prognosis_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`dicom-node demo --pipeline prognosis` (`make demo PIPELINE=prognosis`): priors in the
    archive, the current visit sent, held, approved, delivered; figures labelled SIMULATED."""
    out = reviewed_demo(tmp_path, "prognosis")
    assert "job 1 ran `prognosis`, nothing has left the node" in out
    assert "approved by demo-reviewer: 12 delivery(ies) queued" in out
    assert "delivered: 74 instances in 12 series" in out  # 2 x 32 predicted slices + 10 objects
    assert "AI PREDICTED T1c follow-up at +90 days - not an acquisition" in out
    assert "SIMULATED" in out


def test_the_synthesis_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`dicom-node demo --pipeline synthesis` (`make demo PIPELINE=synthesis`): a brain MR study
    without FLAIR sent, held, approved, delivered; figures labelled SIMULATED."""
    out = reviewed_demo(tmp_path, "synthesis")
    assert "job 1 ran `synthesis`, nothing has left the node" in out
    assert "approved by demo-reviewer: 6 delivery(ies) queued" in out
    # 32 synthetic FLAIR slices + sigma and hallucination maps, SEG, SR, overlay (the acquired
    # series went to the node only)
    assert "delivered: 37 instances in 6 series" in out
    assert "AI SYNTHETIC FLAIR from T1w+T2w - not acquired" in out
    assert "SIMULATED" in out
