"""Hallucination map of MR contrast synthesis (issue 18, item 4).

A synthetic contrast (FLAIR from T1w + T2w, or from T1w alone) can go wrong two ways, and
the map scores both, per voxel, in the brain:

* **erased** — the inputs show an abnormality that the synthetic target lacks (a white-matter
  lesion bright on T2w, or dark on T1w, painted as normal tissue): a missed diagnosis;
* **inserted** — the synthetic target claims a focal hyperintensity that the inputs cannot
  support.

Method (numpy / scipy only; about a second for 32 × 128 × 128 on two cores)
---------------------------------------------------------------------------------
1. *Common units.* Every image (inputs, target, σ) is divided by its median over the T1w
   white-matter mask (:func:`models.synthesis_norm.white_matter_mask`), so the map does not
   depend on the scale the caller used, then lightly smoothed in-plane (Gaussian,
   :data:`SMOOTH_PX` pixels) against noise and the ~1 mm motion between the series.
2. *Local white-matter level.* The receive field multiplies every series alike and makes
   whole regions look brighter; each image is divided by its own white-matter level,
   a Gaussian-weighted mean over the white-matter mask at :data:`BIAS_SCALE_MM`. What is
   left is tissue contrast.
3. *Tissue expectation.* The T1w sets the tissue (CSF, grey, white matter and their partial
   volumes). Per study, in bins of T1w (:data:`BIN_WIDTH`), the median and the robust spread
   (1.4826 × MAD) of the T2w and of the synthetic target give each voxel's expected value and
   spread for its tissue; lesions are too few to move a median.
4. *Excess on each side.* The input's focal abnormality ``e_in = T2w − E[T2w | T1w]`` (T1w
   alone: its focal darkness ``e_in = E[T1w | local median] − T1w``) and the output's
   ``e_out = target − E[target | T1w]``. A faithful rendering shows ``e_out ≈ ρ · e_in`` where
   the inputs are abnormal (ρ = :data:`RHO`, measured on training-role studies' true FLAIR).
5. *Lesion scale.* Both excesses are averaged in-plane over the brain (Gaussian,
   :data:`COMPARE_PX` pixels), so a lesion the output renders slightly blurred or shifted (the
   inter-series motion) leaves no erased or inserted rim.
6. *Disagreement, in units of a combined spread.* With the study's residual spreads of step 3,
   ``s = sqrt(spread_out² + (ρ · spread_in)²)``:
   ``erased = (f · ρ · max(e_in, 0) · g − max(e_out, 0)) / s`` — the output shows less than the
   fraction ``f`` (:data:`ERASE_FRACTION`) of the excess the inputs predict;
   ``inserted = (e_out − m · ρ · max(e_in, 0)) / sqrt(s² + σ²)`` — more than ``m``
   (:data:`INSERT_FACTOR`) times it; the network's own σ widens this spread (a bright claim
   the network itself doubts counts less; σ only widens it, so a recalibrated σ moves the map
   little). σ is left out of the erased part on purpose: the network's σ is high over every
   lesion, rendered or not (mean 0.29 over lesions the detector finds on its output, 0.24 over
   those it misses, training-role seeds 20150–20199), so dividing by it would hide exactly the
   erasures. The gate ``g`` silences the input side where CSF explains it: where a T1w
   neighbour (3 × 3 in-plane) is CSF-dark (partial volume, motion at ventricle edges), and
   where the output is itself hypointense (``e_out / spread_out ≤ −`` :data:`CSF_GATE`: FLAIR
   nulls CSF, so a CSF-filled sulcus is bright on T2w and dark on FLAIR, which is right).
7. *Neighbourhood.* Each part is averaged over 3 × 3 in-plane and the score is their
   maximum, clipped at 0, 0 outside the brain.

The score is in spread units and comparable across studies, so one threshold and one minimum
region size (:data:`SUSPECT_THRESHOLD`, :data:`MIN_REGION_MM3`) turn it into suspect regions with
:func:`models.hallucination.suspect_regions`. Both were chosen on training-role SIMULATED studies
(seeds 20150–20199, which neither trained nor calibrated the network) and their behaviour on
held-out studies is measured by :mod:`models.evaluation.synthesis_hallucination_eval`; see there
for how and for the figures.

This module runs at inference: it imports no simulator, training or evaluation code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from models.inplane_grid import InPlaneGrid
from models.synthesis_norm import white_matter_mask

#: Suspect voxels: score above this. Chosen with :data:`MIN_REGION_MM3` on training-role
#: SIMULATED seeds 20150–20199 (:func:`models.evaluation.synthesis_hallucination_eval.
#: choose_constants`): of thresholds {2, 2.5, 3, 3.5, 4, 5, 6} × regions {20, 40, 65, 100, 150} mm³,
#: the most tampered lesion regions ≥ 5 mm flagged (erased + inserted: 0.75 of 280) with at most
#: 0.2 suspect regions per lesion-free study (0.18). Neighbours: 3 / 65 mm³ 0.74 at 0.14;
#: 3 / 20 mm³ 0.82 at 0.26; 2.5 / 40 mm³ 0.85 at 0.58.
SUSPECT_THRESHOLD = 3.5
#: Smallest suspect region (mm³), chosen with the threshold (two 1.9 × 1.9 × 3 mm voxels).
MIN_REGION_MM3 = 20.0

#: In-plane Gaussian smoothing (pixels) of every image before comparison.
SMOOTH_PX = 0.7
#: Scale (mm, Gaussian σ) of the local white-matter level that removes the receive field.
BIAS_SCALE_MM = 15.0
#: Width of the T1w bins of the tissue expectation (white-matter units).
BIN_WIDTH = 0.025
#: Fewest voxels for a bin of its own (emptier bins borrow the nearest full one).
MIN_BIN_VOXELS = 30
#: Floor of a bin's robust spread (white-matter units): noise-free images have none.
SPREAD_FLOOR = 0.02
#: Output excess per unit of input excess that a faithful rendering shows (FLAIR excess over
#: T2w excess: median 1.10, 10-90 % 0.81-1.37 over 127 lesions ≥ 5 mm of the true FLAIR of
#: training-role seeds 20150-20199; T1w alone: FLAIR excess over T1w darkness, 25th percentile ~7,
#: taken low because T1w barely shows most lesions).
RHO: dict[str, float] = {"t2w": 1.0, "t1w": 5.0}
#: Erased: the output shows less than this fraction of the excess the inputs predict.
ERASE_FRACTION = 0.7
#: Inserted: the output shows more than this multiple of the excess the inputs predict.
INSERT_FACTOR = 2.0
#: In-plane Gaussian (pixels) of both excesses before they are compared (0: off).
COMPARE_PX = 1.0
#: T1w (local white-matter units) below which a neighbour is CSF; the gate opens over 0.15 above.
CSF_T1 = 0.6
#: Output hypointensity (spread units) at which the input side is fully explained by CSF.
CSF_GATE = 2.0
#: Median window (pixels) of the T1w background when T1w is the only input.
T1_BACKGROUND_PX = 7


def _conditional(values: np.ndarray, key: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel: median and robust spread of ``values`` over ``mask`` voxels in its ``key`` bin."""
    edges = np.arange(0.3, 1.5, BIN_WIDTH, dtype=np.float32)
    index = np.digitize(key, edges)
    n_bins = len(edges) + 1
    inside = index[mask]
    order = np.argsort(inside, kind="stable")
    inside, vals = inside[order], values[mask][order]
    bounds = np.searchsorted(inside, np.arange(n_bins + 1))
    median = np.zeros(n_bins, np.float32)
    spread = np.zeros(n_bins, np.float32)
    full = np.zeros(n_bins, bool)
    for k in range(n_bins):
        v = vals[bounds[k] : bounds[k + 1]]
        if v.size >= MIN_BIN_VOXELS:
            median[k] = np.median(v)
            spread[k] = 1.4826 * np.median(np.abs(v - median[k]))
            full[k] = True
    if not full.any():  # a tiny brain: one bin for all
        m = float(np.median(vals)) if vals.size else 1.0
        median[:] = m
        spread[:] = 1.4826 * float(np.median(np.abs(vals - m))) if vals.size else SPREAD_FLOOR
        full[:] = True
    good = np.flatnonzero(full)
    nearest = good[np.abs(np.arange(n_bins)[:, None] - good[None, :]).argmin(axis=1)]
    return median[nearest][index], np.maximum(spread[nearest][index], SPREAD_FLOOR)


def _brain_smooth(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """In-plane Gaussian (:data:`COMPARE_PX`) of ``image`` over the brain only (normalised)."""
    g = (0.0, COMPARE_PX, COMPARE_PX)
    weight = ndimage.gaussian_filter(brain.astype(np.float32), g)
    total = ndimage.gaussian_filter(np.where(brain, image, 0.0).astype(np.float32), g)
    return np.where(weight > 1e-3, total / np.maximum(weight, 1e-3), 0.0).astype(np.float32)


def _white_level(image: np.ndarray, white: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Gaussian-weighted mean of ``image`` over white matter (1 where none is near)."""
    scale = [BIAS_SCALE_MM / float(s) for s in spacing_mm]
    weight = ndimage.gaussian_filter(white.astype(np.float32), scale, mode="nearest")
    total = ndimage.gaussian_filter(np.where(white, image, 0.0).astype(np.float32), scale, mode="nearest")
    level = np.where(weight > 1e-3, total / np.maximum(weight, 1e-3), 1.0)
    return np.maximum(level, 1e-3).astype(np.float32)


def hallucination_score(
    inputs: Mapping[str, np.ndarray],
    mean: np.ndarray,
    sigma: np.ndarray,
    brain: np.ndarray,
    spacing_mm: Sequence[float],
) -> np.ndarray:
    """Per-voxel hallucination score of a synthetic target (see the module for the method).

    Parameters
    ----------
    inputs
        The input contrasts by name (``"t1w"``, and ``"t2w"`` when the task has it), each
        ``(slices, rows, cols)``, in white-matter units (:mod:`models.synthesis_norm`) or any
        positive scale (each image is rescaled to its white-matter median).
    mean, sigma
        The synthetic target and its calibrated σ, same units as each other, same shape.
    brain
        Boolean intracranial mask.
    spacing_mm
        ``(slice, row, col)`` spacing.

    Returns
    -------
    numpy.ndarray
        float32, same shape, ≥ 0, 0 outside ``brain``; in spread units (see the module):
        about 3 and above is suspect.
    """
    if "t1w" not in inputs:
        raise ValueError("hallucination_score: inputs must include 't1w' (it defines the tissue)")
    brain = np.asarray(brain, bool)
    shape = brain.shape
    for name, image in (*inputs.items(), ("mean", mean), ("sigma", sigma)):
        if np.shape(image) != shape:
            raise ValueError(f"hallucination_score: {name} has shape {np.shape(image)}, brain {shape}")
    if len(spacing_mm) != 3:
        raise ValueError(f"hallucination_score: spacing_mm needs 3 values, got {tuple(spacing_mm)}")
    white = white_matter_mask(inputs["t1w"], brain)
    smooth = (0.0, SMOOTH_PX, SMOOTH_PX)

    def tissue_units(image: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        x = np.asarray(image, np.float32)
        scale = float(np.median(x[white]))
        scale = scale if np.isfinite(scale) and scale > 0 else 1.0
        x = ndimage.gaussian_filter(x / np.float32(scale), smooth)
        level = _white_level(x, white, spacing_mm)
        return x / level, scale, level

    t1, _, _ = tissue_units(inputs["t1w"])
    out, out_scale, out_level = tissue_units(mean)
    sig = np.asarray(sigma, np.float32) / np.float32(out_scale) / out_level

    m_out, s_out = _conditional(out, t1, brain)
    excess_out = out - m_out
    if "t2w" in inputs:
        t2, _, _ = tissue_units(inputs["t2w"])
        m_in, s_in = _conditional(t2, t1, brain)
        excess_in = t2 - m_in
        rho = RHO["t2w"]
    else:
        background = ndimage.median_filter(t1, size=(1, T1_BACKGROUND_PX, T1_BACKGROUND_PX))
        m_in, s_in = _conditional(t1, background, brain)
        excess_in = m_in - t1
        rho = RHO["t1w"]
    if COMPARE_PX > 0:
        # Compare the two sides at lesion scale: a lesion rendered a little blurred or shifted
        # by the inter-series motion must not leave erased/inserted rims.
        excess_in, excess_out = _brain_smooth(excess_in, brain), _brain_smooth(excess_out, brain)
    spread = np.sqrt(s_out**2 + (rho * s_in) ** 2)
    expected = rho * np.maximum(excess_in, 0.0)  # the output's excess that the inputs predict

    near_csf = ndimage.minimum_filter(t1, size=(1, 3, 3))
    hypo_out = excess_out / s_out
    gate = np.clip((near_csf - CSF_T1) / 0.15, 0.0, 1.0) * np.clip(1.0 + hypo_out / CSF_GATE, 0.0, 1.0)
    erased = np.maximum(ERASE_FRACTION * expected * gate - np.maximum(excess_out, 0.0), 0.0) / spread
    inserted = np.maximum(excess_out - INSERT_FACTOR * expected, 0.0) / np.sqrt(spread**2 + sig**2)
    window = (1, 3, 3)
    score = np.maximum(ndimage.uniform_filter(erased, window), ndimage.uniform_filter(inserted, window))
    return np.where(brain & np.isfinite(score), score, 0.0).astype(np.float32)


def hallucination_score_on_grid(
    grid: InPlaneGrid,
    inputs: Mapping[str, np.ndarray],
    mean: np.ndarray,
    sigma: np.ndarray,
    cells_brain: np.ndarray,
    brain: np.ndarray,
) -> np.ndarray:
    """:func:`hallucination_score` of a model that ran on ``grid``'s cells (``inputs``,
    ``mean``, ``sigma`` and ``cells_brain`` there: its thresholds were measured at that pixel
    size), brought back onto the series' pixels within ``brain``, never below 0."""
    on_cells = hallucination_score(inputs, mean, sigma, cells_brain, grid.cell_spacing)
    return np.where(brain, np.maximum(grid.up(on_cells), 0.0), 0.0).astype(np.float32)
