"""Level 3b: low-contrast detail — is a faint lesion still there, and still detectable, after restoration?

Two measures on simulated cases whose lesions are known exactly
(:attr:`models.sim.ldct.Case.lesions`):

* **Contrast ratio** (:func:`contrast_table`): measured contrast ``mean(core) - mean(ring)``
  (:func:`models.sim.ldct.lesion_contrast`, reused as is: the core is the lesion mask eroded by
  one pixel, the ring starts one pixel outside it and is ``ring_mm`` wide) divided by the
  lesion's expected contrast in the full-dose reconstruction (``reference_contrast_hu``, which
  includes the FBP blur; ``contrast_hu`` when not measured). 1 means the contrast survived;
  smoothing lowers it. Single measurements are noisy: average over lesions and cases.
* **Detectability index d'** (:func:`npw_dprime`) of a non-prewhitening matched-filter (NPW)
  model observer for signal-known-exactly tasks. For each lesion the template is its expected
  profile, ``s = contrast_hu · mask`` on a square window around it (half-size: lesion radius +
  ``ring_mm`` + 1 px), made zero-mean over the window (so a constant background gives no
  response) and scaled so the response to the noise-free signal is 1::

      w = (s - mean(s)) / sum((s - mean(s)) · s),     t = sum(w · g)

  Signal responses ``t_s`` are taken at the lesion locations, noise responses ``t_n`` by the
  same templates at lesion-free control locations of the same images (random positions whose
  whole window lies inside ``control_masks`` — e.g. the lesions' host tissue,
  :func:`host_tissue_mask` — and contains no lesion pixel), and
  ``d' = (mean(t_s) - mean(t_n)) / sqrt((var(t_s) + var(t_n)) / 2)``.

  Because the response is normalised, ``t_s`` estimates the fraction of the expected signal
  present and the pooled d' over lesions of different size and contrast is the d' of the mixed
  task. Controls sample the anatomical background as well as the noise, so d' here measures
  detectability against *both* (the usual situation for a reader); compare methods on the same
  images with the same ``rng`` seed so the control positions are identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.evaluation.results import LesionResult
from models.sim.anatomy import Lesion
from models.sim.ldct import lesion_contrast


def expected_contrast(lesion: Lesion) -> float:
    """The contrast a perfect full-dose image shows: ``reference_contrast_hu``, else ``contrast_hu``.

    Parameters
    ----------
    lesion : Lesion
        A lesion from :func:`models.sim.ldct.make_case`.

    Returns
    -------
    float
        Expected contrast in HU.
    """
    if lesion.reference_contrast_hu is not None:
        return float(lesion.reference_contrast_hu)
    return float(lesion.contrast_hu)


def contrast_table(
    image_hu: np.ndarray, lesions: Sequence[Lesion], ring_mm: float = 3.0
) -> list[dict[str, float]]:
    """Measured vs expected contrast of every lesion in one image.

    Parameters
    ----------
    image_hu : numpy.ndarray
        2-D image in HU (reference, low-dose or restored).
    lesions : sequence of Lesion
        The lesions of that slice.
    ring_mm : float, optional
        Background ring width (see :func:`models.sim.ldct.lesion_contrast`).

    Returns
    -------
    list of dict
        Per lesion: ``measured_hu``, ``reference_hu`` (expected contrast), ``ratio``
        (measured / expected), ``diameter_mm``.
    """
    rows = []
    for les in lesions:
        measured = lesion_contrast(image_hu, les, ring_mm)
        ref = expected_contrast(les)
        rows.append(
            {
                "measured_hu": measured,
                "reference_hu": ref,
                "ratio": measured / ref if ref != 0 else float("nan"),
                "diameter_mm": float(les.diameter_mm),
            }
        )
    return rows


# -- NPW model observer ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """A matched-filter template on a square window.

    Attributes
    ----------
    weights : numpy.ndarray
        ``(2 h + 1, 2 h + 1)`` zero-mean weights, normalised so the response to the noise-free
        signal is 1.
    center : tuple of int
        Pixel (row, column) of the lesion the window is centred on.
    half : int
        Half-size ``h`` of the window.
    """

    weights: np.ndarray
    center: tuple[int, int]
    half: int


def lesion_template(lesion: Lesion, ring_mm: float = 3.0) -> Template:
    """NPW template of one lesion: its expected profile ``contrast · mask``, zero-mean, unit response.

    Parameters
    ----------
    lesion : Lesion
        The lesion (mask, contrast, pixel size).
    ring_mm : float, optional
        Background margin included in the window around the lesion.

    Returns
    -------
    Template
        The template; raises ``ValueError`` when the window leaves the image.
    """
    mask = np.asarray(lesion.mask, dtype=bool)
    r0, c0 = (int(round(v)) for v in ndimage.center_of_mass(mask))
    rows, cols = np.nonzero(mask)
    radius = max(int(np.max(np.abs(rows - r0))), int(np.max(np.abs(cols - c0))))
    half = radius + int(math.ceil(ring_mm / lesion.pixel_mm)) + 1
    h, w = mask.shape
    if r0 - half < 0 or c0 - half < 0 or r0 + half >= h or c0 + half >= w:
        raise ValueError("lesion window leaves the image")
    window = (slice(r0 - half, r0 + half + 1), slice(c0 - half, c0 + half + 1))
    s = mask[window].astype(np.float64) * float(lesion.contrast_hu)
    w0 = s - s.mean()
    norm = float((w0 * s).sum())
    if norm == 0.0:
        raise ValueError("lesion with zero contrast has no template")
    return Template(weights=w0 / norm, center=(r0, c0), half=half)


def template_response(
    image_hu: np.ndarray, template: Template, center: tuple[int, int] | None = None
) -> float:
    """Matched-filter response ``sum(w · g)`` of a template placed at ``center``.

    Parameters
    ----------
    image_hu : numpy.ndarray
        2-D image.
    template : Template
        From :func:`lesion_template`.
    center : tuple of int, optional
        Window centre; default the lesion's own centre.

    Returns
    -------
    float
        The response (about 1 for the noise-free signal, about 0 for a flat background).
    """
    r, c = template.center if center is None else center
    hh = template.half
    patch = np.asarray(image_hu, dtype=np.float64)[r - hh : r + hh + 1, c - hh : c + hh + 1]
    return float((patch * template.weights).sum())


@dataclass(frozen=True)
class Detectability:
    """Result of :func:`npw_dprime`.

    Attributes
    ----------
    dprime : float
        ``(mean(t_s) - mean(t_n)) / sqrt((var(t_s) + var(t_n)) / 2)``.
    signal : numpy.ndarray
        Responses at the lesion locations.
    noise : numpy.ndarray
        Responses at the control locations.
    """

    dprime: float
    signal: np.ndarray
    noise: np.ndarray


def host_tissue_mask(labels: np.ndarray, lesions: Sequence[Lesion], erode_px: int = 1) -> np.ndarray:
    """Union of the lesions' host tissues (from the label map), eroded: where controls belong.

    Parameters
    ----------
    labels : numpy.ndarray
        ``uint8`` tissue labels (:attr:`models.sim.ldct.Case.labels`).
    lesions : sequence of Lesion
        Lesions whose ``host`` tissues are wanted.
    erode_px : int, optional
        Erosion (keeps control windows off tissue edges a little).

    Returns
    -------
    numpy.ndarray
        Boolean mask.
    """
    hosts = sorted({int(les.host) for les in lesions})
    mask = np.isin(labels, hosts)
    return ndimage.binary_erosion(mask, iterations=erode_px) if erode_px > 0 else mask


def dprime(signal: np.ndarray, noise: np.ndarray) -> float:
    """Detectability index from two response samples (pooled standard deviation).

    Parameters
    ----------
    signal, noise : numpy.ndarray
        Signal-present and signal-absent responses.

    Returns
    -------
    float
        d'; ``inf`` when both samples are constant and differ, NaN when too few.
    """
    s = np.asarray(signal, dtype=np.float64)
    n = np.asarray(noise, dtype=np.float64)
    if s.size < 2 or n.size < 2:
        return float("nan")
    pooled = math.sqrt(0.5 * (s.var(ddof=1) + n.var(ddof=1)))
    diff = float(s.mean() - n.mean())
    if pooled == 0.0:
        return float("inf") if diff != 0 else float("nan")
    return diff / pooled


def npw_dprime(
    images: Sequence[np.ndarray],
    lesion_sets: Sequence[Sequence[Lesion]],
    rng: np.random.Generator,
    *,
    control_masks: Sequence[np.ndarray] | None = None,
    n_controls: int = 10,
    ring_mm: float = 3.0,
) -> Detectability:
    """Non-prewhitening matched-filter d' over a set of images with known lesions.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        2-D images (e.g. one method's output for several cases).
    lesion_sets : sequence of sequence of Lesion
        The lesions of each image.
    rng : numpy.random.Generator
        Source of the control positions (use the same seed for every method compared).
    control_masks : sequence of numpy.ndarray, optional
        Per image, where control windows may lie (the whole window must be inside); default the
        whole image. Pass e.g. ``host_tissue_mask(case.labels, case.lesions)`` (recommended: the
        background matches the lesion's) or the body mask. Windows containing a lesion pixel are
        always excluded.
    n_controls : int, optional
        Control positions per lesion.
    ring_mm : float, optional
        Background margin of the template window.

    Returns
    -------
    Detectability
        d' and the two response samples. Lesions whose window leaves the image are skipped.
    """
    if len(images) != len(lesion_sets):
        raise ValueError("one lesion set per image")
    sig: list[float] = []
    noi: list[float] = []
    for k, (image, lesions) in enumerate(zip(images, lesion_sets, strict=True)):
        img = np.asarray(image, dtype=np.float64)
        if not lesions:
            continue
        all_lesions = np.zeros(img.shape, dtype=bool)
        for les in lesions:
            all_lesions |= np.asarray(les.mask, bool)
        if control_masks is not None:
            region = np.asarray(control_masks[k], dtype=bool)
        else:
            region = np.ones(img.shape, dtype=bool)
        for les in lesions:
            try:
                tmpl = lesion_template(les, ring_mm)
            except ValueError:
                continue
            hh = tmpl.half
            size = 2 * hh + 1
            # centres whose whole window lies in the region and contains no lesion pixel
            ok = ndimage.binary_erosion(region, structure=np.ones((size, size), bool), border_value=0)
            ok &= ~ndimage.binary_dilation(all_lesions, structure=np.ones((size, size), bool))
            candidates = np.flatnonzero(ok)
            if candidates.size == 0:
                continue
            sig.append(template_response(img, tmpl))
            picks = rng.choice(candidates, size=min(n_controls, candidates.size), replace=False)
            for p in picks:
                r, c = np.unravel_index(int(p), img.shape)
                noi.append(template_response(img, tmpl, (int(r), int(c))))
    s, n = np.asarray(sig), np.asarray(noi)
    return Detectability(dprime=dprime(s, n), signal=s, noise=n)


def lesion_summary(
    images: Sequence[np.ndarray],
    lesion_sets: Sequence[Sequence[Lesion]],
    rng: np.random.Generator,
    *,
    control_masks: Sequence[np.ndarray] | None = None,
    n_controls: int = 10,
    ring_mm: float = 3.0,
) -> LesionResult:
    """Contrast ratios and NPW d' of one method over several images, in the report's format.

    Parameters
    ----------
    images, lesion_sets, rng, control_masks, n_controls, ring_mm
        See :func:`contrast_table` and :func:`npw_dprime`.

    Returns
    -------
    LesionResult
        Per-lesion ``reference_contrast_hu``, ``measured_contrast_hu``, ``ratio``, ``diameter_mm``;
        ``mean_ratio`` (sum of measured over sum of expected contrast magnitudes, sign-aligned,
        which is less noisy than the mean of ratios), ``dprime``, ``n_signal``, ``n_noise``.
    """
    rows = [
        row for img, les in zip(images, lesion_sets, strict=True) for row in contrast_table(img, les, ring_mm)
    ]
    det = npw_dprime(
        images, lesion_sets, rng, control_masks=control_masks, n_controls=n_controls, ring_mm=ring_mm
    )
    ref = np.asarray([r["reference_hu"] for r in rows], dtype=np.float64)
    meas = np.asarray([r["measured_hu"] for r in rows], dtype=np.float64)
    denom = float(np.abs(ref).sum())
    return LesionResult(
        reference_contrast_hu=ref.tolist(),
        measured_contrast_hu=meas.tolist(),
        ratio=[r["ratio"] for r in rows],
        diameter_mm=[r["diameter_mm"] for r in rows],
        mean_ratio=float((meas * np.sign(ref)).sum() / denom) if denom > 0 else float("nan"),
        dprime=det.dprime,
        n_signal=int(det.signal.size),
        n_noise=int(det.noise.size),
    )
