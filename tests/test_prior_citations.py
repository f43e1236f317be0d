"""Issue 16 item 5: every output of a job that used priors names them.

Images, Parametric Maps, the SEG, the overlay and the Spatial Registration object cite
the prior series in the Common Instance Reference module (Studies Containing Other
Referenced Instances Sequence; Referenced Series Sequence for a prior of the same study);
the summary SR in Pertinent Other Evidence Sequence. What an object cites already stays,
and nothing is cited twice. The runner hands the job's priors to the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from pipelines.base import PipelineResult, RunEnvironment, StudyInput
from pipelines.provenance import PriorReference
from pipelines.writers import common as W
from tests.test_writers import (
    PROVENANCE,
    STALE_SYNTHETIC_DATA_ERROR,
    dciodvfy_errors,
    require_dciodvfy,
    simulated_ct,
    write_case,
)

PRIOR_A = PriorReference(
    study_uid="1.2.826.0.1.3680043.10.999.7.1",
    series_uid="1.2.826.0.1.3680043.10.999.7.1.1",
    instances=tuple((MRImageStorage, f"1.2.826.0.1.3680043.10.999.7.1.1.{n}") for n in (1, 2, 3)),
    study_date="20230310",
    archive="pacs",
)
PRIOR_B = PriorReference(
    study_uid="1.2.826.0.1.3680043.10.999.7.2",
    series_uid="1.2.826.0.1.3680043.10.999.7.2.1",
    instances=tuple((MRImageStorage, f"1.2.826.0.1.3680043.10.999.7.2.1.{n}") for n in (1, 2)),
    study_date="20220310",
    archive="pacs",
)


def _cited(ds: Dataset) -> dict[str, dict[str, set[str]]]:
    """study UID → series UID → SOP Instance UIDs the object cites (other studies only)."""
    report = ds.Modality == "SR"
    key = "PertinentOtherEvidenceSequence" if report else "StudiesContainingOtherReferencedInstancesSequence"
    instances = "ReferencedSOPSequence" if report else "ReferencedInstanceSequence"
    out: dict[str, dict[str, set[str]]] = {}
    for study in ds.get(key, []):
        assert str(study.StudyInstanceUID) not in out, "a study cited twice"
        by_series = out.setdefault(str(study.StudyInstanceUID), {})
        for series in study.ReferencedSeriesSequence:
            assert str(series.SeriesInstanceUID) not in by_series, "a series cited twice"
            refs = [str(r.ReferencedSOPInstanceUID) for r in series.get(instances, [])]
            assert len(refs) == len(set(refs)), "an instance cited twice"
            by_series[str(series.SeriesInstanceUID)] = set(refs)
    return out


def _expected(*priors: PriorReference) -> dict[str, dict[str, set[str]]]:
    return {p.study_uid: {p.series_uid: {uid for _c, uid in p.instances}} for p in priors}


@pytest.fixture(scope="module")
def cited_case(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    from dataclasses import replace

    import tests.test_writers as tw

    volume = simulated_ct(tmp_path_factory.mktemp("prior-cite-source"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tw, "PROVENANCE", replace(PROVENANCE, priors=(PRIOR_A, PRIOR_B)))
        case = write_case("with-priors", volume, tmp_path_factory.mktemp("prior-cite-out"))
    yield case.paths


def test_every_output_object_cites_the_priors_once(cited_case: list[Path]) -> None:
    modalities: set[str] = set()
    for path in cited_case:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        modalities.add(str(ds.Modality))
        assert _cited(ds) == _expected(PRIOR_A, PRIOR_B), (path.name, ds.Modality)
        # what the object cites of its own study stays (the source series, its siblings)
        if ds.Modality != "SR":
            own = {str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])}
            assert PRIOR_A.series_uid not in own and PRIOR_B.series_uid not in own
        else:
            current = ds.CurrentRequestedProcedureEvidenceSequence
            assert [str(s.StudyInstanceUID) for s in current] == [str(ds.StudyInstanceUID)]
    # the derived series, both Parametric Maps, the SEG, the overlay and the report
    assert {"CT", "SR", "SEG"} <= modalities
    assert len(cited_case) > 3


def test_objects_citing_priors_pass_dciodvfy(cited_case: list[Path]) -> None:
    require_dciodvfy()
    problems = {}
    for path in cited_case:
        errors = dciodvfy_errors(path)
        if pydicom.dcmread(path, stop_before_pixels=True).Modality in ("CT", "MR"):
            errors = [e for e in errors if not e.startswith(STALE_SYNTHETIC_DATA_ERROR)]
        if errors:
            problems[path.name] = errors
    assert not problems, problems


def test_citing_merges_with_what_the_object_already_references() -> None:
    ds = Dataset()
    ds.Modality = "REG"
    ds.StudyInstanceUID = "1.2.3"
    own = Dataset()
    own.SeriesInstanceUID = "1.2.3.1"
    own.ReferencedInstanceSequence = [W._reference_item(CTImageStorage, "1.2.3.1.1")]
    ds.ReferencedSeriesSequence = [own]
    other = Dataset()
    other.StudyInstanceUID = PRIOR_A.study_uid
    other.ReferencedSeriesSequence = W._referenced_series(
        [(PRIOR_A.series_uid, c, u) for c, u in PRIOR_A.instances[:2]]
    )
    ds.StudiesContainingOtherReferencedInstancesSequence = [other]
    same_study = PriorReference("1.2.3", "1.2.3.9", ((MRImageStorage, "1.2.3.9.1"),))
    W._cite_priors(ds, [PRIOR_A, PRIOR_B, same_study])
    assert _cited(ds) == _expected(PRIOR_A, PRIOR_B)  # the third instance of A added, not A twice
    own_series = {
        str(s.SeriesInstanceUID): [str(r.ReferencedSOPInstanceUID) for r in s.ReferencedInstanceSequence]
        for s in ds.ReferencedSeriesSequence
    }
    assert own_series == {"1.2.3.1": ["1.2.3.1.1"], "1.2.3.9": ["1.2.3.9.1"]}
    # citing again changes nothing
    before = ds.to_json_dict()
    W._cite_priors(ds, [PRIOR_A, PRIOR_B, same_study])
    assert ds.to_json_dict() == before


def test_no_priors_leaves_an_object_alone() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.3"
    W._cite_priors(ds, [])
    assert "StudiesContainingOtherReferencedInstancesSequence" not in ds
    assert "ReferencedSeriesSequence" not in ds


def test_the_runner_hands_the_job_priors_to_the_pipeline(store_node: Any) -> None:
    """The job's fetched priors reach the pipeline as ``env.priors`` (study, series, every
    instance with its SOP Class), so its writers can cite them."""
    from dicom_node.config import NodeConfig
    from dicom_node.delivery.profiles import DestinationProfiles
    from dicom_node.jobs.prior_fetch import PriorFetcher
    from dicom_node.jobs.runner import JobRunner
    from tests.test_priors import ARCHIVE, OneArchive, StoringArchive, _job_for_current_study

    rt, store = store_node
    job_id, _ = _job_for_current_study(rt, store)
    assert PriorFetcher(rt.db, rt.audit, OneArchive(StoringArchive(store, dict(ARCHIVE)))).fetch(job_id)
    config = NodeConfig.model_validate(
        {"destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}}}
    )
    runner = JobRunner(config, rt.paths, rt.db, rt.audit, "test-worker", DestinationProfiles(config))
    seen: list[RunEnvironment] = []
    forward = runner.pipeline("forward")

    class Watching:
        name, version = forward.name, forward.version

        def run(self, study: StudyInput, env: RunEnvironment) -> PipelineResult:
            seen.append(env)
            return forward.run(study, env)

    runner._pipelines["forward"] = Watching()  # type: ignore[assignment]
    claimed = runner.claim()
    assert claimed is not None and claimed.job_id == job_id
    runner.run(claimed)
    (env,) = seen
    assert [(p.study_uid, p.series_uid, p.archive) for p in env.priors] == [
        ("1.2.3.2", "1.2.3.2.1", "pacs"),
        ("1.2.3.3", "1.2.3.3.1", "pacs"),
    ]
    for prior in env.priors:
        assert len(prior.instances) == 2
        assert all(c == MRImageStorage and u for c, u in prior.instances)
