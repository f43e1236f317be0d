"""Stopping while a prior never arrives (issue 16): nothing waits out the rule's timeout.

Found by ``tests/integration/test_prior_failures.py``: a node stopped while its C-MOVE
waited on a silent archive logged "stopped cleanly" and then hung until SIGKILL — the
fetch ran on a ThreadPoolExecutor thread (joined at interpreter exit) and the open
association's non-daemon DUL thread kept the process alive; aborting the association did
not wake the C-MOVE waiting for a response either. Now :meth:`Archives.abort_retrievals`
ends a retrieval at once and :meth:`PriorFetcher.stop` leaves its job for the next start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

from audit import AuditEvent
from dicom_node.ingest.archives import Archives, RetrieveResult
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.store import InstanceStore
from dicom_node.jobs.prior_fetch import PriorFetcher
from dicom_node.runtime import Runtime
from tests.peers import free_port
from tests.test_priors import (
    ARCHIVE,
    FakeArchive,
    _job,
    _job_for_current_study,
)


class SilentMoveSCP:
    """Takes a C-MOVE and answers nothing until released (bounded)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.asked = threading.Event()
        self.release = threading.Event()
        ae = AE(ae_title="SILENT")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_MOVE, self.on_move)]
        )
        assert server is not None  # block=False: the running server
        self.server = server

    def on_move(self, event: Any) -> Iterator[Any]:
        self.asked.set()
        self.release.wait(30)
        yield None, None


@pytest.fixture
def silent() -> Iterator[SilentMoveSCP]:
    scp = SilentMoveSCP()
    try:
        yield scp
    finally:
        scp.release.set()
        scp.server.shutdown()


@pytest.fixture
def archives(tmp_path: Path, silent: SilentMoveSCP) -> Iterator[Archives]:
    section = {"ae_title": "SILENT", "host": "127.0.0.1", "port": silent.port, "timeout_seconds": 5}
    rt = Runtime.open(None, tmp_path, {"node": {"ae_title": "STOPNODE"}, "archives": {"main": section}})
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01))
    try:
        yield Archives(rt.config, rt.paths.home, rt.audit, db=rt.db, store=store)
    finally:
        store.close()
        rt.close()


def test_aborting_the_retrievals_ends_a_c_move_the_archive_never_answers(
    archives: Archives, silent: SilentMoveSCP
) -> None:
    """A C-MOVE left waiting (60 s allowed) ends within a second of abort_retrievals, its
    result and its audit record saying the node is stopping; one begun later ends at once."""
    results: list[RetrieveResult] = []
    worker = threading.Thread(
        target=lambda: results.append(archives.get("main").retrieve("1.2.3", timeout=60))
    )
    worker.start()
    assert silent.asked.wait(10)
    started = time.monotonic()
    archives.abort_retrievals()
    worker.join(5)
    assert not worker.is_alive() and time.monotonic() - started < 2
    (result,) = results
    stopping = f"C-MOVE from archive main (SILENT@127.0.0.1:{silent.port}) aborted: this node is stopping"
    assert not result.ok and result.error == stopping
    started = time.monotonic()
    later = archives.get("main").retrieve("1.2.4", timeout=60)
    not_begun = f"archive main (SILENT@127.0.0.1:{silent.port}): not retrieved, this node is stopping"
    assert later.error == not_begun and time.monotonic() - started < 2
    assert archives.audit is not None
    ended = archives.audit.events(AuditEvent.INSTANCES_TRANSFERRED)
    assert [(e.study_uid, e.facts["reason"]) for e in ended] == [("1.2.3", stopping), ("1.2.4", not_begun)]


class BlockingArchive(FakeArchive):
    """Answers the queries; a retrieve waits until the fetcher's stop aborts it."""

    def __init__(self) -> None:
        super().__init__(dict(ARCHIVE))
        self.retrieving = threading.Event()
        self.aborted = threading.Event()
        self.returned = threading.Event()

    def retrieve(
        self,
        study_uid: str,
        series_uids: Any = None,
        timeout: float | None = None,
        patient: tuple[str, str] | None = None,
    ) -> RetrieveResult:
        self.retrieving.set()
        self.aborted.wait(30)
        self.returned.set()
        return RetrieveResult("pacs", "c-move", study_uid, tuple(series_uids or ()), error="aborted")


class AbortableArchives:
    def __init__(self, archive: BlockingArchive) -> None:
        self.archive = archive

    def get(self, name: str) -> Any:
        return self.archive

    def abort_retrievals(self) -> None:
        self.archive.aborted.set()


def test_stopping_the_fetcher_leaves_a_waiting_job_for_the_next_start(
    store_node: tuple[Runtime, InstanceStore],
) -> None:
    """The fetcher's stop aborts the retrieval under way and returns promptly; the job stays
    in ``fetching-priors`` (not refused for a retrieval the node itself cut short)."""
    rt, store = store_node
    job_id, _ = _job_for_current_study(rt, store, "refuse")
    archive = BlockingArchive()
    fetcher = PriorFetcher(rt.db, rt.audit, AbortableArchives(archive), every=0.05)
    fetcher.start()
    assert archive.retrieving.wait(10)
    started = time.monotonic()
    fetcher.stop()
    assert time.monotonic() - started < 2
    assert archive.returned.wait(2)  # the retrieval was cut short ...
    time.sleep(0.3)
    state, reason, moves = _job(rt, job_id)  # ... and its fetch settled nothing
    assert (state, reason) == ("fetching-priors", None)
    assert moves == [(None, "fetching-priors", None)]
