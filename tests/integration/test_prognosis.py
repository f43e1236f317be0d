"""Prognosis end to end, with the shipped policy (issue 17's acceptance).

A SIMULATED brain-tumour patient (:mod:`models.sim.prognosis`) has three visits in Orthanc;
the fourth is sent to the node by ``storescu``. The shipped rule ``brain-tumour-prognosis``
fetches the two most recent earlier visits (T1c and FLAIR) from Orthanc by C-GET, registers
them to the current T1c, runs ``prognosis`` and holds the job for review. Nothing leaves
before the approval; afterwards Orthanc holds, under the current study, the predicted T1c
and FLAIR series (PREDICTED, Synthetic Data YES, no acquisition date), the σ, probability and
hallucination Parametric Maps, the extent SEG, the SR and one registration object per prior;
every object passes dciodvfy (less dicom3tools' stale-dictionary report of Synthetic Data)
and the audit chain verifies.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.delivery.tps import dciodvfy_errors
from dicom_node.lab.simulate_prognosis import PrognosisSpec, write_prognosis_patient
from tests.conftest import audit_rows, db_rows, node_config, require
from tests.peers import ORTHANC, NodeProcess, Orthanc, free_port, storescu

pytestmark = pytest.mark.integration

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
NODE_AE = "PROGNODE"
SEED = 5


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Orthanc]:
    require(ORTHANC)
    extra: dict[str, Any] = {"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True}
    peer = Orthanc(tmp_path, extra_config=extra).start()
    try:
        yield peer
    finally:
        peer.stop()


def _wait_job(node: NodeProcess, states: set[str], timeout: float) -> tuple[Any, ...]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = db_rows(node, "select id, state, reason, pipeline from jobs order by id")
        if rows and rows[0][1] in states:
            return rows[0]
        time.sleep(0.5)
    raise AssertionError(f"no job reached {states} in {timeout} s: {db_rows(node, 'select * from jobs')}")


def test_a_follow_up_is_predicted_from_two_fetched_priors_held_then_delivered(
    tmp_path: Path, archive: Orthanc
) -> None:
    patient, visits = write_prognosis_patient(tmp_path / "sim", PrognosisSpec(visits=4, seed=SEED))
    for visit in visits[:3]:
        for series in visit.series.values():
            for path in series.files:
                archive.upload(path.read_bytes())
    seeded = archive.statistics()["CountInstances"]
    current = visits[3]
    config = (
        f'[node]\nae_title = "{NODE_AE}"\n'
        + node_config(archive, stable_seconds=1.0)
        + f"""
[destinations.tps]
ae_title = "NO_TPS"
host = "127.0.0.1"
port = {free_port()}
profile = "tps"

[archives.pacs]
ae_title = "{archive.aet}"
host = "127.0.0.1"
port = {archive.dicom_port}
method = "c-get"
timeout_seconds = 10
retrieve_timeout_seconds = 60
"""
    )
    node = NodeProcess(tmp_path / "home", config, ae_title=NODE_AE, policy=DEFAULT_POLICY.read_text()).start()
    try:
        files = [p for series in current.series.values() for p in series.files]
        sent = storescu(files, node.port, NODE_AE, calling="MR_SCANNER")
        assert sent.returncode == 0, sent.stderr
        job_id, state, reason, pipeline = _wait_job(node, {"held", "failed", "refused", "delivered"}, 400)
        assert (state, pipeline) == ("held", "prognosis"), reason
        assert "the rule requires review" in reason

        # the two most recent earlier visits, both series each, were fetched
        wanted = {s.series_uid for v in visits[1:3] for s in v.series.values()}
        got = {
            uid for (uid,) in db_rows(node, "select series_uid from job_priors where job_fk = ?", (job_id,))
        }
        assert got == wanted

        shown = node.cli_json("review", "show", str(job_id))
        qc = shown["qc"]
        predicted = qc["predicted whole-tumour volume +90 d"]
        low, high = (
            qc["predicted volume 90% interval low +90 d"],
            qc["predicted volume 90% interval high +90 d"],
        )
        assert 0 < low <= predicted <= high
        assert qc["earlier visits used"] == 2
        time.sleep(2)  # several outbox polls: nothing leaves before the review
        assert db_rows(node, "select count(*) from deliveries") == [(0,)]
        assert archive.statistics()["CountInstances"] == seeded

        approved = node.cli(
            "review", "approve", str(job_id), "--reviewer", "dr-onco", "--note", "tumour board"
        )
        assert "approved by dr-onco" in approved.stdout
        job_id, state, reason, _ = _wait_job(node, {"delivered", "failed"}, 120)
        assert state == "delivered", reason

        outputs = db_rows(
            node, "select series_uid, sop_class_uid, path from job_outputs where job_fk = ?", (job_id,)
        )
        series_in_orthanc = archive.series_of_study(current.study_uid)
        assert {s["MainDicomTags"]["SeriesInstanceUID"] for s in series_in_orthanc} == {o[0] for o in outputs}
        stored = sum(len(s["Instances"]) for s in series_in_orthanc)
        assert stored == len(outputs)
        by_description = {s["MainDicomTags"].get("SeriesDescription", ""): s for s in series_in_orthanc}
        for name in ("T1c", "FLAIR"):
            description = f"AI PREDICTED {name} follow-up at +90 days - not an acquisition"
            series = by_description[description]
            assert len(series["Instances"]) == len(current.series["t1c" if name == "T1c" else "flair"].files)
            ds = pydicom.dcmread(
                io.BytesIO(archive.instance_file(series["Instances"][0])), stop_before_pixels=True
            )
            assert ds.Modality == "MR" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert ds.SyntheticData == "YES"
            assert not ds.get("AcquisitionDate") and not ds.get("AcquisitionTime")
            assert ds.StudyInstanceUID == current.study_uid
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in series_in_orthanc)
        assert modalities.count("REG") == 4  # one per registered prior series
        assert modalities.count("SEG") == 1 and modalities.count("SR") == 1
        assert modalities.count("OT") == 4  # sigma T1c, sigma FLAIR, probability, hallucination

        # every object passes dciodvfy: each non-image object, and three slices of each image series
        checked: dict[str, int] = {}
        for series_uid, sop_class, path in outputs:
            if checked.get(series_uid, 0) >= 3:
                continue
            checked[series_uid] = checked.get(series_uid, 0) + 1
            assert dciodvfy_errors(Path(path)) == [], (path, sop_class)
        provenance = [json.loads(row[5]) for row in audit_rows(node, "provenance")]
        assert any(p.get("pipeline") == "prognosis" and len(p.get("priors", [])) == 4 for p in provenance)
        assert node.cli("audit", "verify").returncode == 0
    finally:
        node.stop()
