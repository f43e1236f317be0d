"""InstanceStore and Indexer: durable layout, byte-exact storage, index rows, versions, quarantine."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select

from audit import AuditEvent
from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.db import schema as t
from dicom_node.ingest.indexer import Indexer, PendingInstance
from dicom_node.ingest.instance import check_instance
from dicom_node.ingest.part10 import split_part10
from dicom_node.ingest.store import InstanceStore, StoreOutcome, relative_path
from dicom_node.lab.simulate import SimulatedStudy, write_ct_series
from dicom_node.runtime import Runtime
from models.sim.phantom import PhantomSpec

CALLING_AE = "CT_SCANNER"
PEER = "192.0.2.10"


@dataclass(frozen=True)
class Received:
    """One simulated instance as it would come off the wire."""

    data: bytes
    ts: str
    sop_uid: str
    study_uid: str
    series_uid: str


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulatedStudy, list[Received]]:
    sim = write_ct_series(tmp_path_factory.mktemp("ct3"), PhantomSpec(rows=64, columns=64, slices=3, seed=3))
    received = []
    for path in sim.files:
        meta, data = split_part10(path.read_bytes())
        received.append(
            Received(
                data=data,
                ts=str(meta.TransferSyntaxUID),
                sop_uid=str(meta.MediaStorageSOPInstanceUID),
                study_uid=sim.study_uid,
                series_uid=sim.series_uid,
            )
        )
    return sim, received


@dataclass
class Node:
    rt: Runtime
    indexer: Indexer
    store: InstanceStore

    def put(self, item: Received, data: bytes | None = None, calling_ae: str = CALLING_AE):
        return self.store.put(
            item.data if data is None else data,
            item.ts,
            claimed_sop_uid=item.sop_uid,
            calling_ae=calling_ae,
            peer_host=PEER,
        )

    def instance_rows(self) -> list[dict]:
        with self.rt.db.read() as conn:
            return [
                dict(r)
                for r in conn.execute(
                    select(t.instances).order_by(t.instances.c.sop_uid, t.instances.c.version)
                ).mappings()
            ]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    rt = Runtime.open(None, tmp_path)
    indexer = Indexer(rt.db, rt.audit, gather_seconds=0.02)
    store = InstanceStore(rt.paths, rt.db, indexer)
    try:
        yield Node(rt, indexer, store)
    finally:
        store.close()
        rt.close()


def _flip_last_byte(data: bytes) -> bytes:
    """Same SOP Instance UID, different bytes (the last pixel byte changes)."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _stored_path(node: Node, item: Received, version: int = 1) -> Path:
    name = item.sop_uid + (".dcm" if version == 1 else f".v{version}.dcm")
    return node.rt.paths.var / "data" / "studies" / item.study_uid / item.series_uid / name


# -- layout and bytes ----------------------------------------------------------------------


def test_stored_file_layout_and_exact_bytes(node: Node, series) -> None:
    _, items = series
    for item in items:
        result = node.put(item)
        assert result.outcome == StoreOutcome.STORED
        assert result.version == 1
        assert result.facts is not None and result.facts.sop_instance_uid == item.sop_uid

    for item in items:
        path = _stored_path(node, item)
        assert path.is_file(), path
        meta, data = split_part10(path.read_bytes())
        assert data == item.data  # the data set bytes are exactly those received
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
        assert meta.SourceApplicationEntityTitle.strip() == CALLING_AE
        assert meta.MediaStorageSOPInstanceUID == item.sop_uid
        assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert meta.TransferSyntaxUID == item.ts

    # exactly these files and nothing else in the series folder
    series_dir = node.rt.paths.studies / items[0].study_uid / items[0].series_uid
    assert sorted(p.name for p in series_dir.iterdir()) == sorted(f"{i.sop_uid}.dcm" for i in items)
    # no staging file stays behind
    assert list(node.rt.paths.tmp.iterdir()) == []


def test_index_rows(node: Node, series) -> None:
    _, items = series
    before = time.time()
    for item in items:
        node.put(item)
    rows = node.instance_rows()
    assert len(rows) == len(items)
    by_sop = {r["sop_uid"]: r for r in rows}
    assert set(by_sop) == {i.sop_uid for i in items}
    for n, item in enumerate(items, start=1):
        row = by_sop[item.sop_uid]
        assert row["sha256"] == hashlib.sha256(item.data).hexdigest()
        assert row["version"] == 1
        assert row["current"] is True
        assert row["calling_ae"] == CALLING_AE
        assert row["peer_host"] == PEER
        assert row["study_version"] == 1
        assert row["transfer_syntax_uid"] == item.ts
        assert row["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2"
        assert row["instance_number"] == n
        assert row["path"] == f"studies/{item.study_uid}/{item.series_uid}/{item.sop_uid}.dcm"
        assert row["size"] == _stored_path(node, item).stat().st_size
        assert row["received_at"] >= before
        tags = row["tags"]
        assert tags["StationName"] == "SIMCT"
        assert tags["Manufacturer"] == "dicom-node simulator"
        assert tags["KVP"] == pytest.approx(120.0)
        assert tags["CTDIvol"] == pytest.approx(8.0)
        assert tags["SliceThickness"] == pytest.approx(2.5)
        assert tags["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]

    with node.rt.db.read() as conn:
        study = conn.execute(select(t.studies)).mappings().one()
        series_rows = conn.execute(select(t.series)).mappings().all()
        patient = conn.execute(select(t.patients)).mappings().one()
    assert study["study_uid"] == items[0].study_uid
    assert study["source_ae"] == CALLING_AE
    assert study["open_version"] == 1
    assert [s["series_uid"] for s in series_rows] == [items[0].series_uid]
    assert series_rows[0]["modality"] == "CT"
    assert patient["patient_id"] == "SIM-0001"
    assert patient["patient_name"] == "SIMULATED^PHANTOM"


# -- duplicates and versions ---------------------------------------------------------------


def test_identical_resend_is_a_duplicate(node: Node, series) -> None:
    _, items = series
    item = items[0]
    assert node.put(item).outcome == StoreOutcome.STORED
    again = node.put(item)
    assert again.outcome == StoreOutcome.DUPLICATE
    assert again.version == 1

    series_dir = _stored_path(node, item).parent
    assert [p.name for p in series_dir.iterdir()] == [f"{item.sop_uid}.dcm"]
    assert len(node.instance_rows()) == 1
    assert len(node.rt.audit.events(AuditEvent.INSTANCE_STORED)) == 1
    assert node.rt.audit.events(AuditEvent.INSTANCE_NEW_VERSION) == []


def test_duplicate_detected_while_the_first_copy_is_still_pending(tmp_path: Path, series) -> None:
    """Duplicate detection must see instances whose index row is not written yet."""
    _, items = series
    item = items[0]
    rt = Runtime.open(None, tmp_path)
    indexer = Indexer(rt.db, rt.audit, gather_seconds=1.0)
    store = InstanceStore(rt.paths, rt.db, indexer)
    try:
        first = store.accept(item.data, item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE)
        second = store.accept(item.data, item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE)
        assert indexer.flush(timeout=10)
        assert first.outcome == StoreOutcome.STORED
        assert second.outcome == StoreOutcome.DUPLICATE
        with rt.db.read() as conn:
            assert conn.execute(select(func.count()).select_from(t.instances)).scalar_one() == 1
    finally:
        store.close()
        rt.close()


def test_changed_bytes_make_a_new_version(node: Node, series) -> None:
    _, items = series
    item = items[0]
    changed = _flip_last_byte(item.data)
    assert node.put(item).outcome == StoreOutcome.STORED
    result = node.put(item, changed)
    assert result.outcome == StoreOutcome.NEW_VERSION
    assert result.version == 2

    v1, v2 = _stored_path(node, item, 1), _stored_path(node, item, 2)
    assert v2.name == f"{item.sop_uid}.v2.dcm"
    assert split_part10(v1.read_bytes())[1] == item.data  # v1 untouched
    assert split_part10(v2.read_bytes())[1] == changed

    rows = node.instance_rows()
    assert [(r["version"], r["current"]) for r in rows] == [(1, False), (2, True)]
    assert rows[1]["sha256"] == hashlib.sha256(changed).hexdigest()
    assert rows[1]["path"].endswith(f"/{item.sop_uid}.v2.dcm")

    # re-sending the new version's bytes again is a duplicate of v2
    again = node.put(item, changed)
    assert again.outcome == StoreOutcome.DUPLICATE
    assert again.version == 2
    assert len(node.instance_rows()) == 2

    new_version = node.rt.audit.events(AuditEvent.INSTANCE_NEW_VERSION)
    assert len(new_version) == 1
    assert new_version[0].facts["version"] == 2
    assert new_version[0].facts["sop_uid"] == item.sop_uid
    assert new_version[0].facts["sha256"] == hashlib.sha256(changed).hexdigest()
    assert new_version[0].study_uid == item.study_uid


def test_new_version_in_same_index_batch_leaves_only_latest_current(tmp_path: Path, series) -> None:
    _, items = series
    item = items[0]
    rt = Runtime.open(None, tmp_path)
    indexer = Indexer(rt.db, rt.audit, gather_seconds=1.0)  # both accepts land in one batch
    store = InstanceStore(rt.paths, rt.db, indexer)
    try:
        first = store.accept(item.data, item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE)
        second = store.accept(
            _flip_last_byte(item.data), item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE
        )
        assert indexer.flush(timeout=10)
        assert (first.outcome, second.outcome) == (StoreOutcome.STORED, StoreOutcome.NEW_VERSION)
        with rt.db.read() as conn:
            rows = conn.execute(
                select(t.instances.c.version, t.instances.c.current).order_by(t.instances.c.version)
            ).all()
        assert [tuple(r) for r in rows] == [(1, False), (2, True)]
    finally:
        store.close()
        rt.close()


# -- quarantine ----------------------------------------------------------------------------


def test_garbage_is_rejected_and_quarantined(node: Node) -> None:
    garbage = b"this is not a DICOM data set \x00\x01\x02\x03" * 4
    result = node.store.put(
        garbage,
        "1.2.840.10008.1.2.1",
        claimed_sop_uid="1.2.3.4.5",
        calling_ae=CALLING_AE,
        peer_host=PEER,
    )
    assert result.outcome == StoreOutcome.REJECTED
    assert result.rejection is not None and result.rejection.reason.startswith("cannot parse data set")
    assert result.facts is None

    qpath = result.quarantine_path
    assert qpath is not None and qpath.parent == node.rt.paths.var / "quarantine"
    assert qpath.read_bytes().endswith(garbage)  # the bytes are kept as received
    meta, data = split_part10(qpath.read_bytes())
    assert data == garbage
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    reason = qpath.with_name(qpath.name[: -len(".dcm")] + ".reason.txt")
    assert reason.is_file()
    text = reason.read_text()
    assert "reason: cannot parse data set" in text
    assert f"calling_ae: {CALLING_AE}" in text
    assert f"peer_host: {PEER}" in text
    assert "claimed_sop_instance_uid: 1.2.3.4.5" in text

    with node.rt.db.read() as conn:
        q = conn.execute(select(t.quarantine)).mappings().all()
        n_instances = conn.execute(select(func.count()).select_from(t.instances)).scalar_one()
    assert len(q) == 1
    assert q[0]["path"] == str(qpath)
    assert q[0]["claimed_sop_uid"] == "1.2.3.4.5"
    assert q[0]["calling_ae"] == CALLING_AE
    assert q[0]["peer_host"] == PEER
    assert q[0]["size"] == qpath.stat().st_size
    assert q[0]["reason"] == result.rejection.reason
    assert n_instances == 0
    assert not (node.rt.paths.studies).exists() or list(node.rt.paths.studies.iterdir()) == []
    assert node.rt.audit.events(AuditEvent.INSTANCE_STORED) == []
    assert list(node.rt.paths.tmp.iterdir()) == []


def test_mismatched_claimed_uid_is_rejected(node: Node, series) -> None:
    _, items = series
    item = items[0]
    result = node.store.put(item.data, item.ts, claimed_sop_uid="1.2.3.999", calling_ae=CALLING_AE)
    assert result.outcome == StoreOutcome.REJECTED
    assert result.rejection is not None and "differs from the C-STORE request" in result.rejection.reason
    assert result.quarantine_path is not None
    assert split_part10(result.quarantine_path.read_bytes())[1] == item.data
    assert node.instance_rows() == []
    assert not _stored_path(node, item).exists()


# -- audit ---------------------------------------------------------------------------------


def test_audit_record_per_stored_instance(node: Node, series) -> None:
    _, items = series
    for item in items:
        node.put(item)
    node.put(items[0])  # a duplicate is not a new stored instance
    events = node.rt.audit.events(AuditEvent.INSTANCE_STORED)
    assert len(events) == len(items)
    by_sop = {e.facts["sop_uid"]: e for e in events}
    assert set(by_sop) == {i.sop_uid for i in items}
    for item in items:
        e = by_sop[item.sop_uid]
        assert e.facts["sha256"] == hashlib.sha256(item.data).hexdigest()
        assert e.facts["version"] == 1
        assert e.facts["series_uid"] == item.series_uid
        assert "recovered" not in e.facts
        assert e.study_uid == item.study_uid
        assert e.patient_id == "SIM-0001"
        assert e.calling_ae == CALLING_AE
        assert e.peer_host == PEER
    assert node.rt.audit.events(study_uid=items[0].study_uid) == events


# -- recovery ------------------------------------------------------------------------------


def test_reconcile_reindexes_files_whose_rows_were_lost(node: Node, series) -> None:
    _, items = series
    for item in items:
        node.put(item)
    original = {r["sop_uid"]: r for r in node.instance_rows()}
    with node.rt.db.write() as conn:
        conn.execute(delete(t.instances))
    assert node.instance_rows() == []

    assert node.store.reconcile() == len(items)

    rows = {r["sop_uid"]: r for r in node.instance_rows()}
    assert set(rows) == set(original)
    for sop, row in rows.items():
        for key in ("sha256", "path", "size", "version", "current", "calling_ae", "sop_class_uid", "tags"):
            assert row[key] == original[sop][key], key
    recovered = [e for e in node.rt.audit.events(AuditEvent.INSTANCE_STORED) if "recovered" in e.facts]
    assert {e.facts["sop_uid"] for e in recovered} == set(original)

    # nothing left to do the second time
    assert node.store.reconcile() == 0
    assert len(node.instance_rows()) == len(items)


def test_reconcile_keeps_a_retrieved_prior_a_prior(node: Node, series) -> None:
    """A prior whose index row was lost (a crash between the ack and the index write) is
    re-indexed as a prior, from its file meta: it must never start a job of its own."""
    _, items = series
    item = items[0]
    node.store.accept(
        item.data,
        item.ts,
        claimed_sop_uid=item.sop_uid,
        calling_ae="PACS",
        peer_host=PEER,
        retrieved_from="pacs",
    )
    node.indexer.flush()
    assert [r["role"] for r in node.instance_rows()] == ["prior"]
    with node.rt.db.write() as conn:
        conn.execute(delete(t.instances))

    assert node.store.reconcile() == 1
    assert [r["role"] for r in node.instance_rows()] == ["prior"]
    (recovered,) = [e for e in node.rt.audit.events(AuditEvent.INSTANCE_STORED) if "recovered" in e.facts]
    assert "retrieved from archive pacs" in recovered.facts["recognised_by"]


def test_reconcile_since_skips_older_series_dirs(node: Node, series) -> None:
    _, items = series
    node.put(items[0])
    with node.rt.db.write() as conn:
        conn.execute(delete(t.instances))
    series_dir = _stored_path(node, items[0]).parent
    os.utime(series_dir, (1_000_000.0, 1_000_000.0))
    assert node.store.reconcile(since=2_000_000.0) == 0
    assert node.instance_rows() == []
    assert node.store.reconcile(since=500_000.0) == 1
    assert len(node.instance_rows()) == 1


def test_reconcile_of_two_versions_leaves_only_latest_current(node: Node, series) -> None:
    _, items = series
    item = items[0]
    node.put(item)
    node.put(item, _flip_last_byte(item.data))
    with node.rt.db.write() as conn:
        conn.execute(delete(t.instances))
    assert node.store.reconcile() == 2
    assert [(r["version"], r["current"]) for r in node.instance_rows()] == [(1, False), (2, True)]


def test_reconcile_moves_leftover_staging_file_to_quarantine(node: Node) -> None:
    leftover = node.rt.paths.tmp / "99999999-7.part"
    payload = b"half of an interrupted write"
    leftover.write_bytes(payload)

    assert node.store.reconcile() == 0

    assert not leftover.exists()
    assert list(node.rt.paths.tmp.iterdir()) == []
    dcm = list(node.rt.paths.quarantine.glob("*.dcm"))
    reasons = list(node.rt.paths.quarantine.glob("*.reason.txt"))
    assert len(dcm) == 1 and len(reasons) == 1
    assert dcm[0].read_bytes().endswith(payload)
    assert "staging file left by an interrupted store" in reasons[0].read_text()
    with node.rt.db.read() as conn:
        q = conn.execute(select(t.quarantine)).mappings().one()
    assert q["path"] == str(dcm[0])
    assert "interrupted store" in q["reason"]
    assert node.instance_rows() == []


def test_reconcile_survives_leftover_with_reused_pid(node: Node) -> None:
    # A fresh store's first staging name is "<pid>-0.part"; containers restart with the same pid.
    leftover = node.rt.paths.tmp / f"{os.getpid()}-0.part"
    leftover.write_bytes(b"interrupted")
    node.store.reconcile()
    assert not leftover.exists()
    assert len(list(node.rt.paths.quarantine.glob("*.dcm"))) == 1


# -- the indexer ---------------------------------------------------------------------------


def test_indexer_pending_visible_until_flushed(tmp_path: Path, series) -> None:
    _, items = series
    item = items[0]
    facts, rejection = check_instance(item.data, item.ts)
    assert rejection is None and facts is not None
    rt = Runtime.open(None, tmp_path)
    indexer = Indexer(rt.db, rt.audit, gather_seconds=1.0)
    try:
        pending = PendingInstance(
            facts=facts,
            version=1,
            transfer_syntax=item.ts,
            relative_path=relative_path(facts, 1),
            size=len(item.data),
            data=item.data,
            calling_ae=CALLING_AE,
            peer_host=PEER,
            received_at=time.time(),
        )
        assert indexer.pending(item.sop_uid) is None
        indexer.submit(pending)
        assert indexer.pending(item.sop_uid) is pending
        assert pending.sha256() == hashlib.sha256(item.data).hexdigest()
        with rt.db.read() as conn:
            assert conn.execute(select(func.count()).select_from(t.instances)).scalar_one() == 0

        assert indexer.flush(timeout=10)

        assert indexer.pending(item.sop_uid) is None
        with rt.db.read() as conn:
            row = conn.execute(select(t.instances)).mappings().one()
        assert row["sop_uid"] == item.sop_uid
        assert row["sha256"] == hashlib.sha256(item.data).hexdigest()
        assert row["path"] == f"studies/{item.study_uid}/{item.series_uid}/{item.sop_uid}.dcm"
        assert pending.data == b""  # bytes released once indexed
    finally:
        indexer.stop()
        rt.close()


def test_on_indexed_callback_receives_batch(tmp_path: Path, series) -> None:
    _, items = series
    seen: list[str] = []
    rt = Runtime.open(None, tmp_path)
    indexer = Indexer(rt.db, rt.audit, on_indexed=lambda b: seen.extend(p.facts.sop_instance_uid for p in b))
    store = InstanceStore(rt.paths, rt.db, indexer)
    try:
        for item in items:
            store.accept(item.data, item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE)
        assert indexer.flush(timeout=10)
        assert sorted(seen) == sorted(i.sop_uid for i in items)
    finally:
        store.close()
        rt.close()


# -- data sets written while they arrive (dicom_node.ingest.staging) ---------------------------


def _staged(stager, item: Received, gap: int, pieces: int = 4):
    staged = stager.start(gap)
    step = max(1, len(item.data) // pieces)
    for start in range(0, len(item.data), step):
        staged.write(memoryview(item.data)[start : start + step])  # as pynetdicom hands them over
    assert staged.getvalue() == item.data  # still the in-memory buffer pynetdicom reads
    return staged


def _gap(item: Received) -> int:
    from dicom_node.ingest.part10 import encode_file_meta

    return len(encode_file_meta("1.2.840.10008.5.1.4.1.1.2", item.sop_uid, item.ts, CALLING_AE))


def test_a_staged_data_set_is_stored_byte_for_byte(node: Node, series) -> None:
    _, items = series
    stager = node.store.stager()  # one per association
    for item in items:
        staged = _staged(stager, item, _gap(item))
        assert staged.path.exists()  # on disk before the handler runs
        result = node.store.accept(
            item.data, item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE, staged=staged
        )
        staged.discard()  # what the receiver does afterwards: a no-op once used
        assert result.outcome == StoreOutcome.STORED
    node.store.indexer.flush()
    for item in items:
        meta, data = split_part10(_stored_path(node, item).read_bytes())
        assert data == item.data and meta.MediaStorageSOPInstanceUID == item.sop_uid
        assert meta.SourceApplicationEntityTitle.strip() == CALLING_AE
    stager.discard_all()  # the association ends
    assert list(node.rt.paths.tmp.iterdir()) == []
    assert len(node.instance_rows()) == len(items)


def test_a_staged_data_set_whose_header_does_not_fit_is_written_the_ordinary_way(node: Node, series) -> None:
    _, items = series
    item = items[0]
    stager = node.store.stager()
    staged = _staged(stager, item, _gap(item) + 2)  # e.g. the data set's SOP Class differs from the request's
    result = node.store.accept(
        item.data, item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE, staged=staged
    )
    staged.discard()
    assert result.outcome == StoreOutcome.STORED
    assert split_part10(_stored_path(node, item).read_bytes())[1] == item.data
    stager.discard_all()
    assert list(node.rt.paths.tmp.iterdir()) == []


def test_a_staged_duplicate_or_refusal_leaves_no_staging_file(node: Node, series) -> None:
    _, items = series
    item = items[1]
    node.put(item)
    stager = node.store.stager()
    staged = _staged(stager, item, _gap(item))
    result = node.store.accept(
        item.data, item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE, staged=staged
    )
    assert result.outcome == StoreOutcome.DUPLICATE
    assert staged.path.exists()
    staged.discard()
    garbage = _staged(stager, item, _gap(item))
    refused = node.store.accept(b"\x08\x00" * 7, item.ts, claimed_sop_uid=item.sop_uid, staged=garbage)
    assert refused.outcome == StoreOutcome.REJECTED
    garbage.discard()
    garbage.discard()  # idempotent
    assert not staged.path.exists() and not garbage.path.exists()
    stager.discard_all()
    assert list(node.rt.paths.tmp.iterdir()) == []


def test_a_staging_file_that_fails_to_write_falls_back(
    node: Node, series, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.ingest import staging

    _, items = series
    item = items[2]
    stager = node.store.stager()
    staged = stager.start(_gap(item))
    staged.write(item.data[:1000])

    def disk_full(fd: int, data: object, offset: int) -> int:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(staging.os, "pwrite", disk_full)
        staged.write(item.data[1000:])
    assert staged.getvalue() == item.data  # the in-memory copy is whole
    result = node.store.accept(
        item.data, item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE, staged=staged
    )
    assert result.outcome == StoreOutcome.STORED
    assert split_part10(_stored_path(node, item).read_bytes())[1] == item.data
    stager.discard_all()
    assert list(node.rt.paths.tmp.iterdir()) == []


def test_discard_all_drops_only_unfinished_data_sets(node: Node, series) -> None:
    _, items = series
    stager = node.store.stager()
    open_one = stager.start(100)
    open_one.write(b"x" * 10)
    stager.discard_all()
    assert not open_one.path.exists()
    assert list(node.rt.paths.tmp.iterdir()) == []


def test_the_end_of_an_association_waits_for_a_spare_being_created(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper thread may be creating the next staging file when the association ends
    (found by CI: one such file was still there after ``discard_all`` returned). The end waits
    for it, so nothing is left behind."""
    import threading

    from dicom_node.ingest import staging

    creating, release = threading.Event(), threading.Event()
    real_create = staging._create

    def slow_create(path: Path) -> int:
        creating.set()
        release.wait(5)
        return real_create(path)

    monkeypatch.setattr(staging, "_create", slow_create)
    stager = node.store.stager()  # its first spare is being created, slowly
    assert creating.wait(5), "the helper thread never started a spare"
    ender = threading.Thread(target=stager.discard_all)
    ender.start()
    time.sleep(0.1)
    assert ender.is_alive(), "the end did not wait for the spare being created"
    release.set()
    ender.join(5)
    assert not ender.is_alive()
    assert list(node.rt.paths.tmp.iterdir()) == []


def _wait_for_spare(stager) -> tuple:
    import time

    deadline = time.monotonic() + 10
    while stager._spare is None:
        assert time.monotonic() < deadline, "no spare staging file was made"
        time.sleep(0.005)
    return stager._spare


def test_the_next_staging_file_is_created_ahead_and_used(node: Node, series) -> None:
    """Creating a file is off the sender's path: made ahead on a helper thread, empty until
    a data set takes it; the association's end removes the one never used."""
    _, items = series
    stager = node.store.stager()
    for item in items[:3]:
        spare_path, _ = _wait_for_spare(stager)
        assert spare_path.exists() and spare_path.stat().st_size == 0
        staged = _staged(stager, item, _gap(item))
        assert staged.path == spare_path
        result = node.store.accept(
            item.data, item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE, staged=staged
        )
        assert result.outcome == StoreOutcome.STORED
        assert not spare_path.exists()  # renamed into the study tree
    spare_path, _ = _wait_for_spare(stager)
    stager.discard_all()
    assert not spare_path.exists()
    stager._make_spare()  # a helper run that comes after the end makes nothing
    assert list(node.rt.paths.tmp.iterdir()) == []


def test_staging_files_are_created_as_needed_when_no_spare_can_be_made(
    node: Node, series, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.ingest import staging

    _, items = series
    item = items[0]
    monkeypatch.setattr(staging.Stager, "_refill", lambda self: None)
    stager = node.store.stager()
    staged = _staged(stager, item, _gap(item))
    assert (
        node.store.accept(
            item.data, item.ts, claimed_sop_uid=item.sop_uid, calling_ae=CALLING_AE, staged=staged
        ).outcome
        == StoreOutcome.STORED
    )
    stager.discard_all()
    assert list(node.rt.paths.tmp.iterdir()) == []


def test_reconcile_removes_empty_staging_files_and_quarantines_the_others(node: Node) -> None:
    tmp = node.rt.paths.tmp
    (tmp / "a.part").write_bytes(b"")  # made ahead of a data set, then a crash
    (tmp / "b.part").write_bytes(b"\x08\x00" * 8)  # half a data set
    node.store.reconcile()
    assert list(tmp.iterdir()) == []
    quarantined = sorted(p.suffix for p in node.rt.paths.quarantine.iterdir())
    assert quarantined.count(".dcm") == 1, quarantined  # the half data set; nothing for the empty one
