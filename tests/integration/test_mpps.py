"""MPPS and expected counts make a study ready without the idle timer (``dicom-node serve``).

A scanner stand-in — a pynetdicom MPPS SCU plus dcmtk storescu for the images — talks to a
real node on loopback; the node forwards ready studies to a dcmtk storescp. The idle timer
is long (60 s) where a signal is under test, so the timer cannot be what made a study ready.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.lab.simulate import SimulatedStudy, write_ct_series
from models.sim.phantom import PhantomSpec
from tests.conftest import audit_rows, db_rows, node_config, require
from tests.mpps_scu import PATIENT_NAME, MppsScanner, create_attributes, performed_series, set_attributes
from tests.peers import STORESCP, STORESCU, DcmtkStoreSCP, NodeProcess, storescu

pytestmark = pytest.mark.integration

SCANNER = "CT1"


def _config(pacs: DcmtkStoreSCP, stable_seconds: float, extra: str = "") -> str:
    return node_config(stable_seconds=stable_seconds, policy=True) + (
        f"""
[destinations.pacs]
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.port}
timeout_seconds = 10
"""
        + extra
    )


def _study(tmp_path: Path, seed: int) -> SimulatedStudy:
    return write_ct_series(tmp_path / f"ct{seed}", PhantomSpec(rows=64, columns=64, slices=6, seed=seed))


def _jobs(node: NodeProcess) -> list[tuple[int, float]]:
    return [(int(r[0]), float(r[1])) for r in db_rows(node, "select id, created_at from jobs order by id")]


def _first_job_within(node: NodeProcess, seconds: float) -> tuple[int, float] | None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        jobs = _jobs(node)
        if jobs:
            return jobs[0]
        time.sleep(0.02)
    return None


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[DcmtkStoreSCP]:
    require(STORESCU, STORESCP)
    scp = DcmtkStoreSCP(tmp_path).start()
    try:
        yield scp
    finally:
        scp.stop()


def test_mpps_completed_makes_the_study_ready_at_once(tmp_path: Path, pacs: DcmtkStoreSCP) -> None:
    study = _study(tmp_path, 11)
    node = NodeProcess(tmp_path / "node", _config(pacs, stable_seconds=60)).start()
    try:
        scanner = MppsScanner(node.port, node.ae_title, calling_ae=SCANNER)
        mpps_uid = generate_uid()
        assert scanner.create(mpps_uid, create_attributes(study.study_uid, station=SCANNER)).Status == 0
        sent = storescu(list(study.files), node.port, node.ae_title, calling=SCANNER)
        assert sent.returncode == 0, sent.stderr
        last_instance = time.time()
        done = scanner.set(mpps_uid, set_attributes("COMPLETED", performed_series(study.files)))
        assert done.Status == 0

        job = _first_job_within(node, 1.0)

        assert job is not None, "no job within 1 s of the last listed instance (stable_seconds = 60)"
        assert job[1] - last_instance < 1.0
        node.wait_for(lambda: audit_rows(node, "study-complete"), timeout=5, every=0.1, what="study-complete")
        (complete,) = audit_rows(node, "study-complete")
        facts = json.loads(complete[5])
        assert (complete[2], facts["signal"], facts["mpps"], facts["jobs"]) == (
            study.study_uid,
            "mpps",
            [mpps_uid],
            [job[0]],
        )
        assert [r[2] for r in audit_rows(node, "mpps-in-progress")] == [study.study_uid]
        (completed,) = audit_rows(node, "mpps-completed")
        assert json.loads(completed[5])["instances"] == 6 and completed[3] == SCANNER
        (row,) = node.cli_json("studies")
        assert row["state"] != "receiving" and row["waiting"] is None
        node.wait_for(lambda: len(list(pacs.dir.rglob("*"))) >= 6, timeout=60, what="the study forwarded")
        assert PATIENT_NAME not in node.log_text()
    finally:
        node.stop()


def test_an_instance_never_sent_keeps_the_study_waiting_for_the_timer(
    tmp_path: Path, pacs: DcmtkStoreSCP
) -> None:
    study = _study(tmp_path, 12)
    # long enough for two CLI calls (each a Python start-up, several seconds on a loaded
    # 2-core CI machine beside the other tests) before it fires
    stable = 15.0
    node = NodeProcess(tmp_path / "node", _config(pacs, stable_seconds=stable)).start()
    try:
        scanner = MppsScanner(node.port, node.ae_title, calling_ae=SCANNER)
        mpps_uid = generate_uid()
        scanner.create(mpps_uid, create_attributes(study.study_uid, station=SCANNER))
        sent = storescu(list(study.files), node.port, node.ae_title, calling=SCANNER)
        assert sent.returncode == 0, sent.stderr
        last_instance = time.time()
        never_sent = generate_uid()
        done = scanner.set(mpps_uid, set_attributes("COMPLETED", performed_series(study.files, [never_sent])))
        assert done.Status == 0

        assert _first_job_within(node, 1.5) is None, "ready although the MPPS lists an instance not received"
        (row,) = node.cli_json("studies")
        assert (row["state"], row["waiting"]) == ("receiving", "MPPS lists 1 instance not received")
        table = node.cli("studies").stdout
        looked = time.time() - last_instance
        assert looked < stable, f"the CLI calls took {looked:.1f} s, past the {stable} s timer"
        assert "MPPS lists 1" in table and "receiving" in table, table

        # The idle timer stays the fallback.
        job = _first_job_within(node, stable + 3.0)
        assert job is not None, "the idle timer did not make the study ready"
        assert job[1] >= last_instance + stable - 0.5
        # the audit record follows the job's commit (commit, then audit): wait for it
        node.wait_for(lambda: audit_rows(node, "study-ready"), timeout=5, every=0.1, what="study-ready")
        assert audit_rows(node, "study-complete") == []
        assert json.loads(audit_rows(node, "study-ready")[0][5])["instances"] == 6
    finally:
        node.stop()


def test_expected_counts_of_a_caller_make_the_study_ready(tmp_path: Path, pacs: DcmtkStoreSCP) -> None:
    study = _study(tmp_path, 13)
    caller = f'\n[[callers]]\nae_title = "{SCANNER}"\nexpected_instances = 6\nexpected_series = 1\n'
    node = NodeProcess(tmp_path / "node", _config(pacs, stable_seconds=60, extra=caller)).start()
    try:
        first = storescu(list(study.files[:5]), node.port, node.ae_title, calling=SCANNER)
        assert first.returncode == 0, first.stderr
        assert _first_job_within(node, 1.0) is None
        assert node.cli_json("studies")[0]["waiting"] == "5 of 6 expected instances"

        last = storescu([study.files[5]], node.port, node.ae_title, calling=SCANNER)
        assert last.returncode == 0, last.stderr
        last_instance = time.time()

        job = _first_job_within(node, 1.0)
        assert job is not None, "no job within 1 s of the expected last instance (stable_seconds = 60)"
        assert job[1] - last_instance < 1.0
        node.wait_for(lambda: audit_rows(node, "study-complete"), timeout=5, every=0.1, what="study-complete")
        facts = json.loads(audit_rows(node, "study-complete")[0][5])
        assert facts["signal"] == "expected-counts" and facts["jobs"] == [job[0]]
    finally:
        node.stop()
