"""A simulated CT scanner: writes a phantom study as a DICOM CT Image Storage series.

The pixels come from :mod:`models.sim.phantom` (numpy, no DICOM); this module gives them
the headers a scanner would send. Every study says plainly that it is simulated (Patient
Name ``SIMULATED^PHANTOM``, Study Description starting with ``SIMULATED``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from models.sim.phantom import PhantomSpec, torso_slice


@dataclass(frozen=True)
class SimulatedStudy:
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    files: tuple[Path, ...]


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
    """Write one axial CT series, one file per slice, int16 with HU rescale."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    now = dt.datetime.now()
    files = []
    for k in range(spec.slices):
        hu = torso_slice(spec, (k + 0.5) / spec.slices, rng)
        stored = np.clip(np.round(hu + 1024.0), -32768, 32767).astype(np.int16)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "dicom-node simulator"
        ds.ManufacturerModelName = "phantom"
        ds.StationName = station_name
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = patient_birth_date
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{spec.slice_thickness_mm:g}"
        ds.KVP = f"{kvp:g}"
        ds.CTDIvol = float(ctdi_vol_mgy)
        phantom = Dataset()
        phantom.CodeValue = "113691"
        phantom.CodingSchemeDesignator = "DCM"
        phantom.CodeMeaning = "IEC Body Dosimetry Phantom"
        ds.CTDIPhantomTypeCodeSequence = [phantom]
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        z = -k * spec.slice_thickness_mm
        half_w = (spec.columns - 1) * spec.pixel_spacing_mm / 2
        half_h = (spec.rows - 1) * spec.pixel_spacing_mm / 2
        ds.ImagePositionPatient = [f"{-half_w:.3f}", f"{-half_h:.3f}", f"{z:.3f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.3f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.PixelSpacing = [f"{spec.pixel_spacing_mm:g}", f"{spec.pixel_spacing_mm:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta
        path = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return SimulatedStudy(study_uid, series_uid, frame_uid, tuple(files))
