"""Shared fixtures: real peers on loopback, simulated studies, node configs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from audit import AuditTrail
from dicom_node.db.engine import Database
from dicom_node.lab import localpeers
from dicom_node.paths import AUDIT_DATABASE_URL_ENV, DATABASE_URL_ENV, NodePaths
from pipelines.base import InputInstance, StudyInput
from tests import pg
from tests.peers import ORTHANC, STORESCP, STORESCU, NodeProcess, Orthanc, have
from tests.state import state_rows, state_urls  # noqa: F401  (re-exported for the tests)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database",
        choices=("sqlite", "postgresql"),
        default=os.environ.get("DICOM_NODE_TEST_DATABASE", "sqlite"),
        help="where every node under test keeps its index and audit log: SQLite in its home "
        "(default) or a fresh database on a throwaway PostgreSQL server (make test-postgres)",
    )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[pg.PostgresServer]:
    """A PostgreSQL server for this test session (Debian's ``postgresql`` package)."""
    bin_dir = pg.find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install postgresql (see deploy/install-deps.sh)")
        pytest.skip("not installed: postgresql")
    server = pg.PostgresServer(bin_dir).start()
    try:
        yield server
    finally:
        server.stop()


class _Databases:
    """PostgreSQL mode's map of node homes to their (index, audit) databases.

    Each home gets a fresh pair the first time it is asked for, except that the first home a
    test touches gets the pair the test's environment already names (so commands the test
    runs with that environment find the same state). Pairs made during a test are dropped
    after it; those of homes that outlive a test (module-scoped nodes) with the server."""

    def __init__(self, server: pg.PostgresServer) -> None:
        self.server = server
        self.homes: dict[Path, tuple[str, str]] = {}
        self.spare: tuple[str, str] | None = None
        self.made: list[str] = []  # database names
        # Templates with the schema in place: a copy is much faster than running every
        # migration for every test (tests/test_postgres.py runs them on empty databases).
        self.templates = (server.create_database("tmplnode"), server.create_database("tmplaudit"))
        index = Database(server.url(self.templates[0]))
        index.upgrade()
        index.dispose()
        AuditTrail(server.url(self.templates[1])).dispose()

    def fresh(self) -> tuple[str, str]:
        names = [
            self.server.create_database("node", template=self.templates[0]),
            self.server.create_database("audit", template=self.templates[1]),
        ]
        self.made.extend(names)
        return self.server.url(names[0]), self.server.url(names[1])

    def __call__(self, home: Path) -> tuple[str, str]:
        home = home.resolve()
        if home not in self.homes:
            if self.spare is not None:
                self.homes[home], self.spare = self.spare, None
            else:
                self.homes[home] = self.fresh()
        return self.homes[home]


#: NodePaths' own URL methods (the session patches them in PostgreSQL mode; an
#: ``own_database`` test gets them back).
_SQLITE_DATABASE_URL = NodePaths.database_url
_SQLITE_AUDIT_DATABASE_URL = NodePaths.audit_database_url


@pytest.fixture(scope="session", autouse=True)
def _postgres_mode(request: pytest.FixtureRequest) -> Iterator[_Databases | None]:
    """``--database=postgresql``: every node home, from the first fixture on, on PostgreSQL."""
    if request.config.getoption("--database") != "postgresql":
        yield None
        return
    mapping = _Databases(request.getfixturevalue("postgres_server"))
    localpeers.DATABASES_FOR_HOME = mapping
    # For the whole session, not per test: a home a module- or session-scoped fixture makes
    # (before any test's own patch is in place) must be on PostgreSQL too, or the fixture's
    # node and the test's own commands would read different databases.
    with pytest.MonkeyPatch.context() as session_patch:
        session_patch.setattr(NodePaths, "database_url", lambda paths, _config: mapping(paths.home)[0])
        session_patch.setattr(NodePaths, "audit_database_url", lambda paths, _config: mapping(paths.home)[1])
        try:
            yield mapping
        finally:
            localpeers.DATABASES_FOR_HOME = None


@pytest.fixture(autouse=True)
def _database_under_test(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, _postgres_mode: _Databases | None
) -> Iterator[None]:
    """In PostgreSQL mode: this test's environment names a fresh pair, and every home the
    test makes (in this process or as a node process) has its own."""
    mapping = _postgres_mode
    if mapping is None:
        yield
        return
    if request.node.get_closest_marker("own_database"):
        monkeypatch.setattr(localpeers, "DATABASES_FOR_HOME", None)
        monkeypatch.setattr(NodePaths, "database_url", _SQLITE_DATABASE_URL)
        monkeypatch.setattr(NodePaths, "audit_database_url", _SQLITE_AUDIT_DATABASE_URL)
        yield
        return
    made_before, homes_before = len(mapping.made), set(mapping.homes)
    mapping.spare = mapping.fresh()
    monkeypatch.setenv(DATABASE_URL_ENV, mapping.spare[0])
    monkeypatch.setenv(AUDIT_DATABASE_URL_ENV, mapping.spare[1])
    try:
        yield
    finally:
        mapping.spare = None
        mapping.homes = {h: urls for h, urls in mapping.homes.items() if h in homes_before}
        made, mapping.made = mapping.made[made_before:], mapping.made[:made_before]
        for name in made:
            mapping.server.drop_database(name)


def require(*paths: str) -> None:
    """Skip when a peer is missing — except in CI, where a missing peer is a failure."""
    missing = [p for p in paths if not have(p)]
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must install {', '.join(missing)} (see Makefile: deps)")
    pytest.skip(f"not installed: {', '.join(missing)}")


def instances(files: Sequence[Path]) -> tuple[InputInstance, ...]:
    """The pipeline inputs of DICOM files (headers only; no checksum)."""
    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append(
            InputInstance(
                sop_uid=str(ds.SOPInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=f,
                sha256="",
            )
        )
    return tuple(out)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    require(ORTHANC)
    peer = Orthanc(tmp_path).start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[localpeers.RedisServer]:
    """A Redis broker on loopback (the Celery engine's), stopped after the test."""
    require(localpeers.REDIS_SERVER)
    server = localpeers.RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ct50(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated 50-slice 512x512 CT study (one series)."""
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    out = tmp_path_factory.mktemp("ct50")
    write_ct_series(out, PhantomSpec(slices=50, seed=1), patient_id="SIM-CT50")
    return out


@pytest.fixture(scope="session")
def ct200(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated 200-slice 512x512 CT study (one series)."""
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    out = tmp_path_factory.mktemp("ct200")
    write_ct_series(out, PhantomSpec(slices=200, seed=2), patient_id="SIM-CT200")
    return out


def node_config(
    orthanc: Orthanc | None = None,
    *,
    stable_seconds: float = 2.0,
    backoff: float = 1.0,
    backoff_max: float = 4.0,
    max_attempts: int = 20,
    extra: str = "",
    policy: bool | None = None,
) -> str:
    """A node config that routes by ``<home>/policy.yaml`` (NodeProcess writes it; by
    default it forwards every study to ``pacs``), with ``pacs`` = ``orthanc`` when given.
    ``policy`` defaults to on exactly when ``orthanc`` is given."""
    text = f"""
[completeness]
stable_seconds = {stable_seconds}

[outbox]
backoff_initial_seconds = {backoff}
backoff_max_seconds = {backoff_max}
max_attempts = {max_attempts}

[workers]
poll_seconds = 0.2
lease_seconds = 30
"""
    if orthanc is not None:
        text += f"""
[destinations.pacs]
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
profile = "pacs"
timeout_seconds = 10
"""
    if policy if policy is not None else orthanc is not None:
        text += '\n[policy]\nfile = "policy.yaml"\nreload_seconds = 0.5\n'
    return text + extra


def db_rows(node: NodeProcess, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the node's index directly; SQL written for SQLite."""
    return state_rows(node.home, sql, params)


def audit_rows(node: NodeProcess, event: str) -> list[tuple[Any, ...]]:
    return state_rows(
        node.home,
        "select seq, outcome, study_uid, calling_ae, peer_host, facts from audit_events"
        " where event = ? order by seq",
        (event,),
        audit=True,
    )


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    require(CHROMIUM, CHROMEDRIVER)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def add_user(node: NodeProcess, name: str, role: str, password: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "user",
            "add",
            name,
            "--role",
            role,
            "--password-stdin",
            "--home",
            str(node.home),
            "--config",
            str(node.config_path),
        ],
        input=password + "\n",
        text=True,
        check=True,
        capture_output=True,
    )


__all__ = ["STORESCP", "STORESCU", "add_user", "audit_rows", "browser", "db_rows", "node_config", "require"]


def wait_for_url(browser: WebDriver, suffix: str, timeout: float = 15.0) -> None:
    """Wait until a click's navigation has landed (a form post is not synchronous)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(browser, timeout).until(lambda b: b.current_url.endswith(suffix))
    except TimeoutException:
        pass  # the caller's assertion reports where the browser is


def tps_config(orthanc: Orthanc, *, commitment: bool = True, timeout: float = 60, extra: str = "") -> str:
    return (
        node_config(stable_seconds=1, backoff=1, backoff_max=2, policy=True)
        + f"""
[destinations.tps]
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
profile = "tps"
timeout_seconds = 10
storage_commitment = {"true" if commitment else "false"}
commitment_timeout_seconds = {timeout}
"""
        + extra
    )


def write_circle_ct(
    out: Path, *, slices: int, size: int, seed: int, outside_hu: float
) -> tuple[list[Path], Any]:
    """A SIMULATED low-dose CT (``out/low-dose``) whose scanner writes ``outside_hu``
    outside its reconstruction circle (no Pixel Padding Value): the files, and the
    ``(rows, columns)`` mask that is True outside the circle."""
    import numpy as np

    from dicom_node.lab.simulate import LdctSpec, write_ldct_study

    spec = LdctSpec(slices=slices, size=size, dose=0.25, seed=seed)
    low, _reference = write_ldct_study(out, spec, workers=2)
    yy, xx = np.ogrid[:size, :size]
    centre = (size - 1) / 2.0
    outside = (yy - centre) ** 2 + (xx - centre) ** 2 > (size / 2.0 - 1.0) ** 2
    for f in low.files:
        ds = pydicom.dcmread(f)
        stored = ds.pixel_array.copy()
        stored[outside] = outside_hu - float(ds.RescaleIntercept)
        ds.PixelData = stored.tobytes()
        ds.save_as(f, enforce_file_format=True)
    return list(low.files), outside


def study_of(files: Sequence[Path], gate_policy: Any = None, options: dict[str, Any] | None = None) -> Any:
    """A job's study snapshot (``pipelines.base.StudyInput``) of DICOM files of one study."""

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return StudyInput(
        job_id=1,
        study_uid=str(first.StudyInstanceUID),
        study_version=1,
        instances=instances(files),
        options=options or {},
        gate_policy=gate_policy,
    )


@pytest.fixture
def store_node(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A node's runtime and instance store under AE ``DICOMNODE`` (its own outputs and
    returned priors recognised), without a receiver: what the prior and archive tests store
    through."""
    from dicom_node.ingest.indexer import Indexer
    from dicom_node.ingest.origin import OriginRules, job_output_lookup
    from dicom_node.ingest.store import InstanceStore
    from dicom_node.runtime import Runtime

    rt = Runtime.open(None, tmp_path)
    origin = OriginRules("DICOMNODE", "1.2.826.0.1.3680043.10.999.", job_output_lookup(rt.db))
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01), origin=origin)
    try:
        yield rt, store
    finally:
        store.close()
        rt.close()
