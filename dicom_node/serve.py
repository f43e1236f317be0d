"""``dicom-node serve``: the receiver, the completeness timers and the worker processes.

Start-up order matters for "nothing lost": first re-index what an unclean stop left on
disk, then requeue work whose worker died, then re-arm study timers, and only then open
the port.

Before any of that: a node that listens beyond loopback must know its callers (see
:func:`exposure_problem`), and only one ``serve`` runs on a home (:class:`ServeLock`).
"""

from __future__ import annotations

import ctypes
import fcntl
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from audit import AuditEvent, Outcome
from audit.export import to_dicom_xml
from audit.syslog import AuditForwarder, SyslogTlsSender
from dicom_node import __version__
from dicom_node.config import ConfigError, NodeConfig
from dicom_node.delivery.outbox import Outbox
from dicom_node.delivery.retention import Retention
from dicom_node.ingest.archives import Archives
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.mpps import PerformedProcedureSteps
from dicom_node.ingest.origin import OriginRules, job_output_lookup
from dicom_node.ingest.readiness import StudyReadiness
from dicom_node.ingest.receiver import Receiver
from dicom_node.ingest.store import InstanceStore, latest_received_at
from dicom_node.jobs.claims import claim_id, orphan_test
from dicom_node.jobs.intake import JobIntake
from dicom_node.jobs.policywatch import PolicyWatcher
from dicom_node.jobs.prior_fetch import PriorFetcher
from dicom_node.jobs.routing import PolicyRouter
from dicom_node.jobs.runner import recover_jobs
from dicom_node.net.balance import LoadBoard
from dicom_node.net.hostnames import parse_address, resolve_name
from dicom_node.net.tls import check_config as check_tls_config
from dicom_node.runtime import Runtime

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_CLEAN_MARK = "clean-shutdown"


class AlreadyRunning(RuntimeError):
    """Another ``dicom-node serve`` holds the home's lock (the message names its pid)."""


class ServeLock:
    """``var/run/serve.pid``, locked with ``flock`` for the life of the serve process.

    The kernel drops the lock however the process ends (kill -9 included), so a file left
    behind never blocks a start, and a live unrelated process that happens to have the pid
    written in it does not either. The file holds the pid only to name the holder in the
    refusal. On release the file is removed while still locked; a start that opened it
    just before sees, once it has the lock, that the path no longer names the file it
    locked, and tries again on the new one.
    """

    def __init__(self, path: Path, home: Path) -> None:
        self.path = path
        self.home = home
        self._fd: int | None = None

    def acquire(self) -> ServeLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                other = lock_holder_pid(self.path)
                who = f"another dicom-node serve (pid {other})" if other else "another dicom-node serve"
                raise AlreadyRunning(
                    f"{who} is using {self.home} (it holds {self.path}); "
                    "stop it first or use a different --home"
                ) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # a serve that was stopping removed the file we locked
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ServeLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def lock_holder_pid(pidfile: Path) -> int | None:
    """The pid written in ``pidfile`` (None when it cannot be read)."""
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def running_serve(pidfile: Path) -> int | None:
    """The pid of the live ``serve`` that holds ``pidfile``'s lock, 0 when one does but its
    pid cannot be read, or None when none holds it (a stale file, or no file)."""
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return lock_holder_pid(pidfile) or 0
    finally:
        os.close(fd)  # closing drops a shared lock we took
    return None


def is_loopback(host: str) -> bool:
    """Does ``host`` (an address or a name) listen on loopback only? "" and 0.0.0.0 do not."""
    address = parse_address(host)
    if address is not None:
        return address.is_loopback
    if not host.strip():
        return False
    addresses = resolve_name(host)
    return bool(addresses) and all(a.is_loopback for a in addresses)


def exposure_problem(config: NodeConfig) -> str | None:
    """Why this config must not start, or None.

    Listening beyond loopback (the plain port and the TLS port share ``[node] host``), the
    node stores from whoever connects unless it requires known callers and its own called
    AE title. That takes ``[receiver] accept_unknown_callers = true``, said knowingly.
    """
    receiver = config.receiver
    if is_loopback(config.node.host) or receiver.accept_unknown_callers:
        return None
    off = [name for name in ("require_known_callers", "require_called_ae") if not getattr(receiver, name)]
    if not off:
        return None
    needs = "list the senders under [[callers]] and " if not config.callers else ""
    return (
        f"[node] host = {config.node.host!r} listens beyond loopback, but [receiver] "
        f"{' and '.join(off)} {'is' if len(off) == 1 else 'are'} off: any AE from any host could store "
        f"here; {needs}set [receiver] {' and '.join(f'{name} = true' for name in off)}, "
        "or set [receiver] accept_unknown_callers = true to accept that knowingly"
    )


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the serve process dies (even by kill -9)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _child_setup(nice: int) -> Callable[[], None]:
    """The ``preexec_fn`` of a process ``serve`` starts: it dies with ``serve`` and runs
    ``nice`` steps below it (from its first import on: a worker's start-up takes seconds of
    CPU, and the receiver may be taking a study meanwhile)."""

    def setup() -> None:
        _die_with_parent()
        if nice:
            os.nice(nice)

    return setup


class WorkerSupervisor:
    """Starts the worker processes, restarts one that dies, stops them on shutdown."""

    def __init__(
        self,
        runtime: Runtime,
        run_id: str,
        worker_argv: list[str],
        count: int | None = None,
        on_death: Callable[[], object] | None = None,
        what: str = "worker",
        nice: int = 0,
    ) -> None:
        self.runtime = runtime
        self.run_id = run_id
        self.argv = worker_argv
        self.count = runtime.config.workers.processes if count is None else count
        self.what = what
        #: How far below ``serve``'s CPU priority its processes run (``[workers] nice``).
        self.nice = nice
        self.on_death = on_death or (
            lambda: recover_jobs(self.runtime.db, self.runtime.audit, self.run_id, claim_id(self.run_id))
        )
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.count
        #: When each slot's process was last started (time.monotonic()): /readyz wants a
        #: restarted worker to have stayed up a while (a crash loop is not ready).
        self.started_at: list[float] = [0.0] * self.count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def _spawn(self, slot: int) -> None:
        proc = subprocess.Popen(self.argv, preexec_fn=_child_setup(self.nice), close_fds=True)
        self.procs[slot] = proc
        self.started_at[slot] = time.monotonic()
        log.info("%s %d started (pid %d)", self.what, slot, proc.pid)

    def start(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for slot, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                log.error(
                    "%s %d (pid %d) exited with %s; restarting", self.what, slot, proc.pid, proc.returncode
                )
                try:
                    self.on_death()
                except Exception:
                    log.exception("%s %d: cleaning up after it failed", self.what, slot)
                if not self._stop.is_set():
                    self._spawn(slot)

    def wait_listening(self, run_dir: Path, timeout: float) -> bool:
        """Wait until every receiving process started here says it listens."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            pending = [
                p
                for p in self.procs
                if p is not None and not (run_dir / f"receiver.{p.pid}.listening").exists()
            ]
            if not pending:
                return True
            time.sleep(0.05)
        log.warning("%s process(es) not listening after %.0f s", self.what, timeout)
        return False

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


def web_tls_files(runtime: Runtime) -> tuple[Path, Path] | None:
    """``[web] cert_file`` and ``key_file`` (relative to the home unless absolute), or None."""
    web = runtime.config.web
    if not web.cert_file and not web.key_file:
        return None
    if not (web.cert_file and web.key_file):
        raise ConfigError("[web] cert_file and key_file: set both (HTTPS) or neither (plain HTTP)")
    home = runtime.paths.home
    cert, key = Path(web.cert_file), Path(web.key_file)
    return (cert if cert.is_absolute() else home / cert, key if key.is_absolute() else home / key)


def serve(
    runtime: Runtime,
    *,
    config_path: Path | None,
    overrides: dict[str, Any],
    ready_file: Path | None = None,
    receiver_of: str | None = None,
) -> int:
    """Run the node until SIGTERM/SIGINT. Returns the exit code.

    ``receiver_of``: the run id of the ``serve`` that started this process as one more
    receiving process (``[node] receivers``): it receives, indexes and makes studies ready,
    and leaves everything else (web pages, workers, recovery) to that ``serve``.

    Raises
    ------
    ConfigError
        The node would listen beyond loopback without knowing its callers
        (:func:`exposure_problem`), ``[tls]`` or a TLS destination names files that
        cannot work, or ``[web]`` names half a certificate.
    AlreadyRunning
        Another ``serve`` holds the home.
    """
    if (problem := exposure_problem(runtime.config)) is not None:
        raise ConfigError(problem)
    check_tls_config(runtime.config, runtime.paths.home)  # TlsConfigError is a ConfigError
    web_tls = web_tls_files(runtime)
    if receiver_of is not None:  # one more receiving process of a serve that holds the home
        return _serve(
            runtime,
            config_path=config_path,
            overrides=overrides,
            ready_file=ready_file,
            web_tls=None,
            receiver_of=receiver_of,
        )
    with ServeLock(runtime.paths.run / "serve.pid", runtime.paths.home):
        return _serve(
            runtime, config_path=config_path, overrides=overrides, ready_file=ready_file, web_tls=web_tls
        )


def _serve(
    runtime: Runtime,
    *,
    config_path: Path | None,
    overrides: dict[str, Any],
    ready_file: Path | None,
    web_tls: tuple[Path, Path] | None,
    receiver_of: str | None = None,
) -> int:
    config = runtime.config
    paths = runtime.paths
    audit = runtime.audit
    run_id = receiver_of or uuid.uuid4().hex[:12]
    actor = claim_id(run_id)
    main = receiver_of is None

    audit.record(
        AuditEvent.CONFIG_LOADED,
        actor=actor,
        source=str(runtime.loaded.source) if runtime.loaded.source else "embedded defaults",
        sha256=runtime.loaded.sha256,
        overrides=overrides,
    )
    audit.record(
        AuditEvent.APPLICATION_START,
        actor=actor,
        version=__version__,
        home=str(paths.home),
        role="node" if main else "receiver",
    )

    router = PolicyRouter(
        None, paths.data, {n: d.ae_title for n, d in config.destinations.items()}, set(config.archives)
    )
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
    outbox = Outbox(config, runtime.db, audit, actor)
    clean_mark = paths.run / _CLEAN_MARK
    if main:
        if clean_mark.exists():
            clean_mark.unlink()
        else:
            last = latest_received_at(runtime.db)
            store.reconcile(since=None if last is None else last - 600)
        requeued = recover_jobs(runtime.db, audit, run_id, actor)
        redelivered = outbox.recover(orphan_test(run_id))
        if requeued or redelivered:
            log.warning(
                "resumed %d job(s) and %d delivery(ies) left unfinished by the last run",
                requeued,
                redelivered,
            )

    readiness.start()
    forwarder = start_syslog_forwarder(runtime) if main else None
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
    supervisor = WorkerSupervisor(
        runtime, run_id, worker_argv, count=None if main else 0, nice=config.workers.nice
    )
    receiver_argv = [
        sys.executable,
        "-m",
        "dicom_node",
        "serve",
        "--home",
        str(paths.home),
        "--receiver-of",
        run_id,
    ]
    receiver_argv += ["--overrides", json.dumps(overrides)]
    if config_path is not None:
        receiver_argv += ["--config", str(config_path)]

    def _receiver_died() -> None:
        # what it acknowledged but had not indexed yet (its staging files stay: the other
        # receivers' are in the same folder, and the next full start quarantines them)
        store.reconcile(since=time.time() - 600, staging=False)

    receivers = WorkerSupervisor(
        runtime,
        run_id,
        receiver_argv,
        count=config.node.receivers - 1 if main else 0,
        on_death=_receiver_died,
        what="receiver",
    )

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if watcher is not None:
        signal.signal(signal.SIGHUP, lambda _s, _f: watcher.request_reload())
        watcher.start()

    if main and config.node.receivers > 1:
        LoadBoard.reset(receiver.board_path)  # rows of an earlier run's processes go
    try:
        receiver.start()
    except OSError as exc:
        readiness.shutdown()
        raise OSError(f"cannot listen: {exc.strerror}") from None
    web = None
    if main and config.web.enabled:
        from dicom_node.web import health
        from dicom_node.web.app import WebContext, create_app
        from dicom_node.web.server import WebServer

        checkpoint_file = paths.checkpoint_file(config)

        def node_readiness() -> list[health.Check]:
            checks = [
                health.database_check(runtime.db),
                health.storage_check(paths.data, config.receiver.min_free_disk_mb),
                health.listener_check(receiver.listening),
                health.audit_check(audit, checkpoint_file, config.audit.checkpoint_every),
            ]
            if supervisor.count:
                checks.insert(3, health.workers_check(supervisor.procs, supervisor.started_at))
            return checks

        web = WebServer(
            create_app(
                WebContext(
                    config,
                    runtime.db,
                    audit,
                    checkpoint_file,
                    https=web_tls is not None,
                    readiness=node_readiness,
                    data_dir=paths.data,
                    environment_pins=dict(runtime.loaded.environment_pins),
                    receiver=receiver,
                )
            ),
            config.web.host,
            config.web.port,
            tls=web_tls,
            trusted_proxies=config.web.trusted_proxies,
        )
        try:
            web.start()
        except OSError:
            receiver.stop()
            store.close()
            readiness.shutdown()
            raise
        log.info("web pages on %s", web.url)
    # Jobs whose rule asks for priors wait in fetching-priors; the fetcher (its own threads,
    # never the receiver's) finds and retrieves them — a C-MOVE arrives through the receiver.
    prior_fetcher = PriorFetcher(
        runtime.db,
        audit,
        Archives(config, paths.home, audit, db=runtime.db, store=store, actor=actor),
        actor=actor,
    )
    # [retention]: studies whose files may go, on a timer, in the main process only
    retention = Retention(runtime.db, audit, config.retention, paths.data, paths.outputs, actor=actor)
    if main:
        prior_fetcher.start()
        retention.start()
    supervisor.start()
    receivers.start()
    if not main:
        (paths.run / f"receiver.{os.getpid()}.listening").write_text(f"{time.time()}\n")
    receivers.wait_listening(paths.run, timeout=120)  # ready means every process is
    dispatcher = None
    if main and config.workers.engine == "celery":
        # jobs go to `dicom-node worker` processes through the broker
        from dicom_node.broker import Dispatcher

        dispatcher = Dispatcher(config, runtime.db)
        dispatcher.start()
    log.info(
        "dicom-node %s serving %s on %s (home %s, %d worker process(es)%s, destinations: %s)",
        __version__,
        config.node.ae_title,
        ", ".join(receiver.listening),
        paths.home,
        config.workers.processes,
        "; jobs run by Celery workers" if dispatcher is not None else "",
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
        if dispatcher is not None:
            dispatcher.stop()
        receivers.stop()
        if main:
            prior_fetcher.stop()
            retention.stop()
        receiver.stop()
        store.close()
        readiness.shutdown()
        supervisor.stop()
        audit.record(AuditEvent.APPLICATION_STOP, Outcome.SUCCESS, actor=actor, version=__version__)
        audit.checkpoint()
        if forwarder is not None:
            forwarder.stop(timeout=5)
        if main:
            clean_mark.write_text(f"{time.time()}\n")
        log.info("stopped cleanly")
    return 0
