"""Workers run below the receiver's CPU priority (``[workers] nice``), receivers do not.

A scanner waits for every instance's acknowledgement; a job's inference takes every core
it can. The worker processes ``serve`` starts run ``nice`` steps below it from their first
import on, so the receiving processes get the CPU when both want it. Also
:func:`dicom_node.lab.localpeers.wait_idle`, which the ingest benchmark uses so no receiver
is timed against its own start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from dicom_node.config import WorkersSection
from dicom_node.lab.localpeers import wait_idle
from dicom_node.serve import WorkerSupervisor
from tests.peers import NodeProcess


def _priority(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def test_supervised_processes_start_nice_steps_below_serve() -> None:
    own = _priority(0)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    runtime: Any = SimpleNamespace()
    niced = WorkerSupervisor(runtime, "run", sleeper, count=1, on_death=lambda: None, nice=7)
    plain = WorkerSupervisor(runtime, "run", sleeper, count=1, on_death=lambda: None, what="receiver")
    niced.start()
    plain.start()
    try:
        procs: list[Any] = [niced.procs[0], plain.procs[0]]
        assert _priority(procs[0].pid) == min(own + 7, 19)
        assert _priority(procs[1].pid) == own
    finally:
        niced.stop(timeout=5)
        plain.stop(timeout=5)


def test_the_default_is_ten_steps_and_out_of_range_is_refused() -> None:
    assert WorkersSection().nice == 10
    for bad in (-1, 20):
        with pytest.raises(ValueError):
            WorkersSection(nice=bad)


def _children(node: NodeProcess) -> dict[str, list[int]]:
    assert node.proc is not None
    found: dict[str, list[int]] = {"worker": [], "receiver": []}
    for child in psutil.Process(node.proc.pid).children():
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if " worker " in line:
            found["worker"].append(child.pid)
        elif "--receiver-of" in line:
            found["receiver"].append(child.pid)
    return found


@pytest.mark.integration
@pytest.mark.parametrize("nice", [None, 0])
def test_a_node_runs_its_workers_below_its_receivers(tmp_path: Path, nice: int | None) -> None:
    config = "[node]\nreceivers = 2\n[workers]\nprocesses = 2\n"
    if nice is not None:
        config += f"nice = {nice}\n"
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        assert node.proc is not None
        serve = _priority(node.proc.pid)
        children = _children(node)
        assert len(children["worker"]) == 2 and len(children["receiver"]) == 1, children
        expected = min(serve + (10 if nice is None else nice), 19)
        assert [_priority(pid) for pid in children["worker"]] == [expected, expected]
        assert [_priority(pid) for pid in children["receiver"]] == [serve]
    finally:
        node.stop()


def test_wait_idle_waits_for_a_busy_child_and_not_for_an_idle_one() -> None:
    # the parent sleeps; its child spins for ~1.2 s, then sleeps: the tree counts as busy
    spin = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', "
        "'import time\\nt = time.time()\\nwhile time.time() - t < 1.2: pass\\ntime.sleep(60)']); "
        "time.sleep(60)"
    )
    busy = subprocess.Popen([sys.executable, "-c", spin])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.3)  # both interpreters up; the busy one's child is spinning
        waited = wait_idle(busy, window=0.25, timeout=10)  # type: ignore[arg-type]
        assert 0.8 <= waited < 5, waited
        time.sleep(0.3)
        assert wait_idle(idle, window=0.25, timeout=10) < 0.6  # type: ignore[arg-type]
    finally:
        for proc in (busy, idle):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
