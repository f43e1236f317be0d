"""Contrast synthesis (issue 18): the missing MR contrast and its σ in one forward pass.

A MONAI 2-D U-Net sees, for each input contrast (T1w, and T2w when the task has it), the
slice and its neighbours (2.5-D), every contrast divided by its white-matter median
(:mod:`models.synthesis_norm`), and predicts per pixel the target contrast in the same
white-matter units and the log-variance of its error (heteroscedastic head). Outside the brain
the prediction is 0 with σ 0.

σ is calibrated by split-conformal scales per group of voxels, so ``mean ± 1.645 σ`` covers
90 % of the reference voxels of each group on the calibration studies. The groups come from
the inputs only (never from a label), by :func:`sigma_groups` under the card's
:class:`SigmaRule`:

* tissue groups by the normalised T1w, which every task has (:data:`GROUPS`: dark — CSF-like,
  mid — grey-matter-like, bright — white-matter-like); a version-1.0 card has only these;
* ``t2w-hyperintense`` (cards from 1.1, tasks with a T2w input): non-CSF-like brain voxels
  whose normalised T2w exceeds :attr:`SigmaRule.t2w_threshold` (white matter is 1.0). A T2w
  hyperintensity in tissue is where a lesion may be, and the network, which partly erases
  lesions, is most often wrong there; its raw σ is first widened by
  ``t2w_excess_weight × (T2w − threshold)``, so the brighter the hyperintensity the wider the
  interval. At the 1.1 threshold (1.2) most grey matter (T2w about 1.3) falls in this group
  too, with a small widening; lesions (T2w about 1.9) get a wide one. A group of lesion-like
  voxels alone cannot be told apart voxel by voxel: on the calibration studies any T2w/T1w
  threshold that held most lesion voxels held 30 or more times as many grey-matter voxels;
* ``brain-edge`` (cards from 1.1): the voxels within :attr:`SigmaRule.edge_px` in-plane voxels
  of the brain mask's border (partial volume with CSF and, at run time, the mask's own error).

**Finer pixels than the network's.** A card may declare ``resample: {"pixel_spacing_mm": [lo,
hi], "to_mm": P}``: a series whose pixels lie in that range (finer than the input domain's
own, where the network was evaluated as it is) is put on cells of about ``P`` mm over the same
field (:class:`models.inplane_grid.InPlaneGrid`: area means), the network and σ run there, and
the target and σ come back onto the series' pixels by linear interpolation. The evaluation
that admitted it is in ``docs/synthesis.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import UNet
from scipy import ndimage
from torch import nn

from models.inplane_grid import InPlaneGrid, Resampling
from models.padding import pad_planes, size_multiple
from models.restoration import load_network
from models.synthesis_norm import normalise_inputs, task_contrasts
from models.zoo import StoredCard, version_dir

CONTEXT = 1  # neighbouring slices on each side
#: Normalised-T1w edges of the calibration groups (white-matter units).
GROUP_EDGES = (0.65, 0.92)
#: The tissue groups every card has (a version-1.0 card has only these).
GROUPS = ("csf-like", "grey-like", "white-like")
#: Group of non-CSF-like brain voxels with a T2w hyperintensity (:class:`SigmaRule`).
T2W_HYPERINTENSE = "t2w-hyperintense"
#: Group of brain voxels next to the brain mask's border (:class:`SigmaRule`).
BRAIN_EDGE = "brain-edge"


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
    """Tissue group index (0, 1, 2 of :data:`GROUPS`) per voxel from the normalised T1w."""
    return np.digitize(t1w_norm, GROUP_EDGES).astype(np.int8)


@dataclass(frozen=True)
class SigmaRule:
    """The groups and σ widening beyond the T1w tissue groups (a card's ``sigma_rule``).

    The default (an empty ``sigma_rule``, as in a version-1.0 card) is the three tissue groups
    and the raw σ.
    """

    #: Normalised T2w (white-matter units) above which a non-CSF-like brain voxel is
    #: ``t2w-hyperintense``; None: no such group.
    t2w_threshold: float | None = None
    #: σ += this × (T2w − threshold) in ``t2w-hyperintense`` voxels, before the group scale.
    t2w_excess_weight: float = 0.0
    #: In-plane voxels from the brain mask's border that form ``brain-edge``; 0: no such group.
    edge_px: int = 0

    @classmethod
    def from_card(cls, values: Mapping[str, Any]) -> SigmaRule:
        unknown = sorted(set(values) - {"t2w_threshold", "t2w_excess_weight", "edge_px"})
        if unknown:
            raise ValueError(f"sigma_rule: unknown keys {unknown}")
        threshold = values.get("t2w_threshold")
        return cls(
            t2w_threshold=None if threshold is None else float(threshold),
            t2w_excess_weight=float(values.get("t2w_excess_weight", 0.0)),
            edge_px=int(values.get("edge_px", 0)),
        )

    def to_card(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SigmaGroups:
    """Calibration group of each voxel (:func:`sigma_groups`)."""

    #: Group names; ``index`` points into them.
    names: tuple[str, ...]
    #: Per voxel, the group (int8).
    index: np.ndarray
    #: Per voxel, normalised T2w above the threshold in ``t2w-hyperintense`` voxels, else 0.
    t2w_excess: np.ndarray


def sigma_groups(images: Mapping[str, np.ndarray], brain: np.ndarray, rule: SigmaRule) -> SigmaGroups:
    """The calibration groups from the normalised inputs and the brain mask only.

    ``images`` are the normalised input volumes (T1w always; T2w when the task has it: without
    it there is no ``t2w-hyperintense`` group). Later groups take precedence: a hyperintense
    voxel is ``t2w-hyperintense`` whatever its T1w, and a voxel at the mask's border is
    ``brain-edge`` whatever else it is.
    """
    brain = np.asarray(brain, bool)
    index = groups_of(images["t1w"])
    names = list(GROUPS)
    excess = np.zeros(index.shape, np.float32)
    if rule.t2w_threshold is not None and "t2w" in images:
        tissue = brain & (index > 0)
        excess = np.where(tissue, np.maximum(images["t2w"] - np.float32(rule.t2w_threshold), 0.0), 0.0)
        excess = excess.astype(np.float32)
        names.append(T2W_HYPERINTENSE)
        index = np.where(excess > 0, len(names) - 1, index)
    if rule.edge_px > 0:
        in_plane = np.zeros((1, 3, 3), bool)
        in_plane[0] = True
        inner = ndimage.binary_erosion(brain, structure=in_plane, iterations=rule.edge_px)
        names.append(BRAIN_EDGE)
        index = np.where(brain & ~inner, len(names) - 1, index)
    return SigmaGroups(tuple(names), np.asarray(index, np.int8), excess)


def widened_sigma(sigma: np.ndarray, groups: SigmaGroups, rule: SigmaRule) -> np.ndarray:
    """The network's σ widened where the T2w is hyperintense (before the group scales)."""
    if rule.t2w_excess_weight == 0.0:
        return np.asarray(sigma, np.float32)
    return (sigma + np.float32(rule.t2w_excess_weight) * groups.t2w_excess).astype(np.float32)


def calibrated_sigma(
    sigma: np.ndarray, groups: SigmaGroups, rule: SigmaRule, scales: Mapping[str, float]
) -> np.ndarray:
    """The network's σ, widened (:func:`widened_sigma`) and times its group's conformal scale."""
    missing = [g for g in groups.names if g not in scales]
    if missing:
        raise ValueError(f"sigma_scales lack the groups {missing}")
    per_group = np.asarray([scales[g] for g in groups.names], np.float32)
    return (widened_sigma(sigma, groups, rule) * per_group[groups.index]).astype(np.float32)


@dataclass(kw_only=True)
class SynthesisCard(StoredCard):
    """``card.json`` of a synthesis model."""

    JSON_INDENT = 1

    #: "t1w+t2w->flair", "t1w->flair" or "t1w->t2w".
    task: str
    #: Conformal σ multiplier per calibration group (:func:`sigma_groups`).
    sigma_scales: dict[str, float]
    #: The groups beyond :data:`GROUPS` and the σ widening (:class:`SigmaRule`); empty in 1.0.
    sigma_rule: dict[str, Any] = field(default_factory=dict)
    #: Finer pixels the model takes on a coarser grid (:class:`Resampling`); empty: none.
    resample: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SynthesisOutput:
    """Target (white-matter units), calibrated σ, and the normalisation it was made in.

    When the series was resampled (:class:`Resampling`), ``grid`` is the grid and
    ``on_grid`` the output on its cells (``scales`` are that normalisation's); ``mean``,
    ``sigma`` and ``brain`` are on the series' pixels either way. ``normalised``: the inputs
    as the network saw them (white-matter units), where it ran (empty on a resampled
    output: they are its ``on_grid``'s).
    """

    mean: np.ndarray
    sigma: np.ndarray
    scales: dict[str, float]
    brain: np.ndarray
    grid: InPlaneGrid | None = None
    on_grid: SynthesisOutput | None = None
    normalised: dict[str, np.ndarray] = field(default_factory=dict)


class SynthesisModel:
    """A synthesis model from its zoo directory (weights hash-checked)."""

    def __init__(self, directory: Path, *, batch: int = 8) -> None:
        self.directory = Path(directory)
        self.meta = SynthesisCard.read_from(self.directory)
        self.sigma_rule = SigmaRule.from_card(self.meta.sigma_rule)
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
        self.resampling = Resampling.from_card(self.meta.resample, self.name)

    #: The evaluation harness passes each case's spacing (``predict(..., spacing=...)``).
    takes_spacing = True

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

    def grid_for(self, shape: Sequence[int], spacing: Sequence[float]) -> InPlaneGrid | None:
        """The grid a series of ``shape`` and ``spacing`` (slice, row, column) runs on, or
        None when it runs on its own pixels (:class:`~models.inplane_grid.Resampling`)."""
        return None if self.resampling is None else self.resampling.grid(shape, spacing)

    def predict_full(
        self, inputs: Mapping[str, np.ndarray], brain: np.ndarray, spacing: Sequence[float] | None = None
    ) -> SynthesisOutput:
        """The target contrast (white-matter units) and its calibrated σ, 0 outside ``brain``.

        ``spacing`` (slice, row, column mm): the series' pixels; where the card resamples
        them (:meth:`grid_for`) the network runs on the coarser grid, within the cells
        ``brain`` half covers (:meth:`predict_on_grid`). Without it the network runs on the
        pixels as given."""
        brain = np.asarray(brain, bool)
        grid = self.grid_for(brain.shape, spacing) if spacing is not None else None
        if grid is not None:
            return self.predict_on_grid(inputs, brain, grid, grid.down_mask(brain))
        return self._predict_here(inputs, brain)

    def predict_on_grid(
        self, inputs: Mapping[str, np.ndarray], brain: np.ndarray, grid: InPlaneGrid, cells_brain: np.ndarray
    ) -> SynthesisOutput:
        """:meth:`predict_full` on ``grid``'s cells, within ``cells_brain``; the target and σ
        back on the pixels, 0 outside ``brain``."""
        self._check_inputs(inputs)
        brain = np.asarray(brain, bool)
        on_cells = {c: grid.down(inputs[c]) for c in self.inputs}
        coarse = self._predict_here(on_cells, np.asarray(cells_brain, bool))
        mean = np.where(brain, np.maximum(grid.up(coarse.mean), 0.0), 0.0).astype(np.float32)
        sigma = np.where(brain, grid.up(coarse.sigma), 0.0).astype(np.float32)
        return SynthesisOutput(mean, sigma, coarse.scales, brain, grid=grid, on_grid=coarse)

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        missing = [c for c in self.inputs if c not in inputs]
        if missing:
            raise ValueError(f"{self.name} needs {', '.join(missing)} (task {self.meta.task})")

    def _predict_here(self, inputs: Mapping[str, np.ndarray], brain: np.ndarray) -> SynthesisOutput:
        self._check_inputs(inputs)
        norm = normalise_inputs({c: inputs[c] for c in self.inputs}, brain)
        mean, sigma = self.predict_normalised([norm.images[c] for c in self.inputs])
        groups = sigma_groups(norm.images, brain, self.sigma_rule)
        sigma = calibrated_sigma(sigma, groups, self.sigma_rule, self.meta.sigma_scales)
        mean = np.where(brain, np.maximum(mean, 0.0), 0.0).astype(np.float32)
        sigma = np.where(brain, sigma, 0.0).astype(np.float32)
        return SynthesisOutput(mean, sigma, norm.scales, brain, normalised=norm.images)

    def predict(
        self, inputs: Mapping[str, np.ndarray], brain: np.ndarray, spacing: Sequence[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mean, σ) — the evaluation harness's predictor interface."""
        out = self.predict_full(inputs, brain, spacing)
        return out.mean, out.sigma
