"""The ``results`` structure that the evaluation functions fill and :func:`write_report` reads.

Everything is plain JSON-able data (floats, ints, strings, lists, nested dicts), so the same
object is written verbatim to ``report.json``. Each section is optional; the report shows what is
present. Method names (``"low-dose input"``, ``"Gaussian"``, ``"non-local means"``, ``"BM3D"``,
``"model"``, ...) are the keys of the per-method sections and keep their insertion order.

Layout::

    results = {
        "meta": {...},                                   # MetaResult: data set description
        "pixel": {method: PixelResult},                  # models.evaluation.pixel.pixel_metrics
        "calibration": {method: CalibrationResult},      # models.evaluation.calibration.calibration_summary
        "hallucination": {name: HallucinationResult},    # models.evaluation.hallucination.hallucination_roc
        "lesions": {method: LesionResult},               # models.evaluation.lesions.lesion_summary
        "features": {method: FeatureResult},             # models.evaluation.features.feature_distances
        "nps": {method: NPSResult},                      # models.sim.ldct.noise_power_spectrum, wrapped
    }

Non-finite numbers (an infinite PSNR of a perfect match, an undefined MS-SSIM) are stored as
``None`` in ``report.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np


class MetaResult(TypedDict, total=False):
    """Free-form description of the evaluation (shown as a table at the top of the report).

    Keys used by the report: ``data`` (e.g. ``"models.sim.ldct.make_case, 256 px"``), ``anatomies``,
    ``doses``, ``seeds``, ``n_cases``, ``n_slices``, ``notes``; any other key is listed too.
    """

    data: str
    anatomies: list[str]
    doses: list[float]
    seeds: list[int]
    n_cases: int
    n_slices: int
    notes: str


class PixelResult(TypedDict, total=False):
    """Output of :func:`models.evaluation.pixel.pixel_metrics` for one method.

    Pooled values are over all mask pixels of the stack (MS-SSIM: mean over slices); ``per_slice``
    holds one value per slice, the report shows mean ± sd over slices.
    """

    rmse_hu: float
    psnr_db: float
    ssim: float
    ms_ssim: float
    n_pixels: int
    n_slices: int
    window: list[float]
    ssim_region: str
    ms_ssim_region: str
    ms_ssim_scales: list[int]
    per_slice: dict[str, list[float]]  # keys rmse_hu, psnr_db, ssim, ms_ssim


class SparsificationResult(TypedDict, total=False):
    """Sparsification curves of :func:`models.evaluation.calibration.sparsification`."""

    fraction: list[float]
    model: list[float]  # normalised RMSE of the remaining pixels, removing largest sigma first
    oracle: list[float]  # same, removing largest true error first
    rmse_all_hu: float
    ause: float


class CalibrationResult(TypedDict, total=False):
    """Output of :func:`models.evaluation.calibration.calibration_summary` for one method."""

    z: float
    nominal_coverage: float
    coverage: float
    per_slice_coverage: list[float]
    mean_width_hu: float
    per_slice_width_hu: list[float]
    reliability: dict[str, list[float]]  # keys nominal, observed, z
    sparsification: SparsificationResult
    conformal_scale: float  # optional: scale fitted on calibration data (sigma_cal = sigma*scale/z)


class HallucinationResult(TypedDict, total=False):
    """Output of :func:`models.evaluation.hallucination.hallucination_roc` for one test.

    A test is one (score map, alteration) pair, e.g. ``"model: inserted blobs"`` or
    ``"model: removed lesions"``.
    """

    auroc: float
    fpr: list[float]
    tpr: list[float]
    n_positive: int
    n_negative: int
    reduce: str


class LesionResult(TypedDict, total=False):
    """Output of :func:`models.evaluation.lesions.lesion_summary` for one method."""

    reference_contrast_hu: list[float]
    measured_contrast_hu: list[float]
    ratio: list[float]
    diameter_mm: list[float]
    mean_ratio: float
    dprime: float
    n_signal: int
    n_noise: int


class FeatureResult(TypedDict, total=False):
    """Output of :func:`models.evaluation.features.feature_distances` for one method vs the reference."""

    encoder: str  # always models.evaluation.features.SIM_ENCODER_LABEL
    fid: float
    kid: float
    kid_std: float
    mmd: float
    mmd_bandwidth: float
    n_x: int
    n_y: int


class NPSResult(TypedDict, total=False):
    """A noise power spectrum (e.g. from :func:`models.sim.ldct.noise_power_spectrum`)."""

    frequency_per_mm: list[float]
    nps_hu2_mm2: list[float]


@dataclass(frozen=True)
class RestorationExample:
    """One test slice for the restoration report's image panels (arrays in HU; not written
    to ``report.json``): the low-dose input, the model's output, the full-dose reference,
    the calibrated σ and the hallucination map, all of the same SIMULATED slice."""

    case_seed: int
    anatomy: str
    dose: float
    slice_index: int
    low: np.ndarray
    restored: np.ndarray
    reference: np.ndarray
    sigma: np.ndarray
    score: np.ndarray


class EvaluationResults(TypedDict, total=False):
    """The nested dict :func:`models.evaluation.report.write_report` expects (see module docstring)."""

    meta: MetaResult
    pixel: dict[str, PixelResult]
    calibration: dict[str, CalibrationResult]
    hallucination: dict[str, HallucinationResult]
    lesions: dict[str, LesionResult]
    features: dict[str, FeatureResult]
    nps: dict[str, NPSResult]


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and non-finite floats into plain JSON values.

    Parameters
    ----------
    value : Any
        A nested structure of dicts, lists, tuples, numpy arrays and scalars.

    Returns
    -------
    Any
        The same structure with lists, Python floats/ints, and ``None`` for NaN or infinity.
    """
    import math

    import numpy as np

    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating | float):
        f = float(value)
        return f if math.isfinite(f) else None
    return value
