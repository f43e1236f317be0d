"""Retention: when a received study and its outputs leave this node's disk (``[retention]``).

The last step of the route a study takes: it arrived, its jobs ran, its outputs left; after
``keep_days`` without activity (an instance received, a job of it moving) its files go too.
Under disk pressure (free space below ``free_disk_mb``) the studies with the oldest activity
go first, none active within ``min_age_hours``. Off by default.

What is never removed, whatever its age (each named in :func:`review`'s ``kept``):

* a study with a job queued, running, waiting for priors, held for review or delivering;
* a study one of whose jobs still has a delivery pending, sending or awaiting its storage
  commitment;
* a study that is a prior of such a job.

Removing one study, crash-safe and without losing what arrives meanwhile:

1. In one transaction, the study's eligibility is checked again and its instance rows are
   marked purged and no longer current (the study too); the audit record (``study-purged``,
   DICOM Instances Accessed, action D) follows the commit.
2. Then the files those rows name are deleted, and the output folders of the study's
   jobs. A crash between the two leaves files whose rows say purged: every run deletes
   those first (:func:`sweep`).

An instance of the study arriving meanwhile is safe: the store sees a purged newest
version, so it writes a new version to a new path (never one of the paths being deleted)
and the indexer brings the study back (``purged_at`` cleared). A copy of a stored instance
(a duplicate, acknowledged without storing it again) is safe too: before it is acknowledged
the store marks the row ``last_seen_at`` under the writers' lock, which step 1 sees (the
study stays, and the copy counts as activity); if step 1 committed first, the mark finds the
row purged and the copy is written as a new version. Index, job and delivery rows
stay: they are the study's history, shown by the web pages and the audit log.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, and_, case, func, select, update

from audit import AuditEvent, AuditTrail
from dicom_node.config import RetentionSection
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.db.engine import Database
from dicom_node.delivery.ledger import DeliveryState
from dicom_node.jobs.state import JobState

log = logging.getLogger(__name__)

#: Job states in which a job still needs its study's files (or its own outputs).
ACTIVE_JOB_STATES = frozenset(
    {JobState.QUEUED, JobState.RUNNING, JobState.FETCHING_PRIORS, JobState.HELD, JobState.DELIVERING}
)
#: Delivery states that are not yet an outcome: the outputs are still needed.
OPEN_DELIVERY_STATES = frozenset({DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.COMMITTING})
#: How far back :func:`sweep` looks for files left by an interrupted removal.
SWEEP_DAYS = 30
_DAY = 86400.0


@dataclass(frozen=True)
class Candidate:
    """A study the rule may remove."""

    study_fk: int
    study_uid: str
    patient_id: str
    #: Newest of: an instance received, a job of the study moving (epoch seconds).
    last_activity: float
    instances: int
    bytes: int


@dataclass(frozen=True)
class Kept:
    """A study old enough to go that is kept, and why."""

    study_uid: str
    last_activity: float
    why: str


@dataclass
class Review:
    """What the rule would do now: ``due`` for age, ``younger`` (oldest first) for disk
    pressure, ``kept`` with the reason."""

    due: list[Candidate] = field(default_factory=list)
    younger: list[Candidate] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)


@dataclass
class Outcome:
    """What one application of the rule removed."""

    removed: list[Candidate] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    swept: int = 0
    free_mb_before: int | None = None
    free_mb_after: int | None = None


#: When an instance last arrived: received, or an identical copy acknowledged since.
_arrival = case(
    (t.instances.c.last_seen_at > t.instances.c.received_at, t.instances.c.last_seen_at),
    else_=t.instances.c.received_at,
)


def _last_activity(conn: Connection) -> dict[int, float]:
    """Per study (not purged): the newest instance received (a duplicate too) or job transition."""
    received = dict(
        conn.execute(
            select(t.instances.c.study_fk, func.max(_arrival))
            .join(t.studies, t.studies.c.id == t.instances.c.study_fk)
            .where(t.studies.c.purged_at.is_(None))
            .group_by(t.instances.c.study_fk)
        ).all()
    )
    moved = dict(
        conn.execute(
            select(t.jobs.c.study_fk, func.max(t.job_transitions.c.at))
            .join(t.job_transitions, t.job_transitions.c.job_fk == t.jobs.c.id)
            .group_by(t.jobs.c.study_fk)
        ).all()
    )
    return {fk: max(float(at), float(moved.get(fk) or 0.0)) for fk, at in received.items()}


def _holds(conn: Connection, study_fks: Iterable[int]) -> dict[int, str]:
    """Why each of ``study_fks`` must stay (only those that must)."""
    fks = list(study_fks)
    why: dict[int, str] = {}
    if not fks:
        return why
    active = [s.value for s in ACTIVE_JOB_STATES]
    for fk, job_id, state in conn.execute(
        select(t.jobs.c.study_fk, t.jobs.c.id, t.jobs.c.state).where(
            t.jobs.c.study_fk.in_(fks), t.jobs.c.state.in_(active)
        )
    ):
        why.setdefault(fk, f"job {job_id} is {state}")
    open_states = [s.value for s in OPEN_DELIVERY_STATES]
    for fk, delivery_id, state in conn.execute(
        select(t.jobs.c.study_fk, t.deliveries.c.id, t.deliveries.c.state)
        .join(t.deliveries, t.deliveries.c.job_fk == t.jobs.c.id)
        .where(t.jobs.c.study_fk.in_(fks), t.deliveries.c.state.in_(open_states))
    ):
        why.setdefault(fk, f"delivery {delivery_id} is {state}")
    uids = dict(
        conn.execute(select(t.studies.c.study_uid, t.studies.c.id).where(t.studies.c.id.in_(fks))).all()
    )
    for study_uid, job_id, state in conn.execute(
        select(t.job_priors.c.study_uid, t.jobs.c.id, t.jobs.c.state)
        .join(t.jobs, t.jobs.c.id == t.job_priors.c.job_fk)
        .where(t.job_priors.c.study_uid.in_(list(uids)), t.jobs.c.state.in_(active))
    ):
        why.setdefault(uids[study_uid], f"a prior of job {job_id}, which is {state}")
    return why


def review(conn: Connection, section: RetentionSection, now: float | None = None) -> Review:
    """Which studies the rule would remove now, and which old ones it keeps (and why)."""
    now = time.time() if now is None else now
    activity = _last_activity(conn)
    if not activity:
        return Review()
    floor = now - section.min_age_hours * 3600.0 if section.free_disk_mb else None
    due_before = now - section.keep_days * _DAY if section.keep_days else None
    old = {
        fk: at
        for fk, at in activity.items()
        if (due_before is not None and at <= due_before) or (floor is not None and at <= floor)
    }
    holds = _holds(conn, old)
    sizes = {
        fk: (int(n), int(size or 0))
        for fk, n, size in conn.execute(
            select(t.instances.c.study_fk, func.count(t.instances.c.id), func.sum(t.instances.c.size))
            .where(t.instances.c.study_fk.in_(list(old)), t.instances.c.purged_at.is_(None))
            .group_by(t.instances.c.study_fk)
        )
    }
    names = {
        fk: (uid, pid)
        for fk, uid, pid in conn.execute(
            select(t.studies.c.id, t.studies.c.study_uid, t.patients.c.patient_id)
            .join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
            .where(t.studies.c.id.in_(list(old)))
        )
    }
    result = Review()
    for fk, at in sorted(old.items(), key=lambda item: item[1]):
        uid, patient_id = names[fk]
        if fk in holds:
            result.kept.append(Kept(uid, at, holds[fk]))
            continue
        count, size = sizes.get(fk, (0, 0))
        candidate = Candidate(fk, uid, str(patient_id), at, count, size)
        if due_before is not None and at <= due_before:
            result.due.append(candidate)
        else:
            result.younger.append(candidate)
    return result


class Retention:
    """Applies ``[retention]``: on a timer in ``serve`` (:meth:`start`), or once (:meth:`apply`)."""

    def __init__(
        self,
        db: Database,
        audit: AuditTrail,
        section: RetentionSection,
        data_dir: Path,
        outputs_dir: Path,
        *,
        actor: str | None = None,
    ) -> None:
        self.db = db
        self.audit = audit
        self.section = section
        self.data_dir = Path(data_dir)
        self.outputs_dir = Path(outputs_dir)
        self.actor = actor
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the timer
    def start(self) -> None:
        if not self.section.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.section.check_minutes * 60.0):
            try:
                self.apply()
            except Exception:  # never kills serve; says so and tries again next time
                log.exception(
                    "retention: this run failed; it runs again in %g min", self.section.check_minutes
                )

    # -- one application
    def free_mb(self) -> int:
        return shutil.disk_usage(self.data_dir).free // (1024 * 1024)

    def apply(self, now: float | None = None) -> Outcome:
        """Sweep what an interrupted removal left, then remove what the rule says."""
        outcome = Outcome(swept=self.sweep())
        with self.db.read() as conn:
            plan = review(conn, self.section, now)
        for candidate in plan.due:
            if self._stop.is_set():
                return outcome
            self._remove(candidate, f"no activity for {self.section.keep_days:g} days", outcome)
        if self.section.free_disk_mb:
            outcome.free_mb_before = free = self.free_mb()
            for candidate in plan.younger:
                if free >= self.section.free_disk_mb or self._stop.is_set():
                    break
                reason = (
                    f"disk pressure: {free} MB free, below [retention] free_disk_mb "
                    f"{self.section.free_disk_mb}"
                )
                self._remove(candidate, reason, outcome)
                free = self.free_mb()
            outcome.free_mb_after = free
            if free < self.section.free_disk_mb:
                log.warning(
                    "retention: %d MB free, below free_disk_mb %d, and nothing more may be removed "
                    "(`dicom-node retention` says what is kept and why)",
                    free,
                    self.section.free_disk_mb,
                )
        if outcome.removed:
            log.info(
                "retention: removed %d stud%s (%d files, %.1f MB)",
                len(outcome.removed),
                "y" if len(outcome.removed) == 1 else "ies",
                outcome.files,
                outcome.bytes / 1e6,
            )
        return outcome

    def _remove(self, candidate: Candidate, reason: str, outcome: Outcome) -> None:
        now = time.time()
        with audited_write(self.db, self.audit) as work:
            conn = work.conn
            if _holds(conn, [candidate.study_fk]):  # a job started, a delivery reopened meanwhile
                return
            newest = conn.execute(
                select(func.max(_arrival)).where(t.instances.c.study_fk == candidate.study_fk)
            ).scalar()
            if newest is not None and float(newest) > candidate.last_activity:
                return  # an instance came meanwhile, or a copy of one (its ack relies on the file)
            rows = conn.execute(
                select(t.instances.c.id, t.instances.c.path, t.instances.c.size).where(
                    t.instances.c.study_fk == candidate.study_fk, t.instances.c.purged_at.is_(None)
                )
            ).all()
            conn.execute(
                update(t.instances)
                .where(t.instances.c.id.in_([r.id for r in rows]))
                .values(purged_at=now, current=False)
            )
            conn.execute(update(t.studies).where(t.studies.c.id == candidate.study_fk).values(purged_at=now))
            jobs = list(
                conn.execute(select(t.jobs.c.id).where(t.jobs.c.study_fk == candidate.study_fk)).scalars()
            )
            work.record(
                AuditEvent.STUDY_PURGED,
                actor=self.actor,
                study_uid=candidate.study_uid,
                patient_id=candidate.patient_id,
                instances=len(rows),
                bytes=int(sum(int(r.size or 0) for r in rows)),
                outputs=[f"job-{j}" for j in jobs],
                reason=reason,
                last_activity=round(candidate.last_activity, 3),
            )
        outcome.removed.append(candidate)
        outcome.files += self._delete([str(r.path) for r in rows])
        outcome.bytes += int(sum(int(r.size or 0) for r in rows))
        for job_id in jobs:
            shutil.rmtree(self.outputs_dir / f"job-{job_id}", ignore_errors=True)
        self._prune(candidate.study_uid)

    def _delete(self, relative_paths: Iterable[str]) -> int:
        deleted = 0
        for relative in relative_paths:
            try:
                (self.data_dir / relative).unlink()
                deleted += 1
            except FileNotFoundError:
                pass
        return deleted

    def _prune(self, study_uid: str) -> None:
        """Remove the study's folders that are now empty (a folder an arriving instance has
        just entered is not empty, and stays)."""
        study_dir = self.data_dir / "studies" / study_uid
        if not study_dir.is_dir():
            return
        for series_dir in study_dir.iterdir():
            try:
                series_dir.rmdir()
            except OSError:
                pass
        try:
            study_dir.rmdir()
        except OSError:
            pass

    def sweep(self, now: float | None = None) -> int:
        """Delete files whose rows say purged (left by a removal a crash interrupted);
        returns how many."""
        since = (time.time() if now is None else now) - SWEEP_DAYS * _DAY
        with self.db.read() as conn:
            rows = conn.execute(
                select(t.instances.c.path, t.studies.c.study_uid)
                .join(t.studies, t.studies.c.id == t.instances.c.study_fk)
                .where(and_(t.instances.c.purged_at.is_not(None), t.instances.c.purged_at >= since))
            ).all()
        left = [r for r in rows if (self.data_dir / str(r.path)).exists()]
        swept = self._delete(str(r.path) for r in left)
        for study_uid in {str(r.study_uid) for r in left}:
            self._prune(study_uid)
        if swept:
            log.warning("retention: deleted %d file(s) an interrupted removal had left", swept)
        return swept
