"""One ``serve`` per home, by a lock the kernel drops however the process ends: kill -9 and
an immediate restart works every time; a pid file left behind that names a live, unrelated
process blocks nothing; a second ``serve`` on a running home is refused, naming the pid."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dicom_node.serve import running_serve
from tests.peers import NODE_ENV, NodeProcess, free_port

pytestmark = pytest.mark.integration

#: The least a node needs: no worker processes, no web pages, no policy.
MINIMAL = "[workers]\nprocesses = 0\n"


def test_kill_9_then_restart_at_once_ten_times(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", MINIMAL)
    pidfile = node.home / "var" / "run" / "serve.pid"
    for attempt in range(10):
        node.start(timeout=60)
        assert node.proc is not None
        assert running_serve(pidfile) == node.proc.pid, attempt
        node.kill9()
        assert pidfile.exists(), "kill -9 leaves the file behind"
    node.start(timeout=60)
    try:
        assert "stop it first" not in node.stdout.read_text()
    finally:
        node.stop()
    assert running_serve(pidfile) is None


def test_a_pid_file_naming_a_live_unrelated_process_blocks_nothing(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", MINIMAL)
    (node.home / "var" / "run").mkdir(parents=True)
    (node.home / "var" / "run" / "serve.pid").write_text(f"{os.getpid()}\n")  # this test: alive
    node.start(timeout=60)
    node.stop()
    assert node.proc is not None and node.proc.returncode == 0


def test_a_second_serve_on_the_same_home_is_refused(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", MINIMAL).start()
    try:
        assert node.proc is not None
        second = subprocess.run(
            node.command(
                "serve",
                "--home",
                str(node.home),
                "--config",
                str(node.config_path),
                "--port",
                str(free_port()),
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=NODE_ENV,
        )
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"another dicom-node serve (pid {node.proc.pid}) is using {node.home}" in lines[0]
        assert "stop it first or use a different --home" in lines[0]
        assert node.proc.poll() is None, "the running node is untouched"
        assert running_serve(node.home / "var" / "run" / "serve.pid") == node.proc.pid
    finally:
        node.stop()
