"""The syslog wire format of an audit record: an RFC 5424 message in an RFC 5425 frame.

Facility ``authpriv``, severity from the record's outcome, the record's ``seq``, ``hash``,
``prev_hash``, ``event`` and ``outcome`` as structured data, the payload as BOM + UTF-8;
framed with RFC 5425 octet counting. Checkpoint messages carry the chain head shipped so far.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from audit.trail import AuditRecord, canonical_json

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

BOM = b"\xef\xbb\xbf"
NILVALUE = "-"
#: RFC 5424 header field length limits.
HOSTNAME_MAX = 255
APP_NAME_MAX = 48
PROCID_MAX = 128
MSGID_MAX = 32
_SD_NAME_MAX = 32


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


def header_field(name: str, value: str | None, max_len: int) -> str:
    """A HOSTNAME / APP-NAME / PROCID / MSGID value: NILVALUE or 1*max_len PRINTUSASCII.

    Parameters
    ----------
    name
        The field's name, for the error message.
    value
        The value; ``None`` or empty is NILVALUE (``-``).
    max_len
        The field's RFC 5424 limit (``HOSTNAME_MAX``, ``APP_NAME_MAX``, ...).

    Returns
    -------
    str
        ``value``, or ``-``.

    Raises
    ------
    ValueError
        If ``value`` has a character outside printable US-ASCII or is too long.
    """
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
            header_field("HOSTNAME", hostname, HOSTNAME_MAX),
            header_field("APP-NAME", app_name, APP_NAME_MAX),
            header_field("PROCID", procid, PROCID_MAX),
            header_field("MSGID", msgid, MSGID_MAX),
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
