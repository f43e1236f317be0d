"""Retention (``[retention]``): old studies leave the disk; nothing still needed does, and
nothing that arrives meanwhile is lost.

SIMULATED instances (``tests.test_archives.mr_instance``) stored through the node's own
store and indexer; jobs and deliveries are rows, as the runner and the outbox write them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import insert, select, update

from audit import AuditEvent
from dicom_node.config import RetentionSection
from dicom_node.db import queries
from dicom_node.db import schema as t
from dicom_node.delivery.ledger import DeliveryState
from dicom_node.delivery.outbox import Outbox
from dicom_node.delivery.retention import Outcome as RetentionOutcome
from dicom_node.delivery.retention import Retention, review
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.store import InstanceStore, StoreOutcome
from dicom_node.jobs.state import JobState, create_job
from dicom_node.runtime import Runtime
from tests.cli_helpers import cli
from tests.test_archives import mr_instance, wire_bytes

DAY = 86400.0


class Node:
    def __init__(self, home: Path) -> None:
        self.rt = Runtime.open(None, home)
        self.store = InstanceStore(
            self.rt.paths, self.rt.db, Indexer(self.rt.db, self.rt.audit, gather_seconds=0.01)
        )

    def study(self, patient: str = "P1", count: int = 3, *, days_ago: float = 0.0) -> tuple[str, list[Any]]:
        """A study of ``count`` instances, last received ``days_ago``."""
        study, series = generate_uid(), generate_uid()
        sent = [mr_instance(patient, study, series, k + 1, "20240601") for k in range(count)]
        for ds in sent:
            assert self.put(ds).outcome == StoreOutcome.STORED
        self.store.indexer.flush(timeout=10)
        with self.rt.db.write() as conn:
            conn.execute(
                update(t.instances)
                .where(t.instances.c.study_fk == self.study_fk(study, conn))
                .values(received_at=time.time() - days_ago * DAY)
            )
        return study, sent

    def put(self, ds: Any, **kwargs: Any) -> Any:
        return self.store.put(
            wire_bytes(ds),
            ExplicitVRLittleEndian,
            claimed_sop_uid=ds.SOPInstanceUID,
            calling_ae="SCANNER",
            **kwargs,
        )

    def study_fk(self, study_uid: str, conn: Any = None) -> int:
        if conn is None:
            with self.rt.db.read() as c:
                return int(
                    c.execute(select(t.studies.c.id).where(t.studies.c.study_uid == study_uid)).scalar_one()
                )
        return int(
            conn.execute(select(t.studies.c.id).where(t.studies.c.study_uid == study_uid)).scalar_one()
        )

    def job(self, study_uid: str, state: JobState, *, days_ago: float = 0.0) -> int:
        """A job of the study in ``state``, its last transition ``days_ago``."""
        fk = self.study_fk(study_uid)
        with self.rt.db.write() as conn:
            ids = list(
                conn.execute(
                    select(t.instances.c.id).where(t.instances.c.study_fk == fk, t.instances.c.current)
                ).scalars()
            )
            job_id = create_job(
                conn,
                study_fk=fk,
                study_version=1,
                pipeline="forward",
                destinations=["pacs"],
                instance_ids=ids,
            )
            at = time.time() - days_ago * DAY
            conn.execute(update(t.jobs).where(t.jobs.c.id == job_id).values(state=state.value))
            conn.execute(update(t.job_transitions).where(t.job_transitions.c.job_fk == job_id).values(at=at))
        outputs = self.rt.paths.outputs / f"job-{job_id}"
        outputs.mkdir(parents=True)
        (outputs / "out.dcm").write_bytes(b"output")
        return job_id

    def delivery(self, job_id: int, state: DeliveryState) -> int:
        with self.rt.db.write() as conn:
            return int(
                conn.execute(
                    insert(t.deliveries).values(
                        job_fk=job_id,
                        series_uid=generate_uid(),
                        destination="pacs",
                        state=state.value,
                        attempts=0,
                        next_attempt_at=time.time(),
                        created_at=time.time(),
                    )
                ).inserted_primary_key[0]
            )

    def files(self, study_uid: str) -> list[Path]:
        return sorted((self.rt.paths.data / "studies" / study_uid).rglob("*.dcm"))

    def retention(self, **rule: Any) -> Retention:
        return Retention(
            self.rt.db,
            self.rt.audit,
            RetentionSection(**rule),
            self.rt.paths.data,
            self.rt.paths.outputs,
            actor="test",
        )

    def audited(self, event: AuditEvent) -> list[Any]:
        return self.rt.audit.events(event)

    def close(self) -> None:
        self.store.close()
        self.rt.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.close()


def test_an_old_study_leaves_the_disk_and_its_history_stays(node: Node) -> None:
    old, _ = node.study(days_ago=20)
    new, _ = node.study(days_ago=1)
    job = node.job(old, JobState.DELIVERED, days_ago=19)
    assert len(node.files(old)) == 3
    outcome = node.retention(keep_days=14).apply()
    assert [c.study_uid for c in outcome.removed] == [old] and outcome.files == 3
    assert node.files(old) == [] and not (node.rt.paths.data / "studies" / old).exists()
    assert not (node.rt.paths.outputs / f"job-{job}").exists()
    assert len(node.files(new)) == 3
    with node.rt.db.read() as conn:
        rows = conn.execute(
            select(t.instances.c.purged_at, t.instances.c.current).where(
                t.instances.c.study_fk == node.study_fk(old)
            )
        ).all()
        job_state = conn.execute(select(t.jobs.c.state).where(t.jobs.c.id == job)).scalar()
    assert len(rows) == 3 and all(r.purged_at is not None and not r.current for r in rows)
    assert job_state == JobState.DELIVERED.value  # the history stays
    states = {s["study_uid"]: s["state"] for s in queries.list_studies(node.rt.db)}
    assert states[old] == "purged" and states[new] == "receiving"  # no completeness timer here
    (record,) = node.audited(AuditEvent.STUDY_PURGED)
    facts = record.facts
    assert record.study_uid == old and record.patient_id == "P1" and record.actor == "test"
    assert facts["instances"] == 3 and facts["outputs"] == [f"job-{job}"]
    assert "no activity for 14 days" in facts["reason"]
    assert node.retention(keep_days=14).apply().removed == []  # once
    from prometheus_client.parser import text_string_to_metric_families

    from dicom_node.web.metrics import NodeCollector, render

    scraped = render(NodeCollector(node.rt.db, node.rt.audit, node.rt.paths.data, node.rt.paths.var / "cp"))
    gauges = {
        f.name: f.samples[0].value
        for f in text_string_to_metric_families(scraped.decode())
        if f.name in ("dicomnode_studies", "dicomnode_studies_purged")
    }
    assert gauges == {"dicomnode_studies": 2, "dicomnode_studies_purged": 1}


def test_what_is_still_needed_is_kept_whatever_its_age(node: Node) -> None:
    held, _ = node.study(days_ago=30)
    node.job(held, JobState.HELD, days_ago=29)
    delivering, _ = node.study(days_ago=30)
    node.job(delivering, JobState.DELIVERING, days_ago=29)
    open_delivery, _ = node.study(days_ago=30)
    node.delivery(node.job(open_delivery, JobState.FAILED, days_ago=29), DeliveryState.PENDING)
    prior, _ = node.study(days_ago=30)
    current, _ = node.study(days_ago=0)
    waiting = node.job(current, JobState.FETCHING_PRIORS)
    with node.rt.db.write() as conn:
        conn.execute(
            insert(t.job_priors).values(
                job_fk=waiting, study_uid=prior, series_uid=generate_uid(), archive="pacs", sop_count=3
            )
        )
    done, _ = node.study(days_ago=30)
    node.delivery(node.job(done, JobState.FAILED, days_ago=29), DeliveryState.DEAD)
    refused, _ = node.study(days_ago=30)
    node.job(refused, JobState.REFUSED, days_ago=29)

    with node.rt.db.read() as conn:
        plan = review(conn, RetentionSection(keep_days=14))
    kept = {k.study_uid: k.why for k in plan.kept}
    assert kept[held].endswith("is held") and kept[delivering].endswith("is delivering")
    assert (
        kept[open_delivery].endswith("is pending")
        and kept[prior] == f"a prior of job {waiting}, which is fetching-priors"
    )
    assert sorted(c.study_uid for c in plan.due) == sorted([done, refused])
    node.retention(keep_days=14).apply()
    for study in (held, delivering, open_delivery, prior, current):
        assert len(node.files(study)) == 3, study
    assert node.files(done) == node.files(refused) == []


def test_activity_counts_not_arrival_a_job_that_moved_lately_keeps_its_study(node: Node) -> None:
    study, _ = node.study(days_ago=20)
    node.job(study, JobState.DELIVERED, days_ago=2)  # delivered two days ago, after a long review
    assert node.retention(keep_days=14).apply().removed == []
    assert len(node.files(study)) == 3


def test_an_instance_sent_again_after_removal_is_stored_and_brings_the_study_back(node: Node) -> None:
    study, sent = node.study(days_ago=20)
    node.retention(keep_days=14).apply()
    again = node.put(sent[0])  # the same bytes: nothing left to be a duplicate of
    assert again.outcome == StoreOutcome.NEW_VERSION and again.version == 2
    node.store.indexer.flush(timeout=10)
    (path,) = node.files(study)
    assert path.name.endswith(".v2.dcm")
    with node.rt.db.read() as conn:
        assert (
            conn.execute(select(t.studies.c.purged_at).where(t.studies.c.study_uid == study)).scalar() is None
        )
        current = conn.execute(
            select(t.instances.c.version).where(
                t.instances.c.sop_uid == sent[0].SOPInstanceUID, t.instances.c.current
            )
        ).scalars()
        assert list(current) == [2]
    # retrieved again as a prior (an archive's copy of what was acquired here): stored too
    prior = node.put(sent[1], retrieved_from="pacs")
    assert prior.outcome == StoreOutcome.NEW_VERSION


def test_an_instance_arriving_during_the_review_keeps_its_study(node: Node) -> None:
    study, sent = node.study(days_ago=20)
    keeper = node.retention(keep_days=14)
    with node.rt.db.read() as conn:
        plan = review(conn, keeper.section)
    assert [c.study_uid for c in plan.due] == [study]
    late = mr_instance("P1", study, sent[0].SeriesInstanceUID, 9, "20240601")
    assert node.put(late).outcome == StoreOutcome.STORED
    node.store.indexer.flush(timeout=10)
    outcome = RetentionOutcome()
    keeper._remove(plan.due[0], "test", outcome)
    assert outcome.removed == [] and len(node.files(study)) == 4


def test_a_copy_acknowledged_during_the_review_keeps_its_study(node: Node) -> None:
    """A duplicate (the same bytes sent again) acknowledged after the review chose the
    study and before its removal commits: the acknowledgement relied on the file, so the
    removal stands back (before, the copy was acknowledged and its file deleted)."""
    study, sent = node.study(days_ago=20)
    keeper = node.retention(keep_days=14)
    with node.rt.db.read() as conn:
        plan = review(conn, keeper.section)
    assert [c.study_uid for c in plan.due] == [study]
    again = node.put(sent[0])
    assert again.outcome == StoreOutcome.DUPLICATE and again.version == 1
    outcome = RetentionOutcome()
    keeper._remove(plan.due[0], "test", outcome)
    assert outcome.removed == [] and len(node.files(study)) == 3
    # and a copy is activity: the next review keeps the study for keep_days more
    assert node.retention(keep_days=14).apply().removed == []
    with node.rt.db.read() as conn:
        seen = conn.execute(
            select(t.instances.c.last_seen_at).where(t.instances.c.sop_uid == sent[0].SOPInstanceUID)
        ).scalar()
    assert seen is not None and seen > time.time() - 60


def test_a_copy_arriving_after_the_removal_committed_is_stored_again(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: the removal commits between the store's duplicate test and its
    acknowledgement. The store's mark finds the row purged, so the copy is written as a
    new version and survives the removal's deletes."""
    study, sent = node.study(days_ago=20)
    keeper = node.retention(keep_days=14)
    with node.rt.db.read() as conn:
        plan = review(conn, keeper.section)
    held: list[Any] = []
    original = keeper._delete

    def commit_only(paths: Any) -> int:  # the removal's transaction has committed; its deletes wait
        held.extend(paths)
        return 0

    monkeypatch.setattr(keeper, "_delete", commit_only)
    looked_up = node.store._current_version

    def purge_after_lookup(sop_uid: str) -> Any:
        current = looked_up(sop_uid)  # not purged yet when the store looks
        outcome = RetentionOutcome()
        keeper._remove(plan.due[0], "test", outcome)
        assert [c.study_uid for c in outcome.removed] == [study]
        return current

    monkeypatch.setattr(node.store, "_current_version", purge_after_lookup)
    again = node.put(sent[0])
    monkeypatch.setattr(
        node.store, "_current_version", looked_up
    )  # (not undo(): other fixtures' patches stay)
    monkeypatch.setattr(keeper, "_delete", original)
    assert again.outcome == StoreOutcome.NEW_VERSION and again.version == 2
    original(held)  # now the removal deletes what its transaction named
    node.store.indexer.flush(timeout=10)
    (path,) = node.files(study)
    assert path.name.endswith(".v2.dcm")


def test_a_removal_cut_short_is_finished_by_the_next_run(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    study, _ = node.study(days_ago=20)
    keeper = node.retention(keep_days=14)

    def crash(paths: Any) -> int:
        if list(paths):  # the removal's own deletes, after its commit
            raise SystemExit("killed after the commit")
        return 0

    monkeypatch.setattr(keeper, "_delete", crash)
    with pytest.raises(SystemExit):
        keeper.apply()
    assert len(node.files(study)) == 3  # rows say purged, files still there
    outcome = node.retention(keep_days=14).apply()
    assert outcome.swept == 3 and outcome.removed == [] and node.files(study) == []


def test_disk_pressure_removes_the_oldest_first_never_the_recent(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    oldest, _ = node.study(days_ago=5)
    older, _ = node.study(days_ago=3)
    recent, _ = node.study(days_ago=0.5)
    keeper = node.retention(free_disk_mb=1000, min_age_hours=24)
    free = iter([100, 2000])  # before, then after the first removal
    monkeypatch.setattr(keeper, "free_mb", lambda: next(free))
    outcome = keeper.apply()
    assert [c.study_uid for c in outcome.removed] == [oldest]
    assert outcome.free_mb_before == 100 and outcome.free_mb_after == 2000
    assert node.files(oldest) == [] and len(node.files(older)) == 3
    (record,) = node.audited(AuditEvent.STUDY_PURGED)
    assert record.facts["reason"].startswith("disk pressure: 100 MB free")

    monkeypatch.setattr(keeper, "free_mb", lambda: 10)  # still short: all but the recent one go
    assert [c.study_uid for c in keeper.apply().removed] == [older]
    assert len(node.files(recent)) == 3


def test_retrying_a_delivery_whose_study_was_removed_says_why(node: Node) -> None:
    study, _ = node.study(days_ago=20)
    delivery = node.delivery(node.job(study, JobState.FAILED, days_ago=19), DeliveryState.DEAD)
    node.retention(keep_days=14).apply()
    with pytest.raises(ValueError, match="retention rule removed job .* study and outputs"):
        Outbox(node.rt.config, node.rt.db, node.rt.audit, "test").retry_dead(delivery, "test")


def test_off_by_default(node: Node) -> None:
    study, _ = node.study(days_ago=400)
    assert not RetentionSection().enabled
    assert node.retention().apply().removed == []
    assert len(node.files(study)) == 3


def test_the_command_says_what_goes_and_what_stays(node: Node, tmp_path: Path) -> None:
    old, _ = node.study(days_ago=20)
    held, _ = node.study(days_ago=20)
    node.job(held, JobState.HELD, days_ago=20)
    node.close()
    home = tmp_path
    toml = home / "retention.toml"
    toml.write_text("[retention]\nkeep_days = 14\n")
    shown = cli("retention", "--home", str(home), "--config", str(toml), "--json")
    assert shown.exit_code == 0, shown.output
    body = json.loads(shown.stdout)
    assert [c["study_uid"] for c in body["due"]] == [old]
    assert [(k["study_uid"], k["why"].split(" is ")[-1]) for k in body["kept"]] == [(held, "held")]
    assert (home / "var" / "data" / "studies" / old).exists()  # a look removes nothing
    text = cli("retention", "--home", str(home), "--config", str(toml))
    assert "studies go 14 days after their last activity" in text.stdout and "kept because" in text.stdout
    run = cli("retention", "--home", str(home), "--config", str(toml), "--run")
    assert run.exit_code == 0 and "removed 1 study (3 files" in run.stdout
    assert not (home / "var" / "data" / "studies" / old).exists()
    off = cli("retention", "--home", str(home), "--run")
    assert "retention is off" in off.stdout and "nothing removed: the rule is off" in off.stdout
