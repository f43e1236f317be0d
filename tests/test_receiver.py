"""dicom_node.ingest.receiver: the Error Comment of a refused C-STORE — the quarantine
reason, short and without patient data — built from the reasons check_instance really gives."""

from __future__ import annotations

import io

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from dicom_node.ingest.instance import StoreStatus, check_instance
from dicom_node.ingest.part10 import split_part10
from dicom_node.ingest.receiver import error_comment, failure_status

NAME = "ZELDAPHI^QUIXOTEPHI"
SOP_UID = "1.2.826.0.1.3680043.8.498.200"


def ct(**changes: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = SOP_UID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.201"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.202"
    ds.PatientName = NAME
    ds.PatientID = "EC-1"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(32)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(SOP_UID)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return split_part10(buf.getvalue())[1]


def reason_for(data: bytes, claimed: str | None = None) -> tuple[StoreStatus, str]:
    facts, rejection = check_instance(data, ExplicitVRLittleEndian, claimed)
    assert facts is None and rejection is not None
    return rejection.status, rejection.reason


@pytest.mark.parametrize(
    ("data", "claimed", "comment"),
    [
        (encode(ct(PixelData=bytes(16))), None, "pixel data truncated: 16 of 32 bytes"),
        (encode(ct(StudyInstanceUID=None)), None, "required attribute missing: StudyInstanceUID"),
        (encode(ct())[:-10], None, "data set truncated: element (7FE0,0010) lacks 10 bytes"),
        (encode(ct()), "1.2.3.4", "SOP Instance UID differs from the C-STORE request"),
        (encode(ct(SeriesInstanceUID="1.2." + "9" * 70)), None, "invalid UID 1.2." + "9" * 45 + "..."),
        # A name in a UID field: the reason quotes it, the Error Comment does not.
        (encode(ct(SeriesInstanceUID=NAME.replace("^", "."))), None, "invalid UID"),
        (
            encode(ct(StudyInstanceUID=None, SeriesInstanceUID=None, SOPInstanceUID=None)),
            None,
            "missing: SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID",
        ),
        # pydicom's message, which may quote the data set: the category only.
        (b"\x08\x00\x05\x00ZZ\x04\x00ABCD", None, "cannot decode attributes"),
    ],
    ids=["pixels", "missing", "cut", "mismatch", "long-uid", "name-as-uid", "missing-3", "library-text"],
)
def test_error_comment_is_the_reason_short_and_without_patient_data(
    data: bytes, claimed: str | None, comment: str
) -> None:
    _status, reason = reason_for(data, claimed)
    text = error_comment(reason)
    assert text == comment, reason
    assert len(text) <= 64 and text.isascii() and "\\" not in text
    assert "ZELDAPHI" not in text


def test_other_reasons_keep_only_their_category() -> None:
    assert error_comment("cannot decode attributes: 'ZELDAPHI' is not a number") == "cannot decode attributes"
    assert (
        error_comment("free disk 12 MB below the configured floor")
        == "free disk 12 MB below the configured floor"
    )
    assert (
        error_comment("storage failure: IntegrityError (message withheld: raised in sqlalchemy)")
        == "storage failure: IntegrityError"
    )


def test_failure_status_carries_status_comment_and_offending_elements() -> None:
    status, reason = reason_for(encode(ct(StudyInstanceUID=None, SeriesInstanceUID=None)))
    response = failure_status(status, reason)
    assert response.Status == 0xA900
    assert response.ErrorComment == "required attribute missing: StudyInstanceUID, SeriesInstanceUID"
    assert list(response.OffendingElement) == [0x0020000D, 0x0020000E]
    assert "OffendingElement" not in failure_status(
        StoreStatus.OUT_OF_RESOURCES, "free disk 1 MB below the floor"
    )


def test_an_unknown_vr_on_an_element_no_check_decodes_is_refused() -> None:
    """A flipped bit turning (0018,5100) Patient Position's CS into 'KS': stored, no reader
    could read the file back (the hostile-data-set test's mutant), so it is refused."""
    good = encode(ct(PatientPosition="HFS"))
    at = good.index(b"\x18\x00\x00\x51CS")
    mutant = good[: at + 4] + b"KS" + good[at + 6 :]
    status, reason = reason_for(mutant)
    assert status == StoreStatus.CANNOT_UNDERSTAND
    assert reason == "cannot parse data set: element (0018,5100) has no known VR ('KS')"
    assert check_instance(good, ExplicitVRLittleEndian, None)[1] is None
