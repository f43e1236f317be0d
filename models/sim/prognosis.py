"""Longitudinal brain-tumour series: one simulated glioma patient imaged at several visits.

One seed gives one patient: a tumour seeded in the white matter of the MNI152 anatomy grows by the
Fisher–Kolmogorov model (:mod:`models.growth`) on a 2 mm grid, and at each visit it is imaged as
T1-weighted post-contrast (T1c), FLAIR and optionally T2-weighted MR, in a slightly different head
pose, with new noise and bias field, at irregular intervals. Some patients also get effects a plain
Fisher–Kolmogorov fit does not model, so a physics fit is not handed the answer: anisotropic spread
along white-matter tracts, a treatment response between two visits, and mass effect.

Model card — parameters per patient
-----------------------------------
=========================  =====================================  ======================================
quantity                   drawn from                             source / reasoning
=========================  =====================================  ======================================
D_white (mm^2/day)         log-uniform 0.02 – 0.25                Swanson, Alvord & Murray 2000 (Cell
                                                                  Prolif 33:317) use D_grey 0.0013
                                                                  cm^2/day = 0.13 mm^2/day, D_white =
                                                                  5 D_grey; patient-specific D spans
                                                                  about two decades across gliomas
                                                                  (Harpold et al. 2007, J Neuropathol
                                                                  Exp Neurol 66:1; Swanson et al. 2008,
                                                                  Br J Cancer 98:113; Wang et al. 2009,
                                                                  Cancer Res 69:9133). Kept to the
                                                                  high-grade end so growth shows within
                                                                  months.
D_white / D_grey           uniform 5 – 10                         5 in Swanson et al. 2000; 10 in
                                                                  Clatz et al. 2005 (IEEE TMI 24:1334)
                                                                  and Konukoglu et al. 2010 (IEEE TMI
                                                                  29:77).
rho (1/day)                log-uniform 0.008 – 0.04               0.012/day in Swanson et al. 2000
                                                                  (from Tracqui et al. 1995); high-grade
                                                                  gliomas ~0.01 – 0.1/day, low-grade
                                                                  ~0.001/day (Harpold et al. 2007).
front speed 2 sqrt(D rho)  kept in 0.02 – 0.12 mm/day (redrawn)   ~7 – 44 mm/year in white matter:
                                                                  visible change between visits weeks
                                                                  to months apart, no tumour that fills
                                                                  the hemisphere in a year.
visibility thresholds      T1c: c >= 0.8, T2/FLAIR: c >= 0.16     Swanson et al. 2008; Harpold et al.
                                                                  2007; used by Konukoglu et al. 2010.
necrotic core              c >= uniform 0.95 – 0.99               this simulator's convention (the PI
                                                                  model has no necrosis): the
                                                                  saturated centre of the lesion.
seed and baseline size     white matter >= 0.6, >= 20 mm inside   baseline T2-visible volume ~7 – 35
                           the skull; c = 0.5 radius 8 – 16 mm,   ml (24 seeds), ~15 – 180 ml at the
                           profile width sqrt(D/rho), grown 20 –  4th visit.
                           60 days before the first visit
visit intervals (days)     uniform integer 30 – 100               irregular follow-up (1 – 3 months).
anisotropy (prob. 0.5)     along / across ratio 2 – 6 in white    stands in for DTI-guided spread
                           matter, smooth orientation field       (Jbabdi et al. 2005, Magn Reson Med
                           parallel to the white-matter boundary  54:616; Clatz et al. 2005).
treatment (prob. 0.35)     between two visits: c *= S, S in       an instantaneous cell kill of the
                           0.2 – 0.6, then regrowth               order of a 60 Gy course in the
                                                                  linear-quadratic model (Rockne et al.
                                                                  2010, Phys Med Biol 55:3271).
mass effect (prob. 0.5)    added volume 20 – 60 % of the T2-      displaces the surrounding anatomy
                           visible tumour, radial, tapering to    (not the tumour) in the images; the
                           0 at 15 mm from the skull              growth runs on the undeformed atlas.
=========================  =====================================  ======================================

The bounds are choices inside the spread these papers report, taken from the values as they are
usually quoted; they were not checked against the original tables here (the papers cannot be read
from this environment), and they are not fitted population statistics. Draws are redrawn until the
front speed lies in 0.02 – 0.12 mm/day *and* the infiltration width ``sqrt(D_white / rho)`` in
1 – 3 mm (``D/rho`` 1 – 9 mm^2), which keeps the T1c-visible core a realistic part of the T2-visible
lesion (median ~25 %, 90th percentile ~40 %, over 24 seeds).

MR appearance
    Healthy tissue as :mod:`models.sim.mrct` (BrainWeb-like T1/T2/PD at 1.5 T, per-patient jitter
    ~4 %), skull and scalp as shells of the distance to the intracranial surface. Lesion
    compartments replace tissue by density: necrosis (T1 2000 ms, T2 250 ms, PD 0.90) where
    ``c >= c_necrosis``, viable enhancing tumour (T1 1100, T2 110, PD 0.88) where ``0.8 <= c``,
    and vasogenic oedema (T1 1150, T2 170, PD 0.90) mixed 50 – 80 % into the tissue where
    ``0.16 <= c < 0.8``. Gadolinium shortens the enhancing compartment's T1:
    ``1/T1 = 1/T1_0 + r1 C`` with ``r1 = 4.5 /s/mM`` (gadolinium chelates at 1.5 T, ~4 – 5; Rohrer
    et al. 2005, Invest Radiol 40:715) and ``C`` 0.2 – 0.5 mM. T1c is the spin echo TR/TE 500/12 ms
    of ``mrct``; FLAIR is inversion recovery ``S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``
    with TR/TE/TI 9000/120/1700 ms (CSF nulled: ``TI = T1 ln(2 / (1 + exp(-TR/T1)))`` ~ 1705 ms
    for the CSF T1 of 2569 ms); T2w
    the spin echo 4000/100 ms. Each visit has its own bias field, receiver gain and Rician noise
    (sigma 2 – 4 % of white matter).
Grids
    Growth on the MNI152 atlas block-averaged to 2 mm, cropped to +/-64 mm around the seed (64^3
    voxels); zero flux where brain tissue (grey + white) is below half the voxel. Truth density and
    labels are also given on the reference grid: the image grid (default 128 x 128 x 32 at 1.875 x
    1.875 x 3 mm, field of view 240 mm) aligned with the atlas, stack centred on the tumour's height.
Pose
    Each visit's head pose is a rigid motion of the reference frame: rotation about a random axis by
    up to 3 degrees and a shift of up to 4 mm. ``Visit.pose.matrix`` maps reference (atlas-aligned)
    patient coordinates to the visit's scanner coordinates (LPS mm about the stack centre);
    :func:`to_visit_frame` and :func:`to_reference_frame` resample volumes between the two.

Not modelled: surgery, pseudo-progression, haemorrhage, contrast leakage outside the rim, vessels
and dura enhancement, necrosis that persists after treatment (labels follow the density), the skull
base detail (as in ``mrct``), and the deformation of the growth domain by mass effect.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage as ndi

from models.growth import fibre_tensor, front_speed, grow, tissue_diffusivity
from models.sim.anatomy import _head_atlas
from models.sim.mrct import (
    FIELD_STRENGTH_T,
    MR_TISSUES,
    T1W,
    T2W,
    HeadTissue,
    SpinEcho,
    TissueMR,
    _sample_distance,
    smooth_field,
)

#: Visibility thresholds of tumour cell density (Swanson et al. 2008; Harpold et al. 2007).
T1C_THRESHOLD = 0.8
T2_THRESHOLD = 0.16
GROWTH_SPACING_MM = 2.0
#: Half-width of the growth domain around the seed (mm).
GROWTH_HALF_WIDTH_MM = 64.0
DEFAULT_SIZE = 128
DEFAULT_SLICES = 32
DEFAULT_SLICE_THICKNESS_MM = 3.0
DEFAULT_FOV_MM = 240.0
#: MNI z range (mm) the image stack is kept inside.
STACK_Z_RANGE_MM = (-45.0, 85.0)
#: Relaxivity of gadolinium chelates at 1.5 T (1/s per mM), in 1/ms per mM.
GD_R1_PER_MS_MM = 4.5e-3


class TumourLabel(IntEnum):
    """Per-voxel tumour labels (BraTS-like numbering)."""

    NONE = 0
    NECROTIC_CORE = 1
    OEDEMA = 2  # T2/FLAIR-visible, not enhancing
    ENHANCING = 3  # T1c-visible rim


@dataclass(frozen=True)
class InversionRecovery:
    """An inversion-recovery (FLAIR) protocol.

    Attributes
    ----------
    name : str
        ``"flair"``.
    tr_ms, te_ms, ti_ms : float
        Repetition, echo and inversion times.
    """

    name: str
    tr_ms: float
    te_ms: float
    ti_ms: float

    def signal(self, t1_ms: np.ndarray, t2_ms: np.ndarray, pd: np.ndarray) -> np.ndarray:
        """Magnitude ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``.

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
        mz = 1.0 - 2.0 * np.exp(-self.ti_ms / t1) + np.exp(-self.tr_ms / t1)
        return np.asarray(pd) * np.abs(mz) * np.exp(-self.te_ms / t2)


#: FLAIR at 1.5 T: CSF (T1 2569 ms) is nulled at TI = T1 ln(2 / (1 + exp(-TR / T1))) ~ 1705 ms.
FLAIR = InversionRecovery("flair", tr_ms=9000.0, te_ms=120.0, ti_ms=1700.0)
#: T1-weighted spin echo after gadolinium (the T1w protocol of mrct).
T1C = SpinEcho("t1c", tr_ms=T1W.tr_ms, te_ms=T1W.te_ms)
PROTOCOLS: dict[str, SpinEcho | InversionRecovery] = {"t1c": T1C, "flair": FLAIR, "t2w": T2W}


class LesionCompartment(IntEnum):
    """MR compartments that replace tissue inside the lesion."""

    OEDEMA = 0
    ENHANCING = 1
    NECROSIS = 2


#: Lesion compartments at 1.5 T (representative values; T1 of ENHANCING is before contrast).
LESION_TISSUES: dict[LesionCompartment, TissueMR] = {
    LesionCompartment.OEDEMA: TissueMR(1150.0, 170.0, 0.90),
    LesionCompartment.ENHANCING: TissueMR(1100.0, 110.0, 0.88),
    LesionCompartment.NECROSIS: TissueMR(2000.0, 250.0, 0.90),
}


@dataclass(frozen=True)
class Treatment:
    """A cell kill between two visits.

    Attributes
    ----------
    after_visit : int
        1-based visit after which it happens (before visit ``after_visit + 1``).
    day : int
        Day (from the first visit) of the treatment.
    survival_fraction : float
        Fraction of tumour cells surviving (density multiplied by it).
    """

    after_visit: int
    day: int
    survival_fraction: float


@dataclass(frozen=True)
class GrowthParameters:
    """The patient's tumour: what a per-patient fit would try to recover, and what it would not.

    Attributes
    ----------
    d_white, d_grey : float
        Diffusivity in white and grey matter, mm^2/day.
    rho : float
        Proliferation rate, 1/day.
    necrosis_threshold : float
        Density above which the lesion is necrotic core.
    seed_mni_mm : tuple of float
        Tumour origin (MNI RAS mm).
    seed_radius_mm : float
        Radius of the c = 0.5 contour of the initial profile.
    days_before_first_visit : float
        Growth before the first visit.
    anisotropy : float
        Along / across-tract diffusivity ratio in white matter (1: isotropic).
    treatment : Treatment or None
        The treatment between two visits, if any.
    mass_effect : float
        Added volume as a fraction of the T2-visible tumour (0: none).
    gd_concentration_mm : float
        Gadolinium concentration in the enhancing rim (mM).
    oedema_weight : float
        Fraction of an oedematous voxel's signal that comes from oedema.
    """

    d_white: float
    d_grey: float
    rho: float
    necrosis_threshold: float
    seed_mni_mm: tuple[float, float, float]
    seed_radius_mm: float
    days_before_first_visit: float
    anisotropy: float
    treatment: Treatment | None
    mass_effect: float
    gd_concentration_mm: float
    oedema_weight: float

    @property
    def front_speed_mm_per_day(self) -> float:
        """``2 sqrt(D_white rho)``: the asymptotic speed in white matter."""
        return front_speed(self.d_white, self.rho)


@dataclass(frozen=True)
class GrowthDomain:
    """The 2 mm grid the tumour grows on (a crop of the MNI152 atlas around the seed).

    Attributes
    ----------
    white, grey : numpy.ndarray
        float32 tissue fractions.
    barrier : numpy.ndarray
        Boolean zero-flux voxels (CSF, ventricles, outside the brain).
    diffusivity : numpy.ndarray
        float32 mm^2/day (0 in the barrier).
    tensor : numpy.ndarray or None
        ``(6, ...)`` normalised diffusion tensor for anisotropic patients.
    origin_mni_mm : tuple of float
        MNI RAS mm of voxel (0, 0, 0); axes are MNI x, y, z.
    spacing_mm : float
        Isotropic spacing.
    """

    white: np.ndarray
    grey: np.ndarray
    barrier: np.ndarray
    diffusivity: np.ndarray
    tensor: np.ndarray | None
    origin_mni_mm: tuple[float, float, float]
    spacing_mm: float


@dataclass(frozen=True)
class VisitPose:
    """The head pose of one visit relative to the reference frame.

    Attributes
    ----------
    rotation_deg : float
        Rotation angle about ``axis``.
    axis : tuple of float
        Unit rotation axis (LPS).
    shift_mm : tuple of float
        Translation (LPS mm).
    matrix : numpy.ndarray
        4 x 4 ``scanner_from_reference``: LPS mm about the stack centre.
    """

    rotation_deg: float
    axis: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    matrix: np.ndarray


@dataclass(frozen=True)
class Visit:
    """One imaging visit.

    Attributes
    ----------
    index : int
        1-based visit number.
    day : int
        Days since the first visit.
    date : datetime.date
        Study date.
    density : numpy.ndarray
        Truth tumour cell density on the reference grid (float32, 0 .. 1).
    labels : numpy.ndarray
        ``uint8`` :class:`TumourLabel` on the reference grid.
    growth_density : numpy.ndarray
        The density on the growth grid (:class:`GrowthDomain`).
    volumes_ml : dict
        ``"necrotic_core"``, ``"enhancing"``, ``"oedema"``, ``"tumour_core"`` (core + enhancing,
        T1c-visible) and ``"whole_tumour"`` (T2-visible), from the growth grid.
    pose : VisitPose
        Head pose of this visit.
    images : dict
        ``"t1c"``, ``"flair"`` (and ``"t2w"``): float32 magnitude in the visit's scanner frame.
    brain_mask : numpy.ndarray
        Boolean intracranial mask in the scanner frame.
    noise_sigma : dict
        Rician sigma per image.
    """

    index: int
    day: int
    date: dt.date
    density: np.ndarray
    labels: np.ndarray
    growth_density: np.ndarray
    volumes_ml: dict[str, float]
    pose: VisitPose
    images: dict[str, np.ndarray]
    brain_mask: np.ndarray
    noise_sigma: dict[str, float]


@dataclass(frozen=True)
class SimulatedPatient:
    """A simulated glioma patient followed over several visits.

    Attributes
    ----------
    seed : int
        The seed.
    params : GrowthParameters
        Growth and appearance parameters.
    visits : tuple of Visit
        In time order.
    spacing_mm : tuple of float
        ``(slice, row, col)`` spacing of the reference and scanner grids.
    stack_centre_mni_mm : tuple of float
        MNI position of the stack centre (reference frame origin).
    domain : GrowthDomain
        The growth grid.
    field_strength_t : float
        Main field.
    """

    seed: int
    params: GrowthParameters
    visits: tuple[Visit, ...]
    spacing_mm: tuple[float, float, float]
    stack_centre_mni_mm: tuple[float, float, float]
    domain: GrowthDomain
    field_strength_t: float = FIELD_STRENGTH_T

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, cols)`` of every image."""
        s, r, c = self.visits[0].density.shape
        return int(s), int(r), int(c)

    @property
    def intervals_days(self) -> tuple[int, ...]:
        """Days between consecutive visits."""
        return tuple(b.day - a.day for a, b in zip(self.visits, self.visits[1:], strict=False))


# -- labels --------------------------------------------------------------------------------------
def tumour_labels(density: np.ndarray, necrosis_threshold: float) -> np.ndarray:
    """Label map from density thresholds: core ``c >= c_nec``, rim ``>= 0.8``, oedema ``>= 0.16``.

    Parameters
    ----------
    density : numpy.ndarray
        Tumour cell density.
    necrosis_threshold : float
        Density of the necrotic core (above :data:`T1C_THRESHOLD`).

    Returns
    -------
    numpy.ndarray
        ``uint8`` :class:`TumourLabel`.
    """
    labels = np.zeros(density.shape, dtype=np.uint8)
    labels[density >= T2_THRESHOLD] = TumourLabel.OEDEMA
    labels[density >= T1C_THRESHOLD] = TumourLabel.ENHANCING
    labels[density >= necrosis_threshold] = TumourLabel.NECROTIC_CORE
    return labels


def _volumes(density: np.ndarray, necrosis_threshold: float, voxel_ml: float) -> dict[str, float]:
    t2 = float(np.count_nonzero(density >= T2_THRESHOLD)) * voxel_ml
    t1 = float(np.count_nonzero(density >= T1C_THRESHOLD)) * voxel_ml
    core = float(np.count_nonzero(density >= necrosis_threshold)) * voxel_ml
    return {
        "necrotic_core": core,
        "enhancing": t1 - core,
        "oedema": t2 - t1,
        "tumour_core": t1,
        "whole_tumour": t2,
    }


# -- atlas on the growth grid --------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _coarse_atlas(factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Block means of white, grey, CSF and signed distance over ``factor``^3 voxels, and the origin."""
    atlas = _head_atlas()
    n = [s // factor * factor for s in atlas.white.shape]

    def block(v: np.ndarray) -> np.ndarray:
        v = v[: n[0], : n[1], : n[2]]
        shape = (n[0] // factor, factor, n[1] // factor, factor, n[2] // factor, factor)
        return v.reshape(shape).mean(axis=(1, 3, 5)).astype(np.float32)

    origin = atlas.origin + 0.5 * (factor - 1)
    return block(atlas.white), block(atlas.grey), block(atlas.sd), np.asarray(origin, dtype=np.float64)


def _growth_domain(
    seed_mni: np.ndarray, d_white: float, d_grey: float, anisotropy: float, rng: np.random.Generator
) -> GrowthDomain:
    factor = int(round(GROWTH_SPACING_MM))
    white, grey, _sd, origin = _coarse_atlas(factor)
    centre = np.round((seed_mni - origin) / GROWTH_SPACING_MM).astype(int)
    half = int(round(GROWTH_HALF_WIDTH_MM / GROWTH_SPACING_MM))
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half, np.array(white.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    w, g = white[box].copy(), grey[box].copy()
    diffusivity, barrier = tissue_diffusivity(w, g, d_white, d_grey)
    tensor = None
    if anisotropy > 1.0:
        # Tracts run parallel to the white-matter boundary: a smooth random direction with its
        # component along the gradient of the (smoothed) white-matter fraction removed.
        axes = tuple(np.arange(n) * GROWTH_SPACING_MM for n in w.shape)
        v = smooth_field((axes[0], axes[1], axes[2]), 10.0, rng, n=3).astype(np.float32)
        grad = np.stack(np.gradient(ndi.gaussian_filter(w, 1.5)))
        gnorm2 = (grad * grad).sum(axis=0)
        along = (v * grad).sum(axis=0) / np.maximum(gnorm2, 1e-12)
        v = v - np.where(gnorm2 > 1e-8, along, 0.0)[None] * grad
        local = 1.0 + (anisotropy - 1.0) * np.clip(w / np.maximum(w + g, 1e-6), 0.0, 1.0)
        tensor = fibre_tensor(v, local)
    return GrowthDomain(
        white=w,
        grey=g,
        barrier=barrier,
        diffusivity=diffusivity,
        tensor=tensor,
        origin_mni_mm=tuple(float(x) for x in origin + lo * GROWTH_SPACING_MM),  # type: ignore[arg-type]
        spacing_mm=GROWTH_SPACING_MM,
    )


@functools.lru_cache(maxsize=1)
def _seed_candidates() -> np.ndarray:
    """Growth-grid voxels a tumour may start in: deep white matter of a cerebral hemisphere."""
    white, _grey, sd, origin = _coarse_atlas(int(round(GROWTH_SPACING_MM)))
    idx = np.indices(white.shape, dtype=np.float32)
    mni = [origin[a] + idx[a] * GROWTH_SPACING_MM for a in range(3)]
    ok = (white >= 0.6) & (sd <= -20.0) & (mni[2] >= -5.0) & (mni[2] <= 50.0) & (np.abs(mni[0]) >= 12.0)
    return np.argwhere(ok)


def _draw_seed(rng: np.random.Generator) -> np.ndarray:
    origin = _coarse_atlas(int(round(GROWTH_SPACING_MM)))[3]
    candidates = _seed_candidates()
    pick = candidates[int(rng.integers(len(candidates)))]
    jitter = rng.uniform(-0.5, 0.5, size=3) * GROWTH_SPACING_MM
    return np.asarray(origin + pick * GROWTH_SPACING_MM + jitter, dtype=np.float64)


def _draw_parameters(
    rng: np.random.Generator,
    visits: int,
    intervals: list[int],
    anisotropic: bool | None,
    treated: bool | None,
    mass_effect: bool | None,
) -> GrowthParameters:
    while True:
        d_white = float(np.exp(rng.uniform(math.log(0.02), math.log(0.25))))
        rho = float(np.exp(rng.uniform(math.log(0.008), math.log(0.04))))
        # Keep growth visible over months and the infiltration width sqrt(D/rho) at 1 - 3 mm, so the
        # T1c-visible core is a sizeable part of the T2-visible lesion.
        if 0.02 <= front_speed(d_white, rho) <= 0.12 and 1.0 <= d_white / rho <= 9.0:
            break
    ratio = float(rng.uniform(5.0, 10.0))
    seed_mni = _draw_seed(rng)
    # Every draw is made whether or not an effect is forced, so forcing one changes nothing else.
    draws = rng.uniform(size=3)
    anisotropy_draw = float(rng.uniform(2.0, 6.0))
    after = int(rng.integers(1, visits))  # treatment after visit 1 .. visits - 1
    fraction_of_interval = float(rng.uniform(0.15, 0.6))
    survival = float(rng.uniform(0.2, 0.6))
    mass_draw = float(rng.uniform(0.2, 0.6))
    aniso = bool(draws[0] < 0.5) if anisotropic is None else anisotropic
    treat = bool(draws[1] < 0.35) if treated is None else treated
    mass = bool(draws[2] < 0.5) if mass_effect is None else mass_effect
    treatment = None
    if treat:
        start = sum(intervals[: after - 1])
        day = start + max(1, int(round(fraction_of_interval * intervals[after - 1])))
        treatment = Treatment(after_visit=after, day=day, survival_fraction=survival)
    return GrowthParameters(
        d_white=d_white,
        d_grey=d_white / ratio,
        rho=rho,
        necrosis_threshold=float(rng.uniform(0.95, 0.99)),
        seed_mni_mm=(float(seed_mni[0]), float(seed_mni[1]), float(seed_mni[2])),
        seed_radius_mm=float(rng.uniform(8.0, 16.0)),
        days_before_first_visit=float(rng.uniform(20.0, 60.0)),
        anisotropy=anisotropy_draw if aniso else 1.0,
        treatment=treatment,
        mass_effect=mass_draw if mass else 0.0,
        gd_concentration_mm=float(rng.uniform(0.2, 0.5)),
        oedema_weight=float(rng.uniform(0.5, 0.8)),
    )


def _initial_density(domain: GrowthDomain, params: GrowthParameters) -> np.ndarray:
    axes = [
        domain.origin_mni_mm[a] + np.arange(n) * domain.spacing_mm for a, n in enumerate(domain.white.shape)
    ]
    seed = params.seed_mni_mm
    r = np.sqrt(
        (axes[0][:, None, None] - seed[0]) ** 2
        + (axes[1][None, :, None] - seed[1]) ** 2
        + (axes[2][None, None, :] - seed[2]) ** 2
    )
    width = math.sqrt(params.d_white / params.rho)
    c0 = 1.0 / (1.0 + np.exp(np.clip((r - params.seed_radius_mm) / width, -50.0, 50.0)))
    c0[c0 < 1e-6] = 0.0
    c0[domain.barrier] = 0.0
    return c0.astype(np.float32)


def _grow_history(domain: GrowthDomain, params: GrowthParameters, days: list[int]) -> list[np.ndarray]:
    """Density at each visit day (days since the first visit), treatment applied on the way."""
    step = {
        "diffusivity": domain.diffusivity,
        "rho": params.rho,
        "spacing_mm": (domain.spacing_mm,) * 3,
        "barrier_mask": domain.barrier,
        "tensor": domain.tensor,
    }
    c = grow(_initial_density(domain, params), days=params.days_before_first_visit, **step)  # type: ignore[arg-type]
    out = []
    now = 0
    for day in days:
        tx = params.treatment
        if tx is not None and now < tx.day <= day:
            c = grow(c, days=float(tx.day - now), **step)  # type: ignore[arg-type]
            c *= np.float32(tx.survival_fraction)
            now = tx.day
        c = grow(c, days=float(day - now), **step)  # type: ignore[arg-type]
        now = day
        out.append(c.copy())
    return out


# -- reference and scanner frames ---------------------------------------------------------------
def _lps_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[np.ndarray]:
    """(x, y, z) LPS mm about the stack centre for axes (slice inferior->superior, row A->P, col R->L)."""
    s, r, c = shape
    z = ((np.arange(s) - (s - 1) / 2.0) * spacing[0]).astype(np.float32)[:, None, None]
    y = ((np.arange(r) - (r - 1) / 2.0) * spacing[1]).astype(np.float32)[None, :, None]
    x = ((np.arange(c) - (c - 1) / 2.0) * spacing[2]).astype(np.float32)[None, None, :]
    return [np.broadcast_to(x, shape), np.broadcast_to(y, shape), np.broadcast_to(z, shape)]


def _pose_points(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], matrix: np.ndarray
) -> list[np.ndarray]:
    """Reference-frame LPS points seen by each scanner voxel: ``q = R^T (p - t)``."""
    p = _lps_grid(shape, spacing)
    rot, t = matrix[:3, :3], matrix[:3, 3]
    d = [p[i] - np.float32(t[i]) for i in range(3)]
    return [
        (np.float32(rot[0, i]) * d[0] + np.float32(rot[1, i]) * d[1] + np.float32(rot[2, i]) * d[2]).astype(
            np.float32
        )
        for i in range(3)
    ]


def _lps_to_index(
    points: list[np.ndarray], shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> np.ndarray:
    s, r, c = shape
    return np.stack(
        [
            points[2] / spacing[0] + (s - 1) / 2.0,
            points[1] / spacing[1] + (r - 1) / 2.0,
            points[0] / spacing[2] + (c - 1) / 2.0,
        ]
    ).astype(np.float32)


def to_visit_frame(
    volume: np.ndarray, pose: VisitPose, spacing_mm: tuple[float, float, float], *, order: int = 1
) -> np.ndarray:
    """Resample a reference-frame volume into a visit's scanner frame.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(slices, rows, cols)`` on the reference grid.
    pose : VisitPose
        The visit's pose.
    spacing_mm : tuple of float
        Grid spacing (:attr:`SimulatedPatient.spacing_mm`).
    order : int, optional
        Interpolation order (0 for labels).

    Returns
    -------
    numpy.ndarray
        The volume as the visit's scanner sees it (0 outside the reference grid).
    """
    s, r, c = volume.shape
    q = _pose_points((s, r, c), spacing_mm, pose.matrix)
    coords = _lps_to_index(q, (s, r, c), spacing_mm)
    return ndi.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0).astype(volume.dtype)


def to_reference_frame(
    volume: np.ndarray, pose: VisitPose, spacing_mm: tuple[float, float, float], *, order: int = 1
) -> np.ndarray:
    """Resample a visit's scanner-frame volume back onto the reference grid (inverse pose).

    Parameters
    ----------
    volume : numpy.ndarray
        ``(slices, rows, cols)`` in the visit's scanner frame.
    pose : VisitPose
        The visit's pose.
    spacing_mm : tuple of float
        Grid spacing.
    order : int, optional
        Interpolation order.

    Returns
    -------
    numpy.ndarray
        The volume on the reference grid.
    """
    inverse = np.linalg.inv(pose.matrix)
    flipped = VisitPose(pose.rotation_deg, pose.axis, pose.shift_mm, inverse)
    return to_visit_frame(volume, flipped, spacing_mm, order=order)


def _draw_pose(rng: np.random.Generator, max_rotation_deg: float, max_shift_mm: float) -> VisitPose:
    axis = rng.standard_normal(3)
    axis /= float(np.linalg.norm(axis))
    angle = float(rng.uniform(0.3, 1.0) * max_rotation_deg)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    theta = math.radians(angle)
    rot = np.eye(3) + math.sin(theta) * k + (1.0 - math.cos(theta)) * (k @ k)
    direction = rng.standard_normal(3)
    shift = direction / float(np.linalg.norm(direction)) * float(rng.uniform(0.3, 1.0) * max_shift_mm)
    matrix = np.eye(4)
    matrix[:3, :3] = rot
    matrix[:3, 3] = shift
    return VisitPose(
        rotation_deg=angle,
        axis=(float(axis[0]), float(axis[1]), float(axis[2])),
        shift_mm=(float(shift[0]), float(shift[1]), float(shift[2])),
        matrix=matrix,
    )


# -- imaging -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Head:
    """Per-patient appearance draws shared by all visits."""

    tissues: dict[HeadTissue, TissueMR]
    lesions: dict[LesionCompartment, TissueMR]
    shells: tuple[float, ...]  # inner table, diploe, outer table, soft, fat, skin (mm)


def _draw_head(rng: np.random.Generator, params: GrowthParameters) -> _Head:
    def jitter(p: TissueMR) -> TissueMR:
        return TissueMR(
            p.t1_ms * float(np.exp(0.04 * rng.standard_normal())),
            p.t2_ms * float(np.exp(0.04 * rng.standard_normal())),
            p.pd * float(np.exp(0.03 * rng.standard_normal())),
        )

    tissues = {t: jitter(p) for t, p in MR_TISSUES.items()}
    lesions = {k: jitter(p) for k, p in LESION_TISSUES.items()}
    shells = (
        float(rng.uniform(1.3, 2.2)),
        float(rng.uniform(2.0, 4.0)),
        float(rng.uniform(1.6, 2.6)),
        float(rng.uniform(1.0, 2.5)),
        float(rng.uniform(2.0, 5.0)),
        1.5,
    )
    return _Head(tissues=tissues, lesions=lesions, shells=shells)


def _signal(protocol: SpinEcho | InversionRecovery, p: TissueMR, t1_ms: float | None = None) -> float:
    t1 = p.t1_ms if t1_ms is None else t1_ms
    return float(protocol.signal(np.array(t1), np.array(p.t2_ms), np.array(p.pd)))


def _soft_step(c: np.ndarray, threshold: float, width: float) -> np.ndarray:
    return np.clip((c - np.float32(threshold)) / np.float32(width) + np.float32(0.5), 0.0, 1.0)


def _image_visit(
    q: list[np.ndarray],
    centre_mni: np.ndarray,
    growth_c: np.ndarray,
    domain: GrowthDomain,
    params: GrowthParameters,
    head: _Head,
    spacing: tuple[float, float, float],
    with_t2w: bool,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, float], np.ndarray]:
    """MR images seen at reference points ``q`` (LPS about the stack centre); also the density there."""
    atlas = _head_atlas()
    shape = q[0].shape
    pixel_mm = spacing[1]
    # LPS -> MNI RAS.
    mx = np.float32(centre_mni[0]) - q[0]
    my = np.float32(centre_mni[1]) - q[1]
    mz = np.float32(centre_mni[2]) + q[2]
    gorigin = np.asarray(domain.origin_mni_mm, dtype=np.float32)
    gcoords = np.stack(
        [
            (mx - gorigin[0]) / domain.spacing_mm,
            (my - gorigin[1]) / domain.spacing_mm,
            (mz - gorigin[2]) / domain.spacing_mm,
        ]
    )
    density = ndi.map_coordinates(growth_c, gcoords, order=1, mode="constant", cval=0.0).astype(np.float32)
    del gcoords

    ax, ay, az = mx, my, mz
    if params.mass_effect > 0:
        visible = growth_c >= T2_THRESHOLD
        if visible.any():
            volume = float(visible.sum()) * domain.spacing_mm**3
            centre = np.array(ndi.center_of_mass(visible)) * domain.spacing_mm + gorigin
            radius_added = (params.mass_effect * volume * 3.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
            dx, dy, dz = mx - np.float32(centre[0]), my - np.float32(centre[1]), mz - np.float32(centre[2])
            r = np.sqrt(dx * dx + dy * dy + dz * dz) + np.float32(1e-3)
            origin = atlas.origin.astype(np.float32)
            sd0 = _sample_distance(atlas.sd, np.stack([mx - origin[0], my - origin[1], mz - origin[2]]))
            taper = np.clip(-sd0 / np.float32(15.0), 0.0, 1.0)
            push = (np.cbrt(r**3 + np.float32(radius_added**3)) - r) * taper / r
            # The tissue now at x came from x - u(x): sample the atlas there.
            ax, ay, az = mx - push * dx, my - push * dy, mz - push * dz
            del dx, dy, dz, r, sd0, taper, push
    origin = atlas.origin.astype(np.float32)
    coords = np.stack([ax - origin[0], ay - origin[1], az - origin[2]]).astype(np.float32)
    sd = _sample_distance(atlas.sd, coords)
    white = ndi.map_coordinates(atlas.white, coords, order=1, mode="constant", cval=0.0) ** 2
    grey = ndi.map_coordinates(atlas.grey, coords, order=1, mode="constant", cval=0.0) ** 2
    csf = ndi.map_coordinates(atlas.csf, coords, order=1, mode="constant", cval=0.0) ** 2
    del coords, ax, ay, az, mx, my, mz
    total = white + grey + csf
    empty = total <= 1e-6
    csf[empty] = 1.0
    total[empty] = 1.0
    inside = np.clip(-sd / np.float32(pixel_mm) + np.float32(0.5), 0.0, 1.0)
    fractions: dict[HeadTissue, np.ndarray] = {
        HeadTissue.WHITE: (inside * white / total).astype(np.float32),
        HeadTissue.GREY: (inside * grey / total).astype(np.float32),
        HeadTissue.CSF: (inside * csf / total).astype(np.float32),
    }
    del white, grey, csf, total
    # Skull and scalp: shells of the distance outside the intracranial surface.
    layers = (
        HeadTissue.CORTICAL_BONE,
        HeadTissue.CANCELLOUS_BONE,
        HeadTissue.CORTICAL_BONE,
        HeadTissue.SOFT,
        HeadTissue.FAT,
        HeadTissue.SOFT,
    )
    edge = 0.0
    below = 1.0 - inside
    for tissue, thickness in zip(layers, head.shells, strict=True):
        edge += thickness
        outside_edge = np.clip((sd - np.float32(edge)) / np.float32(pixel_mm) + np.float32(0.5), 0.0, 1.0)
        fractions[tissue] = fractions.get(tissue, np.zeros(shape, np.float32)) + (below - outside_edge)
        below = outside_edge
    brain_mask = inside >= 0.5
    del sd, inside

    # Lesion compartments replace tissue by density.
    enh = _soft_step(density, T1C_THRESHOLD, 0.03)
    nec = _soft_step(density, params.necrosis_threshold, 0.008)
    oed = np.float32(params.oedema_weight) * (_soft_step(density, T2_THRESHOLD, 0.03) - enh)
    lesion = {
        LesionCompartment.NECROSIS: nec,
        LesionCompartment.ENHANCING: enh - nec,
        LesionCompartment.OEDEMA: oed,
    }
    healthy = np.float32(1.0) - nec - (enh - nec) - oed

    t1_enh = head.lesions[LesionCompartment.ENHANCING].t1_ms
    t1_post = 1.0 / (1.0 / t1_enh + GD_R1_PER_MS_MM * params.gd_concentration_mm)
    axes = (
        np.arange(shape[0]) * spacing[0],
        np.arange(shape[1]) * spacing[1],
        np.arange(shape[2]) * spacing[2],
    )
    log_bias = rng.uniform(0.05, 0.15) * smooth_field(axes, 60.0, rng)[0]
    bias = np.exp(log_bias - float(log_bias.mean())).astype(np.float32)
    images: dict[str, np.ndarray] = {}
    sigmas: dict[str, float] = {}
    names = ["t1c", "flair"] + (["t2w"] if with_t2w else [])
    for name in names:
        protocol = PROTOCOLS[name]

        per_tissue = {t: _signal(protocol, p) for t, p in head.tissues.items()}
        wm_level = float(np.exp(rng.uniform(math.log(400.0), math.log(1200.0))))
        gain = wm_level / per_tissue[HeadTissue.WHITE]
        clean = np.zeros(shape, dtype=np.float32)
        for tissue, frac in fractions.items():
            if per_tissue[tissue] > 0:
                clean += frac * np.float32(per_tissue[tissue] * gain)
        clean *= healthy
        for kind, frac in lesion.items():
            t1 = t1_post if (name == "t1c" and kind == LesionCompartment.ENHANCING) else None
            clean += frac * np.float32(_signal(protocol, head.lesions[kind], t1) * gain)
        clean *= bias
        sigma = float(rng.uniform(0.02, 0.04)) * wm_level
        re = clean + sigma * rng.standard_normal(shape, dtype=np.float32)
        im = sigma * rng.standard_normal(shape, dtype=np.float32)
        images[name] = np.sqrt(re * re + im * im).astype(np.float32)
        sigmas[name] = sigma
    return images, density, sigmas, brain_mask


# -- the patient ---------------------------------------------------------------------------------
def make_patient(
    seed: int,
    visits: int = 4,
    *,
    size: int = DEFAULT_SIZE,
    slices: int = DEFAULT_SLICES,
    slice_thickness_mm: float = DEFAULT_SLICE_THICKNESS_MM,
    fov_mm: float = DEFAULT_FOV_MM,
    with_t2w: bool = False,
    anisotropic: bool | None = None,
    treated: bool | None = None,
    mass_effect: bool | None = None,
    max_rotation_deg: float = 3.0,
    max_shift_mm: float = 4.0,
) -> SimulatedPatient:
    """Simulate one glioma patient imaged at ``visits`` visits.

    The seed fixes everything (independent streams for the growth parameters and schedule, the
    anatomy, the poses, the MR parameters and the noise).

    Parameters
    ----------
    seed : int
        Patient seed.
    visits : int, optional
        Number of visits (>= 2).
    size : int, optional
        Rows and columns of every image.
    slices : int, optional
        Contiguous axial slices, centred on the tumour's height where the head allows.
    slice_thickness_mm : float, optional
        Slice thickness and spacing.
    fov_mm : float, optional
        In-plane field of view.
    with_t2w : bool, optional
        Also make a T2-weighted spin-echo image per visit.
    anisotropic, treated, mass_effect : bool, optional
        Force the effects on or off; ``None`` draws them per seed (probabilities 0.5, 0.35, 0.5).
    max_rotation_deg, max_shift_mm : float, optional
        Bounds of each visit's head pose.

    Returns
    -------
    SimulatedPatient
        The patient, its parameters and its visits.
    """
    if visits < 2:
        raise ValueError(f"visits = {visits}: a longitudinal series needs at least 2 visits")
    if slices < 1 or size < 16:
        raise ValueError("need at least one slice and 16 x 16 pixels")
    rng_par, rng_anat, rng_pose, rng_mr, rng_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    intervals = [int(rng_par.integers(30, 101)) for _ in range(visits - 1)]
    days = [0, *np.cumsum(intervals).astype(int).tolist()]
    params = _draw_parameters(rng_par, visits, intervals, anisotropic, treated, mass_effect)
    first_date = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng_par.integers(0, 3650)))

    domain = _growth_domain(
        np.asarray(params.seed_mni_mm), params.d_white, params.d_grey, params.anisotropy, rng_anat
    )
    history = _grow_history(domain, params, days)

    atlas = _head_atlas()
    pixel = fov_mm / size
    spacing = (float(slice_thickness_mm), pixel, pixel)
    shape = (slices, size, size)
    half = (slices - 1) * slice_thickness_mm / 2.0
    lo, hi = STACK_Z_RANGE_MM[0] + half, STACK_Z_RANGE_MM[1] - half
    z_centre = float(np.clip(params.seed_mni_mm[2], lo, hi)) if lo <= hi else 0.5 * sum(STACK_Z_RANGE_MM)
    centre = np.array([atlas.center_xy[0], atlas.center_xy[1], z_centre])
    head = _draw_head(rng_mr, params)
    reference = _lps_grid(shape, spacing)
    voxel_ml = domain.spacing_mm**3 / 1000.0

    out: list[Visit] = []
    for k, (day, growth_c) in enumerate(zip(days, history, strict=True)):
        pose = _draw_pose(rng_pose, max_rotation_deg, max_shift_mm)
        q = _pose_points(shape, spacing, pose.matrix)
        images, _, sigmas, brain = _image_visit(
            q, centre, growth_c, domain, params, head, spacing, with_t2w, rng_noise
        )
        del q
        gorigin = np.asarray(domain.origin_mni_mm, dtype=np.float32)
        ref_coords = np.stack(
            [
                (np.float32(centre[0]) - reference[0] - gorigin[0]) / domain.spacing_mm,
                (np.float32(centre[1]) - reference[1] - gorigin[1]) / domain.spacing_mm,
                (np.float32(centre[2]) + reference[2] - gorigin[2]) / domain.spacing_mm,
            ]
        )
        density = ndi.map_coordinates(growth_c, ref_coords, order=1, mode="constant", cval=0.0).astype(
            np.float32
        )
        out.append(
            Visit(
                index=k + 1,
                day=int(day),
                date=first_date + dt.timedelta(days=int(day)),
                density=density,
                labels=tumour_labels(density, params.necrosis_threshold),
                growth_density=growth_c,
                volumes_ml=_volumes(growth_c, params.necrosis_threshold, voxel_ml),
                pose=pose,
                images=images,
                brain_mask=brain,
                noise_sigma=sigmas,
            )
        )
    return SimulatedPatient(
        seed=int(seed),
        params=params,
        visits=tuple(out),
        spacing_mm=spacing,
        stack_centre_mni_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
        domain=domain,
    )
