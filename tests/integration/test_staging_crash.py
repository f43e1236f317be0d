"""The data set written while it arrives (dicom_node.ingest.staging): a sender cut off or a
node killed half-way through a data set loses no acknowledged instance and leaves no
half-written one in the study tree or the index."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.ingest.part10 import split_part10
from tests.conftest import db_rows, node_config
from tests.peers import NodeProcess

pytestmark = pytest.mark.integration

STAGING_LEFT = "staging file left by an interrupted store (never acknowledged)"


def _associate(node: NodeProcess):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    return assoc


def _send_most_of(assoc, path: Path) -> int:  # type: ignore[no-untyped-def]
    """Send the C-STORE request of ``path`` with all but its last two data set fragments
    (64 KB each); the bytes of the data set sent."""
    meta, data = split_part10(path.read_bytes())
    request = C_STORE()
    request.MessageID = 4242
    request.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    request.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    request.Priority = 2
    request.DataSet = io.BytesIO(data)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    (context,) = assoc.accepted_contexts
    pdatas = list(message.encode_msg(context.context_id, 64 * 1024))
    assert len(pdatas) > 4
    for pdata in pdatas[:-2]:
        assoc.dul.send_pdu(pdata)
    return len(data) - sum(len(p.presentation_data_value_list[0][1]) - 1 for p in pdatas[-2:])


def _staging_files(node: NodeProcess) -> list[Path]:
    return sorted((node.home / "var" / "tmp").glob("*.part"))


def _wait_for_staged(node: NodeProcess, size: int) -> Path:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for part in _staging_files(node):
            if part.stat().st_size >= size:
                return part
        time.sleep(0.02)
    raise AssertionError(f"no staging file of {size} bytes: {_staging_files(node)}")


def _stored(node: NodeProcess) -> dict[str, bytes]:
    """SOP Instance UID → data set bytes of every indexed instance."""
    found = {}
    for sop, path in db_rows(node, "select sop_uid, path from instances"):
        found[sop] = split_part10((node.home / "var" / "data" / path).read_bytes())[1]
    return found


def test_kill9_half_way_through_a_data_set(tmp_path: Path, ct50: Path) -> None:
    files = sorted(ct50.iterdir())
    node = NodeProcess(tmp_path / "node", node_config(stable_seconds=3600)).start()
    assoc = _associate(node)
    statuses = [int(assoc.send_c_store(f).Status) for f in files[:5]]
    assert statuses == [0] * 5
    sent = _send_most_of(assoc, files[5])
    part = _wait_for_staged(node, sent)  # the data set is on its way to disk before it is complete
    node.kill9()
    assoc.abort()
    assert part.exists(), "the killed node could not remove its staging file"

    node.start()  # same home
    acknowledged = {split_part10(f.read_bytes())[0].MediaStorageSOPInstanceUID: f for f in files[:5]}
    stored = _stored(node)
    assert set(stored) == set(acknowledged), "exactly the acknowledged instances are indexed"
    for sop, f in acknowledged.items():
        assert stored[sop] == split_part10(f.read_bytes())[1], "stored byte for byte"
    # The half data set is in quarantine with its reason, not in the study tree.
    reasons = [r[0] for r in db_rows(node, "select reason from quarantine")]
    assert reasons == [STAGING_LEFT]
    assert _staging_files(node) == []
    studies = node.home / "var" / "data" / "studies"
    assert len(list(studies.rglob("*.dcm"))) == 5
    # The modality sends the cut instance again: stored whole.
    assoc = _associate(node)
    assert int(assoc.send_c_store(files[5]).Status) == 0
    assoc.release()
    node.wait_for(lambda: len(_stored(node)) == 6, timeout=30, what="the re-sent instance indexed")
    sixth = split_part10(files[5].read_bytes())
    assert _stored(node)[sixth[0].MediaStorageSOPInstanceUID] == sixth[1]
    node.stop()


def test_an_association_aborted_half_way_through_a_data_set_leaves_nothing(
    tmp_path: Path, ct50: Path
) -> None:
    files = sorted(ct50.iterdir())
    node = NodeProcess(tmp_path / "node", node_config(stable_seconds=3600)).start()
    assoc = _associate(node)
    sent = _send_most_of(assoc, files[0])
    _wait_for_staged(node, sent)
    assoc.abort()
    deadline = time.monotonic() + 10
    while _staging_files(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _staging_files(node) == [], "the aborted data set's staging file is removed"
    assert db_rows(node, "select count(*) from instances")[0][0] == 0
    assert db_rows(node, "select count(*) from quarantine")[0][0] == 0
    # and the node goes on receiving
    assoc = _associate(node)
    assert [int(assoc.send_c_store(f).Status) for f in files[:3]] == [0, 0, 0]
    assoc.release()
    node.wait_for(lambda: len(_stored(node)) == 3, timeout=30, what="3 instances indexed")
    node.stop()
