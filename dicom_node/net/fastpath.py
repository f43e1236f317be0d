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

**A C-STORE request streamed by the sender.** Delivering a job's outputs, pynetdicom
queues every fragment of a data set for its DUL thread: at a PACS's usual 16 KB maximum
PDU length, 30 000 hand-offs between two threads under one GIL for a 300-slice job with its
two Parametric Maps. :func:`send_request_now` writes the same PDUs from the sending thread,
a megabyte at a time, when the DUL would only relay them (``tests/test_fastpath.py``: the
bytes are pynetdicom's, for data sets in memory and in files, every fragment size).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time
from io import BytesIO
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
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
    return _command_set(
        primitive.AffectedSOPClassUID,
        primitive.AffectedSOPInstanceUID,
        (0x0100, _C_STORE_RSP),
        (0x0120, primitive.MessageIDBeingRespondedTo),
        (0x0800, _NO_DATA_SET),
        (0x0900, primitive.Status),
    )


def _command_set(sop_class_uid: Any, sop_instance_uid: Any, *numbers: tuple[int, Any]) -> bytes | None:
    """A command set of the Affected SOP Class UID, the US elements ``numbers``
    ((element, value), in tag order) and the Affected SOP Instance UID, encoded as
    pynetdicom does (Implicit VR Little Endian, the group length first); None when a UID
    is not plain ASCII or a value is not an integer that fits US."""
    for _, value in numbers:
        if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            return None
    sop_class = _uid(0x0002, sop_class_uid)
    sop_instance = _uid(0x1000, sop_instance_uid)
    if sop_class is None or sop_instance is None:
        return None
    body = b"".join(
        (sop_class, *(_US.pack(0x0000, element, 2, value) for element, value in numbers), sop_instance)
    )
    return _UL.pack(0x0000, 0x0000, 4, len(body)) + body


_C_STORE_RQ = 0x0001
_DATA_SET = 0x0001


def store_request(primitive: Any) -> bytes | None:
    """The encoded Command Set of a C-STORE-RQ primitive with a data set, or None when it
    is not plain.

    Plain: both UIDs present, an integer Message ID and Priority, no Move Originator (a
    C-MOVE sub-operation's fields: pynetdicom encodes those), and the data set given
    either in memory (a non-empty ``BytesIO``) or as a file (``_dataset_path``).
    """
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is not None:
        return None
    if (
        primitive.MoveOriginatorApplicationEntityTitle is not None
        or primitive.MoveOriginatorMessageID is not None
    ):
        return None
    in_memory = primitive.DataSet
    in_file = getattr(primitive, "_dataset_path", None)
    if (in_memory is None) == (in_file is None):
        return None
    if in_memory is not None and (type(in_memory) is not BytesIO or not in_memory.getbuffer().nbytes):
        return None
    return _command_set(
        primitive.AffectedSOPClassUID,
        primitive.AffectedSOPInstanceUID,
        (0x0100, _C_STORE_RQ),
        (0x0110, primitive.MessageID),
        (0x0700, primitive.Priority),
        (0x0800, _DATA_SET),
    )


_original_send_msg = DIMSEServiceProvider.send_msg


def send_msg(self: Any, primitive: Any, context_id: int) -> None:
    """pynetdicom's ``send_msg``, with a plain C-STORE-RSP sent from :func:`store_response`
    and a C-STORE request streamed by :func:`send_request_now` when it may be."""
    encoded = None
    if type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is None:
        if send_request_now(self, primitive, context_id):
            return
    elif type(primitive) is C_STORE:
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


#: Bytes of P-DATA-TF PDUs joined into one ``sendall`` while a data set is streamed.
SEND_BATCH = 1024 * 1024


def _direct(dul: Any, *sent_events: Any) -> Any:
    """The plain TCP socket the calling thread may write to directly, or None (see
    :func:`send_now`): the DUL in Sta6 with nothing queued before us, no SSL, and none of
    ``sent_events`` (nor ``EVT_PDU_SENT``) bound."""
    transport = dul.socket
    raw = getattr(transport, "socket", None)
    if (
        raw is None
        or isinstance(raw, ssl.SSLSocket)
        or dul.state_machine.current_state != "Sta6"
        or not dul.to_provider_queue.empty()
        or any(dul.assoc.get_handlers(event) for event in (evt.EVT_PDU_SENT, *sent_events))
    ):
        return None
    return raw


def _send_lock(transport: Any) -> threading.Lock:
    lock = transport.__dict__.get("_dn_send_lock")
    if lock is None:
        with _send_locks_lock:
            lock = transport.__dict__.setdefault("_dn_send_lock", threading.Lock())
    return lock


def _pdv_pdu(context_id: int, control: int, length: int) -> bytes:
    """The header of a P-DATA-TF PDU holding one presentation data value of ``length`` bytes
    (the PDU header, the item length, the context id and the message control header)."""
    item = 2 + length
    return _PDU_HEAD.pack(0x04, 0x00, 4 + item) + _ITEM_LENGTH.pack(item) + bytes((context_id, control))


def request_pdus(
    command: bytes, data_set: BytesIO | None, data_set_path: Any, context_id: int, max_pdu: int
) -> Any:
    """The P-DATA-TF PDUs of a C-STORE request, as pieces of bytes to send in order: the
    same PDVs, cut at the same places, as pynetdicom's ``DIMSEMessage.encode_msg`` with the
    same maximum PDU length (0: no limit), then encoded by its ``P_DATA_TF``.
    ``command``: the request's command set, encoded (Implicit VR Little Endian);
    ``data_set``: its data set in memory, else ``data_set_path``: ``(file, offset)``, as
    pynetdicom's message holds them. A data set read from a file is read a megabyte at a
    time instead of one fragment at a time."""
    if 0 < max_pdu < 7:
        raise ValueError("a maximum PDU length between 1 and 6 leaves no room for data")
    step = max_pdu - 6 if max_pdu else max(len(command), 1)
    pieces = [command[i : i + step] for i in range(0, len(command), step)] or [b""]
    for n, piece in enumerate(pieces):
        yield _pdv_pdu(context_id, 0x03 if n == len(pieces) - 1 else 0x01, len(piece))
        yield piece
    if data_set is not None:
        data = data_set.getbuffer()
        try:
            if len(data):
                yield from _data_pdus(context_id, data, max_pdu - 6 if max_pdu else len(data), True)
        finally:
            data.release()
        return
    if data_set_path is None:
        return
    path, offset = data_set_path
    with open(path, "rb") as f:
        length = f.seek(0, 2) - f.seek(offset)
        step = max_pdu - 6 if max_pdu else length
        if length == 0:  # pynetdicom sends the last fragment even when it is empty
            yield _pdv_pdu(context_id, 0x02, 0)
            return
        chunk = max(step, (SEND_BATCH // step) * step)  # whole fragments per read
        sent = 0
        while sent < length:
            block = f.read(min(chunk, length - sent))
            if not block:
                raise OSError(f"{path} ended {sent} bytes into a {length}-byte data set")
            sent += len(block)
            yield from _data_pdus(context_id, memoryview(block), step, sent >= length)


def _data_pdus(context_id: int, data: memoryview, step: int, ends: bool) -> Any:
    """Headers and fragments of ``data`` cut every ``step`` bytes; the last fragment is
    marked the data set's last when ``ends``."""
    for start in range(0, len(data), step):
        fragment = data[start : start + step]
        last = ends and start + step >= len(data)
        yield _pdv_pdu(context_id, 0x02 if last else 0x00, len(fragment))
        yield fragment


def send_request_now(dimse: Any, primitive: Any, context_id: int) -> bool:
    """Stream a C-STORE request from the calling thread, when that is exactly what the DUL
    thread would send; False: pynetdicom's own path.

    pynetdicom wraps every fragment of the data set in a P-DATA primitive and queues it for
    its DUL thread, which runs the state machine (Sta6 + Evt9: DT-1) and sends it: at a
    peer's usual 16 KB maximum PDU length, a 512² CT slice is 33 hand-offs between two
    threads under one GIL, and a 157 MB Parametric Map 10 000. Here the same PDUs are
    written to the socket in batches of about a megabyte, under the same conditions as
    :func:`send_now` and with no ``EVT_DIMSE_SENT`` or ``EVT_DATA_SENT`` handler bound. A
    failed send posts Evt17 (transport closed), as the DUL's own sends do.
    """
    dul = dimse.dul
    raw = _direct(dul, evt.EVT_DIMSE_SENT, evt.EVT_DATA_SENT)
    if raw is None:
        return False
    max_pdu = dimse.maximum_pdu_size
    if 0 < max_pdu < 7:
        return False
    command = store_request(primitive)
    if command is not None:  # the usual request, encoded without pydicom
        data_set, data_set_path = primitive.DataSet, primitive._dataset_path
    else:
        message = C_STORE_RQ()
        message.primitive_to_message(primitive)
        command = encode(message.command_set, True, True)
        if command is None:
            return False  # pynetdicom's own path says why
        data_set, data_set_path = message.data_set, message._data_set_path
    # A peer that stops reading must not hold this thread for ever (the requestor's socket
    # has no timeout): each batch must leave within the DIMSE timeout, which bounds the
    # wait for the response too.
    timeout = dimse.dimse_timeout
    batch: list[Any] = []
    size = 0
    with _send_lock(dul.socket):
        # a local failure (the file cannot be read) raises, as in pynetdicom's encode_msg
        for piece in request_pdus(command, data_set, data_set_path, context_id, max_pdu):
            batch.append(piece)
            size += len(piece)
            if size >= SEND_BATCH:
                if not _sendall(dul, raw, batch, timeout):
                    return True
                batch, size = [], 0
        if batch:
            _sendall(dul, raw, batch, timeout)
    return True


def _sendall(dul: Any, raw: Any, batch: list[Any], timeout: float | None) -> bool:
    """Send ``batch`` within ``timeout`` seconds (None: no limit); False when the transport
    failed or the peer took nothing for that long (then Evt17 is posted, as pynetdicom's
    ``AssociationSocket.send`` does on a failure)."""
    data = memoryview(b"".join(batch))
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while data:
            try:
                data = data[raw.send(data, socket.MSG_DONTWAIT) :]
            except (BlockingIOError, InterruptedError):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("the peer took nothing within the DIMSE timeout") from None
                select.select([], [raw], [], remaining)
        return True
    except OSError:
        dul.event_queue.put("Evt17")
        return False


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
    if _direct(dul) is None:
        return False
    dul.socket.send(p_data_tf_bytes(context_id, command))
    return True


_original_socket_send = AssociationSocket.send
_send_locks_lock = threading.Lock()


def _serialised_send(self: Any, bytestream: bytes) -> None:
    """pynetdicom's ``AssociationSocket.send``, one thread at a time per socket: responses
    may be sent from the association thread (:func:`send_now`) as well as the DUL's."""
    with _send_lock(self):
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
