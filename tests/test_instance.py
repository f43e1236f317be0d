"""dicom_node.ingest.instance.check_instance: facts from good data sets, rejections for bad ones."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.ingest.instance import InstanceFacts, Rejection, StoreStatus, check_instance
from dicom_node.ingest.part10 import split_part10

SOP_UID = "1.2.826.0.1.3680043.8.498.100"
STUDY_UID = "1.2.826.0.1.3680043.8.498.101"
SERIES_UID = "1.2.826.0.1.3680043.8.498.102"

# Bundled pydicom files: name -> (modality, patient id)
BUNDLED = {
    "CT_small.dcm": ("CT", "1CT1"),
    "MR_small.dcm": ("MR", "4MR1"),
    "MR_small_implicit.dcm": ("MR", "4MR1"),
    "MR_small_bigendian.dcm": ("MR", "4MR1"),
    "MR_small_RLE.dcm": ("MR", "4MR1"),
    "JPEG2000.dcm": ("NM", "8NM1"),
    "image_dfl.dcm": ("OT", ""),
}


def bundled(name: str) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of a pydicom test file."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} missing"
    meta, data = split_part10(Path(path).read_bytes())
    return str(meta.TransferSyntaxUID), data


def encode(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    """Data set bytes (no file meta) as a sender would put them on the wire."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", SOP_UID)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    meta, data = split_part10(buf.getvalue())
    assert meta.TransferSyntaxUID == ts
    return data


def make_ct(**attrs: Any) -> Dataset:
    """A small, complete CT data set; ``attrs`` overrides or (with None) removes attributes."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = SOP_UID
    ds.StudyDate = "20240102"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.StudyDescription = "Chest"
    ds.SeriesDescription = "Axial"
    ds.PatientName = "Doe^John"
    ds.PatientID = "PID-1"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "2.5"
    ds.KVP = "120"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.SeriesNumber = "3"
    ds.InstanceNumber = "7"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.103"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(32))
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                del ds[keyword]
        else:
            setattr(ds, keyword, value)
    return ds


def accepted(result: tuple[InstanceFacts | None, Rejection | None]) -> InstanceFacts:
    facts, rejection = result
    assert rejection is None, rejection
    assert facts is not None
    return facts


def rejected(result: tuple[InstanceFacts | None, Rejection | None], status: StoreStatus) -> Rejection:
    facts, rejection = result
    assert facts is None
    assert rejection is not None
    assert rejection.status == status, rejection
    return rejection


# --- good data sets ----------------------------------------------------------------------------


def test_good_ct_gives_all_facts() -> None:
    facts = accepted(check_instance(encode(make_ct()), ExplicitVRLittleEndian, SOP_UID))
    assert facts.sop_class_uid == CTImageStorage
    assert facts.sop_instance_uid == SOP_UID
    assert facts.study_uid == STUDY_UID
    assert facts.series_uid == SERIES_UID
    assert facts.patient_id == "PID-1"
    assert facts.issuer_of_patient_id == "HOSP"
    assert facts.patient_name == "Doe^John"
    assert facts.patient_birth_date == "19700101"
    assert facts.patient_sex == "M"
    assert facts.study_date == "20240102"
    assert facts.accession_number == "ACC1"
    assert facts.study_description == "Chest"
    assert facts.modality == "CT"
    assert facts.series_number == 3
    assert facts.series_description == "Axial"
    assert facts.body_part == "CHEST"
    assert facts.frame_of_reference_uid == "1.2.826.0.1.3680043.8.498.103"
    assert facts.instance_number == 7
    assert facts.tags == {
        "Manufacturer": "ACME",
        "KVP": 120.0,
        "SliceThickness": 2.5,
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    }


def test_optional_attributes_absent_are_none() -> None:
    ds = make_ct(
        PatientName=None,
        PatientBirthDate=None,
        StudyDescription=None,
        SeriesNumber=None,
        InstanceNumber=None,
        IssuerOfPatientID=None,
        PatientID=None,
    )
    facts = accepted(check_instance(encode(ds), ExplicitVRLittleEndian))
    assert facts.patient_name is None
    assert facts.patient_birth_date is None
    assert facts.study_description is None
    assert facts.series_number is None
    assert facts.instance_number is None
    assert facts.patient_id == ""
    assert facts.issuer_of_patient_id == ""


def test_bundled_ct_small_facts() -> None:
    ts, data = bundled("CT_small.dcm")
    facts = accepted(check_instance(data, ts))
    assert facts.modality == "CT"
    assert facts.patient_id == "1CT1"
    assert facts.sop_instance_uid == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert facts.study_uid.startswith("1.3.6.1.4.1.5962.")
    assert facts.series_uid.startswith("1.3.6.1.4.1.5962.")
    assert facts.sop_class_uid == CTImageStorage
    assert facts.tags["KVP"] == 120.0
    assert facts.tags["SliceThickness"] == 5.0
    assert facts.tags["Manufacturer"] == "GE MEDICAL SYSTEMS"
    assert facts.tags["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_files_in_every_transfer_syntax_are_accepted(name: str) -> None:
    ts, data = bundled(name)
    facts = accepted(check_instance(data, ts))
    modality, patient_id = BUNDLED[name]
    assert facts.modality == modality
    assert facts.patient_id == patient_id
    assert facts.sop_instance_uid and facts.study_uid and facts.series_uid


def facts_of(name: str) -> InstanceFacts:
    ts, data = bundled(name)
    return accepted(check_instance(data, ts))


def test_same_instance_gives_same_facts_in_every_transfer_syntax() -> None:
    explicit = facts_of("MR_small.dcm")
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"):
        assert facts_of(name) == explicit, name


@pytest.mark.parametrize(
    "ts",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian],
)
def test_own_data_set_accepted_in_each_native_syntax(ts: str) -> None:
    facts = accepted(check_instance(encode(make_ct(), ts), ts, SOP_UID))
    assert facts.sop_instance_uid == SOP_UID
    assert facts.series_number == 3
    assert facts.tags["KVP"] == 120.0


def test_claimed_uid_with_padding_matches() -> None:
    accepted(check_instance(encode(make_ct()), ExplicitVRLittleEndian, SOP_UID + "\0"))
    accepted(check_instance(encode(make_ct()), ExplicitVRLittleEndian, SOP_UID + " "))


def test_odd_length_uid_padding_is_removed() -> None:
    odd = "1.2.826.0.1.3680043.8.498.10011"  # 31 characters: NUL-padded on the wire
    assert len(odd) % 2 == 1
    facts = accepted(check_instance(encode(make_ct(SOPInstanceUID=odd)), ExplicitVRLittleEndian, odd))
    assert facts.sop_instance_uid == odd


def test_latin1_patient_name_is_decoded() -> None:
    ds = make_ct(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jörg")
    facts = accepted(check_instance(encode(ds), ExplicitVRLittleEndian))
    assert facts.patient_name == "Müller^Jörg"


def test_utf8_patient_name_is_decoded_with_the_data_sets_character_set() -> None:
    ds = make_ct(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jörg", StudyDescription="Thorax ü")
    facts = accepted(check_instance(encode(ds), ExplicitVRLittleEndian))
    assert facts.patient_name == "Müller^Jörg"  # observed: 'MÃ¼ller^JÃ¶rg'
    assert facts.study_description == "Thorax ü"


def test_wanted_values_longer_than_256_bytes_are_kept() -> None:
    image_type = ["ORIGINAL", "PRIMARY"] + [f"VALUE{i:02d}XXXXXXXX" for i in range(20)]  # 16 chars each
    ds = make_ct(ImageType=image_type)
    facts = accepted(check_instance(encode(ds), ExplicitVRLittleEndian))
    assert facts.tags.get("ImageType") == image_type  # observed: None


# --- unparseable and truncated -----------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"hello world, this is not DICOM at all!!",
        bytes(range(256)) * 4,
        b"\xff" * 64,
    ],
    ids=["empty", "text", "byte-ramp", "all-ff"],
)
@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
)
def test_garbage_cannot_be_understood(garbage: bytes, ts: str) -> None:
    rejection = rejected(check_instance(garbage, ts), StoreStatus.CANNOT_UNDERSTAND)
    assert rejection.status == 0xC000
    assert rejection.reason.startswith("cannot parse data set")


def test_unknown_transfer_syntax_cannot_be_understood() -> None:
    rejection = rejected(check_instance(encode(make_ct()), "1.2.3.4"), StoreStatus.CANNOT_UNDERSTAND)
    assert rejection.reason.startswith("cannot parse data set")


def test_cut_in_native_pixel_data_is_rejected() -> None:
    ts, data = bundled("CT_small.dcm")
    rejection = rejected(check_instance(data[: len(data) - 1000], ts), StoreStatus.CANNOT_UNDERSTAND)
    assert rejection.reason.startswith("cannot parse data set")
    assert "(7FE0,0010)" in rejection.reason
    assert "more bytes than were sent" in rejection.reason


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm"])
def test_cut_in_encapsulated_pixel_data_is_rejected(name: str) -> None:
    ts, data = bundled(name)
    pixel_start = data.rfind(b"\xe0\x7f\x10\x00")
    assert pixel_start > 0
    cut = (pixel_start + len(data)) // 2
    rejection = rejected(check_instance(data[:cut], ts), StoreStatus.CANNOT_UNDERSTAND)
    assert rejection.reason.startswith("cannot parse data set")


def test_cut_before_sequence_delimiter_is_rejected() -> None:
    ts, data = bundled("JPEG2000.dcm")
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # encapsulated pixel data ends here
    rejected(check_instance(data[:-8], ts), StoreStatus.CANNOT_UNDERSTAND)


def test_trailing_bytes_after_complete_data_set_are_rejected() -> None:
    ts, data = bundled("MR_small.dcm")
    rejected(check_instance(data + b"\x00\x00", ts), StoreStatus.CANNOT_UNDERSTAND)


def test_cut_in_deflated_stream_is_rejected() -> None:
    ts, data = bundled("image_dfl.dcm")
    rejection = rejected(check_instance(data[: len(data) // 2], ts), StoreStatus.CANNOT_UNDERSTAND)
    assert rejection.reason.startswith("cannot parse data set")


def test_short_native_pixel_data_is_rejected() -> None:
    ds = make_ct(PixelData=bytes(16))  # 4x4x16 bits needs 32 bytes
    rejection = rejected(check_instance(encode(ds), ExplicitVRLittleEndian), StoreStatus.CANNOT_UNDERSTAND)
    assert rejection.reason == "pixel data truncated: 16 bytes, image attributes need 32"


def test_short_pixel_data_counts_frames_and_samples() -> None:
    ds = make_ct(
        NumberOfFrames="2",
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelData=bytes(4 * 4 * 3),  # one frame only
    )
    rejection = rejected(check_instance(encode(ds), ExplicitVRLittleEndian), StoreStatus.CANNOT_UNDERSTAND)
    assert rejection.reason == "pixel data truncated: 48 bytes, image attributes need 96"


def test_short_pixel_data_is_rejected_in_implicit_vr() -> None:
    ds = make_ct(PixelData=bytes(30))
    ts = ImplicitVRLittleEndian
    rejection = rejected(check_instance(encode(ds, ts), ts), StoreStatus.CANNOT_UNDERSTAND)
    assert rejection.reason.startswith("pixel data truncated: 30 bytes")


def test_exact_pixel_data_length_is_accepted() -> None:
    ds = make_ct(BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=bytes(16))
    accepted(check_instance(encode(ds), ExplicitVRLittleEndian))


@pytest.mark.parametrize("stray", [b"\x10", b"\xe0\x7f\x10", b"\x08\x00\x18\x00UI\x40"], ids=["1", "3", "7"])
def test_trailing_partial_element_is_rejected(stray: bytes) -> None:
    data = encode(make_ct()) + stray
    rejection = rejected(check_instance(data, ExplicitVRLittleEndian), StoreStatus.CANNOT_UNDERSTAND)
    assert (
        rejection.reason
        == f"cannot parse data set: {len(stray)} trailing bytes do not form a complete element"
    )


def test_trailing_element_header_without_value_is_rejected() -> None:
    # (0009,0010) LO, length 8, but only 2 value bytes follow
    data = encode(make_ct()) + b"\x09\x00\x10\x00LO\x08\x00AB"
    rejection = rejected(check_instance(data, ExplicitVRLittleEndian), StoreStatus.CANNOT_UNDERSTAND)
    assert rejection.reason.startswith("cannot parse data set")
    assert "6 more bytes" in rejection.reason


# --- missing and inconsistent attributes -------------------------------------------------------


@pytest.mark.parametrize(
    "keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"]
)
def test_missing_required_attribute_names_it(keyword: str) -> None:
    ds = make_ct(**{keyword: None})
    rejection = rejected(
        check_instance(encode(ds), ExplicitVRLittleEndian), StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    )
    assert rejection.status == 0xA900
    assert rejection.reason == f"required attribute missing: {keyword}"


def test_several_missing_attributes_are_all_named() -> None:
    ds = make_ct(StudyInstanceUID=None, SeriesInstanceUID=None)
    rejection = rejected(
        check_instance(encode(ds), ExplicitVRLittleEndian), StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    )
    assert rejection.reason == "required attribute missing: StudyInstanceUID, SeriesInstanceUID"


def test_empty_required_attribute_counts_as_missing() -> None:
    ds = make_ct(StudyInstanceUID="")
    rejection = rejected(
        check_instance(encode(ds), ExplicitVRLittleEndian), StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    )
    assert "StudyInstanceUID" in rejection.reason


def test_claimed_sop_uid_differs() -> None:
    data = encode(make_ct())
    rejection = rejected(
        check_instance(data, ExplicitVRLittleEndian, "1.2.826.0.1.3680043.8.498.999"),
        StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    )
    assert rejection.reason == "SOP Instance UID in the data set differs from the C-STORE request"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns when writing the bad UID
@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize("bad_uid", ["1.2.abc", "1.02.3", "1.2.", "2.25." + "1" * 60])
def test_invalid_uid_is_rejected(keyword: str, bad_uid: str) -> None:
    ds = make_ct(**{keyword: bad_uid})
    rejection = rejected(
        check_instance(encode(ds), ExplicitVRLittleEndian), StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    )
    assert rejection.reason.startswith("invalid UID")
    assert bad_uid[:20] in rejection.reason


# --- never raises ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm"])
def test_never_raises_on_any_prefix(name: str) -> None:
    ts, data = bundled(name)
    step = 997 if len(data) > 10_000 else 97
    cuts = list(range(0, len(data), step)) + [len(data) // 2, len(data)]
    outcomes = {}
    for cut in cuts:
        result = check_instance(data[:cut], ts)
        assert isinstance(result, tuple) and len(result) == 2
        facts, rejection = result
        assert (facts is None) != (rejection is None), cut
        if rejection is not None:
            assert isinstance(rejection.status, StoreStatus)
            assert rejection.reason
        outcomes[cut] = facts is not None
    assert outcomes[len(data)] is True
    assert outcomes[len(data) // 2] is False
    assert outcomes[0] is False


# -- the fast element decoder and the one-pass walk give what pydicom gives -------------------


def _both_ways(data: bytes, ts: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    from dicom_node.ingest import instance

    fast = check_instance(data, ts)
    real_decode = instance._decode
    with monkeypatch.context() as m:
        m.setattr(instance, "_decode", lambda raw: real_decode(raw, fast=False))
        m.setattr(instance, "_PLAIN_WALK", False)
        slow = check_instance(data, ts)
    return fast, slow


def _comparable(result: tuple[InstanceFacts | None, Rejection | None]) -> Any:
    facts, rejection = result
    if facts is None:
        return rejection
    # Types too: a value the index stores as JSON must serialise the same way.
    return facts, json.dumps(facts.tags, sort_keys=True)


def test_fast_decoder_agrees_with_pydicom_on_every_bundled_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.data import get_charset_files, get_testdata_files

    compared = accepted_files = 0
    for name in sorted(set(get_testdata_files())) + get_charset_files("*"):
        try:
            meta, data = split_part10(Path(name).read_bytes())
            ts = str(meta.TransferSyntaxUID)
        except Exception:
            continue  # not a Part 10 file (or no transfer syntax): nothing to compare
        fast, slow = _both_ways(data, ts, monkeypatch)
        assert _comparable(fast) == _comparable(slow), name
        compared += 1
        accepted_files += fast[0] is not None
    assert compared > 80 and accepted_files > 60, (compared, accepted_files)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize(
    "attrs",
    [
        {"SeriesNumber": "+5", "InstanceNumber": " 12", "KVP": "1.2e2", "SliceThickness": ".5"},
        {"SeriesNumber": "3.0", "KVP": "120.", "SliceThickness": "-0"},
        {"InstanceNumber": "", "KVP": "", "Manufacturer": ""},
        {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "SeriesDescription": "a\\b"},
        {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jörg", "StudyDescription": "Thorax"},
        {"SpecificCharacterSet": "ISO_IR 192", "StudyDescription": "Brust ß", "PatientID": "ÄÖ1"},
        {"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "StudyDescription": "CT"},
        {"SpecificCharacterSet": "ISO_IR 13", "ProtocolName": "~x~", "StationName": "ST~1"},
        {"CTDIvol": 12.75, "SamplesPerPixel": 1},
        {"StudyDate": "20261205 ", "PatientBirthDate": "", "PatientSex": "O "},
        {"SyntheticData": "YES", "FrameOfReferenceUID": "1.2.3.45"},
    ],
)
def test_fast_decoder_agrees_with_pydicom_on_odd_values(
    attrs: dict[str, Any], ts: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_ct()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    fast, slow = _both_ways(encode(ds, ts), ts, monkeypatch)
    assert _comparable(fast) == _comparable(slow)
    assert fast[0] is not None


# -- the one-pass walk of a plain data set -----------------------------------------------------


def _plain_and_general(data: bytes, ts: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    from dicom_node.ingest import instance

    plain = check_instance(data, ts)
    with monkeypatch.context() as m:
        m.setattr(instance, "_PLAIN_WALK", False)
        general = check_instance(data, ts)
    return plain, general


def test_plain_walk_reads_what_pydicom_reads_on_every_bundled_file() -> None:
    """Where the one-pass walk takes a data set, it returns exactly the raw elements
    pydicom's generator gives, and the encoding check finds nothing (it is not run)."""
    from pydicom.data import get_charset_files, get_testdata_files
    from pydicom.uid import UID

    from dicom_node.ingest import instance
    from dicom_node.ingest.encoding import check_encoding

    plain = general_only = 0
    for name in sorted(set(get_testdata_files())) + get_charset_files("*"):
        try:
            meta, data = split_part10(Path(name).read_bytes())
            ts = UID(str(meta.TransferSyntaxUID))
            ts.is_implicit_VR  # noqa: B018 - raises for a UID that is no transfer syntax
        except Exception:
            continue
        walked = instance._walk_plain(data, ts)
        if walked is None:
            general_only += 1
            continue
        assert walked == instance._walk(data, ts.is_implicit_VR, ts.is_little_endian), name
        assert check_encoding(data, ts) is None, name
        plain += 1
    # Most bundled files are plain; compressed ones and those with undefined-length
    # sequences take the general path.
    assert plain > 100 and general_only > 30, (plain, general_only)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_plain_walk_and_general_path_agree_on_cuts_and_flipped_bytes(
    ts: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every prefix and 1,500 single-byte corruptions of a data set: the same facts or the
    same rejection, word for word, with the one-pass walk and without it."""
    import random

    data = encode(make_ct(), ts)
    rng = random.Random(20261206)
    variants = [data[:cut] for cut in range(0, len(data), 7)]
    for _ in range(1500):
        at = rng.randrange(len(data))
        variants.append(data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :])
    accepted_files = 0
    for variant in variants:
        plain, general = _plain_and_general(variant, ts, monkeypatch)
        assert _comparable(plain) == _comparable(general)
        accepted_files += plain[0] is not None
    assert accepted_files > 500  # most flipped bytes land in values the facts do not read
