"""Training a contrast-synthesis model on SIMULATED multi-contrast studies (CPU, deterministic).

``python -m models.training.synthesis --task "t1w+t2w->flair" --out DIR --minutes 40``

``python -m models.training.synthesis --recalibrate models/zoo/synthesis-t1w-t2w-to-flair/1.0
--out DIR --version 1.1`` keeps a model's weights (copied, same sha256) and recomputes only its
conformal scales (:func:`recalibrate`), under the current :class:`SynthesisTrainConfig`
σ rule.

Data: :func:`models.sim.synthesis.make_study` at the evaluation harness's training seeds
(:data:`models.evaluation.synthesis_eval.TRAIN_SEEDS`; the harness's test seeds are refused):
the first ``train`` fit the network, the last ``calib`` (disjoint) fit the conformal scales.
Inputs and target in white-matter units (:mod:`models.synthesis_norm`), brain mask from the
inputs as at inference (:func:`models.synthesis_norm.brain_mask`).

Loss: L1 of the target inside the brain, lesion voxels weighted ``lesion_weight`` times
(lesion-aware: a lesion the inputs show must not be averaged away), plus the Gaussian
negative log-likelihood of the error under the predicted variance with the mean detached.
Batches: whole 2.5-D slices, left/right flips, input intensity jitter ±5 %.

Calibration (:func:`calibrate`): on the calibration studies, with the brain mask from the
inputs as at run time, the split-conformal 90 % scale of ``|reference − mean| / σ`` per group
of :func:`models.synthesis.sigma_groups` (σ first widened where the T2w is hyperintense).
The σ rule's values (:data:`SIGMA_RULE`: T2w threshold 1.2 white-matter units, widening
weight 3.0, brain edge 2 voxels) were chosen on the 50 free training-role seeds 20150-20199
with the scales fitted on 20120-20149: the brain coverage closest to 0.90 with the highest
lesion coverage among thresholds 1.2-1.5 and weights 0.3-5 (the labels of those studies were
used to score the choice, never to assign a group).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from models.restoration import load_network, sha256_of
from models.synthesis import (
    SigmaGroups,
    SigmaRule,
    SynthesisArchitecture,
    SynthesisCard,
    sigma_groups,
    stack_inputs,
    widened_sigma,
)
from models.synthesis_norm import brain_mask, normalise_inputs, normalise_target, task_contrasts
from models.training.restoration import conformal_sigma_scale

#: The σ rule of new cards (chosen on free training-role seeds; see the module docstring).
SIGMA_RULE = SigmaRule(t2w_threshold=1.2, t2w_excess_weight=3.0, edge_px=2)
#: The series a synthesis model may be given (``pipelines.domain.InputDomain``); the input
#: contrasts are the card's ``task``. The T1w series is the reference every task has.
INPUT_DOMAIN: dict[str, object] = {
    "modality": "MR",
    "sop_classes": ["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"],
    "image_type": ["ORIGINAL", "PRIMARY"],
    "orientation": "axial",
    "pixel_spacing_mm": [0.9, 2.5],  # evaluated at 1.875 and 0.94 mm; at 0.47 mm worse than regression
    "slice_thickness_mm": [0.8, 6.0],
    "image_size_px": [64, 1024],
    "body_parts": ["HEAD", "BRAIN"],
    "sequence": "t1w",
    "image_check": "mr-head",
    # the simulator's two field strengths (``models.sim.synthesis.FIELD_STRENGTHS_T``)
    "field_strengths_t": [1.5, 3.0],
    # the simulator's T1w and T2w are spin echoes
    "scanning_sequences": ["SE"],
}


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
    sigma_rule: SigmaRule = SIGMA_RULE


@dataclass
class Prepared:
    """One study as training needs it: stacked inputs per slice, target, masks."""

    x: np.ndarray  # (slices, channels, H, W)
    y: np.ndarray  # (slices, H, W) target in white-matter units
    brain: np.ndarray
    lesion: np.ndarray
    groups: SigmaGroups


def prepare(
    seed: int, task: str, rule: SigmaRule = SIGMA_RULE, *, size: int | None = None, slices: int | None = None
) -> Prepared:
    """One simulated study as training and calibration see it (``size``/``slices``: the
    simulator's defaults unless given)."""
    from models.sim.synthesis import DEFAULT_SIZE, DEFAULT_SLICES, make_study

    study = make_study(seed, size=size or DEFAULT_SIZE, slices=slices or DEFAULT_SLICES)
    inputs, target = task_contrasts(task)
    brain = brain_mask(study.images["t1w"], study.spacing_mm)
    norm = normalise_inputs({c: study.images[c] for c in inputs}, brain)
    y = normalise_target(study.images[target], norm.white)
    return Prepared(
        x=stack_inputs([norm.images[c] for c in inputs]),
        y=np.where(brain, y, 0.0).astype(np.float32),
        brain=brain,
        lesion=study.lesion_labels > 0,
        groups=sigma_groups(norm.images, brain, rule),
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


def calibrate(
    net: torch.nn.Module, calib: Sequence[Prepared], rule: SigmaRule
) -> tuple[dict[str, float], float]:
    """Split-conformal 90 % σ scale per group (:func:`models.synthesis.sigma_groups`) on the
    calibration studies, and their MAE in the brain (white-matter units).

    A group that no calibration voxel falls in keeps the scale 1.0.
    """
    ratios: dict[str, list[np.ndarray]] = {}
    errors = []
    for p in calib:
        mean, sigma = _predict(net, p)
        err = np.abs(np.maximum(mean, 0.0) - p.y)
        errors.append(err[p.brain])
        sigma = widened_sigma(sigma, p.groups, rule)
        for i, g in enumerate(p.groups.names):
            sel = p.brain & (p.groups.index == i)
            ratios.setdefault(g, []).append(err[sel] / np.maximum(sigma[sel], 1e-4))
    scales = {
        g: round(conformal_sigma_scale(r), 6) if sum(len(x) for x in r) else 1.0 for g, r in ratios.items()
    }
    return scales, float(np.mean(np.concatenate(errors)))


def calibration_text(rule: SigmaRule, studies: int, task: str) -> str:
    """The card's ``calibration``: the groups and how their scales were fitted."""
    inputs, _ = task_contrasts(task)
    groups = "csf-like (< 0.65), grey-like (0.65-0.92), white-like (>= 0.92) by normalised T1w"
    if rule.t2w_threshold is not None and "t2w" in inputs:
        groups += (
            f"; t2w-hyperintense: non-CSF-like brain with normalised T2w > {rule.t2w_threshold:g}, "
            f"sigma first widened by {rule.t2w_excess_weight:g} x (T2w - {rule.t2w_threshold:g})"
        )
    if rule.edge_px:
        groups += f"; brain-edge: within {rule.edge_px} in-plane voxels of the brain mask's border"
    return (
        f"split conformal per group on {studies} simulated studies (brain mask from the T1w as at "
        f"run time): mean +/- 1.645 sigma covers 90% of each group. Groups from the inputs only: {groups}"
    )


def intended_use(task: str) -> str:
    """The card's ``intended_use`` for a task."""
    inputs, target = task_contrasts(task)
    return (
        f"Research use only: a synthetic {target.upper()} of the brain from "
        f"{'+'.join(c.upper() for c in inputs)} when the study lacks it, with calibrated sigma, "
        "for the synthesis pipeline. Not acquired: every image is marked synthetic and must be "
        "reviewed against the acquired series before it is read; never a substitute for "
        "acquiring the contrast. Below the acceptance of issue 18 for lesion detection (see "
        "docs/synthesis.md)."
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
        # cosine decay over the budget, time or steps, whichever runs out first (1.0 and 1.1
        # stopped at max_steps with the rate still at a fifth of its start)
        elapsed = (time.monotonic() - train_started) / max(deadline - train_started, 1.0)
        done = min(1.0, max(elapsed, step / config.max_steps))
        for group in optimiser.param_groups:
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
    scales, mae = calibrate(net, calib, config.sigma_rule)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    name = config.name or "synthesis-" + config.task.replace("+", "-").replace("->", "-to-")
    card = SynthesisCard(
        name=name,
        version=config.version,
        weights_file=weights.name,
        weights_sha256=sha256_of(weights),
        architecture={"channels": list(config.channels), "strides": list(config.strides), "num_res_units": 1},
        intended_use=intended_use(config.task),
        training_data=(
            f"SIMULATED only: {len(fit)} models.sim.synthesis studies (seeds {fit_seeds[0]}-"
            f"{fit_seeds[-1]}), conformal scales on {len(calib)} more ({calib_seeds[0]}-{calib_seeds[-1]})"
        ),
        calibration=calibration_text(config.sigma_rule, len(calib), config.task),
        metrics={
            "calibration-set MAE in brain (white-matter units)": f"{mae:.4f}",
        },
        training={
            **{k: v for k, v in asdict(config).items() if k not in ("channels", "strides", "sigma_rule")},
            "steps": step,
            "seconds": round(time.monotonic() - started),
        },
        input_domain=dict(INPUT_DOMAIN),
        task=config.task,
        sigma_scales=scales,
        sigma_rule=config.sigma_rule.to_card(),
    )
    card.write_to(out_dir)
    (out_dir / "losses.json").write_text(json.dumps(losses[::50]))
    return card


def recalibrate(
    source: Path,
    out_dir: Path,
    version: str,
    *,
    rule: SigmaRule = SIGMA_RULE,
    calib: int | None = None,
    size: int | None = None,
    slices: int | None = None,
) -> SynthesisCard:
    """A new version of the model in ``source`` with the same weights and new conformal scales.

    The weights are checked against the card's sha256 and copied unchanged; the calibration
    studies are the training-role seeds right after the ones it was trained on (as
    :func:`train` chose them), ``calib`` of them (default: as many as it was calibrated on).
    ``size``/``slices`` shrink the simulated grid (tests). Writes ``card.json`` and the weights
    into ``out_dir`` (which must not be ``source``).
    """
    from models.evaluation.synthesis_eval import TEST_SEEDS, TRAIN_SEEDS

    source, out_dir = Path(source), Path(out_dir)
    if out_dir.resolve() == source.resolve():
        raise ValueError(f"--out {out_dir} is the model being recalibrated: give a new version directory")
    card = SynthesisCard.read_from(source)
    weights = card.verified_weights(source)
    trained_on = int(card.training.get("train", 120))
    count = calib if calib is not None else int(card.training.get("calib", 30))
    seeds = list(TRAIN_SEEDS[trained_on : trained_on + count])
    if len(seeds) < count or set(seeds) & set(TEST_SEEDS):
        raise ValueError(f"no {count} calibration seeds after the {trained_on} training seeds")
    inputs, _ = task_contrasts(card.task)
    a = card.architecture
    arch = SynthesisArchitecture(
        len(inputs), tuple(a["channels"]), tuple(a["strides"]), int(a.get("num_res_units", 1))
    )
    net = load_network(arch.build(), weights)
    studies = [prepare(s, card.task, rule, size=size, slices=slices) for s in seeds]
    scales, mae = calibrate(net, studies, rule)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = out_dir / card.weights_file
    shutil.copyfile(weights, copied)
    if sha256_of(copied) != card.weights_sha256:
        raise RuntimeError(f"{copied}: the copy's sha256 differs from the card's")
    fit = card.training_data.split(", conformal scales")[0]
    new = replace(
        card,
        version=version,
        intended_use=intended_use(card.task),
        training_data=f"{fit}, conformal scales on {len(seeds)} more ({seeds[0]}-{seeds[-1]})",
        calibration=calibration_text(rule, len(seeds), card.task),
        metrics={"calibration-set MAE in brain (white-matter units)": f"{mae:.4f}"},
        training={**card.training, "recalibrated_from": card.version},
        input_domain=dict(INPUT_DOMAIN),
        sigma_scales=scales,
        sigma_rule=rule.to_card(),
    )
    new.write_to(out_dir)
    return new


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="t1w+t2w->flair")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--calib", type=int, default=30)
    parser.add_argument(
        "--max-steps",
        type=int,
        default=SynthesisTrainConfig.max_steps,
        help="stop after this many steps even with time left (the learning rate decays over --minutes)",
    )
    parser.add_argument(
        "--recalibrate",
        type=Path,
        metavar="MODEL_DIR",
        help="keep this model's weights; recompute its scales",
    )
    parser.add_argument("--version", default="1.0", help="version of the card written")
    args = parser.parse_args(argv)
    if args.recalibrate is not None:
        try:
            card = recalibrate(args.recalibrate, args.out, args.version, calib=args.calib)
        except (ValueError, FileNotFoundError) as exc:
            parser.error(str(exc))
    else:
        config = SynthesisTrainConfig(
            task=args.task,
            minutes=args.minutes,
            train=args.train,
            calib=args.calib,
            version=args.version,
            max_steps=args.max_steps,
        )
        card = train(config, args.out)
    print(
        json.dumps({"name": card.name, "sigma_scales": card.sigma_scales, "metrics": card.metrics}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
