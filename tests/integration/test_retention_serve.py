"""Retention in a running node: ``serve`` applies ``[retention]`` on its timer, and a study
sent again by dcmtk ``storescu`` after its files were removed is stored again (a new
version, its folders made anew), not acknowledged as a duplicate of nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.runtime import Runtime
from tests.peers import NODE_ENV, NodeProcess, storescu
from tests.test_archives import mr_instance

pytestmark = pytest.mark.integration


def _studies(node: NodeProcess) -> dict[str, dict]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "studies",
            "--home",
            str(node.home),
            "--config",
            str(node.config_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=NODE_ENV,
        timeout=60,
        check=True,
    )
    return {s["study_uid"]: s for s in json.loads(out.stdout)}


def _wait(node: NodeProcess, study: str, test, seconds: float = 60) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.time() + seconds
    row: dict = {}
    while time.time() < deadline:
        row = _studies(node).get(study, {})
        if row and test(row):
            return row
        time.sleep(0.5)
    raise AssertionError(f"study {study} never got there: {row}")


def test_serve_removes_an_old_study_and_takes_it_again(tmp_path: Path) -> None:
    source = tmp_path / "study"
    source.mkdir()
    study, series = generate_uid(), generate_uid()
    for k in range(3):
        mr_instance("RET1", study, series, k + 1, "20240601").save_as(
            source / f"{k}.dcm", enforce_file_format=True
        )
    # keep_days 0.0002 d is about 17 s: long enough to see the study stored first
    config = "[retention]\nkeep_days = 0.0002\ncheck_minutes = 0.03\n"
    node = NodeProcess(tmp_path / "node", config).start()
    studies_dir = node.home / "var" / "data" / "studies" / study
    try:
        sent = storescu(source, node.port, node.ae_title)
        assert sent.returncode == 0, sent.stderr
        _wait(node, study, lambda r: r["instances"] == 3)
        assert len(list(studies_dir.rglob("*.dcm"))) == 3
        _wait(node, study, lambda r: r["state"] == "purged")
        assert not studies_dir.exists()

        again = storescu(source, node.port, node.ae_title)  # same bytes, same UIDs
        assert again.returncode == 0, again.stderr
        row = _wait(node, study, lambda r: r["state"] != "purged" and r["instances"] == 3, seconds=15)
        assert row["purged_at"] is None
        assert sorted(p.name.split(".v")[-1] for p in studies_dir.rglob("*.dcm")) == ["2.dcm"] * 3
    finally:
        node.stop()
    runtime = Runtime.open(node.config_path, node.home)
    try:
        from audit import AuditEvent

        purged = runtime.audit.events(AuditEvent.STUDY_PURGED)
        assert [r.study_uid for r in purged][:1] == [study]
        assert purged[0].facts["instances"] == 3
    finally:
        runtime.close()
