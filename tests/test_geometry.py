"""Slice geometry from headers: planes of single- and multi-frame objects, stack facts."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from pipelines.geometry import Plane, analyse_stack, orientation_name, planes_of, stack_problems

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _planes(zs: list[float], orientation: tuple[float, ...] = AXIAL) -> list[Plane]:
    return [Plane(f"1.2.{i}", None, (0.0, 0.0, z), orientation, (1.0, 1.0)) for i, z in enumerate(zs)]  # type: ignore[arg-type]


def test_stack_is_sorted_along_the_normal_with_its_gaps_and_duplicates() -> None:
    zs = [5.0, 0.0, 2.5, 15.0, 17.5, 17.5]
    stack = analyse_stack([(0, 0, z) for z in zs], [AXIAL] * len(zs))
    assert stack.distances.tolist() == [0.0, 2.5, 5.0, 15.0, 17.5, 17.5]
    assert stack.order.tolist() == [1, 2, 0, 3, 4, 5]
    assert stack.step == 2.5
    assert stack.gaps == (2,) and stack.duplicates == (4,)
    assert stack.uneven.tolist() == [False, False, True, False, False]
    assert stack.expected_count == 8


def test_reversed_normal_and_single_slice() -> None:
    feet_first = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # normal -z
    stack = analyse_stack([(0, 0, z) for z in (0.0, 2.0, 4.0)], [feet_first] * 3)
    assert stack.distances.tolist() == [-4.0, -2.0, 0.0] and stack.step == 2.0
    one = analyse_stack([(0, 0, 0)], [AXIAL])
    assert one.step is None and one.expected_count == 1 and stack_problems(_planes([0.0])) == []


def test_problems_name_positions_along_z() -> None:
    (problem,) = stack_problems(_planes([0.0, 2.5, 5.0, 12.5, 15.0]))
    assert problem == (
        "the series has 5 of 7 slices: gap of 7.5 mm between z=5.0 and z=12.5 "
        "(slices are 2.50 mm apart elsewhere)"
    )


def test_orientation_names() -> None:
    assert orientation_name(AXIAL) == "axial"
    assert orientation_name((0, 1, 0, 0, 0, -1)) == "sagittal"
    assert orientation_name((1, 0, 0, 0, 0, -1)) == "coronal"
    assert orientation_name((1, 0, 0, 0, 0.7071, 0.7071)) == "oblique"


def test_planes_of_single_and_multi_frame_objects() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    assert planes_of(ds) == (
        [],
        "instance 1.2.3 has no valid ImagePositionPatient; it cannot be placed in the patient",
    )
    ds.ImagePositionPatient = [0, 0, 1]
    ds.ImageOrientationPatient = list(AXIAL)
    ds.PixelSpacing = [0.5, 0.5]
    (plane,), why = planes_of(ds)
    assert why is None and plane.position == (0.0, 0.0, 1.0) and plane.pixel_spacing == (0.5, 0.5)

    enhanced = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"), stop_before_pixels=True)
    planes, why = planes_of(enhanced)
    assert why is None and [p.frame_number for p in planes] == [1, 2]
    assert np.allclose(planes[1].orientation, planes[0].orientation)
