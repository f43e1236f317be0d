"""Ships the audit chain to a syslog collector, in ``seq`` order, resuming from its state file.

:class:`AuditForwarder` reads the audit database in ``seq`` order and keeps a small state
file with the last shipped ``seq``; the database itself is the buffer while the collector
is unreachable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from audit.syslog.messages import (
    APP_NAME_MAX,
    DEFAULT_MSGID,
    HOSTNAME_MAX,
    MSGID_MAX,
    format_checkpoint,
    format_rfc5424,
    frame_rfc5425,
    header_field,
    json_payload,
)
from audit.trail import AuditRecord, AuditTrail, audit_events

# The package's one logger, named as before it was split into modules, so log filters and
# the ``%(name)s`` in log lines stay as they were.
log = logging.getLogger("audit.syslog")


class FrameSender(Protocol):
    """What :class:`AuditForwarder` needs from a transport."""

    def send(self, frames: list[bytes]) -> None:
        """Deliver the frames, in order, or raise ``OSError``."""


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
        self.app_name = header_field("APP-NAME", app_name, APP_NAME_MAX)
        self.hostname = header_field("HOSTNAME", hostname or socket.gethostname(), HOSTNAME_MAX)
        self.msgid = header_field("MSGID", msgid, MSGID_MAX)
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
