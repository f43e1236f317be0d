"""Priors from a real archive: Orthanc's C-FIND / C-MOVE / C-GET SCP and its DICOMweb plugin.

A patient with four earlier SIMULATED MR studies (2019, 2021, 2022, 2023) and another
patient's study are uploaded into Orthanc; the node finds the patient's MR studies since
2020, retrieves them by C-MOVE (to its own receiver), by C-GET and by WADO-RS, and the
priors never start a job nor go back to any destination. Failures (no such move
destination, a destination that never stores, the archive down) end in time with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from audit import AuditEvent
from dicom_node.ingest.archives import Archives, StudyQuery
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.origin import PRIOR
from dicom_node.ingest.store import InstanceStore
from dicom_node.lab.localpeers import DICOMWEB_PLUGIN, dicomweb_config
from dicom_node.runtime import Runtime
from tests.conftest import audit_rows, db_rows, node_config, require, state_rows
from tests.peers import ORTHANC, NodeProcess, Orthanc, free_port
from tests.test_archives import mr_instance

pytestmark = pytest.mark.integration

PATIENT = "PRIOR-P1"
NODE_AE = "PRIORNODE"


def _part10(ds: Dataset) -> bytes:
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _seed(orthanc: Orthanc) -> dict[str, Any]:
    """Four MR studies of PATIENT (the 2023 one with two series) and one of another patient."""
    studies: dict[str, Any] = {}
    for day, series_count in (("20190310", 1), ("20210310", 1), ("20220310", 1), ("20230310", 2)):
        study_uid = generate_uid()
        series = [generate_uid() for _ in range(series_count)]
        for series_uid in series:
            for number in (1, 2, 3):
                orthanc.upload(_part10(mr_instance(PATIENT, study_uid, series_uid, number, day)))
        studies[day] = {"study": study_uid, "series": series}
    orthanc.upload(_part10(mr_instance("SOMEONE-ELSE", generate_uid(), generate_uid(), 1, "20220101")))
    return studies


def _archive_toml(name: str, orthanc: Orthanc, method: str, retrieve_timeout: float = 30) -> str:
    return f"""
[archives.{name}]
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
method = "{method}"
timeout_seconds = 10
retrieve_timeout_seconds = {retrieve_timeout}
"""


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Orthanc]:
    require(ORTHANC)
    extra: dict[str, Any] = {"DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True}
    if Path(DICOMWEB_PLUGIN).exists():
        extra |= dicomweb_config()
    peer = Orthanc(tmp_path, extra_config=extra).start()
    try:
        yield peer
    finally:
        peer.stop()


def test_find_then_move_and_get_priors_that_start_no_job(tmp_path: Path, archive: Orthanc) -> None:
    studies = _seed(archive)
    seeded = archive.statistics()["CountInstances"]
    config = (
        f'[node]\nae_title = "{NODE_AE}"\n'
        + node_config(archive)
        + _archive_toml("main", archive, "c-move")
        + _archive_toml("getter", archive, "c-get")
    )
    node = NodeProcess(tmp_path / "home", config, ae_title=NODE_AE)
    archive.register_modality("node", NODE_AE, node.port, storage_commitment=False)
    node.start()
    try:
        found = node.cli_json(
            "archives", "find", "main", "--patient", PATIENT, "--modality", "MR", "--since", "2020-01-01"
        )
        assert [s["study_date"] for s in found["studies"]] == ["20210310", "20220310", "20230310"]
        assert {s["patient_id"] for s in found["studies"]} == {PATIENT}
        listed = node.cli_json(
            "archives", "find", "main", "--study", studies["20230310"]["study"], "--series"
        )
        (newest,) = listed["studies"]
        assert sorted(x["series_uid"] for x in newest["series"]) == sorted(studies["20230310"]["series"])

        moved = node.cli_json("archives", "retrieve", "main", "--study", studies["20210310"]["study"])
        assert moved["ok"] and moved["completed"] == 3 and len(moved["sop_uids"]) == 3, moved
        wanted_series = studies["20230310"]["series"][0]
        got = node.cli_json(
            "archives",
            "retrieve",
            "getter",
            "--study",
            studies["20230310"]["study"],
            "--series",
            wanted_series,
        )
        assert got["ok"] and got["completed"] == 3 and len(got["sop_uids"]) == 3, got

        roles = db_rows(node, "select role, count(*) from instances group by role")
        assert roles == [(PRIOR, 6)]
        time.sleep(2.0 + 2.5)  # past stable_seconds: a study that could become a job would have
        assert db_rows(node, "select count(*) from jobs") == [(0,)]
        assert db_rows(node, "select count(*) from deliveries") == [(0,)]
        assert archive.statistics()["CountInstances"] == seeded  # nothing looped back
        assert audit_rows(node, AuditEvent.STUDY_READY.value) == []

        queries = audit_rows(node, AuditEvent.QUERY.value)
        assert len(queries) >= 3 and all(json.loads(q[5])["archive"] == "main" for q in queries)
        begun = audit_rows(node, AuditEvent.BEGIN_TRANSFERRING.value)
        assert [json.loads(b[5])["archive"] for b in begun] == ["main", "getter"]
        retrieved = [
            r
            for r in audit_rows(node, AuditEvent.INSTANCES_TRANSFERRED.value)
            if json.loads(r[5])["direction"] == "retrieved"
        ]
        assert len(retrieved) == 2 and all(r[1] == 0 for r in retrieved)
    finally:
        node.stop()


def _runtime(home: Path, archives: dict[str, Any]) -> tuple[Runtime, InstanceStore, Archives]:
    rt = Runtime.open(None, home, {"node": {"ae_title": NODE_AE}, "archives": archives})
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01))
    return rt, store, Archives(rt.config, rt.paths.home, rt.audit, db=rt.db, store=store)


def test_dicomweb_find_and_retrieve(tmp_path: Path, archive: Orthanc) -> None:
    if not Path(DICOMWEB_PLUGIN).exists():  # a plugin, not an executable: require() skips or fails
        require(DICOMWEB_PLUGIN)
    studies = _seed(archive)
    rt, store, archives = _runtime(
        tmp_path / "home", {"web": {"method": "dicomweb", "dicomweb_url": f"{archive.url}/dicom-web"}}
    )
    try:
        web = archives.get("web")
        assert "answered QIDO-RS" in web.echo()
        found = web.find_studies(StudyQuery(patient_id=PATIENT, modality="MR", since=date(2020, 1, 1)))
        assert [s.study_date for s in found] == ["20210310", "20220310", "20230310"]
        series = web.find_series(studies["20230310"]["study"])
        assert sorted(s.series_uid for s in series) == sorted(studies["20230310"]["series"])
        result = web.retrieve(studies["20220310"]["study"], timeout=30)
        assert result.ok and result.completed == 3 and len(result.sop_uids) == 3, result
        with rt.db.read() as conn:
            roles = conn.exec_driver_sql("select distinct role from instances").scalars().all()
        assert roles == [PRIOR]
        (query_audit, *_) = rt.audit.events(AuditEvent.QUERY)
        assert query_audit.facts["method"] == "qido-rs" and query_audit.patient_id == PATIENT
    finally:
        store.close()
        rt.close()


class _BlackHole:
    """A storage SCP that answers success and keeps nothing (a wrong host behind our AE)."""

    def __init__(self) -> None:
        self.port = free_port()
        ae = AE(ae_title=NODE_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)]
        )


def test_failures_end_in_time_with_the_reason(tmp_path: Path, archive: Orthanc) -> None:
    studies = _seed(archive)
    study = studies["20210310"]["study"]
    down = free_port()
    rt, store, archives = _runtime(
        tmp_path / "home",
        {
            "main": {
                "ae_title": archive.aet,
                "host": "127.0.0.1",
                "port": archive.dicom_port,
                "timeout_seconds": 5,
            },
            "down": {"ae_title": "DOWN", "host": "127.0.0.1", "port": down, "timeout_seconds": 3},
        },
    )
    hole = _BlackHole()
    try:
        # Orthanc does not know this node as a move destination
        started = time.monotonic()
        unknown = archives.get("main").retrieve(study, timeout=10)
        assert not unknown.ok and unknown.error is not None and "C-MOVE" in unknown.error, unknown
        # ... knows it at a port where nothing listens: every sub-operation fails
        archive.register_modality("node", NODE_AE, free_port(), storage_commitment=False)
        refused = archives.get("main").retrieve(study, timeout=10)
        assert not refused.ok and refused.failed + (refused.error is not None) > 0, refused
        # ... sends to an SCP that acknowledges and keeps nothing: the prior never arrives
        archive.register_modality("node", NODE_AE, hole.port, storage_commitment=False)
        lost = archives.get("main").retrieve(study, timeout=4)
        assert lost.completed == 3 and lost.sop_uids == [], lost
        assert lost.error is not None and "3 instance(s) sent, 0 are in this node's index" in lost.error
        assert time.monotonic() - started < 40
        ended = rt.audit.events(AuditEvent.INSTANCES_TRANSFERRED)
        assert len(ended) == 3 and all(e.facts["reason"] for e in ended)
    finally:
        hole.server.shutdown()
        store.close()
        rt.close()
    # the archive down: one line from the CLI, and the failed query audited
    config = tmp_path / "cli.toml"
    config.write_text(f'[archives.down]\nae_title = "DOWN"\nhost = "127.0.0.1"\nport = {down}\n')
    home = str(tmp_path / "home")
    command = ["archives", "find", "down", "--patient", PATIENT, "--home", home, "--config", str(config)]
    cli = subprocess.run(
        [sys.executable, "-m", "dicom_node", *command],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )
    assert cli.returncode == 1
    assert cli.stderr.strip().count("\n") == 0 and "connection refused" in cli.stderr, cli.stderr
    outcomes = state_rows(
        tmp_path / "home", "select outcome, facts from audit_events where event = 'query'", audit=True
    )
    assert any(o != 0 and json.loads(f)["archive"] == "down" for o, f in outcomes)
