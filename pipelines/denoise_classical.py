"""``denoise-classical``: a reference pipeline with no learned model.

Non-local means (scikit-image) per slice, the local RMS of the removed signal as its
uncertainty, and the residual data-consistency score as its hallucination map. It
exercises the whole path — select, load, predict, score, gate, encode, deliver — so the
output layer is proven end to end before the learned models land.
"""

from __future__ import annotations

from models.classical import ClassicalDenoiser, ClassicalParameters
from pipelines.domain import CLASSICAL_DOMAINS, CheckInputHeaders, CheckInputImage
from pipelines.encode import Encode
from pipelines.fov import DetectFieldOfView
from pipelines.stages import StagedPipeline
from pipelines.steps import (
    CT_CLASSES,
    MR_CLASSES,
    Gate,
    LoadVolume,
    Predict,
    ScoreHallucination,
    SelectSeries,
)
from pipelines.validate import Validate


def denoise_classical() -> StagedPipeline:
    return StagedPipeline(
        name="denoise-classical",
        version="1.0",
        stages=(
            SelectSeries(CT_CLASSES | MR_CLASSES, what="CT or MR"),
            CheckInputHeaders(CLASSICAL_DOMAINS, "denoise-classical"),
            LoadVolume(),
            CheckInputImage(CLASSICAL_DOMAINS, "denoise-classical"),
            DetectFieldOfView(),
            Predict(ClassicalDenoiser(ClassicalParameters(method="nlm"))),
            ScoreHallucination(threshold=5.0),
            Gate(),
            Encode(derived_description="denoised (classical non-local means)", synthetic=False),
            Validate(),
        ),
    )
