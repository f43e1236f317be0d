"""Application logs carry UIDs and ids, never patient names or birth dates — checked on a
full run at DEBUG level: receive, quarantine, readiness, job, delivery, retry, audit reads.

Everything the node writes is scanned: its log file and what ``serve`` and its workers
print to stdout and stderr (journald under systemd), library warnings included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.conftest import node_config, require
from tests.peers import STORESCU, NodeProcess, Orthanc, policy_yaml, storescu

pytestmark = pytest.mark.integration

NAME_PARTS = ("ZELDAPHI", "QUIXOTEPHI")
BIRTH_DATE = "19370412"
#: No caret: highdicom warns about such a name, quoting it, when the pipeline builds its
#: Parametric Maps, SEG, SR and SC from the source.
PATIENT_NAME = f"{NAME_PARTS[0]} {NAME_PARTS[1]}"


def test_patient_name_and_birth_date_never_reach_the_logs(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    study = write_ct_series(
        tmp_path / "ct",
        PhantomSpec(rows=64, columns=64, slices=8, seed=9),
        patient_name=PATIENT_NAME,
        patient_birth_date=BIRTH_DATE,
        patient_id="PHI-TEST-1",
    )
    # A copy of one slice with half its pixel data, so the quarantine path logs too (a file
    # cut mid-element would never leave storescu, which reads the whole file first).
    broken = tmp_path / "broken"
    broken.mkdir()
    cut = pydicom.dcmread(study.files[0])
    cut.PixelData = cut.PixelData[: len(cut.PixelData) // 2]
    cut.save_as(broken / "cut.dcm")

    config = node_config(orthanc, stable_seconds=1) + '\n[logging]\nlevel = "DEBUG"\n'
    node = NodeProcess(tmp_path / "node", config, policy=policy_yaml("denoise-classical")).start()
    cli_stderr: list[str] = []
    try:
        assert storescu(tmp_path / "ct", node.port, node.ae_title).returncode == 0
        refused = storescu(broken, node.port, node.ae_title, extra=["-d"])  # -d: the response in full
        assert "(0000,0902) LO [pixel data truncated" in refused.stdout + refused.stderr
        node.wait_for(
            lambda: [j for j in node.cli_json("jobs") if j["state"] == "delivered"], what="delivered"
        )
        for args in (
            ["audit", "report", "--study", study.study_uid],
            ["audit", "search", "--patient", "PHI-TEST-1"],
        ):
            done = subprocess.run(
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
                text=True,
            )
            cli_stderr.append(done.stderr)
    finally:
        node.stop()
    log_file = (node.home / "var" / "log" / "dicom-node.log").read_text()
    printed = node.stdout.read_text()  # serve's and its workers' stdout and stderr
    assert "DEBUG" in log_file and study.study_uid in log_file, (
        "the log is verbose and names the study by UID"
    )
    assert "quarantined" in log_file
    for where, text in (
        ("the log file", log_file),
        ("serve's stderr", printed),
        ("CLI stderr", "".join(cli_stderr)),
        ("storescu's output (Error Comment)", refused.stdout + refused.stderr),
    ):
        for needle in (*NAME_PARTS, BIRTH_DATE, "1937-04-12"):
            assert needle not in text, f"{needle!r} leaked into {where}"
    # The run did provoke highdicom's warning about the caret-less name: it came through the log.
    assert "UserWarning from highdicom" in printed
    # The quarantine reason file sits next to the data, not in the log; it has no name either.
    for reason in (node.home / "var" / "quarantine").glob("*.reason.txt"):
        assert not any(part in reason.read_text() for part in NAME_PARTS)
