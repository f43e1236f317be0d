"""The encode stage: every output of a job as DICOM objects, with provenance in each.

:func:`write_outputs` runs the writers of :mod:`pipelines.writers` for one job (derived
series, both Parametric Maps, the SEG, the optional SC overlay, the SR) and returns an
:class:`OutputSet`; :class:`Encode` is the stage that calls it and records the files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.coding import Code

from pipelines import parallel, spill
from pipelines.base import GateOutcome, OutputInstance
from pipelines.provenance import OutputProvenance
from pipelines.stages import Context
from pipelines.uids import UidFactory, derived_frame_of_reference, job_key
from pipelines.volume import Volume, on_frame_of_reference
from pipelines.writers import (
    KIND_DERIVED,
    KIND_HALLUCINATION,
    KIND_OVERLAY,
    KIND_REPORT,
    KIND_SUSPECT,
    KIND_UNCERTAINTY,
    SMOOTHING,
    DerivedImageWriter,
    HallucinationMapWriter,
    OverlayWriter,
    SummaryReportWriter,
    SuspectRegionWriter,
    UncertaintyMapWriter,
    file_name,
    save,
    ucum_for_units,
)
from pipelines.writers.common import _check_series_number, learn_pixel_data_answers, pixel_data_answers


@dataclass(frozen=True)
class OutputSet:
    """The objects written for one job, by kind."""

    derived: tuple[Dataset, ...]
    uncertainty: Dataset
    hallucination: Dataset
    suspect: Dataset
    report: Dataset
    overlay: Dataset | None = None

    def by_kind(self) -> dict[str, list[Dataset]]:
        """``{"derived": [...], "uncertainty": [pm], ..., "report": [sr]}`` (overlay if written)."""
        kinds: dict[str, list[Dataset]] = {
            KIND_DERIVED: list(self.derived),
            KIND_UNCERTAINTY: [self.uncertainty],
            KIND_HALLUCINATION: [self.hallucination],
            KIND_SUSPECT: [self.suspect],
        }
        if self.overlay is not None:
            kinds[KIND_OVERLAY] = [self.overlay]
        kinds[KIND_REPORT] = [self.report]
        return kinds

    def datasets(self) -> list[Dataset]:
        """All objects, report last."""
        return [ds for group in self.by_kind().values() for ds in group]


def write_outputs(
    volume: Volume,
    *,
    provenance: OutputProvenance,
    uids: UidFactory,
    derived: np.ndarray,
    uncertainty: np.ndarray,
    hallucination: np.ndarray,
    suspect: np.ndarray,
    model_card: Mapping[str, str],
    qc: Mapping[str, tuple[float, str | Code | CodedConcept]],
    gate: GateOutcome | str,
    derived_description: str,
    derivation_code: Code | CodedConcept = SMOOTHING,
    uncertainty_units: str | Code | CodedConcept | None = None,
    first_series_number: int = 1001,
    overlay: bool = True,
    synthetic_data_element: bool = True,
    output_modality: str | None = None,
    output_units: str | None = None,
    output_contrast: str | None = None,
    out_dir: Path | None = None,
    release_pixels: bool = False,
    integer_maps: bool = False,
) -> OutputSet:
    """Write every output of one job and return them by kind.

    Series numbers run from ``first_series_number``: derived, uncertainty, hallucination,
    suspect regions, overlay, report.

    Parameters
    ----------
    volume
        The source volume.
    provenance, uids
        As for every writer.
    derived, uncertainty, hallucination, suspect
        The AI image (volume units), its uncertainty (≥ 0), the hallucination score and
        the boolean suspect-region mask, each of the volume's shape.
    model_card, qc, gate
        For the summary report (:meth:`SummaryReportWriter.write`).
    derived_description
        What the derived series is (Series Description, after "AI").
    derivation_code
        Derivation Code of the derived images.
    uncertainty_units
        UCUM code of the uncertainty; default from ``output_units`` (else the volume's units).
    overlay
        Also write the Secondary Capture heat map of the busiest slice.
    synthetic_data_element
        See :class:`DerivedImageWriter`.
    output_modality, output_units
        The derived series' IOD and the units of ``derived`` (and of ``uncertainty``), e.g.
        ``"CT"`` / ``"HU"`` for a synthetic CT from an MR; default the volume's (see
        :class:`DerivedImageWriter`).
    output_contrast
        The MR contrast of ``derived`` when it is not the source's (``"FLAIR"`` synthesised on
        a T1w's grid; see :class:`DerivedImageWriter`).
    out_dir
        When given, all objects are saved there (see :func:`save`).
    release_pixels
        With ``out_dir``: save each object as soon as it is written and drop its pixel data
        from memory (the report references objects by their headers only), so a long
        series never holds every output's pixels at once. The returned data sets then
        carry no pixel data: read the files.
    integer_maps
        Store the σ and hallucination maps as uint16 with a Real World Value Mapping
        (see :meth:`UncertaintyMapWriter.write`): half the bytes to write and send.
    """
    stream = out_dir is not None and release_pixels

    def done(datasets: list[Dataset]) -> None:
        if stream:
            assert out_dir is not None
            _save_and_release(datasets, out_dir)

    n = _check_series_number("write_outputs", first_series_number)
    if not volume.frame_of_reference_uid:
        raise ValueError(
            f"write_outputs: series {volume.series_uid} has no Frame of Reference UID and every "
            "output must carry one: place the volume on one first (pipelines.volume.on_frame_of_reference)"
        )
    image_units = volume.units if output_units is None else output_units
    units = uncertainty_units if uncertainty_units is not None else ucum_for_units(image_units)
    images_writer = DerivedImageWriter(
        provenance=provenance,
        uids=uids,
        series_number=n,
        series_description=derived_description,
        derivation_code=derivation_code,
        synthetic_data_element=synthetic_data_element,
        output_modality=output_modality,
        units=output_units,
        contrast=output_contrast,
    )
    # The derived series (a data set and a file per slice: a third of the encoding) goes to
    # the helper process when the worker has one, and the maps are written here meanwhile.
    beside = (
        parallel.submit(_derived_series, images_writer, volume, derived, out_dir, pixel_data_answers())
        if stream
        else None
    )
    if beside is None:
        images = images_writer.write(volume, derived, each=(lambda ds: done([ds])) if stream else None)
    try:
        sigma = UncertaintyMapWriter(
            provenance=provenance, uids=uids, series_number=n + 1, units=units
        ).write(volume, uncertainty, integer=integer_maps)
        done([sigma])
        score = HallucinationMapWriter(provenance=provenance, uids=uids, series_number=n + 2).write(
            volume, hallucination, integer=integer_maps
        )
        seg = SuspectRegionWriter(provenance=provenance, uids=uids, series_number=n + 3).write(
            volume, suspect
        )
        done([seg])
        picture = None
        if overlay:
            picture = OverlayWriter(provenance=provenance, uids=uids, series_number=n + 4).write(
                volume, hallucination, hallucination_map=score, mask=np.asarray(suspect, dtype=bool)
            )
            done([picture])
        done([score])  # the overlay reads the hallucination map's pixels
    except BaseException:
        if beside is not None:
            parallel.settle(beside)  # never leave the helper writing into a job that failed here
        raise
    if beside is not None:
        assert out_dir is not None
        images = parallel.result(beside, lambda: _derived_series(images_writer, volume, derived, out_dir))
    written = [*images, sigma, score, seg, *([picture] if picture is not None else [])]
    report = SummaryReportWriter(
        provenance=provenance, uids=uids, series_number=n + 5, model_card=model_card
    ).write(volume, outputs=written, qc=qc, gate=gate)
    done([report])
    result = OutputSet(tuple(images), sigma, score, seg, report, picture)
    if out_dir is not None and not stream:
        save(result.datasets(), out_dir)
    return result


def _save_and_release(datasets: list[Dataset], out_dir: Path) -> None:
    """Save ``datasets`` and drop their pixel data from memory (the report references
    objects by their headers only)."""
    save(datasets, out_dir)
    for ds in datasets:
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                delattr(ds, keyword)
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        spill.trim()  # a multi-frame map's hundreds of MB, before the next is made


def _derived_series(
    writer: DerivedImageWriter,
    volume: Volume,
    derived: np.ndarray,
    out_dir: Path,
    answers: dict[str, bool] | None = None,
) -> list[Dataset]:
    """The derived series, each instance saved as soon as it is made and its pixels
    dropped: in the worker, or in its helper process (:mod:`pipelines.parallel`), which
    takes the worker's ``answers`` to highdicom's "holds pixel data?" instead of loading
    the standard's tables to ask again."""
    if answers:
        learn_pixel_data_answers(answers)
    return writer.write(volume, derived, each=lambda ds: _save_and_release([ds], out_dir))


#: The QC fact (1: yes) the report carries when the source series had no Frame of Reference
#: UID and the outputs are on one derived from the series (pipelines.uids).
NEW_FRAME_OF_REFERENCE = "new frame of reference (source series had none)"


def _on_a_frame_of_reference(ctx: Context) -> Context:
    """The context with its volume on a Frame of Reference: the source's, or for a legacy
    series without one, a new one derived from the series (the same for every job on it),
    said in the QC figures (so in the report) and in the run's parameters."""
    volume = ctx.need_volume()
    if volume.frame_of_reference_uid:
        return ctx
    uid = derived_frame_of_reference(ctx.env.uid_root, volume.series_uid)
    return ctx.evolve(
        volume=on_frame_of_reference(volume, uid),
        qc={**ctx.qc, NEW_FRAME_OF_REFERENCE: (1.0, "1")},
        parameters={**ctx.parameters, "derived_frame_of_reference_uid": uid},
    )


def _card_facts(ctx: Context) -> dict[str, str]:
    card = ctx.model
    if card is None:
        return {}
    metrics = "; ".join(f"{k}: {v}" for k, v in card.metrics.items()) or "none reported"
    return {
        "intended use": card.intended_use,
        "training data": card.training_data,
        "metrics": metrics,
        "calibration": card.calibration,
    }


def _not_float32(precision: object) -> str | None:
    """The run's inference precision for the provenance line: None for float32 (the
    default, which the line leaves unsaid, so float32 outputs read as before)."""
    return None if precision in (None, "float32") else str(precision)


@dataclass(frozen=True)
class Encode:
    """Write the derived series, both maps, the SEG, the SR (and the optional SC overlay).

    The derived series is CT or MR Image Storage as its source is, unless
    ``output_modality`` says otherwise: the ``sct`` pipeline asks for ``"CT"`` in
    ``"HU"`` from an MR (see :class:`pipelines.writers.DerivedImageWriter`). The
    uncertainty map is in the derived series' units. A legacy source series without a
    Frame of Reference UID gets one derived from the series, and the report says so
    (:data:`NEW_FRAME_OF_REFERENCE`); a pipeline whose outputs must be on the source's
    own frame (``sct``: the planning system) refuses such a series before this stage.
    """

    derived_description: str
    #: Pixels generated by a model (Synthetic Data YES) rather than processed.
    synthetic: bool = False
    derivation_code: CodedConcept = SMOOTHING
    overlay: bool = True
    first_series_number: int = 1001
    #: IOD of the derived series: "CT" or "MR"; None: the source's modality.
    output_modality: str | None = None
    #: Units of the prediction (e.g. "HU"); None: the source volume's units.
    output_units: str | None = None
    #: σ and hallucination maps as uint16 with a Real World Value Mapping (half the bytes).
    integer_maps: bool = False
    #: The MR contrast of the prediction when not the source's (synthesis: "FLAIR").
    output_contrast: str | None = None
    name: str = "encode"

    def run(self, ctx: Context) -> Context:
        ctx = _on_a_frame_of_reference(ctx)
        volume = ctx.need_volume()
        prediction = ctx.need_prediction()
        if ctx.model is None or ctx.hallucination is None or ctx.suspect is None:
            raise RuntimeError("stage order: encode needs a model, a hallucination score and suspect regions")
        provenance = OutputProvenance(
            pipeline=ctx.pipeline,
            pipeline_version=ctx.pipeline_version,
            model_name=ctx.model.name,
            model_version=ctx.model.version,
            weights_sha256=ctx.model.weights_sha256,
            node_version=ctx.env.node_version,
            synthetic=self.synthetic,
            station=ctx.env.node_ae_title,
            priors=ctx.env.priors,
            precision=_not_float32(ctx.parameters.get("inference_precision")),
        )
        uids = UidFactory(
            ctx.env.uid_root, job_key(ctx.study.job_id, [i.sop_uid for i in ctx.study.instances])
        )
        written = write_outputs(
            volume,
            provenance=provenance,
            uids=uids,
            derived=prediction.mean,
            uncertainty=prediction.sigma,
            hallucination=ctx.hallucination,
            suspect=ctx.suspect,
            model_card=_card_facts(ctx),
            qc={k: (float(v[0]), v[1]) for k, v in ctx.qc.items()},
            gate=ctx.verdict or GateOutcome("release", ("no gate stage ran",), final=False),
            derived_description=self.derived_description,
            derivation_code=self.derivation_code,
            overlay=self.overlay,
            synthetic_data_element=self.synthetic,
            first_series_number=self.first_series_number,
            output_modality=self.output_modality,
            output_units=self.output_units,
            output_contrast=self.output_contrast,
            out_dir=ctx.env.workdir,
            release_pixels=True,  # each object is on disk before the next is made
            integer_maps=self.integer_maps,
        )
        datasets: list[Dataset] = written.datasets()
        paths = [Path(ctx.env.workdir) / file_name(ds) for ds in datasets]
        outputs = tuple(
            OutputInstance(
                sop_uid=str(ds.SOPInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=path,
            )
            for ds, path in zip(datasets, paths, strict=True)
        )
        qc_plain: dict[str, Any] = {k: v[0] for k, v in ctx.qc.items()}
        return ctx.evolve(outputs=outputs, qc_by_series={o.series_uid: qc_plain for o in outputs})
