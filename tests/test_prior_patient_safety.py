"""A prior of another patient is never stored as this patient's, nor used.

Found by an archive that misbehaved on purpose (2026-12-07): a study of the same Patient ID
from another issuer was used as a prior; an archive that answered a C-GET with another
patient's instance inside the asked series had it stored and used; one that sent an
instance reusing the current study's SOP Instance UID replaced the acquired instance with
its own; and a C-GET answered with another study was reported as the asked one retrieved.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicom_node.db import schema as t
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.store import Expected, InstanceStore, StoreOutcome
from dicom_node.jobs import priors as p
from dicom_node.runtime import Runtime
from tests.test_archives import mr_instance, wire_bytes


def _put(store: InstanceStore, ds, *, prior: bool, expected: Expected | None = None):
    return store.put(
        wire_bytes(ds),
        ExplicitVRLittleEndian,
        claimed_sop_uid=ds.SOPInstanceUID,
        calling_ae="PACS" if prior else "SCANNER",
        retrieved_from="pacs" if prior else None,
        expected=expected,
    )


def _current_rows(rt: Runtime, sop_uid: str) -> list[tuple[int, str | None, bool]]:
    with rt.db.read() as conn:
        return [
            (r.version, r.role, r.current)
            for r in conn.execute(
                select(t.instances.c.version, t.instances.c.role, t.instances.c.current)
                .where(t.instances.c.sop_uid == sop_uid)
                .order_by(t.instances.c.version)
            )
        ]


def test_a_retrieved_instance_of_another_patient_or_study_is_refused(store_node) -> None:
    rt, store = store_node
    study, series = generate_uid(), generate_uid()
    asked = Expected(study, "P1", "")
    ours = mr_instance("P1", study, series, 1, "20230101")
    assert _put(store, ours, prior=True, expected=asked).outcome == StoreOutcome.STORED

    theirs = mr_instance("P2", study, series, 2, "20230101")  # inside the asked series
    result = _put(store, theirs, prior=True, expected=asked)
    assert result.outcome == StoreOutcome.REJECTED and result.quarantine_path is not None
    assert result.rejection is not None and "retrieved for another patient" in result.rejection.reason

    issuer = mr_instance("P1", study, series, 3, "20230101")
    issuer.IssuerOfPatientID = "HOSP_B"  # the same Patient ID from another issuer: another patient
    assert _put(store, issuer, prior=True, expected=asked).outcome == StoreOutcome.REJECTED

    other_study = mr_instance("P1", generate_uid(), generate_uid(), 1, "20230101")
    result = _put(store, other_study, prior=True, expected=asked)
    assert result.outcome == StoreOutcome.REJECTED
    assert result.rejection is not None and f"retrieved for study {study}" in result.rejection.reason
    with rt.db.read() as conn:
        stored = conn.execute(select(t.instances.c.sop_uid)).scalars().all()
    assert stored == [ours.SOPInstanceUID]


def test_a_prior_never_joins_a_study_held_under_another_patient(store_node) -> None:
    """C-MOVE's sub-operations arrive at the receiver, which knows no asked patient: the
    study this node holds decides."""
    rt, store = store_node
    study, series = generate_uid(), generate_uid()
    assert (
        _put(store, mr_instance("P1", study, series, 1, "20230101"), prior=False).outcome
        == StoreOutcome.STORED
    )
    result = _put(store, mr_instance("P2", study, series, 2, "20230101"), prior=True)
    assert result.outcome == StoreOutcome.REJECTED
    assert result.rejection is not None and "under another patient" in result.rejection.reason


def test_a_retrieved_instance_never_replaces_an_acquired_one(store_node) -> None:
    rt, store = store_node
    acquired = mr_instance("P1", generate_uid(), generate_uid(), 1, "20240601")
    assert _put(store, acquired, prior=False).outcome == StoreOutcome.STORED
    forged = mr_instance("P1", acquired.StudyInstanceUID, acquired.SeriesInstanceUID, 1, "20240601")
    forged.SOPInstanceUID = forged.file_meta.MediaStorageSOPInstanceUID = acquired.SOPInstanceUID
    forged.InstanceNumber = 7  # other content under the same SOP Instance UID
    result = _put(store, forged, prior=True)
    assert result.outcome == StoreOutcome.REJECTED
    assert result.rejection is not None and "may not replace" in result.rejection.reason
    assert _current_rows(rt, acquired.SOPInstanceUID) == [(1, None, True)]


def test_local_priors_are_of_the_same_patient_and_issuer(store_node) -> None:
    rt, store = store_node
    current, same, other_issuer = generate_uid(), generate_uid(), generate_uid()
    _put(store, mr_instance("P1", current, generate_uid(), 1, "20240601"), prior=False)
    _put(store, mr_instance("P1", same, generate_uid(), 1, "20230101"), prior=False)
    elsewhere = mr_instance("P1", other_issuer, generate_uid(), 1, "20230601")
    elsewhere.IssuerOfPatientID = "HOSP_B"
    _put(store, elsewhere, prior=False)
    with rt.db.read() as conn:
        study_id = conn.execute(select(t.studies.c.id).where(t.studies.c.study_uid == current)).scalar_one()
        now = p.current_study(conn, study_id, None)
        assert (now.patient_id, now.issuer) == ("P1", "")
        assert [s.study_uid for s in p.local_priors(conn, now)] == [same]


def test_an_acquired_instance_never_joins_a_study_of_another_patient(store_node, tmp_path: Path) -> None:
    """Not only priors: a study never mixes patients, or a job would process both patients'
    images as one study. Checked before the acknowledgement, so the sender hears it."""
    rt, store = store_node
    study, series = generate_uid(), generate_uid()
    first = mr_instance("P1", study, series, 1, "20240601")
    assert _put(store, first, prior=False).outcome == StoreOutcome.STORED
    second = mr_instance("P2", study, series, 2, "20240601")  # before the first is even indexed
    result = _put(store, second, prior=False)
    assert result.outcome == StoreOutcome.REJECTED and result.quarantine_path is not None
    assert result.rejection is not None and "held here under another patient" in result.rejection.reason
    issuer = mr_instance("P1", study, series, 3, "20240601")
    issuer.IssuerOfPatientID = "HOSP_B"  # the first said no issuer: not a contradiction
    assert _put(store, issuer, prior=False).outcome == StoreOutcome.STORED
    unnamed = mr_instance("", study, series, 4, "20240601")  # Type 2: an empty Patient ID does not decide
    assert _put(store, unnamed, prior=False).outcome == StoreOutcome.STORED

    # A store that starts later (another receiving process, a restart) asks the index.
    store.indexer.flush(timeout=10)
    other = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01))
    try:
        third = mr_instance("P2", study, series, 5, "20240601")
        assert _put(other, third, prior=False).outcome == StoreOutcome.REJECTED
        same = mr_instance("P1", study, series, 6, "20240601")
        assert _put(other, same, prior=False).outcome == StoreOutcome.STORED
    finally:
        other.close()


def test_a_missing_issuer_does_not_split_a_study_but_another_issuer_does(store_node) -> None:
    """The images carry the issuer (from the worklist), the scanner's dose report or a screen
    capture does not: the same Patient ID without an issuer joins the study, either way
    round. The same Patient ID under another issuer is another patient: refused."""
    rt, store = store_node
    study, series = generate_uid(), generate_uid()
    first = mr_instance("P1", study, series, 1, "20240601")
    first.IssuerOfPatientID = "HOSP_A"
    assert _put(store, first, prior=False).outcome == StoreOutcome.STORED
    bare = mr_instance("P1", study, series, 2, "20240601")
    assert "IssuerOfPatientID" not in bare
    assert _put(store, bare, prior=False).outcome == StoreOutcome.STORED
    other = mr_instance("P1", study, series, 3, "20240601")
    other.IssuerOfPatientID = "HOSP_B"
    result = _put(store, other, prior=False)
    assert result.outcome == StoreOutcome.REJECTED
    assert result.rejection is not None and "held here under another patient" in result.rejection.reason

    store.indexer.flush(timeout=10)  # a later process asks the index: the same answers
    later = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01))
    try:
        assert _put(later, mr_instance("P1", study, series, 4, "20240601"), prior=False).outcome == (
            StoreOutcome.STORED
        )
        again = mr_instance("P1", study, series, 5, "20240601")
        again.IssuerOfPatientID = "HOSP_B"
        assert _put(later, again, prior=False).outcome == StoreOutcome.REJECTED
    finally:
        later.close()


def test_the_first_issuer_named_decides_for_instances_that_follow(store_node) -> None:
    _rt, store = store_node
    study, series = generate_uid(), generate_uid()
    assert _put(store, mr_instance("P1", study, series, 1, "20240601"), prior=False).outcome == (
        StoreOutcome.STORED
    )
    outcomes = []
    for number, issuer in ((2, "HOSP_A"), (3, "HOSP_B"), (4, "")):
        ds = mr_instance("P1", study, series, number, "20240601")
        if issuer:
            ds.IssuerOfPatientID = issuer
        outcomes.append(_put(store, ds, prior=False).outcome)
    assert outcomes == [StoreOutcome.STORED, StoreOutcome.REJECTED, StoreOutcome.STORED]
