"""``restoration``: low-dose CT → restored CT with calibrated σ and a hallucination map.

The learned model (``models/zoo/ldct-restoration``) predicts the restored slices and
their σ in one pass; the hallucination map is the data-consistency test of what the
model changed against the input's own noise, combined with the model's calibrated σ.
Outputs: restored CT series, uncertainty Parametric Map (HU), hallucination Parametric
Map, suspect-region SEG, Comprehensive SR, and a Secondary Capture overlay.

A series outside the model card's input domain is refused (:mod:`pipelines.domain`); one
whose noise the model's calibration never saw gets the classical baseline in the model's
place, and its report says so (:mod:`pipelines.baseline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.hallucination import suspect_regions
from models.restoration import RestorationModel
from pipelines import fov
from pipelines.baseline import ModelOrBaseline, classical_baseline
from pipelines.domain import CheckInputHeaders, CheckInputImage, domain_of_card
from pipelines.encode import Encode
from pipelines.stages import Context, StagedPipeline
from pipelines.steps import CT_CLASSES, Gate, LoadVolume, Predict, SelectSeries, suspect_figures
from pipelines.validate import Validate

#: Slices scored at a time (bounds the temporaries; the score is per slice).
SCORE_SLAB = 32


@dataclass(frozen=True)
class ScoreRestoration:
    """The restoration hallucination map and its suspect regions (0 and none outside the
    field of view; the QC figures are taken inside it)."""

    model: RestorationModel
    threshold: float = 6.0
    min_voxels: int = 6
    name: str = "score"

    def run(self, ctx: Context) -> Context:
        volume = ctx.need_volume()
        prediction = ctx.need_prediction()
        # scored a slab at a time: no volume-sized copies of the filled input and output
        score = np.empty(volume.array.shape, np.float32)
        for start in range(0, len(score), SCORE_SLAB):
            part = slice(start, start + SCORE_SLAB)
            observed, restored = fov.scoring_pair(volume, prediction, part)
            score[part] = fov.clear_outside(
                volume, self.model.score(observed, restored, prediction.sigma[part]), part
            )
        suspect = suspect_regions(score, self.threshold, min_voxels=self.min_voxels)
        voxel_ml = volume.spacing[0] * volume.spacing[1] * volume.spacing[2] / 1000.0
        body = fov.inside(volume, volume.array > -500)
        units = volume.units or "1"
        qc = {
            **ctx.qc,
            "mean calibrated sigma in body": (round(float(prediction.sigma[body].mean()), 3), units),
            **suspect_figures(score, suspect, voxel_ml, self.threshold, within=volume.fov),
        }
        return ctx.evolve(hallucination=score, suspect=suspect, qc=qc)


def restoration(model_dir: Path | None = None, precision: str = "auto") -> StagedPipeline:
    """The pipeline with the model in ``model_dir`` (None: the newest shipped version),
    its network run in ``precision`` (see :func:`models.restoration.choose_precision`)."""
    model = (
        RestorationModel(model_dir, precision=precision)
        if model_dir
        else RestorationModel.shipped(precision=precision)
    )
    domain, model_label = domain_of_card(vars(model.meta), "CT")
    return StagedPipeline(
        name="restoration",
        version="1.0",
        precision=model.precision,
        stages=(
            SelectSeries(CT_CLASSES, what="CT"),
            CheckInputHeaders((domain,), model_label),
            LoadVolume(),
            CheckInputImage((domain,), model_label),
            fov.DetectFieldOfView(),
            ModelOrBaseline(
                model,
                learned=(Predict(model), ScoreRestoration(model)),
                baseline=classical_baseline(),
                noise_hu=domain.calibrated_noise_hu,
            ),
            Gate(),
            # integer maps: σ's step is (max σ)/65535, ~0.005 HU for a 300 HU maximum, far
            # below any σ in a body (design notes, issue 20); half the bytes to send
            Encode(derived_description="restored low-dose CT", synthetic=False, integer_maps=True),
            Validate(),
        ),
    )
