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

Nagle's algorithm adds ~40 ms per small PDU on loopback and LANs; pynetdicom never sets
TCP_NODELAY, so every socket we open or accept gets it (``on_connection_open``).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import types
from typing import Any

import pydicom.config
import pynetdicom._config
import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

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


def tune_pynetdicom() -> None:
    """Apply the latency settings once per process."""
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
        # Send stored files straight from disk, without decoding and re-encoding them.
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
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
