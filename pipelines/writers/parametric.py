"""Parametric Maps (highdicom): how sure the model was, and where it may have invented.

* :class:`UncertaintyMapWriter` — float32, e.g. one SD, in the units of the image it
  qualifies;
* :class:`HallucinationMapWriter` — a unitless score (higher: more likely invented).

Both are one multi-frame object over every slice of the source volume, on its geometry,
with a Real World Value Mapping that says what one value is.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines import spill
from pipelines.provenance import OutputProvenance
from pipelines.uids import UidFactory
from pipelines.volume import Volume
from pipelines.writers.common import (
    _CONTENT_LABELS,
    KIND_HALLUCINATION,
    KIND_PROBABILITY,
    KIND_UNCERTAINTY,
    NODE_MANUFACTURER,
    _ai_series_description,
    _check_array,
    _check_provenance,
    _check_series_number,
    _check_uids,
    _concept,
    _contributing_equipment,
    _copy_anatomy,
    _copy_patient_and_study,
    _finish,
    _geometry,
    _keep_request,
    _keep_timezone,
    _lo,
    _software_versions,
    _window_of,
    local_code,
    output_character_set,
    ucum,
)
from pipelines.writers.files import _file_meta_keep, save

__all__ = ["HallucinationMapWriter", "ProbabilityMapWriter", "UncertaintyMapWriter", "map_values"]

#: The largest stored value of an integer (uint16) map: its range in 65 535 steps.
INTEGER_LEVELS = 65535


def quantise(values: np.ndarray, low: float, step: float) -> np.ndarray:
    """``round((values − low) / step)`` as uint16, a slab at a time (no float64 copy of a
    long series), clipped to 0 … 65 535."""
    out = np.empty(values.shape, np.uint16)
    flat_in, flat_out = values.reshape(len(values), -1), out.reshape(len(values), -1)
    for start in range(0, len(values), 16):
        part = (flat_in[start : start + 16] - np.float32(low)) * np.float32(1.0 / step)
        np.rint(part, out=part)
        np.clip(part, 0, INTEGER_LEVELS, out=part)
        flat_out[start : start + 16] = part
        spill.release(values)
    return out


def map_values(ds: Dataset) -> np.ndarray:
    """A Parametric Map's real-world values, float32, shaped (frames, rows, columns): a
    float map as stored; an integer map through its Real World Value Mapping (slope and
    intercept, or its LUT)."""
    pixels = np.asarray(ds.pixel_array)
    pixels = pixels.reshape(-1, *pixels.shape[-2:])
    if pixels.dtype.kind == "f":
        return pixels.astype(np.float32, copy=False)
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    items = shared.get("RealWorldValueMappingSequence") if shared is not None else None
    if not items:  # per frame (not how these writers write it, but valid)
        items = ds.PerFrameFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    mapping = items[0]
    if "RealWorldValueLUTData" in mapping:
        first = int(mapping.RealWorldValueFirstValueMapped)
        lut = np.asarray(mapping.RealWorldValueLUTData, np.float32)
        return lut[np.clip(pixels.astype(np.int64) - first, 0, len(lut) - 1)]
    slope = np.float32(mapping.RealWorldValueSlope)
    intercept = np.float32(mapping.RealWorldValueIntercept)
    return pixels.astype(np.float32) * slope + intercept


class _ParametricMapWriter:
    """Common ground of the two Parametric Map writers (highdicom ``ParametricMap``)."""

    kind: ClassVar[str]

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        units: str | Code | CodedConcept,
        lut_label: str,
        lut_explanation: str,
        quantity: Code | CodedConcept | None,
        content_description: str,
        series_description: str,
        name: str,
        content_qualification: str,
    ) -> None:
        owner = type(self).__name__
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        self.unit = ucum(units)
        if not lut_label or len(lut_label) > 16:
            raise ValueError(f"{owner}: 'lut_label' must be 1-16 characters (SH), got {lut_label!r}")
        self.lut_label = lut_label
        self.lut_explanation = _lo(lut_explanation)
        self.quantity = None if quantity is None else _concept(owner, "quantity", quantity)
        self.content_description = _lo(content_description)
        self.series_description = _ai_series_description(series_description)
        self.name = name
        self.content_qualification = content_qualification

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    def _validate(self, values: np.ndarray) -> None:
        """Hook for value checks of a particular map."""

    def write(
        self, volume: Volume, values: np.ndarray, out_dir: Path | None = None, *, integer: bool = False
    ) -> Dataset:
        """One multi-frame Parametric Map over all slices of ``volume``.

        Parameters
        ----------
        volume
            The source volume; frame ``k`` sits at ``volume.slices[k].position``.
        values
            ``(slices, rows, columns)`` map, stored as 32-bit float.
        out_dir
            When given, the object is also saved there (see :func:`save`).
        integer
            Store 16-bit unsigned integers instead, with the Real World Value Mapping's
            slope and intercept spanning the map's range in 65 535 steps (half the bytes;
            more viewers read them). The step is ``(max − min) / 65535``: for a σ map of
            0–300 HU, 0.005 HU. :func:`map_values` reads either kind back.
        """
        owner = type(self).__name__
        pixels = _check_array(owner, volume, values, "values").astype(np.float32, copy=False)
        self._validate(pixels)
        prov = self.provenance
        measures, orientation, positions = _geometry(volume)
        lo, hi = spill.min_max(pixels)  # a slab at a time: the map may be file-backed
        center, width = _window_of(pixels)
        if integer:
            step = (hi - lo) / INTEGER_LEVELS if hi > lo else 1.0
            stored = quantise(pixels, lo, step)
            mapping = hd.pm.RealWorldValueMapping(
                lut_label=self.lut_label,
                lut_explanation=self.lut_explanation,
                unit=self.unit,
                value_range=(0, INTEGER_LEVELS),
                slope=step,
                intercept=lo,
                quantity_definition=self.quantity,
            )
            # the window is on the stored values (no Modality LUT in a Parametric Map)
            center, width = (center - lo) / step, max(width / step, 1.0)
            del pixels
        else:
            stored = pixels
            mapping = hd.pm.RealWorldValueMapping(
                lut_label=self.lut_label,
                lut_explanation=self.lut_explanation,
                unit=self.unit,
                value_range=(lo, hi if hi > lo else lo + 1.0),
                slope=1.0,
                intercept=0.0,
                quantity_definition=self.quantity,
            )
        # LINEAR_EXACT, so a window narrower than 1 (scores, small sigmas) is valid.
        window = hd.VOILUTTransformation(
            window_center=center, window_width=width, voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT
        )
        pm = hd.pm.ParametricMap(
            source_images=list(volume.datasets),
            specific_character_set=output_character_set(volume.datasets[0]),
            pixel_array=stored,
            series_instance_uid=self.series_instance_uid,
            series_number=self.series_number,
            sop_instance_uid=self.uids.instance(self.name, 1),
            instance_number=1,
            manufacturer=NODE_MANUFACTURER,
            manufacturer_model_name=_lo(prov.pipeline),
            software_versions=_software_versions(prov),
            device_serial_number=prov.weights_sha256,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[window],
            content_description=self.content_description,
            content_label=_CONTENT_LABELS[self.kind],
            content_qualification=self.content_qualification,
            pixel_measures=measures,
            plane_orientation=orientation,
            plane_positions=positions,
            contributing_equipment=_contributing_equipment(prov, include_acquisition=False),
        )
        pm.SeriesDescription = self.series_description
        _copy_anatomy(pm, volume.datasets[0], empty_laterality=True)
        _copy_patient_and_study(pm, volume.datasets[0])
        _keep_timezone(pm, volume.datasets[0])
        _keep_request(pm, volume.datasets[0])
        _file_meta_keep(pm)
        _finish(pm, prov)
        if out_dir is not None:
            save([pm], out_dir)
        return pm


class UncertaintyMapWriter(_ParametricMapWriter):
    """How sure the model was, voxel by voxel: a float32 Parametric Map.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the map's series.
    units
        UCUM code of the map (the units of the image it qualifies, e.g. ``"[hnsf'U]"``
        for HU; see :func:`ucum_for_units`), or a coded concept.
    interval
        What one map value is, e.g. ``"one standard deviation"`` (the default; then the
        quantity is DCM 113061 "Standard Deviation") or ``"95% interval half-width"``.
    lut_label
        Real World Value Mapping LUT Label (≤ 16 characters).
    name
        Name of the series in ``uids``.
    content_qualification
        ``"RESEARCH"`` (default), ``"PRODUCT"`` or ``"SERVICE"``.
    """

    kind: ClassVar[str] = KIND_UNCERTAINTY

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        units: str | Code | CodedConcept,
        interval: str = "one standard deviation",
        lut_label: str = "AI UNCERTAINTY",
        name: str = "uncertainty",
        content_qualification: str = "RESEARCH",
    ) -> None:
        if not interval or not interval.strip():
            raise ValueError(f"{type(self).__name__}: argument 'interval' must say what one value is")
        self.interval = interval.strip()
        quantity = (
            codes.DCM.StandardDeviation
            if "standard deviation" in self.interval.lower()
            else local_code("AI-UNCERTAINTY", "AI uncertainty")
        )
        short = "1 SD" if self.interval.lower() == "one standard deviation" else self.interval
        super().__init__(
            provenance=provenance,
            uids=uids,
            series_number=series_number,
            units=units,
            lut_label=lut_label,
            lut_explanation=f"AI model uncertainty, {self.interval}",
            quantity=quantity,
            content_description=f"AI uncertainty map ({self.interval}); not a diagnostic image",
            series_description=f"AI uncertainty map ({short})",
            name=name,
            content_qualification=content_qualification,
        )

    def _validate(self, values: np.ndarray) -> None:
        low = spill.min_max(values)[0]
        if low < 0.0:
            raise ValueError(f"{type(self).__name__}: uncertainty values must be ≥ 0 (min {low:g})")


class HallucinationMapWriter(_ParametricMapWriter):
    """Where the model may have invented content: a unitless score as a Parametric Map.

    Parameters
    ----------
    provenance
        Pipeline, model and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the map's series.
    units
        UCUM code of the score; default ``"1"`` (no units).
    score_description
        What the score is (LUT Explanation), e.g. ``"z-score of ensemble disagreement"``.
    quantity
        Quantity Definition; default local ``99DCMNODE HALLUC-SCORE`` "AI hallucination
        score" (pass DCM 113071 "Z-score" for a z-score).
    lut_label
        Real World Value Mapping LUT Label (≤ 16 characters).
    name
        Name of the series in ``uids``.
    content_qualification
        ``"RESEARCH"`` (default), ``"PRODUCT"`` or ``"SERVICE"``.
    """

    kind: ClassVar[str] = KIND_HALLUCINATION

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        units: str | Code | CodedConcept = "1",
        score_description: str = "AI hallucination score (higher: more likely invented)",
        quantity: Code | CodedConcept | None = None,
        lut_label: str = "AI HALLUCINATION",
        name: str = "hallucination",
        content_qualification: str = "RESEARCH",
    ) -> None:
        super().__init__(
            provenance=provenance,
            uids=uids,
            series_number=series_number,
            units=units,
            lut_label=lut_label,
            lut_explanation=score_description,
            quantity=quantity
            if quantity is not None
            else local_code("HALLUC-SCORE", "AI hallucination score"),
            content_description="AI hallucination score map: where the model may have invented content",
            series_description="AI hallucination score map",
            name=name,
            content_qualification=content_qualification,
        )


class ProbabilityMapWriter(_ParametricMapWriter):
    """A per-voxel probability (0 .. 1) as a float32 Parametric Map, e.g. the probability
    that a predicted follow-up shows tumour there (``prognosis``).

    Parameters
    ----------
    provenance, uids, series_number
        As for every writer.
    what
        What the probability is of (LUT Explanation and Series Description), e.g.
        ``"tumour at +90 days"``.
    lut_label
        Real World Value Mapping LUT Label (≤ 16 characters).
    name
        Name of the series in ``uids``.
    """

    kind: ClassVar[str] = KIND_PROBABILITY

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        what: str,
        lut_label: str = "AI PROBABILITY",
        name: str = "probability",
        content_qualification: str = "RESEARCH",
    ) -> None:
        if not what or not what.strip():
            raise ValueError(f"{type(self).__name__}: argument 'what' must say what the probability is of")
        super().__init__(
            provenance=provenance,
            uids=uids,
            series_number=series_number,
            units="1",
            lut_label=lut_label,
            lut_explanation=f"AI probability of {what.strip()}",
            quantity=local_code("PROBABILITY", "Probability"),
            content_description=f"AI probability map: {what.strip()}"[:64],
            series_description=f"AI probability of {what.strip()}",
            name=name,
            content_qualification=content_qualification,
        )

    def _validate(self, values: np.ndarray) -> None:
        low, high = spill.min_max(values)
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{type(self).__name__}: probabilities must lie in 0 .. 1 (min {low:g}, max {high:g})"
            )
