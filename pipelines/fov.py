"""The field of view: where a volume holds measured image, and what a model sees elsewhere.

Three kinds of voxel in a received series are not image:

- **declared padding**: Pixel Padding Value, alone (that stored value) or with Pixel
  Padding Range Limit (every stored value between the two), turned into modality units
  with each slice's own rescale;
- **below the physical minimum** (CT in HU): a scanner may write e.g. −2000 or −3024
  outside its reconstruction circle without declaring it. A voxel counts when most of its
  5×5 neighbourhood is more than ``BELOW_MINIMUM_MARGIN_HU`` below −1024 HU (so noise in
  air, which dips below −1024 at single voxels, never does), and so does any voxel below
  that level within 2 pixels of one that counts;
- **outside the reconstruction circle** (CT): the region joined to the image border whose
  voxels hold exactly the corners' value in every slice, when what it leaves is a disc
  (clipped by the image edges or not).

:class:`DetectFieldOfView` puts the mask on the volume (``Volume.fov``). The stages then
keep to it: the model sees the outside filled (:func:`model_input`: air on CT, the
background level on other images), so it never meets a −2000 cliff; the delivered image
keeps the source's values there (:func:`as_delivered`; a synthetic CT gets air), σ is 0
there; the hallucination score is 0 there (:func:`clear_outside`) and compared on the
filled input (:func:`scoring_pair`); and QC figures are taken inside it (``Volume.fov``,
:func:`inside`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from models.base import Prediction
from pipelines import spill
from pipelines.base import PipelineError
from pipelines.geometry import frame_group
from pipelines.stages import Context
from pipelines.volume import Volume

#: The lowest value a CT in HU can physically hold (air is −1000; scanners clip at −1024).
PHYSICAL_MIN_HU = -1024.0
#: How far below the physical minimum a region must lie to be padding rather than noisy air
#: (simulated 10 %-dose air, σ about 50 HU around −1000: single voxels dip below −1124 HU,
#: never most of a 5×5 neighbourhood).
BELOW_MINIMUM_MARGIN_HU = 100.0
#: What the network sees outside the field of view of a CT, and a synthetic CT holds there.
AIR_HU = -1000.0
#: Least overlap (intersection over union) of the inside with the fitted disc for the
#: constant border region to count as the outside of a reconstruction circle.
MIN_CIRCLE_OVERLAP = 0.97
#: A disc narrower than this share of the image is an object, not the scanner's circle.
MIN_CIRCLE_RADIUS_SHARE = 0.25


def _rescale_of(ds: Dataset, frame_number: int | None) -> tuple[float, float]:
    """(slope, intercept) of one frame, as the volume loader applied them."""
    if frame_number is not None:
        transform = frame_group(ds, frame_number, "PixelValueTransformationSequence")
        if transform is not None:
            return float(transform.RescaleSlope), float(transform.RescaleIntercept)
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def _stored_value(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(ds[keyword].value) if keyword in ds else None
    except (TypeError, ValueError):  # an unresolved US/SS value left as bytes
        return None


def declared_padding(volume: Volume) -> np.ndarray | None:
    """Voxels the headers declare padding (Pixel Padding Value / Range Limit); None: none."""
    sources = {str(ds.get("SOPInstanceUID", "")): ds for ds in volume.datasets}
    found: np.ndarray | None = None
    for k, ref in enumerate(volume.slices):
        ds = sources.get(ref.sop_instance_uid)
        value = None if ds is None else _stored_value(ds, "PixelPaddingValue")
        if ds is None or value is None:
            continue
        limit = _stored_value(ds, "PixelPaddingRangeLimit")
        slope, intercept = _rescale_of(ds, ref.frame_number)
        ends = [v * slope + intercept for v in (value, value if limit is None else limit)]
        tolerance = 0.5 * abs(slope)  # the array holds float32 of whole stored values
        plane = volume.array[k]
        hit = (plane >= min(ends) - tolerance) & (plane <= max(ends) + tolerance)
        if hit.any():
            found = np.zeros(volume.array.shape, bool) if found is None else found
            found[k] = hit
    return found


def below_physical_minimum(volume: Volume) -> np.ndarray | None:
    """Regions of a CT in HU well below −1024 HU (undeclared padding); None: none, or not HU."""
    if volume.modality != "CT" or volume.units != "HU":
        return None
    found: np.ndarray | None = None
    for k, plane in enumerate(volume.array):  # slice by slice: small temporaries
        low = plane < PHYSICAL_MIN_HU - BELOW_MINIMUM_MARGIN_HU
        rows, cols = np.nonzero(low)
        if rows.size == 0:
            continue
        h, w = low.shape
        if rows.size < 13 and min(rows.min(), cols.min()) >= 2 and rows.max() < h - 2 and cols.max() < w - 2:
            continue  # a 5×5 majority needs 13 low voxels (away from the edge none is mirrored)
        # only around the low voxels (often a few noisy ones in air): a 4-pixel margin of
        # the real image keeps the filter's and the dilation's edges as on the whole plane
        box = (
            slice(max(int(rows.min()) - 4, 0), int(rows.max()) + 5),
            slice(max(int(cols.min()) - 4, 0), int(cols.max()) + 5),
        )
        part = low[box]
        # "most of the 5×5 neighbourhood" is a median test; the mean of the indicator is cheaper
        core = ndimage.uniform_filter(part.astype(np.float32), size=5) > 0.5
        if core.any():
            found = np.zeros(volume.array.shape, bool) if found is None else found
            found[k][box] = ndimage.binary_dilation(core, iterations=2, mask=part) | core
    return found


def _circle_through(points: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle (centre row, centre column, radius) through (row, column) points."""
    rows, cols = points[:, 0].astype(float), points[:, 1].astype(float)
    design = np.stack([rows, cols, np.ones_like(rows)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, rows**2 + cols**2, rcond=None)
    cy, cx = a / 2.0, b / 2.0
    return cy, cx, math.sqrt(max(c + cy**2 + cx**2, 0.0))


def outside_reconstruction_circle(volume: Volume) -> np.ndarray | None:
    """The (rows, columns) outside of a CT's reconstruction circle; None: none found."""
    array = volume.array
    if volume.modality != "CT" or array.ndim != 3 or min(array.shape[1:]) < 16:
        return None
    corners = array[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    value = corners.flat[0]
    if not np.all(corners == value):
        return None
    constant = array[0] == value
    for plane in array[1:]:
        constant &= plane == value
    labels, _ = ndimage.label(constant)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    outside = np.isin(labels, np.unique(edge[edge > 0]))
    inside = ~outside
    if not inside.any():
        return None
    rim = inside & ~ndimage.binary_erosion(inside)
    rim[[0, -1], :] = rim[:, [0, -1]] = False  # the image's edge is not the circle's
    if rim.sum() < 16:
        return None
    cy, cx, radius = _circle_through(np.argwhere(rim))
    rows, cols = inside.shape
    if radius < MIN_CIRCLE_RADIUS_SHARE * min(rows, cols):
        return None
    yy, xx = np.ogrid[:rows, :cols]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    overlap = float((disc & inside).sum()) / float((disc | inside).sum())
    return outside if overlap >= MIN_CIRCLE_OVERLAP else None


@dataclass(frozen=True)
class FieldOfView:
    """The field of view of a volume and what was found outside it."""

    #: True where the volume holds measured image; None when that is everywhere.
    mask: np.ndarray | None
    #: What made voxels outside, e.g. ("Pixel Padding Value", "reconstruction circle").
    causes: tuple[str, ...] = ()


def field_of_view(volume: Volume) -> FieldOfView:
    """Where ``volume`` holds measured image (see the module's docstring)."""
    outside = np.zeros(volume.array.shape, bool)
    causes = []
    for cause, found in (
        ("Pixel Padding Value", declared_padding(volume)),
        (f"below {PHYSICAL_MIN_HU:g} HU", below_physical_minimum(volume)),
        ("reconstruction circle", outside_reconstruction_circle(volume)),
    ):
        if found is not None and found.any():
            outside |= found
            causes.append(cause)
    return FieldOfView(~outside if causes else None, tuple(causes))


def fill_value(volume: Volume) -> float:
    """What the model sees outside the field of view: air on a CT in HU, else the
    background level (1st percentile inside the field of view)."""
    if volume.modality == "CT" and volume.units == "HU":
        return AIR_HU
    measured = volume.array if volume.fov is None else volume.array[volume.fov]
    return float(np.percentile(measured, 1.0)) if measured.size else 0.0


def model_input(volume: Volume, part: slice = slice(None)) -> np.ndarray:
    """The volume (its slices ``part``) as the model sees it: the outside of the field of
    view filled."""
    if volume.fov is None:
        return volume.array[part]
    return np.where(volume.fov[part], volume.array[part], np.float32(fill_value(volume))).astype(
        np.float32, copy=False
    )


class FilledSlices:
    """:func:`model_input` a slice at a time: ``len``, ``shape``, ``[k]`` and ``[a:b]``
    give filled copies of just those slices, so a model that reads its input slice by
    slice (``reads_slices``) never holds a filled copy of the whole volume (a 300-slice
    512² CT: 315 MB). ``np.asarray`` gives the whole filled volume."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.shape = volume.array.shape
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.volume.array)

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if isinstance(index, slice):
            return model_input(self.volume, index)
        return model_input(self.volume, slice(index, index + 1))[0]

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = model_input(self.volume)
        return whole if dtype is None else whole.astype(dtype, copy=False)


def as_delivered(
    volume: Volume,
    prediction: Prediction,
    outside: float | None = None,
    *,
    inplace: bool = False,
    part: slice = slice(None),
) -> Prediction:
    """The prediction with the source's values outside the field of view (``outside``
    instead, e.g. air for a synthetic CT) and σ 0 there: nothing was predicted there.
    ``inplace``: written into the prediction's own float32 arrays (which the caller owns),
    slice by slice, without volume-sized temporaries; ``part``: the prediction is of those
    slices of the volume (in place only)."""
    if volume.fov is None:
        return prediction
    if inplace and prediction.mean.dtype == prediction.sigma.dtype == np.float32:
        source = volume.array[part]
        for k, inside in enumerate(volume.fov[part]):
            outside_k = ~inside
            prediction.mean[k][outside_k] = source[k][outside_k] if outside is None else outside
            prediction.sigma[k][outside_k] = 0.0
        return prediction
    if part != slice(None):
        raise ValueError("as_delivered: a part of the volume is delivered in place only")
    kept = volume.array if outside is None else np.float32(outside)
    return Prediction(
        mean=np.where(volume.fov, prediction.mean, kept).astype(np.float32, copy=False),
        sigma=np.where(volume.fov, prediction.sigma, np.float32(0.0)).astype(np.float32, copy=False),
    )


def scoring_pair(
    volume: Volume, prediction: Prediction, part: slice = slice(None)
) -> tuple[np.ndarray, np.ndarray]:
    """(observed, predicted) for a hallucination score (of the slices ``part``): the
    model's input and the prediction, both with the outside filled alike (no departure
    there, no cliff)."""
    observed = model_input(volume, part)
    if volume.fov is None:
        return observed, prediction.mean[part]
    return observed, np.where(volume.fov[part], prediction.mean[part], observed).astype(
        np.float32, copy=False
    )


def clear_outside(volume: Volume, score: np.ndarray, part: slice = slice(None)) -> np.ndarray:
    """A hallucination score (of the slices ``part``) with 0 outside the field of view:
    never scored there."""
    return score if volume.fov is None else np.where(volume.fov[part], score, np.float32(0.0))


def inside(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """``mask`` (e.g. the body) within the field of view."""
    return mask if volume.fov is None else mask & volume.fov


@dataclass(frozen=True)
class DetectFieldOfView:
    """Find padding and the outside of the reconstruction circle; put the mask on the volume.

    A series with no voxel inside its field of view is refused (nothing to predict on).
    """

    name: str = "fov"

    def run(self, ctx: Context) -> Context:
        volume = ctx.need_volume()
        found = field_of_view(volume)
        if found.mask is None:
            return ctx
        if not found.mask.any():
            raise PipelineError(
                f"series {volume.series_uid}: every voxel is padding ({', '.join(found.causes)}); "
                "there is no image to process"
            )
        share = 1.0 - float(found.mask.mean())
        mask = found.mask
        if spill.file_backed(volume.array):  # a spilled volume's mask goes with it
            mask = spill.Spill(ctx.env.workdir).copy("fov", mask)
        parameters = {
            **ctx.parameters,
            "outside_field_of_view": f"{share:.1%} of voxels ({'; '.join(found.causes)})",
        }
        return ctx.evolve(volume=replace(volume, fov=mask), parameters=parameters)
