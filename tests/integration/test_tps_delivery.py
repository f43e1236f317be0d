"""Delivery to a TPS: Orthanc as the TPS stand-in on loopback.

A valid CT series goes in one association, then a storage commitment request; the
delivery is ``delivered`` only once Orthanc's N-EVENT-REPORT (sent on a new association
to the node's receiver) commits every instance. An invalid series — a CT with a gap, an MR
with half its slices missing or with mixed orientations — is held before the gate with the
reason, approving it is refused, and nothing is ever sent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from dicom_node.lab.simulate import write_ct_series
from models.sim.phantom import PhantomSpec
from tests.conftest import audit_rows, db_rows, require, tps_config
from tests.peers import STORESCU, NodeProcess, Orthanc, free_port, policy_yaml, storescu
from tests.test_tps import AXIAL, SAGITTAL, write_mr

pytestmark = pytest.mark.integration

SLICES = 6
#: Only storescu may send; Orthanc gets in to report because it is a commitment destination.
KNOWN_CALLERS_ONLY = """
[receiver]
require_known_callers = true

[[callers]]
ae_title = "STORESCU"
"""


def facts(node: NodeProcess, event: str) -> list[dict[str, object]]:
    return [json.loads(r[5]) for r in audit_rows(node, event)]


def test_delivery_is_confirmed_by_orthancs_storage_commitment(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    ct = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=SLICES, seed=5))
    port = free_port()
    # Orthanc takes N-ACTION only from a known modality, and reports back to its address.
    orthanc.register_modality("dicom-node", "DICOM_NODE", port)
    node = NodeProcess(
        tmp_path / "node",
        tps_config(orthanc, extra=KNOWN_CALLERS_ONLY),
        port=port,
        policy=policy_yaml("forward", ("tps",)),
    ).start()
    try:
        assert storescu(list(ct.files), node.port, node.ae_title).returncode == 0
        node.wait_for(
            lambda: db_rows(node, "select state from jobs") == [("delivered",)], timeout=90, what="delivered"
        )
        (series,) = orthanc.series_of_study(ct.study_uid)
        assert len(series["Instances"]) == SLICES

        (delivery,) = db_rows(node, "select id, state, attempts, delivered_at from deliveries")
        assert delivery[1:3] == ("delivered", 1)
        (commitment,) = db_rows(
            node,
            "select transaction_uid, state, reported_by, reported_via, committed, failed, reported_at,"
            ' json_array_length("references") from storage_commitments',
        )
        txn, state, reported_by, via, committed, failed, reported_at, references = commitment
        assert (state, reported_by, via) == ("committed", "ORTHANC", "new-association")
        assert (committed, failed, references) == (SLICES, 0, SLICES)
        assert reported_at <= delivery[3]  # delivered only once the report was in

        # The audit trail: request, Orthanc's result, then the delivery.
        (asked,) = audit_rows(node, "storage-commitment-requested")
        (result,) = audit_rows(node, "storage-commitment-result")
        delivered = [
            r for r in audit_rows(node, "delivery-attempt") if json.loads(r[5])["result"] == "delivered"
        ]
        assert asked[0] < result[0] < delivered[0][0]
        result_facts = json.loads(result[5])
        assert (result[1], result[3], result[4]) == (0, "ORTHANC", "127.0.0.1")
        assert result_facts["transaction_uid"] == txn == json.loads(asked[5])["transaction_uid"]
        assert (result_facts["result"], result_facts["committed"], result_facts["failed"]) == (
            "committed",
            SLICES,
            0,
        )
        # the commitment peer was let in although require_known_callers is on
        assert audit_rows(node, "association-rejected") == []
    finally:
        node.stop()


def test_no_report_times_out_and_the_series_goes_again(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    ct = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=4, seed=6))
    port = free_port()
    orthanc.register_modality("dicom-node", "DICOM_NODE", free_port())  # reports go nowhere
    node = NodeProcess(
        tmp_path / "node", tps_config(orthanc, timeout=3), port=port, policy=policy_yaml("forward", ("tps",))
    ).start()
    try:
        assert storescu(list(ct.files), node.port, node.ae_title).returncode == 0
        node.wait_for(
            lambda: audit_rows(node, "storage-commitment-timeout"), timeout=90, what="a commitment timeout"
        )
        assert db_rows(node, "select state from jobs") == [("delivering",)]
        orthanc.register_modality("dicom-node", "DICOM_NODE", port)  # now Orthanc can report
        node.wait_for(
            lambda: db_rows(node, "select state from jobs") == [("delivered",)], timeout=90, what="delivered"
        )
        states = [r[0] for r in db_rows(node, "select state from storage_commitments order by id")]
        assert states[0] == "timed_out" and states[-1] == "committed"
        (series,) = orthanc.series_of_study(ct.study_uid)
        assert len(series["Instances"]) == 4  # sent again: same instances, no duplicate series
        last_error = db_rows(node, "select detail from delivery_attempts order by id")[0][0]
        assert last_error.startswith("no storage commitment result from ORTHANC after ")
    finally:
        node.stop()


def test_invalid_series_are_refused_before_anything_is_sent(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    ct = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=8, seed=7))
    ct_with_gap = ct.files[:3] + ct.files[5:]  # z = -7.5 and -10 missing
    mr = write_mr(tmp_path / "mr-half")
    mr_half = mr[:6] + mr[18:]
    mr_mixed = write_mr(tmp_path / "mr-mixed", slices=8, orientation=lambda k: AXIAL if k < 4 else SAGITTAL)
    port = free_port()
    orthanc.register_modality("dicom-node", "DICOM_NODE", port)
    node = NodeProcess(
        tmp_path / "node", tps_config(orthanc), port=port, policy=policy_yaml("forward", ("tps",))
    ).start()
    try:
        for files in (list(ct_with_gap), mr_half, mr_mixed):
            assert storescu(files, node.port, node.ae_title).returncode == 0
        node.wait_for(
            lambda: db_rows(node, "select count(*) from jobs where state = 'held'")[0][0] == 3,
            timeout=120,
            what="three held jobs",
        )
        assert orthanc.statistics()["CountInstances"] == 0
        assert db_rows(node, "select count(*) from deliveries")[0][0] == 0  # nothing queued, nothing sent
        assert db_rows(node, "select count(*) from storage_commitments")[0][0] == 0

        jobs = node.cli_json("jobs")
        reasons = {j["id"]: j["reason"] for j in jobs}
        series_of = {
            "ct": ct.series_uid,
            "mr-half": str(pydicom.dcmread(mr_half[0]).SeriesInstanceUID),
            "mr-mixed": str(pydicom.dcmread(mr_mixed[0]).SeriesInstanceUID),
        }
        job_of = {
            name: next(j["id"] for j in jobs if _input_series(node, j["id"]) == uid)
            for name, uid in series_of.items()
        }
        refuse = "held for review: tps (profile tps) would refuse it: "
        assert reasons[job_of["ct"]] == (
            refuse + "the series has 6 of 8 slices: gap of 7.5 mm between "
            "z=-12.5 and z=-5.0 (slices are 2.50 mm apart elsewhere)"
        )
        half = reasons[job_of["mr-half"]]
        assert half.startswith(
            f"{refuse}the source MR series {series_of['mr-half']} has 12 of 24 "
            "slices: gap of 32.5 mm between z=12.5 and z=45.0"
        )
        assert "not CT Image Storage (MR Image Storage)" in half
        mixed = reasons[job_of["mr-mixed"]]
        assert f"the source MR series {series_of['mr-mixed']} mixes 2 orientations (4 axial" in mixed

        # the physicist sees why on the review queue, and cannot approve it
        held = node.cli_json("review", "list")
        assert {h["id"] for h in held} == set(job_of.values())
        assert all(h["destination_problems"] for h in held)
        refused = node.cli("review", "approve", str(job_of["ct"]), check=False)
        assert refused.returncode == 1
        assert "would refuse it" in refused.stderr and "cannot be approved" in refused.stderr
        assert audit_rows(node, "review-approved") == []
        assert audit_rows(node, "begin-transferring") == []
        assert node.cli_json("outbox") == []
        assert orthanc.statistics()["CountInstances"] == 0
    finally:
        node.stop()


def _input_series(node: NodeProcess, job_id: int) -> str:
    """The series a job's inputs come from (each of these studies holds one series)."""
    (uid,) = {
        r[0]
        for r in db_rows(
            node,
            "select s.series_uid from job_inputs ji join instances i on i.id = ji.instance_fk "
            f"join series s on s.id = i.series_fk where ji.job_fk = {int(job_id)}",
        )
    }
    return str(uid)
