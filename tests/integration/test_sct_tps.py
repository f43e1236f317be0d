"""Synthetic CT to the TPS end to end, with real programs on loopback.

The planning MR (a SIMULATED T1-weighted head, 12 slices of 128×128) is sent by dcmtk
``storescu`` as ``RT_MR_PLANNING``; the shipped ``policies/default.yaml`` routes it to the
``sct`` pipeline with gate ``review``; the job is held until ``dicom-node review approve``;
then the sCT series alone goes to Orthanc configured as a ``tps`` destination with storage
commitment, and is ``delivered`` only once Orthanc's N-EVENT-REPORT commits every instance.
Orthanc's REST API shows a CT series on the MR's frame of reference.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage

from dicom_node.lab.simulate import SctSpec, write_sct_study
from tests.conftest import audit_rows, db_rows, require, tps_config
from tests.peers import STORESCU, NodeProcess, Orthanc, free_port, storescu

pytestmark = pytest.mark.integration

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
SLICES = 12


def test_planning_mr_to_sct_held_for_review_then_committed_by_the_tps(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    require(STORESCU)
    mr, _reference = write_sct_study(tmp_path / "study", SctSpec(slices=SLICES, size=256, seed=11))
    port = free_port()
    orthanc.register_modality("dicom-node", "DICOM_NODE", port)  # to report the commitment back
    no_pacs = f"""
[destinations.pacs]
ae_title = "NO_PACS"
host = "127.0.0.1"
port = {free_port()}

# the shipped policy's prognosis rule queries an archive named pacs (unused here)
[archives.pacs]
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
method = "c-get"
"""
    config = tps_config(orthanc, extra=no_pacs)
    node = NodeProcess(tmp_path / "node", config, port=port, policy=DEFAULT_POLICY.read_text()).start()
    try:
        assert storescu(list(mr.files), node.port, node.ae_title, calling="RT_MR_PLANNING").returncode == 0
        node.wait_for(
            lambda: db_rows(node, "select state from jobs") == [("held",)], timeout=120, what="sct job held"
        )
        (job,) = db_rows(node, "select id, pipeline, reason from jobs")
        assert job[1] == "sct" and "the rule requires review" in job[2], job
        shown = node.cli_json("review", "show", str(job[0]))
        assert shown["qc"]["mean sigma at bone/air interfaces"] > 0
        time.sleep(2)  # several outbox polls: nothing leaves before the review
        assert db_rows(node, "select count(*) from deliveries") == [(0,)]
        assert orthanc.statistics()["CountInstances"] == 0

        approved = node.cli(
            "review", "approve", str(job[0]), "--reviewer", "dr-physicist", "--note", "sCT ok"
        )
        assert "approved by dr-physicist: 1 delivery(ies) queued" in approved.stdout
        node.wait_for(
            lambda: db_rows(node, "select state from jobs") == [("delivered",)], timeout=90, what="delivered"
        )

        # One delivery: the sCT to the TPS (the maps, SEG, SR and overlay are not for a TPS).
        sct_series = db_rows(
            node,
            "select distinct series_uid from job_outputs where sop_class_uid = ?",
            (CTImageStorage,),
        )
        assert len(sct_series) == 1
        (delivery,) = db_rows(
            node, "select series_uid, destination, state, attempts, delivered_at from deliveries"
        )
        assert delivery[:4] == (sct_series[0][0], "tps", "delivered", 1)
        (commitment,) = db_rows(
            node,
            "select state, reported_by, committed, failed, reported_at from storage_commitments",
        )
        assert commitment[:4] == ("committed", "ORTHANC", SLICES, 0)
        assert commitment[4] <= delivery[4]  # delivered only once Orthanc had committed
        (result,) = audit_rows(node, "storage-commitment-result")
        facts = json.loads(result[5])
        assert (facts["result"], facts["committed"], facts["failed"]) == ("committed", SLICES, 0)
        assert audit_rows(node, "delivery-refused") == []

        # Orthanc (the TPS) holds the sCT: a CT series in HU on the MR's frame of reference.
        (series,) = orthanc.series_of_study(mr.study_uid)
        assert series["MainDicomTags"]["Modality"] == "CT"
        assert series["MainDicomTags"]["SeriesInstanceUID"] == sct_series[0][0]
        assert len(series["Instances"]) == SLICES
        stored = pydicom.dcmread(
            io.BytesIO(orthanc.instance_file(series["Instances"][0])), stop_before_pixels=True
        )
        assert (stored.SOPClassUID, stored.Modality, stored.RescaleType) == (CTImageStorage, "CT", "HU")
        assert stored.FrameOfReferenceUID == mr.frame_of_reference_uid
        assert stored.SyntheticData == "YES"
        assert node.cli("audit", "verify").returncode == 0
    finally:
        node.stop()
