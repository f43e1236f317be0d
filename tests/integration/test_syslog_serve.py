"""`dicom-node serve` ships its audit log to a syslog-over-TLS collector (a loopback TLS
listener started here): DICOM PS3.15 audit messages, in order, nothing lost."""

from __future__ import annotations

import ssl
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import trustme

from tests.conftest import node_config, require
from tests.peers import STORESCU, NodeProcess, storescu
from tests.test_audit_syslog import Listener, parse_5424

pytestmark = pytest.mark.integration


def test_serve_ships_audit_records_to_tls_collector(tmp_path: Path, ct50: Path) -> None:
    require(STORESCU)
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    collector = Listener(server).start()
    config = (
        node_config(stable_seconds=60)
        + f"""
[audit.syslog]
enabled = true
host = "127.0.0.1"
port = {collector.port}
ca_file = "{ca_file}"
"""
    )
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        assert storescu(ct50, node.port, node.ae_title).returncode == 0
        assert collector.wait_for(
            lambda c: sum(b"instance-stored" in m for m in c.messages) >= 50, timeout=30
        ), "50 instance-stored messages expected"
    finally:
        node.stop()
        collector.stop()
    parsed = [parse_5424(m) for m in collector.messages if b"DCMNODE-CHECKPOINT" not in m]
    seqs = [p.seq for p in parsed]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), "in order, no duplicates"
    assert seqs[0] == 1, "from the first record on"
    stored = [p for p in parsed if b"instance-stored" in p.msg]
    assert all(p.msgid == "IHE+RFC-3881" for p in stored)
    root = ET.fromstring(stored[0].msg.decode("utf-8").lstrip("\ufeff"))
    assert root.tag == "AuditMessage"
    assert root.find("EventIdentification/EventID").get("csd-code") == "110104"
