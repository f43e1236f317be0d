"""Low-dose CT simulator: anatomy, HU model, projector/FBP, noise and the case factory."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from models.sim import anatomy, ldct
from models.sim.ctphysics import MU_WATER_PER_MM, Tissue, hu_to_mu, mu_to_hu
from models.sim.ldct import Case, make_case, noise_power_spectrum, simulate_doses, simulate_pair


@pytest.fixture(scope="module")
def no_network() -> Iterator[None]:
    """Any attempt to open a network connection fails loudly while the fixture is active."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulator tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def head(no_network: None) -> Case:
    # First use of the MNI atlas in this module: it is loaded with the network blocked.
    return make_case("head", seed=3, size=256, dose=0.25, level=0.55, n_lesions=4)


@pytest.fixture(scope="module")
def chest() -> Case:
    return make_case("chest", seed=5, size=256, dose=0.25, level=0.45, n_lesions=4, n_nodules=2)


def _region(case: Case, tissue: Tissue, erode: int = 3) -> np.ndarray:
    mask = ndi.binary_erosion(case.labels == tissue, iterations=erode)
    for les in case.lesions:
        mask &= ~ndi.binary_dilation(les.mask, iterations=2)
    return mask


def _water_cylinder(size: int = 256, pixel_mm: float = 0.9, radius_mm: float = 100.0) -> np.ndarray:
    yy, xx = np.ogrid[:size, :size]
    r = np.hypot(yy - size // 2, xx - size // 2) * pixel_mm
    return np.where(r < radius_mm, 0.0, -1000.0).astype(np.float32)


# -- templates and conversions -------------------------------------------------------------------
def test_mni_templates_are_read_from_the_nilearn_package() -> None:
    import nilearn

    folder = anatomy.mni_template_dir()
    assert folder == Path(nilearn.__file__).parent / "datasets" / "data"
    for name in anatomy._MNI_FILES.values():
        assert (folder / name).is_file()


def test_hu_mu_round_trip() -> None:
    assert hu_to_mu(np.array([0.0]))[0] == pytest.approx(MU_WATER_PER_MM)
    assert hu_to_mu(np.array([-1000.0]))[0] == pytest.approx(0.0, abs=1e-9)
    hu = np.array([-1000.0, -100.0, 0.0, 40.0, 1500.0], dtype=np.float32)
    np.testing.assert_allclose(mu_to_hu(hu_to_mu(hu)), hu, atol=1e-2)


# -- anatomy and HU -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["head", "chest"])
def test_case_shapes_and_annotations(name: str, request: pytest.FixtureRequest) -> None:
    case: Case = request.getfixturevalue(name)
    assert case.reference_hu.shape == case.low_dose_hu.shape == case.phantom_hu.shape == (256, 256)
    assert case.reference_hu.dtype == np.float32
    assert case.labels.dtype == np.uint8 and case.body_mask.dtype == bool
    assert case.pixel_mm == pytest.approx((250.0 if name == "head" else 400.0) / 256)
    assert 0.15 < case.body_mask.mean() < 0.8
    assert len(case.lesions) >= 3
    for les in case.lesions:
        assert les.mask.any() and not (les.mask & ~case.body_mask).any()
        assert 10.0 <= abs(les.contrast_hu) <= 20.0 and 2.0 <= les.diameter_mm <= 8.0
    if name == "chest":
        assert len(case.nodules) == 2


def test_head_hu_ranges(head: Case) -> None:
    ref, truth = head.reference_hu, head.phantom_hu
    outside = ~ndi.binary_dilation(head.body_mask, iterations=4) & (
        np.hypot(*np.ogrid[-128:128, -128:128]) < 120
    )
    assert abs(float(np.median(ref[outside])) + 1000.0) < 10.0
    for tissue, lo, hi in [
        (Tissue.WHITE, 15.0, 40.0),
        (Tissue.GREY, 28.0, 55.0),
        (Tissue.CSF, -5.0, 25.0),
    ]:
        region = _region(head, tissue, erode=1 if tissue == Tissue.CSF else 2)
        assert region.sum() > 30, tissue
        assert lo < float(np.median(truth[region])) < hi, tissue
        assert lo - 8 < float(np.median(ref[region])) < hi + 8, tissue
    # Grey/white contrast is a low-contrast feature of the truth (8-16 HU, less partial volume).
    gw = float(
        np.median(truth[_region(head, Tissue.GREY, 2)]) - np.median(truth[_region(head, Tissue.WHITE, 2)])
    )
    assert 5.0 < gw < 18.0
    bone = head.labels == Tissue.BONE
    assert float(np.median(ref[bone])) > 300.0
    assert float(np.percentile(ref[bone], 90)) > 1000.0


def test_chest_hu_ranges(chest: Case) -> None:
    ref, truth = chest.reference_hu, chest.phantom_hu
    for tissue, lo, hi in [
        (Tissue.FAT, -140.0, -60.0),
        (Tissue.SOFT, 20.0, 75.0),
        (Tissue.LUNG, -930.0, -720.0),
    ]:
        region = _region(chest, tissue)
        assert region.sum() > 100, tissue
        assert lo < float(np.median(truth[region])) < hi, tissue
        assert lo - 10 < float(np.median(ref[region])) < hi + 10, tissue
    blood = _region(chest, Tissue.BLOOD, erode=2)
    assert 20.0 < float(np.median(truth[blood])) < 350.0
    bone = chest.labels == Tissue.BONE
    assert float(np.median(ref[bone])) > 300.0
    assert float(ref[chest.body_mask].max()) > 1000.0
    air = ~ndi.binary_dilation(chest.body_mask, iterations=4) & (
        np.hypot(*np.ogrid[-128:128, -128:128]) < 120
    )
    assert abs(float(np.median(ref[air])) + 1000.0) < 10.0


@pytest.mark.parametrize(
    ("name", "tissue"), [("head", Tissue.WHITE), ("chest", Tissue.SOFT), ("chest", Tissue.LUNG)]
)
def test_texture_is_present(name: str, tissue: Tissue, request: pytest.FixtureRequest) -> None:
    case: Case = request.getfixturevalue(name)
    region = _region(case, tissue)
    truth = case.phantom_hu
    # The noise-free truth is textured at fine and coarse scales, not piecewise constant ...
    assert float(truth[region].std()) > 2.0
    fine = truth - ndi.gaussian_filter(truth, 1.5)
    assert float(fine[region].std()) > 0.7
    steps = np.abs(np.diff(truth, axis=1))[region[:, 1:] & region[:, :-1]]
    assert float(np.mean(steps < 0.01)) < 0.05  # neighbouring pixels (almost) never equal
    # ... so an edge-preserving filter (median) cannot give it back.
    assert float((ndi.median_filter(truth, size=5) - truth)[region].std()) > 0.7
    assert float(case.reference_hu[region].std()) > 3.0


# -- determinism ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["head", "chest"])
def test_same_seed_same_case_different_seed_different(name: str, no_network: None) -> None:
    a = make_case(name, seed=11, size=128)
    b = make_case(name, seed=11, size=128)
    c = make_case(name, seed=12, size=128)
    for field in ("reference_hu", "low_dose_hu", "phantom_hu", "labels", "body_mask"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert len(a.lesions) == len(b.lesions)
    for la, lb in zip(a.lesions, b.lesions, strict=True):
        np.testing.assert_array_equal(la.mask, lb.mask)
        assert la.contrast_hu == lb.contrast_hu
    assert not np.array_equal(a.phantom_hu, c.phantom_hu)
    assert not np.array_equal(a.low_dose_hu, c.low_dose_hu)
    # The seed fixes anatomy, texture and the reference noise whatever low dose is asked for.
    d = make_case(name, seed=11, size=128, dose=0.5)
    np.testing.assert_array_equal(a.reference_hu, d.reference_hu)
    assert not np.array_equal(a.low_dose_hu, d.low_dose_hu)


# -- noise ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "tissue"), [("head", Tissue.WHITE), ("chest", Tissue.SOFT)])
def test_low_dose_noise_is_about_one_over_sqrt_dose_higher(
    name: str, tissue: Tissue, request: pytest.FixtureRequest
) -> None:
    case: Case = request.getfixturevalue(name)
    region = _region(case, tissue)
    sigma_ref = float((case.reference_hu - case.phantom_hu)[region].std())
    sigma_low = float((case.low_dose_hu - case.phantom_hu)[region].std())
    expected = 1.0 / np.sqrt(case.dose)
    assert 3.0 < sigma_ref < 40.0
    assert 0.8 * expected < sigma_low / sigma_ref < 1.2 * expected


def test_noise_sigma_scales_with_inverse_sqrt_dose() -> None:
    px = 0.9
    hu = _water_cylinder(pixel_mm=px)
    doses = [16.0, 1.0, 0.5, 0.25]  # first: the higher-dose reference
    out = simulate_doses(hu, px, doses, np.random.default_rng(0))
    yy, xx = np.ogrid[:256, :256]
    roi = np.hypot(yy - 128, xx - 128) < 60
    sigma = {d: float((out[k] - out[0])[roi].std()) for k, d in enumerate(doses) if k}
    assert 0.8 * 2.0 < sigma[0.25] / sigma[1.0] < 1.2 * 2.0
    assert 0.8 * np.sqrt(2.0) < sigma[0.5] / sigma[1.0] < 1.2 * np.sqrt(2.0)
    slope = np.polyfit(np.log([1.0, 0.5, 0.25]), np.log([sigma[1.0], sigma[0.5], sigma[0.25]]), 1)[0]
    assert -0.6 < slope < -0.4
    # No bias between doses: same chain, same noise-free sinogram.
    assert abs(float(out[3][roi].mean() - out[0][roi].mean())) < 3.0


def test_nps_has_the_fbp_shape() -> None:
    px = 0.9
    hu = _water_cylinder(pixel_mm=px)
    yy, xx = np.ogrid[:256, :256]
    roi = np.hypot(yy - 128, xx - 128) < 80
    total = None
    variances = []
    for seed in range(3):
        ref, low = simulate_pair(hu, px, 0.25, np.random.default_rng(seed), reference_dose=np.inf)
        f, nps = noise_power_spectrum(low, ref, px, roi=roi, roi_size=64)
        total = nps if total is None else total + nps
        variances.append(float((low - ref)[roi].var()))
    assert total is not None
    nps = total / 3
    peak = int(np.argmax(nps))
    nyquist = 0.5 / px
    assert f[0] == 0.0 and nps[0] < 1e-6 * nps[peak]
    assert nps[1] < 0.35 * nps[peak]  # near zero at low frequency (ramp; ROI leakage aside)
    assert np.all(np.diff(nps[1 : peak // 2 + 1]) > 0)  # rising
    assert 0.25 * nyquist < f[peak] < 0.75 * nyquist
    assert nps[-1] < 0.5 * nps[peak]  # falling towards Nyquist (apodisation x interpolation)
    # The NPS integrates to the pixel variance (radial integration up to Nyquist, corners aside).
    variance = float(np.mean(variances))
    integral = float(np.sum(nps * 2 * np.pi * f * (f[1] - f[0])))
    assert 0.8 * variance < integral < 1.2 * variance


# -- projector / FBP -----------------------------------------------------------------------------
def test_projector_and_fbp_match_skimage_on_shepp_logan() -> None:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import iradon, radon, resize

    size = 256
    phantom = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True).astype(np.float32)
    geo = ldct.parallel_beam(size)
    theta = np.rad2deg(geo.theta)
    sino = geo.project(phantom)
    sk_sino = radon(phantom, theta, circle=True).T
    assert sino.shape == sk_sino.shape == (geo.n_views, size)
    assert np.linalg.norm(sino - sk_sino) / np.linalg.norm(sk_sino) < 0.02
    recon = geo.fbp(sino, "shepp-logan")
    sk_recon = iradon(sk_sino.T, theta, filter_name="shepp-logan", circle=True)
    fov = geo.fov_mask

    def rmse(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a - b)[fov] ** 2)))

    assert rmse(recon, sk_recon) < 0.015  # phantom range is 0 .. 1
    assert rmse(geo.fbp(sk_sino), sk_recon) < 0.01  # FBP alone, on scikit-image's sinogram
    assert rmse(recon, phantom) <= 1.05 * rmse(sk_recon, phantom)
    # Quantitative: a uniform disc comes back at its value.
    disc = (np.hypot(*np.ogrid[-128:128, -128:128]) < 100).astype(np.float32)
    inner = np.hypot(*np.ogrid[-128:128, -128:128]) < 80
    assert float(geo.fbp(geo.project(disc))[inner].mean()) == pytest.approx(1.0, abs=2e-3)


def test_pair_speed_256() -> None:
    hu = _water_cylinder(pixel_mm=0.9)
    rng = np.random.default_rng(0)
    simulate_pair(hu, 0.9, 0.25, rng)  # warm the projector cache
    start = time.perf_counter()
    for _ in range(3):
        simulate_pair(hu, 0.9, 0.25, rng)
    assert (time.perf_counter() - start) / 3 < 0.5


def test_volume_helper_matches_slicewise_batches() -> None:
    vol = np.stack([_water_cylinder(64, 3.0, r) for r in (60.0, 75.0, 90.0)])
    ref_a, low_a = ldct.simulate_volume(vol, 3.0, 0.25, np.random.default_rng(4), batch=3)
    ref_b, low_b = ldct.simulate_volume(vol, 3.0, 0.25, np.random.default_rng(4), batch=1)
    assert ref_a.shape == low_a.shape == vol.shape
    np.testing.assert_allclose(ref_a, ref_b, atol=1e-3)
    np.testing.assert_allclose(low_a, low_b, atol=1e-3)
    assert float(low_a[1].std()) != float(ref_a[1].std())


# -- lesions --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "diameters"),
    [("head", (2.0, 8.0)), ("chest", (2.0, 8.0)), ("chest", (4.8, 8.0))],  # chest: 1.56 mm pixels
)
def test_lesions_have_the_requested_contrast(
    name: str, diameters: tuple[float, float], no_network: None
) -> None:
    kw = {"seed": 21, "size": 256, "level": 0.5, "reference_dose": np.inf, "lesion_diameter_mm": diameters}
    with_lesions = make_case(name, n_lesions=4, **kw)
    without = make_case(name, n_lesions=0, **kw)
    assert len(with_lesions.lesions) >= 3 and not without.lesions
    truth_diff = with_lesions.phantom_hu - without.phantom_hu
    signal = with_lesions.reference_hu - without.reference_hu  # noise-free: exactly the lesion signal
    union = np.any([les.mask for les in with_lesions.lesions], axis=0)
    assert np.abs(truth_diff[~union]).max() < 1e-3
    measured = 0
    for les in with_lesions.lesions:
        # Exact in the phantom (added on top of the unchanged texture) ...
        np.testing.assert_allclose(truth_diff[les.mask], les.contrast_hu, atol=1e-3)
        # ... and the stored reference contrast is what the reconstruction chain delivers.
        core = ldct.lesion_core(les.mask)
        assert les.reference_contrast_hu == pytest.approx(float(signal[core].mean()), abs=0.05)
        if les.diameter_mm >= 3.0 * les.pixel_mm:  # resolved by the system
            assert les.reference_contrast_hu == pytest.approx(les.contrast_hu, abs=3.0)
            measured += 1
        else:  # sub-resolution lesions keep their sign but lose contrast to the system blur
            assert np.sign(les.reference_contrast_hu) == np.sign(les.contrast_hu)
    assert measured >= 2
    # The host tissue around each lesion is a single tissue (uniform background ring).
    for les in with_lesions.lesions:
        ring = ndi.binary_dilation(les.mask, iterations=2) & ~les.mask
        assert np.all(with_lesions.labels[ring] == les.host)


def test_lesion_contrast_measurable_in_the_noisy_reference(head: Case) -> None:
    # Core-minus-ring on the full-dose reference is noisy; it is unbiased on average.
    errors = [ldct.lesion_contrast(head.reference_hu, les) - les.contrast_hu for les in head.lesions]
    assert abs(float(np.mean(errors))) < 15.0
