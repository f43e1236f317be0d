"""Completeness signals: what MPPS steps and expected counts say, and readiness acting on them.

The steps are written to the ``mpps`` table directly here (the SCP that writes them is
tested in test_mpps.py); instances go through the real store and indexer, and readiness
runs its real timers with a long ``stable_seconds``, so only a signal can make a study
ready within the test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import insert, select, update

from audit import AuditEvent
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.ingest.completeness import Assessment, Signal, assess, settle_steps, waiting_reasons
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.part10 import split_part10
from dicom_node.ingest.readiness import StudyReadiness
from dicom_node.ingest.store import InstanceStore
from dicom_node.jobs.intake import JobIntake
from dicom_node.jobs.routing import PolicyRouter
from dicom_node.lab.localpeers import policy_yaml
from dicom_node.lab.simulate import SimulatedStudy, write_ct_series
from dicom_node.runtime import Runtime
from models.sim.phantom import PhantomSpec
from policies.loader import load_policy

CALLING_AE = "CT1"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SimulatedStudy:
    return write_ct_series(tmp_path_factory.mktemp("ct4"), PhantomSpec(rows=64, columns=64, slices=4, seed=7))


def _sop(path: Path) -> str:
    return str(split_part10(path.read_bytes())[0].MediaStorageSOPInstanceUID)


@dataclass
class Node:
    rt: Runtime
    config: NodeConfig
    store: InstanceStore
    readiness: StudyReadiness

    def put(self, *paths: Path) -> None:
        for path in paths:
            meta, data = split_part10(path.read_bytes())
            self.store.put(
                data,
                str(meta.TransferSyntaxUID),
                claimed_sop_uid=str(meta.MediaStorageSOPInstanceUID),
                calling_ae=CALLING_AE,
                peer_host="127.0.0.1",
            )
        assert self.store.indexer.flush(timeout=10)

    def step(self, study_uid: str, status: str, referenced: list[str], mpps_uid: str | None = None) -> str:
        mpps_uid = mpps_uid or generate_uid()
        now = time.time()
        with self.rt.db.write() as conn:
            conn.execute(
                insert(t.mpps).values(
                    sop_uid=mpps_uid,
                    study_uid=study_uid,
                    calling_ae=CALLING_AE,
                    status=status,
                    referenced=referenced,
                    created_at=now,
                    updated_at=now,
                )
            )
        return mpps_uid

    def end_step(self, mpps_uid: str, status: str) -> None:
        with self.rt.db.write() as conn:
            conn.execute(update(t.mpps).where(t.mpps.c.sop_uid == mpps_uid).values(status=status))

    def assess(self, study_uid: str) -> Assessment:
        with self.rt.db.read() as conn:
            return assess(conn, self.config, study_uid)

    def jobs(self) -> list[dict[str, Any]]:
        with self.rt.db.read() as conn:
            return [dict(r) for r in conn.execute(select(t.jobs).order_by(t.jobs.c.id)).mappings()]

    def instances_in(self, study_version: int) -> int:
        with self.rt.db.read() as conn:
            query = select(t.instances.c.id).where(t.instances.c.study_version == study_version)
            return len(conn.execute(query).all())

    def settled(self, mpps_uid: str) -> bool:
        with self.rt.db.read() as conn:
            at = conn.execute(select(t.mpps.c.settled_at).where(t.mpps.c.sop_uid == mpps_uid)).scalar_one()
        return at is not None

    def wait_for_jobs(self, n: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = self.jobs()
            if len(jobs) >= n:
                return jobs
            time.sleep(0.02)
        return self.jobs()


def _eventually(check: Any, timeout: float = 2.0) -> Any:
    """``check()`` once it is truthy (a record or a settle follows its commit by milliseconds)."""
    deadline = time.time() + timeout
    while not (found := check()) and time.time() < deadline:
        time.sleep(0.02)
    return found


@contextmanager
def _node(
    tmp_path: Path, *, stable_seconds: float = 60.0, start: bool = True, **completeness: Any
) -> Iterator[Node]:
    """A node on ``tmp_path``; ``start=False`` leaves the readiness timers to the test's ``start()``."""
    callers = completeness.pop("callers", [])
    config = NodeConfig.model_validate(
        {
            "completeness": {"stable_seconds": stable_seconds, **completeness},
            "callers": callers,
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}},
        }
    )
    rt = Runtime.open(None, tmp_path)
    path = tmp_path / "policy.yaml"
    path.write_text(policy_yaml("forward"))
    intake = JobIntake(rt.db, rt.audit, PolicyRouter(load_policy(path, {"pacs"}), rt.paths.data))
    readiness = StudyReadiness(config, rt.db, on_ready=intake.study_ready, audit=rt.audit)
    indexer = Indexer(rt.db, rt.audit, on_indexed=readiness.instances_indexed, gather_seconds=0.01)
    store = InstanceStore(rt.paths, rt.db, indexer)
    if start:
        readiness.start()
    try:
        yield Node(rt, config, store, readiness)
    finally:
        readiness.shutdown()
        store.close()
        rt.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with _node(tmp_path) as node:
        yield node


# -- what the signals say (assess) -------------------------------------------------------------


def test_no_signal_leaves_the_study_to_the_idle_timer(node: Node, study: SimulatedStudy) -> None:
    node.put(*study.files)
    verdict = node.assess(study.study_uid)
    assert (verdict.complete, verdict.waiting, verdict.held, verdict.new_instances) == (
        False,
        "idle timer (60 s)",
        False,
        4,
    )


def test_a_completed_step_with_every_instance_stored_says_complete(node: Node, study: SimulatedStudy) -> None:
    node.put(*study.files)
    mpps_uid = node.step(study.study_uid, "COMPLETED", [_sop(p) for p in study.files])
    verdict = node.assess(study.study_uid)
    assert verdict.signal is Signal.MPPS
    assert verdict.detail == f"MPPS {mpps_uid} ended; all 4 listed instances stored"


@pytest.mark.parametrize(
    ("status", "listed", "waiting"),
    [
        ("COMPLETED", 5, "MPPS lists 1 instance not received"),
        ("COMPLETED", 0, "MPPS completed without listing its instances"),
        ("IN PROGRESS", 4, "in progress"),
    ],
)
def test_what_an_unfinished_step_waits_for(
    node: Node, study: SimulatedStudy, status: str, listed: int, waiting: str
) -> None:
    node.put(*study.files)
    sops = [_sop(p) for p in study.files] + [generate_uid()]
    node.step(study.study_uid, status, sops[:listed])
    verdict = node.assess(study.study_uid)
    assert not verdict.complete
    assert waiting in verdict.waiting


def test_a_step_in_progress_blocks_a_completed_one(node: Node, study: SimulatedStudy) -> None:
    node.put(*study.files)
    node.step(study.study_uid, "COMPLETED", [_sop(p) for p in study.files])
    running = node.step(study.study_uid, "IN PROGRESS", [])
    verdict = node.assess(study.study_uid)
    assert not verdict.complete and verdict.waiting == f"MPPS {running} in progress"


def test_only_acquired_instances_count(node: Node, study: SimulatedStudy) -> None:
    node.put(*study.files)
    node.step(study.study_uid, "COMPLETED", [_sop(p) for p in study.files])
    with node.rt.db.write() as conn:
        conn.execute(
            update(t.instances).where(t.instances.c.sop_uid == _sop(study.files[0])).values(role="own-output")
        )
    verdict = node.assess(study.study_uid)
    assert (verdict.complete, verdict.waiting, verdict.new_instances) == (
        False,
        "MPPS lists 1 instance not received",
        3,
    )


@pytest.mark.parametrize(
    ("mode", "complete", "held", "waiting"),
    [
        ("wait-for-timer", False, False, "idle timer (60 s)"),
        ("ready-now", True, False, ""),
        ("hold", False, True, "held: MPPS"),
    ],
)
def test_a_discontinued_step_follows_the_configured_mode(
    tmp_path: Path, study: SimulatedStudy, mode: str, complete: bool, held: bool, waiting: str
) -> None:
    with _node(tmp_path, mpps_discontinued=mode) as node:
        node.put(*study.files)
        node.step(study.study_uid, "DISCONTINUED", [_sop(p) for p in study.files])
        verdict = node.assess(study.study_uid)
        assert (verdict.complete, verdict.held) == (complete, held)
        assert verdict.waiting.startswith(waiting)


def test_expected_counts_of_the_caller(node: Node, study: SimulatedStudy) -> None:
    config = NodeConfig.model_validate(
        {"callers": [{"ae_title": CALLING_AE, "expected_instances": 4, "expected_series": 2}]}
    )
    node.put(*study.files[:3])
    with node.rt.db.read() as conn:
        verdict = assess(conn, config, study.study_uid)
    assert (verdict.complete, verdict.waiting) == (False, "3 of 4 expected instances; 1 of 2 expected series")
    one_series = config.model_copy(
        update={"callers": (config.callers[0].model_copy(update={"expected_series": 1}),)}
    )
    node.put(study.files[3])  # (readiness, by the node's own config, only has the idle timer)
    with node.rt.db.read() as conn:
        verdict = assess(conn, one_series, study.study_uid)
    assert verdict.signal is Signal.EXPECTED_COUNTS
    assert verdict.detail == "4 instances in 1 series from CT1 reach the expected counts"


def test_settle_keeps_steps_still_waiting_for_instances(node: Node, study: SimulatedStudy) -> None:
    node.put(*study.files)
    sops = [_sop(p) for p in study.files]
    done = node.step(study.study_uid, "COMPLETED", sops)
    short = node.step(study.study_uid, "COMPLETED", [*sops, generate_uid()])
    stopped = node.step(study.study_uid, "DISCONTINUED", [generate_uid()])
    running = node.step(study.study_uid, "IN PROGRESS", [])
    with node.rt.db.write() as conn:
        settled = settle_steps(conn, study.study_uid)
    assert sorted(settled) == sorted([done, stopped])
    assert [node.settled(u) for u in (done, short, stopped, running)] == [True, False, True, False]


def test_waiting_reasons_for_the_studies_listing(node: Node, study: SimulatedStudy) -> None:
    node.put(*study.files[:2])
    node.step(study.study_uid, "COMPLETED", [_sop(p) for p in study.files])
    with node.rt.db.read() as conn:
        reasons = waiting_reasons(conn, node.config, [study.study_uid])
    assert reasons == {study.study_uid: "MPPS lists 2 instances not received"}


# -- readiness acting on the signals ---------------------------------------------------------


def test_mpps_completed_first_makes_the_study_ready_at_its_last_instance(
    node: Node, study: SimulatedStudy
) -> None:
    mpps_uid = node.step(study.study_uid, "COMPLETED", [_sop(p) for p in study.files])
    node.readiness.steps_changed(study.study_uid)
    node.put(*study.files[:3])
    time.sleep(0.3)
    assert node.jobs() == [], "ready before the last listed instance"

    node.put(study.files[3])
    indexed = time.time()
    jobs = node.wait_for_jobs(1, timeout=1.0)

    assert len(jobs) == 1, "not ready within 1 s of the last listed instance (stable_seconds = 60)"
    assert jobs[0]["created_at"] - indexed < 1.0
    (complete,) = _eventually(lambda: node.rt.audit.events(AuditEvent.STUDY_COMPLETE))
    assert (complete.study_uid, complete.facts["signal"], complete.facts["mpps"]) == (
        study.study_uid,
        "mpps",
        [mpps_uid],
    )
    assert complete.facts["jobs"] == [jobs[0]["id"]]
    assert _eventually(lambda: node.settled(mpps_uid))


def test_mpps_completed_after_the_instances_makes_the_study_ready(node: Node, study: SimulatedStudy) -> None:
    node.put(*study.files)
    mpps_uid = node.step(study.study_uid, "IN PROGRESS", [])
    node.readiness.steps_changed(study.study_uid)
    node.end_step(mpps_uid, "COMPLETED")
    with node.rt.db.write() as conn:
        conn.execute(
            update(t.mpps)
            .where(t.mpps.c.sop_uid == mpps_uid)
            .values(referenced=[_sop(p) for p in study.files])
        )
    assert node.jobs() == []

    node.readiness.steps_changed(study.study_uid)

    assert len(node.wait_for_jobs(1, timeout=1.0)) == 1


def test_a_settled_step_does_not_make_a_late_instance_ready(
    node: Node, study: SimulatedStudy, tmp_path: Path
) -> None:
    node.step(study.study_uid, "COMPLETED", [_sop(p) for p in study.files])
    node.put(*study.files)
    assert len(node.wait_for_jobs(1, timeout=1.0)) == 1

    late = write_ct_series(
        tmp_path / "late", PhantomSpec(rows=64, columns=64, slices=1, seed=8), study_uid=study.study_uid
    )
    node.put(*late.files)
    time.sleep(0.5)

    assert len(node.jobs()) == 1, "a late instance rode on a settled MPPS"
    assert node.assess(study.study_uid).waiting == "idle timer (60 s)"


def test_a_step_listing_an_instance_never_sent_keeps_the_study_waiting(
    node: Node, study: SimulatedStudy
) -> None:
    node.step(study.study_uid, "COMPLETED", [_sop(p) for p in study.files] + [generate_uid()])
    node.put(*study.files)
    time.sleep(1.0)
    assert node.jobs() == []
    assert node.assess(study.study_uid).waiting == "MPPS lists 1 instance not received"


def test_expected_counts_make_the_study_ready(tmp_path: Path, study: SimulatedStudy) -> None:
    with _node(tmp_path, callers=[{"ae_title": CALLING_AE, "expected_instances": 4}]) as node:
        node.put(*study.files[:3])
        time.sleep(0.3)
        assert node.jobs() == []
        node.put(study.files[3])
        jobs = node.wait_for_jobs(1, timeout=1.0)
        assert len(jobs) == 1
        (complete,) = _eventually(lambda: node.rt.audit.events(AuditEvent.STUDY_COMPLETE))
        assert complete.facts["signal"] == "expected-counts"


def test_hold_keeps_the_timer_off_until_a_later_step_completes(tmp_path: Path, study: SimulatedStudy) -> None:
    with _node(tmp_path, stable_seconds=0.3, mpps_discontinued="hold") as node:
        stopped = node.step(study.study_uid, "DISCONTINUED", [_sop(p) for p in study.files[:2]])
        node.put(*study.files[:2])
        time.sleep(1.0)
        assert node.jobs() == [], "the timer made a held study ready"

        retake = node.step(study.study_uid, "COMPLETED", [_sop(p) for p in study.files[2:]])
        node.put(*study.files[2:])
        jobs = node.wait_for_jobs(1, timeout=1.0)

        assert len(jobs) == 1
        assert _eventually(lambda: node.settled(stopped) and node.settled(retake))


def test_a_step_ending_after_the_timer_made_the_study_ready_is_settled(
    tmp_path: Path, study: SimulatedStudy
) -> None:
    # Every instance is indexed before the timers start: on a loaded machine a slow fsync
    # between two puts would otherwise let the 0.3 s timer make a first version of three.
    with _node(tmp_path, stable_seconds=0.3, start=False) as node:
        node.put(*study.files)
        node.readiness.start()
        (job,) = node.wait_for_jobs(1, timeout=2.0)  # the timer was first
        assert node.instances_in(job["study_version"]) == len(study.files)
        mpps_uid = node.step(study.study_uid, "COMPLETED", [_sop(p) for p in study.files])

        node.readiness.steps_changed(study.study_uid)

        assert _eventually(lambda: node.settled(mpps_uid))
        assert len(node.jobs()) == 1  # nothing new to make ready
        assert node.rt.audit.events(AuditEvent.STUDY_COMPLETE) == []
