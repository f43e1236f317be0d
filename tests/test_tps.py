"""Checks before a TPS delivery: each defect of a CT series is named; a broken MR is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_node.delivery.tps import DCIODVFY, validate_for_tps, validate_input_series
from dicom_node.lab.simulate import write_ct_series
from models.sim.phantom import PhantomSpec
from tests.peers import have

SLICES = 8
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


@pytest.fixture(scope="module")
def ct_master(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    sim = write_ct_series(
        tmp_path_factory.mktemp("ct"), PhantomSpec(rows=64, columns=64, slices=SLICES, seed=3)
    )
    return list(sim.files)


@pytest.fixture
def ct(ct_master: list[Path], tmp_path: Path) -> list[Path]:
    """A fresh copy of the good 8-slice 64x64 CT series, for a test to break."""
    out = []
    for path in ct_master:
        target = tmp_path / path.name
        target.write_bytes(path.read_bytes())
        out.append(target)
    return out


def edit(path: Path, change: Callable[[Dataset], object]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def frame_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).FrameOfReferenceUID)


def joined(problems: list[str]) -> str:
    return "\n".join(problems)


# -- the CT series going to the TPS -----------------------------------------------------------


def test_a_good_ct_series_passes(ct: list[Path]) -> None:
    assert validate_for_tps(ct) == []
    assert validate_for_tps(ct, expected_frame_of_reference=frame_of(ct[0])) == []


def test_wrong_sop_class_is_named(ct: list[Path]) -> None:
    edit(ct[2], lambda ds: setattr(ds, "SOPClassUID", MRImageStorage))
    problems = validate_for_tps(ct, dciodvfy=None)
    assert any(p.startswith("not CT Image Storage (MR Image Storage) (1 of 8") for p in problems), problems


def test_mixed_frames_of_reference_are_named(ct: list[Path]) -> None:
    edit(ct[5], lambda ds: setattr(ds, "FrameOfReferenceUID", generate_uid()))
    assert "instances of 2 frames of reference mixed in" in joined(validate_for_tps(ct, dciodvfy=None))


def test_frame_of_reference_must_be_the_planning_mrs(ct: list[Path]) -> None:
    mr_frame = generate_uid()
    (problem,) = validate_for_tps(ct, expected_frame_of_reference=mr_frame, dciodvfy=None)
    assert f"is not the planning MR's ({mr_frame})" in problem
    assert frame_of(ct[0]) in problem


def test_missing_rescale_is_named(ct: list[Path]) -> None:
    def drop_rescale(ds: Dataset) -> None:
        del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType

    for path in ct:
        edit(path, drop_rescale)
    text = joined(validate_for_tps(ct, dciodvfy=None))
    assert "mandatory attribute(s) missing or empty: RescaleIntercept, RescaleSlope (all 8 instances)" in text
    # without the intercept, stored values read as HU have no air in them
    assert "no voxel below -500 HU" in text and "rescale intercept missing" in text


def test_rescale_type_other_than_hu_is_named(ct: list[Path]) -> None:
    edit(ct[0], lambda ds: setattr(ds, "RescaleType", "US"))
    assert "Rescale Type is 'US', not HU (1 of 8" in joined(validate_for_tps(ct, dciodvfy=None))


def test_values_outside_hounsfield_units_are_named(ct: list[Path]) -> None:
    for path in ct:
        edit(path, lambda ds: setattr(ds, "RescaleSlope", "100"))
    assert "outside Hounsfield units" in joined(validate_for_tps(ct, dciodvfy=None))


def test_a_gap_is_named_with_the_slices_missing(ct: list[Path]) -> None:
    # slices at z = 0, -2.5, …, -17.5; drop z = -7.5 and -10
    (problem,) = validate_for_tps(ct[:3] + ct[5:], dciodvfy=None)
    assert problem == (
        "the series has 6 of 8 slices: gap of 7.5 mm between z=-12.5 and z=-5.0 "
        "(slices are 2.50 mm apart elsewhere)"
    )


def test_a_duplicate_slice_position_is_named(ct: list[Path]) -> None:
    position = pydicom.dcmread(ct[3]).ImagePositionPatient
    edit(ct[4], lambda ds: setattr(ds, "ImagePositionPatient", position))
    text = joined(validate_for_tps(ct, dciodvfy=None))
    assert "the series has 1 duplicate slice position(s), first at z=-7.5" in text


def test_uneven_spacing_is_named(ct: list[Path]) -> None:
    def shift(ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 0.4]

    edit(ct[4], shift)
    assert "the series has uneven slice spacing: 2.100 to 2.900 mm" in joined(
        validate_for_tps(ct, dciodvfy=None)
    )


def test_mixed_orientation_is_named(ct: list[Path]) -> None:
    edit(ct[6], lambda ds: setattr(ds, "ImageOrientationPatient", SAGITTAL))
    text = joined(validate_for_tps(ct, dciodvfy=None))
    assert "the series mixes 2 orientations (7 axial" in text and "1 sagittal" in text


def test_mixed_image_sizes_are_named(ct: list[Path]) -> None:
    def shrink(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 32
        ds.PixelData = np.full((32, 32), 24, dtype=np.int16).tobytes()

    edit(ct[1], shrink)
    assert "image sizes differ between slices (rows 32, 64; columns 32, 64)" in joined(
        validate_for_tps(ct, dciodvfy=None)
    )


def test_mandatory_attributes_are_named(ct: list[Path]) -> None:
    def strip(ds: Dataset) -> None:
        ds.PatientID = ""
        del ds.KVP, ds.PatientPosition

    for path in ct:
        edit(path, strip)
    edit(ct[3], lambda ds: delattr(ds, "SliceThickness"))
    assert validate_for_tps(ct, dciodvfy=None) == [
        "mandatory attribute(s) missing or empty: PatientID, PatientPosition (all 8 instances)",
        "type 2 attribute(s) missing (may be empty, must be present): KVP (7 of 8, first "
        + pydicom.dcmread(ct[0]).SOPInstanceUID
        + ")",
        "type 2 attribute(s) missing (may be empty, must be present): SliceThickness, KVP (1 of 8, first "
        + pydicom.dcmread(ct[3]).SOPInstanceUID
        + ")",
    ]


def test_dciodvfy_errors_are_reported(ct: list[Path]) -> None:
    if not have(DCIODVFY):
        pytest.skip("dciodvfy not installed")
    for path in ct:
        edit(path, lambda ds: delattr(ds, "KVP"))
    dciodvfy = [p for p in validate_for_tps(ct) if p.startswith("dciodvfy: ")]
    first, middle, last = ct[0].name, ct[len(ct) // 2].name, ct[-1].name
    assert dciodvfy == [
        "dciodvfy: Error - Missing attribute Type 2 Required Element=<KVP> Module=<CTImage> "
        f"({first}, {middle}, {last})"
    ]


def test_unreadable_file_and_empty_series(ct: list[Path]) -> None:
    ct[0].write_bytes(b"not dicom")
    assert any("cannot be read as DICOM" in p for p in validate_for_tps(ct, dciodvfy=None))
    assert validate_for_tps([]) == ["the series has no instances"]


# -- the planning MR ----------------------------------------------------------------------------


def write_mr(
    out: Path,
    slices: int = 24,
    *,
    spacing: float = 2.5,
    orientation: Callable[[int], list[float]] = lambda k: AXIAL,
    images_in_acquisition: bool = True,
) -> list[Path]:
    """A small T1-weighted-looking axial MR series (16x16), one file per slice."""
    out.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(slices):
        ds = Dataset()
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "MR"
        ds.PatientID = "SIM-MR"
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        if images_in_acquisition:
            ds.ImagesInAcquisition = slices
        ds.SliceThickness = f"{spacing:g}"
        ds.SpacingBetweenSlices = f"{spacing:g}"
        o = orientation(k)
        normal = np.cross(o[:3], o[3:])
        ds.ImageOrientationPatient = [f"{v:g}" for v in o]
        ds.ImagePositionPatient = [f"{v:.3f}" for v in (-20.0, -20.0, 0.0) + normal * k * spacing]
        ds.PixelSpacing = ["2.5", "2.5"]
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.full((16, 16), 100 + k, dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"MR{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def test_a_complete_mr_series_passes(tmp_path: Path) -> None:
    assert validate_input_series(write_mr(tmp_path)) == []


def test_mr_with_half_its_slices_missing_in_the_middle_is_refused(tmp_path: Path) -> None:
    files = write_mr(tmp_path)
    kept = files[:6] + files[18:]  # 12 of 24: z = 0 … 12.5 and 45 … 57.5
    (problem,) = validate_input_series(kept)
    assert problem == (
        "the MR series has 12 of 24 slices: gap of 32.5 mm between z=12.5 and z=45.0 "
        "(slices are 2.50 mm apart elsewhere)"
    )


def test_mr_with_every_other_slice_missing_is_refused(tmp_path: Path) -> None:
    files = write_mr(tmp_path)
    problems = validate_input_series(files[::2])
    assert problems[0] == (
        "the MR series has 12 of 23 slices: they are 5.00 mm apart but Spacing Between Slices "
        "is 2.50 mm (every other slice missing?)"
    )
    assert problems[1] == "the MR series has 12 of 24 slices (Images in Acquisition)"


def test_mr_with_its_second_half_missing_is_refused(tmp_path: Path) -> None:
    files = write_mr(tmp_path)
    assert validate_input_series(files[:12]) == ["the MR series has 12 of 24 slices (Images in Acquisition)"]


def test_mr_with_mixed_orientations_is_refused(tmp_path: Path) -> None:
    files = write_mr(tmp_path, orientation=lambda k: AXIAL if k < 12 else SAGITTAL)
    (problem,) = validate_input_series(files)
    assert problem.startswith("the MR series mixes 2 orientations (12 axial [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]")
    assert "12 sagittal [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]" in problem
    assert problem.endswith("it is not one stack of slices — select one orientation")


@pytest.mark.skipif(not Path(DCIODVFY).is_file(), reason="dicom3tools not installed")
def test_a_trial_patients_series_is_not_held_for_attributes_dciodvfy_does_not_know(
    ct: list[Path],
) -> None:
    """Outputs copy the source's whole Patient and Study modules; a clinical-trial source's
    issuers and codes are standard attributes an older dciodvfy calls unrecognised."""
    from pydicom.dataset import Dataset

    for path in ct:
        ds = pydicom.dcmread(path)
        issuer = Dataset()
        issuer.LocalNamespaceEntityID = "SPONSOR"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T1", "99X", "baseline"
        ds.ClinicalTrialSponsorName, ds.ClinicalTrialProtocolID = "SPONSOR", "PROT-1"
        ds.ClinicalTrialProtocolName, ds.ClinicalTrialSiteName = "Protocol one", "Site one"
        ds.IssuerOfClinicalTrialProtocolID = "SPONSOR"
        ds.OtherClinicalTrialProtocolIDsSequence = [Dataset()]
        ds.OtherClinicalTrialProtocolIDsSequence[0].ClinicalTrialProtocolID = "P2"
        ds.OtherClinicalTrialProtocolIDsSequence[0].IssuerOfClinicalTrialProtocolID = "OTHER"
        ds.ClinicalTrialSiteID, ds.IssuerOfClinicalTrialSiteID = "S1", "SPONSOR"
        ds.ClinicalTrialSubjectID, ds.IssuerOfClinicalTrialSubjectID = "SUBJ-1", "SPONSOR"
        ds.ClinicalTrialSubjectReadingID, ds.IssuerOfClinicalTrialSubjectReadingID = "R1", "SPONSOR"
        ds.ClinicalTrialTimePointID, ds.IssuerOfClinicalTrialTimePointID = "TP1", "SPONSOR"
        ds.ClinicalTrialTimePointTypeCodeSequence = [code]
        ds.EthnicGroupCodeSequence = [code]
        ds.save_as(path)
    assert validate_for_tps(ct) == []
