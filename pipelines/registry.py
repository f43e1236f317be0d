"""The pipelines this installation can run, by name."""

from __future__ import annotations

from collections.abc import Callable

from pipelines.base import Pipeline
from pipelines.denoise_classical import denoise_classical
from pipelines.forward import ForwardPipeline

_PIPELINES: dict[str, Callable[[], Pipeline]] = {
    "forward": ForwardPipeline,
    "denoise-classical": denoise_classical,
}


def pipeline_names() -> list[str]:
    return sorted(_PIPELINES)


def get_pipeline(name: str) -> Pipeline:
    try:
        factory = _PIPELINES[name]
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r} (available: {', '.join(pipeline_names())})") from None
    return factory()
