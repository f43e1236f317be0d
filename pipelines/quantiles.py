"""Quantiles of large volumes without partitioning every value."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


def upper_percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation) for a high ``q``, without
    partitioning every value: the two order statistics it needs are found among the values
    above a threshold taken from a sample, and checked to be there (else the full
    ``np.percentile``). The same value to float rounding, several times faster on a volume."""
    flat = np.ravel(values)
    n = flat.size
    if n < 4096:
        return float(np.percentile(flat, q))
    rank = q / 100.0 * (n - 1)
    lo = int(np.floor(rank))
    sample = flat[:: max(1, n // 20000)]
    threshold = np.percentile(sample, max(0.0, q - 2.0))
    candidates = flat[flat >= threshold]
    below = n - candidates.size  # every value below the threshold ranks under every candidate
    if lo < below:
        return float(np.percentile(flat, q))
    return _interpolated(candidates, lo - below, rank - lo)


def upper_percentile_of_parts(parts: Callable[[], Iterator[np.ndarray]], q: float) -> float:
    """:func:`upper_percentile` of the values ``parts()`` yields in pieces (e.g. a volume's
    slabs inside its field of view), never holding them all: one pass counts them and
    samples a threshold, a second keeps the values above it (a few per cent), from which the
    two order statistics are taken. Called with ``parts`` again for each pass."""
    n, samples = 0, []
    for values in parts():
        flat = np.ravel(values)
        n += flat.size
        samples.append(flat[:: max(1, flat.size // 2000)].copy())
    if n == 0:
        raise ValueError("upper_percentile_of_parts: no values")
    sample = np.concatenate(samples)
    rank = q / 100.0 * (n - 1)
    lo = int(np.floor(rank))
    for margin in (2.0, 10.0, 100.0):  # a threshold the two order statistics lie above
        threshold = np.percentile(sample, max(0.0, q - margin)) if margin < 100.0 else -np.inf
        candidates = np.concatenate([np.ravel(v)[np.ravel(v) >= threshold] for v in parts()])
        below = n - candidates.size
        if lo >= below:
            break
    return _interpolated(candidates, lo - below, rank - lo)


def _interpolated(candidates: np.ndarray, j: int, t: float) -> float:
    """NumPy's linear interpolation between the ``j``-th and next smallest ``candidates``
    (``t`` of the way), as ``np.percentile`` computes it."""
    hi = min(j + 1, candidates.size - 1)
    part = np.partition(candidates, (j, hi))
    a, b = float(part[j]), float(part[hi])
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)
