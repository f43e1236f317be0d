"""Classical baselines of tumour-growth prognosis (issue 17), for the model to beat.

Each sees what the model sees: the visible tumour extent of the earlier visits and the
current one, already registered onto the current visit's grid, their days, the brain mask
and the spacing; and predicts the extent at a follow-up day as a per-voxel probability
(0/1 for the deterministic ones) with a predicted volume.

* :func:`no_change` — the follow-up equals the current visit.
* :func:`linear_volume` — the tumour volume extrapolated linearly in time (least squares
  over the visits, the current one included), the extent grown or shrunk with a uniform
  ("spherical") front: the level set of the current extent's signed distance map, inside
  the brain, whose volume is the extrapolated one. A front that moves the same distance
  everywhere is what a sphere does; it keeps the current shape, which a sphere about the
  centroid would throw away, so this baseline is the stronger of the two readings.
* :func:`linear_volume_sphere` — the literal reading: a sphere of the extrapolated volume
  about the current extent's centroid.

The per-patient Fisher–Kolmogorov fit is :mod:`models.evaluation.prognosis_fk`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.prognosis import signed_distance_mm, volume_ml


@dataclass(frozen=True)
class Visit:
    """One visit's visible tumour extent on the current visit's grid."""

    day: float
    extent: np.ndarray  # bool, (slices, rows, columns)


@dataclass(frozen=True)
class Forecast:
    """A baseline's (or model's) prediction at one follow-up day."""

    probability: np.ndarray  # float32 in [0, 1], same grid
    volume_ml: float
    #: 90 % interval of the volume, when the method gives one
    interval_ml: tuple[float, float] | None = None


def _check(visits: Sequence[Visit], day: float) -> Visit:
    if not visits:
        raise ValueError("a prognosis needs at least the current visit")
    days = [v.day for v in visits]
    if sorted(days) != days or len(set(days)) != len(days):
        raise ValueError(f"visits must be in time order, one per day: {days}")
    if day <= days[-1]:
        raise ValueError(f"the follow-up day {day} is not after the current visit ({days[-1]})")
    shape = visits[-1].extent.shape
    if any(v.extent.shape != shape for v in visits):
        raise ValueError("every visit's extent must be on the current visit's grid")
    return visits[-1]


def no_change(visits: Sequence[Visit], day: float, spacing_mm: Sequence[float]) -> Forecast:
    """The follow-up looks like the current visit."""
    current = _check(visits, day)
    extent = np.asarray(current.extent, bool)
    return Forecast(extent.astype(np.float32), volume_ml(extent, spacing_mm))


def front_to_volume(
    extent: np.ndarray, target_ml: float, brain: np.ndarray, spacing_mm: Sequence[float]
) -> np.ndarray:
    """The extent moved by a uniform front until its volume inside ``brain`` is ``target_ml``."""
    extent = np.asarray(extent, bool)
    brain = np.asarray(brain, bool)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    want = int(round(max(target_ml, 0.0) / voxel_ml))
    if want == 0 or not extent.any():
        return np.zeros_like(extent)
    sdf = signed_distance_mm(extent, spacing_mm)
    region = brain | extent
    levels, counts = np.unique(sdf[region], return_counts=True)
    reached = np.cumsum(counts)
    # a grid has many voxels at one distance: take the level whose volume is nearest
    at = min(int(np.searchsorted(reached, want)), len(levels) - 1)
    if at > 0 and want - reached[at - 1] < reached[at] - want:
        at -= 1
    return (sdf <= levels[at]) & region


def _extrapolated_volume(visits: Sequence[Visit], day: float, spacing_mm: Sequence[float]) -> float:
    """The volume (ml, ≥ 0) at ``day``: the least-squares slope over the visits, anchored at
    the current volume (the fit's slope, not its intercept, is the claim)."""
    days = np.array([v.day for v in visits], np.float64)
    volumes = np.array([volume_ml(v.extent, spacing_mm) for v in visits], np.float64)
    slope = np.polyfit(days, volumes, 1)[0] if len(visits) > 1 else 0.0
    return max(float(volumes[-1] + slope * (day - days[-1])), 0.0)


def linear_volume(
    visits: Sequence[Visit], day: float, brain: np.ndarray, spacing_mm: Sequence[float]
) -> Forecast:
    """Volume extrapolated linearly in time, the current extent moved by a uniform front."""
    current = _check(visits, day)
    target = _extrapolated_volume(visits, day, spacing_mm)
    extent = front_to_volume(current.extent, target, brain, spacing_mm)
    return Forecast(extent.astype(np.float32), volume_ml(extent, spacing_mm))


def linear_volume_sphere(visits: Sequence[Visit], day: float, spacing_mm: Sequence[float]) -> Forecast:
    """Volume extrapolated linearly in time, as a sphere about the current centroid."""
    current = _check(visits, day)
    target = _extrapolated_volume(visits, day, spacing_mm)
    shape = current.extent.shape
    if target == 0.0 or not current.extent.any():
        return Forecast(np.zeros(shape, np.float32), 0.0)
    centre = np.array(ndimage.center_of_mass(current.extent)) * np.asarray(spacing_mm)
    radius = (3.0 * target * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    axes = [np.arange(n) * s - c for n, s, c in zip(shape, spacing_mm, centre, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    sphere = (z**2 + y**2 + x**2) <= radius**2
    return Forecast(sphere.astype(np.float32), volume_ml(sphere, spacing_mm))
