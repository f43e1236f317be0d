"""DICOM TLS (PS3.15 Annex B, the BCP 195 profiles): the node's TLS contexts, and the
check that binds a caller's client certificate to its AE title.

Profiles. Both need TLS 1.2 or 1.3 and verify the peer's chain against the configured CA
file. ``bcp195-nd`` (the Non-Downgrading BCP 195 profile, dcmtk's default) offers, under
TLS 1.2, ECDHE or DHE key exchange with AES-GCM; ``bcp195-extended`` only ECDHE with
AES-GCM. TLS 1.3 suites are OpenSSL's (all forward-secret AEAD; Python cannot narrow them).

Files. ``[tls]`` ``cert_file``, ``key_file`` and ``ca_file``, and a destination's
``ca_file``, are PEM files; a relative path is under the node's home (like ``[policy]
file``). The key must not be encrypted (there is no passphrase setting): protect it by
file permissions instead (0600, owned by the service user). The node's certificate serves
both as server certificate (TLS port) and as client certificate (to TLS destinations), so
it should carry both extended key usages (serverAuth, clientAuth) or none.
:func:`check_config` builds every context the configuration names and reports what is
wrong, one line per problem, before anything listens or sends (:class:`TlsConfigError`).

Server side. The handshake runs in the connection's own thread within the request deadline
(:mod:`dicom_node.net.guard`, which every listener of the receiver goes through); a
handshake that fails on the client's certificate (none, or not signed by the CA) is also
reported to ``on_refused`` — the receiver audits it as a security alert.

Binding. A caller with ``certificate_subject`` and/or ``certificate_sha256`` must present,
over TLS, a certificate with that subject Common Name and/or one of those SHA-256
fingerprints; on the plain port it is refused, since it is configured to use TLS
(:func:`certificate_problem`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import ssl
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from dicom_node.config import Caller, ConfigError, Destination, NodeConfig, TlsSection

log = logging.getLogger(__name__)

#: TLS 1.2 cipher suites of each profile (OpenSSL names), strongest first.
PROFILE_CIPHERS: dict[str, str] = {
    "bcp195-nd": ":".join(
        (
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "DHE-RSA-AES256-GCM-SHA384",
            "DHE-RSA-AES128-GCM-SHA256",
        )
    ),
    "bcp195-extended": ":".join(
        (
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
        )
    ),
}

#: OpenSSL reasons for a handshake that failed on the client's certificate.
_CERTIFICATE_REASONS = frozenset(
    {
        "CERTIFICATE_VERIFY_FAILED",
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "NO_CERTIFICATE_RETURNED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

#: Reports a refused handshake: (peer host, reason).
HandshakeRefused = Callable[[str, str], None]


class TlsConfigError(ConfigError, OSError):
    """TLS settings that cannot work (a file missing, unreadable, not PEM, a key that does
    not match its certificate): every problem, one line each.

    Also an ``OSError`` whose ``strerror`` is that line, so a caller that reports "cannot
    listen" (``serve``) says why in one line rather than with a traceback.
    """

    def __init__(self, *problems: str) -> None:
        ConfigError.__init__(self, *problems)
        self.errno = errno.EINVAL
        self.strerror = "; ".join(problems)

    def __str__(self) -> str:
        return ConfigError.__str__(self)


def fingerprint(value: str) -> str:
    """A SHA-256 fingerprint as compared: lower-case hex, without colons or spaces."""
    return re.sub(r"[\s:]", "", value).lower()


def resolve(name: str, home: Path) -> Path:
    """A configured file: absolute as given, else under the node's home."""
    path = Path(name).expanduser()
    return path if path.is_absolute() else home / path


# -- contexts -------------------------------------------------------------------------


def _refuse_passphrase() -> str:
    raise _EncryptedKey


class _EncryptedKey(Exception):
    """The private key asks for a passphrase (OpenSSL would prompt on the terminal)."""


def _readable(key: str, name: str, home: Path) -> tuple[Path | None, str | None]:
    """The resolved file of setting ``key``, or the problem with it."""
    if not name:
        return None, f"{key} is not set"
    path = resolve(name, home)
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        return None, f"{key} {path}: no such file"
    except IsADirectoryError:
        return None, f"{key} {path}: is a directory, not a PEM file"
    except PermissionError:
        return None, f"{key} {path}: not readable by this user (check its permissions)"
    except OSError as exc:
        return None, f"{key} {path}: cannot read it ({exc.strerror or exc})"
    return path, None


def _load_identity(context: ssl.SSLContext, cert_key: str, key_key: str, tls: TlsSection, home: Path) -> None:
    """Load the node's certificate chain and key into ``context`` (TlsConfigError if they fail)."""
    cert, cert_problem = _readable(cert_key, tls.cert_file, home)
    key, key_problem = _readable(key_key, tls.key_file, home)
    problems = [p for p in (cert_problem, key_problem) if p]
    if problems:
        raise TlsConfigError(*problems)
    assert cert is not None and key is not None
    try:
        context.load_cert_chain(cert, key, password=_refuse_passphrase)
    except _EncryptedKey:
        raise TlsConfigError(
            f"{key_key} {key}: the key is encrypted; store it unencrypted "
            "(openssl pkey -in KEY -out KEY.pem) and protect it with file permissions (0600)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            why = f"{key_key} {key} is not the key of {cert_key} {cert}"
        else:
            why = (
                f"{cert_key} {cert} / {key_key} {key}: not a PEM certificate chain and its key "
                f"({_ssl_reason(exc)})"
            )
        raise TlsConfigError(why) from None
    if key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s can be read by other users: chmod 600 it", key_key, key)


def _load_trust(context: ssl.SSLContext, key: str, name: str, home: Path) -> None:
    path, problem = _readable(key, name, home)
    if problem:
        raise TlsConfigError(problem)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{key} {path}: no PEM CA certificate in it ({_ssl_reason(exc)})") from None
    if not context.get_ca_certs():
        raise TlsConfigError(f"{key} {path}: no CA certificate in it")


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()


def _harden(context: ssl.SSLContext, profile: str) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(PROFILE_CIPHERS[profile])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE


class _ServerSideSocket(ssl.SSLSocket):
    """A connection to the TLS port: a handshake that fails on the client's certificate is
    reported (to the context's ``on_refused``) before the error goes on to its caller.

    Accepted without a handshake (:mod:`dicom_node.net.guard`), the connection handshakes
    on its first read: explicitly, here, since one OpenSSL does inside a read would fail
    without passing through :meth:`do_handshake`.
    """

    _handshake_done = False

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if not self._handshake_done:
            self.do_handshake()
        return super().recv(buflen, flags)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        # the receiver reads a PDU into its buffer (net.tuning._receive)
        if not self._handshake_done:
            self.do_handshake()
        return super().recv_into(buffer, nbytes, flags)

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except TimeoutError:
            raise  # not a refusal: the caller's deadline decides
        except (OSError, ValueError) as exc:
            context = self.context
            if isinstance(context, _ServerContext):
                context.refused(self, exc)
            raise
        self._handshake_done = True


class _ServerContext(ssl.SSLContext):
    """The receiver's TLS context (see :class:`_ServerSideSocket`)."""

    sslsocket_class = _ServerSideSocket
    on_refused: HandshakeRefused | None = None

    def refused(self, sock: ssl.SSLSocket, exc: BaseException) -> None:
        """Log a failed handshake; report one that failed on the client's certificate."""
        try:
            peer_host = str(sock.getpeername()[0])
        except OSError:
            peer_host = "unknown"
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason: str | None = f"client certificate not accepted: {exc.verify_message}"
        elif isinstance(exc, ssl.SSLError) and exc.reason in _CERTIFICATE_REASONS:
            reason = f"client certificate not accepted: {_ssl_reason(exc)}"
        else:
            reason = None
        if reason is None:
            why = _ssl_reason(exc) if isinstance(exc, ssl.SSLError) else str(exc) or type(exc).__name__
            log.info("TLS handshake from %s failed: %s", peer_host, why)
            return
        log.warning("TLS handshake from %s refused: %s", peer_host, reason)
        if self.on_refused is not None:
            self.on_refused(peer_host, reason)


def server_context(
    tls: TlsSection,
    home: Path,
    *,
    on_refused: HandshakeRefused | None = None,
) -> ssl.SSLContext:
    """The receiver's TLS context: [tls] certificate and key, the profile's ciphers, and —
    with ``require_client_certificate`` — a client certificate signed by ``ca_file``
    (optional but verified when ca_file is set and it is not required).

    ``on_refused(peer_host, reason)`` hears of handshakes that failed on the client's
    certificate (none, or not signed by the CA).
    """
    context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, tls.profile)
    _load_identity(context, "[tls] cert_file", "[tls] key_file", tls, home)
    if tls.require_client_certificate and not tls.ca_file:
        raise TlsConfigError(
            "[tls] require_client_certificate needs ca_file (the CA that signs callers' certificates)"
        )
    if tls.ca_file:
        _load_trust(context, "[tls] ca_file", tls.ca_file, home)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    context.on_refused = on_refused
    return context


def client_context(tls: TlsSection, home: Path, *, ca_file: str = "") -> ssl.SSLContext:
    """A context for connecting to a TLS peer: its chain verified against ``ca_file`` (or
    [tls] ca_file) and its name checked; [tls] cert_file presented when set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    _harden(context, tls.profile)
    ca_key, ca = ("ca_file", ca_file) if ca_file else ("[tls] ca_file", tls.ca_file)
    if not ca:
        raise TlsConfigError(
            "tls = true needs ca_file (its own or [tls] ca_file) to verify the peer's certificate"
        )
    _load_trust(context, ca_key, ca, home)
    if tls.cert_file or tls.key_file:
        _load_identity(context, "[tls] cert_file", "[tls] key_file", tls, home)
    return context


class ClientTls:
    """The node's TLS settings as a client: the ``tls_args`` pynetdicom needs to connect to
    a destination, with one context per CA file, built on first use."""

    def __init__(self, tls: TlsSection, home: Path) -> None:
        self.tls = tls
        self.home = home.resolve()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def args_for(self, destination: Destination) -> tuple[ssl.SSLContext, str] | None:
        """``(context, server name)`` for ``destination``, or None when it is not TLS.

        Raises :class:`TlsConfigError` naming the destination when its context cannot be built.
        """
        if not destination.tls:
            return None
        with self._lock:
            context = self._contexts.get(destination.ca_file)
            if context is None:
                try:
                    context = client_context(self.tls, self.home, ca_file=destination.ca_file)
                except TlsConfigError as exc:
                    where = f"destination {destination.ae_title}@{destination.host}:{destination.port}"
                    raise TlsConfigError(*(f"{where}: {p}" for p in exc.problems)) from None
                self._contexts[destination.ca_file] = context
        return context, destination.tls_server_name or destination.host


def check_config(config: NodeConfig, home: Path) -> None:
    """Build every TLS context ``config`` names and check the caller bindings.

    Raises :class:`TlsConfigError` with every problem, one line each — so ``serve`` refuses
    to start instead of failing on the first association.
    """
    tls = config.tls
    problems: list[str] = []
    if tls.port is not None:
        if tls.plain and tls.port == config.node.port:
            problems.append(
                f"[tls] port {tls.port} is also [node] port: give TLS a port of its own (e.g. 2762)"
            )
        try:
            server_context(tls, home)
        except TlsConfigError as exc:
            problems += exc.problems
    elif not tls.plain:
        problems.append("[tls] plain = false but no [tls] port is set: the node would listen nowhere")
    for caller in config.callers:
        where = f"callers {caller.ae_title}"
        bound = caller.certificate_subject or caller.certificate_sha256
        if bound and tls.port is None:
            problems.append(f"{where}: a certificate binding needs the TLS port: set [tls] port")
        if bound and not tls.ca_file:
            problems.append(f"{where}: a certificate binding needs [tls] ca_file to verify the certificate")
        for value in caller.certificate_sha256:
            if not _SHA256_HEX.fullmatch(fingerprint(value)):
                problems.append(
                    f"{where}: certificate_sha256 {value!r} is not a SHA-256 fingerprint (64 hex digits)"
                )
    for name, destination in config.destinations.items():
        if destination.tls:
            try:
                client_context(tls, home, ca_file=destination.ca_file)
            except TlsConfigError as exc:
                problems += (f"destinations.{name}: {problem}" for problem in exc.problems)
    if problems:
        raise TlsConfigError(*dict.fromkeys(problems))


# -- the caller's certificate ---------------------------------------------------------


@dataclass(frozen=True)
class PeerCertificate:
    """What a TLS peer presented: None when it presented no certificate."""

    sha256: str | None
    common_names: tuple[str, ...] = ()


def peer_certificate(assoc: Any) -> PeerCertificate | None:
    """The client certificate of an association's connection (None: not over TLS)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        der = sock.getpeercert(binary_form=True)
        info = sock.getpeercert() or {}
    except (OSError, ValueError):  # closed, or the handshake never finished
        return PeerCertificate(None)
    if not der:
        return PeerCertificate(None)
    subject = cast(tuple[tuple[tuple[str, str], ...], ...], info.get("subject", ()))
    names = tuple(value for rdn in subject for key, value in rdn if key == "commonName")
    return PeerCertificate(hashlib.sha256(der).hexdigest(), names)


def certificate_problem(caller: Caller, presented: PeerCertificate | None) -> str | None:
    """Why ``caller``'s association is refused for its certificate (None: it may proceed).

    A caller without a binding may proceed (the CA check, when required, was the
    handshake's). A bound caller must come over TLS with a certificate whose subject CN is
    ``certificate_subject`` (case-insensitive) and whose SHA-256 is one of
    ``certificate_sha256`` — each only when set.
    """
    if not caller.certificate_subject and not caller.certificate_sha256:
        return None
    who = f"calling AE {caller.ae_title!r}"
    if presented is None:
        return f"{who} is bound to a client certificate: it must connect to the TLS port"
    if presented.sha256 is None:
        return f"{who} presented no client certificate"
    wanted = caller.certificate_subject
    if wanted and wanted.casefold() not in {cn.casefold() for cn in presented.common_names}:
        shown = ", ".join(presented.common_names) or "none"
        return f"{who} presented a certificate for CN={shown}, not CN={wanted}"
    allowed = {fingerprint(value) for value in caller.certificate_sha256}
    if allowed and presented.sha256 not in allowed:
        return f"{who} presented a certificate with SHA-256 {presented.sha256[:16]}..., not one of its own"
    return None
