"""The evaluation orchestration runs end to end (tiny, SIMULATED set) and writes its report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_evaluate_restoration_cli_writes_summary_and_report(tmp_path: Path) -> None:
    report = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "evaluate", "restoration", "--report", str(report)]
        + ["--cases", "2", "--size", "128", "--no-bm3d"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((report / "summary.json").read_text())
    assert "SIMULATED" in summary["note"]
    assert set(summary["doses"]) == {"dose 0.25", "dose 0.1"}
    for dose in summary["doses"].values():
        assert set(dose["psnr_db"]) >= {"low-dose input", "Gaussian", "non-local means", "model"}
        assert all(math.isfinite(v) for v in dose["psnr_db"].values())
        assert 0.0 <= dose["coverage_90"] <= 1.0
    # the hallucination protocol runs at the acceptance dose (0.25)
    aurocs = summary["doses"]["dose 0.25"]["hallucination_auroc"]
    assert {"inserted 60 HU r3", "inserted 30 HU r2.5"} <= set(aurocs)
    assert all(0.0 <= v <= 1.0 for v in aurocs.values())
    assert summary["inference_slices_per_s_512"] > 0
    html = (report / "report.html").read_text()
    assert "simulated" in html.lower()
    results = json.loads((report / "report.json").read_text())
    assert results["simulated_data"] and results["results"]["nps"], (
        "the noise power spectra are in the report"
    )
