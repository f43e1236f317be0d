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

import os
from concurrent.futures import ThreadPoolExecutor

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


#: Windows (pixels) of the multi-scale local mean; a hallucinated or removed structure of
#: radius r shows most clearly at a window about 2r wide.
DEFAULT_WINDOWS = (3, 5, 7, 9)
#: Slices scored at a time (the score is per slice; this bounds temporary memory).
_CHUNK = 16


def local_noise_sigma(observed: np.ndarray, window: int = 31) -> np.ndarray:
    """Per-pixel noise σ of the input: Immerkær's Laplacian estimator, averaged locally.

    A large window (default 31 px) follows the non-stationary noise of low-dose CT (more
    noise behind dense anatomy) while one inserted or removed small structure barely moves it.
    """
    lap = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    out = np.empty(observed.shape, dtype=np.float32)
    for k, plane in enumerate(np.asarray(observed, np.float32)):
        response = np.abs(ndimage.convolve(plane, lap, mode="reflect"))
        out[k] = np.sqrt(np.pi / 2) / 6.0 * ndimage.uniform_filter(response, size=window)
    return np.maximum(out, 1e-3)


def restoration_score(
    observed: np.ndarray,
    restored: np.ndarray,
    sigma_model: np.ndarray,
    *,
    noise_sigma: np.ndarray | None = None,
    correlation: dict[str, float] | None = None,
    model_weight: float = 0.5,
    windows: tuple[int, ...] = DEFAULT_WINDOWS,
    model_correlation: dict[str, float] | None = None,
) -> np.ndarray:
    """The restoration hallucination map: a combined z-score, maximised over windows.

    ``input − output = (input − truth) + (truth − output)``: input noise plus the model's
    error. Its local mean over a ``w×w`` window should therefore spread by
    ``sqrt((σ_noise · c_w / w)² + (λ · σ_model)²)`` — the noise part shrinking with the
    window by the measured correlation factor ``c_w`` of this CT noise (from the model
    card), the model part (spatially smooth) not shrinking, weighted by λ. Where the
    local mean departs by many of those spreads, the output added or removed something
    the input's noise cannot explain.

    With ``model_correlation`` (measured at calibration: the spread of a ``w×w`` mean of
    the model's error over the mean calibrated σ), the model part is ``k_w · σ_model``
    per window instead of the fixed ``λ · σ_model``.
    """
    if len(observed) > _CHUNK:
        # Every operation is per slice: score chunks of slices (bounded temporaries) on as
        # many threads as there are cores (SciPy's filters release the GIL).
        out = np.empty(np.shape(observed), dtype=np.float32)

        def one(k: int) -> None:
            part = slice(k, k + _CHUNK)
            out[part] = restoration_score(
                observed[part],
                restored[part],
                sigma_model[part],
                noise_sigma=None if noise_sigma is None else np.asarray(noise_sigma)[part],
                correlation=correlation,
                model_weight=model_weight,
                windows=windows,
                model_correlation=model_correlation,
            )

        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            list(pool.map(one, range(0, len(observed), _CHUNK)))
        return out
    residual = np.asarray(observed, np.float32) - np.asarray(restored, np.float32)
    noise = local_noise_sigma(observed) if noise_sigma is None else np.asarray(noise_sigma, np.float32)
    model = model_weight * np.asarray(sigma_model, np.float32)
    best = np.zeros(residual.shape, dtype=np.float32)
    for w in windows:
        c = (correlation or {}).get(str(w), 1.0)
        local_mean = ndimage.uniform_filter(residual, size=(1, w, w))
        if model_correlation and str(w) in model_correlation:
            model = model_correlation[str(w)] * np.asarray(sigma_model, np.float32)
        spread = np.sqrt((noise * c / w) ** 2 + ndimage.uniform_filter(model, size=(1, w, w)) ** 2)
        np.maximum(best, np.abs(local_mean) / spread, out=best)
    return best


def largest_region_voxels(suspect: np.ndarray) -> int:
    """Voxels in the largest 3-D connected suspect region (0 when there is none).

    A focal invented or erased structure is one connected region; its size does not grow
    with the length of the scan, unlike the total suspect volume.
    """
    labels, n = ndimage.label(np.asarray(suspect, bool))
    return int(np.bincount(labels.ravel())[1:].max()) if n else 0
