"""Who may change the node database's schema, and how an upgrade shows in the audit log.

An operator installs a new release and types a command while the old release's ``serve``
still runs. Before, every command migrated the schema at once, even ``dicom-node studies``.
Now only ``serve``, ``worker`` and ``dicom-node db upgrade`` upgrade; every other command
refuses a home whose schema is older in one line and leaves it as it was, while a fresh
home is still made by the commands that make state. Each upgrade is one ``schema-upgraded``
audit record, written after it committed, once even when two processes start at once.

``audit verify --audit-db`` checks a copy of the audit database handed to an auditor: no
node home, nothing created, nothing written.

The older homes are those of ``tests/test_upgrade.py`` (schema 0009, rows as that release
wrote them, an audit log with records).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from audit import AuditEvent, AuditTrail
from dicom_node import __version__
from dicom_node.cli import app
from dicom_node.db.engine import Database, SchemaChange
from dicom_node.runtime import Runtime, os_user
from tests.cli_helpers import cli, flat, tree
from tests.peers import NodeProcess
from tests.pg import PostgresServer, rows
from tests.test_audit_trail import populate
from tests.test_upgrade import CONFIG, HEAD, old_home  # noqa: F401  (old_home: the fixture)

# SQLite files the tests build at old revisions and tamper with, whatever --database says
pytestmark = pytest.mark.own_database

REFUSAL = (
    f"has schema revision 0009 and this dicom-node needs {HEAD}: stop the running node, then run "
    "`dicom-node db upgrade` (or start `dicom-node serve`); nothing was changed"
)


def revision(home: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(home / "var" / "node.db") as raw:
        found = raw.execute("SELECT version_num FROM alembic_version").fetchall()
    raw.close()
    return found


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def audit_rows(home: Path) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(event, actor, facts) of every record of the home's audit log, read with sqlite3 alone."""
    with sqlite3.connect(home / "var" / "audit.db") as raw:
        found = raw.execute("SELECT event, actor, facts FROM audit_events ORDER BY seq").fetchall()
    raw.close()
    return [(event, actor, json.loads(facts)) for event, actor, facts in found]


def upgrades(home: Path) -> list[tuple[str | None, dict[str, Any]]]:
    return [(actor, facts) for event, actor, facts in audit_rows(home) if event == "schema-upgraded"]


# --- every command but serve, worker and db upgrade leaves an older schema as it is ------------


@pytest.mark.parametrize(
    "command",
    [
        ("studies",),
        ("jobs", "--json"),
        ("outbox",),
        ("quarantine",),
        ("review", "list"),
        ("retention",),
        ("user", "list"),
        ("audit", "verify"),
        ("audit", "search"),
        ("outbox", "retry", "3"),  # one that writes, too
    ],
    ids=lambda c: "-".join(c),
)
def test_a_command_on_an_older_home_refuses_in_one_line_and_changes_nothing(
    old_home: Path,  # noqa: F811
    command: tuple[str, ...],
) -> None:
    node_db = old_home / "var" / "node.db"
    before, records = digest(node_db), audit_rows(old_home)

    result = cli(*command, "--home", str(old_home))

    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert flat(result.output) == f"error: the database {node_db} {REFUSAL}"
    assert revision(old_home) == [("0009",)]
    assert digest(node_db) == before
    assert audit_rows(old_home) == records


def test_a_command_that_makes_state_refuses_an_older_home_too(old_home: Path) -> None:  # noqa: F811
    added = CliRunner().invoke(
        app,
        ["user", "add", "bob", "--role", "auditor", "--password-stdin", "--home", str(old_home)],
        input="a long passphrase\n",
    )
    assert added.exit_code == 1, added.output
    assert REFUSAL in flat(added.output)
    assert revision(old_home) == [("0009",)]
    assert upgrades(old_home) == []


# --- dicom-node db upgrade ------------------------------------------------------------------------


def test_db_upgrade_says_from_which_revision_to_which_and_is_audited_once(
    old_home: Path,  # noqa: F811
) -> None:
    node_db = old_home / "var" / "node.db"
    old_records = audit_rows(old_home)

    upgraded = cli("db", "upgrade", "--home", str(old_home))

    assert upgraded.exit_code == 0, upgraded.output
    assert flat(upgraded.output) == (
        f"upgraded the database {node_db} from schema revision 0009 to {HEAD} (audit record schema-upgraded)"
    )
    assert revision(old_home) == [(HEAD,)]
    assert audit_rows(old_home)[: len(old_records)] == old_records
    assert audit_rows(old_home)[len(old_records) :] == [
        (
            "schema-upgraded",
            os_user(),
            {"database": str(node_db), "from_revision": "0009", "to_revision": HEAD, "version": __version__},
        )
    ]
    verified = cli("audit", "verify", "--home", str(old_home))
    assert verified.exit_code == 0 and "audit log intact" in verified.output, verified.output

    # again: at the newest revision already, nothing changes and nothing is recorded
    records, before = audit_rows(old_home), digest(node_db)
    again = cli("db", "upgrade", "--home", str(old_home))
    assert again.exit_code == 0, again.output
    assert flat(again.output) == (
        f"the database {node_db} is at schema revision {HEAD} already: nothing to upgrade"
    )
    assert audit_rows(old_home) == records
    assert digest(node_db) == before
    assert len(upgrades(old_home)) == 1

    # and the commands read the old rows again
    jobs = cli("jobs", "--json", "--home", str(old_home))
    assert jobs.exit_code == 0, jobs.output
    assert sorted(j["id"] for j in json.loads(jobs.output)) == [1, 2, 3, 4, 5]


def test_db_upgrade_on_a_home_without_state_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "typo"
    home.mkdir()
    result = cli("db", "upgrade", "--home", str(home))
    assert result.exit_code == 1, result.output
    assert "no dicom-node state under" in flat(result.output) and "is --home right?" in flat(result.output)
    assert tree(home) == []


def test_a_fresh_home_is_still_made_by_the_commands_that_make_state(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    added = CliRunner().invoke(
        app,
        ["user", "add", "alice", "--role", "operator", "--password-stdin", "--home", str(home)],
        input="a long passphrase\n",
    )
    assert added.exit_code == 0, added.output
    assert revision(home) == [(HEAD,)]
    listed = cli("user", "list", "--home", str(home))
    assert listed.exit_code == 0 and "alice" in listed.output, listed.output
    studies = cli("studies", "--home", str(home), "--json")
    assert studies.exit_code == 0 and json.loads(studies.output) == [], studies.output
    assert upgrades(home) == []  # a schema made from nothing is no upgrade
    nothing = cli("db", "upgrade", "--home", str(home))
    assert nothing.exit_code == 0 and "already: nothing to upgrade" in nothing.output, nothing.output

    # the same at the runtime level, without upgrade=True: what a first command does
    runtime = Runtime.open(None, tmp_path / "another")
    try:
        assert runtime.schema_change == SchemaChange((), HEAD)
        assert runtime.schema_change.created
        assert runtime.audit.events(AuditEvent.SCHEMA_UPGRADED) == []
    finally:
        runtime.close()


# --- serve's path upgrades --------------------------------------------------------------------


def test_serve_s_runtime_upgrades_once_when_two_start_at_once(
    old_home: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both processes read the old revision before either takes the writers' lock; the
    second finds the schema upgraded under the lock and records nothing."""
    both_read = threading.Barrier(2, timeout=30)
    read_revisions = Database._read_revisions

    def read_then_wait(self: Database, conn: Any) -> tuple[str, ...]:
        found = read_revisions(self, conn)
        both_read.wait()
        return found

    monkeypatch.setattr(Database, "_read_revisions", read_then_wait)
    opened: list[Runtime] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(Runtime.open(None, old_home, upgrade=True))
        except BaseException as exc:  # reported below, on the test's thread
            failed.append(exc)

    starts = [threading.Thread(target=start) for _ in range(2)]
    for thread in starts:
        thread.start()
    for thread in starts:
        thread.join(60)
    for runtime in opened:
        runtime.close()
    assert failed == []
    assert sorted((r.schema_change for r in opened), key=lambda c: c is None) == [
        SchemaChange(("0009",), HEAD),
        None,
    ]
    assert revision(old_home) == [(HEAD,)]
    assert upgrades(old_home) == [
        (
            os_user(),
            {
                "database": str(old_home / "var" / "node.db"),
                "from_revision": "0009",
                "to_revision": HEAD,
                "version": __version__,
            },
        )
    ]
    monkeypatch.setattr(
        Database, "_read_revisions", read_revisions
    )  # (not undo(): other fixtures' patches stay)
    runtime = Runtime.open(None, old_home, upgrade=True)  # a later start: nothing to do
    runtime.close()
    assert runtime.schema_change is None and len(upgrades(old_home)) == 1
    verified = cli("audit", "verify", "--home", str(old_home))
    assert verified.exit_code == 0 and "audit log intact" in verified.output, verified.output


def test_serve_upgrades_at_start_and_db_upgrade_refuses_while_it_runs(old_home: Path) -> None:  # noqa: F811
    node = NodeProcess(old_home, CONFIG)
    where = ("--home", str(old_home), "--config", str(node.config_path))
    node.start()
    try:
        assert revision(old_home) == [(HEAD,)]
        assert [actor for actor, _ in upgrades(old_home)] == [os_user()]
        refused = cli("db", "upgrade", *where)
        assert refused.exit_code == 1, refused.output
        message = flat(refused.output)
        assert "a dicom-node serve (pid " in message and f"is running on {old_home}" in message
        assert "stop it first; the schema was not changed" in message
        assert isinstance(refused.exception, SystemExit), refused.exception
    finally:
        node.stop()
    again = cli("db", "upgrade", *where)
    assert again.exit_code == 0 and "already: nothing to upgrade" in again.output, again.output
    assert len(upgrades(old_home)) == 1
    assert "intact" in cli("audit", "verify", *where).output


# --- audit verify --audit-db: a copy of the audit log alone -------------------------------------


@pytest.fixture
def handed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of a node's audit database (30 records) and its checkpoint file, in a folder
    of their own; the node's home is gone, and the working directory holds no node either."""
    home = tmp_path / "node"
    populate(home)  # 30 records, a checkpoint at 30
    folder = tmp_path / "handed-over"
    folder.mkdir()
    shutil.copy(home / "var" / "audit.db", folder / "audit.db")
    shutil.copy(home / "var" / "audit" / "checkpoints.jsonl", folder / "checkpoints.jsonl")
    shutil.rmtree(home)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the default --home: it must not be opened
    return folder / "audit.db"


def test_audit_verify_of_a_copy_alone_is_intact_and_writes_nothing(handed_over: Path) -> None:
    folder = handed_over.parent
    before, files = digest(handed_over), tree(folder.parent)

    alone = cli("audit", "verify", "--audit-db", str(handed_over))
    assert alone.exit_code == 0, alone.output
    assert "audit log intact: 30 records, head 30, 0 checkpoint(s) match" in alone.output
    assert "no checkpoint file given (--checkpoint-file), so a cut-off tail would not show" in alone.output

    anchored = cli(
        "audit", "verify", "--audit-db", f"sqlite:///{handed_over}",
        "--checkpoint-file", str(folder / "checkpoints.jsonl"), "--json",
    )  # fmt: skip
    assert anchored.exit_code == 0, anchored.output
    shown = json.loads(anchored.output)
    assert (shown["ok"], shown["records"], shown["checkpoints_checked"]) == (True, 30, 1)
    assert shown["database"] == f"sqlite:///{handed_over}"

    assert digest(handed_over) == before  # not even the record of the check
    assert tree(folder.parent) == files  # no -wal, no -shm, no node state in the working directory


def _tamper(db_file: Path, statement: str) -> None:
    with sqlite3.connect(db_file) as raw:
        raw.execute("DROP TRIGGER audit_events_no_update")
        raw.execute("DROP TRIGGER audit_events_no_delete")
        raw.execute(statement)
    raw.close()


@pytest.mark.parametrize(
    ("statement", "with_checkpoints", "expected"),
    [
        (
            "UPDATE audit_events SET calling_ae = 'EVIL' WHERE seq = 12",
            False,
            "first bad record: 12: record 12 was altered (its content does not match its hash)",
        ),
        (
            "DELETE FROM audit_events WHERE seq = 7",
            False,
            "first bad record: 7: record 7 is missing (the next record is 8)",
        ),
        (
            "DELETE FROM audit_events WHERE seq > 25",
            True,
            "first bad record: 26: the log ends at record 25 but a checkpoint written",
        ),
    ],
    ids=["edited", "deleted", "cut-tail"],
)
def test_a_tampered_copy_names_the_first_bad_record(
    handed_over: Path, statement: str, with_checkpoints: bool, expected: str
) -> None:
    _tamper(handed_over, statement)
    named = ["--checkpoint-file", str(handed_over.parent / "checkpoints.jsonl")] if with_checkpoints else []
    result = cli("audit", "verify", "--audit-db", str(handed_over), *named)
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith(f"AUDIT LOG NOT INTACT — {expected}"), result.stdout


def test_an_audit_db_that_is_not_there_is_an_error_and_nothing_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "audit.db"
    for given in (str(missing), f"sqlite:///{missing}"):
        result = cli("audit", "verify", "--audit-db", given)
        assert result.exit_code == 1, result.output
        assert flat(result.output) == f"error: --audit-db {given}: no such file (nothing was created)"
        assert isinstance(result.exception, SystemExit), result.exception
    assert tree(tmp_path) == []

    (tmp_path / "a-folder").mkdir()
    folder = cli("audit", "verify", "--audit-db", str(tmp_path / "a-folder"))
    assert folder.exit_code == 1 and "a directory, not an audit database" in flat(folder.output)

    Runtime.open(None, tmp_path / "node").close()
    node_db = tmp_path / "node" / "var" / "node.db"
    not_a_log = cli("audit", "verify", "--audit-db", str(node_db))
    assert not_a_log.exit_code == 1
    assert (
        flat(not_a_log.output) == f"error: --audit-db {node_db}: holds no audit log (no audit_events table)"
    )

    with_home = cli("audit", "verify", "--audit-db", str(node_db), "--home", str(tmp_path / "node"))
    assert with_home.exit_code == 2
    assert "--audit-db verifies that database alone: leave out --home" in flat(with_home.output)


def test_an_audit_db_url_is_read_only_and_shown_without_its_password(
    postgres_server: PostgresServer,
) -> None:
    handed, empty = postgres_server.create_database("handed"), postgres_server.create_database("empty")
    try:
        trail = AuditTrail(postgres_server.url(handed))
        for k in range(5):
            trail.record(AuditEvent.QUERY, what=f"q{k}")
        trail.dispose()
        url = postgres_server.url(handed).replace("postgres@", "postgres:s3cret@")  # trust: not checked

        result = cli("audit", "verify", "--audit-db", url)
        assert result.exit_code == 0, result.output
        assert "audit log intact: 5 records, head 5" in result.output
        assert "s3cret" not in result.output and "postgres:***@" in result.output
        assert rows(postgres_server.url(handed), "SELECT count(*) FROM audit_events") == [(5,)]

        nothing_there = cli("audit", "verify", "--audit-db", postgres_server.url(empty))
        assert nothing_there.exit_code == 1
        assert "holds no audit log (no audit_events table)" in flat(nothing_there.output)
        # read-only: the table was not made (rows() answers [] for a missing table)
        assert rows(postgres_server.url(empty), "SELECT count(*) FROM audit_events") == []
    finally:
        postgres_server.drop_database(handed)
        postgres_server.drop_database(empty)
