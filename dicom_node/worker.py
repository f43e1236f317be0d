"""A worker process: runs queued jobs and drains the outbox.

Workers run in processes separate from the receiver, so inference never holds the
receiver's GIL. One loop runs jobs (:class:`dicom_node.jobs.runner.JobRunner`), one sends
deliveries (:class:`dicom_node.delivery.outbox.Outbox`), one renews the leases of what
this process holds (:mod:`dicom_node.jobs.claims`): a claim whose process is gone or
whose lease ran out is orphaned, and its work resumes from the last committed state.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from sqlalchemy import update

from audit import AuditTrail
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.delivery.outbox import Outbox
from dicom_node.delivery.profiles import DestinationProfiles
from dicom_node.jobs.claims import claim_id, orphan_test
from dicom_node.jobs.runner import ClaimedJob, JobRunner, recover_jobs
from dicom_node.jobs.state import JobState
from dicom_node.net.tls import ClientTls
from dicom_node.paths import NodePaths
from policies.loader import PolicyError, load_policy

log = logging.getLogger(__name__)


class Worker:
    """One worker process: a job loop and a delivery loop, with leases kept alive."""

    def __init__(
        self,
        config: NodeConfig,
        paths: NodePaths,
        db: Database,
        audit: AuditTrail,
        run_id: str,
        policy_path: Path | None = None,
    ) -> None:
        self.config = config
        #: The policy whose pipelines are built at start (``[workers] preload``).
        self.policy_path = policy_path
        self.db = db
        self.audit = audit
        self.run_id = run_id
        self.worker_id = claim_id(run_id)
        profiles = DestinationProfiles(config, data_dir=paths.data)
        self.runner = JobRunner(config, paths, db, audit, self.worker_id, profiles)
        self.outbox = Outbox(config, db, audit, self.worker_id, tls=ClientTls(config.tls, paths.home))
        self.stop_event = threading.Event()
        self._held_jobs: set[int] = set()
        self._held_deliveries: set[int] = set()
        self._held_lock = threading.Lock()

    def run(self) -> None:
        """Deliver, keep leases, recover orphans; and, under the local engine, run jobs
        (under the Celery engine, ``dicom-node worker`` processes run them)."""
        senders = [
            threading.Thread(target=self._delivery_loop, name=f"outbox-{n}", daemon=True)
            for n in range(self.config.outbox.associations)
        ]
        for sender in senders:
            sender.start()
        threads = [*senders, self.start_leases()]
        runs_jobs = self.config.workers.engine == "local"
        log.info("worker %s started (%s)", self.worker_id, "jobs, deliveries" if runs_jobs else "deliveries")
        if runs_jobs and self.config.workers.preload:  # beside the job loop: a job never waits for
            # a pipeline it does not need (building the one it needs is shared, not doubled)
            threading.Thread(target=self.preload, name="preload", daemon=True).start()
        next_recovery = 0.0
        while not self.stop_event.is_set():
            now = time.time()
            if now >= next_recovery:
                self._recover()
                next_recovery = now + self.config.workers.lease_seconds / 2
            job = self.runner.claim() if runs_jobs else None
            if job is None:
                self.stop_event.wait(self.config.workers.poll_seconds)
                continue
            self.run_claimed(job)
        for th in threads:
            th.join(timeout=5)

    def preload(self) -> None:
        """Build the pipelines the policy's rules name (imports and model weights take
        seconds; a study should not wait for them)."""
        if self.policy_path is None:
            return
        try:
            names = sorted({rule.pipeline for rule in load_policy(self.policy_path).policy.rules})
        except PolicyError:
            return  # serve refused to start on it, or it changed since: jobs build what they need
        for name, took in self.runner.preload(names).items():
            if isinstance(took, str):
                log.warning("worker %s: pipeline %s not built at start: %s", self.worker_id, name, took)
            else:
                log.info("worker %s: pipeline %s ready in %.1f s", self.worker_id, name, took)
        if names and self.config.workers.encode_helper:
            from pipelines import parallel

            if parallel.start():
                log.info("worker %s: encode helper process started", self.worker_id)
        if names:
            from pipelines.writers import warm_up  # highdicom: imported with the pipelines, not before

            # the DICOM tables highdicom reads when it builds its first object: now, not in
            # the first job's encode
            log.info("worker %s: DICOM writer tables loaded in %.1f s", self.worker_id, warm_up())

    def start_leases(self) -> threading.Thread:
        """Start renewing the leases of what this process holds (a daemon thread)."""
        thread = threading.Thread(target=self._lease_loop, name="leases", daemon=True)
        thread.start()
        return thread

    def run_claimed(self, job: ClaimedJob) -> JobState:
        """Run a job this worker claimed, its lease renewed until it settles."""
        with self._held_lock:
            self._held_jobs.add(job.job_id)
        try:
            return self.runner.run(job)
        finally:
            with self._held_lock:
                self._held_jobs.discard(job.job_id)

    def _delivery_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.outbox.commitments.expire_overdue()
                task = self.outbox.claim_due()
            except Exception:
                log.exception("outbox: claim failed")
                task = None
            if task is None:
                self.stop_event.wait(self.config.workers.poll_seconds)
                continue
            with self._held_lock:
                self._held_deliveries.add(task.delivery_id)
            try:
                self.outbox.send(task)
            except Exception:
                log.exception("outbox: delivery %d crashed", task.delivery_id)
            finally:
                with self._held_lock:
                    self._held_deliveries.discard(task.delivery_id)

    def _lease_loop(self) -> None:
        period = self.config.workers.lease_seconds / 3
        while not self.stop_event.wait(period):
            until = time.time() + self.config.workers.lease_seconds
            with self._held_lock:
                jobs, deliveries = list(self._held_jobs), list(self._held_deliveries)
            if not jobs and not deliveries:
                continue
            try:
                with self.db.write() as conn:
                    if jobs:
                        conn.execute(update(t.jobs).where(t.jobs.c.id.in_(jobs)).values(lease_until=until))
                    if deliveries:
                        conn.execute(
                            update(t.deliveries)
                            .where(t.deliveries.c.id.in_(deliveries))
                            .values(lease_until=until)
                        )
            except Exception:
                log.exception("lease renewal failed")

    def _recover(self) -> None:
        try:
            recover_jobs(self.db, self.audit, self.run_id, self.worker_id)
            self.outbox.recover(orphan_test(self.run_id))
        except Exception:
            log.exception("recovery pass failed")
