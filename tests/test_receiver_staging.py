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
