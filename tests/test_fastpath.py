"""dicom_node.net.fastpath: the same bytes and PDUs as pynetdicom's own code, faster."""

from __future__ import annotations

import random
import struct

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from dicom_node.net.fastpath import p_data_tf, store_response


def _response(message_id: int, status: int, sop_class: str, sop_instance: str) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    return rsp


def _pynetdicom_bytes(rsp: C_STORE) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(1, 0))
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert pdv[0] == 0x03  # command, last fragment
    return bytes(pdv[1:])


def _uid(rng: random.Random) -> str:
    uid = "1.2.826.0.1"
    for _ in range(rng.randint(1, 8)):
        part = str(rng.randrange(1, 10 ** rng.randint(1, 12)))
        if len(uid) + 1 + len(part) <= 64:
            uid += "." + part
    return uid


def test_identical_to_pynetdicom_over_many_responses() -> None:
    rng = random.Random(20261205)
    statuses = [0x0000, 0xB000, 0xB007, 0xB006, 0xA700, 0xA900, 0xC000, 0x0110, 0x0117, 0xFFFF]
    odd = even = 0
    for _ in range(500):
        rsp = _response(rng.randrange(0, 0x10000), rng.choice(statuses), _uid(rng), _uid(rng))
        ours = store_response(rsp)
        assert ours == _pynetdicom_bytes(rsp)
        odd += len(rsp.AffectedSOPInstanceUID) % 2
        even += 1 - len(rsp.AffectedSOPInstanceUID) % 2
    assert odd > 100 and even > 100  # both paddings exercised


@pytest.mark.parametrize(
    "change",
    [
        {"ErrorComment": "storage failure"},
        {"OffendingElement": [0x00080018]},
        {"AffectedSOPClassUID": None},
        {"AffectedSOPInstanceUID": None},
    ],
)
def test_anything_but_plain_is_left_to_pynetdicom(change: dict[str, object]) -> None:
    rsp = _response(1, 0xA700, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")
    for name, value in change.items():
        setattr(rsp, name, value)
    assert store_response(rsp) is None


def test_a_request_is_not_a_response() -> None:
    rq = C_STORE()
    rq.MessageID = 1
    rq.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rq.AffectedSOPInstanceUID = "1.2.3.4"
    assert store_response(rq) is None


# -- P-DATA-TF decoded without copies ----------------------------------------------------------


def _pdu_body(items: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack(">IB", len(value) + 1, context_id) + value for context_id, value in items)


def test_p_data_tf_decodes_like_pynetdicom() -> None:
    rng = random.Random(7)
    for _ in range(200):
        items = [
            (
                rng.randrange(1, 256, 2),
                bytes([rng.choice([0, 1, 2, 3])]) + rng.randbytes(rng.randrange(0, 3000)),
            )
            for _ in range(rng.randint(1, 4))
        ]
        body = _pdu_body(items)
        theirs = P_DATA_TF()
        theirs.decode(struct.pack(">BBI", 4, 0, len(body)) + body)
        ours = p_data_tf(bytearray(body))
        assert [
            (i.presentation_context_id, bytes(i.presentation_data_value))
            for i in ours.presentation_data_value_items
        ] == [
            (i.presentation_context_id, i.presentation_data_value)
            for i in theirs.presentation_data_value_items
        ]
        assert (
            ours.to_primitive().presentation_data_value_list
            == theirs.to_primitive().presentation_data_value_list
        )


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00",  # item header cut
        b"\x00\x00\x00\x00\x01",  # item length 0: no context id
        b"\x00\x00\x00\x09\x01\x03ab",  # item longer than the PDU
    ],
)
def test_p_data_tf_refuses_items_that_do_not_fit(body: bytes) -> None:
    with pytest.raises(ValueError):
        p_data_tf(body)


# -- the response sent from the association thread --------------------------------------------


def test_p_data_tf_bytes_are_pynetdicoms() -> None:
    from pynetdicom.pdu_primitives import P_DATA

    from dicom_node.net.fastpath import p_data_tf_bytes

    rng = random.Random(7)
    for _ in range(200):
        context_id = rng.randrange(1, 256, 2)
        command = rng.randbytes(rng.randrange(1, 300))
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        assert p_data_tf_bytes(context_id, command) == P_DATA_TF(pdata).encode()


class _Transport:
    def __init__(self, raw: object) -> None:
        self.socket = raw
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


class _Assoc:
    def __init__(self, handlers: list[object]) -> None:
        self.handlers = handlers

    def get_handlers(self, event: object) -> list[object]:
        return self.handlers


class _Dul:
    def __init__(self, raw: object, state: str = "Sta6", queued: int = 0, handlers: int = 0) -> None:
        import queue
        from types import SimpleNamespace

        self.socket = _Transport(raw)
        self.state_machine = SimpleNamespace(current_state=state)
        self.to_provider_queue: queue.Queue[object] = queue.Queue()
        for _ in range(queued):
            self.to_provider_queue.put(object())
        self.assoc = _Assoc([object()] * handlers)


def test_plain_response_is_sent_from_the_calling_thread() -> None:
    import socket

    from dicom_node.net.fastpath import p_data_tf_bytes, send_now

    a, b = socket.socketpair()
    try:
        dul = _Dul(a)
        assert send_now(dul, 5, b"\x01\x02")
        assert dul.socket.sent == [p_data_tf_bytes(5, b"\x01\x02")]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    "why", ["tls", "not data transfer", "primitive queued first", "pdu-sent handler", "no socket"]
)
def test_response_goes_through_the_dul_otherwise(why: str) -> None:
    import socket
    import ssl

    from dicom_node.net.fastpath import send_now

    a, b = socket.socketpair()
    try:
        raw: object = a
        if why == "tls":
            raw = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).wrap_socket(
                socket.socket(), server_side=True, do_handshake_on_connect=False
            )
        elif why == "no socket":
            raw = None
        dul = _Dul(
            raw,
            state="Sta8" if why == "not data transfer" else "Sta6",
            queued=1 if why == "primitive queued first" else 0,
            handlers=1 if why == "pdu-sent handler" else 0,
        )
        assert not send_now(dul, 1, b"\x00")
        assert dul.socket.sent == []
    finally:
        a.close()
        b.close()


def test_sends_on_one_socket_do_not_interleave(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads sending through one AssociationSocket: each send runs alone."""
    import threading
    import time

    from pynetdicom.transport import AssociationSocket

    from dicom_node.net import fastpath

    inside = []
    overlap = []

    def slow_send(self: object, data: bytes) -> None:
        inside.append(1)
        if len(inside) > 1:
            overlap.append(1)
        time.sleep(0.01)
        inside.pop()

    monkeypatch.setattr(fastpath, "_original_socket_send", slow_send)
    transport = AssociationSocket.__new__(AssociationSocket)
    threads = [
        threading.Thread(target=lambda: [fastpath._serialised_send(transport, b"x") for _ in range(10)])
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap


# -- a C-STORE request streamed from the association thread -----------------------------------


def _store_request(data: bytes | None, path: object = None) -> C_STORE:
    import io

    req = C_STORE()
    req.MessageID = 11
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    req.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1.42"
    req.Priority = 0
    if data is not None:
        req.DataSet = io.BytesIO(data)
    if path is not None:
        req._dataset_path = path
    return req


def _pynetdicom_request_bytes(req: C_STORE, context_id: int, max_pdu: int) -> bytes:
    from pynetdicom.dimse_messages import C_STORE_RQ

    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return b"".join(P_DATA_TF(pdata).encode() for pdata in msg.encode_msg(context_id, max_pdu))


def _our_request_bytes(req: C_STORE, context_id: int, max_pdu: int) -> bytes:
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dsutils import encode

    from dicom_node.net.fastpath import request_pdus

    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    command = encode(msg.command_set, True, True)
    assert command is not None
    pieces = request_pdus(command, msg.data_set, msg._data_set_path, context_id, max_pdu)
    return b"".join(bytes(piece) for piece in pieces)


@pytest.mark.parametrize("max_pdu", [0, 7, 100, 16_384, 65_536, 4_194_304])
def test_request_pdus_are_pynetdicoms(tmp_path: object, max_pdu: int) -> None:
    """The PDUs streamed for a C-STORE request are byte for byte those pynetdicom's DUL
    sends: the data set in memory or in a file (at an offset, as pynetdicom sends a Part 10
    file), of lengths around the fragment size and the read batch, and empty."""
    from pathlib import Path

    from dicom_node.net.fastpath import SEND_BATCH

    rng = random.Random(max_pdu)
    step = (max_pdu - 6) if max_pdu else 1000
    lengths = {0, 2, step - 2, step, step + 2, 3 * step, SEND_BATCH - 2, SEND_BATCH + step + 4}
    lengths.update(rng.randrange(2, 3 * SEND_BATCH, 2) for _ in range(3))
    if max_pdu == 7:  # one byte per fragment: keep it small
        lengths = {0, 2, 4, 30}
    for length in sorted(lengths):
        data = rng.randbytes(length)
        context_id = rng.randrange(1, 256, 2)
        assert _our_request_bytes(_store_request(data), context_id, max_pdu) == _pynetdicom_request_bytes(
            _store_request(data), context_id, max_pdu
        ), ("memory", length)
        offset = 132 + rng.randrange(0, 64, 2)
        file = Path(str(tmp_path)) / f"ds-{length}.dcm"
        file.write_bytes(rng.randbytes(offset) + data)
        assert _our_request_bytes(
            _store_request(None, (file, offset)), context_id, max_pdu
        ) == _pynetdicom_request_bytes(_store_request(None, (file, offset)), context_id, max_pdu), (
            "file",
            length,
        )


def test_request_is_streamed_from_the_calling_thread() -> None:
    """Under the conditions of send_now, the request goes straight to the socket (the peer
    reads pynetdicom's bytes); under any other, pynetdicom's DUL sends it."""
    import socket
    import tempfile
    import threading
    from pathlib import Path
    from types import SimpleNamespace

    from dicom_node.net.fastpath import send_request_now

    data = random.Random(3).randbytes(300_000)
    expected = _pynetdicom_request_bytes(_store_request(data), 3, 16_384)
    a, b = socket.socketpair()
    received = bytearray()

    def read() -> None:
        while len(received) < len(expected):
            chunk = b.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        dul = _Dul(a)
        dimse = SimpleNamespace(dul=dul, maximum_pdu_size=16_384, dimse_timeout=10)
        assert send_request_now(dimse, _store_request(data), 3)
        reader.join(10)
        assert bytes(received) == expected
        assert dul.socket.sent == []  # not through pynetdicom's transport
        # the same request with its data set in a file (as the node's sender passes a path)
        file = Path(tempfile.mkdtemp()) / "ds.dcm"
        file.write_bytes(b"\x00" * 132 + data)
        received.clear()
        reader = threading.Thread(target=read)
        reader.start()
        assert send_request_now(dimse, _store_request(None, (file, 132)), 3)
        reader.join(10)
        assert bytes(received) == expected
        for blocked in (_Dul(a, state="Sta7"), _Dul(a, queued=1), _Dul(a, handlers=1), _Dul(None)):
            assert not send_request_now(
                SimpleNamespace(dul=blocked, maximum_pdu_size=16_384, dimse_timeout=10),
                _store_request(data),
                3,
            )
    finally:
        a.close()
        b.close()


def test_a_failed_stream_closes_the_transport_as_pynetdicom_does() -> None:
    import queue
    import socket
    from types import SimpleNamespace

    from dicom_node.net.fastpath import send_request_now

    a, b = socket.socketpair()
    b.close()
    try:
        dul = _Dul(a)
        dul.event_queue = queue.Queue()  # type: ignore[attr-defined]
        dimse = SimpleNamespace(dul=dul, maximum_pdu_size=16_384, dimse_timeout=10)
        assert send_request_now(dimse, _store_request(b"\x00" * 2_000_000), 1)
        assert dul.event_queue.get_nowait() == "Evt17"  # type: ignore[attr-defined]
    finally:
        a.close()


def _request(rng: random.Random) -> C_STORE:
    import io

    req = C_STORE()
    req.MessageID = rng.randrange(0, 0x10000)
    req.AffectedSOPClassUID = _uid(rng)
    req.AffectedSOPInstanceUID = _uid(rng)
    req.Priority = rng.choice([0, 1, 2])
    req.DataSet = io.BytesIO(b"\x00" * rng.randrange(2, 64, 2))
    return req


def test_request_command_identical_to_pynetdicom_over_many_requests() -> None:
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dsutils import encode

    from dicom_node.net.fastpath import store_request

    rng = random.Random(11)
    for _ in range(500):
        req = _request(rng)
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        assert store_request(req) == encode(msg.command_set, True, True)


@pytest.mark.parametrize("change", ["move originator", "empty data set", "no data set", "a response"])
def test_unusual_requests_are_left_to_pynetdicom(change: str) -> None:
    import io

    from dicom_node.net.fastpath import store_request

    req = _request(random.Random(5))
    if change == "move originator":
        req.MoveOriginatorApplicationEntityTitle = "MOVER"
        req.MoveOriginatorMessageID = 3
    elif change == "empty data set":
        req.DataSet = io.BytesIO()
    elif change == "no data set":
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = "1.2.3"
        req.AffectedSOPInstanceUID = "1.2.3.4"
        req.Priority = 0
    else:
        req.MessageIDBeingRespondedTo = 1
    assert store_request(req) is None


def test_a_peer_that_stops_reading_does_not_hold_the_sender() -> None:
    """The peer's receive buffer full and nobody reading: the stream gives up within the
    DIMSE timeout and closes the transport (Evt17), instead of blocking for ever."""
    import queue
    import socket
    import time
    from types import SimpleNamespace

    from dicom_node.net.fastpath import send_request_now

    a, b = socket.socketpair()
    try:
        dul = _Dul(a)
        dul.event_queue = queue.Queue()  # type: ignore[attr-defined]
        dimse = SimpleNamespace(dul=dul, maximum_pdu_size=16_384, dimse_timeout=0.5)
        started = time.monotonic()
        assert send_request_now(dimse, _store_request(b"\x00" * 64_000_000), 1)
        assert time.monotonic() - started < 5
        assert dul.event_queue.get_nowait() == "Evt17"  # type: ignore[attr-defined]
    finally:
        a.close()
        b.close()
