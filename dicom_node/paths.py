"""Where the node keeps its state: everything lives under ``<home>/var/``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import NodeConfig

#: Environment variables that override ``[storage] database_url`` / ``audit_database_url``.
DATABASE_URL_ENV = "DICOM_NODE_DATABASE_URL"
AUDIT_DATABASE_URL_ENV = "DICOM_NODE_AUDIT_DATABASE_URL"


@dataclass(frozen=True)
class NodePaths:
    """The directory layout under ``<home>/var``.

    ``data/studies/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` holds received instances,
    ``data/outputs/job-<id>/`` pipeline outputs, ``quarantine/`` what could not be handled,
    ``tmp/`` staging files (same filesystem, so rename is atomic).
    """

    home: Path
    var: Path
    data: Path
    studies: Path
    outputs: Path
    quarantine: Path
    tmp: Path
    log_file: Path
    run: Path

    @classmethod
    def for_home(cls, home: Path, config: NodeConfig) -> NodePaths:
        home = home.resolve()
        var = home / "var"
        data = var / config.storage.data_dir
        return cls(
            home=home,
            var=var,
            data=data,
            studies=data / "studies",
            outputs=data / "outputs",
            quarantine=var / config.storage.quarantine_dir,
            tmp=var / "tmp",
            log_file=var / config.logging.file,
            run=var / "run",
        )

    def create(self) -> None:
        for path in (self.var, self.studies, self.outputs, self.quarantine, self.tmp, self.run):
            path.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)

    def database_url(self, config: NodeConfig) -> str:
        """The index and job database: ``DICOM_NODE_DATABASE_URL`` in the environment (so a
        server password can live in a root-only systemd ``EnvironmentFile`` rather than the
        config), else ``[storage] database_url``, else SQLite at ``var/node.db``."""
        return (
            os.environ.get(DATABASE_URL_ENV, "").strip()
            or config.storage.database_url
            or f"sqlite:///{self.var / 'node.db'}"
        )

    def checkpoint_file(self, config: NodeConfig) -> Path:
        return self.var / config.audit.checkpoint_file  # an absolute path replaces var/

    def audit_database_url(self, config: NodeConfig) -> str:
        """The audit log: ``DICOM_NODE_AUDIT_DATABASE_URL``, else ``[storage]
        audit_database_url``, else SQLite at ``var/audit.db``."""
        return (
            os.environ.get(AUDIT_DATABASE_URL_ENV, "").strip()
            or config.storage.audit_database_url
            or f"sqlite:///{self.var / 'audit.db'}"
        )


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` (one recorded in the run folder, a claim or the receivers' board)
    still names a running process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
