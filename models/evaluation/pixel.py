"""Level 1: pixel-wise fidelity of a restored stack against its reference (RMSE, PSNR, SSIM, MS-SSIM).

Conventions (all metrics work on a stack of 2-D slices ``(slices, H, W)``; a single 2-D image is
treated as one slice):

* Both images are clipped to the display ``window`` (default -1000..1000 HU) first, so a
  difference outside the window does not count beyond the window edge. The data range of PSNR,
  SSIM and MS-SSIM is the window width ``W = hi - lo``.
* **RMSE** (HU) and **PSNR** (dB, ``10 log10(W**2 / MSE)``) use the pixels inside ``mask`` only.
  Pooled values use every mask pixel of the stack; per-slice values use that slice's mask pixels.
* **SSIM** is scikit-image's :func:`~skimage.metrics.structural_similarity` with Wang et al.'s
  settings (Gaussian window sigma 1.5, i.e. 11 x 11, population covariance, K1 = 0.01,
  K2 = 0.03) on the clipped images shifted to ``[0, W]`` (SSIM's luminance term is not shift
  invariant; the usual convention is a non-negative image range). The SSIM *map* is averaged over
  the **mask region** (not its bounding box), excluding the 5-pixel image border where the window
  is incomplete.
* **MS-SSIM** follows MONAI's ``compute_ms_ssim`` exactly (Gaussian 11 x 11 window, sigma 1.5,
  no padding, 2 x 2 average pooling between scales, ``relu`` of the mean contrast-structure term at
  every scale but the last, mean SSIM at the last, standard weights 0.0448, 0.2856, 0.3001,
  0.2363, 0.1333) but is computed here in float64: MONAI casts to float32, and on CT values the
  variance terms ``E[x^2] - E[x]^2`` then lose ~1e-4 of MS-SSIM to cancellation (the tests check
  agreement with MONAI to that level). It is taken on the **bounding box of the mask**, slice by
  slice, images clipped and shifted to ``[0, W]``. Five scales need a box of at least 176 px per
  side; smaller boxes use fewer scales (the largest number that fits, see :func:`ms_ssim_scales`)
  with the first weights renormalised to sum to 1 (one scale is plain SSIM); boxes under 11 px give
  NaN. The scales used are reported per slice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from models.evaluation.results import PixelResult

#: Standard MS-SSIM scale weights (Wang, Simoncelli & Bovik 2003).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: Gaussian SSIM window: sigma and the resulting size (skimage: 2 * int(3.5 * sigma + 0.5) + 1).
SSIM_SIGMA = 1.5
SSIM_WIN = 11


def _as_stack(a: np.ndarray) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected (H, W) or (slices, H, W), got shape {arr.shape}")
    return arr


def _stack_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask, dtype=bool)
    if m.ndim == 2:
        m = np.broadcast_to(m[None], shape)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match image stack {shape}")
    return m


def ms_ssim_scales(shape: Sequence[int], kernel_size: int = SSIM_WIN, max_scales: int = 5) -> int:
    """Largest number of MS-SSIM scales (at most ``max_scales``) that an image of ``shape`` supports.

    A scale count ``n`` is allowed when every side ``s`` passes MONAI's size check
    ``s // max(1, n - 1)**2 > kernel_size - 1`` and the coarsest scale ``s // 2**(n - 1)`` is still at
    least ``kernel_size`` (the window is applied without padding).

    Parameters
    ----------
    shape : sequence of int
        Spatial shape ``(H, W)``.
    kernel_size : int, optional
        Gaussian window size (11).
    max_scales : int, optional
        Upper bound (5, the standard MS-SSIM).

    Returns
    -------
    int
        Number of scales, 0 if even one scale does not fit.
    """
    for n in range(max_scales, 0, -1):
        div = max(1, n - 1) ** 2
        if all(s // div > kernel_size - 1 and s // 2 ** (n - 1) >= kernel_size for s in shape):
            return n
    return 0


def _bbox(mask2d: np.ndarray) -> tuple[slice, slice] | None:
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    if rows.size == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def ms_ssim(pred: np.ndarray, ref: np.ndarray, data_range: float) -> tuple[float, int]:
    """MS-SSIM of one 2-D image pair (already clipped and shifted to ``[0, data_range]``).

    Parameters
    ----------
    pred, ref : numpy.ndarray
        2-D images of the same shape.
    data_range : float
        Dynamic range of the images.

    Returns
    -------
    tuple of (float, int)
        MS-SSIM value (NaN if the image is smaller than one window) and the number of scales used
        (weights: the first ``n`` of :data:`MS_SSIM_WEIGHTS`, renormalised).
    """
    n = ms_ssim_scales(pred.shape)
    if n == 0:
        return float("nan"), 0
    w = np.asarray(MS_SSIM_WEIGHTS[:n], dtype=np.float64)
    w = w / w.sum()
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(ref, dtype=np.float64)
    c1 = (0.01 * float(data_range)) ** 2
    c2 = (0.03 * float(data_range)) ** 2
    terms = []
    for scale in range(n):
        ssim_map, cs_map = _ssim_cs_valid(x, y, c1, c2)
        if scale < n - 1:
            terms.append(max(float(cs_map.mean()), 0.0))
            x, y = _avg_pool2(x), _avg_pool2(y)
        else:
            terms.append(max(float(ssim_map.mean()), 0.0))
    return float(np.prod(np.asarray(terms) ** w)), n


def _gaussian_1d(size: int = SSIM_WIN, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """MONAI's normalised 1-D Gaussian window (offsets ``(1 - size) / 2 .. (size - 1) / 2``)."""
    dist = np.arange((1 - size) / 2.0, (1 + size) / 2.0, 1.0)
    g = np.exp(-0.5 * (dist / sigma) ** 2)
    return g / g.sum()


def _ssim_cs_valid(x: np.ndarray, y: np.ndarray, c1: float, c2: float) -> tuple[np.ndarray, np.ndarray]:
    """SSIM and contrast-structure maps with a Gaussian window and no padding ("valid")."""
    g = _gaussian_1d()
    r = (g.size - 1) // 2

    def filt(a: np.ndarray) -> np.ndarray:
        out = ndimage.correlate1d(
            ndimage.correlate1d(a, g, axis=0, mode="constant"), g, axis=1, mode="constant"
        )
        return out[r:-r, r:-r]

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x * mu_x
    syy = filt(y * y) - mu_y * mu_y
    sxy = filt(x * y) - mu_x * mu_y
    cs = (2.0 * sxy + c2) / (sxx + syy + c2)
    lum = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return lum * cs, cs


def _avg_pool2(a: np.ndarray) -> np.ndarray:
    h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
    return a[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def psnr_from_mse(mse: float, data_range: float) -> float:
    """PSNR in dB, ``10 log10(data_range**2 / mse)`` (``inf`` for ``mse == 0``, NaN for NaN).

    Parameters
    ----------
    mse : float
        Mean squared error.
    data_range : float
        Dynamic range (window width).

    Returns
    -------
    float
        PSNR in dB.
    """
    if not math.isfinite(mse):
        return float("nan")
    if mse <= 0.0:
        return float("inf")
    return float(10.0 * math.log10(data_range**2 / mse))


def pixel_metrics(
    pred_hu: np.ndarray,
    ref_hu: np.ndarray,
    mask: np.ndarray | None = None,
    window: tuple[float, float] = (-1000.0, 1000.0),
    *,
    with_ms_ssim: bool = True,
) -> PixelResult:
    """RMSE, PSNR, SSIM and MS-SSIM of a restored stack against its reference, pooled and per slice.

    Parameters
    ----------
    pred_hu : numpy.ndarray
        Restored (or any test) images in HU, ``(slices, H, W)`` or ``(H, W)``.
    ref_hu : numpy.ndarray
        Reference images in HU, same shape.
    mask : numpy.ndarray, optional
        Boolean region of interest, same shape or ``(H, W)`` (applied to every slice); default all
        pixels. Typically the body mask.
    window : tuple of float, optional
        ``(lo, hi)`` HU window; images are clipped to it and the data range is ``hi - lo``.
    with_ms_ssim : bool, optional
        Set False to skip MS-SSIM (NaN), e.g. for speed.

    Returns
    -------
    PixelResult
        ``rmse_hu``, ``psnr_db``, ``ssim`` (pooled over all mask pixels), ``ms_ssim`` (mean over
        slices), ``per_slice`` lists of the same four, ``ms_ssim_scales`` per slice, ``n_pixels``,
        ``n_slices``, ``window``, ``ssim_region`` (``"mask"``) and ``ms_ssim_region``
        (``"mask bounding box"``). Slices with an empty mask give NaN.
    """
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise ValueError(f"window {window} must be increasing")
    width = hi - lo
    pred = _as_stack(pred_hu).astype(np.float64)
    ref = _as_stack(ref_hu).astype(np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {ref.shape}")
    m = _stack_mask(mask, pred.shape)
    p = np.clip(pred, lo, hi) - lo
    r = np.clip(ref, lo, hi) - lo
    sq = (p - r) ** 2
    pad = (SSIM_WIN - 1) // 2
    interior = np.zeros(pred.shape[1:], dtype=bool)
    interior[pad:-pad, pad:-pad] = True

    per: dict[str, list[float]] = {"rmse_hu": [], "psnr_db": [], "ssim": [], "ms_ssim": []}
    scales: list[int] = []
    ssim_sum, ssim_n = 0.0, 0
    for k in range(pred.shape[0]):
        mk = m[k]
        n_k = int(mk.sum())
        mse_k = float(sq[k][mk].mean()) if n_k else float("nan")
        per["rmse_hu"].append(math.sqrt(mse_k) if n_k else float("nan"))
        per["psnr_db"].append(psnr_from_mse(mse_k, width))
        region = mk & interior
        if region.any():
            _, smap = structural_similarity(
                r[k],
                p[k],
                data_range=width,
                gaussian_weights=True,
                sigma=SSIM_SIGMA,
                use_sample_covariance=False,
                full=True,
            )
            vals = smap[region]
            per["ssim"].append(float(vals.mean()))
            ssim_sum += float(vals.sum())
            ssim_n += int(vals.size)
        else:
            per["ssim"].append(float("nan"))
        box = _bbox(mk)
        if with_ms_ssim and box is not None:
            value, n_scales = ms_ssim(p[k][box], r[k][box], width)
        else:
            value, n_scales = float("nan"), 0
        per["ms_ssim"].append(value)
        scales.append(n_scales)

    n_total = int(m.sum())
    mse = float(sq[m].mean()) if n_total else float("nan")
    ms_vals = np.asarray(per["ms_ssim"], dtype=np.float64)
    return PixelResult(
        rmse_hu=math.sqrt(mse) if n_total else float("nan"),
        psnr_db=psnr_from_mse(mse, width),
        ssim=ssim_sum / ssim_n if ssim_n else float("nan"),
        ms_ssim=float(np.nanmean(ms_vals)) if np.isfinite(ms_vals).any() else float("nan"),
        n_pixels=n_total,
        n_slices=int(pred.shape[0]),
        window=[lo, hi],
        ssim_region="mask",
        ms_ssim_region="mask bounding box",
        ms_ssim_scales=scales,
        per_slice=per,
    )
