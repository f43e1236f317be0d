"""Destination profiles: what a destination is sent, and what it would refuse.

A ``pacs`` destination takes every output series. A ``tps`` destination takes the image
series only — not the AI companions (Parametric Maps, Segmentation, SR, Secondary
Capture: :data:`NOT_FOR_TPS`), which stay with the job and go to the rule's other
destinations, because a planning system plans on the image series — and that series must
pass the TPS checks of :mod:`dicom_node.delivery.tps`, as must the planning MR it was
made from.

The checks run as a job step before the gate (:meth:`DestinationProfiles.problems`, called
through :class:`dicom_node.jobs.handover.Handover`): a job whose outputs a destination
would refuse is held with the reasons, which the review page and ``policy explain`` show,
and approving it is refused — a reviewer never approves what the TPS would refuse, and the
outbox never re-reads a series to check it again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path

from pydicom.uid import (
    ComprehensiveSRStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    SpatialRegistrationStorage,
)
from sqlalchemy import Connection, select

from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.delivery.outbox import delivery_count, queue_deliveries
from dicom_node.delivery.tps import validate_for_tps, validate_input_series
from dicom_node.jobs.handover import Queued
from pipelines.base import OutputInstance

#: Output SOP classes a ``tps`` destination is not sent (no delivery is queued): the maps,
#: suspect-region SEG, report and overlay that accompany an AI image series, and the
#: Spatial Registration object of a prior (a planning system plans on the image series).
NOT_FOR_TPS = frozenset(
    {
        ParametricMapStorage,
        SegmentationStorage,
        ComprehensiveSRStorage,
        SecondaryCaptureImageStorage,
        SpatialRegistrationStorage,
    }
)


def tps_destinations(config: NodeConfig) -> frozenset[str]:
    """Names of the configured destinations with profile ``tps``."""
    return frozenset(name for name, d in config.destinations.items() if d.profile == "tps")


class DestinationProfiles:
    """The configured destinations' profiles, as the job layer needs them (a ``Handover``).

    Parameters
    ----------
    config
        The node config (its ``[destinations]``).
    data_dir
        Where received instances live (``NodePaths.data``): lets the TPS check read the
        job's source MR series as well. None: only the output series are checked.
    """

    def __init__(self, config: NodeConfig, data_dir: Path | None = None) -> None:
        self.tps = tps_destinations(config)
        self.data_dir = data_dir

    def accepts(self, destination: str, sop_classes: Collection[str]) -> bool:
        """Whether ``destination`` is sent a series of these SOP classes."""
        return not (destination in self.tps and set(sop_classes) <= NOT_FOR_TPS)

    def queue(self, conn: Connection, job_id: int, destinations: Sequence[str]) -> Queued:
        """Queue the deliveries of a released job (idempotent)."""
        new = queue_deliveries(conn, job_id, list(destinations), accepts=self.accepts)
        return Queued(new, delivery_count(conn, job_id))

    def nothing_to_send(self, destinations: Collection[str]) -> str:
        """Why a released job with outputs got no delivery at all (said to the operator)."""
        why = f"nothing to deliver: none of the job's output series is accepted by {', '.join(destinations)}"
        if set(destinations) <= self.tps:
            why += " (a TPS is sent image series only, not maps, SEG, SR or overlays)"
        return why

    def problems(
        self,
        conn: Connection,
        job_id: int,
        destinations: Sequence[str],
        outputs: Sequence[OutputInstance],
    ) -> list[str]:
        """Why a destination of the job would refuse what it is to be sent (empty: none).

        For a ``tps`` destination: every output series it would be sent must pass
        :func:`~dicom_node.delivery.tps.validate_for_tps` on the planning MR's frame of
        reference, and the job's source MR series must be one complete stack
        (:func:`~dicom_node.delivery.tps.validate_input_series`).
        """
        tps = [d for d in destinations if d in self.tps]
        if not tps:
            return []
        by_series: dict[str, list[OutputInstance]] = defaultdict(list)
        for output in outputs:
            by_series[output.series_uid].append(output)
        images = {
            uid: files
            for uid, files in by_series.items()
            if self.accepts(tps[0], {f.sop_class_uid for f in files})
        }
        if not images:
            return []
        expected, sources = self._planning_mr(conn, job_id)
        found: list[str] = []
        for series_uid, paths in sources.items():
            found += validate_input_series(paths, what=f"the source MR series {series_uid}")
        for files in images.values():
            found += validate_for_tps([f.path for f in files], expected)
        who = f"{', '.join(tps)} (profile tps)"
        return [f"{who} would refuse it: {problem}" for problem in found]

    def _planning_mr(self, conn: Connection, job_id: int) -> tuple[str | None, dict[str, list[Path]]]:
        """The planning MR's Frame of Reference UID (the only input frame, or the only MR
        one) and the files of each source MR series (none without ``data_dir``)."""
        selected = conn.execute(select(t.jobs.c.series_uid).where(t.jobs.c.id == job_id)).scalar()
        inputs = conn.execute(
            select(
                t.series.c.series_uid,
                t.series.c.modality,
                t.series.c.frame_of_reference_uid,
                t.instances.c.path,
            )
            .join(t.instances, t.instances.c.series_fk == t.series.c.id)
            .join(t.job_inputs, t.job_inputs.c.instance_fk == t.instances.c.id)
            .where(t.job_inputs.c.job_fk == job_id)
            .order_by(t.instances.c.id)
        ).all()
        if selected:
            inputs = [r for r in inputs if r.series_uid == selected]
        frames = {r.frame_of_reference_uid for r in inputs if r.frame_of_reference_uid}
        mr_frames = {
            r.frame_of_reference_uid for r in inputs if r.modality == "MR" and r.frame_of_reference_uid
        }
        expected = next(iter(frames)) if len(frames) == 1 else None
        if expected is None and len(mr_frames) == 1:
            expected = next(iter(mr_frames))
        sources: dict[str, list[Path]] = {}
        if self.data_dir is not None:
            for r in inputs:
                if r.modality == "MR":
                    sources.setdefault(r.series_uid, []).append(self.data_dir / r.path)
        return expected, sources
