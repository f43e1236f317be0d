"""Secondary Capture overlay: an RGB heat map of one slice, burned in.

It illustrates a Hallucination Parametric Map and never replaces it: the map is a
required argument and is referenced. See :class:`OverlayWriter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ParametricMapStorage

from pipelines import spill
from pipelines.geometry import planes_of
from pipelines.provenance import OutputProvenance
from pipelines.quantiles import upper_percentile_of_parts
from pipelines.uids import UidFactory
from pipelines.volume import Volume
from pipelines.writers.common import (
    KIND_OVERLAY,
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
    _keep_request,
    _keep_timezone,
    _lo,
    _referenced_series,
    _software_versions,
    _source_image_item,
    _source_window,
    _sources_by_uid,
    _window_of,
    output_character_set,
)
from pipelines.writers.files import _file_meta_keep, save

__all__ = ["OverlayWriter"]


def _hot(s: np.ndarray) -> np.ndarray:
    """Black-red-yellow-white colours for ``s`` in [0, 1], (…, 3) in [0, 1]."""
    return np.stack([np.clip(3 * s, 0, 1), np.clip(3 * s - 1, 0, 1), np.clip(3 * s - 2, 0, 1)], axis=-1)


class OverlayWriter:
    """A Secondary Capture RGB heat map of one slice: a picture, never the only record.

    ``write`` requires the Hallucination Parametric Map it illustrates and references it
    (and the source slice) in the Source Image Sequence; Burned In Annotation is YES.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the overlay's series.
    threshold
        Score at which colour starts; default the 95th percentile of the score volume.
    name
        Name of the series in ``uids``.
    """

    kind: ClassVar[str] = KIND_OVERLAY

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        threshold: float | None = None,
        name: str = "overlay",
    ) -> None:
        owner = type(self).__name__
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        self.threshold = threshold
        self.name = name

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    @staticmethod
    def busiest_slice(score: np.ndarray, mask: np.ndarray | None = None) -> int:
        """The slice with the largest hallucination burden (mask voxels, else positive score)."""
        burden = mask.reshape(len(mask), -1).sum(axis=1) if mask is not None and mask.any() else None
        if burden is None:  # a slab at a time: the score may be file-backed (pipelines.spill)
            burden = np.zeros(len(score))
            for part in spill.slabs(len(score)):
                burden[part] = np.clip(score[part], 0, None).reshape(part.stop - part.start, -1).sum(axis=1)
                spill.release(score)
        return int(np.argmax(burden))

    def write(
        self,
        volume: Volume,
        score: np.ndarray,
        *,
        hallucination_map: Dataset,
        mask: np.ndarray | None = None,
        slice_index: int | None = None,
        out_dir: Path | None = None,
    ) -> Dataset:
        """The heat-map overlay of one slice.

        Parameters
        ----------
        volume
            The source volume (the grey background).
        score
            The hallucination score volume written in ``hallucination_map``.
        hallucination_map
            The Parametric Map of ``score``; required, so the overlay is never the only
            record, and referenced by the overlay.
        mask
            Suspect-region mask, to choose the slice; optional.
        slice_index
            The slice to show; default :meth:`busiest_slice`.
        out_dir
            When given, the object is also saved there (see :func:`save`).
        """
        owner = type(self).__name__
        values = _check_array(owner, volume, score, "score").astype(np.float32, copy=False)
        if (
            not isinstance(hallucination_map, Dataset)
            or hallucination_map.get("SOPClassUID") != ParametricMapStorage
        ):
            raise TypeError(
                f"{owner}: 'hallucination_map' must be the Parametric Map the overlay illustrates"
            )
        if hallucination_map.get("FrameOfReferenceUID") != volume.frame_of_reference_uid:
            raise ValueError(f"{owner}: 'hallucination_map' is not in the volume's frame of reference")
        k = self.busiest_slice(values, mask) if slice_index is None else int(slice_index)
        if not 0 <= k < len(volume.slices):
            raise ValueError(f"{owner}: slice_index {k} outside 0..{len(volume.slices) - 1}")
        ref = volume.slices[k]
        source = _sources_by_uid(volume)[ref.sop_instance_uid]
        prov = self.provenance

        center, width = _source_window(source, ref.frame_number) or _window_of(volume.array)
        grey = np.clip((volume.array[k] - (center - width / 2)) / width, 0, 1)
        spill.release(volume.array)

        threshold = (
            upper_percentile_of_parts(spill.values(values), 95.0)
            if self.threshold is None
            else float(self.threshold)
        )
        top = max(spill.min_max(values)[1], threshold + 1e-6)
        shown = spill.read(values, slice(k, k + 1))[0]
        s = np.clip((shown - threshold) / (top - threshold), 0, 1)
        alpha = np.where(shown > threshold, 0.35 + 0.5 * s, 0.0)[..., None]
        rgb = (1 - alpha) * grey[..., None] + alpha * _hot(0.35 + 0.65 * s)
        pixels = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)

        row_letter, column_letter, _ = hd.spatial.get_closest_patient_orientation(volume.direction())
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            specific_character_set=output_character_set(source),
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=self.series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.instance(self.name, 1),
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            pixel_spacing=(float(volume.spacing[1]), float(volume.spacing[2])),  # type: ignore[arg-type]
            patient_orientation=(row_letter.value, column_letter.value),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=_contributing_equipment(prov, include_acquisition=False),
        )
        # from_ref_dataset copies a handful of Patient and Study attributes; the overlay
        # carries them all, as every output does (an overlay without the Issuer of Patient
        # ID could be filed under another patient where IDs are only unique per issuer)
        _copy_patient_and_study(sc, source)
        _keep_timezone(sc, source)
        _keep_request(sc, source)
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.BurnedInAnnotation = "YES"
        _copy_anatomy(sc, source, empty_laterality=True)
        sc.SeriesDescription = _ai_series_description("hallucination overlay (picture only)")
        sc.ManufacturerModelName = _lo(prov.pipeline)
        sc.SoftwareVersions = _software_versions(prov)
        sc.ImageComments = (
            f"AI hallucination heat map of slice {k + 1}; score >= {threshold:.3g} coloured. "
            "Picture only: the Parametric Map is the record."
        )
        sc.DerivationDescription = prov.description() + f"; heat map of slice {k + 1} from hallucination map"
        map_frame = _pm_frame_of(hallucination_map, ref.position)
        sc.SourceImageSequence = [
            _source_image_item(ref.sop_class_uid, ref.sop_instance_uid, ref.frame_number),
            _source_image_item(ParametricMapStorage, str(hallucination_map.SOPInstanceUID), map_frame),
        ]
        sc.ReferencedSeriesSequence = _referenced_series(
            [
                (volume.series_uid, ref.sop_class_uid, ref.sop_instance_uid),
                (
                    str(hallucination_map.SeriesInstanceUID),
                    ParametricMapStorage,
                    str(hallucination_map.SOPInstanceUID),
                ),
            ]
        )
        _file_meta_keep(sc)
        _finish(sc, prov)
        if out_dir is not None:
            save([sc], out_dir)
        return sc


def _pm_frame_of(pm: Dataset, position: Sequence[float]) -> int | None:
    """The 1-based frame of a multi-frame object at ``position`` (None if none matches)."""
    planes, _ = planes_of(pm)
    for plane in planes:
        if np.allclose(plane.position, position, atol=1e-3):
            return plane.frame_number
    return None
