"""The outbox: backoff, delivery to a real storage SCP, retries, dead-letter, operator retry,
recovery; TPS validation before sending; storage commitment results, failures and timeouts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select, update

from audit import AuditEvent, Outcome
from dicom_node.config import NodeConfig, OutboxSection
from dicom_node.db import schema as t
from dicom_node.delivery.commitment import CommitmentState
from dicom_node.delivery.ledger import DeliveryState, backoff_seconds
from dicom_node.delivery.outbox import Outbox, create_deliveries
from dicom_node.delivery.profiles import DestinationProfiles, tps_destinations
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.part10 import split_part10
from dicom_node.ingest.store import InstanceStore
from dicom_node.jobs.claims import claim_id, orphan_test
from dicom_node.jobs.state import JobState, create_job, record_outputs, transition
from dicom_node.lab.localpeers import MiniPACS, free_port
from dicom_node.lab.simulate import write_ct_series
from dicom_node.net.commitment import PUSH_MODEL, PUSH_MODEL_INSTANCE, CommitmentReport, Failure, ReportStatus
from dicom_node.runtime import Runtime
from models.sim.phantom import PhantomSpec
from pipelines.base import OutputInstance, PipelineResult

SLICES = 3

# -- backoff -------------------------------------------------------------------------------


def test_backoff_grows_by_factor_and_is_capped() -> None:
    policy = OutboxSection(backoff_initial_seconds=5, backoff_factor=2, backoff_max_seconds=30)
    assert [backoff_seconds(policy, n) for n in range(1, 7)] == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]
    assert backoff_seconds(policy, 0) == 5.0  # before any failure: the initial delay
    assert backoff_seconds(policy, 100) == 30.0  # no overflow far out
    flat = OutboxSection(backoff_initial_seconds=3, backoff_factor=1, backoff_max_seconds=100)
    assert {backoff_seconds(flat, n) for n in range(1, 10)} == {3.0}
    triple = OutboxSection(backoff_initial_seconds=0.5, backoff_factor=3, backoff_max_seconds=1000)
    assert [backoff_seconds(triple, n) for n in (1, 2, 3)] == [0.5, 1.5, 4.5]


# -- a job with stored inputs, ready for delivery ------------------------------------------


@dataclass
class Env:
    rt: Runtime
    study_uid: str
    series_uid: str
    job_id: int
    outputs: tuple[OutputInstance, ...]

    def delivery(self) -> dict[str, Any]:
        with self.rt.db.read() as conn:
            return dict(conn.execute(select(t.deliveries)).mappings().one())

    def attempts(self) -> list[dict[str, Any]]:
        with self.rt.db.read() as conn:
            return [
                dict(r)
                for r in conn.execute(
                    select(t.delivery_attempts).order_by(t.delivery_attempts.c.id)
                ).mappings()
            ]

    def job_state(self) -> str:
        with self.rt.db.read() as conn:
            return str(conn.execute(select(t.jobs.c.state).where(t.jobs.c.id == self.job_id)).scalar_one())

    def history(self) -> list[tuple[str | None, str, str | None]]:
        with self.rt.db.read() as conn:
            rows = conn.execute(
                select(
                    t.job_transitions.c.from_state, t.job_transitions.c.to_state, t.job_transitions.c.actor
                )
                .where(t.job_transitions.c.job_fk == self.job_id)
                .order_by(t.job_transitions.c.id)
            ).all()
        return [tuple(r) for r in rows]

    def make_due(self) -> None:
        with self.rt.db.write() as conn:
            conn.execute(update(t.deliveries).values(next_attempt_at=time.time() - 1))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    sim = write_ct_series(tmp_path / "sim", PhantomSpec(rows=64, columns=64, slices=SLICES, seed=7))
    rt = Runtime.open(None, tmp_path / "home")
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01))
    try:
        for path in sim.files:
            meta, data = split_part10(path.read_bytes())
            store.put(
                data,
                str(meta.TransferSyntaxUID),
                claimed_sop_uid=str(meta.MediaStorageSOPInstanceUID),
                calling_ae="CT1",
                peer_host="127.0.0.1",
            )
    finally:
        store.close()
    with rt.db.write() as conn:
        study_fk = conn.execute(select(t.studies.c.id)).scalar_one()
        rows = conn.execute(
            select(t.instances, t.series.c.series_uid)
            .join(t.series, t.series.c.id == t.instances.c.series_fk)
            .order_by(t.instances.c.instance_number)
        ).all()
        job_id = create_job(
            conn,
            study_fk=study_fk,
            study_version=1,
            pipeline="forward",
            destinations=["pacs"],
            instance_ids=[r.id for r in rows],
        )
        transition(conn, job_id, JobState.RUNNING, expect=JobState.QUEUED)
        # settled as the runner settles a job: its destinations were checked before the gate
        transition(conn, job_id, JobState.SUCCEEDED, expect=JobState.RUNNING, destination_problems=[])
        outputs = tuple(
            OutputInstance(
                sop_uid=r.sop_uid,
                series_uid=r.series_uid,
                sop_class_uid=r.sop_class_uid,
                transfer_syntax_uid=r.transfer_syntax_uid,
                path=rt.paths.data / r.path,
            )
            for r in rows
        )
        assert create_deliveries(conn, job_id, outputs, ["pacs"]) == 1
        transition(conn, job_id, JobState.DELIVERING, expect=JobState.SUCCEEDED)
    assert len(outputs) == SLICES
    try:
        yield Env(rt, sim.study_uid, sim.series_uid, job_id, outputs)
    finally:
        rt.close()


def _config(port: int, destination: dict[str, Any] | None = None, **outbox: float) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "node": {"ae_title": "DICOM_NODE"},
            "destinations": {
                "pacs": {
                    "ae_title": "MINIPACS",
                    "host": "127.0.0.1",
                    "port": port,
                    "timeout_seconds": 30,  # a loaded CI machine must not abort a live association
                    **(destination or {}),
                }
            },
            "outbox": outbox,
        }
    )


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[MiniPACS]:
    peer = MiniPACS(tmp_path / "peer").start()
    try:
        yield peer
    finally:
        peer.stop()


# -- delivery ------------------------------------------------------------------------------


def test_create_deliveries_records_outputs_and_one_pending_delivery(env: Env) -> None:
    d = env.delivery()
    assert (d["job_fk"], d["series_uid"], d["destination"], d["state"], d["attempts"]) == (
        env.job_id,
        env.series_uid,
        "pacs",
        "pending",
        0,
    )
    with env.rt.db.read() as conn:
        outs = conn.execute(select(t.job_outputs).order_by(t.job_outputs.c.id)).mappings().all()
    assert [o["sop_uid"] for o in outs] == [o.sop_uid for o in env.outputs]
    assert [o["path"] for o in outs] == [str(o.path) for o in env.outputs]


def test_a_tps_destination_gets_the_image_series_and_not_its_ai_companions(env: Env) -> None:
    companions = {
        "1.2.840.10008.5.1.4.1.1.30": generate_uid(),  # Parametric Map (uncertainty)
        "1.2.840.10008.5.1.4.1.1.66.4": generate_uid(),  # Segmentation (suspect regions)
        "1.2.840.10008.5.1.4.1.1.88.33": generate_uid(),  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.7": generate_uid(),  # Secondary Capture overlay
    }
    extra = tuple(
        OutputInstance(generate_uid(), series, sop_class, ExplicitVRLittleEndian, Path(f"/x/{series}.dcm"))
        for sop_class, series in companions.items()
    )
    config = _config(1, None)
    config = config.model_copy(
        update={
            "destinations": {
                **config.destinations,
                "tps": config.destinations["pacs"].model_copy(update={"profile": "tps"}),
            }
        }
    )
    assert tps_destinations(config) == {"tps"}
    with env.rt.db.write() as conn:
        record_outputs(conn, env.job_id, extra)
        # pacs: the four companions (the image series is queued already); tps: the image series only
        profiles = DestinationProfiles(config)
        assert profiles.queue(conn, env.job_id, ["pacs", "tps"]) == (5, 6)  # 5 new, 6 in all
        assert profiles.queue(conn, env.job_id, ["pacs", "tps"]) == (0, 6)  # idempotent
        rows = conn.execute(select(t.deliveries.c.series_uid, t.deliveries.c.destination)).all()
    assert sorted(s for s, d in rows if d == "tps") == [env.series_uid]
    assert sorted(s for s, d in rows if d == "pacs") == sorted([env.series_uid, *companions.values()])


def test_delivery_to_minipacs(env: Env, pacs: MiniPACS) -> None:
    config = _config(pacs.dicom_port)
    worker = claim_id("run-a")
    outbox = Outbox(config, env.rt.db, env.rt.audit, worker)

    task = outbox.claim_due()
    assert task is not None
    assert (task.job_id, task.study_uid, task.series_uid, task.destination, task.attempt) == (
        env.job_id,
        env.study_uid,
        env.series_uid,
        "pacs",
        1,
    )
    assert [f.sop_uid for f in task.files] == [o.sop_uid for o in env.outputs]
    claimed = env.delivery()
    assert (claimed["state"], claimed["attempts"], claimed["claimed_by"]) == ("sending", 1, worker)
    assert claimed["lease_until"] > time.time()
    assert outbox.claim_due() is None  # a claimed delivery is not handed out twice

    report = outbox.send(task)

    assert report.ok, report.error
    assert report.sent == SLICES
    d = env.delivery()
    assert d["state"] == DeliveryState.DELIVERED
    assert d["delivered_at"] is not None
    assert (d["claimed_by"], d["lease_until"], d["last_error"]) == (None, None, None)
    assert env.job_state() == JobState.DELIVERED
    assert env.history()[-1] == ("delivering", "delivered", worker)

    # the peer received every file, with the same content (MiniPACS may pick another
    # uncompressed transfer syntax, so the decoded data sets are compared)
    assert pacs.count() == SLICES
    for out in env.outputs:
        received = pacs.dir / f"{out.sop_uid}.dcm"
        assert received.is_file()
        got, sent = dcmread(received), dcmread(out.path)
        assert got.SOPInstanceUID == out.sop_uid
        assert got.StudyInstanceUID == env.study_uid
        assert got.PixelData == sent.PixelData
        assert got == sent

    (attempt,) = env.attempts()
    assert attempt["outcome"] == "delivered"
    assert attempt["delivery_fk"] == d["id"]
    assert attempt["finished_at"] >= attempt["started_at"]
    assert (attempt["instances_sent"], attempt["instances_failed"], attempt["detail"]) == (SLICES, 0, None)

    audit = env.rt.audit
    (begin,) = audit.events(AuditEvent.BEGIN_TRANSFERRING)
    assert begin.called_ae == "MINIPACS" and begin.facts["instances"] == SLICES
    (att,) = audit.events(AuditEvent.DELIVERY_ATTEMPT)
    assert att.outcome == Outcome.SUCCESS and att.facts["result"] == "delivered"
    (sent,) = audit.events(AuditEvent.INSTANCES_TRANSFERRED)
    assert sent.study_uid == env.study_uid
    assert sent.facts["sop_uids"] == [o.sop_uid for o in env.outputs]
    moves = [(e.facts["from_state"], e.facts["to_state"]) for e in audit.events(AuditEvent.JOB_TRANSITION)]
    assert moves == [("delivering", "delivered")]

    assert outbox.claim_due() is None  # nothing left


def test_retry_then_dead_letter_then_operator_retry(env: Env, tmp_path: Path) -> None:
    # The peer exists but is not started yet: its port is closed.
    pacs = MiniPACS(tmp_path / "late-peer")
    config = _config(pacs.dicom_port, max_attempts=2, backoff_initial_seconds=60, backoff_max_seconds=600)
    outbox = Outbox(config, env.rt.db, env.rt.audit, claim_id("run-b"))

    # attempt 1: refused → retry later by the backoff
    task = outbox.claim_due()
    assert task is not None and task.attempt == 1
    report = outbox.send(task)
    assert not report.ok and report.retryable
    d = env.delivery()
    (a1,) = env.attempts()
    assert a1["outcome"] == "retry"
    assert a1["detail"] and f"127.0.0.1:{pacs.dicom_port}" in a1["detail"]
    assert d["state"] == DeliveryState.PENDING
    assert d["attempts"] == 1
    assert d["last_error"] == a1["detail"]
    assert d["next_attempt_at"] == pytest.approx(a1["finished_at"] + backoff_seconds(config.outbox, 1))
    assert d["next_attempt_at"] > time.time() + 50
    assert (d["claimed_by"], d["lease_until"]) == (None, None)
    assert env.job_state() == JobState.DELIVERING
    (retry_audit,) = env.rt.audit.events(AuditEvent.DELIVERY_ATTEMPT)
    assert retry_audit.outcome == Outcome.MINOR_FAILURE
    assert retry_audit.facts["result"] == "retry"
    assert retry_audit.facts["next_attempt_in"] == pytest.approx(60.0, abs=0.2)
    assert outbox.claim_due() is None  # not due yet

    # attempt 2 (= max_attempts): dead-lettered, the job fails
    env.make_due()
    task = outbox.claim_due()
    assert task is not None and task.attempt == 2
    assert not outbox.send(task).ok
    d = env.delivery()
    assert d["state"] == DeliveryState.DEAD
    assert d["attempts"] == 2
    assert [a["outcome"] for a in env.attempts()] == ["retry", "dead"]
    assert env.job_state() == JobState.FAILED
    with env.rt.db.read() as conn:
        reason = conn.execute(select(t.jobs.c.reason).where(t.jobs.c.id == env.job_id)).scalar_one()
    assert reason == "1 delivery(ies) dead-lettered"
    (dead,) = env.rt.audit.events(AuditEvent.DELIVERY_DEAD_LETTER)
    assert dead.outcome == Outcome.SERIOUS_FAILURE and dead.facts["attempt"] == 2
    (failed,) = env.rt.audit.events(AuditEvent.JOB_TRANSITION)
    assert (failed.facts["from_state"], failed.facts["to_state"]) == ("delivering", "failed")
    env.make_due()
    assert outbox.claim_due() is None  # dead is never picked up again by itself

    # operator retry: pending again with fresh attempts; the job goes back to delivering
    with pytest.raises(KeyError):
        outbox.retry_dead(9999, actor="operator")
    outbox.retry_dead(d["id"], actor="operator")
    d = env.delivery()
    assert (d["state"], d["attempts"]) == ("pending", 0)
    assert d["next_attempt_at"] <= time.time()
    assert env.job_state() == JobState.DELIVERING
    assert env.history()[-1] == ("failed", "delivering", "operator")
    with pytest.raises(ValueError):
        outbox.retry_dead(d["id"], actor="operator")  # not dead any more

    # the peer comes up: the retried delivery goes through and the job is delivered
    pacs.start()
    try:
        task = outbox.claim_due()
        assert task is not None and task.attempt == 1
        assert outbox.send(task).ok
    finally:
        pacs.stop()
    assert env.delivery()["state"] == DeliveryState.DELIVERED
    assert env.job_state() == JobState.DELIVERED
    assert pacs.count() == SLICES
    assert [a["outcome"] for a in env.attempts()] == ["retry", "dead", "delivered"]


def test_unconfigured_destination_is_dead_lettered(env: Env) -> None:
    config = NodeConfig.model_validate({})  # "pacs" is no longer configured
    outbox = Outbox(config, env.rt.db, env.rt.audit, claim_id("run-c"))
    task = outbox.claim_due()
    assert task is not None
    report = outbox.send(task)
    assert not report.ok and not report.retryable
    assert env.delivery()["state"] == DeliveryState.DEAD
    assert env.attempts()[0]["outcome"] == "dead"
    assert "no longer configured" in env.attempts()[0]["detail"]
    assert env.job_state() == JobState.FAILED


def test_recover_orphaned_sending_delivery(env: Env) -> None:
    config = _config(free_port())
    lost = Outbox(config, env.rt.db, env.rt.audit, claim_id("old-run"))
    task = lost.claim_due()
    assert task is not None
    assert env.delivery()["state"] == DeliveryState.SENDING

    # a claim of the current run by a live process (this one) is not orphaned
    assert lost.recover(orphan_test("old-run")) == 0
    assert env.delivery()["state"] == DeliveryState.SENDING

    # a new run finds the old run's claim and takes it back
    fresh = Outbox(config, env.rt.db, env.rt.audit, claim_id("new-run"))
    assert fresh.recover(orphan_test("new-run")) == 1
    d = env.delivery()
    assert (d["state"], d["claimed_by"], d["lease_until"]) == ("pending", None, None)
    assert d["next_attempt_at"] <= time.time()
    (attempt,) = env.attempts()
    assert attempt["outcome"] == "interrupted"
    assert attempt["finished_at"] is not None
    assert attempt["detail"] == "worker lost during send"
    assert env.job_state() == JobState.DELIVERING

    # the next claim counts on from the interrupted attempt
    again = fresh.claim_due()
    assert again is not None and again.attempt == 2
    assert fresh.recover(orphan_test("new-run")) == 0  # own live claim: left alone


def test_recover_takes_back_expired_lease(env: Env) -> None:
    config = _config(free_port())
    outbox = Outbox(config, env.rt.db, env.rt.audit, claim_id("run-d"))
    assert outbox.claim_due() is not None
    with env.rt.db.write() as conn:
        conn.execute(update(t.deliveries).values(lease_until=time.time() - 1))
    assert outbox.recover(orphan_test("run-d")) == 1
    assert env.delivery()["state"] == DeliveryState.PENDING
    assert env.attempts()[0]["outcome"] == "interrupted"


# -- TPS: a valid series is sent (the checks run before the gate: see the end) ---------


def test_tps_destination_sends_a_valid_series(env: Env, pacs: MiniPACS) -> None:
    outbox = Outbox(_config(pacs.dicom_port, {"profile": "tps"}), env.rt.db, env.rt.audit, claim_id("run-ok"))
    task = outbox.claim_due()
    assert task is not None and outbox.send(task).ok
    assert pacs.count() == SLICES and env.delivery()["state"] == DeliveryState.DELIVERED


def test_a_tps_delivery_of_a_job_made_before_the_checks_ran_before_the_gate_is_refused(
    env: Env, pacs: MiniPACS
) -> None:
    with env.rt.db.write() as conn:  # a job an older node settled: never checked
        conn.execute(update(t.jobs).where(t.jobs.c.id == env.job_id).values(destination_problems=None))
    outbox = Outbox(
        _config(pacs.dicom_port, {"profile": "tps"}), env.rt.db, env.rt.audit, claim_id("run-old")
    )
    task = outbox.claim_due()
    assert task is not None and not task.checked

    report = outbox.send(task)

    assert not report.ok and not report.retryable
    assert pacs.count() == 0  # nothing sent
    d = env.delivery()
    assert d["state"] == DeliveryState.DEAD and d["attempts"] == 1
    assert "run the job again" in d["last_error"]
    (refused,) = env.rt.audit.events(AuditEvent.DELIVERY_REFUSED)
    assert refused.outcome == Outcome.SERIOUS_FAILURE and refused.facts["profile"] == "tps"
    assert env.rt.audit.events(AuditEvent.BEGIN_TRANSFERRING) == []
    # a PACS destination is sent such a job's series as before
    env.make_due()
    with env.rt.db.write() as conn:
        conn.execute(update(t.deliveries).values(state="pending", attempts=0))
        conn.execute(update(t.jobs).where(t.jobs.c.id == env.job_id).values(state="delivering"))
    task = Outbox(_config(pacs.dicom_port), env.rt.db, env.rt.audit, claim_id("run-pacs")).claim_due()
    assert task is not None
    assert Outbox(_config(pacs.dicom_port), env.rt.db, env.rt.audit, claim_id("run-pacs")).send(task).ok


# -- storage commitment --------------------------------------------------------------------


class CommitmentPeer:
    """A storage SCP that also takes storage commitment requests (N-ACTION).

    With ``same_association`` it reports (N-EVENT-REPORT) on the requesting association
    at once; otherwise it stays silent, and the test hands the outbox the report the
    receiver would get from a new association.
    """

    aet = "COMMITSCP"

    def __init__(self, *, same_association: bool) -> None:
        self.same_association = same_association
        self.port = free_port()
        self.stored: set[str] = set()
        self.requests: list[Dataset] = []
        self._server: Any = None

    def start(self) -> CommitmentPeer:
        ae = AE(ae_title=self.aet)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(PUSH_MODEL, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.on_store), (evt.EVT_N_ACTION, self.on_action)],
        )
        return self

    def stop(self) -> None:
        self._server.shutdown()

    def on_store(self, event: Any) -> int:
        self.stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def on_action(self, event: Any) -> tuple[int, None]:
        info = event.action_information
        self.requests.append(info)
        if self.same_association:
            threading.Thread(target=self.report, args=(event.assoc, info), daemon=True).start()
        return 0x0000, None

    def report(self, assoc: Any, info: Dataset) -> None:
        time.sleep(0.1)  # after the N-ACTION response has gone
        ds = Dataset()
        ds.TransactionUID = info.TransactionUID
        ds.ReferencedSOPSequence = list(info.ReferencedSOPSequence)
        assoc.send_n_event_report(ds, 1, PUSH_MODEL, PUSH_MODEL_INSTANCE)


@pytest.fixture
def silent_peer() -> Iterator[CommitmentPeer]:
    peer = CommitmentPeer(same_association=False).start()
    try:
        yield peer
    finally:
        peer.stop()


def _commit_config(peer: CommitmentPeer, timeout: float = 30.0) -> NodeConfig:
    return _config(
        peer.port,
        {"ae_title": peer.aet, "storage_commitment": True, "commitment_timeout_seconds": timeout},
        backoff_initial_seconds=60,
    )


def _commitments(env: Env) -> list[dict[str, Any]]:
    with env.rt.db.read() as conn:
        rows = conn.execute(select(t.storage_commitments).order_by(t.storage_commitments.c.id))
        return [dict(r) for r in rows.mappings()]


def _report(transaction_uid: str, outputs: tuple[OutputInstance, ...], failed: int = 0) -> CommitmentReport:
    refs = [(o.sop_class_uid, o.sop_uid) for o in outputs]
    return CommitmentReport(
        transaction_uid,
        2 if failed else 1,
        tuple(refs[failed:]),
        tuple(Failure(c, u, 0x0112) for c, u in refs[:failed]),
    )


def test_commitment_reported_on_the_same_association_delivers(env: Env) -> None:
    peer = CommitmentPeer(same_association=True).start()
    try:
        outbox = Outbox(_commit_config(peer), env.rt.db, env.rt.audit, claim_id("run-same"))
        task = outbox.claim_due()
        assert task is not None
        report = outbox.send(task)
    finally:
        peer.stop()
    assert report.ok and report.commitment_requested
    assert peer.stored == {o.sop_uid for o in env.outputs}
    (request,) = peer.requests
    assert [i.ReferencedSOPInstanceUID for i in request.ReferencedSOPSequence] == [
        o.sop_uid for o in env.outputs
    ]

    (commitment,) = _commitments(env)
    assert commitment["transaction_uid"] == request.TransactionUID
    assert (commitment["state"], commitment["reported_via"], commitment["reported_by"]) == (
        "committed",
        "same-association",
        peer.aet,
    )
    assert (commitment["committed"], commitment["failed"]) == (SLICES, 0)
    assert env.delivery()["state"] == DeliveryState.DELIVERED
    assert env.attempts()[0]["outcome"] == "delivered"
    assert env.job_state() == JobState.DELIVERED
    (asked,) = env.rt.audit.events(AuditEvent.STORAGE_COMMITMENT_REQUESTED)
    (result,) = env.rt.audit.events(AuditEvent.STORAGE_COMMITMENT_RESULT)
    assert asked.seq < result.seq
    assert asked.facts["transaction_uid"] == result.facts["transaction_uid"] == request.TransactionUID
    assert (result.facts["result"], result.facts["committed"], result.facts["failed"]) == (
        "committed",
        SLICES,
        0,
    )
    (attempt,) = env.rt.audit.events(AuditEvent.DELIVERY_ATTEMPT)
    assert attempt.facts["result"] == "delivered"


def test_commitment_failure_sends_the_series_again(env: Env, silent_peer: CommitmentPeer) -> None:
    config = _commit_config(silent_peer)
    outbox = Outbox(config, env.rt.db, env.rt.audit, claim_id("run-fail"))
    task = outbox.claim_due()
    assert task is not None
    before = time.time()
    assert outbox.send(task).ok
    d = env.delivery()
    assert d["state"] == DeliveryState.COMMITTING
    assert before + 30 <= d["next_attempt_at"] <= time.time() + 30  # the deadline
    assert env.attempts()[0]["outcome"] == "committing"
    assert env.job_state() == JobState.DELIVERING
    (first,) = _commitments(env)
    assert first["state"] == CommitmentState.REQUESTED and first["deadline"] == d["next_attempt_at"]

    # The report comes in on a new association — to a restarted node: a fresh outbox.
    after_restart = Outbox(config, env.rt.db, env.rt.audit, claim_id("run-fail-2"))
    status = after_restart.commitments.record_report(
        _report(first["transaction_uid"], env.outputs, failed=1),
        reported_by=silent_peer.aet,
        peer_host="127.0.0.1",
        via="new-association",
    )
    assert status == ReportStatus.SUCCESS
    d = env.delivery()
    assert d["state"] == DeliveryState.PENDING
    assert d["last_error"] == "pacs did not commit 1 of 3 instance(s): 1 no such object instance (0x0112)"
    assert d["next_attempt_at"] >= time.time() + 50  # the backoff
    (first,) = _commitments(env)
    assert (first["state"], first["committed"], first["failed"]) == ("failed", 2, 1)
    assert first["failures"] == [
        {
            "sop_uid": env.outputs[0].sop_uid,
            "sop_class_uid": env.outputs[0].sop_class_uid,
            "reason": "no such object instance (0x0112)",
        }
    ]
    assert env.attempts()[0]["outcome"] == "retry"
    (result,) = env.rt.audit.events(AuditEvent.STORAGE_COMMITMENT_RESULT)
    assert result.outcome == Outcome.MINOR_FAILURE and result.facts["via"] == "new-association"
    assert result.calling_ae == silent_peer.aet and result.facts["failed"] == 1

    # the same report again is acknowledged and ignored; strangers are refused
    again = _report(first["transaction_uid"], env.outputs, failed=1)
    assert (
        after_restart.commitments.record_report(again, reported_by=silent_peer.aet, peer_host=None, via="x")
        == 0
    )
    stranger = after_restart.commitments.record_report(
        _report(first["transaction_uid"], env.outputs), reported_by="INTRUDER", peer_host="10.0.0.9", via="x"
    )
    unknown = after_restart.commitments.record_report(
        _report(generate_uid(), env.outputs), reported_by=silent_peer.aet, peer_host=None, via="x"
    )
    assert stranger == unknown == ReportStatus.PROCESSING_FAILURE
    assert env.delivery()["state"] == DeliveryState.PENDING
    ignored = [
        e for e in env.rt.audit.events(AuditEvent.STORAGE_COMMITMENT_RESULT) if e.facts["result"] == "ignored"
    ]
    assert [e.facts["reason"] for e in ignored] == [
        "already recorded as failed",
        f"reported by INTRUDER, not by {silent_peer.aet} the series was sent to",
        "no delivery waits for this transaction UID",
    ]

    # attempt 2: sent again, a new transaction, committed this time
    env.make_due()
    task = after_restart.claim_due()
    assert task is not None and task.attempt == 2
    assert after_restart.send(task).ok
    assert env.delivery()["state"] == DeliveryState.COMMITTING
    second = _commitments(env)[1]
    assert second["transaction_uid"] != first["transaction_uid"]
    after_restart.commitments.record_report(
        _report(second["transaction_uid"], env.outputs),
        reported_by=silent_peer.aet,
        peer_host="127.0.0.1",
        via="new-association",
    )
    d = env.delivery()
    assert d["state"] == DeliveryState.DELIVERED and d["delivered_at"] is not None
    assert env.job_state() == JobState.DELIVERED
    assert [a["outcome"] for a in env.attempts()] == ["retry", "delivered"]
    assert len(silent_peer.requests) == 2


def test_commitment_timeout_sends_again_and_a_late_report_still_counts(
    env: Env, silent_peer: CommitmentPeer
) -> None:
    outbox = Outbox(_commit_config(silent_peer), env.rt.db, env.rt.audit, claim_id("run-late"))
    task = outbox.claim_due()
    assert task is not None and outbox.send(task).ok
    assert outbox.commitments.expire_overdue() == 0  # not due yet
    with env.rt.db.write() as conn:
        conn.execute(update(t.deliveries).values(next_attempt_at=time.time() - 1))

    assert outbox.commitments.expire_overdue() == 1

    d = env.delivery()
    assert d["state"] == DeliveryState.PENDING and d["attempts"] == 1
    (commitment,) = _commitments(env)
    txn = commitment["transaction_uid"]
    assert commitment["state"] == CommitmentState.TIMED_OUT
    assert d["last_error"].startswith(f"no storage commitment result from {silent_peer.aet} after ")
    assert d["last_error"].endswith(f"(transaction {txn})")
    assert env.attempts()[0]["outcome"] == "retry"
    (timeout,) = env.rt.audit.events(AuditEvent.STORAGE_COMMITMENT_TIMEOUT)
    assert timeout.facts["transaction_uid"] == txn and timeout.facts["timeout_seconds"] == 30
    assert outbox.commitments.expire_overdue() == 0

    # the report arrives while the retry waits: the series is committed after all
    status = outbox.commitments.record_report(
        _report(txn, env.outputs), reported_by=silent_peer.aet, peer_host="127.0.0.1", via="new-association"
    )
    assert status == ReportStatus.SUCCESS
    assert env.delivery()["state"] == DeliveryState.DELIVERED
    assert _commitments(env)[0]["state"] == CommitmentState.COMMITTED
    assert env.job_state() == JobState.DELIVERED
    assert len(silent_peer.requests) == 1  # the series was not sent twice


def test_peer_without_storage_commitment_fails_before_sending(env: Env, pacs: MiniPACS) -> None:
    config = _config(pacs.dicom_port, {"storage_commitment": True}, max_attempts=3)
    outbox = Outbox(config, env.rt.db, env.rt.audit, claim_id("run-nocommit"))
    task = outbox.claim_due()
    assert task is not None
    report = outbox.send(task)
    assert not report.ok and not report.retryable
    assert "does not accept Storage Commitment Push Model" in str(report.error)
    assert pacs.count() == 0 and _commitments(env) == []
    assert env.delivery()["state"] == DeliveryState.DEAD


# -- a released job whose destinations accept none of its outputs -------------------------

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


class _ReportOnly:
    """A pipeline (``only-report``) whose run writes one SR output (never read) and says
    the stage times it is given."""

    name = "only-report"
    version = "0"

    def __init__(self, timings: dict[str, float] | None = None) -> None:
        self.report = OutputInstance(
            generate_uid(), generate_uid(), SR_CLASS, ExplicitVRLittleEndian, Path("/x/sr.dcm")
        )
        self.timings = timings or {}

    def run(self, study: Any, run_env: Any) -> PipelineResult:
        return PipelineResult(outputs=(self.report,), timings=dict(self.timings))


def _tps_only_config() -> NodeConfig:
    config = _config(1, None)
    tps = config.destinations["pacs"].model_copy(update={"profile": "tps"})
    return config.model_copy(update={"destinations": {"tps": tps}})


def _new_job(env: Env, destinations: list[str]) -> int:
    with env.rt.db.write() as conn:
        return create_job(
            conn,
            study_fk=conn.execute(select(t.studies.c.id)).scalar_one(),
            study_version=1,
            pipeline="only-report",
            destinations=destinations,
            instance_ids=list(conn.execute(select(t.instances.c.id)).scalars()),
        )


def _job_state(env: Env, job_id: int) -> tuple[str, str | None, int]:
    with env.rt.db.read() as conn:
        row = conn.execute(select(t.jobs.c.state, t.jobs.c.reason).where(t.jobs.c.id == job_id)).one()
        n = conn.execute(select(t.deliveries.c.id).where(t.deliveries.c.job_fk == job_id)).all()
    return row.state, row.reason, len(n)


def test_a_released_job_with_nothing_its_tps_accepts_fails_with_the_reason(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.worker import Worker

    monkeypatch.setattr(
        "dicom_node.jobs.runner.get_pipeline", lambda name, model_dir=None, precision="auto": _ReportOnly()
    )
    job_id = _new_job(env, ["tps"])
    worker = Worker(_tps_only_config(), env.rt.paths, env.rt.db, env.rt.audit, "run-t")
    job = worker.runner.claim()
    assert job is not None and job.job_id == job_id
    assert worker.runner.run(job) == JobState.FAILED, "not left waiting in delivering for nothing"
    state, reason, deliveries = _job_state(env, job_id)
    assert (state, deliveries) == ("failed", 0)
    assert reason is not None and "nothing to deliver" in reason and "image series only" in reason
    moves = [
        e.facts["to_state"]
        for e in env.rt.audit.events(AuditEvent.JOB_TRANSITION)
        if e.facts["job_id"] == job_id
    ]
    assert moves[-2:] == ["delivering", "failed"]


def test_approving_a_held_job_with_nothing_its_tps_accepts_is_refused(env: Env) -> None:
    from dicom_node.jobs.review import ReviewError, approve

    job_id = _new_job(env, ["tps"])
    report = OutputInstance(
        generate_uid(), generate_uid(), SR_CLASS, ExplicitVRLittleEndian, Path("/x/sr.dcm")
    )
    with env.rt.db.write() as conn:
        transition(conn, job_id, JobState.RUNNING, expect=JobState.QUEUED)
        transition(conn, job_id, JobState.HELD, expect=JobState.RUNNING, reason="held for review")
        record_outputs(conn, job_id, (report,))
    with pytest.raises(ReviewError, match="nothing to deliver.*image series only"):
        approve(
            env.rt.db, env.rt.audit, job_id, "physicist", handover=DestinationProfiles(_tps_only_config())
        )
    assert _job_state(env, job_id) == ("held", "held for review", 0), "still held, nothing queued"


# -- a TPS destination that would refuse the series: held before the gate -------------------


def test_a_series_the_tps_would_refuse_holds_the_job_and_cannot_be_approved(
    env: Env, pacs: MiniPACS, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.jobs.review import ReviewError, approve
    from dicom_node.worker import Worker

    victim = env.outputs[1].path
    ds = dcmread(victim)
    ds.FrameOfReferenceUID = generate_uid()
    ds.save_as(victim, enforce_file_format=True)

    class SendsTheSeries:
        name = "only-report"
        version = "0"

        def run(self, study: Any, run_env: Any) -> PipelineResult:
            return PipelineResult(outputs=env.outputs)

    monkeypatch.setattr(
        "dicom_node.jobs.runner.get_pipeline", lambda name, model_dir=None, precision="auto": SendsTheSeries()
    )
    config = _config(pacs.dicom_port)
    config = config.model_copy(
        update={"destinations": {"tps": config.destinations["pacs"].model_copy(update={"profile": "tps"})}}
    )
    with env.rt.db.write() as conn:
        job_id = create_job(
            conn,
            study_fk=conn.execute(select(t.studies.c.id)).scalar_one(),
            study_version=1,
            pipeline="only-report",
            destinations=["tps"],
            instance_ids=list(conn.execute(select(t.instances.c.id)).scalars()),
            # a rule that lets failed validation through still cannot send a TPS what it refuses
            qc_policy={"hold_on_failed_validation": False},
        )
    worker = Worker(config, env.rt.paths, env.rt.db, env.rt.audit, "run-tps")
    job = worker.runner.claim()
    assert job is not None and job.job_id == job_id

    assert worker.runner.run(job) == JobState.HELD

    state, reason, deliveries = _job_state(env, job_id)
    assert (state, deliveries) == ("held", 0)  # nothing queued
    with env.rt.db.read() as conn:
        problems = conn.execute(
            select(t.jobs.c.destination_problems).where(t.jobs.c.id == job_id)
        ).scalar_one()
    assert problems and all(p.startswith("tps (profile tps) would refuse it: ") for p in problems)
    assert any("frames of reference mixed in" in p for p in problems)
    assert any("is not the planning MR's" in p for p in problems)
    assert reason is not None and reason.startswith("held for review: tps (profile tps) would refuse it: ")
    (gate,) = [
        e
        for e in env.rt.audit.events(AuditEvent.GATE_DECISION)
        if e.facts["job_id"] == job_id and e.facts["stage"] == "output"
    ]
    assert gate.facts["action"] == "hold" and gate.facts["reasons"] == problems

    # the reviewer sees why, and cannot approve what the TPS would refuse
    with pytest.raises(ReviewError, match="would refuse it.*cannot be approved"):
        approve(env.rt.db, env.rt.audit, job_id, "physicist", handover=DestinationProfiles(config))
    assert _job_state(env, job_id)[::2] == ("held", 0)
    assert pacs.count() == 0
    assert env.rt.audit.events(AuditEvent.REVIEW_APPROVED) == []


# -- transcoding on send -------------------------------------------------------------------


def test_a_transcoded_delivery_says_so_in_its_attempt_and_audit_record(env: Env, tmp_path: Path) -> None:
    from pydicom.uid import CTImageStorage, JPEG2000Lossless

    # The job's outputs are JPEG 2000; the peer takes CT uncompressed only.
    with env.rt.db.write() as conn:
        for out in env.outputs:
            ds = dcmread(out.path)
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
            target = tmp_path / "j2k" / f"{out.sop_uid}.dcm"
            target.parent.mkdir(exist_ok=True)
            ds.save_as(target, enforce_file_format=True)
            conn.execute(
                update(t.job_outputs)
                .where(t.job_outputs.c.sop_uid == out.sop_uid)
                .values(path=str(target), transfer_syntax_uid=JPEG2000Lossless)
            )
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.context.transfer_syntax))
        return 0x0000

    ae = AE(ae_title="MINIPACS")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        outbox = Outbox(_config(port), env.rt.db, env.rt.audit, claim_id("run-t"))
        task = outbox.claim_due()
        assert task is not None
        assert {f.transfer_syntax_uid for f in task.files} == {JPEG2000Lossless}
        report = outbox.send(task)
    finally:
        server.shutdown()

    assert report.ok, report.error
    assert received == [ExplicitVRLittleEndian] * SLICES
    note = (
        "transcoded from JPEG 2000 Image Compression (Lossless Only) to Explicit VR Little Endian "
        f"for {SLICES} instance(s)"
    )
    (attempt,) = env.attempts()
    assert (attempt["outcome"], attempt["instances_sent"], attempt["detail"]) == ("delivered", SLICES, note)
    assert env.delivery()["last_error"] is None  # a note, not an error
    (att,) = env.rt.audit.events(AuditEvent.DELIVERY_ATTEMPT)
    assert (att.facts["note"], att.facts["instances_transcoded"], att.facts["error"]) == (note, SLICES, None)
    from audit.report import build_study_report, render_text

    story = render_text(build_study_report(env.study_uid, env.rt.audit.events(study_uid=env.study_uid)))
    assert f"delivered, {SLICES} sent — {note}" in story


def test_several_associations_send_each_series_once(env: Env, pacs: MiniPACS, tmp_path: Path) -> None:
    """``[outbox] associations = 3``: a worker sends three of a job's four series at once;
    each is claimed, sent and recorded once, and the job settles once."""
    from dicom_node.worker import Worker

    extra: list[OutputInstance] = []
    for n in range(3):  # three more series of the same job, copies with their own UIDs
        series_uid = generate_uid()
        for out in env.outputs:
            ds = dcmread(out.path)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = tmp_path / f"extra-{n}-{ds.SOPInstanceUID}.dcm"
            ds.save_as(path)
            extra.append(
                OutputInstance(
                    ds.SOPInstanceUID, series_uid, out.sop_class_uid, out.transfer_syntax_uid, path
                )
            )
    config = _config(pacs.dicom_port)
    config = config.model_copy(
        update={
            "outbox": OutboxSection(associations=3),
            "workers": config.workers.model_copy(update={"poll_seconds": 0.05}),
        }
    )
    with env.rt.db.write() as conn:
        record_outputs(conn, env.job_id, tuple(extra))
        assert DestinationProfiles(config).queue(conn, env.job_id, ["pacs"])[1] == 4
    worker = Worker(config, env.rt.paths, env.rt.db, env.rt.audit, "run-p")
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        deadline = time.time() + 60
        while env.job_state() != JobState.DELIVERED and time.time() < deadline:
            time.sleep(0.05)
        senders = [th.name for th in threading.enumerate() if th.name.startswith("outbox-")]
        assert len(senders) == 3
    finally:
        worker.stop_event.set()
        runner.join(timeout=10)
    assert env.job_state() == JobState.DELIVERED
    with env.rt.db.read() as conn:
        rows = conn.execute(select(t.deliveries.c.state, t.deliveries.c.attempts)).all()
    assert sorted(rows) == [("delivered", 1)] * 4
    assert pacs.count() == 4 * SLICES
    assert [h[1] for h in env.history()].count("delivered") == 1
    assert len(env.rt.audit.events(AuditEvent.INSTANCES_TRANSFERRED)) == 4


def test_a_job_that_waited_for_its_model_keeps_the_wait(
    env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker's first job that finds the model still loading keeps the wait as its first
    stage time (``model-load``); the next job, with the model built, has none."""
    from dicom_node.worker import Worker

    def slow_build(name: str, model_dir: Any = None, precision: str = "auto") -> _ReportOnly:
        time.sleep(0.3)  # the imports and the weights
        return _ReportOnly({"predict": 1.5})

    monkeypatch.setattr("dicom_node.jobs.runner.get_pipeline", slow_build)
    worker = Worker(_config(1, None), env.rt.paths, env.rt.db, env.rt.audit, "run-m")
    stages = []
    for _ in range(2):
        job_id = _new_job(env, [])
        job = worker.runner.claim()
        assert job is not None and job.job_id == job_id
        assert worker.runner.run(job) == JobState.SUCCEEDED
        with env.rt.db.read() as conn:
            rows = conn.execute(
                select(t.job_stage_times.c.stage, t.job_stage_times.c.seconds).where(
                    t.job_stage_times.c.job_fk == job_id
                )
            ).all()
        stages.append(dict(rows))
    first, second = stages
    assert set(first) == {"model-load", "predict"} and first["model-load"] >= 0.3
    assert second == {"predict": 1.5}


def test_a_runs_stage_times_are_kept_and_reach_the_metrics(
    env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What each stage of a run took is stored with the job and shows in /metrics as
    ``dicomnode_job_stage_seconds{pipeline, stage}`` (``predict``: the inference time)."""
    from prometheus_client.parser import text_string_to_metric_families

    from dicom_node.web.metrics import NodeCollector, render
    from dicom_node.worker import Worker
    from pipelines.base import RunEnvironment
    from pipelines.stages import StagedPipeline

    class Wait:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, ctx: Any) -> Any:
            time.sleep(0.02)
            return ctx

    staged = StagedPipeline(name="timed", version="1", stages=(Wait("load"), Wait("predict")))
    # the stages ignore the study; the run cleans its work directory's spill files
    timed = staged.run(Any, RunEnvironment(workdir=tmp_path))  # type: ignore[arg-type]
    assert list(timed.timings) == ["load", "predict"] and all(s >= 0.02 for s in timed.timings.values())

    monkeypatch.setattr(
        "dicom_node.jobs.runner.get_pipeline",
        lambda name, model_dir=None, precision="auto": _ReportOnly({"load": 0.25, "predict": 3.5}),
    )
    job_id = _new_job(env, [])
    worker = Worker(_config(1, None), env.rt.paths, env.rt.db, env.rt.audit, "run-s")
    job = worker.runner.claim()
    assert job is not None and job.job_id == job_id
    assert worker.runner.run(job) == JobState.SUCCEEDED
    with env.rt.db.read() as conn:
        kept = conn.execute(select(t.job_stage_times.c.stage, t.job_stage_times.c.seconds)).all()
    assert sorted(kept) == [("load", 0.25), ("predict", 3.5)]
    text = render(NodeCollector(env.rt.db, env.rt.audit, tmp_path, tmp_path / "cp.jsonl")).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    key = (("pipeline", "only-report"), ("stage", "predict"))
    assert samples[("dicomnode_job_stage_seconds_count", key)] == 1
    assert samples[("dicomnode_job_stage_seconds_sum", key)] == 3.5
    assert samples[("dicomnode_job_stage_seconds_bucket", (("le", "5.0"), *key))] == 1
    assert samples[("dicomnode_job_stage_seconds_bucket", (("le", "1.0"), *key))] == 0
