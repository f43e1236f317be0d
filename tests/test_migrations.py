"""The Alembic migrations build exactly the schema the code declares."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from dicom_node.db.engine import Database
from dicom_node.db.schema import metadata


def test_upgrade_matches_metadata_and_is_idempotent(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.upgrade()
    db.upgrade()  # a second start must not fail or change anything
    with db._writer.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        tables = set(inspect(conn).get_table_names())
    assert diff == []
    assert {"patients", "studies", "series", "instances", "jobs", "deliveries", "quarantine"} <= tables
    db.dispose()
