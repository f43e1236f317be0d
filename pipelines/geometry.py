"""Slice geometry of a series, from its headers: one stack, evenly spaced, nothing missing.

A series is placed in the patient by each slice's Image Position / Orientation (Patient)
(per frame for enhanced multi-frame objects: :func:`frame_group` is the one reader of
per-frame functional groups, the frame's own item else the shared one, and the volume
loader, :func:`planes_of` and the writers all find a frame's geometry through it).
:func:`analyse_stack` sorts the slices along the slice normal and reports the facts —
slices off the common orientation, duplicate positions, the median step, gaps and
uneven steps — without judging them; :func:`stack_problems` turns the facts into the
reasons a person can act on ("the MR series has 12 of 24 slices: gap of 32.5 mm between
z=-27.5 and z=5.0"). The volume loader and the TPS checks both build on these, so a
series is judged the same way on the way in and on the way out.

Tolerances: orientations agree within 1e-4 (direction cosines); two slices closer than
0.001 mm along the normal are duplicates; a step may differ from the median step by 1 %
of it (at least 0.001 mm, the precision positions are usually written with); a step
more than 1.5 times the median is a gap (slices missing), anything else outside the
tolerance is uneven spacing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

ORIENTATION_ATOL = 1e-4
DUPLICATE_MM = 1e-3
STEP_RTOL = 0.01
GAP_FACTOR = 1.5


@dataclass(frozen=True)
class Plane:
    """One slice (one file, or one frame of a multi-frame file) in patient space."""

    sop_instance_uid: str
    #: 1-based frame number in a multi-frame object; None for single-frame instances.
    frame_number: int | None
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float] | None


@dataclass(frozen=True)
class StackGeometry:
    """Facts about a set of planes sorted along the slice normal (see :func:`analyse_stack`)."""

    orientation: np.ndarray
    normal: np.ndarray
    #: Indices into the analysed planes, sorted along the normal.
    order: np.ndarray
    #: Distance of each sorted plane along the normal, mm.
    distances: np.ndarray
    steps: np.ndarray
    #: The median step, mm (None for a single plane).
    step: float | None
    #: Indices of planes whose orientation differs from the first plane's.
    off_orientation: tuple[int, ...]
    #: Positions ``k`` in sorted order where plane ``k + 1`` sits on plane ``k``.
    duplicates: tuple[int, ...]
    #: Positions ``k`` in sorted order where the step to ``k + 1`` is a gap.
    gaps: tuple[int, ...]
    #: Per step: outside the tolerance around the median step (gaps included).
    uneven: np.ndarray

    @property
    def tolerance(self) -> float:
        return max(STEP_RTOL * (self.step or 0.0), DUPLICATE_MM)

    @property
    def expected_count(self) -> int:
        """Slices a complete stack from the first to the last position would have."""
        if not self.step or len(self.distances) < 2:
            return len(self.distances)
        return int(round((self.distances[-1] - self.distances[0]) / self.step)) + 1


def _floats(values: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def first_item(item: Dataset | None, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` in ``item`` (None when either is absent or empty)."""
    seq = getattr(item, sequence, None) if item is not None else None
    return seq[0] if seq else None


def frame_group(ds: Dataset, frame_number: int | None, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` that applies to one frame of ``ds``.

    The frame's own item (Per-Frame Functional Groups Sequence) when it has a non-empty
    one, else the Shared Functional Groups item; None when neither has the group.

    Parameters
    ----------
    ds
        An instance with functional groups (enhanced multi-frame); for one without, None.
    frame_number
        1-based frame number; None asks for the shared item only.
    sequence
        Keyword of the functional group, e.g. ``"PlanePositionSequence"``.
    """
    if frame_number is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and len(per_frame) >= frame_number:
            item = first_item(per_frame[frame_number - 1], sequence)
            if item:
                return item
    return first_item(first_item(ds, "SharedFunctionalGroupsSequence"), sequence)


def planes_of(ds: Dataset) -> tuple[list[Plane], str | None]:
    """The planes of one instance, from its headers (pixel data not needed).

    Returns the planes and, when the instance cannot be placed in the patient, why not
    (then the list is empty).
    """
    sop = str(ds.get("SOPInstanceUID", "?"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        planes = []
        for n in range(1, len(per_frame) + 1):
            pos, ori, measures = (
                frame_group(ds, n, "PlanePositionSequence"),
                frame_group(ds, n, "PlaneOrientationSequence"),
                frame_group(ds, n, "PixelMeasuresSequence"),
            )
            position = _floats(getattr(pos, "ImagePositionPatient", None), 3)
            orientation = _floats(getattr(ori, "ImageOrientationPatient", None), 6)
            if position is None or orientation is None:
                return [], f"frame {n} of {sop} lacks plane position or orientation"
            spacing = _floats(getattr(measures, "PixelSpacing", None), 2)
            planes.append(Plane(sop, n, position, orientation, spacing))  # type: ignore[arg-type]
        return planes, None
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    for keyword, value in (("ImagePositionPatient", position), ("ImageOrientationPatient", orientation)):
        if value is None:
            return [], f"instance {sop} has no valid {keyword}; it cannot be placed in the patient"
    spacing = _floats(ds.get("PixelSpacing"), 2)
    return [Plane(sop, None, position, orientation, spacing)], None  # type: ignore[arg-type]


def analyse_stack(positions: Sequence[Any], orientations: Sequence[Any]) -> StackGeometry:
    """Sort planes along the normal of the first plane's orientation and measure the steps."""
    orientation = np.asarray(orientations[0], dtype=float)
    off = tuple(
        i
        for i, o in enumerate(orientations)
        if not np.allclose(np.asarray(o, dtype=float), orientation, atol=ORIENTATION_ATOL)
    )
    normal = np.cross(orientation[:3], orientation[3:])
    distance = np.array([float(np.dot(np.asarray(p, dtype=float), normal)) for p in positions])
    order = np.argsort(distance, kind="stable")
    distance = distance[order]
    steps = np.diff(distance)
    duplicates = tuple(int(k) for k in np.flatnonzero(steps < DUPLICATE_MM))
    real_steps = steps[steps >= DUPLICATE_MM]
    step = float(np.median(real_steps)) if len(real_steps) else None
    if step is None:
        uneven = np.zeros(len(steps), dtype=bool)
        gaps: tuple[int, ...] = ()
    else:
        tolerance = max(STEP_RTOL * step, DUPLICATE_MM)
        uneven = (np.abs(steps - step) > tolerance) & (steps >= DUPLICATE_MM)
        gaps = tuple(int(k) for k in np.flatnonzero(steps > GAP_FACTOR * step))
    return StackGeometry(
        orientation=orientation,
        normal=normal,
        order=order,
        distances=distance,
        steps=steps,
        step=step,
        off_orientation=off,
        duplicates=duplicates,
        gaps=gaps,
        uneven=uneven,
    )


def orientation_name(orientation: Sequence[float]) -> str:
    """axial, coronal, sagittal or oblique, from the slice normal."""
    o = np.asarray(orientation, dtype=float)
    normal = np.abs(np.cross(o[:3], o[3:]))
    axis = int(np.argmax(normal))
    if normal[axis] < 0.95:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _at(stack: StackGeometry, distance: float) -> str:
    """A position along the normal, as z=… for axial stacks."""
    n = stack.normal
    axis = int(np.argmax(np.abs(n)))
    if abs(n[axis]) > 0.99:
        return f"{'xyz'[axis]}={distance * np.sign(n[axis]):.1f}"
    return f"{distance:.1f} mm along the slice normal"


def stack_problems(
    planes: Sequence[Plane],
    *,
    what: str = "the series",
    expected_count: int | None = None,
    nominal_spacing: float | None = None,
) -> list[str]:
    """Why ``planes`` are not one complete, evenly spaced stack (empty: they are).

    Parameters
    ----------
    planes
        The slices of one series (any order).
    what
        How the messages name the series ("the MR series").
    expected_count
        Slices the series should have (e.g. Images in Acquisition), when known.
    nominal_spacing
        The distance between slice centres the series declares (Spacing Between
        Slices), when known: a stack sparser than that has lost slices.
    """
    if not planes:
        return [f"{what} has no slices"]
    problems: list[str] = []
    stack = analyse_stack([p.position for p in planes], [p.orientation for p in planes])
    if stack.off_orientation:
        groups = Counter(
            tuple(round(v, 3) + 0.0 for v in p.orientation)  # + 0.0: no "-0.0"
            for p in planes
        )
        listed = ", ".join(f"{n} {orientation_name(o)} {list(o)}" for o, n in groups.most_common(4))
        problems.append(
            f"{what} mixes {len(groups)} orientations ({listed}); "
            "it is not one stack of slices — select one orientation"
        )
        return problems  # distances along one normal mean nothing for the others
    spacings = {p.pixel_spacing for p in planes if p.pixel_spacing is not None}
    if len(spacings) > 1:
        problems.append(f"{what} has differing pixel spacing between slices ({sorted(spacings)[:3]})")
    sorted_planes = [planes[i] for i in stack.order]
    if stack.duplicates:
        k = stack.duplicates[0]
        problems.append(
            f"{what} has {len(stack.duplicates)} duplicate slice position(s), first at "
            f"{_at(stack, stack.distances[k])} ({sorted_planes[k].sop_instance_uid} and "
            f"{sorted_planes[k + 1].sop_instance_uid})"
        )
    count = len(stack.distances) - len(stack.duplicates)
    if stack.step is not None and stack.gaps:
        k = int(stack.gaps[int(np.argmax(stack.steps[list(stack.gaps)]))])  # the widest
        more = f" and {len(stack.gaps) - 1} more gap(s)" if len(stack.gaps) > 1 else ""
        problems.append(
            f"{what} has {count} of {stack.expected_count} slices: gap of {stack.steps[k]:.1f} mm "
            f"between {_at(stack, stack.distances[k])} and {_at(stack, stack.distances[k + 1])} "
            f"(slices are {stack.step:.2f} mm apart elsewhere){more}"
        )
    elif stack.step is not None and stack.uneven.any():
        steps = stack.steps[stack.steps >= DUPLICATE_MM]
        problems.append(
            f"{what} has uneven slice spacing: {steps.min():.3f} to {steps.max():.3f} mm "
            f"(median {stack.step:.3f} mm; allowed ±{stack.tolerance:.3f} mm)"
        )
    elif (
        stack.step is not None
        and nominal_spacing
        and nominal_spacing > 0
        and stack.step > GAP_FACTOR * nominal_spacing
    ):
        expected = int(round((stack.distances[-1] - stack.distances[0]) / nominal_spacing)) + 1
        problems.append(
            f"{what} has {count} of {expected} slices: they are {stack.step:.2f} mm apart but "
            f"Spacing Between Slices is {nominal_spacing:.2f} mm (every other slice missing?)"
        )
    if expected_count and count < expected_count and not stack.gaps:
        problems.append(f"{what} has {count} of {expected_count} slices (Images in Acquisition)")
    return problems


def series_problems(datasets: Sequence[Dataset], *, what: str = "the series") -> list[str]:
    """Why the instances of one series are not one complete stack (empty: they are).

    Header-only (pixel data not needed): mixed series or orientations, duplicate
    positions, gaps, uneven spacing, and fewer slices than the series' own Spacing
    Between Slices or Images in Acquisition say it has. A pipeline calls this on its
    input before any model runs; the node calls it before a TPS delivery.
    """
    problems: list[str] = []
    planes: list[Plane] = []
    nominal: set[float] = set()
    expected: set[int] = set()
    acquisitions: set[str] = set()
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        return [f"{what}: instances of {len(series)} series mixed in"]
    for ds in datasets:
        found, why = planes_of(ds)
        if why:
            problems.append(f"{what}: {why}")
        planes.extend(found)
        if ds.get("SpacingBetweenSlices"):
            nominal.add(round(float(ds.SpacingBetweenSlices), 3))
        if ds.get("ImagesInAcquisition"):
            expected.add(int(ds.ImagesInAcquisition))
        acquisitions.add(str(ds.get("AcquisitionNumber", "")))
    problems.extend(
        stack_problems(
            planes,
            what=what,
            nominal_spacing=nominal.pop() if len(nominal) == 1 else None,
            # Images in Acquisition counts one acquisition: trusted for a one-acquisition series only.
            expected_count=expected.pop() if len(expected) == 1 and len(acquisitions) == 1 else None,
        )
    )
    return problems
