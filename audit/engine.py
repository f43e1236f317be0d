"""The project's one SQLAlchemy engine setup: SQLite (the embedded default) or PostgreSQL.

SQLite runs in WAL mode, so readers never block the writer, with ``synchronous=NORMAL`` (a
commit survives a process crash) and a 60 s busy timeout. The driver's own transaction
handling is switched off and every transaction starts with the ``begin`` statement instead:
``BEGIN IMMEDIATE`` takes the write lock up front, so two processes never deadlock upgrading a
read lock (and a read-then-insert, such as appending to the audit chain, is one atomic step);
a plain ``BEGIN`` suits readers, which then never hold up a writer.

PostgreSQL (``postgresql+psycopg://``, the ``postgres`` extra) keeps the same promise: a
writer's transaction starts by taking a transaction-level advisory lock (``lock_key``), so
writers to one database take turns exactly as they do on SQLite and every read-then-write
the node does is atomic; readers take no lock and see the last committed state. The lock is
released at commit or rollback, and by the server when a connection dies (a killed process
never leaves it held). Work that many processes claim at once (jobs, deliveries) may use a
lock-free writer instead (``lock_key=None``) and ``SELECT ... FOR UPDATE SKIP LOCKED``.

Both the audit trail and the node's own database use it; it lives here because ``audit`` is
the bottom layer and imports no other project folder. :func:`make_read_only_engine` is for
reading a database someone handed over (``audit verify --audit-db``): it writes nothing.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

#: The advisory locks writers take on PostgreSQL: one for the node's database, one for the
#: audit log (distinct, so the two may share a database without waiting on each other).
NODE_WRITERS = 0x64636E01
AUDIT_WRITERS = 0x64636E02


def make_engine(
    url: str,
    begin: str = "BEGIN IMMEDIATE",
    *,
    foreign_keys: bool = False,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    lock_key: int | None = None,
) -> Engine:
    """An engine for ``url``, set up as the module docstring describes when it is SQLite.

    Parameters
    ----------
    url
        SQLAlchemy URL. For an SQLite file, its directory is created if missing.
    begin
        The statement every transaction starts with (SQLite only): ``"BEGIN IMMEDIATE"`` for
        writers, ``"BEGIN"`` for readers.
    foreign_keys
        Also enforce foreign keys (``PRAGMA foreign_keys=ON``; SQLite only).
    pool_size, max_overflow
        Connection pool limits; ``None`` keeps SQLAlchemy's default.
    lock_key
        PostgreSQL only: the advisory lock every transaction of this engine takes first
        (``pg_advisory_xact_lock``), for an engine of writers; ``None`` for readers.

    Returns
    -------
    Engine
        For SQLite, the engine described above. For PostgreSQL, an engine with
        ``pool_pre_ping=True`` whose transactions take ``lock_key`` first. Any other
        database gets a plain engine.
    """
    parsed = make_url(url)
    pool: dict[str, int] = {}
    if pool_size is not None:
        pool["pool_size"] = pool_size
    if max_overflow is not None:
        pool["max_overflow"] = max_overflow
    if parsed.get_backend_name() != "sqlite":
        server_engine = create_engine(url, pool_pre_ping=True, **pool)
        if lock_key is not None and parsed.get_backend_name() == "postgresql":
            key = int(lock_key)

            @event.listens_for(server_engine, "begin")
            def _take_turn(conn: Connection) -> None:
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({key})")

        return server_engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    sqlite_engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, **pool)

    @event.listens_for(sqlite_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        if foreign_keys:
            cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(sqlite_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

    return sqlite_engine


def make_read_only_engine(url: str) -> Engine:
    """An engine that only reads ``url`` and creates nothing, not even a missing database.

    Parameters
    ----------
    url
        SQLAlchemy URL. For SQLite, the file must exist.

    Returns
    -------
    Engine
        SQLite: the file opened read-only. With no ``-wal`` file beside it (a copy, or a log
        no process has open) it is opened as immutable, so SQLite adds no ``-wal`` or
        ``-shm`` file beside it either; with one (a log in use, or copied with its WAL) it
        is read through that WAL, which SQLite may need a ``-shm`` file for. PostgreSQL:
        every transaction is read-only (``default_transaction_read_only``). Any other
        database gets a plain engine.

    Raises
    ------
    FileNotFoundError, IsADirectoryError
        An SQLite URL whose file is not there, or is a directory.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return create_engine(
            url, pool_pre_ping=True, connect_args={"options": "-c default_transaction_read_only=on"}
        )
    if backend != "sqlite":
        return create_engine(url)
    name = str(parsed.database or "")
    if name in ("", ":memory:"):
        raise FileNotFoundError(errno.ENOENT, "an SQLite URL that names no file", url)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    mode = "mode=ro" if path.with_name(path.name + "-wal").exists() else "immutable=1"
    uri = f"{path.resolve().as_uri()}?{mode}"  # as_uri: a '?' or '#' in the name is escaped

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

    return create_engine("sqlite://", creator=connect, poolclass=NullPool)
