"""Priors that fail to arrive, against a real node process (``dicom-node serve``).

* A C-MOVE that returns failures: Orthanc holds the patient's two priors but does not know
  the node as a modality, so it answers each C-MOVE with a failure status. With
  ``on_missing: run`` the job runs without the priors (delivered to Orthanc); with
  ``on_missing: refuse`` it is refused. Either way within the rule's timeout, the reason
  naming the failure in ``jobs``, ``job_transitions`` and the audit log.
* A prior that never arrives: a fake archive (pynetdicom) answers the study and series
  queries with two matching priors, accepts the C-MOVE and then never sends anything nor
  answers. The job waits in ``fetching-priors`` and, within the rule's timeout, ends
  ``refused`` or runs without them; nothing hangs and the node stops cleanly afterwards.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from audit import AuditEvent
from dicom_node.lab.localpeers import MiniPACS
from tests.conftest import audit_rows, db_rows, node_config, require
from tests.integration.test_priors import NODE_AE, PATIENT, _current_study, _part10, _policy
from tests.peers import ORTHANC, NodeProcess, Orthanc, free_port, storescu
from tests.test_archives import mr_instance

pytestmark = pytest.mark.integration

#: The rule's ``timeout_seconds``: short, so a test waits little for what never comes.
TIMEOUT = 4.0
#: The two priors the fake archive and Orthanc hold (newest first, as the node asks for them).
PRIOR_DATES = ("20240310", "20230310")


def _settled_job(node: NodeProcess, timeout: float) -> tuple[int, str, str]:
    """The node's one job once it has left ``fetching-priors`` (and, when it runs, ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = db_rows(node, "select id, state, reason from jobs order by id")
        if rows and rows[0][1] in {"refused", "delivered", "failed", "held"}:
            return rows[0]
        time.sleep(0.2)
    raise AssertionError(f"no job settled in {timeout} s: {db_rows(node, 'select * from jobs')}")


def _transitions(node: NodeProcess, job_id: int) -> list[tuple[Any, ...]]:
    return db_rows(
        node,
        "select from_state, to_state, reason, at from job_transitions where job_fk = ? order by id",
        (job_id,),
    )


def _assert_reason_everywhere(
    node: NodeProcess, job_id: int, to_state: str, reason: str, since: float | None = None
) -> None:
    """The priors' reason is on the job (``dicom-node jobs``), on its transition out of
    ``fetching-priors`` (within the rule's timeout of the job's start, or of ``since``: the
    epoch time a restarted node was listening again) and in the audit log."""
    moves = _transitions(node, job_id)
    assert moves[0][:3] == (None, "fetching-priors", None)
    assert moves[1][:3] == ("fetching-priors", to_state, reason)
    began = moves[0][3] if since is None else max(moves[0][3], since)
    assert moves[1][3] - began < TIMEOUT + 3.0, moves  # settled in time, nothing hung
    if to_state == "refused":
        # A job that ran on shows its later reason (None once delivered) in the listing;
        # the priors' reason stays on its transition and in the audit log.
        listed = node.cli_json("jobs")
        rows = listed["jobs"] if isinstance(listed, dict) else listed
        assert [(j["state"], j["reason"]) for j in rows if j["id"] == job_id] == [("refused", reason)]
    transitions = [json.loads(r[5]) for r in audit_rows(node, AuditEvent.JOB_TRANSITION.value)]
    assert any(
        t["job_id"] == job_id and t["to_state"] == to_state and t["reason"] == reason for t in transitions
    ), transitions


def _stop(node: NodeProcess) -> float:
    """SIGTERM the node; the seconds it took to end."""
    started = time.monotonic()
    node.stop()
    return time.monotonic() - started


def _assert_stopped_cleanly(node: NodeProcess, seconds: float) -> None:
    """The node ended promptly, with exit code 0 and no traceback (no fetch held it up)."""
    assert node.proc is not None
    assert node.proc.returncode == 0, node.log_text()[-3000:]
    assert seconds < 5
    assert "Traceback" not in node.log_text(), node.log_text()[-3000:]


# -- a C-MOVE that returns failures (Orthanc) ------------------------------------------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    require(ORTHANC)
    peer = Orthanc(
        tmp_path, extra_config={"DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True}
    ).start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.mark.parametrize("on_missing", ["run", "refuse"])
def test_a_c_move_that_returns_failures(tmp_path: Path, orthanc: Orthanc, on_missing: str) -> None:
    """Acceptance: "a C-MOVE that returns failures" — Orthanc answers the C-MOVE with a
    failure status (the node is no modality it knows): ``on_missing: run`` delivers the job
    without the priors, ``refuse`` refuses it; the reason names the failure."""
    priors = []
    for day in PRIOR_DATES:
        study_uid, series_uid = generate_uid(), generate_uid()
        for number in (1, 2, 3):
            orthanc.upload(_part10(mr_instance(PATIENT, study_uid, series_uid, number, day)))
        priors.append(study_uid)
    seeded = orthanc.statistics()["CountInstances"]
    config = (
        f'[node]\nae_title = "{NODE_AE}"\n'
        + node_config(orthanc, stable_seconds=1.0)
        + f"""
[archives.main]
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
method = "c-move"
timeout_seconds = 5
"""
    )
    policy = _policy("main", on_missing, TIMEOUT)
    node = NodeProcess(tmp_path / "home", config, ae_title=NODE_AE, policy=policy)
    # deliberately not: orthanc.register_modality("node", NODE_AE, node.port)
    _current_study(tmp_path / "current")
    node.start()
    try:
        sent = storescu(tmp_path / "current", node.port, NODE_AE, calling="SCANNER")
        assert sent.returncode == 0, sent.stderr
        job_id, state, reason = _settled_job(node, 40)
        where = f"archive main ({orthanc.aet}@127.0.0.1:{orthanc.dicom_port})"
        # Orthanc (1.10) answers a C-MOVE to an AE title it does not know with 0xC000
        # ("unable to process") and no Error Comment, not with 0xA801.
        failure = (
            f"{where} answered C-MOVE with status 0xC000: unable to process (does the archive know "
            "this node's AE title, host and port as a move destination? its log says why)"
        )
        why = f"0 of 2 prior(s) at hand; {priors[0]}: {failure}; {priors[1]}: {failure}"
        if on_missing == "run":
            assert state == "delivered", (state, reason)
            _assert_reason_everywhere(node, job_id, "queued", f"priors: running with {why}")
            # ran without priors: none recorded for it, none stored; the study reached Orthanc
            deadline = time.monotonic() + 10
            while orthanc.statistics()["CountInstances"] < seeded + 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert orthanc.statistics()["CountInstances"] == seeded + 3
            provenance = [json.loads(r[5]) for r in audit_rows(node, AuditEvent.PROVENANCE.value)]
            assert provenance and all(not record.get("priors") for record in provenance)
        else:
            assert (state, reason) == ("refused", f"priors: {why}")
            _assert_reason_everywhere(node, job_id, "refused", reason)
            assert orthanc.statistics()["CountInstances"] == seeded
        assert db_rows(node, "select count(*) from job_priors") == [(0,)]
        assert db_rows(node, "select count(*) from instances where role is not null") == [(0,)]
        # The audit log: each failed retrieval, with the archive's status as its reason.
        ended = [
            (r[1], r[2], json.loads(r[5]))
            for r in audit_rows(node, AuditEvent.INSTANCES_TRANSFERRED.value)
            if json.loads(r[5]).get("direction") == "retrieved"
        ]
        assert [(outcome, uid, facts["reason"]) for outcome, uid, facts in ended] == [
            (8, priors[0], failure),
            (8, priors[1], failure),
        ]
    finally:
        seconds = _stop(node)
    _assert_stopped_cleanly(node, seconds)


# -- a prior that never arrives (a fake archive) ---------------------------------------------


class SilentArchive:
    """A Study Root C-FIND / C-MOVE SCP that knows two MR priors of PATIENT and never sends
    them: its C-MOVE handler takes the request and then waits, answering nothing, until the
    test releases it (bounded, so no thread outlives the test for long)."""

    AET = "SILENTARCH"

    def __init__(self) -> None:
        self.port = free_port()
        self.studies = {generate_uid(): (day, generate_uid()) for day in PRIOR_DATES}
        self.moves: list[tuple[str, str]] = []  # (Move Destination, Study Instance UID) asked
        self.release = threading.Event()
        #: False: a C-MOVE is answered at once, "move destination unknown" (0xA801).
        self.silent = True
        ae = AE(ae_title=self.AET)
        for context in (
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove,
            Verification,
        ):
            ae.add_supported_context(context)
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_MOVE, self.on_move)],
        )
        assert server is not None  # block=False: the running server
        self.server = server

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        asked = event.identifier
        for study_uid, (day, series_uid) in self.studies.items():
            if asked.QueryRetrieveLevel == "SERIES" and asked.get("StudyInstanceUID") != study_uid:
                continue
            answer = Dataset()
            answer.QueryRetrieveLevel = asked.QueryRetrieveLevel
            answer.PatientID = PATIENT
            answer.StudyInstanceUID = study_uid
            answer.StudyDate = day
            if asked.QueryRetrieveLevel == "STUDY":
                answer.ModalitiesInStudy = "MR"
            else:
                answer.SeriesInstanceUID = series_uid
                answer.Modality = "MR"
                answer.SeriesNumber = 1
                answer.NumberOfSeriesRelatedInstances = 3
            yield 0xFF00, answer
        yield 0x0000, None

    def on_move(self, event: Any) -> Iterator[Any]:
        self.moves.append((str(event.move_destination).strip(), str(event.identifier.StudyInstanceUID)))
        if self.silent:
            self.release.wait(60)  # the archive "works on it" and never sends a thing
        yield None, None  # move destination unknown (when silent: after the test is over)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def silent_archive() -> Iterator[SilentArchive]:
    archive = SilentArchive()
    try:
        yield archive
    finally:
        archive.stop()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[MiniPACS]:
    peer = MiniPACS(tmp_path).start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.mark.parametrize("on_missing", ["refuse", "run"])
def test_a_prior_that_never_arrives(
    tmp_path: Path, silent_archive: SilentArchive, pacs: MiniPACS, on_missing: str
) -> None:
    """Acceptance: "a prior that never arrives" — the job waits in ``fetching-priors``, then
    within the rule's timeout is refused (``on_missing: refuse``) or runs without the priors
    (``run``); the reason is in ``jobs`` and the audit log, and the node stops cleanly."""
    config = (
        f'[node]\nae_title = "{NODE_AE}"\n'
        + node_config(None, stable_seconds=1.0, policy=True)
        + f"""
[destinations.pacs]
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
timeout_seconds = 5

[archives.main]
ae_title = "{SilentArchive.AET}"
host = "127.0.0.1"
port = {silent_archive.port}
method = "c-move"
timeout_seconds = 5
retrieve_timeout_seconds = 60
"""
    )
    node = NodeProcess(
        tmp_path / "home", config, ae_title=NODE_AE, policy=_policy("main", on_missing, TIMEOUT)
    )
    _current_study(tmp_path / "current")
    node.start()
    try:
        sent = storescu(tmp_path / "current", node.port, NODE_AE, calling="SCANNER")
        assert sent.returncode == 0, sent.stderr
        # The archive got the C-MOVE of the newest prior, to this node, while the job waits.
        newest, older = silent_archive.studies
        deadline = time.monotonic() + 20
        while not silent_archive.moves and time.monotonic() < deadline:
            time.sleep(0.1)
        assert silent_archive.moves == [(NODE_AE, newest)]
        assert db_rows(node, "select state from jobs") == [("fetching-priors",)]

        job_id, state, reason = _settled_job(node, 30)
        where = f"archive main ({SilentArchive.AET}@127.0.0.1:{silent_archive.port})"
        why = (
            f"0 of 2 prior(s) at hand; {newest}: C-MOVE from {where} timed out (retrieve timeout "
            f"reached); {older}: not retrieved within {TIMEOUT:g} s"
        )
        if on_missing == "refuse":
            assert (state, reason) == ("refused", f"priors: {why}")
            _assert_reason_everywhere(node, job_id, "refused", reason)
            assert pacs.count() == 0
        else:
            assert state == "delivered", (state, reason)
            _assert_reason_everywhere(node, job_id, "queued", f"priors: running with {why}")
            assert pacs.count() == 3
        assert silent_archive.moves == [(NODE_AE, newest)]  # the older one was not even asked for
        assert db_rows(node, "select count(*) from job_priors") == [(0,)]
        # The audit log: the queries answered, the retrieval begun and ended timed out.
        queries = [(r[1], json.loads(r[5])) for r in audit_rows(node, AuditEvent.QUERY.value)]
        assert [(o, q["level"], q["matches"]) for o, q in queries] == [
            (0, "STUDY", 2),
            (0, "SERIES", 1),
            (0, "SERIES", 1),
        ]
        ended = [
            (r[1], r[2], json.loads(r[5])["reason"])
            for r in audit_rows(node, AuditEvent.INSTANCES_TRANSFERRED.value)
            if json.loads(r[5]).get("direction") == "retrieved"
        ]
        assert ended == [(8, newest, f"C-MOVE from {where} timed out (retrieve timeout reached)")]
    finally:
        seconds = _stop(node)
        silent_archive.release.set()  # only now: the node must not have needed the archive to end
    _assert_stopped_cleanly(node, seconds)


def test_stopping_the_node_while_a_prior_never_arrives(
    tmp_path: Path, silent_archive: SilentArchive, pacs: MiniPACS
) -> None:
    """Acceptance: "a prior that never arrives" — nothing hangs: a node stopped while its
    C-MOVE waits on the archive (the rule allows 120 s) ends promptly, the retrieval audited
    as aborted; the job is left in ``fetching-priors`` and the next start picks it up again
    (the archive now answers the C-MOVE with a failure: refused, with the reason)."""
    config = (
        f'[node]\nae_title = "{NODE_AE}"\n'
        + node_config(None, stable_seconds=1.0, policy=True)
        + f"""
[destinations.pacs]
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
timeout_seconds = 5

[archives.main]
ae_title = "{SilentArchive.AET}"
host = "127.0.0.1"
port = {silent_archive.port}
method = "c-move"
timeout_seconds = 5
"""
    )
    node = NodeProcess(tmp_path / "home", config, ae_title=NODE_AE, policy=_policy("main", "refuse", 120))
    _current_study(tmp_path / "current")
    newest, older = silent_archive.studies
    where = f"archive main ({SilentArchive.AET}@127.0.0.1:{silent_archive.port})"
    node.start()
    try:
        sent = storescu(tmp_path / "current", node.port, NODE_AE, calling="SCANNER")
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 20
        while not silent_archive.moves and time.monotonic() < deadline:
            time.sleep(0.1)
        assert silent_archive.moves == [(NODE_AE, newest)]
    finally:
        seconds = _stop(node)
    _assert_stopped_cleanly(node, seconds)
    assert db_rows(node, "select state from jobs") == [("fetching-priors",)]
    ended = [
        (r[1], r[2], json.loads(r[5])["reason"])
        for r in audit_rows(node, AuditEvent.INSTANCES_TRANSFERRED.value)
        if json.loads(r[5]).get("direction") == "retrieved"
    ]
    assert ended == [(8, newest, f"C-MOVE from {where} aborted: this node is stopping")]

    silent_archive.silent = False
    node.start()
    restarted = time.time()  # the wait before the restart is the stopped node's, not the fetch's
    try:
        job_id, state, reason = _settled_job(node, 30)
        failure = (
            f"{where} answered C-MOVE with status 0xA801: move destination unknown "
            "(register this node's AE title, host and port with the archive)"
        )
        why = f"0 of 2 prior(s) at hand; {newest}: {failure}; {older}: {failure}"
        assert (state, reason) == ("refused", f"priors: {why}")
        _assert_reason_everywhere(node, job_id, "refused", reason, since=restarted)
        assert silent_archive.moves == [(NODE_AE, newest), (NODE_AE, newest), (NODE_AE, older)]
        assert pacs.count() == 0
    finally:
        seconds = _stop(node)
        silent_archive.release.set()
    _assert_stopped_cleanly(node, seconds)
