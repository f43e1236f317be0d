"""The pipelines this installation can run, by name."""

from __future__ import annotations

from pipelines.base import Pipeline
from pipelines.forward import ForwardPipeline

_PIPELINES: dict[str, type] = {"forward": ForwardPipeline}


def pipeline_names() -> list[str]:
    return sorted(_PIPELINES)


def get_pipeline(name: str) -> Pipeline:
    try:
        return _PIPELINES[name]()
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r} (available: {', '.join(pipeline_names())})") from None
