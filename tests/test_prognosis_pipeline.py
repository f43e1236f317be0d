"""The ``prognosis`` pipeline's parts that need no growth model run: which series it reads,
what it refuses and why, the 2 mm model grid, the horizons, and its two new writers.

The whole pipeline, with priors fetched from Orthanc and registered, runs in
``tests/integration/test_prognosis.py`` and the demo test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.lab.simulate_prognosis import PrognosisSpec, VisitStudy, write_prognosis_patient
from models.zoo import read_card, version_dir
from pipelines.base import (
    InputInstance,
    InputRefused,
    PipelineError,
    RegisteredPrior,
    RunEnvironment,
    StudyInput,
)
from pipelines.prognosis import (
    ModelGrid,
    PrognosisPipeline,
    _study_day,
    prior_visits,
    select_current,
    sequence_of,
)
from pipelines.provenance import PriorReference
from pipelines.uids import UidFactory
from pipelines.writers import ProbabilityMapWriter, TumourExtentWriter, kind_of
from tests.test_writers import PROVENANCE, simulated_ct


@dataclass(frozen=True)
class Patient:
    visits: tuple[VisitStudy, ...]


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Patient]:
    out = tmp_path_factory.mktemp("prognosis")
    _, visits = write_prognosis_patient(out, PrognosisSpec(visits=2, seed=3, size=64, slices=16))
    yield Patient(visits)


def _instances(visit: VisitStudy, keys: tuple[str, ...]) -> tuple[InputInstance, ...]:
    out = []
    for key in keys:
        for path in visit.series[key].files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out.append(
                InputInstance(
                    str(ds.SOPInstanceUID),
                    str(ds.SeriesInstanceUID),
                    str(ds.SOPClassUID),
                    str(ds.file_meta.TransferSyntaxUID),
                    path,
                    "",
                )
            )
    return tuple(out)


def _header(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        (_header(SeriesDescription="T1 SE POST-CONTRAST AXIAL"), "t1c"),
        (_header(SeriesDescription="t1_mprage_sag +C"), "t1c"),
        (_header(SeriesDescription="AX T1 GAD"), "t1c"),
        (_header(SeriesDescription="T1C"), "t1c"),
        (_header(SeriesDescription="ax_flair"), "flair"),
        (_header(SeriesDescription="T2 DARK-FLUID tra"), "flair"),
        (_header(SeriesDescription="", InversionTime="2500", RepetitionTime="9000"), "flair"),
        (_header(SeriesDescription="AX T1", ContrastBolusAgent="Gadovist", RepetitionTime="550"), "t1c"),
        (_header(SeriesDescription="AX T1", RepetitionTime="550"), None),
        (_header(SeriesDescription="T2 TSE"), None),
    ],
)
def test_series_are_read_as_t1c_flair_or_neither(header: Dataset, kind: str | None) -> None:
    assert sequence_of(header) == kind


def test_a_study_without_flair_is_refused_naming_what_it_has(patient: Patient) -> None:
    visit = patient.visits[-1]
    study = StudyInput(1, visit.study_uid, 1, _instances(visit, ("t1c",)))
    with pytest.raises(InputRefused) as refused:
        select_current(study, "prognosis-growth 1.0")
    (reason,) = refused.value.reasons
    assert reason.startswith("prognosis needs a FLAIR series in the current study")
    assert "SIMULATED T1 SE POST-CONTRAST AXIAL 3mm (t1c)" in reason


def test_the_rule_chosen_series_and_the_flair_are_selected(patient: Patient) -> None:
    visit = patient.visits[-1]
    study = StudyInput(1, visit.study_uid, 1, _instances(visit, ("t1c", "flair")))
    t1c, flair = select_current(study, "m")
    assert {i.series_uid for i in t1c} == {visit.series["t1c"].series_uid}
    assert {i.series_uid for i in flair} == {visit.series["flair"].series_uid}


def test_the_axial_t1c_is_taken_not_a_larger_coronal_reformat_of_it(patient: Patient, tmp_path: Path) -> None:
    """Scanners send reformats beside the acquisition: a coronal MPR of the post-contrast T1
    with more images must not be the series the growth model reads."""
    from pydicom.uid import generate_uid

    visit = patient.visits[-1]
    series_uid = generate_uid()
    reformat = []
    for k, path in enumerate(visit.series["t1c"].files * 2):  # twice the images
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.SeriesDescription = "T1 POST-CONTRAST COR MPR"
        out = tmp_path / f"mpr{k}.dcm"
        ds.save_as(out)
        reformat.append(
            InputInstance(
                str(ds.SOPInstanceUID),
                series_uid,
                str(ds.SOPClassUID),
                str(ds.file_meta.TransferSyntaxUID),
                out,
                "",
            )
        )
    study = StudyInput(1, visit.study_uid, 1, (*reformat, *_instances(visit, ("t1c", "flair"))))
    t1c, _flair = select_current(study, "m")
    assert {i.series_uid for i in t1c} == {visit.series["t1c"].series_uid}


def test_without_registered_priors_the_job_is_refused_before_the_model_runs(
    patient: Patient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = PrognosisPipeline.__new__(PrognosisPipeline)  # no model load: it must not be reached
    pipeline.label = "prognosis-growth 1.0"

    class Card:
        horizons_days = [90]
        input_domain: dict[str, object] = {}

    pipeline.model = type("M", (), {"meta": Card(), "resampling": None})()  # type: ignore[assignment]
    monkeypatch.setattr(PrognosisPipeline, "segment_visit", lambda *a: pytest.fail("segmented"))
    visit = patient.visits[-1]
    study = StudyInput(1, visit.study_uid, 1, _instances(visit, ("t1c", "flair")))
    with pytest.raises(InputRefused) as refused:
        pipeline.run(study, RunEnvironment(tmp_path))
    assert refused.value.reasons[0].startswith("prognosis needs at least one earlier visit")
    assert "registration: rigid" in refused.value.reasons[1]


def test_a_series_outside_the_cards_input_domain_is_refused(patient: Patient) -> None:
    from pipelines.prognosis import check_input_domain
    from pipelines.volume import load_series

    visit = patient.visits[-1]
    volume = load_series([pydicom.dcmread(p) for p in visit.series["t1c"].files])
    domain = {
        "body_parts": ["BRAIN"],
        "pixel_spacing_mm": [0.4, 2.5],
        "slice_spacing_mm": [0.8, 6.0],
        "min_slices": 24,
    }
    with pytest.raises(InputRefused) as refused:
        check_input_domain(volume, domain, "m", "the T1c series")
    assert refused.value.reasons == (
        "the T1c series: pixel spacing 3.75 x 3.75 mm is outside 0.4-2.5 mm",
        "the T1c series: 16 slices, fewer than 24 (the brain must be covered)",
    )
    check_input_domain(volume, {"body_parts": ["BRAIN"]}, "m", "the T1c series")
    with pytest.raises(InputRefused, match="Body Part Examined BRAIN is not one of KNEE"):
        check_input_domain(volume, {"body_parts": ["KNEE"]}, "m", "the T1c series")


def test_an_ai_output_among_the_priors_is_never_read_as_a_visit(patient: Patient) -> None:
    first, second = patient.visits
    shape = (16, 64, 64)
    t1c, flair = _registered(first, "t1c", shape), _registered(first, "flair", shape)
    t1c.header.SyntheticData = "YES"
    today = _study_day(pydicom.dcmread(second.series["t1c"].files[0], stop_before_pixels=True).StudyDate, "x")
    visits, notes = prior_visits([t1c, flair], today)
    assert visits == []
    assert "an AI output (synthetic), not an acquisition; not used" in notes[0]


def _registered(visit: VisitStudy, key: str, shape: tuple[int, ...]) -> RegisteredPrior:
    header = pydicom.dcmread(visit.series[key].files[0], stop_before_pixels=True)
    reference = PriorReference(visit.study_uid, visit.series[key].series_uid, (), visit.study_date)
    return RegisteredPrior(
        reference, header, np.eye(4), np.zeros(shape, np.float32), np.ones(shape, bool), "x"
    )


def test_a_prior_visit_needs_both_contrasts_and_an_earlier_date(patient: Patient) -> None:
    first, second = patient.visits
    shape = (16, 64, 64)
    later = pydicom.dcmread(second.series["t1c"].files[0], stop_before_pixels=True).StudyDate
    today = _study_day(later, "x")
    visits, notes = prior_visits([_registered(first, "t1c", shape)], today)
    assert visits == [] and "only t1c registered" in notes[0]
    both = [_registered(first, "t1c", shape), _registered(first, "flair", shape)]
    visits, notes = prior_visits(both, today)
    assert [v.study_uid for v in visits] == [first.study_uid] and notes == []
    same_day = [_registered(second, "t1c", shape), _registered(second, "flair", shape)]
    visits, notes = prior_visits(same_day, today)
    assert visits == [] and "not before the current study" in notes[0]


def test_the_model_grid_is_2_mm_and_maps_back() -> None:
    brain = np.zeros((20, 64, 64), bool)
    brain[4:16, 10:54, 12:50] = True
    spacing = (3.0, 1.875, 1.875)
    grid = ModelGrid.around(brain, spacing)
    lesion = np.zeros(brain.shape, np.float32)
    lesion[8:12, 25:40, 25:40] = 1.0
    small = grid.to_model(lesion)
    # the model grid spans the box at 2 mm
    assert small.shape == tuple(
        int(np.ceil((min(brain.shape[a], hi + m) - max(0, lo - m)) * spacing[a] / 2.0))
        for a, lo, hi, m in zip(range(3), (4, 10, 12), (16, 54, 50), (4, 7, 7), strict=True)
    )
    assert abs(small.sum() * 8.0 - lesion.sum() * np.prod(spacing)) / (lesion.sum() * np.prod(spacing)) < 0.1
    back = grid.to_current(small)
    assert back.shape == brain.shape
    inside = (back >= 0.5) == (lesion >= 0.5)
    assert inside.mean() > 0.99


def test_horizons_come_from_the_rule_or_the_card() -> None:
    pipeline = PrognosisPipeline.__new__(PrognosisPipeline)

    class Card:
        horizons_days = [90]

    pipeline.model = type("M", (), {"meta": Card(), "resampling": None})()  # type: ignore[assignment]

    def horizons(options: dict[str, object]) -> list[int]:
        return pipeline.horizons(StudyInput(1, "1.2", 1, (), options=options))

    assert horizons({}) == [90]
    assert horizons({"horizons_days": 180}) == [180]
    assert horizons({"horizons_days": [180, 60, 180]}) == [60, 180]
    with pytest.raises(PipelineError, match="whole days"):
        horizons({"horizons_days": "soon"})
    with pytest.raises(PipelineError, match="outside 1 .. 730"):
        horizons({"horizons_days": 0})


def test_probability_map_and_extent_seg_are_told_apart(tmp_path: Path) -> None:
    volume = simulated_ct(tmp_path / "ct")
    uids = UidFactory("2.25.", "prognosis-writers")
    p = np.zeros(volume.array.shape, np.float32)
    p[10:14, 20:30, 20:30] = 0.7
    pm = ProbabilityMapWriter(
        provenance=PROVENANCE, uids=uids, series_number=5, what="tumour at +90 days"
    ).write(volume, p)
    assert kind_of(pm) == "probability" and pm.SeriesDescription == "AI probability of tumour at +90 days"
    with pytest.raises(ValueError, match="0 .. 1"):
        ProbabilityMapWriter(provenance=PROVENANCE, uids=uids, series_number=6, what="x").write(volume, p * 2)
    seg = TumourExtentWriter(
        provenance=PROVENANCE, uids=uids, series_number=7, description="tumour extent predicted and current"
    ).write(volume, [("predicted", p >= 0.5), ("current", np.zeros(p.shape, bool))])
    assert kind_of(seg) == "extent"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["predicted", "current"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == [
        "108369006"
    ] * 2


def test_a_flair_on_another_grid_is_resampled_by_patient_coordinates(tmp_path: Path) -> None:
    """A FLAIR whose slices are not the T1c's comes onto the T1c grid by position (and back)."""
    from pipelines.registration import resample_onto
    from pipelines.volume import load_series

    study = simulated_ct(tmp_path / "ct")
    files = sorted(p for p in (tmp_path / "ct").rglob("*.dcm"))
    part = load_series([pydicom.dcmread(p) for p in files[5:20]])
    assert resample_onto(study, study.array, study) is not None
    on_part = resample_onto(study, study.array, part)
    assert on_part.shape == part.array.shape
    assert np.allclose(on_part, part.array, atol=0.5)  # the same slices, found by position
    back = resample_onto(part, part.array, study)
    z = [s.position[2] for s in study.slices]
    inside = [
        k
        for k, at in enumerate(z)
        if min(p.position[2] for p in part.slices) <= at <= max(p.position[2] for p in part.slices)
    ]
    assert len(inside) == 15
    assert np.allclose(back[inside], study.array[inside], atol=0.5)
    outside = [k for k in range(len(z)) if k not in inside]
    assert np.all(back[outside] == 0.0)  # outside the FLAIR's slab: nothing invented


def test_visits_whose_extents_do_not_overlap_are_caught() -> None:
    from datetime import date

    from pipelines.prognosis import MIN_VISIT_OVERLAP, check_consistency

    a = np.zeros((8, 32, 32), bool)
    a[3:6, 10:20, 10:20] = True
    grown = a.copy()
    grown[2:7, 8:22, 8:22] = True
    elsewhere = np.zeros_like(a)
    elsewhere[3:6, 22:30, 0:8] = True
    days = [date(2024, 1, 1), date(2024, 3, 1), date(2024, 5, 1)]
    assert check_consistency(list(zip(days, [a, grown, grown], strict=True))) == 1.0
    shrunk = np.zeros_like(a)
    shrunk[4:5, 12:16, 12:16] = True
    assert check_consistency(list(zip(days, [a, grown, shrunk], strict=True))) == 1.0  # treated: inside
    assert check_consistency(list(zip(days, [a, grown, elsewhere], strict=True))) < MIN_VISIT_OVERLAP
    assert (
        check_consistency(list(zip(days, [a, np.zeros_like(a), a], strict=True))) == 1.0
    )  # nothing to compare


def test_a_series_at_another_field_strength_is_refused_now_and_not_used_as_a_prior(patient: Patient) -> None:
    """The growth model's segmentation saw simulated 1.5 T images only (its card's
    ``field_strengths_t``): a current series at 3 T is refused, a 3 T prior is left out."""
    from pipelines.prognosis import check_input_domain
    from pipelines.volume import load_series

    first, second = patient.visits
    fields = read_card(version_dir("prognosis-growth"))["input_domain"]["field_strengths_t"]
    assert fields == [1.5]
    volume = load_series([pydicom.dcmread(p) for p in second.series["t1c"].files])
    check_input_domain(volume, {"field_strengths_t": fields}, "m", "the T1c series")
    for ds in volume.datasets:
        ds.MagneticFieldStrength = "3"
    with pytest.raises(InputRefused) as refused:
        check_input_domain(volume, {"field_strengths_t": fields}, "m", "the T1c series")
    assert refused.value.reasons == ("the T1c series: field strength 3 T: m was trained at 1.5 T (± 0.15 T)",)

    shape = (16, 64, 64)
    today = _study_day(volume.datasets[0].StudyDate, "x")
    both = [_registered(first, "t1c", shape), _registered(first, "flair", shape)]
    visits, notes = prior_visits(both, today, fields)
    assert [v.study_uid for v in visits] == [first.study_uid] and notes == []
    both[1].header.MagneticFieldStrength = "3"
    visits, notes = prior_visits(both, today, fields)
    assert visits == []
    assert "field strength 3 T: the model was trained at 1.5 T (± 0.15 T); not used" in notes[0]
