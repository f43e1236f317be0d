"""Loading a series without a Frame of Reference UID (legacy files): it loads, says it has
none, and is put on a frame only when the caller names one; a series whose instances
disagree on their frame is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.lab.simulate import write_ct_series
from models.sim.phantom import PhantomSpec
from pipelines.volume import SeriesError, load_series, on_frame_of_reference


def legacy_ct() -> pydicom.Dataset:
    """pydicom-data's 693_UNCI.dcm: a real 512×512 head CT slice with no Frame of Reference UID."""
    path = get_testdata_file("693_UNCI.dcm")
    assert isinstance(path, str), "pydicom-data is not installed (pip install -e '.[test]')"
    return pydicom.dcmread(path)


def test_a_series_without_a_frame_of_reference_loads_and_says_so() -> None:
    volume = load_series([legacy_ct()])
    assert volume.frame_of_reference_uid == ""
    assert volume.array.shape == (1, 512, 512) and volume.units == "HU"


def test_placing_on_a_frame_names_it_everywhere_and_leaves_the_sources_alone() -> None:
    source = legacy_ct()
    volume = load_series([source])
    placed = on_frame_of_reference(volume, "1.2.826.0.1.3680043.10.999.7")
    assert placed.frame_of_reference_uid == "1.2.826.0.1.3680043.10.999.7"
    assert [str(ds.FrameOfReferenceUID) for ds in placed.datasets] == ["1.2.826.0.1.3680043.10.999.7"]
    # the data sets the volume was loaded from (and the files) keep having none
    assert "FrameOfReferenceUID" not in source and "FrameOfReferenceUID" not in volume.datasets[0]
    # geometry and pixels are the volume's own; the encoded pixel data is shared, not copied
    assert placed.slices == volume.slices and placed.array is volume.array
    assert placed.datasets[0].PixelData is source.PixelData
    with pytest.raises(ValueError, match="never replaced"):
        on_frame_of_reference(placed, "1.2.826.0.1.3680043.10.999.8")


@pytest.mark.parametrize("damage", ["another frame", "no frame"])
def test_instances_that_disagree_on_their_frame_are_refused(damage: str, tmp_path: Path) -> None:
    write_ct_series(tmp_path, PhantomSpec(rows=32, columns=32, slices=3, seed=5))
    datasets = [pydicom.dcmread(f) for f in sorted(tmp_path.iterdir())]
    if damage == "another frame":
        datasets[1].FrameOfReferenceUID = "1.2.826.0.1.3680043.10.999.9"
        expected = "instances on 2 frames of reference"
    else:
        del datasets[1].FrameOfReferenceUID
        expected = "1 of 3 instances have no Frame of Reference UID and the others have"
    with pytest.raises(SeriesError, match=expected):
        load_series(datasets)


def test_a_series_with_its_own_frame_keeps_it() -> None:
    source = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    volume = load_series([source])
    assert volume.frame_of_reference_uid == str(source.FrameOfReferenceUID)
    assert np.isfinite(volume.array).all()
