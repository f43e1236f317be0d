"""Bounds on what a connection to the DICOM port may cost (issue 15, item 1): N hostile
sockets cost N sockets, never the service.

``guard_server`` is called on every listening server the receiver starts (plain and TLS),
right after ``AE.start_server``. The servers of one AE share one :class:`ConnectionGuard`,
so its counts span all listeners. A connection is *pending* from accept until its
A-ASSOCIATE-RQ has passed the checks below, then an *association* until it ends:

* **admission** (the server's ``verify_request``, in the accept loop): beyond
  ``max_pending_connections`` pending in all, or ``max_pending_per_host`` from one
  address, a new connection is closed at once. Pending connections never count against
  ``max_associations``.
* **the request deadline**: from accept, the whole A-ASSOCIATE-RQ must be in within
  ``association_request_seconds`` (the ARTIM timer, and the bounded reader's deadline),
  or the connection is closed. Until its first bytes arrive a connection is only a
  thread asleep in ``select``: pynetdicom's association and its DUL reactor (which wakes
  every millisecond while it waits) are created when there is something to read. Over
  TLS the handshake is part of it: the guard's accept never handshakes (pynetdicom's
  does, in the accept loop, with no timeout), so it runs on the connection's first read,
  in its own thread (``dicom_node.net.tls`` defers it the same way and reports
  certificate failures itself).
* **bounded PDUs** (:class:`dicom_node.net.tuning.PduBounds`): type and length are
  checked from the 6-byte header before anything is buffered — a P-DATA-TF longer than
  the ``max_pdu_bytes`` we announce (0: :data:`~dicom_node.net.tuning.PDATA_CEILING`), an
  A-ASSOCIATE-RQ over :data:`~dicom_node.net.tuning.MAX_ASSOCIATE_PDU`, an unknown type,
  or anything but a request before the association are answered with A-ABORT and a
  closed socket; each PDU must be complete within ``pdu_read_seconds`` (which also
  bounds a send to a peer that does not read).
* **association limits**, at the A-ASSOCIATE-RQ (``EVT_REQUESTED``): ``max_associations``
  in all and ``max_associations_per_host`` (0: off) per address, else A-ASSOCIATE-RJ
  (rejected-transient, local limit exceeded). pynetdicom's own check counts every
  acceptor thread, pending connections included, so its limit is moved out of the way
  (kept as a backstop at twice what the guard allows).
* **no copy per connection**: pynetdicom deep-copies the server's supported contexts for
  every accepted connection (with every storage class and transfer syntax: ~50 ms of CPU
  and ~1.3 MB before a byte is read) although negotiation only reads them; the guarded
  server's list is shared instead.
* **ending stops counting at once**: a released association (from the peer's A-RELEASE-RQ,
  before the node's answer), an aborted or refused one, or a
  connection gone before its request (``tuning`` wakes pynetdicom's acceptor thread,
  which otherwise waits ``acse_timeout``), frees its place when it ends, and its socket
  is closed with it.

Every refusal is audited — before an association as ``association-rejected``, on an
established one as ``security-alert`` with ``alert`` ``protocol-violation`` (facts
``refusal``, ``reason``, ``stage``, ``action``), written in batches by one thread, off the
accept loop — and logged at most once a minute per peer address and kind, with a count of
the lines held back.
"""

from __future__ import annotations

import functools
import logging
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import RequestHandler

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import ReceiverSection
from dicom_node.net.balance import HandedOff
from dicom_node.net.tuning import PDATA_CEILING, Closing, PduBounds, bound_reads

log = logging.getLogger(__name__)

#: How much longer than its request deadline pynetdicom's acceptor thread may wait: the
#: DUL closes the connection at the deadline and wakes it; this only covers a starved DUL.
_ACCEPTOR_BACKSTOP_SECONDS = 5.0
_REJECT_TRANSIENT, _SOURCE_PRESENTATION, _LOCAL_LIMIT_EXCEEDED = 0x02, 0x03, 0x02


class Refusal(StrEnum):
    """Why the guard turned a connection away (the ``refusal`` fact of its audit record)."""

    TOO_MANY_PENDING = "too-many-pending"
    TOO_MANY_PENDING_FROM_HOST = "too-many-pending-from-host"
    #: The TLS handshake or a TLS record failed (not: the peer closed).
    TLS_FAILED = "tls-failed"
    #: No A-ASSOCIATE-RQ in time (the connection stayed idle, or sent too slowly).
    REQUEST_TIMEOUT = "request-timeout"
    #: The connection ended before an association for another reason (an A-ASSOCIATE-RQ
    #: pynetdicom's upper layer refused, e.g. an unknown protocol version).
    REQUEST_FAILED = "request-failed"
    #: pynetdicom's negotiation answered A-ASSOCIATE-RJ (e.g. an application context name
    #: it does not know); the receiver's own rejections are audited by the receiver.
    REQUEST_REJECTED = "request-rejected"
    PDU_TIMEOUT = "pdu-timeout"
    PDU_TOO_LONG = "pdu-too-long"
    UNKNOWN_PDU_TYPE = "unknown-pdu-type"
    UNEXPECTED_PDU = "unexpected-pdu"
    MALFORMED_PDU = "malformed-pdu"
    TOO_MANY_ASSOCIATIONS = "too-many-associations"
    TOO_MANY_ASSOCIATIONS_FROM_HOST = "too-many-associations-from-host"


_FROM_READER = {
    Closing.REQUEST_TIMEOUT: Refusal.REQUEST_TIMEOUT,
    Closing.PDU_TIMEOUT: Refusal.PDU_TIMEOUT,
    Closing.PDU_TOO_LONG: Refusal.PDU_TOO_LONG,
    Closing.UNKNOWN_PDU_TYPE: Refusal.UNKNOWN_PDU_TYPE,
    Closing.UNEXPECTED_PDU: Refusal.UNEXPECTED_PDU,
    Closing.MALFORMED_PDU: Refusal.MALFORMED_PDU,
    Closing.TLS_FAILED: Refusal.TLS_FAILED,
}


class _Stage(StrEnum):
    PENDING = "pending"
    ASSOCIATION = "association"
    ENDED = "ended"


@dataclass(eq=False)
class _Connection:
    """One accepted connection: where it came from, when, and how far it got."""

    host: str
    accepted_at: float
    request_deadline: float
    stage: _Stage = _Stage.PENDING
    #: Settled: refused (and audited), closed by the peer, or judged by the receiver.
    settled: bool = False


class _RefusalAudit:
    """Refusals to the audit trail, written by one thread in batches: a flood of refused
    connections costs one transaction per batch and never the accept loop's time. Beyond
    ``max_queued`` waiting, refusals are counted and written as one record."""

    def __init__(self, trail: AuditTrail | None, max_queued: int = 10_000) -> None:
        self.trail = trail
        self.max_queued = max_queued
        self._queued: list[tuple[AuditEvent, dict[str, Any]]] = []
        self._dropped = 0
        self._writing = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, event: AuditEvent, outcome: Outcome, **facts: Any) -> None:
        if self.trail is None:
            return
        with self._cond:
            if len(self._queued) >= self.max_queued:
                self._dropped += 1
                return
            self._queued.append((event, {"outcome_code": outcome, **facts}))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="guard-audit", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted is written (True) or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued or self._dropped or self._writing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _run(self) -> None:
        assert self.trail is not None
        while True:
            with self._cond:
                while not self._queued and not self._dropped:
                    self._cond.wait()
                batch, self._queued = self._queued, []
                dropped, self._dropped = self._dropped, 0
                self._writing = True
            if dropped:
                reason = f"{dropped} more refusals not itemised: the audit queue was full"
                batch.append(
                    (
                        AuditEvent.ASSOCIATION_REJECTED,
                        {"outcome_code": Outcome.MINOR_FAILURE, "reason": reason},
                    )
                )
            try:
                self.trail.record_many(batch)
            except Exception:
                log.exception("writing %d connection refusals to the audit trail failed", len(batch))
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class _LogThrottle:
    """One log line per key (peer address and kind) per ``every`` seconds; the next says
    how many were held back."""

    def __init__(self, every: float = 60.0, max_keys: int = 4096) -> None:
        self.every = every
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str], list[float]] = {}  # key -> [last logged, held back]
        self._lock = threading.Lock()

    def warning(self, key: tuple[str, str], message: str) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.every:
                entry[1] += 1
                return
            held_back = int(entry[1]) if entry is not None else 0
            if entry is None and len(self._seen) >= self.max_keys:
                for old in sorted(self._seen, key=lambda k: self._seen[k][0])[: self.max_keys // 2]:
                    del self._seen[old]
            self._seen[key] = [now, 0]
        suffix = f" ({held_back} more like it held back)" if held_back else ""
        log.warning("%s%s", message, suffix)


class ConnectionGuard:
    """Admission, deadlines and counts for the connections of one AE's servers."""

    def __init__(self, limits: ReceiverSection, audit: AuditTrail | None = None) -> None:
        self.limits = limits
        self.audit = _RefusalAudit(audit)
        self.throttle = _LogThrottle()
        self.max_pdata = limits.max_pdu_bytes or PDATA_CEILING
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._associations: Counter[str] = Counter()
        self._admitted: dict[Any, _Connection] = {}
        #: Connections whose handler waits for their first bytes (closed when we stop).
        self._waiting: set[socket.socket] = set()
        self._stopping = False
        #: Told the number of open connections (pending + associations) whenever it
        #: changes, under the guard's lock (:class:`dicom_node.net.balance.Balancer`).
        self.on_count: Callable[[int], None] | None = None

    # -- counts -----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Pending connections and associations now (for tests and status pages)."""
        with self._lock:
            return {"pending": self._pending.total(), "associations": self._associations.total()}

    def open_connections(self) -> int:
        """Pending connections and associations, together."""
        with self._lock:
            return self._open()

    def _open(self) -> int:
        return self._pending.total() + self._associations.total()

    def _counted(self) -> None:
        """Under the lock: the count changed."""
        if self.on_count is not None:
            self.on_count(self._open())

    def _end(self, conn: _Connection) -> None:
        with self._lock:
            if conn.stage is _Stage.PENDING:
                self._pending[conn.host] -= 1
            elif conn.stage is _Stage.ASSOCIATION:
                self._associations[conn.host] -= 1
            conn.stage = _Stage.ENDED
            for counter in (self._pending, self._associations):
                if conn.host in counter and counter[conn.host] <= 0:
                    del counter[conn.host]
            self._counted()

    # -- the accept loop --------------------------------------------------------------------

    def admit(self, request: Any, client_address: Any) -> bool:
        """``verify_request``: count the connection as pending, or refuse it (False: closed)."""
        host = str(client_address[0])
        limits = self.limits
        now = time.monotonic()
        with self._lock:
            if self._stopping:
                return False
            if self._pending.total() >= limits.max_pending_connections:
                refusal, why = (
                    Refusal.TOO_MANY_PENDING,
                    f"{limits.max_pending_connections} connections are already waiting to associate",
                )
            elif self._pending[host] >= limits.max_pending_per_host:
                waiting = limits.max_pending_per_host
                refusal, why = (
                    Refusal.TOO_MANY_PENDING_FROM_HOST,
                    f"{waiting} connections from {host} are already waiting to associate",
                )
            else:
                self._pending[host] += 1
                deadline = now + limits.association_request_seconds
                self._admitted[request] = _Connection(host, now, deadline)
                self._counted()
                return True
        self._refused(host, refusal, why, stage="connection", action="closed")
        return False

    def claim(self, request: Any, client_address: Any) -> _Connection:
        """The connection ``admit`` counted (counted now if it came in before the guard)."""
        with self._lock:
            conn = self._admitted.pop(request, None)
            if conn is None:
                now = time.monotonic()
                host = str(client_address[0])
                conn = _Connection(host, now, now + self.limits.association_request_seconds)
                self._pending[host] += 1
                self._counted()
        return conn

    def forget(self, request: Any) -> None:
        """``shutdown_request``: a connection admitted but never handed to a handler."""
        with self._lock:
            conn = self._admitted.pop(request, None)
        if conn is not None:
            self._end(conn)

    # -- the connection's own threads -------------------------------------------------------

    def first_bytes(self, conn: _Connection, sock: socket.socket) -> bool:
        """Wait, without an association, until the connection sends something (True), or
        close it at the request deadline (False: refused)."""
        with self._lock:
            self._waiting.add(sock)
            stopping = self._stopping
        try:
            remaining = 0.0 if stopping else max(conn.request_deadline - time.monotonic(), 0.0)
            readable, _, _ = select.select([sock], [], [], remaining)
        except (OSError, ValueError):  # closed under us
            readable = [sock]  # let the association find out, as pynetdicom would
        finally:
            with self._lock:
                self._waiting.discard(sock)
                stopping = self._stopping
        if stopping:  # the server shuts down: not a refusal
            conn.settled = True
            self._end(conn)
        elif readable:
            return True
        else:
            why = f"no A-ASSOCIATE-RQ within {self.limits.association_request_seconds:g} s"
            self._settle_refused(conn, Refusal.REQUEST_TIMEOUT, why, stage="request", action="closed")
        _close(sock)
        return False

    def stop(self) -> None:
        """The servers shut down: close the connections still waiting for their first bytes
        now (``socketserver`` joins their threads), and admit no more."""
        with self._lock:
            self._stopping = True
            waiting = list(self._waiting)
        for sock in waiting:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def attach(self, assoc: Any, conn: _Connection, sock: Any) -> None:
        """Deadlines, bounded reads and counting for a new acceptor association (not started)."""
        limits = self.limits
        sock.settimeout(limits.pdu_read_seconds)  # bounds each send to a peer that does not read
        remaining = max(conn.request_deadline - time.monotonic(), 0.001)
        assoc.acse_timeout = remaining + _ACCEPTOR_BACKSTOP_SECONDS  # the acceptor's own wait
        assoc.dul.artim_timer.timeout = remaining  # the DUL closes the connection at the deadline
        bound_reads(
            assoc.dul,
            PduBounds(
                request_deadline=conn.request_deadline,
                pdu_seconds=limits.pdu_read_seconds,
                max_pdata=self.max_pdata,
                on_close=functools.partial(self._reader_closed, conn),
            ),
        )
        assoc.bind(evt.EVT_REQUESTED, self._on_requested, [conn])
        assoc.bind(evt.EVT_REJECTED, self._on_rejected, [conn])
        assoc.bind(evt.EVT_RELEASED, self._on_ended, [conn])
        assoc.bind(evt.EVT_ABORTED, self._on_ended, [conn])
        send_release = assoc.acse.send_release

        def free_then_answer(is_response: bool = False) -> None:
            # pynetdicom triggers EVT_RELEASED only after its A-RELEASE-RP is out: a peer that
            # associates again at once (a modality sending its next study) found its place
            # still taken and was refused "local limit exceeded". The peer asked to release:
            # nothing more comes on this association, so its place is free before the answer.
            if is_response:
                self._end(conn)
            send_release(is_response)

        assoc.acse.send_release = free_then_answer
        run = assoc.run

        def run_then_end() -> None:
            try:
                run()
            finally:
                self._thread_ended(assoc, conn)

        assoc.run = run_then_end

    def _on_requested(self, event: Any, conn: _Connection) -> None:
        """EVT_REQUESTED (after the receiver's policy): pending becomes an association."""
        assoc = event.assoc
        assoc.acse_timeout = self.limits.acse_timeout_seconds
        if assoc.is_rejected or assoc.is_aborted:  # the receiver's policy refused it
            conn.settled = True
            self._end(conn)
            return
        limits, host = self.limits, conn.host
        with self._lock:
            if self._associations.total() >= limits.max_associations:
                refusal, why = (
                    Refusal.TOO_MANY_ASSOCIATIONS,
                    f"{limits.max_associations} associations are open (max_associations)",
                )
            elif (
                limits.max_associations_per_host
                and self._associations[host] >= limits.max_associations_per_host
            ):
                refusal, why = (
                    Refusal.TOO_MANY_ASSOCIATIONS_FROM_HOST,
                    (
                        f"{limits.max_associations_per_host} associations from {host} are open"
                        " (max_associations_per_host)"
                    ),
                )
            else:
                if conn.stage is _Stage.PENDING:
                    self._pending[host] -= 1
                    if self._pending[host] <= 0:
                        del self._pending[host]
                    self._associations[host] += 1
                    conn.stage = _Stage.ASSOCIATION
                return
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        self._settle_refused(
            conn, refusal, why, stage="request", action="a-associate-rj", calling_ae=calling_ae
        )
        # As pynetdicom rejects when over its own limit.
        assoc.acse.send_reject(_REJECT_TRANSIENT, _SOURCE_PRESENTATION, _LOCAL_LIMIT_EXCEEDED)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_rejected(self, event: Any, conn: _Connection) -> None:
        """EVT_REJECTED: pynetdicom's negotiation refused the request (the guard's and the
        receiver's refusals are settled, and audited, already)."""
        if conn.settled:
            return
        assoc = event.assoc
        answer = assoc.acceptor.primitive
        why = (
            f"A-ASSOCIATE-RJ by negotiation (result 0x{answer.result:02X}, source"
            f" 0x{answer.result_source:02X}, reason 0x{answer.diagnostic:02X})"
        )
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        self._settle_refused(
            conn,
            Refusal.REQUEST_REJECTED,
            why,
            stage="request",
            action="a-associate-rj",
            calling_ae=calling_ae,
        )

    def _on_ended(self, event: Any, conn: _Connection) -> None:
        conn.settled = True
        self._end(conn)

    def _reader_closed(self, conn: _Connection, dul: Any, closing: Closing, detail: str) -> None:
        """``PduBounds.on_close``, in the DUL thread."""
        if closing is Closing.PEER_CLOSED:
            conn.settled = True
            return
        refusal = _FROM_READER[closing]
        if conn.stage is _Stage.ASSOCIATION:
            calling_ae = str(dul.assoc.requestor.ae_title).strip()
            conn.settled = True
            self._refused(
                conn.host,
                refusal,
                detail,
                stage="association",
                action="a-abort",
                calling_ae=calling_ae,
                event=AuditEvent.SECURITY_ALERT,
                alert="protocol-violation",
            )
        else:
            self._settle_refused(conn, refusal, detail, stage="request", action="a-abort")

    def _thread_ended(self, assoc: Any, conn: _Connection) -> None:
        """The acceptor thread ends: so do its DUL and socket, and its place is free."""
        dul = assoc.dul
        dul.kill_dul()
        if dul.socket is not None:
            dul.socket._shutdown_socket()
        if conn.stage is _Stage.PENDING and not conn.settled:
            if dul.artim_timer.expired:
                why = f"no A-ASSOCIATE-RQ within {self.limits.association_request_seconds:g} s"
                self._settle_refused(conn, Refusal.REQUEST_TIMEOUT, why, stage="request", action="closed")
            else:
                why = "the connection ended before an association (the upper layer refused the request)"
                self._settle_refused(conn, Refusal.REQUEST_FAILED, why, stage="request", action="closed")
        self._end(conn)

    # -- refusals ---------------------------------------------------------------------------

    def _settle_refused(self, conn: _Connection, refusal: Refusal, why: str, **facts: Any) -> None:
        conn.settled = True
        self._refused(conn.host, refusal, why, **facts)
        self._end(conn)

    def _refused(
        self,
        host: str,
        refusal: Refusal,
        why: str,
        *,
        stage: str,
        action: str,
        calling_ae: str | None = None,
        event: AuditEvent = AuditEvent.ASSOCIATION_REJECTED,
        **more: Any,
    ) -> None:
        who = f"{calling_ae}@{host}" if calling_ae else host
        self.throttle.warning((host, refusal.value), f"connection from {who} refused ({action}): {why}")
        self.audit.submit(
            event,
            Outcome.MINOR_FAILURE,
            peer_host=host,
            calling_ae=calling_ae,
            refusal=refusal.value,
            reason=why,
            stage=stage,
            action=action,
            **more,
        )


class _GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, with the guard's deadlines, bounded reads and counting."""

    def handle(self) -> None:
        guard: ConnectionGuard = self.server._dn_guard  # type: ignore[attr-defined]
        conn = guard.claim(self.request, self.client_address)
        try:
            if not guard.first_bytes(conn, self.request):
                return
            assoc = self._create_association()
            guard.attach(assoc, conn, self.request)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except BaseException:
            guard._end(conn)
            raise


class _SharedContexts(list[Any]):
    """A server's supported presentation contexts, handed to each new association as they
    are: pynetdicom's ``deepcopy`` of them returns the list itself (negotiation as acceptor
    only reads them)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedContexts:
        return self


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _accept_without_handshake(server: Any) -> Callable[[], tuple[socket.socket, Any]]:
    """``get_request`` that leaves the TLS handshake to the connection's thread (pynetdicom
    does it in the accept loop, with no timeout: one silent client stops the listener).

    With a balancer (``server._dn_balancer``, several receiving processes) a connection
    may go to a sibling process instead, before TLS and before admission: the sibling
    admits it (:func:`serve_handed`)."""

    def get_request() -> tuple[socket.socket, Any]:
        sock, address = server.socket.accept()
        balancer = getattr(server, "_dn_balancer", None)
        if balancer is not None and balancer.hand_off(server.server_address[1], sock):
            sock.close()  # the sibling holds its own copy
            raise HandedOff(f"connection from {address[0]} handed to a sibling process")
        return _unopened_tls(server, sock), address

    return get_request


def _unopened_tls(server: Any, sock: socket.socket) -> Any:
    """``sock`` wrapped for the server's TLS, if it has any, with no handshake yet."""
    if server.ssl_context:
        return server.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    return sock


def serve_handed(server: Any, sock: socket.socket) -> None:
    """Serve a connection a sibling process accepted on the same port, as ``server``'s
    accept loop would have (``socketserver.BaseServer._handle_request_noblock``)."""
    try:
        address = sock.getpeername()
    except OSError:  # gone already
        sock.close()
        return
    request = _unopened_tls(server, sock)
    if server.verify_request(request, address):
        try:
            server.process_request(request, address)
        except Exception:
            server.handle_error(request, address)
            server.shutdown_request(request)
    else:
        server.shutdown_request(request)


def _forgetting(server: Any, guard: ConnectionGuard) -> Callable[[Any], None]:
    shutdown_request = server.shutdown_request

    def shutdown_request_and_forget(request: Any) -> None:
        guard.forget(request)
        shutdown_request(request)

    return shutdown_request_and_forget


def _stopping(server: Any, guard: ConnectionGuard) -> Callable[[], None]:
    shutdown = server.shutdown

    def stop_then_shutdown() -> None:
        guard.stop()
        shutdown()
        guard.audit.flush()

    return stop_then_shutdown


def guard_server(server: Any, limits: ReceiverSection, audit: AuditTrail | None = None) -> ConnectionGuard:
    """Apply the connection limits of ``limits`` to ``server`` (a pynetdicom
    ``AssociationServer``, plain or TLS, just started); refusals go to ``audit``.

    Idempotent; the servers of one AE share one guard. Returns it.
    """
    existing: ConnectionGuard | None = getattr(server, "_dn_guard", None)
    if existing is not None:
        return existing
    ae = server.ae
    guard: ConnectionGuard | None = getattr(ae, "_dn_connection_guard", None)
    if guard is None:
        guard = ConnectionGuard(limits, audit)
        ae._dn_connection_guard = guard
        # pynetdicom counts every acceptor thread, pending connections included; the guard
        # counts associations itself. Twice what the guard allows stays as a backstop.
        ae.maximum_associations = 2 * (limits.max_associations + limits.max_pending_connections)
    server._dn_guard = guard
    server.contexts = _SharedContexts(server.contexts)
    server.RequestHandlerClass = _GuardedRequestHandler
    server.verify_request = guard.admit
    server.get_request = _accept_without_handshake(server)
    server.shutdown_request = _forgetting(server, guard)
    # The servers of one AE stop together (Receiver.stop): the first stops the guard.
    server.shutdown = _stopping(server, guard)
    # A burst of connections waits in the kernel's queue (socketserver listens with 5).
    server.socket.listen(min(limits.max_pending_connections, socket.SOMAXCONN))
    return guard
