"""Keeping the active policy current: reload on SIGHUP or when the file changes.

A new file that does not validate never replaces the running policy: the old one stays,
the error goes to the log and the audit trail (``config-loaded`` with a failure outcome).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.jobs.routing import PolicyError, PolicyRouter

log = logging.getLogger(__name__)


class PolicyWatcher:
    def __init__(
        self,
        router: PolicyRouter,
        path: Path,
        destinations: set[str],
        audit: AuditTrail,
        every: float = 2.0,
        actor: str | None = None,
    ) -> None:
        self.router = router
        self.path = path
        self.destinations = destinations
        self.audit = audit
        self.every = every
        self.actor = actor
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._mtime = self._stat()
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns / 1e9
        except OSError:
            return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def request_reload(self) -> None:
        """From the SIGHUP handler: reload now (the work happens on the watcher thread)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            forced = self._wake.wait(self.every)
            self._wake.clear()
            if self._stop.is_set():
                return
            mtime = self._stat()
            if forced or mtime != self._mtime:
                self._mtime = mtime
                self.reload("SIGHUP" if forced else "file changed")

    def reload(self, why: str) -> bool:
        try:
            loaded = self.router.reload(self.path, self.destinations)
        except PolicyError as exc:
            log.error(
                "policy %s not reloaded (%s); keeping the previous policy: %s",
                self.path,
                why,
                exc.problems[0],
            )
            self.audit.record(
                AuditEvent.CONFIG_LOADED,
                Outcome.SERIOUS_FAILURE,
                actor=self.actor,
                source=str(self.path),
                what="policy",
                trigger=why,
                result="refused; the previous policy stays active",
                problems=exc.problems,
            )
            return False
        log.info("policy %s reloaded (%s): %d rule(s)", self.path, why, len(loaded.policy.rules))
        self.audit.record(
            AuditEvent.CONFIG_LOADED,
            actor=self.actor,
            source=str(self.path),
            what="policy",
            trigger=why,
            sha256=loaded.sha256,
            rules=[r.name for r in loaded.policy.rules],
        )
        return True
