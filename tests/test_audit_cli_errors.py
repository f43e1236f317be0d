"""`dicom-node audit` given what it cannot use: one line and exit 1, never a traceback.

A checkpoint that cannot be read leaves the log NOT INTACT (it cannot vouch for anything);
a checkpoint file named on the command line must exist; an export that cannot be written
is recorded as a failure, never as a success; a date the clock cannot convert is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.runtime import Runtime
from tests.test_audit_trail import populate
from tests.test_cli_corners import cli, node_home, tree  # noqa: F401  (node_home: the fixture)

NOT_SHOWN = "; the log cannot be held against its checkpoints"


def recorded(home: Path) -> list[tuple[str, int, dict[str, object]]]:
    """(event, outcome, facts) of every record in the home's audit log, oldest first."""
    runtime = Runtime.open(None, home, existing=True)
    try:
        return [(r.event, r.outcome, r.facts) for r in runtime.audit.events()]
    finally:
        runtime.close()


def verify_used(home: Path) -> list[tuple[int, dict[str, object]]]:
    return [(o, f) for e, o, f in recorded(home) if e == AuditEvent.AUDIT_LOG_USED and f["what"] == "verify"]


# --- verify: the checkpoints -------------------------------------------------------------------


def _checkpoint_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


DAMAGE = [
    pytest.param(
        lambda good: [good, good[: len(good) // 2]], 2, "not valid JSON (cut off or damaged)", id="cut-off"
    ),
    pytest.param(
        lambda good: [good.replace('"seq":30', '"seq":"x"')],
        1,
        "'seq' is not a record number: 'x'",
        id="seq-x",
    ),
    pytest.param(lambda good: [good.replace(',"seq":30', "")], 1, "'seq' is missing", id="no-seq"),
    pytest.param(
        lambda good: ["", "not json", good], 2, "not valid JSON (cut off or damaged)", id="not-json"
    ),
    pytest.param(lambda good: [good, "[30]"], 2, "not a JSON object", id="a-list"),
    pytest.param(
        lambda good: [good.replace('"at":', '"at":1e999,"x":')], 1, "'at' is not a time: inf", id="at-inf"
    ),
]


@pytest.mark.parametrize(("damage", "line", "reason"), DAMAGE)
def test_a_damaged_configured_checkpoint_line_is_not_intact(
    tmp_path: Path, damage: Callable[[str], list[str]], line: int, reason: str
) -> None:
    populate(tmp_path)  # 30 records, checkpoint at 30
    checkpoints = tmp_path / "var" / "audit" / "checkpoints.jsonl"
    (good,) = _checkpoint_lines(checkpoints)
    assert good.endswith(',"seq":30}'), good  # canonical JSON: sorted keys
    checkpoints.write_text("\n".join(damage(good)) + "\n")
    before = checkpoints.read_bytes()
    result = cli("audit", "verify", "--home", str(tmp_path))
    assert result.exit_code == 1, result.output
    assert result.stdout == (
        f"AUDIT LOG NOT INTACT — checkpoint file {checkpoints} line {line} cannot be read: "
        f"{reason}{NOT_SHOWN}\n"
    )
    assert result.stderr == ""
    assert checkpoints.read_bytes() == before, "verify never rewrites the checkpoints"
    assert verify_used(tmp_path) == [
        (Outcome.SERIOUS_FAILURE, {"what": "verify", "intact": False, "first_bad_seq": None})
    ]


def test_a_damaged_named_checkpoint_file_is_not_intact(tmp_path: Path) -> None:
    populate(tmp_path)
    named = tmp_path / "copy.jsonl"
    named.write_text('{"seq": 30, "hash": "')
    result = cli("audit", "verify", "--home", str(tmp_path), "--checkpoint-file", str(named))
    assert result.exit_code == 1, result.output
    assert result.stdout == (
        f"AUDIT LOG NOT INTACT — checkpoint file {named} line 1 cannot be read: "
        f"not valid JSON (cut off or damaged){NOT_SHOWN}\n"
    )


def test_a_configured_checkpoint_path_that_is_a_directory_is_not_intact(tmp_path: Path) -> None:
    populate(tmp_path, n=3)
    checkpoints = tmp_path / "var" / "audit" / "checkpoints.jsonl"
    checkpoints.unlink()
    checkpoints.mkdir()
    result = cli("audit", "verify", "--home", str(tmp_path), "--json")
    assert result.exit_code == 1, result.output
    verdict = json.loads(result.stdout)
    assert (verdict["ok"], verdict["first_bad_seq"]) == (False, None)
    assert verdict["problem"] == f"checkpoint file {checkpoints} cannot be read: Is a directory{NOT_SHOWN}"


def test_a_named_checkpoint_file_must_exist_a_configured_one_need_not_yet(node_home: Path) -> None:  # noqa: F811
    # A fresh node has written no checkpoint yet (the first comes at record
    # checkpoint_every or at the first shutdown): its configured file may be absent.
    configured = node_home / "var" / "audit" / "checkpoints.jsonl"
    assert not configured.exists()
    fresh = cli("audit", "verify", "--home", str(node_home))
    assert fresh.exit_code == 0, fresh.output
    assert fresh.stdout.startswith("audit log intact: 0 records, head 0, 0 checkpoint(s) match (")
    before = tree(node_home)

    # One the user names is meant to be there: a missing one is a mistake, not "intact".
    missing = node_home / "elsewhere" / "checkpoints.jsonl"
    result = cli("audit", "verify", "--home", str(node_home), "--checkpoint-file", str(missing))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"error: --checkpoint-file {missing}: no such file\n"

    result = cli("audit", "verify", "--home", str(node_home), "--checkpoint-file", str(node_home))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"error: --checkpoint-file {node_home}: a directory, not a checkpoint file\n"

    assert tree(node_home) == before
    assert len(verify_used(node_home)) == 1, "a refused option verifies (and records) nothing"


def test_library_verify_of_a_named_missing_file_is_not_intact(tmp_path: Path) -> None:
    trail = AuditTrail(f"sqlite:///{tmp_path}/a.db")
    trail.record(AuditEvent.QUERY, what="x")
    result = trail.verify(tmp_path / "missing.jsonl")
    trail.dispose()
    assert not result.ok
    assert result.problem == (
        f"checkpoint file {tmp_path / 'missing.jsonl'} cannot be read: No such file or directory{NOT_SHOWN}"
    )


# --- export: write first, then record ----------------------------------------------------------


def _a_file(path: Path) -> Path:
    """A plain file in the home (node.db is one only on SQLite)."""
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize(
    ("where", "why"),
    [
        pytest.param(lambda home: home, "Is a directory", id="a-directory"),
        pytest.param(
            lambda home: home / "no-such-dir" / "out.json", "No such file or directory", id="missing-dir"
        ),
        pytest.param(
            lambda home: _a_file(home / "var" / "a-file") / "out.json", "Not a directory", id="under-a-file"
        ),
    ],
)
def test_an_export_that_cannot_be_written_is_one_line_and_no_success(
    node_home: Path,  # noqa: F811
    where: Callable[[Path], Path],
    why: str,
) -> None:
    out = where(node_home)
    before = tree(node_home)
    result = cli("audit", "export", "--home", str(node_home), "--out", str(out))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"error: --out {out}: cannot write the export: {why}\n"
    assert tree(node_home) == before
    events = recorded(node_home)
    assert not [e for e in events if e[1] == Outcome.SUCCESS and e[2].get("what") == "export"]
    assert not [e for e in events if e[0] == AuditEvent.EXPORT and e[1] == Outcome.SUCCESS]
    failure = (
        AuditEvent.EXPORT,
        Outcome.SERIOUS_FAILURE,
        {"format": "fhir-r5", "records": 0, "to": str(out), "error": why},
    )
    assert [e for e in events if e[0] == AuditEvent.EXPORT] == [failure]

    # Where it can be written, it is (the two failure records above), then recorded as a success.
    good = node_home.parent / "bundle.json"
    result = cli("audit", "export", "--home", str(node_home), "--out", str(good))
    assert (result.exit_code, result.stdout) == (0, f"wrote 2 record(s) as fhir-r5 to {good}\n")
    assert json.loads(good.read_text())["resourceType"] == "Bundle"
    success = (AuditEvent.EXPORT, Outcome.SUCCESS, {"format": "fhir-r5", "records": 2, "to": str(good)})
    assert [e for e in recorded(node_home) if e[0] == AuditEvent.EXPORT] == [failure, success]


# --- dates the clock cannot convert ------------------------------------------------------------


@pytest.mark.parametrize("command", ["search", "export"])
@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_date_out_of_range_is_one_line(node_home: Path, command: str, option: str) -> None:  # noqa: F811
    before = tree(node_home)
    result = cli("audit", command, "--home", str(node_home), option, "0001-01-01")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"error: {option} '0001-01-01': outside the dates this system can convert (year 0 is out of range)\n"
    )
    assert tree(node_home) == before
    assert recorded(node_home) == [], "a refused option reads (and records) nothing"
