"""Safe among real peers: own outputs that come back, re-sends in other encodings, and
studies that must not bounce back to their sender.

Inputs are the project's simulated CT slices (SIMULATED in their descriptions), re-encoded
with pydicom's own encoders the way a PACS re-sends them.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import insert, select

from audit import AuditEvent
from dicom_node.db import schema as t
from dicom_node.ingest.content import same_content
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.instance import check_instance
from dicom_node.ingest.origin import AI_OUTPUT, OWN_OUTPUT, OriginRules, job_output_lookup
from dicom_node.ingest.store import InstanceStore, StoreOutcome
from dicom_node.jobs.intake import JobIntake
from dicom_node.jobs.routing import PolicyRouter
from dicom_node.lab.localpeers import policy_yaml
from dicom_node.lab.simulate import SimulatedStudy, write_ct_series
from dicom_node.runtime import Runtime
from models.sim.phantom import PhantomSpec
from policies.loader import load_policy

NODE_AE = "DICOMNODE"
SCANNER = "CT_SCANNER"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SimulatedStudy:
    return write_ct_series(tmp_path_factory.mktemp("ct"), PhantomSpec(rows=64, columns=64, slices=3, seed=13))


def _encode(ds: Dataset, syntax: str) -> bytes:
    """The data set as a peer would send it in ``syntax`` (no file meta)."""
    ds = copy.deepcopy(ds)
    ts = UID(syntax)
    if ts.is_compressed:
        ds.compress(ts, encoding_plugin="pylibjpeg" if ts == RLELossless else "", generate_instance_uid=False)
    fp = io.BytesIO()
    from pydicom.filebase import DicomFileLike

    out = DicomFileLike(fp)
    out.is_little_endian = ts.is_little_endian
    out.is_implicit_VR = ts.is_implicit_VR
    if not ts.is_little_endian:
        # pydicom writes raw pixel bytes as they are: swap them for big endian
        ds.PixelData = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder(">")).tobytes()
    del ds.file_meta
    write_dataset(out, ds)
    return fp.getvalue()


def _dataset(path: Path) -> Dataset:
    return pydicom.dcmread(path)


@dataclass
class Node:
    rt: Runtime
    store: InstanceStore

    def put(self, data: bytes, syntax: str, calling_ae: str = SCANNER) -> Any:
        sop = check_instance(data, syntax)[0]
        assert sop is not None
        return self.store.put(
            data, syntax, claimed_sop_uid=sop.sop_instance_uid, calling_ae=calling_ae, peer_host="127.0.0.1"
        )

    def intake(self, policy: str | None, *, destination_ae: str = "PACS") -> JobIntake:
        loaded = None
        if policy is not None:
            path = self.rt.paths.home / "policy.yaml"
            path.write_text(policy)
            loaded = load_policy(path, {"pacs"})
        router = PolicyRouter(loaded, self.rt.paths.data, {"pacs": destination_ae})
        return JobIntake(self.rt.db, self.rt.audit, router)

    def rows(self) -> list[dict[str, Any]]:
        with self.rt.db.read() as conn:
            return [dict(r) for r in conn.execute(select(t.instances).order_by(t.instances.c.id)).mappings()]

    def jobs(self) -> list[dict[str, Any]]:
        with self.rt.db.read() as conn:
            return [dict(r) for r in conn.execute(select(t.jobs)).mappings()]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    rt = Runtime.open(None, tmp_path)
    origin = OriginRules(NODE_AE, "1.2.826.0.1.3680043.10.999.", job_output_lookup(rt.db))
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01), origin=origin)
    try:
        yield Node(rt, store)
    finally:
        store.close()
        rt.close()


# -- content-equal re-sends are duplicates ---------------------------------------------------


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless]
)
def test_a_resend_in_another_lossless_syntax_is_a_duplicate(
    node: Node, study: SimulatedStudy, syntax: str
) -> None:
    ds = _dataset(study.files[0])
    first = node.put(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    again = node.put(_encode(ds, syntax), syntax)
    assert first.outcome == StoreOutcome.STORED
    assert again.outcome == StoreOutcome.DUPLICATE, syntax
    assert again.version == 1 and "same content" in (again.duplicate_of or "")
    assert len(node.rows()) == 1


def test_a_changed_pixel_or_attribute_is_a_new_version(node: Node, study: SimulatedStudy) -> None:
    ds = _dataset(study.files[0])
    node.put(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    changed = copy.deepcopy(ds)
    pixels = changed.pixel_array.copy()
    pixels[10, 10] += 1
    changed.PixelData = pixels.tobytes()
    result = node.put(_encode(changed, JPEG2000Lossless), JPEG2000Lossless)
    assert result.outcome == StoreOutcome.NEW_VERSION and result.version == 2
    relabelled = copy.deepcopy(ds)
    relabelled.SeriesDescription = "edited at the PACS"
    result = node.put(_encode(relabelled, ImplicitVRLittleEndian), ImplicitVRLittleEndian)
    assert result.outcome == StoreOutcome.NEW_VERSION and result.version == 3


def test_same_content_says_no_when_it_cannot_decode(study: SimulatedStudy) -> None:
    ds = _dataset(study.files[0])
    good = _encode(ds, ExplicitVRLittleEndian)
    assert same_content(good, ExplicitVRLittleEndian, good, ExplicitVRLittleEndian)
    assert not same_content(good, ExplicitVRLittleEndian, good[:-200] + b"\0" * 200, JPEG2000Lossless)


def test_three_lossless_resends_open_no_study_version_and_no_job(node: Node, study: SimulatedStudy) -> None:
    datasets = [_dataset(p) for p in study.files]
    for ds in datasets:
        node.put(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    intake = node.intake(policy_yaml("forward"))
    assert len(intake.study_ready(study.study_uid)) == 1
    for syntax in (JPEG2000Lossless, RLELossless, JPEGLSLossless):
        for ds in datasets:
            assert node.put(_encode(ds, syntax), syntax).outcome == StoreOutcome.DUPLICATE
        assert intake.study_ready(study.study_uid) == []
    assert len(node.jobs()) == 1
    changed = copy.deepcopy(datasets[1])
    pixels = changed.pixel_array.copy()
    pixels[0, 0] += 7
    changed.PixelData = pixels.tobytes()
    assert node.put(_encode(changed, ExplicitVRLittleEndian), ExplicitVRLittleEndian).version == 2
    assert len(intake.study_ready(study.study_uid)) == 1
    assert len(node.jobs()) == 2


# -- the loop guard -------------------------------------------------------------------------------


def _as_output(ds: Dataset, station: str | None, *, purpose: Any = None) -> Dataset:
    """A derived series with a Contributing Equipment item, as a pipeline writes it."""
    out = copy.deepcopy(ds)
    out.SeriesInstanceUID = pydicom.uid.generate_uid()
    out.SOPInstanceUID = pydicom.uid.generate_uid()
    item = Dataset()
    item.Manufacturer = "dicom-node" if purpose is None else "OtherAI Inc"
    if station:
        item.StationName = station
    code = Dataset()
    concept = purpose or codes.DCM.ProcessingEquipment
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        concept.value,
        concept.scheme_designator,
        concept.meaning,
    )
    item.PurposeOfReferenceCodeSequence = [code]
    out.ContributingEquipmentSequence = [item]
    return out


def test_own_output_sent_back_is_stored_audited_and_opens_nothing(node: Node, study: SimulatedStudy) -> None:
    ds = _dataset(study.files[0])
    node.put(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    intake = node.intake(policy_yaml("forward"))
    assert len(intake.study_ready(study.study_uid)) == 1
    output = _as_output(ds, NODE_AE)
    for calling in (SCANNER, "ORTHANC"):  # the sending AE does not matter
        node.put(_encode(output, JPEG2000Lossless), JPEG2000Lossless, calling_ae=calling)
        assert intake.study_ready(study.study_uid) == []
    rows = node.rows()
    assert [r["role"] for r in rows] == [None, OWN_OUTPUT]
    returned = node.rt.audit.events(AuditEvent.OWN_OUTPUT_RETURNED)
    assert len(returned) == 1 and "names dicom-node DICOMNODE" in returned[0].facts["recognised_by"]
    assert len(node.jobs()) == 1
    assert len(node.rt.audit.events(AuditEvent.STUDY_READY)) == 1


def test_own_output_is_recognised_by_its_uid_when_a_pacs_stripped_the_equipment(
    node: Node, study: SimulatedStudy
) -> None:
    ds = _dataset(study.files[0])
    output = _as_output(ds, NODE_AE)
    output.SOPInstanceUID = "1.2.826.0.1.3680043.10.999.1.2.3"
    del output.ContributingEquipmentSequence
    node.put(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    intake = node.intake(policy_yaml("forward"))
    (job_id,) = intake.study_ready(study.study_uid)
    with node.rt.db.write() as conn:
        conn.execute(
            insert(t.job_outputs).values(
                job_fk=job_id,
                series_uid=output.SeriesInstanceUID,
                sop_uid=output.SOPInstanceUID,
                sop_class_uid=output.SOPClassUID,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                path="/nowhere",
            )
        )
    node.put(_encode(output, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert node.rows()[-1]["role"] == OWN_OUTPUT
    assert intake.study_ready(study.study_uid) == []


def test_another_ai_nodes_output_is_ignored_unless_the_rule_accepts_it(
    node: Node, study: SimulatedStudy
) -> None:
    ds = _dataset(study.files[0])
    foreign = _as_output(ds, "OTHERNODE")
    synthetic = _as_output(ds, None, purpose=codes.DCM.SynthesizingEquipment)
    for item in (foreign, synthetic):
        node.put(_encode(item, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert {r["role"] for r in node.rows()} == {AI_OUTPUT}
    ignoring = node.intake(policy_yaml("forward"))
    assert ignoring.study_ready(study.study_uid) == []
    assert node.jobs() == []
    accepting = policy_yaml("forward").replace("gate: auto", "gate: auto\n  ai_outputs: accept")
    (job_id,) = node.intake(accepting).study_ready(study.study_uid)
    with node.rt.db.read() as conn:
        inputs = conn.execute(select(t.job_inputs).where(t.job_inputs.c.job_fk == job_id)).all()
    assert len(inputs) == 2


# -- never back to the sender ------------------------------------------------------------------


def test_a_study_is_not_routed_back_to_the_ae_it_came_from(node: Node, study: SimulatedStudy) -> None:
    ds = _dataset(study.files[0])
    node.put(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian, calling_ae="PACS")
    assert node.intake(policy_yaml("forward")).study_ready(study.study_uid) == []
    skipped = node.rt.audit.events(AuditEvent.RETURN_TO_SENDER_SKIPPED)
    assert [r.facts["destination"] for r in skipped] == ["pacs"]
    (not_routed,) = node.rt.audit.events(AuditEvent.STUDY_NOT_ROUTED)
    assert "sent the study" in not_routed.facts["reason"]


def test_return_to_sender_when_the_rule_says_so(node: Node, study: SimulatedStudy) -> None:
    ds = _dataset(study.files[0])
    node.put(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian, calling_ae="PACS")
    allowed = policy_yaml("forward").replace("gate: auto", "gate: auto\n  return_to_sender: true")
    assert len(node.intake(allowed).study_ready(study.study_uid)) == 1
    assert node.rt.audit.events(AuditEvent.RETURN_TO_SENDER_SKIPPED) == []


def test_pipeline_outputs_carry_the_node_ae_as_station_name() -> None:
    """The writers name the node in its Contributing Equipment item (what ingest looks for)."""
    from pipelines.provenance import OutputProvenance
    from pipelines.writers.common import _contributing_equipment

    prov = OutputProvenance("p", "1", "m", "1", "0" * 64, "0.1", False, station=NODE_AE)
    items = _contributing_equipment(prov)
    assert [i.Manufacturer for i in items] == ["dicom-node", "dicom-node"]
    assert items[0].StationName == NODE_AE
