"""Training the MR → synthetic CT model on simulated pairs (deterministic, CPU).

Data: registered T1-weighted MR / CT head volumes from :func:`models.sim.mrct.make_pair`
(MNI152 anatomy with per-case deformation, skull and scalp thickness, sinuses, bias field
and Rician noise). Held out by construction: training, calibration and test cases use
disjoint seed ranges, and the test set's stack levels (bands 0.15–0.3 and 0.7–0.85 of the
head) never appear in training or calibration.

Loss: L1 of the HU (÷1000) against the reference CT — the mean absolute error is what a
dose calculation feels — plus the Gaussian negative log-likelihood of the error under the
predicted variance with the mean detached. After training, a split-conformal scale is
fitted on the calibration cases so that ``HU ± 1.645 σ`` covers 90 % of the reference
voxels in the head, and the MR-support table of the hallucination map is fitted on the
training pairs.
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

from models.restoration import HU_SCALE, load_weights, sha256_of
from models.sct import (
    SctArchitecture,
    SctCard,
    SupportTable,
    depth_mm,
    head_mask,
    normalise_mr,
    stack_context,
)
from models.training.parallel import simulate_in_processes
from models.training.restoration import conformal_sigma_scale

Role = Literal["train", "calib", "test"]
HELD_OUT_LEVEL_BANDS = ((0.15, 0.3), (0.7, 0.85))
_SEED_BASE = {"train": 0, "calib": 1_000_000, "test": 2_000_000}


@dataclass(frozen=True)
class SctCaseSpec:
    seed: int
    level: float
    slices: int = 12
    size: int = 256


@dataclass
class SctPair:
    """One simulated case: normalised T1w MR, reference CT (int16 HU), masks and labels."""

    mr: np.ndarray  # normalised, float32 (slices, H, W)
    ct: np.ndarray  # int16 HU
    body: np.ndarray  # head mask as the model computes it from the MR
    labels: np.ndarray  # uint8 HeadTissue (for per-tissue evaluation)
    depth: np.ndarray  # mm below the skin
    spacing: tuple[float, float, float]
    raw_mr: np.ndarray | None = None  # un-normalised T1w (evaluation keeps it)


def _held_out(level: float) -> bool:
    return any(lo <= level < hi for lo, hi in HELD_OUT_LEVEL_BANDS)


def case_plan(role: Role, n: int, seed: int, *, slices: int = 12, size: int = 256) -> list[SctCaseSpec]:
    """Which cases to simulate for a role: disjoint seeds per role, held-out test levels."""
    rng = np.random.default_rng([seed, _SEED_BASE[role], 7])
    specs: list[SctCaseSpec] = []
    k = 0
    while len(specs) < n:
        level = float(rng.uniform(0.0, 1.0))
        if (role == "test") != _held_out(level):
            continue
        case_seed = int(np.random.SeedSequence([seed, _SEED_BASE[role], k]).generate_state(1)[0])
        specs.append(SctCaseSpec(case_seed, level, slices, size))
        k += 1
    return specs


def simulate(spec: SctCaseSpec, keep_raw: bool = False) -> SctPair:
    from models.sim.mrct import make_pair

    pair = make_pair(spec.seed, slices=spec.slices, size=spec.size, level=spec.level)
    body = head_mask(pair.t1w)
    return SctPair(
        mr=normalise_mr(pair.t1w, body),
        ct=np.round(np.clip(pair.ct_hu, -1024, 3071)).astype(np.int16),
        body=body,
        labels=pair.labels.astype(np.uint8),
        depth=depth_mm(body, pair.spacing_mm),
        spacing=pair.spacing_mm,
        raw_mr=pair.t1w.astype(np.float32) if keep_raw else None,
    )


def _simulate_raw(spec: SctCaseSpec) -> SctPair:
    return simulate(spec, keep_raw=True)


def simulate_all(
    specs: Sequence[SctCaseSpec],
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    keep_raw: bool = False,
) -> list[SctPair]:
    """Simulate cases in parallel processes (each case has its own seed: order-independent)."""
    return simulate_in_processes(
        _simulate_raw if keep_raw else simulate, specs, workers, progress, chunksize=2
    )


@dataclass(frozen=True)
class SctTrainConfig:
    seed: int = 20261126
    train_cases: int = 72
    calib_cases: int = 12
    slices: int = 12
    steps: int = 16000
    batch: int = 12
    patch: int = 128
    lr: float = 2e-3
    nll_weight: float = 0.1
    arch: SctArchitecture = field(default_factory=SctArchitecture)
    name: str = "sct-head"
    version: str = "1.0"


@dataclass
class SctTrainReport:
    card: SctCard
    seconds: float
    losses: list[float]


def _sample_batch(
    pairs: list[SctPair], rng: np.random.Generator, batch: int, patch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random head patches of (neighbour, slice, neighbour) MR → CT, flipped left/right,
    MR intensity jittered by ±10 % (normalisation is never exact)."""
    xs, ys, ms = [], [], []
    for _ in range(batch):
        p = pairs[int(rng.integers(len(pairs)))]
        k = int(rng.integers(len(p.mr)))
        s, h, w = p.mr.shape
        for _attempt in range(10):
            r, c = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
            if p.body[k, r + patch // 2, c + patch // 2]:
                break
        idx = np.clip(np.arange(k - 1, k + 2), 0, s - 1)
        x = p.mr[idx, r : r + patch, c : c + patch] * np.float32(rng.uniform(0.9, 1.1))
        y = p.ct[k, r : r + patch, c : c + patch].astype(np.float32) / HU_SCALE
        m = p.body[k, r : r + patch, c : c + patch].astype(np.float32)
        if rng.integers(2):
            x, y, m = x[:, :, ::-1], y[:, ::-1], m[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
        ms.append(np.ascontiguousarray(m))
    return np.stack(xs), np.stack(ys)[:, None], np.stack(ms)[:, None]


def predict_volume(
    net: torch.nn.Module, mr_norm: np.ndarray, batch: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """HU and uncalibrated σ (HU) of a normalised MR volume."""
    x = stack_context(mr_norm)
    means, sigmas = [], []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            mean, log_var = net(torch.from_numpy(x[start : start + batch]))
            means.append(mean[:, 0].numpy())
            sigmas.append(torch.exp(0.5 * log_var[:, 0]).numpy())
    return np.concatenate(means) * HU_SCALE, np.concatenate(sigmas) * HU_SCALE


@dataclass(frozen=True)
class SctCalibration:
    sigma_scale: float
    metrics: dict[str, float]


def calibrate(net: torch.nn.Module, pairs: list[SctPair]) -> SctCalibration:
    """Split-conformal σ scale (90 %) and validation MAE on held-out cases."""
    from models.sim.mrct import HeadTissue

    ratios, errors, bone_errors = [], [], []
    for p in pairs:
        mean, sigma = predict_volume(net, p.mr)
        mean = np.where(p.body, mean, -1000.0)
        err = np.abs(p.ct.astype(np.float32) - mean)
        ratios.append(err[p.body] / np.maximum(sigma[p.body], 1e-3))
        errors.append(err[p.body])
        bone = np.isin(p.labels, [HeadTissue.CORTICAL_BONE, HeadTissue.CANCELLOUS_BONE]) & p.body
        bone_errors.append(err[bone])
    metrics = {
        "validation MAE in head (HU)": round(float(np.mean(np.concatenate(errors))), 1),
        "validation MAE in bone (HU)": round(float(np.mean(np.concatenate(bone_errors))), 1),
    }
    return SctCalibration(conformal_sigma_scale(ratios), metrics)


def fit_support_table(pairs: list[SctPair], rng: np.random.Generator, per_case: int = 40_000) -> SupportTable:
    """The MR-support table of the hallucination map, from training voxels inside the head."""
    from scipy import ndimage

    iv, dv, hv = [], [], []
    for p in pairs:
        smooth = ndimage.gaussian_filter(p.mr, (0, 0.7, 0.7))
        idx = np.flatnonzero(p.body)
        pick = rng.choice(idx, size=min(per_case, idx.size), replace=False)
        iv.append(smooth.ravel()[pick])
        dv.append(p.depth.ravel()[pick])
        hv.append(p.ct.ravel()[pick].astype(np.float32))
    return SupportTable.fit(np.concatenate(iv), np.concatenate(dv), np.concatenate(hv))


def train(
    config: SctTrainConfig,
    out_dir: Path,
    *,
    init_weights: Path | None = None,
    progress: Callable[[str, int, int, float | None], None] | None = None,
    workers: int = 2,
) -> SctTrainReport:
    """Simulate, train (or fine-tune from ``init_weights``), calibrate, write weights + card."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(config.seed)

    def tell(stage: str, done: int, total: int, loss: float | None = None) -> None:
        if progress:
            progress(stage, done, total, loss)

    specs = case_plan("train", config.train_cases, config.seed, slices=config.slices)
    pairs = simulate_all(specs, workers, lambda d, t: tell("simulating training cases", d, t))
    specs = case_plan("calib", config.calib_cases, config.seed, slices=config.slices)
    calib = simulate_all(specs, workers, lambda d, t: tell("simulating calibration cases", d, t))

    net = config.arch.build()
    if init_weights is not None:
        net.load_state_dict(load_weights(init_weights))
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.steps, pct_start=min(0.3, max(0.05, 4 / config.steps))
    )
    losses: list[float] = []
    net.train()
    for step in range(config.steps):
        x, y, m = _sample_batch(pairs, rng, config.batch, config.patch)
        xt, yt, mt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)
        mean, log_var = net(xt)
        weight = 0.1 + mt  # outside the head is always air: mostly learn the inside
        l1 = torch.sum(weight * torch.abs(mean - yt)) / torch.sum(weight)
        nll = torch.sum(
            weight * 0.5 * (torch.exp(-log_var) * (mean.detach() - yt) ** 2 + log_var)
        ) / torch.sum(weight)
        loss = l1 * 10.0 + config.nll_weight * nll
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == config.steps - 1:
            tell("training", step + 1, config.steps, float(np.mean(losses[-50:])))
    net.eval()

    tell("calibrating", 0, 1)
    calibration = calibrate(net, calib)
    table = fit_support_table(pairs, rng)
    tell("calibrating", 1, 1)

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    s0 = pairs[0].spacing
    card = SctCard(
        name=config.name,
        version=config.version,
        weights_file=weights.name,
        weights_sha256=sha256_of(weights),
        architecture={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config.arch).items()},
        intended_use=(
            "Synthetic CT (HU) of the head from a T1-weighted MR, for radiotherapy dose calculation "
            "after review by a physicist. Research use; not for diagnosis."
        ),
        training_data=(
            f"simulated: {len(pairs)} registered T1w MR / CT head volumes of {config.slices} slices "
            f"({s0[1]:.2f} mm pixels, {s0[0]:.1f} mm slices) from the MNI152 template with per-case "
            "deformation, skull/scalp thickness, sinuses, bias field and Rician noise. No patient data."
        ),
        input_sequence="t1w",
        sigma_scale=round(calibration.sigma_scale, 6),
        calibration=(
            f"split conformal on {len(calib)} held-out simulated volumes: HU +/- 1.645 sigma covers 90% "
            "of reference voxels in the head"
        ),
        support_table=asdict(table),
        metrics={k: str(v) for k, v in calibration.metrics.items()},
        training={
            "seed": config.seed,
            "steps": config.steps,
            "batch": config.batch,
            "patch": config.patch,
            "lr": config.lr,
            "nll_weight": config.nll_weight,
            "train_cases": len(pairs),
            "calib_cases": len(calib),
            "slices_per_case": config.slices,
            "initialised_from": None if init_weights is None else sha256_of(init_weights),
            "seconds": round(time.perf_counter() - started, 1),
            "final_loss": round(float(np.mean(losses[-200:])), 5) if losses else None,
        },
    )
    card.write_to(out_dir)
    return SctTrainReport(card=card, seconds=time.perf_counter() - started, losses=losses)
