"""Contrast synthesis (issue 18): the missing MR contrast and its σ in one forward pass.

A MONAI 2-D U-Net sees, for each input contrast (T1w, and T2w when the task has it), the
slice and its neighbours (2.5-D), every contrast divided by its white-matter median
(:mod:`models.synthesis_norm`), and predicts per pixel the target contrast in the same
white-matter units and the log-variance of its error (heteroscedastic head). σ is
calibrated by split-conformal scales per tissue group (groups by the normalised T1w, which
every task has: dark — CSF-like, mid — grey-matter-like, bright — white-matter-like), so
``mean ± 1.645 σ`` covers 90 % of the reference voxels of each group on the calibration
studies. Outside the brain the prediction is 0 with σ 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import UNet
from torch import nn

from models.padding import pad_planes, size_multiple
from models.restoration import load_network
from models.synthesis_norm import normalise_inputs, task_contrasts
from models.zoo import StoredCard, version_dir

CONTEXT = 1  # neighbouring slices on each side
#: Normalised-T1w edges of the calibration groups (white-matter units).
GROUP_EDGES = (0.65, 0.92)
GROUPS = ("csf-like", "grey-like", "white-like")


@dataclass(frozen=True)
class SynthesisArchitecture:
    inputs: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1

    def build(self) -> nn.Module:
        return SynthesisNet(self)


class SynthesisNet(nn.Module):
    """U-Net on (contrasts × (2·CONTEXT+1)) slices → (target, log-variance)."""

    def __init__(self, arch: SynthesisArchitecture) -> None:
        super().__init__()
        self.unet = UNet(
            spatial_dims=2,
            in_channels=arch.inputs * (2 * CONTEXT + 1),
            out_channels=2,
            channels=arch.channels,
            strides=arch.strides,
            num_res_units=arch.num_res_units,
            norm=None,  # type: ignore[arg-type]  # MONAI accepts None: no normalisation layer
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.unet(x)
        return out[:, :1], out[:, 1:].clamp(-16.0, 6.0)


def stack_inputs(images: Sequence[np.ndarray]) -> np.ndarray:
    """(slices, contrasts·(2·CONTEXT+1), H, W) float32: each slice with its neighbours (edge
    slices repeat), contrast by contrast."""
    planes = []
    for image in images:
        padded = np.pad(np.asarray(image, np.float32), ((CONTEXT, CONTEXT), (0, 0), (0, 0)), mode="edge")
        n = image.shape[0]
        planes.append(np.stack([padded[k : k + n] for k in range(2 * CONTEXT + 1)], axis=1))
    return np.ascontiguousarray(np.concatenate(planes, axis=1))


def groups_of(t1w_norm: np.ndarray) -> np.ndarray:
    """Calibration group index (0, 1, 2) per voxel from the normalised T1w."""
    return np.digitize(t1w_norm, GROUP_EDGES).astype(np.int8)


@dataclass(kw_only=True)
class SynthesisCard(StoredCard):
    """``card.json`` of a synthesis model."""

    JSON_INDENT = 1

    #: "t1w+t2w->flair", "t1w->flair" or "t1w->t2w".
    task: str
    #: Conformal σ multiplier per calibration group (:data:`GROUPS`).
    sigma_scales: dict[str, float]


@dataclass(frozen=True)
class SynthesisOutput:
    """Target (white-matter units), calibrated σ, and the normalisation it was made in."""

    mean: np.ndarray
    sigma: np.ndarray
    scales: dict[str, float]
    brain: np.ndarray


class SynthesisModel:
    """A synthesis model from its zoo directory (weights hash-checked)."""

    def __init__(self, directory: Path, *, batch: int = 8) -> None:
        self.directory = Path(directory)
        self.meta = SynthesisCard.read_from(self.directory)
        weights = self.meta.verified_weights(self.directory)
        a = self.meta.architecture
        self.inputs, self.target = task_contrasts(self.meta.task)
        arch = SynthesisArchitecture(
            len(self.inputs), tuple(a["channels"]), tuple(a["strides"]), int(a["num_res_units"])
        )
        self.net = load_network(arch.build(), weights)
        self.size_multiple = size_multiple(arch.strides)
        self.card = self.meta.model_card()
        self.batch = batch
        self.name = f"{self.meta.name} {self.meta.version}"

    @classmethod
    def shipped(cls, name: str, version: str | None = None) -> SynthesisModel:
        return cls(version_dir(name, version))

    @torch.inference_mode()
    def predict_normalised(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Target and uncalibrated σ for normalised input volumes (in :attr:`inputs` order)."""
        x = stack_inputs(images)
        means, sigmas = [], []
        for start in range(0, len(x), self.batch):
            padded, padding = pad_planes(x[start : start + self.batch], self.size_multiple)
            mean, log_var = self.net(torch.from_numpy(padded).contiguous(memory_format=torch.channels_last))
            means.append(padding.crop(mean[:, 0].numpy()))
            sigmas.append(padding.crop(torch.exp(0.5 * log_var[:, 0]).numpy()))
        return np.concatenate(means), np.concatenate(sigmas)

    def predict_full(self, inputs: Mapping[str, np.ndarray], brain: np.ndarray) -> SynthesisOutput:
        """The target contrast (white-matter units) and its calibrated σ, 0 outside ``brain``."""
        missing = [c for c in self.inputs if c not in inputs]
        if missing:
            raise ValueError(f"{self.name} needs {', '.join(missing)} (task {self.meta.task})")
        brain = np.asarray(brain, bool)
        norm = normalise_inputs({c: inputs[c] for c in self.inputs}, brain)
        mean, sigma = self.predict_normalised([norm.images[c] for c in self.inputs])
        scales = np.asarray([self.meta.sigma_scales[g] for g in GROUPS], np.float32)
        sigma = sigma * scales[groups_of(norm.images["t1w"])]
        mean = np.where(brain, np.maximum(mean, 0.0), 0.0).astype(np.float32)
        sigma = np.where(brain, sigma, 0.0).astype(np.float32)
        return SynthesisOutput(mean, sigma, norm.scales, brain)

    def predict(self, inputs: Mapping[str, np.ndarray], brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, σ) — the evaluation harness's predictor interface."""
        out = self.predict_full(inputs, brain)
        return out.mean, out.sigma
