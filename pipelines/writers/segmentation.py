"""Segmentations (highdicom): suspect regions, where the model may have invented content
(one BINARY segment, every slice encoded by default; :class:`SuspectRegionWriter`), and
tumour extents (a segment per extent; :class:`TumourExtentWriter`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from pipelines.provenance import OutputProvenance
from pipelines.uids import UidFactory
from pipelines.volume import Volume
from pipelines.writers.common import (
    _CONTENT_LABELS,
    KIND_EXTENT,
    KIND_SUSPECT,
    NODE_MANUFACTURER,
    _ai_series_description,
    _check_array,
    _check_provenance,
    _check_series_number,
    _check_uids,
    _contributing_equipment,
    _copy_anatomy,
    _copy_patient_and_study,
    _finish,
    _geometry,
    _keep_request,
    _keep_timezone,
    _lo,
    _software_versions,
    output_character_set,
)
from pipelines.writers.files import _file_meta_keep, save

__all__ = [
    "EXTENT_CATEGORY",
    "EXTENT_TYPE",
    "SUSPECT_CATEGORY",
    "SUSPECT_LABEL",
    "SUSPECT_TYPE",
    "SuspectRegionWriter",
    "TumourExtentWriter",
]

#: SCT 309825002 "Spatial and Relational Concept" (CID 7150) — the region is a place in
#: the image, not patient anatomy or pathology.
SUSPECT_CATEGORY = CodedConcept.from_code(codes.SCT.SpatialAndRelationalConcept)
#: DCM 111207 "Image artifact(s)" — content the imaging chain (here: the model) put there.
SUSPECT_TYPE = CodedConcept("111207", "DCM", "Image artifact(s)")
SUSPECT_LABEL = "suspect region (possible AI hallucination)"


def _slice_thickness_from_geometry(seg: Dataset, measures: hd.PixelMeasuresSequence) -> None:
    """Slice Thickness (Type 1C in the Pixel Measures) from the volume's geometry when the
    source has none: highdicom keeps the source's own pixel measures when their spacing
    matches, and a source may lack it (Type 2 in CT and MR Image)."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    kept = shared.PixelMeasuresSequence[0]
    if str(kept.get("SliceThickness", "") or "").strip() or "SliceThickness" not in measures[0]:
        return
    item = copy.deepcopy(kept)  # the source's item itself, for a multi-frame source
    item.SliceThickness = measures[0].SliceThickness
    shared.PixelMeasuresSequence = DicomSequence([item])


def _algorithm(prov: OutputProvenance) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification of a segment: the model, family CID 7162 "Artificial
    Intelligence", parameters pipeline and weights sha256."""
    return hd.AlgorithmIdentificationSequence(
        name=_lo(prov.model_name),
        version=_lo(prov.model_version),
        family=codes.cid7162.ArtificialIntelligence,
        source=_lo(f"{NODE_MANUFACTURER} {prov.node_version}"),
        parameters={
            "pipeline": f"{prov.pipeline} {prov.pipeline_version}",
            "weights_sha256": prov.weights_sha256,
        },
    )


class SuspectRegionWriter:
    """Regions the model may have invented, as a BINARY Segmentation with one segment.

    The segment is "suspect region (possible AI hallucination)": category SCT 309825002
    "Spatial and Relational Concept", type DCM 111207 "Image artifact(s)", algorithm type
    AUTOMATIC, Algorithm Identification from the provenance (family CID 7162 "Artificial
    Intelligence", parameters pipeline and weights sha256).

    Every slice is encoded, empty ones included (``omit_empty_frames=False``): an empty
    frame says "assessed, nothing suspect", which an omitted one would not; an all-empty
    mask thus still gives a complete, valid object.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the segmentation's series.
    omit_empty_frames
        Leave out slices without suspect voxels (smaller; "not assessed" and "nothing
        found" then look alike). Default False.
    name
        Name of the series in ``uids``.
    """

    kind: ClassVar[str] = KIND_SUSPECT

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        omit_empty_frames: bool = False,
        name: str = "suspect",
    ) -> None:
        owner = type(self).__name__
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        self.omit_empty_frames = bool(omit_empty_frames)
        self.name = name

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    def algorithm(self) -> hd.AlgorithmIdentificationSequence:
        return _algorithm(self.provenance)

    def write(self, volume: Volume, mask: np.ndarray, out_dir: Path | None = None) -> Dataset:
        """One Segmentation of ``mask`` (boolean, shape of the volume).

        Parameters
        ----------
        volume
            The source volume.
        mask
            ``(slices, rows, columns)``, True where content may be invented.
        out_dir
            When given, the object is also saved there (see :func:`save`).
        """
        owner = type(self).__name__
        values = _check_array(owner, volume, mask, "mask")
        if values.dtype != bool:
            if not np.isin(values, (0, 1)).all():
                raise ValueError(f"{owner}: 'mask' must be boolean (or 0/1)")
        prov = self.provenance
        measures, orientation, positions = _geometry(volume)
        segment = hd.seg.SegmentDescription(
            segment_number=1,
            segment_label=SUSPECT_LABEL,
            segmented_property_category=SUSPECT_CATEGORY,
            segmented_property_type=SUSPECT_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=self.algorithm(),
            tracking_uid=self.uids.instance(self.name + "-tracking", 1),
            tracking_id="AI suspect region",
            display_color=hd.color.CIELabColor(53.2, 80.1, 67.2),  # red
        )
        seg = hd.seg.Segmentation(
            source_images=list(volume.datasets),
            specific_character_set=output_character_set(volume.datasets[0]),
            pixel_array=values.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=self.series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.instance(self.name, 1),
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            manufacturer_model_name=_lo(prov.pipeline),
            software_versions=_software_versions(prov),
            device_serial_number=prov.weights_sha256,
            content_description="AI suspect regions: where the model may have invented content",
            content_label=_CONTENT_LABELS[KIND_SUSPECT],
            pixel_measures=measures,
            plane_orientation=orientation,
            plane_positions=positions,
            omit_empty_frames=self.omit_empty_frames,
            contributing_equipment=_contributing_equipment(prov, include_acquisition=False),
        )
        seg.SeriesDescription = _ai_series_description("suspect regions (possible hallucination)")
        _slice_thickness_from_geometry(seg, measures)
        _copy_anatomy(seg, volume.datasets[0], empty_laterality=False)
        _copy_patient_and_study(seg, volume.datasets[0])
        _keep_timezone(seg, volume.datasets[0])
        _keep_request(seg, volume.datasets[0])
        _file_meta_keep(seg)
        _finish(seg, prov)
        if out_dir is not None:
            save([seg], out_dir)
        return seg


#: Segmented Property Category and Type of a tumour extent (CID 7150 / SCT).
EXTENT_CATEGORY = codes.cid7150.MorphologicallyAbnormalStructure
EXTENT_TYPE = codes.SCT.Neoplasm


class TumourExtentWriter:
    """Tumour extents as a BINARY Segmentation with one segment per extent (e.g. the
    predicted extent at the follow-up next to the current one: ``prognosis``).

    Each segment is category SCT 49755003 "Morphologically Abnormal Structure", type SCT
    108369006 "Neoplasm", algorithm type AUTOMATIC with the provenance's Algorithm
    Identification, and its label says what it is. Every slice is encoded.

    Parameters
    ----------
    provenance, uids, series_number
        As for every writer.
    description
        Series Description (after "AI"), e.g. ``"tumour extent, predicted at +90 days and current"``.
    name
        Name of the series in ``uids``.
    """

    kind: ClassVar[str] = KIND_EXTENT

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        description: str,
        name: str = "extent",
    ) -> None:
        owner = type(self).__name__
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        if not description or not description.strip():
            raise ValueError(f"{owner}: argument 'description' is required")
        self.description = description.strip()
        self.name = name

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    def write(
        self, volume: Volume, extents: Sequence[tuple[str, np.ndarray]], out_dir: Path | None = None
    ) -> Dataset:
        """One Segmentation with a segment per ``(label, mask)`` (boolean, shape of the volume)."""
        owner = type(self).__name__
        if not extents:
            raise ValueError(f"{owner}: 'extents' is empty")
        masks = []
        for label, mask in extents:
            values = _check_array(owner, volume, mask, f"mask {label!r}")
            if values.dtype != bool and not np.isin(values, (0, 1)).all():
                raise ValueError(f"{owner}: mask {label!r} must be boolean (or 0/1)")
            masks.append(values.astype(np.uint8))
        prov = self.provenance
        algorithm = _algorithm(prov)
        colours = (hd.color.CIELabColor(60.3, 98.2, -60.8), hd.color.CIELabColor(97.1, -21.6, 94.5))
        segments = [
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=_lo(label),
                segmented_property_category=EXTENT_CATEGORY,
                segmented_property_type=EXTENT_TYPE,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=self.uids.instance(f"{self.name}-tracking", n),
                tracking_id=_lo(label),
                display_color=colours[(n - 1) % len(colours)],
            )
            for n, (label, _) in enumerate(extents, 1)
        ]
        measures, orientation, positions = _geometry(volume)
        seg = hd.seg.Segmentation(
            source_images=list(volume.datasets),
            specific_character_set=output_character_set(volume.datasets[0]),
            pixel_array=np.stack(masks, axis=-1),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=self.series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.instance(self.name, 1),
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            manufacturer_model_name=_lo(prov.pipeline),
            software_versions=_software_versions(prov),
            device_serial_number=prov.weights_sha256,
            content_description=_lo(f"AI {self.description}"),
            content_label=_CONTENT_LABELS[KIND_EXTENT],
            pixel_measures=measures,
            plane_orientation=orientation,
            plane_positions=positions,
            omit_empty_frames=False,
            contributing_equipment=_contributing_equipment(prov, include_acquisition=False),
        )
        seg.SeriesDescription = _ai_series_description(self.description)
        _slice_thickness_from_geometry(seg, measures)
        _copy_anatomy(seg, volume.datasets[0], empty_laterality=False)
        _copy_patient_and_study(seg, volume.datasets[0])
        _keep_timezone(seg, volume.datasets[0])
        _keep_request(seg, volume.datasets[0])
        _file_meta_keep(seg)
        _finish(seg, prov)
        if out_dir is not None:
            save([seg], out_dir)
        return seg
