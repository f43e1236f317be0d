"""The index writer: turns durably stored instances into index rows and audit records.

Runs on its own thread and writes in batches (one transaction per batch), so the C-STORE
round trip never waits on SQL. Items stay visible through :meth:`Indexer.pending` until
their rows are committed, so duplicate detection sees them. Nothing is dropped: a batch
that fails to commit is retried.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from audit import AuditEvent, AuditTrail
from dicom_node.db import schema as t
from dicom_node.db.engine import Database, inserted_id
from dicom_node.ingest.instance import InstanceFacts
from dicom_node.ingest.origin import OWN_OUTPUT

log = logging.getLogger(__name__)


@dataclass
class PendingInstance:
    """A stored instance whose index row is not written yet."""

    facts: InstanceFacts
    version: int
    transfer_syntax: str
    relative_path: str
    size: int
    data: bytes
    calling_ae: str | None
    peer_host: str | None
    received_at: float
    called_ae: str | None = None
    recovered: bool = False
    #: own-output / ai-output / prior (see :mod:`dicom_node.ingest.origin`); None: acquired.
    role: str | None = None
    #: What gave the role away (audited).
    role_reason: str | None = None
    _sha256: str | None = field(default=None, repr=False)

    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.data).hexdigest()
        return self._sha256


@dataclass
class _IdCache:
    """UID → row id; rows are never deleted, so ids never go stale."""

    patients: dict[tuple[str, str], int] = field(default_factory=dict)
    studies: dict[str, int] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)


def _patient_id(conn: Connection, cache: _IdCache, f: InstanceFacts) -> int:
    key = (f.patient_id, f.issuer_of_patient_id)
    if key not in cache.patients:
        found = conn.execute(
            select(t.patients.c.id).where(t.patients.c.patient_id == key[0], t.patients.c.issuer == key[1])
        ).scalar()
        if found is None:
            found = inserted_id(
                conn.execute(
                    insert(t.patients).values(
                        patient_id=key[0],
                        issuer=key[1],
                        patient_name=f.patient_name,
                        birth_date=f.patient_birth_date,
                        sex=f.patient_sex,
                    )
                )
            )
        cache.patients[key] = int(found)
    return cache.patients[key]


def _study_id(conn: Connection, cache: _IdCache, p: PendingInstance) -> int:
    f = p.facts
    if f.study_uid not in cache.studies:
        found = conn.execute(select(t.studies.c.id).where(t.studies.c.study_uid == f.study_uid)).scalar()
        if found is None:
            found = inserted_id(
                conn.execute(
                    insert(t.studies).values(
                        study_uid=f.study_uid,
                        patient_fk=_patient_id(conn, cache, f),
                        study_date=f.study_date,
                        accession_number=f.accession_number,
                        description=f.study_description,
                        source_ae=p.calling_ae,
                        first_received_at=p.received_at,
                        open_version=1,
                    )
                )
            )
        cache.studies[f.study_uid] = int(found)
    return cache.studies[f.study_uid]


def _series_id(conn: Connection, cache: _IdCache, f: InstanceFacts, study_fk: int) -> int:
    if f.series_uid not in cache.series:
        found = conn.execute(select(t.series.c.id).where(t.series.c.series_uid == f.series_uid)).scalar()
        if found is None:
            found = inserted_id(
                conn.execute(
                    insert(t.series).values(
                        series_uid=f.series_uid,
                        study_fk=study_fk,
                        modality=f.modality,
                        series_number=f.series_number,
                        description=f.series_description,
                        body_part=f.body_part,
                        frame_of_reference_uid=f.frame_of_reference_uid,
                    )
                )
            )
        cache.series[f.series_uid] = int(found)
    return cache.series[f.series_uid]


def index_batch(
    conn: Connection, batch: list[PendingInstance], cache: _IdCache, *, skip_held: bool = False
) -> None:
    """Insert the index rows of ``batch`` in the caller's (write) transaction.

    ``skip_held`` (after the insert failed on the unique SOP Instance UID and version): skip
    a file another process of the node indexed first (its reconciliation after a receiving
    process died, while this one still had the file in its batch), and duplicates within
    the batch: same SOP Instance UID and version, same file."""
    if skip_held:
        held = {
            (str(sop), int(version))
            for sop, version in conn.execute(
                select(t.instances.c.sop_uid, t.instances.c.version).where(
                    t.instances.c.sop_uid.in_({p.facts.sop_instance_uid for p in batch})
                )
            )
        }
        fresh: dict[tuple[str, int], PendingInstance] = {}
        for p in batch:
            fresh.setdefault((p.facts.sop_instance_uid, p.version), p)
        batch = [p for key, p in fresh.items() if key not in held]
        if not batch:
            return
    study_ids = {p.facts.study_uid: _study_id(conn, cache, p) for p in batch}
    open_versions = dict(
        conn.execute(
            select(t.studies.c.id, t.studies.c.open_version).where(t.studies.c.id.in_(study_ids.values()))
        ).all()
    )
    # Only the newest version of a SOP Instance UID is current — also within one batch.
    newest: dict[str, int] = {}
    for p in batch:
        newest[p.facts.sop_instance_uid] = max(p.version, newest.get(p.facts.sop_instance_uid, 0))
    superseded = [sop for sop, version in newest.items() if version > 1]
    if superseded:
        conn.execute(update(t.instances).where(t.instances.c.sop_uid.in_(superseded)).values(current=False))
    rows: list[dict[str, Any]] = []
    for p in batch:
        f = p.facts
        study_fk = study_ids[f.study_uid]
        rows.append(
            {
                "sop_uid": f.sop_instance_uid,
                "version": p.version,
                "current": p.version == newest[f.sop_instance_uid],
                "series_fk": _series_id(conn, cache, f, study_fk),
                "study_fk": study_fk,
                "study_version": open_versions[study_fk],
                "sop_class_uid": f.sop_class_uid,
                "transfer_syntax_uid": p.transfer_syntax,
                "instance_number": f.instance_number,
                "path": p.relative_path,
                "size": p.size,
                "sha256": p.sha256(),
                "calling_ae": p.calling_ae,
                "called_ae": p.called_ae,
                "peer_host": p.peer_host,
                "received_at": p.received_at,
                "tags": f.tags,
                "role": p.role,
            }
        )
    conn.execute(insert(t.instances), rows)
    # an instance of a study the retention rule removed brings the study back
    conn.execute(
        update(t.studies)
        .where(t.studies.c.id.in_(set(study_ids.values())), t.studies.c.purged_at.is_not(None))
        .values(purged_at=None)
    )


def _audit_entry(p: PendingInstance) -> tuple[AuditEvent, dict[str, Any]]:
    f = p.facts
    if p.role == OWN_OUTPUT:
        event = AuditEvent.OWN_OUTPUT_RETURNED
    else:
        event = AuditEvent.INSTANCE_STORED if p.version == 1 else AuditEvent.INSTANCE_NEW_VERSION
    facts: dict[str, Any] = {
        "study_uid": f.study_uid,
        "patient_id": f.patient_id,
        "calling_ae": p.calling_ae,
        "peer_host": p.peer_host,
        "sop_uid": f.sop_instance_uid,
        "series_uid": f.series_uid,
        "sha256": p.sha256(),
        "version": p.version,
    }
    if p.role is not None:
        facts["role"] = p.role
        facts["recognised_by"] = p.role_reason
    if p.recovered:
        facts["recovered"] = "re-indexed from disk after an unclean stop"
    return event, facts


def _transient(exc: BaseException) -> bool:
    """Whether a failed write may succeed if retried as it is: the database unreachable,
    locked or busy, a connection lost. Anything else (a value the database cannot hold, a
    bug) fails the same way every time."""
    return isinstance(exc, OperationalError | InterfaceError | DisconnectionError | SATimeoutError)


class Indexer:
    """Background writer of index rows and instance audit records."""

    def __init__(
        self,
        db: Database,
        audit: AuditTrail,
        on_indexed: Callable[[list[PendingInstance]], None] | None = None,
        *,
        max_batch: int = 256,
        gather_seconds: float = 0.25,
        quiet_seconds: float = 0.02,
        max_queue: int = 512,
    ) -> None:
        self.db = db
        self.audit = audit
        self.on_indexed = on_indexed
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self.quiet_seconds = quiet_seconds
        self.max_queue = max_queue
        self._queue: deque[PendingInstance] = deque()
        self._audits: deque[tuple[AuditEvent, dict[str, Any]]] = deque()
        self._by_sop: dict[str, PendingInstance] = {}
        self._busy = False
        self._stopping = False
        self._flush_requested = 0
        self._cond = threading.Condition()
        self._cache = _IdCache()
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self._thread.start()

    def submit(self, item: PendingInstance) -> None:
        with self._cond:
            while len(self._queue) >= self.max_queue and not self._stopping:
                self._cond.wait()  # backpressure: the sender waits rather than memory growing
            self._queue.append(item)
            self._by_sop[item.facts.sop_instance_uid] = item
            self._cond.notify_all()

    def submit_audit(self, event: AuditEvent, facts: dict[str, Any]) -> None:
        """Queue an audit record for the next batch (hot-path events with no index row)."""
        with self._cond:
            self._audits.append((event, facts))
            self._cond.notify_all()

    def pending(self, sop_uid: str) -> PendingInstance | None:
        with self._cond:
            return self._by_sop.get(sop_uid)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is committed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flush_requested += 1
            self._cond.notify_all()
            try:
                return self._wait_drained(deadline)
            finally:
                self._flush_requested -= 1

    def _wait_drained(self, deadline: float | None) -> bool:
        """Wait (holding the condition) until nothing is queued or being written."""
        while self._queue or self._audits or self._busy:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._cond.wait(remaining)
        return True

    def stop(self) -> None:
        self.flush()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._audits and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._queue and not self._audits:
                    return
            with self._cond:
                # Let a burst accumulate into one transaction (for at most gather_seconds),
                # unless someone is waiting, the batch is full, or the burst is over: nothing
                # new for quiet_seconds (then waiting longer only delays the rows).
                now = time.monotonic()
                deadline, quiet_until = now + self.gather_seconds, now + self.quiet_seconds
                seen = len(self._queue) + len(self._audits)
                while not self._flush_requested and not self._stopping and len(self._queue) < self.max_batch:
                    now = time.monotonic()
                    if (queued := len(self._queue) + len(self._audits)) != seen:
                        seen, quiet_until = queued, now + self.quiet_seconds
                    if now >= deadline or now >= quiet_until:
                        break
                    self._cond.wait(min(deadline, quiet_until) - now)
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
                audits = [self._audits.popleft() for _ in range(len(self._audits))]
                self._busy = True
            try:
                self._write(batch, audits)
            finally:
                with self._cond:
                    for p in batch:
                        if self._by_sop.get(p.facts.sop_instance_uid) is p:
                            del self._by_sop[p.facts.sop_instance_uid]
                    self._busy = False
                    self._cond.notify_all()

    def _write_each(self, batch: list[PendingInstance]) -> list[PendingInstance]:
        """Commit the rows one at a time; those committed (or indexed already).

        A row that fails on its own for a reason other than the database being away is set
        aside: logged with its file, which stays where it is (acknowledged bytes are never
        touched), so one instance that cannot be indexed cannot stop every later one.
        """
        written = []
        for p in batch:
            delay = 0.5
            while True:
                try:
                    with self.db.write() as conn:
                        index_batch(conn, [p], self._cache, skip_held=True)
                    written.append(p)
                    break
                except Exception as exc:
                    self._cache = _IdCache()
                    if _transient(exc):
                        log.exception("indexer: writing a row failed; retrying in %.1f s", delay)
                        time.sleep(delay)
                        delay = min(delay * 2, 30)
                        continue
                    log.error(
                        "indexer: instance %s (file %s in the data directory) cannot be indexed "
                        "and is set aside; its file is kept: %s: %s",
                        p.facts.sop_instance_uid,
                        p.relative_path,
                        type(exc).__name__,
                        exc,
                    )
                    break
        return written

    def _write(self, batch: list[PendingInstance], audits: list[tuple[AuditEvent, dict[str, Any]]]) -> None:
        for p in batch:
            p.sha256()  # hashing releases the GIL; done before taking the write lock
        delay = 0.5
        skip_held = False
        while batch:
            try:
                with self.db.write() as conn:
                    index_batch(conn, batch, self._cache, skip_held=skip_held)
                break
            except Exception as exc:
                self._cache = _IdCache()
                if isinstance(exc, IntegrityError) and not skip_held:
                    # a file another process indexed first (or twice in this batch): skip it
                    skip_held = True
                    log.warning("indexer: some of %d row(s) were indexed already; skipping those", len(batch))
                    continue
                if not _transient(exc):
                    # not the database being away: some row cannot be written, and retrying the
                    # batch would hold up every instance after it for ever
                    log.warning(
                        "indexer: writing %d row(s) failed (%s: %s); writing them one at a time",
                        len(batch),
                        type(exc).__name__,
                        exc,
                    )
                    batch = self._write_each(batch)
                    break
                log.exception("indexer: writing %d row(s) failed; retrying in %.1f s", len(batch), delay)
                time.sleep(delay)
                delay = min(delay * 2, 30)
        # Commit, then audit — by hand rather than with db.audited_write: the write is
        # retried until it commits, and an audit failure must not re-run it.
        try:
            self.audit.record_many([_audit_entry(p) for p in batch] + audits)
        except Exception:
            log.exception("indexer: audit records for %d instance(s) failed", len(batch))
        if self.on_indexed is not None:
            try:
                self.on_indexed(batch)
            except Exception:
                log.exception("indexer: on_indexed callback failed")
        for p in batch:
            p.data = b""  # release the bytes
