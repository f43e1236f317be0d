"""Derived image series: AI images as classic CT / MR Image Storage, one per slice.

Built with pydicom (highdicom has no classic CT / MR builder), so this module also copies
what highdicom would: the source's Patient, Study and Clinical Trial attributes (Type 2
ones written empty when the source lacks them, never invented), its Contrast/Bolus
module and the modality's acquisition facts. See :class:`DerivedImageWriter`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import CTImageStorage, MRImageStorage

from pipelines import spill
from pipelines.geometry import frame_group
from pipelines.provenance import OutputProvenance
from pipelines.uids import UidFactory
from pipelines.volume import Volume
from pipelines.writers.common import (
    KIND_DERIVED,
    NODE_MANUFACTURER,
    SMOOTHING,
    _ai_series_description,
    _check_array,
    _check_provenance,
    _check_series_number,
    _check_uids,
    _code_item,
    _concept,
    _contributing_equipment,
    _copy_anatomy,
    _copy_patient_and_study,
    _ds,
    _finish,
    _frame_value,
    _keep_request,
    _keep_timezone,
    _lo,
    _now,
    _referenced_series,
    _software_versions,
    _source_image_item,
    _source_window,
    _sources_by_uid,
    _window_of,
)
from pipelines.writers.files import _file_meta, save

__all__ = ["DerivedImageWriter"]

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
    modifier = frame_group(ds, None, "MRModifierSequence")
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
        (:func:`dicom_node.delivery.tps.dciodvfy_errors` discounts exactly that stale report.)
    output_modality
        ``"CT"`` or ``"MR"``: the IOD to write; default (None) the source volume's.
        Only a CT may be made from a source of another modality.
    units
        Units of the written array (``"HU"``); default the source volume's units.
    contrast
        The MR contrast the pixels show when it is not the source's (a synthesised FLAIR
        made on a T1w's grid: ``"FLAIR"``). Nothing was acquired with that contrast, so
        none of the source's acquisition is claimed: Scanning Sequence ``RM`` (research
        mode: no acquisition sequence), Sequence Variant ``NONE``, repetition / echo /
        inversion times, flip angle and sequence name empty or absent, no Contrast/Bolus
        module; Image Comments say what it was made from.
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
        contrast: str | None = None,
    ) -> None:
        owner = type(self).__name__
        if contrast is not None and (output_modality not in (None, "MR") or not contrast.strip()):
            raise ValueError(f"{owner}: argument 'contrast' names the contrast of an MR output")
        self.contrast = contrast.strip() if contrast else None
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

    def write(
        self,
        volume: Volume,
        array: np.ndarray,
        out_dir: Path | None = None,
        *,
        each: Callable[[Dataset], None] | None = None,
    ) -> list[Dataset]:
        """One derived instance per slice of ``volume``, pixels from ``array``.

        Parameters
        ----------
        volume
            The source volume (its ``datasets`` give the headers to copy).
        array
            ``(slices, rows, columns)`` in the volume's units (HU for CT), or in ``units``.
        out_dir
            When given, the instances are also saved there (see :func:`save`).
        each
            Called with each instance as soon as it is made (e.g. to save it and drop its
            pixels, so a long series is never in memory at once).

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
            out.append(_finish(ds, self.provenance))
            if each is not None:
                each(ds)
            if k % spill.SLAB == spill.SLAB - 1:
                spill.release(values)  # a file-backed prediction: a slab of pages at a time
        spill.release(values)
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
        _copy_patient_and_study(ds, source)
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
        if self.contrast:
            made_from = (
                f"{self.contrast} synthesized on the grid of MR series {volume.series_uid} "
                "(see Derivation Description for every input); not acquired. "
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
        if not cross and not self.contrast:
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
        elif self.contrast:
            self._no_acquisition(ds, source)
            ds.AcquisitionNumber = ""
        else:
            self._mr_attributes(ds, source, frame)
            ds.AcquisitionNumber = acquisition if acquisition is not None else ""
        # Common Instance Reference
        ds.ReferencedSeriesSequence = _referenced_series(
            [(volume.series_uid, ref.sop_class_uid, ref.sop_instance_uid)]
        )
        ds.ContributingEquipmentSequence = _contributing_equipment(prov, source)
        _keep_timezone(ds, source)
        _keep_request(ds, source)
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
            item = frame_group(source, ref.frame_number, "PlanePositionSequence")
            if item is not None and "ImagePositionPatient" in item:
                return list(item.ImagePositionPatient)
        return [_ds(v) for v in ref.position]

    @staticmethod
    def _no_acquisition(ds: Dataset, source: Dataset) -> None:
        """The MR Image module of a synthesised contrast: no sequence was run for it."""
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        for keyword in ("ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime", "EchoTrainLength"):
            setattr(ds, keyword, "")
        if "MagneticFieldStrength" in source:
            ds.MagneticFieldStrength = source.MagneticFieldStrength

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
