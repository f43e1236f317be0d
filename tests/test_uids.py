"""Output UIDs are valid, deterministic per job and inputs, and distinct per object."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from pipelines.uids import UidFactory, derive_uid, derived_frame_of_reference, job_key


def test_same_job_same_uids_and_different_objects_differ() -> None:
    key = job_key(7, ["1.2.3.4", "1.2.3.5"])
    assert key == job_key(7, ["1.2.3.5", "1.2.3.4"]), "input order does not matter"
    a, b = UidFactory("2.25.", key), UidFactory("2.25.", key)
    assert a.series("restored") == b.series("restored")
    assert a.instance("restored", 3) == b.instance("restored", 3)
    uids = {
        a.series("restored"),
        a.series("uncertainty"),
        a.instance("restored", 0),
        a.instance("restored", 1),
    }
    assert len(uids) == 4
    assert UidFactory("2.25.", job_key(8, ["1.2.3.4", "1.2.3.5"])).series("restored") != a.series("restored")
    assert UidFactory("2.25.", job_key(7, ["1.2.3.4"])).series("restored") != a.series("restored")


@pytest.mark.parametrize(
    "root", ["2.25.", "1.2.826.0.1.3680043.10.999.", "1.2.3", "1.2.840.113619.2.55.3.604688119.969.1"]
)
def test_uids_are_valid_and_fit(root: str) -> None:
    uid = derive_uid(root, "k", "series", "x")
    assert UID(uid).is_valid and len(uid) <= 64
    assert uid.startswith(root if root.endswith(".") else root + ".")


def test_bad_roots_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="not a valid UID prefix"):
        derive_uid("1.02.abc.", "x")
    with pytest.raises(ValueError, match="fewer than 10 digits"):
        derive_uid("1." + "2." * 28, "x")


def test_a_derived_frame_of_reference_depends_on_the_series_alone() -> None:
    frame = derived_frame_of_reference("1.2.826.0.1.3680043.10.999.", "1.2.3.4")
    assert UID(frame).is_valid and len(frame) <= 64 and frame.startswith("1.2.826.0.1.3680043.10.999.")
    # every job and pipeline on the series gets the same frame; another series another one
    assert frame == derived_frame_of_reference("1.2.826.0.1.3680043.10.999.", "1.2.3.4")
    assert frame != derived_frame_of_reference("1.2.826.0.1.3680043.10.999.", "1.2.3.5")
