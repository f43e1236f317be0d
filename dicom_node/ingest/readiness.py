"""Study completeness: a study becomes *ready* after ``stable_seconds`` without a new instance.

The index decides: a timer that fires checks the newest instance of the study's open
version in the database, so instances another receiving process (or host) stored meanwhile
keep the study open there too, and two processes making one study ready at once is
settled by the write lock (the second finds nothing new).

The indexer reports each batch of newly indexed instances (a dict write per instance);
one APScheduler timer per study fires at ``last + stable``, re-arms itself if something
arrived meanwhile, and otherwise hands the study to ``on_ready`` — the job layer's
:meth:`dicom_node.jobs.intake.JobIntake.study_ready`, which snapshots it into jobs and
opens the next study version. If that fails, the timer tries again in 5 s. After a
restart the timers are rebuilt from the index.

The timer is the fallback. When a completeness signal (:mod:`dicom_node.ingest.completeness`:
a scanner's MPPS COMPLETED whose instances are all stored, or a caller's expected counts)
says the study is complete — looked at after every indexed batch and every MPPS change —
the study is handed to ``on_ready`` at once, its idle timer cancelled, and the MPPS steps
it used are settled. A study an MPPS DISCONTINUED holds (``mpps_discontinued = "hold"``)
is skipped by the timer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select

from audit import AuditEvent, AuditTrail
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.ingest.completeness import assess, settle_steps
from dicom_node.ingest.indexer import PendingInstance

log = logging.getLogger(__name__)


#: What happens to a ready study (its Study Instance UID); returns the job ids it made.
OnReady = Callable[[str], list[int]]


class StudyReadiness:
    """Tracks when studies stop changing and hands each ready study to ``on_ready``."""

    def __init__(
        self, config: NodeConfig, db: Database, on_ready: OnReady, audit: AuditTrail | None = None
    ) -> None:
        self.config = config
        self.db = db
        self.on_ready = on_ready
        #: Where ``study-complete`` records go (None: logged only).
        self.audit = audit
        self._signal_lock = threading.Lock()  # one signalled readiness at a time
        self._last_seen: dict[str, tuple[float, str | None]] = {}
        self._armed: set[str] = set()
        self._lock = threading.Lock()
        self._scheduler = BackgroundScheduler(
            timezone=UTC, job_defaults={"misfire_grace_time": None, "coalesce": True}
        )

    def start(self) -> None:
        self._scheduler.start()
        self._resume_pending()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def instance_arrived(self, study_uid: str, calling_ae: str | None) -> None:
        """Called by the receiver after each newly stored instance (cheap: no I/O)."""
        now = time.time()
        with self._lock:
            self._last_seen[study_uid] = (now, calling_ae)
            if study_uid in self._armed:
                return
            self._armed.add(study_uid)
        self._arm(study_uid, now + self.config.stable_seconds_for(calling_ae))

    def instances_indexed(self, batch: list[PendingInstance]) -> None:
        """Indexer callback: the instances of ``batch`` are now in the index."""
        for item in batch:
            self.instance_arrived(item.facts.study_uid, item.calling_ae)
        # Only acquired instances complete a study (not the node's own outputs, nor AI ones).
        self._look_at_signals({item.facts.study_uid for item in batch if item.role is None})

    def steps_changed(self, study_uid: str) -> None:
        """MPPS callback: a procedure step of ``study_uid`` was created or changed."""
        self._look_at_signals([study_uid])

    def _look_at_signals(self, study_uids: Iterable[str]) -> None:
        for study_uid in study_uids:
            with self.db.read() as conn:
                verdict = assess(conn, self.config, study_uid)
            if verdict.complete:
                self._arm_complete(study_uid, time.time())

    def _arm_complete(self, study_uid: str, at: float) -> None:
        self._scheduler.add_job(
            self._complete,
            "date",
            run_date=datetime.fromtimestamp(at, UTC),
            args=[study_uid],
            id=f"complete:{study_uid}",
            replace_existing=True,
            max_instances=2,  # a signal arriving during a run must not be skipped
        )

    def _complete(self, study_uid: str) -> None:
        """A signal said ``study_uid`` is complete: make it ready now (re-assessed here)."""
        with self._signal_lock:
            with self.db.read() as conn:
                verdict = assess(conn, self.config, study_uid)
            if not verdict.complete:
                return  # another run took it, or it changed
            job_ids: list[int] = []
            if verdict.new_instances:
                # Cancel the idle timer first, under the lock (as _check re-arms): an instance
                # indexed after this re-arms it, one indexed before is in the snapshot.
                with self._lock:
                    was_armed = study_uid in self._armed
                    self._armed.discard(study_uid)
                    last = self._last_seen.pop(study_uid, None)
                    try:
                        self._scheduler.remove_job(f"ready:{study_uid}")
                    except JobLookupError:
                        pass
                try:
                    job_ids = self.on_ready(study_uid)
                except Exception:
                    log.exception("study %s: could not be made ready; retrying in 5 s", study_uid)
                    if was_armed and last is not None:  # the idle timer stays the fallback
                        with self._lock:
                            self._last_seen.setdefault(study_uid, last)
                            self._armed.add(study_uid)
                        self._arm(study_uid, last[0] + self.config.stable_seconds_for(last[1]))
                    self._arm_complete(study_uid, time.time() + 5)
                    return
            with self.db.write() as conn:
                steps = settle_steps(conn, study_uid)
        if not verdict.new_instances:
            return  # already ready (the timer was first): the steps are settled, nothing else
        log.info("study %s complete by %s: %s", study_uid, verdict.signal, verdict.detail)
        if self.audit is not None:
            self.audit.record(
                AuditEvent.STUDY_COMPLETE,
                study_uid=study_uid,
                signal=str(verdict.signal),
                detail=verdict.detail,
                mpps=steps,
                jobs=job_ids,
            )

    def _arm(self, study_uid: str, at: float) -> None:
        self._scheduler.add_job(
            self._check,
            "date",
            run_date=datetime.fromtimestamp(at, UTC),
            args=[study_uid],
            id=f"ready:{study_uid}",
            replace_existing=True,
        )

    def _check(self, study_uid: str) -> None:
        with self._lock:
            last, calling_ae = self._last_seen.get(study_uid, (0.0, None))
            due = last + self.config.stable_seconds_for(calling_ae)
            if time.time() < due:
                self._arm(study_uid, due)
                return
            self._armed.discard(study_uid)
            self._last_seen.pop(study_uid, None)
        # The index is the truth: another receiving process (or host) may have stored an
        # instance of this study since this process last saw one.
        latest = self._latest_arrival(study_uid)
        if latest is not None and time.time() < latest + self.config.stable_seconds_for(calling_ae):
            with self._lock:
                seen = self._last_seen.get(study_uid, (0.0, calling_ae))
                self._last_seen[study_uid] = (max(seen[0], latest), calling_ae)
                self._armed.add(study_uid)
            self._arm(study_uid, latest + self.config.stable_seconds_for(calling_ae))
            return
        with self.db.read() as conn:
            verdict = assess(conn, self.config, study_uid)
        if verdict.held and not verdict.complete:
            log.info("study %s not made ready by the timer: %s", study_uid, verdict.waiting)
            return  # a later MPPS that completes signals it; a new instance re-arms the timer
        try:
            self.on_ready(study_uid)
        except Exception:
            log.exception("study %s: could not be made ready; retrying in 5 s", study_uid)
            with self._lock:
                self._armed.add(study_uid)
            self._arm(study_uid, time.time() + 5)
            return
        if verdict.new_instances:
            with self.db.write() as conn:
                settle_steps(conn, study_uid)  # the steps that ended before count no more

    def _latest_arrival(self, study_uid: str) -> float | None:
        """When the newest instance of the study's open version was received (any process)."""
        with self.db.read() as conn:
            latest = conn.execute(
                select(func.max(t.instances.c.received_at))
                .join(t.studies, t.studies.c.id == t.instances.c.study_fk)
                .where(
                    t.studies.c.study_uid == study_uid,
                    t.instances.c.study_version == t.studies.c.open_version,
                )
            ).scalar_one_or_none()
        return float(latest) if latest is not None else None

    def _resume_pending(self) -> None:
        """Re-arm timers for studies with instances not yet in any job (after a restart)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(
                    t.studies.c.study_uid,
                    t.studies.c.source_ae,
                    func.max(t.instances.c.received_at),
                )
                .join(t.instances, t.instances.c.study_fk == t.studies.c.id)
                .where(t.instances.c.study_version == t.studies.c.open_version)
                .group_by(t.studies.c.id)
            ).all()
        for study_uid, source_ae, last in rows:
            with self._lock:
                self._last_seen[study_uid] = (last, source_ae)
                self._armed.add(study_uid)
            self._arm(study_uid, last + self.config.stable_seconds_for(source_ae))
        if rows:
            log.info("readiness: re-armed %d pending stud(ies) from the index", len(rows))
        # A signal that came just before a stop (an MPPS N-SET, the last instance) still counts.
        self._look_at_signals(study_uid for study_uid, _source_ae, _last in rows)
