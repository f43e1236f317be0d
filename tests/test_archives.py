"""Archives: their config, the queries the node builds, how it reads the answers, and the
``prior`` role that keeps a retrieved study from ever becoming a job.

The instances are small SIMULATED MR images made here (a gradient, no anatomy).
"""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import select

from audit import AuditEvent, Outcome
from dicom_node.config import ConfigError, NodeConfig, load_config
from dicom_node.db import schema as t
from dicom_node.ingest.archives import (
    ArchiveError,
    Archives,
    RetrieveResult,
    StudyMatch,
    StudyQuery,
    keep_study,
)
from dicom_node.ingest.origin import PRIOR
from dicom_node.ingest.receiver import Receiver
from dicom_node.ingest.store import InstanceStore
from dicom_node.jobs.intake import JobIntake
from dicom_node.jobs.routing import PolicyRouter
from dicom_node.lab.localpeers import policy_yaml
from dicom_node.runtime import Runtime
from policies.loader import load_policy
from tests.peers import free_port

NODE_AE = "DICOMNODE"


def mr_instance(
    patient_id: str, study_uid: str, series_uid: str, number: int, study_date: str, size: int = 16
) -> Dataset:
    """One small SIMULATED MR image (a gradient) of ``study_uid`` / ``series_uid``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.PatientName = patient_id, "SIMULATED^PRIOR"
    ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = study_date, "090000", f"ACC{study_date}"
    ds.StudyDescription = "SIMULATED MR head"
    ds.StudyID = "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, number
    ds.SeriesDescription = "SIMULATED T1"
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (np.arange(size * size, dtype=np.uint16).reshape(size, size) * number).tobytes()
    return ds


def wire_bytes(ds: Dataset) -> bytes:
    """The data set as a peer sends it (Explicit VR Little Endian, no file meta)."""
    fp = io.BytesIO()
    from pydicom.filebase import DicomFileLike

    out = DicomFileLike(fp)
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return fp.getvalue()


# -- config ----------------------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> NodeConfig:
    path = tmp_path / "dicom-node.toml"
    path.write_text(text)
    return load_config(path).config


def test_an_archive_needs_what_its_method_needs(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        '[archives.pacs]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
        '[archives.web]\nmethod = "dicomweb"\ndicomweb_url = "http://127.0.0.1:8042/dicom-web"\n',
    )
    assert config.archives["pacs"].method == "c-move"
    assert config.archive_of("ORTHANC") == "pacs"
    assert config.archive_of("OTHER") is None
    problems = {
        '[archives.pacs]\nmethod = "c-get"\nhost = "h"\n': "method 'c-get' needs ae_title, port",
        '[archives.web]\nmethod = "dicomweb"\n': "needs dicomweb_url",
        '[archives.web]\nmethod = "dicomweb"\ndicomweb_url = "http://h/x"\nusername = "u"\n': (
            "username needs password_file"
        ),
        '[archives.web]\nmethod = "dicomweb"\ndicomweb_url = "http://h/x"\npassword = "secret"\n': (
            "unknown key"
        ),
        '[archives.pacs]\nae_title = "A\\\\B"\nhost = "h"\nport = 1\n': "not a valid AE title",
    }
    for text, expected in problems.items():
        with pytest.raises(ConfigError) as caught:
            _load(tmp_path, text)
        assert expected in str(caught.value), str(caught.value)
        assert "\n" not in str(caught.value)


# -- queries and answers ---------------------------------------------------------------------


def test_study_query_keys_and_identifier() -> None:
    query = StudyQuery(patient_id="P1", modality="MR", since=date(2024, 1, 1))
    assert query.keys() == {"PatientID": "P1", "ModalitiesInStudy": "MR", "StudyDate": "20240101-"}
    identifier = query.identifier()
    assert identifier.QueryRetrieveLevel == "STUDY"
    assert identifier.StudyDate == "20240101-" and identifier.PatientID == "P1"
    assert identifier.StudyInstanceUID == "" and identifier.NumberOfStudyRelatedInstances == ""
    assert StudyQuery(until=date(2023, 12, 31)).keys() == {"StudyDate": "-20231231"}
    bounded = StudyQuery(since=date(2023, 1, 1), until=date(2023, 6, 30)).keys()
    assert bounded == {"StudyDate": "20230101-20230630"}


def test_answers_are_parsed_and_checked_again() -> None:
    answer = Dataset()
    answer.StudyInstanceUID = "1.2.3"
    answer.PatientID = "P1"
    answer.StudyDate = "20230105"
    answer.ModalitiesInStudy = ["MR", "SR"]
    answer.NumberOfStudyRelatedInstances = "12"
    answer.NumberOfStudyRelatedSeries = ""
    match = StudyMatch.from_dataset(answer)
    assert match.modalities == ("MR", "SR") and match.instance_count == 12 and match.series_count is None
    assert keep_study(match, StudyQuery(modality="MR"))
    # an archive that ignored ModalitiesInStudy or the date range: checked here
    assert not keep_study(match, StudyQuery(modality="CT"))
    assert not keep_study(match, StudyQuery(since=date(2024, 1, 1)))
    assert keep_study(match, StudyQuery(since=date(2023, 1, 5), until=date(2023, 1, 5)))


def _status(code: int, completed: int = 0, failed: int = 0, warning: int = 0, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.NumberOfCompletedSuboperations = completed
    ds.NumberOfFailedSuboperations = failed
    ds.NumberOfWarningSuboperations = warning
    if comment:
        ds.ErrorComment = comment
    return ds


def _archive(tmp_path: Path) -> Any:
    config = NodeConfig.model_validate(
        {
            "node": {"ae_title": NODE_AE},
            "archives": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}},
        }
    )
    return Archives(config, tmp_path, None).get("pacs")


def test_move_responses_are_counted_and_failures_named(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    failed_list = Dataset()
    failed_list.FailedSOPInstanceUIDList = ["1.2.3.4", "1.2.3.5"]
    result = RetrieveResult("pacs", "c-move", "1.2.3")
    responses = iter(
        [(_status(0xFF00, 1), None), (_status(0xFF00, 2), None), (_status(0xB000, 3, 2), failed_list)]
    )
    assert archive._tally(result, responses, float("inf"), "C-MOVE")
    assert (result.completed, result.failed, result.warning) == (3, 2, 0)
    assert [f.split(":")[0] for f in result.failures] == ["1.2.3.4", "1.2.3.5"]
    assert not result.ok

    unknown = RetrieveResult("pacs", "c-move", "1.2.3")
    assert not archive._tally(unknown, iter([(_status(0xA801, comment="unknown AE"), None)]), 1e18, "C-MOVE")
    assert unknown.error is not None and "0xA801: move destination unknown" in unknown.error
    assert "unknown AE" in unknown.error

    cut = RetrieveResult("pacs", "c-get", "1.2.3")
    assert not archive._tally(cut, iter([(_status(0xFF00, 4), None), (Dataset(), None)]), 0.0, "C-GET")
    assert cut.completed == 4 and cut.error is not None and "timed out" in cut.error


def test_archive_down_is_one_line_and_the_query_is_audited_as_failed(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    rt = Runtime.open(
        None, tmp_path, {"archives": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}}}
    )
    try:
        archives = Archives(rt.config, rt.paths.home, rt.audit, db=rt.db)
        with pytest.raises(ArchiveError) as caught:
            archives.get("pacs").find_studies(StudyQuery(patient_id="P1", modality="MR"))
        assert "connection refused" in str(caught.value) and "PACS@127.0.0.1" in str(caught.value)
        (query,) = rt.audit.events(AuditEvent.QUERY)
        assert query.outcome == Outcome.MINOR_FAILURE
        assert query.patient_id == "P1"
        assert query.facts["archive"] == "pacs" and query.facts["query"]["ModalitiesInStudy"] == "MR"
        result = archives.get("pacs").retrieve("1.2.3", timeout=5)
        assert result.error is not None and "connection refused" in result.error and not result.sop_uids
        ended = rt.audit.events(AuditEvent.INSTANCES_TRANSFERRED)
        assert ended[-1].outcome == Outcome.SERIOUS_FAILURE and ended[-1].facts["direction"] == "retrieved"
        with pytest.raises(ArchiveError, match="no archive 'nope'"):
            archives.get("nope")
    finally:
        rt.close()


# -- the prior role --------------------------------------------------------------------------


@pytest.mark.parametrize("ai_outputs", [False, True])
def test_a_retrieved_prior_opens_no_job_and_reaches_no_destination(
    store_node: tuple[Runtime, InstanceStore], ai_outputs: bool
) -> None:
    rt, store = store_node
    study_uid, series_uid = generate_uid(), generate_uid()
    for number in (1, 2):
        ds = mr_instance("P1", study_uid, series_uid, number, "20230105")
        result = store.put(
            wire_bytes(ds), ExplicitVRLittleEndian, claimed_sop_uid=ds.SOPInstanceUID, calling_ae="PACS",
            retrieved_from="pacs",
        )  # fmt: skip
        assert result.role == PRIOR
    policy = policy_yaml("forward")
    if ai_outputs:  # even a rule that takes other AI nodes' outputs does not take priors
        policy = policy.replace("gate: auto", "gate: auto\n  ai_outputs: accept")
    path = rt.paths.home / "policy.yaml"
    path.write_text(policy)
    router = PolicyRouter(load_policy(path, {"pacs"}), rt.paths.data, {"pacs": "PACS"})
    assert JobIntake(rt.db, rt.audit, router).study_ready(study_uid) == []
    with rt.db.read() as conn:
        roles = conn.execute(select(t.instances.c.role)).scalars().all()
        assert roles == [PRIOR, PRIOR]
        assert conn.execute(select(t.jobs)).all() == []
        assert conn.execute(select(t.deliveries)).all() == []
    stored = rt.audit.events(AuditEvent.INSTANCE_STORED)
    assert {e.facts["role"] for e in stored} == {PRIOR}
    assert stored[0].facts["recognised_by"] == "retrieved from archive pacs"
    assert rt.audit.events(AuditEvent.STUDY_READY) == []


def test_the_receiver_flags_our_own_moves_from_a_known_archive(tmp_path: Path) -> None:
    config = NodeConfig.model_validate(
        {
            "node": {"ae_title": NODE_AE},
            "receiver": {"require_known_callers": True},
            "archives": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}},
        }
    )
    rt = Runtime.open(None, tmp_path)
    try:
        receiver = Receiver(config, rt.paths, None, rt.audit)  # type: ignore[arg-type]
        ours = SimpleNamespace(MoveOriginatorApplicationEntityTitle=NODE_AE)
        someone_elses = SimpleNamespace(MoveOriginatorApplicationEntityTitle="VIEWER")
        assert receiver.prior_source("PACS", ours) == "pacs"
        assert receiver.prior_source("PACS", someone_elses) is None
        assert (
            receiver.prior_source("PACS", SimpleNamespace(MoveOriginatorApplicationEntityTitle=None)) is None
        )
        assert receiver.prior_source("SCANNER", ours) is None  # not an archive: an acquisition
        # a configured archive may store from its host even with require_known_callers
        assert receiver.caller_allowed("PACS", "127.0.0.1") == (True, None)
        assert receiver.caller_allowed("PACS", "10.9.9.9")[0] is False
        assert receiver.caller_allowed("SCANNER", "127.0.0.1")[0] is False
    finally:
        rt.close()
