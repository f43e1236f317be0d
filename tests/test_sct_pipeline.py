"""The ``sct`` pipeline: a simulated T1-weighted MR planning series → `dicom-node run sct` →
a synthetic CT (CT Image Storage, HU) on the MR's frame of reference and slice geometry,
with its maps, SEG and SR; a T2-weighted series is refused; and a structure set drawn on the
MR applies to the sCT unchanged.

The studies are SIMULATED (``dicom_node.lab.simulate.write_sct_study``, 12 slices of 128×128);
the model is the shipped ``sct-head``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_node.delivery.tps import DCIODVFY, STALE_DCIODVFY_ERRORS, dciodvfy_errors, validate_for_tps
from dicom_node.lab.simulate import SctSpec, SimulatedStudy, write_sct_study
from pipelines.provenance import provenance_of
from pipelines.writers import kind_of
from tests.conftest import require

SLICES, SIZE = 12, 256  # sct-head takes 0.4-1.0 mm pixels: 256² over 250 mm
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: Attributes of the MR Image module (and MR acquisition facts) a CT must not carry.
MR_ONLY = (
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "EchoTrainLength",
    "InversionTime",
    "MagneticFieldStrength",
    "ImagingFrequency",
    "ImagedNucleus",
    "SequenceName",
    "FlipAngle",
    "EchoNumbers",
    "NumberOfAverages",
    "AngioFlag",
)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, timeout=timeout
    )


@dataclass(frozen=True)
class SctRun:
    mr: SimulatedStudy
    out: Path
    summary: dict[str, Any]
    seconds: float

    def files(self, kind: str) -> list[Path]:
        return [
            f
            for f in sorted(self.out.glob("*.dcm"))
            if kind_of(pydicom.dcmread(f, stop_before_pixels=True)) == kind
        ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SctRun:
    base = tmp_path_factory.mktemp("sct")
    mr, _reference = write_sct_study(base / "study", SctSpec(slices=SLICES, size=SIZE, seed=7))
    out = base / "out"
    result = cli("run", "sct", str(base / "study" / "mr"), "--out", str(out), "--home", str(base), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    (summary,) = json.loads(result.stdout)["studies"]
    return SctRun(mr, out, summary, float(summary["seconds"]))


def mr_by_uid(run: SctRun) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in run.mr.files)}


def test_run_sct_writes_the_ct_series_both_maps_seg_sr_and_overlay(run: SctRun) -> None:
    kinds = Counter(kind_of(pydicom.dcmread(f, stop_before_pixels=True)) for f in run.out.glob("*.dcm"))
    assert kinds == {
        "derived": SLICES,
        "uncertainty": 1,
        "hallucination": 1,
        "suspect": 1,
        "report": 1,
        "overlay": 1,
    }
    assert run.summary["model"]["name"] == "sct-head"
    (qc, *_) = run.summary["qc"].values()
    for figure in (
        "mean calibrated sigma in body",
        "mean sigma at bone/air interfaces",
        "hallucination score p99",
        "suspect fraction",
        "suspect volume",
        "largest suspect region",
    ):
        assert np.isfinite(qc[figure]) and qc[figure] >= 0, figure
    for f in sorted(run.out.glob("*.dcm")):
        facts = provenance_of(pydicom.dcmread(f, stop_before_pixels=True))
        assert (facts["pipeline"], facts["model_name"]) == ("sct", "sct-head")
        assert facts["synthetic"] is True
        assert facts["frame_of_reference_uid"] in (None, run.mr.frame_of_reference_uid)


def test_sct_is_ct_image_storage_in_hu_on_the_mr_geometry(run: SctRun) -> None:
    sources = mr_by_uid(run)
    sct = run.files("derived")
    assert len(sct) == SLICES
    series = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in sct}
    assert len(series) == 1 and run.mr.series_uid not in series
    for f in sct:
        ds = pydicom.dcmread(f)
        (ref,) = ds.SourceImageSequence
        mr = sources[str(ref.ReferencedSOPInstanceUID)]
        assert ref.ReferencedSOPClassUID == MRImageStorage
        assert (ds.SOPClassUID, ds.Modality) == (CTImageStorage, "CT")
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (mr.StudyInstanceUID, mr.FrameOfReferenceUID)
        assert ds.PatientPosition == mr.PatientPosition == "HFS"
        assert ds.PatientID == mr.PatientID
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], mr.ImagePositionPatient, atol=1e-3
        )
        np.testing.assert_allclose(
            [float(v) for v in ds.ImageOrientationPatient], mr.ImageOrientationPatient, atol=1e-6
        )
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], mr.PixelSpacing, atol=1e-3)
        assert float(ds.SliceThickness) == pytest.approx(float(mr.SliceThickness))
        assert (ds.Rows, ds.Columns) == (mr.Rows, mr.Columns)
        # int16 stored values; the rescale gives Hounsfield units
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 1)
        assert ds.pixel_array.dtype == np.int16
        assert ds.RescaleType == "HU"
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu[0, 0] == -1000.0  # air outside the head
        assert -1024.0 <= hu.min() and hu.max() <= 3071.0
        # says what it is
        assert ds.SyntheticData == "YES"
        assert "AI" in ds.SeriesDescription and "sCT" in ds.SeriesDescription
        assert "not for diagnosis" in ds.SeriesDescription
        assert ds.DerivationCodeSequence[0].CodeValue == "AI-SYNTHESIS"
        purposes = {i.PurposeOfReferenceCodeSequence[0].CodeValue for i in ds.ContributingEquipmentSequence}
        assert "109100" in purposes  # Synthesizing Equipment
        # a CT: its type 2 attributes present (nothing was acquired as CT: empty), no MR attributes
        assert "KVP" in ds and ds.KVP in (None, "")
        assert "AcquisitionNumber" in ds
        assert [k for k in MR_ONLY if k in ds] == []
        assert "ContrastBolusAgent" not in ds


def test_uncertainty_map_is_in_hounsfield_units(run: SctRun) -> None:
    (path,) = run.files("uncertainty")
    pm = pydicom.dcmread(path)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "[hnsf'U]"
    assert pm.FrameOfReferenceUID == run.mr.frame_of_reference_uid
    sigma = np.asarray(pm.pixel_array, np.float32)
    assert sigma.shape == (SLICES, SIZE, SIZE) and sigma.min() >= 0 and sigma.max() > 0


def test_every_object_passes_dciodvfy_and_the_sct_passes_the_tps_checks(run: SctRun) -> None:
    require(DCIODVFY)
    for f in sorted(run.out.glob("*.dcm")):
        assert dciodvfy_errors(f) == [], f.name
    # The only Error dciodvfy's own output has is its stale dictionary's Synthetic Data line.
    raw = subprocess.run([DCIODVFY, str(run.files("derived")[0])], capture_output=True, text=True)
    errors = [line for line in (raw.stdout + raw.stderr).splitlines() if line.startswith("Error")]
    assert all(line.startswith(STALE_DCIODVFY_ERRORS) for line in errors), errors
    assert validate_for_tps(run.files("derived"), run.mr.frame_of_reference_uid) == []


def test_a_t2_weighted_series_is_refused_with_the_reason(tmp_path: Path) -> None:
    mr, _ = write_sct_study(tmp_path / "study", SctSpec(slices=4, size=256, seed=8, sequence="t2"))
    out = tmp_path / "out"
    result = cli("run", "sct", str(tmp_path / "study" / "mr"), "--out", str(out), "--home", str(tmp_path))
    assert result.returncode == 1
    message = " ".join((result.stdout + result.stderr).split())
    assert f"MR series {mr.series_uid} is not T1-weighted (TR < 1000 ms and TE < 30 ms)" in message
    assert "it has TR 4000 ms / TE 100 ms" in message
    assert "sct-head 1.0 takes t1w MR only" in message
    assert list(out.glob("*.dcm")) == []


def test_an_mr_series_without_a_frame_of_reference_is_refused_with_the_reason(tmp_path: Path) -> None:
    """A legacy MR (no Frame of Reference UID): the TPS could not place an sCT on it, and a
    frame made up here would be no frame the TPS knows. Refused before the model runs."""
    from pipelines.base import InputInstance, InputRefused, RunEnvironment, StudyInput
    from pipelines.sct import sct

    mr, _ = write_sct_study(tmp_path / "study", SctSpec(slices=4, size=SIZE, seed=9))
    instances = []
    for f in mr.files:
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
        instances.append(InputInstance(str(ds.SOPInstanceUID), mr.series_uid, str(ds.SOPClassUID), "", f, ""))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputRefused) as refused:
        sct().run(StudyInput(1, mr.study_uid, 1, tuple(instances)), RunEnvironment(workdir=out))
    message = str(refused.value)
    assert "\n" not in message and mr.series_uid in message
    assert "no Frame of Reference UID" in message and "for the planning system to place it" in message
    assert list(out.glob("*.dcm")) == []


# -- a structure set drawn on the MR applies to the sCT -------------------------------------------


def structure_set_on(mr_files: list[Path], slice_index: int) -> Dataset:
    """An RT Structure Set with one ROI: a closed 20 mm square on one MR slice, in its FoR."""
    mrs = [pydicom.dcmread(f, stop_before_pixels=True) for f in mr_files]
    first, target = mrs[0], mrs[slice_index]
    ds = Dataset()
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID"):
        setattr(ds, keyword, first.get(keyword, ""))
    ds.SeriesInstanceUID = generate_uid()
    ds.StructureSetLabel = "MR PLANNING"
    referenced_frame = Dataset()
    referenced_frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (as TPSs write)
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = [_image_ref(m) for m in mrs]
    study.RTReferencedSeriesSequence = [series]
    referenced_frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [referenced_frame]
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
    roi.ROIName = "GTV"
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = [roi]
    x0, y0, z = (float(v) for v in target.ImagePositionPatient)
    cx, cy = x0 + 60.0, y0 + 80.0  # inside the 250 mm field of view, in the head
    square = [(cx - 10, cy - 10), (cx + 10, cy - 10), (cx + 10, cy + 10), (cx - 10, cy + 10)]
    contour = Dataset()
    contour.ContourGeometricType = "CLOSED_PLANAR"
    contour.NumberOfContourPoints = len(square)
    contour.ContourData = [f"{v:.3f}" for x, y in square for v in (x, y, z)]
    contour.ContourImageSequence = [_image_ref(target)]
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = [255, 0, 0]
    roi_contour.ContourSequence = [contour]
    ds.ROIContourSequence = [roi_contour]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _image_ref(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def pixel_of(ds: Dataset, point: np.ndarray) -> tuple[float, float, float]:
    """(column, row, distance from the image plane in mm) of a patient point in an image."""
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_dir, col_dir = orientation[:3], orientation[3:]
    d_row, d_col = (float(v) for v in ds.PixelSpacing)  # row spacing, column spacing
    offset = point - origin
    return (
        float(offset @ row_dir) / d_col,
        float(offset @ col_dir) / d_row,
        float(offset @ np.cross(row_dir, col_dir)),
    )


def test_a_structure_set_drawn_on_the_mr_applies_to_the_sct_unchanged(run: SctRun, tmp_path: Path) -> None:
    rtstruct = structure_set_on(list(run.mr.files), slice_index=5)
    rtstruct.save_as(tmp_path / "rtstruct.dcm", enforce_file_format=True)
    rtstruct = pydicom.dcmread(tmp_path / "rtstruct.dcm")
    sct = [pydicom.dcmread(f) for f in run.files("derived")]
    sources = mr_by_uid(run)

    # same frame of reference: the TPS places the sCT where the structures were drawn
    referenced_frame = str(rtstruct.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID)
    assert {str(ds.FrameOfReferenceUID) for ds in sct} == {referenced_frame}
    assert str(rtstruct.StructureSetROISequence[0].ReferencedFrameOfReferenceUID) == referenced_frame

    sct_z = np.array([float(ds.ImagePositionPatient[2]) for ds in sct])
    for roi_contour in rtstruct.ROIContourSequence:
        for contour in roi_contour.ContourSequence:
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            # every point lies on one sCT slice (the planar contour's z is a slice position) …
            (on,) = np.flatnonzero(np.isclose(sct_z, points[0, 2], atol=1e-3))
            assert np.allclose(points[:, 2], sct_z[on], atol=1e-3)
            # … that slice was made from the MR image the contour was drawn on …
            drawn_on = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            assert str(sct[on].SourceImageSequence[0].ReferencedSOPInstanceUID) == drawn_on
            # … and each point falls on the same pixel of the sCT as of that MR image, inside it
            mr = sources[drawn_on]
            for point in points:
                in_sct, in_mr = pixel_of(sct[on], point), pixel_of(mr, point)
                np.testing.assert_allclose(in_sct, in_mr, atol=1e-3)
                column, row, off_plane = in_sct
                assert 0 <= column < sct[on].Columns and 0 <= row < sct[on].Rows
                assert abs(off_plane) < 1e-3
