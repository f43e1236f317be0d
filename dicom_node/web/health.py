"""``/healthz`` and ``/readyz``: is the node alive, and can it take studies now?

``/readyz`` runs every check each time it is asked (a load balancer or a monitor polls it
every few seconds; each check is cheap) and names what is wrong, never a patient:

* ``database``: the index and job database answers a query;
* ``storage``: a file can be written and synced under the data directory, and free space
  there is above ``[receiver] min_free_disk_mb`` (below it the receiver refuses stores);
* ``dicom_listener``: each DICOM port accepts a TCP connection;
* ``workers``: every worker process ``serve`` started is running;
* ``audit``: the audit log answers, and its last checkpoint is at most two checkpoint
  intervals behind the chain head (else the chain's tail is not anchored outside the
  database).

A check that cannot be made here (no listener yet, no workers configured) is left out.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

from audit import AuditTrail
from audit.trail import CheckpointFile
from dicom_node.db.engine import Database


@dataclass(frozen=True)
class Check:
    """One readiness check: its name and what is wrong (None: nothing)."""

    name: str
    problem: str | None = None


#: What ``/readyz`` asks: the checks, in order.
Readiness = Callable[[], list[Check]]


def database_check(db: Database) -> Check:
    try:
        with db.read() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error: not ready, say which
        return Check("database", f"the database does not answer: {type(exc).__name__}: {str(exc)[:200]}")
    return Check("database")


def storage_check(data_dir: Path, min_free_mb: int) -> Check:
    """A probe file written, synced and removed under ``data_dir``; free space above the floor."""
    probe = data_dir / f".readyz-{uuid.uuid4().hex}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"readyz")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        return Check("storage", f"cannot write under {data_dir}: {exc.strerror or exc}")
    free_mb = shutil.disk_usage(data_dir).free // (1024 * 1024)
    if free_mb < min_free_mb:
        return Check(
            "storage",
            f"{free_mb} MB free under {data_dir}, below the {min_free_mb} MB floor "
            "([receiver] min_free_disk_mb): stores are refused",
        )
    return Check("storage")


def _address(where: str) -> tuple[str, int]:
    """("127.0.0.1", 11112) from a listener's "0.0.0.0:11112" or "[::]:11112 (TLS)"."""
    host, _, port = where.split(" ")[0].rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


def listener_check(listening: Sequence[str], timeout: float = 1.0) -> Check:
    """Each listening DICOM port accepts a TCP connection (closed at once)."""
    if not listening:
        return Check("dicom_listener", "the DICOM listener is not running")
    for where in listening:
        host, port = _address(where)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            return Check("dicom_listener", f"{where} does not accept connections: {exc.strerror or exc}")
    return Check("dicom_listener")


#: A worker started (or restarted) less than this long ago does not count as running yet:
#: a worker that dies at start and is restarted, again and again, is not ready.
WORKER_SETTLE_SECONDS = 5.0


def workers_check(
    processes: Sequence[subprocess.Popen[bytes] | None],
    started_at: Sequence[float] = (),
    settle_seconds: float = WORKER_SETTLE_SECONDS,
) -> Check:
    """Every worker process runs, and has for ``settle_seconds`` since it was (re)started
    (``started_at``: time.monotonic() per slot; None: a slot not started yet)."""
    now = time.monotonic()
    stopped = [k for k, proc in enumerate(processes) if proc is None or proc.poll() is not None]
    settling = [
        k
        for k, at in enumerate(started_at)
        if k not in stopped and k < len(processes) and now - at < settle_seconds
    ]
    if stopped or settling:
        parts = []
        if stopped:
            parts.append(
                f"{len(stopped)} of {len(processes)} worker process(es) not running "
                f"(slot {', '.join(map(str, stopped))})"
            )
        if settling:
            parts.append(
                f"slot {', '.join(map(str, settling))} (re)started less than {settle_seconds:g} s ago"
            )
        return Check("workers", "; ".join(parts) + "; the supervisor restarts a worker that dies")
    return Check("workers")


def audit_check(audit: AuditTrail, checkpoint_file: Path, checkpoint_every: int) -> Check:
    try:
        head, _ = audit.head()
    except Exception as exc:
        return Check("audit", f"the audit log does not answer: {type(exc).__name__}: {str(exc)[:200]}")
    try:
        newest = CheckpointFile(checkpoint_file).last()
    except (OSError, ValueError, KeyError) as exc:
        return Check("audit", f"the audit checkpoint file {checkpoint_file} cannot be read: {exc}")
    last = newest.seq if newest is not None else 0
    if head - last > 2 * checkpoint_every:
        return Check(
            "audit",
            f"the last audit checkpoint is at record {last}, {head - last} behind the chain head "
            f"(checkpoints every {checkpoint_every}): is {checkpoint_file} writable?",
        )
    return Check("audit")


def report(checks: Sequence[Check]) -> tuple[bool, dict[str, object]]:
    """(ready, the JSON body): ``{"ready": …, "checks": {name: "ok" | problem}}``."""
    ready = all(c.problem is None for c in checks)
    return ready, {"ready": ready, "checks": {c.name: c.problem or "ok" for c in checks}}
