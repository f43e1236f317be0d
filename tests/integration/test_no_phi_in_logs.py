"""Application logs carry UIDs and ids, never patient names or birth dates — checked on a
full run at DEBUG level: receive, quarantine, readiness, job, delivery, retry, audit reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import node_config, require
from tests.peers import STORESCU, NodeProcess, Orthanc, storescu

pytestmark = pytest.mark.integration

NAME_PARTS = ("ZELDAPHI", "QUIXOTEPHI")
BIRTH_DATE = "19370412"


def test_patient_name_and_birth_date_never_reach_the_logs(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    study = write_ct_series(
        tmp_path / "ct",
        PhantomSpec(rows=64, columns=64, slices=8, seed=9),
        patient_name=f"{NAME_PARTS[0]}^{NAME_PARTS[1]}",
        patient_birth_date=BIRTH_DATE,
        patient_id="PHI-TEST-1",
    )
    # A truncated copy of one slice, so the quarantine path logs too.
    broken = tmp_path / "broken"
    broken.mkdir()
    raw = study.files[0].read_bytes()
    (broken / "cut.dcm").write_bytes(raw[: len(raw) - 1000])

    config = node_config(orthanc, stable_seconds=1) + '\n[logging]\nlevel = "DEBUG"\n'
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        assert storescu(tmp_path / "ct", node.port, node.ae_title).returncode == 0
        storescu(broken, node.port, node.ae_title)  # refused: fine
        node.wait_for(
            lambda: [j for j in node.cli_json("jobs") if j["state"] == "delivered"], what="delivered"
        )
        for args in (
            ["audit", "report", "--study", study.study_uid],
            ["audit", "search", "--patient", "PHI-TEST-1"],
        ):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dicom_node",
                    *args,
                    "--home",
                    str(node.home),
                    "--config",
                    str(node.config_path),
                ],
                check=True,
                capture_output=True,
            )
    finally:
        node.stop()
    logs = node.log_text()
    assert "DEBUG" in logs and study.study_uid in logs, "the log is verbose and names the study by UID"
    for needle in (*NAME_PARTS, BIRTH_DATE, "1937-04-12"):
        assert needle not in logs, f"{needle!r} leaked into the application log"
    # The quarantine reason file sits next to the data, not in the log; it has no name either.
    for reason in (node.home / "var" / "quarantine").glob("*.reason.txt"):
        assert not any(part in reason.read_text() for part in NAME_PARTS)
