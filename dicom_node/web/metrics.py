"""``/metrics``: the node's counts in the Prometheus text format (prometheus-client).

Everything that several processes or hosts share is read from the database at scrape
time, so every receiver and worker process (and every host of a scale-out) is counted
without a push gateway or multiprocess files, and a restart loses nothing: the database
is the truth. Families (all prefixed ``dicomnode_``):

* ``instances_received_total`` / ``instances_received_bytes_total`` by calling AE (what
  the store holds; a purge would read as a counter reset), ``instances_quarantined_total``;
* ``studies`` (held in the index), ``studies_purged`` (their files removed by the
  retention rule), ``jobs`` by state and pipeline,
  ``jobs_queued_oldest_seconds`` by urgency (the oldest queued job that may run now: off-peak
  jobs outside ``[workers] offpeak_hours`` are not waiting for a worker) and
  ``jobs_waiting_offpeak`` (those off-peak jobs),
  ``job_duration_seconds`` per pipeline (from running to its outcome: a histogram),
  ``job_stage_seconds`` per pipeline and stage (``predict``: the model's inference);
* ``deliveries`` by state and destination (``dead`` is the dead-letter queue),
  ``delivery_attempts_total`` by outcome, ``storage_commitments`` by state;
* ``disk_free_bytes`` under the data directory, ``audit_chain_head`` (the newest record's
  sequence number) and ``audit_checkpoint_age_seconds``.

No patient data: labels are AE titles, pipeline and destination names, states.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import and_, func, not_, select

from audit import AuditEvent, AuditTrail
from audit.trail import CheckpointFile, audit_events
from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.jobs.state import JobState, runnable_now

if TYPE_CHECKING:
    from dicom_node.config import WorkersSection

__all__ = ["CONTENT_TYPE_LATEST", "NodeCollector", "render"]

#: Upper bounds (s) of the job duration histogram: a small study to a long synthetic CT.
DURATION_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Upper bounds (s) of the stage histogram: a header check to a long inference.
STAGE_BUCKETS = (0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
#: Job states a run ends in (the duration is from ``running`` to the first of these).
_RUN_OUTCOMES = ("succeeded", "held", "failed", "delivering", "delivered")
#: A finished run's gate verdict (from ``running``) and a reviewer's (from ``held``).
_GATE_OUT = ("succeeded", "held")
_REVIEW_OUT = ("delivering", "failed")


class NodeCollector(Collector):
    """The node's metrics, read from the database (and the disk, the audit log) at scrape time."""

    def __init__(
        self,
        db: Database,
        audit: AuditTrail,
        data_dir: Path,
        checkpoint_file: Path,
        open_associations: Callable[[], int] | None = None,
        connections_by_process: Callable[[], list[tuple[int, int]] | None] | None = None,
        workers: WorkersSection | None = None,
    ) -> None:
        self.db = db
        self.audit = audit
        self.data_dir = data_dir
        self.checkpoint_file = checkpoint_file
        #: The serving process's DICOM associations open now (None: not this process's).
        self.open_associations = open_associations
        #: (receiving process's board row, open connections) on this host (None: one process).
        self.connections_by_process = connections_by_process
        #: ``[workers]``: which queued jobs may run now (None: the queue families are left out).
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        with self.db.read() as conn:
            received = CounterMetricFamily(
                "dicomnode_instances_received",
                "Instances held in the store, by calling AE",
                labels=["calling_ae"],
            )
            received_bytes = CounterMetricFamily(
                "dicomnode_instances_received_bytes", "Bytes of those instances", labels=["calling_ae"]
            )
            for ae, count, size in conn.execute(
                select(
                    t.instances.c.calling_ae, func.count(), func.coalesce(func.sum(t.instances.c.size), 0)
                ).group_by(t.instances.c.calling_ae)
            ):
                received.add_metric([ae or ""], count)
                received_bytes.add_metric([ae or ""], size)
            yield received
            yield received_bytes
            quarantined = CounterMetricFamily(
                "dicomnode_instances_quarantined",
                "Instances quarantined, by calling AE",
                labels=["calling_ae"],
            )
            for ae, count in conn.execute(
                select(t.quarantine.c.calling_ae, func.count()).group_by(t.quarantine.c.calling_ae)
            ):
                quarantined.add_metric([ae or ""], count)
            yield quarantined
            yield GaugeMetricFamily(
                "dicomnode_studies",
                "Studies in the index",
                value=conn.execute(select(func.count()).select_from(t.studies)).scalar_one(),
            )
            yield GaugeMetricFamily(
                "dicomnode_studies_purged",
                "Studies in the index whose files the retention rule removed ([retention])",
                value=conn.execute(
                    select(func.count()).select_from(t.studies).where(t.studies.c.purged_at.is_not(None))
                ).scalar_one(),
            )
            jobs = GaugeMetricFamily(
                "dicomnode_jobs", "Jobs by state and pipeline", labels=["state", "pipeline"]
            )
            for state, pipeline, count in conn.execute(
                select(t.jobs.c.state, t.jobs.c.pipeline, func.count()).group_by(
                    t.jobs.c.state, t.jobs.c.pipeline
                )
            ):
                jobs.add_metric([state, pipeline], count)
            yield jobs
            yield self._durations(conn)
            yield self._stage_times(conn)
            deliveries = GaugeMetricFamily(
                "dicomnode_deliveries",
                "Deliveries by state (dead: the dead-letter queue) and destination",
                labels=["state", "destination"],
            )
            for state, destination, count in conn.execute(
                select(t.deliveries.c.state, t.deliveries.c.destination, func.count()).group_by(
                    t.deliveries.c.state, t.deliveries.c.destination
                )
            ):
                deliveries.add_metric([state, destination], count)
            yield deliveries
            attempts = CounterMetricFamily(
                "dicomnode_delivery_attempts", "Delivery attempts by outcome", labels=["outcome"]
            )
            for outcome, count in conn.execute(
                select(t.delivery_attempts.c.outcome, func.count()).group_by(t.delivery_attempts.c.outcome)
            ):
                attempts.add_metric([outcome or "unfinished"], count)
            yield attempts
            yield self._gate_verdicts(conn)
            commitments = GaugeMetricFamily(
                "dicomnode_storage_commitments", "Storage commitment transactions by state", labels=["state"]
            )
            for state, count in conn.execute(
                select(t.storage_commitments.c.state, func.count()).group_by(t.storage_commitments.c.state)
            ):
                commitments.add_metric([state], count)
            yield commitments
            if self.workers is not None:
                yield from self._queue(conn, self.workers)
        yield GaugeMetricFamily(
            "dicomnode_disk_free_bytes",
            "Free space under the data directory",
            value=shutil.disk_usage(self.data_dir).free if self.data_dir.exists() else 0,
        )
        yield from self._from_audit()
        if self.open_associations is not None:
            yield GaugeMetricFamily(
                "dicomnode_associations_open",
                "DICOM associations open now on this receiving process",
                value=self.open_associations(),
            )
        by_process = self.connections_by_process() if self.connections_by_process is not None else None
        if by_process is not None:
            family = GaugeMetricFamily(
                "dicomnode_receiver_connections_open",
                "Connections (waiting to associate or associated) open now per receiving process "
                "of this host ([node] receivers), by its row on the receivers' board",
                labels=["receiver"],
            )
            for row, connections in by_process:
                family.add_metric([str(row)], connections)
            yield family
        head, _ = self.audit.head()
        yield GaugeMetricFamily(
            "dicomnode_audit_chain_head", "Sequence number of the newest audit record", value=head
        )
        age = _checkpoint_age(self.checkpoint_file)
        if age is not None:
            yield GaugeMetricFamily(
                "dicomnode_audit_checkpoint_age_seconds", "Seconds since the last audit checkpoint", value=age
            )

    @staticmethod
    def _queue(conn: Any, workers: WorkersSection) -> Iterator[Metric]:
        """How long the queue's runnable jobs have waited, by urgency, and how many off-peak
        jobs wait for their hours: a monitor alerts on the first without paging anyone at
        night for the second."""
        queued = t.jobs.c.state == JobState.QUEUED.value
        runnable = runnable_now(workers)  # [] inside the hours: every queued job may run
        oldest = GaugeMetricFamily(
            "dicomnode_jobs_queued_oldest_seconds",
            "Seconds the oldest queued job that may run now has waited, by urgency (0: none); "
            "off-peak jobs outside [workers] offpeak_hours are not counted",
            labels=["urgency"],
        )
        since = dict(
            conn.execute(
                select(t.jobs.c.urgency, func.min(t.jobs.c.updated_at))
                .where(queued, *runnable)
                .group_by(t.jobs.c.urgency)
            ).all()
        )
        now = time.time()
        for name, value in t.URGENCY.items():
            oldest.add_metric([name], max(0.0, now - since[value]) if value in since else 0.0)
        yield oldest
        waiting = 0
        if runnable:
            waiting = conn.execute(
                select(func.count()).select_from(t.jobs).where(queued, not_(and_(*runnable)))
            ).scalar_one()
        yield GaugeMetricFamily(
            "dicomnode_jobs_waiting_offpeak",
            "Queued off-peak jobs waiting for [workers] offpeak_hours (0 inside them)",
            value=waiting,
        )

    def _gate_verdicts(self, conn: object) -> CounterMetricFamily:
        """The safety gate's verdicts (released, held) and the reviewers' (approved, rejected)."""
        family = CounterMetricFamily(
            "dicomnode_gate_verdicts",
            "Gate verdicts on finished runs (released, held) and review decisions (approved, rejected)",
            labels=["verdict"],
        )
        names = {"succeeded": "released", "held": "held", "delivering": "approved", "failed": "rejected"}
        steps = t.job_transitions.c
        rows = conn.execute(  # type: ignore[attr-defined]
            select(steps.to_state, func.count())
            .where(
                ((steps.from_state == "running") & steps.to_state.in_(_GATE_OUT))
                | ((steps.from_state == "held") & steps.to_state.in_(_REVIEW_OUT))
            )
            .group_by(steps.from_state, steps.to_state)
        )
        for to_state, count in rows:
            family.add_metric([names[to_state]], count)
        return family

    def _from_audit(self) -> Iterator[Metric]:
        """What only the audit log knows: refusals the node caused, and model loads."""
        rejected = CounterMetricFamily(
            "dicomnode_instances_rejected",
            "Instances refused by the node's own state (disk floor, storage failure), by calling AE",
            labels=["calling_ae"],
        )
        load = GaugeMetricFamily(
            "dicomnode_model_load_seconds",
            "Seconds the latest load of each model took in a worker",
            labels=["pipeline", "model", "version"],
        )
        loads: dict[tuple[str, str, str], float] = {}
        with self.audit.read_connection() as conn:
            for ae, count in conn.execute(
                select(audit_events.c.calling_ae, func.count())
                .where(audit_events.c.event == AuditEvent.INSTANCE_REJECTED.value)
                .group_by(audit_events.c.calling_ae)
            ):
                rejected.add_metric([ae or ""], count)
            for (facts,) in conn.execute(
                select(audit_events.c.facts)
                .where(audit_events.c.event == AuditEvent.MODEL_LOADED.value)
                .order_by(audit_events.c.seq)
            ):
                found = json.loads(facts) if isinstance(facts, str) else dict(facts or {})
                if "load_seconds" in found:
                    key = (str(found.get("pipeline")), str(found.get("model")), str(found.get("version")))
                    loads[key] = float(found["load_seconds"])
        for labels, seconds in sorted(loads.items()):
            load.add_metric(list(labels), seconds)
        yield rejected
        yield load

    def _durations(self, conn: object) -> HistogramMetricFamily:
        """Seconds from ``running`` to the run's outcome, per pipeline (the latest run of each job)."""
        started: dict[int, float] = {}
        ended: dict[int, float] = {}
        rows = conn.execute(  # type: ignore[attr-defined]
            select(t.job_transitions.c.job_fk, t.job_transitions.c.to_state, t.job_transitions.c.at).order_by(
                t.job_transitions.c.id
            )
        )
        for job, state, at in rows:
            if state == "running":
                started[job] = at
                ended.pop(job, None)
            elif state in _RUN_OUTCOMES and job in started and job not in ended:
                ended[job] = at
        pipelines = dict(conn.execute(select(t.jobs.c.id, t.jobs.c.pipeline)).all())  # type: ignore[attr-defined]
        by_pipeline: dict[str, list[float]] = defaultdict(list)
        for job, at in ended.items():
            by_pipeline[pipelines.get(job, "?")].append(max(at - started[job], 0.0))
        family = HistogramMetricFamily(
            "dicomnode_job_duration_seconds", "Job run time, from running to its outcome", labels=["pipeline"]
        )
        for pipeline, seconds in sorted(by_pipeline.items()):
            _histogram(family, [pipeline], seconds, DURATION_BUCKETS)
        return family

    def _stage_times(self, conn: object) -> HistogramMetricFamily:
        """Seconds per stage of every run, by pipeline and stage (``predict``: inference)."""
        by_stage: dict[tuple[str, str], list[float]] = defaultdict(list)
        rows = conn.execute(  # type: ignore[attr-defined]
            select(t.jobs.c.pipeline, t.job_stage_times.c.stage, t.job_stage_times.c.seconds).join(
                t.jobs, t.jobs.c.id == t.job_stage_times.c.job_fk
            )
        )
        for pipeline, stage, seconds in rows:
            by_stage[(pipeline, stage)].append(seconds)
        family = HistogramMetricFamily(
            "dicomnode_job_stage_seconds",
            "Seconds a stage of a job's run took (predict: the model's inference)",
            labels=["pipeline", "stage"],
        )
        for (pipeline, stage), seconds in sorted(by_stage.items()):
            _histogram(family, [pipeline, stage], seconds, STAGE_BUCKETS)
        return family


def _histogram(
    family: HistogramMetricFamily, labels: list[str], values: list[float], bounds: tuple[float, ...]
) -> None:
    buckets = [(_le(b), sum(1 for v in values if v <= b)) for b in bounds]
    buckets.append(("+Inf", len(values)))
    family.add_metric(labels, buckets, sum(values))


def _le(bound: float) -> str:
    return str(float(bound))


def _checkpoint_age(path: Path) -> float | None:
    """Seconds since the file's last checkpoint (None: none yet, or unreadable)."""
    try:
        last = CheckpointFile(path).last()
        return None if last is None else max(time.time() - last.at, 0.0)
    except (OSError, ValueError, KeyError):
        return None


def render(collector: NodeCollector) -> bytes:
    """The text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
