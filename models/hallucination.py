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


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask`` (None: there is none).
    Connected regions never leave it, so labelling the box labels the whole mask —
    usually a small part of a volume whose suspect voxels are few."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def suspect_regions(score: np.ndarray, threshold: float, *, min_voxels: int = 4) -> np.ndarray:
    """Boolean mask of connected regions above ``threshold`` with at least ``min_voxels``."""
    return large_regions(score > threshold, min_voxels=min_voxels)


def large_regions(mask: np.ndarray, *, min_voxels: int = 4) -> np.ndarray:
    """``mask`` (boolean, changed in place) without its connected regions of fewer than
    ``min_voxels`` (for a score thresholded a slab at a time: :func:`suspect_regions`)."""
    box = _bounding_box(mask)
    if box is None:
        return mask
    labels, count = ndimage.label(mask[box])
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    mask[box] = keep[labels]
    return mask


#: Windows (pixels) of the multi-scale local mean; a hallucinated or removed structure of
#: radius r shows most clearly at a window about 2r wide.
DEFAULT_WINDOWS = (3, 5, 7, 9)
#: Slices scored at a time (the score is per slice; this bounds temporary memory).
_CHUNK = 16


def _laplacian(plane: np.ndarray) -> np.ndarray:
    """Immerkær's 3×3 Laplacian, ``[[1,-2,1],[-2,4,-2],[1,-2,1]]`` with SciPy's "reflect"
    edges, as the two 1-D passes it factors into (``[1,-2,1]`` along each axis): the same
    values as ``ndimage.convolve`` to float32 rounding, at a third of its cost."""
    p = np.pad(plane, 1, mode="symmetric")  # NumPy's "symmetric" is SciPy's "reflect"
    rows = p[:, :-2] - 2 * p[:, 1:-1] + p[:, 2:]
    return rows[:-2] - 2 * rows[1:-1] + rows[2:]


def local_noise_sigma(observed: np.ndarray, window: int = 31) -> np.ndarray:
    """Per-pixel noise σ of the input: Immerkær's Laplacian estimator, averaged locally.

    A large window (default 31 px) follows the non-stationary noise of low-dose CT (more
    noise behind dense anatomy) while one inserted or removed small structure barely moves it.
    """
    out = np.empty(np.shape(observed), dtype=np.float32)
    for k, plane in enumerate(np.asarray(observed, np.float32)):
        response = np.abs(_laplacian(plane))
        out[k] = np.sqrt(np.pi / 2) / 6.0 * ndimage.uniform_filter(response, size=window)
    return np.maximum(out, 1e-3)


class _BoxMeans:
    """Local means of one slice over odd square windows up to ``2·radius + 1`` wide, as
    direct float32 sums: the window's rows are summed once (a wider window adds two rows
    to the last one's sum, so ask in increasing order), then its columns. Edges as SciPy's
    ``uniform_filter`` ("reflect"). Half the time of a float64 summed-area table (which
    this replaced, issue 20); the two agree to float32 rounding (a few 1e-6 of the
    values summed)."""

    def __init__(self, plane: np.ndarray, radius: int) -> None:
        self.padded = np.pad(np.asarray(plane, np.float32), radius, mode="symmetric")
        self.radius, self.shape = radius, plane.shape
        self._rows: np.ndarray | None = None
        self._half = 0

    def mean(self, window: int) -> np.ndarray:
        """The ``window × window`` local mean (``window`` odd, at most ``2·radius + 1``)."""
        half, r, p = window // 2, self.radius, self.padded
        if half > r:
            raise ValueError(f"window {window} is wider than 2·{r} + 1")
        h, w = self.shape
        if self._rows is None or half < self._half:
            self._rows, self._half = p[r : r + h].copy(), 0
        rows = self._rows
        while self._half < half:
            self._half += 1
            rows += p[r - self._half : r - self._half + h]
            rows += p[r + self._half : r + self._half + h]
        total = rows[:, r - half : r - half + w].copy()
        for j in range(1 - half, half + 1):
            total += rows[:, r + j : r + j + w]
        total *= np.float32(1.0 / (window * window))
        return total


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
    observed = np.asarray(observed, np.float32)
    noise = local_noise_sigma(observed) if noise_sigma is None else np.asarray(noise_sigma, np.float32)
    noise = np.broadcast_to(noise, observed.shape)
    sigma_model = np.asarray(sigma_model, np.float32)
    radius = max(windows) // 2
    if any(w % 2 == 0 for w in windows):
        raise ValueError(f"score windows must be odd (centred), got {windows}")
    best = np.zeros(observed.shape, dtype=np.float32)
    for k in range(len(observed)):
        residual = _BoxMeans(observed[k] - np.asarray(restored[k], np.float32), radius)
        model = _BoxMeans(sigma_model[k], radius)
        weight = model_weight
        for w in windows:
            c = (correlation or {}).get(str(w), 1.0)
            if model_correlation and str(w) in model_correlation:
                weight = model_correlation[str(w)]  # kept for the wider windows after it
            # the model part: the local mean of weight · σ_model
            spread = np.square(noise[k] * np.float32(c / w))
            spread += np.square(np.float32(weight) * model.mean(w))
            np.sqrt(spread, out=spread)
            np.maximum(best[k], np.abs(residual.mean(w)) / spread, out=best[k])
    return best


def largest_region_voxels(suspect: np.ndarray) -> int:
    """Voxels in the largest 3-D connected suspect region (0 when there is none).

    A focal invented or erased structure is one connected region; its size does not grow
    with the length of the scan, unlike the total suspect volume.
    """
    suspect = np.asarray(suspect, bool)
    box = _bounding_box(suspect)
    if box is None:
        return 0
    labels, _ = ndimage.label(suspect[box])
    return int(np.bincount(labels.ravel())[1:].max())
