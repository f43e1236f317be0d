"""The Celery engine end to end: PostgreSQL, a Redis broker, Celery workers on their own
queues, Orthanc as the PACS — and a worker killed with SIGKILL in the middle of a job.

Three studies arrive at once from three storescu processes: one is routed to
``restoration`` (the queue of one worker), two to ``forward`` (the queue of the other). The
restoration worker is killed (its whole process group) while it runs the job and started
again. Every job must settle once, every output reach Orthanc once, and the audit chain
verify.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.lab.localpeers import REDIS_SERVER, NodeProcess, Orthanc, RedisServer
from dicom_node.lab.simulate import LdctSpec, write_ldct_study
from tests.conftest import db_rows, node_config, require
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


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    require(REDIS_SERVER)
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def _studies(root: Path) -> list[Path]:
    """One 512² CT for restoration (long enough to kill a worker inside it) and two small
    ones to forward; SIMULATED."""
    made = []
    for k, (size, slices) in enumerate(((512, 24), (128, 6), (128, 6))):
        low, _ = write_ldct_study(
            root / f"study{k}", LdctSpec(slices=slices, size=size, seed=40 + k), patient_id=f"SIM-CELERY-{k}"
        )
        made.append(low.files[0].parent)
    return made


def test_jobs_run_once_on_their_queues_and_a_killed_worker_loses_nothing(
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
""",
    ).replace(
        "[workers]\npoll_seconds = 0.2\nlease_seconds = 30\n",
        f'[workers]\npoll_seconds = 0.2\nlease_seconds = 10\nengine = "celery"\nbroker_url = "{redis.url}"\n'
        "time_limit_seconds = {restoration = 600, forward = 120}\n",
    )
    assert 'engine = "celery"' in config
    studies = _studies(tmp_path / "sim")
    node = NodeProcess(tmp_path / "node", config, policy=POLICY).start()
    gpu_host = CeleryWorker(node, "restoration", "worker-restoration").start()
    cpu_host = CeleryWorker(node, "forward,denoise-classical", "worker-forward").start()
    try:
        senders = [
            subprocess.Popen(
                [
                    STORESCU,
                    "-aet",
                    calling,
                    "-aec",
                    node.ae_title,
                    "+sd",
                    "+r",
                    "127.0.0.1",
                    str(node.port),
                    str(d),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
            )  # fmt: skip
            for calling, d in zip(("CTSCAN", "OTHER1", "OTHER2"), studies, strict=True)
        ]
        for sender in senders:
            out, _ = sender.communicate(timeout=300)
            assert sender.returncode == 0, out.decode(errors="replace")[-2000:]

        # the restoration job is running on the restoration host: kill that host
        node.wait_for(
            lambda: (
                db_rows(
                    node, "select count(*) from jobs where pipeline = 'restoration' and state = 'running'"
                )
                == [(1,)]
            ),
            timeout=120,
            every=0.1,
            what="the restoration job running",
        )
        time.sleep(1.0)  # well inside the inference
        gpu_host.kill9()
        gpu_host = CeleryWorker(node, "restoration", "worker-restoration-2").start()

        node.wait_for(
            lambda: db_rows(node, "select count(*) from jobs where state = 'delivered'") == [(3,)],
            timeout=600,
            what="three delivered jobs",
        )
        jobs = db_rows(node, "select pipeline, runs, claimed_by from jobs order by id")
        deliveries = db_rows(
            node,
            "select d.job_fk, d.series_uid, d.destination, d.state, count(a.id) from deliveries d"
            " left join delivery_attempts a on a.delivery_fk = d.id"
            " group by d.id, d.job_fk, d.series_uid, d.destination, d.state order by d.id",
        )
        outputs = db_rows(node, "select count(distinct sop_uid) from job_outputs")[0][0]
        transitions = db_rows(
            node, "select job_fk, count(*) from job_transitions where to_state = 'succeeded' group by job_fk"
        )
    finally:
        gpu_host.stop()
        cpu_host.stop()
        node.stop()

    # every pipeline ran on its own queue's host; the killed restoration job ran again
    assert sorted(p for p, _runs, _by in jobs) == ["forward", "forward", "restoration"]
    assert {p: runs for p, runs, _ in jobs if p == "restoration"} == {"restoration": 2}
    assert all(runs == 1 for p, runs, _ in jobs if p == "forward")
    assert all(count == 1 for _job, count in transitions) and len(transitions) == 3, "each job succeeded once"
    # one delivery per output series, each delivered in one attempt: nothing sent twice
    assert deliveries and all(state == "delivered" and attempts == 1 for *_k, state, attempts in deliveries)
    assert len({(job, series, dest) for job, series, dest, _s, _a in deliveries}) == len(deliveries)
    # what reached Orthanc: every output instance (the restoration's, the forwarded studies)
    assert outputs > sum(len(list(d.glob("*.dcm"))) for d in studies[1:])
    assert orthanc.statistics()["CountInstances"] == outputs
    verified = node.cli("audit", "verify", check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
