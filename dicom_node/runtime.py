"""Opening a node home: config, directories, audit log, database (its schema), logging.

Who may change the node database's schema: ``Runtime.open(..., upgrade=True)`` upgrades an
older release's schema and records a ``schema-upgraded`` audit record; ``serve``, ``worker``
and ``dicom-node db upgrade`` open it so. Every other command opens it without: a new
database still gets its schema (the first command on a fresh home works as before), but
one an older release left is refused in one line and left as it is, since that release may
still be running on it.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import logging.handlers
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from audit import AuditEvent, AuditTrail
from dicom_node import __version__
from dicom_node.config import LoadedConfig, NodeConfig, check_database_url, load_config
from dicom_node.db.engine import Database, SchemaChange, SchemaError
from dicom_node.paths import AUDIT_DATABASE_URL_ENV, DATABASE_URL_ENV, NodePaths
from dicom_node.safelog import CLI_HANDLER, PhiSafeFilter, route_warnings_and_crashes

#: Third-party loggers that would otherwise flood the log (or, at DEBUG, dump data sets
#: with patient names into it).
_QUIET = ("pynetdicom", "apscheduler", "alembic", "sqlalchemy", "PIL", "highdicom")


class NoNodeState(Exception):
    """A command that reads a node's state was pointed at a home that holds none."""


class StateUnavailable(Exception):
    """The node's state cannot be opened (one line saying why)."""


class DatabaseUnavailable(StateUnavailable):
    """The configured database server cannot be reached or refuses the node."""


def os_user() -> str:
    """Who runs this process, for the audit trail (``os:<login>``)."""
    try:
        return f"os:{getpass.getuser()}"
    except Exception:  # no login name (containers)
        return "os:unknown"


def missing_state(paths: NodePaths, config: NodeConfig) -> Path | None:
    """The first SQLite database of the node (index, then audit log) that does not exist.

    A server database (a non-SQLite URL) is not checked: it has no file to look for.
    """
    for url in (paths.database_url(config), paths.audit_database_url(config)):
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            file = Path(str(parsed.database))
            if not file.exists():
                return file
    return None


@dataclass(frozen=True)
class Runtime:
    """Everything a command needs, built once from the config and the home directory."""

    loaded: LoadedConfig
    paths: NodePaths
    db: Database
    audit: AuditTrail
    #: What opening changed in the node database's schema (created or upgraded); None: nothing.
    schema_change: SchemaChange | None = None

    @property
    def config(self) -> NodeConfig:
        return self.loaded.config

    @property
    def policy_path(self) -> Path | None:
        """The configured policy file (a relative path is under the node's home), or None."""
        name = self.config.policy.file
        if not name:
            return None
        path = Path(name)
        return path if path.is_absolute() else self.paths.home / path

    @classmethod
    def open(
        cls,
        config_path: Path | None,
        home: Path,
        overrides: dict[str, Any] | None = None,
        actor: str | None = None,
        *,
        existing: bool = False,
        upgrade: bool = False,
    ) -> Runtime:
        """Open ``home``.

        Parameters
        ----------
        config_path, home, overrides
            Where the config and the state are, and values that replace the config's.
        actor
            The audit trail's default actor; also who a schema upgrade is recorded as
            (default ``os:<login>``).
        existing
            Raise :class:`NoNodeState` (creating nothing) unless the node's databases are
            already there.
        upgrade
            Upgrade a node database an older release left (``serve``, ``worker``, ``db
            upgrade``), and record it in the audit trail once it has committed
            (``schema-upgraded``; not when there was nothing to upgrade, nor by the second of
            two processes starting at once). Without it a new database still gets its schema,
            but an older one is refused (:class:`StateUnavailable`, one line saying to stop
            the node and run ``dicom-node db upgrade``) and left untouched. A schema a newer
            release made is refused either way.
        """
        loaded = load_config(config_path, home, overrides)
        paths = NodePaths.for_home(home, loaded.config)
        for what, env, url in (
            ("database_url", DATABASE_URL_ENV, paths.database_url(loaded.config)),
            ("audit_database_url", AUDIT_DATABASE_URL_ENV, paths.audit_database_url(loaded.config)),
        ):
            try:  # the config checked its own; one from the environment is checked here
                check_database_url(url)
            except ValueError as exc:
                raise DatabaseUnavailable(f"{env} (or [storage] {what}): {exc}") from None
        if existing and (missing := missing_state(paths, loaded.config)) is not None:
            shown = missing.relative_to(paths.home) if missing.is_relative_to(paths.home) else missing
            raise NoNodeState(f"no dicom-node state under {paths.home} ({shown} missing): is --home right?")
        try:
            paths.create()
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise StateUnavailable(
                f"cannot create the node's state{where}: {exc.strerror or exc} "
                "(check --home, [storage] data_dir and quarantine_dir, [logging] file)"
            ) from None
        # The audit trail first: an upgrade is recorded there once it has committed, so an
        # audit log that cannot be opened stops the upgrade before it starts.
        url = paths.audit_database_url(loaded.config)
        audit: AuditTrail | None = None
        db: Database | None = None
        try:
            audit = AuditTrail(
                url,
                actor=actor,
                checkpoint_file=paths.checkpoint_file(loaded.config),
                checkpoint_every=loaded.config.audit.checkpoint_every,
            )
            url = paths.database_url(loaded.config)
            db = Database(url)
            change = db.upgrade() if upgrade else db.create_or_check()
            if change is not None and not change.created:
                url = audit.url
                audit.record(
                    AuditEvent.SCHEMA_UPGRADED,
                    actor=actor or os_user(),
                    database=db.where,
                    from_revision=change.before_text,
                    to_revision=change.after,
                    version=__version__,
                )
        except SchemaError as exc:
            _dispose(db, audit)
            raise StateUnavailable(str(exc)) from None
        except OperationalError as exc:
            _dispose(db, audit)
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            where = make_url(url).render_as_string(hide_password=True)
            raise DatabaseUnavailable(f"cannot use the database {where}: {reason}") from None
        except BaseException:
            _dispose(db, audit)
            raise
        return cls(loaded=loaded, paths=paths, db=db, audit=audit, schema_change=change)

    def close(self) -> None:
        self.db.dispose()
        self.audit.dispose()


def _dispose(db: Database | None, audit: AuditTrail | None) -> None:
    """Close what a failed :meth:`Runtime.open` had opened."""
    if db is not None:
        db.dispose()
    if audit is not None:
        audit.dispose()


def under_journald() -> bool:
    """Whether stderr is systemd's journal stream (``JOURNAL_STREAM`` names its device and
    inode, as systemd documents for exactly this test)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return bool(value) and (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def log_destinations(destination: str, stderr_wanted: bool = True) -> tuple[bool, bool]:
    """(to the file, to stderr) for ``[logging] destination``: ``auto`` is stderr only
    under journald (one copy of each record there), else both; ``stderr_wanted`` False
    (a process whose stderr nobody reads) leaves the file only."""
    if destination == "auto":
        to_file, to_stderr = (False, True) if under_journald() else (True, True)
    else:
        to_file, to_stderr = destination in ("file", "both"), destination in ("stderr", "both")
    if not stderr_wanted:
        to_file, to_stderr = True, False
    return to_file, to_stderr


class JsonFormatter(logging.Formatter):
    """One JSON object a record: ``time`` (UTC, ISO 8601 with milliseconds), ``level``,
    ``logger``, ``event`` (the message's template: the same for every record of a kind,
    what a shipper groups by), ``message``, ``process``, ``pid``, ``thread``; ``exception``
    when there is one. Runs after :class:`PhiSafeFilter`, so it sees only what the filter let
    through (a library's text withheld, controls escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": str(getattr(record, "event", record.msg)),
            "message": record.getMessage(),
            "process": record.processName,
            "pid": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False, default=str)


def setup_logging(paths: NodePaths, config: NodeConfig, *, to_stderr: bool = True) -> None:
    """Application log: UIDs and ids only — callers never log patient names, and what
    libraries say (log records, warnings, exception messages) passes :mod:`dicom_node.safelog`."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, CLI_HANDLER, False)]:
        root.removeHandler(handler)  # the command line's stopgap; these handlers replace it
    root.setLevel(config.logging.level)
    fmt: logging.Formatter = (
        JsonFormatter()
        if config.logging.format == "json"
        else logging.Formatter(
            "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"
        )
    )
    to_file, to_stderr = log_destinations(config.logging.destination, to_stderr)
    if to_file:
        file_handler = logging.handlers.WatchedFileHandler(paths.log_file)
        file_handler.setFormatter(fmt)
        file_handler.addFilter(PhiSafeFilter())
        root.addHandler(file_handler)
    if to_stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        stream.addFilter(PhiSafeFilter())
        root.addHandler(stream)
    route_warnings_and_crashes()
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
