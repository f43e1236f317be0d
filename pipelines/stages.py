"""Staged pipelines: an ordered list of typed stages over a frozen context.

A pipeline declares its whole flow in one place::

    DENOISE = StagedPipeline(
        name="denoise-classical", version="1.0",
        stages=(SelectSeries("CT"), LoadVolume(), Predict(model), ScoreHallucination(...),
                Gate(...), Encode(...)),
    )

Each stage is ``run(ctx) -> ctx``; the context is a frozen record (study, selected
series, volume, prediction, maps, outputs) evolved with ``dataclasses.replace``, so
mypy sees the wiring and a stage cannot change what an earlier stage produced.
Pipelines and stages know nothing of sockets or SQL.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from models.base import ModelCard, Prediction
from pipelines import spill
from pipelines.base import (
    GateOutcome,
    InputInstance,
    ModelIdentity,
    OutputInstance,
    PipelineResult,
    RunEnvironment,
    StudyInput,
)
from pipelines.volume import Volume


@dataclass(frozen=True)
class Context:
    study: StudyInput
    env: RunEnvironment
    pipeline: str = ""
    pipeline_version: str = ""
    series: tuple[InputInstance, ...] = ()
    #: Other series of the study the pipeline read (e.g. the current FLAIR of ``prognosis``).
    other_series: tuple[InputInstance, ...] = ()
    volume: Volume | None = None
    model: ModelCard | None = None
    prediction: Prediction | None = None
    hallucination: np.ndarray | None = None
    suspect: np.ndarray | None = None
    #: QC figures: name → (value, UCUM unit).
    qc: dict[str, tuple[float, str]] = field(default_factory=dict)
    gate: str | None = None
    #: The gate stage's verdict, for the report (restated by the node when it is final).
    verdict: GateOutcome | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[OutputInstance, ...] = ()
    #: Per output series UID: the QC figures that belong to it (for provenance records).
    qc_by_series: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: Problems found re-reading the written objects (any one holds the job).
    validation_errors: tuple[str, ...] = ()

    def evolve(self, **changes: Any) -> Context:
        return replace(self, **changes)

    def need_volume(self) -> Volume:
        if self.volume is None:
            raise RuntimeError("stage order: no volume loaded yet")
        return self.volume

    def need_prediction(self) -> Prediction:
        if self.prediction is None:
            raise RuntimeError("stage order: no prediction yet")
        return self.prediction


def _release(ctx: Context) -> None:
    """Drop the mapped pages of the context's file-backed arrays (:mod:`pipelines.spill`)."""
    arrays = [ctx.hallucination, ctx.suspect]
    if ctx.volume is not None:
        arrays += [ctx.volume.array, ctx.volume.fov]
    if ctx.prediction is not None:
        arrays += [ctx.prediction.mean, ctx.prediction.sigma]
    for array in arrays:
        spill.release(array)
    spill.trim()


class Stage(Protocol):
    @property
    def name(self) -> str: ...

    def run(self, ctx: Context) -> Context: ...


@dataclass(frozen=True)
class StagedPipeline:
    """A named, versioned sequence of stages (satisfies the ``Pipeline`` protocol)."""

    name: str
    version: str
    stages: Sequence[Stage]
    #: What its network computes in, where it has a choice (None: float32, no choice).
    precision: str | None = None

    def execute(self, study: StudyInput, env: RunEnvironment) -> Context:
        ctx = Context(study=study, env=env, pipeline=self.name, pipeline_version=self.version)
        spill.remove(env.workdir)  # a run killed before it could clean up left its files
        try:
            for stage in self.stages:
                started = time.perf_counter()
                ctx = stage.run(ctx)
                ctx = ctx.evolve(timings={**ctx.timings, stage.name: time.perf_counter() - started})
                _release(ctx)  # between stages a file-backed volume holds no pages of this process
        finally:
            spill.remove(env.workdir)  # arrays still mapped stay readable until dropped
        return ctx

    def run(self, study: StudyInput, env: RunEnvironment) -> PipelineResult:
        ctx = self.execute(study, env)
        model = (
            ModelIdentity(ctx.model.name, ctx.model.version, ctx.model.weights_sha256) if ctx.model else None
        )
        return PipelineResult(
            outputs=ctx.outputs,
            model=model,
            parameters=ctx.parameters,
            qc=ctx.qc_by_series,
            gate=ctx.gate,
            validation_errors=ctx.validation_errors,
            timings=dict(ctx.timings),
        )
