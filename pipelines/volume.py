"""Series ↔ volume: load a selected series into a 3-D array with its patient geometry.

Single-frame (one file per slice) and enhanced multi-frame series, uncompressed or
compressed (JPEG lossless, JPEG 2000, RLE via pylibjpeg), become a :class:`Volume`:
slices sorted along the slice normal, pixel values in modality units (Rescale Slope /
Intercept applied: HU for CT), spacing, origin and direction. A series that cannot be
made into one honest volume is refused with :class:`SeriesError`, whose message names
the series and the problem: mixed orientations, gaps or uneven spacing (unless
resampling is asked for), duplicate positions, missing pixel data. A series without a
Frame of Reference UID loads (with ``frame_of_reference_uid`` ""): whether its outputs
may be put on a new one is the pipeline's decision (:func:`on_frame_of_reference`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from pipelines.geometry import analyse_stack, first_item, frame_group


class SeriesError(ValueError):
    """A series that cannot be loaded as one volume; the message names series and problem."""


@dataclass(frozen=True)
class SliceRef:
    """Where one slice of the volume came from, and where it sits in the patient."""

    sop_class_uid: str
    sop_instance_uid: str
    #: 1-based frame number for multi-frame sources; None for single-frame instances.
    frame_number: int | None
    #: Image Position (Patient) of the slice's first voxel, mm (x, y, z).
    position: tuple[float, float, float]


@dataclass(frozen=True)
class Volume:
    """A series as a volume, with everything a writer needs to reference it.

    ``array`` is ``(slices, rows, columns)`` float32 in modality units; slice ``k`` is at
    ``slices[k].position`` and the slices run along ``normal`` (row direction × column
    direction) with ``spacing[0]`` mm between them.
    """

    series_uid: str
    study_uid: str
    #: "" when the source series has none (legacy files): see :func:`on_frame_of_reference`.
    frame_of_reference_uid: str
    modality: str
    array: np.ndarray
    #: (slice, row, column) spacing in mm: slice distance, then Pixel Spacing (row, column).
    spacing: tuple[float, float, float]
    #: Image Orientation (Patient): row direction cosines then column direction cosines.
    orientation: tuple[float, float, float, float, float, float]
    slices: tuple[SliceRef, ...]
    #: The source data sets, pixel data included (one per file), in file order.
    datasets: tuple[Dataset, ...]
    #: Units of ``array``: "HU" for CT with a rescale, otherwise the Rescale Type or "".
    units: str = ""
    #: True when slices were resampled onto a uniform grid (then ``slices`` lists the
    #: nearest source slice of each resampled position).
    resampled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: Where ``array`` holds measured image (bool, ``array``'s shape): False on padding and
    #: outside the reconstruction circle (:mod:`pipelines.fov`); None: everywhere.
    fov: np.ndarray | None = None

    @property
    def normal(self) -> np.ndarray:
        row, col = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        return np.cross(row, col)

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.slices[0].position

    def direction(self) -> np.ndarray:
        """3x3 direction matrix (columns: row direction, column direction, normal), as ITK uses."""
        row, col = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        return np.stack([row, col, self.normal], axis=1)


@dataclass
class _Frame:
    dataset_index: int
    frame_number: int | None
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    sop_class_uid: str
    sop_instance_uid: str


def _xyz(values: Any) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)
    return (x, y, z)


def _frames_of(index: int, ds: Dataset, label: str) -> list[_Frame]:
    sop = str(ds.get("SOPInstanceUID", "?"))
    sop_class = str(ds.get("SOPClassUID", ""))
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise SeriesError(f"{label}: instance {sop} has no pixel data")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        frames = []
        for n in range(1, len(per_frame) + 1):
            plane_pos, plane_ori, measures = (
                frame_group(ds, n, "PlanePositionSequence"),
                frame_group(ds, n, "PlaneOrientationSequence"),
                frame_group(ds, n, "PixelMeasuresSequence"),
            )
            if plane_pos is None or plane_ori is None or measures is None:
                raise SeriesError(
                    f"{label}: frame {n} of {sop} lacks plane position, orientation or pixel spacing"
                )
            transform = frame_group(ds, n, "PixelValueTransformationSequence")
            frames.append(
                _Frame(
                    index,
                    n,
                    np.array(plane_pos.ImagePositionPatient, dtype=float),
                    np.array(plane_ori.ImageOrientationPatient, dtype=float),
                    (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])),
                    float(transform.RescaleSlope) if transform is not None else 1.0,
                    float(transform.RescaleIntercept) if transform is not None else 0.0,
                    sop_class,
                    sop,
                )
            )
        return frames
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds:
            raise SeriesError(f"{label}: instance {sop} has no {keyword}; cannot place it in the patient")
    return [
        _Frame(
            index,
            None,
            np.array(ds.ImagePositionPatient, dtype=float),
            np.array(ds.ImageOrientationPatient, dtype=float),
            (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            float(ds.get("RescaleSlope", 1) or 1),
            float(ds.get("RescaleIntercept", 0) or 0),
            sop_class,
            sop,
        )
    ]


def _rescale_type(ds: Dataset) -> str:
    """Rescale Type: top level, else shared, else first frame's Pixel Value Transformation."""
    if ds.get("RescaleType"):
        return str(ds.RescaleType)
    for groups in (
        first_item(ds, "SharedFunctionalGroupsSequence"),
        first_item(ds, "PerFrameFunctionalGroupsSequence"),
    ):
        transform = first_item(groups, "PixelValueTransformationSequence")
        if transform is not None and transform.get("RescaleType"):
            return str(transform.RescaleType)
    return ""


def _pixels(ds: Dataset, label: str) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # decoder missing or corrupt stream: say which instance
        raise SeriesError(
            f"{label}: cannot decode the pixel data of {ds.get('SOPInstanceUID', '?')}: {exc}"
        ) from None


def _drop_decoded(ds: Dataset) -> None:
    """Forget pydicom's cached decoded pixels (the encoded Pixel Data stays)."""
    if getattr(ds, "_pixel_array", None) is not None:
        ds._pixel_array = None
        ds._pixel_id = {}


def _frame_of_reference(datasets: Sequence[Dataset], label: str) -> str:
    """The series' Frame of Reference UID, or "" when no instance has one (legacy files).

    A series whose instances disagree (two frames, or some with one and some without)
    is not one volume in one patient coordinate system: refused.
    """
    found = [str(ds.get("FrameOfReferenceUID", "") or "") for ds in datasets]
    frames = sorted(set(found) - {""})
    if len(frames) > 1:
        raise SeriesError(f"{label}: instances on {len(frames)} frames of reference ({', '.join(frames)})")
    if frames and "" in found:
        raise SeriesError(
            f"{label}: {found.count('')} of {len(found)} instances have no Frame of Reference UID "
            f"and the others have {frames[0]}; resend the series complete"
        )
    return frames[0] if frames else ""


def on_frame_of_reference(volume: Volume, frame_of_reference_uid: str) -> Volume:
    """``volume`` placed on ``frame_of_reference_uid``: for a series that has none.

    Positions and orientation stay the source's; only the coordinate system gets a name,
    so the outputs (which must carry one) can say they share one another's geometry. The
    source data sets are copied with the UID added — the writers read it from them — and
    share everything else, pixel data included; the files are untouched.
    """
    if volume.frame_of_reference_uid:
        raise ValueError(
            f"series {volume.series_uid} already has Frame of Reference UID "
            f"{volume.frame_of_reference_uid}; it is never replaced"
        )
    if not frame_of_reference_uid:
        raise ValueError("on_frame_of_reference: a Frame of Reference UID is required")
    datasets = []
    for ds in volume.datasets:
        clone = copy.copy(ds)
        clone._dict = dict(ds._dict)  # copy.copy would share the element mapping
        clone.FrameOfReferenceUID = frame_of_reference_uid
        datasets.append(clone)
    return replace(volume, frame_of_reference_uid=frame_of_reference_uid, datasets=tuple(datasets))


def load_series(datasets: Sequence[Dataset], *, resample: bool = False) -> Volume:
    """Load one series (all its instances, any order) into a :class:`Volume`.

    Parameters
    ----------
    datasets
        The series' instances, read with pixel data.
    resample
        Accept uneven slice spacing or gaps by resampling onto a uniform grid at the
        median spacing (linear interpolation). Default: refuse such a series.

    Raises
    ------
    SeriesError
        The series cannot be one volume; the message says which series and why.
    """
    if not datasets:
        raise SeriesError("empty series: no instances to load")
    series_uid = str(datasets[0].get("SeriesInstanceUID", "?"))
    label = f"series {series_uid}"
    others = {str(ds.get("SeriesInstanceUID")) for ds in datasets} - {series_uid}
    if others:
        raise SeriesError(f"{label}: instances of other series mixed in ({', '.join(sorted(others))})")
    frames = [f for i, ds in enumerate(datasets) for f in _frames_of(i, ds, label)]
    frame_of_reference = _frame_of_reference(datasets, label)

    stack = analyse_stack([f.position for f in frames], [f.orientation for f in frames])
    orientation = stack.orientation
    if stack.off_orientation:
        raise SeriesError(
            f"{label}: mixed orientations ({len(stack.off_orientation)} of {len(frames)} slices differ "
            f"from {np.round(orientation, 4).tolist()}); select one stack"
        )
    if any(not np.allclose(f.pixel_spacing, frames[0].pixel_spacing, atol=1e-4) for f in frames):
        raise SeriesError(f"{label}: pixel spacing differs between slices")
    normal = stack.normal
    frames = [frames[i] for i in stack.order]
    distance, steps = stack.distances, stack.steps
    if stack.duplicates:
        k = stack.duplicates[0]
        raise SeriesError(
            f"{label}: duplicate slice position {distance[k]:.3f} mm along the normal "
            f"({frames[k].sop_instance_uid} and {frames[k + 1].sop_instance_uid})"
        )
    if stack.step is not None:
        step = stack.step
        if stack.uneven.any() and not resample:
            k = int(np.argmax(np.abs(steps - step)))
            raise SeriesError(
                f"{label}: uneven slice spacing — {steps.min():.3f} to {steps.max():.3f} mm "
                f"(median {step:.3f}; {int(stack.uneven.sum())} step(s) off, first after slice {k + 1}); "
                "a gap or a missing slice? Resampling was not asked for"
            )
    else:
        step = float(datasets[0].get("SliceThickness", 1.0) or 1.0)

    # Pixel data, decoded once per file (a multi-frame file decodes all its frames at once),
    # written straight into the volume; each file's decoded copy is dropped once its frames
    # are in (pydicom caches it on the data set, which the volume keeps for the writers).
    array = np.empty(0, np.float32)
    last_use = {f.dataset_index: k for k, f in enumerate(frames)}
    decoded: dict[int, np.ndarray] = {}
    for k, f in enumerate(frames):
        if f.dataset_index not in decoded:
            decoded[f.dataset_index] = _pixels(datasets[f.dataset_index], label)
        pixels = decoded[f.dataset_index]
        plane = pixels[f.frame_number - 1] if f.frame_number is not None and pixels.ndim == 3 else pixels
        if plane.ndim != 2:
            raise SeriesError(f"{label}: {f.sop_instance_uid} is not a grayscale image (shape {plane.shape})")
        if k == 0:
            array = np.empty((len(frames), *plane.shape), np.float32)
        elif plane.shape != array.shape[1:]:
            raise SeriesError(f"{label}: slice sizes differ ({array.shape[1:]} vs {plane.shape})")
        np.multiply(plane, np.float32(f.slope), out=array[k], casting="unsafe")
        array[k] += np.float32(f.intercept)
        if last_use[f.dataset_index] == k:
            del decoded[f.dataset_index]
            _drop_decoded(datasets[f.dataset_index])
    refs = tuple(
        SliceRef(f.sop_class_uid, f.sop_instance_uid, f.frame_number, _xyz(f.position)) for f in frames
    )
    resampled = False
    if resample and stack.uneven.any():
        array, refs = _resample(array, distance, frames, step, normal)
        resampled = True

    first = datasets[frames[0].dataset_index]
    modality = str(first.get("Modality", ""))
    units = _rescale_type(first)
    if modality == "CT" and units in ("", "HU"):
        units = "HU"
    return Volume(
        series_uid=series_uid,
        study_uid=str(first.StudyInstanceUID),
        frame_of_reference_uid=frame_of_reference,
        modality=modality,
        array=array,
        spacing=(step, frames[0].pixel_spacing[0], frames[0].pixel_spacing[1]),
        orientation=tuple(float(v) for v in orientation),  # type: ignore[arg-type]
        slices=refs,
        datasets=tuple(datasets),
        units=units,
        resampled=resampled,
    )


def _resample(
    array: np.ndarray, distance: np.ndarray, frames: list[_Frame], step: float, normal: np.ndarray
) -> tuple[np.ndarray, tuple[SliceRef, ...]]:
    """Linear interpolation onto a uniform grid along the normal, at the median step."""
    count = int(round((distance[-1] - distance[0]) / step)) + 1
    grid = distance[0] + step * np.arange(count)
    out = np.empty((count,) + array.shape[1:], dtype=np.float32)
    refs = []
    for k, d in enumerate(grid):
        hi = int(np.clip(np.searchsorted(distance, d), 1, len(distance) - 1))
        lo = hi - 1
        w = (d - distance[lo]) / (distance[hi] - distance[lo])
        out[k] = (1 - w) * array[lo] + w * array[hi]
        near = frames[lo] if w < 0.5 else frames[hi]
        position = frames[0].position + (d - distance[0]) * normal
        refs.append(
            SliceRef(
                near.sop_class_uid,
                near.sop_instance_uid,
                near.frame_number,
                _xyz(position),
            )
        )
    return out, tuple(refs)
