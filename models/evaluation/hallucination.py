"""Level 3a: does a hallucination map find structure that the output invented or lost?

A hallucination map (e.g. :func:`models.hallucination.data_consistency_score`) has no ground
truth on real data. On simulated data we *make* hallucinations with known locations by editing a
restored image, and ask whether the map ranks the edited regions above unedited ones.

Protocol
--------
1. Restore the low-dose input with the model: ``output = model(input)``.
2. Alter the **output** (never the input), one alteration type at a time:

   * *added structure*: :func:`insert_blobs` adds smooth-edged discs of known contrast and radius
     at random body positions that overlap neither each other nor a real lesion/nodule;
   * *lost structure*: :func:`remove_structures` inpaints real lesions (or nodules) away — their
     region is replaced by a plane fitted to the surrounding ring plus texture copied from a
     nearby structure-free patch — so the output "loses" a real finding.

3. Compute the hallucination map from the *unaltered input* and the *altered output* exactly as
   the pipeline would (same noise estimate, same window).
4. **Positives**: the altered regions (blob masks; masks of the removed structures).
   **Negatives**: unaltered regions of the same shapes, drawn by :func:`control_regions` at
   random non-overlapping positions inside the body, away from positives and real lesions.
5. **Score** of a region: the maximum of the map over the region (``reduce="max"``, the
   default; ``"mean"`` is the alternative). :func:`region_auroc` is the area under the ROC curve of
   positives vs negatives (scikit-learn ``roc_auc_score``); :func:`hallucination_roc` also returns
   the curve. AUROC 1: every altered region scores above every control; 0.5: chance.

Report AUROC per alteration type and per (contrast, radius) setting — small, faint changes are
expected to be missed when they are below the noise, and that is the information wanted. All
numbers from this protocol are on simulated data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve
from sklearn.metrics import roc_auc_score, roc_curve

from models.evaluation.results import HallucinationResult
from models.sim.anatomy import Lesion

Reduce = Literal["max", "mean"]


def _per_item(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, int | float | np.floating | np.integer):
        return [float(value)] * n
    vals = [float(v) for v in value]
    if len(vals) != n:
        raise ValueError(f"{name}: expected {n} values, got {len(vals)}")
    return vals


def _union(shape: tuple[int, ...], masks: Sequence[np.ndarray] | None) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for m in masks or ():
        out |= np.asarray(m, dtype=bool)
    return out


def disc_profile(
    shape: tuple[int, int], center_rc: tuple[float, float], radius_px: float, edge_px: float = 1.0
) -> np.ndarray:
    """Smooth-edged disc: 1 inside ``radius - edge/2``, 0 beyond ``radius + edge/2``, raised cosine between.

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(H, W)``.
    center_rc : tuple of float
        Centre (row, column) in pixels.
    radius_px : float
        Nominal radius (the 0.5 level of the edge).
    edge_px : float, optional
        Width of the raised-cosine edge (1 px: the core, one pixel inside the nominal disc, is at
        full amplitude and nothing leaks beyond half a pixel outside it).

    Returns
    -------
    numpy.ndarray
        float64 profile in ``[0, 1]``.
    """
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    r = np.hypot(rr - center_rc[0], cc - center_rc[1])
    if edge_px <= 0:
        return (r <= radius_px).astype(np.float64)
    t = np.clip((r - (radius_px - edge_px / 2.0)) / edge_px, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def insert_blobs(
    image_hu: np.ndarray,
    rng: np.random.Generator,
    n: int,
    contrast_hu: float | Sequence[float],
    radius_px: float | Sequence[float],
    mask: np.ndarray,
    *,
    avoid: Sequence[np.ndarray] | None = None,
    margin_px: float = 4.0,
    edge_px: float = 1.0,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Add ``n`` smooth-edged discs to an (output) image at random, non-overlapping body positions.

    Parameters
    ----------
    image_hu : numpy.ndarray
        2-D image in HU (the restored output; it is not modified).
    rng : numpy.random.Generator
        Source of the positions.
    n : int
        Number of blobs.
    contrast_hu : float or sequence of float
        Contrast (added HU at the blob centre), one value or one per blob; may be negative.
    radius_px : float or sequence of float
        Nominal radius in pixels, one value or one per blob.
    mask : numpy.ndarray
        Boolean region the blobs (and ``margin_px`` around them) must lie in, e.g. the body mask.
    avoid : sequence of numpy.ndarray, optional
        Masks the blobs must stay ``margin_px`` away from (real lesions, nodules).
    margin_px : float, optional
        Minimum gap between a blob's nominal edge and the region edge, other blobs and ``avoid``
        (4 px leaves room for a contrast-measuring ring).
    edge_px : float, optional
        Width of the raised-cosine edge (see :func:`disc_profile`).

    Returns
    -------
    tuple
        ``(image, blob_masks)``: the altered float32 image and one boolean mask (the nominal disc,
        ``r <= radius``) per blob placed. Fewer than ``n`` masks are returned when the region is
        full.
    """
    img = np.asarray(image_hu, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError("insert_blobs works on one 2-D image; call it per slice")
    contrasts = _per_item(contrast_hu, n, "contrast_hu")
    radii = _per_item(radius_px, n, "radius_px")
    region = np.asarray(mask, dtype=bool)
    inside = ndimage.distance_transform_edt(region)
    forbidden = _union(img.shape, avoid)
    out = img.astype(np.float64).copy()
    rr, cc = np.ogrid[: img.shape[0], : img.shape[1]]
    blobs: list[np.ndarray] = []
    for contrast, radius in zip(contrasts, radii, strict=True):
        away = ndimage.distance_transform_edt(~forbidden) if forbidden.any() else np.full(img.shape, np.inf)
        ok = (inside > radius + margin_px) & (away > radius + margin_px)
        candidates = np.flatnonzero(ok)
        if candidates.size == 0:
            break
        r0, c0 = np.unravel_index(int(rng.choice(candidates)), img.shape)
        out += contrast * disc_profile(img.shape, (float(r0), float(c0)), radius, edge_px)
        disc = np.hypot(rr - r0, cc - c0) <= radius
        blobs.append(disc)
        forbidden |= disc
    return out.astype(np.float32), blobs


def blob_lesions(
    blob_masks: Sequence[np.ndarray],
    contrast_hu: float | Sequence[float],
    pixel_mm: float,
) -> list[Lesion]:
    """Wrap blob masks as :class:`~models.sim.anatomy.Lesion` objects (for contrast measurement).

    Parameters
    ----------
    blob_masks : sequence of numpy.ndarray
        Masks from :func:`insert_blobs`.
    contrast_hu : float or sequence of float
        The contrasts they were inserted with.
    pixel_mm : float
        Pixel spacing.

    Returns
    -------
    list of Lesion
        ``kind="inserted"``, ``host=-1``; measure them with :func:`models.sim.ldct.lesion_contrast`.
    """
    contrasts = _per_item(contrast_hu, len(blob_masks), "contrast_hu")
    out = []
    for m, c in zip(blob_masks, contrasts, strict=True):
        r, col = ndimage.center_of_mass(m)
        diameter = 2.0 * np.sqrt(m.sum() / np.pi) * pixel_mm
        out.append(
            Lesion(m, (float(r), float(col)), float(diameter), float(c), -1, float(pixel_mm), "inserted")
        )
    return out


def _plane_fit(image: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Least-squares plane ``a + b·row + c·col`` fitted to ``image[where]``; returns coefficients."""
    r, c = np.nonzero(where)
    design = np.column_stack([np.ones(r.size), r, c]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, image[where].astype(np.float64), rcond=None)
    return coef


def _robust_inliers(image: np.ndarray, where: np.ndarray, k: float = 3.0) -> np.ndarray:
    """Pixels of ``where`` within ``k`` robust SDs (1.4826 MAD) of their median: drops a neighbouring
    tissue (lung, bone, fat) that a ring around a lesion at an organ edge would otherwise include."""
    vals = image[where]
    med = float(np.median(vals))
    mad = 1.4826 * float(np.median(np.abs(vals - med)))
    keep = np.abs(image - med) <= k * max(mad, 1e-3)
    out = where & keep
    return out if out.sum() >= 3 else where


def _plane_eval(coef: np.ndarray, where: np.ndarray) -> np.ndarray:
    r, c = np.nonzero(where)
    return coef[0] + coef[1] * r + coef[2] * c


def remove_structures(
    image_hu: np.ndarray,
    masks: Sequence[np.ndarray],
    rng: np.random.Generator,
    *,
    dilate_px: int = 1,
    ring_px: int = 3,
    body: np.ndarray | None = None,
    avoid: Sequence[np.ndarray] | None = None,
    n_candidates: int = 64,
) -> np.ndarray:
    """Inpaint real structures away: the output "loses" them.

    Each mask, dilated by ``dilate_px`` (to take the partial-volume edge too), is replaced by the
    least-squares plane fitted to the surrounding ring (``ring_px`` wide; the ring mean plus the
    local gradient; ring pixels more than 3 robust SDs from the ring median, i.e. a neighbouring
    tissue, are left out of the fit) plus *matched texture*: the same-shaped patch from a nearby
    position that is free of structures, with its own plane removed, chosen among
    ``n_candidates`` random offsets as the one whose standard deviation is closest to that of the
    ring residual. If no candidate
    fits, white Gaussian noise of the ring residual's standard deviation is used instead.

    Parameters
    ----------
    image_hu : numpy.ndarray
        2-D image in HU (the restored output; not modified).
    masks : sequence of numpy.ndarray
        Boolean masks of the structures to remove (e.g. ``case.lesion_masks``).
    rng : numpy.random.Generator
        Source of the texture positions.
    dilate_px : int, optional
        Dilation of each mask before replacement.
    ring_px : int, optional
        Width of the background ring used for the plane fit.
    body : numpy.ndarray, optional
        Texture sources must lie inside this mask (default: anywhere in the image).
    avoid : sequence of numpy.ndarray, optional
        Further structures texture must not be copied from (e.g. nodules).
    n_candidates : int, optional
        Number of random texture offsets tried per structure.

    Returns
    -------
    numpy.ndarray
        float32 image with the structures removed.
    """
    img = np.asarray(image_hu, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError("remove_structures works on one 2-D image; call it per slice")
    out = img.copy()
    h, w = img.shape
    regions = [
        ndimage.binary_dilation(np.asarray(m, bool), iterations=dilate_px)
        if dilate_px > 0
        else np.asarray(m, bool)
        for m in masks
    ]
    structures = _union(img.shape, list(regions) + list(avoid or ()))
    blocked = ndimage.binary_dilation(structures, iterations=ring_px) if structures.any() else structures
    source_ok = ~blocked if body is None else (~blocked & np.asarray(body, bool))
    for region in regions:
        if not region.any():
            continue
        ring = ndimage.binary_dilation(region, iterations=ring_px) & ~structures
        if ring.sum() < 3:
            ring = ndimage.binary_dilation(region, iterations=ring_px) & ~region
        ring = _robust_inliers(out, ring)
        coef = _plane_fit(out, ring)
        ring_sd = float(np.std(out[ring] - _plane_eval(coef, ring)))
        rows, cols = np.nonzero(region)
        extent = max(int(np.ptp(rows)), int(np.ptp(cols))) + 1
        reach = 3 * extent + 10
        best: np.ndarray | None = None
        best_gap = np.inf
        for _ in range(n_candidates):
            dr, dc = (int(v) for v in rng.integers(-reach, reach + 1, size=2))
            sr, sc = rows + dr, cols + dc
            if sr.min() < 0 or sc.min() < 0 or sr.max() >= h or sc.max() >= w:
                continue
            if not source_ok[sr, sc].all():
                continue
            src = np.zeros_like(region)
            src[sr, sc] = True
            patch = out[sr, sc]
            tex = patch - _plane_eval(_plane_fit(out, src), src)
            gap = abs(float(tex.std()) - ring_sd)
            if gap < best_gap:
                best, best_gap = tex, gap
        texture = best if best is not None else rng.normal(0.0, ring_sd, size=rows.size)
        out[rows, cols] = _plane_eval(coef, region) + texture
    return out.astype(np.float32)


def control_regions(
    mask: np.ndarray,
    like: Sequence[np.ndarray],
    n: int,
    rng: np.random.Generator,
    *,
    avoid: Sequence[np.ndarray] | None = None,
    margin_px: int = 2,
) -> list[np.ndarray]:
    """Same-shaped control regions at random non-overlapping positions inside ``mask``.

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean region (2-D image or N-D stack, e.g. the body mask) the controls must lie in.
    like : sequence of numpy.ndarray
        Template regions (same shape as ``mask``); control ``i`` copies the shape of
        ``like[i % len(like)]``. They are also excluded (with ``margin_px``) from the controls.
    n : int
        Number of controls wanted.
    rng : numpy.random.Generator
        Source of the positions.
    avoid : sequence of numpy.ndarray, optional
        Further regions to stay ``margin_px`` away from (real lesions, other positives).
    margin_px : int, optional
        Gap kept between any two regions.

    Returns
    -------
    list of numpy.ndarray
        Boolean masks; fewer than ``n`` when no position is left.
    """
    allowed = np.asarray(mask, dtype=bool).copy()
    if not like:
        raise ValueError("need at least one template region")
    taken = _union(allowed.shape, list(like) + list(avoid or ()))
    if taken.any():
        allowed &= ~(ndimage.binary_dilation(taken, iterations=margin_px) if margin_px > 0 else taken)
    out: list[np.ndarray] = []
    for i in range(n):
        tmpl = np.asarray(like[i % len(like)], dtype=bool)
        idx = np.nonzero(tmpl)
        if idx[0].size == 0:
            continue
        lo = [int(a.min()) for a in idx]
        hi = [int(a.max()) + 1 for a in idx]
        crop = tmpl[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        if any(s > t for s, t in zip(crop.shape, allowed.shape, strict=True)):
            continue
        # count[a] = number of template pixels that land on allowed pixels when anchored at a
        flipped = crop[tuple(slice(None, None, -1) for _ in crop.shape)].astype(np.float32)
        count = fftconvolve(allowed.astype(np.float32), flipped, mode="valid")
        anchors = np.flatnonzero(count > crop.sum() - 0.5)
        if anchors.size == 0:
            break
        anchor = np.unravel_index(int(rng.choice(anchors)), count.shape)
        region = np.zeros(allowed.shape, dtype=bool)
        region[tuple(slice(a, a + s) for a, s in zip(anchor, crop.shape, strict=True))] = crop
        out.append(region)
        allowed &= ~(ndimage.binary_dilation(region, iterations=margin_px) if margin_px > 0 else region)
    return out


def region_scores(score_map: np.ndarray, masks: Sequence[np.ndarray], reduce: Reduce = "max") -> np.ndarray:
    """One score per region: the max (default) or mean of the map over it.

    Parameters
    ----------
    score_map : numpy.ndarray
        Hallucination map (any shape).
    masks : sequence of numpy.ndarray
        Boolean regions of the same shape.
    reduce : {"max", "mean"}, optional
        Reduction over the region.

    Returns
    -------
    numpy.ndarray
        float64 scores, one per mask (NaN for an empty mask).
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    score = np.asarray(score_map, dtype=np.float64)
    vals = []
    for m in masks:
        mm = np.asarray(m, dtype=bool)
        if mm.shape != score.shape:
            raise ValueError(f"mask shape {mm.shape} does not match score map {score.shape}")
        if not mm.any():
            vals.append(float("nan"))
        else:
            vals.append(float(score[mm].max() if reduce == "max" else score[mm].mean()))
    return np.asarray(vals, dtype=np.float64)


def _labelled_scores(
    score_map: np.ndarray,
    positive_masks: Sequence[np.ndarray],
    negative_masks: Sequence[np.ndarray],
    reduce: Reduce,
) -> tuple[np.ndarray, np.ndarray]:
    pos = region_scores(score_map, positive_masks, reduce)
    neg = region_scores(score_map, negative_masks, reduce)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("need at least one positive and one negative region")
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    keep = np.isfinite(scores)
    return labels[keep], scores[keep]


def region_auroc(
    score_map: np.ndarray,
    positive_masks: Sequence[np.ndarray],
    negative_masks: Sequence[np.ndarray],
    reduce: Reduce = "max",
) -> float:
    """Area under the ROC curve of region scores: altered (positive) vs unaltered (negative) regions.

    Parameters
    ----------
    score_map : numpy.ndarray
        Hallucination map.
    positive_masks : sequence of numpy.ndarray
        Altered regions (inserted blobs, removed structures).
    negative_masks : sequence of numpy.ndarray
        Unaltered control regions of the same shapes (:func:`control_regions`).
    reduce : {"max", "mean"}, optional
        Region score (max of the map over the region by default).

    Returns
    -------
    float
        AUROC (scikit-learn ``roc_auc_score``); 1 = perfect separation, 0.5 = chance.
    """
    labels, scores = _labelled_scores(score_map, positive_masks, negative_masks, reduce)
    return float(roc_auc_score(labels, scores))


def hallucination_roc(
    score_map: np.ndarray,
    positive_masks: Sequence[np.ndarray],
    negative_masks: Sequence[np.ndarray],
    reduce: Reduce = "max",
) -> HallucinationResult:
    """ROC curve and AUROC of region scores, in the report's format.

    Parameters
    ----------
    score_map, positive_masks, negative_masks, reduce
        See :func:`region_auroc`. To pool several images, pass lists of per-image score maps
        by calling :func:`region_scores` yourself, or stack the images and masks into arrays.

    Returns
    -------
    HallucinationResult
        ``auroc``, ``fpr``, ``tpr``, ``n_positive``, ``n_negative``, ``reduce``.
    """
    labels, scores = _labelled_scores(score_map, positive_masks, negative_masks, reduce)
    fpr, tpr, _ = roc_curve(labels, scores)
    return HallucinationResult(
        auroc=float(roc_auc_score(labels, scores)),
        fpr=fpr.tolist(),
        tpr=tpr.tolist(),
        n_positive=int(labels.sum()),
        n_negative=int((labels == 0).sum()),
        reduce=reduce,
    )
