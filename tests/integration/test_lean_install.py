"""`pip install dicom-node` with no extras is a working node: receive, route, deliver,
audit, web — without torch, MONAI, matplotlib, the lab or the test tools.

The project is installed (not editable) from a copy of its sources into a fresh venv,
pinned by deploy/constraints.txt, and every command runs from that venv's console script,
so neither the checkout nor the test venv can lend it a module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import node_config, require
from tests.peers import STORESCP, STORESCU, DcmtkStoreSCP, NodeProcess, free_port, storescu

# the embedded defaults (SQLite in the home), whatever --database says
pytestmark = [pytest.mark.integration, pytest.mark.own_database]

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("dicom_node", "pipelines", "models", "audit", "policies")
# what the extras bring; none of it may be needed to run the node
NOT_IN_A_LEAN_INSTALL = ("torch", "monai", "matplotlib", "nilearn", "selenium")
# the checkout and the test venv must not leak into the lean venv's imports
LEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def lean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install -c deploy/constraints.txt <copy of the project>`."""
    root = tmp_path_factory.mktemp("lean")
    src = root / "src"  # a copy: pip builds in the source tree, and the checkout is shared
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
            str(REPO / "deploy" / "constraints.txt"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**LEAN_ENV, "PIP_NO_INPUT": "1"},
        cwd=root,
    )
    assert pip.returncode == 0, f"pip install failed:\n{pip.stdout[-3000:]}\n{pip.stderr[-3000:]}"
    return venv


def lean(venv: Path, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "dicom-node"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=LEAN_ENV,
        cwd=cwd,
    )


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def ct_file(folder: Path) -> Path:
    """pydicom's small CT test file, in a folder of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "CT_small.dcm"
    shutil.copy2(get_testdata_file("CT_small.dcm"), target)
    return target


class LeanNode(NodeProcess):
    """``dicom-node serve`` (and ``node.cli``) run by the lean venv's console script."""

    def __init__(self, venv: Path, home: Path, config_text: str, web_port: int) -> None:
        self.venv = venv
        super().__init__(home, config_text, web_port=web_port)

    def command(self, *args: str) -> list[str]:
        return [str(self.venv / "bin" / "dicom-node"), *args]


def test_extras_are_not_installed_and_the_node_imports_from_the_venv(lean_venv: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.util, json, dicom_node; print(json.dumps({"
        "'dicom_node': dicom_node.__file__, "
        f"'present': [m for m in {NOT_IN_A_LEAN_INSTALL!r} if importlib.util.find_spec(m)]}}))"
    )
    out = subprocess.run(
        [str(lean_venv / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env=LEAN_ENV,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["present"] == [], f"a lean install pulled in {found['present']}"
    assert Path(found["dicom_node"]).is_relative_to(site_packages(lean_venv))


def test_package_data_is_installed(lean_venv: Path) -> None:
    """Every data file in the packages (templates, static, migrations, policies, the model
    zoo) is in the installed copy; only the folders' README notes stay behind."""
    installed, src = site_packages(lean_venv), lean_venv.parent / "src"
    missing = [
        str(path.relative_to(src))
        for package in PACKAGES
        for path in sorted((src / package).rglob("*"))
        if path.is_file() and path.suffix != ".md" and not (installed / path.relative_to(src)).is_file()
    ]
    assert missing == [], "not installed by `pip install .` (add to [tool.setuptools.package-data])"


def test_commands_of_a_missing_extra_say_which_extra_in_one_line(lean_venv: Path, tmp_path: Path) -> None:
    ct = ct_file(tmp_path / "in")
    home = ["--home", str(tmp_path / "cli-home")]
    cases = {
        ("run", "restoration", str(ct), "--out", str(tmp_path / "out"), *home): "dicom-node[ai]",
        (
            "simulate",
            "ldct",
            "--out",
            str(tmp_path / "sim"),
            "--slices",
            "1",
            "--size",
            "64",
        ): "dicom-node[ai]",
    }
    for args, extra in cases.items():
        result = lean(lean_venv, *args, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert f"pip install '{extra}'" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            result.stderr
        )


def test_help_echo_and_send(lean_venv: Path, tmp_path: Path) -> None:
    require(STORESCP)
    helped = lean(lean_venv, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stderr

    scp = DcmtkStoreSCP(tmp_path).start()
    try:
        home = ["--home", str(tmp_path / "cli-home")]
        echo = lean(lean_venv, "echo", "127.0.0.1", str(scp.port), "--aet", scp.aet, *home, cwd=tmp_path)
        assert echo.returncode == 0 and "answered C-ECHO: success" in echo.stdout, echo.stderr

        sent_file = ct_file(tmp_path / "in")
        sent = lean(
            lean_venv,
            "send",
            str(sent_file),
            "--to",
            f"{scp.aet}@127.0.0.1:{scp.port}",
            "--json",
            *home,
            cwd=tmp_path,
        )
        assert sent.returncode == 0, sent.stderr
        report = json.loads(sent.stdout)
        assert [(s["instances"], s["sent"], s["failed"]) for s in report["series"]] == [(1, 1, 0)]
    finally:
        scp.stop()
    sop_uid = pydicom.dcmread(sent_file, stop_before_pixels=True).SOPInstanceUID
    received = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in scp.dir.iterdir()]
    assert received == [sop_uid]


def test_serve_receives_routes_delivers_and_stops_on_sigterm(lean_venv: Path, tmp_path: Path) -> None:
    require(STORESCP, STORESCU)
    pacs = DcmtkStoreSCP(tmp_path, aet="LEANPACS").start()
    destination = (
        f'\n[destinations.pacs]\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
        f'port = {pacs.port}\nprofile = "pacs"\ntimeout_seconds = 10\n'
    )
    web_port = free_port()
    node = LeanNode(
        lean_venv,
        tmp_path / "node",
        node_config(stable_seconds=1, policy=True, extra=destination),  # forward all to pacs
        web_port=web_port,
    )
    sent_file = ct_file(tmp_path / "in")
    sop_uid = pydicom.dcmread(sent_file, stop_before_pixels=True).SOPInstanceUID
    try:
        node.start()
        stored = storescu([sent_file], node.port, node.ae_title)
        assert stored.returncode == 0, stored.stdout + stored.stderr
        stored_files = node.wait_for(
            lambda: [p for p in (node.home / "var").rglob(f"{sop_uid}.dcm") if "studies" in p.parts],
            timeout=30,
            what="the received instance in the store",
        )
        assert pydicom.dcmread(stored_files[0]).PixelData == pydicom.dcmread(sent_file).PixelData
        # routed by the policy (forward) and delivered by the outbox to the dcmtk "PACS"
        try:
            node.wait_for(lambda: any(pacs.dir.iterdir()), timeout=60, what="the delivery to the dcmtk PACS")
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{node.log_text()[-3000:]}")

        # the web pages: templates and static files come from the installed package
        for path, expect in (("/login", "<form"), ("/static/style.css", "{")):
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}{path}", timeout=10) as page:
                assert page.status == 200 and expect in page.read().decode()

        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(30) == 0, node.log_text()[-3000:]
    finally:
        node.stop()
        pacs.stop()
    delivered = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in pacs.dir.iterdir()]
    assert delivered == [sop_uid]

    verify = node.cli("audit", "verify", check=False)
    assert verify.returncode == 0 and "audit log intact" in verify.stdout, verify.stdout + verify.stderr
