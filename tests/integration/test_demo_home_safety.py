"""`dicom-node demo` never touches a node it did not make (dicom_node/lab/demo_home.py).

The refusal tests are fast: the "existing node" is a home opened once through the runtime
(migrated databases, an audit record, a stored file, a config and a policy), not a demo run.
Only the last test runs the demo itself, against the local peers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from audit import AuditEvent
from dicom_node.lab.demo_home import MARKER, HomeNotTheDemos, claim_home
from dicom_node.runtime import Runtime
from dicom_node.serve import ServeLock
from tests.conftest import require
from tests.peers import STORESCU

# the demo's embedded defaults (SQLite in the home), whatever --database says
pytestmark = pytest.mark.own_database

NODE_CONFIG = '# a real site\'s config\n[node]\nae_title = "SITE_NODE"\n\n[policy]\nfile = "policy.yaml"\n'


def fingerprint(root: Path) -> dict[str, tuple[int, str] | None]:
    """Every path under ``root``: (size, sha256) of each file, None for each directory."""
    found: dict[str, tuple[int, str] | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            found[rel] = None
        else:
            data = path.read_bytes()
            found[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return found


def make_node_home(home: Path) -> Path:
    """A node's home as `serve` leaves it: databases, an audit record, a study, config, policy."""
    runtime = Runtime.open(None, home)
    runtime.audit.record(AuditEvent.AUDIT_LOG_USED, actor="test", what="a record the demo must keep")
    stored = runtime.paths.studies / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    runtime.close()
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"\0" * 128 + b"DICM" + b"a stored instance")
    (home / "dicom-node.toml").write_text(NODE_CONFIG)
    (home / "policy.yaml").write_text("mode: first-match\nrules: []\n")
    return home


def demo_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", "demo", *args], capture_output=True, text=True, timeout=timeout
    )


def test_demo_refuses_an_existing_node_and_changes_nothing(tmp_path: Path) -> None:
    home = make_node_home(tmp_path / "site")
    before = fingerprint(tmp_path)

    result = demo_cli("--home", str(home))

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"error: demo: {home} holds a node the demo did not make "
        "(var/node.db, var/audit.db, var/data/studies, dicom-node.toml, policy.yaml): "
        "use a new or empty --home, or pass --fresh to move it aside"
    )
    assert "(nothing is deleted)" in result.stderr
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize(
    "leftover",
    ["dicom-node.toml", "policy.yaml", "var/audit.db"],
    ids=["config only", "policy only", "audit log only"],
)
def test_any_state_it_did_not_write_is_refused(tmp_path: Path, leftover: str) -> None:
    home = tmp_path / "home"
    (home / leftover).parent.mkdir(parents=True, exist_ok=True)
    (home / leftover).write_text("someone else's")
    before = fingerprint(tmp_path)
    with pytest.raises(HomeNotTheDemos, match=f"did not make \\({leftover}\\)"):
        claim_home(home)
    assert fingerprint(tmp_path) == before


def test_fresh_moves_the_node_aside_and_deletes_nothing(tmp_path: Path) -> None:
    home = make_node_home(tmp_path / "site")
    (home / "notes.txt").write_text("not the demo's business")
    before = fingerprint(home)

    claimed = claim_home(home, fresh=True, now=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))

    aside = home / "before-demo-20260102T030405Z"
    assert claimed.moved_aside == aside
    assert claimed.moved == ("var", "dicom-node.toml", "policy.yaml")
    moved = {
        str(Path(p).relative_to(aside.name)): v
        for p, v in fingerprint(home).items()
        if p.startswith(aside.name + "/")
    }
    assert moved == {p: v for p, v in before.items() if p != "notes.txt"}, (
        "every byte kept, audit log included"
    )
    assert sorted(p.name for p in home.iterdir()) == [MARKER, aside.name, "notes.txt"]
    assert (home / "notes.txt").read_text() == "not the demo's business"

    again = claim_home(home, fresh=True, now=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    assert again.moved_aside is None, "the home is the demo's now: nothing more to move"


def test_a_home_the_demo_made_is_cleared_and_reused(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    assert claim_home(home).moved_aside is None
    assert (home / MARKER).is_file()
    for leftover in ("var/node.db", "var/audit.db", "minipacs/x.dcm", "orthanc-demo_pacs/db/x"):
        (home / leftover).parent.mkdir(parents=True, exist_ok=True)
        (home / leftover).write_text("the last demo run's")
    (home / "dicom-node.toml").write_text("# Written by `dicom-node demo`\n")
    (home / "before-demo-20260102T030405Z").mkdir()

    claimed = claim_home(home)

    assert claimed.moved_aside is None
    assert not (home / "var").exists() and not (home / "minipacs").exists()
    assert not (home / "orthanc-demo_pacs").exists()
    assert (home / "before-demo-20260102T030405Z").is_dir(), "what --fresh moved aside stays"


def test_a_running_node_is_never_moved(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    home = make_node_home(tmp_path / "site")
    lock = ServeLock(home / "var" / "run" / "serve.pid", home).acquire()  # as a live serve holds it
    request.addfinalizer(lock.release)
    before = fingerprint(tmp_path)
    for marked in (False, True):
        if marked:
            (home / MARKER).write_text("")
            before = fingerprint(tmp_path)
        with pytest.raises(
            HomeNotTheDemos, match=f"pid {os.getpid()}.*stop it first or use a different --home"
        ):
            claim_home(home, fresh=True)
        assert fingerprint(tmp_path) == before


def test_a_file_is_no_home(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(HomeNotTheDemos, match="is a file, not a directory"):
        claim_home(tmp_path / "file", fresh=True)


@pytest.mark.integration
def test_fresh_demo_runs_and_reruns_keeping_the_old_node(tmp_path: Path) -> None:
    require(STORESCU)
    home = make_node_home(tmp_path / "site")
    old_audit = (home / "var" / "audit.db").read_bytes()
    args = ("--home", str(home), "--pipeline", "forward", "--slices", "2", "--size", "64")

    first = demo_cli(*args, "--fresh", timeout=300)

    assert first.returncode == 0, first.stdout + first.stderr
    (aside,) = home.glob("before-demo-*")
    assert (
        f"--fresh: moved var, dicom-node.toml, policy.yaml from {home} to {aside} (nothing was deleted)"
        in (first.stdout)
    )
    assert (aside / "var" / "audit.db").read_bytes() == old_audit
    assert (aside / "dicom-node.toml").read_text() == NODE_CONFIG

    second = demo_cli(*args, timeout=300)  # the demo's own home now: reused without --fresh

    assert second.returncode == 0, second.stdout + second.stderr
    assert "job 1 ran `forward`" in second.stdout, "a clean var/ again"
    assert list(home.glob("before-demo-*")) == [aside]
    assert (aside / "var" / "audit.db").read_bytes() == old_audit
