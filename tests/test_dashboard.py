"""The operator's pages: today's counts and queues on the home page, studies / jobs / outbox
paged and searchable, a job page with its states, gate reasons and deliveries, a delivery
page whose dead letter can be retried (form token required, audited with the operator).
Real uvicorn on loopback, httpx as the browser; SIMULATED CT slices (tests/test_api.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from dicom_node.db import schema as t
from dicom_node.lab.localpeers import free_port
from dicom_node.runtime import Runtime
from dicom_node.web.app import WebContext, create_app
from dicom_node.web.guard import TOKEN_FIELD
from dicom_node.web.server import WebServer
from dicom_node.web.users import UserStore
from tests.conftest import state_rows
from tests.test_api import PASSWORD, _refused_job, _seed


@dataclass
class Site:
    base: str
    home: Path
    rt: Runtime
    study_uid: str
    held: list[int]
    dead: int


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("dash")
    rt = Runtime.open(
        None,
        base / "home",
        {"destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}}},
    )
    UserStore(rt.db).add("olga", "operator", PASSWORD)
    UserStore(rt.db).add("alice", "auditor", PASSWORD)
    study_uid, held, dead = _seed(rt, base / "sim")
    port = free_port()
    server = WebServer(
        create_app(WebContext(rt.config, rt.db, rt.audit, rt.paths.checkpoint_file(rt.config))),
        "127.0.0.1",
        port,
    )
    server.start()
    try:
        yield Site(f"http://127.0.0.1:{port}", base / "home", rt, study_uid, held, dead)
    finally:
        server.stop()
        rt.close()


@contextmanager
def signed_in(site: Site, who: str = "olga") -> Iterator[httpx.Client]:
    with httpx.Client(base_url=site.base, timeout=30, follow_redirects=False) as browser:
        yield _sign_in(site, browser, who)


def _sign_in(site: Site, browser: httpx.Client, who: str) -> httpx.Client:
    token = re.search(rf'name="{TOKEN_FIELD}" value="([^"]+)"', browser.get("/login").text)
    assert token is not None
    answer = browser.post(
        "/login",
        data={"username": who, "password": PASSWORD, TOKEN_FIELD: token.group(1)},
        headers={"Origin": site.base},
    )
    assert answer.status_code == 303
    return browser


def form_token(html: str) -> str:
    found = re.search(rf'name="{TOKEN_FIELD}" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def test_the_home_page_shows_todays_counts_and_what_waits(site: Site) -> None:
    with signed_in(site) as browser:
        html = browser.get("/").text
    assert re.search(r'id="today-studies"><span class="n">1</span> studies received', html)
    assert re.search(r'id="today-instances"><span class="n">3</span> instances', html)
    assert re.search(r'id="today-jobs"><span class="n">3</span> jobs started', html)
    assert re.search(r'id="waiting-review"><span class="n">2</span> held for review', html)
    assert re.search(r'id="waiting-dead"><span class="n">1</span> dead letters', html)
    assert 'href="/outbox?state=dead"' in html and "held</a>: 2" in html and "dead</a>: 1" in html
    with signed_in(site, "alice") as auditor:
        assert "Search the audit log" in auditor.get("/").text, "an auditor keeps the audit home page"
        assert auditor.get("/outbox").status_code == 403


def test_jobs_are_searchable_and_a_job_page_shows_states_reasons_and_deliveries(site: Site) -> None:
    with signed_in(site) as browser:
        held = browser.get("/jobs", params={"state": "held"}).text
        assert all(f'id="job-{j}"' in held for j in site.held) and f'id="job-{site.held[-1] + 1}"' not in held
        bad = browser.get("/jobs", params={"state": "lost"})
        assert bad.status_code == 400 and "state: &#39;lost&#39; is not a job state" in bad.text
        page = browser.get(f"/jobs/{site.held[0]}").text
        assert f"Job #{site.held[0]} — held" in page
        assert "rule gate is review" in page and f'href="/review/{site.held[0]}"' in page
        assert browser.get("/jobs/424242").status_code == 404
        studies = browser.get("/studies", params={"patient": "no-such-patient"}).text
        assert 'id="none">No study matches' in studies
        assert site.study_uid in browser.get("/studies").text


def test_listings_page_older_rows(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dicom_node.web.app.PAGE", 2)
    with signed_in(site) as browser:
        first = browser.get("/jobs").text
        older = re.search(r'href="(/jobs\?cursor=\d+)" id="older"', first)
        assert older is not None
        second = browser.get(older.group(1).replace("&amp;", "&")).text
    ids = lambda html: [int(x) for x in re.findall(r'id="job-(\d+)"', html)]  # noqa: E731
    assert ids(first) + ids(second) == sorted(ids(first) + ids(second), reverse=True)
    assert len(ids(first)) == 2 and len(ids(second)) >= 1 and not set(ids(first)) & set(ids(second))


def test_a_dead_letter_is_opened_and_retried_with_the_form_token(site: Site) -> None:
    with signed_in(site) as browser:
        listing = browser.get("/outbox", params={"state": "dead"}).text
        assert f'id="delivery-{site.dead}"' in listing
        page = browser.get(f"/outbox/{site.dead}").text
        assert "association rejected (SIMULATED)" in page and 'id="retry"' in page
        assert 'http-equiv="refresh"' not in page, "a dead letter waits for a person"
        refused = browser.post(f"/outbox/{site.dead}/retry", headers={"Origin": site.base})
        assert refused.status_code == 403
        done = browser.post(
            f"/outbox/{site.dead}/retry", data={TOKEN_FIELD: form_token(page)}, headers={"Origin": site.base}
        )
        assert done.status_code == 303
        after = browser.get(done.headers["location"]).text
    assert "queued again" in after and 'id="state">pending' in after and 'http-equiv="refresh"' in after
    with site.rt.db.read() as conn:
        state = conn.execute(select(t.deliveries.c.state).where(t.deliveries.c.id == site.dead)).scalar_one()
    assert state == "pending"
    rows = state_rows(
        site.home,
        "select actor, facts from audit_events where event = 'delivery-attempt' order by seq",
        audit=True,
    )
    retried = [(a, json.loads(f)) for a, f in rows if "retry" in json.loads(f).get("action", "")]
    assert retried[-1][0] == "web:olga" and retried[-1][1]["delivery_id"] == site.dead


def test_metrics_count_gate_verdicts_refusals_and_model_loads(site: Site) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from audit import AuditEvent, Outcome

    site.rt.audit.record(
        AuditEvent.MODEL_LOADED,
        pipeline="restoration",
        model="ldct-restoration",
        version="1.3",
        load_seconds=0.42,
    )
    site.rt.audit.record(
        AuditEvent.INSTANCE_REJECTED,
        Outcome.SERIOUS_FAILURE,
        calling_ae="CT9",
        reason="free disk below the floor",
    )
    text = httpx.get(site.base + "/metrics", timeout=30).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("dicomnode_gate_verdicts_total", (("verdict", "held"),))] == 2
    assert samples[("dicomnode_instances_rejected_total", (("calling_ae", "CT9"),))] == 1
    loaded = (("model", "ldct-restoration"), ("pipeline", "restoration"), ("version", "1.3"))
    assert samples[("dicomnode_model_load_seconds", loaded)] == 0.42
    assert not [k for k in samples if k[0] == "dicomnode_associations_open"], "no receiver in this process"


def test_a_refused_job_is_run_again_from_its_page_with_the_form_token(site: Site) -> None:
    """Last in the module: it adds a job (the counts above are of the seeded three)."""
    job_id = _refused_job(site)  # a Site has the rt a Node has
    with signed_in(site) as browser:
        page = browser.get(f"/jobs/{job_id}").text
        assert f"Job #{job_id} — refused" in page and 'id="rerun"' in page
        assert 'id="rerun"' not in browser.get(f"/jobs/{site.held[0]}").text, "a held job is reviewed instead"
        refused = browser.post(f"/jobs/{job_id}/rerun", headers={"Origin": site.base})
        assert refused.status_code == 403
        done = browser.post(
            f"/jobs/{job_id}/rerun",
            data={TOKEN_FIELD: form_token(page), "reason": "pinned the older model"},
            headers={"Origin": site.base},
        )
        assert done.status_code == 303
        after = browser.get(done.headers["location"]).text
        assert f"Job #{job_id} — queued" in after and "queued again" in after and 'id="rerun"' not in after
        again = browser.post(
            f"/jobs/{job_id}/rerun", data={TOKEN_FIELD: form_token(after)}, headers={"Origin": site.base}
        )
        assert "Not run again: job" in browser.get(again.headers["location"]).text
    rows = state_rows(
        site.home,
        "select actor, facts from audit_events where event = 'job-transition' order by seq",
        audit=True,
    )
    with site.rt.db.write() as conn:  # an urgent rule's job says so in the listing and on its page
        conn.execute(t.jobs.update().where(t.jobs.c.id == job_id).values(urgency=1))
    with signed_in(site) as browser:
        listing = browser.get("/jobs", params={"state": "queued"}).text
        assert f'id="job-{job_id}"' in listing and 'class="urgent">urgent<' in listing
        assert 'class="urgent">urgent<' in browser.get(f"/jobs/{job_id}").text
    (rerun,) = [
        (a, json.loads(f)) for a, f in rows if json.loads(f).get("action") == "rerun requested by operator"
    ]
    assert rerun[0] == "web:olga" and rerun[1]["job_id"] == job_id
    assert "pinned the older model" in rerun[1]["reason"]
