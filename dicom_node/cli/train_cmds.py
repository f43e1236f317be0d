"""``dicom-node train restoration``: train (or fine-tune) the restoration model on CPU."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dicom_node.cli.common import app, console, fail, output_dir

if TYPE_CHECKING:  # torch and friends load only when training runs
    from models.training.restoration import Pair
    from pipelines.volume import Volume

train_app = typer.Typer(help="Train models (deterministic, seeded; CPU).", no_args_is_help=True)
app.add_typer(train_app, name="train")


def _paired_series(low_dir: Path, ref_dir: Path) -> list[Pair]:
    """A site's own paired series (same geometry, one low-dose and one reference) → pairs."""
    import numpy as np
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from models.training.restoration import Pair
    from pipelines.volume import SeriesError, load_series

    def volume(directory: Path) -> Volume:
        files = sorted(f for f in directory.rglob("*") if f.is_file())
        if not files:
            raise fail(f"{directory}: no files")
        datasets = []
        for f in files:
            try:
                datasets.append(dcmread(f))
            except InvalidDicomError:
                raise fail(f"{f}: not a DICOM Part 10 file") from None
            except OSError as exc:
                raise fail(f"{f}: cannot be read ({exc.strerror or exc})") from None
        try:
            return load_series(datasets)
        except SeriesError as exc:
            raise fail(f"{directory}: {exc}") from None

    low, ref = volume(low_dir), volume(ref_dir)
    if low.array.shape != ref.array.shape or not np.allclose(
        [s.position for s in low.slices], [s.position for s in ref.slices], atol=0.01
    ):
        raise fail("the two series do not share their geometry slice for slice (positions differ)")
    return [
        Pair(
            low=np.round(lo).astype(np.int16),
            ref=np.round(re).astype(np.int16),
            body=re > -500,
            dose=float("nan"),
            anatomy="site",
            pixel_mm=float(np.mean(low.spacing[1:])),
        )
        for lo, re in zip(low.array, ref.array, strict=True)
    ]


@contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int, float | None], None]]:
    """A rich progress bar per training stage; yields the trainers' ``progress`` callback."""
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int, loss: float | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, loss="")
            bar.update(tasks[stage], completed=done, loss=f"loss {loss:.4f}" if loss is not None else "")

        yield progress


def _out_dir(out: Path | None, name: str, version: str, overwrite: bool) -> Path:
    """Where a training run writes: ``--out``, else the zoo's ``<name>/<version>``. A model
    directory that already holds a card is never overwritten without ``--overwrite`` (the
    shipped models, or a site's own earlier run, must not vanish by a missed option)."""
    from models.zoo import ZOO

    target = out if out is not None else ZOO / name / version
    card = target / "card.json"
    if card.exists() and not overwrite:
        try:
            existing = json.loads(card.read_text()).get("version", "?")
        except (OSError, ValueError):
            existing = "?"
        raise fail(
            f"{target} already holds a model ({name} {existing}); "
            "choose a new --version or --out, or pass --overwrite to replace it"
        )
    return target


def _trained(out: Path, card: Any, seconds: float) -> None:
    console.print(f"wrote {out / card.weights_file} (sha256 {card.weights_sha256}) and {out / 'card.json'}")
    console.print(
        f"trained in {seconds / 60:.1f} min; σ scale {card.sigma_scale}; {card.metrics}", markup=False
    )


@train_app.command("restoration")
def train_restoration(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for the weights and card.json (default: the zoo's <version>)."),
    ] = None,
    steps: Annotated[
        int,
        typer.Option(
            min=0, help="Optimiser steps (sets the run time; ~0.06 s each). 0 with --init: recalibrate only."
        ),
    ] = 12_000,
    train_cases: Annotated[int, typer.Option(min=2, help="Simulated training slices.")] = 360,
    calib_cases: Annotated[
        int, typer.Option(min=2, help="Held-out slices for the conformal calibration.")
    ] = 40,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same weights.")] = 20261126,
    version: Annotated[str, typer.Option(help="Model version written into the card.")] = "1.0",
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in the output directory.")] = False,
    paired_low: Annotated[
        Path | None, typer.Option(help="Site data: a low-dose series directory (with --paired-reference).")
    ] = None,
    paired_reference: Annotated[
        Path | None, typer.Option(help="Site data: the matching reference series.")
    ] = None,
    init: Annotated[
        Path | None, typer.Option(help="Fine-tune from these weights (e.g. the shipped model).")
    ] = None,
    lesion_patch_fraction: Annotated[
        float, typer.Option(min=0, max=1, help="Share of patches centred near a simulated faint lesion.")
    ] = 0.0,
    lesion_weight: Annotated[
        float, typer.Option(min=0, help="Extra loss weight of lesion pixels (0: plain MSE).")
    ] = 0.0,
    lowpass_weight: Annotated[
        float, typer.Option(min=0, help="Weight of the low-pass (σ 1.5 px) error term.")
    ] = 0.0,
    residual_lowpass_mm: Annotated[
        float,
        typer.Option(min=0, help="Put back the low-pass (σ, mm) of what the network removed (0: off)."),
    ] = 0.0,
    putback_noise_hu: Annotated[
        float,
        typer.Option(
            min=0,
            help=(
                "Noise-adaptive put-back: widen the low-pass per slice until its noise "
                "is at most this (HU; 0: fixed)."
            ),
        ),
    ] = 0.0,
) -> None:
    """Train the low-dose CT restoration model (simulated data, or a site's paired series)."""
    import torch

    from models.training.restoration import TrainConfig, train

    torch.set_num_threads(2)
    out = _out_dir(out, "ldct-restoration", version, overwrite)
    pairs = calib = None
    if init is not None and init.is_dir():
        init = init / "weights.safetensors"
    if (paired_low is None) != (paired_reference is None):
        raise fail("give both --paired-low and --paired-reference, or neither")
    if steps == 0 and init is None:
        raise fail("--steps 0 recalibrates existing weights: give them with --init")
    if paired_low is not None and paired_reference is not None:
        site = _paired_series(paired_low, paired_reference)
        if len(site) < 4 and steps > 0:
            raise fail(f"only {len(site)} paired slices: need at least 4 (3/4 train, 1/4 calibration)")
        if steps == 0:  # recalibrating only: every pair calibrates
            pairs, calib = [], site
        else:
            cut = max(1, len(site) // 4)
            pairs, calib = site[cut:], site[:cut]
        console.print(f"site data: {len(pairs)} training and {len(calib)} calibration slice pairs")
    config = TrainConfig(
        seed=seed,
        steps=steps,
        train_cases=train_cases,
        calib_cases=calib_cases,
        version=version,
        lesion_patch_fraction=lesion_patch_fraction,
        lesion_weight=lesion_weight,
        lowpass_weight=lowpass_weight,
        residual_lowpass_mm=residual_lowpass_mm,
        putback_noise_hu=putback_noise_hu,
    )
    output_dir(out)  # the inputs are good: now the folder, before the hours of training
    with _progress_bar() as progress:
        report = train(config, out, pairs=pairs, calib_pairs=calib, init_weights=init, progress=progress)
    _trained(out, report.card, report.seconds)


@train_app.command("sct")
def train_sct(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for the weights and card.json (default: the zoo's <version>)."),
    ] = None,
    steps: Annotated[
        int, typer.Option(min=1, help="Optimiser steps (sets the run time; ~0.08 s each).")
    ] = 16000,
    train_cases: Annotated[int, typer.Option(min=2, help="Simulated training MR/CT volumes.")] = 72,
    calib_cases: Annotated[
        int, typer.Option(min=2, help="Held-out volumes for the conformal calibration.")
    ] = 12,
    slices: Annotated[int, typer.Option(min=3, help="Slices per simulated volume.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same weights.")] = 20261126,
    version: Annotated[str, typer.Option(help="Model version written into the card.")] = "1.0",
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in the output directory.")] = False,
    init: Annotated[
        Path | None, typer.Option(help="Fine-tune from these weights (e.g. the shipped model).")
    ] = None,
) -> None:
    """Train the MR → synthetic CT model (simulated head MR/CT pairs, CPU)."""
    from models.training.sct import SctTrainConfig, train

    out = _out_dir(out, "sct-head", version, overwrite)
    if init is not None and init.is_dir():
        init = init / "weights.safetensors"
    config = SctTrainConfig(
        seed=seed,
        steps=steps,
        train_cases=train_cases,
        calib_cases=calib_cases,
        slices=slices,
        version=version,
    )
    output_dir(out)
    with _progress_bar() as progress:
        report = train(config, out, init_weights=init, progress=progress)
    _trained(out, report.card, report.seconds)
