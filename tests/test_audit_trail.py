"""The hash chain and its checkpoints: an untouched log verifies; edits, deletions, swaps
and a cut-off tail are each detected by `dicom-node audit verify`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.runtime import Runtime


def populate(home: Path, n: int = 30) -> Path:
    runtime = Runtime.open(None, home)
    trail = runtime.audit
    for i in range(n):
        trail.record(
            AuditEvent.INSTANCE_STORED,
            study_uid="1.2.3.4",
            patient_id="PID-1",
            calling_ae="CT1",
            peer_host="127.0.0.1",
            sop_uid=f"1.2.3.4.{i}",
            sha256=f"{i:064x}",
        )
    trail.checkpoint()  # what serve does at shutdown
    runtime.close()
    return home / "var" / "audit.db"


def verify(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", "audit", "verify", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def edit_field(db: sqlite3.Connection) -> None:
    facts = json.loads(db.execute("select facts from audit_events where seq = 12").fetchone()[0])
    facts["sha256"] = "f" * 64
    text = json.dumps(facts, separators=(",", ":"))
    db.execute("update audit_events set facts = ? where seq = 12", (text,))


def edit_participant(db: sqlite3.Connection) -> None:
    db.execute("update audit_events set calling_ae = 'EVIL' where seq = 12")


def delete_record(db: sqlite3.Connection) -> None:
    db.execute("delete from audit_events where seq = 12")


def swap_records(db: sqlite3.Connection) -> None:
    cols = [c[1] for c in db.execute("pragma table_info(audit_events)") if c[1] != "seq"]
    a = db.execute(f"select {','.join(cols)} from audit_events where seq = 12").fetchone()
    b = db.execute(f"select {','.join(cols)} from audit_events where seq = 13").fetchone()
    setter = ", ".join(f"{c} = ?" for c in cols)
    db.execute(f"update audit_events set {setter} where seq = 12", b)
    db.execute(f"update audit_events set {setter} where seq = 13", a)


def cut_tail(db: sqlite3.Connection) -> None:
    db.execute("delete from audit_events where seq > 25")


def rewrite_chain(db: sqlite3.Connection) -> None:
    """Edit a record and recompute every later hash: only the checkpoint can tell."""
    from audit.trail import chain_hash

    edit_field(db)
    db.row_factory = sqlite3.Row
    prev = db.execute("select hash from audit_events where seq = 11").fetchone()[0]
    for row in db.execute("select * from audit_events where seq >= 12 order by seq").fetchall():
        new = chain_hash(prev, dict(row))
        db.execute("update audit_events set prev_hash = ?, hash = ? where seq = ?", (prev, new, row["seq"]))
        prev = new


def test_untouched_log_verifies(tmp_path: Path) -> None:
    populate(tmp_path)
    result = verify(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit log intact" in result.stdout and "checkpoint(s) match" in result.stdout


@pytest.mark.own_database
@pytest.mark.parametrize(
    ("tamper", "first_bad", "words"),
    [
        (edit_field, 12, "was altered"),
        (edit_participant, 12, "was altered"),
        (delete_record, 12, "is missing"),
        (swap_records, 12, "does not link"),
        (cut_tail, 26, "were cut off"),
        (rewrite_chain, 30, "differs from the checkpoint"),
    ],
    ids=["edit-fact", "edit-participant", "delete", "swap", "cut-tail", "rewrite-chain"],
)
def test_tampering_is_detected(
    tmp_path: Path, tamper: Callable[[sqlite3.Connection], None], first_bad: int, words: str
) -> None:
    db_path = populate(tmp_path)
    db = sqlite3.connect(db_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("delete from audit_events where seq = 1")
    # A determined attacker with file access drops the guards first; the chain still tells.
    db.execute("drop trigger audit_events_no_update")
    db.execute("drop trigger audit_events_no_delete")
    tamper(db)
    db.commit()
    db.close()
    result = verify(tmp_path)
    assert result.returncode == 1
    assert f"first bad record: {first_bad}:" in result.stdout, result.stdout
    assert words in result.stdout


def test_checkpoints_every_n_and_verify_reads_are_audited(tmp_path: Path) -> None:
    trail = AuditTrail(
        f"sqlite:///{tmp_path}/a.db", checkpoint_file=tmp_path / "cp.jsonl", checkpoint_every=10
    )
    for _ in range(25):
        trail.record(AuditEvent.QUERY, Outcome.SUCCESS, what="x")
    trail.record_many([(AuditEvent.QUERY, {"what": "batch"}) for _ in range(12)])  # crosses 30
    assert trail.checkpoints is not None
    assert trail.checkpoints.seqs() == [10, 20, 37]
    result = trail.verify()
    assert result.ok and result.records == 37 and result.checkpoints_checked == 3


@pytest.mark.own_database
def test_cli_reads_are_recorded_as_audit_log_used(tmp_path: Path) -> None:
    populate(tmp_path, n=3)
    assert verify(tmp_path).returncode == 0
    trail = AuditTrail(f"sqlite:///{tmp_path}/var/audit.db")
    used = trail.events(AuditEvent.AUDIT_LOG_USED)
    assert len(used) == 1 and used[0].facts["what"] == "verify" and used[0].actor.startswith("os:")
