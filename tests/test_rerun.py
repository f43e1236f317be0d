# ruff: noqa: F811 - the fixture node is imported from the module that defines it
"""``dicom-node jobs rerun``: a failed or refused job runs again, on the same input.

Before, the state machine allowed ``failed → queued`` and ``refused → queued`` and nothing
did it: after a fix (a model that could not load, a pin to a model whose domain covers the
series) the only way was to send the study again from the scanner.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import select, update
from typer.testing import CliRunner

from audit import AuditEvent
from dicom_node.cli import app
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.jobs.fallback import queue_fallback
from dicom_node.jobs.intake import JobIntake
from dicom_node.jobs.state import JobState, job_ref, transition
from pipelines.base import InputRefused
from tests.test_per_series_rules import DEFAULT_POLICY, Node, node, two_kernels  # noqa: F401
from tests.test_urgency import _runner

REFUSAL = "input outside the domain of ldct-restoration 1.3 (series 1.2.3): pixel spacing 3.5 mm"


def _two_jobs(node: Node, policy: str | None = None) -> list[int]:
    study = two_kernels()
    node.send_study(study)
    return JobIntake(node.rt.db, node.rt.audit, node.router(policy)).study_ready(study.study_uid)


def _settle(node: Node, job_id: int, state: JobState, reason: str) -> None:
    with node.rt.db.write() as conn:
        transition(
            conn,
            job_id,
            JobState.RUNNING,
            expect=JobState.QUEUED,
            claimed_by="host/run/1",
            runs=1,
            lease_until=1.0,
        )
        transition(conn, job_id, state, expect=JobState.RUNNING, reason=reason)


def _row(node: Node, job_id: int) -> dict:
    with node.rt.db.read() as conn:
        return dict(conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings().one())


def _cli(node: Node, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["jobs", *args, "--home", str(node.home)], env={"COLUMNS": "300"})
    assert "Traceback" not in result.output
    return result.exit_code, " ".join(result.output.split())


def test_a_refused_job_runs_again_on_its_input_and_the_audit_says_who_and_why(node: Node) -> None:
    refused, other = _two_jobs(node)
    _settle(node, refused, JobState.REFUSED, REFUSAL)
    node.store.close()

    code, said = _cli(node, "rerun", str(refused), "--reason", "pinned ldct-restoration 1.1")
    assert code == 0, said
    assert f"job {refused} (restoration) queued again; it was refused" in said
    row = _row(node, refused)
    assert (row["state"], row["claimed_by"], row["lease_until"], row["dispatched_at"]) == (
        "queued",
        None,
        None,
        None,
    )
    assert (
        "run again by os:" in row["reason"]
        and ": pinned ldct-restoration 1.1 (was refused: input outside" in row["reason"]
    )
    (record,) = [
        e
        for e in node.rt.audit.events(AuditEvent.JOB_TRANSITION)
        if e.facts.get("action") == "rerun requested by operator"
    ]
    assert (record.facts["job_id"], record.facts["from_state"], record.facts["to_state"]) == (
        refused,
        "refused",
        "queued",
    )
    assert record.actor is not None and record.actor.startswith("os:")

    claimed = _runner(node).claim()  # the oldest queued job: the one run again
    assert claimed is not None and claimed.job_id == refused and claimed.series_uid == row["series_uid"]
    assert _row(node, refused)["runs"] == 2 and other != refused


def test_a_job_that_failed_in_its_pipeline_runs_again_and_one_that_failed_delivering_does_not(
    node: Node,
) -> None:
    failed, dead = _two_jobs(node)
    _settle(node, failed, JobState.FAILED, "model-load: weights sha256 mismatch")
    _settle(node, dead, JobState.FAILED, "a delivery was dead-lettered")
    with node.rt.db.write() as conn:
        conn.execute(
            t.deliveries.insert().values(
                job_fk=dead,
                series_uid="1.2.3",
                destination="pacs",
                state="dead",
                created_at=time.time(),
                attempts=5,
                next_attempt_at=0.0,
            )
        )
        delivery = conn.execute(select(t.deliveries.c.id)).scalar_one()
    node.store.close()
    assert _cli(node, "rerun", str(failed))[0] == 0
    code, said = _cli(node, "rerun", str(dead))
    assert (
        code == 1
        and f"job {dead} failed delivering its outputs, which exist: `dicom-node outbox retry`" in said
    )
    assert f"(its deliveries: {delivery})" in said
    assert _row(node, dead)["state"] == "failed"


def test_what_cannot_run_again_says_why_and_changes_nothing(node: Node) -> None:
    queued, held = _two_jobs(node)
    _settle(node, held, JobState.HELD, "held for review: rule gate is review")
    node.store.close()
    cases = {
        str(queued): f"job {queued} is queued: it is waiting for a worker already",
        str(
            held
        ): f"job {held} is held: its outputs wait for review: `dicom-node review approve` or `reject`",
        "424242": "no job 424242",
    }
    for job, expected in cases.items():
        code, said = _cli(node, "rerun", job)
        assert code == 1 and expected in said, said
    assert (_row(node, queued)["state"], _row(node, held)["state"]) == ("queued", "held")


def test_a_job_whose_study_has_a_newer_version_or_whose_files_are_gone_does_not_run_again(node: Node) -> None:
    old, _ = _two_jobs(node)
    _settle(node, old, JobState.FAILED, "worker lost its disk")
    with node.rt.db.write() as conn:
        conn.execute(update(t.studies).values(purged_at=time.time()))
    code, said = _cli(node, "rerun", str(old))
    assert code == 1 and "study files were removed by the retention rule: send the study again" in said
    with node.rt.db.write() as conn:
        conn.execute(update(t.studies).values(purged_at=None))
        newer = conn.execute(select(t.jobs).where(t.jobs.c.id == old)).mappings().one()
        conn.execute(
            t.jobs.insert().values(
                {**{k: v for k, v in newer.items() if k != "id"}, "study_version": 2, "state": "queued"}
            )
        )
    code, said = _cli(node, "rerun", str(old))
    assert code == 1 and "has a newer version (2) with job" in said and "that is the job to run" in said
    assert _row(node, old)["state"] == "failed"


def test_a_job_refused_again_does_not_queue_its_fallback_twice(node: Node) -> None:
    policy = DEFAULT_POLICY.read_text().replace("    fallback: nothing\n", "    fallback: classical\n", 1)
    first, _ = _two_jobs(node, policy)
    refused = InputRefused("ldct-restoration", None, ["pixel spacing 3.5 mm"])

    def refuse() -> str:
        _runner(node).claim(first)
        with audited_write(node.rt.db, node.rt.audit) as work:
            said = queue_fallback(work, job_ref(work.conn, first), refused, "w-test")
            transition(work.conn, first, JobState.REFUSED, expect=JobState.RUNNING, reason="refused")
        return said

    assert "denoise-classical" in refuse()
    node.store.close()
    assert _cli(node, "rerun", str(first))[0] == 0
    again = refuse()
    assert "was queued at its first refusal; not again" in again
    with node.rt.db.read() as conn:
        fallbacks = conn.execute(select(t.jobs.c.id).where(t.jobs.c.pipeline == "denoise-classical")).all()
    assert len(fallbacks) == 1


def test_the_json_listing_carries_the_rerun_reason(node: Node) -> None:
    refused, _ = _two_jobs(node)
    _settle(node, refused, JobState.REFUSED, REFUSAL)
    node.store.close()
    assert _cli(node, "rerun", str(refused), "--reason", "domain widened")[0] == 0
    result = CliRunner().invoke(app, ["jobs", "--json", "--home", str(node.home)])
    listed = {j["id"]: j for j in json.loads(result.output)}
    assert listed[refused]["state"] == "queued" and "domain widened" in listed[refused]["reason"]
