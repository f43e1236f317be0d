"""The registration step of a job with priors (dicom_node/jobs/prior_registration.py).

SIMULATED data only (tests/test_registration.py's pairs): the current head MR and a prior
of the same head moved by a known rigid transform, each written as files on its own Frame
of Reference; a torso CT as a prior that cannot be registered to a head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SpatialRegistrationStorage, generate_uid

from dicom_node.delivery.profiles import NOT_FOR_TPS
from dicom_node.jobs.prior_registration import register_priors
from pipelines.base import InputInstance, OutputInstance, PipelineResult, RunEnvironment, StudyInput
from pipelines.registration import RegistrationRefused
from pipelines.volume import Volume
from policies.model import Priors
from tests.test_registration import (
    SLICES,
    Study,
    clean_head,
    ct_series,
    dciodvfy,
    make_case,
    matrix_for,
    mr_series,
    rician,
    transform_error,
)


def _files(volume: Volume, folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for n, ds in enumerate(volume.datasets):
        path = folder / f"{n:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _study(volume: Volume, paths: list[Path]) -> StudyInput:
    first = volume.datasets[0]
    return StudyInput(
        job_id=7,
        study_uid=str(first.StudyInstanceUID),
        study_version=1,
        instances=tuple(
            InputInstance(
                sop_uid=str(ds.SOPInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=p,
                sha256="0" * 64,
            )
            for ds, p in zip(volume.datasets, paths, strict=True)
        ),
    )


def _forwarded(study: StudyInput) -> PipelineResult:
    """What ``forward`` returns: the input instances as its outputs."""
    return PipelineResult(
        outputs=tuple(
            OutputInstance(i.sop_uid, i.series_uid, i.sop_class_uid, i.transfer_syntax_uid, i.path)
            for i in study.instances
        )
    )


def _priors(**kw: object) -> Priors:
    return Priors.model_validate({"archive": "pacs", "modality": "MR", **kw})


def test_a_rigid_prior_is_registered_and_its_registration_object_added(tmp_path: Path) -> None:
    case = make_case(3)
    current = _study(case.current, _files(case.current, tmp_path / "current"))
    prior_uid = str(case.prior.datasets[0].SeriesInstanceUID)
    files = {prior_uid: _files(case.prior, tmp_path / "prior")}
    result = _forwarded(current)
    env = RunEnvironment(workdir=tmp_path / "job", uid_root="2.25.", node_version="0.9", node_ae_title="NODE")
    done = register_priors(current, _priors(registration="rigid"), files, result, env)

    added = done.result.outputs[len(result.outputs) :]
    assert done.result.outputs[: len(result.outputs)] == result.outputs
    assert [o.sop_class_uid for o in added] == [SpatialRegistrationStorage]
    assert done.result.validation_errors == ()
    ds = pydicom.dcmread(added[0].path)
    assert ds.StudyInstanceUID == current.study_uid
    errors, _ = dciodvfy(added[0].path)
    assert errors == []
    # The object's matrix, and the one in the provenance entry, are the known transform.
    matrix, kind = matrix_for(ds, str(case.prior.datasets[0].FrameOfReferenceUID))
    assert kind == "RIGID"
    displacement, rotation = transform_error(matrix, case.truth, case.current)
    assert displacement < 1.0 and rotation < 0.5, (displacement, rotation)
    entry = done.entries[prior_uid]
    recorded = np.array(entry["matrix"]).reshape(4, 4)
    np.testing.assert_allclose(recorded, matrix, atol=1e-4)
    assert entry["registration_sop_uid"] == added[0].sop_uid
    assert entry["mode"] == "rigid" and "SimpleITK" in entry["method"]
    assert entry["quality_ok"] is True and entry["registration_dice"] >= 0.85
    assert done.result.qc[added[0].series_uid]["registration_dice"] == entry["registration_dice"]


def _torso_prior(tmp_path: Path) -> tuple[StudyInput, dict[str, list[Path]]]:
    from models.sim.phantom import PhantomSpec, torso_volume

    rng = np.random.default_rng(7)
    head = mr_series(rician(clean_head(), rng), Study(generate_uid(), generate_uid()), 3, "SIMULATED T1 SE")
    spec = PhantomSpec(
        rows=128, columns=128, slices=SLICES, pixel_spacing_mm=3.5, slice_thickness_mm=2.0, seed=4
    )
    torso = ct_series(torso_volume(spec), Study(generate_uid(), generate_uid()), spec.pixel_spacing_mm)
    current = _study(head, _files(head, tmp_path / "current"))
    return current, {str(torso.datasets[0].SeriesInstanceUID): _files(torso, tmp_path / "prior")}


def test_a_prior_failing_the_quality_check_refuses_the_job_when_the_rule_says_refuse(
    tmp_path: Path,
) -> None:
    current, files = _torso_prior(tmp_path)
    env = RunEnvironment(workdir=tmp_path / "job")
    with pytest.raises(RegistrationRefused) as refused:
        register_priors(
            current, _priors(registration="rigid", on_missing="refuse"), files, _forwarded(current), env
        )
    assert refused.value.series_uid == next(iter(files))
    assert "failed the quality check" in str(refused.value) and "Dice" in str(refused.value)


def test_a_prior_failing_the_quality_check_is_dropped_and_noted_when_the_rule_says_run(
    tmp_path: Path,
) -> None:
    current, files = _torso_prior(tmp_path)
    result = _forwarded(current)
    priors = _priors(registration="rigid", on_missing="run")
    done = register_priors(current, priors, files, result, RunEnvironment(tmp_path / "job"))
    assert done.result.outputs == result.outputs
    entry = done.entries[next(iter(files))]
    assert entry["quality_ok"] is False and entry["dropped"] == entry["quality_reason"]
    assert "Dice" in entry["dropped"]


def test_without_registration_nothing_is_loaded_nor_added(tmp_path: Path) -> None:
    current = StudyInput(job_id=1, study_uid="1.2.3", study_version=1, instances=())
    result = PipelineResult(outputs=())
    missing = {"1.2.3.4": [tmp_path / "absent.dcm"]}  # never read
    done = register_priors(current, _priors(), missing, result, RunEnvironment(tmp_path))
    assert done.result is result and done.entries == {}


def test_a_tps_destination_is_not_sent_the_registration_object() -> None:
    from dicom_node.delivery.profiles import DestinationProfiles

    profiles = DestinationProfiles.__new__(DestinationProfiles)
    profiles.tps = frozenset({"tps"})
    assert SpatialRegistrationStorage in NOT_FOR_TPS
    assert not profiles.accepts("tps", {SpatialRegistrationStorage})
    assert profiles.accepts("pacs", {SpatialRegistrationStorage})
