"""The echo loop, with Orthanc as the PACS: the node's delivered outputs, sent back to it
(by a person with the scanner's AE title, and by the PACS itself), open no job, no
delivery, and leave the PACS unchanged; the audit log says "own output returned".

The study is the project's simulated low-dose CT (SIMULATED in every description)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import db_rows, node_config, require
from tests.peers import STORESCU, NodeProcess, Orthanc, policy_yaml, storescu

pytestmark = pytest.mark.integration

SCANNER = "CT_SCANNER"


@pytest.fixture(scope="module")
def ldct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ldct")
    made = subprocess.run(
        [sys.executable, "-m", "dicom_node", "simulate", "ldct", "--out", str(out), "--slices", "4"]
        + ["--size", "128", "--dose", "0.25", "--seed", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    return out / "low-dose"


def _counts(node: NodeProcess, orthanc: Orthanc) -> tuple[int, int, int]:
    jobs = db_rows(node, "select count(*) from jobs")[0][0]
    deliveries = db_rows(node, "select count(*) from deliveries")[0][0]
    return int(jobs), int(deliveries), int(orthanc.statistics()["CountInstances"])


def test_outputs_sent_back_open_no_job_and_no_delivery(ldct: Path, tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    low_dose_ct = {"modality": "CT", "attributes": [{"keyword": "CTDIvol", "op": "<", "value": 5.0}]}
    node = NodeProcess(
        tmp_path / "node",
        node_config(orthanc, stable_seconds=1),
        policy=policy_yaml("restoration", match=low_dose_ct),
    ).start()
    orthanc.register_modality("node", node.ae_title, node.port, storage_commitment=False)
    try:
        assert storescu(ldct, node.port, node.ae_title, calling=SCANNER).returncode == 0
        node.wait_for(
            lambda: db_rows(node, "select state from jobs") == [("delivered",)], timeout=300, what="delivered"
        )
        before = _counts(node, orthanc)
        assert before[0] == 1 and before[2] > 0

        # 1. A person sends the PACS's copies back with the scanner's AE title.
        returned = tmp_path / "returned"
        returned.mkdir()
        ids = [i for i in orthanc.get("/instances")]
        for n, orthanc_id in enumerate(ids):
            (returned / f"{n:04d}.dcm").write_bytes(orthanc.instance_file(orthanc_id))
        sent = storescu(returned, node.port, node.ae_title, calling=SCANNER, extra=["-R"])
        assert sent.returncode == 0, sent.stderr
        # 2. The PACS itself sends them (its own AE title, its own encoding choices).
        orthanc._request("/modalities/node/store", {"Resources": ids, "Synchronous": True})

        time.sleep(4)  # four idle timers' worth: a study version would be ready by now
        assert _counts(node, orthanc) == before
        states = [s for (s,) in db_rows(node, "select state from jobs")]
        assert states == ["delivered"]
        roles = db_rows(node, "select role, count(*) from instances group by role order by role nulls first")
        assert dict(roles) == {None: 4, "own-output": len(ids)}
        search = node.cli_json("audit", "search", "--event", "own-output-returned")
        records = search["records"] if isinstance(search, dict) else search
        assert len(records) == len(ids)
        assert {r["calling_ae"] for r in records} == {SCANNER}  # the PACS's copies were duplicates
        duplicates = node.cli_json("audit", "search", "--event", "instance-duplicate", "--ae", orthanc.aet)
        duplicates = duplicates["records"] if isinstance(duplicates, dict) else duplicates
        assert len(duplicates) == len(ids)  # the PACS's own send arrived, and was recognised
        assert db_rows(node, "select count(*) from instances where version > 1")[0][0] == 0
    finally:
        node.stop()
