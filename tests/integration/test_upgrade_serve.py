"""An upgrade in place, end to end: ``serve`` of this release starts on a home whose index
is at the schema of the 2026-12-05 release (0009), with a delivery still pending to a PACS
that was down and a job held for review. The schema migrates at start, the pending delivery
goes out once the PACS is back, the held job can be approved and is delivered, and the
audit log still verifies.

The old home is made without old code (CI may have no history): this release fills it,
and the Alembic downgrade to 0009 gives its index the old release's shape (the later
migrations only add columns and tables)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig

from dicom_node.db.engine import MIGRATIONS
from dicom_node.lab.simulate import write_ct_series
from models.sim.phantom import PhantomSpec
from tests.conftest import require
from tests.peers import STORESCP, STORESCU, DcmtkStoreSCP, NodeProcess, free_port, storescu

# a node on SQLite files in its home, whose index the test takes back to 0009
pytestmark = [pytest.mark.integration, pytest.mark.own_database]

POLICY = """version: 1
mode: first-match
rules:
  - name: auto
    match: {calling_ae: [SCAN_A]}
    pipeline: forward
    destinations: [pacs]
    gate: auto
  - name: reviewed
    match: {calling_ae: [SCAN_B]}
    pipeline: forward
    destinations: [pacs]
    gate: review
"""


def _config(pacs_port: int) -> str:
    return f"""
[completeness]
stable_seconds = 1.0
[outbox]
backoff_initial_seconds = 1.0
backoff_max_seconds = 2.0
max_attempts = 100
[workers]
poll_seconds = 0.2
lease_seconds = 30
[policy]
file = "policy.yaml"
[destinations.pacs]
ae_title = "STORESCP"
host = "127.0.0.1"
port = {pacs_port}
timeout_seconds = 2
"""


def _rows(node: NodeProcess, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    with sqlite3.connect(node.home / "var" / "node.db") as conn:
        return conn.execute(sql).fetchall()


def test_serve_upgrades_an_old_home_and_finishes_its_work(tmp_path: Path) -> None:
    require(STORESCU, STORESCP)
    studies = {}
    for ae, seed in (("SCAN_A", 1), ("SCAN_B", 2)):
        studies[ae] = tmp_path / ae
        write_ct_series(
            studies[ae], PhantomSpec(rows=64, columns=64, slices=3, seed=seed), patient_id=f"UPG{seed}"
        )
    pacs = DcmtkStoreSCP(tmp_path / "pacs", port=free_port())  # down for now
    node = NodeProcess(tmp_path / "node", _config(pacs.port), policy=POLICY)

    node.start()  # the node before the upgrade
    try:
        for ae, folder in studies.items():
            assert storescu(folder, node.port, node.ae_title, calling=ae).returncode == 0
        node.wait_for(
            lambda: (
                sorted(_rows(node, "select rule, state from jobs"))
                == [("auto", "delivering"), ("reviewed", "held")]
                and _rows(node, "select max(attempts) from deliveries")[0][0]
            ),
            timeout=60,
            what="a delivery retrying and a held job",
        )
    finally:
        node.stop()
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", f"sqlite:///{node.home / 'var' / 'node.db'}")
    command.downgrade(cfg, "0009")
    assert _rows(node, "select version_num from alembic_version") == [("0009",)]
    assert "purged_at" not in {r[1] for r in _rows(node, "pragma table_info(studies)")}
    pending = _rows(node, "select id, attempts from deliveries where state = 'pending'")
    assert len(pending) == 1 and pending[0][1] >= 1

    pacs.start()
    node.start()  # the upgrade
    try:
        assert _rows(node, "select version_num from alembic_version") != [("0009",)]
        held = _rows(node, "select id from jobs where state = 'held'")[0][0]
        approved = node.cli("review", "approve", str(held), "--reviewer", "physicist")
        assert "approved" in approved.stdout
        node.wait_for(
            lambda: _rows(node, "select distinct state from jobs") == [("delivered",)],
            timeout=40,
            what="both jobs delivered",
        )
        assert len([f for f in pacs.dir.rglob("*") if f.is_file()]) == 6  # 3 slices, 2 studies
        assert "intact" in node.cli("audit", "verify").stdout
    finally:
        node.stop()
        pacs.stop()
