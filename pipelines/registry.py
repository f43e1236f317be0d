"""The pipelines this installation can run, by name.

Entries are import paths, loaded only when a pipeline is used: checking a config or
starting the receiver must not import torch.
"""

from __future__ import annotations

from importlib import import_module

from pipelines.base import Pipeline

_PIPELINES: dict[str, str] = {
    "forward": "pipelines.forward:ForwardPipeline",
    "denoise-classical": "pipelines.denoise_classical:denoise_classical",
    "restoration": "pipelines.restoration:restoration",
    "sct": "pipelines.sct:sct",
}


def pipeline_names() -> list[str]:
    return sorted(_PIPELINES)


def get_pipeline(name: str) -> Pipeline:
    try:
        target = _PIPELINES[name]
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r} (available: {', '.join(pipeline_names())})") from None
    module, _, factory = target.partition(":")
    pipeline: Pipeline = getattr(import_module(module), factory)()
    return pipeline
