"""Synthetic CT from a T1-weighted MR: HU and its σ in one forward pass.

A MONAI 2-D U-Net sees three adjacent MR slices (2.5-D: the slice and its neighbours,
intensity-normalised per volume) and predicts, per pixel, the HU of the middle slice and
the log-variance of its error (heteroscedastic head). The σ is calibrated by a
split-conformal scale stored in the model card, so ``HU ± 1.645 σ`` covers 90 % of the
reference CT in the body.

The hallucination map asks a model-independent question: does the MR support this HU?
A lookup table fitted on the training pairs gives, for each (normalised MR intensity,
depth below the skin) bin, the median reference HU and its spread; the score is the
departure of the sCT from that median in units of ``sqrt(spread² + σ²)``. Where the MR
cannot tell (air and cortical bone are both dark) the spread is large and nothing is
flagged — that uncertainty belongs to σ; where it can (brain, fat, muscle) an invented
bone or air pocket stands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import UNet
from scipy import ndimage
from torch import nn

from models.base import Prediction
from models.padding import pad_planes, size_multiple
from models.restoration import HU_CLIP, HU_SCALE, load_network
from models.zoo import StoredCard, version_dir

CONTEXT = 1  # neighbouring slices on each side (2.5-D input: 2·CONTEXT + 1 channels)
#: HU above which a voxel counts as bone, below which as air (for interface figures).
BONE_HU = 250.0
AIR_HU = -400.0


@dataclass(frozen=True)
class SctArchitecture:
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1

    def build(self) -> nn.Module:
        return SctNet(self)


class SctNet(nn.Module):
    """U-Net on (2·CONTEXT+1) MR slices → (HU / 1000, log-variance)."""

    def __init__(self, arch: SctArchitecture) -> None:
        super().__init__()
        self.unet = UNet(
            spatial_dims=2,
            in_channels=2 * CONTEXT + 1,
            out_channels=2,
            channels=arch.channels,
            strides=arch.strides,
            num_res_units=arch.num_res_units,
            norm=None,  # type: ignore[arg-type]  # MONAI accepts None: no normalisation layer
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.unet(x)
        return out[:, :1], out[:, 1:].clamp(-16.0, 8.0)


# -- MR preprocessing ----------------------------------------------------------------------------
def head_mask(mr: np.ndarray) -> np.ndarray:
    """The patient in an MR volume: above a fraction of the bright-tissue level, holes filled
    per slice (sinus air and skull are inside), largest component kept."""
    mr = np.asarray(mr, np.float32)
    bright = float(np.percentile(mr, 99.5)) if mr.size else 0.0
    if bright <= 0:
        return np.zeros(mr.shape, bool)
    smooth = ndimage.gaussian_filter(mr, (0, 1.5, 1.5))
    mask = smooth > 0.12 * bright
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    mask = ndimage.binary_closing(mask, structure=np.ones((1, 5, 5), bool), iterations=2)
    return np.stack([ndimage.binary_fill_holes(s) for s in mask]).astype(bool)


def normalise_mr(mr: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """MR intensities divided by the volume's bright-tissue level (95th percentile inside the
    head), so 1.0 means "as bright as fat / white matter" whatever the scanner's scale."""
    mr = np.asarray(mr, np.float32)
    mask = head_mask(mr) if mask is None else mask
    inside = mr[mask] if mask.any() else mr.ravel()
    scale = float(np.percentile(inside, 95)) if inside.size else 1.0
    return (mr / max(scale, 1e-6)).astype(np.float32)


def depth_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """In-plane distance below the skin (mm) for each voxel inside the mask (0 outside)."""
    out = np.zeros(mask.shape, np.float32)
    for k, s in enumerate(mask):
        if s.any():
            out[k] = ndimage.distance_transform_edt(s, sampling=(spacing[1], spacing[2]))
    return out


def stack_context(x: np.ndarray) -> np.ndarray:
    """(S, H, W) → (S, 2·CONTEXT+1, H, W): each slice with its neighbours (edges repeated)."""
    idx = np.arange(len(x))
    return np.stack(
        [x[np.clip(idx + d, 0, len(x) - 1)] for d in range(-CONTEXT, CONTEXT + 1)], axis=1
    ).astype(np.float32)


# -- the MR-support table (hallucination map) ---------------------------------------------------
INTENSITY_EDGES = tuple(float(v) for v in np.round(np.linspace(0.0, 1.6, 33), 4))
DEPTH_EDGES_MM = (0.0, 3.0, 6.0, 9.0, 12.0, 16.0, 20.0, 30.0)
_NO_SUPPORT_SPREAD = 1000.0


@dataclass
class SupportTable:
    """Median reference HU and its robust spread per (MR intensity, depth) bin."""

    intensity_edges: list[float]
    depth_edges_mm: list[float]
    median_hu: list[list[float]]
    spread_hu: list[list[float]]

    def bins(self, intensity: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.clip(np.digitize(intensity, self.intensity_edges[1:-1]), 0, len(self.intensity_edges) - 2)
        d = np.clip(np.digitize(depth, self.depth_edges_mm[1:-1]), 0, len(self.depth_edges_mm) - 2)
        return i, d

    def lookup(self, intensity: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i, d = self.bins(intensity, depth)
        med = np.asarray(self.median_hu, np.float32)[i, d]
        spread = np.asarray(self.spread_hu, np.float32)[i, d]
        return med, spread

    @classmethod
    def fit(
        cls, intensity: np.ndarray, depth: np.ndarray, hu: np.ndarray, min_count: int = 200
    ) -> SupportTable:
        """Fit on body voxels: ``intensity`` (normalised MR), ``depth`` (mm), reference ``hu``."""
        edges_i, edges_d = list(INTENSITY_EDGES), list(DEPTH_EDGES_MM)
        table = cls(edges_i, edges_d, [], [])
        i, d = table.bins(intensity, depth)
        med = np.zeros((len(edges_i) - 1, len(edges_d) - 1), np.float32)
        spread = np.full_like(med, _NO_SUPPORT_SPREAD)
        for a in range(med.shape[0]):
            for b in range(med.shape[1]):
                sel = hu[(i == a) & (d == b)]
                if sel.size < min_count:
                    continue
                lo, mid, hi = np.percentile(sel, [5, 50, 95])
                med[a, b] = mid
                spread[a, b] = max((hi - lo) / (2 * 1.6448536), 10.0)
        table.median_hu = np.round(med, 1).tolist()
        table.spread_hu = np.round(spread, 1).tolist()
        return table


def support_score(
    sct_hu: np.ndarray,
    sigma_hu: np.ndarray,
    mr_norm: np.ndarray,
    depth: np.ndarray,
    mask: np.ndarray,
    table: SupportTable,
) -> np.ndarray:
    """|sCT − MR-supported median| / sqrt(spread² + σ²), smoothed over 3×3 px; 0 outside."""
    intensity = ndimage.gaussian_filter(mr_norm, (0, 0.7, 0.7))
    med, spread = table.lookup(intensity, depth)
    z = np.abs(sct_hu - med) / np.sqrt(spread**2 + sigma_hu**2 + 1.0)
    z = ndimage.uniform_filter(z.astype(np.float32), size=(1, 3, 3))
    return np.where(mask, z, 0.0).astype(np.float32)


def interface_mask(sct_hu: np.ndarray, body: np.ndarray, dilate_px: int = 2) -> np.ndarray:
    """Voxels within ``dilate_px`` of bone (> 250 HU) or internal air (< −400 HU): where the
    MR → HU mapping is ambiguous and a dose calculation is most sensitive."""
    hard = ((sct_hu > BONE_HU) | (sct_hu < AIR_HU)) & body
    soft = ~hard & body
    near_soft = ndimage.binary_dilation(soft, structure=np.ones((1, 3, 3), bool), iterations=dilate_px)
    near_hard = ndimage.binary_dilation(hard, structure=np.ones((1, 3, 3), bool), iterations=dilate_px)
    return near_soft & near_hard & body


# -- card and model ----------------------------------------------------------------------------
@dataclass(kw_only=True)
class SctCard(StoredCard):
    """The model card as stored next to the weights (``card.json``, indent 1)."""

    JSON_INDENT = 1

    #: The MR contrast the model was trained on (the pipeline refuses others).
    input_sequence: str
    sigma_scale: float
    support_table: dict[str, Any]


@dataclass(frozen=True)
class SctPrediction:
    """The sCT, its calibrated σ, the hallucination score and the masks it was made with."""

    prediction: Prediction
    score: np.ndarray
    body: np.ndarray
    interfaces: np.ndarray


class SctModel:
    """Loads an sCT model from its zoo directory (weights hash checked) and predicts volumes."""

    def __init__(self, directory: Path, *, batch: int = 4) -> None:
        self.directory = Path(directory)
        self.meta = SctCard.read_from(self.directory)
        weights = self.meta.verified_weights(self.directory)
        a = self.meta.architecture
        arch = SctArchitecture(tuple(a["channels"]), tuple(a["strides"]), int(a["num_res_units"]))
        self.net = load_network(arch.build(), weights)
        #: Rows and columns the network takes are multiples of this (any other size is padded).
        self.size_multiple = size_multiple(arch.strides)
        self.card = self.meta.model_card()
        self.table = SupportTable(**self.meta.support_table)
        self.batch = batch

    @classmethod
    def shipped(cls, name: str = "sct-head", version: str | None = None) -> SctModel:
        return cls(version_dir(name, version))

    @torch.inference_mode()
    def predict_raw(self, mr_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HU and uncalibrated σ (HU) for a normalised (slices, H, W) MR volume of any H × W
        (padded by reflection to what the network takes, outputs cropped back)."""
        x = stack_context(mr_norm)
        means, sigmas = [], []
        for start in range(0, len(x), self.batch):
            padded, padding = pad_planes(x[start : start + self.batch], self.size_multiple)
            batch = torch.from_numpy(padded)
            mean, log_var = self.net(batch.contiguous(memory_format=torch.channels_last))
            means.append(padding.crop(mean[:, 0].numpy()))
            sigmas.append(padding.crop(torch.exp(0.5 * log_var[:, 0]).numpy()))
        return np.concatenate(means) * HU_SCALE, np.concatenate(sigmas) * HU_SCALE

    def predict_full(self, mr: np.ndarray, spacing: tuple[float, float, float]) -> SctPrediction:
        """sCT (HU, air outside the head), calibrated σ, hallucination score, masks."""
        mr = np.asarray(mr, np.float32)
        body = head_mask(mr)
        norm = normalise_mr(mr, body)
        mean, sigma = self.predict_raw(norm)
        mean = np.where(body, np.clip(mean, *HU_CLIP), -1000.0).astype(np.float32)
        sigma = np.where(body, sigma * self.meta.sigma_scale, 0.0).astype(np.float32)
        depth = depth_mm(body, spacing)
        score = support_score(mean, sigma, norm, depth, body, self.table)
        return SctPrediction(Prediction(mean, sigma), score, body, interface_mask(mean, body))

    def predict(self, volume: np.ndarray, spacing: tuple[float, float, float]) -> Prediction:
        return self.predict_full(volume, spacing).prediction

    def score(
        self, mr: np.ndarray, sct_hu: np.ndarray, sigma_hu: np.ndarray, spacing: tuple[float, float, float]
    ) -> np.ndarray:
        """The hallucination map of a (possibly modified) sCT against its MR."""
        body = head_mask(mr)
        norm = normalise_mr(mr, body)
        return support_score(sct_hu, sigma_hu, norm, depth_mm(body, spacing), body, self.table)
