"""dcmtk storescu → dicom-node serve → forward job → a real Orthanc (REST-checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from dicom_node.ingest.part10 import split_part10
from tests.conftest import audit_rows, db_rows, node_config, require
from tests.peers import STORESCU, NodeProcess, Orthanc, storescu

pytestmark = pytest.mark.integration


def test_storescu_study_is_stored_indexed_and_forwarded(tmp_path: Path, orthanc: Orthanc, ct50: Path) -> None:
    require(STORESCU)
    node = NodeProcess(tmp_path / "node", node_config(orthanc)).start()
    try:
        sent = storescu(ct50, node.port, node.ae_title)
        assert sent.returncode == 0, sent.stderr

        # Every file is on disk with the data set as sent, and indexed with its sha256.
        node.wait_for(
            lambda: db_rows(node, "select count(*) from instances")[0][0] == 50, timeout=30, what="50 rows"
        )
        rows = db_rows(node, "select sop_uid, path, sha256, calling_ae from instances")
        by_sop = {r[0]: r for r in rows}
        for source in sorted(ct50.iterdir()):
            src_meta, src_data = split_part10(source.read_bytes())
            sop = str(src_meta.MediaStorageSOPInstanceUID)
            stored = node.home / "var" / "data" / by_sop[sop][1]
            meta, data = split_part10(stored.read_bytes())
            assert data == src_data, f"{source.name}: data set bytes differ"
            assert str(meta.TransferSyntaxUID) == str(src_meta.TransferSyntaxUID)
            assert by_sop[sop][3] == "STORESCU"
        studies = node.cli_json("studies")
        assert len(studies) == 1
        study = studies[0]
        assert study["instances"] == 50 and study["series"] == 1
        assert study["modalities"] == ["CT"] and study["patient_id"] == "SIM-CT50"

        # The study becomes ready and the forward job delivers it.
        node.wait_for(
            lambda: [j for j in node.cli_json("jobs") if j["state"] == "delivered"],
            timeout=90,
            what="job delivered",
        )
        jobs = node.cli_json("jobs")
        assert [j["pipeline"] for j in jobs] == ["forward"]
        assert jobs[0]["inputs"] == 50
        assert node.cli_json("studies")[0]["state"] == "delivered"

        # Orthanc holds the whole series, with the same pixel data.
        series = orthanc.series_of_study(study["study_uid"])
        assert len(series) == 1
        assert len(series[0]["Instances"]) == 50
        one = orthanc.instance_file(series[0]["Instances"][0])
        ds = pydicom.dcmread(__import__("io").BytesIO(one))
        source = next(f for f in ct50.iterdir() if pydicom.dcmread(f).SOPInstanceUID == ds.SOPInstanceUID)
        assert ds.PixelData == pydicom.dcmread(source).PixelData

        # The audit trail holds the association, every instance, the job and the delivery.
        assert len(audit_rows(node, "instance-stored")) == 50
        assert audit_rows(node, "association-accepted")
        assert audit_rows(node, "study-ready")
        # (the audit record of a transition follows its commit by milliseconds)
        node.wait_for(lambda: len(audit_rows(node, "job-transition")) == 5, timeout=10, what="5 transitions")
        transitions = [json.loads(r[5])["to_state"] for r in audit_rows(node, "job-transition")]
        assert transitions == ["queued", "running", "succeeded", "delivering", "delivered"]
        attempts = audit_rows(node, "delivery-attempt")
        assert attempts and json.loads(attempts[-1][5])["result"] == "delivered"
    finally:
        node.stop()


def test_instances_after_a_job_started_open_a_new_job_version(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    first = write_ct_series(tmp_path / "first", PhantomSpec(rows=64, columns=64, slices=10, seed=3))
    late = write_ct_series(
        tmp_path / "late", PhantomSpec(rows=64, columns=64, slices=5, seed=4), study_uid=first.study_uid
    )
    node = NodeProcess(tmp_path / "node", node_config(orthanc, stable_seconds=1)).start()
    try:
        assert storescu(tmp_path / "first", node.port, node.ae_title).returncode == 0
        node.wait_for(
            lambda: [j for j in node.cli_json("jobs") if j["state"] == "delivered"], what="v1 delivered"
        )
        assert storescu(tmp_path / "late", node.port, node.ae_title).returncode == 0

        def two_delivered() -> bool:
            jobs = node.cli_json("jobs")
            return len(jobs) == 2 and all(j["state"] == "delivered" for j in jobs)

        node.wait_for(two_delivered, what="v2 delivered")
        jobs = node.cli_json("jobs")
        assert [(j["study_version"], j["inputs"]) for j in jobs] == [(1, 10), (2, 15)]
        study = node.cli_json("studies")[0]
        assert study["instances"] == 15 and study["series"] == 2 and study["version"] == 2
        in_pacs = {s["MainDicomTags"]["SeriesInstanceUID"] for s in orthanc.series_of_study(first.study_uid)}
        assert in_pacs == {first.series_uid, late.series_uid}
    finally:
        node.stop()
