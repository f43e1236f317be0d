"""/metrics on a running node: a study through it moves the counts (received, job
duration, deliveries), and the text parses with Prometheus' own parser (issue 21)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import node_config, require
from tests.peers import STORESCU, NodeProcess, Orthanc, free_port, storescu

pytestmark = pytest.mark.integration


def _samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(f"{base}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def test_a_study_through_the_node_moves_the_counts(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=6, seed=3))
    web_port = free_port()
    node = NodeProcess(tmp_path / "node", node_config(orthanc, stable_seconds=1), web_port=web_port).start()
    base = f"http://127.0.0.1:{web_port}"
    try:
        before = _samples(base)
        assert not [k for k in before if k[0] == "dicomnode_instances_received_total"]
        assert storescu(tmp_path / "ct", node.port, node.ae_title).returncode == 0
        node.wait_for(
            lambda: [j for j in node.cli_json("jobs") if j["state"] == "delivered"], what="delivered"
        )
        after = _samples(base)
        assert after[("dicomnode_instances_received_total", (("calling_ae", "STORESCU"),))] == 6
        assert (
            after[("dicomnode_instances_received_bytes_total", (("calling_ae", "STORESCU"),))] > 6 * 64 * 64
        )
        assert after[("dicomnode_jobs", (("pipeline", "forward"), ("state", "delivered")))] == 1
        assert after[("dicomnode_job_duration_seconds_count", (("pipeline", "forward"),))] == 1
        assert (
            after[("dicomnode_job_duration_seconds_bucket", (("le", "+Inf"), ("pipeline", "forward")))] == 1
        )
        delivered = [
            v
            for (name, labels), v in after.items()
            if name == "dicomnode_deliveries" and ("state", "delivered") in labels
        ]
        assert delivered and sum(delivered) >= 1
        assert after[("dicomnode_delivery_attempts_total", (("outcome", "delivered"),))] >= 1
        assert after[("dicomnode_audit_chain_head", ())] > before[("dicomnode_audit_chain_head", ())]
        assert after[("dicomnode_disk_free_bytes", ())] > 0
        assert after[("dicomnode_associations_open", ())] == 0, "storescu's association is closed"
        assert after[("dicomnode_gate_verdicts_total", (("verdict", "released"),))] == 1
    finally:
        node.stop()
