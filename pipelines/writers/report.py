"""Summary report (highdicom Comprehensive SR): one object that ties a job's outputs together.

Model card, QC figures, gate verdict, provenance, and references to the sources and to
every output; see :class:`SummaryReportWriter`. :func:`pipelines.provenance.provenance_of`
reads the "Source images", "AI output objects" and "Provenance" items back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.provenance import OutputProvenance
from pipelines.uids import UidFactory
from pipelines.volume import Volume
from pipelines.writers.common import (
    KIND_DERIVED,
    KIND_HALLUCINATION,
    KIND_OVERLAY,
    KIND_REPORT,
    KIND_SUSPECT,
    KIND_UNCERTAINTY,
    NODE_MANUFACTURER,
    _ai_series_description,
    _check_provenance,
    _check_series_number,
    _check_uids,
    _contributing_equipment,
    _finish,
    _lo,
    _software_versions,
    kind_of,
    local_code,
    ucum,
)
from pipelines.writers.files import _file_meta_keep, save

__all__ = ["SummaryReportWriter"]


def _sanitized_code(prefix: str, key: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Z0-9]+", "-", key.upper()).strip("-") or "X"
    value = f"{prefix}{stem}"[:16]
    n = 2
    while value in taken:
        suffix = f"-{n}"
        value = f"{prefix}{stem}"[: 16 - len(suffix)] + suffix
        n += 1
    taken.add(value)
    return value


#: DCM 121324 "Source image" (concept name of SR references to the inputs).
_SOURCE_IMAGE = CodedConcept("121324", "DCM", "Source image")
#: SR concept names of output references, by kind.
_OUTPUT_CONCEPTS = {
    KIND_DERIVED: local_code("AI-DERIVED", "AI derived image"),
    KIND_UNCERTAINTY: local_code("AI-UNCERTAINTY", "AI uncertainty map"),
    KIND_HALLUCINATION: local_code("AI-HALLUC-MAP", "AI hallucination map"),
    KIND_SUSPECT: local_code("AI-SUSPECT-SEG", "AI suspect region segmentation"),
    KIND_OVERLAY: local_code("AI-OVERLAY", "AI hallucination overlay"),
}
_SR_TITLE = local_code("AI-SUMMARY", "AI output summary")
_SR_PROVENANCE = local_code("PROVENANCE", "Provenance")
_SR_ALGORITHM = local_code("AI-MODEL", "AI model")
_SR_MODEL_CARD = local_code("MODEL-CARD", "Model card")
_SR_QC = local_code("QC", "Quality control figures")
_SR_GATE = local_code("GATE-VERDICT", "Gate verdict")
_SR_SOURCES = local_code("SOURCES", "Source images")
_SR_OUTPUTS = local_code("AI-OUTPUTS", "AI output objects")


class SummaryReportWriter:
    """One Comprehensive SR that ties the job's outputs together for a reader.

    Content (root "AI output summary", local code): the provenance line; the AI model
    (TID 4019 Algorithm Identification: name, version, parameters); the model card
    (TEXT per entry); QC figures (NUM with UCUM units); the gate verdict (TEXT); the
    source images (IMAGE, DCM 121324 "Source image"); and every output object written
    (IMAGE, one per instance). The evidence is the source images plus all outputs, so
    Current Requested Procedure Evidence Sequence lists them all.

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
        gate: str,
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
            QC figures: name → (value, UCUM unit code), e.g. ``{"mean uncertainty":
            (4.2, "[hnsf'U]"), "suspect volume": (312.0, "mm3")}``.
        gate
            The gate verdict (e.g. ``"auto"``, ``"review"``, ``"shadow"``), with any reason.
        out_dir
            When given, the object is also saved there (see :func:`save`).
        """
        owner = type(self).__name__
        if not isinstance(volume, Volume):
            raise TypeError(f"{owner}: 'volume' must be a pipelines.volume.Volume")
        if not gate or not str(gate).strip():
            raise ValueError(f"{owner}: argument 'gate' (the gate verdict) is required")
        outputs = list(outputs)
        if not outputs:
            raise ValueError(f"{owner}: 'outputs' is empty; the report summarises written objects")
        for ds in outputs:
            if ds.StudyInstanceUID != volume.study_uid:
                raise ValueError(f"{owner}: output {ds.SOPInstanceUID} belongs to another study")
        prov = self.provenance
        rel = hd.sr.RelationshipTypeValues

        root = hd.sr.ContainerContentItem(name=_SR_TITLE)
        content: list[Dataset] = [hd.sr.TextContentItem(_SR_PROVENANCE, prov.description(), rel.CONTAINS)]

        algorithm = hd.sr.ContainerContentItem(name=_SR_ALGORITHM, relationship_type=rel.CONTAINS)
        algorithm.ContentSequence = hd.sr.AlgorithmIdentification(
            name=_lo(prov.model_name),
            version=_lo(prov.model_version),
            parameters=[
                f"pipeline {prov.pipeline} {prov.pipeline_version}",
                f"weights sha256 {prov.weights_sha256}",
                f"synthetic {'yes' if prov.synthetic else 'no'}",
            ],
            family=codes.cid7162.ArtificialIntelligence,
            manufacturer=NODE_MANUFACTURER,
        )
        content.append(algorithm)

        taken: set[str] = set()
        card = hd.sr.ContainerContentItem(name=_SR_MODEL_CARD, relationship_type=rel.CONTAINS)
        card.ContentSequence = DicomSequence(
            [
                hd.sr.TextContentItem(
                    local_code(_sanitized_code("MC-", key, taken), key), value, rel.CONTAINS
                )
                for key, value in self.model_card.items()
            ]
        )
        content.append(card)

        if qc:
            figures = hd.sr.ContainerContentItem(name=_SR_QC, relationship_type=rel.CONTAINS)
            items = []
            for key, (value, unit) in qc.items():
                if not np.isfinite(float(value)):
                    raise ValueError(f"{owner}: QC figure {key!r} is not finite ({value!r})")
                concept = local_code(_sanitized_code("QC-", key, taken), key)
                items.append(
                    hd.sr.NumContentItem(concept, float(value), ucum(unit), relationship_type=rel.CONTAINS)
                )
            figures.ContentSequence = DicomSequence(items)
            content.append(figures)

        content.append(hd.sr.TextContentItem(_SR_GATE, str(gate).strip(), rel.CONTAINS))

        sources = hd.sr.ContainerContentItem(name=_SR_SOURCES, relationship_type=rel.CONTAINS)
        sources.ContentSequence = DicomSequence(
            [
                hd.sr.ImageContentItem(
                    _SOURCE_IMAGE, ds.SOPClassUID, ds.SOPInstanceUID, relationship_type=rel.CONTAINS
                )
                for ds in volume.datasets
            ]
        )
        content.append(sources)

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
        content.append(written)
        root.ContentSequence = DicomSequence(content)

        sr = hd.sr.ComprehensiveSR(
            evidence=[*volume.datasets, *outputs],
            content=root,
            series_instance_uid=self.series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.instance(self.name, 1),
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            contributing_equipment=_contributing_equipment(prov, include_acquisition=False),
            manufacturer_model_name=_lo(prov.pipeline),
            software_versions=_software_versions(prov),
            device_serial_number=prov.weights_sha256,
        )
        sr.SeriesDescription = _ai_series_description("output summary (model card, QC, gate)")
        _file_meta_keep(sr)
        _finish(sr)
        if out_dir is not None:
            save([sr], out_dir)
        return sr
