"""Registration of a prior to the current study (pipelines/registration.py) and its DICOM
Spatial Registration object (pipelines/writers/spatial_registration.py).

SIMULATED data only: the current study is a T1w head MR from the MNI152-based simulator
(models.sim.mrct, 128 x 128 x 50 voxels of 1.95 x 1.95 x 2 mm); each prior is the same
noise-free head moved by a known rigid (or affine) transform, resampled with SimpleITK,
its intensities scaled by 1.15 and given its own Rician noise. Both are written as MR
Image Storage series (dicom_node.lab.simulate.mr_slice), each on its own Frame of
Reference, and loaded back with pipelines.volume.load_series — the path a job takes.
The wrong-anatomy prior is a torso CT phantom (models.sim.phantom) of adult size.

Accuracy (see :func:`transform_error`): the recovered matrix M (prior → current) against
the true one T, through E = M T⁻¹ (current → current, identity when exact): the largest
displacement |E x − x| over the current's head mask (mm) and the rotation angle of E (°).
"""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from dicom_node.lab.simulate import SeriesHeader, ct_slice, mr_slice
from pipelines.base import InputRefused
from pipelines.provenance import OutputProvenance, provenance_of
from pipelines.registration import (
    METHOD_NAME,
    METHOD_VERSION,
    Registration,
    RegistrationQuality,
    RegistrationRefused,
    RegistrationSettings,
    body_mask,
    register,
    require_quality,
)
from pipelines.uids import UidFactory
from pipelines.volume import Volume, load_series
from pipelines.writers.common import KIND_REGISTRATION, kind_of
from pipelines.writers.spatial_registration import SpatialRegistrationWriter

DCIODVFY = Path("/usr/bin/dciodvfy")

SIZE, SLICES, THICKNESS_MM, FOV_MM = 128, 50, 2.0, 250.0
PIXEL_MM = FOV_MM / SIZE


# --------------------------------------------------------------------------- simulation


@cache
def clean_head(seed: int = 3) -> np.ndarray:
    """Noise-free T1w head, (slices, rows, columns), axis 0 inferior → superior."""
    from models.sim.mrct import make_pair

    pair = make_pair(
        seed, slices=SLICES, size=SIZE, slice_thickness_mm=THICKNESS_MM, noise=(0.0, 0.0), level=0.5
    )
    return pair.t1w.astype(np.float32)


def grid_image(
    array: np.ndarray, spacing_mm: tuple[float, float, float] = (THICKNESS_MM, PIXEL_MM, PIXEL_MM)
) -> sitk.Image:
    """``array`` (axis 0 inferior → superior) on the simulator's grid, as mr_slice places it:
    axial, head first supine, slice k of the series at z = -k * thickness."""
    dz, dr, dc = spacing_mm
    rows, cols = array.shape[1:]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((dc, dr, dz))
    image.SetOrigin((-(cols - 1) * dc / 2, -(rows - 1) * dr / 2, -(array.shape[0] - 1) * dz))
    return image


def rigid_matrix(
    angles_deg: tuple[float, float, float], shift_mm: np.ndarray, centre: np.ndarray
) -> np.ndarray:
    """4x4: rotation about x, then y, then z (about ``centre``), then ``shift_mm``."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return affine_matrix(rz @ ry @ rx, shift_mm, centre)


def affine_matrix(linear: np.ndarray, shift_mm: np.ndarray, centre: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = centre + np.asarray(shift_mm) - linear @ centre
    return m


def grid_centre(image: sitk.Image) -> np.ndarray:
    size = np.array(image.GetSize(), dtype=float)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(list((size - 1) / 2)))


def moved(clean: sitk.Image, truth: np.ndarray) -> np.ndarray:
    """The prior's image: prior(y) = clean(truth · y), on the same grid (its own frame).

    ``truth`` maps prior coordinates to current ones, so it is exactly the transform
    SimpleITK's resampler applies to each output (prior) point to find its input."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(truth[:3, :3].ravel().tolist())
    transform.SetTranslation(truth[:3, 3].tolist())
    return sitk.GetArrayFromImage(sitk.Resample(clean, clean, transform, sitk.sitkLinear, 0.0))


def rician(array: np.ndarray, rng: np.random.Generator, relative_sigma: float = 0.03) -> np.ndarray:
    sigma = relative_sigma * float(np.percentile(array, 95))
    re = array + rng.normal(0.0, sigma, array.shape)
    im = rng.normal(0.0, sigma, array.shape)
    return np.hypot(re, im).astype(np.float32)


@dataclass(frozen=True)
class Study:
    study_uid: str
    frame_uid: str
    patient_id: str = "SIM-REG-0001"


def mr_series(
    array: np.ndarray,
    study: Study,
    series_number: int,
    description: str,
    spacing_mm: tuple[float, float, float] = (THICKNESS_MM, PIXEL_MM, PIXEL_MM),
) -> Volume:
    """A simulated MR series of ``array`` (axis 0 inferior → superior), loaded as a Volume."""
    header = SeriesHeader(
        study_uid=study.study_uid,
        series_uid=generate_uid(),
        frame_uid=study.frame_uid,
        series_number=series_number,
        patient_id=study.patient_id,
        study_description="SIMULATED MR HEAD",
        series_description=description,
        body_part="HEAD",
        station_name="SIMULATED MR",
        pixel_spacing_mm=spacing_mm[1],
        slice_thickness_mm=spacing_mm[0],
    )
    from models.sim.mrct import T1W

    when = dt.datetime(2024, 6, 11, 9, 30)
    top_first = array[::-1]  # mr_slice puts slice k at z = -k * thickness
    datasets = [mr_slice(top_first[k], k, header, T1W, 1.5, (600.0, 1200.0), when) for k in range(len(array))]
    return load_series(datasets)


def ct_series(hu: np.ndarray, study: Study, pixel_mm: float) -> Volume:
    header = SeriesHeader(
        study_uid=study.study_uid,
        series_uid=generate_uid(),
        frame_uid=study.frame_uid,
        patient_id=study.patient_id,
        pixel_spacing_mm=pixel_mm,
        slice_thickness_mm=THICKNESS_MM,
    )
    when = dt.datetime(2023, 1, 5, 14, 0)
    return load_series([ct_slice(hu[::-1][k], k, header, when) for k in range(len(hu))])


@dataclass(frozen=True)
class Case:
    current: Volume
    prior: Volume
    #: The true prior → current matrix.
    truth: np.ndarray
    angles_deg: tuple[float, float, float]
    shift_mm: np.ndarray


def draw_rigid(rng: np.random.Generator) -> tuple[tuple[float, float, float], np.ndarray]:
    """Rotations about x, y and z each uniform in ±10°; a shift of uniform length 0-20 mm
    in a uniformly random direction."""
    angles = tuple(float(a) for a in rng.uniform(-10.0, 10.0, 3))
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(0.0, 20.0)
    return angles, shift  # type: ignore[return-value]


def make_case(seed: int, *, linear: np.ndarray | None = None) -> Case:
    """Current and prior of one simulated head; the prior moved by a random rigid transform
    (or, with ``linear``, by that linear map about the grid centre and a random shift)."""
    rng = np.random.default_rng(seed)
    clean = clean_head()
    image = grid_image(clean)
    centre = grid_centre(image)
    angles, shift = draw_rigid(rng)
    truth = rigid_matrix(angles, shift, centre) if linear is None else affine_matrix(linear, shift, centre)
    current_study = Study(generate_uid(), generate_uid())
    prior_study = replace(current_study, study_uid=generate_uid(), frame_uid=generate_uid())
    current = mr_series(rician(clean, rng), current_study, 3, "SIMULATED T1 SE AXIAL current")
    prior_pixels = rician(1.15 * moved(image, truth), rng)
    prior = mr_series(prior_pixels, prior_study, 2, "SIMULATED T1 SE AXIAL prior")
    return Case(current, prior, truth, angles, shift)


def transform_error(recovered: np.ndarray, truth: np.ndarray, current: Volume) -> tuple[float, float]:
    """(largest displacement over the current's head mask in mm, rotation error in degrees)."""
    error = recovered @ np.linalg.inv(truth)
    mask = body_mask(current.array, current.spacing)
    k, r, c = np.nonzero(mask)
    ijk = np.stack([c, r, k], axis=1).astype(float)  # ITK index order
    origin = np.array(current.origin)
    direction = current.direction()
    spacing = np.array([current.spacing[2], current.spacing[1], current.spacing[0]])
    points = origin + (ijk * spacing) @ direction.T
    shifted = points @ error[:3, :3].T + error[:3, 3]
    displacement = float(np.max(np.linalg.norm(shifted - points, axis=1)))
    u, _, vt = np.linalg.svd(error[:3, :3])
    rotation = u @ vt
    angle = math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))
    return displacement, angle


def distribution(values: list[float]) -> str:
    a = np.asarray(values)
    return f"median {np.median(a):.3f}, 95th percentile {np.percentile(a, 95):.3f}, max {a.max():.3f}"


def provenance() -> OutputProvenance:
    settings = RegistrationSettings()
    return OutputProvenance(
        pipeline="prior-registration",
        pipeline_version="1.0",
        model_name=METHOD_NAME,
        model_version=METHOD_VERSION,
        weights_sha256=settings.sha256("rigid"),
        node_version="0.9",
        synthetic=False,
        station="DICOMNODE",
    )


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dciodvfy on ``path``."""
    if not DCIODVFY.exists():
        pytest.skip(f"not installed: {DCIODVFY}")
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


#: Seeds of the accuracy cases (each draws one rigid transform; see :func:`draw_rigid`).
ACCURACY_SEEDS = tuple(range(1, 13))


@dataclass(frozen=True)
class Run:
    case: Case
    registration: Registration
    displacement_mm: float
    rotation_deg: float
    seconds: float


@pytest.fixture(scope="module")
def rigid_runs() -> list[Run]:
    runs = []
    for seed in ACCURACY_SEEDS:
        case = make_case(seed)
        started = time.perf_counter()
        registration = register(case.current, case.prior, mode="rigid")
        seconds = time.perf_counter() - started
        displacement, rotation = transform_error(registration.matrix, case.truth, case.current)
        runs.append(Run(case, registration, displacement, rotation, seconds))
    return runs


# --------------------------------------------------------------------------- accuracy


def test_rigid_registration_recovers_known_transforms_within_1_mm_and_half_a_degree(
    rigid_runs: list[Run],
) -> None:
    displacement = [r.displacement_mm for r in rigid_runs]
    rotation = [r.rotation_deg for r in rigid_runs]
    seconds = [r.seconds for r in rigid_runs]
    applied = [max(abs(a) for a in r.case.angles_deg) for r in rigid_runs]
    shifts = [float(np.linalg.norm(r.case.shift_mm)) for r in rigid_runs]
    summary = (
        f"SIMULATED, {len(rigid_runs)} cases (largest angle per case "
        f"{min(applied):.1f}-{max(applied):.1f} deg, "
        f"shift {min(shifts):.1f}-{max(shifts):.1f} mm): "
        f"max displacement over the head mm: {distribution(displacement)}; "
        f"rotation error deg: {distribution(rotation)}; seconds per registration: {distribution(seconds)}"
    )
    print("\n" + summary)
    assert max(displacement) <= 1.0, summary
    assert max(rotation) <= 0.5, summary
    assert all(r.registration.quality_ok for r in rigid_runs), [
        r.registration.quality_reason for r in rigid_runs
    ]
    assert min(r.registration.dice for r in rigid_runs) >= RegistrationQuality().min_dice


def test_the_prior_lands_on_the_current_grid(rigid_runs: list[Run]) -> None:
    """The resampled prior images the current's anatomy voxel by voxel (intensity scale aside)."""
    run = rigid_runs[0]
    current, resampled = run.case.current.array, run.registration.resampled
    assert resampled.shape == current.shape
    inside = body_mask(current, run.case.current.spacing) & run.registration.resampled_fov
    r = float(np.corrcoef(current[inside], resampled[inside])[0, 1])
    unregistered = float(np.corrcoef(current[inside], run.case.prior.array[inside])[0, 1])
    assert r > 0.95 and unregistered < 0.8, (r, unregistered)
    assert not run.registration.resampled_fov.all()  # a moved prior leaves part of the grid uncovered


def test_the_same_inputs_give_the_same_matrix(rigid_runs: list[Run]) -> None:
    run = rigid_runs[1]
    again = register(run.case.current, run.case.prior, mode="rigid")
    assert np.array_equal(again.matrix, run.registration.matrix)
    assert again.mutual_information == run.registration.mutual_information


#: The linear part of the affine test's transform: scaling by 6 %, -5 % and 3 % along x, y, z.
SCALING = (1.06, 0.95, 1.03)


@dataclass(frozen=True)
class AffineRuns:
    case: Case
    rigid: Registration
    affine: Registration


@pytest.fixture(scope="module")
def affine_runs() -> AffineRuns:
    case = make_case(101, linear=np.diag(SCALING))
    return AffineRuns(
        case,
        register(case.current, case.prior, mode="rigid"),
        register(case.current, case.prior, mode="affine"),
    )


def test_affine_mode_recovers_a_scaled_pair(affine_runs: AffineRuns) -> None:
    case, rigid, affine = affine_runs.case, affine_runs.rigid, affine_runs.affine
    rigid_error, _ = transform_error(rigid.matrix, case.truth, case.current)
    affine_error, _ = transform_error(affine.matrix, case.truth, case.current)
    print(f"\nSIMULATED scaled pair {SCALING}: rigid {rigid_error:.2f} mm, affine {affine_error:.2f} mm")
    assert affine_error <= 1.0 and rigid_error > 3.0
    assert np.allclose(np.diag(affine.matrix[:3, :3]), SCALING, atol=0.01)
    assert affine.matrix_type == "AFFINE" and rigid.matrix_type == "RIGID"
    assert affine.quality_ok and affine.dice > rigid.dice


# --------------------------------------------------------------------------- quality


def wrong_anatomy_case() -> tuple[Volume, Volume]:
    """The current head MR and a prior that is an adult-sized torso CT (another patient's
    body region altogether), 128 x 128 x 50 at 3.5 x 3.5 x 2 mm."""
    from models.sim.phantom import PhantomSpec, torso_volume

    rng = np.random.default_rng(7)
    current = mr_series(
        rician(clean_head(), rng), Study(generate_uid(), generate_uid()), 3, "SIMULATED T1 SE"
    )
    spec = PhantomSpec(
        rows=128, columns=128, slices=SLICES, pixel_spacing_mm=3.5, slice_thickness_mm=2.0, seed=4
    )
    prior = ct_series(torso_volume(spec), Study(generate_uid(), generate_uid()), spec.pixel_spacing_mm)
    return current, prior


def test_a_prior_of_another_anatomy_is_refused_with_the_figure_named() -> None:
    current, prior = wrong_anatomy_case()
    registration = register(current, prior, mode="rigid")
    limit = RegistrationQuality().min_dice
    print(
        f"\nSIMULATED wrong anatomy: Dice {registration.dice:.3f}, "
        f"MI {registration.mutual_information:.3f} nats, "
        f"overlap {registration.overlap:.2f}: {registration.quality_reason}"
    )
    assert not registration.quality_ok
    assert registration.dice < limit
    assert f"body-mask Dice {registration.dice:.3f} below {limit:.3f}" in registration.quality_reason
    with pytest.raises(RegistrationRefused) as refused:
        require_quality(registration)
    assert isinstance(refused.value, InputRefused)
    assert refused.value.series_uid == prior.series_uid
    message = str(refused.value)
    assert "\n" not in message and "Dice" in message and prior.series_uid in message


def test_the_quality_verdict_names_every_limit_missed() -> None:
    quality = RegistrationQuality(min_dice=0.9, min_overlap=0.6, min_mutual_information=0.5)
    assert quality.verdict(0.95, 0.9, 0.8) == (True, "")
    ok, reason = quality.verdict(0.7, 0.4, 0.2)
    assert not ok
    assert reason.count(";") == 2
    assert "Dice 0.700 below 0.900" in reason and "40%" in reason and "0.200 nats below 0.500" in reason
    with pytest.raises(ValueError, match="min_dice"):
        RegistrationQuality(min_dice=1.5)


def test_a_passing_registration_is_kept(rigid_runs: list[Run]) -> None:
    run = rigid_runs[0]
    assert require_quality(run.registration) is run.registration
    record = run.registration.provenance()
    assert record["prior_frame_of_reference_uid"] == run.case.prior.frame_of_reference_uid
    assert np.allclose(np.reshape(record["matrix"], (4, 4)), run.registration.matrix)
    assert record["quality_ok"] is True and record["registration_dice"] == run.registration.dice


# --------------------------------------------------------------------------- Spatial Registration


def matrix_for(ds: pydicom.Dataset, frame_of_reference_uid: str) -> tuple[np.ndarray, str]:
    for item in ds.RegistrationSequence:
        if item.FrameOfReferenceUID == frame_of_reference_uid:
            matrix = item.MatrixRegistrationSequence[0].MatrixSequence[0]
            values = np.array([float(v) for v in matrix.FrameOfReferenceTransformationMatrix]).reshape(4, 4)
            return values, str(matrix.FrameOfReferenceTransformationMatrixType)
    raise AssertionError(f"no Registration Sequence item for {frame_of_reference_uid}")


def test_the_spatial_registration_object_passes_dciodvfy_and_maps_prior_points(
    rigid_runs: list[Run], tmp_path: Path
) -> None:
    run = rigid_runs[0]
    current, prior = run.case.current, run.case.prior
    writer = SpatialRegistrationWriter(
        provenance=provenance(), uids=UidFactory("2.25.", "job-1"), series_number=901
    )
    writer.write(run.registration, current, prior, out_dir=tmp_path)
    (path,) = tmp_path.glob("*.dcm")
    errors, warnings = dciodvfy(path)
    print(f"\ndciodvfy: {len(errors)} errors, warnings: {warnings}")
    assert errors == []

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.1" and ds.Modality == "REG"
    assert (
        ds.StudyInstanceUID == current.study_uid and ds.FrameOfReferenceUID == current.frame_of_reference_uid
    )
    assert ds.PatientID == current.datasets[0].PatientID
    assert str(ds.SeriesDescription).startswith("SIMULATED")
    frames = {item.FrameOfReferenceUID for item in ds.RegistrationSequence}
    assert frames == {current.frame_of_reference_uid, prior.frame_of_reference_uid}
    identity, identity_type = matrix_for(ds, current.frame_of_reference_uid)
    assert np.array_equal(identity, np.eye(4)) and identity_type == "RIGID"
    matrix, matrix_type = matrix_for(ds, prior.frame_of_reference_uid)
    assert matrix_type == "RIGID"
    # a point of the prior's anatomy (its head's centre of mass, and a voxel near its edge)
    # lands, through the stored matrix, where the truth puts it in the current
    mask = body_mask(prior.array, prior.spacing)
    k, r, c = np.mean(np.nonzero(mask), axis=1)
    origin, direction = np.array(prior.origin), prior.direction()
    spacing = np.array([prior.spacing[2], prior.spacing[1], prior.spacing[0]])
    points = [origin + direction @ (np.array(ijk) * spacing) for ijk in ((c, r, k), (10.0, 64.0, 25.0))]
    for point in points:
        stored = matrix[:3, :3] @ point + matrix[:3, 3]
        expected = run.case.truth[:3, :3] @ point + run.case.truth[:3, 3]
        assert np.linalg.norm(stored - expected) <= 1.0, (point, stored, expected)
        assert np.allclose(stored, run.registration.to_current(point), atol=1e-6)
        assert np.allclose(run.registration.to_prior(stored), point, atol=1e-6)
    # both series' images are referenced: the current's in this study, the prior's in its own
    by_frame = {item.FrameOfReferenceUID: item for item in ds.RegistrationSequence}
    prior_images = {
        i.ReferencedSOPInstanceUID for i in by_frame[prior.frame_of_reference_uid].ReferencedImageSequence
    }
    assert prior_images == {s.sop_instance_uid for s in prior.slices}
    assert [s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence] == [current.series_uid]
    (other,) = ds.StudiesContainingOtherReferencedInstancesSequence
    assert other.StudyInstanceUID == prior.study_uid
    assert other.ReferencedSeriesSequence[0].SeriesInstanceUID == prior.series_uid
    # provenance, as the other writers stamp it
    described = [str(i.ContributionDescription) for i in ds.ContributingEquipmentSequence]
    assert OutputProvenance.parse(described[0])["model_name"] == METHOD_NAME
    # the job's output checks know the object (validate_outputs reads kind and provenance)
    assert kind_of(ds) == KIND_REGISTRATION
    assert provenance_of(ds)["model_name"] == METHOD_NAME


def test_an_affine_registration_object_passes_dciodvfy(affine_runs: AffineRuns, tmp_path: Path) -> None:
    case, registration = affine_runs.case, affine_runs.affine
    writer = SpatialRegistrationWriter(
        provenance=provenance(), uids=UidFactory("2.25.", "job-2"), series_number=902
    )
    ds = writer.write(registration, case.current, case.prior, out_dir=tmp_path)
    (path,) = tmp_path.glob("*.dcm")
    assert dciodvfy(path)[0] == []
    matrix, matrix_type = matrix_for(ds, case.prior.frame_of_reference_uid)
    assert matrix_type == "AFFINE" and np.allclose(matrix, registration.matrix, atol=1e-9)


def test_the_writer_refuses_what_it_cannot_write(rigid_runs: list[Run]) -> None:
    run = rigid_runs[0]
    writer = SpatialRegistrationWriter(
        provenance=provenance(), uids=UidFactory("2.25.", "job-3"), series_number=903
    )
    with pytest.raises(ValueError, match="'prior' is series"):
        writer.write(run.registration, run.case.current, rigid_runs[1].case.prior)
    same_frame = replace(run.case.prior, frame_of_reference_uid=run.case.current.frame_of_reference_uid)
    with pytest.raises(ValueError, match="share Frame of Reference"):
        writer.write(run.registration, run.case.current, same_frame)
    with pytest.raises(ValueError, match="content_label"):
        SpatialRegistrationWriter(
            provenance=provenance(), uids=UidFactory("2.25.", "x"), series_number=1, content_label="prior reg"
        )
