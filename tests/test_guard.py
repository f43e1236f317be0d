"""dicom_node.net.guard: what a connection to the DICOM port may cost.

A real pynetdicom SCP on loopback, guarded as the receiver guards its servers, and raw
sockets playing the hostile peer. Each test fails without the guard's hooks: pynetdicom
alone buffers a 4 GB PDU, never times out a silent or slow peer, counts connections that
never associated against ``maximum_associations`` and handshakes TLS in its accept loop.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from audit import AuditEvent
from dicom_node.config import ReceiverSection
from dicom_node.net.guard import ConnectionGuard, Refusal, _LogThrottle, _RefusalAudit, guard_server
from dicom_node.net.tuning import on_connection_open, tune_pynetdicom

A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x07, 0x02, 0x03
HUGE_HEADER = bytes([0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF])  # an A-ASSOCIATE-RQ of 4 GB


@dataclass
class Trail:
    """Stands in for the AuditTrail: keeps what the guard writes."""

    rows: list[tuple[AuditEvent, dict[str, Any]]] = field(default_factory=list)

    def record_many(self, entries: list[tuple[AuditEvent, dict[str, Any]]]) -> int:
        self.rows.extend(entries)
        return len(self.rows)

    def refusals(self, refusal: Refusal | None = None) -> list[dict[str, Any]]:
        return [facts for _, facts in self.rows if refusal is None or facts.get("refusal") == refusal.value]


@dataclass
class Scp:
    port: int
    guard: ConnectionGuard
    trail: Trail
    server: Any
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True
        self.server.shutdown()

    def refusals(self, refusal: Refusal | None = None, expect: int | None = None) -> list[dict[str, Any]]:
        """The refusals audited (of one kind); with ``expect``, once that many are in."""
        deadline = time.monotonic() + 10
        while True:
            assert self.guard.audit.flush(10)
            found = self.trail.refusals(refusal)
            if expect is None or len(found) >= expect or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


@contextmanager
def guarded_scp(ssl_context: ssl.SSLContext | None = None, **settings: Any) -> Iterator[Scp]:
    """A Verification SCP set up as ``Receiver.build_ae`` does, guarded with ``settings``."""
    tune_pynetdicom()
    limits = ReceiverSection(**settings)
    ae = AE(ae_title="GUARDED")
    ae.add_supported_context(Verification)
    ae.maximum_associations = limits.max_associations
    ae.maximum_pdu_size = limits.max_pdu_bytes
    ae.acse_timeout = limits.acse_timeout_seconds
    ae.network_timeout = limits.network_timeout_seconds
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open)],
        ssl_context=ssl_context,
    )
    trail = Trail()
    guard = guard_server(server, limits, trail)  # type: ignore[arg-type]
    scp = Scp(int(server.server_address[1]), guard, trail, server)
    try:
        yield scp
    finally:
        if not scp.stopped:
            server.shutdown()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_pdu(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None when the node closed the connection first."""
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < 6:
            chunk = sock.recv(6 - len(data))
            if not chunk:
                return None
            data += chunk
        length = struct.unpack(">L", data[2:6])[0]
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
    except ConnectionResetError:
        return None
    return data[0], body


def closed_by_node(sock: socket.socket, timeout: float) -> bool:
    """Read until the node closes (True) or ``timeout`` passes (False)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - started


@functools.cache
def associate_rq(called: str = "GUARDED", calling: str = "PEER") -> bytes:
    """A real A-ASSOCIATE-RQ (pynetdicom's, proposing Verification), captured off the wire."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    requester = threading.Thread(target=lambda: ae.associate("127.0.0.1", port, ae_title=called))
    requester.start()
    conn, _ = listener.accept()
    header = b""
    while len(header) < 6:
        header += conn.recv(6 - len(header))
    body = b""
    while len(body) < struct.unpack(">L", header[2:])[0]:
        body += conn.recv(65536)
    conn.close()
    listener.close()
    requester.join(10)
    return header + body


def echo(port: int, source: str = "127.0.0.1") -> tuple[bool, float]:
    """A C-ECHO on a new association: (succeeded, seconds it took)."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="GUARDED", bind_address=(source, 0))
    ok = False
    if assoc.is_established:
        status = assoc.send_c_echo()
        ok = bool(status) and status.Status == 0x0000
        assoc.release()
    return ok, time.monotonic() - started


# -- bounded PDUs ---------------------------------------------------------------------------


def test_a_4gb_header_is_aborted_before_anything_is_buffered() -> None:
    """pynetdicom reads ``recv(4 GB)``: no timeout, and every byte streamed after the
    header stays buffered. The guard answers the header with A-ABORT (invalid PDU
    parameter value) and closes, so a streaming peer is cut off within a few megabytes."""
    with guarded_scp() as scp:
        sock = connect(scp.port)
        sent = 0

        def stream() -> None:
            nonlocal sent
            try:
                sock.sendall(HUGE_HEADER)
                while sent < 200 * 1024 * 1024:
                    sock.sendall(bytes(64 * 1024))
                    sent += 64 * 1024
            except OSError:
                pass

        streamer = threading.Thread(target=stream)
        streamer.start()
        pdu = read_pdu(sock)
        streamer.join(30)
        sock.close()
        assert pdu == (A_ABORT, bytes([0, 0, 0x02, 0x06])), (
            f"expected A-ABORT (provider, invalid value), got {pdu}"
        )
        assert sent < 32 * 1024 * 1024, f"the node kept reading: {sent // 2**20} MiB accepted"
        refusals = scp.refusals(Refusal.PDU_TOO_LONG, expect=1)
        assert len(refusals) == 1 and refusals[0]["peer_host"] == "127.0.0.1"
        assert refusals[0]["stage"] == "request" and refusals[0]["action"] == "a-abort"
        wait_until(lambda: scp.guard.counts() == {"pending": 0, "associations": 0}, 5, "the place freed")


@pytest.mark.parametrize(
    ("header", "refusal", "reason"),
    [
        (bytes([0x04, 0, 0, 0, 0, 10]), Refusal.UNEXPECTED_PDU, 0x02),  # P-DATA before association
        (bytes([0x05, 0, 0, 0, 0, 4]), Refusal.UNEXPECTED_PDU, 0x02),  # A-RELEASE-RQ
        (bytes([0x02, 0, 0, 0, 0, 60]), Refusal.UNEXPECTED_PDU, 0x02),  # A-ASSOCIATE-AC
        (bytes([0x08, 0, 0, 0, 0, 4]), Refusal.UNKNOWN_PDU_TYPE, 0x01),
        (bytes([0xFF, 0, 0, 0, 0, 0]), Refusal.UNKNOWN_PDU_TYPE, 0x01),
    ],
    ids=["p-data", "release-rq", "associate-ac", "type-08", "type-ff"],
)
def test_anything_but_a_request_before_the_association_is_aborted_at_its_header(
    header: bytes, refusal: Refusal, reason: int
) -> None:
    with guarded_scp() as scp:
        sock = connect(scp.port)
        sock.sendall(header)  # the header only: the node must not wait for the body
        started = time.monotonic()
        pdu = read_pdu(sock)
        took = time.monotonic() - started
        sock.close()
        assert pdu == (A_ABORT, bytes([0, 0, 0x02, reason])) and took < 1.0, (pdu, took)
        assert [r["refusal"] for r in scp.refusals(expect=1)] == [refusal.value]


def test_p_data_longer_than_announced_aborts_the_association() -> None:
    with guarded_scp(max_pdu_bytes=16384) as scp:
        sock = connect(scp.port)
        sock.sendall(associate_rq())
        reply = read_pdu(sock)
        assert reply is not None and reply[0] == A_ASSOCIATE_AC
        wait_until(lambda: scp.guard.counts()["associations"] == 1, 5, "the association counted")
        sock.sendall(bytes([0x04, 0]) + struct.pack(">L", 16385))
        assert read_pdu(sock) == (A_ABORT, bytes([0, 0, 0x02, 0x06]))
        assert closed_by_node(sock, 5)
        sock.close()
        refusals = scp.refusals(Refusal.PDU_TOO_LONG, expect=1)
        assert len(refusals) == 1 and refusals[0]["stage"] == "association"
        assert refusals[0]["calling_ae"] == "PEER" and refusals[0]["alert"] == "protocol-violation"
        assert [event for event, _ in scp.trail.rows] == [AuditEvent.SECURITY_ALERT]
        wait_until(lambda: scp.guard.counts()["associations"] == 0, 5, "the association to stop counting")


def test_a_pdu_must_arrive_within_pdu_read_seconds() -> None:
    with guarded_scp(pdu_read_seconds=1.0) as scp:
        sock = connect(scp.port)
        sock.sendall(associate_rq())
        assert (read_pdu(sock) or (0,))[0] == A_ASSOCIATE_AC
        sock.sendall(bytes([0x04, 0]) + struct.pack(">L", 1000) + bytes(10))  # ... and no more
        started = time.monotonic()
        pdu = read_pdu(sock, timeout=10)
        took = time.monotonic() - started
        sock.close()
        assert pdu == (A_ABORT, bytes([0, 0, 0x02, 0x00])) and 0.8 < took < 3.0, (pdu, took)
        assert len(scp.refusals(Refusal.PDU_TIMEOUT, expect=1)) == 1


# -- the request deadline -------------------------------------------------------------------


def test_idle_connections_are_closed_at_the_deadline_and_never_count_as_associations() -> None:
    """pynetdicom counts every connection against ``maximum_associations`` until its ACSE
    timeout (here 30 s): 5 idle sockets would refuse every sender for 30 s."""
    with guarded_scp(max_associations=1, association_request_seconds=1.5, acse_timeout_seconds=30) as scp:
        idle = [connect(scp.port) for _ in range(5)]
        wait_until(lambda: scp.guard.counts()["pending"] == 5, 5, "5 pending connections")
        # Silent, they are a thread asleep each: no association, no DUL reactor polling.
        assert scp.server.active_associations == []
        ok, took = echo(scp.port)
        assert ok and took < 2.0, f"C-ECHO beside 5 idle connections: ok={ok} in {took:.1f} s"
        started = time.monotonic()
        assert all(closed_by_node(sock, 10) for sock in idle)
        assert time.monotonic() - started < 3.0
        for sock in idle:
            sock.close()
        wait_until(lambda: scp.guard.counts() == {"pending": 0, "associations": 0}, 2, "all places freed")
        assert len(scp.server.active_associations) == 0, "the acceptor threads ended with their connections"
        refusals = scp.refusals(Refusal.REQUEST_TIMEOUT, expect=5)
        assert len(refusals) == 5 and {r["action"] for r in refusals} == {"closed"}


def test_a_slow_sender_is_cut_at_the_request_deadline() -> None:
    """One byte at a time keeps pynetdicom's ``recv`` loop (and its thread) busy forever."""
    request = associate_rq()
    with guarded_scp(association_request_seconds=1.0) as scp:
        sock = connect(scp.port)
        started = time.monotonic()

        def trickle() -> None:
            try:
                for byte in request:
                    sock.send(bytes([byte]))
                    time.sleep(0.1)
            except OSError:
                pass

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        pdu = read_pdu(sock, timeout=10)
        took = time.monotonic() - started
        sock.close()
        assert pdu == (A_ABORT, bytes([0, 0, 0x02, 0x00])) and took < 2.5, (pdu, took)
        assert len(scp.refusals(Refusal.REQUEST_TIMEOUT, expect=1)) == 1


def test_a_connection_gone_before_its_request_is_not_a_refusal() -> None:
    """Port probes (a load balancer, ``wait_port``) connect and close: not audited."""
    with guarded_scp() as scp:
        for _ in range(3):
            connect(scp.port).close()
        time.sleep(0.2)  # accepted
        took = wait_until(lambda: len(scp.server.active_associations) == 0, 5, "the acceptor threads to end")
        assert took < 1.0, f"the acceptor threads outlived their connections by {took:.1f} s"
        assert scp.guard.counts() == {"pending": 0, "associations": 0}
        assert scp.refusals() == []


def test_a_malformed_request_is_aborted_and_audited() -> None:
    request = bytearray(associate_rq())
    request[10:26] = b"\xff" * 16  # the Called AE Title: not text
    request[74] = 0x99  # the first item: not an Application Context
    with guarded_scp() as scp:
        sock = connect(scp.port)
        sock.sendall(bytes(request))
        pdu = read_pdu(sock)
        sock.close()
        assert pdu is None or pdu[0] in (A_ABORT, A_ASSOCIATE_RJ), pdu
        refusals = scp.refusals(expect=1)
        assert [r["refusal"] for r in refusals] == [Refusal.MALFORMED_PDU.value]


def _items(body: bytes) -> list[tuple[int, bytes]]:
    """The items of a PDU's variable field (type, value), in order."""
    items, at = [], 0
    while at < len(body):
        kind, length = body[at], struct.unpack(">H", body[at + 2 : at + 4])[0]
        items.append((kind, body[at + 4 : at + 4 + length]))
        at += 4 + length
    return items


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _request_without(drop: str) -> bytes:
    """The captured A-ASSOCIATE-RQ with one mandatory part taken out, or too small."""
    request = associate_rq()
    fixed, items = request[6:74], _items(request[74:])
    rebuilt = b""
    for kind, value in items:
        if kind == 0x20:  # presentation context: id, 3 reserved bytes, then its sub-items
            subs = _items(value[4:])
            keep = [(k, v) for k, v in subs if not (drop == "abstract" and k == 0x30)]
            keep = [(k, v) for k, v in keep if not (drop == "transfer" and k == 0x40)]
            value = value[:4] + b"".join(_item(k, v) for k, v in keep)
        if kind == 0x50:
            if drop == "user":
                continue
            if drop.startswith("max-"):  # Maximum Length sub-item set to a tiny value
                subs = _items(value)
                value = b"".join(
                    _item(k, struct.pack(">L", int(drop[4:])) if k == 0x51 else v) for k, v in subs
                )
        rebuilt += _item(kind, value)
    body = fixed + rebuilt
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


@pytest.mark.parametrize(
    ("drop", "problem"),
    [
        ("abstract", "presentation context 1 has no abstract syntax"),
        ("transfer", "presentation context 1 has no transfer syntax"),
        ("user", "has no Maximum Length (User Information) item"),
        ("max-1", "Maximum Length 1 is too small for any data"),
        ("max-6", "Maximum Length 6 is too small for any data"),
    ],
)
def test_a_request_without_what_negotiation_needs_is_aborted_and_audited(
    drop: str, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom decodes these and fails later in its own threads: without an abstract or
    transfer syntax the acceptor thread raised (the connection closed, nothing answered, a
    CRITICAL in the log); without a usable Maximum Length every answer failed to encode."""
    with guarded_scp() as scp, caplog.at_level(logging.WARNING):
        sock = connect(scp.port)
        sock.sendall(_request_without(drop))
        pdu = read_pdu(sock)
        sock.close()
        assert pdu == (A_ABORT, bytes([0, 0, 0x02, 0x06])), pdu
        refusals = scp.refusals(expect=1)
        assert [r["refusal"] for r in refusals] == [Refusal.MALFORMED_PDU.value]
        assert any(problem in str(v) for v in refusals[0].values()), refusals[0]
        assert echo(scp.port)[0], "the node answers the next caller"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.CRITICAL], "no traceback"


def test_an_accepted_connection_shares_the_servers_contexts_instead_of_copying_them() -> None:
    """pynetdicom deep-copies the supported contexts for every connection: with every
    storage class and transfer syntax (the receiver's), ~50 ms and ~1.3 MB each before
    a byte is read."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context

    seen: list[Any] = []
    with guarded_scp() as scp:
        for cx in AllStoragePresentationContexts:
            scp.server.contexts.append(build_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES))
        scp.server.bind(evt.EVT_REQUESTED, lambda event: seen.append(event.assoc.acceptor.supported_contexts))
        assert echo(scp.port)[0], "negotiation works on the shared contexts"
        assert seen and seen[0] is scp.server.contexts and len(seen[0]) > 100


def test_shutdown_does_not_wait_for_silent_connections() -> None:
    """socketserver joins its handler threads on close; those waiting for a silent peer's
    first bytes are woken, not waited for until the request deadline."""
    with guarded_scp(association_request_seconds=30) as scp:
        idle = [connect(scp.port) for _ in range(3)]
        wait_until(lambda: scp.guard.counts()["pending"] == 3, 5, "3 pending")
        started = time.monotonic()
        scp.stop()
        took = time.monotonic() - started
        assert took < 2.0, f"shutdown waited {took:.1f} s for silent connections"
        assert all(closed_by_node(sock, 1) for sock in idle)
        assert scp.guard.counts()["pending"] == 0 and scp.refusals() == [], "stopping refuses no one"
        for sock in idle:
            sock.close()


# -- counting -------------------------------------------------------------------------------


def test_pending_connections_are_limited_per_host_and_in_all() -> None:
    with guarded_scp(max_pending_per_host=3, max_pending_connections=5, association_request_seconds=5) as scp:
        first = [connect(scp.port) for _ in range(3)]
        wait_until(lambda: scp.guard.counts()["pending"] == 3, 5, "3 pending")
        fourth = connect(scp.port)
        assert closed_by_node(fourth, 1.0), "a 4th pending connection from one host is closed at once"
        others = [connect(scp.port, "127.0.0.2") for _ in range(2)]  # another host: admitted
        wait_until(lambda: scp.guard.counts()["pending"] == 5, 5, "5 pending")
        sixth = connect(scp.port, "127.0.0.3")
        assert closed_by_node(sixth, 1.0), "a 6th pending connection in all is closed at once"
        assert not closed_by_node(others[0], 0.3), "admitted connections stay open until their deadline"
        kinds = [r["refusal"] for r in scp.refusals(expect=2)]
        assert kinds == [Refusal.TOO_MANY_PENDING_FROM_HOST.value, Refusal.TOO_MANY_PENDING.value]
        assert [r["peer_host"] for r in scp.refusals()] == ["127.0.0.1", "127.0.0.3"]
        for sock in (*first, fourth, *others, sixth):
            sock.close()


def test_associations_are_limited_per_host() -> None:
    with guarded_scp(max_associations=4, max_associations_per_host=1) as scp:
        held = AE(ae_title="HOLDER")
        held.add_requested_context(Verification)
        first = held.associate("127.0.0.1", scp.port, ae_title="GUARDED")
        assert first.is_established
        second = held.associate("127.0.0.1", scp.port, ae_title="GUARDED")
        assert second.is_rejected
        rejection = second.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x02, 0x03, 0x02)
        ok, _ = echo(scp.port, source="127.0.0.2")
        assert ok, "another host is not limited by the first one's associations"
        first.release()
        wait_until(
            lambda: scp.guard.counts()["associations"] == 0, 2, "the released association to stop counting"
        )
        ok, _ = echo(scp.port)
        assert ok, "a released association frees its host's place"
        refusals = scp.refusals(Refusal.TOO_MANY_ASSOCIATIONS_FROM_HOST, expect=1)
        assert len(refusals) == 1 and refusals[0]["calling_ae"] == "HOLDER"
        assert refusals[0]["action"] == "a-associate-rj"


def test_a_peer_that_releases_and_associates_again_at_once_finds_its_place_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pynetdicom frees nothing until after its A-RELEASE-RP is out; a modality that sends
    its next study at once got "local limit exceeded". Made certain here by an acceptor
    slow after its answer: the place must be free before the answer."""
    from pynetdicom.acse import ACSE

    answer = ACSE.send_release

    def slow_after_answer(self: ACSE, is_response: bool = False) -> None:
        answer(self, is_response)
        if is_response and self.assoc.is_acceptor:
            time.sleep(0.5)

    monkeypatch.setattr(ACSE, "send_release", slow_after_answer)
    with guarded_scp(max_associations=1) as scp:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(Verification)
        for _ in range(3):
            assoc = holder.associate("127.0.0.1", scp.port, ae_title="GUARDED")
            assert assoc.is_established, "the released association's place was still taken"
            assoc.release()
        assert scp.refusals(Refusal.TOO_MANY_ASSOCIATIONS) == []


def test_max_associations_counts_established_associations() -> None:
    with guarded_scp(max_associations=2) as scp:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(Verification)
        open_ = [holder.associate("127.0.0.1", scp.port, ae_title="GUARDED") for _ in range(2)]
        assert all(a.is_established for a in open_)
        third = holder.associate("127.0.0.1", scp.port, ae_title="GUARDED")
        assert third.is_rejected
        for assoc in open_:
            assoc.abort()
        wait_until(
            lambda: scp.guard.counts()["associations"] == 0, 2, "aborted associations to stop counting"
        )
        assert echo(scp.port)[0]
        assert len(scp.refusals(Refusal.TOO_MANY_ASSOCIATIONS, expect=1)) == 1


# -- TLS ------------------------------------------------------------------------------------


def test_tls_a_silent_client_holds_neither_the_listener_nor_a_place() -> None:
    """pynetdicom handshakes in its accept loop, with no timeout: one client that connects
    and says nothing stops every TLS association. Guarded, the handshake runs on the
    connection's first read, within the request deadline; a 4 GB header inside TLS is
    aborted like any other."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(server_context)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_context)
    with guarded_scp(ssl_context=server_context, association_request_seconds=1.5) as scp:
        silent = connect(scp.port)
        time.sleep(0.2)
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
        started = time.monotonic()
        assoc = ae.associate(
            "127.0.0.1", scp.port, ae_title="GUARDED", tls_args=(client_context, "localhost")
        )
        took = time.monotonic() - started
        assert assoc.is_established and took < 2.0, f"TLS association beside a silent client: {took:.1f} s"
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert closed_by_node(silent, 5), "the silent client is closed at the request deadline"
        silent.close()

        raw = connect(scp.port)
        tls = client_context.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(HUGE_HEADER)
        assert read_pdu(tls) == (A_ABORT, bytes([0, 0, 0x02, 0x06]))
        tls.close()
        kinds = sorted(r["refusal"] for r in scp.refusals(expect=2))
        assert kinds == [Refusal.PDU_TOO_LONG.value, Refusal.REQUEST_TIMEOUT.value]


# -- audit and log --------------------------------------------------------------------------


def test_refusals_beyond_the_audit_queue_are_counted_in_one_record() -> None:
    release = threading.Event()

    class SlowTrail(Trail):
        def record_many(self, entries: list[tuple[AuditEvent, dict[str, Any]]]) -> int:
            release.wait(10)
            return super().record_many(entries)

    trail = SlowTrail()
    audit = _RefusalAudit(trail, max_queued=5)  # type: ignore[arg-type]
    audit.submit(AuditEvent.ASSOCIATION_REJECTED, 4, refusal="first")  # type: ignore[arg-type]
    time.sleep(0.2)  # the writer holds the first; five more wait; four are counted
    for n in range(9):
        audit.submit(AuditEvent.ASSOCIATION_REJECTED, 4, refusal=f"r{n}")  # type: ignore[arg-type]
    release.set()
    assert audit.flush(10)
    reasons = [facts.get("reason") for _, facts in trail.rows]
    assert len(trail.rows) == 1 + 5 + 1
    assert reasons[-1] == "4 more refusals not itemised: the audit queue was full"


def test_repeated_refusals_log_once_per_host_and_kind(caplog: pytest.LogCaptureFixture) -> None:
    throttle = _LogThrottle(every=0.5)
    with caplog.at_level(logging.WARNING, logger="dicom_node.net.guard"):
        for _ in range(50):
            throttle.warning(("10.0.0.1", "pdu-too-long"), "refused")
        throttle.warning(("10.0.0.2", "pdu-too-long"), "refused")
        throttle.warning(("10.0.0.1", "request-timeout"), "refused")
        time.sleep(0.6)
        throttle.warning(("10.0.0.1", "pdu-too-long"), "refused")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused", "refused", "refused", "refused (49 more like it held back)"]
