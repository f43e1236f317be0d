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

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np

from models.base import Prediction
from models.hallucination import large_regions, local_noise_sigma
from models.restoration import RestorationModel
from pipelines import fov, spill
from pipelines.baseline import ModelOrBaseline, classical_baseline
from pipelines.domain import CheckInputHeaders, CheckInputImage, domain_of_card
from pipelines.encode import Encode
from pipelines.stages import Context, StagedPipeline
from pipelines.steps import CT_CLASSES, Gate, LoadVolume, SelectSeries, drill_disc, suspect_figures
from pipelines.validate import Validate


@dataclass(frozen=True)
class PredictAndScore:
    """Restore, score and measure a slab of slices at a time (issue 20: memory and time).

    What used to be two stages over whole volumes — predict (restored image and σ) and
    score (the hallucination map, suspect regions, QC figures) — runs slab by slab: each
    slab is filled outside the field of view and goes through the network; then each of
    its slices, on as many threads as cores, gets the put-back and σ's scale, the
    source's values and σ 0 outside the field of view, its score, and its place in the
    job's spill files (:mod:`pipelines.spill`), so the worker never holds more than a
    slab of the four volume-sized arrays, and nothing after the network waits on one
    core. Everything the model and the score compute is per slice, so the figures are
    those of the whole-volume stages (``tests/test_restoration_slabs.py``).
    """

    model: RestorationModel
    threshold: float = 6.0
    min_voxels: int = 6
    slab: int = spill.SLAB
    name: str = "predict-and-score"

    def run(self, ctx: Context) -> Context:
        volume = ctx.need_volume()
        shape = volume.array.shape
        store = spill.Spill(ctx.env.workdir)
        mean, sigma = store.array("restored", shape), store.array("sigma", shape)
        score = store.array("score", shape)
        above = store.array("suspect", shape, bool)
        drill = float(ctx.study.options.get("inject_hallucination_hu") or 0.0)
        disc = drill_disc(shape[1:], volume.spacing) if drill else None
        middle = len(volume.array) // 2
        spent = {"network": 0.0, "after-network": 0.0}
        body_sums: list[tuple[float, int]] = []

        def one(k: int, part: slice, given: np.ndarray, m: np.ndarray, s: np.ndarray) -> tuple[float, int]:
            """Slice ``part.start + k`` after the network (``m``, ``s``: its raw output)."""
            index = part.start + k
            plane = given[k]
            noise = local_noise_sigma(plane[None])[0]  # for the slice facts and the score
            self.model.finish_slice(plane, m, s, volume.spacing[1:], noise)
            source = volume.array[index]
            inside = None if volume.fov is None else volume.fov[index]
            if inside is not None:  # nothing was predicted outside the field of view
                outside = ~inside
                m[outside] = source[outside]
                s[outside] = 0.0
            if disc is not None and index == middle:  # the gate fire drill
                m[disc] += drill
            restored = m if inside is None else np.where(inside, m, plane).astype(np.float32, copy=False)
            slab_score = self.model.score(plane[None], restored[None], s[None], noise[None])[0]
            if inside is not None:
                slab_score = np.where(inside, slab_score, np.float32(0.0))
            above[index] = slab_score > self.threshold
            body = source > -500
            if inside is not None:
                body &= inside
            mean[index], sigma[index], score[index] = m, s, slab_score
            return float(s[body].sum(dtype=np.float64)), int(body.sum())

        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            for part in spill.slabs(len(volume.array), self.slab):
                started = time.perf_counter()
                given = fov.model_input(volume, part)  # a copy, the outside filled
                m, s = self.model.predict_raw(given)
                spent["network"] += time.perf_counter() - started
                started = time.perf_counter()
                n = len(given)
                body_sums += pool.map(one, range(n), repeat(part, n), repeat(given, n), m, s)
                for array in (mean, sigma, score, above, volume.array, volume.fov):
                    spill.release(array)
                spent["after-network"] += time.perf_counter() - started
        body_sum = sum(total for total, _ in body_sums)
        body_count = sum(count for _, count in body_sums)
        suspect = large_regions(above, min_voxels=self.min_voxels)
        voxel_ml = volume.spacing[0] * volume.spacing[1] * volume.spacing[2] / 1000.0
        units = volume.units or "1"
        qc = {
            **ctx.qc,
            "mean calibrated sigma in body": (round(body_sum / max(body_count, 1), 3), units),
            **suspect_figures(score, suspect, voxel_ml, self.threshold, within=volume.fov),
        }
        precision = self.model.precision
        return ctx.evolve(
            model=self.model.card,
            prediction=Prediction(mean=mean, sigma=sigma),
            parameters={**ctx.parameters, "inference_precision": precision},
            hallucination=score,
            suspect=suspect,
            qc=qc,
            timings={**ctx.timings, **spent},
        )


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
            SelectSeries(CT_CLASSES, what="CT", domain=domain),
            CheckInputHeaders((domain,), model_label),
            LoadVolume(spilled=True),  # the volume-sized arrays live in spill files
            CheckInputImage((domain,), model_label),
            fov.DetectFieldOfView(),
            ModelOrBaseline(
                model,
                learned=(PredictAndScore(model),),
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
