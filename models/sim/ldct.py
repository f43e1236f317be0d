"""Low-dose CT simulation in the projection domain, and the training/evaluation case factory.

Chain (monochromatic, parallel beam, one 2-D slice at a time)::

    HU --(hu_to_mu)--> mu --(line integrals)--> p --> N = Poisson(I0 * dose * exp(-p)) + e,
    e ~ Normal(0, sigma_e) --> p_hat = -log(max(N, eps) / (I0 * dose)) --(FBP)--> mu_hat --> HU

The noise-free sinogram ``p`` is computed once per slice; the full-dose *reference* and the
*low-dose* image are two independent noise draws pushed through the *same* reconstruction, so the
pair differs by noise texture only (no blur or bias difference).

Projector and FBP
-----------------
Both operators work in Fourier space (Fourier-slice theorem) with a non-uniform FFT implemented
here (Kaiser-Bessel gridding, 2x oversampling, kernel width 5, precomputed sparse interpolation
matrix, cached per geometry):

* forward projection: 2-D FFT of the (de-apodised, zero-padded) image, interpolation onto the polar
  grid ``(rho cos(theta), -rho sin(theta))``, a ``sinc(rho)`` detector-aperture factor (box detector
  of one bin), inverse 1-D FFT per view -> line integrals of the pixel image (band-limited);
* FBP: 1-D FFT of each zero-padded projection, ramp filter (the Kak-Slaney spatial-domain ramp, as
  in scikit-image, so the DC term is right) times an apodisation window (default Shepp-Logan) times
  ``sinc(rho)**2`` (the frequency response of the linear interpolation of a conventional
  voxel-driven back-projector), then exact back-projection as an adjoint NUFFT.

Geometry follows :func:`skimage.transform.radon` / ``iradon`` with ``circle=True``: square image of
``n`` pixels, ``n`` detector bins of one pixel width centred on ``n // 2``, ``t = x cos(theta) -
y sin(theta)`` with ``x`` the column and ``y`` the row offset, ``theta`` uniformly in [0, pi).
Anything outside the inscribed circle (the scan field of view) is ignored by the projector and set
to -1000 HU in reconstructions.

Physics constants (see the module constants): full-dose ``I0 = 1.5e5`` photons per detector bin
per view (unattenuated; 4e5 for head cases in :func:`make_case`), electronic noise sigma 5 counts,
count floor ``eps = 1``, default dose fraction 0.25, ``mu_water = 0.0193 / mm``; number of views
``ceil(pi / 2 * n)`` (403 at 256 px, 805 at 512 px). Speed on 2 cores: a 256 px pair ~0.04 s, a
512 px pair ~0.18 s (plus a one-off 0.1-0.5 s to build the projector). Not modelled: polychromatic
spectrum / beam hardening, bowtie filter, scatter, fan/cone geometry, detector crosstalk, tube-current
modulation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.fft
import scipy.sparse
from scipy.special import i0 as bessel_i0

from models.sim.anatomy import AnatomySlice, Lesion, chest_slice, head_slice
from models.sim.ctphysics import HU_AIR, MU_WATER_PER_MM, draw_hu_model, hu_to_mu, mu_to_hu, phantom_hu

#: Unattenuated photons per detector bin per view at full dose (dose fraction 1.0).
I0_FULL_DOSE = 1.5e5
#: Full-dose I0 per anatomy used by :func:`make_case`: head protocols run ~2-3x the mAs of chest
#: protocols (CTDIvol ~50-60 mGy vs ~10-15 mGy), and the skull would otherwise bury the 10-15 HU
#: grey/white contrast in noise at 1 mm pixels.
FULL_DOSE_I0: dict[str, float] = {"head": 4.0e5, "chest": I0_FULL_DOSE}
#: Standard deviation of the additive electronic (detector read-out) noise, in counts.
ELECTRONIC_NOISE_COUNTS = 5.0
#: Floor applied to the measured counts before the log (photon starvation guard), in counts.
COUNT_FLOOR = 1.0
#: Default low-dose fraction of the full-dose I0.
DEFAULT_DOSE = 0.25

FilterName = Literal["ramp", "shepp-logan", "cosine", "hamming", "hann"]
Interpolation = Literal["linear", "nearest", "sinc"]


def default_views(size: int) -> int:
    """Number of projection views used when none is given: ``ceil(pi / 2 * size)``.

    Parameters
    ----------
    size : int
        Image matrix size in pixels.

    Returns
    -------
    int
        Number of views over 180 degrees.
    """
    return int(math.ceil(math.pi / 2.0 * size))


def _kaiser_bessel(s: np.ndarray, width: int, beta: float) -> np.ndarray:
    arg = 1.0 - (2.0 * s / width) ** 2
    out = bessel_i0(beta * np.sqrt(np.clip(arg, 0.0, None))) / bessel_i0(beta)
    return np.where(arg >= 0.0, out, 0.0)


class ParallelBeam:
    """Parallel-beam projector and FBP for ``size x size`` images (Fourier-domain, NUFFT based).

    Parameters
    ----------
    size : int
        Image matrix size (square); also the number of detector bins.
    n_views : int, optional
        Number of views over [0, pi); default :func:`default_views`.
    kernel_width : int, optional
        Kaiser-Bessel gridding kernel width in oversampled grid points (accuracy ~1e-4 at 5).

    Notes
    -----
    Images are attenuation *per pixel* (``mu_per_mm * pixel_mm``), so sinograms are dimensionless
    line integrals. Use :func:`parallel_beam` to get a cached instance.
    """

    def __init__(self, size: int, n_views: int | None = None, kernel_width: int = 5) -> None:
        self.size = n = int(size)
        self.n_views = v = int(n_views) if n_views else default_views(n)
        self.n_det = n
        self.fft_len = lf = 2 * n  # zero padding for linear (not circular) filtering
        self.grid = m = 2 * n  # 2x oversampled Cartesian grid
        self.center = n // 2
        self.theta = np.arange(v) * (np.pi / v)
        rho = np.arange(lf // 2 + 1) / lf  # cycles per bin, 0 .. 0.5
        self.rho = rho
        w = int(kernel_width)
        sigma = m / n
        beta = np.pi * math.sqrt((w / sigma) ** 2 * (sigma - 0.5) ** 2 - 0.8)
        # Target points (frequency in cycles/pixel) -> oversampled grid units.
        u = (m * rho[None, :] * np.cos(self.theta)[:, None]).ravel()  # column frequency
        vv = (-m * rho[None, :] * np.sin(self.theta)[:, None]).ravel()  # row frequency
        offs = np.arange(w)
        kc = np.ceil(u - w / 2.0)[:, None] + offs[None, :]
        kr = np.ceil(vv - w / 2.0)[:, None] + offs[None, :]
        wc = _kaiser_bessel(u[:, None] - kc, w, beta)
        wr = _kaiser_bessel(vv[:, None] - kr, w, beta)
        data = (wr[:, :, None] * wc[:, None, :]).astype(np.float32).ravel()
        cols = ((kr.astype(np.int64) % m)[:, :, None] * m + (kc.astype(np.int64) % m)[:, None, :]).ravel()
        n_pts = u.size
        indptr = np.arange(0, n_pts * w * w + 1, w * w, dtype=np.int64)
        self._interp = scipy.sparse.csr_matrix(
            (data, cols.astype(np.int32), indptr.astype(np.int32)), shape=(n_pts, m * m)
        )
        self._spread = self._interp.T.tocsr()
        # De-apodisation: Fourier transform of the kernel at the pixel offsets (numerical quadrature).
        s = np.linspace(-w / 2.0, w / 2.0, 4001)
        ker = _kaiser_bessel(s, w, beta)
        offsets = np.arange(n) - self.center
        ds = s[1] - s[0]
        deap = (ker[None, :] * np.cos(2.0 * np.pi * s[None, :] * offsets[:, None] / m)).sum(axis=1) * ds
        self._deap = deap.astype(np.float32)
        self._pix_idx = offsets % m  # pixel offset -> oversampled grid index
        self._det_idx = (np.arange(n) - n // 2) % lf  # detector bin -> padded projection index
        yy, xx = np.ogrid[:n, :n]
        self.fov_mask = ((yy - self.center) ** 2 + (xx - self.center) ** 2) <= (n // 2) ** 2

    # -- forward -----------------------------------------------------------------------------
    def project(self, image: np.ndarray) -> np.ndarray:
        """Line integrals of one image or a batch of images.

        Parameters
        ----------
        image : numpy.ndarray
            ``(size, size)`` or ``(batch, size, size)`` attenuation per pixel; values outside the
            inscribed circle are ignored.

        Returns
        -------
        numpy.ndarray
            float32 sinogram ``(n_views, size)`` or ``(batch, n_views, size)``.
        """
        img = np.asarray(image, dtype=np.float32)
        single = img.ndim == 2
        if single:
            img = img[None]
        b, m = img.shape[0], self.grid
        g = np.where(self.fov_mask, img, 0.0) / (self._deap[:, None] * self._deap[None, :])
        pad = np.zeros((m, m, b), dtype=np.complex64)
        pad[np.ix_(self._pix_idx, self._pix_idx)] = np.moveaxis(g, 0, -1)
        spec = scipy.fft.fft2(pad, axes=(0, 1), workers=-1, overwrite_x=True)
        flat = np.ascontiguousarray(spec.reshape(m * m, b)).view(np.float32)
        polar = np.ascontiguousarray(self._interp @ flat).view(np.complex64)  # (n_pts, b)
        polar = polar.reshape(self.n_views, self.rho.size, b) * np.sinc(self.rho)[None, :, None]
        proj = scipy.fft.irfft(polar, n=self.fft_len, axis=1, workers=-1)  # (views, L, b)
        sino = np.moveaxis(proj[:, self._det_idx, :], -1, 0).astype(np.float32)
        return sino[0] if single else sino

    # -- reconstruction ----------------------------------------------------------------------
    @functools.lru_cache(maxsize=16)  # noqa: B019 - instances are themselves cached and long-lived
    def _filter(self, name: str, interpolation: str) -> np.ndarray:
        lf = self.fft_len
        ramp = np.zeros(lf)
        ramp[0] = 0.25
        k = np.concatenate([np.arange(1, lf // 2 + 1, 2), np.arange(lf // 2 - 1, 0, -2)])
        ramp[1::2] = -1.0 / (np.pi * k) ** 2
        h = 2.0 * np.real(np.fft.fft(ramp))[: lf // 2 + 1]
        rho = self.rho
        if name == "shepp-logan":
            h = h * np.sinc(rho)
        elif name == "cosine":
            h = h * np.cos(np.pi * rho)
        elif name == "hamming":
            h = h * (0.54 + 0.46 * np.cos(2.0 * np.pi * rho))
        elif name == "hann":
            h = h * (0.5 + 0.5 * np.cos(2.0 * np.pi * rho))
        elif name != "ramp":
            raise ValueError(f"unknown filter {name!r}")
        if interpolation == "linear":
            h = h * np.sinc(rho) ** 2
        elif interpolation == "nearest":
            h = h * np.sinc(rho)
        elif interpolation != "sinc":
            raise ValueError(f"unknown interpolation {interpolation!r}")
        weights = np.full(rho.size, 2.0)
        weights[0] = weights[-1] = 1.0
        return (h * weights * np.pi / (2.0 * self.n_views * lf)).astype(np.float32)

    def fbp(
        self,
        sinogram: np.ndarray,
        filter_name: FilterName = "shepp-logan",
        interpolation: Interpolation = "linear",
    ) -> np.ndarray:
        """Filtered back-projection of one sinogram or a batch.

        Parameters
        ----------
        sinogram : numpy.ndarray
            ``(n_views, size)`` or ``(batch, n_views, size)`` line integrals.
        filter_name : str, optional
            Apodisation of the ramp: ``"ramp"``, ``"shepp-logan"`` (default), ``"cosine"``,
            ``"hamming"`` or ``"hann"`` (same definitions as scikit-image).
        interpolation : str, optional
            Frequency response of the emulated back-projection interpolation: ``"linear"``
            (default, ``sinc**2``), ``"nearest"`` (``sinc``) or ``"sinc"`` (none, ideal).

        Returns
        -------
        numpy.ndarray
            float32 attenuation per pixel, ``(size, size)`` or ``(batch, size, size)``; zero outside
            the field-of-view circle.
        """
        sino = np.asarray(sinogram, dtype=np.float32)
        single = sino.ndim == 2
        if single:
            sino = sino[None]
        b, m = sino.shape[0], self.grid
        pad = np.zeros((self.n_views, self.fft_len, b), dtype=np.float32)
        pad[:, self._det_idx, :] = np.moveaxis(sino, 0, -1)
        spec = scipy.fft.rfft(pad, axis=1, workers=-1)  # (views, L/2+1, b)
        spec *= self._filter(filter_name, interpolation)[None, :, None]
        flat = np.ascontiguousarray(spec.astype(np.complex64).reshape(-1, b)).view(np.float32)
        grid = np.ascontiguousarray(self._spread @ flat).view(np.complex64).reshape(m, m, b)
        img = scipy.fft.ifft2(grid, axes=(0, 1), workers=-1, overwrite_x=True)
        img = img[np.ix_(self._pix_idx, self._pix_idx)].real * np.float32(m * m)
        img = img / (self._deap[:, None, None] * self._deap[None, :, None])
        out = np.where(self.fov_mask[None], np.moveaxis(img, -1, 0), 0.0).astype(np.float32)
        return out[0] if single else out


@functools.lru_cache(maxsize=8)
def parallel_beam(size: int, n_views: int | None = None) -> ParallelBeam:
    """Cached :class:`ParallelBeam` for a matrix size and number of views.

    Parameters
    ----------
    size : int
        Image matrix size.
    n_views : int, optional
        Views over 180 degrees (default :func:`default_views`).

    Returns
    -------
    ParallelBeam
        The (shared, read-only) projector; building one takes ~0.1 s at 256 px, ~0.5 s at 512 px.
    """
    return ParallelBeam(size, n_views or default_views(size))


def transmit(
    line_integrals: np.ndarray,
    i0: float,
    rng: np.random.Generator | None,
    *,
    electronic_noise: float = ELECTRONIC_NOISE_COUNTS,
    count_floor: float = COUNT_FLOOR,
) -> np.ndarray:
    """Noisy line integrals: Poisson photon counts plus Gaussian electronic noise, then safe log.

    Parameters
    ----------
    line_integrals : numpy.ndarray
        Noise-free line integrals ``p`` (dimensionless).
    i0 : float
        Unattenuated photons per detector bin per view (already scaled by the dose fraction);
        ``inf`` returns ``p`` unchanged (noise-free).
    rng : numpy.random.Generator or None
        Source of randomness (required unless ``i0`` is infinite).
    electronic_noise : float, optional
        Standard deviation of the additive Gaussian read-out noise, in counts.
    count_floor : float, optional
        Counts are floored at this value before the log (photon-starvation guard).

    Returns
    -------
    numpy.ndarray
        float32 ``p_hat = -log(max(N, eps) / i0)``.
    """
    p = np.asarray(line_integrals, dtype=np.float32)
    if not np.isfinite(i0):
        return p.copy()
    if rng is None:
        raise ValueError("rng is required for a finite i0")
    expected = i0 * np.exp(-p.astype(np.float64))
    counts = rng.poisson(expected).astype(np.float64)
    if electronic_noise > 0:
        counts += electronic_noise * rng.standard_normal(counts.shape)
    return (-np.log(np.maximum(counts, count_floor) / i0)).astype(np.float32)


def simulate_doses(
    hu: np.ndarray,
    pixel_mm: float,
    doses: Sequence[float],
    rng: np.random.Generator | None,
    *,
    i0: float = I0_FULL_DOSE,
    electronic_noise: float = ELECTRONIC_NOISE_COUNTS,
    n_views: int | None = None,
    filter_name: FilterName = "shepp-logan",
    interpolation: Interpolation = "linear",
) -> np.ndarray:
    """Reconstruct one or more slices at several dose levels from one noise-free sinogram each.

    Parameters
    ----------
    hu : numpy.ndarray
        ``(size, size)`` slice or ``(batch, size, size)`` slices in HU.
    pixel_mm : float
        Pixel spacing in mm.
    doses : sequence of float
        Dose fractions of ``i0``; ``inf`` gives the noise-free reconstruction. Noise is drawn in
        the order given (slice-major), so a fixed seed and a fixed first dose give a fixed first image.
    rng : numpy.random.Generator or None
        Source of the acquisition noise (may be None when all doses are infinite).
    i0 : float, optional
        Full-dose unattenuated photons per detector bin per view.
    electronic_noise : float, optional
        Electronic noise sigma in counts.
    n_views : int, optional
        Number of views (default :func:`default_views`).
    filter_name, interpolation : str, optional
        Reconstruction filter, see :meth:`ParallelBeam.fbp`.

    Returns
    -------
    numpy.ndarray
        float32 HU, ``(len(doses), size, size)`` or ``(batch, len(doses), size, size)``.
    """
    arr = np.asarray(hu, dtype=np.float32)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    if arr.shape[-1] != arr.shape[-2]:
        raise ValueError(f"slices must be square, got {arr.shape[-2:]}")
    geo = parallel_beam(arr.shape[-1], n_views)
    mu_px = np.clip(hu_to_mu(arr), 0.0, None) * np.float32(pixel_mm)
    sino = geo.project(mu_px)  # (b, views, det)
    noisy = np.stack(
        [transmit(s, i0 * d, rng, electronic_noise=electronic_noise) for s in sino for d in doses]
    )
    mu = geo.fbp(noisy, filter_name, interpolation) / np.float32(pixel_mm)
    out = np.where(geo.fov_mask, mu_to_hu(mu), np.float32(HU_AIR)).astype(np.float32)
    out = out.reshape(arr.shape[0], len(doses), *arr.shape[1:])
    return out[0] if single else out


def simulate_pair(
    hu_slice: np.ndarray,
    pixel_mm: float,
    dose: float = DEFAULT_DOSE,
    rng: np.random.Generator | None = None,
    *,
    reference_dose: float = 1.0,
    i0: float = I0_FULL_DOSE,
    electronic_noise: float = ELECTRONIC_NOISE_COUNTS,
    n_views: int | None = None,
    filter_name: FilterName = "shepp-logan",
    interpolation: Interpolation = "linear",
) -> tuple[np.ndarray, np.ndarray]:
    """Full-dose reference and low-dose reconstruction of one HU slice (same chain, same sinogram).

    Parameters
    ----------
    hu_slice : numpy.ndarray
        ``(size, size)`` HU image; the object must lie inside the inscribed circle.
    pixel_mm : float
        Pixel spacing in mm.
    dose : float, optional
        Low-dose fraction of the full-dose ``i0`` (default 0.25).
    rng : numpy.random.Generator, optional
        Source of the noise (a fresh unseeded generator when omitted).
    reference_dose : float, optional
        Dose fraction of the reference (1.0; ``inf`` for a noise-free reference).
    i0, electronic_noise, n_views, filter_name, interpolation
        See :func:`simulate_doses`.

    Returns
    -------
    tuple of numpy.ndarray
        ``(reference_hu, low_dose_hu)``, float32 ``(size, size)`` each; the reference noise is drawn
        first, so for a fixed seed the reference does not depend on ``dose``.
    """
    rng = np.random.default_rng() if rng is None else rng
    out = simulate_doses(
        hu_slice,
        pixel_mm,
        (reference_dose, dose),
        rng,
        i0=i0,
        electronic_noise=electronic_noise,
        n_views=n_views,
        filter_name=filter_name,
        interpolation=interpolation,
    )
    return out[0], out[1]


def simulate_volume(
    hu_volume: np.ndarray,
    pixel_mm: float,
    dose: float = DEFAULT_DOSE,
    rng: np.random.Generator | None = None,
    *,
    batch: int = 8,
    reference_dose: float = 1.0,
    i0: float = I0_FULL_DOSE,
    electronic_noise: float = ELECTRONIC_NOISE_COUNTS,
    n_views: int | None = None,
    filter_name: FilterName = "shepp-logan",
    interpolation: Interpolation = "linear",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`simulate_pair` for a stack of axial slices, processed in batches (slice-by-slice physics).

    Parameters
    ----------
    hu_volume : numpy.ndarray
        ``(slices, size, size)`` HU volume.
    pixel_mm : float
        In-plane pixel spacing in mm.
    dose : float, optional
        Low-dose fraction (default 0.25).
    rng : numpy.random.Generator, optional
        Source of the noise.
    batch : int, optional
        Slices per vectorised batch (memory ~ 40 MB per 512-px slice in flight).
    reference_dose, i0, electronic_noise, n_views, filter_name, interpolation
        See :func:`simulate_pair`.

    Returns
    -------
    tuple of numpy.ndarray
        ``(reference_hu, low_dose_hu)``, float32 volumes shaped like the input.
    """
    rng = np.random.default_rng() if rng is None else rng
    vol = np.asarray(hu_volume, dtype=np.float32)
    ref = np.empty_like(vol)
    low = np.empty_like(vol)
    for k in range(0, vol.shape[0], max(1, batch)):
        out = simulate_doses(
            vol[k : k + batch],
            pixel_mm,
            (reference_dose, dose),
            rng,
            i0=i0,
            electronic_noise=electronic_noise,
            n_views=n_views,
            filter_name=filter_name,
            interpolation=interpolation,
        )
        ref[k : k + batch] = out[:, 0]
        low[k : k + batch] = out[:, 1]
    return ref, low


# -- noise power spectrum ---------------------------------------------------------------------
def _roi_corners(mask: np.ndarray, roi_size: int) -> list[tuple[int, int]]:
    """Top-left corners of square ROIs (half-overlapping tiling) lying entirely inside ``mask``."""
    h, w = mask.shape
    integral = np.pad(np.cumsum(np.cumsum(mask.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
    step = max(1, roi_size // 2)
    corners = []
    for r in range(0, h - roi_size + 1, step):
        for c in range(0, w - roi_size + 1, step):
            total = (
                integral[r + roi_size, c + roi_size]
                - integral[r, c + roi_size]
                - integral[r + roi_size, c]
                + integral[r, c]
            )
            if total == roi_size * roi_size:
                corners.append((r, c))
    return corners


def noise_power_spectrum(
    low_dose_hu: np.ndarray,
    reference_hu: np.ndarray | None,
    pixel_mm: float,
    roi: np.ndarray | Sequence[tuple[int, int]] | None = None,
    *,
    roi_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged noise power spectrum of the difference image ``low_dose - reference``.

    Standard ensemble estimate: every square ROI of the difference is mean-subtracted, its
    ``|FFT|**2 * pixel_mm**2 / roi_size**2`` is averaged over ROIs, and the 2-D NPS is averaged in
    radial frequency bins of width ``1 / (roi_size * pixel_mm)`` up to the Nyquist frequency.

    Parameters
    ----------
    low_dose_hu : numpy.ndarray
        ``(H, W)`` noisy image in HU.
    reference_hu : numpy.ndarray or None
        ``(H, W)`` reference subtracted first (a noise-free or much higher-dose reconstruction of
        the same object gives the low-dose NPS; an equal-dose one gives twice it). None: use the
        image itself (only meaningful in a uniform region).
    pixel_mm : float
        Pixel spacing in mm.
    roi : numpy.ndarray or sequence of (row, col), optional
        A boolean mask of the uniform region (ROIs are tiled, half-overlapping, fully inside it), or
        explicit top-left ROI corners. Default: ROIs inside the central disc of radius 0.35 * size.
    roi_size : int, optional
        ROI side in pixels (default 32).

    Returns
    -------
    tuple of numpy.ndarray
        ``(frequencies_per_mm, nps)``: bin centres in 1/mm and NPS in HU^2 mm^2. Its integral over
        the 2-D frequency plane equals the noise variance of the difference image.
    """
    diff = np.asarray(low_dose_hu, dtype=np.float64)
    if reference_hu is not None:
        diff = diff - np.asarray(reference_hu, dtype=np.float64)
    h, w = diff.shape
    if roi is None:
        yy, xx = np.ogrid[:h, :w]
        roi = (yy - h / 2.0) ** 2 + (xx - w / 2.0) ** 2 <= (0.35 * min(h, w)) ** 2
    corners = _roi_corners(np.asarray(roi, bool), roi_size) if isinstance(roi, np.ndarray) else list(roi)
    if not corners:
        raise ValueError("no ROI of the requested size fits in the region")
    stack = np.stack([diff[r : r + roi_size, c : c + roi_size] for r, c in corners])
    stack = stack - stack.mean(axis=(1, 2), keepdims=True)
    power = np.mean(np.abs(np.fft.fft2(stack)) ** 2, axis=0) * pixel_mm**2 / roi_size**2
    f = np.fft.fftfreq(roi_size, d=pixel_mm)
    fr = np.hypot(f[:, None], f[None, :])
    df = 1.0 / (roi_size * pixel_mm)
    nyquist = 0.5 / pixel_mm
    edges = np.arange(0.0, nyquist + df, df) - df / 2.0
    edges[0] = 0.0
    which = np.digitize(fr.ravel(), edges) - 1
    n_bins = edges.size - 1
    sums = np.bincount(which[which < n_bins], power.ravel()[which < n_bins], minlength=n_bins)
    counts = np.bincount(which[which < n_bins], minlength=n_bins)
    centres = np.arange(n_bins) * df
    keep = counts > 0
    return centres[keep], sums[keep] / counts[keep]


# -- cases ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One simulated slice pair for training or evaluation.

    Attributes
    ----------
    anatomy : str
        ``"head"`` or ``"chest"``.
    seed : int
        Seed the case was made from.
    dose : float
        Low-dose fraction of the full-dose I0.
    pixel_mm : float
        Pixel spacing (square pixels), mm.
    reference_hu : numpy.ndarray
        Full-dose reconstruction (float32 HU).
    low_dose_hu : numpy.ndarray
        Low-dose reconstruction (float32 HU), same chain and sinogram as the reference.
    phantom_hu : numpy.ndarray
        Noise-free textured ground truth before acquisition (float32 HU).
    labels : numpy.ndarray
        ``uint8`` tissue labels (:class:`models.sim.ctphysics.Tissue`).
    body_mask : numpy.ndarray
        Boolean mask of the patient (inside the skin, air cavities included).
    lesions : tuple of Lesion
        Inserted low-contrast lesions; ``contrast_hu`` is exact in ``phantom_hu`` and
        ``reference_contrast_hu`` is the expected contrast measured in the reference.
    nodules : tuple of Lesion
        Lung nodules (chest only), anatomical findings with high contrast.
    """

    anatomy: str
    seed: int
    dose: float
    pixel_mm: float
    reference_hu: np.ndarray
    low_dose_hu: np.ndarray
    phantom_hu: np.ndarray
    labels: np.ndarray
    body_mask: np.ndarray
    lesions: tuple[Lesion, ...] = field(default=())
    nodules: tuple[Lesion, ...] = field(default=())

    @property
    def lesion_masks(self) -> list[np.ndarray]:
        """Boolean masks of the low-contrast lesions."""
        return [les.mask for les in self.lesions]

    @property
    def lesion_contrasts_hu(self) -> list[float]:
        """Requested (phantom) contrasts of the low-contrast lesions, in HU."""
        return [les.contrast_hu for les in self.lesions]


def lesion_core(mask: np.ndarray) -> np.ndarray:
    """Pixels of a lesion mask at least one pixel away from its edge (the centre pixel if none).

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean lesion mask.

    Returns
    -------
    numpy.ndarray
        Boolean core mask, never empty for a non-empty ``mask``.
    """
    from scipy.ndimage import binary_erosion, center_of_mass

    core = binary_erosion(mask)
    if core.any():
        return np.asarray(core, dtype=bool)
    out = np.zeros_like(mask, dtype=bool)
    r, c = (int(round(x)) for x in center_of_mass(mask))
    out[r, c] = True
    return out


def make_case(
    anatomy: Literal["head", "chest"],
    seed: int,
    size: int = 256,
    dose: float = DEFAULT_DOSE,
    *,
    fov_mm: float | None = None,
    level: float | None = None,
    n_lesions: int = 3,
    lesion_contrast_hu: tuple[float, float] = (10.0, 20.0),
    lesion_diameter_mm: tuple[float, float] = (2.0, 8.0),
    n_nodules: int | None = None,
    enhanced: bool | None = None,
    reference_dose: float = 1.0,
    i0: float | None = None,
    electronic_noise: float = ELECTRONIC_NOISE_COUNTS,
    n_views: int | None = None,
    filter_name: FilterName = "shepp-logan",
    interpolation: Interpolation = "linear",
    measure_lesions: bool = True,
) -> Case:
    """Simulate one reference / low-dose slice pair with its ground truth and annotations.

    The seed fixes everything: it is split into independent streams for the anatomy, the texture
    and the acquisition noise, so for one seed the anatomy, texture and *reference* are identical
    whatever ``dose`` is asked for.

    Parameters
    ----------
    anatomy : {"head", "chest"}
        MNI152-based head slice or procedural chest slice.
    seed : int
        Case seed.
    size : int, optional
        Matrix size (e.g. 128, 256 or 512).
    dose : float, optional
        Low-dose fraction of ``i0`` (default 0.25).
    fov_mm : float, optional
        Reconstruction field of view (default 250 mm head, 400 mm chest).
    level : float, optional
        Axial level in [0, 1] (head: skull base to vertex; chest: lung bases to apices); random if
        omitted.
    n_lesions : int, optional
        Number of low-contrast lesions to insert (fewer if they do not fit).
    lesion_contrast_hu : tuple of float, optional
        Range of the absolute lesion contrast; the sign is random.
    lesion_diameter_mm : tuple of float, optional
        Range of lesion diameters.
    n_nodules : int, optional
        Chest only: number of lung nodules (random 0-3 if omitted).
    enhanced : bool, optional
        Contrast-enhanced blood (random if omitted).
    reference_dose : float, optional
        Reference dose fraction (1.0; ``inf`` for a noise-free reference).
    i0 : float, optional
        Full-dose photons per detector bin per view (default :data:`FULL_DOSE_I0` of the anatomy).
    electronic_noise, n_views, filter_name, interpolation
        Acquisition and reconstruction, see :func:`simulate_doses`.
    measure_lesions : bool, optional
        Reconstruct the noise-free lesion signal through the same chain and store each lesion's
        ``reference_contrast_hu`` (mean over the lesion core); costs one more projection.

    Returns
    -------
    Case
        The simulated case.
    """
    streams = np.random.SeedSequence(seed).spawn(3)
    rng_anat, rng_tex, rng_noise = (np.random.default_rng(s) for s in streams)
    kwargs: dict[str, object] = {
        "n_lesions": n_lesions,
        "lesion_contrast_hu": lesion_contrast_hu,
        "lesion_diameter_mm": lesion_diameter_mm,
    }
    if fov_mm is not None:
        kwargs["fov_mm"] = fov_mm
    if level is not None:
        kwargs["level"] = level
    anat: AnatomySlice
    if anatomy == "head":
        anat = head_slice(size, rng_anat, **kwargs)  # type: ignore[arg-type]
    elif anatomy == "chest":
        anat = chest_slice(size, rng_anat, n_nodules=n_nodules, **kwargs)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown anatomy {anatomy!r}")
    model = draw_hu_model(rng_tex, enhanced=enhanced)
    truth = phantom_hu(
        anat.fractions,
        anat.density,
        anat.hu_offset,
        anat.pixel_mm,
        rng_tex,
        model=model,
        lesions=[(les.mask, les.contrast_hu) for les in anat.lesions],
    )
    i0 = FULL_DOSE_I0[anatomy] if i0 is None else float(i0)
    geo = parallel_beam(size, n_views)
    px = np.float32(anat.pixel_mm)
    mu_px = np.clip(hu_to_mu(truth), 0.0, None) * px
    images = [mu_px]
    if measure_lesions and anat.lesions:
        signal = np.zeros_like(truth)
        for les in anat.lesions:
            signal[les.mask] += les.contrast_hu
        images.append(signal * np.float32(MU_WATER_PER_MM / 1000.0) * px)
    sinos = geo.project(np.stack(images))
    noisy = [
        transmit(sinos[0], i0 * d, rng_noise, electronic_noise=electronic_noise)
        for d in (reference_dose, dose)
    ]
    if len(images) > 1:
        noisy.append(sinos[1])
    recon = geo.fbp(np.stack(noisy), filter_name, interpolation) / px
    reference = np.where(geo.fov_mask, mu_to_hu(recon[0]), np.float32(HU_AIR)).astype(np.float32)
    low = np.where(geo.fov_mask, mu_to_hu(recon[1]), np.float32(HU_AIR)).astype(np.float32)
    lesions = list(anat.lesions)
    if len(images) > 1:
        lesion_signal_hu = recon[2] * np.float32(1000.0 / MU_WATER_PER_MM)
        lesions = [
            les.with_reference_contrast(float(lesion_signal_hu[lesion_core(les.mask)].mean()))
            for les in lesions
        ]
    return Case(
        anatomy=anatomy,
        seed=int(seed),
        dose=float(dose),
        pixel_mm=float(anat.pixel_mm),
        reference_hu=reference,
        low_dose_hu=low,
        phantom_hu=truth,
        labels=anat.labels,
        body_mask=anat.body_mask,
        lesions=tuple(lesions),
        nodules=tuple(anat.nodules),
    )


def lesion_contrast(image_hu: np.ndarray, lesion: Lesion, ring_mm: float = 3.0) -> float:
    """Measured contrast of a lesion: mean over its core minus mean over a surrounding ring.

    Parameters
    ----------
    image_hu : numpy.ndarray
        Image in HU (reference, low-dose or restored).
    lesion : Lesion
        The lesion (its mask).
    ring_mm : float, optional
        Width of the background ring, starting one pixel outside the lesion.

    Returns
    -------
    float
        ``mean(core) - mean(ring)`` in HU (noisy: average over cases or lesions for accuracy).
    """
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(~lesion.mask) * lesion.pixel_mm
    ring = (dist > lesion.pixel_mm) & (dist <= lesion.pixel_mm + ring_mm)
    img = np.asarray(image_hu, dtype=np.float64)
    return float(img[lesion_core(lesion.mask)].mean() - img[ring].mean())
