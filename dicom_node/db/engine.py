"""Database connections: one engine for writes, one for reads, schema kept by Alembic.

SQLite runs in WAL mode so readers never block the receiver. Write transactions begin with
``BEGIN IMMEDIATE``: the write lock is taken up front, so two processes (receiver and
workers) never deadlock upgrading a read lock (the engine setup is :mod:`audit.engine`,
shared with the audit log). ``synchronous=NORMAL`` keeps a commit durable across a process
crash (kill -9); the DICOM files themselves are fsync'd, and startup reconciliation
re-indexes any file whose index row a power loss took away.

The schema: :meth:`Database.upgrade` brings an older one up to date (``serve``, ``worker``,
``dicom-node db upgrade``); :meth:`Database.create_or_check` gives a new database its schema
but refuses one an older release left (every other command: it must not migrate the schema
under an older node that is still running).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, CursorResult, Select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from audit.engine import NODE_WRITERS, make_engine
from dicom_node.db.schema import metadata

MIGRATIONS = Path(__file__).parent / "migrations"

#: PostgreSQL's SQLSTATE for "insufficient privilege" (e.g. "must be owner of table studies").
_NO_PRIVILEGE = "42501"

#: What the node's runtime role needs on every table and sequence of the schema
#: (``deploy/postgres/grants.sql``).
_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


class SchemaError(Exception):
    """The database's schema is not the one this code needs and cannot be made so here; the
    message is one line: what was found, and what to do. Nothing was changed."""


class SchemaBehind(SchemaError):
    """The database has an older release's schema, and this call may not upgrade it
    (:meth:`Database.create_or_check`). Nothing was changed."""


@dataclass(frozen=True)
class SchemaChange:
    """What one call changed in the schema: the revision(s) it found and the one it left.

    Attributes
    ----------
    before
        The revisions the database recorded; empty for a new database (the schema created).
    after
        The revision it is at now (this code's newest).
    """

    before: tuple[str, ...]
    after: str

    @property
    def created(self) -> bool:
        """A new database given its schema, rather than an older schema upgraded."""
        return not self.before

    @property
    def before_text(self) -> str:
        return ", ".join(self.before) or "none"


def _alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def newest_revision() -> str:
    """The schema revision this code needs: the newest of its migrations."""
    head = ScriptDirectory.from_config(_alembic_config("")).get_current_head()
    assert head is not None
    return head


def _revisions(conn: Connection) -> tuple[str, ...]:
    """The schema revision(s) the database records (none: a new database)."""
    return tuple(sorted(MigrationContext.configure(conn).get_current_heads()))


def _no_privilege(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == _NO_PRIVILEGE


def first_line(exc: DBAPIError) -> str:
    """The first line of what the database said (for a one-line message)."""
    text_ = str(exc.orig) if exc.orig is not None else str(exc)
    return text_.strip().splitlines()[0] if text_.strip() else type(exc).__name__


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

    def upgrade(self) -> SchemaChange | None:
        """Bring the schema to the newest Alembic revision (idempotent).

        Every migration a start needs runs in one transaction under the writers' lock: two
        processes starting at once upgrade once, and a failure leaves the schema as it was.
        Raises :class:`SchemaError` (nothing changed) for a schema a newer release made (a
        downgrade: this code would misread it), for an upgrade the database's role may not
        make (PostgreSQL: the runtime role of ``deploy/postgres/roles.sql`` owns no table),
        and, on PostgreSQL, for tables or sequences the role may not use (an upgrade added
        them and ``deploy/postgres/grants.sql`` was not run again).

        Returns
        -------
        SchemaChange or None
            What this call changed, once it has committed; None when the schema was at the
            newest revision already (or another process upgraded it meanwhile).
        """
        return self._to_head(upgrade_older=True)

    def create_or_check(self) -> SchemaChange | None:
        """Use the schema as it is: give a new database (no revision yet) its schema, but
        never upgrade one an older release left.

        For every command but ``serve``, ``worker`` and ``db upgrade``: an older node may still
        be running on this database, and a command that only reads must not change its schema
        under it. Raises :class:`SchemaBehind` (nothing changed, no write lock taken) for an
        older schema, and whatever :meth:`upgrade` raises for a newer one or missing
        privileges.

        Returns
        -------
        SchemaChange or None
            The schema created (``before`` empty) for a new database; None otherwise.
        """
        return self._to_head(upgrade_older=False)

    def _to_head(self, *, upgrade_older: bool) -> SchemaChange | None:
        cfg = _alembic_config(self.url)
        script = ScriptDirectory.from_config(cfg)
        head = script.get_current_head()
        assert head is not None
        known = {rev.revision for rev in script.walk_revisions()}
        with self._reader.connect() as conn:  # at head (every start but the first after an
            current = self._read_revisions(conn)  # upgrade): no write lock to wait for
        change = None
        if current != (head,):
            self._refuse_unknown(current, head, known)
            if current and not upgrade_older:
                raise self._behind(current, head)  # before the lock: a running node holds it
            with self._writer.connect() as conn, conn.begin():
                current = _revisions(conn)  # again, under the lock: another process may have
                self._refuse_unknown(current, head, known)  # upgraded meanwhile
                if current != (head,):
                    if current and not upgrade_older:
                        raise self._behind(current, head)
                    cfg.attributes["connection"] = conn  # Alembic joins this transaction
                    try:
                        command.upgrade(cfg, "head")
                    except DBAPIError as exc:
                        if not _no_privilege(exc):
                            raise
                        raise SchemaError(
                            f"the database {self.where} has schema revision "
                            f"{', '.join(current) or 'none'} and this dicom-node needs {head}, but "
                            f"{self._who()} may not change the schema ({first_line(exc)}): start "
                            "dicom-node once with the database URL of the role that owns the "
                            "schema (deploy/postgres/roles.sql, step 2), then run deploy/postgres/"
                            "grants.sql again; nothing was changed"
                        ) from None
                    change = SchemaChange(current, head)
            # the transaction has committed here: only now is the change reported
        if self._writer.dialect.name == "postgresql":
            self._check_privileges()
        return change

    def _behind(self, current: tuple[str, ...], head: str) -> SchemaBehind:
        return SchemaBehind(
            f"the database {self.where} has schema revision {', '.join(current)} and this "
            f"dicom-node needs {head}: stop the running node, then run `dicom-node db upgrade` "
            "(or start `dicom-node serve`); nothing was changed"
        )

    def _read_revisions(self, conn: Connection) -> tuple[str, ...]:
        try:
            return _revisions(conn)
        except DBAPIError as exc:
            if not _no_privilege(exc):
                raise
            raise SchemaError(
                f"{self._who()} may not read the schema revision in {self.where} "
                f"({first_line(exc)}): run deploy/postgres/grants.sql again as a superuser"
            ) from None

    @property
    def where(self) -> str:
        """The database, for a message: an SQLite file's path, a server URL without password."""
        parsed = make_url(self.url)
        if self.is_sqlite:
            return str(parsed.database)
        return parsed.render_as_string(hide_password=True)

    def _who(self) -> str:
        user = make_url(self.url).username
        return f"the role {user}" if user else "this database role"

    def _refuse_unknown(self, current: tuple[str, ...], head: str, known: set[str]) -> None:
        unknown = [rev for rev in current if rev not in known]
        if unknown:
            raise SchemaError(
                f"the database {self.where} has schema revision {', '.join(unknown)}, which this "
                f"dicom-node does not know (its newest is {head}): a newer release has upgraded it, "
                "and this one would misread it. Run that release again, or restore the copy of the "
                "database taken before the upgrade; nothing was changed"
            )

    def _check_privileges(self) -> None:
        """PostgreSQL: the role can use every table and sequence of the schema."""
        tables = sorted(metadata.tables)
        with self._reader.connect() as conn:
            missing = conn.execute(
                text(
                    "SELECT t.name, p.privilege FROM unnest(CAST(:tables AS text[])) AS t(name)"
                    " CROSS JOIN unnest(CAST(:privileges AS text[])) AS p(privilege)"
                    " WHERE to_regclass(quote_ident(t.name)) IS NOT NULL"
                    " AND NOT has_table_privilege(to_regclass(quote_ident(t.name)), p.privilege)"
                    " UNION ALL"  # the sequences behind the tables' id columns
                    " SELECT s.relname, 'USAGE' FROM pg_depend d"
                    " JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
                    " WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass"
                    " AND d.refobjid IN (SELECT to_regclass(quote_ident(n))"
                    " FROM unnest(CAST(:tables AS text[])) AS n)"
                    # CASE: the planner may test rows that are not sequences first
                    " AND NOT CASE WHEN s.relkind = 'S' THEN has_sequence_privilege(s.oid, 'USAGE')"
                    " ELSE true END"
                ),
                {"tables": tables, "privileges": list(_TABLE_PRIVILEGES)},
            ).all()
        if missing:
            grouped: dict[str, list[str]] = {}
            for name, privilege in missing:
                grouped.setdefault(name, []).append(privilege)
            order = (*_TABLE_PRIVILEGES, "USAGE")
            named = "; ".join(
                f"{name} ({', '.join(sorted(privs, key=order.index))})"
                for name, privs in sorted(grouped.items())
            )
            raise SchemaError(
                f"{self._who()} may not use what this dicom-node needs in {self.where}: {named}. "
                "Run deploy/postgres/grants.sql again as a superuser (it grants the tables an "
                "upgrade added)"
            )

    def dispose(self) -> None:
        self._writer.dispose()
        self._reader.dispose()
        if self._claimer is not self._writer:
            self._claimer.dispose()
