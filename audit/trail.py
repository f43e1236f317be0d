"""The append-only, hash-chained audit log and its single entry point, ``record``.

Each row carries ``prev_hash`` and ``hash = sha256(prev_hash || canonical_json(row))``, so
editing, deleting or reordering a row breaks the chain. Appends from several threads and
processes are serialised by the database write lock (``BEGIN IMMEDIATE`` on SQLite,
``SELECT ... FOR UPDATE`` of the head elsewhere).
"""

from __future__ import annotations

import hashlib
import json
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
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.engine import make_url

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


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def chain_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    body = canonical_json({k: row[k] for k in HASHED_FIELDS})
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


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


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class AuditTrail:
    """The node's audit log. ``record()`` is the one call every call site uses.

    Parameters
    ----------
    url
        SQLAlchemy URL of the audit database (its own database, so the log can live on
        separate, more protected storage than the image index).
    actor
        Default actor written on each record (e.g. ``"serve@host:pid"``).
    """

    def __init__(self, url: str, actor: str | None = None) -> None:
        self.url = url
        self.actor = actor
        self._engine = _engine(url)
        self._is_sqlite = make_url(url).get_backend_name() == "sqlite"
        self._lock = threading.Lock()
        metadata.create_all(self._engine)

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
        with self._lock, self._engine.begin() as conn:
            head_query = select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc())
            if not self._is_sqlite:
                head_query = head_query.with_for_update()
            head = conn.execute(head_query.limit(1)).first()
            seq, prev_hash = (head[0], head[1]) if head else (0, GENESIS_HASH)
            for row in rows:
                seq += 1
                row["seq"] = seq
                row["prev_hash"] = prev_hash
                row["hash"] = prev_hash = chain_hash(prev_hash, row)
            conn.execute(insert(audit_events), rows)
        return int(seq)

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
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            yield conn

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
