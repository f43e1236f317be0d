"""``sct``: a T1-weighted MR planning series → synthetic CT in HU, for the planning system.

The learned model (``models/zoo/sct-head``, :class:`models.sct.SctModel`) predicts, from
each MR slice and its neighbours, the HU and its calibrated σ in one pass; the
hallucination map asks whether the MR supports each HU (an MR-intensity × depth table
fitted on the training pairs). Outputs: the sCT as **CT Image Storage** in HU on the
MR's frame of reference (each slice exactly where its MR slice is), the uncertainty
Parametric Map (HU), the hallucination Parametric Map, the suspect-region SEG, the
Comprehensive SR and a Secondary Capture overlay. A ``tps`` destination's checks
(``dicom_node.delivery.tps``) run on the sCT before the gate.

The model is the newest shipped ``sct-head`` unless the node's config pins another version
or a site's model directory (``[models] pin``), e.g. a model trained at the site.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from models.hallucination import suspect_regions
from models.sct import SctModel
from pipelines.base import PipelineError
from pipelines.encode import Encode
from pipelines.stages import Context, StagedPipeline
from pipelines.steps import MR_CLASSES, Gate, LoadVolume, SelectSeries, inject_hallucination, suspect_figures
from pipelines.validate import Validate
from pipelines.writers import SYNTHESIS

_HU = "[hnsf'U]"


# -- the input contrast --------------------------------------------------------------------------
#: Acquisition rule per input contrast a model card can name: (TR ms, TE ms) → matches.
#: T1-weighted spin echo: short TR and short TE (the simulator's T1w is TR 500, TE 12).
CONTRAST_RULES: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    "t1w": ("T1-weighted (TR < 1000 ms and TE < 30 ms)", lambda tr, te: tr < 1000.0 and te < 30.0),
}


def _timing(ds: pydicom.Dataset, keyword: str, group: str) -> float | None:
    """``keyword`` at the top level, else in the shared functional group ``group`` (enhanced MR)."""
    value = ds.get(keyword)
    if value in (None, ""):
        shared = ds.get("SharedFunctionalGroupsSequence")
        items = shared[0].get(group) if shared else None
        value = items[0].get(keyword) if items else None
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class RequireInputContrast:
    """Refuse an MR series acquired with another contrast than the model was trained on.

    Judged from Repetition Time and Echo Time where the headers give them (a series
    without them passes: the node cannot tell). An inversion-prepared T1 (e.g. MPRAGE,
    TR about 2000 ms) is refused too: the model has seen T1-weighted spin echo only.
    """

    #: The model card's ``input_sequence`` (e.g. "t1w").
    sequence: str
    #: "name version" of the model, for the message.
    model: str
    name: str = "check-contrast"

    def __post_init__(self) -> None:
        if self.sequence not in CONTRAST_RULES:
            raise ValueError(
                f"model {self.model}: input sequence {self.sequence!r} has no acquisition rule "
                f"(known: {', '.join(sorted(CONTRAST_RULES))})"
            )

    def run(self, ctx: Context) -> Context:
        what, matches = CONTRAST_RULES[self.sequence]
        timings: set[tuple[float, float]] = set()
        series_uid = ctx.series[0].series_uid if ctx.series else "?"
        tags = ["RepetitionTime", "EchoTime", "EffectiveEchoTime", "SharedFunctionalGroupsSequence"]
        for inst in ctx.series:
            ds = pydicom.dcmread(inst.path, stop_before_pixels=True, specific_tags=tags)
            tr = _timing(ds, "RepetitionTime", "MRTimingAndRelatedParametersSequence")
            te = _timing(ds, "EchoTime", "MREchoSequence")
            if te is None:
                te = _timing(ds, "EffectiveEchoTime", "MREchoSequence")
            if tr is not None and te is not None:
                timings.add((tr, te))
        wrong = sorted(t for t in timings if not matches(*t))
        if wrong:
            seen = ", ".join(f"TR {tr:g} ms / TE {te:g} ms" for tr, te in wrong[:3])
            raise PipelineError(
                f"MR series {series_uid} is not {what}: it has {seen}; model {self.model} makes a "
                f"synthetic CT from {self.sequence} MR only (send the T1-weighted planning series, "
                "or select it in the policy rule)"
            )
        return ctx


# -- predict and score --------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictSct:
    """sCT (HU), calibrated σ, hallucination score and suspect regions; the QC figures.

    Suspect regions are connected voxels whose score exceeds ``threshold`` and whose
    volume is at least ``min_region_mm3``. The score is the sCT's departure from the HU
    that tissue of this MR brightness at this depth below the skin has in the training
    pairs, in units of the combined spread (table spread and σ), averaged over 3×3 px: 3
    means a coherent departure of three combined standard deviations. 30 mm³ is about a
    4 mm sphere — an invented or erased bone fragment or air pocket of that size changes
    a dose calculation. With sct-head 1.0 on held-out SIMULATED studies, threshold 5 left
    clean studies with at most 0.045 mL largest region and found an invented 6 mm
    bone-like disc as a 0.11–0.14 mL region (at 3: clean studies up to 2.8 mL).

    QC figures (σ in HU; fractions and the score over the head, where the score is defined):
    mean calibrated σ in the body; mean σ at bone/air interfaces (the dose-relevant
    uncertainty; not reported when the sCT has no interface, so a rule limiting it holds
    the job); the score's 99th percentile; suspect fraction, total and largest region.
    """

    model: SctModel
    threshold: float = 5.0
    min_region_mm3: float = 30.0
    name: str = "predict"

    def run(self, ctx: Context) -> Context:
        volume = ctx.need_volume()
        series = volume.series_uid
        result = self.model.predict_full(volume.array, volume.spacing)
        body = result.body
        if not body.any():
            raise PipelineError(f"MR series {series}: no head found in the images (is the series blank?)")
        prediction, score = result.prediction, result.score
        drill = ctx.study.options.get("inject_hallucination_hu")
        if drill:  # the gate fire drill (see pipelines.steps.inject_hallucination)
            prediction = inject_hallucination(prediction, float(drill), volume.spacing)
            score = self.model.score(volume.array, prediction.mean, prediction.sigma, volume.spacing)
        voxel_mm3 = float(np.prod(volume.spacing))
        min_voxels = max(2, math.ceil(self.min_region_mm3 / voxel_mm3))
        suspect = suspect_regions(score, self.threshold, min_voxels=min_voxels) & body
        voxel_ml = voxel_mm3 / 1000.0
        qc: dict[str, tuple[float, str]] = {
            **ctx.qc,
            "mean calibrated sigma in body": (round(float(prediction.sigma[body].mean()), 3), _HU),
        }
        if result.interfaces.any():
            qc["mean sigma at bone/air interfaces"] = (
                round(float(prediction.sigma[result.interfaces].mean()), 3),
                _HU,
            )
        qc.update(suspect_figures(score, suspect, voxel_ml, self.threshold, within=body))
        parameters: dict[str, Any] = {
            **ctx.parameters,
            "input_sequence": self.model.meta.input_sequence,
            "suspect_threshold": self.threshold,
            "suspect_min_region_mm3": self.min_region_mm3,
        }
        return ctx.evolve(
            model=self.model.card,
            prediction=prediction,
            hallucination=score,
            suspect=suspect,
            qc=qc,
            parameters=parameters,
        )


def sct(model_dir: Path | None = None) -> StagedPipeline:
    """The pipeline with the model in ``model_dir`` (None: the newest shipped version)."""
    model = SctModel(model_dir) if model_dir else SctModel.shipped()
    return StagedPipeline(
        name="sct",
        version="1.0",
        stages=(
            SelectSeries(MR_CLASSES, what="MR"),
            RequireInputContrast(model.meta.input_sequence, f"{model.card.name} {model.card.version}"),
            LoadVolume(),
            PredictSct(model),
            Gate(),
            Encode(
                derived_description="synthetic CT (sCT) from T1w MR, not for diagnosis",
                synthetic=True,
                derivation_code=SYNTHESIS,
                output_modality="CT",
                output_units="HU",
            ),
            Validate(),
        ),
    )
