"""`dicom-node demo` runs the main job end to end and exits 0 (what `make demo` runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


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
