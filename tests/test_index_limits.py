"""Values the index cannot hold never stop the indexer.

Found by a hostile-sender run: one instance with Instance Number 10**20 was acknowledged,
its index row failed with OverflowError, and the indexer retried that batch for ever, so
every later instance was acknowledged and never indexed, the queue filled, and a restart
hit the same row. Now: integers outside the IS range are left out of the index,
identifying values longer than their column refuse the instance, descriptive ones are
shortened in the index only, and a row that fails for any reason other than the database
being away is set aside (its file kept) instead of holding up the rest.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from dicom_node.db import schema as t
from dicom_node.ingest import indexer as indexer_module
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.instance import StoreStatus
from dicom_node.ingest.part10 import split_part10
from dicom_node.ingest.store import InstanceStore, StoreOutcome
from dicom_node.lab.simulate import write_ct_series
from dicom_node.runtime import Runtime
from models.sim.phantom import PhantomSpec


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    sim = write_ct_series(tmp_path_factory.mktemp("ct"), PhantomSpec(rows=32, columns=32, slices=4, seed=11))
    return [pydicom.dcmread(f) for f in sim.files]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Runtime, InstanceStore]]:
    rt = Runtime.open(None, tmp_path)
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.02))
    try:
        yield rt, store
    finally:
        store.close()
        rt.close()


def _accept(store: InstanceStore, ds: pydicom.Dataset):
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    _, data = split_part10(buffer.getvalue())
    return store.accept(
        data, str(ds.file_meta.TransferSyntaxUID), claimed_sop_uid=str(ds.SOPInstanceUID), calling_ae="CT1"
    )


def _rows(rt: Runtime) -> dict[str, dict]:
    with rt.db.read() as conn:
        query = select(
            t.instances.c.sop_uid,
            t.instances.c.instance_number,
            t.series.c.series_number,
            t.series.c.description,
        ).join(t.series)
        return {r.sop_uid: dict(r._mapping) for r in conn.execute(query)}


def test_an_instance_number_beyond_the_is_range_is_left_out_and_the_rest_indexed(node, slices) -> None:
    rt, store = node
    first = copy.deepcopy(slices[0])
    first.InstanceNumber = 10**20  # an IS value no index column holds, nor DICOM allows
    first.SeriesNumber = 10**20
    assert _accept(store, first).outcome == StoreOutcome.STORED
    for ds in slices[1:]:
        assert _accept(store, ds).outcome == StoreOutcome.STORED
    assert store.indexer.flush(timeout=10), "the indexer is stuck"
    rows = _rows(rt)
    assert set(rows) == {str(ds.SOPInstanceUID) for ds in slices}
    assert rows[str(first.SOPInstanceUID)]["instance_number"] is None
    assert rows[str(slices[1].SOPInstanceUID)]["instance_number"] == int(slices[1].InstanceNumber)


def test_an_identifying_value_too_long_for_the_index_is_refused(node, slices) -> None:
    rt, store = node
    ds = copy.deepcopy(slices[0])
    ds.PatientID = "P" * 70  # LO holds 64: cut short it could name another patient
    result = _accept(store, ds)
    assert result.outcome != StoreOutcome.STORED
    assert result.rejection is not None and result.rejection.status == StoreStatus.CANNOT_UNDERSTAND
    assert "patient ID longer than 64 characters (70)" in result.rejection.reason
    assert store.indexer.flush(timeout=10) and _rows(rt) == {}


def test_a_descriptive_value_too_long_is_shortened_in_the_index_only(node, slices) -> None:
    rt, store = node
    ds = copy.deepcopy(slices[0])
    ds.SeriesDescription = "D" * 100
    ds.StudyDate = "2026-12-01"  # an old ACR-NEMA style date: no DA, 10 characters
    result = _accept(store, ds)
    assert result.outcome == StoreOutcome.STORED
    assert store.indexer.flush(timeout=10)
    assert _rows(rt)[str(ds.SOPInstanceUID)]["description"] == "D" * 64
    with rt.db.read() as conn:
        assert conn.execute(select(t.studies.c.study_date)).scalar() is None
    (stored,) = (rt.paths.data / "studies").rglob(f"{ds.SOPInstanceUID}.dcm")
    assert pydicom.dcmread(stored).SeriesDescription == "D" * 100  # the file keeps it whole


def test_a_row_that_cannot_be_written_is_set_aside_and_the_others_indexed(
    node, slices, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rt, store = node
    bad = str(slices[1].SOPInstanceUID)
    real = indexer_module.index_batch

    def index_batch(conn, batch, *args, **kwargs):
        if any(p.facts.sop_instance_uid == bad for p in batch):
            raise ValueError("a value this database cannot hold")
        return real(conn, batch, *args, **kwargs)

    monkeypatch.setattr(indexer_module, "index_batch", index_batch)
    store.indexer.gather_seconds = 1.0  # all four in one batch
    with caplog.at_level(logging.WARNING, logger="dicom_node.ingest.indexer"):
        for ds in slices:
            assert _accept(store, ds).outcome == StoreOutcome.STORED
        assert store.indexer.flush(timeout=10), "the indexer is stuck"
    assert set(_rows(rt)) == {str(ds.SOPInstanceUID) for ds in slices} - {bad}
    assert any(f"instance {bad}" in r.getMessage() and "set aside" in r.getMessage() for r in caplog.records)
    files = {p.name for p in (rt.paths.data / "studies").rglob("*.dcm")}
    assert f"{bad}.dcm" in files  # acknowledged bytes are never touched


def test_the_database_being_away_is_still_retried(node, slices, monkeypatch: pytest.MonkeyPatch) -> None:
    rt, store = node
    real = indexer_module.index_batch
    failures = [2]

    def index_batch(conn, batch, *args, **kwargs):
        if failures[0]:
            failures[0] -= 1
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return real(conn, batch, *args, **kwargs)

    monkeypatch.setattr(indexer_module, "index_batch", index_batch)
    for ds in slices[:2]:
        assert _accept(store, ds).outcome == StoreOutcome.STORED
    assert store.indexer.flush(timeout=20)
    assert set(_rows(rt)) == {str(ds.SOPInstanceUID) for ds in slices[:2]}
    assert failures == [0]
