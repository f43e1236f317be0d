"""Opening a node home: config, directories, database (migrated), audit log, logging."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit import AuditTrail
from dicom_node.config import LoadedConfig, NodeConfig, load_config
from dicom_node.db.engine import Database
from dicom_node.paths import NodePaths

#: Third-party loggers that would otherwise flood the log (or, at DEBUG, dump data sets
#: with patient names into it).
_QUIET = ("pynetdicom", "apscheduler", "alembic", "sqlalchemy", "PIL", "highdicom")


@dataclass(frozen=True)
class Runtime:
    """Everything a command needs, built once from the config and the home directory."""

    loaded: LoadedConfig
    paths: NodePaths
    db: Database
    audit: AuditTrail

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
    ) -> Runtime:
        loaded = load_config(config_path, home, overrides)
        paths = NodePaths.for_home(home, loaded.config)
        paths.create()
        db = Database(paths.database_url(loaded.config))
        db.upgrade()
        audit = AuditTrail(
            paths.audit_database_url(loaded.config),
            actor=actor,
            checkpoint_file=paths.checkpoint_file(loaded.config),
            checkpoint_every=loaded.config.audit.checkpoint_every,
        )
        return cls(loaded=loaded, paths=paths, db=db, audit=audit)

    def close(self) -> None:
        self.db.dispose()
        self.audit.dispose()


def setup_logging(paths: NodePaths, config: NodeConfig, *, to_stderr: bool = True) -> None:
    """Application log: UIDs and ids only — callers never log patient names."""
    root = logging.getLogger()
    root.setLevel(config.logging.level)
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s")
    file_handler = logging.handlers.WatchedFileHandler(paths.log_file)
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    if to_stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        root.addHandler(stream)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
