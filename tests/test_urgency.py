# ruff: noqa: F811 - the fixtures node and env are imported from the modules that define them
"""A rule's ``urgency``: urgent jobs run, and their outputs are sent, before normal ones.

The case a radiotherapy department has: a morning of low-dose CTs queued for restoration,
then a planning MR whose synthetic CT a physicist waits for. Before, jobs ran strictly in
the order they were made (oldest first), so the sCT waited for every CT ahead of it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import select, update
from typer.testing import CliRunner

from audit import AuditEvent
from dicom_node import broker
from dicom_node.cli import app
from dicom_node.config import ConfigError, NodeConfig, WorkersSection, load_config
from dicom_node.db import queries
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.delivery.outbox import Outbox, create_deliveries
from dicom_node.delivery.profiles import DestinationProfiles
from dicom_node.jobs.claims import claim_id
from dicom_node.jobs.fallback import queue_fallback
from dicom_node.jobs.intake import JobIntake
from dicom_node.jobs.runner import JobRunner
from dicom_node.jobs.state import JobState, create_job, job_ref, transition
from dicom_node.lab.localpeers import RedisServer
from pipelines.base import InputRefused
from policies.loader import PolicyError, parse_policy
from tests.test_outbox import Env, _config, env  # noqa: F401 - env is a fixture
from tests.test_per_series_rules import (
    DEFAULT_POLICY,
    RULE,
    Node,
    node,  # noqa: F401
    two_kernels,
)

URGENT_POLICY = DEFAULT_POLICY.read_text().replace(
    f"  - name: {RULE}\n", f"  - name: {RULE}\n    urgency: urgent\n", 1
)


def _runner(node: Node) -> JobRunner:
    config = node.rt.config
    return JobRunner(config, node.rt.paths, node.rt.db, node.rt.audit, "w-test", DestinationProfiles(config))


def test_the_policy_says_urgent_or_normal_and_nothing_else() -> None:
    assert f"name: {RULE}\n    urgency: urgent" in URGENT_POLICY
    rules = {r.name: r for r in parse_policy(URGENT_POLICY, "urgent.yaml").rules}
    assert rules[RULE].urgency == "urgent"
    assert rules["brain-mr-missing-flair"].urgency == "normal"  # the default
    with pytest.raises(PolicyError) as err:
        parse_policy(URGENT_POLICY.replace("urgency: urgent", "urgency: stat"), "bad.yaml")
    assert "urgency" in str(err.value) and "'normal', 'urgent' or 'offpeak'" in str(err.value)


def test_an_urgent_study_s_jobs_are_taken_before_older_normal_ones(node: Node) -> None:
    earlier, later = two_kernels(), two_kernels()
    node.send_study(earlier)
    node.send_study(later)
    normal = JobIntake(node.rt.db, node.rt.audit, node.router()).study_ready(earlier.study_uid)
    urgent = JobIntake(node.rt.db, node.rt.audit, node.router(URGENT_POLICY)).study_ready(later.study_uid)
    assert len(normal) == len(urgent) == 2 and max(normal) < min(urgent)

    listed = {j["id"]: j["urgency"] for j in queries.list_jobs(node.rt.db)}
    assert [listed[i] for i in (*normal, *urgent)] == ["normal", "normal", "urgent", "urgent"]
    ready = [e for e in node.rt.audit.events(AuditEvent.STUDY_READY) if e.facts["jobs"] == urgent]
    assert [s["urgency"] for s in ready[0].facts["job_series"]] == ["urgent", "urgent"]

    runner = _runner(node)
    taken = [runner.claim() for _ in range(4)]
    assert [job.job_id for job in taken if job] == [*urgent, *normal]  # oldest first within each
    assert runner.claim() is None

    node.store.close()
    node.rt.close()
    result = CliRunner().invoke(app, ["jobs", "--home", str(node.home)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert result.output.count("restoration (urgent)") == 2


def test_a_fallback_job_is_as_urgent_as_the_job_it_stands_in_for(node: Node) -> None:
    study = two_kernels()
    node.send_study(study)
    policy = URGENT_POLICY.replace("    fallback: nothing\n", "    fallback: classical\n", 1)  # the rule's
    first, _second = JobIntake(node.rt.db, node.rt.audit, node.router(policy)).study_ready(study.study_uid)
    runner = _runner(node)
    claimed = runner.claim()
    assert claimed is not None and claimed.job_id == first
    with audited_write(node.rt.db, node.rt.audit) as work:
        said = queue_fallback(
            work, job_ref(work.conn, first), InputRefused("test", None, ["outside"]), "w-test"
        )
    assert "denoise-classical" in said
    with node.rt.db.read() as conn:
        rows = conn.execute(select(t.jobs.c.pipeline, t.jobs.c.urgency).order_by(t.jobs.c.id)).all()
    assert [tuple(r) for r in rows] == [
        ("restoration", 1),
        ("restoration", 1),
        ("denoise-classical", 1),
    ]


def test_an_urgent_job_s_outputs_are_sent_before_those_waiting_from_normal_jobs(env: Env) -> None:  # noqa: F811
    with env.rt.db.write() as conn:
        study_fk = conn.execute(select(t.studies.c.id)).scalar_one()
        urgent = create_job(
            conn,
            study_fk=study_fk,
            study_version=1,
            pipeline="forward",
            destinations=["pacs"],
            instance_ids=[],
            urgency="urgent",
        )
        transition(conn, urgent, JobState.RUNNING, expect=JobState.QUEUED)
        transition(conn, urgent, JobState.SUCCEEDED, expect=JobState.RUNNING, destination_problems=[])
        assert create_deliveries(conn, urgent, env.outputs, ["pacs"]) == 1
        transition(conn, urgent, JobState.DELIVERING, expect=JobState.SUCCEEDED)
        # the normal job's delivery has waited longer
        conn.execute(
            update(t.deliveries).where(t.deliveries.c.job_fk == env.job_id).values(next_attempt_at=0.0)
        )
        conn.execute(
            update(t.deliveries)
            .where(t.deliveries.c.job_fk == urgent)
            .values(next_attempt_at=time.time() - 1)
        )
    outbox = Outbox(_config(1), env.rt.db, env.rt.audit, claim_id("run-urgency"))
    first, second = outbox.claim_due(), outbox.claim_due()
    assert first is not None and second is not None
    assert (first.job_id, second.job_id) == (urgent, env.job_id)


def test_on_redis_an_urgent_message_is_taken_before_normal_ones_already_waiting(
    node: Node,
    redis: RedisServer,
) -> None:
    """The dispatcher publishes two normal jobs, then (a later round) an urgent one, to one
    queue on a real Redis: a consumer gets the urgent one first, then the others in order."""
    earlier, later = two_kernels(), two_kernels()
    node.send_study(earlier)
    node.send_study(later)
    normal = JobIntake(node.rt.db, node.rt.audit, node.router()).study_ready(earlier.study_uid)
    config = node.rt.config.model_copy(
        update={
            "workers": node.rt.config.workers.model_copy(update={"engine": "celery", "broker_url": redis.url})
        }
    )
    app_ = broker.celery_app(config)
    dispatcher = broker.Dispatcher(config, node.rt.db, app_)
    assert dispatcher.dispatch_once() == 2
    urgent = JobIntake(node.rt.db, node.rt.audit, node.router(URGENT_POLICY)).study_ready(later.study_uid)
    assert dispatcher.dispatch_once() == 2
    got = []
    with Connection(redis.url, transport_options=app_.conf.broker_transport_options) as conn:
        queue = conn.SimpleQueue("restoration")
        for _ in range(4):
            message = queue.get(timeout=5)
            got.append(int(message.headers["argsrepr"].strip("[]")))
            message.ack()
        queue.close()
    assert got == [*urgent, *normal]


OFFPEAK_POLICY = DEFAULT_POLICY.read_text().replace(
    f"  - name: {RULE}\n", f"  - name: {RULE}\n    urgency: offpeak\n", 1
)


@pytest.mark.parametrize(
    ("window", "at", "inside"),
    [
        ("19:00-07:00", "23:30", True),
        ("19:00-07:00", "06:59", True),
        ("19:00-07:00", "07:00", False),
        ("19:00-07:00", "12:00", False),
        ("01:00-05:30", "03:00", True),
        ("01:00-05:30", "05:30", False),
    ],
)
def test_the_offpeak_window_may_cross_midnight(window: str, at: str, inside: bool) -> None:
    import datetime

    workers = NodeConfig.model_validate({"workers": {"offpeak_hours": window}}).workers
    when = datetime.datetime.combine(datetime.date(2026, 12, 7), datetime.time.fromisoformat(at))
    assert workers.in_offpeak(when) is inside


@pytest.mark.parametrize("bad", ["19:00", "25:00-07:00", "07:00-07:00", "night", "19:00-07:00-08:00"])
def test_a_bad_offpeak_window_is_one_config_line(tmp_path: Path, bad: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[workers]\noffpeak_hours = "{bad}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(config, tmp_path)
    assert any("offpeak_hours" in p and "HH:MM-HH:MM" in p or "same time" in p for p in err.value.problems)


def test_offpeak_jobs_wait_for_their_hours_and_then_come_after_every_other(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch, clinical = two_kernels(), two_kernels()
    node.send_study(batch)
    node.send_study(clinical)
    offpeak = JobIntake(node.rt.db, node.rt.audit, node.router(OFFPEAK_POLICY)).study_ready(batch.study_uid)
    shipped = node.router(DEFAULT_POLICY.read_text())  # (router() alone reads the last policy written)
    normal = JobIntake(node.rt.db, node.rt.audit, shipped).study_ready(clinical.study_uid)
    assert max(offpeak) < min(normal)  # older, and still last
    listed = {j["id"]: j["urgency"] for j in queries.list_jobs(node.rt.db)}
    assert [listed[i] for i in offpeak] == ["offpeak", "offpeak"]

    runner = _runner(node)
    monkeypatch.setattr(WorkersSection, "in_offpeak", lambda self, when=None: False)  # daytime
    assert [runner.claim().job_id for _ in range(2)] == normal  # type: ignore[union-attr]
    assert runner.claim() is None and runner.claim(offpeak[0]) is None  # waits, even when named
    dispatcher = broker.Dispatcher(node.rt.config, node.rt.db)
    assert dispatcher.due() == []  # nor is it published
    monkeypatch.setattr(WorkersSection, "in_offpeak", lambda self, when=None: True)  # evening
    assert dispatcher.due() == [(offpeak[0], "restoration", -1), (offpeak[1], "restoration", -1)]
    assert broker.message_priority(-1) == 9
    assert [runner.claim().job_id for _ in range(2)] == offpeak  # type: ignore[union-attr]


def _scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    from dicom_node.web.metrics import NodeCollector, render

    collector = NodeCollector(
        node.rt.db,
        node.rt.audit,
        node.rt.paths.data,
        node.rt.paths.home / "cp.jsonl",
        workers=node.rt.config.workers,
    )
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(render(collector).decode())
        for s in family.samples
        if s.name.startswith("dicomnode_jobs_")
    }


def test_metrics_tell_offpeak_jobs_waiting_for_their_hours_from_a_queue_no_worker_serves(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A monitor alerting on the queue's age must not page anyone at 9 am for a batch the
    rule put off until the evening, and must still see a normal job nobody takes."""
    batch, clinical = two_kernels(), two_kernels()
    node.send_study(batch)
    node.send_study(clinical)
    offpeak = JobIntake(node.rt.db, node.rt.audit, node.router(OFFPEAK_POLICY)).study_ready(batch.study_uid)
    with node.rt.db.write() as conn:  # the batch queued an hour ago
        conn.execute(update(t.jobs).where(t.jobs.c.id.in_(offpeak)).values(updated_at=time.time() - 3600))
    oldest = ("dicomnode_jobs_queued_oldest_seconds", (("urgency", "offpeak"),))

    monkeypatch.setattr(WorkersSection, "in_offpeak", lambda self, when=None: False)  # daytime
    day = _scrape(node)
    assert day[("dicomnode_jobs_waiting_offpeak", ())] == 2
    assert day[oldest] == 0 and day[("dicomnode_jobs_queued_oldest_seconds", (("urgency", "normal"),))] == 0

    shipped = node.router(DEFAULT_POLICY.read_text())
    JobIntake(node.rt.db, node.rt.audit, shipped).study_ready(clinical.study_uid)
    time.sleep(0.05)
    day = _scrape(node)
    assert 0 < day[("dicomnode_jobs_queued_oldest_seconds", (("urgency", "normal"),))] < 60
    assert day[oldest] == 0 and day[("dicomnode_jobs_queued_oldest_seconds", (("urgency", "urgent"),))] == 0

    monkeypatch.setattr(WorkersSection, "in_offpeak", lambda self, when=None: True)  # evening
    night = _scrape(node)
    assert night[("dicomnode_jobs_waiting_offpeak", ())] == 0
    assert 3500 < night[oldest] < 3700  # now it waits for a worker, and has for an hour


def test_an_offpeak_message_that_comes_after_its_hours_ended_leaves_the_job_queued_for_the_next(
    node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Published at 06:59, taken from the broker at 07:01: the job stays queued, the log says
    why (not "not queued any more"), and the evening's dispatcher publishes it at once."""
    from types import SimpleNamespace

    batch = two_kernels()
    node.send_study(batch)
    offpeak = JobIntake(node.rt.db, node.rt.audit, node.router(OFFPEAK_POLICY)).study_ready(batch.study_uid)
    dispatcher = broker.Dispatcher(node.rt.config, node.rt.db)
    monkeypatch.setattr(WorkersSection, "in_offpeak", lambda self, when=None: True)
    assert [job for job, _, _ in dispatcher.due()] == offpeak
    monkeypatch.setattr(WorkersSection, "in_offpeak", lambda self, when=None: False)  # 07:01
    monkeypatch.setitem(broker._CHILD, "worker", SimpleNamespace(runner=_runner(node)))
    with caplog.at_level("INFO", logger="dicom_node.broker"):
        assert broker.run_job(None, offpeak[0]) == "waits-for-offpeak"
    assert "off-peak, its hours (19:00-07:00) ended before its message came" in caplog.text
    assert "not queued any more" not in caplog.text
    states = {j["id"]: j["state"] for j in queries.list_jobs(node.rt.db)}
    assert states[offpeak[0]] == "queued"

    monkeypatch.setattr(WorkersSection, "in_offpeak", lambda self, when=None: True)  # 19:00
    assert [job for job, _, _ in dispatcher.due()] == [offpeak[0]]  # not a redispatch_seconds later
    with node.rt.db.write() as conn:  # a job settled elsewhere is still "not queued any more"
        conn.execute(update(t.jobs).where(t.jobs.c.id == offpeak[1]).values(state="superseded"))
    monkeypatch.setattr(WorkersSection, "in_offpeak", lambda self, when=None: False)
    assert broker.run_job(None, offpeak[1]) == "not-queued"
