"""Multi-contrast brain MR (T1w, T2w, FLAIR, PD) on one grid, for contrast-synthesis training.

One seed gives one SIMULATED study: the MNI152 anatomy (:func:`models.sim.anatomy._head_atlas`,
shipped with nilearn, nothing fetched) in a random head pose, white-matter lesions and, in some
studies, a tumour with oedema, imaged with spin-echo (T1w, T2w, PD) and inversion-recovery (FLAIR)
signal equations at 1.5 T or 3 T, with one receive bias field, Rician noise and a small head
motion between the acquisitions. The truth behind every image is returned: tissue fractions and
labels, the brain mask, every lesion (centre, diameter, label, whether T1w shows it) and the
tumour's compartments, all on the reference grid (the T1w acquisition's).

Model card — parameters per study (all SIMULATED)
-------------------------------------------------
=========================  =====================================  ======================================
quantity                   drawn from                             source / reasoning
=========================  =====================================  ======================================
field strength B0          1.5 T or 3 T (p = 0.5 each)            the two clinical field strengths.
tissue T1, T2, PD at 1.5T  :data:`models.sim.mrct.MR_TISSUES`     BrainWeb-like values (Aubert-Broche
                           (WM 500/70, GM 833/83, CSF 2569/329    et al. 2006), the values the paired
                           ms), per-study jitter ~4 % (PD 3 %)    MR/CT and prognosis simulators use.
T1 field dependence        T1(B0) = T1(1.5 T) (B0 / 1.5)^beta;    power law of Bottomley et al. 1984
                           beta 0.38 WM and GM, 0.45 muscle,      (Med Phys 11:425) and Rooney et al.
                           0.2 fat / marrow / bone, 0.3 tumour    2007 (MRM 57:308: beta ~0.38 for WM
                           and oedema, 0 CSF; lesions keep their  and GM, CSF T1 field-independent).
                           ratio to WM (3 T: WM, GM T1 x 1.30)    Stanisz et al. 2005 (MRM 54:507)
                                                                  report WM 884 -> 1084 ms (x 1.23)
                                                                  from 1.5 to 3 T; Wansapura et al.
                                                                  1999 (JMRI 9:531) WM ~830 / GM
                                                                  ~1330 ms at 3 T.
T2 field dependence        none                                   Stanisz et al. 2005: WM 72 -> 69 ms,
                                                                  GM 95 -> 99 ms (within a few %).
SNR                        Rician sigma 2 – 4 % of WM x (1.5/B0)  prognosis simulator's noise; SNR
                                                                  grows about linearly with B0.
white-matter lesions       count 0 (p 0.15), 1 – 5 (0.45), 6 –    small-vessel / demyelinating WMH:
(WMH)                      12 (0.25), 13 – 20 (0.15); diameter    hyperintense on T2w and FLAIR;
                           log-uniform 2 – 15 mm; ellipsoid axes  T2 1.5 – 2.5 x WM, T1 1.3 – 1.6 x WM
                           x 0.7 – 1.3, irregular edge; half      (T1w 5 – 12 % below WM: faint or
                           periventricular (<= 8 mm from a        invisible); "black holes" (p 0.25)
                           ventricle), half deep WM; not within   T1 1.9 – 2.1 x, T2 2.2 – 2.8 x WM
                           5 mm of the tumour's oedema            (T1w ~20 – 28 % below WM, still
                                                                  bright on FLAIR: longer T1 would null
                                                                  them with the CSF); PD 1.0 – 1.1 x WM
                                                                  (ranges of the MS / WMH relaxometry
                                                                  literature as usually quoted, e.g.
                                                                  Stevenson et al. 2000, J Neurol Sci
                                                                  178:81).
tumour (p 0.15)            core radius 6 – 16 mm, necrotic        compartments of
                           centre (p 0.7) 0.3 – 0.6 of it,        :data:`models.sim.prognosis.LESION_
                           oedema to 1.6 – 2.6 x the core         TISSUES` (pre-contrast): oedema T1
                           radius, in white matter, weight 0.5 –  1150 / T2 170 ms, tumour 1100 / 110,
                           0.8                                    necrosis 2000 / 250 at 1.5 T.
head pose                  yaw +/-8, pitch +/-5, roll +/-3 deg,   positioning variation (as
                           scale 0.92 – 1.08 in-plane, 0.95 –     :mod:`models.sim.mrct`).
                           1.05 axial, shift +/-5 mm
motion between series      rotation <= 1 deg, shift <= 1 mm       a cooperative patient over a
                           (T2w and PD share one: dual echo)      ~15-minute exam.
bias field                 one per study (the receive coil's),    as mrct / prognosis.
                           log-std 0.05 – 0.15, 60 mm scale
=========================  =====================================  ======================================

The bounds are choices inside the spread these papers report, taken from the values as they are
usually quoted; they were not checked against the original tables here (the papers cannot be read
from this environment), and they are not fitted population statistics. Healthy-tissue T1 values are
BrainWeb's (shorter than most in-vivo relaxometry); only their ratios between fields come from the
power law.

Protocols (:data:`PROTOCOLS`, the same at both fields): T1w spin echo TR/TE 500/12 ms, T2w spin echo
4000/100, PD spin echo 3000/15, FLAIR inversion recovery 9000/120 with TI nulling the nominal CSF
T1 (``TI = T1 ln(2 / (1 + exp(-TR/T1)))`` ~ 1705 ms; CSF T1 does not change with B0).
Signal ``S = PD (1 - exp(-TR/T1)) exp(-TE/T2)`` (spin echo, :class:`models.sim.mrct.SpinEcho`) and
``S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)`` (:class:`models.sim.prognosis.
InversionRecovery`), summed over the voxel's tissue fractions.

Geometry: ``(slices, rows, cols)``, axis 0 inferior -> superior, axis 1 anterior -> posterior, axis 2
patient right -> left (as mrct and prognosis); default 128 x 128 x 32 at 1.875 x 1.875 x 3 mm (FOV
240 mm), the stack centred at MNI z 0 – 40 mm so the lateral ventricles are in it. The reference
frame is the T1w acquisition's; T2w/PD and FLAIR are each seen through their own small pose
(:attr:`SimulatedMultiContrast.poses`, ``scanner_from_reference``), so lesion truth is exact on T1w
and within ~1 mm on the others (``motion=False`` makes every contrast voxel-aligned). The tissue
texture (2 %, as mrct) is drawn once on the reference grid and not moved with the pose; the bias
field belongs to the coil, so it is the same in every series' scanner frame.

Measured on 2 shared CPU cores: 0.7 – 1.6 s per 128 x 128 x 32 study (median ~1.05 s, 12 runs),
after the one-off MNI atlas load (~10 s per process).

Not modelled: skull base, vessels, susceptibility and flow artefacts, B1 transmit inhomogeneity,
magnetisation transfer, the echo train of fast spin echo (blurring), in-plane motion ghosts, and the
decrease of some T2 values at 3 T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage as ndi

from models.sim.anatomy import _head_atlas
from models.sim.mrct import MR_TEXTURE, MR_TISSUES, HeadTissue, SpinEcho, TissueMR, _texture, smooth_field
from models.sim.prognosis import (
    LESION_TISSUES,
    STACK_Z_RANGE_MM,
    InversionRecovery,
    LesionCompartment,
    TumourLabel,
    VisitPose,
    _draw_pose,
    _lps_grid,
    _pose_points,
    _sample_distance,
)

FIELD_STRENGTHS_T: tuple[float, ...] = (1.5, 3.0)
#: Field the relaxation table :data:`models.sim.mrct.MR_TISSUES` is for.
REFERENCE_FIELD_T = 1.5
#: Exponent beta of T1(B0) = T1(1.5 T) (B0 / 1.5)^beta (Bottomley 1984; Rooney et al. 2007).
T1_FIELD_EXPONENT: dict[HeadTissue, float] = {
    HeadTissue.AIR: 0.0,
    HeadTissue.SINUS_AIR: 0.0,
    HeadTissue.FAT: 0.2,
    HeadTissue.SOFT: 0.45,
    HeadTissue.CORTICAL_BONE: 0.2,
    HeadTissue.CANCELLOUS_BONE: 0.2,
    HeadTissue.CSF: 0.0,
    HeadTissue.GREY: 0.38,
    HeadTissue.WHITE: 0.38,
}
#: Same for lesions, tumour and oedema (water-rich tissue: weaker dispersion; this simulator's choice).
PATHOLOGY_T1_EXPONENT = 0.3

#: Nominal CSF T1 the FLAIR inversion time nulls (field-independent).
_CSF_T1 = MR_TISSUES[HeadTissue.CSF].t1_ms
_FLAIR_TR, _FLAIR_TE = 9000.0, 120.0
T1W = SpinEcho("t1w", tr_ms=500.0, te_ms=12.0)
T2W = SpinEcho("t2w", tr_ms=4000.0, te_ms=100.0)
PD = SpinEcho("pd", tr_ms=3000.0, te_ms=15.0)
FLAIR = InversionRecovery(
    "flair",
    tr_ms=_FLAIR_TR,
    te_ms=_FLAIR_TE,
    ti_ms=round(_CSF_T1 * math.log(2.0 / (1.0 + math.exp(-_FLAIR_TR / _CSF_T1)))),
)
PROTOCOLS: dict[str, SpinEcho | InversionRecovery] = {"t1w": T1W, "t2w": T2W, "flair": FLAIR, "pd": PD}
CONTRASTS: tuple[str, ...] = ("t1w", "t2w", "flair", "pd")
#: Acquisitions (one pose each): T2w and PD are the two echoes of one dual-echo acquisition.
ACQUISITIONS: tuple[tuple[str, ...], ...] = (("t1w",), ("t2w", "pd"), ("flair",))

DEFAULT_SIZE = 128
DEFAULT_SLICES = 32
DEFAULT_SLICE_THICKNESS_MM = 3.0
DEFAULT_FOV_MM = 240.0
#: MNI z range of the stack centre (keeps the lateral ventricles in the stack).
CENTRE_Z_RANGE_MM = (0.0, 40.0)
LESION_DIAMETER_MM = (2.0, 15.0)
MAX_LESIONS = 20
TUMOUR_PROBABILITY = 0.15
#: A lesion is "T1-visible" when its noise-free T1w signal is this much below white matter's.
T1_VISIBLE_CONTRAST = 0.2


class SynthLabel(IntEnum):
    """Tissue labels of :attr:`SimulatedMultiContrast.tissue` (largest fraction, intracranial)."""

    BACKGROUND = 0  # outside the intracranial space (skull, scalp, air)
    CSF = 1
    GREY = 2
    WHITE = 3
    LESION = 4
    TUMOUR_CORE = 5  # viable tumour and necrosis
    OEDEMA = 6


@dataclass(frozen=True)
class Lesion:
    """One white-matter lesion (truth on the reference grid).

    Attributes
    ----------
    id : int
        Its value in :attr:`SimulatedMultiContrast.lesion_labels` (1-based).
    centre_mm : tuple of float
        Centre ``(x, y, z)`` in LPS mm about the stack centre (reference frame).
    centre_voxel : tuple of float
        Centre ``(slice, row, col)`` in voxel indices of the reference grid.
    diameter_mm : float
        Nominal diameter (mean of the ellipsoid's axes).
    axes_mm : tuple of float
        The three ellipsoid diameters.
    volume_mm3 : float
        Partial-volume sum of its fraction times the voxel volume.
    n_voxels : int
        Voxels labelled with :attr:`id`.
    t1_visible : bool
        Noise-free T1w signal at least :data:`T1_VISIBLE_CONTRAST` below white matter ("black hole").
    location : str
        ``"periventricular"`` or ``"deep"``.
    t1_ms, t2_ms, pd : float
        Its relaxation at this study's field.
    contrast : dict
        Noise-free signal relative to white matter, ``S_lesion / S_WM - 1``, per contrast.
    """

    id: int
    centre_mm: tuple[float, float, float]
    centre_voxel: tuple[float, float, float]
    diameter_mm: float
    axes_mm: tuple[float, float, float]
    volume_mm3: float
    n_voxels: int
    t1_visible: bool
    location: str
    t1_ms: float
    t2_ms: float
    pd: float
    contrast: dict[str, float]


@dataclass(frozen=True)
class Tumour:
    """The tumour with oedema (reference grid).

    Attributes
    ----------
    centre_mm : tuple of float
        LPS mm about the stack centre.
    core_radius_mm, oedema_radius_mm, necrosis_radius_mm : float
        Mean radii (necrosis 0 when there is none).
    core : numpy.ndarray
        Boolean tumour core (viable tumour and necrosis), fraction >= 0.5.
    oedema : numpy.ndarray
        Boolean oedema (not core), fraction >= 0.25 of the voxel.
    labels : numpy.ndarray
        ``uint8`` :class:`models.sim.prognosis.TumourLabel` (1 necrosis, 2 oedema, 3 tumour; no
        contrast is given, so "enhancing" means viable tumour).
    """

    centre_mm: tuple[float, float, float]
    core_radius_mm: float
    oedema_radius_mm: float
    necrosis_radius_mm: float
    core: np.ndarray
    oedema: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class SimulatedMultiContrast:
    """One simulated multi-contrast brain MR study and its truth.

    Attributes
    ----------
    seed : int
        The seed.
    images : dict
        ``"t1w"``, ``"t2w"``, ``"flair"``, ``"pd"``: float32 magnitude ``(slices, rows, cols)``.
    brain : numpy.ndarray
        Boolean intracranial mask (reference grid).
    tissue : numpy.ndarray
        ``uint8`` :class:`SynthLabel`.
    fractions : dict
        float32 fractions ``"wm"``, ``"gm"``, ``"csf"``, ``"lesion"``, ``"tumour_core"``,
        ``"oedema"`` (they sum to the intracranial fraction of the voxel).
    lesions : tuple of Lesion
        The white-matter lesions.
    lesion_labels : numpy.ndarray
        ``uint16`` map, 0 none, else :attr:`Lesion.id`.
    tumour : Tumour or None
        The tumour, if this study has one.
    spacing_mm : tuple of float
        ``(slice, row, col)`` spacing.
    field_strength_t : float
        1.5 or 3.
    protocols : dict
        Sequence per contrast (:class:`SpinEcho` or :class:`InversionRecovery`).
    poses : dict
        :class:`models.sim.prognosis.VisitPose` per contrast (``scanner_from_reference``; T1w's is
        the identity).
    noise_sigma : dict
        Rician sigma per contrast (image units).
    tissues : dict
        The study's healthy-tissue relaxation (:class:`TissueMR`) at its field.
    stack_centre_mni_mm : tuple of float
        MNI position of the un-posed stack centre.
    """

    seed: int
    images: dict[str, np.ndarray]
    brain: np.ndarray
    tissue: np.ndarray
    fractions: dict[str, np.ndarray]
    lesions: tuple[Lesion, ...]
    lesion_labels: np.ndarray
    tumour: Tumour | None
    spacing_mm: tuple[float, float, float]
    field_strength_t: float
    protocols: dict[str, SpinEcho | InversionRecovery]
    poses: dict[str, VisitPose]
    noise_sigma: dict[str, float]
    tissues: dict[HeadTissue, TissueMR]
    stack_centre_mni_mm: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, cols)``."""
        s, r, c = self.brain.shape
        return int(s), int(r), int(c)


# -- relaxation -----------------------------------------------------------------------------------
def t1_field_factor(field_strength_t: float, beta: float) -> float:
    """``(B0 / 1.5 T)^beta``: the T1 scaling from the 1.5 T table to ``field_strength_t``."""
    return float((field_strength_t / REFERENCE_FIELD_T) ** beta)


def relaxation_at(field_strength_t: float) -> dict[HeadTissue, TissueMR]:
    """Healthy-tissue T1/T2/PD at a field (:data:`MR_TISSUES` with T1 scaled by the power law)."""
    return {
        t: TissueMR(p.t1_ms * t1_field_factor(field_strength_t, T1_FIELD_EXPONENT[t]), p.t2_ms, p.pd)
        for t, p in MR_TISSUES.items()
    }


def _signal(protocol: SpinEcho | InversionRecovery, p: TissueMR) -> float:
    return float(protocol.signal(np.array(p.t1_ms), np.array(p.t2_ms), np.array(p.pd)))


# -- shapes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Blob:
    """An irregular ellipsoid in reference LPS mm."""

    centre: np.ndarray  # (3,) x, y, z
    rotation: np.ndarray  # (3, 3) columns: the ellipsoid axes
    radii: np.ndarray  # (3,)
    waves: np.ndarray  # (k, 3) wave vectors, rad/mm
    phases: np.ndarray  # (k,)
    amplitudes: np.ndarray  # (k,) relative edge displacement

    def scaled(self, factor: float) -> _Blob:
        return _Blob(
            self.centre, self.rotation, self.radii * factor, self.waves / factor, self.phases, self.amplitudes
        )

    def fraction(self, points: list[np.ndarray], spacing: tuple[float, float, float]) -> np.ndarray:
        """Partial-volume fraction at reference points (x, y, z arrays), edge blurred over one voxel."""
        d = [points[i] - np.float32(self.centre[i]) for i in range(3)]
        u = [
            (
                np.float32(self.rotation[0, a]) * d[0]
                + np.float32(self.rotation[1, a]) * d[1]
                + np.float32(self.rotation[2, a]) * d[2]
            )
            / np.float32(self.radii[a])
            for a in range(3)
        ]
        rho = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
        edge = np.ones_like(rho)
        for w, ph, amp in zip(self.waves, self.phases, self.amplitudes, strict=True):
            edge += np.float32(amp) * np.sin(
                np.float32(w[0]) * d[0] + np.float32(w[1]) * d[1] + np.float32(w[2]) * d[2] + np.float32(ph)
            )
        dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        safe = np.maximum(dist, np.float32(1e-6))
        # Voxel extent along the ray (x: column, y: row, z: slice spacing).
        h = np.sqrt(
            (d[0] / safe * np.float32(spacing[2])) ** 2
            + (d[1] / safe * np.float32(spacing[1])) ** 2
            + (d[2] / safe * np.float32(spacing[0])) ** 2
        )
        signed_mm = (rho - edge) * dist / np.maximum(rho, np.float32(1e-6))
        frac = np.clip(np.float32(0.5) - signed_mm / np.maximum(h, np.float32(1e-3)), 0.0, 1.0)
        return frac.astype(np.float32)


def _draw_blob(rng: np.random.Generator, centre: np.ndarray, diameter_mm: float, irregular: float) -> _Blob:
    axes = rng.uniform(0.7, 1.3, size=3)
    axes = axes / float(axes.mean())
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    k = 3
    directions = rng.standard_normal((k, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelength = diameter_mm * rng.uniform(0.5, 1.0, size=k)
    return _Blob(
        centre=np.asarray(centre, dtype=np.float64),
        rotation=q,
        radii=axes * diameter_mm / 2.0,
        waves=directions * (2.0 * math.pi / wavelength)[:, None],
        phases=rng.uniform(0.0, 2.0 * math.pi, size=k),
        amplitudes=irregular * rng.uniform(0.3, 1.0, size=k) / math.sqrt(k),
    )


def _box(
    blob: _Blob, matrix: np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[slice, slice, slice] | None:
    """Scanner-grid index box that holds ``blob`` seen through ``matrix`` (None: outside the grid)."""
    p = matrix[:3, :3] @ blob.centre + matrix[:3, 3]
    reach = float(blob.radii.max()) * (1.0 + float(np.abs(blob.amplitudes).sum())) + 2.0 * max(spacing)
    centre_idx = (
        p[2] / spacing[0] + (shape[0] - 1) / 2.0,
        p[1] / spacing[1] + (shape[1] - 1) / 2.0,
        p[0] / spacing[2] + (shape[2] - 1) / 2.0,
    )
    out = []
    for a in range(3):
        lo = max(int(math.floor(centre_idx[a] - reach / spacing[a])), 0)
        hi = min(int(math.ceil(centre_idx[a] + reach / spacing[a])) + 1, shape[a])
        if lo >= hi:
            return None
        out.append(slice(lo, hi))
    return out[0], out[1], out[2]


# -- anatomy --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Head:
    centre_mni: np.ndarray
    inverse: np.ndarray  # canonical = inverse @ (q - shift)
    shift: np.ndarray
    shells: tuple[float, ...]


def _anatomy(
    q: list[np.ndarray], head: _Head, pixel_mm: float
) -> tuple[dict[HeadTissue, np.ndarray], np.ndarray]:
    """Tissue fractions at reference points ``q``; also the distance to the intracranial surface."""
    atlas = _head_atlas()
    d = [q[i] - np.float32(head.shift[i]) for i in range(3)]
    inv = head.inverse.astype(np.float32)
    c = [inv[i, 0] * d[0] + inv[i, 1] * d[1] + inv[i, 2] * d[2] for i in range(3)]
    del d
    origin = atlas.origin.astype(np.float32)
    coords = np.stack(
        [
            np.float32(head.centre_mni[0]) - c[0] - origin[0],
            np.float32(head.centre_mni[1]) - c[1] - origin[1],
            np.float32(head.centre_mni[2]) + c[2] - origin[2],
        ]
    ).astype(np.float32)
    del c
    sd = _sample_distance(atlas.sd, coords)
    white = ndi.map_coordinates(atlas.white, coords, order=1, mode="constant", cval=0.0) ** 2
    grey = ndi.map_coordinates(atlas.grey, coords, order=1, mode="constant", cval=0.0) ** 2
    csf = ndi.map_coordinates(atlas.csf, coords, order=1, mode="constant", cval=0.0) ** 2
    del coords
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
    layers = (
        HeadTissue.CORTICAL_BONE,
        HeadTissue.CANCELLOUS_BONE,
        HeadTissue.CORTICAL_BONE,
        HeadTissue.SOFT,
        HeadTissue.FAT,
        HeadTissue.SOFT,
    )
    edge = 0.0
    below = np.float32(1.0) - inside
    for tissue, thickness in zip(layers, head.shells, strict=True):
        edge += thickness
        out = np.clip((sd - np.float32(edge)) / np.float32(pixel_mm) + np.float32(0.5), 0.0, 1.0)
        if tissue in fractions:
            fractions[tissue] = fractions[tissue] + (below - out)
        else:
            fractions[tissue] = below - out
        below = out
    fractions[HeadTissue.SINUS_AIR] = np.zeros_like(inside)
    fractions[HeadTissue.AIR] = below
    return fractions, sd


def _draw_head(
    rng: np.random.Generator, slices: int, thickness: float, fov_mm: float
) -> tuple[_Head, tuple[float, float, float]]:
    atlas = _head_atlas()
    half = (slices - 1) * thickness / 2.0
    lo = max(STACK_Z_RANGE_MM[0] + half, CENTRE_Z_RANGE_MM[0])
    hi = min(STACK_Z_RANGE_MM[1] - half, CENTRE_Z_RANGE_MM[1])
    draw = float(rng.uniform())
    z_centre = lo + draw * (hi - lo) if lo <= hi else 0.5 * sum(CENTRE_Z_RANGE_MM)
    yaw = math.radians(rng.uniform(-8.0, 8.0))
    pitch = math.radians(rng.uniform(-5.0, 5.0))
    roll = math.radians(rng.uniform(-3.0, 3.0))
    scale = np.array([rng.uniform(0.92, 1.08), rng.uniform(0.92, 1.08), rng.uniform(0.95, 1.05)])
    shift = np.array([*rng.uniform(-5.0, 5.0, size=2), 0.0])
    shells = (
        float(rng.uniform(1.3, 2.2)),
        float(rng.uniform(2.0, 4.0)),
        float(rng.uniform(1.6, 2.6)),
        float(rng.uniform(1.0, 2.5)),
        float(rng.uniform(2.0, 5.0)),
        1.5,
    )
    extent = atlas.radius_mm + sum(shells) + 3.0
    budget = fov_mm / 2.0 - 3.0 - float(np.hypot(shift[0], shift[1]))
    scale[:2] *= min(1.0, budget / (float(scale[:2].max()) * extent))
    from models.sim.mrct import _rotation

    rot = _rotation(yaw, pitch, roll)
    centre = np.array([atlas.center_xy[0], atlas.center_xy[1], z_centre])
    head = _Head(centre_mni=centre, inverse=rot.T / scale[:, None], shift=shift, shells=shells)
    return head, (float(centre[0]), float(centre[1]), float(centre[2]))


# -- pathology ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LesionDraw:
    blob: _Blob
    params: TissueMR
    location: str


def _lesion_count(rng: np.random.Generator) -> int:
    burden = int(rng.choice(4, p=[0.15, 0.45, 0.25, 0.15]))
    lo, hi = ((0, 0), (1, 5), (6, 12), (13, MAX_LESIONS))[burden]
    return int(rng.integers(lo, hi + 1))


def _candidate_points(
    mask: np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> np.ndarray:
    idx = np.argwhere(mask)
    if idx.size == 0:
        return np.zeros((0, 3))
    s, r, c = shape
    return np.stack(
        [
            (idx[:, 2] - (c - 1) / 2.0) * spacing[2],
            (idx[:, 1] - (r - 1) / 2.0) * spacing[1],
            (idx[:, 0] - (s - 1) / 2.0) * spacing[0],
        ],
        axis=1,
    )


def _draw_tumour(
    rng: np.random.Generator,
    deep_wm: np.ndarray,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
) -> tuple[_Blob, float, float, float] | None:
    """Core blob, necrosis factor (0: none), oedema factor and oedema weight."""
    core_d = 2.0 * float(rng.uniform(6.0, 16.0))
    necrosis = float(rng.uniform(0.3, 0.6)) if rng.uniform() < 0.7 else 0.0
    oedema = float(rng.uniform(1.6, 2.6))
    weight = float(rng.uniform(0.5, 0.8))
    points = _candidate_points(deep_wm, shape, spacing)
    if len(points) == 0:
        return None
    centre = points[int(rng.integers(len(points)))]
    return _draw_blob(rng, centre, core_d, irregular=0.25), necrosis, oedema, weight


def _draw_lesions(
    rng: np.random.Generator,
    white: np.ndarray,
    csf: np.ndarray,
    sd: np.ndarray,
    avoid: tuple[np.ndarray, float] | None,
    wm: TissueMR,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    n: int,
) -> list[_LesionDraw]:
    deep = (white >= 0.6) & (sd <= -12.0)
    ventricles = (csf >= 0.5) & (sd <= -15.0)
    near = (
        ndi.distance_transform_edt(~ventricles, sampling=spacing) <= 8.0
        if ventricles.any()
        else np.zeros_like(deep)
    )
    pools = {
        "periventricular": _candidate_points(deep & near, shape, spacing),
        "deep": _candidate_points(deep & ~near, shape, spacing),
    }
    out: list[_LesionDraw] = []
    lo, hi = LESION_DIAMETER_MM
    for _ in range(n):
        diameter = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
        location = "periventricular" if rng.uniform() < 0.5 else "deep"
        black_hole = bool(rng.uniform() < 0.25)
        t1_ratio = float(rng.uniform(1.9, 2.1) if black_hole else rng.uniform(1.3, 1.6))
        t2_ratio = float(rng.uniform(2.2, 2.8) if black_hole else rng.uniform(1.5, 2.5))
        pd_ratio = float(rng.uniform(1.0, 1.1))
        pool = (
            pools[location]
            if len(pools[location])
            else pools["deep" if location != "deep" else "periventricular"]
        )
        placed = None
        for _try in range(30):
            if len(pool) == 0:
                break
            centre = pool[int(rng.integers(len(pool)))] + rng.uniform(-0.5, 0.5, size=3) * np.array(
                [spacing[2], spacing[1], spacing[0]]
            )
            clear = all(
                float(np.linalg.norm(centre - o.blob.centre))
                > 0.5 * (diameter + 2.0 * float(o.blob.radii.mean()))
                for o in out
            )
            if (
                avoid is not None
                and float(np.linalg.norm(centre - avoid[0])) < avoid[1] + diameter / 2.0 + 5.0
            ):
                clear = False
            if clear:
                placed = centre
                break
        if placed is None:
            continue
        params = TissueMR(wm.t1_ms * t1_ratio, wm.t2_ms * t2_ratio, wm.pd * pd_ratio)
        out.append(_LesionDraw(_draw_blob(rng, placed, diameter, irregular=0.2), params, location))
    return out


# -- the study ------------------------------------------------------------------------------------
def make_study(
    seed: int,
    *,
    size: int = DEFAULT_SIZE,
    slices: int = DEFAULT_SLICES,
    slice_thickness_mm: float = DEFAULT_SLICE_THICKNESS_MM,
    fov_mm: float = DEFAULT_FOV_MM,
    field_strength_t: float | None = None,
    n_lesions: int | None = None,
    tumour: bool | None = None,
    motion: bool = True,
) -> SimulatedMultiContrast:
    """Simulate one multi-contrast brain MR study (T1w, T2w, FLAIR, PD) and its truth.

    The seed fixes everything (independent streams for study-level draws, geometry, pathology,
    MR parameters and noise); every draw is made whether or not an option forces it, so forcing
    the field or the motion changes nothing else, and forcing the lesion count or the tumour
    changes only the pathology.

    Parameters
    ----------
    seed : int
        Study seed.
    size : int, optional
        Rows and columns.
    slices : int, optional
        Contiguous axial slices.
    slice_thickness_mm : float, optional
        Slice thickness and spacing.
    fov_mm : float, optional
        In-plane field of view.
    field_strength_t : float, optional
        1.5 or 3 (tesla); drawn per seed if omitted.
    n_lesions : int, optional
        Lesions to place (0 – 20; fewer if the white matter in the stack has no room); drawn if
        omitted.
    tumour : bool, optional
        Force a tumour with oedema on or off (drawn with probability 0.15 if omitted); there is
        none when the stack holds no deep white matter to seed it in.
    motion : bool, optional
        Small head motion between the acquisitions (off: every contrast on the T1w's pose).

    Returns
    -------
    SimulatedMultiContrast
        Images and truth.
    """
    if slices < 1 or size < 16:
        raise ValueError("need at least one slice and 16 x 16 pixels")
    if field_strength_t is not None and float(field_strength_t) not in FIELD_STRENGTHS_T:
        raise ValueError(f"field strength {field_strength_t} T is not simulated: choose 1.5 or 3")
    if n_lesions is not None and not 0 <= n_lesions <= MAX_LESIONS:
        raise ValueError(f"n_lesions = {n_lesions}: choose 0 – {MAX_LESIONS}")
    rng_par, rng_geo, rng_path, rng_mr, rng_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    # Study-level draws.
    field_draw = float(rng_par.uniform())
    field = float(field_strength_t) if field_strength_t is not None else (1.5 if field_draw < 0.5 else 3.0)
    count_draw = _lesion_count(rng_par)
    count = count_draw if n_lesions is None else int(n_lesions)
    tumour_draw = bool(rng_par.uniform() < TUMOUR_PROBABILITY)
    has_tumour = tumour_draw if tumour is None else bool(tumour)

    pixel = fov_mm / size
    spacing = (float(slice_thickness_mm), pixel, pixel)
    shape = (slices, size, size)
    head, centre_mni = _draw_head(rng_geo, slices, float(slice_thickness_mm), fov_mm)
    identity = np.eye(4)
    poses: dict[str, VisitPose] = {"t1w": VisitPose(0.0, (0.0, 0.0, 1.0), (0.0, 0.0, 0.0), identity)}
    for names in ACQUISITIONS[1:]:
        pose = _draw_pose(rng_geo, 1.0, 1.0)
        if not motion:
            pose = poses["t1w"]
        for name in names:
            poses[name] = pose

    # Relaxation at this field, per-study jitter (as mrct / prognosis).
    def jitter(p: TissueMR) -> TissueMR:
        return TissueMR(
            p.t1_ms * float(np.exp(0.04 * rng_mr.standard_normal())),
            p.t2_ms * float(np.exp(0.04 * rng_mr.standard_normal())),
            p.pd * float(np.exp(0.03 * rng_mr.standard_normal())),
        )

    tissues = {t: jitter(p) for t, p in relaxation_at(field).items()}
    tumour_factor = t1_field_factor(field, PATHOLOGY_T1_EXPONENT)
    compartments = {
        k: jitter(TissueMR(p.t1_ms * tumour_factor, p.t2_ms, p.pd)) for k, p in LESION_TISSUES.items()
    }

    # Reference (T1w) anatomy: where lesions and the tumour may go.
    reference = _lps_grid(shape, spacing)
    ref_fractions, atlas_sd_ref = _anatomy(reference, head, pixel)
    inside_ref = sum(ref_fractions[t] for t in (HeadTissue.WHITE, HeadTissue.GREY, HeadTissue.CSF))
    brain = np.asarray(inside_ref >= 0.5)
    white_norm = ref_fractions[HeadTissue.WHITE] / np.maximum(inside_ref, 1e-6)
    csf_norm = ref_fractions[HeadTissue.CSF] / np.maximum(inside_ref, 1e-6)

    tumour_draws = _draw_tumour(rng_path, (white_norm >= 0.5) & (atlas_sd_ref <= -20.0), shape, spacing)
    if not has_tumour:
        tumour_draws = None
    avoid = None
    if tumour_draws is not None:
        blob, _, oedema_factor, _ = tumour_draws
        avoid = (blob.centre, float(blob.radii.max()) * oedema_factor)
    lesion_draws = _draw_lesions(
        rng_path,
        white_norm,
        csf_norm,
        atlas_sd_ref,
        avoid,
        tissues[HeadTissue.WHITE],
        shape,
        spacing,
        count,
    )

    # Shared by every series: tissue texture (anatomy, reference frame) and the coil's bias field.
    texture = 1.0 + MR_TEXTURE * (
        _texture(shape, spacing, 2.0, rng_mr) + _texture(shape, spacing, 6.0, rng_mr)
    ) / math.sqrt(2.0)
    axes = tuple((np.arange(n) - (n - 1) / 2.0) * sp for n, sp in zip(shape, spacing, strict=True))
    log_bias = rng_mr.uniform(0.05, 0.15) * smooth_field((axes[0], axes[1], axes[2]), 60.0, rng_mr)[0]
    bias = np.exp(log_bias - float(log_bias[brain].mean() if brain.any() else 0.0)).astype(np.float32)
    del log_bias

    images: dict[str, np.ndarray] = {}
    sigmas: dict[str, float] = {}
    truth: dict[str, np.ndarray] = {}
    lesion_fracs: list[tuple[tuple[slice, slice, slice], np.ndarray]] = []
    necrosis_ref = np.zeros(shape, np.float32)
    for names in ACQUISITIONS:
        pose = poses[names[0]]
        if pose.matrix is identity:
            q, fractions = reference, ref_fractions
        else:
            q = _pose_points(shape, spacing, pose.matrix)
            fractions, _ = _anatomy(q, head, pixel)
        inside = fractions[HeadTissue.WHITE] + fractions[HeadTissue.GREY] + fractions[HeadTissue.CSF]
        parenchyma = fractions[HeadTissue.WHITE] + fractions[HeadTissue.GREY]
        # Tumour compartments (replace everything intracranial; oedema follows white matter).
        core = np.zeros(shape, np.float32)
        necrosis = np.zeros(shape, np.float32)
        oedema = np.zeros(shape, np.float32)
        zone = np.zeros(shape, np.float32)
        if tumour_draws is not None:
            blob, nec_factor, oed_factor, weight = tumour_draws
            big = blob.scaled(oed_factor)
            box = _box(big, pose.matrix, shape, spacing)
            if box is not None:
                pts = [p[box] for p in q]
                core_raw = blob.fraction(pts, spacing)
                nec_raw = blob.scaled(nec_factor).fraction(pts, spacing) if nec_factor > 0 else 0.0 * core_raw
                zone_raw = big.fraction(pts, spacing)
                core[box] = core_raw * inside[box]
                necrosis[box] = np.minimum(nec_raw, core_raw) * inside[box]
                oedema[box] = (
                    np.float32(weight)
                    * (zone_raw - core_raw).clip(0.0, 1.0)
                    * fractions[HeadTissue.WHITE][box]
                )
                zone[box] = zone_raw
        # Lesions (in parenchyma, never inside the tumour's zone).
        lesion_total = np.zeros(shape, np.float32)
        per_lesion: list[tuple[tuple[slice, slice, slice], np.ndarray]] = []
        for draw in lesion_draws:
            box = _box(draw.blob, pose.matrix, shape, spacing)
            if box is None:
                per_lesion.append(((slice(0, 0), slice(0, 0), slice(0, 0)), np.zeros((0, 0, 0), np.float32)))
                continue
            frac = draw.blob.fraction([p[box] for p in q], spacing) * parenchyma[box] * (1.0 - zone[box])
            room = np.clip(parenchyma[box] - lesion_total[box], 0.0, None)
            frac = np.minimum(frac, room)
            lesion_total[box] += frac
            per_lesion.append((box, frac))
        scale = np.clip(
            1.0 - (core + oedema + lesion_total) / np.maximum(inside, np.float32(1e-6)), 0.0, 1.0
        ).astype(np.float32)
        for name in names:
            protocol = PROTOCOLS[name]
            per_tissue = {t: _signal(protocol, p) for t, p in tissues.items()}
            wm_level = float(np.exp(rng_mr.uniform(math.log(400.0), math.log(1200.0))))
            gain = wm_level / per_tissue[HeadTissue.WHITE]
            clean = np.zeros(shape, np.float32)
            for tissue, frac in fractions.items():
                value = per_tissue[tissue] * gain
                if value <= 0:
                    continue
                if tissue in (HeadTissue.WHITE, HeadTissue.GREY, HeadTissue.CSF):
                    clean += frac * scale * np.float32(value)
                else:
                    clean += frac * np.float32(value)
            if tumour_draws is not None:
                s_tum = _signal(protocol, compartments[LesionCompartment.ENHANCING]) * gain
                s_nec = _signal(protocol, compartments[LesionCompartment.NECROSIS]) * gain
                s_oed = _signal(protocol, compartments[LesionCompartment.OEDEMA]) * gain
                clean += (core - necrosis) * np.float32(s_tum) + necrosis * np.float32(s_nec)
                clean += oedema * np.float32(s_oed)
            for draw, (box, frac) in zip(lesion_draws, per_lesion, strict=True):
                if frac.size:
                    clean[box] += frac * np.float32(_signal(protocol, draw.params) * gain)
            clean *= texture
            clean *= bias
            sigma = float(rng_noise.uniform(0.02, 0.04)) * (REFERENCE_FIELD_T / field) * wm_level
            re = clean + sigma * rng_noise.standard_normal(shape, dtype=np.float32)
            im = sigma * rng_noise.standard_normal(shape, dtype=np.float32)
            images[name] = np.sqrt(re * re + im * im).astype(np.float32)
            sigmas[name] = sigma
        if names[0] == "t1w":
            truth = {
                "wm": fractions[HeadTissue.WHITE] * scale,
                "gm": fractions[HeadTissue.GREY] * scale,
                "csf": fractions[HeadTissue.CSF] * scale,
                "lesion": lesion_total,
                "tumour_core": core,
                "oedema": oedema,
            }
            truth = {k: v.astype(np.float32) for k, v in truth.items()}
            lesion_fracs = per_lesion
            necrosis_ref = necrosis

    # Truth on the reference grid.
    order = ("csf", "gm", "wm", "lesion", "tumour_core", "oedema")
    stacked = np.stack([truth[k] for k in order])
    tissue = (np.argmax(stacked, axis=0) + 1).astype(np.uint8)
    tissue[~brain] = SynthLabel.BACKGROUND
    del stacked
    lesion_labels = np.zeros(shape, np.uint16)
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    wm_params = tissues[HeadTissue.WHITE]
    lesions: list[Lesion] = []
    for draw, (box, frac) in zip(lesion_draws, lesion_fracs, strict=True):
        if frac.size == 0 or float(frac.max()) <= 0.05:
            continue
        ident = len(lesions) + 1
        mask = frac >= 0.5
        if not mask.any():
            mask = frac >= float(frac.max())
        region = lesion_labels[box]
        region[mask & (region == 0)] = ident
        c = draw.blob.centre
        contrast = {
            name: _signal(PROTOCOLS[name], draw.params) / _signal(PROTOCOLS[name], wm_params) - 1.0
            for name in CONTRASTS
        }
        lesions.append(
            Lesion(
                id=ident,
                centre_mm=(float(c[0]), float(c[1]), float(c[2])),
                centre_voxel=(
                    float(c[2] / spacing[0] + (shape[0] - 1) / 2.0),
                    float(c[1] / spacing[1] + (shape[1] - 1) / 2.0),
                    float(c[0] / spacing[2] + (shape[2] - 1) / 2.0),
                ),
                diameter_mm=float(2.0 * draw.blob.radii.mean()),
                axes_mm=tuple(float(2.0 * r) for r in draw.blob.radii),  # type: ignore[arg-type]
                volume_mm3=float(frac.sum()) * voxel_mm3,
                n_voxels=int(np.count_nonzero(lesion_labels[box] == ident)),
                t1_visible=bool(contrast["t1w"] <= -T1_VISIBLE_CONTRAST),
                location=draw.location,
                t1_ms=draw.params.t1_ms,
                t2_ms=draw.params.t2_ms,
                pd=draw.params.pd,
                contrast=contrast,
            )
        )
    tissue[(lesion_labels > 0) & brain] = SynthLabel.LESION

    tumour_truth = None
    if tumour_draws is not None:
        blob, nec_factor, oed_factor, _ = tumour_draws
        core_mask = truth["tumour_core"] >= 0.5
        oedema_mask = (truth["oedema"] >= 0.25) & ~core_mask
        labels = np.zeros(shape, np.uint8)
        labels[oedema_mask] = TumourLabel.OEDEMA
        labels[core_mask] = TumourLabel.ENHANCING
        labels[core_mask & (necrosis_ref >= 0.5)] = TumourLabel.NECROTIC_CORE
        r = float(blob.radii.mean())
        c = blob.centre
        tumour_truth = Tumour(
            centre_mm=(float(c[0]), float(c[1]), float(c[2])),
            core_radius_mm=r,
            oedema_radius_mm=r * oed_factor,
            necrosis_radius_mm=r * nec_factor,
            core=core_mask,
            oedema=oedema_mask,
            labels=labels,
        )
    return SimulatedMultiContrast(
        seed=int(seed),
        images=images,
        brain=brain,
        tissue=tissue,
        fractions=truth,
        lesions=tuple(lesions),
        lesion_labels=lesion_labels,
        tumour=tumour_truth,
        spacing_mm=spacing,
        field_strength_t=field,
        protocols=dict(PROTOCOLS),
        poses=poses,
        noise_sigma=sigmas,
        tissues=tissues,
        stack_centre_mni_mm=centre_mni,
    )
