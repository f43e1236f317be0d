"""The scale-out layout end to end: PostgreSQL, a Redis broker, two receiving processes on
one port, two Celery workers on their own queues, one storage folder, Orthanc as the PACS —
and a receiving process and a worker each killed with SIGKILL in the middle of their work.

Three studies arrive at once from three storescu processes: one is routed to
``restoration`` (the queue of one worker), two to ``forward`` (the queue of the other).
A receiving process is killed mid-study (the scanners send again what failed); the
restoration worker is killed (its whole process group) while it runs the job and started
again. Every acknowledged instance must be indexed, every job settle once, every output
reach Orthanc once (one delivery attempt each), and the audit chain verify.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dicom_node.lab.localpeers import NodeProcess, Orthanc, RedisServer
from dicom_node.lab.simulate import LdctSpec, write_ldct_study
from tests.conftest import db_rows, node_config, require
from tests.integration.test_crash_recovery import acknowledged_files, sop_of
from tests.integration.test_receivers import _receivers
from tests.peers import ORTHANC, STORESCU
from tests.pg import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.own_database]

POLICY = """
version: 1
mode: first-match
rules:
  - name: ct-restoration
    match: {calling_ae: [CTSCAN]}
    pipeline: restoration
    destinations: [pacs]
  - name: forward-the-rest
    pipeline: forward
    destinations: [pacs]
"""


class CeleryWorker:
    """``dicom-node worker --queues ...`` in its own process group (so SIGKILL takes the
    Celery master and its pool children together, as a host losing power would)."""

    def __init__(self, node: NodeProcess, queues: str, name: str) -> None:
        self.node, self.queues, self.name = node, queues, name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CeleryWorker:
        out = (self.node.home / f"{self.name}.out").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "worker", "--home", str(self.node.home),
             "--config", str(self.node.config_path), "--queues", self.queues, "--processes", "1"],
            stdout=out, stderr=out, start_new_session=True, env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _studies(root: Path) -> list[Path]:
    """One 512² CT for restoration (long enough to kill a worker inside it), and two to
    forward, each long enough that the receiving process killed is inside one; SIMULATED."""
    made = []
    for k, (size, slices) in enumerate(((512, 24), (256, 80), (128, 40))):
        low, _ = write_ldct_study(
            root / f"study{k}", LdctSpec(slices=slices, size=size, seed=40 + k), patient_id=f"SIM-CELERY-{k}"
        )
        made.append(low.files[0].parent)
    return made


def _send(node: NodeProcess, calling: str, study: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("a") as out:
        return subprocess.Popen(
            [STORESCU, "-v", "-aet", calling, "-aec", node.ae_title, "+sd", "+r", "127.0.0.1", str(node.port),
             str(study)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip


def test_two_receivers_two_workers_and_a_kill_of_each_lose_and_double_nothing(
    tmp_path: Path, postgres_server: PostgresServer, redis: RedisServer, orthanc: Orthanc
) -> None:
    require(STORESCU, ORTHANC)
    index, audit = postgres_server.create_database("celery"), postgres_server.create_database("celaudit")
    config = node_config(
        orthanc,
        stable_seconds=1.0,
        extra=f"""
[storage]
database_url = "{postgres_server.url(index)}"
audit_database_url = "{postgres_server.url(audit)}"

[node]
receivers = 2
""",
    ).replace(
        "[workers]\npoll_seconds = 0.2\nlease_seconds = 30\n",
        f'[workers]\npoll_seconds = 0.2\nlease_seconds = 10\nengine = "celery"\nbroker_url = "{redis.url}"\n'
        "time_limit_seconds = {restoration = 600, forward = 120}\n",
    )
    assert 'engine = "celery"' in config
    studies = _studies(tmp_path / "sim")
    callers = ("CTSCAN", "OTHER1", "OTHER2")
    logs = [tmp_path / f"storescu-{c}.log" for c in callers]
    node = NodeProcess(tmp_path / "node", config, policy=POLICY).start()
    gpu_host = CeleryWorker(node, "restoration", "worker-restoration").start()
    cpu_host = CeleryWorker(node, "forward,denoise-classical", "worker-forward").start()
    try:
        # three studies at once, from three storescu processes, spread over two receivers
        senders = [_send(node, c, d, log) for c, d, log in zip(callers, studies, logs, strict=True)]
        stored = node.home / "var" / "data" / "studies"
        (receiver,) = _receivers(node)

        def mid_study() -> bool:
            """The second receiving process holds a scanner's association (the hand-off
            spreads the three over both) and instances have been stored."""
            try:
                held = any(
                    c.status == psutil.CONN_ESTABLISHED and c.laddr.port == node.port
                    for c in receiver.net_connections("tcp")
                )
            except psutil.Error:
                return False
            return held and next(stored.rglob("*.dcm"), None) is not None

        # (waiting for 30 files instead left, in 1 run of 3, no association on that process)
        node.wait_for(mid_study, timeout=60, every=0.005, what="the second receiver inside an association")
        receiver.kill()  # SIGKILL, mid-study
        # the scanners send again what failed, as they do: each as soon as its sender gave up
        # (a study that goes quiet longer than stable_seconds becomes ready half-received;
        # its job is then superseded by the complete version's, see below)
        codes: dict[int, int] = {}
        resent: dict[int, subprocess.Popen[bytes]] = {}
        deadline = time.monotonic() + 300
        while len(codes) < len(senders) and time.monotonic() < deadline:
            for k, sender in enumerate(senders):
                if k not in codes and sender.poll() is not None:
                    codes[k] = sender.returncode
                    if sender.returncode != 0:
                        resent[k] = _send(node, callers[k], studies[k], logs[k])
            time.sleep(0.02)
        assert len(codes) == len(senders), "every storescu finished"
        for k, again in resent.items():
            assert again.wait(timeout=300) == 0, logs[k].read_text()[-2000:]
        acked = {sop_of(f) for log in logs for f in acknowledged_files(log.read_text())}
        node.wait_for(
            lambda: acked <= {r[0] for r in db_rows(node, "select sop_uid from instances")},
            timeout=60,
            what="every acknowledged instance indexed",
        )

        # a restoration job is running on the restoration host: kill that host
        running = "select count(*) from jobs where pipeline = 'restoration' and state = 'running'"
        node.wait_for(
            lambda: db_rows(node, running)[0][0] >= 1, timeout=120, every=0.1, what="restoration running"
        )
        time.sleep(1.0)  # well inside the inference
        gpu_host.kill9()
        gpu_host = CeleryWorker(node, "restoration", "worker-restoration-2").start()

        settled = "select count(*) from jobs where state not in ('delivered', 'superseded')"

        def all_delivered() -> bool:
            ended = db_rows(node, "select id, state, reason from jobs where state in ('failed', 'refused')")
            assert not ended, f"a job ended without delivering: {ended}"  # fail now, not at the timeout
            return db_rows(node, settled) == [(0,)] and db_rows(node, "select count(*) from jobs")[0][0] >= 3

        node.wait_for(all_delivered, timeout=600, what="every job delivered")
        time.sleep(3.0)  # nothing more arrives or runs
        jobs = db_rows(node, "select pipeline, runs, state from jobs order by id")
        deliveries = db_rows(
            node,
            "select d.job_fk, d.series_uid, d.destination, d.state, count(a.id) from deliveries d"
            " left join delivery_attempts a on a.delivery_fk = d.id"
            " group by d.id, d.job_fk, d.series_uid, d.destination, d.state order by d.id",
        )
        outputs = db_rows(node, "select count(distinct sop_uid) from job_outputs")[0][0]
        succeeded = db_rows(
            node, "select job_fk, count(*) from job_transitions where to_state = 'succeeded' group by job_fk"
        )
        files = sum(len(list(d.glob("*.dcm"))) for d in studies)
        indexed = db_rows(node, "select count(distinct sop_uid) from instances")[0][0]
        verified = node.cli("audit", "verify", check=False)
        # the killed run's spill files (its volume, prediction and maps) went with the re-run
        leftover = [str(p) for p in node.home.rglob(".spill")]
    finally:
        gpu_host.stop()
        cpu_host.stop()
        node.stop()

    print(f"storescu exit codes after the receiver kill: {codes}; jobs: {jobs}")
    assert indexed == files, "every instance sent is in the index"
    # a study that went quiet after the receiver kill may have become ready half-received
    # before it was sent again: that version's job is superseded, never run
    superseded = [(p, runs) for p, runs, s in jobs if s == "superseded"]
    assert all(runs == 0 for _p, runs in superseded), superseded
    ran = [(p, runs, s) for p, runs, s in jobs if s != "superseded"]
    assert {p for p, _runs, _s in ran} == {"forward", "restoration"}
    assert all(s == "delivered" for *_j, s in ran), jobs
    # the killed restoration job ran again; nothing else ran twice
    assert any(p == "restoration" and runs == 2 for p, runs, _s in ran)
    assert sum(runs for _p, runs, _s in ran) == len(ran) + 1
    assert len(succeeded) == len(ran), "each job that ran succeeded"
    assert all(count == 1 for _job, count in succeeded), "each job succeeded once"
    # one delivery per output series, each delivered in one attempt: nothing sent twice
    assert deliveries and all(state == "delivered" and attempts == 1 for *_k, state, attempts in deliveries)
    assert len({(job, series, dest) for job, series, dest, _s, _a in deliveries}) == len(deliveries)
    assert orthanc.statistics()["CountInstances"] == outputs
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert leftover == [], leftover
