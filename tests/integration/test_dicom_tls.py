"""DICOM TLS end to end: dcmtk's storescu / echoscu ``+tls`` against ``dicom-node serve``,
and delivery with storage commitment to an Orthanc that speaks DICOM TLS only.

Certificates are made for the test (tests/test_tls.py: a throwaway CA; the node's and
Orthanc's certificates name 127.0.0.1; CT1's certificate, and a "rogue" one from the same
CA). The node's TLS files are given relative to its home.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from dicom_node.lab.simulate import write_ct_series
from models.sim.phantom import PhantomSpec
from tests.conftest import audit_rows, db_rows, node_config, require
from tests.peers import ECHOSCU, NODE_ENV, ORTHANC, STORESCU, NodeProcess, Orthanc, free_port, storescu
from tests.test_tls import Identity, Pki, make_pki

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def with_tls_files(home: Path, pki: Pki) -> None:
    """The node's certificate, key and CA under ``<home>/tls`` (the config names them relative)."""
    (home / "tls").mkdir(parents=True, exist_ok=True)
    for source in (pki.node.cert, pki.node.key, pki.ca):
        shutil.copy2(source, home / "tls" / source.name)


def tls_config(port: int, *, plain: bool = True, extra: str = "") -> str:
    return f"""
[tls]
port = {port}
plain = {"true" if plain else "false"}
cert_file = "tls/node.pem"
key_file = "tls/node.key"
ca_file = "tls/ca.pem"
require_client_certificate = true
profile = "bcp195-nd"
{extra}"""


def tls_args(pki: Pki, identity: Identity) -> list[str]:
    """dcmtk: TLS with ``identity`` (unencrypted key), the test CA trusted, BCP 195 ND."""
    return ["+tls", str(identity.key), str(identity.cert), "-pw", "+cf", str(pki.ca), "+py"]


def facts(node: NodeProcess, event: str) -> list[dict[str, object]]:
    return [json.loads(r[5]) for r in audit_rows(node, event)]


def test_storescu_and_echoscu_over_tls_with_the_certificate_bound_to_the_ae(tmp_path: Path, pki: Pki) -> None:
    require(STORESCU, ECHOSCU)
    study = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=3, seed=11))
    tls_port = free_port()
    home = tmp_path / "node"
    with_tls_files(home, pki)
    bound = f"""
[receiver]
require_known_callers = true

[[callers]]
ae_title = "CT1"
certificate_subject = "ct-scanner-1"
certificate_sha256 = ["{":".join(pki.scanner.sha256[i : i + 2] for i in range(0, 64, 2)).upper()}"]

[[callers]]
ae_title = "STORESCU"
"""
    node = NodeProcess(home, node_config(policy=False) + tls_config(tls_port) + bound).start()
    try:
        over_tls = storescu(
            list(study.files), tls_port, node.ae_title, calling="CT1", extra=tls_args(pki, pki.scanner)
        )
        assert over_tls.returncode == 0, over_tls.stderr
        node.wait_for(
            lambda: (
                db_rows(node, "select calling_ae, count(*) from instances group by calling_ae")
                == [("CT1", 3)]
            ),
            timeout=20,
            what="3 instances from CT1",
        )

        # The same AE with another certificate from the same CA: refused, and audited.
        rogue = storescu(
            list(study.files), tls_port, node.ae_title, calling="CT1", extra=tls_args(pki, pki.rogue)
        )
        assert rogue.returncode != 0
        assert "Association Rejected" in rogue.stderr + rogue.stdout
        (alert,) = node.wait_for(lambda: facts(node, "security-alert"), timeout=10, what="a security alert")
        assert alert["alert"] == "node-authentication"
        assert alert["reason"] == "calling AE 'CT1' presented a certificate for CN=rogue, not CN=ct-scanner-1"
        ((seq, outcome, _study, calling, host, rejected),) = audit_rows(node, "association-rejected")
        assert (outcome, calling, host) == (4, "CT1", "127.0.0.1")
        assert json.loads(rejected)["reason"] == alert["reason"]

        # The plain port still works (plain = true) for a caller that is not bound.
        plain = storescu(list(study.files), node.port, node.ae_title)
        assert plain.returncode == 0, plain.stderr

        echo = subprocess.run(
            [
                ECHOSCU,
                "-aet",
                "CT1",
                "-aec",
                node.ae_title,
                *tls_args(pki, pki.scanner),
                "127.0.0.1",
                str(tls_port),
            ],
            env=NODE_ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stderr
        # dicom-node's own echo, as a TLS client with the node's certificate ([tls], relative paths).
        ours = node.cli(
            "echo", "127.0.0.1", str(tls_port), "--aet", node.ae_title, "--calling", "STORESCU", "--tls"
        )
        assert "answered C-ECHO over TLS: success" in ours.stdout
        misnamed = node.cli(
            "echo",
            "127.0.0.1",
            str(tls_port),
            "--calling",
            "STORESCU",
            "--tls",
            "--tls-server-name",
            "pacs.example",
            check=False,
        )
        assert misnamed.returncode == 1 and misnamed.stderr.count("\n") == 1
        assert "its certificate is not accepted" in misnamed.stderr and "'pacs.example'" in misnamed.stderr
        # Three more associations accepted (one over TLS refused), no further alert.
        accepted = [r[3] for r in audit_rows(node, "association-accepted")]
        assert accepted == ["CT1", "STORESCU", "CT1", "STORESCU"]
        # The accepted record says which came over TLS and with which certificate.
        records = facts(node, "association-accepted")
        assert [r.get("tls", False) for r in records] == [True, False, True, True]
        assert records[0]["certificate_subject"] == "ct-scanner-1"
        assert records[0]["certificate_sha256"] == pki.scanner.sha256.lower()
        assert "certificate_subject" not in records[1]
        assert len(audit_rows(node, "security-alert")) == 1
    finally:
        node.stop()


def test_delivery_over_tls_is_confirmed_by_storage_commitment_over_tls(tmp_path: Path, pki: Pki) -> None:
    require(STORESCU, ORTHANC)
    slices = 4
    study = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=slices, seed=12))
    tls_port = free_port()
    orthanc = Orthanc(
        tmp_path,
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.peer.cert),
            "DicomTlsPrivateKey": str(pki.peer.key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    # Orthanc reports the commitment on a new association to the node's TLS port.
    orthanc.register_modality("dicom-node", "DICOM_NODE", tls_port, tls=True)
    orthanc.start()
    home = tmp_path / "node"
    with_tls_files(home, pki)
    destination = f"""
[destinations.pacs]
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
timeout_seconds = 10
storage_commitment = true
commitment_timeout_seconds = 30
tls = true
"""
    # TLS only: the scanner, the delivery and Orthanc's report all go over TLS.
    config = node_config(stable_seconds=1, policy=True) + tls_config(tls_port, plain=False) + destination
    node = NodeProcess(home, config).start()
    try:
        sent = storescu(
            list(study.files), tls_port, node.ae_title, calling="CT1", extra=tls_args(pki, pki.scanner)
        )
        assert sent.returncode == 0, sent.stderr
        node.wait_for(
            lambda: db_rows(node, "select state from jobs") == [("delivered",)], timeout=40, what="delivered"
        )
        (series,) = orthanc.series_of_study(study.study_uid)
        assert len(series["Instances"]) == slices
        (delivery,) = db_rows(node, "select state, attempts from deliveries")
        assert delivery == ("delivered", 1)
        (commitment,) = db_rows(
            node, "select state, reported_by, reported_via, committed, failed from storage_commitments"
        )
        assert commitment == ("committed", "ORTHANC", "new-association", slices, 0)
        assert audit_rows(node, "security-alert") == [] and audit_rows(node, "association-rejected") == []

        # `dicom-node send --tls` reaches the TLS-only Orthanc too (the same instances again).
        again = node.cli_json(
            "send", str(tmp_path / "ct"), "--to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--tls"
        )
        assert [(s["sent"], s["error"]) for s in again["series"]] == [(slices, None)]
    finally:
        node.stop()
        orthanc.stop()


def test_serve_refuses_to_start_with_unusable_tls_files_in_one_line(tmp_path: Path, pki: Pki) -> None:
    home = tmp_path / "node"
    with_tls_files(home, pki)
    shutil.copy2(pki.peer.key, home / "tls" / "node.key")  # a key that is not the certificate's
    node = NodeProcess(home, node_config(policy=False) + tls_config(free_port()))
    with pytest.raises(RuntimeError, match="exited with") as failed:
        node.start(timeout=30)
    out = node.stdout.read_text()
    assert "Traceback" not in out
    (line,) = [line for line in out.splitlines() if "error" in line and "[tls]" in line]
    assert f"[tls] key_file {home / 'tls' / 'node.key'} is not the key of [tls] cert_file" in line
    assert node.proc is not None and node.proc.returncode in (1, 2), str(failed.value)
