"""Upgrading a PostgreSQL node set up by the runbook (deploy/postgres/roles.sql): the node
runs day to day as a role that owns no table, so it cannot migrate the schema itself, and
the tables an upgrade adds are not granted to it until grants.sql is run again.

Before, the first start after an upgrade ended in a traceback ("must be owner of table
studies"), and an upgrade whose new tables were not granted started silently and failed
later, at the first job that finished (its stage times are written as it settles).
Now each is refused at start in one line that says what to run, and nothing is changed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.db.engine import Database, SchemaError
from dicom_node.paths import AUDIT_DATABASE_URL_ENV, DATABASE_URL_ENV
from dicom_node.runtime import Runtime, StateUnavailable
from tests.pg import PostgresServer, rows
from tests.test_upgrade import HEAD, build_at, fill

pytestmark = pytest.mark.own_database

_ROLES = itertools.count(1)


class Site:
    """An index database owned by one role, used day to day by another (roles.sql)."""

    def __init__(self, server: PostgresServer) -> None:
        n = f"{next(_ROLES)}_{os.getpid()}"
        self.server, self.owner, self.runtime = server, f"upg_owner{n}", f"upg_node{n}"
        self.index, self.audit = f"upg_index{n}", f"upg_audit{n}"
        with server.connect() as conn:
            conn.execute(f"CREATE ROLE {self.owner} LOGIN")
            conn.execute(f"CREATE ROLE {self.runtime} LOGIN PASSWORD 's3cret'")
            conn.execute(f"CREATE DATABASE {self.index} OWNER {self.owner}")
            conn.execute(f"CREATE DATABASE {self.audit} OWNER {self.runtime}")

    @property
    def owner_url(self) -> str:
        return self.server.url(self.index, self.owner)

    @property
    def runtime_url(self) -> str:
        return self.server.url(self.index, self.runtime).replace(
            f"{self.runtime}@", f"{self.runtime}:s3cret@"
        )

    def grants(self) -> None:
        """What deploy/postgres/grants.sql does for the index role."""
        with self.server.connect(self.index) as conn:
            conn.execute(f"GRANT USAGE ON SCHEMA public TO {self.runtime}")
            conn.execute(
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {self.runtime}"
            )
            conn.execute(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {self.runtime}")

    def revision(self) -> list[tuple[object, ...]]:
        return rows(self.owner_url, "SELECT version_num FROM alembic_version")

    def drop(self) -> None:
        with self.server.connect() as conn:
            for db in (self.index, self.audit):
                conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            for role in (self.owner, self.runtime):
                conn.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture
def site(postgres_server: PostgresServer) -> Iterator[Site]:
    made = Site(postgres_server)
    try:
        yield made
    finally:
        made.drop()


def test_the_runtime_role_is_told_to_upgrade_as_the_owner(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_at(site.owner_url, "0011")  # the release before, as the runbook set it up
    kept = fill(site.owner_url)
    site.grants()
    monkeypatch.setenv(DATABASE_URL_ENV, site.runtime_url)
    monkeypatch.setenv(AUDIT_DATABASE_URL_ENV, site.server.url(site.audit, site.runtime))

    with pytest.raises(StateUnavailable) as refused:
        Runtime.open(None, tmp_path / "home", upgrade=True)  # a node's start
    message = str(refused.value)
    assert f"schema revision 0011 and this dicom-node needs {HEAD}" in message
    assert f"the role {site.runtime} may not change the schema" in message
    assert "must be owner of table" in message
    assert "roles.sql, step 2" in message and "grants.sql" in message and "nothing was changed" in message
    assert "s3cret" not in message and "\n" not in message
    assert site.revision() == [("0011",)]

    # what the message says: once as the owner (this upgrade adds no table), then day to day
    Database(site.owner_url).upgrade()
    runtime = Runtime.open(None, tmp_path / "home")
    try:
        with runtime.db.read() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar_one() == len(kept["jobs"])
    finally:
        runtime.close()
    assert site.revision() == [(HEAD,)]


def test_tables_an_upgrade_added_are_named_until_grants_sql_runs_again(site: Site) -> None:
    build_at(site.owner_url, "0009")  # the 2026-12-05 release
    site.grants()
    Database(site.owner_url).upgrade()  # the upgrade, as the owner: 0010 and 0011 add tables

    node = Database(site.runtime_url)
    try:
        with pytest.raises(SchemaError) as refused:
            node.upgrade()
        message = str(refused.value)
        for table in ("job_stage_times", "api_tokens"):
            assert f"{table} (SELECT, INSERT, UPDATE, DELETE)" in message
        for sequence in ("job_stage_times_id_seq", "api_tokens_id_seq"):
            assert f"{sequence} (USAGE)" in message
        assert "studies" not in message and "grants.sql again" in message and "s3cret" not in message

        site.grants()
        node.upgrade()  # granted: the node starts
    finally:
        node.dispose()
