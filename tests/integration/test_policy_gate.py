"""Issue 6 end to end: the QC gate holds an output with an invented structure until a person
approves it (and a rejected one never arrives), shadow mode sends nothing, ``policy
explain`` names the deciding condition, a bad policy edit is refused while the old policy
keeps working, and the review page works in headless Chromium.

The studies are SIMULATED low-dose CTs; the invented structure is the pipeline's gate fire
drill (rule option ``inject_hallucination_hu``: a 6 mm disc the input does not contain).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from policies.loader import load_policy
from tests.conftest import add_user, audit_rows, db_rows, node_config, require, state_rows, wait_for_url
from tests.peers import STORESCU, NodeProcess, Orthanc, free_port, policy_yaml, storescu

pytestmark = pytest.mark.integration

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
LOW_DOSE_CT = {"modality": "CT", "attributes": [{"keyword": "CTDIvol", "op": "<", "value": 5.0}]}


def default_qc() -> dict[str, Any]:
    """The shipped default policy's QC limits for low-dose CT (the fire drill uses them)."""
    rule = load_policy(DEFAULT_POLICY).policy.rules[0]
    return {k: v for k, v in rule.qc.model_dump().items() if v is not None}


def simulate(out: Path, seed: int, slices: int = 6, dose: float = 0.25) -> Path:
    made = subprocess.run(
        [sys.executable, "-m", "dicom_node", "simulate", "ldct", "--out", str(out)]
        + ["--slices", str(slices), "--size", "256", "--dose", str(dose), "--seed", str(seed)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    return out / "low-dose"


def study_uid_of(series_dir: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(series_dir.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def job_states(node: NodeProcess) -> dict[int, str]:
    return dict(db_rows(node, "select id, state from jobs"))


def facts(node: NodeProcess, event: str) -> list[dict[str, Any]]:
    return [json.loads(r[5]) for r in audit_rows(node, event)]


def actors(node: NodeProcess, event: str) -> list[str]:
    return [
        r[0]
        for r in state_rows(node.home, "select actor from audit_events where event = ?", (event,), audit=True)
    ]


def test_injected_hallucination_is_held_until_approved_and_a_rejected_one_never_arrives(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    require(STORESCU)
    first = simulate(tmp_path / "a", seed=21)
    second = simulate(tmp_path / "b", seed=22)
    policy = policy_yaml(
        "restoration",
        name="ldct-fire-drill",
        match=LOW_DOSE_CT,
        qc=default_qc(),
        options={"inject_hallucination_hu": 200},
    )
    node = NodeProcess(tmp_path / "node", node_config(orthanc, stable_seconds=1), policy=policy).start()
    try:
        assert storescu(first, node.port, node.ae_title, calling="CT_LOWDOSE").returncode == 0
        node.wait_for(lambda: job_states(node) == {1: "held"}, timeout=240, what="job 1 held")
        reason = db_rows(node, "select reason from jobs where id = 1")[0][0]
        assert "largest suspect region" in reason, reason

        held = node.cli_json("review", "list")
        assert [j["id"] for j in held] == [1] and held[0]["rule"] == "ldct-fire-drill"
        shown = node.cli_json("review", "show", "1", "--png", str(tmp_path / "png"))
        assert shown["qc"]["largest suspect region"] > default_qc()["max_suspect_region_ml"]
        assert {o["kind"] for o in shown["outputs"]} >= {"derived", "uncertainty", "hallucination"}
        for kind in ("derived", "uncertainty", "hallucination"):
            assert (tmp_path / "png" / f"job1-{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        time.sleep(3)  # several outbox polls: a held job must not send anything
        assert orthanc.statistics()["CountInstances"] == 0
        assert db_rows(node, "select count(*) from deliveries") == [(0,)]

        approved = node.cli("review", "approve", "1", "--reviewer", "dr-physicist", "--note", "drill")
        assert "approved by dr-physicist" in approved.stdout
        node.wait_for(lambda: job_states(node) == {1: "delivered"}, timeout=120, what="job 1 delivered")
        study = study_uid_of(first)
        assert {s["MainDicomTags"]["Modality"] for s in orthanc.series_of_study(study)} >= {"CT", "SEG", "SR"}
        (approval,) = facts(node, "review-approved")
        assert approval["job_id"] == 1 and approval["note"] == "drill"
        assert "dr-physicist" in actors(node, "review-approved")

        # A second study, rejected: it never arrives.
        assert storescu(second, node.port, node.ae_title, calling="CT_LOWDOSE").returncode == 0
        node.wait_for(lambda: job_states(node).get(2) == "held", timeout=240, what="job 2 held")
        refused = node.cli("review", "reject", "2", check=False)
        assert refused.returncode != 0  # a reason is required
        node.cli("review", "reject", "2", "--reason", "invented nodule in the mediastinum")
        assert job_states(node)[2] == "failed"
        again = node.cli("review", "approve", "2", check=False)
        assert again.returncode == 1 and "not held" in again.stderr
        time.sleep(3)
        assert orthanc.series_of_study(study_uid_of(second)) == []
        assert db_rows(node, "select count(*) from deliveries where job_fk = 2") == [(0,)]
        (rejection,) = facts(node, "review-rejected")
        assert rejection["reason"] == "invented nodule in the mediastinum"
        assert node.cli_json("review", "list") == []
        assert node.cli("audit", "verify").returncode == 0
    finally:
        node.stop()


def test_shadow_mode_runs_and_audits_and_sends_nothing(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    series = simulate(tmp_path / "a", seed=23)
    policy = policy_yaml("restoration", (), name="shadow-trial", gate="shadow", match=LOW_DOSE_CT)
    node = NodeProcess(tmp_path / "node", node_config(orthanc, stable_seconds=1), policy=policy).start()
    try:
        assert storescu(series, node.port, node.ae_title).returncode == 0
        node.wait_for(lambda: job_states(node) == {1: "succeeded"}, timeout=240, what="shadow job done")
        assert db_rows(node, "select count(*) from job_outputs")[0][0] > 6  # it ran and wrote outputs
        time.sleep(3)
        assert orthanc.statistics()["CountInstances"] == 0
        assert db_rows(node, "select count(*) from deliveries") == [(0,)]
        decisions = [f for f in facts(node, "gate-decision") if f.get("stage") == "output"]
        assert [d["action"] for d in decisions] == ["shadow"]
        assert facts(node, "provenance"), "shadow runs are audited with their provenance"
    finally:
        node.stop()


def test_policy_explain_names_the_deciding_condition(tmp_path: Path) -> None:
    require(STORESCU)
    full_dose = tmp_path / "study" / "reference"  # the simulator's full-dose series
    simulate(tmp_path / "study", seed=24)
    config = node_config(stable_seconds=60, policy=True) + (
        '\n[destinations.pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
        '\n[destinations.tps]\nae_title = "TPS"\nhost = "127.0.0.1"\nport = 104\nprofile = "tps"\n'
        '\n[archives.pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\nmethod = "c-get"\n'
    )
    node = NodeProcess(tmp_path / "node", config, policy=DEFAULT_POLICY.read_text()).start()
    try:
        assert storescu(full_dose, node.port, node.ae_title).returncode == 0
        study = study_uid_of(full_dose)
        node.wait_for(lambda: db_rows(node, "select count(*) from instances")[0][0] == 6, what="indexed")
        out = node.cli("policy", "explain", study).stdout
        assert "rule low-dose-ct-restoration [priority 20]: no match" in out
        assert "rule mr-planning-sct [priority 20]: no match" in out
        assert "deciding condition: failed on series" in out and "one of 2 alternatives" in out
        assert "no rule matches: the study is stored and nothing is processed or sent" in out
        explained = node.cli_json("policy", "explain", study)
        rules = {r["rule"]: r for r in explained["rules"]}
        assert list(rules)[0] == "low-dose-ct-restoration"  # highest priority first
        verdict, sct = rules["low-dose-ct-restoration"], rules["mr-planning-sct"]
        for name in ("brain-tumour-prognosis", "brain-mr-missing-flair"):
            assert rules[name]["matched"] is False, name
        assert verdict["matched"] is False and "alternatives" in verdict["deciding"]["condition"]
        assert sct["matched"] is False
        assert "RT_MR_PLANNING" in sct["deciding"]["condition"]  # not sent by the planning MR
        assert "CTDIvol = " in verdict["deciding"]["seen"]  # what the study actually had
        unknown = node.cli("policy", "explain", "1.2.3.4", check=False)
        assert unknown.returncode == 1 and "no study 1.2.3.4" in unknown.stderr
    finally:
        node.stop()


def test_invalid_policy_edit_is_refused_and_the_old_policy_stays(tmp_path: Path, orthanc: Orthanc) -> None:
    require(STORESCU)
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    node = NodeProcess(tmp_path / "node", node_config(orthanc, stable_seconds=1)).start()
    try:
        node.policy_path.write_text("mode: first-match\nrules:\n  - name: r1\n    pipeline: nope\n")
        node.wait_for(
            lambda: [r for r in audit_rows(node, "config-loaded") if r[1] != 0], timeout=20, what="refusal"
        )
        refusal = json.loads([r for r in audit_rows(node, "config-loaded") if r[1] != 0][0][5])
        assert refusal["result"] == "refused; the previous policy stays active"
        assert "rules[0].pipeline: unknown pipeline 'nope'" in refusal["problems"][0]
        assert "keeping the previous policy" in node.stdout.read_text()

        write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=4, seed=31))
        assert storescu(tmp_path / "ct", node.port, node.ae_title).returncode == 0
        node.wait_for(lambda: list(job_states(node).values()) == ["delivered"], what="old policy routes")

        # A valid edit, applied at once by SIGHUP: now nothing matches this AE.
        node.policy_path.write_text(policy_yaml(name="only-ct9", match={"calling_ae": ["CT9"]}))
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGHUP)
        node.wait_for(
            lambda: any("only-ct9" in r[5] for r in audit_rows(node, "config-loaded")), what="reloaded"
        )
        write_ct_series(tmp_path / "ct2", PhantomSpec(rows=64, columns=64, slices=4, seed=32))
        assert storescu(tmp_path / "ct2", node.port, node.ae_title).returncode == 0
        node.wait_for(lambda: len(audit_rows(node, "study-not-routed")) == 1, what="not routed")
        assert len(job_states(node)) == 1
    finally:
        node.stop()


def test_operator_reviews_and_approves_in_chromium(
    tmp_path: Path, orthanc: Orthanc, browser: WebDriver
) -> None:
    require(STORESCU)
    series = simulate(tmp_path / "a", seed=25)
    policy = policy_yaml("restoration", name="needs-review", gate="review", match=LOW_DOSE_CT)
    web_port = free_port()
    node = NodeProcess(
        tmp_path / "node", node_config(orthanc, stable_seconds=1), web_port=web_port, policy=policy
    ).start()
    try:
        add_user(node, "olga", "operator", "operator password")
        assert storescu(series, node.port, node.ae_title).returncode == 0
        node.wait_for(lambda: job_states(node) == {1: "held"}, timeout=240, what="held for review")
        base = f"http://127.0.0.1:{web_port}"

        browser.get(base + "/review")
        browser.find_element(By.ID, "username").send_keys("olga")
        browser.find_element(By.ID, "password").send_keys("operator password")
        browser.find_element(By.ID, "sign-in").click()
        wait_for_url(browser, "/review")
        assert browser.current_url.endswith("/review")
        assert "the rule requires review" in browser.find_element(By.ID, "held").text
        browser.find_element(By.ID, "held-1").click()

        assert "Job #1 — held" in browser.find_element(By.TAG_NAME, "h1").text
        for kind in ("derived", "uncertainty", "hallucination", "overlay"):
            img = browser.find_element(By.ID, f"preview-{kind}")
            assert browser.execute_script("return arguments[0].naturalWidth", img) == 256, kind
        # scroll through the slices, maps alongside and overlaid, and back to the peak
        peak = browser.find_element(By.ID, "where").text
        step = "slice-next" if browser.find_elements(By.ID, "slice-next") else "slice-prev"
        browser.find_element(By.ID, step).click()
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "where").text != peak)
        assert "slice" in browser.find_element(By.ID, "where").text
        img = browser.find_element(By.ID, "preview-overlay")
        assert browser.execute_script("return arguments[0].naturalWidth", img) == 256
        browser.find_element(By.ID, "slice-peak").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "where").text == peak)
        assert orthanc.statistics()["CountInstances"] == 0

        browser.find_element(By.ID, "approve-note").send_keys("checked in Chromium")
        browser.find_element(By.ID, "approve").click()
        assert "Job 1 approved" in browser.find_element(By.ID, "message").text
        assert browser.find_elements(By.ID, "empty")
        node.wait_for(lambda: job_states(node) == {1: "delivered"}, timeout=120, what="delivered")
        assert orthanc.statistics()["CountInstances"] > 6
        assert "web:olga" in actors(node, "review-approved")
    finally:
        node.stop()
