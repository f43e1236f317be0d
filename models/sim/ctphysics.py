"""CT numbers for simulated anatomy: HU per tissue with spread and texture, and HU <-> attenuation.

The anatomy generators (:mod:`models.sim.anatomy`) describe a slice as soft tissue *fractions*
(partial volume), a bone-density field and an additive HU offset field. This module turns that
description into a Hounsfield-unit image:

* every tissue has a mean HU drawn per case around a literature value (``TissueHU.mean`` +/-
  ``spread``), so two cases never have exactly the same grey levels;
* every tissue carries *texture*: a sum of unit-variance correlated Gaussian random fields at three
  correlation lengths (fine ~0.6 mm, mid ~2 mm, coarse ~6 mm), each weighted by a tissue-specific
  amplitude in HU. Regions are therefore never piecewise constant and an edge-preserving filter
  cannot recover them exactly;
* bone HU follows the density field (cortical ~1500 HU, trabecular/diploe ~350-600 HU) with a strong
  trabecular texture where the density is low;
* low-contrast lesions are added on top of the textured tissue (the texture continues underneath),
  with exactly the requested contrast inside their mask.

Attenuation uses a monochromatic ~70 keV model: ``mu = mu_water * (1 + HU / 1000)`` with
``mu_water = 0.0193 / mm`` (0.193 / cm, NIST XCOM water at 70 keV).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

#: Linear attenuation of water at ~70 keV, per millimetre (0.193 / cm).
MU_WATER_PER_MM = 0.0193
HU_AIR = -1000.0

#: Correlation lengths (mm, Gaussian sigma of the smoothing kernel) of the three texture fields.
TEXTURE_SCALES_MM: tuple[float, float, float] = (0.6, 2.0, 6.0)


class Tissue(IntEnum):
    """Tissue classes shared by the head and chest anatomies (index into ``fractions``)."""

    AIR = 0
    FAT = 1
    SOFT = 2  # muscle, skin, myocardium, mediastinal soft tissue
    BONE = 3
    CSF = 4
    GREY = 5
    WHITE = 6
    LUNG = 7
    BLOOD = 8
    LIVER = 9
    NODULE = 10


N_TISSUES = len(Tissue)


@dataclass(frozen=True)
class TissueHU:
    """HU model of one tissue.

    Attributes
    ----------
    mean : float
        Population mean CT number (HU).
    spread : float
        Standard deviation of the per-case mean (HU): inter-patient / inter-scanner variation.
    texture : tuple of float
        Standard deviations (HU) of the fine, mid and coarse texture fields inside the tissue.
    """

    mean: float
    spread: float
    texture: tuple[float, float, float]


#: Default tissue table. Bone ``mean`` is the HU at density 0 and is extended by ``BONE_HU_RANGE``.
TISSUE_HU: dict[Tissue, TissueHU] = {
    Tissue.AIR: TissueHU(-1000.0, 0.0, (0.0, 0.0, 0.0)),
    Tissue.FAT: TissueHU(-100.0, 10.0, (6.0, 6.0, 4.0)),
    Tissue.SOFT: TissueHU(45.0, 5.0, (4.0, 4.0, 3.0)),
    Tissue.BONE: TissueHU(150.0, 30.0, (90.0, 60.0, 30.0)),
    Tissue.CSF: TissueHU(8.0, 3.0, (1.5, 1.0, 1.0)),
    Tissue.GREY: TissueHU(40.0, 3.0, (2.5, 2.5, 2.0)),
    Tissue.WHITE: TissueHU(27.0, 2.0, (2.5, 2.5, 2.0)),
    Tissue.LUNG: TissueHU(-850.0, 25.0, (30.0, 25.0, 20.0)),
    Tissue.BLOOD: TissueHU(45.0, 5.0, (2.0, 2.0, 2.0)),
    Tissue.LIVER: TissueHU(60.0, 6.0, (3.0, 3.0, 3.0)),
    Tissue.NODULE: TissueHU(35.0, 15.0, (8.0, 5.0, 3.0)),
}

#: Bone HU = bone mean + BONE_HU_RANGE * density (density 1 = cortical, ~0.3 = trabecular).
BONE_HU_RANGE = 1350.0
#: Contrast-enhanced blood (aorta, heart chambers, pulmonary vessels) when a case is enhanced.
ENHANCED_BLOOD_HU = (150.0, 300.0)


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """Convert Hounsfield units to linear attenuation.

    Parameters
    ----------
    hu : numpy.ndarray
        CT numbers in HU.
    mu_water : float, optional
        Attenuation of water in the unit wanted for the output (default per mm at ~70 keV).

    Returns
    -------
    numpy.ndarray
        ``mu = mu_water * (1 + hu / 1000)``, float32 (not clipped; air is 0).
    """
    return (mu_water * (1.0 + np.asarray(hu, dtype=np.float32) / 1000.0)).astype(np.float32)


def mu_to_hu(mu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """Convert linear attenuation to Hounsfield units.

    Parameters
    ----------
    mu : numpy.ndarray
        Linear attenuation in the unit of ``mu_water``.
    mu_water : float, optional
        Attenuation of water (default per mm at ~70 keV).

    Returns
    -------
    numpy.ndarray
        ``HU = 1000 * (mu - mu_water) / mu_water``, float32.
    """
    return (1000.0 * (np.asarray(mu, dtype=np.float32) - mu_water) / mu_water).astype(np.float32)


def gaussian_random_field(
    shape: tuple[int, int], corr_px: float, rng: np.random.Generator, n: int = 1
) -> np.ndarray:
    """Unit-variance correlated Gaussian noise (white noise filtered by a Gaussian, via FFT).

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(rows, cols)``.
    corr_px : float
        Sigma of the Gaussian smoothing kernel in pixels (0 gives white noise).
    rng : numpy.random.Generator
        Source of randomness.
    n : int, optional
        Number of independent fields to draw.

    Returns
    -------
    numpy.ndarray
        ``(n, rows, cols)`` float32 fields with unit expected variance (periodic boundary).
    """
    h, w = shape
    white = rng.standard_normal((n, h, w), dtype=np.float32)
    if corr_px <= 0:
        return white
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    transfer = np.exp(-2.0 * (np.pi * corr_px) ** 2 * (fy**2 + fx**2))
    # Expected variance of the filtered field: mean of |H|^2 over the full (two-sided) spectrum.
    fx_full = np.fft.fftfreq(w)[None, :]
    var = float(np.mean(np.exp(-4.0 * (np.pi * corr_px) ** 2 * (fy**2 + fx_full**2))))
    spec = np.fft.rfft2(white, axes=(-2, -1)) * (transfer / np.sqrt(var))
    return np.fft.irfft2(spec, s=(h, w), axes=(-2, -1)).astype(np.float32)


@dataclass(frozen=True)
class HUModel:
    """Per-case draw of the tissue HU table (what :func:`phantom_hu` applies).

    Attributes
    ----------
    means : numpy.ndarray
        ``(N_TISSUES,)`` mean HU per tissue for this case (bone: HU at density 0).
    texture : numpy.ndarray
        ``(N_TISSUES, 3)`` texture amplitudes (HU) per tissue and scale.
    bone_range : float
        HU added per unit of bone density.
    """

    means: np.ndarray
    texture: np.ndarray
    bone_range: float


def draw_hu_model(
    rng: np.random.Generator,
    *,
    enhanced: bool | None = None,
    texture_scale: tuple[float, float] = (0.8, 1.25),
    table: dict[Tissue, TissueHU] | None = None,
) -> HUModel:
    """Draw the per-case tissue HU means and texture amplitudes.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    enhanced : bool or None, optional
        Contrast-enhanced blood (150-300 HU) if True, native blood if False, 50/50 if None.
    texture_scale : tuple of float, optional
        Range of a global factor on all texture amplitudes for this case.
    table : dict, optional
        Tissue table to draw from (default :data:`TISSUE_HU`).

    Returns
    -------
    HUModel
        The per-case HU model.
    """
    table = TISSUE_HU if table is None else table
    means = np.array([table[t].mean + table[t].spread * rng.standard_normal() for t in Tissue])
    texture = np.array([table[t].texture for t in Tissue], dtype=np.float64)
    texture *= rng.uniform(*texture_scale)
    if enhanced is None:
        enhanced = bool(rng.random() < 0.5)
    if enhanced:
        means[Tissue.BLOOD] = rng.uniform(*ENHANCED_BLOOD_HU)
    # Keep the grey/white ordering (GM brighter than WM by 8-16 HU) whatever the draw.
    gap = float(np.clip(means[Tissue.GREY] - means[Tissue.WHITE], 8.0, 16.0))
    means[Tissue.WHITE] = means[Tissue.GREY] - gap
    bone_range = BONE_HU_RANGE * rng.uniform(0.85, 1.1)
    return HUModel(means=means, texture=texture, bone_range=float(bone_range))


def phantom_hu(
    fractions: np.ndarray,
    density: np.ndarray,
    hu_offset: np.ndarray,
    pixel_mm: float,
    rng: np.random.Generator,
    *,
    model: HUModel | None = None,
    lesions: list[tuple[np.ndarray, float]] | None = None,
) -> np.ndarray:
    """Textured HU image from tissue fractions (the noise-free "truth" of a simulated slice).

    Parameters
    ----------
    fractions : numpy.ndarray
        ``(N_TISSUES, rows, cols)`` tissue fractions (sum 1 per pixel).
    density : numpy.ndarray
        ``(rows, cols)`` bone density in [0, 1] (used where there is bone).
    hu_offset : numpy.ndarray
        ``(rows, cols)`` additive anatomical HU modulation (lung gradient, ground-glass nodules).
    pixel_mm : float
        Pixel spacing in mm (sets the texture correlation lengths in pixels).
    rng : numpy.random.Generator
        Source of randomness for the texture (and the HU model if ``model`` is None).
    model : HUModel, optional
        Per-case HU table; drawn with :func:`draw_hu_model` when omitted.
    lesions : list of (mask, contrast_hu), optional
        Low-contrast lesions added after texturing: ``contrast_hu`` is added inside each mask.

    Returns
    -------
    numpy.ndarray
        ``(rows, cols)`` float32 HU image, clipped to >= -1000.
    """
    if model is None:
        model = draw_hu_model(rng)
    shape = fractions.shape[1:]
    fields = np.concatenate(
        [gaussian_random_field(shape, s / pixel_mm, rng) for s in TEXTURE_SCALES_MM], axis=0
    )  # (3, H, W)
    # An independent trabecular field so bone texture does not mirror the soft-tissue texture.
    trab = gaussian_random_field(shape, max(0.4 / pixel_mm, 0.5), rng)[0]
    hu = np.zeros(shape, dtype=np.float32)
    for t in Tissue:
        frac = fractions[t]
        if not np.any(frac > 0):
            continue
        amp = model.texture[t]
        if t == Tissue.BONE:
            soft = np.clip(1.15 - density, 0.15, 1.0)  # trabecular bone is the textured part
            value = model.means[t] + model.bone_range * density
            value = value + soft * (amp[0] * trab + amp[1] * fields[1] + amp[2] * fields[2])
        else:
            value = model.means[t] + amp[0] * fields[0] + amp[1] * fields[1] + amp[2] * fields[2]
        hu += (frac * value).astype(np.float32)
    hu += hu_offset.astype(np.float32) * (1.0 - fractions[Tissue.AIR])
    for mask, contrast in lesions or []:
        hu[mask] += np.float32(contrast)
    return np.maximum(hu, HU_AIR).astype(np.float32)
