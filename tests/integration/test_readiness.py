"""/readyz on a running node turns non-ready, naming why, when the storage floor is
crossed or the database is gone, and ready again after (issue 21)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests import pg
from tests.peers import NodeProcess, free_port

pytestmark = pytest.mark.integration


def _wait_for(
    base: str, want: int, check: Callable[[dict], bool] = lambda _: True, seconds: float = 60
) -> dict:
    deadline = time.time() + seconds
    body: dict = {}
    while time.time() < deadline:
        answer = httpx.get(f"{base}/readyz", timeout=15)
        body = answer.json()
        if answer.status_code == want and check(body):
            return body
        time.sleep(0.1)
    raise AssertionError(f"/readyz never answered {want}: last {body}")


def test_crossing_the_storage_floor_and_back(tmp_path: Path) -> None:
    home = tmp_path / "node"
    home.mkdir()
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    if free_mb < 1200:
        pytest.skip(f"{free_mb} MB free: too little to move across a floor")
    floor = free_mb - 300  # 300 MB above the floor now; a 600 MB file crosses it
    web_port = free_port()
    node = NodeProcess(home, f"[receiver]\nmin_free_disk_mb = {floor}\n", web_port=web_port).start()
    base = f"http://127.0.0.1:{web_port}"
    filler = tmp_path / "filler.bin"
    try:
        assert _wait_for(base, 200)["checks"]["storage"] == "ok"
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, 600 * 2**20)
        finally:
            os.close(fd)
        body = _wait_for(base, 503)
        assert f"below the {floor} MB floor" in body["checks"]["storage"]
        assert body["checks"]["database"] == "ok"
        filler.unlink()
        _wait_for(base, 200)
    finally:
        filler.unlink(missing_ok=True)
        node.stop()


def test_the_database_gone_and_back(tmp_path: Path) -> None:
    bin_dir = pg.find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install postgresql (see deploy/install-deps.sh)")
        pytest.skip("not installed: postgresql")
    server = pg.PostgresServer(bin_dir, port=free_port()).start()  # its own: this test stops it
    try:
        index, audit = server.create_database("ready"), server.create_database("readyaudit")
        config = (
            f'[storage]\ndatabase_url = "{server.url(index)}"\naudit_database_url = "{server.url(audit)}"\n'
        )
        web_port = free_port()
        node = NodeProcess(tmp_path / "node", config, web_port=web_port).start()
        base = f"http://127.0.0.1:{web_port}"
        try:
            _wait_for(base, 200)
            server.pause()
            body = _wait_for(base, 503, lambda b: b["checks"]["database"] != "ok")
            assert "does not answer" in body["checks"]["database"]
            assert node.proc is not None and node.proc.poll() is None, "the node must outlive its database"
            server.resume()
            _wait_for(base, 200)
            assert node.proc.poll() is None
        finally:
            node.stop()
    finally:
        server.stop()
