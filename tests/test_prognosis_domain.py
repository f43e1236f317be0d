"""The ``prognosis`` pipeline's input domain by the tags: the growth model and its
brain-tumour segmentation saw only the simulator's images (``models.sim.prognosis`` written
by ``dicom_node.lab.simulate_prognosis``): a T1 post-contrast spin echo (Scanning Sequence
SE, TR 500 / TE 12 ms) and a FLAIR inversion recovery (SE\\IR, TR 9000 / TE 120 / TI 1700 ms),
one echo per slice. A current T1c or FLAIR acquired otherwise (a gradient-echo MPRAGE or
VIBE, an echo-planar FLAIR, a series that does not say, several echoes) is refused, naming
the series and what the model was trained on; such a prior is left out, with a note.

SIMULATED studies (128 px, 16 slices: inside the shipped card's geometry) are the in-domain
inputs; the out-of-domain ones are copies with their headers changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.lab.simulate_prognosis import PrognosisSpec, VisitStudy, write_prognosis_patient
from models.inplane_grid import Resampling
from models.zoo import read_card, version_dir, versions
from pipelines.base import (
    InputInstance,
    InputRefused,
    PipelineError,
    RegisteredPrior,
    RunEnvironment,
    StudyInput,
)
from pipelines.prognosis import (
    PrognosisPipeline,
    _study_day,
    check_input_headers,
    prior_visits,
    scanning_by_role,
)
from pipelines.provenance import PriorReference

MODEL = "prognosis-growth"
T1C_LABEL = "#1 'SIMULATED T1 SE POST-CONTRAST AXIAL 3mm'"
FLAIR_LABEL = "#2 'SIMULATED FLAIR AXIAL 3mm'"


@pytest.fixture(scope="module")
def card() -> dict[str, Any]:
    """The newest shipped card (the one a rule without a pin runs)."""
    return read_card(version_dir(MODEL))


@pytest.fixture(scope="module")
def label(card: dict[str, Any]) -> str:
    return f"{card['name']} {card['version']}"


@pytest.fixture(scope="module")
def visits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VisitStudy, ...]]:
    out = tmp_path_factory.mktemp("prognosis-domain")
    _, written = write_prognosis_patient(out, PrognosisSpec(visits=2, seed=3, size=128, slices=16))
    yield written


def _copies(paths: tuple[Path, ...], folder: Path, **tags: object) -> list[Path]:
    """Copies of ``paths`` in ``folder`` with ``tags`` set (None: removed)."""
    folder.mkdir(parents=True)
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        out.append(folder / path.name)
        ds.save_as(out[-1])
    return out


def _headers(paths: list[Path] | tuple[Path, ...]) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _study(paths: list[Path]) -> StudyInput:
    instances = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        instances.append(
            InputInstance(
                str(ds.SOPInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPClassUID),
                str(ds.file_meta.TransferSyntaxUID),
                path,
                "",
            )
        )
    return StudyInput(1, str(ds.StudyInstanceUID), 1, tuple(instances))


class ReachedSegmentation(Exception):
    """The run got past every input check to the first model step."""


def _pipeline(card: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> PrognosisPipeline:
    """The pipeline with the shipped card's input domain (and its ``resample``) and no model:
    segmenting a visit raises :class:`ReachedSegmentation`."""
    pipeline = PrognosisPipeline.__new__(PrognosisPipeline)
    pipeline.label = f"{card['name']} {card['version']}"
    meta = SimpleNamespace(horizons_days=[90], input_domain=card["input_domain"])
    resampling = Resampling.from_card(card.get("resample") or {}, pipeline.label)
    pipeline.model = SimpleNamespace(meta=meta, resampling=resampling)  # type: ignore[assignment]

    def reached(*_: object) -> None:
        raise ReachedSegmentation

    monkeypatch.setattr(PrognosisPipeline, "segment_visit", reached)
    return pipeline


def _letters(ds: Dataset) -> tuple[str, ...]:
    value = ds.ScanningSequence
    return (value,) if isinstance(value, str) else tuple(value)


def _registered(header: Dataset) -> RegisteredPrior:
    """A prior series (its first header) as the node hands it over, registered (no pixels needed)."""
    reference = PriorReference(
        str(header.StudyInstanceUID), str(header.SeriesInstanceUID), (), header.StudyDate
    )
    shape = (16, 128, 128)
    return RegisteredPrior(
        reference, header, np.eye(4), np.zeros(shape, np.float32), np.ones(shape, bool), "x"
    )


def _priors(visit: VisitStudy) -> tuple[RegisteredPrior, ...]:
    return tuple(_registered(_headers(visit.series[k].files[:1])[0]) for k in ("t1c", "flair"))


# -- the cards ----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", versions(MODEL))
def test_each_prognosis_card_declares_the_scanning_sequence_each_role_was_trained_on(
    version: str, visits: tuple[VisitStudy, ...]
) -> None:
    """What the simulator writes is what the cards declare: T1c SE, FLAIR SE\\IR."""
    domain = read_card(version_dir(MODEL, version))["input_domain"]
    assert domain["scanning_sequences"] == {"t1c": ["SE"], "flair": ["SE", "IR"]}
    written = {role: {_letters(h) for h in _headers(s.files)} for role, s in visits[-1].series.items()}
    assert written == {"t1c": {("SE",)}, "flair": {("SE", "IR")}}
    assert scanning_by_role(domain, version) == {"t1c": ("SE",), "flair": ("SE", "IR")}


def test_a_malformed_card_is_one_line_naming_the_key() -> None:
    assert scanning_by_role({"scanning_sequences": ["se"]}, "m") == {"t1c": ("SE",), "flair": ("SE",)}
    assert scanning_by_role({}, "m") == {}
    for value, problem in (
        ({"t1": ["SE"]}, "unknown series role ['t1'] (known: t1c, flair)"),
        ({"t1c": ["SPIN"]}, "unknown Scanning Sequence ['SPIN']"),
        ("SE", "expected"),
    ):
        with pytest.raises(PipelineError) as caught:
            scanning_by_role({"scanning_sequences": value}, "prognosis-growth 9")
        message = str(caught.value)
        assert message.startswith(
            "prognosis: model card prognosis-growth 9: input_domain.scanning_sequences: "
        )
        assert problem in message and "\n" not in message


# -- the current study ----------------------------------------------------------------------------
def test_a_spin_echo_t1c_and_an_inversion_recovery_flair_pass_and_run(
    card: dict[str, Any],
    label: str,
    visits: tuple[VisitStudy, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, current = visits
    check_input_headers(_headers(current.series["t1c"].files), card["input_domain"], label, "t1c")
    check_input_headers(_headers(current.series["flair"].files), card["input_domain"], label, "flair")
    pipeline = _pipeline(card, monkeypatch)
    study = _study([*current.series["t1c"].files, *current.series["flair"].files])
    priors = _priors(first)
    with pytest.raises(ReachedSegmentation):
        pipeline.run(study, RunEnvironment(tmp_path, registered_priors=priors))


@pytest.mark.parametrize(
    ("tags", "seen"),
    [
        ({"ScanningSequence": "GR", "SequenceVariant": ["SP", "SS"]}, "GR (gradient echo)"),  # a VIBE
        (
            {"ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SP", "MP"], "InversionTime": "900"},
            "GR\\IR (gradient echo, inversion recovery)",  # an MPRAGE
        ),
    ],
)
def test_a_gradient_echo_t1c_is_refused_naming_the_series_and_spin_echo(
    tags: dict[str, object],
    seen: str,
    card: dict[str, Any],
    label: str,
    visits: tuple[VisitStudy, ...],
    tmp_path: Path,
) -> None:
    paths = _copies(visits[-1].series["t1c"].files, tmp_path / "t1c", **tags)
    with pytest.raises(InputRefused) as refused:
        check_input_headers(_headers(paths), card["input_domain"], label, "t1c")
    assert refused.value.reasons == (
        f"the T1c series: scanning sequence {seen}: {label} was trained on SE (spin echo) images only, "
        "and the contrast differs",
    )
    assert refused.value.series == T1C_LABEL
    assert refused.value.series_uid == visits[-1].series["t1c"].series_uid
    assert T1C_LABEL in str(refused.value)


def test_the_pipeline_refuses_a_gradient_echo_t1c_before_loading_it(
    card: dict[str, Any],
    label: str,
    visits: tuple[VisitStudy, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused (the rule's fallback runs), not failed, and before a pixel is decoded."""
    first, current = visits
    t1c = _copies(current.series["t1c"].files, tmp_path / "t1c", ScanningSequence="GR")
    pipeline = _pipeline(card, monkeypatch)
    monkeypatch.setattr("pipelines.prognosis._load", lambda *a: pytest.fail("loaded"))
    priors = _priors(first)
    with pytest.raises(InputRefused) as refused:
        pipeline.run(
            _study([*t1c, *current.series["flair"].files]),
            RunEnvironment(tmp_path / "work", registered_priors=priors),
        )
    assert refused.value.series == T1C_LABEL
    (reason,) = refused.value.reasons
    assert reason.startswith("the T1c series: scanning sequence GR (gradient echo): ")
    assert "trained on SE (spin echo) images only" in reason


def test_an_echo_planar_flair_is_refused(
    card: dict[str, Any], label: str, visits: tuple[VisitStudy, ...], tmp_path: Path
) -> None:
    paths = _copies(visits[-1].series["flair"].files, tmp_path / "flair", ScanningSequence=["EP", "IR"])
    with pytest.raises(InputRefused) as refused:
        check_input_headers(_headers(paths), card["input_domain"], label, "flair")
    assert refused.value.reasons == (
        f"the FLAIR series: scanning sequence EP\\IR (echo planar, inversion recovery): {label} was "
        "trained on SE\\IR (spin echo, inversion recovery) images only, and the contrast differs",
    )
    assert refused.value.series == FLAIR_LABEL


def test_a_flair_that_says_spin_echo_alone_is_refused_whatever_its_inversion_time(
    card: dict[str, Any], label: str, visits: tuple[VisitStudy, ...], tmp_path: Path
) -> None:
    """The FLAIR role is found by its inversion time, but the card's SE\\IR is the whole
    combination its training images had: a header that says spin echo alone is not one of them."""
    paths = _copies(visits[-1].series["flair"].files, tmp_path / "flair", ScanningSequence="SE")
    headers = _headers(paths)
    assert float(headers[0].InversionTime) >= 1500  # still read as the FLAIR
    with pytest.raises(InputRefused) as refused:
        check_input_headers(headers, card["input_domain"], label, "flair")
    assert refused.value.reasons == (
        f"the FLAIR series: scanning sequence SE (spin echo) without IR (inversion recovery): {label} was "
        "trained on SE\\IR (spin echo, inversion recovery) images only, and the contrast differs",
    )


def test_a_prior_flair_that_says_spin_echo_alone_is_left_out(
    card: dict[str, Any], visits: tuple[VisitStudy, ...]
) -> None:
    first, current = visits
    priors = list(_priors(first))
    flair = next(p for p in priors if float(p.header.get("InversionTime", 0) or 0) >= 1500)
    flair.header.ScanningSequence = "SE"
    today = _study_day(current.study_date, "x")
    scanning = scanning_by_role(card["input_domain"], "m")
    used, notes = prior_visits(tuple(priors), today, card["input_domain"]["field_strengths_t"], scanning)
    assert used == []
    assert notes[0] == (
        f"prior series {flair.reference.series_uid}: scanning sequence SE (spin echo) without IR "
        "(inversion recovery): the model was trained on SE\\IR (spin echo, inversion recovery) images "
        "only, and the contrast differs; not used"
    )


@pytest.mark.parametrize(
    ("role", "series", "trained"),
    [("t1c", T1C_LABEL, "SE (spin echo)"), ("flair", FLAIR_LABEL, "SE\\IR (spin echo, inversion recovery)")],
)
def test_a_series_that_does_not_say_its_scanning_sequence_is_refused(
    role: str,
    series: str,
    trained: str,
    card: dict[str, Any],
    label: str,
    visits: tuple[VisitStudy, ...],
    tmp_path: Path,
) -> None:
    paths = _copies(visits[-1].series[role].files, tmp_path / role, ScanningSequence=None)
    with pytest.raises(InputRefused) as refused:
        check_input_headers(_headers(paths), card["input_domain"], label, role)
    what = "T1c" if role == "t1c" else "FLAIR"
    assert refused.value.reasons == (
        f"the {what} series: scanning sequence not given (Scanning Sequence, 0018,0020): {label} was "
        f"trained on {trained} images only",
    )
    assert refused.value.series == series


def test_a_multi_echo_t1c_is_refused_naming_its_echoes_not_failed(
    card: dict[str, Any],
    label: str,
    visits: tuple[VisitStudy, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two echoes at the same positions: before, the job failed on loading the series."""
    first, current = visits
    folder = tmp_path / "t1c"
    folder.mkdir()
    t1c = []
    for k, path in enumerate(current.series["t1c"].files):
        for echo in (1, 2):
            ds = pydicom.dcmread(path)
            ds.EchoNumbers = echo
            if echo == 2:
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            t1c.append(folder / f"{k}-{echo}.dcm")
            ds.save_as(t1c[-1])
    pipeline = _pipeline(card, monkeypatch)
    priors = _priors(first)
    with pytest.raises(InputRefused) as refused:
        pipeline.run(
            _study([*t1c, *current.series["flair"].files]),
            RunEnvironment(tmp_path / "work", registered_priors=priors),
        )
    assert refused.value.reasons == (
        f"the T1c series: echoes: the series holds echoes 1, 2 at the same slice positions; {label} takes "
        "one image per slice (have the scanner send each echo as its own series, or select one)",
    )
    assert refused.value.series == T1C_LABEL


# -- the priors ---------------------------------------------------------------------------------
def test_a_gradient_echo_prior_is_left_out_not_refused(
    card: dict[str, Any],
    visits: tuple[VisitStudy, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a prior at another field strength: not used, a note says why, the run goes on."""
    first, current = visits
    earlier: list[Dataset] = []  # a visit before the first, its T1c a gradient echo
    for key in ("t1c", "flair"):
        ds = _headers(first.series[key].files[:1])[0]
        ds.StudyInstanceUID = earlier[0].StudyInstanceUID if earlier else generate_uid()
        ds.SeriesInstanceUID, ds.StudyDate = generate_uid(), "20000101"
        earlier.append(ds)
    earlier[0].ScanningSequence = "GR"
    priors = (*_priors(first), *(_registered(ds) for ds in earlier))
    today = _study_day(current.study_date, "x")
    scanning = scanning_by_role(card["input_domain"], "m")
    used, notes = prior_visits(priors, today, card["input_domain"]["field_strengths_t"], scanning)
    assert [v.study_uid for v in used] == [first.study_uid]
    assert notes == [
        f"prior series {earlier[0].SeriesInstanceUID}: scanning sequence GR (gradient echo): the model "
        "was trained on SE (spin echo) images only, and the contrast differs; not used",
        f"prior study {earlier[0].StudyInstanceUID}: only flair registered, the visit is not used",
    ]
    pipeline = _pipeline(card, monkeypatch)
    study = _study([*current.series["t1c"].files, *current.series["flair"].files])
    with pytest.raises(ReachedSegmentation):  # the current study is not refused for it
        pipeline.run(study, RunEnvironment(tmp_path, registered_priors=priors))
