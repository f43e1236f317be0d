"""``/healthz`` and ``/readyz`` (issue 21, first part): each readiness check against the
real thing it checks (a directory, a socket, a process, the audit log), the endpoints on
the app, and a running node that turns non-ready when a worker dies and ready again when
the supervisor has restarted it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from audit import AuditEvent
from dicom_node.lab.localpeers import NodeProcess, free_port
from dicom_node.runtime import Runtime
from dicom_node.web import health
from dicom_node.web.app import WebContext, create_app


def test_storage_check_writes_and_compares_free_space_with_the_floor(tmp_path: Path) -> None:
    assert health.storage_check(tmp_path / "data", 0).problem is None
    assert not list((tmp_path / "data").iterdir())  # the probe file is gone
    crossed = health.storage_check(tmp_path / "data", 10**9)  # a floor no disk has free
    assert crossed.problem is not None and "below the 1000000000 MB floor" in crossed.problem
    (tmp_path / "a-file").write_text("not a directory")
    unwritable = health.storage_check(tmp_path / "a-file" / "data", 0)
    assert unwritable.problem is not None and "cannot write" in unwritable.problem


def test_listener_check_connects_to_each_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert health.listener_check([f"0.0.0.0:{port}"]).problem is None
        assert health.listener_check([f"127.0.0.1:{port} (TLS)"]).problem is None
    closed = health.listener_check([f"127.0.0.1:{free_port()}"])
    assert closed.problem is not None and "does not accept" in closed.problem
    assert health.listener_check([]).problem == "the DICOM listener is not running"


def test_workers_check_names_the_stopped_and_the_just_restarted_slots() -> None:
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    try:
        long_ago = time.monotonic() - 60
        assert health.workers_check([running], [long_ago]).problem is None
        problem = health.workers_check([running, done, None], [long_ago] * 3).problem
        assert problem is not None and problem.startswith("2 of 3") and "slot 1, 2" in problem
        # restarted a moment ago: not counted as running yet (a crash loop is not ready)
        settling = health.workers_check([running], [time.monotonic()]).problem
        assert settling is not None and "(re)started less than 5 s ago" in settling
    finally:
        running.kill()
        running.wait()


def test_audit_check_wants_a_recent_checkpoint(tmp_path: Path) -> None:
    rt = Runtime.open(None, tmp_path / "home")
    try:
        checkpoints = tmp_path / "checkpoints.jsonl"
        for _ in range(5):
            rt.audit.record(AuditEvent.APPLICATION_START, actor="test")
        assert health.audit_check(rt.audit, checkpoints, 2).problem is not None  # 5 behind, no file
        checkpoints.write_text(json.dumps({"seq": 4, "hash": "x", "at": 0, "actor": None}) + "\n")
        assert health.audit_check(rt.audit, checkpoints, 2).problem is None
        assert health.audit_check(rt.audit, tmp_path / "none.jsonl", 100).problem is None
    finally:
        rt.close()


def test_the_endpoints_answer_without_login_and_name_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dicom_node.web.app as web_app

    rt = Runtime.open(None, tmp_path / "home")
    state = {"storage": None, "runs": 0}

    def checks() -> list[health.Check]:
        state["runs"] += 1  # type: ignore[operator]
        return [health.Check("database"), health.Check("storage", state["storage"])]  # type: ignore[arg-type]

    try:
        client = TestClient(
            create_app(WebContext(rt.config, rt.db, rt.audit, tmp_path / "cp.jsonl", readiness=checks))
        )
        assert client.get("/healthz").json() == {"alive": True}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "checks": {"database": "ok", "storage": "ok"}}
        for _ in range(
            20
        ):  # asked often: the checks (a synced write, a connection) run once a second at most
            client.get("/readyz")
        assert state["runs"] == 1
        monkeypatch.setattr(web_app, "READINESS_EVERY_SECONDS", 0.0)
        state["storage"] = "12 MB free, below the 1024 MB floor"
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["checks"]["storage"] == "12 MB free, below the 1024 MB floor"
        assert not_ready.headers["cache-control"] == "no-store"
        default = TestClient(create_app(WebContext(rt.config, rt.db, rt.audit, tmp_path / "cp.jsonl")))
        assert set(default.get("/readyz").json()["checks"]) == {"database", "audit"}
    finally:
        rt.close()


def test_a_database_that_does_not_answer_is_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = Runtime.open(None, tmp_path / "home")
    try:
        assert health.database_check(rt.db).problem is None

        def gone() -> None:
            raise ConnectionError("connection refused")

        monkeypatch.setattr(rt.db, "read", gone)
        problem = health.database_check(rt.db).problem
        assert problem is not None and "does not answer" in problem and "connection refused" in problem
    finally:
        rt.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX processes")
def test_a_running_node_is_not_ready_while_a_worker_is_down(tmp_path: Path) -> None:
    web_port = free_port()
    node = NodeProcess(tmp_path / "node", "[workers]\nprocesses = 1\n", web_port=web_port).start()
    base = f"http://127.0.0.1:{web_port}"
    try:
        deadline = time.time() + 60
        while (
            ready := httpx.get(f"{base}/readyz", timeout=10)
        ).status_code != 200 and time.time() < deadline:
            time.sleep(0.2)  # workers count once they have been up a few seconds
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == {"database", "storage", "dicom_listener", "workers", "audit"}
        assert httpx.get(f"{base}/healthz", timeout=10).json() == {"alive": True}
        assert node.proc is not None
        (worker,) = [p for p in psutil.Process(node.proc.pid).children() if "worker" in p.cmdline()]
        os.kill(worker.pid, signal.SIGKILL)
        seen: list[int] = []
        deadline = time.time() + 60
        while time.time() < deadline:
            answer = httpx.get(f"{base}/readyz", timeout=10)
            seen.append(answer.status_code)
            if answer.status_code == 503:
                assert "worker" in answer.json()["checks"]["workers"]
            if 503 in seen and answer.status_code == 200:
                break
            time.sleep(0.1)
        assert 503 in seen, "the dead worker was never reported"
        assert seen[-1] == 200, "not ready again after the supervisor restarted the worker"
    finally:
        node.stop()


def test_metrics_need_a_token_beyond_loopback_and_parse(tmp_path: Path) -> None:
    import hashlib

    from prometheus_client.parser import text_string_to_metric_families

    rt = Runtime.open(None, tmp_path / "home")
    try:
        token = "a-long-random-scrape-token"
        config = rt.config.model_copy(
            update={
                "web": rt.config.web.model_copy(
                    update={"metrics_token_sha256": hashlib.sha256(token.encode()).hexdigest()}
                )
            }
        )
        client = TestClient(
            create_app(WebContext(config, rt.db, rt.audit, tmp_path / "cp.jsonl", data_dir=tmp_path))
        )
        refused = client.get("/metrics")  # the test client is not a loopback address
        assert refused.status_code == 401 and "Bearer" in refused.headers["www-authenticate"]
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        scraped = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(scraped.text)}
        assert {
            "dicomnode_instances_received",
            "dicomnode_jobs",
            "dicomnode_job_duration_seconds",
            "dicomnode_deliveries",
            "dicomnode_disk_free_bytes",
            "dicomnode_audit_chain_head",
        } <= names
        no_token = TestClient(create_app(WebContext(rt.config, rt.db, rt.audit, tmp_path / "cp.jsonl")))
        assert no_token.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    finally:
        rt.close()
