"""Brain and glioma segmentation of one visit from its T1c and FLAIR, by classical methods.

The prognosis growth model (:mod:`models.prognosis`) needs, per visit and on the visit's own
grid, the T1c-visible tumour core (enhancing rim and necrotic centre), the FLAIR-visible whole
tumour (which contains the core) and the white / grey matter fractions (CSF and non-brain are its
zero-flux barrier). :func:`segment` gets them from the two images; nothing is trained and nothing
is downloaded.

Method
    1. *Head and brain.* Otsu separates the head from the air on T1c. Brain tissue is what is
       neither dark on FLAIR (CSF is nulled, bone has no signal) nor very dark on T1c, relative
       to the deep head; one in-plane erosion cuts it from the scalp across the dark bone and CSF,
       the largest 3-D component is the brain, and holes (ventricles, the lesion), sulci and the
       thin CSF layer under the skull are closed in to give the intracranial mask.
    2. *Bias field and scale.* N4 (SimpleITK, fitted on a shrunken copy over the brain mask)
       removes the coarse field of each image; then white and grey matter are told apart on T1c
       (two-class k-means of log intensity), and each image's remaining field is the smoothed
       (normalised convolution, ``BIAS_SIGMA_MM``) residual of log intensity from its class's
       median, three rounds. Each image is then divided by its own white-matter median, so a
       scanner's gain does not matter.
    3. *Tissues.* The (T1c, FLAIR) signatures of white and grey matter are the histogram
       peaks of the confident part of each class, CSF's those of the FLAIR-nulled voxels; a voxel's
       white / grey / CSF fractions unmix its lightly smoothed intensities with the fractions
       summing to one. Under the lesion, where the tissue cannot be seen, the fractions are filled
       in from the surrounding brain and count as tissue (not the growth model's barrier).
    4. *Whole tumour.* Seeds are thick FLAIR-bright regions (an opening removes the cortical
       ribbon) above the brightest healthy tissue, and the FLAIR-bright voxels around clearly
       enhancing ones. Each seed is judged against a shell around it: its threshold is halfway
       between the shell's FLAIR and its own (the truth threshold ``c = 0.16`` is where the
       oedema signal is half in), it grows ~6 mm geodesically down to it, and when any seed
       enhances only enhancing seeds are kept (bright cortex does not enhance).
    5. *Core.* Around the whole tumour, voxels brighter on T1c than halfway between the lesion's
       median and its enhancing level (99th percentile), closed and hole-filled slice by slice
       and in 3-D: the necrotic centre the rim encloses joins the core.

Measured (SIMULATED data, :mod:`models.evaluation.brain_tumour_seg`, 20 patients x 4 visits,
seeds 2000 - 2019, none used in tuning): Dice core mean 0.913 (min 0.000, a 0.2 ml core missed;
visits with a core >= 1 ml:
mean 0.916, min 0.809), whole mean 0.936 (min 0.730), brain mean 0.983 (min 0.980), white matter
(fraction >= 0.5) mean 0.949 (min 0.889), white-matter fraction MAE 0.063; no visit refused;
~1.7 s per 128 x 128 x 32 visit.

The references used (white-matter levels, tissue signatures, thresholds) and the volumes are
returned as QC figures. When the input does not look like a brain MR this method can handle,
:attr:`BrainSegmentation.problems` says why in plain words and the caller should refuse the job.

Problems (the job should be refused): inputs not 3-D, not on one grid, constant, non-finite or
negative (CT in HU), the same image twice, no brain, tissue contrast not that of T1c / FLAIR
(swapped or wrong series), brain or tumour within ``EDGE_BAND`` voxels of the in-plane image
edge, tumour on the first or last slice.

Not handled: no visible tumour gives empty masks (not a problem); with an enhancing focus,
non-enhancing satellite foci are dropped; a non-enhancing tumour whose FLAIR stands out less than
``2 * MIN_FLAIR_EXCESS`` (white-matter units) over its surroundings is missed; cores under
~0.5 ml are often missed; surgery cavities, haemorrhage and tumours in the skull base are not
modelled. Evaluated only on simulated data (:mod:`models.sim.prognosis`, see
:mod:`models.evaluation.brain_tumour_seg`, whose truth helper reuses the simulator's private
geometry functions).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from models.inplane_grid import InPlaneGrid

#: N4: shrink factors (slice, row, col) of the fitting copy, and iterations per fitting level.
N4_SHRINK = (2, 4, 4)
N4_ITERATIONS = (25, 25)
#: In-plane voxels at the image edge where brain or tumour means the field of view cuts them.
EDGE_BAND = 3
#: Width of the bias-field smoothing (mm).
BIAS_SIGMA_MM = 30.0
#: Lesion pieces smaller than this are dropped (ml).
MIN_LESION_ML = 0.5
#: A brain smaller than this is not a brain (ml).
MIN_BRAIN_ML = 100.0
#: Smallest lesion-over-healthy FLAIR contrast treated as a lesion (fraction of white matter).
MIN_FLAIR_EXCESS = 0.10
#: Smallest enhancement over white matter on T1c counted as enhancing (fraction).
MIN_ENHANCEMENT = 0.06
#: Enhancement over white matter that marks a tumour by itself (fraction).
ENHANCING_SEED = 0.15

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class BrainSegmentation:
    """What :func:`segment` found in one visit (all arrays on the input grid).

    Attributes
    ----------
    brain : numpy.ndarray
        bool intracranial mask (brain tissue, ventricles, sulci and the lesion).
    white, grey : numpy.ndarray
        float32 tissue fractions 0 .. 1; CSF and outside the brain are 0; under the lesion they
        are filled in from the surrounding brain and sum to 1.
    core : numpy.ndarray
        bool T1c-visible tumour: enhancing rim and the necrotic centre it encloses.
    whole : numpy.ndarray
        bool FLAIR-visible abnormality, containing ``core``.
    qc : dict
        Reference intensities (input units), tissue signatures (white-matter units), thresholds,
        volumes in ml, seconds.
    problems : list of str
        Why the input does not look like a brain MR this method handles; empty when it does.
    """

    brain: np.ndarray
    white: np.ndarray
    grey: np.ndarray
    core: np.ndarray
    whole: np.ndarray
    qc: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there are no problems."""
        return not self.problems


def _empty(
    shape: tuple[int, ...], problems: list[str], qc: dict[str, float] | None = None
) -> BrainSegmentation:
    zeros = np.zeros(shape, dtype=bool)
    return BrainSegmentation(
        brain=zeros,
        white=np.zeros(shape, np.float32),
        grey=np.zeros(shape, np.float32),
        core=zeros.copy(),
        whole=zeros.copy(),
        qc=dict(qc or {}),
        problems=problems,
    )


def _check_inputs(t1c: np.ndarray, flair: np.ndarray, spacing_mm: Sequence[float]) -> list[str]:
    problems = []
    if t1c.ndim != 3 or flair.ndim != 3:
        problems.append(f"T1c {t1c.shape} and FLAIR {flair.shape} must both be 3-D (slices, rows, cols)")
    elif t1c.shape != flair.shape:
        problems.append(f"T1c {t1c.shape} and FLAIR {flair.shape} are not on one grid: register them first")
    elif min(t1c.shape[1:]) < 16 or t1c.shape[0] < 3:
        problems.append(f"grid {t1c.shape} is too small for a brain segmentation (at least 3 x 16 x 16)")
    if len(spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        problems.append(f"spacing {tuple(spacing_mm)} must be three positive mm values")
    for name, image in (("T1c", t1c), ("FLAIR", flair)):
        if image.size and not np.isfinite(image).all():
            problems.append(f"{name} has non-finite values")
        elif image.size and float(np.ptp(image)) <= 0:
            problems.append(f"{name} is constant: no image")
        elif image.size and float(np.mean(image < 0)) > 0.01:
            problems.append(f"{name} has negative intensities: not an MR magnitude image (a CT in HU?)")
    if not problems and t1c.size > 1 and np.corrcoef(t1c.ravel(), flair.ravel())[0, 1] > 0.995:
        problems.append("T1c and FLAIR are the same image: pass two different series")
    return problems


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist).astype(np.float64)
    m0 = np.cumsum(hist * centres)
    w1 = w0[-1] - w0
    mu0 = m0 / np.maximum(w0, 1.0)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1.0)
    return float(centres[int(np.argmax(w0 * w1 * (mu0 - mu1) ** 2))])


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (a slab cuts ventricles and lesions open in 3-D)."""
    return np.stack([ndi.binary_fill_holes(s) for s in mask])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return mask.copy()
    sizes = ndi.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return np.asarray(labels == 1 + int(np.argmax(sizes)))


def _smooth(image: np.ndarray, spacing: Sequence[float], sigma_mm: float) -> np.ndarray:
    sigma = [sigma_mm / s for s in spacing]
    return np.asarray(ndi.gaussian_filter(image, sigma, mode="nearest"), np.float32)


def _masked_smooth(
    image: np.ndarray, mask: np.ndarray, spacing: Sequence[float], sigma_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised convolution: the Gaussian-weighted mean of ``image`` over ``mask``, and its weight."""
    m = mask.astype(np.float32)
    num = _smooth(image * m, spacing, sigma_mm)
    den = _smooth(m, spacing, sigma_mm)
    return np.asarray(num / np.maximum(den, 1e-6), np.float32), den


def _brain_mask(
    t1c: np.ndarray, flair: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, float, float]:
    """Intracranial mask and the rough T1c / FLAIR tissue levels it was found with."""
    head = _fill_slices(t1c > _otsu(t1c))
    depth = np.stack([ndi.distance_transform_edt(s, sampling=spacing[1:]) for s in head])
    deep = depth > 25.0
    if deep.sum() < 50:
        deep = depth > 0.5 * depth.max() if depth.max() > 0 else head
    if not deep.any():
        return np.zeros(t1c.shape, bool), 0.0, 0.0
    rough_t, rough_f = float(np.median(t1c[deep])), float(np.median(flair[deep]))
    if rough_t <= 0 or rough_f <= 0:
        return np.zeros(t1c.shape, bool), rough_t, rough_f
    # No upper bound: an enhancing rim at the brain's surface must not open the lesion to the
    # outside (scalp fat is cut off by the erosion below, across the dark bone and CSF).
    tissue = (flair > 0.55 * rough_f) & (t1c > 0.3 * rough_t)
    seed = _largest_component(ndi.binary_erosion(tissue, _IN_PLANE))
    brain = ndi.binary_dilation(seed, _IN_PLANE, iterations=2) & (tissue | seed)
    brain = ndi.binary_closing(_fill_slices(brain), _IN_PLANE, iterations=2)
    brain = _fill_slices(ndi.binary_dilation(brain, _IN_PLANE))
    return np.asarray(brain), rough_t, rough_f


def _n4(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """N4 bias-field correction (SimpleITK) fitted on a shrunken copy, applied at full size."""
    itk_image = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    itk_image.SetSpacing(tuple(float(x) for x in spacing[::-1]))
    itk_mask = sitk.GetImageFromArray(mask.astype(np.uint8))
    itk_mask.CopyInformation(itk_image)
    shrink = [N4_SHRINK[2], N4_SHRINK[1], N4_SHRINK[0]]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    n4.SetBiasFieldFullWidthAtHalfMaximum(0.15)
    n4.Execute(sitk.Shrink(itk_image, shrink), sitk.Shrink(itk_mask, shrink))
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(itk_image))
    log_field -= float(np.mean(log_field[mask]))  # keep the image's scale: only the shape is removed
    return np.asarray(image / np.exp(log_field), np.float32)


def _two_means(values: np.ndarray, low: float, high: float) -> tuple[float, float, float]:
    """1-D two-class k-means: the two centres and the threshold between them."""
    for _ in range(20):
        cut = 0.5 * (low + high)
        below, above = values[values < cut], values[values >= cut]
        if below.size == 0 or above.size == 0:
            break
        low, high = float(np.median(below)), float(np.median(above))
    return low, high, 0.5 * (low + high)


def _bias_correct(
    t_norm: np.ndarray, f_norm: np.ndarray, brain: np.ndarray, spacing: Sequence[float], iterations: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Divide out a smooth multiplicative field from each image; also return white and grey matter.

    White and grey matter are told apart on T1c (two-class k-means of log intensity); the field
    is the smoothed residual of log intensity from its class's median over both classes, so
    cortex and deep white matter both inform it. Voxels far from their class (lesion, partial
    volume with CSF) are left out.
    """
    tissue = brain & (f_norm > 0.5) & (t_norm > 0.5) & (t_norm < 1.3)
    if tissue.sum() < 200:
        return t_norm, f_norm, np.zeros_like(brain), np.zeros_like(brain)
    for _ in range(iterations):
        lt = np.log(np.maximum(t_norm, 1e-6))
        lf = np.log(np.maximum(f_norm, 1e-6))
        values = lt[tissue]
        low, high, cut = _two_means(
            values, float(np.percentile(values, 25)), float(np.percentile(values, 90))
        )
        is_wm = tissue & (lt >= cut)
        is_gm = tissue & (lt < cut)
        fields = []
        for image in (lt, lf):
            ref_w, ref_g = float(np.median(image[is_wm])), float(np.median(image[is_gm]))
            residual = np.where(is_wm, image - ref_w, image - ref_g)
            use = (is_wm | is_gm) & (np.abs(residual) < 0.15)
            field_, weight = _masked_smooth(residual, use, spacing, BIAS_SIGMA_MM)
            trust = np.clip(weight / 0.05, 0.0, 1.0)
            fields.append(trust * field_)
        t_norm = t_norm * np.exp(-fields[0])
        f_norm = f_norm * np.exp(-fields[1])
        tissue = brain & (f_norm > 0.5) & (t_norm > 0.5) & (t_norm < 1.3)
    lt = np.log(np.maximum(t_norm, 1e-6))
    values = lt[tissue]
    low, high, cut = _two_means(values, float(np.percentile(values, 25)), float(np.percentile(values, 90)))
    # The confident part of each class (away from the cut and from partial volume with CSF).
    wm = tissue & (lt >= cut + 0.25 * (high - cut)) & (lt < high + 0.1)
    gm = tissue & (lt <= cut - 0.25 * (cut - low)) & (lt > low - 0.1)
    return t_norm.astype(np.float32), f_norm.astype(np.float32), wm, gm


def _unmix(features: np.ndarray, signatures: np.ndarray) -> np.ndarray:
    """Fractions ``f`` with ``signatures.T f = features`` and ``sum f = 1``, per voxel.

    Two intensities and the sum-to-one row determine three classes exactly; negative fractions
    (noise, or a voxel outside the triangle of the three signatures) are clipped to 0 and the
    rest renormalised, a cheap stand-in for constrained least squares.
    """
    a = np.vstack([signatures.T, np.ones((1, signatures.shape[0]))])  # (3, 3)
    b = np.vstack([features.T, np.ones((1, features.shape[0]))])
    f = (np.linalg.pinv(a) @ b).T
    f = np.clip(f, 0.0, None)
    return np.asarray(f / np.maximum(f.sum(axis=1, keepdims=True), 1e-6), np.float32)


def _pieces(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return mask.copy()
    sizes = ndi.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, bool)
    keep[1:] = sizes >= min_voxels
    return np.asarray(keep[labels])


def segment(t1c: np.ndarray, flair: np.ndarray, spacing_mm: Sequence[float]) -> BrainSegmentation:
    """Segment brain, white / grey matter, tumour core and whole tumour of one MR visit.

    Parameters
    ----------
    t1c, flair : numpy.ndarray
        T1-weighted post-contrast and FLAIR magnitudes on one grid, ``(slices, rows, cols)``, any
        intensity scale.
    spacing_mm : sequence of float
        ``(slice, row, col)`` spacing.

    Returns
    -------
    BrainSegmentation
        The masks and fractions; ``problems`` non-empty when the input is not a brain MR this
        method can handle (then the masks are empty or not to be trusted).
    """
    start = time.perf_counter()
    t1c = np.asarray(t1c, dtype=np.float32)
    flair = np.asarray(flair, dtype=np.float32)
    problems = _check_inputs(t1c, flair, spacing_mm)
    if problems:
        return _empty(t1c.shape if t1c.ndim == 3 else (0, 0, 0), problems)
    spacing = tuple(float(s) for s in spacing_mm)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    qc: dict[str, float] = {}

    brain, rough_t, rough_f = _brain_mask(t1c, flair, spacing)
    qc["brain_ml"] = float(brain.sum()) * voxel_ml
    if qc["brain_ml"] < MIN_BRAIN_ML:
        return _empty(
            t1c.shape,
            [f"no brain found: {qc['brain_ml']:.0f} ml of brain-like tissue (need {MIN_BRAIN_ML:.0f} ml)"],
            qc,
        )

    # Bias field: N4 over the brain first (the coarse field), then a tissue-class refinement,
    # which also puts each image in units of its own white-matter level.
    t1c = _n4(t1c, brain, spacing)
    flair = _n4(flair, brain, spacing)
    t_norm, f_norm, wm, gm = _bias_correct(
        t1c / np.float32(rough_t), flair / np.float32(rough_f), brain, spacing
    )
    if wm.sum() < 100:
        return _empty(t1c.shape, ["no white matter found: T1c and FLAIR do not show brain contrast"], qc)
    scale_t = float(np.median(t_norm[wm]))
    scale_f = float(np.median(f_norm[wm]))
    t_norm /= np.float32(scale_t)
    f_norm /= np.float32(scale_f)
    qc["t1c_white_level"] = rough_t * scale_t
    qc["flair_white_level"] = rough_f * scale_f

    # Tissue signatures: white and grey from a two-class mixture on the (non-lesion) tissue that
    # FLAIR does not null; CSF from the voxels it does.
    t_s = _smooth(t_norm, spacing, 1.0)
    f_s = _smooth(f_norm, spacing, 1.0)
    signatures = _signatures(t_s, f_s, brain, wm, gm)
    if signatures is None:
        return _empty(
            t1c.shape,
            ["T1c / FLAIR contrast not as expected: white and grey matter cannot be told apart"],
            qc,
        )
    for name, (st, sf) in zip(("white", "grey", "csf"), signatures, strict=True):
        qc[f"{name}_t1c"] = float(st)
        qc[f"{name}_flair"] = float(sf)
    contrast = _contrast_problems(signatures)
    if contrast:
        return _empty(t1c.shape, contrast, qc)

    whole, core = _tumour(t_s, f_s, brain, signatures, voxel_ml, qc)

    white, grey = _fractions(t_s, f_s, brain, whole, signatures, spacing)
    qc["white_ml"] = float(white.sum()) * voxel_ml
    qc["grey_ml"] = float(grey.sum()) * voxel_ml
    qc["core_ml"] = float(core.sum()) * voxel_ml
    qc["whole_ml"] = float(whole.sum()) * voxel_ml
    problems = _extent_problems(brain, whole)
    qc["seconds"] = time.perf_counter() - start
    return BrainSegmentation(
        brain=brain, white=white, grey=grey, core=core, whole=whole, qc=qc, problems=problems
    )


def _mode(values: np.ndarray) -> float:
    """The peak of a smoothed histogram (a class's typical value, not pulled by its tails)."""
    lo, hi = np.percentile(values, [1, 99])
    if hi <= lo:
        return float(np.median(values))
    hist, edges = np.histogram(values, bins=100, range=(float(lo), float(hi)))
    smooth = ndi.gaussian_filter1d(hist.astype(np.float64), 3.0)
    peak = int(np.argmax(smooth))
    return float(0.5 * (edges[peak] + edges[peak + 1]))


def _signatures(
    t_s: np.ndarray, f_s: np.ndarray, brain: np.ndarray, wm: np.ndarray, gm: np.ndarray
) -> np.ndarray | None:
    """(T1c, FLAIR) of white, grey and CSF, in white-matter units; None if not separable."""
    if wm.sum() < 100 or gm.sum() < 100:
        return None
    white = [_mode(t_s[wm]), _mode(f_s[wm])]
    grey = [_mode(t_s[gm]), _mode(f_s[gm])]
    fluid = brain & (f_s < 0.3)
    if fluid.sum() < 50:  # no nulled fluid: the darkest T1c instead, reported as a contrast problem
        fluid = brain & (t_s <= np.percentile(t_s[brain], 5))
    csf = [float(np.median(t_s[fluid])), float(np.median(f_s[fluid]))]
    return np.array([white, grey, csf])


def _contrast_problems(signatures: np.ndarray) -> list[str]:
    (wt, wf), (gt, gf), (ct, cf) = signatures
    problems = []
    if not wt > gt + 0.03 > ct + 0.1:
        problems.append(
            f"T1c contrast not as expected: white {wt:.2f}, grey {gt:.2f}, CSF {ct:.2f} "
            "(white-matter units); "
            "a T1-weighted post-contrast image has white > grey > CSF"
        )
    if not cf < 0.5 * min(wf, gf):
        problems.append(
            f"FLAIR contrast not as expected: CSF {cf:.2f} against white {wf:.2f} and grey {gf:.2f}; "
            "FLAIR nulls the CSF (is this a T2w or the wrong series?)"
        )
    return problems


def _extent_problems(brain: np.ndarray, whole: np.ndarray) -> list[str]:
    problems = []
    # A band as deep as the masks' erosions: nothing found there can be told from the image edge.
    edge = np.ones_like(brain)
    edge[:, EDGE_BAND:-EDGE_BAND, EDGE_BAND:-EDGE_BAND] = False
    if (brain & edge).sum() > 0.02 * brain.sum():
        problems.append("the brain is cut by the in-plane field of view: the head must lie inside the image")
    if (whole & edge).any():
        problems.append("the tumour touches the in-plane field-of-view edge: its extent is not fully imaged")
    if whole[0].any() or whole[-1].any():
        problems.append(
            "the tumour reaches the first or last slice: its extent is not fully covered by the stack"
        )
    return problems


def _disc(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    disc = (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius + radius
    return np.asarray(disc[None])


def _lesion_seeds(f_s: np.ndarray, inner: np.ndarray, threshold: float, min_voxels: int) -> np.ndarray:
    """Thick FLAIR-bright regions: the opening removes the cortical ribbon, even where folded."""
    flat = np.pad(_disc(1), ((0, 0), (1, 1), (1, 1)))
    ball = np.concatenate([flat, _disc(2), flat])
    bright = ndi.binary_opening(inner & (f_s > threshold), ball)
    return _pieces(bright, min_voxels)


def _tumour(
    t_s: np.ndarray,
    f_s: np.ndarray,
    brain: np.ndarray,
    signatures: np.ndarray,
    voxel_ml: float,
    qc: dict[str, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Whole tumour and core (bool masks); thresholds and levels go into ``qc``.

    Seeds are thick FLAIR-bright regions above the brightest healthy tissue, and FLAIR-bright
    voxels around clearly enhancing ones. Each seed piece is judged against its own
    surroundings (a shell 4 - 10 mm outside it, CSF left out): its FLAIR threshold is halfway
    between the shell and the piece's own level (the truth threshold ``c = 0.16`` is where the
    oedema signal is half in), it grows geodesically for about 6 mm down to that threshold (so
    a threshold below the cortex's FLAIR does not leak along the cortical ribbon), and pieces
    whose contrast against their shell is far below the best piece's are dropped (bright
    cortex, not tumour).
    """
    white_f = float(signatures[0, 1])
    healthy_f = float(max(signatures[0, 1], signatures[1, 1]))
    # The mask's outer voxel is CSF and bone partial volume (fat-bright on both images).
    parenchyma = ndi.binary_erosion(brain, _IN_PLANE)
    inner = ndi.binary_erosion(parenchyma, _IN_PLANE)
    min_voxels = max(1, int(MIN_LESION_ML / voxel_ml))
    enhancing_seed = _pieces(inner & (t_s > 1.0 + ENHANCING_SEED), max(1, int(0.1 / voxel_ml)))
    seeds = _lesion_seeds(f_s, inner, healthy_f + MIN_FLAIR_EXCESS, min_voxels)
    # Around enhancement, the FLAIR-bright tissue it sits in (up to ~15 mm out, so the shell
    # below reaches past the oedema).
    oedema_like = inner & (f_s > white_f + MIN_FLAIR_EXCESS)
    around_enhancing = enhancing_seed.copy()
    for _ in range(8):
        around_enhancing = ndi.binary_dilation(around_enhancing, _IN_PLANE) & (oedema_like | enhancing_seed)
    seeds |= around_enhancing
    whole = np.zeros_like(brain)
    core = np.zeros_like(brain)
    labels, n = ndi.label(seeds)
    pieces: list[tuple[float, np.ndarray, bool]] = []
    thresholds = []
    for index in range(1, n + 1):
        piece = labels == index
        if piece.sum() < min_voxels:
            continue
        grown = ndi.binary_dilation(piece, _IN_PLANE, iterations=5)
        shell = grown & ~ndi.binary_dilation(piece, _IN_PLANE, iterations=2) & brain & ~seeds
        shell &= (f_s > 0.5) & (f_s < healthy_f + MIN_FLAIR_EXCESS)
        around = float(np.median(f_s[shell])) if shell.sum() >= 20 else white_f
        level = (
            float(np.percentile(f_s[piece & ~enhancing_seed], 75))
            if (piece & ~enhancing_seed).any()
            else healthy_f
        )
        contrast = level - around
        enhanced = bool((piece & enhancing_seed).any())
        # enhancement is evidence in itself; FLAIR alone must stand out more
        if contrast < (1.0 if enhanced else 2.0) * MIN_FLAIR_EXCESS:
            continue
        threshold = max(0.5 * (around + level), around + MIN_FLAIR_EXCESS)
        allowed = parenchyma & (f_s > threshold)
        region = piece & allowed
        for _ in range(3):
            region = ndi.binary_dilation(region, _IN_PLANE) & allowed
        pieces.append((contrast, region | (piece & enhancing_seed), enhanced))
        thresholds.append(threshold)
    if pieces:
        any_enhancing = any(e for _, _, e in pieces)
        best = max(c for c, _, e in pieces if e or not any_enhancing)
        for (contrast, region, enhanced), threshold in zip(pieces, thresholds, strict=True):
            # With an enhancing piece, that is the tumour (bright cortex does not enhance);
            # without one, the pieces that stand out nearly as much as the best.
            if (enhanced or not any_enhancing) and (enhanced or contrast >= 0.5 * best):
                whole |= region
                qc["whole_threshold"] = max(qc.get("whole_threshold", 0.0), threshold)
                qc["lesion_flair_contrast"] = max(qc.get("lesion_flair_contrast", 0.0), contrast)
        whole = _fill_slices(ndi.binary_closing(whole, _IN_PLANE)) & brain
    if whole.any():
        near = ndi.binary_dilation(whole, _IN_PLANE) & parenchyma
        enh_level = float(np.percentile(t_s[near], 99))
        background = float(np.median(t_s[whole]))
        core_threshold = max(0.5 * (background + enh_level), 1.0 + MIN_ENHANCEMENT)
        qc["enhancing_t1c"] = enh_level
        qc["core_threshold"] = core_threshold
        if enh_level >= 1.0 + ENHANCING_SEED:
            enhancing = _pieces(near & (t_s > core_threshold), max(1, int(0.1 / voxel_ml)))
            core = ndi.binary_closing(enhancing, _IN_PLANE, iterations=1)
            core = _fill_slices(ndi.binary_fill_holes(core)) & brain
            whole = whole | core
    return whole, core


def _fractions(
    t_s: np.ndarray,
    f_s: np.ndarray,
    brain: np.ndarray,
    lesion: np.ndarray,
    signatures: np.ndarray,
    spacing: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    fractions = np.zeros((*brain.shape, 3), np.float32)
    features = np.stack([t_s[brain], f_s[brain]], axis=1)
    fractions[brain] = _unmix(features, signatures)
    white, grey = fractions[..., 0], fractions[..., 1]
    if lesion.any():
        # Under the lesion the tissue is not visible: carry the surroundings in, as tissue.
        around = brain & ~ndi.binary_dilation(lesion, _IN_PLANE)
        w_fill, _ = _masked_smooth(white, around, spacing, 4.0)
        g_fill, _ = _masked_smooth(grey, around, spacing, 4.0)
        total = np.maximum(w_fill + g_fill, 1e-3)
        white = np.where(lesion, w_fill / total, white)
        grey = np.where(lesion, g_fill / total, grey)
    return np.asarray(white, np.float32), np.asarray(grey, np.float32)


def segment_on_grid(t1c: np.ndarray, flair: np.ndarray, grid: InPlaneGrid) -> BrainSegmentation:
    """:func:`segment` on ``grid``'s cells (each the area mean of the pixels it covers), its
    masks and fractions brought back onto the pixels: a mask where its cells' interpolated
    share is at least a half, the fractions by linear interpolation. The core stays inside
    the whole tumour. QC figures and problems are the cells' (volumes in ml are the same).

    For pixels much finer than the ~1.9 mm the method was built at: on 0.47 mm pixels its
    brain and core agreed less with the truth (``docs/prognosis.md``)."""
    found = segment(grid.down(t1c), grid.down(flair), grid.cell_spacing)

    def mask(cells: np.ndarray) -> np.ndarray:
        return grid.up(np.asarray(cells, np.float32)) >= 0.5

    brain = mask(found.brain)
    core = mask(found.core)
    whole = mask(found.whole) | core
    white = np.where(brain, np.clip(grid.up(found.white), 0.0, 1.0), 0.0).astype(np.float32)
    grey = np.where(brain, np.clip(grid.up(found.grey), 0.0, 1.0), 0.0).astype(np.float32)
    return BrainSegmentation(
        brain=brain,
        white=white,
        grey=grey,
        core=core,
        whole=whole,
        qc=dict(found.qc),
        problems=list(found.problems),
    )
