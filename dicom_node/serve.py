"""``dicom-node serve``: the receiver, the completeness timers and the worker processes.

Start-up order matters for "nothing lost": first re-index what an unclean stop left on
disk, then requeue work whose worker died, then re-arm study timers, and only then open
the port.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from audit import AuditEvent, Outcome
from audit.export import to_dicom_xml
from audit.syslog import AuditForwarder, SyslogTlsSender
from dicom_node import __version__
from dicom_node.delivery.outbox import Outbox
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.mpps import PerformedProcedureSteps
from dicom_node.ingest.origin import OriginRules, job_output_lookup
from dicom_node.ingest.readiness import StudyReadiness
from dicom_node.ingest.receiver import Receiver
from dicom_node.ingest.store import InstanceStore, latest_received_at
from dicom_node.jobs.claims import claim_id, orphan_test
from dicom_node.jobs.intake import JobIntake
from dicom_node.jobs.policywatch import PolicyWatcher
from dicom_node.jobs.routing import PolicyRouter
from dicom_node.jobs.runner import recover_jobs
from dicom_node.runtime import Runtime

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_CLEAN_MARK = "clean-shutdown"


class AlreadyRunning(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the serve process dies (even by kill -9)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class WorkerSupervisor:
    """Starts the worker processes, restarts one that dies, stops them on shutdown."""

    def __init__(self, runtime: Runtime, run_id: str, worker_argv: list[str]) -> None:
        self.runtime = runtime
        self.run_id = run_id
        self.argv = worker_argv
        self.count = runtime.config.workers.processes
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def _spawn(self, slot: int) -> None:
        proc = subprocess.Popen(self.argv, preexec_fn=_die_with_parent, close_fds=True)
        self.procs[slot] = proc
        log.info("worker %d started (pid %d)", slot, proc.pid)

    def start(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for slot, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                log.error("worker %d (pid %d) exited with %s; restarting", slot, proc.pid, proc.returncode)
                recover_jobs(self.runtime.db, self.runtime.audit, self.run_id, claim_id(self.run_id))
                if not self._stop.is_set():
                    self._spawn(slot)

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        deadline = time.time() + timeout
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_syslog_forwarder(runtime: Runtime) -> AuditForwarder | None:
    """Ship the audit log to the configured syslog collector (one forwarder per node)."""
    settings = runtime.config.audit.syslog
    if not settings.enabled:
        return None
    sender = SyslogTlsSender(
        settings.host,
        settings.port,
        cafile=settings.ca_file or None,
        certfile=settings.cert_file or None,
        keyfile=settings.key_file or None,
    )
    forwarder = AuditForwarder(
        runtime.audit,
        sender,
        runtime.paths.var / "audit" / "syslog-forwarder.json",
        app_name=settings.app_name,
        hostname=socket.gethostname(),
        payload=to_dicom_xml,
        checkpoint_every=runtime.config.audit.checkpoint_every,
    )
    forwarder.start()
    log.info("shipping the audit log to syslog collector %s:%d over TLS", settings.host, settings.port)
    return forwarder


def _claim_pidfile(runtime: Runtime) -> Path:
    pidfile = runtime.paths.run / "serve.pid"
    if pidfile.exists():
        try:
            other = int(pidfile.read_text().strip())
        except ValueError:
            other = 0
        if other and other != os.getpid():
            try:
                os.kill(other, 0)
                raise AlreadyRunning(
                    f"another dicom-node serve (pid {other}) is using {runtime.paths.home}; "
                    "stop it first or use a different --home"
                )
            except ProcessLookupError:
                pass
    pidfile.write_text(f"{os.getpid()}\n")
    return pidfile


def serve(
    runtime: Runtime,
    *,
    config_path: Path | None,
    overrides: dict[str, Any],
    ready_file: Path | None = None,
) -> int:
    """Run the node until SIGTERM/SIGINT. Returns the exit code."""
    config = runtime.config
    paths = runtime.paths
    audit = runtime.audit
    run_id = uuid.uuid4().hex[:12]
    actor = claim_id(run_id)
    pidfile = _claim_pidfile(runtime)

    audit.record(
        AuditEvent.CONFIG_LOADED,
        actor=actor,
        source=str(runtime.loaded.source) if runtime.loaded.source else "embedded defaults",
        sha256=runtime.loaded.sha256,
        overrides=overrides,
    )
    audit.record(AuditEvent.APPLICATION_START, actor=actor, version=__version__, home=str(paths.home))

    router = PolicyRouter(None, paths.data, {n: d.ae_title for n, d in config.destinations.items()})
    watcher = None
    policy_path = runtime.policy_path
    if policy_path is not None:
        loaded = router.reload(policy_path, set(config.destinations))  # PolicyError: refuse to start
        audit.record(
            AuditEvent.CONFIG_LOADED,
            actor=actor,
            source=str(policy_path),
            what="policy",
            sha256=loaded.sha256,
            rules=[r.name for r in loaded.policy.rules],
        )
        watcher = PolicyWatcher(
            router, policy_path, set(config.destinations), audit, config.policy.reload_seconds, actor
        )
    else:
        log.warning("no [policy] file configured: studies are stored, none is processed")
    intake = JobIntake(runtime.db, audit, router, actor=actor)
    readiness = StudyReadiness(config, runtime.db, on_ready=intake.study_ready, audit=audit)
    indexer = Indexer(
        runtime.db,
        audit,
        on_indexed=readiness.instances_indexed,
    )
    store = InstanceStore(
        paths,
        runtime.db,
        indexer,
        fsync=config.storage.fsync,
        origin=OriginRules(config.node.ae_title, config.node.uid_root, job_output_lookup(runtime.db)),
    )
    clean_mark = paths.run / _CLEAN_MARK
    if clean_mark.exists():
        clean_mark.unlink()
    else:
        last = latest_received_at(runtime.db)
        store.reconcile(since=None if last is None else last - 600)
    requeued = recover_jobs(runtime.db, audit, run_id, actor)
    outbox = Outbox(config, runtime.db, audit, actor)
    redelivered = outbox.recover(orphan_test(run_id))
    if requeued or redelivered:
        log.warning(
            "resumed %d job(s) and %d delivery(ies) left unfinished by the last run",
            requeued,
            redelivered,
        )

    readiness.start()
    forwarder = start_syslog_forwarder(runtime)
    # Storage commitment results that peers report on new associations settle deliveries.
    # A scanner's MPPS COMPLETED makes its study ready once the instances it lists are stored.
    procedure_steps = PerformedProcedureSteps(config, runtime.db, audit, on_changed=readiness.steps_changed)
    receiver = Receiver(
        config,
        paths,
        store,
        audit,
        commitment_reports=outbox.commitments.record_report,
        procedure_steps=procedure_steps,
    )
    worker_argv = [
        sys.executable,
        "-m",
        "dicom_node",
        "worker",
        "--home",
        str(paths.home),
        "--run-id",
        run_id,
        "--overrides",
        json.dumps(overrides),
    ]
    if config_path is not None:
        worker_argv += ["--config", str(config_path)]
    supervisor = WorkerSupervisor(runtime, run_id, worker_argv)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if watcher is not None:
        signal.signal(signal.SIGHUP, lambda _s, _f: watcher.request_reload())
        watcher.start()

    try:
        receiver.start()
    except OSError as exc:
        readiness.shutdown()
        pidfile.unlink(missing_ok=True)
        raise OSError(f"cannot listen on {config.node.host}:{config.node.port}: {exc.strerror}") from None
    web = None
    if config.web.enabled:
        from dicom_node.web.app import WebContext, create_app
        from dicom_node.web.server import WebServer

        web = WebServer(
            create_app(WebContext(config, runtime.db, audit, paths.checkpoint_file(config))),
            config.web.host,
            config.web.port,
        )
        try:
            web.start()
        except OSError:
            receiver.stop()
            store.close()
            readiness.shutdown()
            pidfile.unlink(missing_ok=True)
            raise
        log.info("web pages on http://%s:%d/", config.web.host, config.web.port)
    supervisor.start()
    log.info(
        "dicom-node %s serving %s on %s:%d (home %s, %d worker process(es), destinations: %s)",
        __version__,
        config.node.ae_title,
        config.node.host,
        config.node.port,
        paths.home,
        config.workers.processes,
        ", ".join(config.destinations) or "none",
    )
    if ready_file is not None:
        ready_file.write_text(f"{os.getpid()}\n")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        if watcher is not None:
            watcher.stop()
        if web is not None:
            web.stop()
        receiver.stop()
        store.close()
        readiness.shutdown()
        supervisor.stop()
        audit.record(AuditEvent.APPLICATION_STOP, Outcome.SUCCESS, actor=actor, version=__version__)
        audit.checkpoint()
        if forwarder is not None:
            forwarder.stop(timeout=5)
        clean_mark.write_text(f"{time.time()}\n")
        pidfile.unlink(missing_ok=True)
        log.info("stopped cleanly")
    return 0
