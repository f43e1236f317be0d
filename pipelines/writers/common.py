"""What every writer shares: coded concepts, units, argument checks and equipment.

* the local coding scheme ``99DCMNODE`` for concepts without a standard code (declared,
  by :func:`_finish`, in the Coding Scheme Identification Sequence of each object that
  uses it), and the standard concepts the writers cite;
* UCUM units (:func:`ucum`, :func:`ucum_for_units`);
* the argument checks every writer runs when it is built (provenance, UID factory,
  series number, array shape), each naming the argument at fault;
* Contributing Equipment (the source's scanner, the node, the model) and Software
  Versions, which carry the provenance of every object;
* the output kinds (``KIND_*``) and :func:`kind_of`, which tells them apart again;
* the source's Patient and Study modules, copied whole into every output
  (:func:`_copy_patient_and_study`), and its Timezone Offset From UTC with the output's own
  dates and times in that zone (:func:`_keep_timezone`); its Request Attributes Sequence
  into every image object (:func:`_keep_request`);
* what the writers read from the source: windows, per-frame values (through
  :func:`pipelines.geometry.frame_group`), references, body part, plane geometry.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import Iterable, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    MRImageStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    SpatialRegistrationStorage,
)
from pydicom.valuerep import DA, DT, TM, format_number_as_ds, validate_value

from pipelines import spill
from pipelines.geometry import frame_group
from pipelines.provenance import OutputProvenance, PriorReference, ProvenanceError
from pipelines.uids import UidFactory
from pipelines.volume import Volume

#: SOP Class UID → whether its IOD holds pixel data: highdicom's answer, asked once per
#: class (see :func:`_remember_which_classes_are_images`).
_HOLDS_PIXEL_DATA: dict[str, bool] = {}


def pixel_data_answers() -> dict[str, bool]:
    """The "holds pixel data?" answers this process has (to hand to another one)."""
    return dict(_HOLDS_PIXEL_DATA)


def learn_pixel_data_answers(answers: dict[str, bool]) -> None:
    """Take answers another process had: this one need not load the standard's tables
    (62 MB of Python objects) to ask again (the encode helper, :mod:`pipelines.parallel`)."""
    _HOLDS_PIXEL_DATA.update({str(k): bool(v) for k, v in answers.items()})


def _remember_which_classes_are_images() -> None:
    """highdicom asks, for every object it builds (each derived slice's acquisition
    equipment item, each multi-frame image), whether the SOP class holds pixel data, and
    for every source image of a multi-frame object (each Parametric Map, the SEG: 300
    questions each for a 300-slice series) whether the SOP class is a multi-frame one, by
    walking the standard's IOD tables: 6 ms and 0.35 ms a question, about 2.6 s for a
    300-slice restoration job. Both answers depend on the SOP Class UID alone, so they are
    remembered per class (the modules that imported the functions get the remembering
    ones; the answers are highdicom's own: a class is asked with a data set that carries
    only its SOP Class UID)."""
    import functools
    import importlib

    from highdicom import _standard_utils

    has_pixels = _standard_utils.does_iod_have_pixel_data

    def remembered(sop_class_uid: str) -> bool:
        answer = _HOLDS_PIXEL_DATA.get(sop_class_uid)
        if answer is None:
            answer = _HOLDS_PIXEL_DATA[sop_class_uid] = bool(has_pixels(sop_class_uid))
        return answer

    remembered.__doc__ = has_pixels.__doc__
    multiframe = _standard_utils.is_multiframe_image

    @functools.lru_cache(maxsize=256)
    def multiframe_class(sop_class_uid: str) -> bool:
        probe = Dataset()
        probe.SOPClassUID = sop_class_uid
        return bool(multiframe(probe))

    def is_multiframe_image(dataset: Dataset) -> bool:
        return multiframe_class(str(dataset.SOPClassUID))

    is_multiframe_image.__doc__ = multiframe.__doc__
    for name in (
        "highdicom.base_content",
        "highdicom.content",
        "highdicom.image",
        "highdicom.spatial",
        "highdicom.utils",
        "highdicom.sr.content",
        "highdicom.sr.templates",
        "highdicom.pr.content",
    ):
        module = importlib.import_module(name)
        if getattr(module, "does_iod_have_pixel_data", None) is has_pixels:
            module.does_iod_have_pixel_data = remembered  # type: ignore[attr-defined]
        if getattr(module, "is_multiframe_image", None) is multiframe:
            module.is_multiframe_image = is_multiframe_image  # type: ignore[attr-defined]


_remember_which_classes_are_images()

#: SOP classes whose "holds pixel data?" answer :func:`warm_up` asks ahead (CT and MR Image
#: Storage: the sources of every shipped pipeline).
_SOURCE_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4")


def warm_up() -> float:
    """Load the DICOM standard's tables that highdicom reads when it builds its first
    object (module attributes, IOD modules, SOP classes: about 23 MB of JSON parsed, 0.4 to
    0.8 s here), so that a worker pays it at start and not inside its first job's encode.
    They stay loaded for the process (highdicom caches them). Returns the seconds taken."""
    import time

    from highdicom import _standard_utils, base_content

    started = time.perf_counter()
    _standard_utils.get_module_attribute_map()
    _standard_utils.get_iod_module_map()
    _standard_utils.get_sop_class_iod_map()
    for sop_class in _SOURCE_CLASSES:
        base_content.does_iod_have_pixel_data(sop_class)
    return time.perf_counter() - started


__all__ = [
    "KIND_DERIVED",
    "KIND_HALLUCINATION",
    "KIND_OVERLAY",
    "KIND_REPORT",
    "KIND_EXTENT",
    "KIND_PROBABILITY",
    "KIND_SUSPECT",
    "KIND_UNCERTAINTY",
    "LOCAL_SCHEME",
    "NODE_MANUFACTURER",
    "SMOOTHING",
    "SYNTHESIS",
    "kind_of",
    "local_code",
    "ucum",
    "ucum_for_units",
]

#: Manufacturer of every object written here (General Equipment, Contributing Equipment).
NODE_MANUFACTURER = "dicom-node"
#: Local (private) coding scheme for concepts no standard code names.
LOCAL_SCHEME = "99DCMNODE"
_LOCAL_SCHEME_NAME = "dicom-node local codes"

#: DCM 113087 "Smoothing": the default Derivation Code of a derived image.
SMOOTHING = CodedConcept("113087", "DCM", "Smoothing")
#: Derivation Code of an image a model synthesised from an image of another kind (e.g. a
#: synthetic CT from an MR). CID 7203 has no such concept, hence the local scheme; the
#: model's Contributing Equipment item says DCM 109100 "Synthesizing Equipment" as well.
SYNTHESIS = CodedConcept("AI-SYNTHESIS", LOCAL_SCHEME, "Image synthesis by an AI model")
#: DCM 121322 "Source image for image processing operation" (Purpose of Reference).
_SOURCE_FOR_PROCESSING = CodedConcept("121322", "DCM", "Source image for image processing operation")
#: DCM 109102 "Processing Equipment" / 109100 "Synthesizing Equipment" (CID 7005).
_PROCESSING_EQUIPMENT = CodedConcept.from_code(codes.DCM.ProcessingEquipment)
_SYNTHESIZING_EQUIPMENT = CodedConcept.from_code(codes.DCM.SynthesizingEquipment)

_UCUM_MEANINGS = {
    "[hnsf'U]": "Hounsfield unit",
    "1": "no units",
    "{ratio}": "ratio",
    "%": "Percent",
    "mm": "millimeter",
    "mm2": "square millimeter",
    "mm3": "cubic millimeter",
    "mL": "milliliter",
    "s": "second",
    "ms": "millisecond",
    "[arb'U]": "arbitrary unit",
    "{counts}": "Counts",
    "dB": "decibel",
}


# --------------------------------------------------------------------------- helpers


def local_code(value: str, meaning: str) -> CodedConcept:
    """A concept of the local coding scheme ``99DCMNODE`` (value ≤ 16 characters)."""
    if not value or len(value) > 16:
        raise ValueError(f"local code value must be 1-16 characters: {value!r}")
    return CodedConcept(value, LOCAL_SCHEME, meaning[:64])


def ucum(code: str | Code | CodedConcept) -> CodedConcept:
    """A UCUM unit as a coded concept (``"[hnsf'U]"`` → Hounsfield unit, ``"1"`` → no units).

    A :class:`~pydicom.sr.coding.Code` or :class:`~highdicom.sr.CodedConcept` passes through.
    """
    if isinstance(code, CodedConcept):
        return code
    if isinstance(code, Code):
        return CodedConcept.from_code(code)
    if not isinstance(code, str) or not code.strip():
        raise ValueError(f"a UCUM unit code is required (got {code!r})")
    return CodedConcept(code, "UCUM", _UCUM_MEANINGS.get(code, code))


def ucum_for_units(units: str) -> str:
    """The UCUM code for a :attr:`Volume.units` string: ``"HU"`` → ``"[hnsf'U]"``; ``""`` → ``"1"``.

    Raises
    ------
    ValueError
        Units this function does not know; pass the UCUM code explicitly.
    """
    table = {"HU": "[hnsf'U]", "": "1", "US": "1", "MM": "mm", "%": "%"}
    key = units.strip().upper() if units.strip() != "%" else "%"
    if key not in table:
        raise ValueError(f"no UCUM code known for volume units {units!r}; pass units= explicitly")
    return table[key]


def _concept(owner: str, argument: str, value: Any) -> CodedConcept:
    if isinstance(value, CodedConcept):
        return value
    if isinstance(value, Code):
        return CodedConcept.from_code(value)
    raise TypeError(f"{owner}: argument {argument!r} must be a pydicom Code or highdicom CodedConcept")


def _now(source: Dataset | None = None) -> dt.datetime:
    """Now, in the zone ``source``'s Timezone Offset From UTC names (else the local one)."""
    now = dt.datetime.now().astimezone()
    zone = None if source is None else _timezone_of(source)
    return now if zone is None else now.astimezone(zone)


def _ds(value: float) -> str:
    """A Decimal String (≤ 16 characters) for ``value``."""
    return format_number_as_ds(float(value))


#: Specific Character Set terms highdicom takes (``hd.SpecificCharacterSetValues``).
_HIGHDICOM_CHARSETS = frozenset(term.value for term in hd.SpecificCharacterSetValues)
#: Multi-byte code-extension terms, which may not be a multi-valued set's first value.
_MULTI_BYTE_EXTENSIONS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149"})
#: What an object highdicom builds carries when the source's set is one it does not take.
UTF8 = "ISO_IR 192"


def output_character_set(source: Dataset) -> str | list[str] | None:
    """The Specific Character Set of an object highdicom builds from ``source``.

    highdicom copies the source's set and refuses some that sources send: the empty first
    value of a code-extension set (``\\ISO 2022 IR 87``, what Japanese scanners write; the
    standard reads it as ``ISO 2022 IR 6``, PS3.3 C.12.1.1.2), a set it has no term for
    (Korean ``ISO 2022 IR 149``) or a lone code-extension term. Such a job failed at its
    first Parametric Map. Now: the source's own set where highdicom takes it (the empty
    first value spelled ``ISO 2022 IR 6``), else UTF-8 (``ISO_IR 192``): pydicom has
    already decoded the source's text, so the names arrive unchanged either way. ``None``
    when the source has no set (the default repertoire)."""
    raw = source.get("SpecificCharacterSet")
    if raw is None:
        return None
    values = [str(v).strip() for v in (raw if isinstance(raw, (MultiValue, list, tuple)) else [raw])]
    if len(values) <= 1:
        term = values[0] if values else ""
        if not term:
            return None
        return term if term in _HIGHDICOM_CHARSETS and not term.startswith("ISO 2022") else UTF8
    if not values[0]:
        values[0] = "ISO 2022 IR 6"
    fits = (
        all(v in _HIGHDICOM_CHARSETS and v.startswith("ISO 2022") for v in values)
        and values[0] not in _MULTI_BYTE_EXTENSIONS
    )
    return values if fits else UTF8


def _lo(text: str) -> str:
    """Trim to the 64 characters of an LO value."""
    return text[:64]


def _check_provenance(owner: str, provenance: Any) -> OutputProvenance:
    if provenance is None:
        raise ProvenanceError(
            f"{owner}: argument 'provenance' is required (an OutputProvenance naming pipeline, "
            "model, weights and node); got None"
        )
    if not isinstance(provenance, OutputProvenance):
        raise TypeError(
            f"{owner}: argument 'provenance' must be a pipelines.provenance.OutputProvenance, "
            f"got {type(provenance).__name__}"
        )
    # Every object is read back with OutputProvenance.parse: a value that would not
    # survive the round trip (e.g. a model name with a space) fails here, not in an audit.
    try:
        parsed = OutputProvenance.parse(provenance.description())
    except ValueError:
        parsed = {}
    expected = {
        "node_version": provenance.node_version,
        "pipeline": provenance.pipeline,
        "pipeline_version": provenance.pipeline_version,
        "model_name": provenance.model_name,
        "model_version": provenance.model_version,
        "weights_sha256": provenance.weights_sha256,
    }
    wrong = sorted(k for k, v in expected.items() if parsed.get(k) != v)
    if wrong:
        raise ProvenanceError(
            f"{owner}: provenance field(s) {', '.join(wrong)} would not read back from the "
            "objects (no spaces allowed in names and versions)"
        )
    return provenance


def _check_uids(owner: str, uids: Any) -> UidFactory:
    if not isinstance(uids, UidFactory):
        raise TypeError(
            f"{owner}: argument 'uids' must be a pipelines.uids.UidFactory, got {type(uids).__name__}"
        )
    return uids


def _check_series_number(owner: str, series_number: Any) -> int:
    if isinstance(series_number, bool) or not isinstance(series_number, int) or not 0 < series_number < 2**31:
        raise ValueError(
            f"{owner}: argument 'series_number' must be a positive integer, got {series_number!r}"
        )
    return series_number


def _check_array(owner: str, volume: Volume, array: Any, name: str) -> np.ndarray:
    if not isinstance(volume, Volume):
        raise TypeError(f"{owner}: 'volume' must be a pipelines.volume.Volume, got {type(volume).__name__}")
    values = np.asarray(array)
    if values.shape != volume.array.shape:
        raise ValueError(
            f"{owner}: '{name}' has shape {values.shape}, the volume {volume.array.shape} "
            "(slices, rows, columns)"
        )
    if values.dtype != bool and not spill.all_finite(values):  # a slab at a time
        raise ValueError(f"{owner}: '{name}' has NaN or infinite values")
    return values


def _software_versions(provenance: OutputProvenance) -> Any:
    """Software Versions (LO, multi-valued): node, pipeline, model.

    A list, which pydicom stores as a multi-value (highdicom's annotation says tuple).
    """
    return [
        _lo(provenance.node_version),
        _lo(f"{provenance.pipeline} {provenance.pipeline_version}"),
        _lo(f"{provenance.model_name} {provenance.model_version}"),
    ]


def _contributing_equipment(
    provenance: OutputProvenance, source: Dataset | None = None, *, include_acquisition: bool = True
) -> list[hd.ContributingEquipment]:
    """Contributing Equipment items: the source's scanner (optional), the node, the model.

    The node did the processing (DCM 109102); the model is Synthesizing Equipment
    (DCM 109100) when its pixels are generated, Processing Equipment otherwise. Both carry
    ``provenance.description()`` as Contribution Description, which
    :meth:`OutputProvenance.parse` reads back.
    """
    now = _now()
    items: list[hd.ContributingEquipment] = []
    if include_acquisition and source is not None:
        try:
            items.append(hd.ContributingEquipment.for_image_acquisition(source))
        except (AttributeError, ValueError):
            pass  # a source without Manufacturer: no acquisition item rather than an invented one
    description = provenance.description()
    items.append(
        hd.ContributingEquipment(
            manufacturer=NODE_MANUFACTURER,
            purpose_of_reference=_PROCESSING_EQUIPMENT,
            manufacturer_model_name=NODE_MANUFACTURER,
            software_versions=_lo(provenance.node_version),
            station_name=provenance.station or None,
            contribution_datetime=now,
            contribution_description=description,
        )
    )
    items.append(
        hd.ContributingEquipment(
            manufacturer=NODE_MANUFACTURER,
            purpose_of_reference=_SYNTHESIZING_EQUIPMENT if provenance.synthetic else _PROCESSING_EQUIPMENT,
            manufacturer_model_name=_lo(provenance.model_name),
            software_versions=_lo(provenance.model_version),
            device_serial_number=provenance.weights_sha256,
            contribution_datetime=now,
            contribution_description=description,
        )
    )
    return items


def _code_item(concept: CodedConcept | Code) -> Dataset:
    item = Dataset()
    item.CodeValue = concept.value
    item.CodingSchemeDesignator = concept.scheme_designator
    item.CodeMeaning = concept.meaning
    return item


def _uses_local_scheme(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                if item.get("CodingSchemeDesignator") == LOCAL_SCHEME or _uses_local_scheme(item):
                    return True
    return False


#: The top-level attributes of the Patient, Clinical Trial Subject, General Study, Patient
#: Study and Clinical Trial Study modules, as highdicom's tables of the standard list them
#: (what its ``copy_patient_and_study_information`` copies into the objects it builds), and
#: Ethnic Group, which those tables no longer list but sources carry. Every output copies
#: those its source has: a PACS files an object by its Patient and Study modules, and two
#: outputs of one job must not tell different stories of the same patient and study.
_PATIENT_STUDY_KEYWORDS = (
    # Patient
    "ReferencedPatientSequence", "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar", "PatientSex", "QualityControlSubject", "StrainDescription",
    "StrainNomenclature", "StrainStockSequence", "StrainAdditionalInformation", "StrainCodeSequence",
    "GeneticModificationsSequence", "OtherPatientNames", "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence", "EthnicGroup", "EthnicGroupCodeSequence",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription",
    "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientComments", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "OtherClinicalTrialProtocolIDsSequence", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID", "ClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "StudyDescription", "ProcedureCodeSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "ReferencedStudySequence", "StudyID",
    "RequestingService", "RequestingServiceCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize",
    "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
    "PatientWeight", "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus",
    "AdditionalPatientHistory", "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered",
    "ReasonForVisit", "ReasonForVisitCodeSequence", "AdmissionID", "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence", "PatientState",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType", "ClinicalTrialTimePointTypeCodeSequence",
    "IssuerOfClinicalTrialTimePointID", "ConsentForClinicalTrialUseSequence",
    # SOP Common, but it says whether the dates copied above were shifted (de-identification)
    "LongitudinalTemporalInformationModified",
)  # fmt: skip


def _copy_patient_and_study(ds: Dataset, source: Dataset) -> None:
    """Every attribute of :data:`_PATIENT_STUDY_KEYWORDS` ``source`` has and ``ds`` lacks
    (a copy: fixing an invalid value in ``ds`` never changes the source)."""
    for keyword in _PATIENT_STUDY_KEYWORDS:
        if keyword in source and keyword not in ds:
            ds[keyword] = copy.deepcopy(source[keyword])


#: Timezone Offset From UTC: ``&ZZXX`` (PS3.3 C.12.1.1.8), e.g. ``+0900``, ``-0330``.
_UTC_OFFSET = re.compile(r"([+-])(\d\d)(\d\d)")


def _timezone_of(ds: Dataset) -> dt.timezone | None:
    """The zone ``ds``'s Timezone Offset From UTC (0008,0201) names; None where it names
    none (absent, or not an offset ``&ZZXX`` from -1200 to +1400)."""
    match = _UTC_OFFSET.fullmatch(str(ds.get("TimezoneOffsetFromUTC", "") or "").strip())
    if match is None:
        return None
    sign, hours, minutes = match[1], int(match[2]), int(match[3])
    offset = dt.timedelta(hours=hours, minutes=minutes)
    if minutes > 59 or offset > dt.timedelta(hours=14 if sign == "+" else 12):
        return None
    return dt.timezone(-offset if sign == "-" else offset)


#: The date and time pairs the writers (and highdicom) stamp with the local time an
#: object is made.
_MADE_AT = (
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("ContentDate", "ContentTime"),
    ("SeriesDate", "SeriesTime"),
)
#: DCM 109101 "Acquisition Equipment": a Contributing Equipment item of the source's
#: scanner, whose Contribution DateTime is the source's acquisition (in the source's zone).
_ACQUISITION_EQUIPMENT = "109101"


def _in_zone(local: dt.datetime, zone: dt.tzinfo) -> dt.datetime:
    """A naive local date and time, as the same moment in ``zone``."""
    return local.astimezone().astimezone(zone)


def _keep_timezone(ds: Dataset, source: Dataset) -> None:
    """The source's Timezone Offset From UTC, with the object's own moments in its zone.

    The offset applies to every date and time of an object without one of its own: the
    Study Date and Time (and the Patient's Birth Time, ...) copied from the source are in
    the source's zone, and an output without the offset has them read in the receiver's.
    So the output states the source's offset, and what it stamped in local time (Instance
    Creation, Content and Series Date and Time; a Contribution DateTime without an offset
    of its own, as highdicom writes its item) is moved into that zone. A source without
    an offset (or with an invalid one) leaves the object as it is."""
    zone = _timezone_of(source)
    if zone is None:
        return
    ds.TimezoneOffsetFromUTC = str(source.TimezoneOffsetFromUTC).strip()
    for date_keyword, time_keyword in _MADE_AT:
        day, time = str(ds.get(date_keyword, "") or ""), str(ds.get(time_keyword, "") or "")
        if not day or not time:
            continue
        try:
            moment = _in_zone(dt.datetime.combine(DA(day), TM(time)), zone)
        except (TypeError, ValueError):
            continue  # not a stamp of this node's (it writes valid ones)
        fraction = "." in time
        ds[date_keyword].value = moment.strftime("%Y%m%d")
        ds[time_keyword].value = moment.strftime("%H%M%S.%f" if fraction else "%H%M%S")
    for item in ds.get("ContributingEquipmentSequence", []):
        stamped = str(item.get("ContributionDateTime", "") or "")
        purpose = item.get("PurposeOfReferenceCodeSequence") or [Dataset()]
        if not stamped or str(purpose[0].get("CodeValue", "")) == _ACQUISITION_EQUIPMENT:
            continue
        try:
            when = DT(stamped)
        except ValueError:
            continue
        if when.tzinfo is None:
            item.ContributionDateTime = _in_zone(when, zone).strftime("%Y%m%d%H%M%S.%f%z")


def _keep_request(ds: Dataset, source: Dataset) -> None:
    """The source's Request Attributes Sequence (General Series, the order the scanner
    fulfilled: Requested Procedure ID, Accession Number, Scheduled Procedure Step): an
    image object derived from the series answers the same request, and a RIS or PACS that
    files series by their order finds the outputs beside their source. A copy; absent in
    the source, absent here."""
    if "RequestAttributesSequence" in source and "RequestAttributesSequence" not in ds:
        ds.RequestAttributesSequence = copy.deepcopy(source.RequestAttributesSequence)


#: De-identification Method of an output whose source says Patient Identity Removed YES
#: and names no method: the fact is kept, the method is not invented.
_UNSTATED_DEIDENTIFICATION = "not stated by the source (its Patient Identity Removed is YES)"


def _state_deidentification(ds: Dataset) -> None:
    """Patient Identity Removed YES requires a De-identification Method (or its code
    sequence; Type 1C). Legacy files say YES and name neither; every object copied from
    them would inherit the gap, so the output says the method is unknown."""
    removed = str(ds.get("PatientIdentityRemoved", "")).strip().upper() == "YES"
    if removed and not ds.get("DeidentificationMethod") and not ds.get("DeidentificationMethodCodeSequence"):
        ds.DeidentificationMethod = _UNSTATED_DEIDENTIFICATION


#: Descriptive patient and study attributes the outputs copy from their source, which a
#: legacy source may hold with invalid values (an Age "22Y", a 64-character Study ID):
#: Type 2 ones are then written empty, the others left out. Identity (Patient Name and ID,
#: Accession Number, the UIDs) is copied as received, valid or not: it files the outputs.
_EMPTIED_WHEN_INVALID = (
    "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
)  # fmt: skip
_LEFT_OUT_WHEN_INVALID = ("PatientAge", "PatientSize", "PatientWeight", "StudyDescription")


def _valid(vr: str, value: Any) -> bool:
    values = value if isinstance(value, MultiValue) else [value]
    try:
        for item in values:
            validate_value(vr, str(item), config.RAISE)
    except ValueError:
        return False
    return True


def _drop_invalid_copies(ds: Dataset) -> None:
    """Write no invalid value of the descriptive attributes copied from the source."""
    for keyword in (*_EMPTIED_WHEN_INVALID, *_LEFT_OUT_WHEN_INVALID):
        elem = ds[keyword] if keyword in ds else None
        if elem is None or elem.value in (None, "") or _valid(elem.VR, elem.value):
            continue
        if keyword in _EMPTIED_WHEN_INVALID:
            ds[keyword].value = ""
        else:
            del ds[keyword]


def _cite_priors(ds: Dataset, priors: Iterable[PriorReference]) -> None:
    """Name the prior series a job used in ``ds``, merged with what it already references.

    A report (SR) lists them in Pertinent Other Evidence Sequence (Hierarchical SOP
    Instance Reference: Referenced SOP Sequence); any other object in the Common Instance
    Reference module — Studies Containing Other Referenced Instances for another study,
    Referenced Series for its own (Referenced Instance Sequence).
    """
    priors = list(priors)
    if not priors:
        return
    own_study = str(ds.get("StudyInstanceUID", ""))
    report = ds.get("Modality") == "SR"
    instances_key = "ReferencedSOPSequence" if report else "ReferencedInstanceSequence"
    others_key = (
        "PertinentOtherEvidenceSequence" if report else "StudiesContainingOtherReferencedInstancesSequence"
    )
    # study UID → series UID → SOP Instance UID → SOP Class UID, what ds cites already first
    studies: dict[str, dict[str, dict[str, str]]] = {}
    cited = [(own_study, s) for s in ([] if report else ds.get("ReferencedSeriesSequence", []))]
    for other in ds.get(others_key, []):
        cited += [(str(other.StudyInstanceUID), s) for s in other.ReferencedSeriesSequence]
    for study_uid, series in cited:
        held = studies.setdefault(study_uid, {}).setdefault(str(series.SeriesInstanceUID), {})
        for ref in series.get(instances_key, []):
            held[str(ref.ReferencedSOPInstanceUID)] = str(ref.ReferencedSOPClassUID)
    for prior in priors:
        held = studies.setdefault(prior.study_uid, {}).setdefault(prior.series_uid, {})
        held.update({sop_uid: sop_class for sop_class, sop_uid in prior.instances})

    def series_items(by_series: dict[str, dict[str, str]]) -> list[Dataset]:
        items = []
        for series_uid, instances in by_series.items():
            item = Dataset()
            item.SeriesInstanceUID = series_uid
            setattr(item, instances_key, [_reference_item(c, u) for u, c in instances.items()])
            items.append(item)
        return items

    if not report and studies.get(own_study):
        ds.ReferencedSeriesSequence = series_items(studies[own_study])
    others = []
    for study_uid, by_series in studies.items():
        if study_uid != own_study:  # an SR's own study is its Current Requested Procedure Evidence
            item = Dataset()
            item.StudyInstanceUID = study_uid
            item.ReferencedSeriesSequence = series_items(by_series)
            others.append(item)
    if others:
        setattr(ds, others_key, others)


def _finish(ds: Dataset, provenance: OutputProvenance | None = None) -> Dataset:
    """What every writer does last: no invalid value copied from a legacy source
    (:func:`_drop_invalid_copies`) and the Patient module's de-identification facts
    complete (:func:`_state_deidentification`); the local coding scheme declared where
    the object uses it; the job's prior series cited (:func:`_cite_priors`)."""
    if provenance is not None:
        _cite_priors(ds, provenance.priors)
    _drop_invalid_copies(ds)
    _state_deidentification(ds)
    if _uses_local_scheme(ds):
        known = [
            i for i in ds.get("CodingSchemeIdentificationSequence", []) if i.get("CodingSchemeDesignator")
        ]
        if not any(i.CodingSchemeDesignator == LOCAL_SCHEME for i in known):
            item = Dataset()
            item.CodingSchemeDesignator = LOCAL_SCHEME
            item.CodingSchemeName = _LOCAL_SCHEME_NAME
            item.CodingSchemeResponsibleOrganization = NODE_MANUFACTURER
            ds.CodingSchemeIdentificationSequence = [*known, item]
    return ds


def _ai_series_description(what: str, *, synthetic: bool = False) -> str:
    """Series Description that says AI (and SYNTHETIC for generated pixels), ≤ 64 chars."""
    words = re.findall(r"[A-Z]+", what.upper())
    # a predicted image (prognosis) says what it is instead: "AI PREDICTED ... not an acquisition"
    synthetic = synthetic and "PREDICTED" not in words
    prefix = [w for w, wanted in (("AI", True), ("SYNTHETIC", synthetic)) if wanted and w not in words]
    return _lo(" ".join([*prefix, what]))


def _sources_by_uid(volume: Volume) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in volume.datasets}


def _frame_value(ds: Dataset, frame_number: int | None, keyword: str, *groups: str) -> Any:
    """``keyword`` at the top level, else in the frame's (or shared) functional groups."""
    value = ds.get(keyword)
    if value is not None and value != "":
        return value
    for group in groups:
        item = frame_group(ds, frame_number, group)
        if item is not None:
            value = item.get(keyword)
            if value is not None and value != "":
                return value
    return None


def _source_window(ds: Dataset, frame_number: int | None) -> tuple[float, float] | None:
    center = _frame_value(ds, frame_number, "WindowCenter", "FrameVOILUTSequence")
    width = _frame_value(ds, frame_number, "WindowWidth", "FrameVOILUTSequence")
    if center is None or width is None:
        return None

    def first(value: Any) -> float:
        multi = isinstance(value, Sequence) and not isinstance(value, str)
        return float(value[0]) if multi else float(value)

    try:
        c, w = first(center), first(width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if w > 0 else None


def _window_of(values: np.ndarray) -> tuple[float, float]:
    """Display window from the 1st-99th percentile (of a fixed subsample of a large volume)."""
    step = max(1, values.size // 4_000_000)
    lo, hi = (float(v) for v in np.percentile(spill.strided_sample(values, step), [1.0, 99.0]))
    if hi <= lo:
        lo, hi = spill.min_max(values)
    width = max(hi - lo, 1e-3)
    return (lo + hi) / 2.0, width


def _reference_item(sop_class_uid: str, sop_instance_uid: str, frame_number: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    if frame_number is not None:
        item.ReferencedFrameNumber = frame_number
    return item


def _source_image_item(sop_class_uid: str, sop_instance_uid: str, frame_number: int | None) -> Dataset:
    item = _reference_item(sop_class_uid, sop_instance_uid, frame_number)
    item.PurposeOfReferenceCodeSequence = [_code_item(_SOURCE_FOR_PROCESSING)]
    return item


def _referenced_series(references: Iterable[tuple[str, str, str]]) -> list[Dataset]:
    """Common Instance Reference: (series UID, SOP class, SOP instance) → Referenced Series items."""
    by_series: dict[str, dict[str, str]] = {}
    for series_uid, sop_class, sop_uid in references:
        by_series.setdefault(series_uid, {})[sop_uid] = sop_class
    items = []
    for series_uid, instances in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedInstanceSequence = [_reference_item(c, u) for u, c in instances.items()]
        items.append(item)
    return items


def _copy_anatomy(ds: Dataset, source: Dataset, *, empty_laterality: bool) -> None:
    """Body Part Examined / Laterality of the source's series; Laterality empty ("unknown")
    when the source names neither and ``empty_laterality`` (General Series Type 2C).
    Without ``empty_laterality`` an empty Laterality is never written, not even the
    source's (a Segmentation may carry Laterality only with a value)."""
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source and keyword not in ds:
            if keyword == "Laterality" and not empty_laterality and not str(source.Laterality or "").strip():
                continue
            ds[keyword] = source[keyword]
    if empty_laterality and "Laterality" not in ds and not str(ds.get("BodyPartExamined", "")):
        ds.Laterality = ""


def _geometry(
    volume: Volume,
) -> tuple[hd.PixelMeasuresSequence, hd.PlaneOrientationSequence, list[hd.PlanePositionSequence]]:
    """Pixel measures, orientation and per-slice positions of the volume (slice order)."""
    first = volume.slices[0]
    source = _sources_by_uid(volume)[first.sop_instance_uid]
    thickness = _frame_value(source, first.frame_number, "SliceThickness", "PixelMeasuresSequence")
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=[float(volume.spacing[1]), float(volume.spacing[2])],
        slice_thickness=float(thickness) if thickness not in (None, "") else float(volume.spacing[0]),
        spacing_between_slices=float(volume.spacing[0]) if len(volume.slices) > 1 else None,
    )
    orientation = hd.PlaneOrientationSequence("PATIENT", [float(v) for v in volume.orientation])
    positions = [hd.PlanePositionSequence("PATIENT", [float(v) for v in s.position]) for s in volume.slices]
    return measures, orientation, positions


# --------------------------------------------------------------------------- kinds

# Kinds, as :func:`pipelines.provenance.provenance_of` and
# :meth:`pipelines.encode.OutputSet.by_kind` name them.
KIND_DERIVED = "derived"
KIND_UNCERTAINTY = "uncertainty"
KIND_HALLUCINATION = "hallucination"
KIND_SUSPECT = "suspect"
KIND_REPORT = "report"
KIND_OVERLAY = "overlay"
KIND_REGISTRATION = "registration"
KIND_PROBABILITY = "probability"
KIND_EXTENT = "extent"

_CONTENT_LABELS = {
    KIND_UNCERTAINTY: "AI_UNCERTAINTY",
    KIND_HALLUCINATION: "AI_HALLUCINATION",
    KIND_PROBABILITY: "AI_PROBABILITY",
    KIND_SUSPECT: "AI_SUSPECT",
    KIND_EXTENT: "AI_EXTENT",
}


def kind_of(ds: Dataset) -> str:
    """Which kind of output ``ds`` is (``"derived"``, ``"uncertainty"``, …, ``"overlay"``)."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in (CTImageStorage, MRImageStorage):
        return KIND_DERIVED
    if sop_class == ParametricMapStorage:
        label = str(ds.get("ContentLabel", ""))
        for kind in (KIND_HALLUCINATION, KIND_PROBABILITY):
            if label == _CONTENT_LABELS[kind]:
                return kind
        return KIND_UNCERTAINTY
    if sop_class == SegmentationStorage:
        return (
            KIND_EXTENT if str(ds.get("ContentLabel", "")) == _CONTENT_LABELS[KIND_EXTENT] else KIND_SUSPECT
        )
    if sop_class == SecondaryCaptureImageStorage:
        return KIND_OVERLAY
    if sop_class == ComprehensiveSRStorage or str(ds.get("Modality", "")) == "SR":
        return KIND_REPORT
    if sop_class == SpatialRegistrationStorage:
        return KIND_REGISTRATION
    raise ValueError(f"not an object kind these writers produce: SOP Class {sop_class}")
