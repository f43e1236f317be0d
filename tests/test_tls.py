"""dicom_node.net.tls: BCP 195 contexts, one-line errors for unusable TLS settings, the
caller certificate binding, and — in process, on loopback — the receiver's TLS port with
mutual TLS (a bound AE with its own certificate in, with another certificate out and
audited) and the sender's TLS client.

The certificates are made here, for each test session: a throwaway CA, the node's
certificate (localhost / 127.0.0.1), two client certificates signed by that CA and one
signed by another CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom import dcmread
from pydicom.uid import CTImageStorage
from pynetdicom import AE, evt

from audit import AuditEvent, AuditTrail
from dicom_node.config import Caller, Destination, NodeConfig, TlsSection
from dicom_node.delivery.sender import echo, send_series
from dicom_node.ingest.receiver import Receiver
from dicom_node.lab.simulate import write_ct_series
from dicom_node.net.tls import (
    PROFILE_CIPHERS,
    ClientTls,
    PeerCertificate,
    TlsConfigError,
    certificate_problem,
    check_config,
    client_context,
    fingerprint,
    server_context,
)
from dicom_node.net.tuning import tune_pynetdicom
from dicom_node.paths import NodePaths
from models.sim.phantom import PhantomSpec
from pipelines.base import OutputInstance
from tests.peers import free_port

# -- a throwaway PKI ------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    sha256: str


@dataclass(frozen=True)
class Pki:
    ca: Path
    node: Identity
    #: Another server identity (a TLS peer: Orthanc in the integration tests).
    peer: Identity
    #: The modality's certificate (CN ct-scanner-1) and another one from the same CA (CN rogue).
    scanner: Identity
    rogue: Identity
    #: Signed by a CA the node does not trust.
    stranger: Identity


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _ca(out: Path, cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    out: Path, name: str, cn: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> Identity:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return Identity(cert_path, key_path, cert.fingerprint(hashes.SHA256()).hex())


def make_pki(out: Path) -> Pki:
    """A CA, the node's and a peer's server/client certificates, two modality certificates
    (same CA) and one from an untrusted CA, as PEM files under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ca = _ca(out, "dicom-node test CA")
    (out / "ca.pem").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    other_ca = _ca(out, "somebody else's CA")
    return Pki(
        ca=out / "ca.pem",
        node=_issue(out, "node", "dicom-node", ca),
        peer=_issue(out, "peer", "orthanc", ca),
        scanner=_issue(out, "scanner", "ct-scanner-1", ca),
        rogue=_issue(out, "rogue", "rogue", ca),
        stranger=_issue(out, "stranger", "ct-scanner-1", other_ca),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_section(pki: Pki, **changes: Any) -> TlsSection:
    values: dict[str, Any] = {
        "port": free_port(),
        "cert_file": str(pki.node.cert),
        "key_file": str(pki.node.key),
        "ca_file": str(pki.ca),
    }
    return TlsSection(**{**values, **changes})


def problems(config: NodeConfig, home: Path) -> tuple[str, ...]:
    with pytest.raises(TlsConfigError) as caught:
        check_config(config, home)
    return caught.value.problems


# -- profiles -------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["bcp195-nd", "bcp195-extended"])
def test_contexts_follow_the_bcp195_profile(pki: Pki, tmp_path: Path, profile: str) -> None:
    tls = tls_section(pki, profile=profile)
    allowed = set(PROFILE_CIPHERS[profile].split(":"))
    for context in (server_context(tls, tmp_path), client_context(tls, tmp_path)):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 and tls12 <= allowed
        if profile == "bcp195-extended":
            assert all(name.startswith("ECDHE-") and "-GCM-" in name for name in tls12)
        else:  # the non-downgrading profile keeps DHE-RSA besides ECDHE
            assert any(name.startswith("DHE-RSA-") for name in tls12)


def test_client_certificates_are_required_verified_or_not_asked(pki: Pki, tmp_path: Path) -> None:
    assert server_context(tls_section(pki), tmp_path).verify_mode == ssl.CERT_REQUIRED
    optional = server_context(tls_section(pki, require_client_certificate=False), tmp_path)
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    unverified = tls_section(pki, require_client_certificate=False, ca_file="")
    assert server_context(unverified, tmp_path).verify_mode == ssl.CERT_NONE


# -- one line per unusable setting ----------------------------------------------------


def test_relative_files_are_under_the_home(pki: Pki, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "tls").mkdir(parents=True)
    for source in (pki.node.cert, pki.node.key, pki.ca):
        (home / "tls" / source.name).write_bytes(source.read_bytes())
    config = NodeConfig(
        tls=TlsSection(
            port=free_port(), cert_file="tls/node.pem", key_file="tls/node.key", ca_file="tls/ca.pem"
        ),
        destinations={"pacs": Destination(ae_title="PACS", host="127.0.0.1", port=104, tls=True)},
    )
    check_config(config, home)  # raises on any problem
    with pytest.raises(TlsConfigError, match=r"\[tls\] cert_file .*/elsewhere/tls/node.pem: no such file"):
        check_config(config, tmp_path / "elsewhere")


def test_unusable_files_are_one_clear_line_each(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki.node.key.read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cases = {
        "missing": (
            tls_section(pki, cert_file=str(tmp_path / "nope.pem")),
            f"[tls] cert_file {tmp_path / 'nope.pem'}: no such file",
        ),
        "mismatch": (
            tls_section(pki, key_file=str(pki.peer.key)),
            f"[tls] key_file {pki.peer.key} is not the key of [tls] cert_file {pki.node.cert}",
        ),
        "not-pem": (tls_section(pki, cert_file=str(garbage)), "not a PEM certificate chain and its key"),
        "encrypted": (tls_section(pki, key_file=str(encrypted)), "the key is encrypted"),
        "no-ca": (tls_section(pki, ca_file=""), "require_client_certificate needs ca_file"),
        "bad-ca": (tls_section(pki, ca_file=str(garbage)), f"[tls] ca_file {garbage}: no PEM CA certificate"),
        "no-cert": (tls_section(pki, cert_file=""), "[tls] cert_file is not set"),
    }
    for case, (tls, expected) in cases.items():
        found = problems(NodeConfig(tls=tls), tmp_path)
        assert len(found) == 1 and expected in found[0], (case, found)
        assert "\n" not in found[0] and "Traceback" not in found[0]


def test_bindings_and_destinations_are_checked_too(pki: Pki, tmp_path: Path) -> None:
    config = NodeConfig(
        tls=TlsSection(plain=False),
        callers=(Caller(ae_title="CT1", certificate_sha256=("ab:cd",)),),
        destinations={"pacs": Destination(ae_title="PACS", host="127.0.0.1", port=104, tls=True)},
    )
    assert problems(config, tmp_path) == (
        "[tls] plain = false but no [tls] port is set: the node would listen nowhere",
        "callers CT1: a certificate binding needs the TLS port: set [tls] port",
        "callers CT1: a certificate binding needs [tls] ca_file to verify the certificate",
        "callers CT1: certificate_sha256 'ab:cd' is not a SHA-256 fingerprint (64 hex digits)",
        "destinations.pacs: tls = true needs ca_file (its own or [tls] ca_file)"
        " to verify the peer's certificate",
    )
    port = free_port()
    same_port = NodeConfig(node={"port": port}, tls=tls_section(pki, port=port))
    assert problems(same_port, tmp_path) == (
        f"[tls] port {port} is also [node] port: give TLS a port of its own (e.g. 2762)",
    )


def test_a_tls_config_error_is_also_an_os_error_with_its_line() -> None:
    error = TlsConfigError("[tls] cert_file /x: no such file", "[tls] key_file /y: no such file")
    assert isinstance(error, OSError)
    assert error.strerror == str(error) == "[tls] cert_file /x: no such file; [tls] key_file /y: no such file"


# -- the binding ----------------------------------------------------------------------


def test_certificate_binding(pki: Pki) -> None:
    by_name = Caller(ae_title="CT1", certificate_subject="CT-Scanner-1")
    by_hash = Caller(
        ae_title="CT1",
        certificate_sha256=(
            "00" * 32,
            ":".join(pki.scanner.sha256[i : i + 2].upper() for i in range(0, 64, 2)),
        ),
    )
    both = Caller(
        ae_title="CT1", certificate_subject="ct-scanner-1", certificate_sha256=(pki.scanner.sha256,)
    )
    scanner = PeerCertificate(pki.scanner.sha256, ("ct-scanner-1",))
    rogue = PeerCertificate(pki.rogue.sha256, ("rogue",))
    impostor = PeerCertificate(pki.stranger.sha256, ("ct-scanner-1",))  # same CN, other key
    for caller in (by_name, by_hash, both):
        assert certificate_problem(caller, scanner) is None
        assert certificate_problem(caller, rogue) is not None
        assert certificate_problem(caller, None) == (
            "calling AE 'CT1' is bound to a client certificate: it must connect to the TLS port"
        )
        assert (
            certificate_problem(caller, PeerCertificate(None))
            == "calling AE 'CT1' presented no client certificate"
        )
    assert (
        certificate_problem(by_name, rogue)
        == "calling AE 'CT1' presented a certificate for CN=rogue, not CN=CT-Scanner-1"
    )
    assert certificate_problem(by_name, impostor) is None  # a name is only as good as the CA
    assert certificate_problem(by_hash, impostor) is not None
    assert certificate_problem(both, impostor) is not None
    assert certificate_problem(Caller(ae_title="ANY"), None) is None  # no binding, no condition
    assert fingerprint(" AB:cd:EF ") == "abcdef"


# -- in process: the receiver's TLS port and the sender's TLS client --------------------


@dataclass
class RunningReceiver:
    receiver: Receiver
    audit: AuditTrail
    plain_port: int
    tls_port: int

    def alerts(self) -> list[dict[str, Any]]:
        return [
            {"calling_ae": r.calling_ae, "peer_host": r.peer_host, **r.facts}
            for r in self.audit.events(AuditEvent.SECURITY_ALERT)
        ]


@pytest.fixture
def receiver(pki: Pki, tmp_path: Path) -> Iterator[RunningReceiver]:
    plain_port, tls_port = free_port(), free_port()
    config = NodeConfig.model_validate(
        {
            "node": {"port": plain_port},
            "receiver": {"association_request_seconds": 1.0},
            "tls": tls_section(pki, port=tls_port).model_dump(),
            "callers": [
                {
                    "ae_title": "CT1",
                    "certificate_subject": "ct-scanner-1",
                    "certificate_sha256": [pki.scanner.sha256],
                },
                {"ae_title": "WORKSTATION"},
            ],
        }
    )
    audit = AuditTrail(f"sqlite:///{tmp_path / 'audit.db'}")
    # C-ECHO and association policy only: no instance is stored, so no store.
    node = Receiver(config, NodePaths.for_home(tmp_path, config), cast(Any, None), audit)
    node.start()
    try:
        yield RunningReceiver(node, audit, plain_port, tls_port)
    finally:
        node.stop()
        audit.dispose()


def client(pki: Pki, identity: Identity | None, tmp_path: Path) -> ssl.SSLContext:
    """A modality's TLS client: the node's CA trusted, ``identity`` presented (None: none)."""
    if identity is None:
        return client_context(TlsSection(ca_file=str(pki.ca)), tmp_path)
    tls = TlsSection(cert_file=str(identity.cert), key_file=str(identity.key), ca_file=str(pki.ca))
    return client_context(tls, tmp_path)


def wait_for(predicate: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def test_a_bound_ae_gets_in_with_its_certificate_only(
    pki: Pki, tmp_path: Path, receiver: RunningReceiver
) -> None:
    port = receiver.tls_port

    def echo_as(calling: str, identity: Identity | None, to: int = port) -> Any:
        tls_args = (client(pki, identity, tmp_path), "localhost") if to == port else None
        # a rejection answers at once; 30 s so that a loaded CI machine does not turn a slow
        # answer into a timed-out abort
        return echo(
            "127.0.0.1", to, called_ae="DICOM_NODE", calling_ae=calling, timeout=30, tls_args=tls_args
        )

    assert echo_as("CT1", pki.scanner).status == 0
    assert echo_as("WORKSTATION", pki.rogue).status == 0  # known, not bound: the CA suffices
    assert echo_as("WORKSTATION", None, to=receiver.plain_port).status == 0  # plain = true
    assert receiver.alerts() == []

    rogue = echo_as("CT1", pki.rogue)
    assert rogue.status is None and "rejected the association" in str(rogue.error)
    plain = echo_as("CT1", None, to=receiver.plain_port)
    assert plain.status is None and "rejected the association" in str(plain.error)

    # The node answers A-ASSOCIATE-RJ first, then audits: the second rejection (another
    # connection, sent as soon as the first was answered) may be audited first.
    wait_for(lambda: len(receiver.alerts()) == 2)
    rejected = sorted(
        (r.calling_ae, r.facts["reason"]) for r in receiver.audit.events(AuditEvent.ASSOCIATION_REJECTED)
    )
    assert rejected == [
        ("CT1", "calling AE 'CT1' is bound to a client certificate: it must connect to the TLS port"),
        ("CT1", "calling AE 'CT1' presented a certificate for CN=rogue, not CN=ct-scanner-1"),
    ]
    assert sorted((a["calling_ae"], a["alert"], a["reason"]) for a in receiver.alerts()) == [
        ("CT1", "node-authentication", reason) for _, reason in rejected
    ]


def test_an_untrusted_or_missing_certificate_fails_the_handshake_and_is_audited(
    pki: Pki, tmp_path: Path, receiver: RunningReceiver
) -> None:
    for identity in (pki.stranger, None):
        with socket.create_connection(("127.0.0.1", receiver.tls_port), timeout=5) as raw:
            # TLS 1.3: the server judges the client's certificate after the client's side of
            # the handshake is done; its alert comes on the first read.
            with pytest.raises(ssl.SSLError, match="ALERT_UNKNOWN_CA|CERTIFICATE_REQUIRED"):
                with client(pki, identity, tmp_path).wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.recv(1)
    alerts = wait_for(lambda: len(receiver.alerts()) == 2 and receiver.alerts())
    assert [(a["calling_ae"], a["peer_host"], a["alert"]) for a in alerts] == [
        (None, "127.0.0.1", "node-authentication")
    ] * 2
    assert all(a["reason"].startswith("client certificate not accepted: ") for a in alerts)
    assert "unable to get local issuer certificate" in alerts[0]["reason"]
    assert receiver.audit.events(AuditEvent.ASSOCIATION_ACCEPTED) == []


def test_a_silent_connection_does_not_hold_up_the_tls_port(
    pki: Pki, tmp_path: Path, receiver: RunningReceiver
) -> None:
    with socket.create_connection(("127.0.0.1", receiver.tls_port)) as silent:
        started = time.monotonic()
        result = echo(
            "127.0.0.1",
            receiver.tls_port,
            called_ae="DICOM_NODE",
            calling_ae="CT1",
            timeout=5,
            tls_args=(client(pki, pki.scanner, tmp_path), "localhost"),
        )
        assert result.status == 0 and time.monotonic() - started < 2
        # ... and the silent one is closed once association_request_seconds (1 s) have passed.
        silent.settimeout(5)
        assert silent.recv(1) == b""


def test_the_receiver_refuses_to_start_on_an_unusable_tls_setting(pki: Pki, tmp_path: Path) -> None:
    plain_port = free_port()
    config = NodeConfig(node={"port": plain_port}, tls=tls_section(pki, key_file=str(pki.peer.key)))
    audit = AuditTrail(f"sqlite:///{tmp_path / 'audit.db'}")
    node = Receiver(config, NodePaths.for_home(tmp_path, config), cast(Any, None), audit)
    try:
        with pytest.raises(OSError, match=r"\[tls\] key_file .* is not the key of \[tls\] cert_file"):
            node.start()
        with socket.socket() as probe:  # nothing was left listening
            probe.bind(("127.0.0.1", plain_port))
    finally:
        node.stop()
        audit.dispose()


def test_the_sender_goes_over_tls_and_names_what_failed(pki: Pki, tmp_path: Path) -> None:
    tune_pynetdicom()
    study = write_ct_series(tmp_path / "ct", PhantomSpec(rows=16, columns=16, slices=2, seed=3))
    files = [
        OutputInstance(
            sop_uid=str(ds.SOPInstanceUID),
            series_uid=study.series_uid,
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=path,
        )
        for path in study.files
        for ds in [dcmread(path, stop_before_pixels=True)]
    ]
    stored: list[str] = []

    def on_store(event: Any) -> int:
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0

    peer_tls = TlsSection(cert_file=str(pki.peer.cert), key_file=str(pki.peer.key), ca_file=str(pki.ca))
    scp = AE(ae_title="TLS_PACS")
    scp.add_supported_context(CTImageStorage)
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=server_context(peer_tls, tmp_path),
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert server is not None
    node_tls = ClientTls(tls_section(pki), tmp_path)
    try:
        pacs = Destination(ae_title="TLS_PACS", host="127.0.0.1", port=port, tls=True, timeout_seconds=5)
        report = send_series(pacs, files, calling_ae="DICOM_NODE", tls=node_tls)
        assert report.ok and report.sent == 2 and sorted(stored) == sorted(f.sop_uid for f in files)

        wrong_name = pacs.model_copy(update={"tls_server_name": "pacs.hospital.example"})
        report = send_series(wrong_name, files, calling_ae="DICOM_NODE", tls=node_tls)
        assert report.error is not None and report.retryable
        assert "its certificate is not accepted" in report.error
        assert "'pacs.hospital.example'" in report.error

        anonymous = ClientTls(TlsSection(ca_file=str(pki.ca)), tmp_path)  # no certificate to show
        report = send_series(pacs, files, calling_ae="DICOM_NODE", tls=anonymous)
        assert report.error is not None and "does the peer trust this node's certificate?" in report.error

        report = send_series(pacs, files, calling_ae="DICOM_NODE")  # TLS destination, no settings
        assert (
            report.error is not None and not report.retryable and "no [tls] client settings" in report.error
        )
        assert len(stored) == 2  # nothing more arrived
    finally:
        server.shutdown()


def test_tls_to_a_plain_port_says_which_port_to_check(
    pki: Pki, tmp_path: Path, receiver: RunningReceiver
) -> None:
    result = echo(
        "127.0.0.1",
        receiver.plain_port,
        called_ae="DICOM_NODE",
        calling_ae="WORKSTATION",
        timeout=5,
        tls_args=(client(pki, pki.scanner, tmp_path), "localhost"),
    )
    assert result.status is None
    assert result.error is not None and result.error.endswith("(is that port the peer's TLS port?)")
