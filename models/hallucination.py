"""Where an output departs from its input by more than the input's noise can explain.

For restoration there is no ground truth at inference, but there is a noise model: the
residual ``input − output`` should look like noise of known spread. Averaged over a
window of ``n`` voxels, pure noise has a local mean with spread ``σ_noise / sqrt(n)``
(times a correlation factor for coloured noise); a local mean far beyond that means the
output added or removed structure. The score is that local mean in units of its
expected spread — a z-score per voxel — optionally combined with the model's own
calibrated z-score.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def data_consistency_score(
    observed: np.ndarray,
    restored: np.ndarray,
    noise_sigma: float | np.ndarray,
    *,
    window: int = 7,
    correlation: float = 1.0,
) -> np.ndarray:
    """|local mean of the residual| / its expected spread under the noise model.

    Parameters
    ----------
    observed, restored
        Input and output, same shape ``(slices, rows, columns)``.
    noise_sigma
        Noise standard deviation of the input (scalar or per voxel).
    window
        In-plane window (voxels) of the local mean.
    correlation
        Inflation of the spread for spatially correlated noise (1 for white noise; the
        ratio of correlated to white local-mean spread for FBP-textured CT noise).
    """
    residual = np.asarray(observed, np.float32) - np.asarray(restored, np.float32)
    local_mean = ndimage.uniform_filter(residual, size=(1, window, window))
    expected = np.maximum(np.asarray(noise_sigma, np.float32), 1e-6) * correlation / window
    return (np.abs(local_mean) / expected).astype(np.float32)


def suspect_regions(score: np.ndarray, threshold: float, *, min_voxels: int = 4) -> np.ndarray:
    """Boolean mask of connected regions above ``threshold`` with at least ``min_voxels``."""
    mask = score > threshold
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = sizes >= min_voxels
    return keep[labels]
