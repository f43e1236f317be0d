"""DICOM encoders for AI outputs: every object says what it is, where it came from, how
sure the model was, and where it may have invented content.

One writer class per object kind, in the style of highdicom: the facts an object must
carry are required keyword arguments, and ``provenance`` (an
:class:`~pipelines.provenance.OutputProvenance`) is required by every writer and
checked when the writer is built, not when a PACS rejects the result.

* :class:`DerivedImageWriter` — CT / MR Image Storage, one single-frame instance per
  volume slice (built with pydicom: highdicom has no classic CT/MR builder);
* :class:`UncertaintyMapWriter` — Parametric Map (highdicom), float32, e.g. one SD;
* :class:`HallucinationMapWriter` — Parametric Map (highdicom), unitless score;
* :class:`SuspectRegionWriter` — Segmentation (highdicom), BINARY, one segment;
* :class:`SummaryReportWriter` — Comprehensive SR (highdicom): model card, QC figures,
  gate verdict, provenance, references to the sources and every output;
* :class:`OverlayWriter` — Secondary Capture RGB heat map (highdicom), burned in; it
  illustrates a Parametric Map and never replaces it.

:func:`write_outputs` runs them all for one job and returns an :class:`OutputSet`;
:func:`save` writes DICOM Part 10 files whose names sort by series;
:func:`provenance_of` recovers, from any single object written here, its source
instances and the pipeline / model / weights that made it.

Coded concepts without a standard code use the local coding scheme ``99DCMNODE``
(declared in each object's Coding Scheme Identification Sequence).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import highdicom as hd
import numpy as np
import pydicom.uid
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pydicom.valuerep import format_number_as_ds

from pipelines.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pipelines.provenance import OutputProvenance, ProvenanceError
from pipelines.uids import UidFactory
from pipelines.volume import Volume

__all__ = [
    "DerivedImageWriter",
    "HallucinationMapWriter",
    "LOCAL_SCHEME",
    "NODE_MANUFACTURER",
    "OutputSet",
    "OverlayWriter",
    "SummaryReportWriter",
    "SuspectRegionWriter",
    "UncertaintyMapWriter",
    "SMOOTHING",
    "SYNTHESIS",
    "SUSPECT_CATEGORY",
    "SUSPECT_LABEL",
    "SUSPECT_TYPE",
    "file_name",
    "kind_of",
    "local_code",
    "provenance_of",
    "save",
    "ucum",
    "ucum_for_units",
    "write_outputs",
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
#: DCM 121324 "Source image" (concept name of SR references to the inputs).
_SOURCE_IMAGE = CodedConcept("121324", "DCM", "Source image")
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

# Kinds, as :func:`provenance_of` and :meth:`OutputSet.by_kind` name them.
KIND_DERIVED = "derived"
KIND_UNCERTAINTY = "uncertainty"
KIND_HALLUCINATION = "hallucination"
KIND_SUSPECT = "suspect"
KIND_REPORT = "report"
KIND_OVERLAY = "overlay"

_CONTENT_LABELS = {KIND_UNCERTAINTY: "AI_UNCERTAINTY", KIND_HALLUCINATION: "AI_HALLUCINATION"}


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


def _now() -> dt.datetime:
    return dt.datetime.now().astimezone()


def _ds(value: float) -> str:
    """A Decimal String (≤ 16 characters) for ``value``."""
    return format_number_as_ds(float(value))


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
    if values.dtype != bool and not np.all(np.isfinite(values)):
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


def _finish(ds: Dataset) -> Dataset:
    """Declare the local coding scheme where the object uses it."""
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
    prefix = [w for w, wanted in (("AI", True), ("SYNTHETIC", synthetic)) if wanted and w not in words]
    return _lo(" ".join([*prefix, what]))


def _sources_by_uid(volume: Volume) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in volume.datasets}


def _group_item(ds: Dataset, frame_number: int | None, sequence: str) -> Dataset | None:
    """The first item of a functional-group sequence for one frame (per-frame, then shared)."""
    if frame_number is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and len(per_frame) >= frame_number:
            seq = per_frame[frame_number - 1].get(sequence)
            if seq:
                return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(sequence)
        if seq:
            return seq[0]
    return None


def _frame_value(ds: Dataset, frame_number: int | None, keyword: str, *groups: str) -> Any:
    """``keyword`` at the top level, else in the frame's (or shared) functional groups."""
    value = ds.get(keyword)
    if value is not None and value != "":
        return value
    for group in groups:
        item = _group_item(ds, frame_number, group)
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
    flat = values.ravel()
    step = max(1, flat.size // 4_000_000)
    lo, hi = (float(v) for v in np.percentile(flat[::step], [1.0, 99.0]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
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
    when the source names neither and ``empty_laterality`` (General Series Type 2C)."""
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source and keyword not in ds:
            ds[keyword] = source[keyword]
    if empty_laterality and "Laterality" not in ds and not str(ds.get("BodyPartExamined", "")):
        ds.Laterality = ""


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta


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


# --------------------------------------------------------------------------- derived images

_PATIENT_STUDY_KEYWORDS = (
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
    "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization", "QualityControlSubject",
    # Clinical Trial Subject / Study
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    "ConsentForClinicalTrialUseSequence",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence", "RequestingService",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize",
    "PatientWeight", "PatientSizeCodeSequence", "Occupation", "AdditionalPatientHistory",
    "PregnancyStatus", "PatientSexNeutered",
)  # fmt: skip

#: Type 2 attributes written empty when the source lacks them (never invented).
_TYPE2_EMPTY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip

_SERIES_COPY = ("PatientPosition", "ProtocolName")


def _rescale(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """int16 stored values and (slope, intercept) so ``stored * slope + intercept ≈ values``.

    Slope 1 whenever the range spans ≤ 65534 units (then values round-trip within 0.5);
    a wider range is scaled (round-trip within slope / 2).
    """
    lo, hi = float(values.min()), float(values.max())
    if lo >= -32768.0 and hi <= 32767.0:
        slope, intercept = 1.0, 0.0
    elif hi - lo <= 65534.0:
        slope, intercept = 1.0, float(np.floor(lo)) + 32768.0
    else:
        slope = float(_ds((hi - lo) / 60000.0))
        intercept = float(_ds(lo + 30000.0 * slope))
    stored = np.clip(np.rint((values.astype(np.float64) - intercept) / slope), -32768, 32767).astype(np.int16)
    return stored, slope, intercept


def _mr_sequence_attributes(ds: Dataset) -> dict[str, Any]:
    """Scanning Sequence / Sequence Variant of a classic MR image, from Enhanced MR attributes."""
    echo = str(ds.get("EchoPulseSequence", "") or "")
    scanning: list[str] = []
    if echo in ("SPIN", "BOTH"):
        scanning.append("SE")
    if echo in ("GRADIENT", "BOTH"):
        scanning.append("GR")
    if str(ds.get("EchoPlanarPulseSequence", "")) == "YES":
        scanning.append("EP")
    modifier = _group_item(ds, None, "MRModifierSequence")
    if modifier is not None and str(modifier.get("InversionRecovery", "")) == "YES":
        scanning.append("IR")
    variant = []
    if str(ds.get("SteadyStatePulseSequence", "NONE") or "NONE") != "NONE":
        variant.append("SS")
    if str(ds.get("Spoiling", "NONE") or "NONE") != "NONE":
        variant.append("SP")
    if str(ds.get("MagnetizationTransfer", "NONE") or "NONE") != "NONE":
        variant.append("MTC")
    # RM (research mode) when the enhanced source does not say: honest, and Type 1 filled.
    return {"ScanningSequence": scanning or ["RM"], "SequenceVariant": variant or ["NONE"]}


_CONTRAST_KEYWORDS = (
    "ContrastBolusAgent", "ContrastBolusAgentSequence", "ContrastBolusRoute",
    "ContrastBolusAdministrationRouteSequence", "ContrastBolusVolume", "ContrastBolusStartTime",
    "ContrastBolusStopTime", "ContrastBolusTotalDose", "ContrastFlowRate", "ContrastFlowDuration",
    "ContrastBolusIngredient", "ContrastBolusIngredientConcentration",
)  # fmt: skip


def _copy_contrast(ds: Dataset, source: Dataset) -> None:
    """Contrast/Bolus module (required where contrast was used) from the source.

    A classic source's module is copied; an enhanced source's agents (Enhanced
    Contrast/Bolus items carry more than the classic code items) become the agent names
    and their bare codes.
    """
    if "PerFrameFunctionalGroupsSequence" not in source:
        for keyword in _CONTRAST_KEYWORDS:
            if keyword in source:
                ds[keyword] = source[keyword]
        return
    agents = [i for i in source.get("ContrastBolusAgentSequence", []) if "CodeValue" in i]
    if agents:
        ds.ContrastBolusAgent = _lo("; ".join(str(i.get("CodeMeaning", i.CodeValue)) for i in agents))
        ds.ContrastBolusAgentSequence = [
            _code_item(CodedConcept(str(i.CodeValue), str(i.CodingSchemeDesignator), str(i.CodeMeaning)))
            for i in agents
        ]


class DerivedImageWriter:
    """AI-derived images as classic CT / MR Image Storage, one instance per volume slice.

    Each instance shares the source's Study and Frame of Reference, sits exactly where
    its source slice sits, and references it (Source Image Sequence with Purpose of
    Reference DCM 121322 and, for multi-frame sources, the frame number). Image Type is
    ``DERIVED\\SECONDARY``; Synthetic Data is ``YES`` when ``provenance.synthetic``.
    Enhanced CT / MR sources give classic single-frame objects (what every PACS shows),
    with the geometry of each frame taken from the volume and its functional groups.

    The IOD is the source's modality unless ``output_modality`` names another: a CT
    made from an MR (synthetic CT) is CT Image Storage in HU (``units="HU"`` required)
    with Image Type ``DERIVED\\SECONDARY\\AXIAL``, an empty KVP and Acquisition
    Number (nothing was acquired as CT), a window for HU rather than the MR's, and none
    of the MR's acquisition attributes or its Contrast/Bolus module (an MR agent says
    nothing about the HU). Patient, study, Frame of Reference, Patient Position and slice
    geometry are the source's, as for any derived series.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the derived series.
    series_description
        What the series is (e.g. ``"denoised CT"``); written as ``"AI <description>"``
        (``"AI SYNTHETIC ..."`` for synthetic pixels) unless it already says AI.
    derivation_description_extra
        Appended to ``provenance.description()`` in Derivation Description.
    derivation_code
        Derivation Code Sequence (CID 7203); default DCM 113087 "Smoothing".
    name
        Name of the series in ``uids`` (distinct per derived series of one job).
    synthetic_data_element
        Write Synthetic Data (0008,001C) (``YES`` / ``NO``). It is a standard attribute,
        but dicom3tools builds older than its addition (e.g. Debian bookworm's
        1.00~20220618) report it as an unrecognised attribute *Error*; pass False where
        such a validator gates delivery. Synthetic pixels are then still declared by the
        Contributing Equipment purpose DCM 109100, Image Comments and Series Description.
        (:func:`dicom_node.tps.dciodvfy_errors` discounts exactly that stale report.)
    output_modality
        ``"CT"`` or ``"MR"``: the IOD to write; default (None) the source volume's.
        Only a CT may be made from a source of another modality.
    units
        Units of the written array (``"HU"``); default the source volume's units.
    """

    kind: ClassVar[str] = KIND_DERIVED

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        series_description: str,
        derivation_description_extra: str = "",
        derivation_code: Code | CodedConcept = SMOOTHING,
        name: str = "derived",
        synthetic_data_element: bool = True,
        output_modality: str | None = None,
        units: str | None = None,
    ) -> None:
        owner = type(self).__name__
        self.synthetic_data_element = bool(synthetic_data_element)
        if output_modality not in (None, "CT", "MR"):
            raise ValueError(
                f"{owner}: argument 'output_modality' must be 'CT', 'MR' or None, got {output_modality!r}"
            )
        self.output_modality = output_modality
        self.units = units
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        if not series_description or not series_description.strip():
            raise ValueError(f"{owner}: argument 'series_description' is required")
        self.series_description = _ai_series_description(
            series_description.strip(), synthetic=self.provenance.synthetic
        )
        self.derivation_description = self.provenance.description()
        if derivation_description_extra.strip():
            self.derivation_description += "; " + derivation_description_extra.strip()
        if len(self.derivation_description) > 1024:
            raise ValueError(f"{owner}: Derivation Description exceeds 1024 characters")
        self.derivation_code = _concept(owner, "derivation_code", derivation_code)
        self.name = name

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    def write(self, volume: Volume, array: np.ndarray, out_dir: Path | None = None) -> list[Dataset]:
        """One derived instance per slice of ``volume``, pixels from ``array``.

        Parameters
        ----------
        volume
            The source volume (its ``datasets`` give the headers to copy).
        array
            ``(slices, rows, columns)`` in the volume's units (HU for CT), or in ``units``.
        out_dir
            When given, the instances are also saved there (see :func:`save`).

        Returns
        -------
        list of pydicom.Dataset
            In volume slice order, Instance Number 1..n.
        """
        owner = type(self).__name__
        values = _check_array(owner, volume, array, "array").astype(np.float32, copy=False)
        if volume.modality not in ("CT", "MR"):
            raise ValueError(f"{owner}: writes CT or MR images only; the volume is {volume.modality!r}")
        modality = self.output_modality or volume.modality
        units = volume.units if self.units is None else self.units
        cross = modality != volume.modality
        if cross and modality != "CT":
            raise ValueError(
                f"{owner}: cannot write {modality} images from a {volume.modality} volume "
                "(across modalities only a CT in HU is written)"
            )
        if cross and units != "HU":
            raise ValueError(
                f"{owner}: a CT made from a {volume.modality} volume must be in Hounsfield units "
                f"(pass units='HU'; got {units!r})"
            )
        sources = _sources_by_uid(volume)
        now = _now()
        series_uid = self.series_instance_uid
        first = sources[volume.slices[0].sop_instance_uid]
        window_default = _window_of(values)
        out = []
        for k, ref in enumerate(volume.slices):
            source = sources[ref.sop_instance_uid]
            stored, slope, intercept = _rescale(values[k])
            ds = self._dataset(volume, k, source, first, series_uid, now, modality)
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            if modality == "CT" or (slope, intercept) != (1.0, 0.0):
                ds.RescaleIntercept = _ds(intercept)
                ds.RescaleSlope = _ds(slope)
                if modality == "CT":
                    ds.RescaleType = "HU" if units == "HU" else (units or "US")[:64]
            # The source's window suits the source's values, not another modality's.
            window = (None if cross else _source_window(source, ref.frame_number)) or window_default
            ds.WindowCenter, ds.WindowWidth = _ds(window[0]), _ds(window[1])
            ds.PixelData = stored.tobytes()
            _file_meta(ds)
            out.append(_finish(ds))
        if out_dir is not None:
            save(out, out_dir)
        return out

    def _dataset(
        self,
        volume: Volume,
        k: int,
        source: Dataset,
        first: Dataset,
        series_uid: str,
        now: dt.datetime,
        modality: str,
    ) -> Dataset:
        ref = volume.slices[k]
        frame = ref.frame_number
        prov = self.provenance
        cross = modality != volume.modality
        ds = Dataset()
        if "SpecificCharacterSet" in source:
            ds.SpecificCharacterSet = source.SpecificCharacterSet
        ds.ImageType = ["DERIVED", "SECONDARY", self._image_type_3(modality, source)]
        ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        ds.SOPInstanceUID = self.uids.instance(self.name, k + 1)
        for keyword in _PATIENT_STUDY_KEYWORDS:
            if keyword in source:
                ds[keyword] = source[keyword]
        for keyword in _TYPE2_EMPTY:
            if keyword not in ds:
                setattr(ds, keyword, "")
        ds.StudyInstanceUID = volume.study_uid
        # General Series
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = self.series_number
        ds.SeriesDate, ds.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.SeriesDescription = self.series_description
        for keyword in _SERIES_COPY:
            if keyword in first:
                ds[keyword] = first[keyword]
        if "PatientPosition" not in ds:
            ds.PatientPosition = ""  # Type 2C for CT/MR: empty, not guessed
        _copy_anatomy(ds, first, empty_laterality=True)
        # Frame of Reference
        ds.FrameOfReferenceUID = volume.frame_of_reference_uid
        ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
        # General Equipment: the node made this instance
        ds.Manufacturer = NODE_MANUFACTURER
        ds.ManufacturerModelName = _lo(prov.pipeline)
        ds.DeviceSerialNumber = prov.weights_sha256
        ds.SoftwareVersions = list(_software_versions(prov))
        # General Image
        ds.InstanceNumber = k + 1
        ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        made_from = (
            f"{modality} synthesized from {volume.modality} series {volume.series_uid}; not for diagnosis. "
            if cross
            else ""
        )
        ds.ImageComments = (
            ("AI-generated (synthetic) image, not acquired. " if prov.synthetic else "AI-processed image. ")
            + made_from
            + "See Derivation Description and Contributing Equipment."
        )
        ds.DerivationDescription = self.derivation_description
        ds.DerivationCodeSequence = [_code_item(self.derivation_code)]
        ds.SourceImageSequence = [_source_image_item(ref.sop_class_uid, ref.sop_instance_uid, frame)]
        if self.synthetic_data_element:
            ds.SyntheticData = "YES" if prov.synthetic else "NO"
        for keyword in ("BurnedInAnnotation", "RecognizableVisualFeatures", "LossyImageCompression"):
            if keyword in source:
                ds[keyword] = source[keyword]
        if str(source.get("LossyImageCompression", "00")) == "01":
            for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
                if keyword in source:
                    ds[keyword] = source[keyword]
        # Image Plane: exactly the source slice's position
        ds.ImagePositionPatient = self._position(source, ref, volume.resampled)
        ds.ImageOrientationPatient = [_ds(v) for v in volume.orientation]
        ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[2])]
        thickness = _frame_value(source, frame, "SliceThickness", "PixelMeasuresSequence")
        ds.SliceThickness = thickness if thickness is not None else ""
        if len(volume.slices) > 1:
            ds.SpacingBetweenSlices = _ds(volume.spacing[0])
        if "SliceLocation" in source and ref.frame_number is None and not volume.resampled:
            ds.SliceLocation = source.SliceLocation  # vendor-defined: copied, not recomputed
        if not cross:
            _copy_contrast(ds, source)
        # Modality-specific acquisition facts (copied, never invented; for pixels of another
        # modality than the acquisition there are none: Type 2, written empty)
        acquisition = (
            None if cross else _frame_value(source, frame, "AcquisitionNumber", "FrameContentSequence")
        )
        if modality == "CT":
            kvp = None if cross else _frame_value(source, frame, "KVP", "CTXRayDetailsSequence")
            ds.KVP = kvp if kvp is not None else ""
            ds.AcquisitionNumber = acquisition if acquisition is not None else ""
        else:
            self._mr_attributes(ds, source, frame)
            ds.AcquisitionNumber = acquisition if acquisition is not None else ""
        # Common Instance Reference
        ds.ReferencedSeriesSequence = _referenced_series(
            [(volume.series_uid, ref.sop_class_uid, ref.sop_instance_uid)]
        )
        ds.ContributingEquipmentSequence = _contributing_equipment(prov, source)
        return ds

    @staticmethod
    def _image_type_3(modality: str, source: Dataset) -> str:
        """Value 3 of Image Type: CT ``AXIAL``; MR the source's value 3 (else ``OTHER``)."""
        if modality == "CT":
            return "AXIAL"
        source_type = list(source.get("ImageType", []) or [])
        return str(source_type[2]) if len(source_type) > 2 and str(source_type[2]) else "OTHER"

    @staticmethod
    def _position(source: Dataset, ref: Any, resampled: bool) -> list[Any]:
        """The source's own Image Position (Patient) strings, so positions match exactly."""
        if not resampled:
            if ref.frame_number is None and "ImagePositionPatient" in source:
                return list(source.ImagePositionPatient)
            item = _group_item(source, ref.frame_number, "PlanePositionSequence")
            if item is not None and "ImagePositionPatient" in item:
                return list(item.ImagePositionPatient)
        return [_ds(v) for v in ref.position]

    @staticmethod
    def _mr_attributes(ds: Dataset, source: Dataset, frame: int | None) -> None:
        if "ScanningSequence" in source and "SequenceVariant" in source:
            ds.ScanningSequence = source.ScanningSequence
            ds.SequenceVariant = source.SequenceVariant
        else:
            for keyword, value in _mr_sequence_attributes(source).items():
                setattr(ds, keyword, value)
        ds.ScanOptions = source.get("ScanOptions", "")
        ds.MRAcquisitionType = source.get("MRAcquisitionType", "")
        timing = ("MRTimingAndRelatedParametersSequence",)
        for keyword, groups in (
            ("RepetitionTime", timing),
            ("EchoTime", ("MREchoSequence",)),
            ("EchoTrainLength", timing),
        ):
            value = _frame_value(source, frame, keyword, *groups)
            if value is None and keyword == "EchoTime":
                value = _frame_value(source, frame, "EffectiveEchoTime", "MREchoSequence")
            setattr(ds, keyword, value if value is not None else "")
        if "IR" in list(ds.ScanningSequence):
            value = _frame_value(source, frame, "InversionTime", "MRModifierSequence")
            if value is None:
                times = _frame_value(source, frame, "InversionTimes", "MRModifierSequence")
                value = times[0] if times else None
            ds.InversionTime = value if value is not None else ""
        for keyword in ("MagneticFieldStrength", "ImagingFrequency", "SequenceName", "FlipAngle"):
            if keyword in source:
                ds[keyword] = source[keyword]


# --------------------------------------------------------------------------- parametric maps


class _ParametricMapWriter:
    """Common ground of the two Parametric Map writers (highdicom ``ParametricMap``)."""

    kind: ClassVar[str]

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        units: str | Code | CodedConcept,
        lut_label: str,
        lut_explanation: str,
        quantity: Code | CodedConcept | None,
        content_description: str,
        series_description: str,
        name: str,
        content_qualification: str,
    ) -> None:
        owner = type(self).__name__
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        self.unit = ucum(units)
        if not lut_label or len(lut_label) > 16:
            raise ValueError(f"{owner}: 'lut_label' must be 1-16 characters (SH), got {lut_label!r}")
        self.lut_label = lut_label
        self.lut_explanation = _lo(lut_explanation)
        self.quantity = None if quantity is None else _concept(owner, "quantity", quantity)
        self.content_description = _lo(content_description)
        self.series_description = _ai_series_description(series_description)
        self.name = name
        self.content_qualification = content_qualification

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    def _validate(self, values: np.ndarray) -> None:
        """Hook for value checks of a particular map."""

    def write(self, volume: Volume, values: np.ndarray, out_dir: Path | None = None) -> Dataset:
        """One multi-frame Parametric Map over all slices of ``volume``.

        Parameters
        ----------
        volume
            The source volume; frame ``k`` sits at ``volume.slices[k].position``.
        values
            ``(slices, rows, columns)`` map, stored as 32-bit float.
        out_dir
            When given, the object is also saved there (see :func:`save`).
        """
        owner = type(self).__name__
        pixels = _check_array(owner, volume, values, "values").astype(np.float32, copy=False)
        self._validate(pixels)
        prov = self.provenance
        measures, orientation, positions = _geometry(volume)
        lo, hi = float(pixels.min()), float(pixels.max())
        mapping = hd.pm.RealWorldValueMapping(
            lut_label=self.lut_label,
            lut_explanation=self.lut_explanation,
            unit=self.unit,
            value_range=(lo, hi if hi > lo else lo + 1.0),
            slope=1.0,
            intercept=0.0,
            quantity_definition=self.quantity,
        )
        center, width = _window_of(pixels)
        # Float maps: LINEAR_EXACT, so a window narrower than 1 (scores, small sigmas) is valid.
        window = hd.VOILUTTransformation(
            window_center=center, window_width=width, voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT
        )
        pm = hd.pm.ParametricMap(
            source_images=list(volume.datasets),
            pixel_array=pixels,
            series_instance_uid=self.series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.instance(self.name, 1),
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            manufacturer_model_name=_lo(prov.pipeline),
            software_versions=_software_versions(prov),
            device_serial_number=prov.weights_sha256,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[window],
            content_description=self.content_description,
            content_label=_CONTENT_LABELS[self.kind],
            content_qualification=self.content_qualification,
            pixel_measures=measures,
            plane_orientation=orientation,
            plane_positions=positions,
            contributing_equipment=_contributing_equipment(prov, include_acquisition=False),
        )
        pm.SeriesDescription = self.series_description
        _copy_anatomy(pm, volume.datasets[0], empty_laterality=True)
        _file_meta_keep(pm)
        _finish(pm)
        if out_dir is not None:
            save([pm], out_dir)
        return pm


def _file_meta_keep(ds: Dataset) -> None:
    """highdicom sets the file meta; make sure the media storage UIDs are there too."""
    if "file_meta" not in ds.__dict__ or not getattr(ds, "file_meta", None):
        _file_meta(ds)
        return
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


class UncertaintyMapWriter(_ParametricMapWriter):
    """How sure the model was, voxel by voxel: a float32 Parametric Map.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the map's series.
    units
        UCUM code of the map (the units of the image it qualifies, e.g. ``"[hnsf'U]"``
        for HU; see :func:`ucum_for_units`), or a coded concept.
    interval
        What one map value is, e.g. ``"one standard deviation"`` (the default; then the
        quantity is DCM 113061 "Standard Deviation") or ``"95% interval half-width"``.
    lut_label
        Real World Value Mapping LUT Label (≤ 16 characters).
    name
        Name of the series in ``uids``.
    content_qualification
        ``"RESEARCH"`` (default), ``"PRODUCT"`` or ``"SERVICE"``.
    """

    kind: ClassVar[str] = KIND_UNCERTAINTY

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        units: str | Code | CodedConcept,
        interval: str = "one standard deviation",
        lut_label: str = "AI UNCERTAINTY",
        name: str = "uncertainty",
        content_qualification: str = "RESEARCH",
    ) -> None:
        if not interval or not interval.strip():
            raise ValueError(f"{type(self).__name__}: argument 'interval' must say what one value is")
        self.interval = interval.strip()
        quantity = (
            codes.DCM.StandardDeviation
            if "standard deviation" in self.interval.lower()
            else local_code("AI-UNCERTAINTY", "AI uncertainty")
        )
        short = "1 SD" if self.interval.lower() == "one standard deviation" else self.interval
        super().__init__(
            provenance=provenance,
            uids=uids,
            series_number=series_number,
            units=units,
            lut_label=lut_label,
            lut_explanation=f"AI model uncertainty, {self.interval}",
            quantity=quantity,
            content_description=f"AI uncertainty map ({self.interval}); not a diagnostic image",
            series_description=f"AI uncertainty map ({short})",
            name=name,
            content_qualification=content_qualification,
        )

    def _validate(self, values: np.ndarray) -> None:
        if float(values.min()) < 0.0:
            raise ValueError(f"{type(self).__name__}: uncertainty values must be ≥ 0 (min {values.min():g})")


class HallucinationMapWriter(_ParametricMapWriter):
    """Where the model may have invented content: a unitless score as a Parametric Map.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the map's series.
    units
        UCUM code of the score; default ``"1"`` (no units).
    score_description
        What the score is (LUT Explanation), e.g. ``"z-score of ensemble disagreement"``.
    quantity
        Quantity Definition; default local ``99DCMNODE HALLUC-SCORE`` "AI hallucination
        score" (pass DCM 113071 "Z-score" for a z-score).
    lut_label
        Real World Value Mapping LUT Label (≤ 16 characters).
    name
        Name of the series in ``uids``.
    content_qualification
        ``"RESEARCH"`` (default), ``"PRODUCT"`` or ``"SERVICE"``.
    """

    kind: ClassVar[str] = KIND_HALLUCINATION

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        units: str | Code | CodedConcept = "1",
        score_description: str = "AI hallucination score (higher: more likely invented)",
        quantity: Code | CodedConcept | None = None,
        lut_label: str = "AI HALLUCINATION",
        name: str = "hallucination",
        content_qualification: str = "RESEARCH",
    ) -> None:
        super().__init__(
            provenance=provenance,
            uids=uids,
            series_number=series_number,
            units=units,
            lut_label=lut_label,
            lut_explanation=score_description,
            quantity=quantity
            if quantity is not None
            else local_code("HALLUC-SCORE", "AI hallucination score"),
            content_description="AI hallucination score map: where the model may have invented content",
            series_description="AI hallucination score map",
            name=name,
            content_qualification=content_qualification,
        )


# --------------------------------------------------------------------------- segmentation

#: SCT 309825002 "Spatial and Relational Concept" (CID 7150) — the region is a place in
#: the image, not patient anatomy or pathology.
SUSPECT_CATEGORY = CodedConcept.from_code(codes.SCT.SpatialAndRelationalConcept)
#: DCM 111207 "Image artifact(s)" — content the imaging chain (here: the model) put there.
SUSPECT_TYPE = CodedConcept("111207", "DCM", "Image artifact(s)")
SUSPECT_LABEL = "suspect region (possible AI hallucination)"


class SuspectRegionWriter:
    """Regions the model may have invented, as a BINARY Segmentation with one segment.

    The segment is "suspect region (possible AI hallucination)": category SCT 309825002
    "Spatial and Relational Concept", type DCM 111207 "Image artifact(s)", algorithm type
    AUTOMATIC, Algorithm Identification from the provenance (family CID 7162 "Artificial
    Intelligence", parameters pipeline and weights sha256).

    Every slice is encoded, empty ones included (``omit_empty_frames=False``): an empty
    frame says "assessed, nothing suspect", which an omitted one would not; an all-empty
    mask thus still gives a complete, valid object.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the segmentation's series.
    omit_empty_frames
        Leave out slices without suspect voxels (smaller; "not assessed" and "nothing
        found" then look alike). Default False.
    name
        Name of the series in ``uids``.
    """

    kind: ClassVar[str] = KIND_SUSPECT

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        omit_empty_frames: bool = False,
        name: str = "suspect",
    ) -> None:
        owner = type(self).__name__
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        self.omit_empty_frames = bool(omit_empty_frames)
        self.name = name

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    def algorithm(self) -> hd.AlgorithmIdentificationSequence:
        prov = self.provenance
        return hd.AlgorithmIdentificationSequence(
            name=_lo(prov.model_name),
            version=_lo(prov.model_version),
            family=codes.cid7162.ArtificialIntelligence,
            source=_lo(f"{NODE_MANUFACTURER} {prov.node_version}"),
            parameters={
                "pipeline": f"{prov.pipeline} {prov.pipeline_version}",
                "weights_sha256": prov.weights_sha256,
            },
        )

    def write(self, volume: Volume, mask: np.ndarray, out_dir: Path | None = None) -> Dataset:
        """One Segmentation of ``mask`` (boolean, shape of the volume).

        Parameters
        ----------
        volume
            The source volume.
        mask
            ``(slices, rows, columns)``, True where content may be invented.
        out_dir
            When given, the object is also saved there (see :func:`save`).
        """
        owner = type(self).__name__
        values = _check_array(owner, volume, mask, "mask")
        if values.dtype != bool:
            if not np.isin(values, (0, 1)).all():
                raise ValueError(f"{owner}: 'mask' must be boolean (or 0/1)")
        prov = self.provenance
        measures, orientation, positions = _geometry(volume)
        segment = hd.seg.SegmentDescription(
            segment_number=1,
            segment_label=SUSPECT_LABEL,
            segmented_property_category=SUSPECT_CATEGORY,
            segmented_property_type=SUSPECT_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=self.algorithm(),
            tracking_uid=self.uids.instance(self.name + "-tracking", 1),
            tracking_id="AI suspect region",
            display_color=hd.color.CIELabColor(53.2, 80.1, 67.2),  # red
        )
        seg = hd.seg.Segmentation(
            source_images=list(volume.datasets),
            pixel_array=values.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=self.series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.instance(self.name, 1),
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            manufacturer_model_name=_lo(prov.pipeline),
            software_versions=_software_versions(prov),
            device_serial_number=prov.weights_sha256,
            content_description="AI suspect regions: where the model may have invented content",
            content_label="AI_SUSPECT",
            pixel_measures=measures,
            plane_orientation=orientation,
            plane_positions=positions,
            omit_empty_frames=self.omit_empty_frames,
            contributing_equipment=_contributing_equipment(prov, include_acquisition=False),
        )
        seg.SeriesDescription = _ai_series_description("suspect regions (possible hallucination)")
        _copy_anatomy(seg, volume.datasets[0], empty_laterality=False)
        _file_meta_keep(seg)
        _finish(seg)
        if out_dir is not None:
            save([seg], out_dir)
        return seg


# --------------------------------------------------------------------------- overlay


def _hot(s: np.ndarray) -> np.ndarray:
    """Black-red-yellow-white colours for ``s`` in [0, 1], (…, 3) in [0, 1]."""
    return np.stack([np.clip(3 * s, 0, 1), np.clip(3 * s - 1, 0, 1), np.clip(3 * s - 2, 0, 1)], axis=-1)


class OverlayWriter:
    """A Secondary Capture RGB heat map of one slice: a picture, never the only record.

    ``write`` requires the Hallucination Parametric Map it illustrates and references it
    (and the source slice) in the Source Image Sequence; Burned In Annotation is YES.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the overlay's series.
    threshold
        Score at which colour starts; default the 95th percentile of the score volume.
    name
        Name of the series in ``uids``.
    """

    kind: ClassVar[str] = KIND_OVERLAY

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        threshold: float | None = None,
        name: str = "overlay",
    ) -> None:
        owner = type(self).__name__
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        self.threshold = threshold
        self.name = name

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    @staticmethod
    def busiest_slice(score: np.ndarray, mask: np.ndarray | None = None) -> int:
        """The slice with the largest hallucination burden (mask voxels, else positive score)."""
        burden = mask.reshape(len(mask), -1).sum(axis=1) if mask is not None and mask.any() else None
        if burden is None:
            burden = np.clip(score, 0, None).reshape(len(score), -1).sum(axis=1)
        return int(np.argmax(burden))

    def write(
        self,
        volume: Volume,
        score: np.ndarray,
        *,
        hallucination_map: Dataset,
        mask: np.ndarray | None = None,
        slice_index: int | None = None,
        out_dir: Path | None = None,
    ) -> Dataset:
        """The heat-map overlay of one slice.

        Parameters
        ----------
        volume
            The source volume (the grey background).
        score
            The hallucination score volume written in ``hallucination_map``.
        hallucination_map
            The Parametric Map of ``score``; required, so the overlay is never the only
            record, and referenced by the overlay.
        mask
            Suspect-region mask, to choose the slice; optional.
        slice_index
            The slice to show; default :meth:`busiest_slice`.
        out_dir
            When given, the object is also saved there (see :func:`save`).
        """
        owner = type(self).__name__
        values = _check_array(owner, volume, score, "score").astype(np.float32, copy=False)
        if (
            not isinstance(hallucination_map, Dataset)
            or hallucination_map.get("SOPClassUID") != ParametricMapStorage
        ):
            raise TypeError(
                f"{owner}: 'hallucination_map' must be the Parametric Map the overlay illustrates"
            )
        if hallucination_map.get("FrameOfReferenceUID") != volume.frame_of_reference_uid:
            raise ValueError(f"{owner}: 'hallucination_map' is not in the volume's frame of reference")
        k = self.busiest_slice(values, mask) if slice_index is None else int(slice_index)
        if not 0 <= k < len(volume.slices):
            raise ValueError(f"{owner}: slice_index {k} outside 0..{len(volume.slices) - 1}")
        ref = volume.slices[k]
        source = _sources_by_uid(volume)[ref.sop_instance_uid]
        prov = self.provenance

        center, width = _source_window(source, ref.frame_number) or _window_of(volume.array)
        grey = np.clip((volume.array[k] - (center - width / 2)) / width, 0, 1)
        threshold = float(np.percentile(values, 95)) if self.threshold is None else float(self.threshold)
        top = max(float(values.max()), threshold + 1e-6)
        s = np.clip((values[k] - threshold) / (top - threshold), 0, 1)
        alpha = np.where(values[k] > threshold, 0.35 + 0.5 * s, 0.0)[..., None]
        rgb = (1 - alpha) * grey[..., None] + alpha * _hot(0.35 + 0.65 * s)
        pixels = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)

        row_letter, column_letter, _ = hd.spatial.get_closest_patient_orientation(volume.direction())
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=self.series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.instance(self.name, 1),
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            pixel_spacing=(float(volume.spacing[1]), float(volume.spacing[2])),  # type: ignore[arg-type]
            patient_orientation=(row_letter.value, column_letter.value),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=_contributing_equipment(prov, include_acquisition=False),
        )
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.BurnedInAnnotation = "YES"
        _copy_anatomy(sc, source, empty_laterality=True)
        sc.SeriesDescription = _ai_series_description("hallucination overlay (picture only)")
        sc.ManufacturerModelName = _lo(prov.pipeline)
        sc.SoftwareVersions = _software_versions(prov)
        sc.ImageComments = (
            f"AI hallucination heat map of slice {k + 1}; score >= {threshold:.3g} coloured. "
            "Picture only: the Parametric Map is the record."
        )
        sc.DerivationDescription = prov.description() + f"; heat map of slice {k + 1} from hallucination map"
        map_frame = _pm_frame_of(hallucination_map, ref.position)
        sc.SourceImageSequence = [
            _source_image_item(ref.sop_class_uid, ref.sop_instance_uid, ref.frame_number),
            _source_image_item(ParametricMapStorage, str(hallucination_map.SOPInstanceUID), map_frame),
        ]
        sc.ReferencedSeriesSequence = _referenced_series(
            [
                (volume.series_uid, ref.sop_class_uid, ref.sop_instance_uid),
                (
                    str(hallucination_map.SeriesInstanceUID),
                    ParametricMapStorage,
                    str(hallucination_map.SOPInstanceUID),
                ),
            ]
        )
        _file_meta_keep(sc)
        _finish(sc)
        if out_dir is not None:
            save([sc], out_dir)
        return sc


def _pm_frame_of(pm: Dataset, position: Sequence[float]) -> int | None:
    """The 1-based frame of a multi-frame object at ``position`` (None if none matches)."""
    for n, item in enumerate(pm.get("PerFrameFunctionalGroupsSequence", []), start=1):
        plane = item.get("PlanePositionSequence")
        if plane and np.allclose([float(v) for v in plane[0].ImagePositionPatient], position, atol=1e-3):
            return n
    return None


# --------------------------------------------------------------------------- structured report


def _sanitized_code(prefix: str, key: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Z0-9]+", "-", key.upper()).strip("-") or "X"
    value = f"{prefix}{stem}"[:16]
    n = 2
    while value in taken:
        suffix = f"-{n}"
        value = f"{prefix}{stem}"[: 16 - len(suffix)] + suffix
        n += 1
    taken.add(value)
    return value


#: SR concept names of output references, by kind.
_OUTPUT_CONCEPTS = {
    KIND_DERIVED: local_code("AI-DERIVED", "AI derived image"),
    KIND_UNCERTAINTY: local_code("AI-UNCERTAINTY", "AI uncertainty map"),
    KIND_HALLUCINATION: local_code("AI-HALLUC-MAP", "AI hallucination map"),
    KIND_SUSPECT: local_code("AI-SUSPECT-SEG", "AI suspect region segmentation"),
    KIND_OVERLAY: local_code("AI-OVERLAY", "AI hallucination overlay"),
}
_SR_TITLE = local_code("AI-SUMMARY", "AI output summary")
_SR_PROVENANCE = local_code("PROVENANCE", "Provenance")
_SR_ALGORITHM = local_code("AI-MODEL", "AI model")
_SR_MODEL_CARD = local_code("MODEL-CARD", "Model card")
_SR_QC = local_code("QC", "Quality control figures")
_SR_GATE = local_code("GATE-VERDICT", "Gate verdict")
_SR_SOURCES = local_code("SOURCES", "Source images")
_SR_OUTPUTS = local_code("AI-OUTPUTS", "AI output objects")


def kind_of(ds: Dataset) -> str:
    """Which kind of output ``ds`` is (``"derived"``, ``"uncertainty"``, …, ``"overlay"``)."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in (CTImageStorage, MRImageStorage):
        return KIND_DERIVED
    if sop_class == ParametricMapStorage:
        label = str(ds.get("ContentLabel", ""))
        return KIND_HALLUCINATION if label == _CONTENT_LABELS[KIND_HALLUCINATION] else KIND_UNCERTAINTY
    if sop_class == SegmentationStorage:
        return KIND_SUSPECT
    if sop_class == SecondaryCaptureImageStorage:
        return KIND_OVERLAY
    if sop_class == ComprehensiveSRStorage or str(ds.get("Modality", "")) == "SR":
        return KIND_REPORT
    raise ValueError(f"not an object kind these writers produce: SOP Class {sop_class}")


class SummaryReportWriter:
    """One Comprehensive SR that ties the job's outputs together for a reader.

    Content (root "AI output summary", local code): the provenance line; the AI model
    (TID 4019 Algorithm Identification: name, version, parameters); the model card
    (TEXT per entry); QC figures (NUM with UCUM units); the gate verdict (TEXT); the
    source images (IMAGE, DCM 121324 "Source image"); and every output object written
    (IMAGE, one per instance). The evidence is the source images plus all outputs, so
    Current Requested Procedure Evidence Sequence lists them all.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the report's series.
    model_card
        Model card facts, e.g. ``{"intended use": ..., "training data": ...,
        "metrics": ..., "calibration": ...}``; at least one.
    name
        Name of the series in ``uids``.
    """

    kind: ClassVar[str] = KIND_REPORT

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        model_card: Mapping[str, str],
        name: str = "report",
    ) -> None:
        owner = type(self).__name__
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        if not isinstance(model_card, Mapping) or not model_card:
            raise ValueError(f"{owner}: argument 'model_card' is required (a non-empty mapping of strings)")
        bad = [
            k
            for k, v in model_card.items()
            if not isinstance(k, str) or not isinstance(v, str) or not v.strip()
        ]
        if bad:
            raise ValueError(f"{owner}: model card entries must be non-empty strings: {bad}")
        self.model_card = dict(model_card)
        self.name = name

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    def write(
        self,
        volume: Volume,
        *,
        outputs: Sequence[Dataset],
        qc: Mapping[str, tuple[float, str | Code | CodedConcept]],
        gate: str,
        out_dir: Path | None = None,
    ) -> Dataset:
        """The summary report.

        Parameters
        ----------
        volume
            The source volume (its instances are evidence and are referenced).
        outputs
            Every other object written for the job (derived instances, maps, SEG, overlay).
        qc
            QC figures: name → (value, UCUM unit code), e.g. ``{"mean uncertainty":
            (4.2, "[hnsf'U]"), "suspect volume": (312.0, "mm3")}``.
        gate
            The gate verdict (e.g. ``"auto"``, ``"review"``, ``"shadow"``), with any reason.
        out_dir
            When given, the object is also saved there (see :func:`save`).
        """
        owner = type(self).__name__
        if not isinstance(volume, Volume):
            raise TypeError(f"{owner}: 'volume' must be a pipelines.volume.Volume")
        if not gate or not str(gate).strip():
            raise ValueError(f"{owner}: argument 'gate' (the gate verdict) is required")
        outputs = list(outputs)
        if not outputs:
            raise ValueError(f"{owner}: 'outputs' is empty; the report summarises written objects")
        for ds in outputs:
            if ds.StudyInstanceUID != volume.study_uid:
                raise ValueError(f"{owner}: output {ds.SOPInstanceUID} belongs to another study")
        prov = self.provenance
        rel = hd.sr.RelationshipTypeValues

        root = hd.sr.ContainerContentItem(name=_SR_TITLE)
        content: list[Dataset] = [hd.sr.TextContentItem(_SR_PROVENANCE, prov.description(), rel.CONTAINS)]

        algorithm = hd.sr.ContainerContentItem(name=_SR_ALGORITHM, relationship_type=rel.CONTAINS)
        algorithm.ContentSequence = hd.sr.AlgorithmIdentification(
            name=_lo(prov.model_name),
            version=_lo(prov.model_version),
            parameters=[
                f"pipeline {prov.pipeline} {prov.pipeline_version}",
                f"weights sha256 {prov.weights_sha256}",
                f"synthetic {'yes' if prov.synthetic else 'no'}",
            ],
            family=codes.cid7162.ArtificialIntelligence,
            manufacturer=NODE_MANUFACTURER,
        )
        content.append(algorithm)

        taken: set[str] = set()
        card = hd.sr.ContainerContentItem(name=_SR_MODEL_CARD, relationship_type=rel.CONTAINS)
        card.ContentSequence = DicomSequence(
            [
                hd.sr.TextContentItem(
                    local_code(_sanitized_code("MC-", key, taken), key), value, rel.CONTAINS
                )
                for key, value in self.model_card.items()
            ]
        )
        content.append(card)

        if qc:
            figures = hd.sr.ContainerContentItem(name=_SR_QC, relationship_type=rel.CONTAINS)
            items = []
            for key, (value, unit) in qc.items():
                if not np.isfinite(float(value)):
                    raise ValueError(f"{owner}: QC figure {key!r} is not finite ({value!r})")
                concept = local_code(_sanitized_code("QC-", key, taken), key)
                items.append(
                    hd.sr.NumContentItem(concept, float(value), ucum(unit), relationship_type=rel.CONTAINS)
                )
            figures.ContentSequence = DicomSequence(items)
            content.append(figures)

        content.append(hd.sr.TextContentItem(_SR_GATE, str(gate).strip(), rel.CONTAINS))

        sources = hd.sr.ContainerContentItem(name=_SR_SOURCES, relationship_type=rel.CONTAINS)
        sources.ContentSequence = DicomSequence(
            [
                hd.sr.ImageContentItem(
                    _SOURCE_IMAGE, ds.SOPClassUID, ds.SOPInstanceUID, relationship_type=rel.CONTAINS
                )
                for ds in volume.datasets
            ]
        )
        content.append(sources)

        written = hd.sr.ContainerContentItem(name=_SR_OUTPUTS, relationship_type=rel.CONTAINS)
        written.ContentSequence = DicomSequence(
            [
                hd.sr.ImageContentItem(
                    _OUTPUT_CONCEPTS[kind_of(ds)],
                    ds.SOPClassUID,
                    ds.SOPInstanceUID,
                    relationship_type=rel.CONTAINS,
                )
                for ds in outputs
            ]
        )
        content.append(written)
        root.ContentSequence = DicomSequence(content)

        sr = hd.sr.ComprehensiveSR(
            evidence=[*volume.datasets, *outputs],
            content=root,
            series_instance_uid=self.series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.instance(self.name, 1),
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            contributing_equipment=_contributing_equipment(prov, include_acquisition=False),
            manufacturer_model_name=_lo(prov.pipeline),
            software_versions=_software_versions(prov),
            device_serial_number=prov.weights_sha256,
        )
        sr.SeriesDescription = _ai_series_description("output summary (model card, QC, gate)")
        _file_meta_keep(sr)
        _finish(sr)
        if out_dir is not None:
            save([sr], out_dir)
        return sr


# --------------------------------------------------------------------------- one job


@dataclass(frozen=True)
class OutputSet:
    """The objects written for one job, by kind."""

    derived: tuple[Dataset, ...]
    uncertainty: Dataset
    hallucination: Dataset
    suspect: Dataset
    report: Dataset
    overlay: Dataset | None = None

    def by_kind(self) -> dict[str, list[Dataset]]:
        """``{"derived": [...], "uncertainty": [pm], ..., "report": [sr]}`` (overlay if written)."""
        kinds: dict[str, list[Dataset]] = {
            KIND_DERIVED: list(self.derived),
            KIND_UNCERTAINTY: [self.uncertainty],
            KIND_HALLUCINATION: [self.hallucination],
            KIND_SUSPECT: [self.suspect],
        }
        if self.overlay is not None:
            kinds[KIND_OVERLAY] = [self.overlay]
        kinds[KIND_REPORT] = [self.report]
        return kinds

    def datasets(self) -> list[Dataset]:
        """All objects, report last."""
        return [ds for group in self.by_kind().values() for ds in group]


def write_outputs(
    volume: Volume,
    *,
    provenance: OutputProvenance,
    uids: UidFactory,
    derived: np.ndarray,
    uncertainty: np.ndarray,
    hallucination: np.ndarray,
    suspect: np.ndarray,
    model_card: Mapping[str, str],
    qc: Mapping[str, tuple[float, str | Code | CodedConcept]],
    gate: str,
    derived_description: str,
    derivation_code: Code | CodedConcept = SMOOTHING,
    uncertainty_units: str | Code | CodedConcept | None = None,
    first_series_number: int = 1001,
    overlay: bool = True,
    synthetic_data_element: bool = True,
    output_modality: str | None = None,
    output_units: str | None = None,
    out_dir: Path | None = None,
    release_pixels: bool = False,
) -> OutputSet:
    """Write every output of one job and return them by kind.

    Series numbers run from ``first_series_number``: derived, uncertainty, hallucination,
    suspect regions, overlay, report.

    Parameters
    ----------
    volume
        The source volume.
    provenance, uids
        As for every writer.
    derived, uncertainty, hallucination, suspect
        The AI image (volume units), its uncertainty (≥ 0), the hallucination score and
        the boolean suspect-region mask, each of the volume's shape.
    model_card, qc, gate
        For the summary report (:meth:`SummaryReportWriter.write`).
    derived_description
        What the derived series is (Series Description, after "AI").
    derivation_code
        Derivation Code of the derived images.
    uncertainty_units
        UCUM code of the uncertainty; default from ``output_units`` (else the volume's units).
    overlay
        Also write the Secondary Capture heat map of the busiest slice.
    synthetic_data_element
        See :class:`DerivedImageWriter`.
    output_modality, output_units
        The derived series' IOD and the units of ``derived`` (and of ``uncertainty``), e.g.
        ``"CT"`` / ``"HU"`` for a synthetic CT from an MR; default the volume's (see
        :class:`DerivedImageWriter`).
    out_dir
        When given, all objects are saved there (see :func:`save`).
    release_pixels
        With ``out_dir``: save each object as soon as it is written and drop its pixel data
        from memory (the report references objects by their headers only), so a long
        series never holds every output's pixels at once. The returned data sets then
        carry no pixel data: read the files.
    """
    stream = out_dir is not None and release_pixels

    def done(datasets: list[Dataset]) -> None:
        if stream:
            assert out_dir is not None
            save(datasets, out_dir)
            for ds in datasets:
                for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                    if keyword in ds:
                        delattr(ds, keyword)

    n = _check_series_number("write_outputs", first_series_number)
    image_units = volume.units if output_units is None else output_units
    units = uncertainty_units if uncertainty_units is not None else ucum_for_units(image_units)
    images = DerivedImageWriter(
        provenance=provenance,
        uids=uids,
        series_number=n,
        series_description=derived_description,
        derivation_code=derivation_code,
        synthetic_data_element=synthetic_data_element,
        output_modality=output_modality,
        units=output_units,
    ).write(volume, derived)
    done(images)
    sigma = UncertaintyMapWriter(provenance=provenance, uids=uids, series_number=n + 1, units=units).write(
        volume, uncertainty
    )
    done([sigma])
    score = HallucinationMapWriter(provenance=provenance, uids=uids, series_number=n + 2).write(
        volume, hallucination
    )
    seg = SuspectRegionWriter(provenance=provenance, uids=uids, series_number=n + 3).write(volume, suspect)
    done([seg])
    picture = None
    if overlay:
        picture = OverlayWriter(provenance=provenance, uids=uids, series_number=n + 4).write(
            volume, hallucination, hallucination_map=score, mask=np.asarray(suspect, dtype=bool)
        )
        done([picture])
    done([score])  # the overlay reads the hallucination map's pixels
    written = [*images, sigma, score, seg, *([picture] if picture is not None else [])]
    report = SummaryReportWriter(
        provenance=provenance, uids=uids, series_number=n + 5, model_card=model_card
    ).write(volume, outputs=written, qc=qc, gate=gate)
    done([report])
    result = OutputSet(tuple(images), sigma, score, seg, report, picture)
    if out_dir is not None and not stream:
        save(result.datasets(), out_dir)
    return result


# --------------------------------------------------------------------------- files


def file_name(ds: Dataset) -> str:
    """``S<series:06>_<modality>_<instance:06>.dcm``: files sort by series, then instance."""
    series = int(ds.get("SeriesNumber") or 0)
    instance = int(ds.get("InstanceNumber") or 0)
    modality = re.sub(r"[^A-Z0-9]", "", str(ds.get("Modality", "OT")).upper()) or "OT"
    return f"S{series:06d}_{modality}_{instance:06d}.dcm"


def save(datasets: Iterable[Dataset], out_dir: Path) -> list[Path]:
    """Write DICOM Part 10 files (``enforce_file_format=True``), named by :func:`file_name`.

    Each file is written beside its final name and renamed into place, so a reader never
    sees half a file. Two objects that would share a name (same series and instance
    number) are refused.

    Returns
    -------
    list of Path
        The files, in the order of ``datasets``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = list(datasets)
    names: dict[str, str] = {}
    for ds in datasets:
        name = file_name(ds)
        uid = str(ds.SOPInstanceUID)
        if names.setdefault(name, uid) != uid:
            raise ValueError(
                f"two objects would be saved as {name} ({names[name]} and {uid}): series numbers clash"
            )
    paths = []
    for ds in datasets:
        if "file_meta" not in ds.__dict__ or "TransferSyntaxUID" not in ds.file_meta:
            _file_meta(ds)
        ds.file_meta.ImplementationClassUID = pydicom.uid.UID(IMPLEMENTATION_CLASS_UID)
        ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        path = out_dir / file_name(ds)
        tmp = path.with_suffix(".part")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- provenance


def _walk_sr(items: Iterable[Dataset]) -> Iterable[tuple[str, Dataset]]:
    """(concept code value of the enclosing container, item) for every SR content item."""
    for item in items:
        name = item.get("ConceptNameCodeSequence")
        code = str(name[0].CodeValue) if name else ""
        for child in item.get("ContentSequence", []):
            yield code, child
            yield from _walk_sr([child])


def provenance_of(ds: Dataset) -> dict[str, Any]:
    """What any single object written here says about itself and where it came from.

    Reads the Source Image Sequence, Referenced Series Sequence and per-frame Derivation
    Image Sequences (images, maps, segmentations), or the "Source images" container and
    evidence (report); and the pipeline, model and weights from Contributing Equipment's
    Contribution Description (parsed with :meth:`OutputProvenance.parse`), falling back to
    Derivation Description and, for the report, its provenance line.

    Returns
    -------
    dict
        ``kind``, ``sop_class_uid``, ``sop_instance_uid``, ``series_instance_uid``,
        ``study_instance_uid``, ``frame_of_reference_uid`` (or None), ``source_sop_instance_uids``
        and ``source_series_instance_uids`` (sorted lists), ``referenced_output_sop_instance_uids``
        (report only, else empty), ``synthetic`` (bool), and the parsed provenance fields
        ``node_version``, ``pipeline``, ``pipeline_version``, ``model_name``, ``model_version``,
        ``weights_sha256``.

    Raises
    ------
    ValueError
        ``ds`` carries no dicom-node provenance.
    """
    kind = kind_of(ds)
    sources: set[str] = set()
    series: set[str] = set()
    outputs: set[str] = set()

    def add_source_items(seq: Any) -> None:
        for item in seq or []:
            if "ReferencedSOPInstanceUID" in item:
                sources.add(str(item.ReferencedSOPInstanceUID))

    add_source_items(ds.get("SourceImageSequence"))
    for group in [
        *ds.get("SharedFunctionalGroupsSequence", []),
        *ds.get("PerFrameFunctionalGroupsSequence", []),
    ]:
        for derivation in group.get("DerivationImageSequence", []) or []:
            add_source_items(derivation.get("SourceImageSequence"))
    for item in ds.get("ReferencedSeriesSequence", []):
        series.add(str(item.SeriesInstanceUID))
        add_source_items(item.get("ReferencedInstanceSequence"))
    if kind == KIND_REPORT:
        for container, item in _walk_sr([ds]):
            refs = item.get("ReferencedSOPSequence")
            if not refs:
                continue
            uid = str(refs[0].ReferencedSOPInstanceUID)
            if container == _SR_SOURCES.value:
                sources.add(uid)
            elif container == _SR_OUTPUTS.value:
                outputs.add(uid)
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
            for item in study.get("ReferencedSeriesSequence", []):
                uids = {str(i.ReferencedSOPInstanceUID) for i in item.get("ReferencedSOPSequence", [])}
                if uids & sources:
                    series.add(str(item.SeriesInstanceUID))

    facts: dict[str, Any] | None = None
    synthetic = str(ds.get("SyntheticData", "")) == "YES"
    for item in ds.get("ContributingEquipmentSequence", []):
        purpose = item.get("PurposeOfReferenceCodeSequence")
        if purpose and purpose[0].CodeValue == _SYNTHESIZING_EQUIPMENT.value:
            synthetic = True
        if facts is None and "ContributionDescription" in item:
            try:
                facts = OutputProvenance.parse(str(item.ContributionDescription))
            except ValueError:
                continue
    if facts is None and "DerivationDescription" in ds:
        try:
            facts = OutputProvenance.parse(str(ds.DerivationDescription))
        except ValueError:
            pass
    if facts is None and kind == KIND_REPORT:
        for _container, item in _walk_sr([ds]):
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == _SR_PROVENANCE.value and "TextValue" in item:
                facts = OutputProvenance.parse(str(item.TextValue))
                break
    if facts is None:
        raise ValueError(f"{kind} object {ds.get('SOPInstanceUID')} carries no dicom-node provenance")
    return {
        "kind": kind,
        "sop_class_uid": str(ds.SOPClassUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "study_instance_uid": str(ds.StudyInstanceUID),
        "frame_of_reference_uid": str(ds.FrameOfReferenceUID) if "FrameOfReferenceUID" in ds else None,
        "source_sop_instance_uids": sorted(sources),
        "source_series_instance_uids": sorted(series),
        "referenced_output_sop_instance_uids": sorted(outputs),
        "synthetic": synthetic,
        **facts,
    }
