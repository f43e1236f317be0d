"""DICOMweb in and out against Orthanc's DICOMweb plugin (Debian orthanc-dicomweb), with a
running node (`dicom-node serve`): Orthanc A pushes a SIMULATED CT study to the node by
STOW-RS with a sender's API token; the node stores it (data set bytes identical to what
Orthanc A holds), routes it, and delivers the series by STOW-RS to Orthanc B's DICOMweb
service, which confirms every instance; the audit chain verifies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.ingest.part10 import split_part10
from dicom_node.lab.localpeers import DICOMWEB_PLUGIN, dicomweb_config
from tests.conftest import audit_rows, db_rows, node_config, require
from tests.peers import ORTHANC, NodeProcess, Orthanc, free_port, policy_yaml

pytestmark = pytest.mark.integration


def test_orthanc_pushes_by_stow_rs_and_the_node_delivers_by_stow_rs(tmp_path: Path) -> None:
    require(ORTHANC)
    if not Path(DICOMWEB_PLUGIN).exists():  # a plugin, not an executable: require() skips or fails
        require(DICOMWEB_PLUGIN)
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    sim = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=5, seed=9))
    archive = Orthanc(tmp_path, aet="ORTHANCB", extra_config=dicomweb_config()).start()
    web_port = free_port()
    config = (
        node_config(stable_seconds=1, policy=True)
        + f"""
[destinations.archive]
protocol = "dicomweb"
dicomweb_url = "{archive.url}/dicom-web/"
timeout_seconds = 30
"""
    )
    node = NodeProcess(
        tmp_path / "node", config, web_port=web_port, policy=policy_yaml(destinations=("archive",))
    ).start()
    source: Orthanc | None = None
    try:
        node.cli(
            "user",
            "add",
            "ORTHANCA",
            "--role",
            "sender",
            "--password-stdin",
            stdin="a long enough password\n",
        )
        made = node.cli("user", "token", "create", "ORTHANCA", "--name", "orthanc-a")
        token = made.stdout.strip().splitlines()[-1]
        dicomweb = dicomweb_config()
        dicomweb["DicomWeb"]["Servers"] = {
            "node": {
                "Url": f"http://127.0.0.1:{web_port}/dicomweb/",
                "HttpHeaders": {"Authorization": f"Bearer {token}"},
            }
        }
        source = Orthanc(tmp_path, aet="ORTHANCA", extra_config=dicomweb).start()
        originals = {}
        for path in sim.files:
            raw = path.read_bytes()
            source.upload(raw)
            meta, data = split_part10(raw)
            originals[str(meta.MediaStorageSOPInstanceUID)] = data
        (study,) = source.find("Study", {"StudyInstanceUID": sim.study_uid})
        pushed = json.loads(
            source._request("/dicom-web/servers/node/stow", {"Resources": [study["ID"]], "Synchronous": True})
        )
        assert pushed is not None
        stored = node.wait_for(
            lambda: (
                (rows := db_rows(node, "select sop_uid, path from instances")) and len(rows) == 5 and rows
            ),
            what="five instances stored",
        )
        for sop_uid, relative in stored:
            kept = (node.home / "var" / "data" / relative).read_bytes()
            assert split_part10(kept)[1] == originals[sop_uid], "data set bytes identical to Orthanc A's"
        assert {r[3] for r in audit_rows(node, "instance-stored")} == {"ORTHANCA"}
        node.wait_for(
            lambda: [j for j in node.cli_json("jobs") if j["state"] == "delivered"], what="delivered"
        )
        at_b = archive.instances_of_series(sim.series_uid)
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in at_b} == set(originals)
        (delivery,) = node.cli_json("outbox")
        assert delivery["state"] == "delivered" and delivery["destination"] == "archive"
        assert node.cli("audit", "verify").returncode == 0
    finally:
        node.stop()
        archive.stop()
        if source is not None:
            source.stop()
