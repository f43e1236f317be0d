"""The receiver stages data sets from the first one on, however late the association
thread runs its EVT_ESTABLISHED handlers (the DUL thread reads the first data set as soon
as the A-ASSOCIATE-AC is out)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE

from dicom_node.config import NodeConfig
from dicom_node.ingest import staging
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.receiver import Receiver
from dicom_node.ingest.store import InstanceStore
from dicom_node.runtime import Runtime
from tests.peers import free_port


def test_the_first_data_set_is_staged_even_when_the_association_thread_is_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    real_start = staging.Stager.start

    def counting_start(self: staging.Stager, gap: int) -> staging.StagedDataSet:
        started.append(gap)
        return real_start(self, gap)

    real_established = Receiver.on_established

    def late_established(self: Receiver, event: Any) -> None:
        time.sleep(0.5)  # the data set has arrived by now
        real_established(self, event)

    monkeypatch.setattr(staging.Stager, "start", counting_start)
    monkeypatch.setattr(Receiver, "on_established", late_established)
    port = free_port()
    config = NodeConfig.model_validate({"node": {"port": port, "ae_title": "NODE"}})
    rt = Runtime.open(None, tmp_path)
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01))
    receiver = Receiver(config, rt.paths, store, rt.audit)
    receiver.start()
    try:
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ae = AE(ae_title="CT1")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="NODE")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0000
        assert len(started) == 1, "the first data set was written while it arrived"
        deadline = time.monotonic() + 10  # the connection's end removes the unused spare
        while list(rt.paths.tmp.glob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(rt.paths.tmp.glob("*.part")) == []
    finally:
        receiver.stop()
        store.close()
        rt.close()


@pytest.mark.parametrize("limit", ["size", "disk"])
def test_a_data_set_past_its_limit_is_aborted_while_it_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """A data set is held in memory and in its staging file as it arrives; before
    ``max_dataset_mb`` one sender streaming fragments without end took the node's memory
    and disk with it (1 GB streamed: 1 GB more memory, and the free-disk floor passed by
    525 MB, because the floor was checked only once the data set had arrived)."""
    from pydicom.uid import ExplicitVRLittleEndian

    from dicom_node.net import dimse_guard

    port = free_port()
    # PDUs of 16 KB, as most senders use: the data set arrives in many
    receiver_config: dict[str, Any] = {"max_dataset_mb": 1 if limit == "size" else 0, "max_pdu_bytes": 16384}
    config = NodeConfig.model_validate(
        {"node": {"port": port, "ae_title": "NODE"}, "receiver": receiver_config}
    )
    rt = Runtime.open(None, tmp_path)
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01))
    receiver = Receiver(config, rt.paths, store, rt.audit)
    if limit == "disk":  # the floor passed once 64 MB of a data set have arrived
        monkeypatch.setattr(receiver.disk, "min_free", 1)
        monkeypatch.setattr(receiver.disk, "has_room", lambda: False)
        monkeypatch.setattr(
            dimse_guard.DataSetLimits, "__init__", _every_megabyte(dimse_guard.DataSetLimits.__init__)
        )
    receiver.start()
    try:
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.PixelData = bytes(
            3 * 1024 * 1024
        )  # 3 MB of pixels (the attributes no longer match: never checked)
        ae = AE(ae_title="CT1")
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assoc = ae.associate("127.0.0.1", port, ae_title="NODE")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assert not status, "no answer: the association was aborted"
        deadline = time.monotonic() + 5
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert assoc.is_aborted
        store.indexer.flush(timeout=5)
        with rt.db.read() as conn:
            from sqlalchemy import func, select

            from dicom_node.db import schema as t

            assert conn.execute(select(func.count()).select_from(t.instances)).scalar() == 0
        deadline = time.monotonic() + 10  # the connection's end removes its staging files
        while list(rt.paths.tmp.glob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(rt.paths.tmp.glob("*.part")) == []
        small = dcmread(get_testdata_file("CT_small.dcm"))
        monkeypatch.setattr(receiver.disk, "has_room", lambda: True)
        again = ae.associate("127.0.0.1", port, ae_title="NODE")
        assert again.is_established, "the next caller is served"
        assert again.send_c_store(small).Status == 0x0000 or limit == "disk"
        again.release()
    finally:
        receiver.stop()
        store.close()
        rt.close()


def _every_megabyte(init: Any) -> Any:
    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        object.__setattr__(self, "room_every", 1024 * 1024)

    return patched
