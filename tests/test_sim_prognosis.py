"""Brain-tumour growth (models.growth), the longitudinal patient (models.sim.prognosis) and its
studies (dicom_node.lab.simulate_prognosis, ``dicom-node simulate prognosis``)."""

from __future__ import annotations

import datetime as dt
import math
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from dicom_node.lab.simulate_prognosis import PrognosisSpec, VisitStudy, write_prognosis_patient
from models.growth import fibre_tensor, front_speed, grow, stable_dt, tissue_diffusivity
from models.sim.prognosis import (
    FLAIR,
    T1C_THRESHOLD,
    T2_THRESHOLD,
    SimulatedPatient,
    TumourLabel,
    make_patient,
    to_reference_frame,
    to_visit_frame,
    tumour_labels,
)

DCIODVFY = Path("/usr/bin/dciodvfy")
#: Small but anatomical: 64 x 64 at 3.75 mm, 16 slices of 3 mm.
SMALL = {"size": 64, "slices": 16}


# -- the Fisher-Kolmogorov solver -----------------------------------------------------------------
def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    idx = np.indices(shape, dtype=np.float32)
    r = np.sqrt(sum((idx[a] - centre[a]) ** 2 for a in range(3)))
    return (1.0 / (1.0 + np.exp(np.clip(r - radius, -50, 50)))).astype(np.float32)


def test_diffusion_alone_conserves_cells_and_nothing_enters_the_barrier() -> None:
    rng = np.random.default_rng(0)
    shape = (24, 20, 18)
    white = np.clip(rng.uniform(0, 1, shape), 0, 1).astype(np.float32)
    grey = (1.0 - white).astype(np.float32)
    grey[:, 10, :] = 0.0  # a CSF sheet splits the domain in two
    white[:, 10, :] = 0.0
    d, barrier = tissue_diffusivity(white, grey, 0.2, 0.02)
    assert barrier[:, 10, :].all() and not barrier[:, :10, :].any()
    c0 = _ball(shape, (12, 5, 9), 3.0)
    c0[:, 10:, :] = 0.0
    c = grow(c0, d, 0.0, 200.0, (2.0, 2.0, 2.0), barrier_mask=barrier)
    assert float(c.sum()) == pytest.approx(float(c0.sum()), rel=1e-5)
    assert float(np.abs(c - c0).max()) > 0.05  # it did spread
    assert not np.any(c[:, 10:, :])  # zero flux: the far side stays empty
    # With proliferation and a tensor the wall still holds.
    tensor = fibre_tensor(np.stack([np.zeros(shape), np.ones(shape), np.ones(shape)]), 5.0)
    c = grow(c0, d, 0.05, 300.0, (2.0, 2.0, 2.0), barrier_mask=barrier, tensor=tensor)
    assert not np.any(c[:, 10:, :])
    assert 0.0 <= float(c.min()) and float(c.max()) <= 1.0


def test_front_speed_is_two_sqrt_d_rho() -> None:
    # A planar front in a uniform medium: pulled fronts approach 2 sqrt(D rho) from below with
    # Bramson's logarithmic delay, x(t) = 2 sqrt(D rho) t - 3/2 sqrt(D / rho) ln t.
    d, rho, h = 1.0, 1.0, 0.25
    n = int(120 / h)
    c0 = (np.arange(n) * h < 5.0).astype(np.float32).reshape(n, 1, 1)
    c20 = grow(c0, d, rho, 20.0, (h, 1.0, 1.0))
    c40 = grow(c20, d, rho, 20.0, (h, 1.0, 1.0))
    speed = (float(c40.sum()) - float(c20.sum())) * h / 20.0
    expected = front_speed(d, rho) - 1.5 * math.sqrt(d / rho) * math.log(2.0) / 20.0
    assert speed == pytest.approx(expected, rel=0.04)
    assert speed < front_speed(d, rho)


def test_time_step_is_stable_and_larger_ones_are_refused() -> None:
    spacing = (2.0, 2.0, 2.0)
    limit = stable_dt(0.25, 0.04, spacing)
    assert limit == pytest.approx(min(0.9 / (2 * 0.25 * 3 / 4.0), 0.25 / 0.04))
    rng = np.random.default_rng(1)
    c0 = rng.uniform(0.0, 1.0, (16, 16, 16)).astype(np.float32)  # rough: any instability shows
    c = grow(c0, 0.25, 0.04, 400.0, spacing, dt=limit, active_threshold=0.0)
    assert np.isfinite(c).all() and 0.0 <= float(c.min()) and float(c.max()) <= 1.0
    assert float(c.std()) < float(c0.std())  # smoothed, not amplified
    with pytest.raises(ValueError, match="stability"):
        grow(c0, 0.25, 0.04, 10.0, spacing, dt=3.0 * limit)


def test_active_box_changes_nothing_and_tracts_steer_the_spread() -> None:
    shape = (40, 40, 40)
    c0 = _ball(shape, (20, 20, 20), 3.0)
    c0[c0 < 1e-6] = 0.0
    boxed = grow(c0, 0.1, 0.03, 150.0, (2.0, 2.0, 2.0))
    full = grow(c0, 0.1, 0.03, 150.0, (2.0, 2.0, 2.0), active_threshold=0.0)
    assert float(np.abs(boxed - full).max()) < 1e-5
    along0 = np.stack([np.ones(shape), np.zeros(shape), np.zeros(shape)])
    c = grow(c0, 0.1, 0.03, 150.0, (2.0, 2.0, 2.0), tensor=fibre_tensor(along0, 4.0))
    visible = c >= T2_THRESHOLD
    extent = [int(np.count_nonzero(visible.any(axis=tuple(b for b in range(3) if b != a)))) for a in range(3)]
    assert extent[0] > extent[1] + 4 and extent[0] > extent[2] + 4


# -- the simulated patient ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patient() -> SimulatedPatient:
    return make_patient(5, visits=3, treated=False, mass_effect=True, anisotropic=False, **SMALL)


def test_same_seed_same_patient_other_seed_other(patient: SimulatedPatient) -> None:
    again = make_patient(5, visits=3, treated=False, mass_effect=True, anisotropic=False, **SMALL)
    assert again.params == patient.params
    for a, b in zip(patient.visits, again.visits, strict=True):
        np.testing.assert_array_equal(a.density, b.density)
        np.testing.assert_array_equal(a.images["t1c"], b.images["t1c"])
        np.testing.assert_array_equal(a.pose.matrix, b.pose.matrix)
        assert a.day == b.day and a.date == b.date
    other = make_patient(6, visits=2, **SMALL)
    assert other.params.seed_mni_mm != patient.params.seed_mni_mm
    assert other.visits[0].pose.shift_mm != patient.visits[0].pose.shift_mm


def test_visits_are_irregular_and_the_untreated_tumour_grows(patient: SimulatedPatient) -> None:
    assert patient.visits[0].day == 0
    assert all(30 <= gap <= 100 for gap in patient.intervals_days)
    assert patient.visits[-1].date - patient.visits[0].date == dt.timedelta(days=patient.visits[-1].day)
    whole = [v.volumes_ml["whole_tumour"] for v in patient.visits]
    core = [v.volumes_ml["tumour_core"] for v in patient.visits]
    assert whole[0] > 1.0
    assert all(b > a for a, b in zip(whole, whole[1:], strict=False)), whole
    assert all(b > a for a, b in zip(core, core[1:], strict=False)), core


def test_treatment_drops_the_tumour_then_it_regrows() -> None:
    kwargs = {"visits": 3, "anisotropic": False, "mass_effect": False, "size": 32, "slices": 4}
    treated = make_patient(8, treated=True, **kwargs)
    untreated = make_patient(8, treated=False, **kwargs)
    tx = treated.params.treatment
    assert tx is not None and untreated.params.treatment is None
    after = tx.after_visit  # 1-based: the visit before the treatment
    before_day = treated.visits[after - 1].day
    assert before_day < tx.day < treated.visits[after].day
    vol = [v.volumes_ml["whole_tumour"] for v in treated.visits]
    ref = [v.volumes_ml["whole_tumour"] for v in untreated.visits]
    assert vol[:after] == ref[:after]  # same patient until the treatment
    assert vol[after] < ref[after]
    assert float(treated.visits[after].growth_density.max()) <= tx.survival_fraction + 0.3


def test_labels_follow_the_visibility_thresholds_and_nest(patient: SimulatedPatient) -> None:
    last = patient.visits[-1]
    c, labels = last.density, last.labels
    np.testing.assert_array_equal(labels, tumour_labels(c, patient.params.necrosis_threshold))
    assert np.all(c[labels == TumourLabel.ENHANCING] >= T1C_THRESHOLD)
    assert np.all(c[labels == TumourLabel.OEDEMA] >= T2_THRESHOLD)
    assert (labels > 0).sum() > (labels % 2 == 1).sum() > 0  # oedema beyond the T1c-visible part
    # Core inside the rim inside the oedema, on the 2 mm growth grid: each region grown by one voxel
    # stays inside the next one, except where the tumour meets CSF (zero density, zero flux).
    grid = tumour_labels(last.growth_density, patient.params.necrosis_threshold)
    tissue = ~patient.domain.barrier
    core = grid == TumourLabel.NECROTIC_CORE
    t1c_visible = core | (grid == TumourLabel.ENHANCING)
    whole = grid > 0
    assert core.sum() > 0 and whole.sum() > t1c_visible.sum() > core.sum()
    assert np.all(t1c_visible[ndi.binary_dilation(core) & tissue])
    assert np.all(whole[ndi.binary_dilation(t1c_visible) & tissue])


def test_mr_shows_the_rim_the_core_and_the_oedema_where_the_pose_puts_them(patient: SimulatedPatient) -> None:
    last = patient.visits[-1]
    labels = to_visit_frame(last.labels, last.pose, patient.spacing_mm, order=0)
    brain = last.brain_mask
    t1c, flair = last.images["t1c"], last.images["flair"]
    rim = labels == TumourLabel.ENHANCING
    oedema = labels == TumourLabel.OEDEMA
    assert rim.sum() > 5 and oedema.sum() > 20
    assert float(np.mean(t1c[rim])) > 1.15 * float(np.median(t1c[brain & (labels == 0)]))
    assert float(np.mean(flair[oedema])) > 1.15 * float(np.median(flair[brain & (labels == 0)]))
    # The pose matters: the same labels without it land partly off the rim.
    unposed = last.labels == TumourLabel.ENHANCING
    assert float(np.mean(t1c[rim])) > float(np.mean(t1c[unposed & ~rim]))
    # FLAIR nulls CSF.
    assert float(FLAIR.signal(np.array(2569.0), np.array(329.0), np.array(1.0))) < 0.03


def test_each_visit_has_its_own_small_pose(patient: SimulatedPatient) -> None:
    poses = [v.pose for v in patient.visits]
    for pose in poses:
        assert 0.0 < pose.rotation_deg <= 3.0
        assert 0.0 < float(np.linalg.norm(pose.shift_mm)) <= 4.0
        rot = pose.matrix[:3, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-9)
    assert not np.allclose(poses[0].matrix, poses[1].matrix)
    # Reference -> visit -> reference is the identity (exact for a linear ramp away from the edges).
    k, r, c = np.indices(patient.shape, dtype=np.float32)
    ramp = 3.0 * k + 0.5 * r - 0.25 * c + 100.0
    there = to_visit_frame(ramp, poses[-1], patient.spacing_mm)
    back = to_reference_frame(there, poses[-1], patient.spacing_mm)
    inner = (slice(3, -3), slice(6, -6), slice(6, -6))
    np.testing.assert_allclose(back[inner], ramp[inner], atol=1e-2)
    assert float(np.abs(there[inner] - ramp[inner]).mean()) > 0.5  # and the pose does move things


# -- DICOM and the CLI ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def written(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, SimulatedPatient, tuple[VisitStudy, ...]]:
    out = tmp_path_factory.mktemp("prognosis")
    spec = PrognosisSpec(visits=3, seed=2, size=48, slices=6, t2w=True)
    patient, studies = write_prognosis_patient(out, spec, patient_id="SIM-PROG-TEST")
    return out, patient, studies


def test_one_study_per_visit_with_dates_and_frames(
    written: tuple[Path, SimulatedPatient, tuple[VisitStudy, ...]],
) -> None:
    out, patient, studies = written
    first = {}
    for study, visit in zip(studies, patient.visits, strict=True):
        assert study.directory == out / f"visit-{visit.index}"
        for name in ("t1c", "flair", "t2w"):
            files = sorted((study.directory / name).glob("MR*.dcm"))
            assert len(files) == 6, name
            ds = pydicom.dcmread(files[0])
            assert ds.PatientID == "SIM-PROG-TEST" and ds.Modality == "MR"
            assert "SIMULATED" in ds.StudyDescription and "SIMULATED" in ds.SeriesDescription
            assert ds.BodyPartExamined == "BRAIN"
            assert ds.StudyInstanceUID == study.study_uid
            assert ds.FrameOfReferenceUID == study.frame_of_reference_uid
            assert ds.StudyDate == visit.date.strftime("%Y%m%d") == study.study_date
            assert (ds.Rows, ds.Columns) == (48, 48)
            first[(visit.index, name)] = ds
    assert len({s.study_uid for s in studies}) == len({s.frame_of_reference_uid for s in studies}) == 3
    flair, t1c = first[(1, "flair")], first[(1, "t1c")]
    assert "IR" in flair.ScanningSequence and float(flair.InversionTime) == FLAIR.ti_ms
    assert "gadobutrol" in t1c.ContrastBolusAgent
    d0 = dt.datetime.strptime(first[(1, "t1c")].StudyDate, "%Y%m%d")
    d2 = dt.datetime.strptime(first[(3, "t1c")].StudyDate, "%Y%m%d")
    assert (d2 - d0).days == patient.visits[2].day
    # Pixels are the simulated image, most superior slice first.
    pixels = first[(2, "t1c")].pixel_array.astype(np.float32)
    np.testing.assert_allclose(pixels, np.clip(np.round(patient.visits[1].images["t1c"][-1]), 0, 65535))


def test_dciodvfy_finds_no_errors(written: tuple[Path, SimulatedPatient, tuple[VisitStudy, ...]]) -> None:
    if not DCIODVFY.exists():
        pytest.skip("dciodvfy (dicom3tools) not installed")
    out, _, _ = written
    for name in ("t1c", "flair"):
        run = subprocess.run(
            [str(DCIODVFY), str(out / "visit-2" / name / "MR0001.dcm")],
            capture_output=True,
            text=True,
            check=False,
        )
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], name


def test_cli_simulate_prognosis(tmp_path: Path) -> None:
    from dicom_node.cli import app

    runner = CliRunner()
    args = ["simulate", "prognosis", "--out", str(tmp_path), "--visits", "2", "--size", "32", "--slices", "4"]
    result = runner.invoke(app, [*args, "--seed", "3", "--patient-id", "SIM-CLI"])
    assert result.exit_code == 0, result.output
    assert "SIMULATED" in result.output and "days after visit 1" in result.output
    for visit in (1, 2):
        assert len(list((tmp_path / f"visit-{visit}" / "t1c").glob("MR*.dcm"))) == 4
        assert len(list((tmp_path / f"visit-{visit}" / "flair").glob("MR*.dcm"))) == 4
    assert pydicom.dcmread(next((tmp_path / "visit-2" / "flair").glob("*.dcm"))).PatientID == "SIM-CLI"
    bad = runner.invoke(app, ["simulate", "prognosis", "--out", str(tmp_path / "x"), "--visits", "1"])
    assert bad.exit_code != 0
    assert not (tmp_path / "x").exists()
