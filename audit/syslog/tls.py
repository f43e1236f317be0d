"""The RFC 5425 client: audit messages to a syslog collector over one long-lived TLS connection."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import ssl
import threading

# The package's one logger, named as before it was split into modules, so log filters and
# the ``%(name)s`` in log lines stay as they were.
log = logging.getLogger("audit.syslog")

#: Default port of syslog over TLS (RFC 5425).
SYSLOG_TLS_PORT = 6514


class SyslogTlsSender:
    """An RFC 5425 client: one long-lived TLS connection to a syslog collector.

    Parameters
    ----------
    host
        Collector host name or IP literal (IPv6 may be bracketed).
    port
        Collector port; 6514 is the RFC 5425 default.
    cafile
        PEM bundle of the CAs that may sign the collector's certificate; ``None`` uses the
        system's default trust store.
    certfile, keyfile, key_password
        Client certificate chain and key (PEM) for mutual TLS; ``keyfile`` may be omitted
        when ``certfile`` holds the key too.
    server_hostname
        The name to verify the collector's certificate against, when it differs from
        ``host``. By default it is ``host``: a DNS name is checked against the certificate's
        DNS names, an IP literal against its IP address SANs.
    connect_timeout
        Seconds for TCP connect plus TLS handshake.
    timeout
        Seconds any later socket operation (a send) may block.
    handshake_settle_seconds
        Under TLS 1.3 a server reports a rejected client certificate only *after* the
        client's handshake has completed. The sender waits up to this long after the
        handshake for the server's first post-handshake message (a session ticket, sent
        only once the server has accepted the client) or its alert, so a rejected client
        fails at connect instead of silently losing its first batch.

    Notes
    -----
    :meth:`send` connects on first use and, before each send, reads without blocking
    whatever the collector sent: TLS 1.3 session tickets are consumed, while an EOF, a
    reset or an alert means the connection is dead, so it reconnects instead of writing
    into a half-closed socket (whose first write would "succeed" and be lost). Any error
    during a send drops the connection, so the next call reconnects.

    RFC 5425 has no application-level acknowledgement: a successful :meth:`send` means
    the bytes were accepted by the local TCP stack over a connection that was alive just
    before the send.
    """

    def __init__(
        self,
        host: str,
        port: int = SYSLOG_TLS_PORT,
        *,
        cafile: str | os.PathLike[str] | None = None,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        key_password: str | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        timeout: float = 10.0,
        handshake_settle_seconds: float = 0.5,
    ) -> None:
        self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self.port = int(port)
        self.connect_timeout = float(connect_timeout)
        self.timeout = float(timeout)
        self.handshake_settle_seconds = float(handshake_settle_seconds)
        self.server_hostname = server_hostname or self.host
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        if certfile:
            context.load_cert_chain(certfile, keyfile or None, key_password)
        elif keyfile:
            raise ValueError("keyfile given without certfile")
        self.context = context
        self._sock: ssl.SSLSocket | None = None
        self._lock = threading.Lock()

    @property
    def verifies_ip(self) -> bool:
        """Whether the certificate is checked against an IP address SAN (IP literal host)."""
        try:
            ipaddress.ip_address(self.server_hostname)
        except ValueError:
            return False
        return True

    @property
    def connected(self) -> bool:
        """Whether a connection is currently open (it may still turn out to be dead)."""
        return self._sock is not None

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        tls: ssl.SSLSocket | None = None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            # For an IP literal, CPython sends no SNI and verifies the IP against the SANs.
            tls = self.context.wrap_socket(raw, server_hostname=self.server_hostname)
            if tls.version() == "TLSv1.3":
                self._settle(tls)
            tls.settimeout(self.timeout)
        except BaseException:
            with contextlib.suppress(OSError):
                (tls or raw).close()
            raise
        log.debug("connected to syslog collector %s:%d (%s)", self.host, self.port, tls.version())
        return tls

    def _settle(self, tls: ssl.SSLSocket) -> None:
        if self.handshake_settle_seconds <= 0:
            return
        readable, _, _ = select.select([tls], [], [], self.handshake_settle_seconds)
        if not readable:
            return  # the server said nothing: no session ticket, but no alert either
        # The server sent a post-handshake message: a session ticket (it accepted this
        # client), an alert (raised here as ssl.SSLError) or a close.
        if not self._drain(tls):
            raise ConnectionAbortedError(
                f"syslog collector {self.host}:{self.port} closed the connection after the TLS handshake"
            )

    def _drain(self, tls: ssl.SSLSocket) -> bool:
        """Read whatever the collector sent, without blocking; ``False`` if it closed.

        Alerts (e.g. a rejected client certificate) are raised as ``ssl.SSLError``.
        """
        tls.setblocking(False)
        try:
            for _ in range(64):
                try:
                    data = tls.recv(16384)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return True
                if not data:
                    return False
            return True
        finally:
            tls.settimeout(self.timeout)

    def _alive(self, tls: ssl.SSLSocket) -> bool:
        try:
            readable, _, _ = select.select([tls], [], [], 0)
            if not readable and not tls.pending():
                return True
            return self._drain(tls)
        except (OSError, ValueError):
            return False

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.close()

    def send(self, frames: list[bytes]) -> None:
        """Send framed messages, in order, over the (re)established connection.

        Parameters
        ----------
        frames
            RFC 5425 frames (see :func:`frame_rfc5425`).

        Raises
        ------
        OSError
            Connection refused, timed out or broken; ``ssl.SSLError`` (a subclass) for TLS
            failures, ``ssl.SSLCertVerificationError`` when the collector's certificate is
            not trusted or does not match the host. The connection is dropped, so the next
            call reconnects.
        """
        if not frames:
            return
        data = b"".join(frames)
        with self._lock:
            if self._sock is not None and not self._alive(self._sock):
                log.info("syslog collector %s:%d closed the connection; reconnecting", self.host, self.port)
                self._drop()
            if self._sock is None:
                self._sock = self._connect()
            try:
                self._sock.sendall(data)
            except BaseException:
                self._drop()
                raise

    def close(self) -> None:
        """Close the connection (if any). A later :meth:`send` reconnects."""
        with self._lock:
            sock = self._sock
            if sock is not None:
                # Read what is pending (session tickets) first: closing a socket with unread
                # input sends a TCP reset, which can make the collector discard our last data.
                self._alive(sock)
                with contextlib.suppress(OSError, ValueError):
                    sock.settimeout(min(self.timeout, 1.0))
                    sock.unwrap()
            self._drop()

    def __enter__(self) -> SyslogTlsSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
