"""Paired MR / CT head volumes on one voxel grid, for synthetic-CT (MR -> CT) training and evaluation.

One seed gives one registered pair: a reference CT in Hounsfield units and spin-echo T1w and T2w
magnitude images, made from the *same* tissue model and the *same* random deformation, so voxel
``(k, r, c)`` is the same piece of anatomy in every volume.

Anatomy
    The MNI152 2009a template that nilearn ships (loaded by :func:`models.sim.anatomy._head_atlas`;
    nothing is fetched) gives grey matter, white matter and CSF fractions and the signed distance to
    the intracranial surface. Skull and scalp are layers of that 3-D distance, from the inside out:
    inner table (cortical bone), diploe (cancellous bone and marrow), outer table (cortical bone),
    galea / temporalis muscle, subcutaneous fat, skin. Thicknesses vary smoothly in space and per
    case; where the skull is thinner than its two tables (temporal squama) it is all cortical. A
    frontal sinus sits inside a locally thickened frontal bone: an air cavity with thin cortical
    walls, behind the forehead, so air lies directly against cortical bone.
Partial volume
    Each voxel holds tissue *fractions*: the overlap of a box one pixel wide, centred on the voxel
    and laid along the distance gradient, with each layer; brain voxels mix grey, white and CSF from
    the template probabilities (sharpened, as in :func:`models.sim.anatomy.head_slice`).
Geometry
    Per seed: rotation (yaw up to +/-10 deg, pitch +/-6 deg, roll +/-3 deg), anisotropic scaling
    (0.92-1.08 in-plane, 0.95-1.05 axially), in-plane translation (+/-5 mm) and a smooth 3-D elastic
    displacement (~2.5 mm, correlation ~20 mm). The head is kept inside the field of view.
CT
    HU per tissue (:data:`CT_TISSUES`) with a per-case mean and correlated texture at three scales
    (fine 0.6 mm, mid 2 mm, coarse 6 mm); cortical bone 1000-1800 HU and cancellous bone 300-700 HU
    with regional mineralisation and trabecular texture. Partial volume mixes HU linearly. No
    acquisition noise: it is the evaluation reference ("truth"), not a scan.
MR
    Spin-echo magnitude ``S = PD * (1 - exp(-TR / T1)) * exp(-TE / T2)`` per tissue
    (:data:`MR_TISSUES`, BrainWeb-like values at 1.5 T; :data:`T1W` TR/TE 500/12 ms, :data:`T2W`
    4000/100 ms), summed over the voxel's tissue fractions, with per-case jitter of T1, T2 and PD
    (~4 %), a mild tissue texture shared with the CT, a smooth multiplicative bias field (one per
    case, the receive coil's), a random receiver gain per sequence and Rician noise
    ``|S + n_re + i n_im|``, ``n ~ N(0, sigma)``. Cortical bone (PD ~ 0.05, T2 ~ 1 ms) and air (PD 0)
    give no signal: both are dark on MR and ~2000 HU apart on CT — the ambiguity an MR -> CT model
    has to resolve from context.

Not modelled: other sinuses, orbits, nasal cavity, mastoid and skull base detail (the template is
skull-stripped and the simulated stack stays within MNI z = -30 .. +72 mm), vessels, susceptibility
and chemical-shift artefacts, gradient non-linearity, motion, slice profile, and a pelvis or torso.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage as ndi

from models.sim.anatomy import DEFAULT_HEAD_FOV_MM, HEAD_Z_RANGE_MM, _head_atlas

#: Main field of the simulated MR scanner (the BrainWeb relaxation values are for 1.5 T).
FIELD_STRENGTH_T = 1.5
#: Proton gyromagnetic ratio / 2 pi, MHz per tesla (imaging frequency = this * field).
GYROMAGNETIC_MHZ_PER_T = 42.577
DEFAULT_SLICE_THICKNESS_MM = 2.5
#: Texture correlation scales (mm, Gaussian sigma): fine, mid, coarse.
TEXTURE_SCALES_MM: tuple[float, float, float] = (0.6, 2.0, 6.0)


class HeadTissue(IntEnum):
    """Tissue labels of a paired MR / CT head volume."""

    AIR = 0  # outside the patient
    SINUS_AIR = 1  # air inside the head (frontal sinus)
    FAT = 2  # subcutaneous fat
    SOFT = 3  # skin, galea, temporalis muscle
    CORTICAL_BONE = 4  # inner and outer tables, sinus walls, thin temporal bone
    CANCELLOUS_BONE = 5  # diploe: trabecular bone with (fatty) marrow
    CSF = 6
    GREY = 7
    WHITE = 8


N_HEAD_TISSUES = len(HeadTissue)


@dataclass(frozen=True)
class TissueCT:
    """CT model of one tissue.

    Attributes
    ----------
    mean_hu : float
        Population mean CT number.
    spread_hu : float
        Standard deviation of the per-case mean (inter-patient / inter-scanner variation).
    texture_hu : tuple of float
        Standard deviations of the fine, mid and coarse texture fields inside the tissue.
    """

    mean_hu: float
    spread_hu: float
    texture_hu: tuple[float, float, float]


#: HU per tissue. Bone means are per-case *ranges* drawn uniformly (see :data:`BONE_MEAN_HU`);
#: their ``spread_hu`` is the amplitude of the smooth regional (mineralisation) variation.
CT_TISSUES: dict[HeadTissue, TissueCT] = {
    HeadTissue.AIR: TissueCT(-1000.0, 0.0, (0.0, 0.0, 0.0)),
    HeadTissue.SINUS_AIR: TissueCT(-1000.0, 0.0, (0.0, 0.0, 0.0)),
    HeadTissue.FAT: TissueCT(-100.0, 10.0, (6.0, 6.0, 4.0)),
    HeadTissue.SOFT: TissueCT(45.0, 5.0, (4.0, 4.0, 3.0)),
    HeadTissue.CORTICAL_BONE: TissueCT(1400.0, 140.0, (50.0, 40.0, 0.0)),
    HeadTissue.CANCELLOUS_BONE: TissueCT(500.0, 70.0, (110.0, 50.0, 0.0)),
    HeadTissue.CSF: TissueCT(15.0, 3.0, (1.5, 1.0, 1.0)),
    HeadTissue.GREY: TissueCT(40.0, 3.0, (2.5, 2.5, 2.0)),
    HeadTissue.WHITE: TissueCT(30.0, 2.0, (2.5, 2.5, 2.0)),
}
#: Per-case mean HU of bone, drawn uniformly in these ranges.
BONE_MEAN_HU: dict[HeadTissue, tuple[float, float]] = {
    HeadTissue.CORTICAL_BONE: (1250.0, 1550.0),
    HeadTissue.CANCELLOUS_BONE: (420.0, 580.0),
}
#: Voxel HU of pure bone is kept inside these (physiological) limits.
BONE_HU_LIMITS: dict[HeadTissue, tuple[float, float]] = {
    HeadTissue.CORTICAL_BONE: (950.0, 1900.0),
    HeadTissue.CANCELLOUS_BONE: (150.0, 900.0),
}
#: Regional mineralisation correlation length (mm) of the bone HU variation.
BONE_REGION_MM = 8.0


@dataclass(frozen=True)
class TissueMR:
    """MR relaxation model of one tissue at :data:`FIELD_STRENGTH_T`.

    Attributes
    ----------
    t1_ms : float
        Longitudinal relaxation time.
    t2_ms : float
        Transverse relaxation time (spin echo; for cortical bone its ultrashort T2*).
    pd : float
        Proton density relative to CSF (1.0).
    """

    t1_ms: float
    t2_ms: float
    pd: float


#: BrainWeb-like relaxation values at 1.5 T (Aubert-Broche et al. 2006 for CSF, GM, WM, fat and
#: muscle; diploe is fatty marrow with ~25 % trabecular bone; cortical bone's water is bound, with
#: T2* ~0.4-1 ms, so it gives no signal at a conventional echo time).
MR_TISSUES: dict[HeadTissue, TissueMR] = {
    HeadTissue.AIR: TissueMR(1.0, 1.0, 0.0),
    HeadTissue.SINUS_AIR: TissueMR(1.0, 1.0, 0.0),
    HeadTissue.FAT: TissueMR(350.0, 70.0, 1.0),
    HeadTissue.SOFT: TissueMR(900.0, 47.0, 0.8),
    HeadTissue.CORTICAL_BONE: TissueMR(250.0, 1.0, 0.05),
    HeadTissue.CANCELLOUS_BONE: TissueMR(400.0, 60.0, 0.6),
    HeadTissue.CSF: TissueMR(2569.0, 329.0, 1.0),
    HeadTissue.GREY: TissueMR(833.0, 83.0, 0.86),
    HeadTissue.WHITE: TissueMR(500.0, 70.0, 0.77),
}
#: Relative amplitude of the MR tissue texture (the CT's mid and coarse fields, shared anatomy).
MR_TEXTURE = 0.02


@dataclass(frozen=True)
class SpinEcho:
    """A 2-D spin-echo protocol.

    Attributes
    ----------
    name : str
        ``"t1w"`` or ``"t2w"``.
    tr_ms : float
        Repetition time.
    te_ms : float
        Echo time.
    flip_angle_deg : float
        Excitation flip angle (90 for spin echo).
    echo_train_length : int
        Echoes per excitation (1: conventional spin echo, which the signal equation describes).
    """

    name: str
    tr_ms: float
    te_ms: float
    flip_angle_deg: float = 90.0
    echo_train_length: int = 1

    def signal(self, t1_ms: np.ndarray, t2_ms: np.ndarray, pd: np.ndarray) -> np.ndarray:
        """Spin-echo magnitude ``PD * (1 - exp(-TR / T1)) * exp(-TE / T2)``.

        Parameters
        ----------
        t1_ms, t2_ms, pd : numpy.ndarray
            Tissue parameters (broadcastable).

        Returns
        -------
        numpy.ndarray
            The noise-free signal (PD units).
        """
        t1 = np.asarray(t1_ms, dtype=np.float64)
        t2 = np.asarray(t2_ms, dtype=np.float64)
        return np.asarray(pd) * (1.0 - np.exp(-self.tr_ms / t1)) * np.exp(-self.te_ms / t2)


#: T1-weighted spin echo (WM > GM > CSF, fat bright).
T1W = SpinEcho("t1w", tr_ms=500.0, te_ms=12.0)
#: T2-weighted spin echo (CSF brightest, GM > WM).
T2W = SpinEcho("t2w", tr_ms=4000.0, te_ms=100.0)
PROTOCOLS: dict[str, SpinEcho] = {T1W.name: T1W, T2W.name: T2W}


@dataclass(frozen=True)
class MrCtPair:
    """One registered MR / CT head volume pair.

    All volumes are ``(slices, rows, cols)`` on one grid. Axis 0 runs inferior -> superior, axis 1
    anterior -> posterior, axis 2 patient right -> left (DICOM LPS, axial, head first supine).

    Attributes
    ----------
    anatomy : str
        ``"head"``.
    seed : int
        Seed the pair was made from.
    spacing_mm : tuple of float
        Voxel spacing ``(slice, row, col)`` in mm (slice spacing = slice thickness).
    level : float
        Position of the stack centre in [0, 1] within the MNI z range the stack can cover.
    ct_hu : numpy.ndarray
        Reference CT, float32 HU (noise-free, textured).
    t1w : numpy.ndarray
        T1-weighted spin-echo magnitude, float32, arbitrary units (WM ~400-1200).
    t2w : numpy.ndarray
        T2-weighted spin-echo magnitude, float32, arbitrary units.
    labels : numpy.ndarray
        ``uint8`` :class:`HeadTissue` with the largest fraction in each voxel.
    label_fraction : numpy.ndarray
        float32 fraction of the voxel occupied by its labelled tissue (1 = pure; partial volume
        below).
    body_mask : numpy.ndarray
        Boolean patient mask (inside the skin, sinus air included).
    bias_field : numpy.ndarray
        float32 multiplicative receive bias field applied to both MR volumes (mean ~1).
    noise_sigma : dict
        Rician noise sigma per sequence (``"t1w"``, ``"t2w"``), in the volume's units.
    protocols : dict
        :class:`SpinEcho` per sequence.
    field_strength_t : float
        Main field in tesla.
    """

    anatomy: str
    seed: int
    spacing_mm: tuple[float, float, float]
    level: float
    ct_hu: np.ndarray
    t1w: np.ndarray
    t2w: np.ndarray
    labels: np.ndarray
    label_fraction: np.ndarray
    body_mask: np.ndarray
    bias_field: np.ndarray
    noise_sigma: dict[str, float]
    protocols: dict[str, SpinEcho]
    field_strength_t: float = FIELD_STRENGTH_T

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, cols)``."""
        s, r, c = self.ct_hu.shape
        return int(s), int(r), int(c)

    def mr(self, sequence: str) -> np.ndarray:
        """The MR volume of one sequence.

        Parameters
        ----------
        sequence : str
            ``"t1w"`` / ``"t1"`` or ``"t2w"`` / ``"t2"``.

        Returns
        -------
        numpy.ndarray
            The float32 magnitude volume.
        """
        name = sequence.lower().removesuffix("w")
        if name == "t1":
            return self.t1w
        if name == "t2":
            return self.t2w
        raise ValueError(f"unknown sequence {sequence!r}: choose t1w or t2w")

    def protocol(self, sequence: str) -> SpinEcho:
        """The :class:`SpinEcho` protocol of ``"t1w"``/``"t1"`` or ``"t2w"``/``"t2"``."""
        name = sequence.lower().removesuffix("w") + "w"
        if name not in self.protocols:
            raise ValueError(f"unknown sequence {sequence!r}: choose t1w or t2w")
        return self.protocols[name]


# -- random fields ----------------------------------------------------------------------------
def smooth_field(
    axes: tuple[np.ndarray, np.ndarray, np.ndarray], corr_mm: float, rng: np.random.Generator, n: int = 1
) -> np.ndarray:
    """Unit-variance smooth Gaussian random field on a separable grid, defined in millimetres.

    White noise on a lattice (spacing ``corr_mm / 2``, reaching ``3 corr_mm`` beyond the grid) is
    summed with Gaussian weights of sigma ``corr_mm``; the weights are normalised per axis so the
    variance is exactly one at every point. Evaluated by three small matrix products, so it is
    cheap, free of grid artefacts and independent of the voxel size.

    Parameters
    ----------
    axes : tuple of numpy.ndarray
        Coordinates (mm) along axis 0, 1 and 2.
    corr_mm : float
        Sigma of the Gaussian kernel in mm (the covariance falls to 1/e at 2 corr_mm).
    rng : numpy.random.Generator
        Source of randomness.
    n : int, optional
        Number of independent fields.

    Returns
    -------
    numpy.ndarray
        ``(n, len(axes[0]), len(axes[1]), len(axes[2]))`` float32.
    """
    step = corr_mm / 2.0
    weights = []
    for coord in axes:
        c = np.asarray(coord, dtype=np.float64)
        nodes = np.arange(c.min() - 3.0 * corr_mm, c.max() + 3.0 * corr_mm + step, step)
        w = np.exp(-0.5 * ((c[:, None] - nodes[None, :]) / corr_mm) ** 2)
        weights.append(w / np.sqrt((w**2).sum(axis=1, keepdims=True)))
    wz, wy, wx = weights
    lattice = rng.standard_normal((n, wz.shape[1], wy.shape[1], wx.shape[1]))
    out = np.einsum("nabc,xc->nabx", lattice, wx)
    out = np.einsum("nabx,yb->nayx", out, wy)
    out = np.einsum("nayx,za->nzyx", out, wz)
    return out.astype(np.float32)


def _texture(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    scale_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Unit-variance correlated noise: white noise smoothed by a Gaussian of ``scale_mm``."""
    white = rng.standard_normal(shape, dtype=np.float32)
    sigma = tuple(scale_mm / s for s in spacing)
    field = ndi.gaussian_filter(white, sigma, truncate=3.0)
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)


# -- geometry ---------------------------------------------------------------------------------
def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix (x, y, z patient axes): yaw about z, pitch about x, roll about y (radians)."""
    cz, sz = math.cos(yaw), math.sin(yaw)
    cx, sx = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    return rz @ rx @ ry


def _sample_atlas(volume: np.ndarray, coords: np.ndarray, cval: float) -> np.ndarray:
    return ndi.map_coordinates(volume, coords, order=1, mode="constant", cval=cval).astype(np.float32)


def _sample_distance(sd: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Signed distance to the intracranial surface, extended beyond the template box.

    The template box ends ~25 mm in front of the forehead; outside it, the distance at the nearest
    box point plus the distance to the box keeps the scalp and frontal sinus intact.
    """
    upper = np.array(sd.shape, dtype=np.float32)[:, None] - 1.0
    flat = coords.reshape(3, -1)
    clamped = np.clip(flat, 0.0, upper)
    outside = np.sqrt(((flat - clamped) ** 2).sum(axis=0))
    inside = ndi.map_coordinates(sd, clamped, order=1, mode="nearest")
    return (inside + outside).astype(np.float32).reshape(coords.shape[1:])


# -- the pair ---------------------------------------------------------------------------------
def make_pair(
    seed: int,
    *,
    slices: int = 24,
    size: int = 256,
    level: float | None = None,
    anatomy: str = "head",
    fov_mm: float = DEFAULT_HEAD_FOV_MM,
    slice_thickness_mm: float = DEFAULT_SLICE_THICKNESS_MM,
    noise: tuple[float, float] = (0.015, 0.04),
    bias: tuple[float, float] = (0.05, 0.15),
    rotation_deg: float = 10.0,
    tilt_deg: float = 6.0,
    elastic_mm: float = 2.5,
) -> MrCtPair:
    """Simulate one registered MR (T1w and T2w) / CT head volume pair.

    The seed fixes everything; it is split into independent streams for geometry, anatomy, CT,
    MR parameters and MR noise.

    Parameters
    ----------
    seed : int
        Case seed.
    slices : int, optional
        Number of contiguous axial slices.
    size : int, optional
        Rows and columns (square).
    level : float, optional
        Stack centre in [0, 1]: 0 puts the lowest slice at MNI z = -30 mm, 1 the highest at
        +72 mm (a stack longer than that range is centred on it); random if omitted.
    anatomy : str, optional
        ``"head"`` (the only anatomy implemented).
    fov_mm : float, optional
        In-plane field of view (default 250 mm).
    slice_thickness_mm : float, optional
        Slice thickness and spacing (contiguous slices).
    noise : tuple of float, optional
        Range of the Rician noise sigma, relative to the mean white-matter signal, per sequence.
    bias : tuple of float, optional
        Range of the standard deviation of the log bias field.
    rotation_deg : float, optional
        Maximum yaw (in-plane rotation).
    tilt_deg : float, optional
        Maximum pitch (nodding); roll is half of it.
    elastic_mm : float, optional
        Typical amplitude of the smooth elastic displacement.

    Returns
    -------
    MrCtPair
        The pair.
    """
    if anatomy != "head":
        raise ValueError(
            f"anatomy {anatomy!r} is not simulated: only 'head' (MNI152) has a paired MR/CT model"
        )
    if slices < 1 or size < 8:
        raise ValueError("need at least one slice and 8 x 8 pixels")
    rng_geo, rng_anat, rng_ct, rng_mr, rng_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    atlas = _head_atlas()
    pixel = fov_mm / size
    dz = float(slice_thickness_mm)
    shape = (slices, size, size)
    spacing = (dz, pixel, pixel)

    # Which part of the head the stack covers.
    half = (slices - 1) * dz / 2.0
    lo, hi = HEAD_Z_RANGE_MM[0] + half, HEAD_Z_RANGE_MM[1] - half
    level = float(rng_geo.uniform(0.0, 1.0)) if level is None else float(np.clip(level, 0.0, 1.0))
    z_centre = lo + level * (hi - lo) if lo <= hi else 0.5 * sum(HEAD_Z_RANGE_MM)

    # Rigid + scale + translation, shrunk if needed to keep the head in the field of view.
    yaw = math.radians(rng_geo.uniform(-rotation_deg, rotation_deg))
    pitch = math.radians(rng_geo.uniform(-tilt_deg, tilt_deg))
    roll = math.radians(rng_geo.uniform(-tilt_deg, tilt_deg) / 2.0)
    scale = np.array([rng_geo.uniform(0.92, 1.08), rng_geo.uniform(0.92, 1.08), rng_geo.uniform(0.95, 1.05)])
    shift = np.array([*rng_geo.uniform(-5.0, 5.0, size=2), 0.0])
    skull_base = rng_anat.uniform(5.0, 7.5)
    scalp_base = rng_anat.uniform(4.0, 7.0)
    sinus_extra = rng_anat.uniform(10.0, 18.0)
    extent = atlas.radius_mm + skull_base + scalp_base + 0.5 * sinus_extra + 2.0 * elastic_mm + 4.0
    budget = fov_mm / 2.0 - 4.0 - float(np.hypot(shift[0], shift[1]))
    scale[:2] *= min(1.0, budget / (float(scale[:2].max()) * extent))
    rot = _rotation(yaw, pitch, roll)
    axis_mm = (np.arange(size) - (size - 1) / 2.0) * pixel
    z_mm = (np.arange(slices) - (slices - 1) / 2.0) * dz
    disp = elastic_mm * smooth_field((z_mm, axis_mm, axis_mm), 10.0, rng_geo, n=3)  # (x, y, z) comps
    # canonical q = S^-1 R^T (p - t) + d(p), p = (x, y, z) patient mm about the stack centre
    inv = (rot.T / scale[:, None]).astype(np.float32)
    px = (axis_mm - shift[0]).astype(np.float32)[None, None, :]
    py = (axis_mm - shift[1]).astype(np.float32)[None, :, None]
    pz = z_mm.astype(np.float32)[:, None, None]
    q = [inv[i, 0] * px + inv[i, 1] * py + inv[i, 2] * pz + disp[i] for i in range(3)]
    # Patient LPS (x left, y posterior) -> MNI RAS (x right, y anterior), voxel indices of the atlas.
    mx, my, mz = atlas.center_xy[0] - q[0], atlas.center_xy[1] - q[1], z_centre + q[2]
    coords = np.stack([mx - atlas.origin[0], my - atlas.origin[1], mz - atlas.origin[2]]).astype(np.float32)
    del q, disp

    sd = _sample_distance(atlas.sd, coords)
    grey = _sample_atlas(atlas.grey, coords, 0.0) ** 2
    white = _sample_atlas(atlas.white, coords, 0.0) ** 2
    csf = _sample_atlas(atlas.csf, coords, 0.0) ** 2
    del coords
    total = grey + white + csf
    empty = total <= 1e-6
    csf[empty] = 1.0
    total[empty] = 1.0
    grey /= total
    white /= total
    csf /= total
    del total, empty

    # Layer thicknesses (canonical mm), smoothly varying per case.
    fields = smooth_field((z_mm, axis_mm, axis_mm), 12.5, rng_anat, n=4)
    skull = np.clip(skull_base + 1.2 * fields[0], 3.0, 11.0)
    inner = rng_anat.uniform(1.3, 2.2) * (1.0 + 0.15 * fields[3])
    outer = rng_anat.uniform(1.6, 2.8) * (1.0 - 0.15 * fields[3])
    tables = inner + outer
    squeeze = np.minimum(1.0, skull / tables)  # thin skull: all cortical
    inner, outer = inner * squeeze, outer * squeeze
    diploe = skull - inner - outer
    theta = np.arctan2(my - atlas.center_xy[1], mx - atlas.center_xy[0])  # 0 = patient right
    lateral = np.clip((np.abs(np.cos(theta)) - 0.7) / 0.3, 0.0, 1.0)
    temporal = 5.0 * lateral * (0.3 + 0.7 * np.clip((40.0 - mz) / 10.0, 0.0, 1.0))
    muscle = 1.0 + temporal + 0.3 * fields[1]
    scalp = np.clip(scalp_base + 0.8 * fields[2], 2.5, 10.0) + temporal
    skin = 1.5
    fat = np.maximum(scalp - skin - muscle, 0.0)
    del fields, theta, lateral, temporal
    # Frontal sinus: a block of bone inserted after the inner table, behind the forehead, hollowed
    # out by air with ~1 mm cortical walls.
    sinus_z = rng_anat.uniform(-5.0, 8.0)
    sinus_x, sinus_h = rng_anat.uniform(15.0, 25.0), rng_anat.uniform(10.0, 15.0)
    ant = my - atlas.center_xy[1]
    frontal = np.clip(ant / np.hypot(mx - atlas.center_xy[0], ant) - 0.8, 0.0, 0.15) / 0.15
    block = (
        sinus_extra
        * frontal
        * np.exp(-(((mx - atlas.center_xy[0]) / sinus_x) ** 2) - ((mz - sinus_z) / sinus_h) ** 2)
    )
    wall = np.minimum(0.5 * block, 1.0)
    air = block - 2.0 * wall
    del frontal, ant, mx, my, mz

    # Partial-volume fractions: overlap of a one-pixel box along the distance with each layer.
    width = pixel / float(scale[:2].mean())
    bounds = [0.0, inner, wall, air, wall, diploe, outer, muscle, fat, skin]
    layers = [
        HeadTissue.CORTICAL_BONE,
        HeadTissue.CORTICAL_BONE,
        HeadTissue.SINUS_AIR,
        HeadTissue.CORTICAL_BONE,
        HeadTissue.CANCELLOUS_BONE,
        HeadTissue.CORTICAL_BONE,
        HeadTissue.SOFT,
        HeadTissue.FAT,
        HeadTissue.SOFT,
    ]
    fractions = np.zeros((N_HEAD_TISSUES, *shape), dtype=np.float32)
    start = sd - 0.5 * width
    edge = np.zeros(shape, dtype=np.float32)
    below = np.clip(-start / width, 0.0, 1.0)  # fraction of the box inside the intracranial space
    fractions[HeadTissue.GREY] = below * grey
    fractions[HeadTissue.WHITE] = below * white
    fractions[HeadTissue.CSF] = below * csf
    del grey, white, csf
    for tissue, thickness in zip(layers, bounds[1:], strict=True):
        edge = edge + thickness
        above = np.clip((edge - start) / width, 0.0, 1.0)
        fractions[tissue] += above - below
        below = above
    fractions[HeadTissue.AIR] = 1.0 - below
    del start, edge, below, sd, bounds

    labels = np.argmax(fractions, axis=0).astype(np.uint8)
    label_fraction = np.take_along_axis(fractions, labels[None].astype(np.intp), axis=0)[0]
    body = ndi.binary_fill_holes(labels != HeadTissue.AIR, structure=np.ones((1, 3, 3), dtype=bool))
    body_mask = np.asarray(body, dtype=bool)

    # CT in HU.
    textures = [_texture(shape, spacing, s, rng_ct) for s in TEXTURE_SCALES_MM]
    trabecular = _texture(shape, spacing, 0.4, rng_ct)
    region = smooth_field((z_mm, axis_mm, axis_mm), BONE_REGION_MM, rng_ct, n=2)
    ct = np.zeros(shape, dtype=np.float32)
    means: dict[HeadTissue, float] = {}
    for tissue in HeadTissue:
        model = CT_TISSUES[tissue]
        means[tissue] = (
            rng_ct.uniform(*BONE_MEAN_HU[tissue])
            if tissue in BONE_MEAN_HU
            else model.mean_hu + model.spread_hu * rng_ct.standard_normal()
        )
    gap = float(np.clip(means[HeadTissue.GREY] - means[HeadTissue.WHITE], 6.0, 14.0))
    means[HeadTissue.WHITE] = means[HeadTissue.GREY] - gap
    texture_gain = rng_ct.uniform(0.8, 1.25)
    for tissue in HeadTissue:
        frac = fractions[tissue]
        if not np.any(frac > 0):
            continue
        amp = np.asarray(CT_TISSUES[tissue].texture_hu) * texture_gain
        if tissue in BONE_MEAN_HU:
            k = 0 if tissue == HeadTissue.CORTICAL_BONE else 1
            fine = trabecular if tissue == HeadTissue.CANCELLOUS_BONE else textures[0]
            value = means[tissue] + CT_TISSUES[tissue].spread_hu * region[k]
            value = value + amp[0] * fine + amp[1] * textures[1]
            value = np.clip(value, *BONE_HU_LIMITS[tissue])
        elif amp.any():
            value = means[tissue] + amp[0] * textures[0] + amp[1] * textures[1] + amp[2] * textures[2]
        else:
            value = np.float32(means[tissue])
        ct += frac * value
    ct_hu = np.maximum(ct, np.float32(-1000.0)).astype(np.float32)
    del ct, trabecular, region

    # MR: spin-echo signal per tissue (per-case jitter), mild shared texture, bias, gain, noise.
    params = {
        t: TissueMR(
            p.t1_ms * float(np.exp(0.04 * rng_mr.standard_normal())),
            p.t2_ms * float(np.exp(0.04 * rng_mr.standard_normal())),
            p.pd * float(np.exp(0.03 * rng_mr.standard_normal())),
        )
        for t, p in MR_TISSUES.items()
    }
    texture_mr = 1.0 + MR_TEXTURE * (textures[1] + textures[2]) / math.sqrt(2.0)
    del textures
    log_bias = rng_mr.uniform(*bias) * smooth_field((z_mm, axis_mm, axis_mm), 60.0, rng_mr)[0]
    bias_field = np.exp(log_bias - float(log_bias[body_mask].mean() if body_mask.any() else 0.0))
    bias_field = bias_field.astype(np.float32)
    volumes: dict[str, np.ndarray] = {}
    sigmas: dict[str, float] = {}
    for protocol in (T1W, T2W):
        per_tissue = {
            t: float(protocol.signal(np.array(p.t1_ms), np.array(p.t2_ms), np.array(p.pd)))
            for t, p in params.items()
        }
        wm_level = float(np.exp(rng_mr.uniform(math.log(400.0), math.log(1200.0))))
        gain = wm_level / per_tissue[HeadTissue.WHITE]
        clean = np.zeros(shape, dtype=np.float32)
        for tissue, value in per_tissue.items():
            if value > 0:
                clean += fractions[tissue] * np.float32(value * gain)
        clean *= texture_mr
        clean *= bias_field
        sigma = float(rng_mr.uniform(*noise)) * wm_level
        re = clean + sigma * rng_noise.standard_normal(shape, dtype=np.float32)
        im = sigma * rng_noise.standard_normal(shape, dtype=np.float32)
        volumes[protocol.name] = np.sqrt(re * re + im * im).astype(np.float32)
        sigmas[protocol.name] = sigma

    return MrCtPair(
        anatomy=anatomy,
        seed=int(seed),
        spacing_mm=(dz, pixel, pixel),
        level=level,
        ct_hu=ct_hu,
        t1w=volumes[T1W.name],
        t2w=volumes[T2W.name],
        labels=labels,
        label_fraction=label_fraction.astype(np.float32),
        body_mask=body_mask,
        bias_field=bias_field,
        noise_sigma=sigmas,
        protocols=dict(PROTOCOLS),
    )
