"""The per-instance steps of pynetdicom that cost most, done lean.

**The successful C-STORE response, encoded without pydicom.**

Every acknowledged instance costs one C-STORE-RSP. pynetdicom builds it as a pydicom
``Dataset``, encodes it twice (once to learn the Command Group Length) and wraps it in a
P-DATA primitive: ≈ 0.37 ms of CPU per instance on the reference VM, on the C-STORE round
trip, under the GIL the receiving threads share. A response that carries nothing but the
two UIDs, the message id and a status is seven fixed elements; :func:`store_response`
writes them with :mod:`struct` in a few microseconds.

Anything else (an Error Comment, an Offending Element, a UID that is not plain ASCII, a
``EVT_DIMSE_SENT`` handler someone bound) takes pynetdicom's own path unchanged. The plain
response is also sent from the association thread itself when the DUL thread would only
relay it (:func:`send_now`): the sender waits for it, and the hand-off cost a thread wake-up.
``tests/test_fastpath.py`` checks the bytes are identical to pynetdicom's for every case
the fast path takes.

**A received P-DATA-TF decoded without copies.** pynetdicom copies every P-DATA-TF four
times before the DIMSE layer sees it (header + body, ``bytes()``, the PDU's slice, each
item's slice): 2 MB of copying under the GIL for a 512×512 CT slice. :func:`p_data_tf`
builds the same PDU with each presentation data value a ``memoryview`` of the received
buffer; the DIMSE layer copies it once, into the message. pynetdicom's own decoder still
runs when someone bound ``EVT_DATA_RECV`` or ``EVT_PDU_RECV``.

**A data set handed to its writer while it arrives.** An association may carry a
``_dn_stage`` callable (the receiver sets one: :mod:`dicom_node.ingest.staging`). When a
C-STORE request's command set is complete and its data set is due,
:func:`stage_data_set` asks it for the buffer to assemble the data set in — a ``BytesIO``
that also writes each fragment to disk as it comes.
"""

from __future__ import annotations

import logging
import ssl
import struct
import threading
from io import BytesIO
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_UL = struct.Struct("<HHII")
_PDU_HEAD = struct.Struct(">BBL")
_ITEM_LENGTH = struct.Struct(">L")
_US = struct.Struct("<HHIH")


def _uid(element: int, value: Any) -> bytes | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        return None
    if len(raw) % 2:
        raw += b"\0"
    return struct.pack("<HHI", 0x0000, element, len(raw)) + raw


def store_response(primitive: Any) -> bytes | None:
    """The encoded Command Set of a C-STORE-RSP primitive, or None when it is not plain.

    Plain: both UIDs present, an integer Message ID Being Responded To and Status, no
    Error Comment and no Offending Element (pynetdicom encodes those).
    """
    if type(primitive) is not C_STORE:
        return None
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    message_id = primitive.MessageIDBeingRespondedTo
    status = primitive.Status
    if not isinstance(message_id, int) or not isinstance(status, int):
        return None
    if not (0 <= message_id <= 0xFFFF and 0 <= status <= 0xFFFF):
        return None
    sop_class = _uid(0x0002, primitive.AffectedSOPClassUID)
    sop_instance = _uid(0x1000, primitive.AffectedSOPInstanceUID)
    if sop_class is None or sop_instance is None:
        return None
    body = b"".join(
        (
            sop_class,
            _US.pack(0x0000, 0x0100, 2, _C_STORE_RSP),
            _US.pack(0x0000, 0x0120, 2, message_id),
            _US.pack(0x0000, 0x0800, 2, _NO_DATA_SET),
            _US.pack(0x0000, 0x0900, 2, status),
            sop_instance,
        )
    )
    return _UL.pack(0x0000, 0x0000, 4, len(body)) + body


_original_send_msg = DIMSEServiceProvider.send_msg


def send_msg(self: Any, primitive: Any, context_id: int) -> None:
    """pynetdicom's ``send_msg``, with a plain C-STORE-RSP sent from :func:`store_response`."""
    encoded = None
    if type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None:
        encoded = store_response(primitive)
    if encoded is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        _original_send_msg(self, primitive, context_id)
        return
    # One PDV when it fits (6 bytes: PDV item length and header); it always does with any
    # maximum PDU length a peer may announce but the smallest.
    limit = self.maximum_pdu_size
    if limit and len(encoded) + 6 > limit:
        _original_send_msg(self, primitive, context_id)
        return
    if send_now(self.dul, context_id, encoded):
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
    self.dul.send_pdu(pdata)


def p_data_tf_bytes(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU holding one presentation data value: the last (only) fragment of the
    command set ``command`` on presentation context ``context_id``."""
    item = 2 + len(command)  # context id, message control header, the fragment
    header = _PDU_HEAD.pack(0x04, 0x00, 4 + item) + _ITEM_LENGTH.pack(item)
    return header + bytes((context_id, 0x03)) + command


def send_now(dul: Any, context_id: int, command: bytes) -> bool:
    """Send a response's command set from the calling (association) thread, when that is
    exactly what the DUL thread would do with it; False: hand it to the DUL as pynetdicom does.

    pynetdicom queues every PDU for its DUL thread, which wakes, runs the state machine
    (Sta6 + Evt9: DT-1, send the P-DATA-TF, stay in Sta6) and sends it: a thread hand-off on
    every acknowledgement, which the sender waits for. Sent here when the DUL is in Sta6 with
    nothing queued before it (order kept), on a plain TCP socket (an SSL object must not be
    written by one thread while another reads it), and when no ``EVT_PDU_SENT`` handler is
    bound (the DUL fires it). The socket's sends are serialised (:func:`install`), and a
    failed send posts Evt17 (transport closed) as the DUL's own sends do.
    """
    transport = dul.socket
    raw = getattr(transport, "socket", None)
    if (
        raw is None
        or isinstance(raw, ssl.SSLSocket)
        or dul.state_machine.current_state != "Sta6"
        or not dul.to_provider_queue.empty()
        or dul.assoc.get_handlers(evt.EVT_PDU_SENT)
    ):
        return False
    transport.send(p_data_tf_bytes(context_id, command))
    return True


_original_socket_send = AssociationSocket.send
_send_locks_lock = threading.Lock()


def _serialised_send(self: Any, bytestream: bytes) -> None:
    """pynetdicom's ``AssociationSocket.send``, one thread at a time per socket: responses
    may be sent from the association thread (:func:`send_now`) as well as the DUL's."""
    lock = self.__dict__.get("_dn_send_lock")
    if lock is None:
        with _send_locks_lock:
            lock = self.__dict__.setdefault("_dn_send_lock", threading.Lock())
    with lock:
        _original_socket_send(self, bytestream)


def p_data_tf(body: bytearray | bytes) -> P_DATA_TF:
    """The P-DATA-TF PDU whose body (after the 6-byte header) is ``body``.

    Raises ValueError for an item that does not fit the PDU or has no context id (what
    pynetdicom's decoder fails on too).
    """
    view = memoryview(body)
    size = len(view)
    items = []
    offset = 0
    while offset < size:
        if offset + 5 > size:
            raise ValueError("presentation data value item header cut short")
        length = int.from_bytes(view[offset : offset + 4], "big")
        end = offset + 4 + length
        if length < 1 or end > size:
            raise ValueError("presentation data value item longer than its PDU")
        item = PresentationDataValueItem()
        item.presentation_context_id = view[offset + 4]
        item.presentation_data_value = view[offset + 5 : end]  # type: ignore[assignment]
        items.append(item)
        offset = end
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = items
    return pdu


def wants_raw_pdus(assoc: Any) -> bool:
    """Whether a handler bound to this association expects pynetdicom's own PDU decoding."""
    return bool(assoc.get_handlers(evt.EVT_DATA_RECV) or assoc.get_handlers(evt.EVT_PDU_RECV))


def stage_data_set(message: Any, stage: Any) -> None:
    """Give a C-STORE request whose data set is due the buffer ``stage`` offers for it.

    ``stage(command_set, context_id)`` returns a ``BytesIO`` (or None: keep pynetdicom's).
    Asked once per message; what already arrived is carried over.
    """
    if type(message) is not C_STORE_RQ or getattr(message, "_dn_staged", False):
        return
    message._dn_staged = True  # type: ignore[attr-defined]
    current = message.data_set
    if type(current) is not BytesIO:  # pynetdicom's own file mode, or already replaced
        return
    try:
        staged = stage(message.command_set, message.context_id)
    except Exception:  # the receiver's bug must not take the DUL down: keep pynetdicom's buffer
        log.exception("staging a data set failed; it is assembled in memory only")
        return
    if staged is None:
        return
    staged.write(current.getvalue())
    message.data_set = staged


def install() -> None:
    """Send plain C-STORE responses through :func:`send_msg`, serialise each socket's sends
    (idempotent)."""
    DIMSEServiceProvider.send_msg = send_msg  # type: ignore[method-assign]
    AssociationSocket.send = _serialised_send  # type: ignore[method-assign]
