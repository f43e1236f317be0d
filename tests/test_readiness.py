"""Study readiness: snapshots into jobs, study versions, routing, and the stability timer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from audit import AuditEvent
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
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


def _readiness(
    node: Node,
    *,
    routed: bool = True,
    stable_seconds: float = 30.0,
    calling_ae: str | None = None,
    actor: str | None = None,
) -> StudyReadiness:
    config = NodeConfig.model_validate(
        {
            "completeness": {"stable_seconds": stable_seconds},
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}},
        }
    )
    loaded = None
    if routed:
        match = {"calling_ae": [calling_ae]} if calling_ae else None
        path = node.rt.paths.home / "policy.yaml"
        path.write_text(policy_yaml("forward", match=match))
        loaded = load_policy(path, {"pacs"})
    router = PolicyRouter(loaded, node.rt.paths.data)
    intake = JobIntake(node.rt.db, node.rt.audit, router, actor=actor)
    return StudyReadiness(config, node.rt.db, on_ready=intake.study_ready)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SimulatedStudy:
    """Four slices: the first three arrive first, the fourth late."""
    return write_ct_series(tmp_path_factory.mktemp("ct4"), PhantomSpec(rows=64, columns=64, slices=4, seed=4))


@dataclass
class Node:
    rt: Runtime
    store: InstanceStore

    def put(self, path: Path, calling_ae: str = CALLING_AE) -> None:
        meta, data = split_part10(path.read_bytes())
        self.store.put(
            data,
            str(meta.TransferSyntaxUID),
            claimed_sop_uid=str(meta.MediaStorageSOPInstanceUID),
            calling_ae=calling_ae,
            peer_host="127.0.0.1",
        )

    def jobs(self) -> list[dict[str, Any]]:
        with self.rt.db.read() as conn:
            return [dict(r) for r in conn.execute(select(t.jobs).order_by(t.jobs.c.id)).mappings()]

    def inputs(self, job_id: int) -> set[str]:
        with self.rt.db.read() as conn:
            return set(
                conn.execute(
                    select(t.instances.c.sop_uid)
                    .join(t.job_inputs, t.job_inputs.c.instance_fk == t.instances.c.id)
                    .where(t.job_inputs.c.job_fk == job_id)
                ).scalars()
            )

    def open_version(self, study_uid: str) -> int:
        with self.rt.db.read() as conn:
            return int(
                conn.execute(
                    select(t.studies.c.open_version).where(t.studies.c.study_uid == study_uid)
                ).scalar_one()
            )

    def study_versions(self) -> dict[str, int]:
        with self.rt.db.read() as conn:
            return dict(conn.execute(select(t.instances.c.sop_uid, t.instances.c.study_version)).all())


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    rt = Runtime.open(None, tmp_path)
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01))
    try:
        yield Node(rt, store)
    finally:
        store.close()
        rt.close()


def _sop(path: Path) -> str:
    return str(split_part10(path.read_bytes())[0].MediaStorageSOPInstanceUID)


# -- a ready study becomes jobs (JobIntake.study_ready) ---------------------------------------


def test_a_ready_study_snapshots_current_instances_into_a_job(node: Node, study: SimulatedStudy) -> None:
    first = study.files[:3]
    for path in first:
        node.put(path)
    readiness = _readiness(node, actor="tester")

    job_ids = readiness.on_ready(study.study_uid)

    assert len(job_ids) == 1
    (job,) = node.jobs()
    assert job["id"] == job_ids[0]
    assert (job["state"], job["pipeline"], job["destinations"], job["study_version"]) == (
        "queued",
        "forward",
        ["pacs"],
        1,
    )
    assert node.inputs(job["id"]) == {_sop(p) for p in first}
    assert node.open_version(study.study_uid) == 2
    with node.rt.db.read() as conn:
        tr = conn.execute(select(t.job_transitions).where(t.job_transitions.c.job_fk == job["id"])).one()
    assert (tr.from_state, tr.to_state, tr.actor) == (None, "queued", "tester")

    (ready,) = node.rt.audit.events(AuditEvent.STUDY_READY)
    assert ready.study_uid == study.study_uid
    assert ready.calling_ae == CALLING_AE
    assert ready.facts["study_version"] == 1
    assert ready.facts["instances"] == 3
    assert ready.facts["new_instances"] == 3
    assert ready.facts["jobs"] == job_ids
    (queued,) = node.rt.audit.events(AuditEvent.JOB_TRANSITION)
    assert (queued.facts["job_id"], queued.facts["to_state"]) == (job["id"], "queued")
    assert node.rt.audit.events(AuditEvent.STUDY_NOT_ROUTED) == []


def test_ready_again_without_new_instances_does_nothing(node: Node, study: SimulatedStudy) -> None:
    for path in study.files[:3]:
        node.put(path)
    readiness = _readiness(node)
    assert len(readiness.on_ready(study.study_uid)) == 1

    assert readiness.on_ready(study.study_uid) == []

    assert len(node.jobs()) == 1
    assert node.open_version(study.study_uid) == 2
    assert len(node.rt.audit.events(AuditEvent.STUDY_READY)) == 1


def test_late_instance_joins_a_new_study_version(node: Node, study: SimulatedStudy) -> None:
    first, late = study.files[:3], study.files[3]
    for path in first:
        node.put(path)
    readiness = _readiness(node)
    (job1,) = readiness.on_ready(study.study_uid)

    node.put(late)

    versions = node.study_versions()
    assert versions[_sop(late)] == 2
    assert {versions[_sop(p)] for p in first} == {1}

    (job2,) = readiness.on_ready(study.study_uid)
    jobs = {j["id"]: j for j in node.jobs()}
    assert jobs[job2]["study_version"] == 2
    assert jobs[job2]["state"] == "queued"
    assert node.inputs(job2) == {_sop(p) for p in study.files}  # the whole study, as it is now
    assert node.inputs(job1) == {_sop(p) for p in first}  # the first snapshot is unchanged
    assert jobs[job1]["study_version"] == 1
    assert node.open_version(study.study_uid) == 3
    ready = node.rt.audit.events(AuditEvent.STUDY_READY)
    assert [(e.facts["study_version"], e.facts["instances"], e.facts["new_instances"]) for e in ready] == [
        (1, 3, 3),
        (2, 4, 1),
    ]


def test_no_matching_route_audits_not_routed(node: Node, study: SimulatedStudy) -> None:
    for path in study.files[:2]:
        node.put(path)
    readiness = _readiness(node, calling_ae="OTHER_AE")

    assert readiness.on_ready(study.study_uid) == []

    assert node.jobs() == []
    (not_routed,) = node.rt.audit.events(AuditEvent.STUDY_NOT_ROUTED)
    assert not_routed.study_uid == study.study_uid
    assert not_routed.calling_ae == CALLING_AE
    assert not_routed.facts["study_version"] == 1
    assert not_routed.facts["reason"] == "no rule of the policy matches"
    assert "calling AE in ['OTHER_AE']" in not_routed.facts["deciding_conditions"]["local-rule"]
    (ready,) = node.rt.audit.events(AuditEvent.STUDY_READY)
    assert ready.facts["jobs"] == []
    assert node.rt.audit.events(AuditEvent.JOB_TRANSITION) == []


def test_no_routes_at_all_creates_no_job(node: Node, study: SimulatedStudy) -> None:
    node.put(study.files[0])
    readiness = _readiness(node, routed=False)
    assert readiness.on_ready(study.study_uid) == []
    assert node.jobs() == []
    assert len(node.rt.audit.events(AuditEvent.STUDY_NOT_ROUTED)) == 1


def test_route_for_the_calling_ae_matches(node: Node, study: SimulatedStudy) -> None:
    node.put(study.files[0])
    readiness = _readiness(node, calling_ae=CALLING_AE)
    assert len(readiness.on_ready(study.study_uid)) == 1
    assert len(node.jobs()) == 1


# -- the timer -----------------------------------------------------------------------------


def _wait_for_job(node: Node, timeout: float) -> dict[str, Any] | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = node.jobs()
        if jobs:
            return jobs[0]
        time.sleep(0.02)
    return None


def test_timer_makes_study_ready_after_stable_seconds(node: Node, study: SimulatedStudy) -> None:
    readiness = _readiness(node, stable_seconds=0.3)
    readiness.start()
    try:
        for path in study.files[:2]:
            node.put(path)
        arrived = time.time()
        readiness.instance_arrived(study.study_uid, CALLING_AE)
        job = _wait_for_job(node, timeout=1.5)
    finally:
        readiness.shutdown()
    assert job is not None, "no job 1.5 s after the last arrival with stable_seconds=0.3"
    assert job["created_at"] >= arrived + 0.3
    assert job["study_version"] == 1
    assert node.inputs(job["id"]) == {_sop(p) for p in study.files[:2]}
    assert len(node.rt.audit.events(AuditEvent.STUDY_READY)) == 1


def test_rearrivals_postpone_readiness(node: Node, study: SimulatedStudy) -> None:
    stable = 0.3
    readiness = _readiness(node, stable_seconds=stable)
    readiness.start()
    try:
        node.put(study.files[0])
        start = time.time()
        last_arrival = start
        while time.time() - start < 0.6:
            now = time.time()
            if now - last_arrival >= stable:
                pytest.skip("machine too slow: arrivals were further apart than stable_seconds")
            last_arrival = now
            readiness.instance_arrived(study.study_uid, CALLING_AE)
            assert node.jobs() == [], "ready while instances were still arriving"
            time.sleep(0.1)
        job = _wait_for_job(node, timeout=1.5)
    finally:
        readiness.shutdown()
    assert job is not None
    assert job["created_at"] >= last_arrival + stable
    assert job["created_at"] >= start + 0.6  # later than stable_seconds after the first arrival
    assert len(node.jobs()) == 1  # one job for the whole burst
    assert len(node.rt.audit.events(AuditEvent.STUDY_READY)) == 1


def test_start_rearms_pending_studies_from_the_index(node: Node, study: SimulatedStudy) -> None:
    """After a restart, a study with instances not yet in a job becomes ready without new arrivals."""
    node.put(study.files[0])
    readiness = _readiness(node, stable_seconds=0.2)
    readiness.start()
    try:
        job = _wait_for_job(node, timeout=1.5)
    finally:
        readiness.shutdown()
    assert job is not None
    assert node.inputs(job["id"]) == {_sop(study.files[0])}
