"""Jobs in ``fetching-priors``: find the rule's priors, fetch what is not held, move on.

Runs in the serve process (it holds the store and the receiver a C-MOVE sends to), on its
own threads, so the receiver never waits on an archive. Per job (:meth:`PriorFetcher.fetch`):

1. the priors this node already holds (never fetched again) and the archive's answer to
   the rule's query (:mod:`dicom_node.jobs.priors`);
2. the chosen studies' missing series retrieved, each within what is left of the rule's
   ``timeout_seconds`` (the archive's queries and transfers are audited by
   :mod:`dicom_node.ingest.archives`);
3. the series now held recorded in ``job_priors`` (what the provenance lists), and the job
   moved to ``queued`` — or to ``refused`` with the reason when fewer than ``count`` priors
   are at hand and the rule says ``on_missing: refuse``. With ``on_missing: run`` the
   job runs with what arrived and the transition's reason says what is missing.

A job left in ``fetching-priors`` by a stopped node is picked up again when the next one
starts (the poll finds it); its timeout starts again then. So stopping never waits for an
archive: :meth:`PriorFetcher.stop` aborts the retrievals under way, and a fetch (on a
daemon thread) then leaves its job unsettled (an archive that never answers cannot hold up
``serve``'s exit for the rest of the rule's timeout).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from sqlalchemy import insert, select

from audit import AuditTrail
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.db.engine import Database
from dicom_node.ingest.archives import ArchiveError, RetrieveResult, StudyMatch
from dicom_node.jobs import priors as p
from dicom_node.jobs.state import JobState, StaleTransition, job_ref, move
from dicom_node.safelog import describe_exception
from policies.model import Priors

log = logging.getLogger(__name__)


class ArchiveLike(Protocol):
    def find_studies(self, query: Any) -> list[StudyMatch]: ...
    def find_series(self, study_uid: str, modality: str | None = None) -> list[Any]: ...
    def retrieve(
        self, study_uid: str, series_uids: Any = None, timeout: float | None = None
    ) -> RetrieveResult: ...


class ArchivesLike(Protocol):
    def get(self, name: str) -> Any: ...


def _why(result: RetrieveResult) -> str:
    if result.error:
        return result.error
    if result.failures:
        more = f" (+{len(result.failures) - 2} more)" if len(result.failures) > 2 else ""
        return "; ".join(result.failures[:2]) + more
    return f"{result.failed} sub-operation(s) failed"


class PriorFetcher:
    def __init__(
        self,
        db: Database,
        audit: AuditTrail,
        archives: ArchivesLike,
        actor: str | None = None,
        every: float = 1.0,
        threads: int = 2,
    ) -> None:
        self.db = db
        self.audit = audit
        self.archives = archives
        self.actor = actor
        self.every = every
        self.threads = threads
        self._busy: set[int] = set()
        self._fetches: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prior-fetcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A job may have entered ``fetching-priors`` (e.g. from intake)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        # End the retrievals under way (an open association's thread would keep the process
        # alive); their fetches, on daemon threads, settle nothing once stopping is set.
        abort = getattr(self.archives, "abort_retrievals", None)  # test fakes may have none
        if abort is not None:
            abort()
        until = time.monotonic() + 5
        self._thread.join(timeout=5)
        for fetch in self._fetches:  # let an aborted retrieval audit its end, briefly
            fetch.join(timeout=max(0.0, until - time.monotonic()))

    def pending(self) -> list[int]:
        with self.db.read() as conn:
            return list(
                conn.execute(
                    select(t.jobs.c.id)
                    .where(t.jobs.c.state == JobState.FETCHING_PRIORS.value)
                    .order_by(t.jobs.c.id)
                ).scalars()
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for job_id in self.pending():
                    with self._lock:
                        if job_id in self._busy or len(self._busy) >= self.threads:
                            continue  # under way, or its turn comes when a fetch ends
                        self._busy.add(job_id)
                    fetch = threading.Thread(
                        target=self._fetch_guarded, args=(job_id,), name=f"priors-{job_id}", daemon=True
                    )
                    self._fetches = [f for f in self._fetches if f.is_alive()] + [fetch]
                    fetch.start()
            except Exception:
                log.exception("prior fetcher: listing the jobs failed")
            self._wake.wait(self.every)
            self._wake.clear()

    def _fetch_guarded(self, job_id: int) -> None:
        try:
            self.fetch(job_id)
        except Exception as exc:
            if self._stop.is_set():  # e.g. the database closed under it: the next start retries
                log.info("job %d: fetch abandoned, the node is stopping", job_id)
                return
            log.error("job %d: fetching priors failed", job_id, exc_info=True)
            self.give_up(job_id, f"internal error: {describe_exception(exc)}")
        finally:
            with self._lock:
                self._busy.discard(job_id)
            self._wake.set()  # a job waiting for a free thread may start now

    def give_up(self, job_id: int, why: str) -> JobState | None:
        """Settle a job whose fetch broke (never leave it waiting): as ``on_missing`` says."""
        try:
            with self.db.read() as conn:
                frozen = conn.execute(select(t.jobs.c.priors).where(t.jobs.c.id == job_id)).scalar()
            refuse = not isinstance(frozen, dict) or frozen.get("on_missing") != "run"
            to_state = JobState.REFUSED if refuse else JobState.QUEUED
            reason = f"priors: {why}" if refuse else f"priors: running without them: {why}"
            with audited_write(self.db, self.audit) as work:
                move(
                    work,
                    job_ref(work.conn, job_id),
                    to_state,
                    expect=JobState.FETCHING_PRIORS,
                    reason=reason,
                    actor=self.actor,
                )
        except StaleTransition:
            return None
        except Exception:
            log.error("job %d: could not settle it after a failed fetch", job_id, exc_info=True)
            return None
        return to_state

    def fetch(self, job_id: int) -> JobState | None:
        """Settle one job in ``fetching-priors``; its new state (None: it had moved on, or
        the node is stopping and leaves it for the next start)."""
        with self.db.read() as conn:
            row = conn.execute(
                select(t.jobs.c.study_fk, t.jobs.c.series_uid, t.jobs.c.priors, t.jobs.c.state).where(
                    t.jobs.c.id == job_id
                )
            ).one()
            if row.state != JobState.FETCHING_PRIORS.value:
                return None
            priors = Priors.model_validate(row.priors)
            current = p.current_study(conn, row.study_fk, row.series_uid)
            local = p.local_priors(conn, current)
        deadline = time.monotonic() + priors.timeout_seconds
        problems: list[str] = []
        remote: list[p.PriorStudy] = []
        archive: Any = None
        try:
            archive = self.archives.get(priors.archive)
            remote = p.archive_priors(archive, priors, current, deadline)
        except ArchiveError as exc:
            problems.append(f"archive {priors.archive}: {exc}")
        selection = p.choose(priors, current, p.merge(local, remote))
        retrieved_at: dict[str, float] = {}
        for study_uid, series_uids in selection.to_fetch.items():
            left = deadline - time.monotonic()
            if left <= 0 or archive is None:
                problems.append(f"{study_uid}: not retrieved within {priors.timeout_seconds:g} s")
                continue
            result = archive.retrieve(
                study_uid, series_uids, timeout=left, patient=(current.patient_id, current.issuer)
            )
            retrieved_at[study_uid] = time.time()
            if not result.ok:
                problems.append(f"{study_uid}: {_why(result)}")
            if self._stop.is_set():
                return None  # left in fetching-priors: the next start fetches again
        return self._settle(job_id, priors, current, selection, retrieved_at, problems)

    def _settle(
        self,
        job_id: int,
        priors: Priors,
        current: p.CurrentStudy,
        selection: p.Selection,
        retrieved_at: dict[str, float],
        problems: list[str],
    ) -> JobState | None:
        with self.db.read() as conn:
            held = {s.series_uid: s for study in p.local_priors(conn, current) for s in study.series}
        rows = []
        got = 0
        for study in selection.chosen:
            arrived = [s for s in study.series if s.series_uid in held]
            got += bool(arrived)
            rows += [
                {
                    "job_fk": job_id,
                    "study_uid": study.study_uid,
                    "series_uid": s.series_uid,
                    "study_date": study.study_date.strftime("%Y%m%d") if study.study_date else None,
                    "archive": priors.archive,
                    "retrieved_at": None if s.local else retrieved_at.get(study.study_uid),
                    "sop_count": held[s.series_uid].instances or 0,
                }
                for s in arrived
            ]
        short = got < priors.count
        why = "; ".join(
            [f"{got} of {priors.count} prior(s) at hand"]
            + ([selection.shortfall] if selection.shortfall else [])
            + problems
        )
        refuse = short and priors.on_missing == "refuse"
        to_state = JobState.REFUSED if refuse else JobState.QUEUED
        reason = (
            f"priors: {why}"
            if refuse
            else (f"priors: running with {why}" if short or problems else f"priors: {got} at hand")
        )
        try:
            with audited_write(self.db, self.audit) as work:
                if not refuse and rows:
                    work.conn.execute(insert(t.job_priors), rows)
                move(
                    work,
                    job_ref(work.conn, job_id),
                    to_state,
                    expect=JobState.FETCHING_PRIORS,
                    reason=reason,
                    actor=self.actor,
                )
        except StaleTransition:
            return None
        log.info("job %d: %s → %s", job_id, reason, to_state.value)
        return to_state
