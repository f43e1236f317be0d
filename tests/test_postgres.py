"""PostgreSQL as the node's database: the same migrations, an audit log the database keeps
append-only, writers that take turns and workers that claim different jobs at once.

These run on a throwaway server whatever ``--database`` says (``make test-postgres`` runs
the whole suite on one).
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import insert, inspect, select

from audit import AuditEvent, AuditTrail
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.engine import Database, inserted_id
from dicom_node.delivery.profiles import DestinationProfiles
from dicom_node.jobs.runner import JobRunner
from dicom_node.jobs.state import create_job
from dicom_node.paths import AUDIT_DATABASE_URL_ENV, DATABASE_URL_ENV, NodePaths
from dicom_node.runtime import Runtime
from tests.pg import PostgresServer, connect_url

pytestmark = pytest.mark.own_database

ROLES_SQL = Path(__file__).parent.parent / "deploy" / "postgres" / "roles.sql"
GRANTS_SQL = Path(__file__).parent.parent / "deploy" / "postgres" / "grants.sql"


@pytest.fixture
def databases(postgres_server: PostgresServer) -> Iterator[tuple[str, str]]:
    """A fresh (index, audit) pair of databases, dropped afterwards."""
    names = [postgres_server.create_database("pgnode"), postgres_server.create_database("pgaudit")]
    try:
        yield postgres_server.url(names[0]), postgres_server.url(names[1])
    finally:
        for name in names:
            postgres_server.drop_database(name)


def test_migrations_build_the_declared_schema_on_postgresql(databases: tuple[str, str]) -> None:
    db = Database(databases[0])
    db.upgrade()
    db.upgrade()  # every start runs it: a second one must change nothing
    with db._writer.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), t.metadata)
        tables = set(inspect(conn).get_table_names())
    db.dispose()
    assert diff == []
    assert {"patients", "studies", "series", "instances", "jobs", "deliveries", "quarantine"} <= tables


def _psql(server: PostgresServer, script: Path, *variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *(f"-v{v}" for v in variables),
         "-h", str(server.socket_dir), "-p", str(server.port), "-U", "postgres", "-d", "postgres",
         "-f", str(script)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_deploy_roles_keep_the_audit_log_append_only(postgres_server: PostgresServer) -> None:
    """deploy/postgres/roles.sql + grants.sql as the runbook says: the node's audit role can
    append and verify but not rewrite; the trigger stops even the owner; what a superuser
    does behind both is caught by the chain."""
    server = postgres_server
    with server.connect() as conn:  # the roles are cluster-wide: start from none
        for db in ("dicomnode", "dicomnode_audit"):
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        for role in ("dicomnode", "dicomnode_audit", "dicomnode_owner", "dicomnode_audit_owner"):
            conn.execute(f"DROP ROLE IF EXISTS {role}")
    made = _psql(server, ROLES_SQL, "node_password=n0de", "audit_password=aud1t")
    assert made.returncode == 0, made.stderr

    # first start, as the owners: the schema, the audit table and its triggers
    owner_index = Database(server.url("dicomnode", "dicomnode_owner"))
    owner_index.upgrade()
    owner_index.dispose()
    owner_audit = AuditTrail(server.url("dicomnode_audit", "dicomnode_audit_owner"), actor="setup")
    for k in range(3):
        owner_audit.record(AuditEvent.APPLICATION_START, version=f"{k}")
    granted = _psql(server, GRANTS_SQL)
    assert granted.returncode == 0, granted.stderr

    # day to day, as the runtime roles
    index = Database(server.url("dicomnode", "dicomnode"))
    index.upgrade()  # at head already: needs no DDL right
    with index.write() as conn:
        conn.execute(insert(t.patients).values(patient_id="P1", issuer=""))
    with index.read() as conn:
        assert conn.execute(select(t.patients.c.patient_id)).scalars().all() == ["P1"]
    index.dispose()
    audit = AuditTrail(server.url("dicomnode_audit", "dicomnode_audit"), actor="node")
    audit.record(AuditEvent.APPLICATION_START, version="runtime")
    assert audit.verify().ok and audit.verify().records == 4

    runtime_url = server.url("dicomnode_audit", "dicomnode_audit")
    for statement in (
        "UPDATE audit_events SET facts = '{}' WHERE seq = 2",
        "DELETE FROM audit_events WHERE seq = 4",
        "TRUNCATE audit_events",
    ):
        with connect_url(runtime_url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
        with connect_url(server.url("dicomnode_audit", "dicomnode_audit_owner")) as conn:
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement)
    assert audit.verify().ok

    # a superuser can switch the trigger off: the chain still names the edited record
    with connect_url(server.url("dicomnode_audit")) as conn:
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_rewrite")
        conn.execute("""UPDATE audit_events SET facts = '{"version":"edited"}' WHERE seq = 2""")
        conn.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_rewrite")
    result = audit.verify()
    assert not result.ok and result.first_bad_seq == 2
    with server.connect() as conn:
        for db in ("dicomnode", "dicomnode_audit"):
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _append(url: str, who: int, n: int) -> None:
    trail = AuditTrail(url, actor=f"proc-{who}")
    for k in range(n):
        trail.record(AuditEvent.APPLICATION_START, version=f"{who}.{k}")


def test_appends_from_several_processes_make_one_unbroken_chain(databases: tuple[str, str]) -> None:
    audit_url = databases[1]
    AuditTrail(audit_url)  # create the table before the race
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(audit_url, who, 40)) for who in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    trail = AuditTrail(audit_url)
    result = trail.verify()
    assert result.ok, result.problem
    assert result.records == 160 and result.head_seq == 160
    versions = {r.facts["version"] for r in trail.events(AuditEvent.APPLICATION_START)}
    assert versions == {f"{who}.{k}" for who in range(4) for k in range(40)}


def _claim_all(home: str, worker: str, out: str) -> None:
    rt = Runtime.open(None, Path(home))
    runner = JobRunner(rt.config, rt.paths, rt.db, rt.audit, worker, DestinationProfiles(rt.config))
    taken = []
    while (job := runner.claim()) is not None:
        taken.append(job.job_id)
        time.sleep(0.005)  # hold the worker between claims, as running a job would
    Path(out).write_text(" ".join(map(str, taken)))
    rt.close()


def test_workers_on_several_hosts_claim_each_job_exactly_once(
    databases: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATABASE_URL_ENV, databases[0])
    monkeypatch.setenv(AUDIT_DATABASE_URL_ENV, databases[1])
    rt = Runtime.open(None, tmp_path / "home")
    now = time.time()
    n_jobs = 120
    with rt.db.write() as conn:
        patient = inserted_id(conn.execute(insert(t.patients).values(patient_id="P1", issuer="")))
        for k in range(n_jobs):
            study = inserted_id(
                conn.execute(
                    insert(t.studies).values(
                        study_uid=f"1.2.3.{k}", patient_fk=patient, first_received_at=now, open_version=1
                    )
                )
            )
            create_job(
                conn, study_fk=study, study_version=1, pipeline="forward", destinations=["pacs"],
                instance_ids=[], actor="tester",
            )  # fmt: skip
    rt.close()
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"w{k}.txt" for k in range(4)]
    # each worker its own home (its own host, as far as the node can tell): one database
    procs = [
        ctx.Process(target=_claim_all, args=(str(tmp_path / f"host{k}"), f"host{k}/run/1", str(out)))
        for k, out in enumerate(outs)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    per_worker = [[int(x) for x in out.read_text().split()] for out in outs]
    claimed = [job for jobs in per_worker for job in jobs]
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == n_jobs
    assert sum(1 for jobs in per_worker if jobs) >= 2  # the work was shared, not serialised
    with connect_url(databases[0]) as conn:
        states = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        runs = conn.execute("SELECT max(runs) FROM jobs").fetchone()
    assert states == [("running", n_jobs)]
    assert runs == (1,)


def test_the_environment_overrides_the_configured_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server password can live in a root-only EnvironmentFile instead of the config."""
    config = NodeConfig.model_validate({"storage": {"database_url": "sqlite:////srv/configured.db"}})
    paths = NodePaths.for_home(tmp_path, config)
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    monkeypatch.delenv(AUDIT_DATABASE_URL_ENV, raising=False)
    assert paths.database_url(config) == "sqlite:////srv/configured.db"
    assert paths.audit_database_url(config) == f"sqlite:///{tmp_path.resolve()}/var/audit.db"
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql+psycopg://node:secret@db/dicomnode")
    monkeypatch.setenv(AUDIT_DATABASE_URL_ENV, "postgresql+psycopg://audit:secret@db/audit")
    assert paths.database_url(config) == "postgresql+psycopg://node:secret@db/dicomnode"
    assert paths.audit_database_url(config) == "postgresql+psycopg://audit:secret@db/audit"


def test_an_unreachable_database_server_is_one_line_without_the_password(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[storage]\ndatabase_url = "postgresql+psycopg://node:s3cret@127.0.0.1:1/dicomnode"\n')
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "serve", "--home", str(tmp_path), "--config", str(config),
         "--port", "11112"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot use the database postgresql+psycopg://node:***@127.0.0.1:1/dicomnode" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout and "Traceback" not in done.stderr
