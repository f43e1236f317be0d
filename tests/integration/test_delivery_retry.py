"""The PACS goes away during a delivery: the outbox retries with backoff and delivers once
it is back, without a duplicate series; a PACS that never comes back is dead-lettered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import audit_rows, db_rows, node_config, require
from tests.peers import STORESCU, NodeProcess, Orthanc, free_port, storescu

pytestmark = pytest.mark.integration


def test_orthanc_stopped_mid_delivery_is_retried_until_delivered(
    tmp_path: Path, orthanc: Orthanc, ct200: Path
) -> None:
    require(STORESCU)
    node = NodeProcess(
        tmp_path / "node", node_config(orthanc, stable_seconds=1, backoff=1, backoff_max=3)
    ).start()
    try:
        assert storescu(ct200, node.port, node.ae_title).returncode == 0
        node.wait_for(
            lambda: 0 < orthanc.statistics()["CountInstances"] < 200,
            timeout=120,
            every=0.02,
            what="delivery under way",
        )
        orthanc.kill()  # a graceful stop lets Orthanc finish the open association
        node.wait_for(
            lambda: (
                db_rows(node, "select count(*) from delivery_attempts where outcome = 'retry'")[0][0] >= 2
            ),
            timeout=60,
            what="two failed attempts",
        )
        (state, attempts, last_error) = db_rows(node, "select state, attempts, last_error from deliveries")[0]
        assert state in ("pending", "sending") and attempts >= 2
        assert "cannot connect" in last_error or "aborted" in last_error or "lost" in last_error
        assert db_rows(node, "select state from jobs")[0][0] == "delivering"

        orthanc.start()  # same storage, same ports
        node.wait_for(
            lambda: db_rows(node, "select state from jobs")[0][0] == "delivered", timeout=60, what="delivered"
        )
        study_uid = db_rows(node, "select study_uid from studies")[0][0]
        series = orthanc.series_of_study(study_uid)
        assert len(series) == 1, "no duplicate series"
        assert len(series[0]["Instances"]) == 200

        rows = db_rows(node, "select started_at, finished_at, outcome from delivery_attempts order by id")
        outcomes = [r[2] for r in rows]
        assert outcomes[-1] == "delivered" and outcomes.count("retry") >= 2
        # Backoff: each retry starts no sooner than the configured delay after the previous failure.
        for prev, nxt in zip(rows, rows[1:], strict=False):
            if prev[2] == "retry":
                assert nxt[0] - prev[1] >= 0.9
        events = [json.loads(r[5]) for r in audit_rows(node, "delivery-attempt")]
        assert [e["result"] for e in events].count("retry") >= 2 and events[-1]["result"] == "delivered"
    finally:
        node.stop()


def test_unreachable_destination_is_dead_lettered_and_can_be_retried(tmp_path: Path, ct50: Path) -> None:
    require(STORESCU)
    port = free_port()  # nobody listens here
    config = (
        node_config(stable_seconds=1, backoff=0.2, backoff_max=0.5, max_attempts=3, policy=True)
        + f"""
[destinations.pacs]
ae_title = "NOBODY"
host = "127.0.0.1"
port = {port}
"""
    )
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        assert storescu(ct50, node.port, node.ae_title).returncode == 0
        node.wait_for(
            lambda: db_rows(node, "select state from deliveries") == [("dead",)],
            timeout=60,
            what="dead letter",
        )
        assert db_rows(node, "select state, reason from jobs")[0][0] == "failed"
        assert db_rows(node, "select count(*) from delivery_attempts")[0][0] == 3
        assert audit_rows(node, "delivery-dead-letter")
        listing = node.cli_json("outbox")
        assert listing[0]["state"] == "dead" and "cannot connect" in listing[0]["last_error"]

        retried = node.cli("outbox", "retry", str(listing[0]["id"]))
        assert "queued again" in retried.stdout
        node.wait_for(
            lambda: db_rows(node, "select count(*) from delivery_attempts")[0][0] >= 4,
            timeout=30,
            what="new attempt",
        )
        bad = node.cli("outbox", "retry", "999", check=False)
        assert bad.returncode == 1 and "no delivery 999" in bad.stderr
    finally:
        node.stop()
