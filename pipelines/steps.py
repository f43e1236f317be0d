"""Reusable pipeline stages: select → load → predict → score → gate (encode: ``encode.py``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pydicom

from models.base import Model
from models.hallucination import data_consistency_score, suspect_regions
from pipelines.base import InputInstance, PipelineError
from pipelines.stages import Context
from pipelines.volume import SeriesError, load_series

CT_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"})
MR_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"})
_OWN_MANUFACTURER = "dicom-node"


def made_by_this_node(path: str) -> bool:
    """True for objects this node wrote (never feed an AI output back into a pipeline)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ContributingEquipmentSequence"])
    return any(
        str(item.get("Manufacturer", "")) == _OWN_MANUFACTURER
        for item in ds.get("ContributingEquipmentSequence", [])
    )


@dataclass(frozen=True)
class SelectSeries:
    """Pick the series to process: the largest series of the wanted SOP classes."""

    sop_classes: frozenset[str]
    what: str = "image"
    name: str = "select"

    def run(self, ctx: Context) -> Context:
        by_series: dict[str, list[InputInstance]] = defaultdict(list)
        for inst in ctx.study.instances:
            if inst.sop_class_uid in self.sop_classes:
                by_series[inst.series_uid].append(inst)
        candidates = [s for s in by_series.values() if not made_by_this_node(str(s[0].path))]
        if not candidates:
            raise PipelineError(f"no {self.what} series in study {ctx.study.study_uid} to process")
        chosen = max(candidates, key=len)
        return ctx.evolve(series=tuple(chosen))


@dataclass(frozen=True)
class LoadVolume:
    """Read the selected series and build the volume (refusing what is not one volume)."""

    resample: bool = False
    name: str = "load"

    def run(self, ctx: Context) -> Context:
        datasets = [pydicom.dcmread(i.path) for i in ctx.series]
        try:
            volume = load_series(datasets, resample=self.resample)
        except SeriesError as exc:
            raise PipelineError(str(exc)) from None
        return ctx.evolve(volume=volume)


@dataclass(frozen=True)
class Predict:
    """Run the model: restored volume and its per-voxel standard deviation."""

    model: Model
    name: str = "predict"

    def run(self, ctx: Context) -> Context:
        volume = ctx.need_volume()
        prediction = self.model.predict(volume.array, volume.spacing)
        return ctx.evolve(model=self.model.card, prediction=prediction)


@dataclass(frozen=True)
class ScoreHallucination:
    """Data-consistency score of output vs input, and suspect regions above a threshold."""

    noise_sigma: float | None = None  # None: estimate from the input (Immerkær)
    threshold: float = 5.0
    window: int = 7
    min_voxels: int = 6
    name: str = "score"

    def run(self, ctx: Context) -> Context:
        from models.classical import immerkaer_sigma

        volume = ctx.need_volume()
        prediction = ctx.need_prediction()
        sigma = self.noise_sigma
        if sigma is None:
            picks = volume.array[:: max(1, len(volume.array) // 8)]
            sigma = float(np.median([immerkaer_sigma(s) for s in picks]))
        score = data_consistency_score(volume.array, prediction.mean, sigma, window=self.window)
        suspect = suspect_regions(score, self.threshold, min_voxels=self.min_voxels)
        voxel_ml = volume.spacing[0] * volume.spacing[1] * volume.spacing[2] / 1000.0
        units = volume.units or "1"
        qc = {
            **ctx.qc,
            "input noise sigma": (round(sigma, 3), units),
            "mean uncertainty": (round(float(prediction.sigma.mean()), 3), units),
            "hallucination score p99": (round(float(np.percentile(score, 99)), 3), "1"),
            "suspect fraction": (round(float(suspect.mean()), 6), "1"),
            "suspect volume": (round(float(suspect.sum() * voxel_ml), 3), "ml"),
            "suspect threshold": (self.threshold, "1"),
        }
        return ctx.evolve(hallucination=score, suspect=suspect, qc=qc)


@dataclass(frozen=True)
class Gate:
    """The verdict written with the outputs. The policy engine decides it later; until
    then every output is released automatically and the QC figures are recorded."""

    verdict: str = "auto"
    name: str = "gate"

    def run(self, ctx: Context) -> Context:
        return ctx.evolve(gate=self.verdict)
