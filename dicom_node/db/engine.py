"""Database connections: one engine for writes, one for reads, schema upgraded by Alembic.

SQLite runs in WAL mode so readers never block the receiver. Write transactions begin with
``BEGIN IMMEDIATE``: the write lock is taken up front, so two processes (receiver and
workers) never deadlock upgrading a read lock (the engine setup is :mod:`audit.engine`,
shared with the audit log). ``synchronous=NORMAL`` keeps a commit durable across a process
crash (kill -9); the DICOM files themselves are fsync'd, and startup reconciliation
re-indexes any file whose index row a power loss took away.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, CursorResult, Select
from sqlalchemy.engine import make_url

from audit.engine import NODE_WRITERS, make_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def inserted_id(result: CursorResult[Any]) -> int:
    """The primary key of the row an ``insert()`` created."""
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


class Database:
    """The node's SQL database: ``write()`` and ``read()`` transactions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        self._compiled: dict[Select[Any], tuple[str, Any, dict[str, Any]]] = {}
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        pool, overflow = 20, 20
        self._writer = make_engine(
            url,
            "BEGIN IMMEDIATE",
            foreign_keys=True,
            lock_key=NODE_WRITERS,
            pool_size=pool,
            max_overflow=overflow,
        )
        self._reader = make_engine(url, "BEGIN", foreign_keys=True, pool_size=pool, max_overflow=overflow)
        # claims need no writers' turn on a server: they lock only the rows they take
        self._claimer = (
            self._writer if self.is_sqlite else make_engine(url, pool_size=pool, max_overflow=overflow)
        )

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that holds the write lock from its first statement."""
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def claim(self) -> Iterator[Connection]:
        """A write transaction for taking queued work (jobs, deliveries).

        On SQLite it is :meth:`write`. On PostgreSQL it skips the writers' lock: its query
        must lock the rows it takes with ``FOR UPDATE SKIP LOCKED`` and change them only by
        compare-and-set, so several workers on several hosts claim different rows at once
        instead of taking turns.
        """
        with self._claimer.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._reader.begin() as conn:
            yield conn

    def lookup(self, stmt: Select[Any], **params: Any) -> tuple[Any, ...] | None:
        """First row of a one-statement read, on this thread's long-lived connection.

        For hot paths (the C-STORE duplicate check): a pooled transaction costs ~90 µs
        of Python, this a few µs. ``stmt`` should be built once, with ``bindparam``s
        filled from ``params``; its compiled form is cached. The connection is in
        autocommit mode, so every call sees the latest committed data.
        """
        raw = getattr(self._local, "raw", None)
        if raw is None:
            raw = self._reader.raw_connection()
            if not self.is_sqlite:
                raw.driver_connection.autocommit = True  # type: ignore[union-attr]
            self._local.raw = raw
        compiled = self._compiled.get(stmt)
        if compiled is None:
            c = stmt.compile(dialect=self._reader.dialect)
            compiled = (str(c), c.positiontup, c.params)
            self._compiled[stmt] = compiled
        sql, order, defaults = compiled
        merged = {**defaults, **params}
        args: Any = tuple(merged[name] for name in order) if order is not None else merged
        cursor = raw.cursor()
        try:
            cursor.execute(sql, args)
            row = cursor.fetchone()
        finally:
            cursor.close()
        return tuple(row) if row is not None else None

    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with self._writer.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()

    def dispose(self) -> None:
        self._writer.dispose()
        self._reader.dispose()
        if self._claimer is not self._writer:
            self._claimer.dispose()
