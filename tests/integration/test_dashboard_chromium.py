"""The operator runs the node from the dashboard, in headless Chromium: a study's delivery
dead-letters while the PACS (Orthanc) is down; the operator signs in, sees today's counts
and the dead letter, opens it, retries it once the PACS is back, and watches the page
(which reloads itself, no script) turn to delivered. SIMULATED CT slices."""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import add_user, node_config, require, wait_for_url
from tests.peers import STORESCU, NodeProcess, Orthanc, free_port, storescu

pytestmark = pytest.mark.integration


def test_operator_retries_a_dead_letter_from_the_dashboard_and_watches_it_delivered(
    tmp_path: Path, browser: WebDriver
) -> None:
    require(STORESCU)
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    sim = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=4, seed=41))
    pacs = Orthanc(tmp_path)  # its ports are chosen; it is not started yet: the PACS is down
    web_port = free_port()
    config = node_config(pacs, stable_seconds=1, backoff=0.2, backoff_max=0.5, max_attempts=2)
    node = NodeProcess(tmp_path / "node", config, web_port=web_port).start()
    try:
        add_user(node, "olga", "operator", "operator password")
        assert storescu(tmp_path / "ct", node.port, node.ae_title).returncode == 0
        (dead,) = node.wait_for(lambda: node.cli_json("outbox", "--state", "dead"), what="a dead letter")
        pacs.start()
        base = f"http://127.0.0.1:{web_port}"

        browser.get(base + "/")
        browser.find_element(By.ID, "username").send_keys("olga")
        browser.find_element(By.ID, "password").send_keys("operator password")
        browser.find_element(By.ID, "sign-in").click()
        wait_for_url(browser, "/")

        def tile(name: str) -> str:
            return " ".join(browser.find_element(By.ID, name).text.split())

        assert tile("today-studies") == "1 studies received"
        assert tile("today-instances").startswith("4 instances")
        assert tile("waiting-dead") == "1 dead letters"

        browser.find_element(By.ID, "waiting-dead").click()
        wait_for_url(browser, "/outbox?state=dead")
        browser.find_element(By.ID, f"delivery-{dead['id']}").click()
        wait_for_url(browser, f"/outbox/{dead['id']}")
        assert browser.find_element(By.ID, "state").text == "dead"
        assert browser.find_element(By.ID, "last-error").text, "the page says why it died"

        browser.find_element(By.ID, "retry").click()
        WebDriverWait(browser, 15).until(lambda b: "queued again" in b.page_source)
        WebDriverWait(browser, 90, poll_frequency=1).until(
            lambda b: b.find_element(By.ID, "state").text == "delivered"
        )
        assert browser.find_element(By.ID, "delivered").text
        assert len(pacs.instances_of_series(sim.series_uid)) == 4
        retried = node.cli_json("audit", "search", "--event", "delivery-attempt")
        assert any(r.get("actor") == "web:olga" for r in retried), "the retry is audited with the operator"
    finally:
        node.stop()
        pacs.stop()
