"""CLI corners: choices are choices, read-only commands never make state, `echo` and `send`
write nothing, `run` shows its stages and a QC table, a bad config names every problem."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.cli.run_cmds import qc_tables
from dicom_node.delivery.ledger import DeliveryState
from dicom_node.jobs.state import JobState
from dicom_node.runtime import Runtime
from dicom_node.web.users import Role
from tests.cli_helpers import cli, flat, tree
from tests.peers import free_port


@pytest.fixture
def node_home(tmp_path: Path) -> Path:
    """A node's home with its state (databases migrated, empty), as `serve` leaves it."""
    home = tmp_path / "node"
    Runtime.open(None, home).close()
    return home


# --- (a) choices are choices -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "valid"),
    [
        pytest.param(["jobs", "--state"], [s.value for s in JobState], id="jobs"),
        pytest.param(["outbox", "--state"], [s.value for s in DeliveryState], id="outbox"),
        pytest.param(["audit", "export", "--format"], ["fhir-r5", "fhir-r4b", "dicom-xml"], id="export"),
        pytest.param(["demo", "--pipeline"], ["restoration", "forward"], id="demo"),
        pytest.param(["user", "add", "someone", "--role"], [r.value for r in Role], id="user-add"),
    ],
)
def test_unknown_choice_is_an_error_naming_the_valid_ones(
    tmp_path: Path, args: list[str], valid: list[str]
) -> None:
    home = tmp_path / "home"
    result = cli(*args, "bogus", "--home", str(home))
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert "'bogus' is not one of" in message
    for value in valid:
        assert f"'{value}'" in message, (value, message)
    assert not home.exists(), "a refused option creates nothing"


@pytest.mark.parametrize(
    ("args", "valid"),
    [
        (["simulate", "ldct", "--anatomy"], ["chest", "head"]),
        (["simulate", "sct", "--sequence"], ["t1", "t2"]),
    ],
    ids=["ldct", "sct"],
)
def test_simulate_choices(tmp_path: Path, args: list[str], valid: list[str]) -> None:
    result = cli(*args, "bogus", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert all(f"'{value}'" in message for value in valid), message
    assert not (tmp_path / "out").exists()


def test_a_valid_state_filters(node_home: Path) -> None:
    for args in (["jobs", "--state", "held"], ["outbox", "--state", "dead"]):
        result = cli(*args, "--json", "--home", str(node_home))
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == []


def test_audit_search_names_the_known_events(node_home: Path) -> None:
    result = cli("audit", "search", "--event", "bogus", "--home", str(node_home))
    assert result.exit_code == 1
    assert "--event 'bogus': unknown event (known: " in result.stderr and "instance-stored" in result.stderr


# --- (b) read-only commands on a home with no node state -------------------------------------

READ_ONLY = [
    ["studies"],
    ["jobs"],
    ["outbox"],
    ["outbox", "attempts", "1"],
    ["outbox", "retry", "1"],
    ["quarantine"],
    ["audit", "verify"],
    ["audit", "search"],
    ["audit", "report", "--study", "1.2.3"],
    ["audit", "export"],
    ["review", "list"],
    ["review", "show", "1"],
    ["review", "approve", "1"],
    ["review", "reject", "1", "--reason", "x"],
    ["policy", "explain", "1.2.3"],
    ["user", "list"],
    ["user", "disable", "someone"],
]


@pytest.mark.own_database  # an SQLite home's missing files (a server database has none to miss)
@pytest.mark.parametrize("args", READ_ONLY, ids=" ".join)
def test_no_state_says_so_and_creates_nothing(tmp_path: Path, args: list[str]) -> None:
    before = tree(tmp_path)
    typo = tmp_path / "typo"
    result = cli(*args, "--home", str(typo))
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr == (
        f"error: no dicom-node state under {typo} (var/node.db missing): is --home right?\n"
    )
    assert tree(tmp_path) == before


@pytest.mark.own_database
def test_an_existing_empty_directory_is_no_node_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default --home is the current directory
    result = cli("studies")
    assert result.exit_code == 1
    assert "0 studies" not in result.output
    assert f"no dicom-node state under {tmp_path} (var/node.db missing)" in result.stderr
    assert tree(tmp_path) == []


@pytest.mark.own_database
def test_a_missing_audit_log_is_named(node_home: Path) -> None:
    (node_home / "var" / "audit.db").unlink()
    result = cli("audit", "verify", "--home", str(node_home))
    assert result.exit_code == 1
    assert "(var/audit.db missing)" in result.stderr
    assert not (node_home / "var" / "audit.db").exists()


def test_a_node_home_answers(node_home: Path) -> None:
    result = cli("studies", "--home", str(node_home))
    assert result.exit_code == 0, result.output
    assert "0 studies" in result.stdout
    assert cli("audit", "verify", "--home", str(node_home)).exit_code == 0


# --- (c) echo and send write nothing ---------------------------------------------------------


@pytest.fixture
def store_scp() -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom Verification + Storage SCP on loopback; yields its port and what it got."""
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="TEST_SCP")
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax))
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        yield port, received
    finally:
        server.shutdown()


def test_echo_and_send_create_nothing_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_scp: tuple[int, list[str]]
) -> None:
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    port, received = store_scp
    study = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=2, seed=3))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = tree(tmp_path)

    echoed = cli("echo", "127.0.0.1", str(port), "--aet", "TEST_SCP")
    assert echoed.exit_code == 0, echoed.output
    assert "answered C-ECHO: success" in echoed.stdout
    sent = cli("send", str(tmp_path / "ct"), "--to", f"TEST_SCP@127.0.0.1:{port}", "--json")
    assert sent.exit_code == 0, sent.output
    assert json.loads(sent.stdout)["series"][0]["sent"] == 2
    assert len(received) == 2 and len(study.files) == 2

    assert tree(tmp_path) == before, "echo and send wrote to disk"
    assert tree(cwd) == []


# --- (d) run: stages on stderr, QC as a table ------------------------------------------------


def test_run_shows_stages_and_a_qc_table(tmp_path: Path) -> None:
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=3, seed=5))
    home = tmp_path / "home"
    args = ["run", "denoise-classical", str(tmp_path / "ct"), "--home", str(home)]
    result = cli(*args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    stages = re.findall(r"stage (\d+)/(\d+) ([\w-]+)", result.stderr)
    assert [name for _, _, name in stages] == [
        "select",
        "check-domain",
        "load",
        "check-image",
        "fov",
        "predict",
        "score",
        "gate",
        "encode",
        "validate",
    ]
    assert all(total == str(len(stages)) for _, total, _ in stages)
    assert "QC (the same for all 6 output series)" in result.stdout
    assert re.search(r"│ input noise sigma\s+│\s+[0-9.]+ │", result.stdout)
    assert "{'" not in result.stdout, "no Python dict printed"

    as_json = cli(*args, "--out", str(tmp_path / "out2"), "--json")
    assert as_json.exit_code == 0, as_json.output
    parsed = json.loads(as_json.stdout)  # progress goes to stderr only
    qc = parsed["studies"][0]["qc"]
    assert len(qc) == 6 and all("input noise sigma" in figures for figures in qc.values())


def test_qc_tables_one_per_distinct_series() -> None:
    tables = qc_tables({"1.1": {"a": 1.23456}, "1.2": {"a": 2.0}, "1.3": {"a": 2.0}})
    assert [str(t.title) for t in tables] == ["QC of output series 1.1", "QC of output series 1.2, 1.3"]
    assert [t.row_count for t in tables] == [1, 1]
    assert qc_tables({}) == []


# --- (e) a bad config lists every problem ----------------------------------------------------


def test_bad_config_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nportt = 1\nport = "x"\n\n[outbox]\nmax_attempts = 0\n')
    before = tree(tmp_path)
    result = cli("studies", "--config", str(bad), "--home", str(tmp_path / "home"))
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert lines[0].startswith(f"config error: {bad}: node.port: ")
    assert lines[1] == (
        f"config error: {bad}: node.portt: unknown key (check spelling; see deploy/dicom-node.example.toml)"
    )
    assert lines[2].startswith(f"config error: {bad}: outbox.max_attempts: ")
    assert "more problem" not in result.stderr
    assert tree(tmp_path) == before


# --- (e) state that cannot be opened: one line, no traceback ---------------------------------


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "a-file"}"\n')
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm")
    result = cli(
        "run",
        "forward",
        str(ct),
        "--out",
        str(tmp_path / "out"),
        "--config",
        str(config),
        "--home",
        str(tmp_path / "h"),
    )
    assert result.exit_code == 1, result.output
    assert "cannot create the node's state" in result.stderr and "Not a directory" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.own_database  # the environment's URL is the subject: PostgreSQL mode would replace it
def test_a_bad_database_url_in_the_environment_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOM_NODE_DATABASE_URL", "postgres://node:s3cret@db/x")
    result = cli("studies", "--home", str(tmp_path / "h"))
    assert result.exit_code == 1, result.output
    assert (
        "DICOM_NODE_DATABASE_URL (or [storage] database_url): unknown database kind 'postgres'"
        in result.stderr
    )
    assert "s3cret" not in result.output
    assert not (tmp_path / "h").exists()


def test_attempts_of_an_unknown_delivery_say_so(node_home: Path) -> None:
    """Like `outbox retry`: an id that names no delivery is an error, not an empty table."""
    for args in (["outbox", "attempts", "99999"], ["outbox", "retry", "99999"]):
        result = cli(*args, "--home", str(node_home))
        assert result.exit_code == 1, result.output
        assert "no delivery 99999" in result.stderr
