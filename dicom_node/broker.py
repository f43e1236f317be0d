"""Jobs as Celery tasks through a broker (``[workers] engine = "celery"``).

The job row in the database stays the truth; a message carries only the job's id.

* :class:`Dispatcher` (a thread of ``serve``) publishes each queued job to the queue named
  after its pipeline, and publishes it again when no worker has taken it within
  ``redispatch_seconds`` or when it went back to ``queued`` after its last message (a retry,
  a lost worker). It takes the rows it publishes with ``FOR UPDATE SKIP LOCKED``, so the
  dispatchers of several receiving hosts do not publish one job together; and a duplicate
  message is harmless anyway.
* The task (:func:`run_job`) claims that job only if it is still queued (compare-and-set):
  a duplicate or stale message finds it taken and ends. The job then runs as under the
  local engine, its lease renewed while it runs. Messages are acknowledged late and
  rejected back to the broker if the worker process dies; the dead worker's lease runs out,
  the job goes back to ``queued`` in the database and is published again. A lost message
  therefore never loses a job, and a doubled one never runs it twice.
* ``dicom-node worker --queues restoration,sct`` runs a Celery worker on any host that
  reaches the database, the broker and the shared storage: a prefork pool of
  ``[workers] processes`` children, each with its own connections and loaded models.
  A job running past its pipeline's time limit fails with that reason (the soft limit);
  a child stuck past the hard limit (a minute later) is killed and the job resumes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy import and_, not_, or_, select, update

from dicom_node.config import NodeConfig, WorkersSection
from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.jobs.claims import INDEPENDENT
from dicom_node.jobs.state import JobState, runnable_now

log = logging.getLogger(__name__)

#: The environment variable that overrides ``[workers] broker_url``.
BROKER_URL_ENV = "DICOM_NODE_BROKER_URL"
TASK = "dicom_node.run_job"


def broker_url(config: NodeConfig) -> str:
    return os.environ.get(BROKER_URL_ENV, "").strip() or config.workers.broker_url


#: Message priorities on the Redis broker, whose transport keeps one list per step and takes
#: the lowest step first (kombu's ``priority_steps``; 0 is the most urgent — RabbitMQ counts
#: the other way, and is not the broker this node is tested with).
PRIORITY_STEPS = [0, 3, 6, 9]
_PRIORITY_OF_URGENCY = {t.URGENCY["urgent"]: 0, t.URGENCY["normal"]: 6, t.URGENCY["offpeak"]: 9}


def message_priority(urgency: int) -> int:
    """The broker message priority of a job of this urgency (urgent 0, normal 6, off-peak 9)."""
    return _PRIORITY_OF_URGENCY[max(-1, min(1, urgency))]


def celery_app(config: NodeConfig) -> Celery:
    """The Celery application of this node's config (both sides: publisher and worker)."""
    app = Celery("dicom_node", broker=broker_url(config), set_as_current=False)
    longest = max(config.workers.time_limit_seconds.values()) + 120
    app.conf.update(
        task_acks_late=True,  # a message is done when its job is, not when it arrives
        task_reject_on_worker_lost=True,  # a killed child puts its message back
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,  # a long job must not sit on messages others could run
        task_ignore_result=True,  # the database holds the outcome
        task_default_queue="default",
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        # a message unacknowledged this long is delivered again: longer than any job may run
        # one Redis list per priority step, the most urgent taken first from every queue the
        # worker reads (message_priority); the queues themselves stay round-robin
        broker_transport_options={"visibility_timeout": longest, "priority_steps": PRIORITY_STEPS},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.task(name=TASK, bind=True)(run_job)
    return app


# -- publishing ----------------------------------------------------------------------------


class Dispatcher:
    """Publishes queued jobs to the broker (a thread of ``serve``)."""

    def __init__(self, config: NodeConfig, db: Database, app: Celery | None = None) -> None:
        self.config = config
        self.db = db
        self.app = app or celery_app(config)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)

    def due(self) -> list[tuple[int, str, int]]:
        """Mark the queued jobs that need a message as dispatched now; their (id, pipeline,
        urgency), the most urgent first (off-peak jobs only inside their hours)."""
        now = time.time()
        stale = now - self.config.workers.redispatch_seconds
        with self.db.claim() as conn:
            rows = conn.execute(
                select(t.jobs.c.id, t.jobs.c.pipeline, t.jobs.c.urgency)
                .where(
                    *runnable_now(self.config.workers),
                    t.jobs.c.state == JobState.QUEUED.value,
                    or_(
                        t.jobs.c.dispatched_at.is_(None),
                        t.jobs.c.dispatched_at < stale,
                        t.jobs.c.dispatched_at < t.jobs.c.updated_at,
                    ),
                )
                .order_by(t.jobs.c.urgency.desc(), t.jobs.c.id)
                .limit(100)
                .with_for_update(skip_locked=True, of=t.jobs)
            ).all()
            if rows:
                conn.execute(
                    update(t.jobs).where(t.jobs.c.id.in_([r.id for r in rows])).values(dispatched_at=now)
                )
        return [(int(r.id), str(r.pipeline), int(r.urgency)) for r in rows]

    def publish(self, jobs: Sequence[tuple[int, str, int]]) -> None:
        for job_id, pipeline, urgency in jobs:
            soft = self.config.workers.time_limit(pipeline)
            self.app.send_task(
                TASK,
                args=[job_id],
                queue=pipeline,
                soft_time_limit=soft,
                time_limit=soft + 60,
                priority=message_priority(urgency),
            )
            log.info("job %d published to queue %s", job_id, pipeline)

    def dispatch_once(self) -> int:
        jobs = self.due()
        # Committed first: if publishing fails now, the job is published again once
        # redispatch_seconds have passed.
        self.publish(jobs)
        return len(jobs)

    def _loop(self) -> None:
        while not self._stop.wait(self.config.workers.poll_seconds):
            try:
                self.dispatch_once()
            except Exception:
                log.exception("dispatcher: publishing failed; retrying")
                self._stop.wait(5.0)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


# -- running (in a worker's pool child) ---------------------------------------------------

#: Set by :func:`run_worker` before the pool forks: where each child opens the node.
_WHERE: dict[str, Any] = {}
_CHILD: dict[str, Any] = {}


def _child_worker() -> Any:
    """This pool child's :class:`dicom_node.worker.Worker` (opened on first use)."""
    if "worker" not in _CHILD:
        from dicom_node.runtime import Runtime, setup_logging
        from dicom_node.worker import Worker

        runtime = Runtime.open(_WHERE.get("config"), _WHERE["home"], _WHERE.get("overrides"), actor=None)
        setup_logging(runtime.paths, runtime.config, to_stderr=True)
        worker = Worker(runtime.config, runtime.paths, runtime.db, runtime.audit, _WHERE["run_id"])
        worker.start_leases()
        _CHILD.update(worker=worker, runtime=runtime)
    return _CHILD["worker"]


@worker_process_shutdown.connect
def _close_child(**_kwargs: Any) -> None:
    worker = _CHILD.pop("worker", None)
    runtime = _CHILD.pop("runtime", None)
    if worker is not None:
        worker.stop_event.set()
    if runtime is not None:
        runtime.close()


@worker_process_init.connect
def _fresh_child(**_kwargs: Any) -> None:
    _CHILD.clear()  # never reuse a parent's connections after the fork


def run_job(task: Any, job_id: int) -> str:
    """The Celery task: claim job ``job_id`` if it is still queued, and run it."""
    worker = _child_worker()
    job = worker.runner.claim(job_id)
    if job is None:
        workers = worker.runner.config.workers
        if waits_for_offpeak(worker.runner.db, workers, job_id):
            log.info(
                "job %d: off-peak, its hours (%s) ended before its message came; it stays queued "
                "and is published again when they begin",
                job_id,
                workers.offpeak_hours,
            )
            return "waits-for-offpeak"
        log.info("job %d: not queued any more (taken, settled or cancelled); message dropped", job_id)
        return "not-queued"
    return str(worker.run_claimed(job).value)


def waits_for_offpeak(db: Database, workers: WorkersSection, job_id: int) -> bool:
    """Whether queued job ``job_id`` is an off-peak job outside its hours; if so it is marked
    not dispatched, so the dispatcher publishes it as soon as the hours begin (not a
    ``redispatch_seconds`` later)."""
    runnable = runnable_now(workers)
    if not runnable:  # inside the hours every queued job may run
        return False
    with db.claim() as conn:
        marked = conn.execute(
            update(t.jobs)
            .where(t.jobs.c.id == job_id, t.jobs.c.state == JobState.QUEUED.value, not_(and_(*runnable)))
            .values(dispatched_at=None)
        )
    return bool(marked.rowcount)


def run_worker(
    config: NodeConfig,
    home: Path,
    config_path: Path | None,
    overrides: dict[str, Any],
    queues: Sequence[str],
    concurrency: int,
) -> None:
    """``dicom-node worker`` under the Celery engine: consume ``queues`` until stopped."""
    run_id = f"{INDEPENDENT}{uuid.uuid4().hex[:12]}"
    _WHERE.update(home=home, config=config_path, overrides=overrides, run_id=run_id)
    app = celery_app(config)
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(max(concurrency, 1)),
        "--pool",
        "prefork",
        "--hostname",
        f"dicom-node-{run_id}@%h",
        "--loglevel",
        config.logging.level,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(argv)
