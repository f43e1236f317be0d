"""The MPPS SCP: N-CREATE / N-SET answers, the ``mpps`` rows and the audit trail.

A real receiver on loopback (the Receiver binds the handlers) and a pynetdicom MPPS SCU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from audit import AuditEvent
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.mpps import (
    PerformedProcedureSteps,
    Refusal,
    StepFacts,
    check_create,
    check_set,
    referenced_instances,
)
from dicom_node.ingest.receiver import Receiver
from dicom_node.ingest.store import InstanceStore
from dicom_node.runtime import Runtime
from tests.mpps_scu import MppsScanner, create_attributes, set_attributes
from tests.peers import free_port

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"


@dataclass
class Scp:
    rt: Runtime
    scanner: MppsScanner
    changed: list[str]

    def step(self, mpps_uid: str) -> dict[str, Any] | None:
        with self.rt.db.read() as conn:
            row = conn.execute(select(t.mpps).where(t.mpps.c.sop_uid == mpps_uid)).mappings().first()
        return dict(row) if row else None


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Scp]:
    port = free_port()
    config = NodeConfig.model_validate(
        {"node": {"port": port, "ae_title": "NODE"}, "completeness": {"mpps_discontinued": "hold"}}
    )
    rt = Runtime.open(None, tmp_path)
    store = InstanceStore(rt.paths, rt.db, Indexer(rt.db, rt.audit, gather_seconds=0.01))
    changed: list[str] = []
    steps = PerformedProcedureSteps(config, rt.db, rt.audit, on_changed=changed.append)
    receiver = Receiver(config, rt.paths, store, rt.audit, procedure_steps=steps)
    receiver.start()
    try:
        yield Scp(rt, MppsScanner(port, "NODE"), changed)
    finally:
        receiver.stop()
        store.close()
        rt.close()


def _series(*refs: tuple[str, str], non_image: tuple[tuple[str, str], ...] = ()) -> list[Dataset]:
    item = Dataset()
    item.SeriesInstanceUID = generate_uid()
    item.ReferencedImageSequence = []
    for sop_class, sop_uid in refs:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
        item.ReferencedImageSequence.append(ref)
    item.ReferencedNonImageCompositeSOPInstanceSequence = []
    for sop_class, sop_uid in non_image:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
        item.ReferencedNonImageCompositeSOPInstanceSequence.append(ref)
    return [item]


def test_create_then_complete_records_the_step_and_its_instances(scp: Scp) -> None:
    mpps_uid, study_uid = generate_uid(), generate_uid()
    images = [generate_uid() for _ in range(2)]
    report = generate_uid()

    created = scp.scanner.create(mpps_uid, create_attributes(study_uid))
    assert created.Status == 0x0000
    step = scp.step(mpps_uid)
    assert step is not None
    assert (step["study_uid"], step["status"], step["calling_ae"], step["referenced"]) == (
        study_uid,
        "IN PROGRESS",
        "CT1",
        [],
    )

    series = _series(*((CT_IMAGE, uid) for uid in images), non_image=((ENHANCED_SR, report),))
    done = scp.scanner.set(mpps_uid, set_attributes("COMPLETED", series))

    assert done.Status == 0x0000
    step = scp.step(mpps_uid)
    assert step is not None
    assert step["status"] == "COMPLETED"
    assert step["referenced"] == [*images, report]
    assert step["settled_at"] is None
    assert scp.changed == [study_uid, study_uid]
    (opened,) = scp.rt.audit.events(AuditEvent.MPPS_IN_PROGRESS)
    (completed,) = scp.rt.audit.events(AuditEvent.MPPS_COMPLETED)
    assert (opened.study_uid, opened.calling_ae, opened.facts["mpps_uid"]) == (study_uid, "CT1", mpps_uid)
    assert (opened.facts["operation"], completed.facts["operation"]) == ("N-CREATE", "N-SET")
    assert completed.facts["instances"] == 3
    # Only UIDs and AE titles are kept: nothing of the patient module.
    assert "MPPS^SCANNER" not in repr(step) + repr(opened.facts) + repr(completed.facts)


def test_duplicate_create_is_refused(scp: Scp) -> None:
    mpps_uid = generate_uid()
    assert scp.scanner.create(mpps_uid, create_attributes(generate_uid())).Status == 0x0000

    again = scp.scanner.create(mpps_uid, create_attributes(generate_uid()))

    assert again.Status == 0x0111
    assert "already exists" in again.ErrorComment
    (refused,) = scp.rt.audit.events(AuditEvent.MPPS_REFUSED)
    assert (refused.facts["operation"], refused.facts["status"]) == ("N-CREATE", "0x0111")
    assert len(scp.rt.audit.events(AuditEvent.MPPS_IN_PROGRESS)) == 1


def test_set_on_an_unknown_step_is_no_such_instance(scp: Scp) -> None:
    mpps_uid = generate_uid()

    answer = scp.scanner.set(mpps_uid, set_attributes("COMPLETED"))

    assert answer.Status == 0x0112
    assert scp.step(mpps_uid) is None
    (refused,) = scp.rt.audit.events(AuditEvent.MPPS_REFUSED)
    assert (refused.facts["mpps_uid"], refused.facts["status"]) == (mpps_uid, "0x0112")
    assert scp.changed == []


@pytest.mark.parametrize("ended", ["COMPLETED", "DISCONTINUED"])
def test_set_after_the_step_ended_may_no_longer_update(scp: Scp, ended: str) -> None:
    mpps_uid, study_uid = generate_uid(), generate_uid()
    scp.scanner.create(mpps_uid, create_attributes(study_uid))
    assert scp.scanner.set(mpps_uid, set_attributes(ended, _series((CT_IMAGE, "1.2.3.4")))).Status == 0x0000

    late = scp.scanner.set(mpps_uid, set_attributes("IN PROGRESS", []))

    # PS3.4 F.7.2.2.4: Processing failure, "may no longer be updated", Error ID A710.
    assert late.Status == 0x0110
    assert late.ErrorID == 0xA710
    assert "may no longer be updated" in late.ErrorComment
    step = scp.step(mpps_uid)
    assert step is not None and step["status"] == ended and step["referenced"] == ["1.2.3.4"]
    (refused,) = scp.rt.audit.events(AuditEvent.MPPS_REFUSED)
    assert refused.study_uid == study_uid


def test_discontinued_is_audited_with_the_configured_mode(scp: Scp) -> None:
    mpps_uid, study_uid = generate_uid(), generate_uid()
    scp.scanner.create(mpps_uid, create_attributes(study_uid))

    assert scp.scanner.set(mpps_uid, set_attributes("DISCONTINUED")).Status == 0x0000

    (stopped,) = scp.rt.audit.events(AuditEvent.MPPS_DISCONTINUED)
    assert (stopped.study_uid, stopped.facts["mode"]) == (study_uid, "hold")


def test_an_update_in_progress_replaces_the_list_and_completion_keeps_it(scp: Scp) -> None:
    mpps_uid = generate_uid()
    scp.scanner.create(mpps_uid, create_attributes(generate_uid()))
    scp.scanner.set(mpps_uid, set_attributes("IN PROGRESS", _series((CT_IMAGE, "1.2.3.1"))))
    scp.scanner.set(
        mpps_uid, set_attributes("IN PROGRESS", _series((CT_IMAGE, "1.2.3.2"), (CT_IMAGE, "1.2.3.3")))
    )

    scp.scanner.set(mpps_uid, set_attributes("COMPLETED"))  # no Performed Series Sequence

    step = scp.step(mpps_uid)
    assert step is not None
    assert (step["status"], step["referenced"]) == ("COMPLETED", ["1.2.3.2", "1.2.3.3"])
    assert len(scp.rt.audit.events(AuditEvent.MPPS_IN_PROGRESS)) == 3


@pytest.mark.parametrize(
    ("attributes", "status", "comment"),
    [
        (create_attributes("1.2.3", status="COMPLETED"), 0x0106, "not IN PROGRESS"),
        (create_attributes("1.2.3", status="STARTED"), 0x0106, "Status STARTED"),
        (create_attributes(None), 0x0120, "no Study Instance UID"),
    ],
)
def test_create_refuses_a_bad_attribute_list(
    scp: Scp, attributes: Dataset, status: int, comment: str
) -> None:
    mpps_uid = generate_uid()

    answer = scp.scanner.create(mpps_uid, attributes)

    assert answer.Status == status
    assert comment in answer.ErrorComment
    assert scp.step(mpps_uid) is None
    assert scp.rt.audit.events(AuditEvent.MPPS_IN_PROGRESS) == []


def test_create_without_a_sop_instance_uid_is_refused(scp: Scp) -> None:
    answer = scp.scanner.create(None, create_attributes(generate_uid()))
    assert answer.Status == 0x0120
    assert "Affected SOP Instance UID" in answer.ErrorComment


def test_set_refuses_an_unknown_status(scp: Scp) -> None:
    mpps_uid = generate_uid()
    scp.scanner.create(mpps_uid, create_attributes(generate_uid()))

    answer = scp.scanner.set(mpps_uid, set_attributes("FINISHED"))

    assert answer.Status == 0x0106
    step = scp.step(mpps_uid)
    assert step is not None and step["status"] == "IN PROGRESS"


# -- the attribute lists, without the network -------------------------------------------


def test_referenced_instances_reads_images_and_other_composites_once() -> None:
    ds = Dataset()
    ds.PerformedSeriesSequence = _series(
        (CT_IMAGE, "1.1"), (CT_IMAGE, "1.2"), non_image=((ENHANCED_SR, "1.3"),)
    )
    ds.PerformedSeriesSequence += _series((CT_IMAGE, "1.2"), (CT_IMAGE, "1.4"))
    assert referenced_instances(ds) == ["1.1", "1.2", "1.3", "1.4"]
    assert referenced_instances(Dataset()) == []


def test_check_create_and_check_set() -> None:
    facts = check_create(create_attributes("1.2.3"))
    assert isinstance(facts, StepFacts)
    assert (facts.status, facts.study_uid, facts.referenced) == ("IN PROGRESS", "1.2.3", [])
    no_status = create_attributes("1.2.3")
    del no_status.PerformedProcedureStepStatus
    refusal = check_create(no_status)
    assert isinstance(refusal, Refusal) and refusal.status == 0x0120

    update = check_set(set_attributes("completed"))  # case is forgiven
    assert isinstance(update, StepFacts)
    assert update.status == "COMPLETED"
    assert update.referenced is None  # not given: the old list stays
