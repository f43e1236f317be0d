"""``synthesis-t2w`` (issue 18): a SIMULATED brain MR study with T1w and FLAIR but no T2w →
a synthetic T2w from the T1w alone, on its grid and frame, with σ and hallucination maps,
SEG and SR; a study that has its T2w is refused.

Studies: :func:`dicom_node.lab.simulate_synthesis.write_synthesis_study` (32 slices of 128²,
SIMULATED, the T2w kept aside); the model: the newest shipped ``synthesis-t1w-to-t2w``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.delivery.tps import dciodvfy_errors
from dicom_node.lab.simulate_synthesis import SynthesisSpec, SynthesisStudy, write_synthesis_study
from pipelines.base import RunEnvironment
from pipelines.provenance import provenance_of
from pipelines.registry import get_pipeline
from pipelines.stages import Context, StagedPipeline
from pipelines.synthesis import T2W_FIRST_SERIES_NUMBER
from tests.test_synthesis_pipeline import acquired_files, by_position, outputs, refusal, study_of

SEED = 30003  # a held-out seed of the synthesis evaluation


@pytest.fixture(scope="module")
def pipeline() -> StagedPipeline:
    built = get_pipeline("synthesis-t2w", None)
    assert isinstance(built, StagedPipeline)
    return built


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> SynthesisStudy:
    spec = SynthesisSpec(seed=SEED, missing=("t2w",))
    _, study = write_synthesis_study(tmp_path_factory.mktemp("syn-t2w") / "study", spec)
    return study


@pytest.fixture(scope="module")
def ran(
    pipeline: StagedPipeline, written: SynthesisStudy, tmp_path_factory: pytest.TempPathFactory
) -> Context:
    out = tmp_path_factory.mktemp("syn-t2w-out")
    return pipeline.execute(study_of(acquired_files(written)), RunEnvironment(workdir=out))


def test_a_study_without_t2w_gets_a_synthetic_t2w_from_the_t1w(ran: Context, written: SynthesisStudy) -> None:
    found = outputs(ran)
    t1w = written.acquired["t1w"]
    assert set(written.acquired) == {"t1w", "flair"} and set(written.reference) == {"t2w"}
    assert Counter({k: len(v) for k, v in found.items()}) == {
        "derived": len(t1w.files),
        "uncertainty": 1,
        "hallucination": 1,
        "suspect": 1,
        "report": 1,
        "overlay": 1,
    }
    assert ran.parameters["target"] == "t2w"
    assert ran.parameters["input_series"] == {"t1w": t1w.series_uid}  # the FLAIR is not an input
    assert 1000 < ran.qc["brain volume"][0] < 2000
    for ds in found["derived"]:
        assert ds.SeriesDescription == "AI SYNTHETIC T2w from T1w - not acquired"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.SyntheticData == "YES"
        assert ds.ScanningSequence == "RM" and ds.get("EchoTime") in (None, "")
        assert ds.FrameOfReferenceUID == written.frame_of_reference_uid
        assert ds.SeriesNumber == T2W_FIRST_SERIES_NUMBER
        facts = provenance_of(ds)
        assert (facts["pipeline"], facts["model_name"], facts["synthetic"]) == (
            "synthesis-t2w",
            "synthesis-t1w-to-t2w",
            True,
        )


def test_the_synthetic_t2w_resembles_the_t2w_kept_aside(ran: Context, written: SynthesisStudy) -> None:
    """SIMULATED: in the brain the synthetic T2w follows the true T2w far more than the T1w does."""
    syn = by_position(outputs(ran)["derived"])
    truth = by_position([pydicom.dcmread(f) for f in written.reference["t2w"].files])
    t1w = by_position([pydicom.dcmread(f) for f in written.acquired["t1w"].files])
    brain = syn > 0
    r_syn = np.corrcoef(syn[brain], truth[brain])[0, 1]
    r_t1w = np.corrcoef(t1w[brain], truth[brain])[0, 1]
    assert r_syn > 0.8 and r_syn > r_t1w + 0.5, (r_syn, r_t1w)
    assert 800 < float(np.median(syn[brain][truth[brain] < np.percentile(truth[brain], 50)])) < 1300


def test_every_output_passes_dciodvfy(ran: Context) -> None:
    seen: Counter[str] = Counter()
    for o in ran.outputs:
        if seen[o.series_uid] < 2:
            seen[o.series_uid] += 1
            assert dciodvfy_errors(Path(o.path)) == [], o.path


def test_a_study_with_its_t2w_is_refused_nothing_to_synthesise(
    pipeline: StagedPipeline, written: SynthesisStudy, tmp_path: Path
) -> None:
    files = acquired_files(written) + list(written.reference["t2w"].files)
    refused = refusal(pipeline, files, tmp_path)
    assert "has a T2w series" in refused.reasons[0] and "nothing to synthesise" in refused.reasons[0]
