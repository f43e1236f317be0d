"""`dicom-node echo` and `send` against a real Orthanc; association limit and PDU size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pynetdicom import AE

from dicom_node.net.tuning import tune_pynetdicom
from tests.conftest import node_config
from tests.peers import NodeProcess, Orthanc, free_port

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, timeout=120
    )


def test_echo_reports_success_and_failure(tmp_path: Path, orthanc: Orthanc) -> None:
    ok = cli("echo", "127.0.0.1", str(orthanc.dicom_port), "--aet", orthanc.aet, "--home", str(tmp_path))
    assert ok.returncode == 0 and "answered C-ECHO: success" in ok.stdout
    down = cli("echo", "127.0.0.1", str(free_port()), "--timeout", "3", "--home", str(tmp_path))
    assert down.returncode == 1
    assert down.stderr.count("\n") == 1 and "no association with" in down.stderr


def test_send_one_association_per_series(tmp_path: Path, orthanc: Orthanc, ct50: Path) -> None:
    result = cli(
        "send",
        str(ct50),
        "--to",
        f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
        "--json",
        "--home",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(s["instances"], s["sent"], s["failed"], s["error"]) for s in report["series"]] == [
        (50, 50, 0, None)
    ]
    assert orthanc.statistics()["CountInstances"] == 50
    bad = cli("send", str(ct50), "--to", "not-a-peer", "--home", str(tmp_path))
    assert bad.returncode == 1 and "expected AET@HOST:PORT" in bad.stderr


def test_association_limit_and_large_pdu(tmp_path: Path) -> None:
    tune_pynetdicom()
    node = NodeProcess(tmp_path / "node", node_config(extra="[receiver]\nmax_associations = 1\n")).start()
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        first = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert first.is_established
        assert first.acceptor.maximum_length == 4 * 1024 * 1024, "large max PDU announced"
        second = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert second.is_rejected
        assert second.acceptor.primitive.result == 0x02  # rejected-transient: local limit exceeded
        first.release()
        third = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert third.is_established
        third.release()
    finally:
        node.stop()
