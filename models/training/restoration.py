"""Training the low-dose CT restoration model on simulated pairs (deterministic, CPU).

Data: reference / low-dose slice pairs from :func:`models.sim.ldct.make_case` — head
slices from the MNI152 template and procedural chest slices, 512×512, dose drawn
log-uniformly in [0.08, 0.6] — or a site's own paired series (``pairs=``). Held out by
construction: training, calibration and test cases use disjoint seed ranges, and the
test set's anatomy levels (bands 0.2–0.3 and 0.7–0.8) never appear in training.

Loss: mean squared error of the restored image against the full-dose reference, plus
the Gaussian negative log-likelihood of the residual under the predicted variance with
the mean detached (so the variance head cannot buy a lower loss by blurring the mean).
After training, a split-conformal scale is fitted on the calibration cases so that
``mean ± 1.645 σ`` covers 90 % of the reference pixels in the body.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file
from scipy import ndimage

from models.hallucination import local_noise_sigma
from models.restoration import (
    HU_SCALE,
    PUTBACK_WIDTHS_MM,
    Z90,
    Architecture,
    RestorationCard,
    SliceFacts,
    data_consistent,
    load_weights,
    putback_width,
    sha256_of,
    slice_facts,
    to_network,
)
from models.training.parallel import simulate_in_processes
from models.zoo import CARD_FILE

Role = Literal["train", "calib", "test"]
HELD_OUT_LEVEL_BANDS = ((0.2, 0.3), (0.7, 0.8))
_SEED_BASE = {"train": 0, "calib": 1_000_000, "test": 2_000_000}


@dataclass(frozen=True)
class CaseSpec:
    anatomy: Literal["head", "chest"]
    seed: int
    level: float
    dose: float
    size: int = 512


@dataclass
class Pair:
    """One training example: low-dose and reference HU (int16 to save memory), body mask."""

    low: np.ndarray
    ref: np.ndarray
    body: np.ndarray
    dose: float
    anatomy: str
    #: Known faint structures (simulated lesions, dilated 2 px), for lesion-aware training;
    #: None for a site's own pairs.
    lesion: np.ndarray | None = None
    #: In-plane pixel size, mm (for the low-frequency data-consistency blend).
    pixel_mm: float = 1.0


def _held_out(level: float) -> bool:
    return any(lo <= level < hi for lo, hi in HELD_OUT_LEVEL_BANDS)


def case_plan(
    role: Role,
    n: int,
    seed: int,
    *,
    dose: float | None = None,
    dose_range: tuple[float, float] = (0.08, 0.6),
    size: int = 512,
) -> list[CaseSpec]:
    """Which cases to simulate for a role; disjoint seeds per role, held-out test levels."""
    rng = np.random.default_rng([seed, _SEED_BASE[role]])
    specs: list[CaseSpec] = []
    k = 0
    while len(specs) < n:
        level = float(rng.uniform(0.0, 1.0))
        if (role == "test") != _held_out(level):
            continue
        anatomy: Literal["head", "chest"] = "head" if len(specs) % 2 == 0 else "chest"
        case_dose = dose if dose is not None else float(np.exp(rng.uniform(*np.log(dose_range))))
        specs.append(CaseSpec(anatomy, _SEED_BASE[role] + seed % 100_000 * 1000 + k, level, case_dose, size))
        k += 1
    return specs


def simulate(spec: CaseSpec) -> Pair:
    from models.sim.ldct import make_case

    case = make_case(spec.anatomy, spec.seed, size=spec.size, dose=spec.dose, level=spec.level)
    lesion = np.zeros(case.body_mask.shape, bool)
    for les in case.lesions:
        lesion |= les.mask
    return Pair(
        low=np.round(case.low_dose_hu).astype(np.int16),
        ref=np.round(case.reference_hu).astype(np.int16),
        body=case.body_mask.astype(bool),
        dose=spec.dose,
        anatomy=spec.anatomy,
        lesion=ndimage.binary_dilation(lesion, iterations=2) if lesion.any() else None,
        pixel_mm=float(case.pixel_mm),
    )


def simulate_all(
    specs: Sequence[CaseSpec], workers: int = 2, progress: Callable[[int, int], None] | None = None
) -> list[Pair]:
    """Simulate cases in parallel processes (each case has its own seed: order-independent)."""
    return simulate_in_processes(simulate, specs, workers, progress, chunksize=4)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 20261126
    train_cases: int = 360
    calib_cases: int = 40
    steps: int = 12_000
    batch: int = 16
    patch: int = 96
    lr: float = 2e-3
    nll_weight: float = 0.1
    #: Lesion-aware training (0 = off, as in 1.0): this share of patches is centred near a
    #: known faint lesion, whose pixels weigh ``1 + lesion_weight`` in the loss, and the
    #: low-pass (Gaussian σ 1.5 px) error is penalised with ``lowpass_weight`` — MSE alone
    #: teaches the network that a 10-20 HU, 2-8 mm lesion is noise.
    lesion_patch_fraction: float = 0.0
    lesion_weight: float = 0.0
    lowpass_weight: float = 0.0
    #: Put back the low-pass (σ mm) of what the network removed (see RestorationCard);
    #: the conformal calibration is fitted on the blended output. 0: off.
    residual_lowpass_mm: float = 0.0
    #: Noise-adaptive put-back (see RestorationCard.putback_noise_hu); 0: fixed width.
    putback_noise_hu: float = 0.0
    arch: Architecture = field(default_factory=Architecture)
    name: str = "ldct-restoration"
    version: str = "1.0"


@dataclass
class TrainReport:
    card: RestorationCard
    seconds: float
    losses: list[float]


def _sample_batch(
    pairs: list[Pair],
    rng: np.random.Generator,
    batch: int,
    patch: int,
    lesion_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random body patches (a share centred near a lesion), rotated/flipped; with lesion masks."""
    with_lesions = [p for p in pairs if p.lesion is not None]
    xs, ys, ms = [], [], []
    for _ in range(batch):
        near_lesion = bool(with_lesions) and lesion_fraction > 0 and rng.random() < lesion_fraction
        if near_lesion:
            p = with_lesions[int(rng.integers(len(with_lesions)))]
            assert p.lesion is not None
            rows, cols = np.nonzero(p.lesion)
            i = int(rng.integers(len(rows)))
            h, w = p.low.shape
            jitter = rng.integers(-patch // 4, patch // 4 + 1, size=2)
            r = int(np.clip(rows[i] - patch // 2 + jitter[0], 0, h - patch))
            c = int(np.clip(cols[i] - patch // 2 + jitter[1], 0, w - patch))
        else:
            p = pairs[int(rng.integers(len(pairs)))]
            h, w = p.low.shape
            for _attempt in range(10):
                r, c = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
                if p.body[r + patch // 2, c + patch // 2]:
                    break
        low = p.low[r : r + patch, c : c + patch].astype(np.float32)
        ref = p.ref[r : r + patch, c : c + patch].astype(np.float32)
        mask = (
            p.lesion[r : r + patch, c : c + patch].astype(np.float32)
            if p.lesion is not None
            else np.zeros_like(low)
        )
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        low, ref, mask = np.rot90(low, k), np.rot90(ref, k), np.rot90(mask, k)
        if flip:
            low, ref, mask = low[:, ::-1], ref[:, ::-1], mask[:, ::-1]
        xs.append(to_network(low))
        ys.append(to_network(ref))
        ms.append(np.ascontiguousarray(mask))
    return np.stack(xs)[:, None], np.stack(ys)[:, None], np.stack(ms)[:, None]


def _gaussian_kernel(sigma_px: float = 1.5, radius: int = 4) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma_px**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _predict(net: torch.nn.Module, low_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        mean, log_var = net(torch.from_numpy(to_network(low_hu)[None, None]))
    return mean[0, 0].numpy() * HU_SCALE, np.exp(0.5 * log_var[0, 0].numpy()) * HU_SCALE


def _psnr(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    a, b = np.clip(x, -1000, 1000), np.clip(ref, -1000, 1000)
    mse = float(np.mean((a[mask] - b[mask]) ** 2))
    return 10 * np.log10(2000.0**2 / max(mse, 1e-12))


@dataclass(frozen=True)
class Calibration:
    sigma_scale: float
    #: window → spread of a window mean of the input noise relative to white noise
    noise_correlation: dict[str, float]
    #: (relative to the input's local Immerkær σ estimate, as the hallucination score uses it)
    #: window → spread of a window mean of the model's error relative to the mean calibrated σ
    model_error_correlation: dict[str, float]
    metrics: dict[str, float]
    #: width (mm) → spread of the low-passed input noise over the slice noise estimate
    lowpass_noise_factor: dict[str, float] = field(default_factory=dict)
    #: Mondrian conformal scale per slice group (groups with enough calibration slices)
    sigma_scale_by_group: dict[str, float] = field(default_factory=dict)
    #: calibration slices per group
    group_slices: dict[str, int] = field(default_factory=dict)


#: A group needs this many calibration slices for its own conformal scale.
MIN_GROUP_SLICES = 8


def conformal_sigma_scale(ratios: list[np.ndarray]) -> float:
    """Split-conformal 90 % multiplier of σ (finite-sample corrected), over ``Z90``: the
    card's ``sigma_scale``, from per-slice (or per-volume) ``|reference − mean| / σ``."""
    values = np.concatenate(ratios)
    n = len(values)
    level = min(1.0, np.ceil((n + 1) * 0.9) / n)
    return float(np.quantile(values, level)) / Z90


def lowpass_noise_factors(
    pairs: list[Pair], facts: list[SliceFacts], min_width_mm: float
) -> dict[str, float]:
    """Per put-back width: spread of the low-passed input noise (low − reference) in the
    body over the slice noise estimate (``facts``, one per pair), averaged over the slices."""
    estimate = float(np.mean([f.noise_hu for f in facts]))
    factors: dict[str, float] = {}
    for width in PUTBACK_WIDTHS_MM:
        if width < min_width_mm - 1e-9:
            continue
        spread = [
            float(
                np.std(
                    ndimage.gaussian_filter((p.low - p.ref).astype(np.float32), width / p.pixel_mm)[p.body]
                )
            )
            for p in pairs
        ]
        factors[str(width)] = round(float(np.mean(spread)) / max(estimate, 1e-6), 4)
    return factors


def calibrate(
    net: torch.nn.Module,
    pairs: list[Pair],
    residual_lowpass_mm: float = 0.0,
    putback_noise_hu: float = 0.0,
) -> Calibration:
    """On held-out slices with their reference: the put-back noise factors, the
    split-conformal σ scale (90 %) overall and per slice group (Mondrian), window-mean
    noise and model-error correlations, validation PSNRs."""
    all_facts = [slice_facts(p.low.astype(np.float32)) for p in pairs]
    factors = lowpass_noise_factors(pairs, all_facts, residual_lowpass_mm) if residual_lowpass_mm > 0 else {}
    outputs = []
    for p, facts in zip(pairs, all_facts, strict=True):
        low = p.low.astype(np.float32)
        mean, sigma = _predict(net, low)
        width = putback_width(facts.noise_hu, residual_lowpass_mm, putback_noise_hu, factors)
        mean = data_consistent(low[None], mean[None], width, pixel_mm=[p.pixel_mm])[0]
        outputs.append((mean, sigma, facts.group))
    ratios = [
        np.abs(p.ref - mean)[p.body] / np.maximum(sigma[p.body], 1e-3)
        for p, (mean, sigma, _g) in zip(pairs, outputs, strict=True)
    ]
    scale = conformal_sigma_scale(ratios)
    groups: dict[str, list[np.ndarray]] = {}
    for r, (_m, _s, group) in zip(ratios, outputs, strict=True):
        groups.setdefault(group, []).append(r)
    by_group = {
        g: round(conformal_sigma_scale(rs), 6)
        for g, rs in sorted(groups.items())
        if len(rs) >= MIN_GROUP_SLICES
    }

    windows = (3, 5, 7, 9)
    corr_num: dict[int, list[float]] = {w: [] for w in windows}
    corr_den: dict[int, list[float]] = {w: [] for w in windows}
    err_num: dict[int, list[float]] = {w: [] for w in windows}
    sigma_means: list[float] = []
    psnr_in, psnr_out = [], []
    for p, (mean, sigma, group) in zip(pairs, outputs, strict=True):
        ref, low = p.ref.astype(np.float32), p.low.astype(np.float32)
        noise = low - mean  # what the model removed: the input noise if the output is right
        inner = ndimage.binary_erosion(p.body, iterations=12)
        if inner.sum() < 1000:  # a small image or body: the whole body, not an empty interior
            inner = p.body
        # the score estimates the noise from the input alone (Immerkær); measure the window
        # spread relative to that estimate, so the estimator's bias on correlated CT noise
        # (it reads about half the true σ) is calibrated away
        estimate = float(np.mean(local_noise_sigma(low[None])[0][inner]))
        error = ref - mean
        sigma_means.append(float(np.mean(sigma[inner])) * by_group.get(group, scale))
        for w in windows:
            local = ndimage.uniform_filter(noise, size=w)
            corr_num[w].append(float(np.std(local[inner])))
            corr_den[w].append(estimate / w)
            err_num[w].append(float(np.std(ndimage.uniform_filter(error, size=w)[inner])))
        psnr_in.append(_psnr(low, ref, p.body))
        psnr_out.append(_psnr(mean, ref, p.body))
    correlation = {str(w): round(float(np.mean(corr_num[w]) / np.mean(corr_den[w])), 4) for w in windows}
    metrics = {
        "validation PSNR low-dose input (dB)": round(float(np.mean(psnr_in)), 2),
        "validation PSNR model (dB)": round(float(np.mean(psnr_out)), 2),
    }
    model_error = {str(w): round(float(np.mean(err_num[w]) / np.mean(sigma_means)), 4) for w in windows}
    return Calibration(
        scale,
        correlation,
        model_error,
        metrics,
        lowpass_noise_factor=factors,
        sigma_scale_by_group=by_group,
        group_slices={g: len(rs) for g, rs in sorted(groups.items())},
    )


def train(
    config: TrainConfig,
    out_dir: Path,
    *,
    pairs: list[Pair] | None = None,
    calib_pairs: list[Pair] | None = None,
    init_weights: Path | None = None,
    progress: Callable[[str, int, int, float | None], None] | None = None,
    workers: int = 2,
) -> TrainReport:
    """Train (or fine-tune from ``init_weights``), calibrate, and write weights + card to ``out_dir``."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(config.seed)

    def tell(stage: str, done: int, total: int, loss: float | None = None) -> None:
        if progress:
            progress(stage, done, total, loss)

    source = "site-provided paired series" if pairs is not None else "simulated"
    recalibrate_only = config.steps == 0
    if recalibrate_only and init_weights is None:
        raise ValueError("0 training steps only recalibrates: give the weights to start from")
    if recalibrate_only and pairs is None:
        pairs = []
    if pairs is None:
        specs = case_plan("train", config.train_cases, config.seed)
        pairs = simulate_all(specs, workers, lambda d, t: tell("simulating training cases", d, t))
    if calib_pairs is None:
        specs = case_plan("calib", config.calib_cases, config.seed)
        calib_pairs = simulate_all(specs, workers, lambda d, t: tell("simulating calibration cases", d, t))

    net = config.arch.build()
    if init_weights is not None:
        net.load_state_dict(load_weights(init_weights))
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=max(config.steps, 1), pct_start=0.05
    )
    losses: list[float] = []
    net.train()
    kernel = _gaussian_kernel()
    for step in range(config.steps):
        x, y, m = _sample_batch(pairs, rng, config.batch, config.patch, config.lesion_patch_fraction)
        xt, yt, mt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)
        mean, log_var = net(xt)
        weight = 1.0 + config.lesion_weight * mt
        mse = torch.sum(weight * (mean - yt) ** 2) / torch.sum(weight)
        nll = torch.mean(0.5 * (torch.exp(-log_var) * (mean.detach() - yt) ** 2 + log_var))
        loss = mse * 1e3 + config.nll_weight * nll
        if config.lowpass_weight:
            lowpass = torch.nn.functional.conv2d(mean - yt, kernel, padding=kernel.shape[-1] // 2)
            loss = loss + config.lowpass_weight * 1e3 * torch.mean(weight * lowpass**2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == config.steps - 1:
            tell("training", step + 1, config.steps, float(np.mean(losses[-50:])))
    net.eval()

    tell("calibrating", 0, 1)
    calibration = calibrate(net, calib_pairs, config.residual_lowpass_mm, config.putback_noise_hu)
    sigma_scale, correlation, metrics = (
        calibration.sigma_scale,
        calibration.noise_correlation,
        calibration.metrics,
    )
    tell("calibrating", 1, 1)

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "weights.safetensors"
    # safetensors: byte-identical for identical tensors (torch.save embeds a random id),
    # so the same seed gives the same weights hash.
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    training_data = (
        f"{source}: {len(pairs)} training slice pairs (reference vs low dose), 512x512 head "
        "(MNI152-based) and procedural chest phantoms, dose 0.08-0.6 of reference, projection-domain "
        "Poisson + electronic noise with filtered back-projection. No patient data."
        if source == "simulated"
        else f"{source}: {len(pairs)} slice pairs"
    )
    trained_as: dict[str, object] = {}
    if recalibrate_only and init_weights is not None:
        # the weights are the init's: keep what they were trained on, and say so
        init_dir = Path(init_weights).parent
        if (init_dir / CARD_FILE).exists():
            previous = RestorationCard.read_from(init_dir)
            training_data = previous.training_data
            trained_as = {
                "weights_trained_as": previous.training,
                "recalibrated_from_version": previous.version,
            }
    groups = ", ".join(
        f"{g} {n} slices" + (" (own scale)" if g in calibration.sigma_scale_by_group else " (pooled scale)")
        for g, n in calibration.group_slices.items()
    )
    card = RestorationCard(
        name=config.name,
        version=config.version,
        weights_file=weights.name,
        weights_sha256=sha256_of(weights),
        architecture={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config.arch).items()},
        intended_use=(
            "Noise reduction of low-dose CT slices (restoration), with per-pixel calibrated uncertainty. "
            "Research use; not for diagnosis without review."
        ),
        training_data=training_data,
        sigma_scale=round(sigma_scale, 6),
        calibration=(
            f"split conformal on {len(calib_pairs)} held-out "
            f"{'simulated ' if source == 'simulated' else ''}slices: "
            "mean +/- 1.645 sigma covers 90% of reference pixels in the body; "
            f"Mondrian per slice group ({groups}; thorax = lung in the slice)"
        ),
        metrics={k: str(v) for k, v in metrics.items()},
        training={
            "seed": config.seed,
            "steps": config.steps,
            "batch": config.batch,
            "patch": config.patch,
            "lr": config.lr,
            "nll_weight": config.nll_weight,
            "lesion_patch_fraction": config.lesion_patch_fraction,
            "lesion_weight": config.lesion_weight,
            "lowpass_weight": config.lowpass_weight,
            "residual_lowpass_mm": config.residual_lowpass_mm,
            "putback_noise_hu": config.putback_noise_hu,
            **trained_as,
            "initialised_from": None if init_weights is None else sha256_of(init_weights),
            "train_cases": len(pairs),
            "calib_cases": len(calib_pairs),
            "seconds": round(time.perf_counter() - started, 1),
            "final_loss": round(float(np.mean(losses[-200:])), 5) if losses else None,
        },
        noise_correlation=correlation,
        model_error_correlation=calibration.model_error_correlation,
        residual_lowpass_mm=config.residual_lowpass_mm,
        putback_noise_hu=config.putback_noise_hu,
        lowpass_noise_factor=calibration.lowpass_noise_factor,
        sigma_scale_by_group=calibration.sigma_scale_by_group,
    )
    card.write_to(out_dir)
    return TrainReport(card=card, seconds=time.perf_counter() - started, losses=losses)
