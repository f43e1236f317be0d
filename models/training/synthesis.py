"""Training a contrast-synthesis model on SIMULATED multi-contrast studies (CPU, deterministic).

``python -m models.training.synthesis --task "t1w+t2w->flair" --out DIR --minutes 40``

Data: :func:`models.sim.synthesis.make_study` at the evaluation harness's training seeds
(:data:`models.evaluation.synthesis_eval.TRAIN_SEEDS`; the harness's test seeds are refused):
the first ``train`` fit the network, the last ``calib`` (disjoint) fit the conformal scales.
Inputs and target in white-matter units (:mod:`models.synthesis_norm`), brain mask from the
inputs as at inference (:func:`models.synthesis_norm.brain_mask`).

Loss: L1 of the target inside the brain, lesion voxels weighted ``lesion_weight`` times
(lesion-aware: a lesion the inputs show must not be averaged away), plus the Gaussian
negative log-likelihood of the error under the predicted variance with the mean detached.
Batches: whole 2.5-D slices, left/right flips, input intensity jitter ±5 %.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from models.restoration import sha256_of
from models.synthesis import GROUPS, SynthesisArchitecture, SynthesisCard, groups_of, stack_inputs
from models.synthesis_norm import brain_mask, normalise_inputs, normalise_target, task_contrasts
from models.training.restoration import conformal_sigma_scale


@dataclass(frozen=True)
class SynthesisTrainConfig:
    task: str = "t1w+t2w->flair"
    seed: int = 20261205
    train: int = 120
    calib: int = 30
    minutes: float = 40.0
    max_steps: int = 20000
    batch: int = 8
    lr: float = 1e-3
    #: Gradient norm limit (a 2e-3 run without it diverged at step ~4500 and did not recover).
    clip: float = 1.0
    nll_weight: float = 0.1
    lesion_weight: float = 5.0
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    name: str = ""
    version: str = "1.0"


@dataclass
class Prepared:
    """One study as training needs it: stacked inputs per slice, target, masks."""

    x: np.ndarray  # (slices, channels, H, W)
    y: np.ndarray  # (slices, H, W) target in white-matter units
    brain: np.ndarray
    lesion: np.ndarray
    groups: np.ndarray


def prepare(seed: int, task: str) -> Prepared:
    from models.sim.synthesis import make_study

    study = make_study(seed)
    inputs, target = task_contrasts(task)
    brain = brain_mask(study.images["t1w"], study.spacing_mm)
    norm = normalise_inputs({c: study.images[c] for c in inputs}, brain)
    y = normalise_target(study.images[target], norm.white)
    return Prepared(
        x=stack_inputs([norm.images[c] for c in inputs]),
        y=np.where(brain, y, 0.0).astype(np.float32),
        brain=brain,
        lesion=study.lesion_labels > 0,
        groups=groups_of(norm.images["t1w"]),
    )


def _batch(
    data: Sequence[Prepared], rng: np.random.Generator, size: int, lesion_weight: float
) -> tuple[torch.Tensor, ...]:
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    ws: list[np.ndarray] = []
    while len(xs) < size:
        p = data[int(rng.integers(len(data)))]
        k = int(rng.integers(len(p.x)))
        if p.brain[k].sum() < 200:
            continue
        x, y = p.x[k] * np.float32(rng.uniform(0.95, 1.05)), p.y[k]
        w = p.brain[k].astype(np.float32) * np.where(p.lesion[k], np.float32(lesion_weight), np.float32(1.0))
        if rng.integers(2):
            x, y, w = x[:, :, ::-1], y[:, ::-1], w[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
        ws.append(np.ascontiguousarray(w))
    return (
        torch.from_numpy(np.stack(xs)),
        torch.from_numpy(np.stack(ys)[:, None]),
        torch.from_numpy(np.stack(ws)[:, None]),
    )


@torch.inference_mode()
def _predict(net: torch.nn.Module, p: Prepared) -> tuple[np.ndarray, np.ndarray]:
    means, sigmas = [], []
    for start in range(0, len(p.x), 8):
        mean, log_var = net(torch.from_numpy(p.x[start : start + 8]))
        means.append(mean[:, 0].numpy())
        sigmas.append(torch.exp(0.5 * log_var[:, 0]).numpy())
    return np.concatenate(means), np.concatenate(sigmas)


def train(config: SynthesisTrainConfig, out_dir: Path) -> SynthesisCard:
    """Train, calibrate, write ``weights.safetensors`` and ``card.json`` into ``out_dir``."""
    from models.evaluation.synthesis_eval import TEST_SEEDS, TRAIN_SEEDS

    started = time.monotonic()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    seeds = list(TRAIN_SEEDS[: config.train + config.calib])
    if set(seeds) & set(TEST_SEEDS):
        raise ValueError("training seeds overlap the test seeds")
    fit_seeds, calib_seeds = seeds[: config.train], seeds[config.train :]
    fit = [prepare(s, config.task) for s in fit_seeds]
    calib = [prepare(s, config.task) for s in calib_seeds]
    print(f"simulated {len(fit)} + {len(calib)} studies in {time.monotonic() - started:.0f} s", flush=True)
    inputs, target = task_contrasts(config.task)
    arch = SynthesisArchitecture(len(inputs), config.channels, config.strides)
    net = arch.build()
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr)
    deadline = started + 60.0 * config.minutes
    train_started = time.monotonic()
    losses: list[float] = []
    step = 0
    net.train()
    while step < config.max_steps and time.monotonic() < deadline:
        x, y, w = _batch(fit, rng, config.batch, config.lesion_weight)
        mean, log_var = net(x)
        l1 = (w * (mean - y).abs()).sum() / w.sum().clamp(min=1.0)
        nll = (w * 0.5 * (log_var + (mean.detach() - y) ** 2 / log_var.exp())).sum() / w.sum().clamp(min=1.0)
        loss = l1 + config.nll_weight * nll
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.clip)
        for group in optimiser.param_groups:  # cosine decay over the time budget
            done = min(1.0, (time.monotonic() - train_started) / max(deadline - train_started, 1.0))
            group["lr"] = config.lr * 0.5 * (1.0 + np.cos(np.pi * done))
        optimiser.step()
        losses.append(float(l1.detach()))
        step += 1
        if step % 500 == 0:
            print(
                f"step {step}: L1 {np.mean(losses[-500:]):.4f} ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    net.eval()
    ratios: dict[str, list[np.ndarray]] = {g: [] for g in GROUPS}
    errors = []
    for p in calib:
        mean, sigma = _predict(net, p)
        err = np.abs(np.maximum(mean, 0.0) - p.y)
        errors.append(err[p.brain])
        for i, g in enumerate(GROUPS):
            sel = p.brain & (p.groups == i)
            ratios[g].append(err[sel] / np.maximum(sigma[sel], 1e-4))
    scales = {g: round(conformal_sigma_scale(r), 6) for g, r in ratios.items()}
    mae = float(np.mean(np.concatenate(errors)))
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    inputs_label = "+".join(c.upper() for c in inputs)
    name = config.name or "synthesis-" + config.task.replace("+", "-").replace("->", "-to-")
    card = SynthesisCard(
        name=name,
        version=config.version,
        weights_file=weights.name,
        weights_sha256=sha256_of(weights),
        architecture={"channels": list(config.channels), "strides": list(config.strides), "num_res_units": 1},
        intended_use=(
            f"Research use: a synthetic {target.upper()} of the brain from {inputs_label} when the study "
            "lacks it, with calibrated sigma; for reading only after review. Not acquired."
        ),
        training_data=(
            f"SIMULATED only: {len(fit)} models.sim.synthesis studies (seeds {fit_seeds[0]}-"
            f"{fit_seeds[-1]}), conformal scales on {len(calib)} more ({calib_seeds[0]}-{calib_seeds[-1]})"
        ),
        calibration=(
            f"split conformal per tissue group on {len(calib)} simulated studies: "
            "mean +/- 1.645 sigma covers 90%"
        ),
        metrics={
            "calibration-set MAE in brain (white-matter units)": f"{mae:.4f}",
        },
        training={
            **{k: v for k, v in asdict(config).items() if k not in ("channels", "strides")},
            "steps": step,
            "seconds": round(time.monotonic() - started),
        },
        input_domain={"modality": "MR", "body_parts": ["HEAD", "BRAIN"], "inputs": list(inputs)},
        task=config.task,
        sigma_scales=scales,
    )
    card.write_to(out_dir)
    (out_dir / "losses.json").write_text(json.dumps(losses[::50]))
    return card


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="t1w+t2w->flair")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--calib", type=int, default=30)
    args = parser.parse_args(argv)
    config = SynthesisTrainConfig(task=args.task, minutes=args.minutes, train=args.train, calib=args.calib)
    card = train(config, args.out)
    print(
        json.dumps({"name": card.name, "sigma_scales": card.sigma_scales, "metrics": card.metrics}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
