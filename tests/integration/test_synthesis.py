"""Diagnostic synthesis end to end, with the shipped policy (issue 18's acceptance).

A SIMULATED brain MR study with T1w and T2w but no FLAIR is sent to the node by ``storescu``.
The shipped rule ``brain-mr-missing-flair`` picks it, ``synthesis`` writes a synthetic FLAIR,
and the job is held for review. Nothing leaves before the approval; afterwards Orthanc holds,
under the study, the synthetic FLAIR (SYNTHETIC, Synthetic Data YES), the σ and hallucination
Parametric Maps, the suspect-region SEG, the overlay and the SR; every object passes dciodvfy
(less dicom3tools' stale-dictionary report of Synthetic Data) and the audit chain verifies.
A second study with every expected contrast (T1w, T2w, FLAIR) starts no job.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.delivery.tps import dciodvfy_errors
from dicom_node.lab.simulate_synthesis import SynthesisSpec, write_synthesis_study
from tests.conftest import audit_rows, db_rows, node_config
from tests.peers import NodeProcess, Orthanc, free_port, storescu

pytestmark = pytest.mark.integration

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
NODE_AE = "SYNNODE"
DESCRIPTION = "AI SYNTHETIC FLAIR from T1w+T2w - not acquired"


def _jobs(node: NodeProcess) -> list[tuple[Any, ...]]:
    return db_rows(node, "select id, state, reason, pipeline from jobs order by id")


def _wait_job(node: NodeProcess, states: set[str], timeout: float) -> tuple[Any, ...]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _jobs(node)
        if rows and rows[0][1] in states:
            return rows[0]
        time.sleep(0.5)
    raise AssertionError(f"no job reached {states} in {timeout} s: {db_rows(node, 'select * from jobs')}")


def test_a_study_without_flair_gets_a_reviewed_synthetic_flair_and_a_complete_one_gets_none(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    pacs = orthanc
    _, study = write_synthesis_study(tmp_path / "sim", SynthesisSpec(seed=30002))
    _, complete = write_synthesis_study(
        tmp_path / "complete", SynthesisSpec(seed=30003, missing=()), patient_id="SIM-SYN-0002"
    )
    config = (
        f'[node]\nae_title = "{NODE_AE}"\n'
        + node_config(pacs, stable_seconds=1.0)
        + f"""
[destinations.tps]
ae_title = "NO_TPS"
host = "127.0.0.1"
port = {free_port()}
profile = "tps"

[archives.pacs]
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
"""
    )
    node = NodeProcess(tmp_path / "home", config, ae_title=NODE_AE, policy=DEFAULT_POLICY.read_text()).start()
    try:
        files = [p for s in study.acquired.values() for p in s.files]
        sent = storescu(files, node.port, NODE_AE, calling="MR_SCANNER")
        assert sent.returncode == 0, sent.stderr
        job_id, state, reason, pipeline = _wait_job(node, {"held", "failed", "refused", "delivered"}, 300)
        assert (state, pipeline) == ("held", "synthesis"), reason
        assert "the rule requires review" in reason
        shown = node.cli_json("review", "show", str(job_id))
        assert shown["qc"]["mean calibrated sigma in brain"] > 0
        assert "largest suspect region" in shown["qc"]
        time.sleep(2)  # several outbox polls: nothing leaves before the review
        assert db_rows(node, "select count(*) from deliveries") == [(0,)]
        assert pacs.statistics()["CountInstances"] == 0

        approved = node.cli(
            "review", "approve", str(job_id), "--reviewer", "dr-neuro", "--note", "read with care"
        )
        assert "approved by dr-neuro" in approved.stdout
        job_id, state, reason, _ = _wait_job(node, {"delivered", "failed"}, 120)
        assert state == "delivered", reason

        outputs = db_rows(
            node, "select series_uid, sop_class_uid, path from job_outputs where job_fk = ?", (job_id,)
        )
        in_pacs = pacs.series_of_study(study.study_uid)
        assert {s["MainDicomTags"]["SeriesInstanceUID"] for s in in_pacs} == {o[0] for o in outputs}
        assert sum(len(s["Instances"]) for s in in_pacs) == len(outputs)
        by_description = {s["MainDicomTags"].get("SeriesDescription", ""): s for s in in_pacs}
        flair = by_description[DESCRIPTION]
        assert len(flair["Instances"]) == len(study.acquired["t1w"].files)
        ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(flair["Instances"][0])), stop_before_pixels=True)
        assert ds.Modality == "MR" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SyntheticData == "YES" and ds.FrameOfReferenceUID == study.frame_of_reference_uid
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in in_pacs)
        assert modalities == ["MR", "OT", "OT", "OT", "SEG", "SR"]  # σ, hallucination, overlay

        checked: dict[str, int] = {}
        for series_uid, sop_class, path in outputs:
            if checked.get(series_uid, 0) >= 3:
                continue
            checked[series_uid] = checked.get(series_uid, 0) + 1
            assert dciodvfy_errors(Path(path)) == [], (path, sop_class)

        # the complete study: stored, no rule matches, no job
        files = [p for s in complete.acquired.values() for p in s.files]
        sent = storescu(files, node.port, NODE_AE, calling="MR_SCANNER")
        assert sent.returncode == 0, sent.stderr
        node.wait_for(lambda: len(audit_rows(node, "study-not-routed")) == 1, what="not routed")
        assert len(_jobs(node)) == 1, _jobs(node)
        assert node.cli("audit", "verify").returncode == 0
    finally:
        node.stop()
