"""The registration step of a job whose rule has priors with ``registration: rigid|affine``.

Before the job's pipeline runs, the job's input series and each prior series (the job's
``job_priors`` rows) are loaded as volumes and each prior is registered to the input
(:func:`compute_registrations`: :func:`pipelines.registration.register`, the rule's
``min_dice``); the pipeline is handed the registered priors on its input's grid
(``RunEnvironment.registered_priors``: ``prognosis`` reads them, the others do not). After
it has written its outputs (for ``forward``, its only processing), one Spatial
Registration object per registered prior is added to the job's outputs
(:func:`write_registrations`), so it goes through the gate, the destination checks and delivery as
the others do (a ``tps`` destination is not sent it: ``NOT_FOR_TPS``).

A prior that fails the quality check: with ``on_missing: refuse`` the job ends ``refused``
with the reason (:class:`~pipelines.registration.RegistrationRefused`) — the rule asked for
its priors and one of them cannot be used; with ``on_missing: run`` the prior is dropped
and noted (its provenance entry says ``dropped`` and why; no object is written for it) —
the rule runs with fewer priors, as it does when fewer arrive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import Connection, select

from dicom_node.db import schema as t
from pipelines.base import (
    OutputInstance,
    PipelineError,
    PipelineResult,
    RegisteredPrior,
    RunEnvironment,
    StudyInput,
)
from pipelines.provenance import OutputProvenance, PriorReference, provenance_of
from pipelines.uids import UidFactory, job_key
from pipelines.volume import SeriesError, Volume, load_series
from pipelines.writers.files import save
from policies.model import Priors

#: Series Number of the first registration series (one per registered prior, counting up).
SERIES_NUMBER = 990


@dataclass(frozen=True)
class PriorRegistrations:
    """What the step added: the result with the objects, and per prior series its entry."""

    result: PipelineResult
    #: Per prior series UID: the registration's provenance (matrix, method, figures), with
    #: ``dropped`` (the reason) for a prior that failed the quality check.
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)


def prior_files(conn: Connection, job_id: int) -> dict[str, list[Path]]:
    """The stored files of each of the job's prior series (relative to the data dir)."""
    rows = conn.execute(
        select(t.job_priors.c.series_uid, t.instances.c.path)
        .join(t.series, t.series.c.series_uid == t.job_priors.c.series_uid)
        .join(t.instances, t.instances.c.series_fk == t.series.c.id)
        .where(t.job_priors.c.job_fk == job_id, t.instances.c.current.is_(True))
        .order_by(t.job_priors.c.id, t.instances.c.instance_number.asc().nulls_first(), t.instances.c.id)
    ).all()
    out: dict[str, list[Path]] = {}
    for row in rows:
        out.setdefault(row.series_uid, []).append(Path(row.path))
    return out


def _load(paths: Sequence[Path], what: str) -> Volume:
    try:
        return load_series([pydicom.dcmread(p) for p in paths])
    except (OSError, SeriesError, ValueError) as exc:
        raise PipelineError(f"priors: cannot load {what}: {exc}") from None


def _input_series(study: StudyInput) -> list[Path]:
    """The job's input series: the one the policy selected, else the largest."""
    by_series: dict[str, list[Path]] = {}
    for i in study.instances:
        by_series.setdefault(i.series_uid, []).append(i.path)
    if not by_series:
        raise PipelineError("priors: the job has no input series to register the priors to")
    if study.series_uid and study.series_uid in by_series:
        return by_series[study.series_uid]
    return max(by_series.values(), key=len)


def _check(path: Path, out: OutputInstance, study: StudyInput, sources: set[str]) -> list[str]:
    """The checks output validation makes of any object, for the registration object."""
    where = path.name
    ds = pydicom.dcmread(path)
    problems = []
    if str(ds.get("StudyInstanceUID", "")) != study.study_uid:
        problems.append(f"{where}: Study Instance UID is not the input study's")
    recorded = (out.sop_uid, out.sop_class_uid)
    if (str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))) != recorded:
        problems.append(f"{where}: SOP Instance/Class UID differ from what the job recorded")
    try:
        facts = provenance_of(ds)
    except ValueError as exc:
        return [*problems, f"{where}: provenance: {exc}"]
    if not set(facts["source_series_instance_uids"]) <= sources:
        problems.append(f"{where}: references a series that is neither the input nor a prior")
    return problems


@dataclass(frozen=True, eq=False)
class ComputedRegistrations:
    """The priors registered to the job's input series, before any object is written."""

    #: The job's input series (the fixed image).
    current: Volume | None = None
    #: Per prior series UID, in order: its registration (quality checked or not).
    registrations: dict[str, Any] = field(default_factory=dict)


def compute_registrations(
    study: StudyInput, priors: Priors, files: Mapping[str, Sequence[Path]]
) -> ComputedRegistrations:
    """Register each prior series in ``files`` to the job's input series (no objects yet).

    Runs before the job's pipeline, so a pipeline that reads the priors (``prognosis``)
    gets them on its input's grid (:class:`pipelines.base.RegisteredPrior`).

    Raises
    ------
    RegistrationRefused
        A prior failed the quality check and the rule says ``on_missing: refuse``.
    PipelineError
        A series cannot be loaded as one volume.
    """
    if priors.registration == "none" or not files:
        return ComputedRegistrations()
    # SimpleITK is the 'ai' extra: loaded only for a job that registers
    from pipelines.registration import RegistrationQuality, register, require_quality

    quality = RegistrationQuality(min_dice=priors.min_dice) if priors.min_dice else RegistrationQuality()
    current = _load(_input_series(study), "the input series")
    done: dict[str, Any] = {}
    for series_uid, paths in sorted(files.items()):
        prior = _load(paths, f"the prior series {series_uid}")
        try:
            registration = register(current, prior, mode=priors.registration, quality=quality)
        except ValueError as exc:  # a blank series: nothing to register
            raise PipelineError(f"priors: cannot register the prior series {series_uid}: {exc}") from None
        if not registration.quality_ok and priors.on_missing == "refuse":
            require_quality(registration)
        done[series_uid] = registration
    return ComputedRegistrations(current, done)


def registered_priors(
    computed: ComputedRegistrations, references: Sequence[PriorReference], files: Mapping[str, Sequence[Path]]
) -> tuple[RegisteredPrior, ...]:
    """What the pipeline is handed: each prior that passed its quality check, on the grid of
    the job's input series, with its reference (study, date) and its first file's header."""
    by_series = {r.series_uid: r for r in references}
    out = []
    for series_uid, registration in computed.registrations.items():
        reference = by_series.get(series_uid)
        if not registration.quality_ok or reference is None:
            continue
        header = pydicom.dcmread(files[series_uid][0], stop_before_pixels=True)
        out.append(
            RegisteredPrior(
                reference=reference,
                header=header,
                matrix=registration.matrix,
                resampled=registration.resampled,
                fov=registration.resampled_fov,
                input_series_uid=registration.current_series_uid,
            )
        )
    return tuple(out)


def write_registrations(
    study: StudyInput,
    computed: ComputedRegistrations,
    files: Mapping[str, Sequence[Path]],
    result: PipelineResult,
    env: RunEnvironment,
    priors: Priors,
) -> PriorRegistrations:
    """One Spatial Registration object per prior that passed its quality check, added to the
    job's outputs; a prior that did not is dropped and noted (``on_missing: run``)."""
    if not computed.registrations or computed.current is None:
        return PriorRegistrations(result)
    from pipelines.registration import METHOD_NAME, METHOD_VERSION, RegistrationSettings
    from pipelines.writers.spatial_registration import SpatialRegistrationWriter

    current = computed.current
    provenance = OutputProvenance(
        pipeline="prior-registration",
        pipeline_version=METHOD_VERSION,
        model_name=METHOD_NAME,
        model_version=METHOD_VERSION,
        weights_sha256=RegistrationSettings().sha256(priors.registration),  # type: ignore[arg-type]
        node_version=env.node_version,
        synthetic=False,
        station=env.node_ae_title,
        priors=env.priors,
    )
    uids = UidFactory(env.uid_root, job_key(study.job_id, [i.sop_uid for i in study.instances]))
    out_dir = env.workdir / "registration"
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    outputs = list(result.outputs)
    qc = dict(result.qc)
    problems = list(result.validation_errors)
    sources = {i.series_uid for i in study.instances} | set(files)
    for n, (series_uid, registration) in enumerate(computed.registrations.items()):
        entry = registration.provenance()
        if not registration.quality_ok:
            entries[series_uid] = {**entry, "dropped": registration.quality_reason}
            continue
        prior = _load(files[series_uid], f"the prior series {series_uid}")
        writer = SpatialRegistrationWriter(
            provenance=provenance,
            uids=uids,
            series_number=SERIES_NUMBER + n,
            name=f"registration-{series_uid}",
        )
        ds = writer.write(registration, current, prior)
        (path,) = save([ds], out_dir)
        out = OutputInstance(
            sop_uid=str(ds.SOPInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=path,
        )
        problems += _check(path, out, study, sources)
        outputs.append(out)
        qc[out.series_uid] = {**registration.figures(), "prior_series_uid": series_uid}
        entries[series_uid] = {**entry, "registration_sop_uid": out.sop_uid}
    return PriorRegistrations(
        replace(result, outputs=tuple(outputs), qc=qc, validation_errors=tuple(problems)), entries
    )


def register_priors(
    study: StudyInput,
    priors: Priors,
    files: Mapping[str, Sequence[Path]],
    result: PipelineResult,
    env: RunEnvironment,
) -> PriorRegistrations:
    """Register each prior series in ``files`` to the job's input series and add one Spatial
    Registration object per registered prior to ``result`` (:func:`compute_registrations`,
    then :func:`write_registrations`); see the module.

    Raises
    ------
    RegistrationRefused
        A prior failed the quality check and the rule says ``on_missing: refuse``.
    PipelineError
        A series cannot be loaded as one volume.
    """
    computed = compute_registrations(study, priors, files)
    return write_registrations(study, computed, files, result, env, priors)
