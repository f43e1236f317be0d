"""What the job layer needs of delivery, as an interface: jobs never import delivery.

Delivery sits above jobs (a delivery belongs to a job and settles it), so where a job
hands its outputs over — the destination checks before the gate, queueing the deliveries
of a released job — the job layer is given a :class:`Handover` by its caller: the worker
process, and the review commands and page, pass
:class:`dicom_node.delivery.profiles.DestinationProfiles`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple, Protocol

from sqlalchemy import Connection

from pipelines.base import OutputInstance


class Queued(NamedTuple):
    """Deliveries queued now, and how many the job has in all."""

    new: int
    total: int


class Handover(Protocol):
    def problems(
        self, conn: Connection, job_id: int, destinations: Sequence[str], outputs: Sequence[OutputInstance]
    ) -> list[str]:
        """Why a destination of the job would refuse its outputs (empty: none would)."""
        ...

    def queue(self, conn: Connection, job_id: int, destinations: Sequence[str]) -> Queued:
        """Queue one delivery per recorded output series per destination that takes it
        (idempotent)."""
        ...

    def nothing_to_send(self, destinations: Collection[str]) -> str:
        """Why a released job's destinations got no delivery at all."""
        ...
