"""Prior lookups end by the rule's timeout, whatever the archive does: one that answers a
C-FIND with "pending" for ever held a job in fetching-priors (and `archives find`) without
end, and one offering 3,000 studies, none with a wanted series, took 3,000 series queries
(83 s against a 5 s timeout)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicom_node.config import NodeConfig
from dicom_node.ingest.archives import ArchiveError, Archives, SeriesMatch, StudyMatch, StudyQuery
from dicom_node.jobs import priors as p
from dicom_node.runtime import Runtime
from policies.model import Priors
from tests.peers import free_port
from tests.test_priors import CURRENT


@pytest.fixture
def pending_for_ever() -> Iterator[int]:
    """A C-FIND SCP that answers every query with pending matches and never a final status."""
    stop = threading.Event()

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        while not stop.is_set():
            match = Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.PatientID = "P1"
            match.StudyInstanceUID = "1.2.3.4"
            yield 0xFF00, match
            time.sleep(0.05)
        yield 0xA700, None

    ae = AE(ae_title="PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield port
    finally:
        stop.set()
        server.shutdown()


def test_a_c_find_that_never_ends_is_cut_at_the_deadline(pending_for_ever: int, tmp_path: Path) -> None:
    config = NodeConfig.model_validate(
        {"archives": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pending_for_ever}}}
    )
    rt = Runtime.open(None, tmp_path)
    try:
        archive = Archives(config, tmp_path, rt.audit).get("pacs")
        started = time.monotonic()
        with pytest.raises(ArchiveError, match=r"did not finish the C-FIND within 2 s"):
            archive.find_studies(StudyQuery(patient_id="P1"), deadline=time.monotonic() + 2)
        assert time.monotonic() - started < 6
    finally:
        rt.close()


class ManyStudies:
    """3,000 studies (one of them the current: 2,999 candidates), none with a wanted series;
    each series query takes a moment."""

    def __init__(self) -> None:
        self.series_asked = 0

    def find_studies(self, query: StudyQuery, deadline: float | None = None) -> list[StudyMatch]:
        return [
            StudyMatch(f"1.2.3.{i}", "P1", "SIM", "20230101", None, ("MR",), None, 1, None)
            for i in range(1, 3001)
        ]

    def find_series(
        self, study_uid: str, modality: str | None = None, deadline: float | None = None
    ) -> list[SeriesMatch]:
        self.series_asked += 1
        time.sleep(0.01)
        return [SeriesMatch(study_uid, f"{study_uid}.1", "MR", 1, "localizer", "HEAD", 3)]


def test_thousands_of_candidate_studies_stop_at_the_deadline() -> None:
    priors = Priors(archive="pacs", count=1, modality="MR", series="T1", timeout_seconds=1)
    archive = ManyStudies()
    started = time.monotonic()
    with pytest.raises(
        ArchiveError, match=r"the series of 2999 candidate studies could not all be asked for"
    ):
        p.archive_priors(archive, priors, CURRENT, deadline=time.monotonic() + 0.5)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2
    assert 0 < archive.series_asked < 3000
