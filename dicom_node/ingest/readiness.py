"""Study completeness: a study becomes *ready* after ``stable_seconds`` without a new instance.

The indexer reports each batch of newly indexed instances (a dict write per instance);
one APScheduler timer per study fires at ``last + stable``, re-arms itself if something
arrived meanwhile, and otherwise hands the study to ``on_ready`` — the job layer's
:meth:`dicom_node.jobs.intake.JobIntake.study_ready`, which snapshots it into jobs and
opens the next study version. If that fails, the timer tries again in 5 s. After a
restart the timers are rebuilt from the index.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select

from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.ingest.indexer import PendingInstance

log = logging.getLogger(__name__)


#: What happens to a ready study (its Study Instance UID); returns the job ids it made.
OnReady = Callable[[str], list[int]]


class StudyReadiness:
    """Tracks when studies stop changing and hands each ready study to ``on_ready``."""

    def __init__(self, config: NodeConfig, db: Database, on_ready: OnReady) -> None:
        self.config = config
        self.db = db
        self.on_ready = on_ready
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
        try:
            self.on_ready(study_uid)
        except Exception:
            log.exception("study %s: could not be made ready; retrying in 5 s", study_uid)
            with self._lock:
                self._armed.add(study_uid)
            self._arm(study_uid, time.time() + 5)

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
