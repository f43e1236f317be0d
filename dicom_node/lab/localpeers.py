"""Local DICOM peers on loopback — for the demo, the integration tests and the benchmarks.

Each peer gets its own ports and storage folder and is stopped by PID. Debian's dcmtk and
Orthanc leave Nagle on; we set TCP_NODELAY=1 in their environment. dcmtk tools are called
by absolute path because pynetdicom installs console scripts with the same names into the
venv. Orthanc's REST API is read with the standard library (no extra dependency).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
NODE_ENV = {**os.environ, "TCP_NODELAY": "1"}


def have(path: str) -> bool:
    return Path(path).exists() and os.access(path, os.X_OK)


#: Ports for local peers come from below the kernel's ephemeral range (32768 and up by
#: default, /proc/sys/net/ipv4/ip_local_port_range), so an outgoing connection of another
#: process cannot take one between its choice and the peer's bind; each pytest-xdist worker
#: (PYTEST_XDIST_WORKER=gwN) draws from its own band, and a port is not handed out again
#: while it is among the last few hundred this process gave.
_PORT_BASE, _PORT_BAND, _PORT_BANDS = 20000, 1500, 8
_recent_ports: deque[int] = deque(maxlen=600)
_port_lock = threading.Lock()


def free_port() -> int:
    """A port nothing on this host is bound to now (on all interfaces)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    band = int(worker[2:]) % _PORT_BANDS if worker.startswith("gw") and worker[2:].isdigit() else 0
    low = _PORT_BASE + band * _PORT_BAND
    with _port_lock:
        for _ in range(500):
            port = random.randrange(low, low + _PORT_BAND)
            if port in _recent_ports:
                continue
            try:
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            except OSError:
                continue  # in use (or still in TIME_WAIT on a listener): another
            _recent_ports.append(port)
            return port
    with socket.socket() as s:  # the band is full: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cpu_seconds(root: psutil.Process) -> float:
    """User + system CPU seconds of ``root`` and every descendant alive now."""
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue  # gone meanwhile
        total += times.user + times.system
    return total


def wait_idle(
    proc: subprocess.Popen[bytes] | None, window: float = 0.5, share: float = 0.05, timeout: float = 30.0
) -> float:
    """Wait until ``proc`` and its children use under ``share`` of one core over ``window``
    seconds (a receiver just started may still be importing or loading in a child process);
    returns the seconds waited. A benchmark measures each receiver at rest this way, so none
    is timed against its own start-up."""
    if proc is None:
        return 0.0
    root = psutil.Process(proc.pid)
    t0 = time.monotonic()
    before = _cpu_seconds(root)
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        now = _cpu_seconds(root)
        if now - before < share * window:
            break
        before = now
    return time.monotonic() - t0


def storescu(
    files_or_dir: Path | list[Path],
    port: int,
    aet: str,
    *,
    calling: str = "STORESCU",
    extra: list[str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu on loopback; returns the completed process (check returncode)."""
    targets = [str(p) for p in files_or_dir] if isinstance(files_or_dir, list) else [str(files_or_dir)]
    cmd = [
        STORESCU,
        "-aet",
        calling,
        "-aec",
        aet,
        *(extra or []),
        "+sd",
        "+r",
        "127.0.0.1",
        str(port),
        *targets,
    ]
    return subprocess.run(cmd, env=NODE_ENV, capture_output=True, text=True, timeout=timeout)


class DcmtkStoreSCP:
    """dcmtk storescp writing into its own folder."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        aet: str = "STORESCP",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """``extra_args``: more storescp options, e.g. ``("+xa",)`` to accept compressed
        transfer syntaxes (by default it accepts uncompressed ones only)."""
        self.dir = workdir / "storescp"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.aet = aet
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DcmtkStoreSCP:
        self.proc = subprocess.Popen(
            [STORESCP, *self.extra_args, "-aet", self.aet, "-od", str(self.dir), str(self.port)],
            env=NODE_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop(self.proc)


#: Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb).
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def dicomweb_config(root: str = "/dicom-web/") -> dict[str, Any]:
    """``extra_config`` for :class:`Orthanc` that loads the DICOMweb plugin at ``root``."""
    return {"Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": root}}


class Orthanc:
    """A real Orthanc on loopback, with its own storage, ports and known modalities."""

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        """``modalities``: name → (AE title, host, port) of the peers Orthanc knows; add
        more, with options, by :meth:`register_modality`. ``extra_config``: more Orthanc
        settings, e.g. DICOM TLS (``DicomTlsEnabled``, ``DicomTlsCertificate``, ...)."""
        self.dir = workdir / f"orthanc-{aet.lower()}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities: dict[str, list[Any] | dict[str, Any]] = {
            name: list(entry) for name, entry in (modalities or {}).items()
        }
        self.extra_config = dict(extra_config or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.dir / "db"),
            "IndexDirectory": str(self.dir / "db"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": dict(self.modalities),
            "Plugins": [],
            "StableAge": 2,
            **self.extra_config,
        }

    def start(self) -> Orthanc:
        cfg = self.dir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([ORTHANC, str(cfg)], env=NODE_ENV, stdout=log, stderr=log)
        wait_port(self.http_port, proc=self.proc)
        wait_port(self.dicom_port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop(self.proc)

    def kill(self) -> None:
        """Abrupt stop (SIGKILL): open associations break mid-transfer."""
        stop(self.proc, signal.SIGKILL)

    def register_modality(
        self,
        name: str,
        aet: str,
        port: int,
        host: str = "127.0.0.1",
        *,
        storage_commitment: bool = True,
        tls: bool = False,
    ) -> None:
        """Make a peer (e.g. the node) known to Orthanc as a DICOM modality.

        Orthanc accepts a storage commitment request (N-ACTION) only from a known
        modality, and sends the result (N-EVENT-REPORT) on a new association to the
        host and port registered for the requester's AE title. Takes effect at once when
        Orthanc runs (``PUT /modalities/<name>``) and on every later start. ``tls``: Orthanc
        connects to it over DICOM TLS (its ``DicomTls*`` settings must be given).
        """
        entry: dict[str, Any] = {
            "AET": aet,
            "Host": host,
            "Port": port,
            "AllowStorageCommitment": storage_commitment,
        }
        if tls:
            entry["UseDicomTls"] = True
        self.modalities[name] = entry
        if self.proc is not None and self.proc.poll() is None:
            self._request(f"/modalities/{name}", entry, method="PUT")

    def _request(self, path: str, body: Any = None, method: str | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"))
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def get(self, path: str) -> Any:
        return json.loads(self._request(path))

    def upload(self, data: bytes) -> str:
        """Store one DICOM Part 10 file through the REST API (``POST /instances``); returns
        Orthanc's id of the instance."""
        req = urllib.request.Request(
            self.url + "/instances", data=data, method="POST", headers={"Content-Type": "application/dicom"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return str(json.loads(resp.read())["ID"])

    def find(self, level: str, query: dict[str, str]) -> list[dict[str, Any]]:
        return list(
            json.loads(self._request("/tools/find", {"Level": level, "Query": query, "Expand": True}))
        )

    def instances_of_series(self, series_uid: str) -> list[dict[str, Any]]:
        return self.find("Instance", {"SeriesInstanceUID": series_uid})

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        return self.find("Series", {"StudyInstanceUID": study_uid})

    def instance_file(self, orthanc_id: str) -> bytes:
        return self._request(f"/instances/{orthanc_id}/file")

    def statistics(self) -> dict[str, Any]:
        return dict(self.get("/statistics"))


def policy_yaml(
    pipeline: str = "forward",
    destinations: tuple[str, ...] = ("pacs",),
    *,
    gate: str = "auto",
    match: dict[str, Any] | None = None,
    select: dict[str, Any] | None = None,
    qc: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    name: str = "local-rule",
    mode: str = "first-match",
) -> str:
    """A one-rule policy file (what the demo, the tests and the benchmarks route by)."""
    import yaml

    rule: dict[str, Any] = {"name": name, "pipeline": pipeline, "destinations": list(destinations)}
    rule["gate"] = gate
    for key, value in (("match", match), ("select", select), ("qc", qc), ("options", options)):
        if value:
            rule[key] = value
    return str(yaml.safe_dump({"version": 1, "mode": mode, "rules": [rule]}, sort_keys=False))


class RedisServer:
    """A Redis broker on loopback for the Celery engine: its own port and folder, nothing
    persisted, stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=log, stderr=log,
        )  # fmt: skip
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop(self.proc)


#: Gives each node home its own databases, as ``(index URL, audit URL)``; None (the default)
#: leaves the node on SQLite in its home. The test suite's PostgreSQL mode sets it.
DATABASES_FOR_HOME: Callable[[Path], tuple[str, str]] | None = None


def with_databases(config_text: str, home: Path) -> str:
    """``config_text`` with ``[storage]`` naming the databases DATABASES_FOR_HOME gives
    ``home`` (unchanged when the hook is unset or the config names a database itself)."""
    if DATABASES_FOR_HOME is None or "database_url" in config_text:
        return config_text
    index_url, audit_url = DATABASES_FOR_HOME(home)
    lines = f'database_url = "{index_url}"\naudit_database_url = "{audit_url}"\n'
    header = re.compile(r"^\[storage\][ \t]*\n", re.M)
    if header.search(config_text):
        return header.sub(lambda m: m.group(0) + lines, config_text, count=1)
    return f"{config_text}\n[storage]\n{lines}"


class NodeProcess:
    """``dicom-node serve`` as a real process on its own home, port and config."""

    def __init__(
        self,
        home: Path,
        config_text: str = "",
        port: int | None = None,
        ae_title: str = "DICOM_NODE",
        web_port: int | None = 0,
        policy: str | None = None,
    ) -> None:
        """``web_port``: 0 (default) turns the web pages off; None keeps the config's.

        ``policy`` is written to ``<home>/policy.yaml`` (default: forward everything to
        ``pacs``); it is used when the config says ``[policy] file = "policy.yaml"``.
        """
        self.web_port = web_port
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.config_path = home / "dicom-node.toml"
        self.config_path.write_text(with_databases(config_text, home))
        self.policy_path = home / "policy.yaml"
        self.policy_path.write_text(policy if policy is not None else policy_yaml())
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout = home / "serve.out"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dicom_node", *args]

    def start(self, timeout: float = 60.0) -> NodeProcess:
        ready = self.home / "ready"
        ready.unlink(missing_ok=True)
        with self.stdout.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(
                    "serve",
                    "--home",
                    str(self.home),
                    "--config",
                    str(self.config_path),
                    "--port",
                    str(self.port),
                    "--ae-title",
                    self.ae_title,
                    "--ready-file",
                    str(ready),
                    *(["--web-port", str(self.web_port)] if self.web_port is not None else []),
                ),
                stdout=out,
                stderr=out,
                env=NODE_ENV,
            )
        deadline = time.time() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"dicom-node serve exited with {self.proc.returncode}:\n{self.stdout.read_text()[-3000:]}"
                )
            if time.time() > deadline:
                raise TimeoutError("dicom-node serve did not become ready")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        stop(self.proc)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args, "--home", str(self.home), "--config", str(self.config_path)),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"dicom-node {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def wait_for(
        self, predicate: Any, timeout: float = 120.0, every: float = 0.5, what: str = "condition"
    ) -> Any:
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(every)
        raise TimeoutError(f"timed out waiting for {what}; last value: {last!r}")

    def log_text(self) -> str:
        log = self.home / "var" / "log" / "dicom-node.log"
        return (log.read_text() if log.exists() else "") + self.stdout.read_text()


class MiniPACS:
    """A bare pynetdicom storage SCP, used by the demo when Orthanc is not installed."""

    def __init__(self, workdir: Path, aet: str = "MINIPACS") -> None:
        self.dir = workdir / "minipacs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self._server: Any = None

    def start(self) -> MiniPACS:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        def on_store(event: Any) -> int:
            target = self.dir / f"{event.request.AffectedSOPInstanceUID}.dcm"
            target.write_bytes(event.encoded_dataset(include_meta=True))
            return 0x0000

        ae = AE(ae_title=self.aet)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server(
            ("127.0.0.1", self.dicom_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def count(self) -> int:
        return len(list(self.dir.glob("*.dcm")))
