"""Latency settings for pynetdicom and the sockets it opens.

pynetdicom runs two threads per association that poll with ``time.sleep(0.001)``: the DUL
reactor (socket in, PDUs out) and the association reactor (DIMSE messages to handlers).
Every C-STORE crosses those polls several times, and the pollers wake 1,000 times a
second each, contending for the GIL with the handler (upstream: pydicom/pynetdicom#650).

We keep pynetdicom's code and turn its idle waits into event waits — only those 1 ms idle
sleeps, recognised by the thread that makes them:

* the DUL reactor waits in ``select()`` on its socket and on a wake-up pipe that is
  written whenever the association hands it a primitive to send (a response);
* the association reactor waits on its DIMSE message queue's condition, and passes the
  wake-up on when a message is there (a condition's notify wakes one waiter: taking it
  from the thread that waits for a response stalled that thread until its DIMSE timeout).

Both still wake at least every millisecond, so everything pynetdicom checks by polling
(timers, release, abort, shutdown) behaves as before. ``tune_pynetdicom`` is idempotent.

A received P-DATA-TF goes straight to the DIMSE layer when the association is in data
transfer with nothing queued before it: what the state machine does with it then (DT-2),
without two queues and the dispatch between (every 512×512 slice arrives in about six).

Two per-message costs go: pynetdicom's "standard" log handlers, which format a summary of
every PDU and DIMSE message whatever the log level, are not bound (the PHI filter withholds
library text anyway), and a plain successful C-STORE-RSP is encoded without pydicom
(:mod:`dicom_node.net.fastpath`).

Nagle's algorithm adds ~40 ms per small PDU on loopback and LANs; pynetdicom never sets
TCP_NODELAY, so every socket we open or accept gets it (``on_connection_open``).

Two hooks bound what a connection may cost (the policy is :mod:`dicom_node.net.guard`):

* **bounded PDU reads.** pynetdicom reads a PDU with ``recv(length)`` straight from its
  6-byte header, with no deadline and no limit: a header declaring 4 GB holds the reader
  forever and buffers whatever follows. A DUL given :class:`PduBounds` (``bound_reads``)
  reads instead with a deadline (the A-ASSOCIATE-RQ's, then one per PDU), checks type and
  length from the header before buffering anything, grows its buffer only as bytes arrive,
  and answers a violation with an A-ABORT and a closed socket at once, reporting it to
  ``PduBounds.on_close``. DULs without bounds (our own associations as requestor) read as
  pynetdicom does.
* **an acceptor whose connection ends before its A-ASSOCIATE-RQ is released at once.**
  pynetdicom's acceptor thread waits ``acse_timeout`` for the request even when the
  connection is already gone (peer closed, ARTIM expired, refused), and counts as an
  association all that time. When the DUL thread ends first, it hands the waiting thread
  ``None``, which is what that wait returns on timeout.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pydicom.config
import pynetdicom._config
import pynetdicom.association
import pynetdicom.dul
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.utils import validate_uid

from dicom_node.net import fastpath

log = logging.getLogger(__name__)

_IDLE_POLL = 0.001  # the sleep pynetdicom uses when it has nothing to do
_real_sleep = time.sleep
_applied = False
_lock = threading.Lock()


def _wake_pipe(dul: Any) -> tuple[int, int]:
    pipe = getattr(dul, "_dn_wake", None)
    if pipe is None:
        with _lock:
            pipe = getattr(dul, "_dn_wake", None)
            if pipe is None:
                r, w = os.pipe()
                os.set_blocking(r, False)
                os.set_blocking(w, False)
                pipe = (r, w)
                dul._dn_wake = pipe
    return pipe


def _close_wake_pipe(dul: Any) -> None:
    pipe = getattr(dul, "_dn_wake", None)
    if pipe is not None:
        dul._dn_wake = None
        for fd in pipe:
            try:
                os.close(fd)
            except OSError:
                pass


def _dul_idle(dul: Any, timeout: float) -> None:
    r, _ = _wake_pipe(dul)
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    waitables: list[Any] = [r]
    if sock is not None and sock.fileno() >= 0:
        waitables.append(sock)
    try:
        ready, _, _ = select.select(waitables, [], [], timeout)
    except (OSError, ValueError):  # socket closed under us: let pynetdicom notice
        return
    if r in ready:
        try:
            while os.read(r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass


def _association_idle(assoc: Any, timeout: float) -> None:
    dimse = getattr(assoc, "dimse", None)
    queue = getattr(dimse, "msg_queue", None)
    if queue is None:
        _real_sleep(timeout)
        return
    with queue.not_empty:
        if not queue.queue:
            queue.not_empty.wait(timeout)
        if queue.queue:
            # Queue.put notifies ONE waiter. When that was us, the thread blocked in
            # dimse.get_msg (an SCU waiting for its C-STORE response) would sleep until
            # its DIMSE timeout while the network idle timer aborted the association:
            # hand the wake-up on.
            queue.not_empty.notify()


_original_get_msg = DIMSEServiceProvider.get_msg


def _get_msg(self: Any, block: bool = False) -> Any:
    """pynetdicom's ``get_msg``, except that an association's own reactor takes nothing
    while a ``send_*()`` call holds the reactor paused.

    pynetdicom pauses the reactor for a call (``send_c_store`` and the like) by clearing
    ``_reactor_checkpoint`` and waiting until ``_is_paused`` is true. Right after the
    previous call set the checkpoint, ``_is_paused`` is still true until the reactor thread
    wakes: a call that follows at once finds it true, sends, and the reactor, waking late,
    takes the response off the queue ("Received unexpected C-STORE service message") while
    the call waits for it until its DIMSE timeout. The reactor does nothing else with a
    message, so it is left on the queue for the call; the reactor goes round and pauses.
    """
    if not block:
        assoc: Any = self._assoc
        reactor: Any = threading.current_thread()
        if reactor is assoc and not reactor._reactor_checkpoint.is_set():
            return None, None
    return _original_get_msg(self, block)


def _sleep(seconds: float) -> None:
    if seconds == _IDLE_POLL:
        current = threading.current_thread()
        if isinstance(current, DULServiceProvider):
            _dul_idle(current, seconds)
            return
        if isinstance(current, Association):
            _association_idle(current, seconds)
            return
    _real_sleep(seconds)


_original_send_pdu = DULServiceProvider.send_pdu


def _send_pdu(self: Any, primitive: Any) -> None:
    _original_send_pdu(self, primitive)
    pipe = getattr(self, "_dn_wake", None)
    if pipe is not None:
        try:
            os.write(pipe[1], b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full: the DUL is awake anyway


_original_run_reactor = DULServiceProvider.run_reactor


def _run_reactor(self: Any) -> None:
    try:
        _original_run_reactor(self)
    finally:
        _close_wake_pipe(self)
        _release_waiting_acceptor(self)


def _release_waiting_acceptor(dul: Any) -> None:
    """The DUL thread ends: an acceptor still waiting for the A-ASSOCIATE-RQ will never
    get it. Hand it what its wait returns on timeout (it then closes and ends) instead of
    letting it wait out ``acse_timeout``, counted as an association all the while."""
    assoc = dul.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None and dul.to_user_queue.empty():
        dul.to_user_queue.put(None)


# -- bounded PDU reads ----------------------------------------------------------------------

#: The largest A-ASSOCIATE-RQ/-AC accepted (all storage classes with every transfer syntax
#: and a user identity stay well below it).
MAX_ASSOCIATE_PDU = 1024 * 1024
#: The largest P-DATA-TF accepted when we announce no maximum (max_pdu_bytes = 0).
PDATA_CEILING = 64 * 1024 * 1024
#: A-ASSOCIATE-RJ, A-RELEASE-RQ/-RP and A-ABORT carry 4 bytes; some slack, no more.
_SHORT_PDU_LIMIT = 1024
_PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
_RECV_CHUNK = 256 * 1024
_ABORT_SEND_SECONDS = 1.0


class Closing(StrEnum):
    """Why the bounded reader ended a connection: the peer did, or a refusal."""

    #: The peer closed the connection (or sent A-ABORT before its request): not a refusal.
    PEER_CLOSED = "peer-closed"
    #: The A-ASSOCIATE-RQ was not complete by its deadline.
    REQUEST_TIMEOUT = "request-timeout"
    #: A PDU, once begun, was not complete within ``pdu_seconds``.
    PDU_TIMEOUT = "pdu-timeout"
    #: Longer than announced (P-DATA-TF) or than any sane request.
    PDU_TOO_LONG = "pdu-too-long"
    UNKNOWN_PDU_TYPE = "unknown-pdu-type"
    #: Anything but an A-ASSOCIATE-RQ (or A-ABORT) before the association.
    UNEXPECTED_PDU = "unexpected-pdu"
    #: A PDU that does not decode.
    MALFORMED_PDU = "malformed-pdu"
    #: The TLS handshake (run on the first read) or a TLS record failed.
    TLS_FAILED = "tls-failed"


#: PS3.8 9.3.8 A-ABORT reason/diag. (source: service provider) per refusal.
_ABORT_REASON = {
    Closing.REQUEST_TIMEOUT: 0x00,  # reason not specified
    Closing.PDU_TIMEOUT: 0x00,
    Closing.UNKNOWN_PDU_TYPE: 0x01,  # unrecognized PDU
    Closing.UNEXPECTED_PDU: 0x02,  # unexpected PDU
    Closing.PDU_TOO_LONG: 0x06,  # invalid PDU parameter value
    Closing.MALFORMED_PDU: 0x06,
    Closing.TLS_FAILED: 0x00,
}


def _no_report(dul: Any, closing: Closing, detail: str) -> None:
    return None


@dataclass(frozen=True)
class PduBounds:
    """What one accepted connection may send, and whom to tell when it is closed for it.

    Deadlines are ``time.monotonic()`` values.
    """

    #: The A-ASSOCIATE-RQ must be complete by then (the connection's ARTIM deadline).
    request_deadline: float
    #: A PDU must be complete this many seconds after the reader starts on it.
    pdu_seconds: float
    #: The longest P-DATA-TF accepted: the maximum length we announced.
    max_pdata: int
    #: Called in the DUL thread with (dul, why, detail) after the reader closed the
    #: connection, or saw the peer close it.
    on_close: Callable[[Any, Closing, str], None] = _no_report
    max_associate: int = MAX_ASSOCIATE_PDU


def bound_reads(dul: DULServiceProvider, bounds: PduBounds) -> None:
    """Read this DUL's PDUs within ``bounds`` (before its thread starts)."""
    dul._dn_bounds = bounds  # type: ignore[attr-defined]


class _Late(Exception):
    pass


def _receive(sock: socket.socket, count: int, deadline: float) -> bytearray:
    """Up to ``count`` bytes by ``deadline`` (fewer: the peer closed). Raises _Late.

    Read straight into one buffer of the announced length (``recv_into``): a 512² CT
    data set is read without the copy per chunk and the regrowing buffer of ``recv``
    (0.16 against 0.24 ms per 525 KB here)."""
    data = bytearray(count)
    view = memoryview(data)
    got = 0
    previous = sock.gettimeout()
    try:
        while got < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Late
            sock.settimeout(remaining)
            try:
                n = sock.recv_into(view[got:], min(count - got, _RECV_CHUNK))
            except TimeoutError:
                continue
            if not n:
                break
            got += n
    finally:
        view.release()
        try:
            sock.settimeout(previous)
        except OSError:
            pass
    if got < count:
        del data[got:]
    return data


def _check_header(
    pdu_type: int, length: int, awaiting_request: bool, bounds: PduBounds
) -> tuple[Closing, str] | None:
    name = _PDU_NAMES.get(pdu_type)
    if name is None:
        return Closing.UNKNOWN_PDU_TYPE, f"unknown PDU type 0x{pdu_type:02X}"
    if awaiting_request and pdu_type not in (0x01, 0x07):
        return Closing.UNEXPECTED_PDU, f"{name} before an A-ASSOCIATE-RQ"
    if pdu_type == 0x04:
        limit = bounds.max_pdata
    elif pdu_type in (0x01, 0x02):
        limit = bounds.max_associate
    else:
        limit = _SHORT_PDU_LIMIT
    if length > limit:
        return Closing.PDU_TOO_LONG, f"{name} of {length} bytes, longer than {limit}"
    return None


def _report(dul: Any, bounds: PduBounds, closing: Closing, detail: str) -> None:
    try:
        bounds.on_close(dul, closing, detail)
    except Exception:  # the policy's bug must not take the DUL reactor down with it
        log.exception("reporting a closed connection failed")


def _refuse(dul: Any, bounds: PduBounds, closing: Closing, detail: str) -> None:
    """A-ABORT (service provider) and close: the state machine sees the connection closed.
    Reported first: what the peer sees has been recorded."""
    _report(dul, bounds, closing, detail)
    sock = dul.socket.socket
    abort = A_ABORT_RQ()
    abort.source = 0x02
    abort.reason_diagnostic = _ABORT_REASON[closing]
    try:
        sock.settimeout(_ABORT_SEND_SECONDS)
        sock.sendall(abort.encode())
    except OSError:
        pass
    dul.socket.close()  # Evt17: Sta2 -> Sta1, or A-P-ABORT to an established association


def _peer_closed(dul: Any, bounds: PduBounds, detail: str) -> None:
    _report(dul, bounds, Closing.PEER_CLOSED, detail)
    dul.event_queue.put("Evt17")


def _read_bounded(dul: Any, bounds: PduBounds) -> None:
    """pynetdicom's ``_read_pdu_data`` within ``bounds``: same events, same queues."""
    sock = dul.socket.socket
    # Sta1: the first read can come before the state machine has taken the connection
    # (Evt5, already queued) — an acceptor's DUL is never in Sta1 otherwise while reading.
    awaiting_request = dul.state_machine.current_state in ("Sta1", "Sta2")
    deadline = time.monotonic() + bounds.pdu_seconds
    late = Closing.PDU_TIMEOUT
    if awaiting_request and bounds.request_deadline < deadline:
        deadline, late = bounds.request_deadline, Closing.REQUEST_TIMEOUT
    try:
        header = _receive(sock, 6, deadline)
        if len(header) < 6:
            _peer_closed(dul, bounds, "connection closed")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        refusal = _check_header(pdu_type, length, awaiting_request, bounds)
        if refusal is not None:
            _refuse(dul, bounds, *refusal)
            return
        body = _receive(sock, length, deadline)
    except _Late:
        what = "A-ASSOCIATE-RQ" if late is Closing.REQUEST_TIMEOUT else "PDU"
        _refuse(dul, bounds, late, f"{what} not complete in time")
        return
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        _peer_closed(dul, bounds, "connection closed during TLS")
        return
    except ssl.SSLError as exc:
        _refuse(dul, bounds, Closing.TLS_FAILED, f"TLS failed: {exc.reason or type(exc).__name__}")
        return
    except OSError as exc:  # reset by the peer, or closed under us
        _peer_closed(dul, bounds, f"connection lost ({type(exc).__name__})")
        return
    if len(body) < length:
        _peer_closed(dul, bounds, f"connection closed {len(body)} bytes into a {length}-byte PDU")
        return
    if awaiting_request and pdu_type == 0x07:
        _report(dul, bounds, Closing.PEER_CLOSED, "A-ABORT before an A-ASSOCIATE-RQ")
    try:
        if pdu_type == 0x04 and not fastpath.wants_raw_pdus(dul.assoc):
            pdu, event = fastpath.p_data_tf(body), "Evt10"
        else:
            pdu, event = dul._decode_pdu(header + body)
        if pdu_type == 0x01 and awaiting_request:
            # AE-6 converts it inside the state machine, where a failure stops the DUL
            # thread and leaves the socket open: find out here.
            problem = request_problem(pdu.to_primitive())
            if problem is not None:
                _refuse(dul, bounds, Closing.MALFORMED_PDU, f"A-ASSOCIATE-RQ {problem}")
                return
    except Exception as exc:
        detail = f"{_PDU_NAMES[pdu_type]} does not decode ({type(exc).__name__})"
        _refuse(dul, bounds, Closing.MALFORMED_PDU, detail)
        return
    if event == "Evt10" and _straight_to_dimse(dul):
        # What Sta6 + Evt10 does (DT-2: the P-DATA indication to DIMSE, stay in Sta6),
        # without the queues and the state machine's dispatch between.
        dul.assoc.dimse.receive_primitive(pdu.to_primitive())
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


#: A P-DATA-TF PDV item takes 6 bytes before its first byte of data (PS3.8 9.3.5.1).
_PDV_OVERHEAD = 6


def request_problem(primitive: Any) -> str | None:
    """What makes a decoded A-ASSOCIATE-RQ unusable, or None.

    pynetdicom decodes these and fails later, inside its threads: a presentation context
    without an abstract syntax or a transfer syntax raised in the acceptor's negotiation
    (the connection closed with no answer), and without a Maximum Length item, or one too
    small for a PDV, every answer failed to encode (PS3.8 9.3.2: the User Information item
    and its Maximum Length sub-item are mandatory).
    """
    for context in primitive.presentation_context_definition_list or ():
        if not context.abstract_syntax:
            return f"presentation context {context.context_id} has no abstract syntax"
        if not context.transfer_syntax:
            return f"presentation context {context.context_id} has no transfer syntax"
    length = primitive.maximum_length_received
    if length is None:
        return "has no Maximum Length (User Information) item"
    if 0 < length <= _PDV_OVERHEAD:
        return f"Maximum Length {length} is too small for any data"
    return None


def _straight_to_dimse(dul: Any) -> bool:
    """A received P-DATA-TF may go to the DIMSE layer at once: the association is in data
    transfer (Sta6), no earlier event is waiting (order kept), and nobody listens for the
    state machine's transitions (``EVT_FSM_TRANSITION`` would not fire for it)."""
    return (
        dul.state_machine.current_state == "Sta6"
        and dul.event_queue.empty()
        and not dul.assoc.get_handlers(evt.EVT_FSM_TRANSITION)
    )


_original_read_pdu_data = DULServiceProvider._read_pdu_data


def _read_pdu_data(self: Any) -> None:
    bounds = getattr(self, "_dn_bounds", None)
    if bounds is None:
        _original_read_pdu_data(self)
    else:
        _read_bounded(self, bounds)


#: Transfer syntax UIDs seen to pass every check of ``add_transfer_syntax`` (valid, and a
#: transfer syntax or a private UID): negotiating an association adds thousands of them
#: (every requested context against every supported one), each checked by regular
#: expressions: a dcmtk storescu association cost the node 28 ms of CPU, 23 ms with this.
#: Bounded: a peer that proposes endless distinct UIDs gets them checked as before.
_CHECKED_SYNTAXES: dict[str, UID] = {}
_CHECKED_SYNTAXES_MAX = 1024
_original_add_transfer_syntax = PresentationContext.add_transfer_syntax


def _add_transfer_syntax(self: Any, syntax: Any) -> None:
    """pynetdicom's ``add_transfer_syntax``, without re-checking a UID that passed before."""
    if type(syntax) is str or type(syntax) is UID:
        checked = _CHECKED_SYNTAXES.get(syntax)
        if checked is not None:
            if checked not in self._transfer_syntax:
                self._transfer_syntax.append(checked)
            return
    _original_add_transfer_syntax(self, syntax)
    if (
        (type(syntax) is str or type(syntax) is UID)
        and len(_CHECKED_SYNTAXES) < _CHECKED_SYNTAXES_MAX
        and syntax in self._transfer_syntax
    ):
        uid = UID(syntax)
        if uid.is_valid and validate_uid(uid) and (uid.is_transfer_syntax or uid.is_private):
            _CHECKED_SYNTAXES[str(syntax)] = uid


def tune_pynetdicom() -> None:
    """Apply the latency settings and the connection hooks once per process."""
    global _applied
    with _lock:
        if _applied:
            return
        shim = types.ModuleType("time")
        shim.__dict__.update({k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
        shim.sleep = _sleep  # type: ignore[attr-defined]
        pynetdicom.association.time = shim
        pynetdicom.dul.time = shim
        DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = _run_reactor  # type: ignore[method-assign]
        DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
        PresentationContext.add_transfer_syntax = _add_transfer_syntax  # type: ignore[method-assign]
        DIMSEServiceProvider.get_msg = _get_msg  # type: ignore[method-assign]
        # Send stored files straight from disk, without decoding and re-encoding them.
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
        # pynetdicom's "standard" handlers format a debug summary of every PDU and DIMSE
        # message whatever the log level (≈ 8 % of a C-STORE round trip). Its DEBUG output
        # never reaches the node's log anyway: the PHI filter withholds library text.
        pynetdicom._config.LOG_HANDLER_LEVEL = "none"
        fastpath.install()
        # Reading what a peer sent must not stop on a non-conformant value (the receiver
        # quarantines what it cannot use; a warning per odd value is noise in the log).
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        _applied = True


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket


def on_connection_open(event: Any) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY on the association's socket."""
    dul_socket = getattr(event.assoc.dul, "socket", None)
    set_nodelay(getattr(dul_socket, "socket", None))
