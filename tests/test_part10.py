"""Unit tests for dicom_node.ingest.part10: the hand-written file meta and the Part 10 splitter."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
)

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.ingest.part10 import PREAMBLE, PRIOR_MARK, encode_file_meta, retrieved_from, split_part10


def pydicom_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str | None
) -> bytes:
    """What pydicom's own writer produces for the same file meta (no preamble)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae is not None:
        meta.SourceApplicationEntityTitle = source_ae
    buf = io.BytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


UID_CASES = [
    pytest.param(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, id="odd-instance-uid"),
    pytest.param(CTImageStorage, "1.2.34", ExplicitVRLittleEndian, id="even-instance-uid"),
    pytest.param(MRImageStorage, "1.2.3.4.5", ImplicitVRLittleEndian, id="implicit-odd"),
    # SOP class and transfer syntax of even length (no padding needed)
    pytest.param("1.2.840.10008.5.1.4.1.1.12.1", "1.2.3.4", DeflatedExplicitVRLittleEndian, id="even-class"),
    pytest.param(CTImageStorage, "2.25." + "1" * 59, JPEG2000Lossless, id="64-char-uid"),
    pytest.param(CTImageStorage, "2.25." + "1" * 58, RLELossless, id="63-char-uid"),
    pytest.param("1.2.840.10008.5.1.4.1.1.7", "1", ExplicitVRBigEndian, id="one-char-uid"),
]
AE_CASES = [
    pytest.param(None, id="no-ae"),
    pytest.param("CT", id="ae-even"),
    pytest.param("CT1", id="ae-odd"),
    pytest.param("ABCDEFGHIJKLMNOP", id="ae-16"),
]


@pytest.mark.parametrize("source_ae", AE_CASES)
@pytest.mark.parametrize(("sop_class", "sop_instance", "ts"), UID_CASES)
def test_encode_file_meta_matches_pydicom_byte_for_byte(
    sop_class: str, sop_instance: str, ts: str, source_ae: str | None
) -> None:
    ours = encode_file_meta(sop_class, sop_instance, ts, source_ae)
    assert ours[:132] == b"\x00" * 128 + b"DICM"
    assert ours[:132] == PREAMBLE
    expected = pydicom_meta_bytes(sop_class, sop_instance, ts, source_ae)
    assert ours[132:] == expected
    assert len(ours) % 2 == 0


def test_encode_file_meta_reads_back_with_pydicom() -> None:
    sop_instance = "1.2.826.0.1.3680043.8.498.1"
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance
    ds.PatientID = "P1"
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    raw = encode_file_meta(CTImageStorage, sop_instance, ExplicitVRLittleEndian, "SENDER") + buf.getvalue()

    back = dcmread(io.BytesIO(raw))
    assert back.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert back.file_meta.MediaStorageSOPInstanceUID == sop_instance
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert back.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert back.file_meta.SourceApplicationEntityTitle == "SENDER"
    assert back.file_meta.FileMetaInformationVersion == b"\x00\x01"
    assert back.SOPInstanceUID == sop_instance
    assert back.PatientID == "P1"


def test_encode_file_meta_group_length_counts_the_rest() -> None:
    ours = encode_file_meta(CTImageStorage, "1.2.3", ExplicitVRLittleEndian)
    meta = ours[132:]
    assert meta[:8] == b"\x02\x00\x00\x00UL\x04\x00"
    assert int.from_bytes(meta[8:12], "little") == len(meta) - 12


# --- split_part10 ------------------------------------------------------------------------------


def make_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.PatientID = "SPLIT-1"
    ds.PatientName = "Doe^Jane"
    ds.Modality = "CT"
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x00\x02\x00\x03\x00\x04\x00"
    return ds


@pytest.mark.parametrize(
    ("ts", "implicit", "little"),
    [
        (ExplicitVRLittleEndian, False, True),
        (ImplicitVRLittleEndian, True, True),
        (ExplicitVRBigEndian, False, False),
    ],
)
def test_split_part10_round_trips_pydicom_file(tmp_path: Path, ts: str, implicit: bool, little: bool) -> None:
    ds = make_dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()

    meta, data = split_part10(raw)
    assert meta.TransferSyntaxUID == ts
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert raw.endswith(data)
    assert not data.startswith(b"\x02\x00")  # no group 0002 left in the data set bytes

    back = read_dataset(io.BytesIO(data), implicit, little)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.PatientID == "SPLIT-1"
    assert back.Rows == 2

    # Re-assembling our own meta with the data set bytes gives a readable file again.
    rebuilt = dcmread(io.BytesIO(encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ts) + data))
    assert rebuilt.SOPInstanceUID == ds.SOPInstanceUID
    assert rebuilt.PixelData == ds.PixelData


def test_split_part10_data_set_readable_with_dcmread_force(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    _, data = split_part10(path.read_bytes())
    back = dcmread(io.BytesIO(data), force=True)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert str(back.PatientName) == "Doe^Jane"


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"]
)
def test_split_part10_on_bundled_files_agrees_with_dcmread(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    raw = Path(path).read_bytes()
    expected = dcmread(path)
    meta, data = split_part10(raw)
    ts = UID(meta.TransferSyntaxUID)
    assert ts == expected.file_meta.TransferSyntaxUID
    back = read_dataset(io.BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)
    assert back.SOPInstanceUID == expected.SOPInstanceUID
    assert back.PatientID == expected.PatientID


def test_split_part10_rejects_bytes_without_dicm() -> None:
    with pytest.raises(InvalidDicomError, match="DICM"):
        split_part10(b"not a dicom file " * 20)


@pytest.mark.parametrize("archive", ["PACS", "pacs-2", "x"])
def test_a_prior_mark_matches_pydicom_and_reads_back(archive: str) -> None:
    """A retrieved prior's file meta: Private Information Creator UID + Private Information,
    byte for byte what pydicom writes, and read back as the archive's name."""
    ours = encode_file_meta(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, "PACS", archive)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = "PACS"
    meta.PrivateInformationCreatorUID = IMPLEMENTATION_CLASS_UID
    mark = PRIOR_MARK + archive.encode()
    meta.PrivateInformation = mark + b"\x00" * (len(mark) % 2)
    buf = io.BytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    assert ours[132:] == buf.getvalue()
    read, _ = split_part10(ours + b"\x08\x00\x18\x00UI\x06\x001.2.3\x00")
    assert retrieved_from(read) == archive
    plain, _ = split_part10(encode_file_meta(CTImageStorage, "1.2.3", ExplicitVRLittleEndian, "PACS"))
    assert retrieved_from(plain) is None
