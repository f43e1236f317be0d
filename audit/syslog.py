"""Shipping the audit trail to a syslog collector over TLS (IHE ATNA transport).

Each audit record becomes one RFC 5424 message (facility ``authpriv``, severity from the
record's outcome, the record's ``seq``, ``hash``, ``prev_hash``, ``event`` and ``outcome`` as
structured data, the payload as BOM + UTF-8) framed with RFC 5425 octet counting and sent
over a long-lived TLS connection.

:class:`AuditForwarder` reads the audit database in ``seq`` order and keeps a small state
file with the last shipped ``seq``; the database itself is the buffer while the collector
is unreachable. :class:`SyslogTlsSender` is the TLS client.

This module imports nothing from the rest of the project but :mod:`audit.trail`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import select
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from audit.trail import AuditRecord, AuditTrail, audit_events, canonical_json

log = logging.getLogger(__name__)

#: syslog facility 10, ``authpriv`` (security/authorization messages), as IHE ATNA uses.
FACILITY_AUTHPRIV = 10
SEVERITY_ERR = 3
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5

#: The SD-ID of the node's structured-data element. 32473 is the private enterprise number
#: reserved for documentation (RFC 5612); replace it with a registered PEN if you have one.
SD_ID = "dicomnode@32473"
DEFAULT_MSGID = "IHE+RFC-3881"
CHECKPOINT_MSGID = "DCMNODE-CHECKPOINT"
#: Default port of syslog over TLS (RFC 5425).
SYSLOG_TLS_PORT = 6514

BOM = b"\xef\xbb\xbf"
NILVALUE = "-"
_HOSTNAME_MAX = 255
_APP_NAME_MAX = 48
_PROCID_MAX = 128
_MSGID_MAX = 32
_SD_NAME_MAX = 32


# --------------------------------------------------------------------------------------
# RFC 5424 formatting and RFC 5425 framing
# --------------------------------------------------------------------------------------


def severity_for_outcome(outcome: int) -> int:
    """Syslog severity for a PS3.15 / RFC 3881 EventOutcomeIndicator.

    Parameters
    ----------
    outcome
        0 (success), 4 (minor failure), 8 (serious failure) or 12 (major failure).

    Returns
    -------
    int
        5 (notice) for 0, 4 (warning) for 4, 3 (err) for 8, 12 and anything unknown.
    """
    if outcome == 0:
        return SEVERITY_NOTICE
    if outcome == 4:
        return SEVERITY_WARNING
    return SEVERITY_ERR


def _header_field(name: str, value: str | None, max_len: int) -> str:
    """A HOSTNAME / APP-NAME / PROCID / MSGID value: NILVALUE or 1*max_len PRINTUSASCII."""
    if value is None or value == "":
        return NILVALUE
    if not all(33 <= ord(ch) <= 126 for ch in value):
        raise ValueError(f"syslog {name} must be printable US-ASCII without spaces, got {value!r}")
    if len(value) > max_len:
        raise ValueError(f"syslog {name} is longer than {max_len} characters: {value!r}")
    return value


def _sd_name(value: str) -> str:
    """An SD-ID or PARAM-NAME: 1*32 PRINTUSASCII except ``=``, SP, ``]`` and ``"``."""
    if (
        not value
        or len(value) > _SD_NAME_MAX
        or not all(33 <= ord(ch) <= 126 and ch not in '="]' for ch in value)
    ):
        raise ValueError(f"invalid RFC 5424 SD-NAME: {value!r}")
    return value


def sd_escape(value: str) -> str:
    """Escape a PARAM-VALUE as RFC 5424 section 6.3.3 requires (``"``, ``\\`` and ``]``).

    Parameters
    ----------
    value
        The raw parameter value.

    Returns
    -------
    str
        The value with each ``"``, ``\\`` and ``]`` preceded by a backslash.
    """
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _sd_element(sd_id: str, params: Sequence[tuple[str, object]]) -> str:
    parts = [_sd_name(sd_id)]
    parts += [f'{_sd_name(name)}="{sd_escape(str(value))}"' for name, value in params]
    return "[" + " ".join(parts) + "]"


def _timestamp(at: float) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2024-05-01T12:00:00.123456Z``."""
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _message(
    *,
    severity: int,
    at: float,
    hostname: str | None,
    app_name: str | None,
    procid: str | None,
    msgid: str | None,
    structured_data: str,
    payload: str,
) -> bytes:
    header = " ".join(
        (
            f"<{FACILITY_AUTHPRIV * 8 + severity}>1",
            _timestamp(at),
            _header_field("HOSTNAME", hostname, _HOSTNAME_MAX),
            _header_field("APP-NAME", app_name, _APP_NAME_MAX),
            _header_field("PROCID", procid, _PROCID_MAX),
            _header_field("MSGID", msgid, _MSGID_MAX),
            structured_data,
        )
    )
    # The header is US-ASCII; PARAM-VALUEs in the structured data are UTF-8 (RFC 5424 6.3.3).
    return header.encode("utf-8") + b" " + BOM + payload.encode("utf-8")


def format_rfc5424(
    record: AuditRecord,
    *,
    app_name: str | None,
    hostname: str | None,
    payload: str,
    msgid: str | None = DEFAULT_MSGID,
    procid: str | None = None,
) -> bytes:
    """One audit record as an RFC 5424 syslog message.

    ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [dicomnode@32473 ...] BOM payload``.

    Parameters
    ----------
    record
        The audit record.
    app_name
        APP-NAME (printable US-ASCII, at most 48 characters; empty or ``None`` is ``-``).
    hostname
        HOSTNAME (printable US-ASCII, at most 255 characters; empty or ``None`` is ``-``).
    payload
        The MSG text; sent as a UTF-8 BOM followed by its UTF-8 encoding.
    msgid
        MSGID (printable US-ASCII, at most 32 characters).
    procid
        PROCID; ``None`` (the default) sends ``-``.

    Returns
    -------
    bytes
        The message, unframed.

    Raises
    ------
    ValueError
        If a header field breaks RFC 5424's length or character rules.

    Notes
    -----
    PRI is facility 10 (``authpriv``) times 8 plus :func:`severity_for_outcome`. TIMESTAMP
    is ``record.at`` in UTC with microseconds. STRUCTURED-DATA is one element
    ``[dicomnode@32473 seq=".." hash=".." prev_hash=".." event=".." outcome=".."]``
    with PARAM-VALUEs escaped by :func:`sd_escape`.
    """
    sd = _sd_element(
        SD_ID,
        (
            ("seq", record.seq),
            ("hash", record.hash),
            ("prev_hash", record.prev_hash),
            ("event", record.event),
            ("outcome", record.outcome),
        ),
    )
    return _message(
        severity=severity_for_outcome(record.outcome),
        at=record.at,
        hostname=hostname,
        app_name=app_name,
        procid=procid,
        msgid=msgid,
        structured_data=sd,
        payload=payload,
    )


def checkpoint_payload(seq: int, hash: str) -> str:
    """The MSG of a checkpoint: ``{"checkpoint":{"hash":"..","seq":N}}`` (canonical JSON)."""
    return canonical_json({"checkpoint": {"seq": seq, "hash": hash}})


def format_checkpoint(
    seq: int,
    hash: str,
    *,
    app_name: str | None,
    hostname: str | None,
    at: float | None = None,
) -> bytes:
    """A checkpoint message: the chain head ``(seq, hash)`` as shipped so far.

    Parameters
    ----------
    seq, hash
        Sequence number and hash of the last record shipped before the checkpoint.
    app_name, hostname
        As for :func:`format_rfc5424`.
    at
        Timestamp (seconds since the epoch); default now.

    Returns
    -------
    bytes
        An RFC 5424 message with MSGID ``DCMNODE-CHECKPOINT``, severity notice, structured
        data ``[dicomnode@32473 seq=".." hash=".." event="checkpoint"]`` and payload
        ``{"checkpoint": {"seq": ..., "hash": ...}}``.
    """
    sd = _sd_element(SD_ID, (("seq", seq), ("hash", hash), ("event", "checkpoint")))
    return _message(
        severity=SEVERITY_NOTICE,
        at=time.time() if at is None else at,
        hostname=hostname,
        app_name=app_name,
        procid=None,
        msgid=CHECKPOINT_MSGID,
        structured_data=sd,
        payload=checkpoint_payload(seq, hash),
    )


def frame_rfc5425(message: bytes) -> bytes:
    """RFC 5425 octet-counting framing: ``MSG-LEN SP SYSLOG-MSG``.

    Parameters
    ----------
    message
        One syslog message (any bytes, newlines included).

    Returns
    -------
    bytes
        The frame: the message length in octets, in decimal, a space, the message.
    """
    if not message:
        raise ValueError("an RFC 5425 frame cannot carry an empty message")
    return b"%d " % len(message) + message


def json_payload(record: AuditRecord) -> str:
    """The default payload: the whole record as canonical JSON (sorted keys, UTF-8 kept).

    Parameters
    ----------
    record
        The audit record.

    Returns
    -------
    str
        ``canonical_json`` of the record's fields (``facts`` as a nested object).
    """
    return canonical_json(dataclasses.asdict(record))


# --------------------------------------------------------------------------------------
# TLS transport
# --------------------------------------------------------------------------------------


class FrameSender(Protocol):
    """What :class:`AuditForwarder` needs from a transport."""

    def send(self, frames: list[bytes]) -> None:
        """Deliver the frames, in order, or raise ``OSError``."""


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


# --------------------------------------------------------------------------------------
# The forwarder
# --------------------------------------------------------------------------------------


def read_state(path: str | os.PathLike[str]) -> int:
    """The last shipped ``seq`` from a forwarder state file (0 when there is none).

    Parameters
    ----------
    path
        The state file, JSON ``{"last_seq": N}``.

    Returns
    -------
    int
        ``N``, or 0 if the file does not exist.

    Raises
    ------
    ValueError
        If the file exists but is not a valid state file (never silently re-ship or skip).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    try:
        value = json.loads(text)["last_seq"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable audit forwarder state file {p}: {exc!r}") from exc
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"audit forwarder state file {p}: last_seq must be a non-negative integer")
    return value


def write_state(path: str | os.PathLike[str], last_seq: int) -> None:
    """Atomically replace the state file with ``{"last_seq": N}`` (temp + fsync + rename).

    Parameters
    ----------
    path
        The state file.
    last_seq
        The last shipped sequence number.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"last_seq": int(last_seq)}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass(frozen=True)
class ForwarderStatus:
    """A snapshot of an :class:`AuditForwarder`.

    Attributes
    ----------
    running
        Whether the background thread is alive.
    last_shipped_seq
        ``seq`` of the last record the collector was sent (0: none yet).
    pending
        Records not yet shipped, as of the last poll of the database (``None`` before the
        first poll). Exact while ``seq`` has no gaps.
    last_error
        The error of the last failed attempt (``"ExceptionType: message"``), cleared by the
        next successful pass.
    last_error_at, last_success_at
        ``time.time()`` of the last failed / successful pass.
    consecutive_failures
        Failed passes since the last successful one.
    """

    running: bool
    last_shipped_seq: int
    pending: int | None
    last_error: str | None
    last_error_at: float | None
    last_success_at: float | None
    consecutive_failures: int


class AuditForwarder:
    """Ships every audit record, in ``seq`` order, to a syslog collector.

    A daemon thread (:meth:`start` / :meth:`stop`) polls the audit database for records
    with ``seq`` greater than the last shipped one, sends them in batches, and after each
    successful batch writes the new last ``seq`` to ``state_file`` atomically. While the
    collector is unreachable it retries with capped exponential backoff and never advances
    the pointer: the audit database is the buffer, so nothing is lost while the collector
    is down, and everything recorded meanwhile is sent, in order, once it is back.

    Delivery guarantees. In normal operation each record is sent once. A batch whose send
    fails part-way (the connection breaks mid-batch) is sent again in full, so the
    collector may see some of its records twice: at-least-once for the batch in flight,
    recognisable by the ``seq`` in the structured data. A crash between a successful send
    and the state-file write likewise re-sends that one batch on restart. RFC 5425 has no
    application-level acknowledgement: a batch the local TCP stack accepted but the
    collector never processed (it crashed, or reset the connection before reading) is
    considered shipped; the ``seq`` / ``prev_hash`` structured data and the periodic
    checkpoint messages let the collector detect such a gap, and rewriting the state file
    re-ships from any point.

    Parameters
    ----------
    trail
        The audit trail to read (read-only, through its engine).
    sender
        Anything with ``send(list[bytes])`` that raises on failure, normally a
        :class:`SyslogTlsSender`. If it has ``close()``, :meth:`stop` calls it.
    state_file
        JSON file ``{"last_seq": N}`` with the last shipped ``seq``; a missing file means
        "ship everything from the first record".
    app_name, hostname
        RFC 5424 APP-NAME and HOSTNAME (``hostname`` default: :func:`socket.gethostname`).
    payload
        ``(AuditRecord) -> str``, the MSG of each record; default :func:`json_payload`.
    poll_seconds
        How often the thread looks for new records (see also :meth:`wake`).
    batch_size
        Records per send.
    checkpoint_every
        After each shipped record whose ``seq`` is a multiple of this, also send a
        checkpoint message (MSGID ``DCMNODE-CHECKPOINT``, payload
        ``{"checkpoint": {"seq": ..., "hash": ...}}``); 0 disables checkpoints.
    retry_initial, retry_max
        Backoff after a failed pass: starts at ``retry_initial`` seconds, doubles, capped
        at ``retry_max``.
    msgid
        MSGID of record messages.

    Raises
    ------
    ValueError
        On a bad header field (app name, host name, msgid), a bad number, or an unreadable
        state file.
    """

    def __init__(
        self,
        trail: AuditTrail,
        sender: FrameSender,
        state_file: str | os.PathLike[str],
        *,
        app_name: str = "dicom-node",
        hostname: str | None = None,
        payload: Callable[[AuditRecord], str] = json_payload,
        poll_seconds: float = 1.0,
        batch_size: int = 100,
        checkpoint_every: int = 1000,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
        msgid: str = DEFAULT_MSGID,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if checkpoint_every < 0:
            raise ValueError("checkpoint_every must be 0 (off) or positive")
        if poll_seconds <= 0 or retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("poll_seconds and retry_initial must be positive, retry_max >= retry_initial")
        self.trail = trail
        self.sender = sender
        self.state_file = Path(state_file)
        self.app_name = _header_field("APP-NAME", app_name, _APP_NAME_MAX)
        self.hostname = _header_field("HOSTNAME", hostname or socket.gethostname(), _HOSTNAME_MAX)
        self.msgid = _header_field("MSGID", msgid, _MSGID_MAX)
        self.payload = payload
        self.poll_seconds = float(poll_seconds)
        self.batch_size = int(batch_size)
        self.checkpoint_every = int(checkpoint_every)
        self.retry_initial = float(retry_initial)
        self.retry_max = float(retry_max)

        self._last_seq = read_state(self.state_file)
        self._dirty = False  # shipped further than the state file says (its write failed)
        self._head: int | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_success_at: float | None = None
        self._failures = 0
        self._ship_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None

    # --- status ------------------------------------------------------------------------

    @property
    def last_shipped_seq(self) -> int:
        """``seq`` of the last record sent to the collector."""
        return self._last_seq

    @property
    def status(self) -> ForwarderStatus:
        """A consistent snapshot: last error, last shipped ``seq``, pending estimate, ..."""
        with self._state_lock:
            head = self._head
            return ForwarderStatus(
                running=self._thread is not None and self._thread.is_alive(),
                last_shipped_seq=self._last_seq,
                pending=None if head is None else max(0, head - self._last_seq),
                last_error=self._last_error,
                last_error_at=self._last_error_at,
                last_success_at=self._last_success_at,
                consecutive_failures=self._failures,
            )

    # --- shipping ----------------------------------------------------------------------

    def _fetch(self, after: int) -> tuple[list[AuditRecord], int]:
        """Up to ``batch_size`` records with ``seq > after``, and the current head ``seq``."""
        with self.trail.read_connection() as conn:
            head = conn.execute(sa.select(sa.func.max(audit_events.c.seq))).scalar()
            rows = (
                conn.execute(
                    sa.select(audit_events)
                    .where(audit_events.c.seq > after)
                    .order_by(audit_events.c.seq)
                    .limit(self.batch_size)
                )
                .mappings()
                .all()
            )
        records = [AuditRecord(**{**row, "facts": json.loads(row["facts"])}) for row in rows]
        return records, int(head or 0)

    def _frames(self, records: list[AuditRecord]) -> list[bytes]:
        frames = []
        for record in records:
            message = format_rfc5424(
                record,
                app_name=self.app_name,
                hostname=self.hostname,
                payload=self.payload(record),
                msgid=self.msgid,
            )
            frames.append(frame_rfc5425(message))
            if self.checkpoint_every and record.seq % self.checkpoint_every == 0:
                checkpoint = format_checkpoint(
                    record.seq, record.hash, app_name=self.app_name, hostname=self.hostname
                )
                frames.append(frame_rfc5425(checkpoint))
        return frames

    def _save_state(self) -> None:
        write_state(self.state_file, self._last_seq)
        self._dirty = False

    def _ship(
        self, *, deadline: float | None = None, interruptible: bool = False
    ) -> tuple[int, Exception | None]:
        shipped = 0
        with self._ship_lock:
            try:
                if self._dirty:
                    self._save_state()
                while True:
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    if interruptible and self._stop.is_set():
                        break
                    records, head = self._fetch(self._last_seq)
                    with self._state_lock:
                        self._head = head
                    if head < self._last_seq:
                        raise RuntimeError(
                            f"state file {self.state_file} says seq {self._last_seq} was shipped but the "
                            f"audit log ends at seq {head}; not shipping (was the audit database "
                            "replaced? then reset the state file)"
                        )
                    if not records:
                        break
                    self.sender.send(self._frames(records))
                    with self._state_lock:
                        self._last_seq = records[-1].seq
                        self._dirty = True
                    shipped += len(records)
                    self._save_state()
            except Exception as exc:  # the thread must survive anything; the status reports it
                self._note_failure(exc)
                return shipped, exc
            self._note_success()
            return shipped, None

    def _note_failure(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        with self._state_lock:
            first = self._failures == 0
            self._failures += 1
            self._last_error = message
            self._last_error_at = time.time()
        if first:
            log.warning("audit forwarding failed (will retry; nothing is lost): %s", message)
        else:
            log.debug("audit forwarding still failing: %s", message)

    def _note_success(self) -> None:
        with self._state_lock:
            recovered = self._failures > 0
            self._failures = 0
            self._last_error = None
            self._last_success_at = time.time()
        if recovered:
            log.info("audit forwarding resumed; shipped up to seq %d", self._last_seq)

    def ship_once(self) -> int:
        """Ship everything pending now, synchronously, in batches.

        Returns
        -------
        int
            How many records were sent. Errors are not raised: they stop the pass, leave
            the pointer at the last fully sent batch and are reported in :attr:`status`.
        """
        shipped, _ = self._ship()
        return shipped

    # --- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.retry_initial
        while not self._stop.is_set():
            _, error = self._ship(interruptible=True)
            if error is None:
                delay = self.retry_initial
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
            else:
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_max)
        self._ship(deadline=self._deadline)
        self._close_sender()

    def _close_sender(self) -> None:
        close = getattr(self.sender, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()

    def start(self) -> None:
        """Start the background thread (a daemon). Does nothing if it is already running."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._wake.clear()
        self._deadline = None
        self._thread = threading.Thread(target=self._run, name="audit-forwarder", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Make the thread look for new records now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread: ship what can be shipped within ``timeout`` seconds, then return.

        Parameters
        ----------
        timeout
            Seconds to wait in total. If the collector is unreachable the thread gives up
            its final attempt when its socket timeouts expire; being a daemon it never
            blocks interpreter exit. Unshipped records stay pending for the next start.
        """
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            self._close_sender()
            return
        thread.join(max(0.0, self._deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("audit forwarder did not finish within %.1f s; %s", timeout, self.status)

    def __repr__(self) -> str:
        return f"AuditForwarder({self.status})"
