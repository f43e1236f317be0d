"""The Celery engine's parts without a broker server: what the dispatcher publishes and
when, what a message does to a job that is no longer queued, who counts as gone, the
command line's refusals. (tests/integration/test_celery_workers.py runs it all for real.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update

from dicom_node import broker
from dicom_node.config import ConfigError, NodeConfig, load_config
from dicom_node.db import schema as t
from dicom_node.db.engine import inserted_id
from dicom_node.jobs.claims import HOST, INDEPENDENT, orphan_test
from dicom_node.jobs.state import JobState, create_job
from dicom_node.runtime import Runtime


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    runtime = Runtime.open(
        None, tmp_path / "home", {"workers": {"engine": "celery", "broker_url": "memory://"}}
    )
    try:
        yield runtime
    finally:
        runtime.close()


def _jobs(rt: Runtime, pipelines: list[str], urgency: str = "normal") -> list[int]:
    now = time.time()
    ids = []
    with rt.db.write() as conn:
        patient = inserted_id(conn.execute(insert(t.patients).values(patient_id=f"P-{urgency}", issuer="")))
        for k, pipeline in enumerate(pipelines):
            study = inserted_id(
                conn.execute(
                    insert(t.studies).values(
                        study_uid=f"1.2.3.{t.URGENCY[urgency]}.{k}",
                        patient_fk=patient,
                        first_received_at=now,
                        open_version=1,
                    )
                )
            )
            ids.append(
                create_job(
                    conn,
                    study_fk=study,
                    study_version=1,
                    pipeline=pipeline,
                    destinations=["pacs"],
                    instance_ids=[],
                    actor="tester",
                    urgency=urgency,
                )  # fmt: skip
            )
    return ids


def test_a_queued_job_is_published_once_and_again_only_when_it_needs_it(rt: Runtime) -> None:
    config = rt.config.model_copy(
        update={"workers": rt.config.workers.model_copy(update={"redispatch_seconds": 0.5})}
    )
    dispatcher = broker.Dispatcher(config, rt.db)
    first, second = _jobs(rt, ["restoration", "forward"])
    assert dispatcher.due() == [(first, "restoration", 0), (second, "forward", 0)]
    assert dispatcher.due() == []  # published: not again while a worker may still take it
    # the job went back to queued after its message (a retry, a lost worker): publish now
    with rt.db.write() as conn:
        conn.execute(update(t.jobs).where(t.jobs.c.id == first).values(updated_at=time.time() + 1))
    assert dispatcher.due() == [(first, "restoration", 0)]
    # nobody took the other one within redispatch_seconds: the message may be lost
    time.sleep(0.6)
    assert (second, "forward", 0) in dispatcher.due()
    # a job that is not queued is never published
    with rt.db.write() as conn:
        conn.execute(update(t.jobs).values(state=JobState.RUNNING.value, dispatched_at=None))
    assert dispatcher.due() == []


def test_a_message_goes_to_its_pipeline_queue_with_its_time_limits(rt: Runtime) -> None:
    config = rt.config.model_copy(
        update={
            "workers": rt.config.workers.model_copy(
                update={"time_limit_seconds": {"default": 3600.0, "restoration": 900.0}}
            )
        }
    )
    app = broker.celery_app(config)
    dispatcher = broker.Dispatcher(config, rt.db, app)
    (job,) = _jobs(rt, ["restoration"])
    assert dispatcher.dispatch_once() == 1
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue("restoration").get(timeout=5)
        assert message.headers["task"] == broker.TASK
        assert message.headers["argsrepr"] == f"[{job}]"
        assert message.headers["timelimit"] == [960.0, 900.0]  # hard, soft
        message.ack()
        with pytest.raises(Exception):  # noqa: B017 - kombu's Empty
            conn.SimpleQueue("forward").get(timeout=0.2)


def test_urgent_jobs_are_published_first_and_with_the_broker_s_first_priority(rt: Runtime) -> None:
    normal = _jobs(rt, ["restoration", "restoration"])
    (urgent,) = _jobs(rt, ["sct"], urgency="urgent")
    dispatcher = broker.Dispatcher(rt.config, rt.db)
    assert dispatcher.due() == [
        (urgent, "sct", 1),
        (normal[0], "restoration", 0),
        (normal[1], "restoration", 0),
    ]
    # Redis takes the lowest priority step first (kombu's transport): urgent 0, normal 6
    assert broker.message_priority(1) == 0 and broker.message_priority(0) == 6
    assert (
        broker.message_priority(1) in broker.PRIORITY_STEPS
        and broker.message_priority(0) in broker.PRIORITY_STEPS
    )


def test_a_message_for_a_job_no_longer_queued_runs_nothing(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    (job,) = _jobs(rt, ["forward"])
    with rt.db.write() as conn:
        conn.execute(update(t.jobs).values(state=JobState.RUNNING.value, claimed_by="elsewhere/w-x/1"))
    monkeypatch.setattr(broker, "_WHERE", {"home": rt.paths.home, "run_id": f"{INDEPENDENT}test"})
    monkeypatch.setattr(broker, "_CHILD", {})
    try:
        assert broker.run_job(None, job) == "not-queued"
    finally:
        broker._close_child()
    with rt.db.read() as conn:
        row = conn.execute(select(t.jobs.c.state, t.jobs.c.runs, t.jobs.c.claimed_by)).one()
    assert tuple(row) == ("running", 0, "elsewhere/w-x/1")


def test_an_independent_worker_is_gone_only_when_its_process_or_lease_is() -> None:
    is_orphaned = orphan_test("serve-run")
    now = time.time()
    alive, dead = os.getpid(), _dead_pid()
    assert not is_orphaned(f"{HOST}/{INDEPENDENT}abc/{alive}", now + 60, now)
    assert is_orphaned(f"{HOST}/{INDEPENDENT}abc/{dead}", now + 60, now)
    assert is_orphaned(f"{HOST}/{INDEPENDENT}abc/{alive}", now - 1, now)  # its lease ran out
    assert is_orphaned(f"{HOST}/earlier-run/{alive}", now + 60, now)  # a serve child of an earlier run
    assert not is_orphaned(f"other-host/{INDEPENDENT}abc/{dead}", now + 60, now)  # only its lease tells


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_time_limits_are_positive_and_keep_a_default(tmp_path: Path) -> None:
    limits = NodeConfig.model_validate({"workers": {"time_limit_seconds": {"restoration": 900}}}).workers
    assert limits.time_limit("restoration") == 900 and limits.time_limit("sct") == 3600
    bad = tmp_path / "bad.toml"
    bad.write_text('[workers]\nengine = "rq"\ntime_limit_seconds = {sct = -1}\n')
    with pytest.raises(ConfigError) as err:
        load_config(bad, tmp_path)
    text = "\n".join(err.value.problems)
    assert "engine" in text and "time limits must be positive seconds: sct" in text


def _worker_cli(home: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", "worker", "--home", str(home), "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_worker_command_says_what_is_wrong(tmp_path: Path) -> None:
    local = tmp_path / "local.toml"
    local.write_text("")
    done = _worker_cli(tmp_path / "home", local, "--queues", "restoration")
    assert done.returncode == 1 and 'engine = "celery"' in done.stderr and "Traceback" not in done.stderr
    celery = tmp_path / "celery.toml"
    celery.write_text('[workers]\nengine = "celery"\nbroker_url = "memory://"\n')
    done = _worker_cli(tmp_path / "home", celery, "--queues", "restoration,resotration")
    assert done.returncode == 1 and "unknown pipeline(s) resotration" in done.stderr
    assert "known: " in done.stderr and "Traceback" not in done.stderr
