"""Bad input gets a failure status or a rejection and an audit record; nothing lands in the
index; the node keeps serving. Sent with pynetdicom so the exact bytes on the wire are ours."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config

from dicom_node.ingest.part10 import encode_file_meta, split_part10
from tests.conftest import audit_rows, db_rows, node_config, require
from tests.peers import ECHOSCU, NODE_ENV, NodeProcess

pytestmark = pytest.mark.integration

ALLOW_LIST = """
[receiver]
require_known_callers = true

[[callers]]
ae_title = "GOODSCU"
hosts = ["127.0.0.1"]
"""


def part10(tmp: Path, name: str, sop_uid: str, body: bytes) -> Path:
    """A file whose meta announces a CT instance and whose data set is ``body``, verbatim."""
    path = tmp / name
    path.write_bytes(encode_file_meta(CTImageStorage, sop_uid, ExplicitVRLittleEndian, "GOODSCU") + body)
    return path


def send(
    node: NodeProcess, files: list[Path], calling: str = "GOODSCU", bind: str | None = None
) -> list[int] | None:
    """C-STORE each file unchanged (streamed from disk); statuses, or None if not associated."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    kwargs = {"bind_address": (bind, 0)} if bind else {}
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, **kwargs)
    if not assoc.is_established:
        return None
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


def echo_ok(node: NodeProcess, calling: str = "GOODSCU") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) == 0


def test_malformed_instances_are_refused_quarantined_and_audited(tmp_path: Path, ct50: Path) -> None:
    node = NodeProcess(tmp_path / "node", node_config(extra=ALLOW_LIST)).start()
    try:
        good_meta, good_data = split_part10(sorted(ct50.iterdir())[0].read_bytes())
        _meta1, second = split_part10(sorted(ct50.iterdir())[1].read_bytes())
        no_uid = pydicom.dcmread(io.BytesIO(second), force=True)
        del no_uid.SOPInstanceUID
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, no_uid)
        no_uid_bytes = buf.getvalue()
        files = [
            part10(tmp_path, "garbage.dcm", "2.25.1001", bytes(range(256)) * 64),
            part10(
                tmp_path,
                "truncated.dcm",
                str(good_meta.MediaStorageSOPInstanceUID),
                good_data[: len(good_data) // 2],
            ),
            part10(tmp_path, "no-sop-uid.dcm", "2.25.1003", no_uid_bytes),
        ]
        statuses = send(node, files)
        assert statuses == [0xC000, 0xC000, 0xA900]
        assert echo_ok(node), "the node keeps serving after bad input"

        node.wait_for(lambda: len(audit_rows(node, "instance-quarantined")) == 3, timeout=10, what="3 audits")
        reasons = [json.loads(r[5])["reason"] for r in audit_rows(node, "instance-quarantined")]
        assert reasons[0].startswith("cannot parse data set")
        assert "more bytes than were sent" in reasons[1]
        assert "SOPInstanceUID" in reasons[2]
        assert db_rows(node, "select count(*) from instances") == [(0,)]
        assert db_rows(node, "select count(*) from studies") == [(0,)]
        # Nothing is dropped: every refused byte stream is kept with its reason.
        quarantined = db_rows(node, "select reason, path from quarantine order by id")
        assert len(quarantined) == 3
        for (_reason, path), original in zip(quarantined, files, strict=True):
            _meta, kept = split_part10(Path(path).read_bytes())
            _meta2, sent_body = split_part10(original.read_bytes())
            assert kept == sent_body
            assert (
                Path(path).with_suffix(".reason.txt").exists()
                or Path(str(path).replace(".dcm", ".reason.txt")).exists()
            )
        listing = node.cli_json("quarantine")
        assert [q["claimed_sop_uid"] for q in listing][0] == "2.25.1001"
    finally:
        node.stop()


def test_unknown_calling_ae_and_wrong_host_are_rejected(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", node_config(extra=ALLOW_LIST)).start()
    try:
        assert send(node, [], calling="EVIL") is None
        assert send(node, [], calling="GOODSCU", bind="127.0.0.2") is None, "AE tied to 127.0.0.1"
        assert send(node, [], calling="GOODSCU") == []
        # The rejection reaches the client before its audit record is committed: wait for it.
        deadline = time.monotonic() + 10
        while len(audit_rows(node, "security-alert")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        # Each association's record is committed after its rejection was sent: two in quick
        # succession may land in either order, so they are compared by who was rejected.
        rejected = sorted(audit_rows(node, "association-rejected"), key=lambda r: (r[3], r[4]))
        assert [(r[3], r[4]) for r in rejected] == [("EVIL", "127.0.0.1"), ("GOODSCU", "127.0.0.2")]
        assert "not on the allow-list" in json.loads(rejected[0][5])["reason"]
        assert "not allowed from host 127.0.0.2" in json.loads(rejected[1][5])["reason"]
        assert len(audit_rows(node, "security-alert")) == 2
        if Path(ECHOSCU).exists():
            dcmtk = subprocess.run(
                [ECHOSCU, "-aet", "EVIL", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
                capture_output=True,
                text=True,
                env=NODE_ENV,
            )
            assert dcmtk.returncode != 0 and "Calling AE Title Not Recognized" in dcmtk.stderr
        assert echo_ok(node)
        assert db_rows(node, "select count(*) from instances") == [(0,)]
    finally:
        node.stop()


def test_disk_guard_answers_out_of_resources(tmp_path: Path, ct50: Path) -> None:
    require("/bin/true")
    node = NodeProcess(
        tmp_path / "node", node_config(extra="[receiver]\nmin_free_disk_mb = 1000000000\n")
    ).start()
    try:
        assert send(node, [sorted(ct50.iterdir())[0]], calling="ANYSCU") == [0xA700]
        refused = audit_rows(node, "instance-rejected")
        assert len(refused) == 1 and "below the configured floor" in json.loads(refused[0][5])["reason"]
        assert db_rows(node, "select count(*) from instances") == [(0,)]
        assert echo_ok(node, "ANYSCU")
    finally:
        node.stop()
