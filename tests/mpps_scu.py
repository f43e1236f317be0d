"""A scanner stand-in for MPPS: a pynetdicom Modality Performed Procedure Step SCU.

dcmtk has no MPPS SCU, so the tests play the modality with pynetdicom, as its MPPS SCU
example does: N-CREATE (IN PROGRESS) when acquisition starts, N-SET (COMPLETED or
DISCONTINUED) with the Performed Series Sequence when it ends. Each request on its own
association, on loopback, as many modalities do.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

#: A patient name the node must never write to a log (tests look for it).
PATIENT_NAME = "MPPS^SCANNER^PATIENT"


def create_attributes(study_uid: str | None, *, station: str = "CT1", status: str = "IN PROGRESS") -> Dataset:
    """An N-CREATE attribute list (None: no Study Instance UID in the scheduled step)."""
    ds = Dataset()
    step = Dataset()
    if study_uid is not None:
        step.StudyInstanceUID = study_uid
    step.ReferencedStudySequence = []
    step.AccessionNumber = "ACC0001"
    step.RequestedProcedureID = "RP1"
    step.RequestedProcedureDescription = "CT CHEST"
    step.ScheduledProcedureStepID = "SPS1"
    step.ScheduledProcedureStepDescription = "CT CHEST"
    step.ScheduledProtocolCodeSequence = []
    ds.ScheduledStepAttributesSequence = [step]
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "MPPS-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = station
    ds.PerformedStationName = station
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = "20261205"
    ds.PerformedProcedureStepStartTime = "090000"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepDescription = "CT CHEST"
    ds.PerformedProcedureTypeDescription = ""
    ds.PerformedProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = None
    ds.PerformedProcedureStepEndTime = None
    ds.Modality = "CT"
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds


def performed_series(files: Iterable[Path], extra_sops: Iterable[str] = ()) -> list[Dataset]:
    """A Performed Series Sequence listing ``files`` (read from disk) and ``extra_sops``
    (CT images the scanner says it made but that were never sent)."""
    by_series: dict[str, list[tuple[str, str]]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(
            (str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        )
    extra = list(extra_sops)
    if extra:
        target = next(iter(by_series), "1.2.826.0.1.3680043.8.498.1")
        by_series.setdefault(target, []).extend(("1.2.840.10008.5.1.4.1.1.2", uid) for uid in extra)
    sequence = []
    for series_uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.PerformingPhysicianName = ""
        item.ProtocolName = "CHEST"
        item.OperatorsName = ""
        item.SeriesDescription = "AXIAL"
        item.RetrieveAETitle = ""
        images = []
        for sop_class, sop_uid in refs:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_uid
            images.append(ref)
        item.ReferencedImageSequence = images
        item.ReferencedNonImageCompositeSOPInstanceSequence = []
        sequence.append(item)
    return sequence


def set_attributes(status: str, series: list[Dataset] | None = None) -> Dataset:
    """An N-SET modification list ending (or updating) a step."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261205"
    ds.PerformedProcedureStepEndTime = "091500"
    if series is not None:
        ds.PerformedSeriesSequence = series
    return ds


class MppsScanner:
    """The modality: sends N-CREATE / N-SET to ``port`` and returns the response status data set."""

    def __init__(self, port: int, called_ae: str, calling_ae: str = "CT1") -> None:
        self.port = port
        self.called_ae = called_ae
        self.calling_ae = calling_ae

    def _send(self, op: str, dataset: Dataset, mpps_uid: str | None) -> Dataset:
        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            raise AssertionError(f"no association with 127.0.0.1:{self.port}")
        try:
            if op == "create":
                status, _ = assoc.send_n_create(dataset, ModalityPerformedProcedureStep, mpps_uid)
            else:
                assert mpps_uid is not None
                status, _ = assoc.send_n_set(dataset, ModalityPerformedProcedureStep, mpps_uid)
        finally:
            assoc.release()
        assert status, f"no N-{op.upper()} response"
        return status

    def create(self, mpps_uid: str | None, attributes: Dataset) -> Dataset:
        return self._send("create", attributes, mpps_uid)

    def set(self, mpps_uid: str, modifications: Dataset) -> Dataset:
        return self._send("set", modifications, mpps_uid)
