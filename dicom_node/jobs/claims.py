"""Who holds a job or a delivery: ``claimed_by = host/run/pid`` and a lease.

A claim whose process is gone (same host), whose run is an earlier run of this node, or
whose lease ran out (any host) is orphaned, and its work resumes from the last committed
state.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from dicom_node.paths import pid_alive

HOST = socket.gethostname()
#: The run id prefix of a worker that runs on its own (``dicom-node worker`` under the
#: Celery engine), not as a child of ``serve``: a later ``serve`` on its host is not its
#: successor, so only its process or its lease can tell whether it is gone.
INDEPENDENT = "w-"

#: (claimed_by, lease_until, now) → whether the claim's owner is gone.
OrphanTest = Callable[[str | None, float | None, float], bool]


def claim_id(run_id: str, pid: int | None = None) -> str:
    return f"{HOST}/{run_id}/{pid or os.getpid()}"


def orphan_test(current_run_id: str) -> OrphanTest:
    """A predicate telling whether a claim's owner is gone."""

    def is_orphaned(claimed_by: str | None, lease_until: float | None, now: float) -> bool:
        if claimed_by is None:
            return True
        if lease_until is not None and lease_until < now:
            return True
        host, _, rest = claimed_by.partition("/")
        run_id, _, pid = rest.partition("/")
        if host != HOST:
            return False  # another machine's worker: only its lease can tell
        if run_id != current_run_id and not run_id.startswith(INDEPENDENT):
            return True  # claimed by an earlier run of this node
        return not (pid.isdigit() and pid_alive(int(pid)))

    return is_orphaned
