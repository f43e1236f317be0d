"""The audit web pages in headless Chromium: log in, search a study, read its report;
a wrong password is refused; an operator cannot read the audit log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.conftest import add_user, audit_rows, node_config, require, wait_for_url
from tests.peers import STORESCU, NodeProcess, Orthanc, free_port, storescu

pytestmark = pytest.mark.integration


def test_auditor_logs_in_searches_and_reads_report(
    tmp_path: Path, orthanc: Orthanc, browser: WebDriver
) -> None:
    require(STORESCU)
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    study = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=10, seed=5))
    web_port = free_port()
    node = NodeProcess(tmp_path / "node", node_config(orthanc, stable_seconds=1), web_port=web_port).start()
    try:
        add_user(node, "alice", "auditor", "correct horse battery")
        add_user(node, "olga", "operator", "operator password")
        assert storescu(tmp_path / "ct", node.port, node.ae_title).returncode == 0
        node.wait_for(
            lambda: [j for j in node.cli_json("jobs") if j["state"] == "delivered"], what="delivered"
        )
        base = f"http://127.0.0.1:{web_port}"

        browser.get(base + "/audit")
        assert "/login" in browser.current_url
        browser.find_element(By.ID, "username").send_keys("alice")
        browser.find_element(By.ID, "password").send_keys("not the password")
        browser.find_element(By.ID, "sign-in").click()
        assert "Wrong user name or password" in browser.find_element(By.ID, "login-error").text

        browser.find_element(By.ID, "password").send_keys("correct horse battery")
        browser.find_element(By.ID, "sign-in").click()
        wait_for_url(browser, "/audit")
        assert browser.current_url.endswith("/audit")
        assert "alice (auditor)" in browser.page_source

        browser.find_element(By.ID, "study").send_keys(study.study_uid)
        browser.find_element(By.ID, "search").click()
        assert "record(s)" in browser.find_element(By.ID, "result-count").text
        links = browser.find_elements(By.CLASS_NAME, "study-link")
        assert links and all(link.text == study.study_uid for link in links)
        links[0].click()

        assert "Study report" in browser.title
        assert browser.find_element(By.ID, "received").text.startswith("10 instance(s)")
        assert "Job 1: forward" in browser.find_element(By.CLASS_NAME, "job").text
        assert "none (no learned model)" in browser.find_element(By.CLASS_NAME, "provenance").text
        assert [e.text for e in browser.find_elements(By.CLASS_NAME, "delivery-result")] == ["delivered"]

        browser.get(base + "/audit/chain")
        assert browser.find_element(By.ID, "chain-status").text.startswith("Intact")
        browser.find_element(By.ID, "logout").click()
        wait_for_url(browser, "/login")  # the logout POST lands before the next navigation
        browser.get(base + "/audit")
        assert "/login" in browser.current_url

        # An operator is turned away from the audit log.
        with httpx.Client(base_url=base, follow_redirects=False) as client:
            token = re.search(r'name="csrf_token" value="(\w+)"', client.get("/login").text)
            assert token is not None, "the login form carries its token"
            login = {"username": "olga", "password": "operator password", "csrf_token": token.group(1)}
            r = client.post("/login", data=login, headers={"Origin": base})
            assert r.status_code == 303
            assert client.get("/audit").status_code == 403
            assert client.get("/studies").status_code == 200

        logins = [(r[1], json.loads(r[5])["result"]) for r in audit_rows(node, "user-login")]
        assert (4, "refused") in logins and (0, "signed in") in logins
        used = audit_rows(node, "audit-log-used")
        assert {json.loads(r[5])["what"] for r in used} >= {"search", "report", "verify"}
    finally:
        node.stop()
