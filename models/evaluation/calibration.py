"""Level 2: is the predicted per-pixel sigma an honest uncertainty? Coverage, sparsification, conformal.

A restoration model returns ``Prediction(mean, sigma)``; the claim to test is that the central
interval ``mean ± z·sigma`` covers the truth (the reference image) with probability
``2 Φ(z) - 1`` (90 % for ``z = 1.6449``), and that sigma ranks pixels by their error.

* **Coverage** (:func:`interval_coverage`): fraction of mask pixels with
  ``|target - mean| <= z·sigma``, overall and per slice, plus the mean interval width ``2 z sigma``
  in HU. :func:`reliability_curve` repeats it for several nominal levels (a reliability diagram).
* **Sparsification** (:func:`sparsification`): remove the fraction ``f`` of pixels with the largest
  predicted sigma and compute the RMSE of the remaining pixels; the *oracle* removes the pixels
  with the largest true error instead. Both curves are normalised by the RMSE of all pixels (so
  they start at 1). **AUSE** is the area between the model and oracle curves over
  ``f`` in ``[0, max_fraction]`` (trapezoid rule; Ilg et al. 2018). 0 means sigma orders the errors
  perfectly; a sigma unrelated to the error gives the area between a flat line and the oracle.
* **Split conformal** (:func:`conformal_scale`): on held-out calibration data, the nonconformity
  score is ``s = |r| / sigma``; its finite-sample-corrected quantile
  ``q = s_(k)`` with ``k = ceil((n + 1) · coverage)`` makes ``mean ± q·sigma`` cover a fresh
  exchangeable pixel with probability >= ``coverage``. :func:`calibrated_sigma` turns it into a
  calibrated sigma, ``sigma_cal = sigma · q / z``, so that the usual ``mean ± z·sigma_cal``
  interval is the conformal one. Pixels of one image are not independent: draw the calibration
  set from whole held-out cases (slices), not from pixels of the test images.

Pixels where the error or sigma is not finite (NaN sigma from a numerically negative local
variance, say) are left out of every statistic.

The truth is the full-dose reference (or the noise-free phantom when the question is the
uncertainty about the object rather than about the reference scan).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import ndtr, ndtri

from models.evaluation.results import CalibrationResult, SparsificationResult

#: Two-sided z for a central 90 % interval, ``Φ^{-1}(0.95)``.
Z90 = 1.6448536269514722
#: Nominal coverages of the default reliability curve.
DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def z_for_coverage(coverage: float) -> float:
    """Half-width multiplier ``z = Φ^{-1}((1 + coverage) / 2)`` of a central Gaussian interval.

    Parameters
    ----------
    coverage : float
        Nominal coverage in (0, 1).

    Returns
    -------
    float
        ``z`` (1.6449 for 0.9).
    """
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    return float(ndtri(0.5 * (1.0 + coverage)))


def coverage_for_z(z: float) -> float:
    """Nominal coverage ``2 Φ(z) - 1`` of the interval ``mean ± z·sigma``.

    Parameters
    ----------
    z : float
        Half-width in units of sigma.

    Returns
    -------
    float
        Nominal coverage.
    """
    return float(2.0 * ndtr(z) - 1.0)


def _prepare(
    mean: np.ndarray, sigma: np.ndarray, target: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = np.asarray(mean, dtype=np.float64)
    sd = np.asarray(sigma, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if mu.ndim == 2:
        mu, sd, t = mu[None], sd[None] if sd.ndim == 2 else sd, t[None]
    sd = np.broadcast_to(sd, mu.shape)
    if t.shape != mu.shape:
        raise ValueError(f"target shape {t.shape} does not match mean {mu.shape}")
    if mask is None:
        m = np.ones(mu.shape, dtype=bool)
    else:
        m = np.asarray(mask, dtype=bool)
        m = np.broadcast_to(m[None] if m.ndim == mu.ndim - 1 else m, mu.shape)
    err = np.abs(t - mu)
    m = m & np.isfinite(err) & np.isfinite(sd)
    return err, sd, m


def interval_coverage(
    mean: np.ndarray,
    sigma: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    z: float = Z90,
) -> dict[str, Any]:
    """Coverage and width of ``mean ± z·sigma`` inside ``mask``, overall and per slice.

    Parameters
    ----------
    mean, sigma, target : numpy.ndarray
        Prediction, its standard deviation and the truth, ``(slices, H, W)`` or ``(H, W)``
        (sigma may be a scalar).
    mask : numpy.ndarray, optional
        Boolean region, same shape or one slice's shape; default all pixels.
    z : float, optional
        Half-width multiplier (1.6449: nominal 90 %).

    Returns
    -------
    dict
        ``coverage`` (pooled over mask pixels), ``per_slice_coverage``, ``mean_width_hu``
        (mean of ``2 z sigma`` over mask pixels), ``per_slice_width_hu``, ``z`` and
        ``nominal_coverage``. Empty slices give NaN.
    """
    err, sd, m = _prepare(mean, sigma, target, mask)
    inside = err <= z * sd
    per_cov, per_w = [], []
    for k in range(err.shape[0]):
        mk = m[k]
        if mk.any():
            per_cov.append(float(inside[k][mk].mean()))
            per_w.append(float(2.0 * z * sd[k][mk].mean()))
        else:
            per_cov.append(float("nan"))
            per_w.append(float("nan"))
    n = int(m.sum())
    return {
        "coverage": float(inside[m].mean()) if n else float("nan"),
        "per_slice_coverage": per_cov,
        "mean_width_hu": float(2.0 * z * sd[m].mean()) if n else float("nan"),
        "per_slice_width_hu": per_w,
        "z": float(z),
        "nominal_coverage": coverage_for_z(z),
    }


def reliability_curve(
    mean: np.ndarray,
    sigma: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    levels: Sequence[float] = DEFAULT_LEVELS,
) -> dict[str, list[float]]:
    """Observed vs nominal coverage of central Gaussian intervals for several levels.

    Parameters
    ----------
    mean, sigma, target, mask
        See :func:`interval_coverage`.
    levels : sequence of float, optional
        Nominal coverages; ``z = Φ^{-1}((1 + level) / 2)`` for each.

    Returns
    -------
    dict
        ``nominal``, ``observed`` and ``z`` lists (a calibrated sigma lies on the diagonal).
    """
    err, sd, m = _prepare(mean, sigma, target, mask)
    ratio = err[m] / np.maximum(sd[m], 1e-12)
    zs = [z_for_coverage(float(level)) for level in levels]
    observed = [float((ratio <= z).mean()) if ratio.size else float("nan") for z in zs]
    return {"nominal": [float(v) for v in levels], "observed": observed, "z": zs}


def sparsification(
    error_abs: np.ndarray,
    sigma: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    n_points: int = 100,
    max_fraction: float = 0.99,
) -> SparsificationResult:
    """Sparsification curve of sigma against the oracle, and AUSE.

    Parameters
    ----------
    error_abs : numpy.ndarray
        Absolute error ``|target - mean|`` (any shape).
    sigma : numpy.ndarray
        Predicted standard deviation, same shape (only its ordering matters).
    mask : numpy.ndarray, optional
        Boolean region, same shape; default all pixels.
    n_points : int, optional
        Number of removal fractions, evenly spaced in ``[0, max_fraction]``.
    max_fraction : float, optional
        Largest fraction removed (< 1 so some pixels remain).

    Returns
    -------
    SparsificationResult
        ``fraction``; ``model`` and ``oracle``: RMSE of the remaining pixels divided by the RMSE of
        all pixels (``rmse_all_hu``); ``ause``: trapezoid area of ``model - oracle`` over
        ``fraction``. Ties in sigma are broken by pixel order (stable sort), i.e. arbitrarily with
        respect to the error.
    """
    e = np.asarray(error_abs, dtype=np.float64)
    s = np.broadcast_to(np.asarray(sigma, dtype=np.float64), e.shape)
    m = np.ones(e.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), e.shape)
    m = m & np.isfinite(e) & np.isfinite(s)
    e2 = e[m] ** 2
    sv = s[m]
    n = e2.size
    if n < 2:
        raise ValueError("need at least two pixels")
    fractions = np.linspace(0.0, max_fraction, n_points)
    removed = np.minimum(np.floor(fractions * n).astype(np.int64), n - 1)

    def curve(order: np.ndarray) -> np.ndarray:
        sorted_e2 = e2[order]  # largest first
        tail = np.concatenate([np.cumsum(sorted_e2[::-1])[::-1], [0.0]])  # tail[k] = sum_{i>=k}
        return np.sqrt(tail[removed] / (n - removed))

    rmse_all = math.sqrt(float(e2.mean()))
    model = curve(np.argsort(-sv, kind="stable"))
    oracle = curve(np.argsort(-e2, kind="stable"))
    norm = rmse_all if rmse_all > 0 else 1.0
    model_n, oracle_n = model / norm, oracle / norm
    ause = float(np.trapezoid(model_n - oracle_n, fractions))
    return SparsificationResult(
        fraction=fractions.tolist(),
        model=model_n.tolist(),
        oracle=oracle_n.tolist(),
        rmse_all_hu=rmse_all,
        ause=ause,
    )


def ause(error_abs: np.ndarray, sigma: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Area under the sparsification error (see :func:`sparsification`).

    Parameters
    ----------
    error_abs, sigma, mask
        See :func:`sparsification`.

    Returns
    -------
    float
        AUSE (normalised RMSE curves, removal fractions 0 .. 0.99).
    """
    return float(sparsification(error_abs, sigma, mask)["ause"])


def conformal_scale(
    residual_abs: np.ndarray, sigma: np.ndarray, coverage: float = 0.9, *, sigma_floor: float = 0.0
) -> float:
    """Split-conformal multiplier ``q`` such that ``mean ± q·sigma`` has the stated coverage.

    Parameters
    ----------
    residual_abs : numpy.ndarray
        ``|target - mean|`` on the calibration set (any shape; flattened).
    sigma : numpy.ndarray
        Predicted sigma on the same pixels (broadcastable).
    coverage : float, optional
        Target coverage ``1 - alpha`` (0.9).
    sigma_floor : float, optional
        Sigma below this (HU) is raised to it before dividing. A model whose sigma is exactly 0 on
        many pixels otherwise gets an infinite or absurd scale; use the same floor in
        :func:`calibrated_sigma`. Default 0 (no floor; 1e-12 guards the division).

    Returns
    -------
    float
        ``q = s_(k)``, the ``k``-th smallest score ``s = |r| / sigma`` with
        ``k = ceil((n + 1) · coverage)`` (the finite-sample correction); ``inf`` if ``k > n``.
        Scale to the usual Gaussian form with :func:`calibrated_sigma`.
    """
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    r = np.abs(np.asarray(residual_abs, dtype=np.float64))
    s = np.broadcast_to(np.asarray(sigma, dtype=np.float64), r.shape)
    scores = (r / np.maximum(s, max(float(sigma_floor), 1e-12))).ravel()
    scores = scores[np.isfinite(scores)]
    n = scores.size
    if n == 0:
        raise ValueError("no finite calibration scores")
    k = int(math.ceil((n + 1) * coverage - 1e-9))  # tolerance: 100 * 0.9 is 90.00000000000001
    if k > n:
        return float("inf")
    return float(np.partition(scores, k - 1)[k - 1])


def calibrated_sigma(
    sigma: np.ndarray, scale: float, z: float = Z90, *, sigma_floor: float = 0.0
) -> np.ndarray:
    """Calibrated sigma ``sigma · scale / z`` from a conformal scale.

    With ``scale`` from :func:`conformal_scale` at coverage ``c`` and ``z = z_for_coverage(c)``,
    the interval ``mean ± z·sigma_cal`` equals ``mean ± scale·sigma`` and so has coverage ``c``.
    (At other levels it is only as good as the shape of the predicted error distribution.)

    Parameters
    ----------
    sigma : numpy.ndarray
        Uncalibrated sigma.
    scale : float
        Conformal multiplier.
    z : float, optional
        The ``z`` the calibrated sigma will be used with (1.6449 for 90 %).
    sigma_floor : float, optional
        The floor used in :func:`conformal_scale` (sigma is raised to it first).

    Returns
    -------
    numpy.ndarray
        ``max(sigma, sigma_floor) * scale / z`` (float32).
    """
    s = np.maximum(np.asarray(sigma, dtype=np.float64), float(sigma_floor))
    return (s * (float(scale) / float(z))).astype(np.float32)


def calibration_summary(
    mean: np.ndarray,
    sigma: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    z: float = Z90,
    levels: Sequence[float] = DEFAULT_LEVELS,
    conformal: float | None = None,
) -> CalibrationResult:
    """Everything the report's calibration section shows, for one method.

    Parameters
    ----------
    mean, sigma, target, mask
        See :func:`interval_coverage`.
    z : float, optional
        Half-width of the headline interval (1.6449: 90 %).
    levels : sequence of float, optional
        Nominal levels of the reliability curve.
    conformal : float, optional
        A conformal scale fitted elsewhere, stored as ``conformal_scale`` for the record.

    Returns
    -------
    CalibrationResult
        Coverage, widths, reliability curve and sparsification curves with AUSE.
    """
    cov = interval_coverage(mean, sigma, target, mask, z)
    err, sd, m = _prepare(mean, sigma, target, mask)
    out = CalibrationResult(
        z=float(z),
        nominal_coverage=coverage_for_z(z),
        coverage=float(cov["coverage"]),
        per_slice_coverage=list(cov["per_slice_coverage"]),
        mean_width_hu=float(cov["mean_width_hu"]),
        per_slice_width_hu=list(cov["per_slice_width_hu"]),
        reliability=reliability_curve(mean, sigma, target, mask, levels),
        sparsification=sparsification(err, sd, m),
    )
    if conformal is not None:
        out["conformal_scale"] = float(conformal)
    return out
