"""Task and calibration figures for tumour-growth prognosis (issue 17), on one grid.

Everything takes arrays already on the follow-up's (the truth's) voxel grid: the predicted
tumour probability, the true extent, the brain mask and the voxel spacing. Dice and the
95th-percentile Hausdorff distance come from MONAI (:class:`monai.metrics.DiceMetric`,
:func:`monai.metrics.compute_hausdorff_distance`, in mm through ``spacing``); the expected
calibration error of the voxel probabilities from MONAI's binning
(:func:`monai.metrics.calibration_binning`, equal-width bins over [0, 1]) restricted to the
brain; the volume interval's coverage is counted here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.prognosis import volume_ml

__all__ = ["dice", "growth_call", "hausdorff95_mm", "interval_coverage", "reliability", "volume_ml"]

#: Predicted extent: voxels with a tumour probability at least this.
EXTENT_THRESHOLD = 0.5
#: Bins of the reliability diagram / ECE.
ECE_BINS = 15


def _tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (stability called right)."""
    from monai.metrics import compute_dice

    p, t = np.asarray(predicted, bool), np.asarray(truth, bool)
    if not p.any() and not t.any():
        return 1.0
    return float(compute_dice(_tensor(p), _tensor(t), include_background=True, ignore_empty=False)[0, 0])


def hausdorff95_mm(predicted: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between two masks' surfaces.

    0.0 when both are empty; ``inf`` when exactly one is (the extent is missed entirely).
    """
    from monai.metrics import compute_hausdorff_distance

    p, t = np.asarray(predicted, bool), np.asarray(truth, bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("inf")
    value = compute_hausdorff_distance(
        _tensor(p), _tensor(t), include_background=True, percentile=95, spacing=[float(s) for s in spacing_mm]
    )
    return float(value[0, 0])


@dataclass(frozen=True)
class Reliability:
    """Expected calibration error and the reliability diagram of voxel probabilities."""

    ece: float
    #: per bin: mean predicted probability, observed frequency, voxel count
    mean_predicted: tuple[float, ...]
    observed: tuple[float, ...]
    counts: tuple[int, ...]


def reliability(
    probabilities: Sequence[np.ndarray], truths: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> Reliability:
    """ECE over every voxel of every case inside its mask (count-weighted over bins).

    The brain of a follow-up is mostly far from any tumour, where both the prediction and
    the truth are 0: those voxels would make any model look calibrated, so only voxels with
    a predicted probability above 0.001 or true tumour count (the region where the question
    is open).
    """
    from monai.metrics import calibration_binning

    prob = np.concatenate([np.asarray(p, np.float32)[m] for p, m in zip(probabilities, masks, strict=True)])
    truth = np.concatenate([np.asarray(t, bool)[m] for t, m in zip(truths, masks, strict=True)])
    open_question = (prob > 1e-3) | truth
    prob, truth = prob[open_question], truth[open_question]
    if prob.size == 0:
        return Reliability(0.0, (), (), ())
    # MONAI bins (batch, class, voxels) tensors with one-hot labels
    y_pred = torch.from_numpy(prob)[None, None]
    y = torch.from_numpy(truth.astype(np.float32))[None, None]
    mean_p, mean_gt, counts = calibration_binning(y_pred, y, num_bins=ECE_BINS)
    mp, mg, n = mean_p[0, 0].numpy(), mean_gt[0, 0].numpy(), counts[0, 0].numpy()
    keep = n > 0
    ece = float(np.sum(n[keep] * np.abs(mp[keep] - mg[keep])) / np.sum(n[keep]))
    return Reliability(
        ece,
        tuple(float(v) for v in mp[keep]),
        tuple(float(v) for v in mg[keep]),
        tuple(int(v) for v in n[keep]),
    )


def interval_coverage(intervals: Sequence[tuple[float, float]], truths: Sequence[float]) -> float:
    """Fraction of cases whose true volume lies inside the predicted interval (inclusive)."""
    if not truths:
        raise ValueError("interval_coverage: no cases")
    inside = [lo <= t <= hi for (lo, hi), t in zip(intervals, truths, strict=True)]
    return float(np.mean(inside))


def growth_call(before_ml: float, after_ml: float, *, tolerance: float = 0.1) -> str:
    """ "growth", "shrinkage" or "stable": a relative volume change beyond ``tolerance``."""
    if before_ml <= 0:
        return "growth" if after_ml > 0 else "stable"
    change = (after_ml - before_ml) / before_ml
    if change > tolerance:
        return "growth"
    if change < -tolerance:
        return "shrinkage"
    return "stable"
