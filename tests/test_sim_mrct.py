"""Paired MR / CT simulator (models.sim.mrct) and its study (dicom_node.lab.simulate.write_sct_study)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from dicom_node.lab.simulate import SctSpec, write_sct_study
from models.sim.mrct import T1W, T2W, HeadTissue, MrCtPair, make_pair

DCIODVFY = Path("/usr/bin/dciodvfy")
#: Voxels at least this pure count as one tissue (the rest is partial volume at a boundary).
PURE = 0.9


@pytest.fixture(scope="module")
def pair() -> MrCtPair:
    # 128 px (1.95 mm) and a level whose six slices cross the frontal sinus: small but anatomical.
    return make_pair(4, slices=6, size=128, level=0.3)


def _pure(p: MrCtPair, tissue: HeadTissue) -> np.ndarray:
    return (p.labels == tissue) & (p.label_fraction >= PURE)


def _mean(volume: np.ndarray, mask: np.ndarray) -> float:
    assert mask.sum() > 20, "too few voxels to measure"
    return float(volume[mask].mean())


# -- volumes and determinism --------------------------------------------------------------------
def test_one_grid_for_every_volume(pair: MrCtPair) -> None:
    shape = (6, 128, 128)
    for name in ("ct_hu", "t1w", "t2w", "labels", "label_fraction", "body_mask", "bias_field"):
        assert getattr(pair, name).shape == shape, name
    assert pair.ct_hu.dtype == pair.t1w.dtype == pair.t2w.dtype == np.float32
    assert pair.labels.dtype == np.uint8 and pair.body_mask.dtype == bool
    assert pair.spacing_mm == pytest.approx((2.5, 250.0 / 128, 250.0 / 128))
    assert 0.15 < pair.body_mask.mean() < 0.7
    assert set(np.unique(pair.labels)) >= {int(t) for t in HeadTissue}


def test_same_seed_same_pair_different_seed_different() -> None:
    a = make_pair(11, slices=4, size=64)
    b = make_pair(11, slices=4, size=64)
    c = make_pair(12, slices=4, size=64)
    for name in ("ct_hu", "t1w", "t2w", "labels", "label_fraction", "body_mask", "bias_field"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.noise_sigma == b.noise_sigma and a.level == b.level
    # Another seed: another deformation (anatomy moves), another intensity draw, other noise.
    assert not np.array_equal(a.labels, c.labels)
    assert not np.array_equal(a.ct_hu, c.ct_hu)
    assert a.noise_sigma != c.noise_sigma


def test_mr_and_ct_are_registered(pair: MrCtPair) -> None:
    # Dense bone on CT is where the MR has no signal, and bright fat on T1w is fat on CT.
    wm = _mean(pair.t1w, _pure(pair, HeadTissue.WHITE))
    bone = pair.ct_hu > 1000.0
    assert bone.sum() > 50
    dark = pair.t1w < 0.3 * wm
    assert float(np.mean(dark[bone])) > 0.6
    # ... which a misregistration of a few pixels breaks.
    assert float(np.mean(np.roll(dark, 3, axis=2)[bone])) < 0.35
    fat_t1 = pair.t1w > 1.25 * wm
    assert fat_t1.sum() > 50
    assert float(np.median(pair.ct_hu[fat_t1 & pair.body_mask])) < -30.0


def test_other_anatomies_are_refused() -> None:
    with pytest.raises(ValueError, match="head"):
        make_pair(0, anatomy="pelvis", slices=2, size=32)


# -- CT -------------------------------------------------------------------------------------------
def test_ct_hu_per_tissue(pair: MrCtPair) -> None:
    ct = pair.ct_hu
    for tissue, lo, hi in [
        (HeadTissue.WHITE, 20.0, 40.0),
        (HeadTissue.GREY, 30.0, 52.0),
        (HeadTissue.CSF, 5.0, 25.0),
        (HeadTissue.FAT, -135.0, -65.0),
        (HeadTissue.SOFT, 25.0, 65.0),
        (HeadTissue.CANCELLOUS_BONE, 300.0, 700.0),
    ]:
        assert lo < float(np.median(ct[_pure(pair, tissue)])) < hi, tissue.name
    grey, white = (float(np.median(ct[_pure(pair, t)])) for t in (HeadTissue.GREY, HeadTissue.WHITE))
    assert 5.0 < grey - white < 15.0
    assert float(np.median(ct[pair.labels == HeadTissue.AIR])) == -1000.0
    assert float(ct.min()) >= -1000.0


def test_bone_hu_range_and_spread(pair: MrCtPair) -> None:
    cortical = pair.ct_hu[_pure(pair, HeadTissue.CORTICAL_BONE)]
    assert cortical.size > 100
    assert float(np.percentile(cortical, 2)) > 700.0
    assert 1000.0 < float(np.median(cortical)) < 1800.0
    assert float(cortical.max()) <= 1900.0
    assert float(cortical.std()) > 100.0  # regional mineralisation + texture, not one value
    cancellous = pair.ct_hu[_pure(pair, HeadTissue.CANCELLOUS_BONE)]
    assert float(cancellous.std()) > 60.0
    # Per case the bone means change too.
    other = make_pair(5, slices=6, size=128, level=0.3)
    assert (
        abs(float(np.median(other.ct_hu[_pure(other, HeadTissue.CORTICAL_BONE)])) - np.median(cortical)) > 5
    )


# -- MR -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sequence", ["t1w", "t2w"])
def test_air_and_cortical_bone_are_both_dark_on_mr(pair: MrCtPair, sequence: str) -> None:
    """The MR -> CT ambiguity: two tissues ~2000 HU apart look alike on MR."""
    mr = pair.mr(sequence)
    wm = _mean(mr, _pure(pair, HeadTissue.WHITE))
    cortical = _pure(pair, HeadTissue.CORTICAL_BONE)
    air = _pure(pair, HeadTissue.AIR)
    sinus = _pure(pair, HeadTissue.SINUS_AIR)
    assert _mean(mr, cortical) < 0.15 * wm
    assert _mean(mr, air) < 0.15 * wm
    assert _mean(mr, sinus) < 0.15 * wm  # air inside the head, against cortical walls
    assert _mean(pair.ct_hu, cortical) - _mean(pair.ct_hu, sinus) > 1500.0
    # The sinus touches cortical bone: the dark structures are adjacent, not separated.
    assert (
        ndi.binary_dilation(pair.labels == HeadTissue.SINUS_AIR) & (pair.labels == HeadTissue.CORTICAL_BONE)
    ).any()


def test_t1w_contrast(pair: MrCtPair) -> None:
    means = {t: _mean(pair.t1w, _pure(pair, t)) for t in HeadTissue}
    assert means[HeadTissue.WHITE] > means[HeadTissue.GREY] > means[HeadTissue.CSF]
    assert means[HeadTissue.FAT] > means[HeadTissue.WHITE]  # fat bright on T1w


def test_t2w_csf_is_brightest(pair: MrCtPair) -> None:
    means = {t: _mean(pair.t2w, _pure(pair, t)) for t in HeadTissue}
    assert max(means, key=lambda t: means[t]) == HeadTissue.CSF
    assert means[HeadTissue.CSF] > means[HeadTissue.GREY] > means[HeadTissue.WHITE]


def test_protocols_follow_the_spin_echo_equation() -> None:
    assert (T1W.tr_ms, T1W.te_ms, T2W.tr_ms, T2W.te_ms) == (500.0, 12.0, 4000.0, 100.0)
    s = T1W.signal(np.array(800.0), np.array(80.0), np.array(0.9))
    assert float(s) == pytest.approx(0.9 * (1 - np.exp(-500 / 800)) * np.exp(-12 / 80))


@pytest.mark.parametrize("sequence", ["t1w", "t2w"])
def test_rician_noise_in_the_background(pair: MrCtPair, sequence: str) -> None:
    mr, sigma = pair.mr(sequence), pair.noise_sigma[sequence]
    background = ~ndi.binary_dilation(pair.body_mask, iterations=3)
    values = mr[background].astype(np.float64)
    assert values.size > 10_000
    assert float(values.min()) > 0.0  # magnitude of complex noise: positive, never zero
    # Rayleigh statistics (Rician with no signal): mean sigma sqrt(pi/2), std sigma sqrt(2 - pi/2).
    assert float(values.mean()) == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.05)
    assert float(values.std()) == pytest.approx(sigma * np.sqrt(2 - np.pi / 2), rel=0.05)
    wm = _mean(mr, _pure(pair, HeadTissue.WHITE))
    assert 0.01 < sigma / wm < 0.05


def test_bias_field_is_smooth_and_multiplicative() -> None:
    p = make_pair(7, slices=6, size=64, bias=(0.2, 0.2), noise=(0.01, 0.01))
    field = p.bias_field.astype(np.float64)
    assert 0.5 < float(field.min()) and float(field.max()) < 2.0
    assert float(field[p.body_mask].std()) > 0.05  # present, not a constant gain
    log = np.log(field)
    for axis, step in enumerate(p.spacing_mm):
        assert float(np.abs(np.diff(log, axis=axis)).max()) / step < 0.01  # < 1 % per mm
    # Dividing the bias out makes white matter more uniform on both sequences.
    wm = _pure(p, HeadTissue.WHITE)
    for mr in (p.t1w, p.t2w):
        corrected = mr / p.bias_field
        assert float(corrected[wm].std() / corrected[wm].mean()) < 0.8 * float(mr[wm].std() / mr[wm].mean())


# -- DICOM ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SctSpec]:
    out = tmp_path_factory.mktemp("sct")
    spec = SctSpec(slices=6, size=64, seed=3, level=0.4)
    write_sct_study(out, spec)
    return out, spec


def _read(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def test_mr_and_reference_ct_share_study_frame_and_geometry(study: tuple[Path, SctSpec]) -> None:
    out, spec = study
    mr, ct = _read(out / "mr"), _read(out / "reference-ct")
    assert len(mr) == len(ct) == spec.slices
    assert {str(d.SOPClassUID) for d in mr} == {pydicom.uid.MRImageStorage}
    assert {str(d.SOPClassUID) for d in ct} == {pydicom.uid.CTImageStorage}
    for key in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName"):
        assert len({str(d[key].value) for d in mr + ct}) == 1, key
    assert mr[0].SeriesInstanceUID != ct[0].SeriesInstanceUID
    assert len({d.SeriesInstanceUID for d in mr}) == len({d.SeriesInstanceUID for d in ct}) == 1
    for a, b in zip(mr, ct, strict=True):
        assert a.InstanceNumber == b.InstanceNumber
        assert list(a.ImagePositionPatient) == list(b.ImagePositionPatient)
        assert list(a.ImageOrientationPatient) == list(b.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
        assert list(a.PixelSpacing) == list(b.PixelSpacing)
        assert a.SliceThickness == b.SliceThickness == 2.5
        assert (a.Rows, a.Columns) == (b.Rows, b.Columns) == (64, 64)
    z = [float(d.ImagePositionPatient[2]) for d in mr]
    np.testing.assert_allclose(np.diff(z), -2.5)  # contiguous, superior first


def test_headers_say_simulated_and_describe_the_acquisition(study: tuple[Path, SctSpec]) -> None:
    out, _ = study
    mr, ct = _read(out / "mr")[0], _read(out / "reference-ct")[0]
    for ds in (mr, ct):
        assert str(ds.PatientName) == "SIMULATED^PHANTOM"
        assert ds.StudyDescription.startswith("SIMULATED") and ds.SeriesDescription.startswith("SIMULATED")
        assert "SIMULATED" in ds.StationName and "SIMULATED" in ds.ImageComments
        assert ds.BodyPartExamined == "HEAD" and ds.PatientPosition == "HFS"
        assert ds.file_meta.ImplementationClassUID
        assert "SyntheticData" not in ds  # see the dciodvfy test
    assert mr.Modality == "MR" and ct.Modality == "CT"
    assert (mr.ScanningSequence, mr.SequenceVariant, mr.MRAcquisitionType) == ("SE", "NONE", "2D")
    assert (float(mr.RepetitionTime), float(mr.EchoTime)) == (T1W.tr_ms, T1W.te_ms)
    assert float(mr.MagneticFieldStrength) == 1.5
    assert "T1W" in mr.SeriesDescription
    assert "EVALUATION ONLY" in ct.SeriesDescription and "not for treatment planning" in ct.ImageComments
    assert (ct.RescaleIntercept, ct.RescaleSlope, ct.RescaleType) == (-1024, 1, "HU")
    assert ct.pixel_array.dtype == np.int16


def test_pixels_are_the_simulated_volumes(study: tuple[Path, SctSpec]) -> None:
    out, spec = study
    pair = make_pair(spec.seed, slices=spec.slices, size=spec.size, level=spec.level)
    mr, ct = _read(out / "mr"), _read(out / "reference-ct")
    # Instance 1 is the most superior slice, i.e. the last of the inferior -> superior volume.
    for k, (m, c) in enumerate(zip(mr, ct, strict=True)):
        hu = c.pixel_array * float(c.RescaleSlope) + float(c.RescaleIntercept)
        np.testing.assert_allclose(hu, pair.ct_hu[-1 - k], atol=0.5 + 1e-3)
        np.testing.assert_allclose(m.pixel_array, pair.t1w[-1 - k], atol=0.5 + 1e-3)
    hu = np.stack([c.pixel_array * 1.0 - 1024.0 for c in ct])
    assert hu.min() == -1000.0 and hu.max() > 1000.0


def test_the_pipeline_loader_reads_both_series_onto_the_pair_grid(study: tuple[Path, SctSpec]) -> None:
    from pipelines.volume import load_series

    out, spec = study
    pair = make_pair(spec.seed, slices=spec.slices, size=spec.size, level=spec.level)
    mr = load_series(_read(out / "mr"))
    ct = load_series(_read(out / "reference-ct"))
    assert (mr.modality, ct.modality, ct.units) == ("MR", "CT", "HU")
    assert mr.frame_of_reference_uid == ct.frame_of_reference_uid and mr.study_uid == ct.study_uid
    assert mr.spacing == ct.spacing == pytest.approx(pair.spacing_mm, abs=1e-5)
    assert mr.origin == ct.origin and mr.orientation == ct.orientation
    # Loaded along +z (inferior -> superior): the same voxel order as the simulated volumes.
    np.testing.assert_allclose(ct.array, pair.ct_hu, atol=0.5 + 1e-3)
    np.testing.assert_allclose(mr.array, pair.t1w, atol=0.5 + 1e-3)


def test_t2_sequence_option(tmp_path: Path) -> None:
    mr, ct = write_sct_study(tmp_path, SctSpec(slices=2, size=32, seed=1, sequence="t2"))
    ds = pydicom.dcmread(mr.files[0])
    assert (float(ds.RepetitionTime), float(ds.EchoTime)) == (T2W.tr_ms, T2W.te_ms)
    assert "T2W" in ds.SeriesDescription
    assert mr.frame_of_reference_uid == ct.frame_of_reference_uid and len(ct.files) == 2


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_dciodvfy_finds_no_errors(study: tuple[Path, SctSpec]) -> None:
    # Synthetic Data (0008,001C) is not written (as for the other simulated studies), so no
    # error is tolerated: Debian's dicom3tools 2022 build would report that element as unknown.
    if not DCIODVFY.exists():
        pytest.skip("dciodvfy (dicom3tools) not installed")
    out, _ = study
    for path in (out / "mr" / "MR0001.dcm", out / "reference-ct" / "CT0001.dcm"):
        assert _dciodvfy_errors(path) == [], path.name


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_simulate_sct(tmp_path: Path) -> None:
    from dicom_node.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["simulate", "sct", "--out", str(tmp_path), "--slices", "2", "--size", "32", "--sequence", "t2"]
    )
    assert result.exit_code == 0, result.output
    assert "SIMULATED" in result.output and "reference CT" in result.output
    assert len(list((tmp_path / "mr").glob("MR*.dcm"))) == 2
    assert len(list((tmp_path / "reference-ct").glob("CT*.dcm"))) == 2
    assert pydicom.dcmread(next((tmp_path / "mr").glob("*.dcm"))).EchoTime == 100
    bad = runner.invoke(app, ["simulate", "sct", "--out", str(tmp_path / "x"), "--sequence", "flair"])
    assert bad.exit_code != 0
    assert not (tmp_path / "x").exists()
