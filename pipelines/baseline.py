"""Never worse than the classical baseline: the learned model runs only within its depth.

A learned model's calibration saw a range of input noise (the model card's
``input_domain.calibrated_noise_hu``, measured on its calibration slices). An input whose
own noise estimate lies outside that range is one the model was never shown: its output
and its σ are extrapolations. There :class:`ModelOrBaseline` runs the classical baseline
(non-local means, exactly as the ``denoise-classical`` pipeline runs it) instead of the
model, in the same job, to the same destinations and under the same gate.

What ran and why is in the QC figures, so in the report every output carries (the SR)
and in the provenance record: the input noise estimate, the calibrated range, and
:data:`BASELINE_RAN` (1: the classical baseline ran, 0: the model did). The report's
model identification names the method that made the pixels (``classical-nlm`` or the
learned model), and the run's parameters say why in words.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.base import Model
from models.classical import ClassicalDenoiser, ClassicalParameters
from pipelines.domain import CalibratedNoise
from pipelines.stages import Context, Stage
from pipelines.steps import Predict, ScoreHallucination
from pipelines.volume import Volume

#: QC figure names (≤ 64 characters: the report's concept names).
NOISE_ESTIMATE = "input noise estimate (field of view)"
CALIBRATED_LOW = "model calibrated input noise min"
CALIBRATED_HIGH = "model calibrated input noise max"
BASELINE_RAN = "classical baseline ran: input noise outside model range"

#: Immerkær's noise operator (CVIU 1996), as :func:`models.classical.immerkaer_sigma` uses it.
_LAPLACE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
#: Below this a CT voxel is padding or outside the reconstruction circle, not image.
_PADDING_BELOW_HU = -1100.0


def slice_noise_hu(plane: np.ndarray, inside: np.ndarray | None = None) -> float:
    """Immerkær's noise σ of one slice over the voxels whose 3×3 neighbourhood is inside
    the field of view; on a slice that is all image it equals
    :func:`models.classical.immerkaer_sigma` (which leaves out the edge pixels alike)."""
    plane = np.asarray(plane, np.float32)
    valid = plane > _PADDING_BELOW_HU if inside is None else inside & (plane > _PADDING_BELOW_HU)
    core = ndimage.binary_erosion(valid, np.ones((3, 3), bool), border_value=0)
    if not core.any():
        return 0.0
    response = ndimage.convolve(plane, _LAPLACE, mode="reflect")
    return float(math.sqrt(math.pi / 2) * np.abs(response[core]).mean() / 6.0)


def input_noise_hu(volume: Volume) -> float:
    """The input's noise estimate (estimator ``immerkaer-fov-median``): the median over up to
    8 evenly spaced slices of :func:`slice_noise_hu` within the field of view."""
    array = volume.array
    picks = range(0, len(array), max(1, len(array) // 8))
    inside = volume.fov
    return float(np.median([slice_noise_hu(array[k], None if inside is None else inside[k]) for k in picks]))


def classical_baseline() -> tuple[Stage, ...]:
    """Predict and score as the ``denoise-classical`` pipeline does (non-local means)."""
    return (Predict(ClassicalDenoiser(ClassicalParameters(method="nlm"))), ScoreHallucination(threshold=5.0))


@dataclass(frozen=True)
class ModelOrBaseline:
    """Predict and score with the learned model when the input's noise is within what its
    calibration saw, else with the classical baseline; say which ran and why.

    ``noise_hu`` None (a card that records no range): the model always runs.
    """

    #: The learned model (its card names it; the stages below run it).
    model: Model
    learned: tuple[Stage, ...]
    baseline: tuple[Stage, ...]
    noise_hu: CalibratedNoise | None
    name: str = "model-or-baseline"

    def run(self, ctx: Context) -> Context:
        volume = ctx.need_volume()
        noise = input_noise_hu(volume)
        within = self.noise_hu is None or noise in self.noise_hu
        for stage in self.learned if within else self.baseline:
            started = time.perf_counter()
            ctx = stage.run(ctx)
            ctx = ctx.evolve(timings={**ctx.timings, stage.name: time.perf_counter() - started})
        units = volume.units or "1"
        qc = {**ctx.qc, NOISE_ESTIMATE: (round(noise, 3), units)}
        parameters = dict(ctx.parameters)
        if self.noise_hu is not None:
            qc[CALIBRATED_LOW] = (self.noise_hu.low, units)
            qc[CALIBRATED_HIGH] = (self.noise_hu.high, units)
            if not within:
                card, calibrated = self.model.card, f"{self.noise_hu.low:g}-{self.noise_hu.high:g} {units}"
                parameters["model_out_of_depth"] = (
                    f"input noise {noise:.1f} {units} outside the {calibrated} the calibration of "
                    f"{card.name} {card.version} saw: the classical baseline (non-local means) ran instead"
                )
        qc[BASELINE_RAN] = (0.0 if within else 1.0, "1")
        return ctx.evolve(qc=qc, parameters=parameters)
