"""Issue 15, item 5 end to end: a held job is not delivered by a POST from another site,
even with the operator's valid session (and the form's own token); the operator's own
approve from the review page, with its token, delivers it.

The study is a SIMULATED 4-slice CT; the rule forwards it to Orthanc behind the review gate.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from dicom_node.web.guard import TOKEN_FIELD
from tests.conftest import add_user, audit_rows, db_rows, node_config, require
from tests.peers import STORESCU, NodeProcess, Orthanc, free_port, policy_yaml, storescu

pytestmark = pytest.mark.integration


def token_on(client: httpx.Client, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text[:300]
    found = re.search(rf'name="{TOKEN_FIELD}" value="([0-9a-f]+)"', page.text)
    assert found, f"no form token on {path}"
    return found.group(1)


def test_cross_origin_approve_is_refused_and_the_own_form_delivers(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=4, seed=15))
    web_port = free_port()
    node = NodeProcess(
        tmp_path / "node",
        node_config(orthanc, stable_seconds=1),
        web_port=web_port,
        policy=policy_yaml("forward", gate="review", name="needs-review"),
    ).start()
    try:
        add_user(node, "olga", "operator", "operator password")
        assert storescu(tmp_path / "ct", node.port, node.ae_title).returncode == 0
        node.wait_for(lambda: db_rows(node, "select id, state from jobs") == [(1, "held")], what="held")
        base = f"http://127.0.0.1:{web_port}"

        with httpx.Client(base_url=base, follow_redirects=False, timeout=30) as client:
            login = {
                "username": "olga",
                "password": "operator password",
                TOKEN_FIELD: token_on(client, "/login"),
            }
            assert client.post("/login", data=login, headers={"Origin": base}).status_code == 303
            token = token_on(client, "/review/1")  # the approve form's token, valid for this session

            for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}):
                r = client.post("/review/1/approve", data={"note": "x", TOKEN_FIELD: token}, headers=headers)
                assert r.status_code == 403, headers
                assert r.text.startswith("Refused: ")
            r = client.post("/review/1/approve", data={"note": "no token"}, headers={"Origin": base})
            assert r.status_code == 403 and "token" in r.text

            time.sleep(2)  # long enough for a delivery that should not exist to be claimed
            assert db_rows(node, "select state from jobs") == [("held",)]
            assert db_rows(node, "select count(*) from deliveries") == [(0,)]
            assert orthanc.statistics()["CountInstances"] == 0
            assert audit_rows(node, "review-approved") == []
            alerts = [json.loads(r[5]) for r in audit_rows(node, "security-alert")]
            assert [a["path"] for a in alerts] == ["/review/1/approve"] * 3
            assert all(a["reason"].startswith("cross-site request refused") for a in alerts)

            r = client.post(
                "/review/1/approve", data={"note": "same site", TOKEN_FIELD: token}, headers={"Origin": base}
            )
            assert r.status_code == 303 and r.headers["location"].startswith(
                "/review?message=Job%201%20approved"
            )
        node.wait_for(lambda: db_rows(node, "select state from jobs") == [("delivered",)], what="delivered")
        assert orthanc.statistics()["CountInstances"] == 4
        assert len(audit_rows(node, "review-approved")) == 1
    finally:
        node.stop()
