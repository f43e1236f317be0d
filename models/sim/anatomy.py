"""Axial 2-D anatomy for the CT simulator: head slices from the MNI152 template, a procedural chest.

An :class:`AnatomySlice` is a soft tissue-fraction map (partial volume, one channel per
:class:`~models.sim.ctphysics.Tissue`), a bone-density field, an additive HU-offset field and the
annotations (low-contrast lesions, lung nodules). :func:`models.sim.ctphysics.phantom_hu` turns it
into a textured HU image.

Head
    The MNI152 2009a symmetric template shipped *inside* the nilearn package (T1 and GM/WM
    probability maps, 1 mm, 197 x 233 x 189, skull-stripped) is read from the package directory with
    nibabel — nothing is fetched. Grey/white fractions come from the probability maps, CSF from the
    remainder where the T1 is dark (ventricles, sulci); the remainder where the T1 is bright goes to
    grey matter (deep nuclei). Because the template has no skull, the intracranial volume is the
    brain mask closed by smoothing, and the skull and scalp are shells of the 3-D signed distance to
    it: inner table, diploe, outer table (bone density 1 / ~0.3 / 1), then galea/temporalis muscle,
    subcutaneous fat and skin, with smoothly varying per-case thicknesses.
Chest
    Superellipse body with skin, subcutaneous fat and a muscle layer, thoracic cavity filled with
    lung (posterior dependent density gradient), mediastinal fat, heart with myocardium and
    chambers, ascending/descending aorta or arch, pulmonary trunk, SVC, trachea or main bronchi,
    oesophagus, vertebra (cortex, cancellous body, canal and cord, posterior elements), ribs and
    costal cartilage, sternum, scapulae, liver dome at the bases, branching pulmonary vessels plus
    vessel and bronchus cross-sections, fissures, and optional solid / ground-glass nodules.

Every case gets an in-plane rotation, anisotropic scaling, translation and a smooth random elastic
displacement (all seeded from the caller's :class:`numpy.random.Generator`); the whole patient is
kept inside the reconstruction circle.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from models.sim.ctphysics import N_TISSUES, TISSUE_HU, Tissue, gaussian_random_field

DEFAULT_HEAD_FOV_MM = 250.0
DEFAULT_CHEST_FOV_MM = 400.0
#: MNI z range (mm) covered by ``level`` 0 .. 1 for head slices (skull base to near vertex).
HEAD_Z_RANGE_MM = (-30.0, 72.0)

_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


# -- data structures --------------------------------------------------------------------------
@dataclass(frozen=True)
class Lesion:
    """A circular lesion (low-contrast insert) or a lung nodule.

    Attributes
    ----------
    mask : numpy.ndarray
        Boolean mask on the slice grid.
    center_rc : tuple of float
        Centre (row, column) in pixels.
    diameter_mm : float
        Nominal diameter.
    contrast_hu : float
        Contrast over the host tissue. Exact in the phantom for low-contrast lesions (added on top
        of the textured tissue); nominal (table means) for nodules.
    host : int
        Host tissue (:class:`~models.sim.ctphysics.Tissue`).
    pixel_mm : float
        Pixel spacing of ``mask``.
    kind : str
        ``"low-contrast"`` or ``"nodule"``.
    reference_contrast_hu : float or None
        Expected contrast in the full-dose reconstruction (mean of the noise-free reconstructed
        lesion signal over the lesion core), filled in by :func:`models.sim.ldct.make_case`.
    """

    mask: np.ndarray
    center_rc: tuple[float, float]
    diameter_mm: float
    contrast_hu: float
    host: int
    pixel_mm: float
    kind: str = "low-contrast"
    reference_contrast_hu: float | None = None

    def with_reference_contrast(self, value: float) -> Lesion:
        """Copy with ``reference_contrast_hu`` set.

        Parameters
        ----------
        value : float
            Measured expected contrast in HU.

        Returns
        -------
        Lesion
            The updated lesion.
        """
        return dataclasses.replace(self, reference_contrast_hu=float(value))


@dataclass(frozen=True)
class AnatomySlice:
    """One simulated axial slice before CT numbers are assigned.

    Attributes
    ----------
    kind : str
        ``"head"`` or ``"chest"``.
    pixel_mm : float
        Pixel spacing in mm.
    fractions : numpy.ndarray
        ``(N_TISSUES, size, size)`` float32 tissue fractions, summing to 1 per pixel.
    density : numpy.ndarray
        ``(size, size)`` bone density (1 cortical, ~0.3 trabecular), meaningful where there is bone.
    hu_offset : numpy.ndarray
        ``(size, size)`` additive HU modulation (lung gradient, ground-glass nodules, mixed fat).
    level : float
        Axial level in [0, 1].
    lesions : tuple of Lesion
        Low-contrast lesions (to be added by the HU model).
    nodules : tuple of Lesion
        Lung nodules (already part of ``fractions``).
    """

    kind: str
    pixel_mm: float
    fractions: np.ndarray
    density: np.ndarray
    hu_offset: np.ndarray
    level: float
    lesions: tuple[Lesion, ...] = ()
    nodules: tuple[Lesion, ...] = ()

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """``uint8`` label map: the tissue with the largest fraction in each pixel."""
        return np.argmax(self.fractions, axis=0).astype(np.uint8)

    @functools.cached_property
    def body_mask(self) -> np.ndarray:
        """Boolean patient mask (inside the skin, internal air included)."""
        return np.asarray(ndi.binary_fill_holes(self.fractions[Tissue.AIR] < 0.5), dtype=bool)


# -- geometry helpers -------------------------------------------------------------------------
def _cover(sd: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Partial-volume coverage from a signed distance in mm (positive inside)."""
    return np.clip(sd / pixel_mm + 0.5, 0.0, 1.0)


class _Frame:
    """Output grid <-> canonical anatomy coordinates (rotation, scaling, translation, elastic)."""

    def __init__(
        self,
        size: int,
        pixel_mm: float,
        rng: np.random.Generator,
        *,
        rotation_deg: float,
        scale: tuple[float, float],
        shift_mm: float,
        elastic_mm: float,
        elastic_corr_mm: float,
        extent_mm: float,
    ) -> None:
        self.size, self.pixel_mm = size, pixel_mm
        self.c = size // 2
        self.alpha = math.radians(rng.uniform(-rotation_deg, rotation_deg))
        sx, sy = rng.uniform(*scale), rng.uniform(*scale)
        tx, ty = rng.uniform(-shift_mm, shift_mm, size=2)
        disp = elastic_mm * gaussian_random_field((size, size), elastic_corr_mm / pixel_mm, rng, n=2)
        self.dmax = float(np.hypot(disp[0], disp[1]).max())
        # Keep the patient inside the reconstruction circle (radius (size // 2) px, minus a margin).
        budget = self.c * pixel_mm - 4.0 - math.hypot(tx, ty)
        shrink = min(1.0, budget / (max(sx, sy) * (extent_mm + self.dmax)))
        self.sx, self.sy, self.tx, self.ty = sx * shrink, sy * shrink, float(tx), float(ty)
        idx = (np.arange(size) - self.c) * pixel_mm
        px = idx[None, :] - self.tx
        py = idx[:, None] - self.ty
        ca, sa = math.cos(self.alpha), math.sin(self.alpha)
        self.x = ((ca * px + sa * py) / self.sx + disp[0]).astype(np.float32)
        self.y = ((-sa * px + ca * py) / self.sy + disp[1]).astype(np.float32)

    def window(self, cx: float, cy: float, radius: float) -> tuple[slice, slice]:
        """Output-pixel bounding box of a canonical disc (centre ``cx, cy``, ``radius`` mm)."""
        ca, sa = math.cos(self.alpha), math.sin(self.alpha)
        qx, qy = cx * self.sx, cy * self.sy
        px, py = ca * qx - sa * qy + self.tx, sa * qx + ca * qy + self.ty
        rad = max(self.sx, self.sy) * (radius + self.dmax) + 2.0 * self.pixel_mm
        c0 = max(0, int(math.floor((px - rad) / self.pixel_mm)) + self.c)
        c1 = min(self.size, int(math.ceil((px + rad) / self.pixel_mm)) + self.c + 1)
        r0 = max(0, int(math.floor((py - rad) / self.pixel_mm)) + self.c)
        r1 = min(self.size, int(math.ceil((py + rad) / self.pixel_mm)) + self.c + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


class _Canvas:
    """Painter's-algorithm accumulation of tissue fractions with partial volume."""

    def __init__(self, frame: _Frame) -> None:
        n = frame.size
        self.frame = frame
        self.fractions = np.zeros((N_TISSUES, n, n), dtype=np.float32)
        self.fractions[Tissue.AIR] = 1.0
        self.density = np.zeros((n, n), dtype=np.float32)
        self.hu_offset = np.zeros((n, n), dtype=np.float32)

    def coords(self, win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        return self.frame.x[win], self.frame.y[win]

    def paint(
        self,
        tissue: Tissue,
        cover: np.ndarray,
        win: tuple[slice, slice],
        *,
        density: float | np.ndarray | None = None,
        hu_offset: float | np.ndarray = 0.0,
    ) -> None:
        cov = np.asarray(cover, dtype=np.float32)
        if not np.any(cov > 0):
            return
        frac = self.fractions[:, win[0], win[1]]
        frac *= 1.0 - cov
        frac[tissue] += cov
        if density is not None:
            d = self.density[win]
            d += (np.asarray(density, dtype=np.float32) - d) * cov
        h = self.hu_offset[win]
        h += (np.asarray(hu_offset, dtype=np.float32) - h) * cov

    def paint_mix(self, mix: dict[Tissue, np.ndarray], cover: np.ndarray, win: tuple[slice, slice]) -> None:
        cov = np.asarray(cover, dtype=np.float32)
        frac = self.fractions[:, win[0], win[1]]
        frac *= 1.0 - cov
        for tissue, part in mix.items():
            frac[tissue] += cov * part
        h = self.hu_offset[win]
        h *= 1.0 - cov

    def full(self) -> tuple[slice, slice]:
        return slice(0, self.frame.size), slice(0, self.frame.size)


def _superellipse_sd(
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    *,
    angle_deg: float = 0.0,
    power: float = 2.0,
    wobble: np.ndarray | None = None,
) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to a rotated superellipse.

    ``wobble`` rows are ``(k, amplitude, phase)`` radial harmonics modulating the boundary.
    """
    dx, dy = x - cx, y - cy
    if angle_deg:
        ca, sa = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
    rho = (np.abs(dx / a) ** power + np.abs(dy / b) ** power) ** (1.0 / power)
    if wobble is not None and len(wobble):
        th = np.arctan2(dy / b, dx / a)
        mod = np.ones_like(rho)
        for k, amp, ph in wobble:
            mod += amp * np.cos(k * th + ph)
        rho = rho / mod
    r = np.hypot(dx, dy)
    boundary = np.where(rho > 1e-6, r / np.maximum(rho, 1e-6), min(a, b))
    return (1.0 - rho) * boundary


def _circle_sd(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return r - np.hypot(x - cx, y - cy)


def _capsule_sd(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], r: float
) -> np.ndarray:
    vx, vy = p1[0] - p0[0], p1[1] - p0[1]
    length2 = max(vx * vx + vy * vy, 1e-9)
    t = np.clip(((x - p0[0]) * vx + (y - p0[1]) * vy) / length2, 0.0, 1.0)
    return r - np.hypot(x - p0[0] - t * vx, y - p0[1] - t * vy)


def _wobble(rng: np.random.Generator, amplitude: float, ks: tuple[int, ...] = (2, 3, 4, 5)) -> np.ndarray:
    return np.array([(k, rng.uniform(0.3, 1.0) * amplitude / k**0.5, rng.uniform(0, 2 * np.pi)) for k in ks])


# -- lesions ----------------------------------------------------------------------------------
def place_lesions(
    labels: np.ndarray,
    pixel_mm: float,
    hosts: tuple[Tissue, ...],
    n: int,
    rng: np.random.Generator,
    *,
    contrast_hu: tuple[float, float] = (10.0, 20.0),
    diameter_mm: tuple[float, float] = (2.0, 8.0),
    margin_mm: float = 2.0,
    avoid: np.ndarray | None = None,
) -> list[Lesion]:
    """Place circular low-contrast lesions entirely inside one host tissue each.

    Each lesion plus a ring of ``margin_mm`` (at least two pixels) lies inside a single host label,
    so a core-minus-ring measurement sees one background tissue; lesions do not touch each other.

    Parameters
    ----------
    labels : numpy.ndarray
        ``uint8`` tissue labels.
    pixel_mm : float
        Pixel spacing in mm.
    hosts : tuple of Tissue
        Allowed host tissues, tried in random order weighted by how much room they have.
    n : int
        Number of lesions wanted (fewer are returned if they do not fit).
    rng : numpy.random.Generator
        Source of randomness.
    contrast_hu : tuple of float, optional
        Range of the absolute contrast; the sign is random (hypo- or hyperdense).
    diameter_mm : tuple of float, optional
        Range of diameters.
    margin_mm : float, optional
        Background ring that must stay inside the host tissue.
    avoid : numpy.ndarray, optional
        Boolean mask of pixels lesions must keep clear of.

    Returns
    -------
    list of Lesion
        The placed lesions (``kind="low-contrast"``).
    """
    size = labels.shape[0]
    dist = {t: ndi.distance_transform_edt(labels == t) * pixel_mm for t in hosts}
    free = np.ones(labels.shape, dtype=bool) if avoid is None else ~avoid
    rr, cc = np.mgrid[0:size, 0:size]
    out: list[Lesion] = []
    for _ in range(n):
        diam = float(rng.uniform(*diameter_mm))
        radius = diam / 2.0
        need = radius + max(margin_mm, 2.0 * pixel_mm) + pixel_mm
        free_dist = ndi.distance_transform_edt(free) * pixel_mm
        room = {t: (dist[t] >= need) & (free_dist >= need) for t in hosts}
        areas = np.array([float(room[t].sum()) for t in hosts])
        if areas.sum() == 0:
            continue
        host = hosts[int(rng.choice(len(hosts), p=areas / areas.sum()))]
        cand = np.flatnonzero(room[host])
        r0, c0 = divmod(int(cand[rng.integers(cand.size)]), size)
        mask = (rr - r0) ** 2 + (cc - c0) ** 2 <= (radius / pixel_mm) ** 2
        mask[r0, c0] = True
        contrast = float(rng.uniform(*contrast_hu) * rng.choice([-1.0, 1.0]))
        out.append(
            Lesion(
                mask=mask,
                center_rc=(float(r0), float(c0)),
                diameter_mm=diam,
                contrast_hu=contrast,
                host=int(host),
                pixel_mm=pixel_mm,
            )
        )
        free &= (rr - r0) ** 2 + (cc - c0) ** 2 > ((radius + 3.0 * margin_mm) / pixel_mm) ** 2
    return out


# -- head -------------------------------------------------------------------------------------
def mni_template_dir() -> Path:
    """Directory of the MNI152 2009a templates inside the installed nilearn package (no download).

    Returns
    -------
    pathlib.Path
        ``.../site-packages/nilearn/datasets/data``.
    """
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("nilearn is not installed; it ships the MNI152 templates")
    return Path(spec.origin).parent / "datasets" / "data"


@dataclass(frozen=True)
class _HeadAtlas:
    grey: np.ndarray
    white: np.ndarray
    csf: np.ndarray
    sd: np.ndarray  # signed distance to the intracranial surface, mm (negative inside)
    origin: np.ndarray  # MNI mm of voxel (0, 0, 0)
    center_xy: tuple[float, float]  # MNI mm of the head centre
    radius_mm: float  # max in-plane distance of the intracranial surface from the centre


@functools.lru_cache(maxsize=1)
def _head_atlas() -> _HeadAtlas:
    import nibabel as nib

    folder = mni_template_dir()
    imgs: dict[str, Any] = {k: nib.load(str(folder / f)) for k, f in _MNI_FILES.items()}
    vol = {k: np.asarray(im.dataobj, dtype=np.float32) / 255.0 for k, im in imgs.items()}
    t1, gm, wm = vol["t1"], vol["gm"], vol["wm"]
    brain = (t1 > 0.02) | (gm + wm > 0.3)
    rest = np.clip(1.0 - gm - wm, 0.0, 1.0)
    # The remainder is CSF where the T1 is dark (ventricles, sulci), deep grey matter where bright.
    dark = np.clip((0.62 - t1) / 0.30, 0.0, 1.0)
    csf = np.where(brain, rest * dark, 0.0)
    grey = np.where(brain, gm + rest - csf, 0.0)
    white = np.where(brain, wm, 0.0)
    icv = ndi.binary_fill_holes(ndi.gaussian_filter(brain.astype(np.float32), 2.0) > 0.15)
    csf = np.where(icv & ~brain, 1.0, csf)  # subarachnoid space between brain and skull
    sd = (ndi.distance_transform_edt(~icv) - ndi.distance_transform_edt(icv)).astype(np.float32)
    origin = imgs["t1"].affine[:3, 3].astype(np.float64)
    ii, jj, _ = np.nonzero(icv)
    cx = 0.5 * (ii.min() + ii.max()) + origin[0]
    cy = 0.5 * (jj.min() + jj.max()) + origin[1]
    radius = float(np.hypot(ii + origin[0] - cx, jj + origin[1] - cy).max())
    return _HeadAtlas(
        grey=grey.astype(np.float32),
        white=white.astype(np.float32),
        csf=csf.astype(np.float32),
        sd=sd,
        origin=origin,
        center_xy=(float(cx), float(cy)),
        radius_mm=radius,
    )


def head_slice(
    size: int,
    rng: np.random.Generator,
    *,
    level: float | None = None,
    fov_mm: float = DEFAULT_HEAD_FOV_MM,
    n_lesions: int = 3,
    lesion_contrast_hu: tuple[float, float] = (10.0, 20.0),
    lesion_diameter_mm: tuple[float, float] = (2.0, 8.0),
    rotation_deg: float = 10.0,
    tilt_deg: float = 6.0,
    elastic_mm: float = 2.5,
) -> AnatomySlice:
    """An axial head slice from the MNI152 template with a synthetic skull and scalp.

    Parameters
    ----------
    size : int
        Matrix size (square).
    rng : numpy.random.Generator
        Source of all per-case variation.
    level : float, optional
        0 (skull base, MNI z = -30 mm) to 1 (near the vertex, z = +72 mm); random if omitted.
    fov_mm : float, optional
        Field of view (default 250 mm).
    n_lesions : int, optional
        Low-contrast lesions to place in white (or grey) matter.
    lesion_contrast_hu, lesion_diameter_mm : tuple of float, optional
        Ranges for the lesions (see :func:`place_lesions`).
    rotation_deg : float, optional
        Maximum in-plane rotation.
    tilt_deg : float, optional
        Maximum out-of-plane (pitch) tilt of the slice; roll is half of it.
    elastic_mm : float, optional
        Typical amplitude of the smooth elastic displacement.

    Returns
    -------
    AnatomySlice
        The head slice (``kind="head"``).
    """
    atlas = _head_atlas()
    level = float(rng.uniform(0.0, 1.0)) if level is None else float(np.clip(level, 0.0, 1.0))
    pixel = fov_mm / size
    skull_base = rng.uniform(5.0, 7.5)
    scalp_base = rng.uniform(4.0, 7.0)
    frame = _Frame(
        size,
        pixel,
        rng,
        rotation_deg=rotation_deg,
        scale=(0.92, 1.08),
        shift_mm=6.0,
        elastic_mm=elastic_mm,
        elastic_corr_mm=20.0,
        extent_mm=atlas.radius_mm + skull_base + scalp_base + 6.0,
    )
    pitch = math.radians(rng.uniform(-tilt_deg, tilt_deg))
    roll = math.radians(rng.uniform(-tilt_deg, tilt_deg) / 2.0)
    z0 = HEAD_Z_RANGE_MM[0] + level * (HEAD_Z_RANGE_MM[1] - HEAD_Z_RANGE_MM[0])
    u, v = frame.x, frame.y  # canonical mm: +u = patient left, +v = posterior
    mx = atlas.center_xy[0] - u  # RAS: +x = patient right
    my = atlas.center_xy[1] - v  # +y = anterior
    mz = z0 + math.tan(pitch) * (-v) + math.tan(roll) * u
    coords = np.stack([mx - atlas.origin[0], my - atlas.origin[1], mz - atlas.origin[2]])

    def sample(vol: np.ndarray, cval: float) -> np.ndarray:
        return ndi.map_coordinates(vol, coords, order=1, mode="constant", cval=cval).astype(np.float32)

    sd = sample(atlas.sd, 100.0)
    grey, white, csf = sample(atlas.grey, 0.0), sample(atlas.white, 0.0), sample(atlas.csf, 0.0)
    # The template is a population average: sharpen its probabilities (power 2) towards the purer
    # tissue of an individual brain, then renormalise.
    grey, white, csf = grey**2, white**2, csf**2
    total = grey + white + csf
    inside = total > 1e-6
    csf = np.where(inside, csf, 1.0)
    norm = np.where(inside, total, 1.0)
    grey, white, csf = grey / norm, white / norm, csf / norm

    # Per-case, smoothly varying shell thicknesses (mm).
    fields = gaussian_random_field((size, size), 25.0 / pixel, rng, n=3)
    skull = np.clip(skull_base + 1.0 * fields[0], 3.0, 11.0)
    inner_table = rng.uniform(1.2, 2.0)
    outer_table = rng.uniform(1.5, 2.5)
    theta = np.arctan2(v, u)
    temporal = 5.0 * np.clip((np.abs(np.cos(theta)) - 0.7) / 0.3, 0.0, 1.0) * (0.3 + 0.7 * (level < 0.7))
    muscle = 1.0 + temporal + 0.3 * fields[1]
    scalp = np.clip(scalp_base + 0.8 * fields[2], 2.5, 10.0) + temporal
    skin = 1.5

    canvas = _Canvas(frame)
    full = canvas.full()
    canvas.paint(Tissue.SOFT, _cover(skull + scalp - sd, pixel), full)  # skin
    canvas.paint(Tissue.FAT, _cover(skull + scalp - skin - sd, pixel), full)
    canvas.paint(Tissue.SOFT, _cover(skull + muscle - sd, pixel), full)  # galea / temporalis
    depth = sd  # 0 at the inner table, ``skull`` at the outer surface
    cortical = np.maximum(_cover(inner_table - depth, pixel), _cover(depth - (skull - outer_table), pixel))
    diploe_density = rng.uniform(0.25, 0.4)
    density = diploe_density + (1.0 - diploe_density) * cortical
    canvas.paint(Tissue.BONE, _cover(skull - sd, pixel), full, density=density)
    canvas.paint_mix({Tissue.GREY: grey, Tissue.WHITE: white, Tissue.CSF: csf}, _cover(-sd, pixel), full)
    anat = AnatomySlice(
        kind="head",
        pixel_mm=pixel,
        fractions=canvas.fractions,
        density=canvas.density,
        hu_offset=canvas.hu_offset,
        level=level,
    )
    lesions = place_lesions(
        anat.labels,
        pixel,
        (Tissue.WHITE, Tissue.GREY),
        n_lesions,
        rng,
        contrast_hu=lesion_contrast_hu,
        diameter_mm=lesion_diameter_mm,
    )
    return dataclasses.replace(anat, lesions=tuple(lesions))


# -- chest ------------------------------------------------------------------------------------
def _paint_bone(
    canvas: _Canvas,
    cx: float,
    cy: float,
    a: float,
    b: float,
    *,
    angle: float = 0.0,
    cortex: float = 1.2,
    marrow: float = 0.3,
    power: float = 2.0,
) -> None:
    """A bone cross-section: cortical shell (density 1) around a cancellous core."""
    win = canvas.frame.window(cx, cy, max(a, b))
    x, y = canvas.coords(win)
    px = canvas.frame.pixel_mm
    outer = _superellipse_sd(x, y, cx, cy, a, b, angle_deg=angle, power=power)
    canvas.paint(Tissue.BONE, _cover(outer, px), win, density=1.0)
    if a > 2 * cortex and b > 2 * cortex:
        inner = _superellipse_sd(x, y, cx, cy, a - cortex, b - cortex, angle_deg=angle, power=power)
        canvas.paint(Tissue.BONE, _cover(inner, px), win, density=marrow)


def _paint_disc(
    canvas: _Canvas,
    tissue: Tissue,
    cx: float,
    cy: float,
    r: float,
    *,
    within: Tissue | None = None,
    hu_offset: float = 0.0,
) -> np.ndarray:
    win = canvas.frame.window(cx, cy, r)
    x, y = canvas.coords(win)
    cov = _cover(_circle_sd(x, y, cx, cy, r), canvas.frame.pixel_mm)
    if within is not None:
        cov = cov * canvas.fractions[within][win]
    canvas.paint(tissue, cov, win, hu_offset=hu_offset)
    return cov


def _paint_tube(
    canvas: _Canvas,
    tissue: Tissue,
    p0: tuple[float, float],
    p1: tuple[float, float],
    r: float,
    *,
    within: Tissue | None = None,
    weight: float = 1.0,
) -> None:
    cx, cy = 0.5 * (p0[0] + p1[0]), 0.5 * (p0[1] + p1[1])
    half = 0.5 * math.hypot(p1[0] - p0[0], p1[1] - p0[1])
    win = canvas.frame.window(cx, cy, half + r)
    x, y = canvas.coords(win)
    cov = weight * _cover(_capsule_sd(x, y, p0, p1, r), canvas.frame.pixel_mm)
    if within is not None:
        cov = cov * canvas.fractions[within][win]
    canvas.paint(tissue, cov, win)


def _vessel_tree(canvas: _Canvas, rng: np.random.Generator, hilum: tuple[float, float], side: float) -> None:
    """Branching pulmonary vessels from the hilum, clipped to the lung.

    Vessels run in 3-D, so in one axial slice a branch is only seen over part of its course: each
    child stays in the slice with probability 0.6, otherwise it leaves it (a short stub is drawn).
    """
    stack = []
    for base in (-55.0, 0.0, 55.0):
        ang = math.radians((0.0 if side > 0 else 180.0) + side * base + rng.uniform(-20, 20))
        stack.append((hilum, ang, rng.uniform(2.5, 4.2), rng.uniform(18.0, 32.0), 0))
    while stack:
        (x0, y0), ang, r, length, depth = stack.pop()
        x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
        _paint_tube(canvas, Tissue.BLOOD, (x0, y0), (x1, y1), r, within=Tissue.LUNG)
        if r * 0.7 < 0.5 or depth >= 7:
            continue
        for sign in (-1.0, 1.0):
            child = ang + sign * math.radians(rng.uniform(15.0, 40.0))
            r_child = r * rng.uniform(0.62, 0.82)
            if rng.random() < 0.6:
                stack.append(((x1, y1), child, r_child, length * rng.uniform(0.6, 0.9), depth + 1))
            else:  # leaves the slice: a short oblique stub
                stub = (x1 + 2.0 * r_child * math.cos(child), y1 + 2.0 * r_child * math.sin(child))
                _paint_tube(canvas, Tissue.BLOOD, (x1, y1), stub, r_child, within=Tissue.LUNG)


def chest_slice(
    size: int,
    rng: np.random.Generator,
    *,
    level: float | None = None,
    fov_mm: float = DEFAULT_CHEST_FOV_MM,
    n_lesions: int = 3,
    lesion_contrast_hu: tuple[float, float] = (10.0, 20.0),
    lesion_diameter_mm: tuple[float, float] = (2.0, 8.0),
    n_nodules: int | None = None,
    rotation_deg: float = 6.0,
    elastic_mm: float = 4.0,
) -> AnatomySlice:
    """A procedural axial chest slice.

    Parameters
    ----------
    size : int
        Matrix size (square).
    rng : numpy.random.Generator
        Source of all per-case variation.
    level : float, optional
        0 (lung bases, liver dome) to 1 (apices, above the aortic arch); random if omitted.
    fov_mm : float, optional
        Field of view (default 400 mm).
    n_lesions : int, optional
        Low-contrast lesions to place in soft tissue (chest-wall and paraspinal muscle,
        myocardium, liver).
    lesion_contrast_hu, lesion_diameter_mm : tuple of float, optional
        Ranges for the lesions (see :func:`place_lesions`).
    n_nodules : int, optional
        Lung nodules (random 0-3 if omitted), 3-20 mm, solid or ground glass.
    rotation_deg : float, optional
        Maximum in-plane rotation.
    elastic_mm : float, optional
        Typical amplitude of the smooth elastic displacement.

    Returns
    -------
    AnatomySlice
        The chest slice (``kind="chest"``).
    """
    level = float(rng.uniform(0.0, 1.0)) if level is None else float(np.clip(level, 0.0, 1.0))
    pixel = fov_mm / size
    # Body and layers (canonical mm; +x = patient left, +y = posterior).
    big_a = rng.uniform(140.0, 172.0)
    big_b = big_a * rng.uniform(0.62, 0.74)
    body_wobble = _wobble(rng, 0.025)
    extent = big_a * (1.0 + float(np.abs(body_wobble[:, 1]).sum())) * 1.12  # superellipse corners
    frame = _Frame(
        size,
        pixel,
        rng,
        rotation_deg=rotation_deg,
        scale=(0.92, 1.08),
        shift_mm=6.0,
        elastic_mm=elastic_mm,
        elastic_corr_mm=30.0,
        extent_mm=extent,
    )
    canvas = _Canvas(frame)
    full = canvas.full()
    x, y = frame.x, frame.y
    fat = rng.uniform(8.0, 26.0)
    fat_var = gaussian_random_field((size, size), 40.0 / pixel, rng)[0]
    fat_map = np.clip(fat * (1.0 + 0.3 * fat_var), 4.0, None)
    body_sd = _superellipse_sd(x, y, 0.0, 0.0, big_a, big_b, power=2.4, wobble=body_wobble)
    canvas.paint(Tissue.SOFT, _cover(body_sd, pixel), full)  # skin
    canvas.paint(Tissue.FAT, _cover(body_sd - 2.0, pixel), full)
    canvas.paint(Tissue.SOFT, _cover(body_sd - fat_map, pixel), full)  # muscle layer
    muscle_lat, muscle_ap = rng.uniform(12.0, 22.0), rng.uniform(10.0, 18.0)
    cav_a = big_a - fat - muscle_lat
    cav_b = big_b - fat - muscle_ap
    cav_cy = 0.04 * big_b
    apex = max(0.0, level - 0.7) / 0.3  # lungs shrink toward the apices
    cav_a *= 1.0 - 0.25 * apex
    cav_wobble = _wobble(rng, 0.02)
    cavity_sd = _superellipse_sd(x, y, 0.0, cav_cy, cav_a, cav_b, power=2.1, wobble=cav_wobble)
    # Ribs and costal cartilage just outside the cavity, sternum anteriorly.
    for side in (-1.0, 1.0):
        n_ribs = int(rng.integers(5, 9))
        angles = np.linspace(-62.0, 76.0, n_ribs) + rng.uniform(-6.0, 6.0, n_ribs)
        for ang_deg in angles:
            ang = math.radians(ang_deg)
            rx = side * (cav_a + 4.5) * math.cos(ang)
            ry = cav_cy + (cav_b + 4.5) * math.sin(ang)
            tangent = math.degrees(math.atan2(ry - cav_cy, rx)) + 90.0
            a_r, b_r = rng.uniform(6.0, 11.0), rng.uniform(3.0, 4.5)
            if ang_deg < -40.0:  # anterior: costal cartilage (low density)
                _paint_bone(canvas, rx, ry, a_r, b_r, angle=tangent, cortex=0.8, marrow=0.05)
            else:
                _paint_bone(canvas, rx, ry, a_r, b_r, angle=tangent, cortex=1.0, marrow=0.3)
    _paint_bone(canvas, 0.0, cav_cy - cav_b - 6.0, rng.uniform(12.0, 20.0), rng.uniform(5.0, 7.0), cortex=1.2)
    if level > 0.45:  # scapulae in the posterior muscle layer
        for side in (-1.0, 1.0):
            sx = side * (cav_a * 0.72)
            sy = cav_cy + cav_b * 0.75 + 8.0
            _paint_bone(
                canvas,
                sx,
                sy,
                rng.uniform(32.0, 48.0),
                rng.uniform(3.0, 5.0),
                angle=side * rng.uniform(20.0, 35.0),
                cortex=1.0,
                marrow=0.6,
            )
    # Lungs fill the cavity, denser posteriorly (dependent gradient).
    gradient = rng.uniform(20.0, 60.0)
    lung_offset = gradient * np.clip((y - cav_cy) / cav_b, -1.0, 1.0)
    canvas.paint(Tissue.LUNG, _cover(cavity_sd, pixel), full, hu_offset=lung_offset)
    # Mediastinum (fat mixed with soft tissue, ~-60 HU).
    med_a = rng.uniform(22.0, 32.0) * (1.0 - 0.2 * apex)
    med_win = frame.window(0.0, cav_cy, cav_b + 10.0)
    mx, my = canvas.coords(med_win)
    med_sd = _superellipse_sd(mx, my, 0.0, cav_cy - 0.1 * cav_b, med_a, cav_b * 0.98, power=2.6)
    canvas.paint(Tissue.FAT, _cover(med_sd, pixel), med_win, hu_offset=40.0)
    # Vertebra, canal, posterior elements, paraspinal muscles (anchored to the posterior skin).
    vb_r = rng.uniform(14.0, 19.0)
    spine_tip = big_b - fat - 6.0
    canal_y = spine_tip - 23.0
    vb_y = canal_y - 9.0 - vb_r
    for side in (-1.0, 1.0):
        pwin = frame.window(side * 30.0, canal_y + 2.0, 30.0)
        px_, py_ = canvas.coords(pwin)
        para = _superellipse_sd(px_, py_, side * 30.0, canal_y + 2.0, 24.0, 20.0)
        inner = body_sd[pwin] - fat_map[pwin]
        canvas.paint(Tissue.SOFT, _cover(np.minimum(para, inner), pixel), pwin)
    _paint_bone(canvas, 0.0, vb_y, vb_r, vb_r * 0.85, cortex=1.5, marrow=rng.uniform(0.22, 0.35), power=2.3)
    _paint_bone(canvas, 0.0, canal_y, 11.0, 10.5, cortex=2.0, marrow=0.7)  # neural arch
    for side in (-1.0, 1.0):
        _paint_bone(canvas, side * 20.0, canal_y - 3.0, 12.0, 4.5, angle=side * 12.0, cortex=1.0, marrow=0.5)
    _paint_bone(canvas, 0.0, spine_tip - 9.0, 3.5, 9.0, cortex=1.0, marrow=0.5)  # spinous process
    _paint_disc(canvas, Tissue.CSF, 0.0, canal_y, 7.0)
    _paint_disc(canvas, Tissue.SOFT, 0.0, canal_y, 4.0)  # cord
    # Heart and great vessels.
    heart = float(np.clip((0.6 - level) / 0.35, 0.0, 1.0)) ** 0.5 * (1.0 - 0.35 * max(0.0, 0.2 - level) / 0.2)
    ha, hb = 0.45 * cav_a * heart, 0.6 * cav_b * heart
    hx, hy = 0.16 * cav_a, cav_cy - 0.12 * cav_b
    hang = rng.uniform(-40.0, -25.0)
    if heart > 0.05:
        hwin = frame.window(hx, hy, max(ha, hb) + 5.0)
        qx, qy = canvas.coords(hwin)
        canvas.paint(
            Tissue.FAT, _cover(_superellipse_sd(qx, qy, hx, hy, ha + 4, hb + 4, angle_deg=hang), pixel), hwin
        )
        canvas.paint(
            Tissue.SOFT, _cover(_superellipse_sd(qx, qy, hx, hy, ha, hb, angle_deg=hang), pixel), hwin
        )
        ca_, sa_ = math.cos(math.radians(hang)), math.sin(math.radians(hang))

        def chamber(fx: float, fy: float, ra: float, rb: float) -> None:
            cx_ = hx + (fx * ha) * ca_ - (fy * hb) * sa_
            cy_ = hy + (fx * ha) * sa_ + (fy * hb) * ca_
            sd_ = _superellipse_sd(qx, qy, cx_, cy_, ra * ha, rb * hb, angle_deg=hang)
            canvas.paint(Tissue.BLOOD, _cover(sd_, pixel), hwin)

        if level < 0.3:
            chamber(0.3, 0.15, 0.42, 0.45)  # left ventricle
            chamber(-0.35, -0.25, 0.38, 0.35)  # right ventricle
        else:
            chamber(0.1, 0.45, 0.45, 0.35)  # left atrium
            chamber(-0.5, 0.0, 0.35, 0.4)  # right atrium
    desc_r = rng.uniform(10.0, 13.0)
    desc = (18.0 + 0.3 * desc_r, vb_y - vb_r - desc_r * 0.6)
    asc = (-8.0, cav_cy - 0.42 * cav_b)
    asc_r = rng.uniform(13.0, 17.0)
    if level < 0.64:
        _paint_disc(canvas, Tissue.BLOOD, *desc, desc_r)
    if 0.35 < level < 0.64:
        _paint_disc(canvas, Tissue.BLOOD, *asc, asc_r)
    if 0.62 <= level < 0.74:
        _paint_tube(canvas, Tissue.BLOOD, asc, desc, 0.5 * (asc_r + desc_r))  # aortic arch
    if level >= 0.74:
        for bx, by in ((-12.0, asc[1] + 8.0), (2.0, asc[1] + 4.0), (14.0, asc[1] + 10.0)):
            _paint_disc(canvas, Tissue.BLOOD, bx, by, rng.uniform(4.0, 6.5))
    if 0.45 < level < 0.62:
        pt = (0.2 * cav_a, cav_cy - 0.3 * cav_b)
        _paint_disc(canvas, Tissue.BLOOD, *pt, rng.uniform(11.0, 14.0))
        _paint_tube(canvas, Tissue.BLOOD, pt, (med_a + 12.0, cav_cy - 0.05 * cav_b), 7.0)
        _paint_tube(canvas, Tissue.BLOOD, pt, (-med_a - 12.0, cav_cy - 0.1 * cav_b), 7.0)
    if 0.4 < level < 0.78:
        _paint_disc(canvas, Tissue.BLOOD, -0.22 * cav_a, cav_cy - 0.28 * cav_b, rng.uniform(8.0, 11.0))  # SVC
    airway_y = vb_y - vb_r - 20.0
    _paint_disc(canvas, Tissue.SOFT, 6.0, vb_y - vb_r - 6.0, 6.0)  # oesophagus
    if level >= 0.58:
        _paint_disc(canvas, Tissue.SOFT, 0.0, airway_y, 11.0)
        _paint_disc(canvas, Tissue.AIR, 0.0, airway_y, 9.0)
    elif level >= 0.48:
        for side in (-1.0, 1.0):
            _paint_disc(canvas, Tissue.SOFT, side * 13.0, airway_y + 4.0, 7.5)
            _paint_disc(canvas, Tissue.AIR, side * 13.0, airway_y + 4.0, 5.8)
    # Liver dome (patient right = canonical -x) and spleen at the bases, inside the cavity.
    if level < 0.3:
        grow = ((0.3 - level) / 0.3) ** 0.5
        lwin = frame.window(-0.35 * cav_a, cav_cy + 0.1 * cav_b, cav_a)
        lx, ly = canvas.coords(lwin)
        liv = _superellipse_sd(
            lx, ly, -0.4 * cav_a, cav_cy + 0.15 * cav_b, 0.62 * cav_a * grow, 0.8 * cav_b * grow
        )
        canvas.paint(Tissue.LIVER, _cover(np.minimum(liv, cavity_sd[lwin]), pixel), lwin)
        if level < 0.15:
            sp = _superellipse_sd(
                lx, ly, 0.55 * cav_a, cav_cy + 0.5 * cav_b, 0.3 * cav_a * grow, 0.35 * cav_b * grow
            )
            canvas.paint(Tissue.SOFT, _cover(np.minimum(sp, cavity_sd[lwin]), pixel), lwin)
    # Pulmonary vessels: trees from each hilum plus cross-sections, bronchi, fissures.
    for side in (-1.0, 1.0):
        hilum = (side * (med_a + 8.0), cav_cy - 0.05 * cav_b)
        _vessel_tree(canvas, rng, hilum, side)
        for _ in range(int(rng.integers(120, 220))):  # vessels crossing the slice
            ex = side * rng.uniform(med_a, cav_a)
            ey = cav_cy + rng.uniform(-cav_b, cav_b)
            far = min(1.0, math.hypot(ex - hilum[0], ey - hilum[1]) / cav_a)
            r = (0.4 + 2.2 * rng.random() ** 2.5) * (1.0 - 0.55 * far)
            if rng.random() < 0.12 and r > 1.0:  # bronchus next to its artery
                bx, by = ex + rng.uniform(-1.0, 1.0) * 2.5 * r, ey + 2.5 * r
                _paint_disc(canvas, Tissue.SOFT, bx, by, r + 0.8, within=Tissue.LUNG)
                _paint_disc(canvas, Tissue.AIR, bx, by, r, within=Tissue.SOFT)
            _paint_disc(canvas, Tissue.BLOOD, ex, ey, r, within=Tissue.LUNG)
        f0 = (side * (med_a + 5.0), cav_cy + rng.uniform(-0.6, -0.2) * cav_b)
        f1 = (side * cav_a * rng.uniform(0.7, 0.95), cav_cy + rng.uniform(0.2, 0.7) * cav_b)
        _paint_tube(canvas, Tissue.SOFT, f0, f1, 0.45, within=Tissue.LUNG, weight=0.6)  # fissure
    # Nodules (solid or ground glass) inside the lungs.
    nodules: list[Lesion] = []
    n_nod = int(rng.integers(0, 4)) if n_nodules is None else int(n_nodules)
    rr, cc = np.mgrid[0:size, 0:size]
    lung_room = ndi.distance_transform_edt(canvas.fractions[Tissue.LUNG] > 0.5) * pixel
    for _ in range(n_nod):
        diam = 3.0 + 17.0 * rng.random() ** 2
        cand = np.flatnonzero(lung_room >= diam / 2.0 + 2.0)
        if cand.size == 0:
            continue
        r0, c0 = divmod(int(cand[rng.integers(cand.size)]), size)
        radius_px = diam / 2.0 / pixel
        sd_n = radius_px * (1.0 + 0.12 * np.cos(3 * np.arctan2(rr - r0, cc - c0) + rng.uniform(0, 6.3)))
        sd_n = (sd_n - np.hypot(rr - r0, cc - c0)) * pixel
        cov = _cover(sd_n, pixel)
        solid = rng.random() < 0.7
        offset = rng.uniform(-40.0, 30.0) if solid else -rng.uniform(550.0, 700.0)
        canvas.paint(Tissue.NODULE, cov, full, hu_offset=offset)
        lung_hu = TISSUE_HU[Tissue.LUNG].mean
        nodules.append(
            Lesion(
                mask=cov >= 0.5,
                center_rc=(float(r0), float(c0)),
                diameter_mm=float(diam),
                contrast_hu=float(TISSUE_HU[Tissue.NODULE].mean + offset - lung_hu),
                host=int(Tissue.LUNG),
                pixel_mm=pixel,
                kind="nodule",
            )
        )
        lung_room[cov > 0] = 0.0
    anat = AnatomySlice(
        kind="chest",
        pixel_mm=pixel,
        fractions=canvas.fractions,
        density=canvas.density,
        hu_offset=canvas.hu_offset,
        level=level,
        nodules=tuple(nodules),
    )
    lesions = place_lesions(
        anat.labels,
        pixel,
        (Tissue.SOFT, Tissue.LIVER),
        n_lesions,
        rng,
        contrast_hu=lesion_contrast_hu,
        diameter_mm=lesion_diameter_mm,
    )
    return dataclasses.replace(anat, lesions=tuple(lesions))
