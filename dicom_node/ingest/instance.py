"""Read the facts routing needs from an encoded data set, and decide whether it is usable.

The receiver stores bytes exactly as received, so it never decodes the whole data set.
:func:`check_instance` inflates a deflated data set within bounds, confirms that the bytes
are encoded as the transfer syntax says (:mod:`dicom_node.ingest.encoding`), walks every
element once (values deferred), verifies that the bytes are structurally complete, and
returns ``(facts, None)`` or ``(None, reason)`` — it does not raise for bad input; the
caller decides what to do with the reason.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import VR

from dicom_node.config import ReceiverSection
from dicom_node.ingest.encoding import DEFLATED_SYNTAXES, MIB, check_encoding, inflate, plain_elements

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010

#: Tags copied into the index's ``tags`` column for routing and policies.
ROUTING_KEYWORDS = (
    "ProtocolName",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "CTDIvol",
    "KVP",
    "SliceThickness",
    "MagneticFieldStrength",
    "ImageType",
    "ScanningSequence",
    "ContrastBolusAgent",
    "ConvolutionKernel",
)

_INDEX_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "AccessionNumber",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "InstanceNumber",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "NumberOfFrames",
    "PhotometricInterpretation",
    "SyntheticData",
)

_KEYWORDS: dict[int, str] = {int(Tag(k)): k for k in _INDEX_KEYWORDS + ROUTING_KEYWORDS}
_WANTED: frozenset[int] = frozenset(_KEYWORDS)
_SPECIFIC_CHARACTER_SET = 0x00080005
_CONTRIBUTING_EQUIPMENT = 0x0018A001


class StoreStatus(IntEnum):
    """C-STORE response statuses the receiver uses (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110
    #: Invalid SOP Instance (PS3.7 Annex C, a C-STORE status): the UID breaks the UID rules.
    INVALID_SOP_INSTANCE = 0x0117


#: The inflate limit when the caller has no configuration (tools, reconcile): the default of
#: ``[receiver] max_inflated_mb``.
DEFAULT_MAX_INFLATED_BYTES = ReceiverSection.model_fields["max_inflated_mb"].default * MIB


@dataclass(frozen=True)
class Producer:
    """One Contributing Equipment item: who made or changed the object, and in what role."""

    manufacturer: str
    station_name: str | None
    #: Purpose of Reference code value (DCM 109100 Synthesizing, 109102 Processing, ...).
    purpose: str | None


@dataclass(frozen=True)
class InstanceFacts:
    """What the index stores about one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    study_date: str | None
    accession_number: str | None
    study_description: str | None
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part: str | None
    frame_of_reference_uid: str | None
    instance_number: int | None
    tags: dict[str, Any] = field(default_factory=dict)
    #: Contributing Equipment items (empty for almost every acquired image).
    producers: tuple[Producer, ...] = ()
    #: Synthetic Data (0008,001C) is YES.
    synthetic: bool = False


@dataclass(frozen=True)
class Rejection:
    """Why an instance is refused, with the status to answer."""

    status: StoreStatus
    reason: str


def _json_value(value: Any) -> Any:
    """Convert a pydicom value to something JSON can hold."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [_json_value(v) for v in value]
    try:
        return float(value) if type(value).__name__ in ("DSfloat", "DSdecimal") else str(value)
    except (TypeError, ValueError):
        return str(value)


def _text(values: dict[str, Any], keyword: str) -> str | None:
    value = values.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def valid_uid(uid: str) -> bool:
    """A UID the node accepts: at most 64 characters, digits and dots (it also names the
    instance's directories and file in the store, so ``../x`` never gets that far)."""
    return len(uid) <= 64 and UID(uid).is_valid


#: The range of an Integer String (PS3.5 6.2) and of the index's integer columns.
_IS_MIN, _IS_MAX = -(2**31), 2**31 - 1


def _int(values: dict[str, Any], keyword: str) -> int | None:
    """The value as an integer; None when absent, not a number, or outside the IS range (an
    Instance Number of 10**20 is no number the index can hold, nor one DICOM allows)."""
    value = values.get(keyword)
    try:
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is None or _IS_MIN <= number <= _IS_MAX else None


#: Identifying values longer than their index column (``dicom_node.db.schema``, the VR's
#: maximum): cut short, one could match another patient's or study's, so the instance is
#: refused. Descriptive values are shortened in the index only (the file keeps them whole);
#: a date or UID that does not fit is no valid date or UID and is left out of the index.
_IDENTIFYING_MAX = {"patient_id": 64, "issuer_of_patient_id": 64, "accession_number": 16}
_DESCRIPTIVE_MAX = {
    "patient_name": 324,
    "patient_sex": 16,
    "study_description": 64,
    "modality": 16,
    "series_description": 64,
    "body_part": 16,
}
_DROPPED_UNLESS_FITS = {"patient_birth_date": 8, "study_date": 8, "frame_of_reference_uid": 64}


def _fit_index(facts: InstanceFacts) -> tuple[InstanceFacts | None, str | None]:
    """``facts`` with every value fitting its index column, or (None, why it is refused)."""
    for name, limit in _IDENTIFYING_MAX.items():
        value = getattr(facts, name)
        if value is not None and len(value) > limit:
            label = name.replace("_", " ").replace("id", "ID")
            return None, f"{label} longer than {limit} characters ({len(value)})"
    changes: dict[str, Any] = {}
    for name, limit in _DESCRIPTIVE_MAX.items():
        value = getattr(facts, name)
        if value is not None and len(value) > limit:
            changes[name] = value[:limit]
    for name, limit in _DROPPED_UNLESS_FITS.items():
        value = getattr(facts, name)
        if value is not None and len(value) > limit:
            changes[name] = None
    return (replace(facts, **changes) if changes else facts), None


_VR_OF: dict[int, str] = {tag: dictionary_VR(tag) for tag in _KEYWORDS}
#: Character sets (as Python codecs) under which ASCII bytes decode to themselves.
_ASCII_CODECS = frozenset({default_encoding, "latin_1", "utf_8", "ascii"})
_INTEGER = re.compile(r" *[+-]?[0-9]+ *")
_DECIMAL = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *")
_SLOW = object()
_US = struct.Struct("<H")
_FD = struct.Struct("<d")


def _fast_value(elem: Any, vr: str, ascii_text: bool) -> Any:
    """The value pydicom would give a common element, or ``_SLOW``.

    A person name comes back as its text, which is all :func:`_text` reads of it.

    Converting ~40 elements through pydicom costs ≈ 0.3 ms per instance on the C-STORE
    round trip; these cases are plain bytes. Anything else (another VR than the
    dictionary's, big endian, a text the character set might decode differently, a person
    name with its ideographic or phonetic groups) goes to pydicom.
    ``tests/test_instance.py`` checks both give the same facts for every file pydicom ships.
    """
    value = elem.value
    if not isinstance(value, bytes) or not value or (elem.VR is not None and elem.VR != vr):
        return _SLOW
    if vr == "US":
        return _US.unpack(value)[0] if len(value) == 2 and elem.is_little_endian else _SLOW
    if vr == "FD":
        return _FD.unpack(value)[0] if len(value) == 8 and elem.is_little_endian else _SLOW
    if not value.isascii():
        return _SLOW
    if vr in ("CS", "DA"):  # pydicom decodes these with the default encoding, whatever the set
        items = value.decode(default_encoding).rstrip(" \0").split("\\")
        return items[0] if len(items) == 1 else MultiValue(str, items)
    if b"\\" in value:
        return _SLOW
    if vr == "PN":
        return value.decode(default_encoding).rstrip(" \0") if ascii_text and b"=" not in value else _SLOW
    if vr == "UI":
        return UID(value.decode(default_encoding).rstrip(" \0"))
    if vr in ("SH", "LO"):
        return value.decode(default_encoding).rstrip(" \0") if ascii_text else _SLOW
    if vr == "IS":
        text = value.decode(default_encoding).rstrip(" \0")
        return int(text) if _INTEGER.fullmatch(text) else _SLOW
    if vr == "DS":
        text = value.decode(default_encoding).rstrip(" \0")
        return float(text) if _DECIMAL.fullmatch(text) else _SLOW
    return _SLOW


def _decode(raw: dict[int, Any], *, fast: bool = True) -> dict[str, Any]:
    """Convert the wanted raw elements to Python values, with the data set's character set.

    ``fast=False``: every element through pydicom (the tests compare the two).
    """
    encodings: Any = default_encoding
    charset = raw.get(_SPECIFIC_CHARACTER_SET)
    if charset is not None:
        declared = convert_raw_data_element(charset, encoding=default_encoding).value
        encodings = convert_encodings(declared or default_encoding)
    codecs = [encodings] if isinstance(encodings, str) else list(encodings)
    ascii_text = all(codec in _ASCII_CODECS for codec in codecs)
    values: dict[str, Any] = {}
    for tag, elem in raw.items():
        if tag in _KEYWORDS:
            value = _fast_value(elem, _VR_OF[tag], ascii_text) if fast else _SLOW
            if value is _SLOW:
                value = convert_raw_data_element(elem, encoding=encodings).value
            values[_KEYWORDS[tag]] = value
    return values


def _producers(body: bytes, ts: UID) -> tuple[Producer, ...]:
    """Read the Contributing Equipment Sequence (only called when the data set has one).

    A sequence pydicom cannot read is treated as absent: it says nothing about who made
    the object, and the instance itself walked cleanly.
    """
    try:
        ds = read_dataset(
            io.BytesIO(body),
            ts.is_implicit_VR,
            ts.is_little_endian,
            specific_tags=[Tag(_SPECIFIC_CHARACTER_SET), Tag(_CONTRIBUTING_EQUIPMENT)],
        )
        found = []
        for item in ds.get("ContributingEquipmentSequence", None) or []:
            purpose = item.get("PurposeOfReferenceCodeSequence") or []
            code = str(purpose[0].get("CodeValue", "")).strip() if purpose else ""
            station = str(item.get("StationName", "") or "").strip()
            found.append(
                Producer(str(item.get("Manufacturer", "") or "").strip(), station or None, code or None)
            )
        return tuple(found)
    except Exception:
        return ()


#: Value Representations pydicom can read (PS3.5 6.2); any other is a corrupted header.
_KNOWN_VRS = frozenset(vr.value for vr in VR)


def _walk(data: bytes, implicit_vr: bool, little_endian: bool) -> dict[int, Any]:
    """Walk every top-level element; return the wanted ones. Raises on malformed bytes."""
    fp = io.BytesIO(data)
    wanted: dict[int, Any] = {}
    end = 0
    size = len(data)
    for elem in data_element_generator(fp, implicit_vr, little_endian, defer_size=256):
        length = getattr(elem, "length", None)
        if length is None or length == _UNDEFINED:
            end = fp.tell()  # read through its delimiter
        else:
            end = elem.value_tell + length  # type: ignore[union-attr]
            if end > size:
                raise ValueError(f"element {Tag(elem.tag)} needs {end - size} more bytes than were sent")
        tag = int(elem.tag)
        if tag not in _WANTED and elem.VR is not None and elem.VR not in _KNOWN_VRS:
            # a flipped bit in an explicit VR of an element no check decodes: no reader could
            # read the stored file (a decoded element's own decoding says why, below)
            raise ValueError(f"element {Tag(elem.tag)} has no known VR ({elem.VR!r})")
        if tag in _WANTED:
            if elem.value is None and length:  # deferred: take the value from the bytes
                elem = elem._replace(value=data[elem.value_tell : elem.value_tell + length])  # type: ignore[union-attr]
            wanted[tag] = elem
        elif tag in (_PIXEL_DATA, _CONTRIBUTING_EQUIPMENT):
            wanted[tag] = elem
    if end != size:
        raise ValueError(f"{size - end} trailing bytes do not form a complete element")
    return wanted


#: Values longer than this are read lazily by :func:`_walk` (pydicom's ``defer_size``).
_DEFER_BYTES = 256
#: Off: every data set takes the general path (the tests compare both).
_PLAIN_WALK = True
_RECORDED = _WANTED | {_PIXEL_DATA, _CONTRIBUTING_EQUIPMENT}


def _walk_plain(data: bytes, ts: UID) -> dict[int, Any] | None:
    """What :func:`_walk` returns, in one pass, for a plain data set (see
    :func:`~dicom_node.ingest.encoding.plain_elements`); None: take the general path.

    The raw elements are built as pydicom's generator builds them, so everything after the
    walk is the same (``tests/test_instance.py`` compares both on every bundled file).
    """
    heads = plain_elements(data, ts, _RECORDED)
    if heads is None:
        return None
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    raw: dict[int, Any] = {}
    for tag, head in heads.items():
        vr = None if head.vr is None else head.vr.decode()
        start, length = head.value_at, head.length
        value: Any
        if length == 0:
            value = empty_value_for_VR(vr, raw=True)
        elif length <= _DEFER_BYTES:
            value = bytes(data[start : start + length])
        else:
            value = data[start : start + length] if tag in _WANTED else None
        raw[tag] = RawDataElement(BaseTag(tag), vr, length, value, start, implicit, little)
    return raw


def _expected_native_pixel_bytes(values: dict[str, Any]) -> int | None:
    rows, cols = _int(values, "Rows"), _int(values, "Columns")
    bits = _int(values, "BitsAllocated")
    if not rows or not cols or not bits:
        return None
    samples = _int(values, "SamplesPerPixel") or 1
    frames = _int(values, "NumberOfFrames") or 1
    if _text(values, "PhotometricInterpretation") in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        samples = 2  # chroma subsampled: two samples per pixel on average (PS3.3 C.7.6.3.1.2)
    total_bits = rows * cols * samples * frames * bits
    return (total_bits + 7) // 8


def check_instance(
    data: bytes,
    transfer_syntax: str,
    claimed_sop_uid: str | None = None,
    *,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
) -> tuple[InstanceFacts | None, Rejection | None]:
    """Decide whether an encoded data set can be stored and indexed.

    Parameters
    ----------
    data
        The data set bytes exactly as received (no file meta).
    transfer_syntax
        The negotiated transfer syntax UID.
    claimed_sop_uid
        The Affected SOP Instance UID of the C-STORE request, if any.
    max_inflated_bytes
        A deflated data set larger than this once inflated is refused (Out of Resources).

    Returns
    -------
    (facts, None) when usable, (None, rejection) otherwise.
    """
    ts = UID(transfer_syntax)
    body: bytes | None = data
    if ts in DEFLATED_SYNTAXES:
        body, refused = inflate(data, max_inflated_bytes)
        if refused is not None:
            status = (
                StoreStatus.OUT_OF_RESOURCES
                if refused.over_configured_limit
                else StoreStatus.CANNOT_UNDERSTAND
            )
            return None, Rejection(status, refused.reason)
    assert body is not None
    # A plain data set is walked once, and is encoded as promised; anything else takes the
    # general path: pydicom's walk, then the encoding check.
    raw = _walk_plain(body, ts) if _PLAIN_WALK else None
    if raw is None:
        try:
            raw = _walk(body, ts.is_implicit_VR, ts.is_little_endian)
        except Exception as exc:  # pydicom raises many types for garbage; all mean the same here
            mismatch = check_encoding(body, ts)
            if mismatch is not None and mismatch.reads_as_other_vr:  # not garbage: the wrong encoding
                return None, Rejection(StoreStatus.CANNOT_UNDERSTAND, mismatch.reason)
            return None, Rejection(StoreStatus.CANNOT_UNDERSTAND, f"cannot parse data set: {exc}")
        # pydicom reads on where the bytes break the transfer syntax (implicit VR found where
        # explicit was promised, say); what a receiving tool cannot read is refused here.
        mismatch = check_encoding(body, ts)
        if mismatch is not None:
            return None, Rejection(StoreStatus.CANNOT_UNDERSTAND, mismatch.reason)
    if not raw:
        return None, Rejection(StoreStatus.CANNOT_UNDERSTAND, "cannot parse data set: no elements")

    try:
        ds = _decode(raw)
        missing = [
            k
            for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
            if not _text(ds, k)
        ]
    except Exception as exc:
        return None, Rejection(StoreStatus.CANNOT_UNDERSTAND, f"cannot decode attributes: {exc}")
    if missing:
        return None, Rejection(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"required attribute missing: {', '.join(missing)}",
        )
    sop_uid = _text(ds, "SOPInstanceUID") or ""
    if claimed_sop_uid and claimed_sop_uid.strip("\0 ") != sop_uid:
        return None, Rejection(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            "SOP Instance UID in the data set differs from the C-STORE request",
        )
    pixel = raw.get(_PIXEL_DATA)
    if pixel is not None and not ts.is_compressed:
        expected = _expected_native_pixel_bytes(ds)
        length = getattr(pixel, "length", None)
        if expected is not None and length is not None and length != _UNDEFINED and length < expected:
            return None, Rejection(
                StoreStatus.CANNOT_UNDERSTAND,
                f"pixel data truncated: {length} bytes, image attributes need {expected}",
            )

    try:
        tags = {k: _json_value(ds[k]) for k in ROUTING_KEYWORDS if k in ds}
        facts = InstanceFacts(
            sop_class_uid=_text(ds, "SOPClassUID") or "",
            sop_instance_uid=sop_uid,
            study_uid=_text(ds, "StudyInstanceUID") or "",
            series_uid=_text(ds, "SeriesInstanceUID") or "",
            patient_id=_text(ds, "PatientID") or "",
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID") or "",
            patient_name=_text(ds, "PatientName"),
            patient_birth_date=_text(ds, "PatientBirthDate"),
            patient_sex=_text(ds, "PatientSex"),
            study_date=_text(ds, "StudyDate"),
            accession_number=_text(ds, "AccessionNumber"),
            study_description=_text(ds, "StudyDescription"),
            modality=_text(ds, "Modality"),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            body_part=_text(ds, "BodyPartExamined"),
            frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
            instance_number=_int(ds, "InstanceNumber"),
            tags=tags,
            producers=_producers(body, ts) if _CONTRIBUTING_EQUIPMENT in raw else (),
            synthetic=(_text(ds, "SyntheticData") or "").upper() == "YES",
        )
    except Exception as exc:
        return None, Rejection(StoreStatus.CANNOT_UNDERSTAND, f"cannot decode attributes: {exc}")
    for uid in (facts.sop_class_uid, facts.sop_instance_uid, facts.study_uid, facts.series_uid):
        if not valid_uid(uid):
            return None, Rejection(StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"invalid UID {uid[:70]!r}")
    fitted, too_long = _fit_index(facts)
    if fitted is None:
        return None, Rejection(StoreStatus.CANNOT_UNDERSTAND, str(too_long))
    return fitted, None
