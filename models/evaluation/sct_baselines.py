"""Classical MR → synthetic CT baselines, for the sCT evaluation to beat.

Both see what the model sees — the raw T1-weighted volume, its head mask
(:func:`models.sct.head_mask`) and the per-volume intensity normalisation
(:func:`models.sct.normalise_mr`) — and set everything outside the head to −1000 HU. The MR
intensity they threshold or map is smoothed in-plane (Gaussian σ 0.7 px, as the
hallucination map's support table does) so a single noisy voxel does not change class.

* :class:`BulkDensity` — bulk-density assignment, the classical MR-only planning method: each
  head voxel gets one of three classes and the class's median reference HU in the fitting
  data. Dark on T1w (``intensity < bone_below``) is bone: in the head almost every dark voxel
  is skull, because air cavities are small. Two rules then move dark voxels to air: *very*
  dark ones (``intensity < air_below``: sinus air has no signal at all, while thin cortical
  bone picks up partial volume from its neighbours) and dark ones within ``air_edge_mm`` of
  the head edge (the skin/air boundary, where the closed head mask includes outside air).
  Everything else is soft tissue. The three numbers are chosen on the fitting data by grid
  search for the smallest mean absolute error (bone threshold first, then the two air rules).
* :class:`PiecewiseIntensity` — a binned, piecewise-linear map from normalised intensity to
  HU: the median reference HU of the head voxels in each intensity bin (0–1.6 in steps of
  0.05), linearly interpolated between bin centres and held constant beyond the end bins. It is
  not monotone — T1w puts bone (dark), brain (mid) and fat (bright) in that order — and
  knows nothing of depth or neighbourhood, which is what the model adds.

Both are fitted on training-role simulated pairs (never on test cases), are deterministic
(a fixed-seed voxel subsample), and expose their few parameters for the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from models.sct import depth_mm, head_mask, normalise_mr
from models.training.sct import SctPair

AIR_OUTSIDE_HU = -1000.0
#: In-plane Gaussian σ (px) applied to the normalised MR before thresholding or mapping.
SMOOTH_PX = 0.7
#: Head voxels sampled per fitting case (fixed-seed subsample: deterministic).
SAMPLES_PER_CASE = 40_000
_BONE_GRID = tuple(float(v) for v in np.round(np.arange(0.10, 0.601, 0.02), 3))
_AIR_GRID = tuple(float(v) for v in np.round(np.arange(0.0, 0.101, 0.01), 3))
_EDGE_GRID_MM = (0.0, 1.0, 1.5, 2.0, 3.0)
#: A rule is only kept when it moves at least this many fitting voxels (else its class median
#: would rest on a handful of voxels).
_MIN_CLASS_VOXELS = 200


def smoothed_intensity(mr_norm: np.ndarray) -> np.ndarray:
    """The normalised MR smoothed in-plane by :data:`SMOOTH_PX` (what both baselines look at)."""
    return ndimage.gaussian_filter(np.asarray(mr_norm, np.float32), (0, SMOOTH_PX, SMOOTH_PX))


@dataclass(frozen=True)
class _Samples:
    intensity: np.ndarray
    depth: np.ndarray
    hu: np.ndarray


def _sample(pairs: Sequence[SctPair], per_case: int = SAMPLES_PER_CASE, seed: int = 0) -> _Samples:
    if not pairs:
        raise ValueError("pairs: need at least one fitting case")
    rng = np.random.default_rng(seed)
    iv, dv, hv = [], [], []
    for p in pairs:
        idx = np.flatnonzero(p.body)
        if idx.size == 0:
            continue
        pick = np.sort(rng.choice(idx, size=min(per_case, idx.size), replace=False))
        iv.append(smoothed_intensity(p.mr).ravel()[pick])
        dv.append(np.asarray(p.depth, np.float32).ravel()[pick])
        hv.append(np.asarray(p.ct, np.float32).ravel()[pick])
    if not iv:
        raise ValueError("pairs: no head voxels in the fitting cases")
    return _Samples(np.concatenate(iv), np.concatenate(dv), np.concatenate(hv))


def _prepare(raw_mr: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    mr = np.asarray(raw_mr, np.float32)
    if mr.ndim != 3:
        raise ValueError(f"raw_mr: expected a (slices, rows, cols) volume, got shape {mr.shape}")
    body = head_mask(mr)
    return body, smoothed_intensity(normalise_mr(mr, body))


class NotFitted(RuntimeError):
    """``predict`` was called before ``fit``."""


@dataclass(frozen=True)
class BulkDensityParameters:
    """Thresholds (normalised T1w intensity, mm) and the HU given to each class."""

    bone_below: float
    air_below: float
    air_edge_mm: float
    soft_hu: float
    bone_hu: float
    air_hu: float


def _classes(
    intensity: np.ndarray, depth: np.ndarray, bone_below: float, air_below: float, edge_mm: float
) -> np.ndarray:
    """0 soft tissue, 1 bone, 2 air (inside the head). ``air_below`` 0 or ``edge_mm`` 0 turn
    that air rule off (intensities are magnitudes ≥ 0; head voxels lie ≥ one pixel deep)."""
    dark = intensity < bone_below
    air = dark & ((intensity < air_below) | (depth <= edge_mm))
    return np.where(air, 2, np.where(dark, 1, 0)).astype(np.uint8)


def _class_fit(
    cls: np.ndarray, hu: np.ndarray, fallback: tuple[float, float, float]
) -> tuple[tuple[float, float, float], float]:
    """Median HU per class (``fallback`` for an empty class) and the resulting MAE."""
    medians = tuple(float(np.median(hu[cls == c])) if np.any(cls == c) else fallback[c] for c in range(3))
    pred = np.asarray(medians, np.float32)[cls]
    return (medians[0], medians[1], medians[2]), float(np.mean(np.abs(pred - hu)))


class BulkDensity:
    """Three-class bulk-density sCT: air / soft tissue / bone from T1w thresholds.

    Examples
    --------
    >>> baseline = BulkDensity().fit(training_pairs)          # doctest: +SKIP
    >>> hu = baseline.predict(raw_t1w, spacing)                # doctest: +SKIP
    """

    name = "bulk density"

    def __init__(self) -> None:
        self.params: BulkDensityParameters | None = None

    def fit(self, pairs: Sequence[SctPair]) -> BulkDensity:
        """Choose the thresholds and class HU on fitting pairs (training role, never test).

        Parameters
        ----------
        pairs : sequence of SctPair
            Simulated cases with normalised MR, reference CT, head mask and depth.

        Returns
        -------
        BulkDensity
            ``self``, fitted.
        """
        s = _sample(pairs)
        fallback = (0.0, 1000.0, AIR_OUTSIDE_HU)

        def score(bone: float, air: float, edge: float) -> tuple[float, tuple[float, float, float]]:
            cls = _classes(s.intensity, s.depth, bone, air, edge)
            medians, mae = _class_fit(cls, s.hu, fallback)
            return mae, medians

        # Bone threshold alone first (no air rule), then the two air rules on top of it.
        bone = min(_BONE_GRID, key=lambda t: score(t, 0.0, 0.0)[0])
        air, edge = 0.0, 0.0
        best = score(bone, air, edge)[0]
        for a in _AIR_GRID:
            for e in _EDGE_GRID_MM:
                cls = _classes(s.intensity, s.depth, bone, a, e)
                if (a > 0 or e > 0) and np.count_nonzero(cls == 2) < _MIN_CLASS_VOXELS:
                    continue
                mae = score(bone, a, e)[0]
                if mae < best - 1e-6:
                    best, air, edge = mae, a, e
        _, medians = score(bone, air, edge)
        self.params = BulkDensityParameters(
            bone_below=bone,
            air_below=air,
            air_edge_mm=edge,
            soft_hu=round(medians[0], 1),
            bone_hu=round(medians[1], 1),
            air_hu=round(medians[2], 1),
        )
        return self

    def predict(self, raw_mr: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        """sCT (float32 HU) of a raw T1w volume; −1000 HU outside the head mask."""
        if self.params is None:
            raise NotFitted("BulkDensity.predict: call fit(pairs) first")
        p = self.params
        body, intensity = _prepare(raw_mr, spacing)
        cls = _classes(intensity, depth_mm(body, spacing), p.bone_below, p.air_below, p.air_edge_mm)
        hu = np.asarray([p.soft_hu, p.bone_hu, p.air_hu], np.float32)[cls]
        return np.where(body, hu, AIR_OUTSIDE_HU).astype(np.float32)

    def parameters(self) -> dict[str, Any]:
        """The fitted parameters, for the report (``air_below`` / ``air_edge_mm`` 0: rule off)."""
        if self.params is None:
            raise NotFitted("BulkDensity.parameters: call fit(pairs) first")
        return asdict(self.params)


#: Bin edges of the piecewise-linear intensity → HU map (normalised T1w intensity).
PIECEWISE_EDGES = tuple(float(v) for v in np.round(np.arange(0.0, 1.601, 0.05), 3))


@dataclass(frozen=True)
class PiecewiseParameters:
    """Knots of the map: bin centres (normalised intensity) and the median HU there."""

    knots_intensity: list[float]
    knots_hu: list[float]


class PiecewiseIntensity:
    """Piecewise-linear map from normalised T1w intensity to HU (binned medians).

    Examples
    --------
    >>> baseline = PiecewiseIntensity().fit(training_pairs)   # doctest: +SKIP
    >>> hu = baseline.predict(raw_t1w, spacing)                # doctest: +SKIP
    """

    name = "piecewise intensity"

    def __init__(self, edges: Sequence[float] = PIECEWISE_EDGES, min_count: int = 50) -> None:
        if len(edges) < 2 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"edges: need at least two increasing values, got {list(edges)}")
        self.edges = [float(e) for e in edges]
        self.min_count = min_count
        self.params: PiecewiseParameters | None = None

    def fit(self, pairs: Sequence[SctPair]) -> PiecewiseIntensity:
        """Median reference HU per intensity bin of the fitting pairs' head voxels.

        Bins with fewer than ``min_count`` voxels are dropped (the line runs straight across
        them); at least one bin must be populated.
        """
        s = _sample(pairs)
        edges = np.asarray(self.edges)
        inner = np.clip(s.intensity, edges[0], edges[-1])
        b = np.clip(np.digitize(inner, edges[1:-1]), 0, len(edges) - 2)
        xs, ys = [], []
        for k in range(len(edges) - 1):
            sel = s.hu[b == k]
            if sel.size >= self.min_count:
                xs.append(round(float(0.5 * (edges[k] + edges[k + 1])), 4))
                ys.append(round(float(np.median(sel)), 1))
        if not xs:
            raise ValueError("pairs: no intensity bin has enough head voxels to fit")
        self.params = PiecewiseParameters(xs, ys)
        return self

    def map(self, intensity: np.ndarray) -> np.ndarray:
        """HU for normalised (smoothed) intensities: linear between knots, flat beyond."""
        if self.params is None:
            raise NotFitted("PiecewiseIntensity.map: call fit(pairs) first")
        return np.interp(intensity, self.params.knots_intensity, self.params.knots_hu).astype(np.float32)

    def predict(self, raw_mr: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        """sCT (float32 HU) of a raw T1w volume; −1000 HU outside the head mask."""
        body, intensity = _prepare(raw_mr, spacing)
        return np.where(body, self.map(intensity), AIR_OUTSIDE_HU).astype(np.float32)

    def parameters(self) -> dict[str, Any]:
        """The knots, for the report."""
        if self.params is None:
            raise NotFitted("PiecewiseIntensity.parameters: call fit(pairs) first")
        return asdict(self.params)
