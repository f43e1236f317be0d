"""Several receiving processes on one DICOM port (``[node] receivers``, SO_REUSEPORT).

One study arrives over eight associations at once: they are spread over the receiving
processes, the index decides when the study is complete (not one process's
timer), and the study becomes one job holding every instance. Then a receiving process is
killed with SIGKILL in the middle of a study: the node starts it again, and every instance
it acknowledged is in the index, intact.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.conftest import audit_rows, db_rows, node_config, require
from tests.integration.test_crash_recovery import acknowledged_files, sop_of
from tests.peers import NODE_ENV, STORESCU, NodeProcess, Orthanc

pytestmark = pytest.mark.integration


def _send(node: NodeProcess, files: list[Path], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(
            [STORESCU, "-v", "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1", str(node.port),
             *map(str, files)],
            stdout=out, stderr=subprocess.STDOUT, env=NODE_ENV,
        )  # fmt: skip


def _receivers(node: NodeProcess) -> list[psutil.Process]:
    """The receiving processes serve started (not yet reaped ones excluded)."""
    assert node.proc is not None
    found = []
    for child in psutil.Process(node.proc.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "--receiver-of" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_one_study_over_eight_associations_to_two_receivers_is_one_job(
    tmp_path: Path, orthanc: Orthanc, ct200: Path
) -> None:
    require(STORESCU)
    config = node_config(orthanc, stable_seconds=2.0) + "\n[node]\nreceivers = 2\n"
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        assert len(_receivers(node)) == 1, "serve starts one more receiving process"
        files = sorted(ct200.glob("*.dcm"))
        # eight associations: the kernel hashes each to a process and a busier process
        # hands a new connection to its sibling (net.balance), so both get some (unless each
        # sender is done before the next connects: then this shows readiness on one process)
        parts = [files[k::8] for k in range(8)]
        senders = [_send(node, part, tmp_path / f"storescu{k}.log") for k, part in enumerate(parts)]
        for sender in senders:
            assert sender.wait(timeout=300) == 0
        node.wait_for(
            lambda: db_rows(node, "select count(*) from jobs where state = 'delivered'") == [(1,)],
            timeout=180,
            what="one delivered job",
        )
        jobs = db_rows(node, "select id, study_version from jobs")
        inputs = db_rows(node, "select count(*) from job_inputs")[0][0]
        acceptors = [json.loads(r[5])["receiver_pid"] for r in audit_rows(node, "association-accepted")]
    finally:
        node.stop()
    print(f"associations per receiving process: {sorted(Counter(acceptors).values())}")
    assert len(acceptors) == len(parts)
    assert len(jobs) == 1 and jobs[0][1] == 1, "the study became ready once, with everything"
    assert inputs == len(files)
    assert orthanc.statistics()["CountInstances"] == len(files)


def test_a_receiving_process_killed_mid_study_loses_no_acknowledged_instance(
    tmp_path: Path, orthanc: Orthanc, ct200: Path
) -> None:
    require(STORESCU)
    config = node_config(orthanc, stable_seconds=3.0) + "\n[node]\nreceivers = 2\n"
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        files = sorted(ct200.glob("*.dcm"))
        # eight associations, so that the child holds some of them (1 in 256 it holds none)
        parts = [files[k::8] for k in range(8)]
        logs = [tmp_path / f"storescu{k}.log" for k in range(8)]
        senders = [_send(node, part, log) for part, log in zip(parts, logs, strict=True)]
        studies_dir = node.home / "var" / "data" / "studies"
        node.wait_for(
            lambda: len(list(studies_dir.rglob("*.dcm"))) >= 60, timeout=60, every=0.02, what="60 files"
        )
        (child,) = _receivers(node)
        child.kill()  # SIGKILL
        codes = [s.wait(timeout=120) for s in senders]
        print(f"storescu exit codes after the kill: {codes}")
        node.wait_for(lambda: len(_receivers(node)) == 1, timeout=30, what="the receiver restarted")
        acked = {sop_of(f) for log in logs for f in acknowledged_files(log.read_text())}
        time.sleep(1.0)
        indexed = {r[0] for r in db_rows(node, "select sop_uid from instances")}
        missing = acked - indexed
        assert not missing, f"{len(missing)} acknowledged instance(s) not in the index"
        # the sender tries again with what failed: the study ends complete, each instance once
        redo = _send(node, files, tmp_path / "again.log")
        assert redo.wait(timeout=300) == 0
        node.wait_for(
            lambda: db_rows(node, "select count(distinct sop_uid) from instances") == [(len(files),)],
            timeout=60,
            what="every instance",
        )
        current = db_rows(node, "select count(*) from instances where current")[0][0]
        verified = node.cli("audit", "verify", check=False)
    finally:
        node.stop()
    assert current == len(files)
    assert verified.returncode == 0, verified.stdout + verified.stderr
