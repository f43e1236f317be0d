"""Simulated CT scanners: write phantom studies as DICOM CT Image Storage series.

The pixels come from :mod:`models.sim` (numpy, no DICOM); this module gives them the
headers a scanner would send. Every study says plainly that it is simulated (Patient
Name ``SIMULATED^PHANTOM``, Study and Series Descriptions starting with ``SIMULATED``).

* :func:`write_ct_series` — the quick procedural torso (backbone tests, forward demo).
* :func:`write_ldct_study` — the physics-based low-dose simulator: ``low-dose/`` is what a
  scanner sends (CTDIvol scaled by the dose), ``reference/`` the matching full-dose
  series on the same frame of reference, for evaluation only.
* :func:`write_sct_study` — the paired MR / CT head simulator: ``mr/`` is the MR planning
  series (T1w or T2w spin echo), ``reference-ct/`` the registered CT in HU on the same
  frame of reference and slice geometry, for evaluating synthetic CT only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from models.sim.phantom import PhantomSpec, torso_slice

if TYPE_CHECKING:
    from models.sim.mrct import SpinEcho

#: CTDIvol of the simulated full-dose protocol (mGy); low-dose series scale it by the dose.
FULL_DOSE_CTDIVOL = {"chest": 10.0, "head": 50.0}
FULL_DOSE_MAS = {"chest": 200.0, "head": 300.0}


@dataclass(frozen=True)
class SimulatedStudy:
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class SeriesHeader:
    """What stays the same for every slice of a simulated series."""

    study_uid: str
    series_uid: str
    frame_uid: str
    series_number: int = 1
    patient_id: str = "SIM-0001"
    patient_name: str = "SIMULATED^PHANTOM"
    patient_birth_date: str = ""
    study_description: str = "SIMULATED CT CHEST"
    series_description: str = "SIMULATED AXIAL 2.5mm"
    body_part: str = "CHEST"
    station_name: str = "SIMCT"
    ctdi_vol_mgy: float = 8.0
    kvp: float = 120.0
    exposure_mas: float | None = None
    kernel: str = ""
    pixel_spacing_mm: float = 0.75
    slice_thickness_mm: float = 2.5


def ct_slice(hu: np.ndarray, k: int, header: SeriesHeader, when: dt.datetime) -> Dataset:
    """One CT Image Storage instance: slice ``k`` of the series, int16 with HU rescale."""
    rows, columns = hu.shape
    stored = np.clip(np.round(hu + 1024.0), -32768, 32767).astype(np.int16)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "dicom-node simulator"
    ds.ManufacturerModelName = "phantom"
    ds.StationName = header.station_name
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = header.study_description
    ds.SeriesDescription = header.series_description
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = header.patient_birth_date
    ds.PatientSex = "O"
    ds.BodyPartExamined = header.body_part
    ds.SliceThickness = f"{header.slice_thickness_mm:g}"
    ds.KVP = f"{header.kvp:g}"
    if header.exposure_mas is not None:
        ds.Exposure = str(int(round(header.exposure_mas)))
    if header.kernel:
        ds.ConvolutionKernel = header.kernel
    ds.CTDIvol = float(header.ctdi_vol_mgy)
    phantom = Dataset()
    phantom.CodeValue = "113691"
    phantom.CodingSchemeDesignator = "DCM"
    phantom.CodeMeaning = "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = [phantom]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = header.series_number
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    z = -k * header.slice_thickness_mm
    half_w = (columns - 1) * header.pixel_spacing_mm / 2
    half_h = (rows - 1) * header.pixel_spacing_mm / 2
    ds.ImagePositionPatient = [f"{-half_w:.3f}", f"{-half_h:.3f}", f"{z:.3f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = header.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.3f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [f"{header.pixel_spacing_mm:g}", f"{header.pixel_spacing_mm:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40" if header.body_part != "HEAD" else "40"
    ds.WindowWidth = "400" if header.body_part != "HEAD" else "80"
    ds.PixelData = stored.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    return ds


def _write_series(out_dir: Path, slices: Iterable[np.ndarray], header: SeriesHeader) -> SimulatedStudy:
    out_dir.mkdir(parents=True, exist_ok=True)
    when = dt.datetime.now()
    files = []
    for k, hu in enumerate(slices):
        path = out_dir / f"CT{k + 1:04d}.dcm"
        ct_slice(hu, k, header, when).save_as(path, enforce_file_format=True)
        files.append(path)
    return SimulatedStudy(header.study_uid, header.series_uid, header.frame_uid, tuple(files))


def write_ct_series(
    out_dir: Path,
    spec: PhantomSpec,
    *,
    patient_id: str = "SIM-0001",
    patient_name: str = "SIMULATED^PHANTOM",
    patient_birth_date: str = "",
    study_description: str = "SIMULATED CT CHEST",
    series_description: str = "SIMULATED AXIAL 2.5mm",
    station_name: str = "SIMCT",
    ctdi_vol_mgy: float = 8.0,
    kvp: float = 120.0,
    study_uid: str | None = None,
) -> SimulatedStudy:
    """The quick procedural torso, one file per slice, int16 in HU."""
    rng = np.random.default_rng(spec.seed)
    header = SeriesHeader(
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        frame_uid=generate_uid(),
        patient_id=patient_id,
        patient_name=patient_name,
        patient_birth_date=patient_birth_date,
        study_description=study_description,
        series_description=series_description,
        station_name=station_name,
        ctdi_vol_mgy=ctdi_vol_mgy,
        kvp=kvp,
        pixel_spacing_mm=spec.pixel_spacing_mm,
        slice_thickness_mm=spec.slice_thickness_mm,
    )
    slices = (torso_slice(spec, (k + 0.5) / spec.slices, rng) for k in range(spec.slices))
    return _write_series(out_dir, slices, header)


@dataclass(frozen=True)
class LdctSpec:
    anatomy: Literal["head", "chest"] = "chest"
    slices: int = 24
    size: int = 512
    dose: float = 0.25
    seed: int = 0
    #: Axial levels covered (0..1, see models.sim.anatomy), evenly spaced.
    levels: tuple[float, float] = (0.2, 0.8)
    slice_thickness_mm: float = 2.5
    #: Reconstruction field of view, mm. None: 512²'s pixel size at any matrix (the
    #: anatomy's 250 mm head or 400 mm chest × size / 512: below 512 a targeted, centred
    #: reconstruction), the pixels the restoration model was trained and evaluated on;
    #: coarser ones are outside its input domain (0.4-0.8 mm).
    fov_mm: float | None = None

    @property
    def field_mm(self) -> float:
        """The field of view this study is reconstructed over (see :attr:`fov_mm`)."""
        from models.sim.anatomy import DEFAULT_CHEST_FOV_MM, DEFAULT_HEAD_FOV_MM

        if self.fov_mm is not None:
            return self.fov_mm
        return (DEFAULT_HEAD_FOV_MM if self.anatomy == "head" else DEFAULT_CHEST_FOV_MM) * self.size / 512


def _simulate_level(
    args: tuple[str, int, int, float, float, float],
) -> tuple[np.ndarray, np.ndarray, float]:
    from models.sim.ldct import make_case

    anatomy, seed, size, dose, level, fov_mm = args
    case = make_case(anatomy, seed, size=size, dose=dose, level=level, fov_mm=fov_mm)  # type: ignore[arg-type]
    return case.low_dose_hu.astype(np.float32), case.reference_hu.astype(np.float32), case.pixel_mm


def write_ldct_study(
    out_dir: Path,
    spec: LdctSpec,
    *,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    patient_id: str = "SIM-LDCT-0001",
) -> tuple[SimulatedStudy, SimulatedStudy]:
    """``out_dir/low-dose`` (what the scanner sends) and ``out_dir/reference`` (full dose).

    Both series share the study and the frame of reference, slice for slice, so a restored
    series can be scored against the reference position by position.
    """
    lo, hi = spec.levels
    levels = [lo + (hi - lo) * (k + 0.5) / spec.slices for k in range(spec.slices)]
    jobs = [(spec.anatomy, spec.seed, spec.size, spec.dose, level, spec.field_mm) for level in levels]
    low_slices, ref_slices, spacings = [], [], []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for k, (low_hu, ref_hu, spacing) in enumerate(pool.map(_simulate_level, jobs)):
            low_slices.append(low_hu)
            ref_slices.append(ref_hu)
            spacings.append(spacing)
            if progress:
                progress(k + 1, spec.slices)
    pixel_mm = spacings[0]
    study_uid, frame_uid = generate_uid(), generate_uid()
    part = spec.anatomy.upper()
    base = SeriesHeader(
        study_uid=study_uid,
        series_uid="",
        frame_uid=frame_uid,
        patient_id=patient_id,
        study_description=f"SIMULATED CT {part}",
        body_part=part,
        kvp=120.0,
        kernel="FBP SHEPP-LOGAN",
        pixel_spacing_mm=pixel_mm,
        slice_thickness_mm=spec.slice_thickness_mm,
    )
    low = _write_series(
        out_dir / "low-dose",
        low_slices,
        replace(
            base,
            series_uid=generate_uid(),
            series_number=2,
            series_description=f"SIMULATED LOW DOSE {spec.dose * 100:g}% {part}",
            ctdi_vol_mgy=round(FULL_DOSE_CTDIVOL[spec.anatomy] * spec.dose, 3),
            exposure_mas=FULL_DOSE_MAS[spec.anatomy] * spec.dose,
        ),
    )
    reference = _write_series(
        out_dir / "reference",
        ref_slices,
        replace(
            base,
            series_uid=generate_uid(),
            series_number=1,
            series_description=f"SIMULATED FULL DOSE REFERENCE {part}",
            ctdi_vol_mgy=FULL_DOSE_CTDIVOL[spec.anatomy],
            exposure_mas=FULL_DOSE_MAS[spec.anatomy],
        ),
    )
    return low, reference


# -- paired MR / reference CT (synthetic-CT planning) ---------------------------------------
@dataclass(frozen=True)
class SctSpec:
    """One simulated MR planning study with its reference CT (:mod:`models.sim.mrct`)."""

    slices: int = 24
    size: int = 256
    seed: int = 0
    #: MR series written to ``mr/``: T1-weighted or T2-weighted spin echo.
    sequence: Literal["t1", "t2"] = "t1"
    slice_thickness_mm: float = 2.5
    #: Stack centre in [0, 1] (see :func:`models.sim.mrct.make_pair`); random per seed if None.
    level: float | None = None
    fov_mm: float = 250.0


def _plane(k: int, rows: int, columns: int, header: SeriesHeader) -> tuple[list[str], str]:
    """Image Position (Patient) and Slice Location of slice ``k``, exactly as :func:`ct_slice`."""
    z = -k * header.slice_thickness_mm
    half_w = (columns - 1) * header.pixel_spacing_mm / 2
    half_h = (rows - 1) * header.pixel_spacing_mm / 2
    return [f"{-half_w:.3f}", f"{-half_h:.3f}", f"{z:.3f}"], f"{z:.3f}"


def mr_slice(
    values: np.ndarray,
    k: int,
    header: SeriesHeader,
    protocol: SpinEcho,
    field_strength_t: float,
    window: tuple[float, float],
    when: dt.datetime,
) -> Dataset:
    """One MR Image Storage instance: slice ``k`` of a simulated 2-D spin-echo series, uint16.

    Geometry follows :func:`ct_slice` (slice ``k`` at z = -k * thickness, head first supine,
    axial), so an MR and a CT series written with the same header geometry coincide.
    """
    from models.sim.mrct import GYROMAGNETIC_MHZ_PER_T

    rows, columns = values.shape
    stored = np.clip(np.round(values), 0, 65535).astype(np.uint16)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "dicom-node simulator"
    ds.ManufacturerModelName = f"SIMULATED MR {field_strength_t:g}T"
    ds.StationName = header.station_name
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = header.study_description
    ds.SeriesDescription = header.series_description
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = header.patient_birth_date
    ds.PatientSex = "O"
    ds.BodyPartExamined = header.body_part
    # MR Image module: conventional 2-D spin echo, as the signal equation of the simulator.
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = f"SIM_SE_{protocol.name.upper()}"
    ds.AngioFlag = "N"
    ds.SliceThickness = f"{header.slice_thickness_mm:g}"
    ds.SpacingBetweenSlices = f"{header.slice_thickness_mm:g}"
    ds.RepetitionTime = f"{protocol.tr_ms:g}"
    ds.EchoTime = f"{protocol.te_ms:g}"
    ds.EchoTrainLength = protocol.echo_train_length
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = f"{GYROMAGNETIC_MHZ_PER_T * field_strength_t:.4f}"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = f"{field_strength_t:g}"
    ds.FlipAngle = f"{protocol.flip_angle_deg:g}"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = header.series_number
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.ImagePositionPatient, ds.SliceLocation = _plane(k, rows, columns, header)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = header.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [f"{header.pixel_spacing_mm:g}", f"{header.pixel_spacing_mm:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = f"{window[0]:.0f}"
    ds.WindowWidth = f"{window[1]:.0f}"
    ds.ImageComments = "SIMULATED image (dicom-node models.sim.mrct), not an acquisition."
    ds.PixelData = stored.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    return ds


def write_sct_study(
    out_dir: Path,
    spec: SctSpec,
    *,
    patient_id: str = "SIM-SCT-0001",
) -> tuple[SimulatedStudy, SimulatedStudy]:
    """``out_dir/mr`` (the MR planning series) and ``out_dir/reference-ct`` (evaluation only).

    One registered pair from :func:`models.sim.mrct.make_pair`: both series share the study,
    the frame of reference and the slice geometry (same Image Position (Patient) per slice),
    so a synthetic CT made from ``mr/`` can be scored against ``reference-ct/`` voxel by voxel.
    The reference CT is int16 with rescale -1024 / 1 (HU).

    Returns
    -------
    tuple of SimulatedStudy
        ``(mr_study, ct_reference)``.
    """
    from models.sim.mrct import make_pair

    pair = make_pair(
        spec.seed,
        slices=spec.slices,
        size=spec.size,
        level=spec.level,
        fov_mm=spec.fov_mm,
        slice_thickness_mm=spec.slice_thickness_mm,
    )
    sequence = f"{spec.sequence}w"
    protocol = pair.protocol(sequence)
    # Instance 1 is the most superior slice (z = 0, then down), as write_ct_series does.
    mr_volume = pair.mr(sequence)[::-1]
    ct_volume = pair.ct_hu[::-1]
    body = pair.body_mask[::-1]
    low, high = np.percentile(mr_volume[body], [1.0, 99.5]) if body.any() else (0.0, 1.0)
    window = (float(low + high) / 2.0, max(float(high - low), 1.0))
    when = dt.datetime.now()
    base = SeriesHeader(
        study_uid=generate_uid(),
        series_uid="",
        frame_uid=generate_uid(),
        patient_id=patient_id,
        study_description="SIMULATED MR HEAD RT PLANNING",
        body_part="HEAD",
        kvp=120.0,
        ctdi_vol_mgy=FULL_DOSE_CTDIVOL["head"],
        exposure_mas=FULL_DOSE_MAS["head"],
        pixel_spacing_mm=pair.spacing_mm[1],
        slice_thickness_mm=pair.spacing_mm[0],
    )
    mr_header = replace(
        base,
        series_uid=generate_uid(),
        series_number=1,
        series_description=(f"SIMULATED {protocol.name.upper()} SE AXIAL {pair.spacing_mm[0]:g}mm"),
        station_name="SIMULATED MR",
    )
    ct_header = replace(
        base,
        series_uid=generate_uid(),
        series_number=2,
        series_description="SIMULATED REFERENCE CT - EVALUATION ONLY",
        station_name="SIMULATED CT",
    )
    mr_dir, ct_dir = out_dir / "mr", out_dir / "reference-ct"
    mr_dir.mkdir(parents=True, exist_ok=True)
    ct_dir.mkdir(parents=True, exist_ok=True)
    mr_files, ct_files = [], []
    for k in range(pair.shape[0]):
        path = mr_dir / f"MR{k + 1:04d}.dcm"
        mr_slice(mr_volume[k], k, mr_header, protocol, pair.field_strength_t, window, when).save_as(
            path, enforce_file_format=True
        )
        mr_files.append(path)
        ds = ct_slice(ct_volume[k], k, ct_header, when)
        ds.ImageComments = (
            "SIMULATED reference CT (dicom-node models.sim.mrct) for evaluating synthetic CT only; "
            "not an acquisition, not for treatment planning."
        )
        path = ct_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ct_files.append(path)
    return (
        SimulatedStudy(base.study_uid, mr_header.series_uid, base.frame_uid, tuple(mr_files)),
        SimulatedStudy(base.study_uid, ct_header.series_uid, base.frame_uid, tuple(ct_files)),
    )
