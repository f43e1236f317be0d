"""The append-only, hash-chained audit log and its single entry point, ``record``.

Each row carries ``prev_hash`` and ``hash = sha256(prev_hash || canonical_json(row))``, so
editing, deleting or reordering a row breaks the chain. Appends from several threads and
processes are serialised by the database write lock (``BEGIN IMMEDIATE`` on SQLite, an
advisory lock on PostgreSQL). The database itself refuses UPDATE, DELETE and TRUNCATE of
the log (a trigger); on PostgreSQL the node may also connect as a role granted only SELECT
and INSERT on it (``deploy/postgres/roles.sql``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    inspect,
    or_,
    select,
)
from sqlalchemy.engine import make_url

from audit.engine import AUDIT_WRITERS, make_engine, make_read_only_engine
from audit.events import AuditEvent, Outcome

GENESIS_HASH = "0" * 64

metadata = MetaData()

audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", Float, nullable=False),
    Column("event", String(48), nullable=False, index=True),
    Column("outcome", Integer, nullable=False),
    Column("study_uid", String(64), index=True),
    Column("patient_id", String(64), index=True),
    Column("calling_ae", String(16)),
    Column("called_ae", String(16)),
    Column("peer_host", String(255)),
    Column("actor", String(128)),
    Column("facts", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

#: The columns covered by the hash, in order. ``hash`` itself is not.
HASHED_FIELDS = (
    "seq",
    "at",
    "event",
    "outcome",
    "study_uid",
    "patient_id",
    "calling_ae",
    "called_ae",
    "peer_host",
    "actor",
    "facts",
)


_PG_APPEND_ONLY = """
CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = 'the audit log is append-only: ' || TG_OP || ' refused';
END $$;
CREATE OR REPLACE TRIGGER audit_events_no_rewrite BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE OR REPLACE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
"""


def _protect_postgresql(engine: Engine) -> None:
    """Install the append-only triggers once (a role without DDL rights finds them there)."""
    with engine.begin() as conn:
        present = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'audit_events'::regclass "
            "AND tgname IN ('audit_events_no_rewrite', 'audit_events_no_truncate')"
        ).scalar_one()
        if present < 2:
            conn.exec_driver_sql(_PG_APPEND_ONLY)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def chain_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    body = canonical_json({k: row[k] for k in HASHED_FIELDS})
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :meth:`AuditTrail.verify`."""

    ok: bool
    records: int
    head_seq: int
    first_bad_seq: int | None
    problem: str | None
    checkpoints_checked: int = 0


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    at: float
    actor: str | None

    @property
    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))


class CheckpointError(ValueError):
    """A checkpoint line that cannot be read: it names the file and the line."""


class NoAuditLog(LookupError):
    """A database opened read-only holds no audit log (no ``audit_events`` table)."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_checkpoint(line: bytes | str) -> Checkpoint:
    """One checkpoint line, as :meth:`CheckpointFile.write` writes it.

    Raises ValueError saying what is wrong: a checkpoint is an external anchor, and one that
    was cut off or damaged cannot vouch for anything, so nothing in it is guessed.
    """
    try:
        d = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ValueError("not valid JSON (cut off or damaged)") from None
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    for key in ("seq", "hash", "at"):
        if key not in d:
            raise ValueError(f"{key!r} is missing")
    seq, digest, at, actor = d["seq"], d["hash"], d["at"], d.get("actor")
    if type(seq) is not int or seq < 1:
        raise ValueError(f"'seq' is not a record number: {_short(seq)}")
    if not isinstance(digest, str):
        raise ValueError(f"'hash' is not text: {_short(digest)}")
    if isinstance(at, bool) or not isinstance(at, int | float):
        raise ValueError(f"'at' is not a time: {_short(at)}")
    try:
        time.gmtime(at)
    except (OverflowError, OSError, ValueError):  # NaN, infinity, out of range
        raise ValueError(f"'at' is not a time: {_short(at)}") from None
    if actor is not None and not isinstance(actor, str):
        raise ValueError(f"'actor' is not text: {_short(actor)}")
    return Checkpoint(seq, digest, float(at), actor)


class CheckpointFile:
    """Chain heads written outside the database (JSON lines, append-only, fsync'd).

    Several processes append to the same file; each line is one ``write()`` under
    ``O_APPEND``, so lines never interleave.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, seq: int, digest: str, actor: str | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (
            canonical_json({"seq": seq, "hash": digest, "at": time.time(), "actor": actor}) + "\n"
        ).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[Checkpoint]:
        """Every checkpoint, oldest first; none while the file does not exist yet (a fresh
        node writes its first at record ``checkpoint_every`` or at its first shutdown).

        Raises :class:`CheckpointError` (file and line) for a line that cannot be read and
        OSError for a file that cannot be.
        """
        if not self.path.exists():
            return []
        points = []
        for number, line in enumerate(self.path.read_bytes().split(b"\n"), start=1):
            if line.strip():
                try:
                    points.append(parse_checkpoint(line))
                except ValueError as exc:
                    raise CheckpointError(
                        f"checkpoint file {self.path} line {number} cannot be read: {exc}"
                    ) from None
        return points

    def seqs(self) -> list[int]:
        return [p.seq for p in self.read()]

    def last(self) -> Checkpoint | None:
        """The newest checkpoint (None: none yet), read from the file's end: the file grows
        by a line every ``checkpoint_every`` records, for years, and a monitor asks often.
        Raises OSError or ValueError for a file or a last line that cannot be read."""
        if not self.path.exists():
            return None
        with self.path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [line for line in f.read().splitlines() if line.strip()]
        if not lines:
            return None
        return parse_checkpoint(lines[-1])


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: float
    event: str
    outcome: int
    study_uid: str | None
    patient_id: str | None
    calling_ae: str | None
    called_ae: str | None
    peer_host: str | None
    actor: str | None
    facts: dict[str, Any]
    prev_hash: str
    hash: str


class AuditTrail:
    """The node's audit log. ``record()`` is the one call every call site uses.

    Parameters
    ----------
    url
        SQLAlchemy URL of the audit database (its own database, so the log can live on
        separate, more protected storage than the image index).
    actor
        Default actor written on each record (e.g. ``"serve@host:pid"``).
    read_only
        Only read the log (:meth:`verify`, :meth:`search`, :meth:`events`): nothing is
        created or written, a missing SQLite file raises FileNotFoundError and a database
        without the log :class:`NoAuditLog`; :meth:`record` is refused. For a copy of the
        log handed to an auditor (``dicom-node audit verify --audit-db``).
    """

    def __init__(
        self,
        url: str,
        actor: str | None = None,
        *,
        checkpoint_file: Path | None = None,
        checkpoint_every: int = 100,
        read_only: bool = False,
    ) -> None:
        self.url = url
        self.actor = actor
        self.checkpoints = CheckpointFile(checkpoint_file) if checkpoint_file else None
        self.checkpoint_every = checkpoint_every
        self.read_only = read_only
        self._lock = threading.Lock()
        backend = make_url(url).get_backend_name()
        self._is_sqlite = backend == "sqlite"
        if read_only:
            self._engine = self._reader = make_read_only_engine(url)
            try:
                with self._reader.connect() as conn:
                    present = inspect(conn).has_table(audit_events.name)
            except BaseException:
                self._reader.dispose()
                raise
            if not present:
                self._reader.dispose()
                raise NoAuditLog(f"no {audit_events.name} table")
            return
        self._engine = make_engine(url, lock_key=AUDIT_WRITERS)
        self._reader = make_engine(url, begin="BEGIN")
        metadata.create_all(self._engine)
        if backend == "postgresql":
            _protect_postgresql(self._engine)
        if self._is_sqlite:
            # Defence in depth: the chain detects rewriting, these stop it happening by accident.
            with self._engine.begin() as conn:
                for action in ("UPDATE", "DELETE"):
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER IF NOT EXISTS audit_events_no_{action.lower()} BEFORE {action} "
                        "ON audit_events BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
                    )

    def _row(
        self,
        event: AuditEvent,
        outcome: Outcome,
        study_uid: str | None = None,
        patient_id: str | None = None,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        peer_host: str | None = None,
        actor: str | None = None,
        **facts: Any,
    ) -> dict[str, Any]:
        return {
            "at": time.time(),
            "event": AuditEvent(event).value,
            "outcome": int(outcome),
            "study_uid": study_uid,
            "patient_id": patient_id,
            "calling_ae": calling_ae,
            "called_ae": called_ae,
            "peer_host": peer_host,
            "actor": actor or self.actor,
            "facts": canonical_json(facts),
        }

    def _append(self, rows: list[dict[str, Any]]) -> int:
        """Chain and insert ``rows`` in one transaction; returns the last sequence number."""
        if self.read_only:
            raise PermissionError(f"the audit log {self._shown()} was opened read-only: nothing is recorded")
        with self._lock, self._engine.begin() as conn:
            # the engine's write lock is held from the first statement: no other appender
            # can read the same head
            head = conn.execute(
                select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc()).limit(1)
            ).first()
            seq, prev_hash = (head[0], head[1]) if head else (0, GENESIS_HASH)
            for row in rows:
                seq += 1
                row["seq"] = seq
                row["prev_hash"] = prev_hash
                row["hash"] = prev_hash = chain_hash(prev_hash, row)
            conn.execute(insert(audit_events), rows)
        if self.checkpoints is not None:
            first = seq - len(rows) + 1
            if seq // self.checkpoint_every != (first - 1) // self.checkpoint_every:
                self.checkpoints.write(seq, prev_hash, self.actor)
        return int(seq)

    def _shown(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def head(self) -> tuple[int, str]:
        """Sequence number and hash of the newest record (0 and the genesis hash if empty)."""
        with self._read() as conn:
            row = conn.execute(
                select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc()).limit(1)
            ).first()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)

    def checkpoint(self) -> tuple[int, str] | None:
        """Write the current chain head to the checkpoint file (at shutdown, on demand)."""
        if self.checkpoints is None:
            return None
        seq, digest = self.head()
        if seq:
            self.checkpoints.write(seq, digest, self.actor)
        return seq, digest

    def record(
        self,
        event: AuditEvent,
        outcome: Outcome = Outcome.SUCCESS,
        *,
        study_uid: str | None = None,
        patient_id: str | None = None,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        peer_host: str | None = None,
        actor: str | None = None,
        **facts: Any,
    ) -> int:
        """Append one event to the chain and return its sequence number.

        ``study_uid``, ``patient_id``, AE titles, ``peer_host`` and ``actor`` are indexed
        participants; every other keyword is a fact stored with the record.
        """
        return self._append(
            [
                self._row(
                    event,
                    outcome,
                    study_uid=study_uid,
                    patient_id=patient_id,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    peer_host=peer_host,
                    actor=actor,
                    **facts,
                )
            ]
        )

    def record_many(self, entries: list[tuple[AuditEvent, dict[str, Any]]]) -> int:
        """Append several events (each ``(event, keywords as for record)``) in one transaction."""
        if not entries:
            return 0
        rows = []
        for kind, kwargs in entries:
            kw = dict(kwargs)
            outcome = kw.pop("outcome_code", Outcome.SUCCESS)
            rows.append(self._row(kind, outcome, **kw))
        return self._append(rows)

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """A read-only connection that never takes the write lock (for exporters, forwarders)."""
        with self._reader.connect() as conn:
            yield conn

    _read = read_connection

    def search(
        self,
        *,
        patient_id: str | None = None,
        study_uid: str | None = None,
        since: float | None = None,
        until: float | None = None,
        events: list[str] | None = None,
        ae: str | None = None,
        limit: int | None = None,
        after: int | None = None,
    ) -> list[AuditRecord]:
        """Records matching every given filter, oldest first. ``ae`` matches calling or called AE;
        ``after``: only records after that sequence number (paging)."""
        if any("\x00" in text for text in (patient_id, study_uid, ae) if text):
            return []  # no record holds a NUL (and PostgreSQL cannot even compare one)
        query = select(audit_events).order_by(audit_events.c.seq)
        if patient_id is not None:
            query = query.where(audit_events.c.patient_id == patient_id)
        if study_uid is not None:
            query = query.where(audit_events.c.study_uid == study_uid)
        if since is not None:
            query = query.where(audit_events.c.at >= since)
        if until is not None:
            query = query.where(audit_events.c.at <= until)
        if events:
            query = query.where(audit_events.c.event.in_([AuditEvent(e).value for e in events]))
        if ae is not None:
            query = query.where(or_(audit_events.c.calling_ae == ae, audit_events.c.called_ae == ae))
        if after is not None:
            query = query.where(audit_events.c.seq > after)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        return [AuditRecord(**{**row, "facts": json.loads(row["facts"])}) for row in rows]

    def verify(self, checkpoint_file: Path | None = None) -> VerifyResult:
        """Walk the whole chain; then hold it against the external checkpoints.

        Detects an edited record (its hash no longer matches its content), a deleted one
        (a gap in the sequence), reordered records (``prev_hash`` no longer links) and a cut
        tail (a checkpoint names a record the log no longer has, or a different hash).
        """
        expected, prev_hash, count = 1, GENESIS_HASH, 0
        hashes_at: dict[int, str] = {}
        source = CheckpointFile(checkpoint_file) if checkpoint_file else self.checkpoints
        # Read once, before the walk (a checkpoint appended meanwhile names a record the walk
        # may not reach, and would read as a cut-off tail). A checkpoint that cannot be read
        # cannot vouch for anything: the log is then not shown intact. A configured file
        # that is not there yet holds none (a fresh node); a named one must be there.
        points: list[Checkpoint] = []
        unreadable = None
        try:
            if checkpoint_file is not None and not Path(checkpoint_file).exists():
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))  # named: must exist
            points = source.read() if source is not None else []
        except CheckpointError as exc:
            unreadable = str(exc)
        except OSError as exc:
            assert source is not None
            unreadable = f"checkpoint file {source.path} cannot be read: {exc.strerror or exc}"
        wanted = {p.seq for p in points}
        with self._read() as conn:
            rows = conn.execution_options(yield_per=5000).execute(
                select(audit_events).order_by(audit_events.c.seq)
            )
            for row in rows.mappings():
                seq = row["seq"]
                if seq != expected:
                    return VerifyResult(
                        False,
                        count,
                        expected - 1,
                        expected,
                        f"record {expected} is missing (the next record is {seq})",
                    )
                if row["prev_hash"] != prev_hash:
                    return VerifyResult(
                        False,
                        count,
                        seq,
                        seq,
                        f"record {seq} does not link to record {seq - 1} (prev_hash differs)",
                    )
                if chain_hash(prev_hash, dict(row)) != row["hash"]:
                    return VerifyResult(
                        False,
                        count,
                        seq,
                        seq,
                        f"record {seq} was altered (its content does not match its hash)",
                    )
                if seq in wanted:
                    hashes_at[seq] = row["hash"]
                prev_hash = row["hash"]
                expected += 1
                count += 1
        head = expected - 1
        if unreadable is not None:
            return VerifyResult(
                False, count, head, None, f"{unreadable}; the log cannot be held against its checkpoints"
            )
        checked = 0
        for point in points:
            checked += 1
            if point.seq > head:
                return VerifyResult(
                    False,
                    count,
                    head,
                    head + 1,
                    f"the log ends at record {head} but a checkpoint written {point.when} names record "
                    f"{point.seq}: records {head + 1}..{point.seq} were cut off",
                    checked,
                )
            if hashes_at.get(point.seq) != point.hash:
                return VerifyResult(
                    False,
                    count,
                    head,
                    point.seq,
                    f"record {point.seq} differs from the checkpoint written {point.when} "
                    "(the chain was rewritten)",
                    checked,
                )
        return VerifyResult(True, count, head, None, None, checked)

    def events(self, event: AuditEvent | None = None, study_uid: str | None = None) -> list[AuditRecord]:
        """Records in sequence order, optionally filtered (used by tests and reports)."""
        query = select(audit_events).order_by(audit_events.c.seq)
        if event is not None:
            query = query.where(audit_events.c.event == AuditEvent(event).value)
        if study_uid is not None:
            query = query.where(audit_events.c.study_uid == study_uid)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        return [AuditRecord(**{**row, "facts": json.loads(row["facts"])}) for row in rows]

    def dispose(self) -> None:
        self._engine.dispose()
        self._reader.dispose()
