"""After the demo, `audit report --study` tells the whole story and the FHIR export
validates in R5 and in R4B (the issue-3 acceptance, on the demo's real run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

# the embedded defaults (SQLite in the home), whatever --database says
pytestmark = [pytest.mark.integration, pytest.mark.own_database]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, timeout=300
    )


def test_report_and_fhir_export_after_demo(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    demo = cli("demo", "--home", str(home), "--pipeline", "forward", "--slices", "24")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    study_uid = re.search(r"│ study\s+│ ([0-9.]+)", demo.stdout)
    assert study_uid, demo.stdout
    study = study_uid.group(1)

    report = cli("audit", "report", "--study", study, "--home", str(home))
    assert report.returncode == 0, report.stderr
    text = report.stdout
    assert "24 instance(s) stored" in text
    assert "job 1: pipeline forward" in text and "now delivered" in text
    assert "pipeline forward 1.0; model: none" in text
    assert text.count("        1.2.826.0.1.3680043.8.498.") == 24, "every output SOP Instance UID is listed"
    assert re.search(r"→ pacs: delivered; confirmed: C-STORE success for every instance", text)
    assert "attempt 1 at" in text and "delivered, 24 sent" in text

    as_json = json.loads(cli("audit", "report", "--study", study, "--home", str(home), "--json").stdout)
    assert as_json["received_instances"] == 24
    assert as_json["deliveries"][0]["result"] == "delivered"

    from fhir.resources.bundle import Bundle as BundleR5
    from fhir.resources.R4B.bundle import Bundle as BundleR4B

    for fmt, bundle_class in (("fhir-r5", BundleR5), ("fhir-r4b", BundleR4B)):
        out = tmp_path / f"{fmt}.json"
        exported = cli("audit", "export", "--format", fmt, "--out", str(out), "--home", str(home))
        assert exported.returncode == 0, exported.stderr
        bundle = json.loads(out.read_text())
        bundle_class.model_validate(bundle)  # raises if not valid for that FHIR version
        kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
        assert kinds.count("Provenance") == 1 and kinds.count("AuditEvent") > 30

    xml = cli("audit", "export", "--format", "dicom-xml", "--study", study, "--home", str(home))
    assert xml.returncode == 0 and xml.stdout.startswith("<?xml") and "110104" in xml.stdout

    verify = cli("audit", "verify", "--home", str(home))
    assert verify.returncode == 0 and "audit log intact" in verify.stdout
