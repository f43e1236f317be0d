"""``sct``: a T1-weighted MR planning series → synthetic CT in HU, for the planning system.

The learned model (``models/zoo/sct-head``, :class:`models.sct.SctModel`) predicts, from
each MR slice and its neighbours, the HU and its calibrated σ in one pass; the
hallucination map asks whether the MR supports each HU (an MR-intensity × depth table
fitted on the training pairs). Outputs: the sCT as **CT Image Storage** in HU on the
MR's frame of reference (each slice exactly where its MR slice is), the uncertainty
Parametric Map (HU), the hallucination Parametric Map, the suspect-region SEG, the
Comprehensive SR and a Secondary Capture overlay. A ``tps`` destination's checks
(``dicom_node.delivery.tps``) run on the sCT before the gate. A series outside the model
card's input domain — not an axial T1-weighted head, by its tags or its pixels — is
refused before the model runs (:mod:`pipelines.domain`).

The model is the newest shipped ``sct-head`` unless the node's config pins another version
or a site's model directory (``[models] pin``), e.g. a model trained at the site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from models.hallucination import suspect_regions
from models.sct import SctModel
from pipelines import fov
from pipelines.base import InputRefused, PipelineError
from pipelines.domain import CheckInputHeaders, CheckInputImage, domain_of_card
from pipelines.encode import Encode
from pipelines.stages import Context, StagedPipeline
from pipelines.steps import MR_CLASSES, Gate, LoadVolume, SelectSeries, inject_hallucination, suspect_figures
from pipelines.validate import Validate
from pipelines.writers import SYNTHESIS

_HU = "[hnsf'U]"


# -- the input ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequireFrameOfReference:
    """Refuse an MR series without a Frame of Reference UID.

    The sCT goes to a planning system, which places it by the MR's frame (the structures
    drawn on the MR are on it); a frame made up here would place it nowhere the TPS knows.
    The slice-wise pipelines (``restoration``, ``denoise-classical``) give such a series a
    derived frame instead (:class:`pipelines.encode.Encode`). The job ends ``refused``.
    """

    #: "name version" of the model, for the message.
    model: str
    name: str = "check-frame-of-reference"

    def run(self, ctx: Context) -> Context:
        for inst in ctx.series:
            ds = pydicom.dcmread(inst.path, stop_before_pixels=True, specific_tags=["FrameOfReferenceUID"])
            if not ds.get("FrameOfReferenceUID"):
                reason = (
                    f"no Frame of Reference UID (instance {inst.sop_uid}): a synthetic CT must be on "
                    "the MR's own frame for the planning system to place it; send the series from a "
                    "scanner or archive that writes one"
                )
                raise InputRefused(self.model, inst.series_uid, [reason])
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

    Outside the field of view (:mod:`pipelines.fov`) the model sees the background level,
    the sCT is air with σ 0, the score is 0 and no figure counts it.
    """

    model: SctModel
    threshold: float = 5.0
    min_region_mm3: float = 30.0
    name: str = "predict"

    def run(self, ctx: Context) -> Context:
        volume = ctx.need_volume()
        series = volume.series_uid
        mr = fov.model_input(volume)
        result = self.model.predict_full(mr, volume.spacing)
        body = fov.inside(volume, result.body)
        if not body.any():
            raise PipelineError(f"MR series {series}: no head found in the images (is the series blank?)")
        prediction = fov.as_delivered(volume, result.prediction, outside=fov.AIR_HU)
        score = fov.clear_outside(volume, result.score)
        drill = ctx.study.options.get("inject_hallucination_hu")
        if drill:  # the gate fire drill (see pipelines.steps.inject_hallucination)
            prediction = inject_hallucination(prediction, float(drill), volume.spacing)
            score = self.model.score(mr, prediction.mean, prediction.sigma, volume.spacing)
            score = fov.clear_outside(volume, score)
        voxel_mm3 = float(np.prod(volume.spacing))
        min_voxels = max(2, math.ceil(self.min_region_mm3 / voxel_mm3))
        suspect = suspect_regions(score, self.threshold, min_voxels=min_voxels) & body
        voxel_ml = voxel_mm3 / 1000.0
        qc: dict[str, tuple[float, str]] = {
            **ctx.qc,
            "mean calibrated sigma in body": (round(float(prediction.sigma[body].mean()), 3), _HU),
        }
        interfaces = fov.inside(volume, result.interfaces)
        if interfaces.any():
            qc["mean sigma at bone/air interfaces"] = (
                round(float(prediction.sigma[interfaces].mean()), 3),
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
    domain, model_label = domain_of_card(vars(model.meta), "MR")
    return StagedPipeline(
        name="sct",
        version="1.0",
        stages=(
            SelectSeries(MR_CLASSES, what="MR", domain=domain),
            CheckInputHeaders((domain,), model_label),
            RequireFrameOfReference(f"{model.card.name} {model.card.version}"),
            LoadVolume(),
            CheckInputImage((domain,), model_label),
            fov.DetectFieldOfView(),
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
