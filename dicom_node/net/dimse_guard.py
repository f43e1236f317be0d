"""Malformed C-STORE requests get an answer: a failure status, or an A-ABORT — never silence.

Where pynetdicom 3.0.4 goes quiet or drops the connection:

* ``Association._serve_request`` ignores a request that lacks a mandatory parameter
  (``is_valid_request``) with a log line: an SCU that sent a C-STORE-RQ without Affected
  SOP Instance UID waits for a response that never comes.
* ``DIMSEMessage.message_to_primitive`` raises on a command value that fails validation (an
  Affected SOP Instance UID over 64 characters): the association is aborted and the data
  set, already received, is dropped.
* An exception while decoding a command set (garbled bytes, an unknown Command Field) kills
  the DUL thread: the peer sees the connection drop without an A-ABORT, and the
  association's handlers never hear that it ended.

:func:`install_dimse_guard` (called by ``Receiver.build_ae``; idempotent) changes three
things and nothing else:

1. A C-STORE request primitive is built leniently: a command value that fails validation is
   left out; a mandatory one is recorded, as is anything missing, as a
   :class:`CommandDefect` (an invalid optional one, such as Move Originator, is just dropped).
2. A C-STORE request with a defect goes to the Storage Service like any other, so the
   EVT_C_STORE handler sees it (:func:`command_defect`) and answers with a failure status;
   the receiver quarantines its data set. A request without Message ID, or on a context
   that was not accepted, cannot be answered (a response names both): it is aborted.
3. A DIMSE message that cannot be decoded, or whose fragments come out of order (a data
   set before its command, a command while a data set is due — a Command Data Set Type that
   lies), ends the association with A-ABORT, as pynetdicom already does for a message it
   decodes but cannot convert (Evt19); the association handlers see it aborted. So does a
   response that reaches the SCP, answering no request of its own (pynetdicom ignores it,
   and the peer that sent it waits).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass

from dicom_node.net import fastpath

log = logging.getLogger(__name__)

_NO_DATA_SET = 0x0101
#: Mandatory C-STORE-RQ parameters (PS3.7 Table 9.1-1) and how a reason names them.
_MANDATORY = {
    "MessageID": "Message ID",
    "AffectedSOPClassUID": "Affected SOP Class UID",
    "AffectedSOPInstanceUID": "Affected SOP Instance UID",
    "Priority": "Priority",
}
#: How much of an invalid Affected SOP Instance UID the quarantine record keeps.
_CLAIMED_MAX = 128
_DEFECT = "_dn_command_defect"
_RESPONSE = "_dn_response"

_applied = False
_lock = threading.Lock()


@dataclass(frozen=True)
class CommandDefect:
    """What is wrong with a C-STORE request's command set."""

    #: The node's own words, naming the parameter: never its value.
    reason: str
    #: The Affected SOP Instance UID as sent (possibly invalid), "" when there was none.
    claimed_sop_uid: str
    #: The Affected SOP Instance UID breaks the UID rules (status Invalid SOP Instance).
    invalid_sop_instance_uid: bool = False


class _ProtocolViolation(Exception):
    """DIMSE fragments that cannot form a message (the message is the reason)."""


@dataclass(frozen=True)
class DataSetLimits:
    """What one arriving data set may take (the receiver sets ``assoc._dn_limits``)."""

    #: Bytes; 0: no limit.
    max_bytes: int
    #: Whether the disk still has room, asked every ``room_every`` bytes of a data set.
    has_room: Callable[[], bool] | None = None
    room_every: int = 64 * 1024 * 1024


def _check_size(message: DIMSEMessage, limits: DataSetLimits) -> None:
    """Raise when the data set arriving for ``message`` passed a limit (it grows as it comes:
    pynetdicom appends each fragment, so its position is its size)."""
    data = getattr(message, "data_set", None)
    if not isinstance(data, BytesIO):
        return
    size = data.tell()
    if limits.max_bytes and size > limits.max_bytes:
        raise _ProtocolViolation(
            f"a data set larger than {limits.max_bytes // (1024 * 1024)} MB ([receiver] max_dataset_mb)"
        )
    checked = getattr(message, "_dn_room_checked", 0)
    if limits.has_room is not None and size - checked >= limits.room_every:
        message._dn_room_checked = size  # type: ignore[attr-defined]
        if not limits.has_room():
            raise _ProtocolViolation("free disk below [receiver] min_free_disk_mb while a data set arrived")


def command_defect(request: Any) -> CommandDefect | None:
    """The defect of a C-STORE request primitive the guard let through, or None."""
    defect = getattr(request, _DEFECT, None)
    return defect if isinstance(defect, CommandDefect) else None


def _peer(assoc: Association) -> str:
    return str((assoc.acceptor if assoc.is_requestor else assoc.requestor).address)


def _value(elem: Any) -> Any:
    value = elem.value
    return value[0] if elem.VM > 1 and isinstance(value, list | tuple) else value


def _find_defect(message: DIMSEMessage, invalid: list[str], claimed: str) -> CommandDefect | None:
    command = message.command_set
    if "AffectedSOPInstanceUID" in invalid:
        return CommandDefect(
            "C-STORE request has an invalid Affected SOP Instance UID", claimed, invalid_sop_instance_uid=True
        )
    for keyword, name in _MANDATORY.items():
        if keyword in invalid:
            return CommandDefect(f"C-STORE request has an invalid {name}", claimed)
        if keyword not in command or command[keyword].value in (None, ""):
            return CommandDefect(f"C-STORE request has no {name}", claimed)
    if command.get("CommandDataSetType") == _NO_DATA_SET:
        return CommandDefect("C-STORE request has no data set", claimed)
    return None


_original_to_primitive = DIMSEMessage.message_to_primitive

#: The command elements of a plain C-STORE request (PS3.7 9.3.1.1): UIDs and US values.
_PLAIN_UIDS = {0x00000002: "AffectedSOPClassUID", 0x00001000: "AffectedSOPInstanceUID"}
_PLAIN_US = {
    0x00000100: "CommandField",
    0x00000110: "MessageID",
    0x00000700: "Priority",
    0x00000800: "CommandDataSetType",
}
_GROUP_LENGTH = 0x00000000
_US_LE = struct.Struct("<H")
#: Off: every C-STORE request takes the general path (the tests compare both).
_PLAIN_REQUESTS = True


def _plain_value(elem: Any, us: bool) -> int | UID | None:
    """One value of a plain command element, as pydicom converts it; None: not plain.

    The DIMSE layer and the staging hook have read some elements already (pydicom then
    holds them converted): those are taken as converted.
    """
    if type(elem) is RawDataElement:
        raw = elem.value
        if not isinstance(raw, bytes):
            return None
        if us:
            return _US_LE.unpack(raw)[0] if len(raw) == 2 else None
        if not raw.isascii() or b"\\" in raw:
            return None
        text = raw.decode("ascii").rstrip("\0 ")
        return UID(text) if text else None
    value = getattr(elem, "value", None)
    if us:
        return value if type(value) is int else None
    return value if isinstance(value, UID) and value and value.isascii() else None


def _plain_store_primitive(message: DIMSEMessage) -> C_STORE | None:
    """The primitive of a plain C-STORE request, built in one pass; None for anything else.

    Plain: nothing but the group length, the four mandatory parameters, Command Field and
    a Command Data Set Type announcing a data set, each a single value as its VR says, the
    UIDs plain ASCII. The values are decoded as pydicom decodes them and given to the same
    primitive setters as pynetdicom's conversion does, once (the general path converts the
    command set through pydicom twice: ≈ 0.17 ms per instance). A setter that refuses a
    value, a missing or empty parameter, Move Originator, anything unexpected: the general
    path decides, and records the defect.
    """
    values: dict[str, Any] = {}
    for elem in message.command_set.elements():
        tag = int(elem.tag)
        if tag == _GROUP_LENGTH:
            continue
        name = _PLAIN_US.get(tag) or _PLAIN_UIDS.get(tag)
        if name is None:
            return None
        value = _plain_value(elem, tag in _PLAIN_US)
        if value is None:
            return None
        values[name] = value
    if len(values) != len(_PLAIN_US) + len(_PLAIN_UIDS) or values["CommandDataSetType"] == _NO_DATA_SET:
        return None
    primitive = C_STORE()
    try:
        for keyword in ("AffectedSOPClassUID", "MessageID", "Priority", "AffectedSOPInstanceUID"):
            setattr(primitive, keyword, values[keyword])
    except (ValueError, TypeError):
        return None
    # As pynetdicom's message_to_primitive ends.
    primitive.DataSet = message.data_set
    primitive._context_id = message.context_id
    primitive._dataset_path = message._data_set_path
    primitive._dataset_file = message._data_set_file
    return primitive


def _to_primitive(self: DIMSEMessage) -> Any:
    if type(self).__name__.endswith("_RSP"):
        primitive = _original_to_primitive(self)
        setattr(primitive, _RESPONSE, True)  # the primitive alone does not say (request fields fit it)
        return primitive
    if not isinstance(self, C_STORE_RQ):
        return _original_to_primitive(self)
    try:
        plain = _plain_store_primitive(self) if _PLAIN_REQUESTS else None
    except Exception:  # whatever the one pass trips on, the general path words it
        plain = None
    if plain is not None:
        return plain
    scratch = C_STORE()
    invalid: list[str] = []
    claimed = ""
    for elem in list(self.command_set):
        if not hasattr(scratch, elem.keyword):
            continue
        value = _value(elem)
        if elem.keyword == "AffectedSOPInstanceUID":  # kept for the quarantine record, within reason
            claimed = str(value or "").strip("\0 ")[:_CLAIMED_MAX]
        try:
            setattr(scratch, elem.keyword, value)
        except (ValueError, TypeError):
            invalid.append(elem.keyword)
    for keyword in invalid:  # left out of the primitive: it would fail again in the response
        delattr(self.command_set, keyword)
        if keyword not in _MANDATORY:  # an optional one (Move Originator): dropped, not a defect
            log.info("C-STORE request: dropped an invalid %s", keyword)
    primitive = _original_to_primitive(self)
    defect = _find_defect(self, invalid, claimed)
    if defect is not None:
        setattr(primitive, _DEFECT, defect)
    return primitive


_original_serve_request = Association._serve_request


def _serve_request(self: Association, msg: Any, context_id: int) -> None:
    if self.is_acceptor and getattr(msg, _RESPONSE, False):
        # Requests this side sends wait for their responses themselves; one that reaches
        # the dispatcher answers no request (a Command Field turned into a response's).
        log.warning(
            "aborting the association with %s: a %s response to no request", _peer(self), msg.msg_type
        )
        self.abort()
        return
    defect = command_defect(msg)
    if defect is None or self._sent_release:
        _original_serve_request(self, msg, context_id)
        return
    context = self._accepted_cx.get(context_id)
    if context is None or msg.MessageID is None:
        log.warning(
            "aborting the association with %s: a C-STORE request that cannot be answered (%s)",
            _peer(self),
            "no Message ID" if context is not None else f"context {context_id} was not accepted",
        )
        self.abort()
        return
    try:
        # As pynetdicom's own dispatch does around a service class.
        self.dimse.cancel_req = {}
        self._is_paused = True
        StorageServiceClass(self).SCP(msg, context)
        self._is_paused = False
        self.dimse.cancel_req = {}
    except Exception:
        log.exception("answering a malformed C-STORE request failed; aborting the association")
        self.abort()


def _check_order(message: DIMSEMessage | None, primitive: Any) -> None:
    """Command fragments first, then (when announced) data set fragments — per message."""
    command_done = message is not None and type(message) is not DIMSEMessage
    for _context_id, data in primitive.presentation_data_value_list:
        if not data:
            raise _ProtocolViolation("an empty presentation data value")
        if data[0] & 1:
            if command_done:
                raise _ProtocolViolation("a command set arrived while a data set was due")
            command_done = bool(data[0] & 2)
        elif not command_done:
            raise _ProtocolViolation("a data set fragment arrived before its command set")


_original_receive_primitive = DIMSEServiceProvider.receive_primitive


def _receive_primitive(self: DIMSEServiceProvider, primitive: Any) -> None:
    try:
        _check_order(self.message, primitive)
        _original_receive_primitive(self, primitive)
        stage = getattr(self.assoc, "_dn_stage", None)
        if stage is not None and self.message is not None:
            fastpath.stage_data_set(self.message, stage)
        limits = getattr(self.assoc, "_dn_limits", None)
        if limits is not None and self.message is not None:
            _check_size(self.message, limits)
    except Exception as exc:
        why = (
            str(exc) if isinstance(exc, _ProtocolViolation) else f"undecodable message ({type(exc).__name__})"
        )
        log.warning("aborting the association with %s: %s", _peer(self.assoc), why)
        self.message = None
        self.dul.event_queue.put("Evt19")  # unrecognised PDU: A-ABORT to the peer, A-P-ABORT here


def install_dimse_guard() -> None:
    """Apply the guard once per process (see the module doc)."""
    global _applied
    with _lock:
        if _applied:
            return
        DIMSEMessage.message_to_primitive = _to_primitive  # type: ignore[method-assign]
        Association._serve_request = _serve_request  # type: ignore[method-assign]
        DIMSEServiceProvider.receive_primitive = _receive_primitive  # type: ignore[method-assign]
        _applied = True
