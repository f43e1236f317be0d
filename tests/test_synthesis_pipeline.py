"""The ``synthesis`` pipeline (issue 18): a SIMULATED brain MR study without FLAIR → a
synthetic FLAIR on the T1w's grid and Frame of Reference with its σ and hallucination maps,
SEG and SR; a study that has every expected contrast, lacks an input, is not a brain, is not
MR, or has its inputs on two frames is refused with the reason; contrasts are read by the
protocol's Series Description patterns, else by TR / TE / TI.

Studies: :func:`dicom_node.lab.simulate_synthesis.write_synthesis_study` (32 slices of 128²,
SIMULATED); the model: the newest shipped ``synthesis-t1w-t2w-to-flair``.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.delivery.tps import dciodvfy_errors
from dicom_node.lab.simulate import write_ct_series
from dicom_node.lab.simulate_synthesis import SynthesisSpec, SynthesisStudy, write_synthesis_study
from models.sim.phantom import PhantomSpec
from pipelines.base import InputRefused, PipelineError, RunEnvironment
from pipelines.provenance import provenance_of
from pipelines.registry import get_pipeline
from pipelines.stages import Context, StagedPipeline
from pipelines.synthesis import DEFAULT_PROTOCOL, contrast_of, protocol_of
from pipelines.writers import kind_of
from tests.conftest import study_of

SEED = 30001  # a held-out seed of the synthesis evaluation


def acquired_files(written: SynthesisStudy) -> list[Path]:
    return [f for s in written.acquired.values() for f in s.files]


@pytest.fixture(scope="module")
def pipeline() -> StagedPipeline:
    built = get_pipeline("synthesis", None)
    assert isinstance(built, StagedPipeline)
    return built


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> SynthesisStudy:
    _, study = write_synthesis_study(tmp_path_factory.mktemp("syn") / "study", SynthesisSpec(seed=SEED))
    return study


@pytest.fixture(scope="module")
def ran(
    pipeline: StagedPipeline, written: SynthesisStudy, tmp_path_factory: pytest.TempPathFactory
) -> Context:
    out = tmp_path_factory.mktemp("syn-out")
    return pipeline.execute(study_of(acquired_files(written)), RunEnvironment(workdir=out))


def outputs(ctx: Context) -> dict[str, list[Dataset]]:
    found: dict[str, list[Dataset]] = {}
    for o in ctx.outputs:
        ds = pydicom.dcmread(o.path)
        found.setdefault(kind_of(ds), []).append(ds)
    return found


def by_position(datasets: Sequence[Dataset]) -> np.ndarray:
    ordered = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array.astype(np.float64) for ds in ordered])


def test_a_study_without_flair_gets_a_synthetic_flair_with_maps_seg_and_sr(
    ran: Context, written: SynthesisStudy
) -> None:
    found = outputs(ran)
    t1w = written.acquired["t1w"]
    assert Counter({k: len(v) for k, v in found.items()}) == {
        "derived": len(t1w.files),
        "uncertainty": 1,
        "hallucination": 1,
        "suspect": 1,
        "report": 1,
        "overlay": 1,
    }
    assert ran.parameters["target"] == "flair"
    assert ran.parameters["input_series"] == {
        "t1w": t1w.series_uid,
        "t2w": written.acquired["t2w"].series_uid,
    }
    for figure in (
        "brain volume",
        "mean calibrated sigma in brain",
        "largest suspect region",
        "suspect fraction",
    ):
        value = ran.qc[figure][0]
        assert np.isfinite(value) and value >= 0, figure
    assert 1000 < ran.qc["brain volume"][0] < 2000  # mL: a head, not the field of view


def test_the_synthetic_flair_says_so_and_claims_no_acquisition(ran: Context, written: SynthesisStudy) -> None:
    t1w = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in written.acquired["t1w"].files)}
    for ds in outputs(ran)["derived"]:
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        assert ds.SeriesDescription == "AI SYNTHETIC FLAIR from T1w+T2w - not acquired"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.SyntheticData == "YES"
        # no sequence was run for these pixels: none of the T1w's acquisition is claimed
        assert ds.ScanningSequence == "RM" and ds.SequenceVariant == "NONE"
        for keyword in ("RepetitionTime", "EchoTime", "EchoTrainLength"):
            assert ds.get(keyword) in (None, ""), keyword
        assert "InversionTime" not in ds and "FlipAngle" not in ds and "SequenceName" not in ds
        assert "FLAIR synthesized" in ds.ImageComments
        # slice for slice on the T1w, same frame and study
        (source,) = ds.SourceImageSequence
        t1 = t1w[str(source.ReferencedSOPInstanceUID)]
        assert list(ds.ImagePositionPatient) == list(t1.ImagePositionPatient)
        assert ds.FrameOfReferenceUID == t1.FrameOfReferenceUID == written.frame_of_reference_uid
        assert ds.StudyInstanceUID == written.study_uid
        facts = provenance_of(ds)
        assert (facts["pipeline"], facts["model_name"], facts["synthetic"]) == (
            "synthesis",
            "synthesis-t1w-t2w-to-flair",
            True,
        )


def test_the_synthetic_flair_resembles_the_flair_kept_aside(ran: Context, written: SynthesisStudy) -> None:
    """White matter reads 1000; in the brain the synthetic image follows the true FLAIR
    (SIMULATED), far more than either input does."""
    syn = by_position(outputs(ran)["derived"])
    truth = by_position([pydicom.dcmread(f) for f in written.reference["flair"].files])
    t2w = by_position([pydicom.dcmread(f) for f in written.acquired["t2w"].files])
    brain = syn > 0
    assert brain.mean() > 0.1
    r_syn = np.corrcoef(syn[brain], truth[brain])[0, 1]
    r_t2w = np.corrcoef(t2w[brain], truth[brain])[0, 1]
    assert r_syn > 0.8 and r_syn > r_t2w + 0.5, (r_syn, r_t2w)
    assert 800 < float(np.median(syn[brain])) < 1200


def test_every_output_passes_dciodvfy(ran: Context) -> None:
    seen: Counter[str] = Counter()
    for o in ran.outputs:
        if seen[o.series_uid] >= 2:
            continue
        seen[o.series_uid] += 1
        assert dciodvfy_errors(Path(o.path)) == [], o.path


def refusal(pipeline: StagedPipeline, files: Sequence[Path], tmp_path: Path, **options: str) -> InputRefused:
    with pytest.raises(InputRefused) as refused:
        pipeline.execute(study_of(files, options=options), RunEnvironment(workdir=tmp_path))
    return refused.value


def test_a_study_with_the_flair_is_refused_nothing_to_synthesise(
    pipeline: StagedPipeline, written: SynthesisStudy, tmp_path: Path
) -> None:
    files = acquired_files(written) + list(written.reference["flair"].files)
    refused = refusal(pipeline, files, tmp_path)
    assert "has a FLAIR series" in " ".join(refused.reasons) and "nothing to synthesise" in refused.reasons[0]


def test_a_study_without_t2w_is_refused_naming_what_it_has(
    pipeline: StagedPipeline, written: SynthesisStudy, tmp_path: Path
) -> None:
    refused = refusal(pipeline, list(written.acquired["t1w"].files), tmp_path)
    (reason,) = refused.reasons
    assert "no T2w series" in reason and "SIMULATED T1W SE AXIAL" in reason and ": t1w" in reason


def rewritten(files: Sequence[Path], out: Path, **attributes: object) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in files:
        ds = pydicom.dcmread(f)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        path = out / f"{f.parent.name}-{f.name}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_a_knee_is_refused_by_the_input_domain(
    pipeline: StagedPipeline, written: SynthesisStudy, tmp_path: Path
) -> None:
    files = rewritten(acquired_files(written), tmp_path / "knee", BodyPartExamined="KNEE")
    refused = refusal(pipeline, files, tmp_path)
    assert any("Body Part Examined KNEE" in r for r in refused.reasons), refused.reasons


def test_a_ct_study_is_refused(pipeline: StagedPipeline, tmp_path: Path) -> None:
    ct = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=2, seed=3))
    refused = refusal(pipeline, list(ct.files), tmp_path)
    (reason,) = refused.reasons
    assert "no T1w or T2w series" in reason and "no MR series" in reason


def test_a_t2w_on_another_frame_is_refused(
    pipeline: StagedPipeline, written: SynthesisStudy, tmp_path: Path
) -> None:
    t2w = rewritten(
        written.acquired["t2w"].files, tmp_path / "t2w", FrameOfReferenceUID=pydicom.uid.generate_uid()
    )
    refused = refusal(pipeline, list(written.acquired["t1w"].files) + t2w, tmp_path)
    assert "another Frame of Reference" in refused.reasons[0]


def test_a_t1w_that_is_not_t1_weighted_is_refused(
    pipeline: StagedPipeline, written: SynthesisStudy, tmp_path: Path
) -> None:
    """A series described as T1 whose timing says otherwise is outside the card's domain."""
    t1w = rewritten(written.acquired["t1w"].files, tmp_path / "t1w", RepetitionTime="4000", EchoTime="100")
    refused = refusal(pipeline, t1w + list(written.acquired["t2w"].files), tmp_path)
    assert any("is not T1-weighted" in r for r in refused.reasons), refused.reasons


def test_the_protocol_names_the_series_and_timing_reads_the_rest(
    pipeline: StagedPipeline, written: SynthesisStudy, tmp_path: Path
) -> None:
    """Site descriptions ("AX SE 500", "AX TSE 4000") match no default pattern: a rule's
    protocol option names the T1w; the T2w is read by its TR / TE. A bad pattern is one line."""
    t1w = rewritten(written.acquired["t1w"].files, tmp_path / "a", SeriesDescription="AX SE 500")
    t2w = rewritten(written.acquired["t2w"].files, tmp_path / "b", SeriesDescription="AX TSE 4000")
    protocol = protocol_of({"protocol_t1w": "(?i)ax se 500"})
    assert contrast_of(pydicom.dcmread(t1w[0], stop_before_pixels=True), protocol) == "t1w"
    assert contrast_of(pydicom.dcmread(t2w[0], stop_before_pixels=True), protocol) == "t2w"
    with pytest.raises(PipelineError, match="options.protocol_t1w"):
        protocol_of({"protocol_t1w": "(unclosed"})
    out = tmp_path / "out"
    out.mkdir()
    ctx = pipeline.execute(
        study_of(t1w + t2w, options={"protocol_t1w": "(?i)ax se 500"}), RunEnvironment(workdir=out)
    )
    assert (
        ctx.parameters["input_series"]["t1w"]
        == pydicom.dcmread(t1w[0], stop_before_pixels=True).SeriesInstanceUID
    )


@pytest.mark.parametrize(
    ("description", "timing", "expected"),
    [
        ("T1W SE AXIAL", {}, "t1w"),
        ("t1_se_tra", {}, "t1w"),
        ("T1 SE POST GD AXIAL", {}, "t1c"),
        ("T1+C AX", {}, "t1c"),
        ("T2 TSE AXIAL", {}, "t2w"),
        ("T2* GRE", {}, None),
        ("AX T2 FLAIR", {}, "flair"),
        ("DARK FLUID TRA", {}, "flair"),
        ("", {"RepetitionTime": "9000", "EchoTime": "120", "InversionTime": "2500"}, "flair"),
        ("", {"RepetitionTime": "500", "EchoTime": "12"}, "t1w"),
        ("", {"RepetitionTime": "4000", "EchoTime": "100"}, "t2w"),
        ("", {"RepetitionTime": "3000", "EchoTime": "15"}, None),
        # an SWI and a DWI have T1w- and T2w-like TR and TE; a localizer's say nothing
        ("", {"RepetitionTime": "27", "EchoTime": "20", "ScanningSequence": "GR"}, None),
        ("", {"RepetitionTime": "5000", "EchoTime": "90", "ScanningSequence": ["SE", "EP"]}, None),
        (
            "",
            {"RepetitionTime": "500", "EchoTime": "12", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
            None,
        ),
        ("", {"RepetitionTime": "500", "EchoTime": "12", "ImageType": ["DERIVED", "SECONDARY", "MPR"]}, None),
        ("", {"RepetitionTime": "500", "EchoTime": "12", "ScanningSequence": "SE"}, "t1w"),
        ("T1 SE AX", {"ContrastBolusAgent": "Gadovist"}, "t1c"),  # the agent says more than the words
        ("SURVEY", {}, None),
    ],
)
def test_contrast_of_reads_descriptions_then_timing(
    description: str, timing: dict[str, str], expected: str | None
) -> None:
    ds = Dataset()
    ds.SeriesDescription = description
    for keyword, value in timing.items():
        setattr(ds, keyword, value)
    assert contrast_of(ds, protocol_of({})) == expected
    assert set(DEFAULT_PROTOCOL) == {"t1w", "t2w", "flair"}


def test_outputs_are_not_read_as_inputs(
    pipeline: StagedPipeline, ran: Context, written: SynthesisStudy, tmp_path: Path
) -> None:
    """The node's own synthetic FLAIR sent back with the study is no FLAIR: synthesis runs again
    on the acquired series (the node itself never opens a study version for its own outputs)."""
    files = acquired_files(written) + [
        Path(o.path) for o in ran.outputs if o.sop_class_uid == pydicom.uid.MRImageStorage
    ]
    out = tmp_path / "again"
    out.mkdir()
    ctx = pipeline.execute(study_of(files), RunEnvironment(workdir=out))
    assert ctx.parameters["input_series"]["t1w"] == written.acquired["t1w"].series_uid
    shutil.rmtree(out)
