"""Unit tests for dicom_node.config: defaults, precedence, one-line errors, per-caller settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.config import CONFIG_FILENAME, ConfigError, LoadedConfig, NodeConfig, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent

DESTINATION_PACS = """
[destinations.pacs]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    """Load ``path``, expect a ConfigError, return its message."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# --- defaults and precedence -------------------------------------------------------------------


def test_no_file_gives_embedded_defaults() -> None:
    loaded = load_config()
    assert isinstance(loaded, LoadedConfig)
    assert loaded.source is None
    cfg = loaded.config
    assert cfg.node.ae_title == "DICOM_NODE"
    assert cfg.node.port == 11112
    assert cfg.node.host == "127.0.0.1"
    assert cfg.completeness.stable_seconds == 30.0
    assert cfg.workers.processes == 1
    assert cfg.policy.file is None
    assert cfg.destinations == {}


def test_home_without_file_gives_defaults(tmp_path: Path) -> None:
    loaded = load_config(path=None, home=tmp_path)
    assert loaded.source is None
    assert loaded.config.node.port == 11112


def test_home_file_is_picked_up_when_no_path(tmp_path: Path) -> None:
    home_file = write(tmp_path / CONFIG_FILENAME, '[node]\nae_title = "FROM_HOME"\nport = 2000\n')
    loaded = load_config(path=None, home=tmp_path)
    assert loaded.source == home_file
    assert loaded.config.node.ae_title == "FROM_HOME"
    assert loaded.config.node.port == 2000
    # keys the file does not set keep their defaults
    assert loaded.config.node.host == "127.0.0.1"


def test_explicit_path_wins_over_home_file(tmp_path: Path) -> None:
    write(tmp_path / CONFIG_FILENAME, "[node]\nport = 2000\n")
    explicit = write(tmp_path / "other.toml", "[node]\nport = 3000\n")
    loaded = load_config(path=explicit, home=tmp_path)
    assert loaded.source == explicit
    assert loaded.config.node.port == 3000


def test_overrides_beat_the_file_and_keep_other_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[node]\nae_title = "FILE_AE"\nport = 2000\n')
    loaded = load_config(path, overrides={"node": {"port": 4242}})
    assert loaded.config.node.port == 4242
    assert loaded.config.node.ae_title == "FILE_AE"


def test_overrides_apply_without_a_file() -> None:
    loaded = load_config(overrides={"node": {"port": 4242}, "workers": {"processes": 3}})
    assert loaded.config.node.port == 4242
    assert loaded.config.workers.processes == 3
    assert loaded.config.node.ae_title == "DICOM_NODE"


def test_bad_override_is_reported_as_config() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"node": {"port": 0}})
    message = str(info.value)
    assert message.startswith("config: node.port:")
    assert "\n" not in message


def test_ae_title_is_stripped(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[node]\nae_title = "  CT_NODE "\n')
    assert load_config(path).config.node.ae_title == "CT_NODE"


def test_full_config_with_destination_and_policy(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        DESTINATION_PACS + '\n[policy]\nfile = "/etc/dicom-node/policy.yaml"\nreload_seconds = 5\n',
    )
    cfg = load_config(path).config
    assert cfg.destinations["pacs"].port == 4242
    assert cfg.destinations["pacs"].profile == "pacs"
    assert cfg.policy.file == "/etc/dicom-node/policy.yaml"
    assert cfg.policy.reload_seconds == 5


def test_config_is_frozen() -> None:
    cfg = load_config().config
    with pytest.raises(ValueError, match="frozen"):
        cfg.node.port = 1  # type: ignore[misc]


# --- bad configs: one line, names the key and the problem --------------------------------------


BAD_CONFIGS = [
    pytest.param("[node]\nportt = 1\n", ["node.portt", "unknown key"], id="unknown-key"),
    pytest.param("[nodes]\nport = 1\n", ["nodes", "unknown key"], id="unknown-section"),
    pytest.param("[node]\nport = 70000\n", ["node.port", "65535"], id="port-too-big"),
    pytest.param("[node]\nport = 0\n", ["node.port", "greater than or equal to 1"], id="port-zero"),
    pytest.param('[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', ["node.ae_title", "AE title"], id="ae-17-chars"),
    pytest.param('[node]\nae_title = "AB\\\\CD"\n', ["node.ae_title", "backslash"], id="ae-backslash"),
    pytest.param('[node]\nae_title = "   "\n', ["node.ae_title", "AE title"], id="ae-blank"),
    pytest.param(
        '[[routes]]\npipeline = "forward"\n',
        ["[[routes]] moved to a policy file", "[policy] file"],
        id="old-routes-table",
    ),
    pytest.param(
        "[policy]\nreload_seconds = 0\n", ["policy.reload_seconds", "greater than 0"], id="policy-reload"
    ),
    pytest.param("[node\nport = 1\n", ["not valid TOML"], id="toml-syntax"),
    pytest.param("[node]\nport = \n", ["not valid TOML"], id="toml-missing-value"),
    pytest.param(
        '[completeness]\nstable_seconds = "soon"\n',
        ["completeness.stable_seconds", "valid number", "'soon'"],
        id="wrong-type",
    ),
    pytest.param(
        "[completeness]\nstable_seconds = -5\n",
        ["completeness.stable_seconds", "greater than 0", "-5"],
        id="negative-stable-seconds",
    ),
    pytest.param(
        DESTINATION_PACS + 'profile = "ris"\n',
        ["destinations.pacs.profile", "'pacs' or 'tps'", "'ris'"],
        id="bad-profile",
    ),
    pytest.param(
        '[destinations.pacs]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n',
        ["destinations.pacs.port", "required"],
        id="destination-missing-port",
    ),
    pytest.param(
        '[[callers]]\nae_title = "CT1"\nstable_seconds = 0\n',
        ["callers[0].stable_seconds", "greater than 0"],
        id="caller-zero-stable-seconds",
    ),
    pytest.param('[logging]\nlevel = "LOUD"\n', ["logging.level", "'LOUD'"], id="bad-log-level"),
    pytest.param("[workers]\nprocesses = 65\n", ["workers.processes", "64"], id="too-many-workers"),
    pytest.param('[node]\nuid_root = "abc"\n', ["node.uid_root", "not a valid UID prefix"], id="uid-root"),
    pytest.param(
        '[node]\nuid_root = "1.2.826.0.1.3680043.8.498.123456789012345678901234567890"\n',
        ["node.uid_root", "fewer than 10 digits"],
        id="uid-root-too-long",
    ),
    pytest.param(
        '[storage]\ndatabase_url = "not a url"\n', ["storage.database_url", "not a database URL"], id="db-url"
    ),
    pytest.param(
        '[storage]\naudit_database_url = "foo://bar"\n',
        ["storage.audit_database_url", "unknown database kind 'foo'"],
        id="audit-db-kind",
    ),
    pytest.param(
        '[models]\npin = {restoration = "MODELS/sct-head/1.0"}\n',
        ["pin.restoration", "holds model 'sct-head', not 'ldct-restoration'"],
        id="pin-another-model",
    ),
    pytest.param(
        '[models]\npin = {synthesis = "MODELS/synthesis-t1w-to-t2w/1.0"}\n',
        ["pin.synthesis", "holds model 'synthesis-t1w-to-t2w', not 'synthesis-t1w-t2w-to-flair'"],
        id="pin-another-task",
    ),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_CONFIGS)
def test_bad_config_is_one_line_naming_key_and_problem(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    from models.zoo import ZOO

    path = write(tmp_path / "bad.toml", text.replace("MODELS/", f"{ZOO}/"))
    message = config_error(path)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_several_problems_are_each_named(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", "[node]\nportt = 1\nhostt = 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p.split(": ")[:2] for p in info.value.problems] == [
        [str(path), "node.portt"],
        [str(path), "node.hostt"],
    ]
    assert all("unknown key" in p for p in info.value.problems)
    message = str(info.value)
    assert "node.portt: unknown key" in message and "node.hostt: unknown key" in message
    assert "more problem" not in message
    assert "\n" not in message


def test_invalid_utf8_is_not_valid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\xff\xfe[node]\n")
    message = config_error(path)
    assert "not valid TOML" in message
    assert "\n" not in message


def test_missing_file_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist.toml"
    message = config_error(path)
    assert message == f"{path}: cannot read config file: No such file or directory"


def test_directory_as_config_cannot_be_read(tmp_path: Path) -> None:
    message = config_error(tmp_path)
    assert message.startswith(f"{tmp_path}: cannot read config file:")
    assert "\n" not in message


def test_unknown_key_with_newline_still_gives_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", '[node]\n"port\\nx" = 1\n')
    message = config_error(path)
    assert "unknown key" in message
    assert "\n" not in message


# --- per-caller completeness -------------------------------------------------------------------


def test_stable_seconds_for_callers(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        """
[completeness]
stable_seconds = 45

[[callers]]
ae_title = "CT_SCANNER"
stable_seconds = 5

[[callers]]
ae_title = "MR_SCANNER"
stable_seconds = 120.5

[[callers]]
ae_title = "PET"
hosts = ["10.0.0.7"]
""",
    )
    cfg = load_config(path).config
    assert cfg.stable_seconds_for("CT_SCANNER") == 5
    assert cfg.stable_seconds_for("MR_SCANNER") == 120.5
    assert cfg.stable_seconds_for("PET") == 45  # known caller without an override
    assert cfg.stable_seconds_for("UNKNOWN") == 45
    assert cfg.stable_seconds_for(None) == 45
    assert cfg.stable_seconds_for("") == 45
    pet = cfg.caller("PET")
    assert pet is not None and pet.hosts == ("10.0.0.7",)
    assert cfg.caller("UNKNOWN") is None


def test_stable_seconds_for_defaults() -> None:
    assert NodeConfig().stable_seconds_for("ANY") == 30.0


# --- sha256 ------------------------------------------------------------------------------------


def test_sha256_is_stable_for_the_same_file_and_differs_between_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", "[node]\nport = 2000\n")
    b = write(tmp_path / "b.toml", "[node]\nport = 2001\n")
    first, again = load_config(a).sha256, load_config(a).sha256
    other = load_config(b).sha256
    assert first == again
    assert first != other
    assert len(first) == 64 and all(c in "0123456789abcdef" for c in first)


def test_sha256_same_for_same_content_via_home_or_path(tmp_path: Path) -> None:
    home_file = write(tmp_path / CONFIG_FILENAME, "[node]\nport = 2000\n")
    assert load_config(home=tmp_path).sha256 == load_config(home_file).sha256


def test_sha256_reflects_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "a.toml", "[node]\nport = 2000\n")
    plain = load_config(path).sha256
    overridden = load_config(path, overrides={"node": {"port": 4242}})
    assert overridden.sha256 != plain
    assert overridden.sha256 == load_config(path, overrides={"node": {"port": 4242}}).sha256


def test_sha256_of_defaults_is_stable() -> None:
    assert load_config().sha256 == load_config().sha256


# --- the CLI maps ConfigError to exit code 2 ---------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_config_error_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", "[node]\nportt = 1\n")
    result = run_cli("studies", "--home", str(tmp_path), "--config", str(bad))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error:")
    assert "node.portt" in lines[0] and "unknown key" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_config_error_with_brackets_in_value_exits_2(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", '[node]\nport = "[/x]"\n')
    result = run_cli("studies", "--home", str(tmp_path), "--config", str(bad))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error:")
    assert "'[/x]'" in lines[0]


def test_a_database_url_is_never_echoed(tmp_path: Path) -> None:
    """ "postgres://" is not a SQLAlchemy name (it is "postgresql"): a common slip, and the URL
    holds the password."""
    path = write(tmp_path / "bad.toml", '[storage]\ndatabase_url = "postgres://node:s3cret@db/x"\n')
    message = config_error(path)
    assert "storage.database_url: unknown database kind 'postgres'" in message
    assert "s3cret" not in message


def test_a_model_card_that_is_not_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "card.json").write_text("{ not json")
    path = write(tmp_path / "bad.toml", f'[models]\npin = {{restoration = "{tmp_path / "m"}"}}\n')
    message = config_error(path)
    assert "pin.restoration: model card" in message and "is not valid JSON" in message
