"""Evaluation library (models.evaluation): pixel metrics, calibration, hallucination protocol,
low-contrast detail, feature distances with the shipped sim-encoder, and the report."""

from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.evaluation import calibration as cal
from models.evaluation import features as feat
from models.evaluation import hallucination as hal
from models.evaluation import lesions as les
from models.evaluation.pixel import ms_ssim_scales, pixel_metrics
from models.evaluation.report import SIMULATED_NOTE, write_report
from models.sim.ldct import Case, lesion_contrast, make_case
from models.zoo import sha256_of


@pytest.fixture(scope="module")
def chest_cases() -> list[Case]:
    """Three chest cases at the lowest dose of the training range (0.1), four lesions each."""
    return [make_case("chest", seed, 256, 0.1, n_lesions=4) for seed in (11, 12, 13)]


# -- level 1: pixels ------------------------------------------------------------------------------
def test_rmse_and_psnr_against_hand_computed_values() -> None:
    ref = np.zeros((2, 32, 32), np.float32)
    pred = np.full((2, 32, 32), 10.0, np.float32)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    pred[:, 0, 0] = 1e6  # outside the mask: ignored
    r = pixel_metrics(pred, ref, mask)
    assert r["rmse_hu"] == pytest.approx(10.0)
    # PSNR = 10 log10(W^2 / MSE) with W = 2000 HU, MSE = 100 HU^2
    assert r["psnr_db"] == pytest.approx(10 * math.log10(2000.0**2 / 100.0))  # 46.0206 dB
    assert r["per_slice"]["psnr_db"] == pytest.approx([46.0206] * 2, abs=1e-4)
    # values are clipped to the window before the error is taken
    pred2 = np.zeros((1, 32, 32), np.float32)
    pred2[0, 10, 10] = 5000.0
    r2 = pixel_metrics(pred2, np.zeros_like(pred2), mask)
    assert r2["rmse_hu"] == pytest.approx(math.sqrt(1000.0**2 / mask.sum()))


def test_ssim_against_hand_computed_values() -> None:
    # constant images: only the luminance term differs from 1. Images are clipped to the window and
    # shifted to [0, W]: 100 -> 1100, 150 -> 1150; C1 = (0.01 W)^2 = 400.
    x = np.full((1, 48, 48), 100.0)
    y = np.full((1, 48, 48), 150.0)
    expected = (2 * 1100 * 1150 + 400) / (1100**2 + 1150**2 + 400)  # 0.999013
    r = pixel_metrics(y, x)
    assert r["ssim"] == pytest.approx(expected, abs=1e-9)
    assert r["per_slice"]["ssim"][0] == pytest.approx(expected, abs=1e-9)
    # MS-SSIM of constant images: every contrast-structure term is 1 and the luminance term enters
    # once, at the coarsest scale, with its weight: 48 px -> 3 scales, w = 0.3001 / (0.0448 + 0.2856 + 0.3001)
    assert r["ms_ssim_scales"] == [3]
    assert r["ms_ssim"] == pytest.approx(expected ** (0.3001 / 0.6305), abs=1e-12)
    same = pixel_metrics(x, x)
    assert same["ssim"] == pytest.approx(1.0) and same["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert same["psnr_db"] == math.inf and same["rmse_hu"] == 0.0


def test_ssim_falls_with_noise_and_small_images_use_fewer_scales() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 100, (1, 96, 96))
    low = pixel_metrics(ref + rng.normal(0, 20, ref.shape), ref)
    high = pixel_metrics(ref + rng.normal(0, 80, ref.shape), ref)
    assert 0 < high["ssim"] < low["ssim"] < 1 and high["ms_ssim"] < low["ms_ssim"]
    assert low["ms_ssim_scales"] == [3]
    assert (ms_ssim_scales((256, 256)), ms_ssim_scales((128, 128)), ms_ssim_scales((10, 10))) == (5, 4, 0)


def test_ms_ssim_agrees_with_monai() -> None:
    import torch
    from monai.metrics.regression import compute_ms_ssim

    from models.evaluation._threads import torch_threads
    from models.evaluation.pixel import MS_SSIM_WEIGHTS, ms_ssim

    rng = np.random.default_rng(1)
    for shape in ((200, 200), (120, 90)):
        a = np.clip(rng.normal(1000, 100, shape), 0, 2000)
        b = np.clip(a + rng.normal(0, 30, shape), 0, 2000)
        value, n = ms_ssim(b, a, 2000.0)
        w = np.asarray(MS_SSIM_WEIGHTS[:n]) / sum(MS_SSIM_WEIGHTS[:n])
        t = [torch.tensor(v, dtype=torch.float32)[None, None] for v in (b, a)]
        with torch_threads(1):
            ref = float(
                compute_ms_ssim(t[0], t[1], 2, 2000.0, kernel_size=11, kernel_sigma=1.5, weights=tuple(w))
            )
        assert value == pytest.approx(ref, abs=1e-4)  # MONAI is float32


# -- level 2: calibration -------------------------------------------------------------------------
def _gaussian_problem(seed: int, shape: tuple[int, ...] = (4, 128, 128)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(5.0, 40.0, shape)
    return sigma, rng.standard_normal(shape) * sigma


def test_coverage_of_gaussian_residuals_with_the_right_sigma() -> None:
    sigma, resid = _gaussian_problem(0)
    mean = np.zeros_like(resid)
    r = cal.interval_coverage(mean, sigma, resid, z=cal.Z90)
    assert r["coverage"] == pytest.approx(0.9, abs=0.01)
    assert len(r["per_slice_coverage"]) == 4
    assert all(abs(c - 0.9) < 0.02 for c in r["per_slice_coverage"])
    assert r["mean_width_hu"] == pytest.approx(2 * cal.Z90 * sigma.mean())
    rel = cal.reliability_curve(mean, sigma, resid)
    assert np.allclose(rel["observed"], rel["nominal"], atol=0.015)


def test_conformal_scale_fixes_a_misscaled_sigma() -> None:
    sigma, resid = _gaussian_problem(1)
    wrong = 0.5 * sigma  # over-confident model
    assert cal.interval_coverage(np.zeros_like(resid), wrong, resid)["coverage"] < 0.7
    scale = cal.conformal_scale(np.abs(resid), wrong, coverage=0.9)
    assert scale == pytest.approx(2 * cal.Z90, rel=0.03)
    fresh_sigma, fresh_resid = _gaussian_problem(2)
    fixed = cal.calibrated_sigma(0.5 * fresh_sigma, scale, cal.Z90)
    cov = cal.interval_coverage(np.zeros_like(fresh_resid), fixed, fresh_resid, z=cal.Z90)["coverage"]
    assert cov == pytest.approx(0.9, abs=0.01)
    # finite-sample rule: with n scores the ceil((n+1)·0.9)-th smallest
    assert cal.conformal_scale(np.arange(1.0, 20.0), np.ones(19), 0.9) == 18.0  # k = ceil(20 · 0.9) = 18
    assert cal.conformal_scale(np.arange(1.0, 100.0), np.ones(99), 0.9) == 90.0  # k = 90, not 91
    assert cal.conformal_scale(np.arange(1.0, 9.0), np.ones(8), 0.9) == math.inf  # k = 9 > n = 8


def test_ause_is_zero_for_the_true_error_and_positive_for_random_sigma() -> None:
    sigma, resid = _gaussian_problem(3)
    err = np.abs(resid)
    assert cal.ause(err, err) == pytest.approx(0.0, abs=1e-12)
    random_sigma = np.random.default_rng(4).uniform(size=err.shape)
    assert cal.ause(err, random_sigma) > 0.3
    informative = cal.ause(err, sigma)
    assert 0.0 < informative < cal.ause(err, random_sigma)
    sp = cal.sparsification(err, sigma)
    assert sp["model"][0] == pytest.approx(1.0) and sp["oracle"][-1] < sp["model"][-1]


# -- level 3a: hallucination protocol -------------------------------------------------------------
def test_inserted_blobs_have_the_requested_contrast_and_do_not_overlap(chest_cases: list[Case]) -> None:
    case = chest_cases[0]
    rng = np.random.default_rng(5)
    contrasts = [30.0, -20.0, 60.0, 15.0, -45.0]
    flat = np.full(case.reference_hu.shape, 40.0, np.float32)
    out, blobs = hal.insert_blobs(
        flat, rng, 5, contrasts, [2.0, 3.0, 4.0, 5.0, 3.5], case.body_mask, avoid=case.lesion_masks
    )
    assert len(blobs) == 5
    measured = [lesion_contrast(out, b) for b in hal.blob_lesions(blobs, contrasts, case.pixel_mm)]
    assert measured == pytest.approx(contrasts, abs=1e-3)
    union = np.zeros_like(case.body_mask)
    for b in blobs:
        assert not (b & union).any() and (b <= case.body_mask).all()
        assert not any((b & m).any() for m in case.lesion_masks)
        union |= b
    # on the real (noisy) output the average measured contrast is close to the requested one
    noisy, nb = hal.insert_blobs(case.reference_hu, np.random.default_rng(6), 12, 40.0, 4.0, case.body_mask)
    gain = [
        lesion_contrast(noisy, b) - lesion_contrast(case.reference_hu, b)
        for b in hal.blob_lesions(nb, 40.0, case.pixel_mm)
    ]
    assert np.mean(gain) == pytest.approx(40.0, abs=1e-3)


def test_remove_structures_erases_the_lesion_contrast() -> None:
    before, after = [], []
    for seed in (0, 1):
        case = make_case("chest", seed, 256, 0.25, n_lesions=4, lesion_contrast_hu=(40.0, 60.0))
        img = case.phantom_hu
        out = hal.remove_structures(
            img,
            case.lesion_masks,
            np.random.default_rng(seed),
            body=case.body_mask,
            avoid=[n.mask for n in case.nodules],
        )
        assert np.array_equal(out[~case.body_mask], img[~case.body_mask])
        before += [lesion_contrast(img, les_) for les_ in case.lesions]
        after += [lesion_contrast(out, les_) for les_ in case.lesions]
    assert np.mean(np.abs(after)) < 0.2 * np.mean(np.abs(before))


def test_control_regions_have_the_same_shape_and_do_not_overlap(chest_cases: list[Case]) -> None:
    case = chest_cases[1]
    rng = np.random.default_rng(7)
    ctrl = hal.control_regions(
        case.body_mask, case.lesion_masks, 12, rng, avoid=[n.mask for n in case.nodules]
    )
    assert len(ctrl) == 12
    taken = np.zeros_like(case.body_mask)
    for m in case.lesion_masks:
        taken |= m
    for i, c in enumerate(ctrl):
        like = case.lesion_masks[i % len(case.lesion_masks)]
        assert c.sum() == like.sum() and (c <= case.body_mask).all()
        assert not (c & taken).any()
        taken |= c


def test_region_auroc_is_one_when_separated_and_half_for_random() -> None:
    rng = np.random.default_rng(8)
    shape = (200, 200)
    base = np.zeros(shape, bool)
    base[:6, :6] = True
    pos = [np.roll(base, (12 * (i // 16), 12 * (i % 16)), axis=(0, 1)) for i in range(64)]
    neg = [np.roll(base, (6 + 12 * (i // 16), 6 + 12 * (i % 16)), axis=(0, 1)) for i in range(64)]
    score = rng.uniform(0, 1, shape)
    separated = score.copy()
    for m in pos:
        separated[m] += 2.0
    assert hal.region_auroc(separated, pos, neg) == 1.0
    assert hal.region_auroc(separated, pos, neg, reduce="mean") == 1.0
    assert hal.region_auroc(score, pos, neg, reduce="mean") == pytest.approx(0.5, abs=0.12)
    roc = hal.hallucination_roc(separated, pos, neg)
    assert roc["auroc"] == 1.0 and roc["n_positive"] == 64 and roc["tpr"][-1] == 1.0


# -- level 3b: low-contrast detail ----------------------------------------------------------------
def test_npw_dprime_is_higher_on_a_clean_image_than_on_a_noisy_one(chest_cases: list[Case]) -> None:
    masks = [les.host_tissue_mask(c.labels, c.lesions) for c in chest_cases]
    lesion_sets = [c.lesions for c in chest_cases]
    clean = les.npw_dprime(
        [c.reference_hu for c in chest_cases], lesion_sets, np.random.default_rng(9), control_masks=masks
    )
    noisy = les.npw_dprime(
        [c.low_dose_hu for c in chest_cases], lesion_sets, np.random.default_rng(9), control_masks=masks
    )
    assert clean.signal.size == noisy.signal.size > 0 and clean.noise.size == noisy.noise.size
    assert clean.dprime > noisy.dprime
    assert clean.noise.std() < noisy.noise.std()
    # the template is normalised: a flat background plus the exact lesion profile responds with 1
    lesion = chest_cases[0].lesions[0]
    flat = np.full(lesion.mask.shape, 30.0) + lesion.contrast_hu * lesion.mask
    assert les.template_response(flat, les.lesion_template(lesion)) == pytest.approx(1.0)


def test_contrast_ratio_is_about_one_on_the_noise_free_reconstruction_and_falls_with_blur() -> None:
    from scipy import ndimage

    cases = [make_case("chest", s, 256, 0.1, n_lesions=4, reference_dose=math.inf) for s in (11, 12, 13)]
    sets = [c.lesions for c in cases]
    sharp = les.lesion_summary([c.reference_hu for c in cases], sets, np.random.default_rng(10))
    assert len(sharp["ratio"]) == sum(len(c.lesions) for c in cases) == sharp["n_signal"]
    assert sharp["mean_ratio"] == pytest.approx(1.0, abs=0.15)
    blurred = [ndimage.gaussian_filter(c.reference_hu, 2.0) for c in cases]
    soft = les.lesion_summary(blurred, sets, np.random.default_rng(10))
    assert soft["mean_ratio"] < 0.8 * sharp["mean_ratio"]
    assert np.isfinite(sharp["dprime"]) and np.isfinite(soft["dprime"])


# -- level 3c: features ---------------------------------------------------------------------------
def test_fid_kid_mmd_are_zero_for_identical_sets_and_grow_with_a_shift() -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(400, 16))
    assert feat.fid(x, x) == pytest.approx(0.0, abs=1e-8)
    y = rng.normal(size=(400, 16))
    fids = [feat.fid(x, y + s) for s in (0.0, 0.25, 0.5, 1.0)]
    assert fids == sorted(fids) and fids[-1] == pytest.approx(16.0, rel=0.25)  # |shift|^2 = 16
    kids = [feat.kid(x, y + s, n_subsets=20, subset_size=200)[0] for s in (0.0, 0.5, 1.0)]
    mmds = [feat.mmd_rbf(x, y + s) for s in (0.0, 0.5, 1.0)]
    assert kids == sorted(kids) and mmds == sorted(mmds) and abs(mmds[0]) < 0.01


def test_shipped_sim_encoder_loads_with_sha256_check_and_embeds() -> None:
    card = json.loads((feat.SIM_ENCODER_DIR / "card.json").read_text())
    assert card["weights_sha256"] == feat.SIM_ENCODER_SHA256
    assert sha256_of(feat.SIM_ENCODER_DIR / feat.WEIGHTS_FILE) == feat.SIM_ENCODER_SHA256
    assert card["label"] == feat.SIM_ENCODER_LABEL == "sim-encoder"
    assert "simulated" in card["training_data"].lower()
    enc = feat.load_sim_encoder()
    rng = np.random.default_rng(12)
    patches = rng.normal(40.0, 20.0, (5, 64, 64)).astype(np.float32)
    e1, e2 = feat.embed(patches, enc), feat.embed(patches, enc)
    assert e1.shape == (5, 64) and np.isfinite(e1).all() and np.array_equal(e1, e2)


def test_sim_encoder_separates_dose_levels(chest_cases: list[Case]) -> None:
    rng_a, rng_b = np.random.default_rng(13), np.random.default_rng(13)
    ref = feat.extract_patches(
        [c.reference_hu for c in chest_cases], [c.body_mask for c in chest_cases], 120, rng_a
    )
    low = feat.extract_patches(
        [c.low_dose_hu for c in chest_cases], [c.body_mask for c in chest_cases], 120, rng_b
    )
    f_ref, f_low = feat.embed(ref), feat.embed(low)
    half = len(f_ref) // 2
    same = feat.fid(f_ref[:half], f_ref[half:])
    assert feat.fid(f_ref, f_low) > 2 * same
    result = feat.feature_distances(f_low, f_ref, kid_subsets=10, kid_subset_size=100)
    assert result["encoder"] == "sim-encoder" and result["fid"] > 0


def test_tampered_weights_fail_with_a_clear_message(tmp_path: Path) -> None:
    copy = tmp_path / "sim-encoder"
    shutil.copytree(feat.SIM_ENCODER_DIR, copy)
    feat.load_sim_encoder(copy)  # an intact copy loads (checked against its card)
    weights = copy / feat.WEIGHTS_FILE
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(feat.SimEncoderError, match="sha256 mismatch"):
        feat.load_sim_encoder(copy)
    with pytest.raises(feat.SimEncoderError, match="sha256 mismatch"):
        feat.load_sim_encoder(feat.SIM_ENCODER_DIR, expected_sha256="0" * 64)


def test_weights_file_round_trips_and_repeats_byte_for_byte(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    state = feat.SimEncoder().state_dict()
    feat._save_weights(tmp_path / "a.safetensors", state)
    feat._save_weights(tmp_path / "b.safetensors", state)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = feat._load_weights(tmp_path / "a.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(feat.SimEncoderError, match="not a readable safetensors file"):
        feat._load_weights(tmp_path / "short.safetensors")


def test_train_sim_encoder_is_deterministic(tmp_path: Path) -> None:
    kwargs = dict(
        seed=3, minutes=3 / 60, n_cases=2, n_val_cases=0, patches_per_image=6, size=128, anatomies=("chest",),
        max_steps=200, min_steps=3, batch_size=8,
    )  # fmt: skip
    a = feat.train_sim_encoder(tmp_path / "a", **kwargs)  # type: ignore[arg-type]
    b = feat.train_sim_encoder(tmp_path / "b", **kwargs)  # type: ignore[arg-type]
    assert len(a["history"]) >= 3 and len(b["history"]) >= 3
    assert a["history"][:3] == b["history"][:3]
    card = json.loads((tmp_path / "a" / "card.json").read_text())
    assert card["weights_sha256"] == sha256_of(tmp_path / "a" / feat.WEIGHTS_FILE)
    feat.load_sim_encoder(tmp_path / "a")


# -- report ---------------------------------------------------------------------------------------
def test_report_writes_json_and_self_contained_html(tmp_path: Path, chest_cases: list[Case]) -> None:
    from scipy import ndimage

    ref = np.stack([c.reference_hu for c in chest_cases])
    low = np.stack([c.low_dose_hu for c in chest_cases])
    body = np.stack([c.body_mask for c in chest_cases])
    smooth = ndimage.gaussian_filter(low, (0, 1.2, 1.2))
    sigma = np.sqrt(np.maximum(ndimage.uniform_filter((low - smooth) ** 2, (1, 7, 7)), 0.0))
    rng = np.random.default_rng(14)
    blob_img, blobs = hal.insert_blobs(smooth[0], rng, 6, 50.0, 3.0, body[0])
    score = np.abs(ndimage.uniform_filter(blob_img - low[0], 5))
    ctrl = hal.control_regions(body[0], blobs, 12, rng)
    lesion_sets = [c.lesions for c in chest_cases]
    patches = {
        name: feat.extract_patches(img, body, 48, np.random.default_rng(15))
        for name, img in (("reference", ref), ("low-dose input", low), ("Gaussian", smooth))
    }
    f_ref = feat.embed(patches["reference"])
    results = {
        "meta": {"data": "models.sim.ldct.make_case, 256 px, chest", "doses": [0.1], "n_cases": 3},
        "pixel": {
            "low-dose input": pixel_metrics(low, ref, body),
            "Gaussian": pixel_metrics(smooth, ref, body),
        },
        "calibration": {"Gaussian": cal.calibration_summary(smooth, sigma, ref, body, conformal=1.3)},
        "hallucination": {"Gaussian: inserted blobs": hal.hallucination_roc(score, blobs, ctrl)},
        "lesions": {
            name: les.lesion_summary(list(img), lesion_sets, np.random.default_rng(16))
            for name, img in (("low-dose input", low), ("Gaussian", smooth))
        },
        "features": {
            name: feat.feature_distances(feat.embed(patches[name]), f_ref, kid_subsets=5, kid_subset_size=32)
            for name in ("low-dose input", "Gaussian")
        },
        "nps": {"low-dose input": {"frequency_per_mm": [0.1, 0.2], "nps_hu2_mm2": [10.0, 20.0]}},
    }
    path = write_report(results, tmp_path / "report", "Test report")
    assert path.name == "report.html" and path.exists()
    payload = json.loads((tmp_path / "report" / "report.json").read_text())
    assert payload["simulated_data"] is True and payload["feature_encoder"] == "sim-encoder"
    assert payload["results"]["pixel"]["Gaussian"]["per_slice"]["psnr_db"][0] > 0
    page = path.read_text()
    assert "simulated" in page.lower() and SIMULATED_NOTE in page
    assert "sim-encoder" in page and "data:image/png;base64," in page
    assert page.count("<figure>") == page.count("Computed on simulated data.") >= 7
    assert "http://" not in page and "https://" not in page  # self-contained


def test_models_evaluation_imports_no_dicom() -> None:
    # bm3d: optional (non-commercial licence), imported only when installed
    allowed = {"numpy", "scipy", "skimage", "sklearn", "torch", "monai", "matplotlib", "models", "bm3d"}
    allowed.add("safetensors")  # the weights file format of the sim-encoder
    stdlib = {
        "__future__",
        "base64",
        "collections",
        "dataclasses",
        "datetime",
        "hashlib",
        "html",
        "io",
        "json",
    }
    stdlib |= {
        "argparse",
        "contextlib",
        "math",
        "pathlib",
        "shutil",
        "struct",
        "time",
        "typing",
        "importlib",
        "concurrent",
        "warnings",  # tissue_seg: k-means keeps an emptied cluster's centre with a warning, silenced
    }
    root = Path(__file__).resolve().parents[1] / "models" / "evaluation"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in allowed | stdlib, f"{path.name} imports {name}"
