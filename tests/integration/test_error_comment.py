"""A refused C-STORE says why on the wire: dcmtk's storescu shows the Error Comment
(0000,0902) — the reason that went to quarantine, at most 64 characters, no patient data."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.conftest import audit_rows, node_config, require
from tests.peers import STORESCU, NodeProcess, storescu

pytestmark = pytest.mark.integration

NAME_PARTS = ("ZELDAPHI", "QUIXOTEPHI")


def bad_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """Two slices of a simulated CT: one with half its pixel data, one without a Study
    Instance UID. Both are well-formed files, so storescu sends them as they are."""
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    study = write_ct_series(
        tmp_path / "ct",
        PhantomSpec(rows=64, columns=64, slices=2, seed=13),
        patient_name="^".join(NAME_PARTS),
        patient_id="EC-TEST-1",
    )
    first, second = sorted(study.files)
    bad = tmp_path / "bad"
    bad.mkdir()
    truncated = pydicom.dcmread(first)
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2]
    truncated.save_as(bad / "truncated.dcm")
    no_study = pydicom.dcmread(second)
    del no_study.StudyInstanceUID
    no_study.save_as(bad / "no-study-uid.dcm")
    return bad / "truncated.dcm", bad / "no-study-uid.dcm"


def test_storescu_shows_the_error_comment(tmp_path: Path) -> None:
    require(STORESCU)
    truncated, no_study = bad_inputs(tmp_path)
    node = NodeProcess(tmp_path / "node", node_config()).start()
    try:
        shown = {}
        for path in (truncated, no_study):
            # -d: storescu prints the C-STORE-RSP command set, Error Comment included.
            run = storescu([path], node.port, node.ae_title, extra=["-d"])
            shown[path.name] = run.stdout + run.stderr
        node.wait_for(lambda: len(audit_rows(node, "instance-quarantined")) == 2, timeout=10, what="2 audits")
    finally:
        node.stop()

    expected = {
        "truncated.dcm": ("0xc000", "pixel data truncated: 4096 of 8192 bytes"),
        "no-study-uid.dcm": ("0xa900", "required attribute missing: StudyInstanceUID"),
    }
    for name, (status, comment) in expected.items():
        out = shown[name]
        assert status in out.lower(), f"{name}: storescu saw no {status} status:\n{out}"
        assert f"(0000,0902) LO [{comment}]" in out, f"{name}: no Error Comment in storescu's output:\n{out}"
        assert not any(part in out for part in NAME_PARTS)
    assert "(0000,0901) AT (0020,000d)" in shown["no-study-uid.dcm"], "Offending Element: Study Instance UID"
    # The same reasons went to quarantine, with the same facts.
    reasons = sorted(p.read_text() for p in (node.home / "var" / "quarantine").glob("*.reason.txt"))
    assert "pixel data truncated: 4096 bytes, image attributes need 8192" in "".join(reasons)
    assert "required attribute missing: StudyInstanceUID" in "".join(reasons)
