"""Priors in policies against a real archive (Orthanc's C-FIND / C-MOVE SCP).

A patient with three earlier SIMULATED MR studies in Orthanc; a new study arrives at the
node by storescu; the rule asks for two priors at least 30 days older: exactly the two
newest are retrieved — by C-MOVE, in a second run by C-GET, and the same over DICOMweb
against Orthanc's DICOMweb plugin — the job passes through ``fetching-priors``, its
provenance lists them, no job is made for them and nothing but the job's output reaches
Orthanc. With the archive down and ``on_missing: refuse`` the job ends ``refused`` within
its timeout, the reason in ``jobs`` and the audit log. (Failing retrievals:
``test_prior_failures.py``.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from audit import AuditEvent
from dicom_node.ingest.origin import PRIOR
from dicom_node.lab.localpeers import DICOMWEB_PLUGIN, dicomweb_config, policy_yaml
from tests.conftest import audit_rows, db_rows, node_config, require
from tests.peers import ORTHANC, NodeProcess, Orthanc, free_port, storescu
from tests.test_archives import mr_instance

pytestmark = pytest.mark.integration

PATIENT = "PRIORS-P1"
NODE_AE = "PRIORSNODE"
TODAY = "20240601"


def _part10(ds: Dataset) -> bytes:
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _policy(archive: str, on_missing: str, timeout: float, **priors: Any) -> str:
    import yaml

    data = yaml.safe_load(policy_yaml("forward", ("pacs",), name="mr-with-priors"))
    data["rules"][0]["priors"] = {
        "archive": archive,
        "count": 2,
        "modality": "MR",
        "min_interval_days": 30,
        "timeout_seconds": timeout,
        "on_missing": on_missing,
        **priors,
    }
    return str(yaml.safe_dump(data, sort_keys=False))


def _current_study(folder: Path) -> str:
    """The new SIMULATED MR study (three images) the scanner sends, as files."""
    folder.mkdir()
    study_uid, series_uid = generate_uid(), generate_uid()
    for number in (1, 2, 3):
        mr_instance(PATIENT, study_uid, series_uid, number, TODAY).save_as(
            folder / f"{number}.dcm", enforce_file_format=True
        )
    return study_uid


def _wait_job(node: NodeProcess, states: set[str], timeout: float) -> tuple[Any, ...]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = db_rows(node, "select id, state, reason from jobs order by id")
        if rows and rows[0][1] in states:
            return rows[0]
        time.sleep(0.2)
    raise AssertionError(f"no job reached {states} in {timeout} s: {db_rows(node, 'select * from jobs')}")


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Orthanc]:
    require(ORTHANC)
    # C-GET from a caller Orthanc does not know as a modality: the node is registered only
    # where C-MOVE needs to know where to send.
    extra: dict[str, Any] = {
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
    }
    if Path(DICOMWEB_PLUGIN).exists():
        extra |= dicomweb_config()
    peer = Orthanc(tmp_path, extra_config=extra).start()
    try:
        yield peer
    finally:
        peer.stop()


def _archive_toml(archive: Orthanc, method: str) -> str:
    """``[archives.main]``: Orthanc by C-MOVE / C-GET, or its DICOMweb plugin."""
    if method == "dicomweb":
        where = f'dicomweb_url = "{archive.url}/dicom-web"'
    else:
        where = f'ae_title = "{archive.aet}"\nhost = "127.0.0.1"\nport = {archive.dicom_port}'
    return f"""
[archives.main]
{where}
method = "{method}"
timeout_seconds = 10
retrieve_timeout_seconds = 30
"""


@pytest.mark.parametrize("method", ["c-move", "c-get", "dicomweb"])
def test_the_two_wanted_priors_are_moved_and_listed_in_the_provenance(
    tmp_path: Path, archive: Orthanc, method: str
) -> None:
    """Acceptance: the two wanted priors are retrieved by C-MOVE, in a second run by C-GET,
    and the same over DICOMweb (QIDO-RS / WADO-RS against Orthanc's DICOMweb plugin)."""
    if method == "dicomweb" and not Path(DICOMWEB_PLUGIN).exists():
        require(DICOMWEB_PLUGIN)  # a plugin, not an executable: require() skips or fails
    earlier: dict[str, tuple[str, str]] = {}
    for day in ("20220310", "20230310", "20240310"):
        study_uid, series_uid = generate_uid(), generate_uid()
        for number in (1, 2, 3):
            archive.upload(_part10(mr_instance(PATIENT, study_uid, series_uid, number, day)))
        earlier[day] = (study_uid, series_uid)
    seeded = archive.statistics()["CountInstances"]
    config = (
        f'[node]\nae_title = "{NODE_AE}"\n'
        + node_config(archive, stable_seconds=1.0)
        + _archive_toml(archive, method)
    )
    node = NodeProcess(tmp_path / "home", config, ae_title=NODE_AE, policy=_policy("main", "refuse", 30))
    if method == "c-move":  # the archive sends to the node's own AE: it must know where that is
        archive.register_modality("node", NODE_AE, node.port, storage_commitment=False)
    current = _current_study(tmp_path / "current")
    node.start()
    try:
        sent = storescu(tmp_path / "current", node.port, NODE_AE, calling="SCANNER")
        assert sent.returncode == 0, sent.stderr
        job_id, state, reason = _wait_job(node, {"delivered", "failed", "refused", "held"}, 60)
        assert state == "delivered", (state, reason)
        moves = db_rows(
            node,
            "select from_state, to_state, reason from job_transitions where job_fk = ? order by id",
            (job_id,),
        )
        assert moves[0] == (None, "fetching-priors", None)
        assert moves[1] == ("fetching-priors", "queued", "priors: 2 at hand")
        # Exactly the two newest studies at least 30 days older, each series whole.
        got = db_rows(
            node,
            "select study_uid, series_uid, archive, sop_count, retrieved_at is not null from job_priors"
            " where job_fk = ? order by study_date desc",
            (job_id,),
        )
        assert got == [
            (*earlier["20240310"], "main", 3, 1),
            (*earlier["20230310"], "main", 3, 1),
        ]
        assert db_rows(
            node, "select role, count(*) from instances group by role order by role nulls first"
        ) == [
            (None, 3),
            (PRIOR, 6),
        ]
        prior_studies = db_rows(
            node,
            "select distinct s.study_uid from instances i join studies s on s.id = i.study_fk"
            " where i.role = ?",
            (PRIOR,),
        )
        assert {uid for (uid,) in prior_studies} == {earlier["20240310"][0], earlier["20230310"][0]}
        # The priors opened no job; only the job's output went to Orthanc (the forwarded study).
        assert db_rows(node, "select count(*) from jobs") == [(1,)]
        ready = audit_rows(node, AuditEvent.STUDY_READY.value)
        assert [(r[2], json.loads(r[5])["jobs"]) for r in ready] == [(current, [job_id])]
        deadline = time.monotonic() + 10
        while archive.statistics()["CountInstances"] < seeded + 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert archive.statistics()["CountInstances"] == seeded + 3
        # The provenance lists the priors with their instances' sha256.
        provenance = [json.loads(r[5]) for r in audit_rows(node, AuditEvent.PROVENANCE.value)]
        assert provenance
        for record in provenance:
            listed = record["priors"]
            assert [(x["study_uid"], x["series_uid"]) for x in listed] == [
                earlier["20240310"],
                earlier["20230310"],
            ]
            assert all(len(x["instances"]) == 3 and x["archive"] == "main" for x in listed)
            stored = {
                sop: sha
                for sop, sha in db_rows(
                    node, "select sop_uid, sha256 from instances where role = ?", (PRIOR,)
                )
            }
            assert all(stored[i["sop_uid"]] == i["sha256"] for x in listed for i in x["instances"])
        # The audit log shows the query and the transfers.
        # The audit log shows the query (C-FIND, or QIDO-RS over DICOMweb: STUDY level with
        # the rule's keys, then the series of the studies inside the window) and the transfers.
        query_method = "qido-rs" if method == "dicomweb" else "c-find"
        queries = [json.loads(r[5]) for r in audit_rows(node, AuditEvent.QUERY.value)]
        assert queries and all(q["archive"] == "main" and q["method"] == query_method for q in queries)
        studies = [q for q in queries if q["level"] == "STUDY"]
        assert [(q["query"]["PatientID"], q["query"]["ModalitiesInStudy"]) for q in studies] == [
            (PATIENT, "MR")
        ]
        assert studies[0]["query"]["StudyDate"] == "-20240502" and studies[0]["matches"] == 3
        series_asked = {q["query"]["StudyInstanceUID"] for q in queries if q["level"] == "SERIES"}
        assert series_asked == {earlier["20240310"][0], earlier["20230310"][0]}
        moved = [
            (r[2], json.loads(r[5])["method"])
            for r in audit_rows(node, AuditEvent.BEGIN_TRANSFERRING.value)
            if "archive" in json.loads(r[5])
        ]
        assert sorted(moved) == sorted([(earlier["20240310"][0], method), (earlier["20230310"][0], method)])
        ended = [
            (r[1], r[2], json.loads(r[5]))
            for r in audit_rows(node, AuditEvent.INSTANCES_TRANSFERRED.value)
            if json.loads(r[5]).get("direction") == "retrieved"
        ]
        assert sorted((outcome, uid, f["instances"]) for outcome, uid, f in ended) == sorted(
            [(0, earlier["20240310"][0], 3), (0, earlier["20230310"][0], 3)]
        )
        sent_out = [json.loads(r[5]) for r in audit_rows(node, AuditEvent.BEGIN_TRANSFERRING.value)]
        assert [r["destination"] for r in sent_out if "destination" in r] == ["pacs"]
    finally:
        node.stop()


def test_archive_down_refuses_the_job_within_the_timeout(tmp_path: Path) -> None:
    down = free_port()  # nothing listens there
    config = (
        f'[node]\nae_title = "{NODE_AE}"\n'
        + node_config(None, stable_seconds=1.0, policy=True)
        + f"""
[destinations.pacs]
ae_title = "PACS"
host = "127.0.0.1"
port = {down}
timeout_seconds = 5

[archives.main]
ae_title = "PACS"
host = "127.0.0.1"
port = {down}
method = "c-move"
timeout_seconds = 3
"""
    )
    node = NodeProcess(tmp_path / "home", config, ae_title=NODE_AE, policy=_policy("main", "refuse", 5))
    _current_study(tmp_path / "current")
    node.start()
    try:
        sent = storescu(tmp_path / "current", node.port, NODE_AE, calling="SCANNER")
        assert sent.returncode == 0, sent.stderr
        started = time.monotonic()
        job_id, state, reason = _wait_job(node, {"refused", "queued", "running", "delivered", "failed"}, 30)
        assert time.monotonic() - started < 20
        assert state == "refused", (state, reason)
        assert reason.startswith("priors: 0 of 2 prior(s) at hand; ")
        assert "archive main:" in reason
        listed = node.cli_json("jobs")
        rows = listed["jobs"] if isinstance(listed, dict) else listed
        assert any(j["id"] == job_id and j["state"] == "refused" and j["reason"] == reason for j in rows)
        transitions = [json.loads(r[5]) for r in audit_rows(node, AuditEvent.JOB_TRANSITION.value)]
        assert any(
            t["job_id"] == job_id and t["to_state"] == "refused" and t["reason"] == reason
            for t in transitions
        )
        assert db_rows(node, "select count(*) from job_priors") == [(0,)]
    finally:
        node.stop()


@pytest.mark.parametrize("method", ["c-move", "c-get"])
def test_the_two_wanted_priors_are_registered_and_their_registration_objects_delivered(
    tmp_path: Path, archive: Orthanc, method: str
) -> None:
    """Acceptance: a patient with three earlier SIMULATED head MR studies in Orthanc, each the
    same head moved by its own known rigid transform on its own Frame of Reference; the rule
    asks for two priors registered rigidly. Exactly the two newest are retrieved (by C-MOVE,
    in a second run by C-GET) and registered; one Spatial Registration object per prior
    reaches Orthanc with the forwarded study, dciodvfy-clean, its matrix — and the
    provenance record's — the known transform within 1 mm / 0.5°; every output cites both
    priors."""
    import numpy as np
    import pydicom

    from tests.test_registration import (
        Study,
        clean_head,
        dciodvfy,
        draw_rigid,
        grid_centre,
        grid_image,
        matrix_for,
        moved,
        mr_series,
        rician,
        rigid_matrix,
        transform_error,
    )

    clean = clean_head()
    image = grid_image(clean)
    centre = grid_centre(image)
    rng = np.random.default_rng(5)
    current = mr_series(rician(clean, rng), Study(generate_uid(), generate_uid()), 3, "SIMULATED T1 current")
    truths: dict[str, np.ndarray] = {}  # prior Frame of Reference → true prior → current matrix
    series_of: dict[str, str] = {}  # prior series UID → its study date
    series_at: dict[str, str] = {}  # prior Frame of Reference → its series UID
    for day in ("20220310", "20230310", "20240310"):
        angles, shift = draw_rigid(rng)
        truth = rigid_matrix(angles, shift, centre)
        prior = mr_series(
            rician(1.15 * moved(image, truth), rng),
            Study(generate_uid(), generate_uid()),
            2,
            f"SIMULATED T1 prior {day}",
        )
        # the priors are really moved: taken as aligned they would be off by more than 5 mm
        assert transform_error(np.eye(4), truth, current)[0] > 5.0
        truths[str(prior.datasets[0].FrameOfReferenceUID)] = truth
        series_of[str(prior.datasets[0].SeriesInstanceUID)] = day
        series_at[str(prior.datasets[0].FrameOfReferenceUID)] = str(prior.datasets[0].SeriesInstanceUID)
        for ds in prior.datasets:
            ds.PatientID = PATIENT
            for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
                if keyword in ds:
                    setattr(ds, keyword, day)
            archive.upload(_part10(ds))
    wanted = {uid for uid, day in series_of.items() if day != "20220310"}
    seeded = archive.statistics()["CountInstances"]
    folder = tmp_path / "current"
    folder.mkdir()
    for n, ds in enumerate(current.datasets):
        ds.PatientID = PATIENT
        ds.save_as(folder / f"{n:03d}.dcm", enforce_file_format=True)
    current_study = str(current.datasets[0].StudyInstanceUID)
    config = (
        f'[node]\nae_title = "{NODE_AE}"\n'
        + node_config(archive, stable_seconds=1.0)
        + _archive_toml(archive, method).replace(
            "retrieve_timeout_seconds = 30", "retrieve_timeout_seconds = 60"
        )
    )
    policy = _policy("main", "refuse", 90, count=2, registration="rigid")
    node = NodeProcess(tmp_path / "home", config, ae_title=NODE_AE, policy=policy)
    if method == "c-move":
        archive.register_modality("node", NODE_AE, node.port, storage_commitment=False)
    node.start()
    try:
        sent = storescu(folder, node.port, NODE_AE, calling="SCANNER")
        assert sent.returncode == 0, sent.stderr
        job_id, state, reason = _wait_job(node, {"delivered", "failed", "refused", "held"}, 300)
        assert state == "delivered", (state, reason)
        got = db_rows(node, "select series_uid from job_priors where job_fk = ?", (job_id,))
        assert {uid for (uid,) in got} == wanted
        slices = len(current.datasets)
        deadline = time.monotonic() + 20
        while archive.statistics()["CountInstances"] < seeded + slices + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert archive.statistics()["CountInstances"] == seeded + slices + 2
        registrations = [
            s for s in archive.series_of_study(current_study) if s["MainDicomTags"]["Modality"] == "REG"
        ]
        assert len(registrations) == 2
        delivered: dict[str, tuple[str, np.ndarray]] = {}  # prior series → (REG SOP UID, matrix)
        for series in registrations:
            (instance,) = archive.instances_of_series(series["MainDicomTags"]["SeriesInstanceUID"])
            path = tmp_path / f"{instance['ID']}.dcm"
            path.write_bytes(archive.instance_file(instance["ID"]))
            errors, _ = dciodvfy(path)
            assert errors == [], errors
            ds = pydicom.dcmread(path)
            (frame,) = [
                f for f in truths if f in {str(i.FrameOfReferenceUID) for i in ds.RegistrationSequence}
            ]
            matrix, kind = matrix_for(ds, frame)
            assert kind == "RIGID"
            displacement, rotation = transform_error(matrix, truths[frame], current)
            assert displacement < 1.0 and rotation < 0.5, (displacement, rotation)
            # the REG object cites both priors (item 5), each in its own study
            cited = {
                str(series.SeriesInstanceUID)
                for study in ds.StudiesContainingOtherReferencedInstancesSequence
                for series in study.ReferencedSeriesSequence
            }
            assert cited == wanted
            delivered[series_at[frame]] = (str(ds.SOPInstanceUID), matrix)
        assert set(delivered) == wanted
        # Every provenance record lists both priors with their registration: the same matrices.
        provenance = [json.loads(r[5]) for r in audit_rows(node, AuditEvent.PROVENANCE.value)]
        assert len(provenance) == 3  # the forwarded series and the two registration series
        for record in provenance:
            assert {x["series_uid"] for x in record["priors"]} == wanted
            for listed in record["priors"]:
                done = listed["registration"]
                assert done["mode"] == "rigid" and done["quality_ok"] is True
                sop_uid, matrix = delivered[listed["series_uid"]]
                assert done["registration_sop_uid"] == sop_uid
                np.testing.assert_allclose(np.array(done["matrix"]).reshape(4, 4), matrix, atol=1e-4)
        # the audit shows the queries and the two transfers, by the method asked
        transfers = [
            json.loads(r[5])
            for r in audit_rows(node, AuditEvent.BEGIN_TRANSFERRING.value)
            if "archive" in json.loads(r[5])
        ]
        assert len(transfers) == 2
        assert {t["method"] for t in transfers} == {method}
        queries = [json.loads(r[5]) for r in audit_rows(node, AuditEvent.QUERY.value)]
        assert queries and all(q["archive"] == "main" for q in queries)
    finally:
        node.stop()
