"""Summary report (highdicom Comprehensive SR): one object that ties a job's outputs together.

The document is a TID 1500 Imaging Measurement Report (DCM 126000): the device observer
(this node and its model), the procedure reported, and the QC figures as TID 1501 / TID
1411 measurement groups — TID 300 measurements with standard concepts (SCT "Volume",
"Standard Deviation", derivation "Mean" / "Maximum", DCM "Threshold Value") and UCUM units
(``[hnsf'U]`` for HU), the suspect-region group referencing the SEG's segment. Extending
the template, with local codes (``99DCMNODE``) where no standard code names the concept:
the gate (verdict, what it was judged on, the rule's gate, its reasons, the limits it was
judged against), after review the approval (decision, NCIt "Reviewer", when, DCM
"Comment"), the provenance line, the model card, the source images and every output.
See :class:`SummaryReportWriter`.

A pipeline's report states the gate's provisional verdict on the QC figures alone. The
node restates it with its final verdict (:func:`restate_verdict`: the same instance, the
draft never leaves the node), and a reviewer's approval of a held job makes a new,
verified instance in the same series with the held one as its predecessor
(:func:`approved_report`), which is sent instead. :func:`stated_verdict` and
:func:`reported_figures` read a report back; :func:`pipelines.provenance.provenance_of`
reads its "Source images", "AI output objects" and "Provenance" items.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.base import GateOutcome
from pipelines.provenance import OutputProvenance
from pipelines.uids import UidFactory, derive_uid
from pipelines.volume import Volume
from pipelines.writers.common import (
    KIND_DERIVED,
    KIND_EXTENT,
    KIND_HALLUCINATION,
    KIND_OVERLAY,
    KIND_PROBABILITY,
    KIND_REPORT,
    KIND_SUSPECT,
    KIND_UNCERTAINTY,
    NODE_MANUFACTURER,
    UTF8,
    _ai_series_description,
    _check_provenance,
    _check_series_number,
    _check_uids,
    _contributing_equipment,
    _copy_patient_and_study,
    _finish,
    _keep_timezone,
    _lo,
    _now,
    _software_versions,
    kind_of,
    local_code,
    ucum,
    ucum_for_units,
)
from pipelines.writers.files import _file_meta_keep, save
from pipelines.writers.segmentation import SUSPECT_TYPE

__all__ = [
    "Approval",
    "SummaryReportWriter",
    "approved_report",
    "is_summary_report",
    "reported_figures",
    "restate_verdict",
    "stated_verdict",
]


def _hashed_code(prefix: str, name: str) -> CodedConcept:
    """A local concept for a name no table here knows: the prefix and 8 hex digits of the
    name's hash — short, complete (never a truncated name) and the same for the same name."""
    return local_code(prefix + hashlib.sha256(name.encode()).hexdigest()[:8].upper(), name)


def _report_unit(unit: str | Code | CodedConcept) -> CodedConcept:
    """A QC figure's unit as UCUM: a volume's units (``"HU"`` → ``[hnsf'U]``, ``"US"`` → ``1``)
    are translated, anything else is taken to be a UCUM code already."""
    if isinstance(unit, str):
        try:
            unit = ucum_for_units(unit)
        except ValueError:
            pass
    return ucum(unit)


#: DCM 121324 "Source image" (concept name of SR references to the inputs).
_SOURCE_IMAGE = CodedConcept("121324", "DCM", "Source image")
#: SR concept names of output references, by kind.
_OUTPUT_CONCEPTS = {
    KIND_DERIVED: local_code("AI-DERIVED", "AI derived image"),
    KIND_UNCERTAINTY: local_code("AI-UNCERTAINTY", "AI uncertainty map"),
    KIND_HALLUCINATION: local_code("AI-HALLUC-MAP", "AI hallucination map"),
    KIND_SUSPECT: local_code("AI-SUSPECT-SEG", "AI suspect region segmentation"),
    KIND_OVERLAY: local_code("AI-OVERLAY", "AI hallucination overlay"),
    KIND_PROBABILITY: local_code("AI-PROBABILITY", "AI probability map"),
    KIND_EXTENT: local_code("AI-EXTENT-SEG", "AI predicted extent segmentation"),
}
_SR_PROVENANCE = local_code("PROVENANCE", "Provenance")
_SR_MODEL_CARD = local_code("MODEL-CARD", "Model card")
_SR_SOURCES = local_code("SOURCES", "Source images")
_SR_OUTPUTS = local_code("AI-OUTPUTS", "AI output objects")

#: Model card entries by the names the pipelines give them (the names are the meanings);
#: any other gets a hashed code.
_MODEL_CARD_CONCEPTS = {
    "intended use": local_code("INTENDED-USE", "intended use"),
    "training data": local_code("TRAINING-DATA", "training data"),
    "metrics": local_code("MODEL-METRICS", "metrics"),
    "calibration": local_code("CALIBRATION", "calibration"),
}

#: TID 1500 Procedure Reported (CID 100), by the source's modality.
_PROCEDURES = {
    "CT": CodedConcept.from_code(codes.cid100.CTUnspecifiedBodyRegion),
    "MR": CodedConcept.from_code(codes.cid100.MRIUnspecifiedBodyRegion),
}
_IMAGING_PROCEDURE = CodedConcept.from_code(codes.cid100.ImagingProcedure)

_VOLUME = CodedConcept.from_code(codes.SCT.Volume)
_STANDARD_DEVIATION = CodedConcept.from_code(codes.SCT.StandardDeviation)
_MEAN = CodedConcept.from_code(codes.SCT.Mean)
_MAXIMUM = CodedConcept.from_code(codes.SCT.Maximum)
_THRESHOLD = CodedConcept.from_code(codes.DCM.ThresholdValue)
#: DCM 121401 "Derivation" (TID 300 concept modifier) and DCM 112039 "Tracking Identifier".
_DERIVATION = ("121401", "DCM")
_TRACKING_IDENTIFIER = ("112039", "DCM")
#: DCM 126010 "Imaging Measurements": the TID 1500 container of the measurement groups.
_IMAGING_MEASUREMENTS = ("126010", "DCM")


@dataclass(frozen=True)
class _Figure:
    """Where a QC figure goes: its measurement group, TID 300 concept and derivation."""

    group: str
    concept: CodedConcept
    derivation: CodedConcept | None = None

    @property
    def key(self) -> tuple[str, str, str, str | None]:
        return (
            self.group,
            self.concept.value,
            self.concept.scheme_designator,
            self.derivation.value if self.derivation is not None else None,
        )


#: The QC figures the pipelines report. Any other goes to "other" with a hashed local code.
_QC_FIGURES = {
    "suspect volume": _Figure("suspect", _VOLUME),
    "largest suspect region": _Figure("suspect", _VOLUME, _MAXIMUM),
    "suspect fraction": _Figure(
        "suspect", local_code("SUSPECT-FRACTION", "Suspect fraction of the assessed volume")
    ),
    "hallucination score p99": _Figure(
        "score", local_code("HALLUC-SCORE-P99", "Hallucination score, 99th percentile")
    ),
    "suspect threshold": _Figure("score", _THRESHOLD),
    "mean uncertainty": _Figure("sigma", _STANDARD_DEVIATION, _MEAN),
    "mean calibrated sigma in body": _Figure("sigma-body", _STANDARD_DEVIATION, _MEAN),
    "mean sigma at bone/air interfaces": _Figure("sigma-interfaces", _STANDARD_DEVIATION, _MEAN),
    "input noise sigma": _Figure("noise", _STANDARD_DEVIATION),
    "new frame of reference (source series had none)": _Figure(
        "other", local_code("NEW-FRAME-OF-REF", "New frame of reference (the source had none)")
    ),
}
#: The measurement groups' tracking identifiers (TID 4108), in report order.
_GROUPS = {
    "suspect": "AI suspect regions (possible hallucination)",
    "score": "AI hallucination score",
    "sigma": "AI calibrated uncertainty, whole image",
    "sigma-body": "AI calibrated uncertainty, inside the body",
    "sigma-interfaces": "AI calibrated uncertainty, bone/air interfaces",
    "noise": "Input image noise",
    "other": "Other QC figures",
}

_SR_GATE = local_code("GATE", "AI output gate")
_GATE_VERDICT = local_code("GATE-VERDICT", "Gate verdict")
_VERDICTS = {
    "release": local_code("RELEASED", "Released for delivery"),
    "hold": local_code("HELD", "Held for review"),
    "shadow": local_code("SHADOW", "Shadow mode: recorded, never sent"),
}
_VERDICT_STAGE = local_code("VERDICT-STAGE", "Verdict stage")
_FINAL = local_code("FINAL", "Final: after output validation and destination checks")
_PROVISIONAL = local_code("PROVISIONAL", "Provisional: on the QC figures alone")
_RULE_GATE = local_code("RULE-GATE", "Rule gate")
_GATE_REASON = local_code("GATE-REASON", "Reason for the verdict")
_GATE_LIMITS = local_code("GATE-LIMITS", "Limits the verdict was judged against")
_GATE_RULE = local_code("GATE-RULE", "Gate rule")
#: The gate's QC limits by the names its reasons give them; any other gets a hashed code.
_LIMITS = {
    "suspect fraction": local_code("MAX-SUSP-FRAC", "Suspect fraction limit"),
    "suspect volume": local_code("MAX-SUSP-VOLUME", "Suspect volume limit"),
    "largest suspect region": local_code("MAX-SUSP-REGION", "Largest suspect region limit"),
    "mean calibrated sigma": local_code("MAX-MEAN-SIGMA", "Mean calibrated sigma limit"),
    "mean sigma at bone/air interfaces": local_code("MAX-IFACE-SIGMA", "Bone/air interface sigma limit"),
}
_SR_REVIEW = local_code("REVIEW", "Review")
_REVIEW_DECISION = local_code("REVIEW-DECISION", "Review decision")
_APPROVED = local_code("APPROVED", "Approved for release")
_REVIEWER = CodedConcept.from_code(codes.NCIt.Reviewer)
_REVIEWED_AT = local_code("REVIEWED-AT", "Review date and time")
_COMMENT = CodedConcept.from_code(codes.DCM.Comment)

#: A plain-string verdict's first word: an action, or the rule's gate that implies one.
_ACTION_WORDS = {
    "auto": "release",
    "release": "release",
    "review": "hold",
    "hold": "hold",
    "shadow": "shadow",
}


@dataclass(frozen=True)
class Approval:
    """A reviewer's approval of a held job, as the approved report states it."""

    reviewer: str
    at: dt.datetime
    note: str | None = None
    #: Verifying Organization (Type 1): to whom the reviewer answers.
    organization: str = NODE_MANUFACTURER


class SummaryReportWriter:
    """One Comprehensive SR that ties the job's outputs together for a reader.

    Content: a TID 1500 Imaging Measurement Report (see the module docstring) — the QC
    figures as measurement groups, each with the model's TID 4019 Algorithm
    Identification; then the gate (its verdict, stage, the rule's gate, reasons and
    limits), the provenance line, the model card (TEXT per entry), the source images
    (IMAGE, DCM 121324 "Source image") and every output object written (IMAGE, one per
    instance). The evidence is the source images plus all outputs, so Current Requested
    Procedure Evidence Sequence lists them all.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the report's series.
    model_card
        Model card facts, e.g. ``{"intended use": ..., "training data": ...,
        "metrics": ..., "calibration": ...}``; at least one.
    name
        Name of the series in ``uids``.
    """

    kind: ClassVar[str] = KIND_REPORT

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        model_card: Mapping[str, str],
        name: str = "report",
    ) -> None:
        owner = type(self).__name__
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        if not isinstance(model_card, Mapping) or not model_card:
            raise ValueError(f"{owner}: argument 'model_card' is required (a non-empty mapping of strings)")
        bad = [
            k
            for k, v in model_card.items()
            if not isinstance(k, str) or not isinstance(v, str) or not v.strip()
        ]
        if bad:
            raise ValueError(f"{owner}: model card entries must be non-empty strings: {bad}")
        self.model_card = dict(model_card)
        self.name = name

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    def write(
        self,
        volume: Volume,
        *,
        outputs: Sequence[Dataset],
        qc: Mapping[str, tuple[float, str | Code | CodedConcept]],
        gate: GateOutcome | str,
        out_dir: Path | None = None,
    ) -> Dataset:
        """The summary report.

        Parameters
        ----------
        volume
            The source volume (its instances are evidence and are referenced).
        outputs
            Every other object written for the job (derived instances, maps, SEG, overlay).
        qc
            QC figures: name → (value, unit), e.g. ``{"mean uncertainty": (4.2, "[hnsf'U]"),
            "suspect volume": (0.3, "mL")}``; at least one. A unit is UCUM, or a volume's
            units (``"HU"`` is written ``[hnsf'U]``).
        gate
            The gate's verdict (:class:`pipelines.base.GateOutcome`); a string is read as a
            provisional verdict whose first word is the action or the rule's gate (e.g.
            ``"review: burden above the limit"``) and which is its reason.
        out_dir
            When given, the object is also saved there (see :func:`save`).
        """
        owner = type(self).__name__
        if not isinstance(volume, Volume):
            raise TypeError(f"{owner}: 'volume' must be a pipelines.volume.Volume")
        verdict = _outcome(owner, gate)
        outputs = list(outputs)
        if not outputs:
            raise ValueError(f"{owner}: 'outputs' is empty; the report summarises written objects")
        for ds in outputs:
            if ds.StudyInstanceUID != volume.study_uid:
                raise ValueError(f"{owner}: output {ds.SOPInstanceUID} belongs to another study")
        if not qc:
            raise ValueError(f"{owner}: argument 'qc' is required (the QC figures the gate judged)")
        prov = self.provenance
        rel = hd.sr.RelationshipTypeValues
        units = {key: _report_unit(unit).value for key, (_value, unit) in qc.items()}

        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid(
                self.uids.root, "device-observer", prov.pipeline, prov.model_name, prov.weights_sha256
            ),
            name=_lo(prov.station or NODE_MANUFACTURER),
            manufacturer_name=NODE_MANUFACTURER,
            model_name=_lo(f"{prov.pipeline} {prov.pipeline_version}"),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(
                observer_device_context=hd.sr.ObserverContext(
                    observer_type=codes.DCM.Device, observer_identifying_attributes=device
                )
            ),
            procedure_reported=_PROCEDURES.get(volume.modality, _IMAGING_PROCEDURE),
            imaging_measurements=self._measurement_groups(volume, outputs, qc),
            title=codes.cid7021.ImagingMeasurementReport,
        )
        root = report[0]
        root.ContentSequence.append(_gate_container(verdict, units))
        root.ContentSequence.append(hd.sr.TextContentItem(_SR_PROVENANCE, prov.description(), rel.CONTAINS))

        card = hd.sr.ContainerContentItem(name=_SR_MODEL_CARD, relationship_type=rel.CONTAINS)
        card.ContentSequence = DicomSequence(
            [
                hd.sr.TextContentItem(
                    _MODEL_CARD_CONCEPTS.get(key) or _hashed_code("MC-", key), value, rel.CONTAINS
                )
                for key, value in self.model_card.items()
            ]
        )
        root.ContentSequence.append(card)

        sources = hd.sr.ContainerContentItem(name=_SR_SOURCES, relationship_type=rel.CONTAINS)
        sources.ContentSequence = DicomSequence(
            [
                hd.sr.ImageContentItem(
                    _SOURCE_IMAGE, ds.SOPClassUID, ds.SOPInstanceUID, relationship_type=rel.CONTAINS
                )
                for ds in volume.datasets
            ]
        )
        root.ContentSequence.append(sources)

        written = hd.sr.ContainerContentItem(name=_SR_OUTPUTS, relationship_type=rel.CONTAINS)
        written.ContentSequence = DicomSequence(
            [
                hd.sr.ImageContentItem(
                    _OUTPUT_CONCEPTS[kind_of(ds)],
                    ds.SOPClassUID,
                    ds.SOPInstanceUID,
                    relationship_type=rel.CONTAINS,
                )
                for ds in outputs
            ]
        )
        root.ContentSequence.append(written)

        sr = hd.sr.ComprehensiveSR(
            evidence=[*volume.datasets, *outputs],
            content=root,
            specific_character_set=UTF8,  # reasons and notes are free text
            series_instance_uid=self.series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.instance(self.name, 1),
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            is_complete=True,
            is_final=_is_final(verdict),
            is_verified=False,
            contributing_equipment=_contributing_equipment(prov, include_acquisition=False),
            manufacturer_model_name=_lo(prov.pipeline),
            software_versions=_software_versions(prov),
            device_serial_number=prov.weights_sha256,
        )
        sr.SeriesDescription = _ai_series_description("output summary (model card, QC, gate)")
        _copy_patient_and_study(sr, volume.datasets[0])
        _keep_timezone(sr, volume.datasets[0])
        _file_meta_keep(sr)
        _finish(sr, prov)
        if out_dir is not None:
            save([sr], out_dir)
        return sr

    def _algorithm(self) -> hd.sr.AlgorithmIdentification:
        prov = self.provenance
        return hd.sr.AlgorithmIdentification(
            name=_lo(prov.model_name),
            version=_lo(prov.model_version),
            parameters=[
                f"pipeline {prov.pipeline} {prov.pipeline_version}",
                f"weights sha256 {prov.weights_sha256}",
                f"synthetic {'yes' if prov.synthetic else 'no'}",
                *([f"inference precision {prov.precision}"] if prov.precision else []),
            ],
            family=codes.cid7162.ArtificialIntelligence,
            manufacturer=NODE_MANUFACTURER,
        )

    def _measurement_groups(
        self,
        volume: Volume,
        outputs: Sequence[Dataset],
        qc: Mapping[str, tuple[float, str | Code | CodedConcept]],
    ) -> list[
        hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ]:
        """The QC figures as TID 1501 groups; the suspect regions' as a TID 1411 group on
        the SEG's segment. A figure no table knows, or a second one with the same concept
        in its group, goes to "Other QC figures" under a hashed local code."""
        owner = type(self).__name__
        measurements: dict[str, list[hd.sr.Measurement]] = {}
        taken: set[tuple[str, str, str, str | None]] = set()
        for key, (value, unit) in qc.items():
            number = float(value)
            if not np.isfinite(number):
                raise ValueError(f"{owner}: QC figure {key!r} is not finite ({value!r})")
            figure = _QC_FIGURES.get(key)
            if figure is None or figure.key in taken:
                figure = _Figure("other", _hashed_code("QC-", key))
            taken.add(figure.key)
            measurements.setdefault(figure.group, []).append(
                hd.sr.Measurement(
                    name=figure.concept, value=number, unit=_report_unit(unit), derivation=figure.derivation
                )
            )
        seg = next((ds for ds in outputs if kind_of(ds) == KIND_SUSPECT), None)
        groups: list[
            hd.sr.MeasurementsAndQualitativeEvaluations
            | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        ] = []
        for group, label in _GROUPS.items():
            if group not in measurements:
                continue
            tracking = hd.sr.TrackingIdentifier(
                uid=self.uids.instance(f"{self.name}-group-{group}"), identifier=label
            )
            if group == "suspect" and seg is not None:
                segment = hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=1,
                    source_series=hd.sr.SourceSeriesForSegmentation(volume.series_uid),
                )
                groups.append(
                    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                        tracking_identifier=tracking,
                        referenced_segment=segment,
                        finding_type=SUSPECT_TYPE,
                        algorithm_id=self._algorithm(),
                        measurements=measurements[group],
                    )
                )
            else:
                groups.append(
                    hd.sr.MeasurementsAndQualitativeEvaluations(
                        tracking_identifier=tracking,
                        algorithm_id=self._algorithm(),
                        measurements=measurements[group],
                    )
                )
        return groups


# --------------------------------------------------------------------------- the gate


def _outcome(owner: str, gate: GateOutcome | str) -> GateOutcome:
    if isinstance(gate, GateOutcome):
        if gate.action not in _VERDICTS:
            raise ValueError(f"{owner}: gate action {gate.action!r} is not one of {sorted(_VERDICTS)}")
        return gate
    text = str(gate or "").strip()
    if not text:
        raise ValueError(f"{owner}: argument 'gate' (the gate verdict) is required")
    action = _ACTION_WORDS.get(re.split(r"[^a-z]", text.lower(), maxsplit=1)[0])
    if action is None:
        raise ValueError(
            f"{owner}: gate {text[:40]!r} does not start with release, hold, shadow, auto or review; "
            "pass a pipelines.base.GateOutcome"
        )
    return GateOutcome(action, (text,), final=False)


def _is_final(verdict: GateOutcome) -> bool:
    """Preliminary Flag FINAL: a final verdict that lets the report stand (release, shadow)."""
    return verdict.final and verdict.action != "hold"


def _gate_container(verdict: GateOutcome, units: Mapping[str, str]) -> hd.sr.ContainerContentItem:
    """The gate's verdict, what it was judged on, the rule's gate, its reasons and the
    limits it was judged against (``units``: the QC figures' UCUM units, for limits in the
    unit of the figure they read)."""
    rel = hd.sr.RelationshipTypeValues
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(_GATE_VERDICT, _VERDICTS[verdict.action], rel.CONTAINS),
        hd.sr.CodeContentItem(_VERDICT_STAGE, _FINAL if verdict.final else _PROVISIONAL, rel.CONTAINS),
    ]
    if verdict.rule_gate:
        items.append(hd.sr.TextContentItem(_RULE_GATE, verdict.rule_gate, rel.CONTAINS))
    items += [hd.sr.TextContentItem(_GATE_REASON, r, rel.CONTAINS) for r in verdict.reasons if r.strip()]
    if verdict.limits or verdict.rules:
        limits = hd.sr.ContainerContentItem(name=_GATE_LIMITS, relationship_type=rel.CONTAINS)
        judged: list[hd.sr.ContentItem] = []
        for limit in verdict.limits:
            unit = limit.unit or next((units[f] for f in limit.figures if f in units), "1")
            judged.append(
                hd.sr.NumContentItem(
                    _LIMITS.get(limit.label) or _hashed_code("MAX-", limit.label),
                    float(limit.maximum),
                    ucum(unit),
                    relationship_type=rel.CONTAINS,
                )
            )
        judged += [hd.sr.TextContentItem(_GATE_RULE, r, rel.CONTAINS) for r in verdict.rules if r.strip()]
        limits.ContentSequence = DicomSequence(judged)
        items.append(limits)
    container = hd.sr.ContainerContentItem(name=_SR_GATE, relationship_type=rel.CONTAINS)
    container.ContentSequence = DicomSequence(items)
    return container


def _review_container(approval: Approval) -> hd.sr.ContainerContentItem:
    rel = hd.sr.RelationshipTypeValues
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(_REVIEW_DECISION, _APPROVED, rel.CONTAINS),
        hd.sr.TextContentItem(_REVIEWER, approval.reviewer, rel.CONTAINS),
        hd.sr.DateTimeContentItem(_REVIEWED_AT, approval.at, rel.CONTAINS),
    ]
    if approval.note and approval.note.strip():
        items.append(hd.sr.TextContentItem(_COMMENT, approval.note.strip(), rel.CONTAINS))
    container = hd.sr.ContainerContentItem(name=_SR_REVIEW, relationship_type=rel.CONTAINS)
    container.ContentSequence = DicomSequence(items)
    return container


# --------------------------------------------------------------------------- reading back


def _is(item: Dataset, concept: CodedConcept | tuple[str, str]) -> bool:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return False
    value, scheme = (
        (concept.value, concept.scheme_designator) if isinstance(concept, CodedConcept) else concept
    )
    return bool(names[0].CodeValue == value and names[0].CodingSchemeDesignator == scheme)


def _child(item: Dataset, concept: CodedConcept | tuple[str, str]) -> Dataset | None:
    return next((c for c in item.get("ContentSequence", []) if _is(c, concept)), None)


def _children(item: Dataset, concept: CodedConcept | tuple[str, str]) -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if _is(c, concept)]


def _code_value(item: Dataset | None) -> str | None:
    if item is None or not item.get("ConceptCodeSequence"):
        return None
    return str(item.ConceptCodeSequence[0].CodeValue)


def is_summary_report(ds: Dataset) -> bool:
    """Whether ``ds`` is a summary report this node wrote (one it may restate or approve)."""
    try:
        report = kind_of(ds) == KIND_REPORT
    except ValueError:
        return False
    return (
        report and str(ds.get("Manufacturer", "")) == NODE_MANUFACTURER and _child(ds, _SR_GATE) is not None
    )


def stated_verdict(ds: Dataset) -> dict[str, Any]:
    """What a summary report says of the gate and any review.

    Returns
    -------
    dict
        ``verdict`` (``"RELEASED"``, ``"HELD"`` or ``"SHADOW"``), ``final`` (bool),
        ``rule_gate`` (or None), ``reasons`` (list), ``limits`` ({meaning: (value, UCUM)}),
        ``rules`` (list), ``review`` (None, or ``decision``, ``reviewer``, ``at``, ``note``).

    Raises
    ------
    ValueError
        ``ds`` is not a summary report of this node.
    """
    gate = _child(ds, _SR_GATE)
    if gate is None:
        raise ValueError(f"object {ds.get('SOPInstanceUID')} is not a dicom-node summary report (no gate)")
    limits: dict[str, tuple[float, str]] = {}
    rules: list[str] = []
    judged = _child(gate, _GATE_LIMITS)
    for item in judged.get("ContentSequence", []) if judged is not None else []:
        if item.ValueType == "NUM":
            measured = item.MeasuredValueSequence[0]
            limits[str(item.ConceptNameCodeSequence[0].CodeMeaning)] = (
                float(measured.NumericValue),
                str(measured.MeasurementUnitsCodeSequence[0].CodeValue),
            )
        elif _is(item, _GATE_RULE):
            rules.append(str(item.TextValue))
    rule_gate = _child(gate, _RULE_GATE)
    review = _child(ds, _SR_REVIEW)
    stated: dict[str, Any] = {
        "verdict": _code_value(_child(gate, _GATE_VERDICT)),
        "final": _code_value(_child(gate, _VERDICT_STAGE)) == _FINAL.value,
        "rule_gate": str(rule_gate.TextValue) if rule_gate is not None else None,
        "reasons": [str(i.TextValue) for i in _children(gate, _GATE_REASON)],
        "limits": limits,
        "rules": rules,
        "review": None,
    }
    if review is not None:
        reviewer, at, note = (_child(review, c) for c in (_REVIEWER, _REVIEWED_AT, _COMMENT))
        stated["review"] = {
            "decision": _code_value(_child(review, _REVIEW_DECISION)),
            "reviewer": str(reviewer.TextValue) if reviewer is not None else None,
            "at": str(at.DateTime) if at is not None else None,
            "note": str(note.TextValue) if note is not None else None,
        }
    return stated


def reported_figures(ds: Dataset) -> dict[str, tuple[float, str]]:
    """The QC figures of a summary report: name → (value, UCUM unit), as the pipeline named
    them (a figure under a hashed code by its Code Meaning)."""
    by_key = {figure.key: name for name, figure in _QC_FIGURES.items()}
    by_label = {label: group for group, label in _GROUPS.items()}
    figures: dict[str, tuple[float, str]] = {}
    measurements = _child(ds, _IMAGING_MEASUREMENTS)
    for group_item in measurements.get("ContentSequence", []) if measurements is not None else []:
        tracking = next(
            (
                i
                for i in group_item.get("ContentSequence", [])
                if _is(i, _TRACKING_IDENTIFIER) and "TextValue" in i
            ),
            None,
        )
        group = by_label.get(str(tracking.TextValue) if tracking is not None else "", "other")
        for item in group_item.get("ContentSequence", []):
            if item.get("ValueType") != "NUM" or not item.get("MeasuredValueSequence"):
                continue
            name = item.ConceptNameCodeSequence[0]
            derivation = _code_value(_child(item, _DERIVATION))
            key = (group, str(name.CodeValue), str(name.CodingSchemeDesignator), derivation)
            measured = item.MeasuredValueSequence[0]
            figures[by_key.get(key, str(name.CodeMeaning))] = (
                float(measured.NumericValue),
                str(measured.MeasurementUnitsCodeSequence[0].CodeValue),
            )
    return figures


# --------------------------------------------------------------------------- restating


def _now_stamp(ds: Dataset) -> None:
    """Content and Instance Creation Date and Time: now, in the zone of the report's
    Timezone Offset From UTC (the source's) where it states one."""
    now = _now(ds)
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S.%f")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime


def _replace(
    ds: Dataset, concept: CodedConcept, item: Dataset | None, *, after: CodedConcept | tuple[str, str]
) -> None:
    """Put ``item`` in the root's content in place of the one named ``concept`` (or after the
    one named ``after``); None removes it."""
    content = [c for c in ds.ContentSequence if not _is(c, concept)]
    if item is not None:
        at = next((n + 1 for n, c in enumerate(content) if _is(c, after)), len(content))
        content.insert(at, item)
    ds.ContentSequence = DicomSequence(content)


def restate_verdict(report: Dataset, verdict: GateOutcome) -> Dataset:
    """The report, stating ``verdict`` instead of the one it states (same instance).

    For the node's final verdict: the pipeline's report states the gate's provisional one,
    and is restated before it is recorded as an output, so the draft never leaves. The
    Preliminary Flag says FINAL for a final release or shadow verdict, else PRELIMINARY.
    """
    if not is_summary_report(report):
        raise ValueError(f"object {report.get('SOPInstanceUID')} is not a dicom-node summary report")
    verdict = _outcome("restate_verdict", verdict)
    units = {name: unit for name, (_value, unit) in reported_figures(report).items()}
    sr = copy.deepcopy(report)
    _replace(sr, _SR_GATE, _gate_container(verdict, units), after=_IMAGING_MEASUREMENTS)
    _replace(sr, _SR_REVIEW, None, after=_SR_GATE)
    sr.PreliminaryFlag = "FINAL" if _is_final(verdict) else "PRELIMINARY"
    sr.SpecificCharacterSet = "ISO_IR 192"
    _now_stamp(sr)
    _finish(sr)
    return sr


def approved_report(report: Dataset, approval: Approval, *, sop_instance_uid: str) -> Dataset:
    """A new instance of a held job's report, after a reviewer approved it for release.

    It states the held verdict with its reasons and limits as the report did, adds the
    review (decision, reviewer, when, the note as DCM "Comment"), and is VERIFIED with the
    reviewer as Verifying Observer; Preliminary Flag FINAL; the held report is its
    predecessor (Predecessor Documents Sequence). Same series, next instance number.

    Raises
    ------
    ValueError
        ``report`` does not state a final held verdict (only a held job's restated report
        can be approved), or ``approval`` names no reviewer.
    """
    stated = stated_verdict(report)
    if stated["verdict"] != _VERDICTS["hold"].value or not stated["final"]:
        raise ValueError(
            f"report {report.SOPInstanceUID} does not state a final held verdict "
            f"({stated['verdict']}, {'final' if stated['final'] else 'provisional'}): only a held "
            "job's restated report can be approved"
        )
    reviewer = (approval.reviewer or "").strip()
    if not reviewer:
        raise ValueError("approved_report: the approval names no reviewer")
    sr = copy.deepcopy(report)
    _replace(sr, _SR_REVIEW, _review_container(approval), after=_SR_GATE)
    sr.SOPInstanceUID = sop_instance_uid
    sr.InstanceNumber = int(report.get("InstanceNumber") or 1) + 1
    sr.PreliminaryFlag = "FINAL"
    sr.VerificationFlag = "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = reviewer.replace("\\", "/")[:64]
    observer.VerifyingObserverIdentificationCodeSequence = DicomSequence([])
    observer.VerifyingOrganization = _lo(approval.organization)
    observer.VerificationDateTime = approval.at.strftime("%Y%m%d%H%M%S.%f%z")
    sr.VerifyingObserverSequence = DicomSequence([observer])
    held = Dataset()
    held.ReferencedSOPClassUID = report.SOPClassUID
    held.ReferencedSOPInstanceUID = report.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = report.SeriesInstanceUID
    series.ReferencedSOPSequence = DicomSequence([held])
    study = Dataset()
    study.StudyInstanceUID = report.StudyInstanceUID
    study.ReferencedSeriesSequence = DicomSequence([series])
    sr.PredecessorDocumentsSequence = DicomSequence([study])
    sr.SpecificCharacterSet = "ISO_IR 192"
    _now_stamp(sr)
    _file_meta_keep(sr)
    _finish(sr)
    return sr
