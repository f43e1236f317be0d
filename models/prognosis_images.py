"""Predicted follow-up images (T1c, FLAIR) from the current images and the forecast tumour extent.

The forecast (:mod:`models.prognosis`) gives, per voxel, the probability that the follow-up
shows T1c-visible tumour (``p_core``) and T2/FLAIR-visible tumour (``p_whole ≥ p_core``). A
voxel then is one of three classes at the follow-up — core, oedema/infiltration (whole
tumour outside the core) or tumour-free — with probabilities ``p_core``, ``p_whole − p_core``
and ``1 − p_whole``. Its intensity under a class is the current image's where the voxel is
in that class today, and otherwise the class's typical intensity in this study (the median
over the current visit's voxels of that class; tumour-free: the brain outside the tumour).

The predicted image is the mixture's mean; its σ is the mixture's spread (what the classes
disagree on), plus each replaced intensity's class spread (a voxel that becomes oedema looks
like *some* oedema voxel of this study, not the median one), plus the acquisition noise of
the current image (the follow-up is a new acquisition). Where the forecast is certain and
nothing changes, σ is the noise. Intensities are in the current series' stored units; no
bias-field or scanner change between visits is modelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: MAD → standard deviation for a normal distribution.
_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class PredictedImage:
    """One predicted contrast: the mean and its σ (the current image's units)."""

    mean: np.ndarray
    sigma: np.ndarray


def _robust(values: np.ndarray, fallback: float) -> tuple[float, float]:
    """Median and MAD-σ of ``values``; ``(fallback, 0)`` when there are none."""
    if values.size == 0:
        return fallback, 0.0
    centre = float(np.median(values))
    return centre, float(_MAD_TO_SD * np.median(np.abs(values - centre)))


def noise_sigma(image: np.ndarray, brain: np.ndarray) -> float:
    """Acquisition noise of an image (σ), from the difference of neighbouring voxels in-plane
    inside the brain (robust to edges: MAD of the differences, over √2)."""
    diff = np.diff(np.asarray(image, np.float32), axis=-1)
    inside = brain[..., 1:] & brain[..., :-1]
    values = diff[inside]
    if values.size < 16:
        return 0.0
    return float(_MAD_TO_SD * np.median(np.abs(values - np.median(values))) / np.sqrt(2.0))


def predict_image(
    image: np.ndarray,
    *,
    brain: np.ndarray,
    core_now: np.ndarray,
    whole_now: np.ndarray,
    p_core: np.ndarray,
    p_whole: np.ndarray,
) -> PredictedImage:
    """One contrast at the follow-up; every array has the current image's shape."""
    image = np.asarray(image, np.float32)
    brain = np.asarray(brain, bool)
    core_now = np.asarray(core_now, bool) & brain
    whole_now = (np.asarray(whole_now, bool) | core_now) & brain
    oedema_now = whole_now & ~core_now
    free_now = ~whole_now
    p_core = np.clip(np.asarray(p_core, np.float32), 0.0, 1.0)
    p_whole = np.maximum(np.clip(np.asarray(p_whole, np.float32), 0.0, 1.0), p_core)
    # outside the brain nothing changes
    p_core = np.where(brain, p_core, 0.0)
    p_whole = np.where(brain, p_whole, 0.0)
    free_level, free_spread = _robust(
        image[brain & free_now], float(np.median(image[brain])) if brain.any() else 0.0
    )
    oedema_level, oedema_spread = _robust(image[oedema_now], free_level)
    core_level, core_spread = _robust(image[core_now], oedema_level)
    classes = (
        (p_core, core_now, core_level, core_spread),
        (p_whole - p_core, oedema_now, oedema_level, oedema_spread),
        (1.0 - p_whole, free_now, free_level, free_spread),
    )
    mean = np.zeros_like(image)
    for weight, now, level, _ in classes:
        mean += weight * np.where(now, image, np.float32(level))
    variance = np.full_like(image, np.float32(noise_sigma(image, brain) ** 2))
    for weight, now, level, spread in classes:
        value = np.where(now, image, np.float32(level))
        variance += weight * ((value - mean) ** 2 + np.where(now, 0.0, np.float32(spread**2)))
    return PredictedImage(mean.astype(np.float32), np.sqrt(variance).astype(np.float32))


def predict_images(
    images: Mapping[str, np.ndarray],
    *,
    brain: np.ndarray,
    core_now: np.ndarray,
    whole_now: np.ndarray,
    p_core: np.ndarray,
    p_whole: np.ndarray,
) -> dict[str, PredictedImage]:
    """:func:`predict_image` for each contrast (e.g. ``{"t1c": ..., "flair": ...}``)."""
    return {
        name: predict_image(
            image, brain=brain, core_now=core_now, whole_now=whole_now, p_core=p_core, p_whole=p_whole
        )
        for name, image in images.items()
    }


def hallucination_map(p_whole: np.ndarray, whole_now: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Where the forecast claims tumour the current study does not show, how likely the claim
    is wrong: ``1 − p`` on voxels predicted as tumour (``p ≥ threshold``) outside today's
    whole-tumour extent, 0 elsewhere. With calibrated probabilities this is the chance that
    the follow-up has no tumour there (an invented extent); today's tumour is not scored."""
    p = np.clip(np.asarray(p_whole, np.float32), 0.0, 1.0)
    invented = (p >= threshold) & ~np.asarray(whole_now, bool)
    return np.where(invented, 1.0 - p, 0.0).astype(np.float32)
