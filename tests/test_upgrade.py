"""Upgrading in place: a node home an older release populated, opened by this code.

Hospitals upgrade in place: the new release starts on the old release's databases. The
old databases are built here from the old migrations (Alembic to an earlier revision, as
that release's start left them) and filled with rows shaped as that release wrote them:
studies, every job state, deliveries pending, dead and delivered, users, tokens. No old
code is needed, nor git history.

What must hold: every row survives, with the documented value in each column a later
migration added; the CLI reads and acts on the old rows (a held job can be approved, a
dead delivery retried); the audit log still verifies. A migration that fails changes
nothing (the old release can still be started). A database a newer release has upgraded
is refused with one line saying what to do, untouched.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, create_engine, insert, select

from audit import AuditEvent, AuditTrail
from dicom_node.db.engine import MIGRATIONS, Database, SchemaError
from dicom_node.db.schema import metadata
from dicom_node.runtime import Runtime, StateUnavailable
from tests.cli_helpers import cli, flat

# SQLite files the tests build and tamper with, whatever --database says
pytestmark = pytest.mark.own_database


def _alembic() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


_SCRIPT = ScriptDirectory.from_config(_alembic())
HEAD = str(_SCRIPT.get_current_head())
#: Every revision a released node may have left its database at, oldest first.
EARLIER = [rev.revision for rev in reversed(list(_SCRIPT.walk_revisions())) if rev.revision != HEAD]

T0 = 1_796_000_000.0
CT = "1.2.840.10008.5.1.4.1.1.2"
ELE = "1.2.840.10008.1.2.1"


def build_at(url: str, revision: str) -> None:
    """The database as a release whose newest migration was ``revision`` left it."""
    cfg = _alembic()
    db = Database(url)
    with db._writer.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()
    db.dispose()


def _instance(k: int, study: int, series: int, *, version: int = 1, current: bool = True) -> dict[str, Any]:
    sop = f"1.2.826.0.1.{study}.{series}.{k}"
    return {
        "id": k,
        "sop_uid": sop,
        "version": version,
        "current": current,
        "series_fk": series,
        "study_fk": study,
        "study_version": 1,
        "sop_class_uid": CT,
        "transfer_syntax_uid": ELE,
        "instance_number": k,
        "path": f"studies/1.2.826.0.1.{study}/1.2.826.0.1.{study}.{series}/{sop}"
        + (f".v{version}" if version > 1 else "")
        + ".dcm",
        "size": 1000 + k,
        "sha256": f"{k:064x}",
        "calling_ae": "SCAN_A",
        "peer_host": "127.0.0.1",
        "received_at": T0 + k,
        "tags": {"Modality": "CT", "SeriesNumber": series},
        "called_ae": "DICOM_NODE",
    }


def _job(job_id: int, study: int, state: str, **more: Any) -> dict[str, Any]:
    row = {
        "id": job_id,
        "study_fk": study,
        "study_version": 1,
        "pipeline": "forward",
        "destinations": ["pacs"],
        "state": state,
        "reason": None,
        "runs": 0 if state == "queued" else 1,
        "claimed_by": None,
        "lease_until": None,
        "created_at": T0 + 10 * job_id,
        "updated_at": T0 + 10 * job_id + 5,
        "rule": f"rule-{state}",
        "gate": "auto",
        "qc_policy": {"max_mean_sigma": 60.0},
        "options": {"note": "kept"},
        "series_uid": None,
        "destination_problems": [],
        "priors": None,
        "dispatched_at": None,
    }
    row.update(more)
    return row


def old_rows() -> dict[str, list[dict[str, Any]]]:
    """Rows as the releases wrote them, by table in foreign-key order; each is written with
    the columns its table has at the revision (the rest did not exist yet)."""
    studies = [
        {
            "id": s,
            "study_uid": f"1.2.826.0.1.{s}",
            "patient_fk": 1,
            "study_date": "20261201",
            "accession_number": f"A{s}",
            "description": "CHEST LOW DOSE",
            "source_ae": "SCAN_A",
            "first_received_at": T0 + s,
            "open_version": 1,
        }
        for s in (1, 2, 3, 4, 5)
    ]
    series = [
        {
            "id": s,
            "series_uid": f"1.2.826.0.1.{s}.{s}",
            "study_fk": s,
            "modality": "CT",
            "series_number": 1,
            "description": "low dose",
            "body_part": "CHEST",
            "frame_of_reference_uid": f"1.2.826.0.9.{s}",
        }
        for s in (1, 2, 3, 4, 5)
    ]
    instances = [_instance(k, 1, 1) for k in (1, 2)]
    instances.append(_instance(3, 1, 1, current=False))  # a changed re-send made version 2
    instances.append({**_instance(3, 1, 1, version=2), "id": 4})
    instances += [{**_instance(k, s, s), "id": 10 * s + k} for s in (2, 3, 4, 5) for k in (1, 2)]
    jobs = [
        _job(1, 1, "delivered"),
        _job(2, 2, "held", gate="review", reason="held for review: the rule requires review"),
        _job(3, 3, "delivering", reason="1 delivery(ies) queued"),
        _job(4, 4, "queued"),
        _job(5, 5, "failed", reason="1 delivery(ies) dead-lettered"),
    ]
    outputs = [
        {
            "id": j,
            "job_fk": j,
            "series_uid": f"1.2.826.0.7.{j}",
            "sop_uid": f"1.2.826.0.7.{j}.1",
            "sop_class_uid": CT,
            "transfer_syntax_uid": ELE,
            "path": f"/srv/old/var/data/outputs/job-{j}/1.dcm",
        }
        for j in (1, 2, 3, 5)
    ]
    deliveries = [
        {
            "id": d,
            "job_fk": j,
            "series_uid": f"1.2.826.0.7.{j}",
            "destination": "pacs",
            "state": state,
            "attempts": attempts,
            "next_attempt_at": T0 + 100,
            "last_error": error,
            "claimed_by": None,
            "lease_until": None,
            "created_at": T0 + 50,
            "delivered_at": T0 + 60 if state == "delivered" else None,
        }
        for d, j, state, attempts, error in (
            (1, 1, "delivered", 1, None),
            (2, 3, "pending", 2, "cannot connect to PACS@127.0.0.1:104: connection refused"),
            (3, 5, "dead", 10, "cannot connect to PACS@127.0.0.1:104: connection refused"),
        )
    ]
    return {
        "patients": [
            {"id": 1, "patient_id": "P1", "issuer": "", "patient_name": "Doe^Jane", "birth_date": "19700101"}
        ],
        "quarantine": [
            {
                "id": 1,
                "at": T0,
                "reason": "not DICOM",
                "calling_ae": "SCAN_A",
                "peer_host": "127.0.0.1",
                "claimed_sop_uid": None,
                "path": "quarantine/1.bin",
                "size": 12,
            }
        ],
        "studies": studies,
        "series": series,
        "instances": instances,
        "jobs": jobs,
        "job_inputs": [{"job_fk": j, "instance_fk": 10 * j + 1} for j in (2, 3, 4, 5)]
        + [{"job_fk": 1, "instance_fk": 1}],
        "job_outputs": outputs,
        "job_transitions": [
            {"id": j, "job_fk": j, "from_state": None, "to_state": "queued", "at": T0, "reason": None}
            for j in (1, 2, 3, 4, 5)
        ],
        "deliveries": deliveries,
        "delivery_attempts": [
            {
                "id": 1,
                "delivery_fk": 1,
                "started_at": T0 + 55,
                "finished_at": T0 + 60,
                "outcome": "delivered",
                "detail": None,
                "instances_sent": 1,
                "instances_failed": 0,
            }
        ],
        "users": [
            {
                "id": 1,
                "username": "alice",
                "role": "operator",
                "password_hash": "x",
                "created_at": T0,
                "disabled": False,
            }
        ],
        "sessions": [
            {"id": 1, "token_sha256": "a" * 64, "user_fk": 1, "created_at": T0, "expires_at": T0 + 3600}
        ],
        "storage_commitments": [
            {
                "id": 1,
                "delivery_fk": 1,
                "attempt_fk": 1,
                "transaction_uid": "1.2.826.0.8.1",
                "state": "committed",
                "references": [["1.2.3", "1.2.826.0.7.1.1"]],
                "requested_at": T0 + 60,
                "deadline": T0 + 180,
            }
        ],
        "mpps": [
            {
                "id": 1,
                "sop_uid": "1.2.826.0.6.1",
                "study_uid": "1.2.826.0.1.1",
                "status": "COMPLETED",
                "referenced": [],
                "created_at": T0,
                "updated_at": T0,
            }
        ],
        "job_priors": [
            {
                "id": 1,
                "job_fk": 1,
                "study_uid": "1.2.826.0.1.9",
                "series_uid": "1.2.826.0.1.9.1",
                "study_date": "20250101",
                "archive": "pacs",
                "sop_count": 3,
            }
        ],
        "job_stage_times": [{"id": 1, "job_fk": 1, "stage": "predict", "seconds": 1.5, "at": T0 + 20}],
        "api_tokens": [{"id": 1, "user_fk": 1, "name": "ci", "token_sha256": "b" * 64, "created_at": T0}],
    }


def fill(url: str) -> dict[str, list[dict[str, Any]]]:
    """Write :func:`old_rows` with the columns each table has now; returns what was kept,
    read back (a table that does not exist yet is left out)."""
    engine = create_engine(url)
    have = MetaData()
    try:
        with engine.begin() as conn:
            have.reflect(conn)
            for name, rows in old_rows().items():
                if name in have.tables:
                    columns = set(have.tables[name].c.keys())
                    conn.execute(
                        insert(have.tables[name]),
                        [{k: v for k, v in r.items() if k in columns} for r in rows],
                    )
        return dump(url, only=have)
    finally:
        engine.dispose()


def dump(url: str, only: MetaData | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table (of ``only``'s tables and columns, when given), in key order."""
    engine = create_engine(url)
    now = MetaData()
    try:
        with engine.connect() as conn:
            now.reflect(conn)
            out = {}
            for name, table in (only or now).tables.items():
                if name == "alembic_version":
                    continue
                cols = [now.tables[name].c[c] for c in table.c.keys()]
                keys = [c for c in now.tables[name].primary_key.columns]
                rows = conn.execute(select(*cols).order_by(*keys)).mappings().all()
                out[name] = [dict(r) for r in rows]
            return out
    finally:
        engine.dispose()


@pytest.mark.parametrize("revision", EARLIER)
def test_every_earlier_release_upgrades_with_every_row_kept(tmp_path: Path, revision: str) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    build_at(url, revision)
    before = fill(url)
    assert before["jobs"] and before["instances"], "the old database holds rows"

    db = Database(url)
    db.upgrade()
    with db._writer.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert MigrationContext.configure(conn).get_current_heads() == (HEAD,)
    db.dispose()

    after = dump(url)  # every table, every column it has now
    for name, rows in before.items():
        # the columns the old release wrote: unchanged, row for row
        assert [{k: r[k] for k in rows[0]} for r in after[name]] == rows, name
    # the columns later migrations added: what their migrations promise for older rows
    for job in after["jobs"]:
        if revision < "0003":
            assert (job["gate"], job["qc_policy"], job["options"], job["rule"]) == ("auto", {}, {}, None)
        if revision < "0005":
            assert job["destination_problems"] is None  # never checked before the gate
        if revision < "0008":
            assert job["priors"] is None
        if revision < "0009":
            assert job["dispatched_at"] is None
    assert all(i["purged_at"] is None for i in after["instances"])
    assert all(s["purged_at"] is None for s in after["studies"])
    if revision < "0006":
        assert all(i["role"] is None for i in after["instances"])  # acquired
    with sqlite3.connect(tmp_path / "node.db") as raw:
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# -- the node on an upgraded home ------------------------------------------------------------

CONFIG = """
[destinations.pacs]
ae_title = "PACS"
host = "127.0.0.1"
port = 104
"""


@pytest.fixture
def old_home(tmp_path: Path) -> Iterator[Path]:
    """A home as the 2026-12-05 release (schema 0009) left it: its index, an audit log with
    records and a checkpoint, its config."""
    home = tmp_path / "home"
    (home / "var").mkdir(parents=True)
    (home / "dicom-node.toml").write_text(CONFIG)
    build_at(f"sqlite:///{home / 'var' / 'node.db'}", "0009")
    fill(f"sqlite:///{home / 'var' / 'node.db'}")
    trail = AuditTrail(
        f"sqlite:///{home / 'var' / 'audit.db'}",
        actor="serve@old:1",
        checkpoint_file=home / "var" / "audit" / "checkpoints.jsonl",
        checkpoint_every=3,
    )
    for k in range(7):
        trail.record(AuditEvent.APPLICATION_START, version=f"0.1.{k}")
    trail.dispose()
    yield home


def test_the_cli_reads_and_acts_on_an_old_release_s_home(old_home: Path) -> None:
    where = ("--home", str(old_home))
    upgraded = cli("db", "upgrade", *where)  # the other commands refuse an older schema
    assert upgraded.exit_code == 0 and "from schema revision 0009" in upgraded.output, upgraded.output
    verified = cli("audit", "verify", *where)
    assert verified.exit_code == 0 and "intact" in verified.output, verified.output

    jobs = {j["id"]: j for j in json.loads(cli("jobs", *where, "--json").output)}
    assert {i: j["state"] for i, j in jobs.items()} == {
        1: "delivered",
        2: "held",
        3: "delivering",
        4: "queued",
        5: "failed",
    }
    assert jobs[2]["gate"] == "review" and jobs[2]["rule"] == "rule-held"
    studies = json.loads(cli("studies", *where, "--json").output)
    assert len(studies) == 5 and all(s["purged_at"] is None for s in studies)
    held = json.loads(cli("review", "list", *where, "--json").output)
    assert [h["id"] for h in held] == [2]
    outbox = {d["id"]: d["state"] for d in json.loads(cli("outbox", *where, "--json").output)}
    assert outbox == {1: "delivered", 2: "pending", 3: "dead"}

    approved = cli("review", "approve", "2", *where, "--reviewer", "physicist", "--note", "after upgrade")
    assert approved.exit_code == 0, approved.output
    retried = cli("outbox", "retry", "3", *where)
    assert retried.exit_code == 0, retried.output
    outbox = {d["job_id"]: d["state"] for d in json.loads(cli("outbox", *where, "--json").output)}
    assert outbox == {1: "delivered", 3: "pending", 5: "pending", 2: "pending"}
    assert {j["id"]: j["state"] for j in json.loads(cli("jobs", *where, "--json").output)}[2] == "delivering"
    kept = cli("retention", *where)
    assert kept.exit_code == 0 and "retention is off" in kept.output, kept.output
    users = cli("user", "list", *where)
    assert users.exit_code == 0 and "alice" in users.output
    verified = cli("audit", "verify", *where)
    assert verified.exit_code == 0 and "intact" in verified.output, verified.output


# -- failures leave the database as it was -----------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_migration_that_fails_changes_nothing(tmp_path: Path) -> None:
    """0010 and 0011 run in one transaction: when 0011 fails, 0010 is not left applied
    (before, the database was left at 0010, which neither release could then start on:
    the old one does not know 0010, the new one fails at 0011 again)."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    build_at(url, "0009")
    before = fill(url)
    with sqlite3.connect(tmp_path / "node.db") as raw:  # something in 0011's way
        raw.execute("CREATE TABLE api_tokens (x INTEGER)")
    db = Database(url)
    with pytest.raises(Exception, match="api_tokens"):
        db.upgrade()
    db.dispose()
    with sqlite3.connect(tmp_path / "node.db") as raw:
        assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [("0009",)]
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "job_stage_times" not in tables
    assert {k: v for k, v in dump(url).items() if k in before} == before


def test_a_database_a_newer_release_upgraded_is_refused_in_one_line_untouched(tmp_path: Path) -> None:
    """A downgrade: this code started on a schema it does not know. Before, Alembic's
    traceback ended in "Can't locate revision identified by '0013'"."""
    home = tmp_path / "home"
    Runtime.open(None, home).close()
    node_db = home / "var" / "node.db"
    with sqlite3.connect(node_db) as raw:
        raw.execute("UPDATE alembic_version SET version_num = '0099'")
    raw.close()
    digest = _digest(node_db)

    with pytest.raises(StateUnavailable) as refused:
        Runtime.open(None, home)
    message = str(refused.value)
    assert "schema revision 0099" in message and f"newest is {HEAD}" in message
    assert "newer release" in message and "nothing was changed" in message
    assert "\n" not in message

    for command_line in (("studies",), ("audit", "verify"), ("jobs", "--json")):
        result = cli(*command_line, "--home", str(home))
        assert result.exit_code == 1, result.output
        assert "schema revision 0099" in flat(result.output)
        assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert _digest(node_db) == digest


def test_schema_error_is_what_database_upgrade_raises(tmp_path: Path) -> None:
    """The refusal is :class:`SchemaError` at the database layer (commands that open a
    Database themselves get the same sentence)."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    build_at(url, HEAD)
    with sqlite3.connect(tmp_path / "node.db") as raw:
        raw.execute("UPDATE alembic_version SET version_num = 'ffff'")
    raw.close()
    db = Database(url)
    with pytest.raises(SchemaError, match="schema revision ffff"):
        db.upgrade()
    db.dispose()
