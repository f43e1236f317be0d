"""The pipelines this installation can run, by name, and the model each one runs.

Entries are import paths, loaded only when a pipeline is used: checking a config or
starting the receiver must not import torch. A pipeline with a learned model is built with
the model directory the node's config chose (``[models]``: a pinned version or a site's
model directory; by default the newest shipped version); building it loads the weights and
checks their sha256 against the model card, so a worker builds each pipeline once.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from pipelines.base import Pipeline, PipelineError

_PIPELINES: dict[str, str] = {
    "forward": "pipelines.forward:ForwardPipeline",
    "denoise-classical": "pipelines.denoise_classical:denoise_classical",
    "restoration": "pipelines.restoration:restoration",
    "sct": "pipelines.sct:sct",
    "prognosis": "pipelines.prognosis:prognosis",
    "synthesis": "pipelines.synthesis:synthesis",
    "synthesis-t2w": "pipelines.synthesis:synthesis_t2w",
}

#: The learned model (zoo name) each pipeline runs; pipelines without one are absent.
MODEL_OF: dict[str, str] = {
    "restoration": "ldct-restoration",
    "sct": "sct-head",
    "prognosis": "prognosis-growth",
    "synthesis": "synthesis-t1w-t2w-to-flair",
    "synthesis-t2w": "synthesis-t1w-to-t2w",
}

#: Pipelines whose network can run in another precision than float32 (``[models] precision``).
PRECISION_AWARE = frozenset({"restoration"})

#: The shipped non-AI pipeline for the task of a learned pipeline (a rule's ``fallback:
#: classical``); absent: there is none (``sct``: no classical synthetic CT ships).
CLASSICAL_OF: dict[str, str] = {
    "restoration": "denoise-classical",
}


def pipeline_names() -> list[str]:
    return sorted(_PIPELINES)


def get_pipeline(name: str, model_dir: Path | None = None, precision: str = "auto") -> Pipeline:
    """Build pipeline ``name``; ``model_dir`` is its model's directory (None: the newest
    shipped); ``precision`` what its network computes in, for the pipelines that have a
    choice (:data:`PRECISION_AWARE`; the others run float32).

    Raises
    ------
    KeyError
        No such pipeline (the message lists the available ones).
    PipelineError
        It cannot run here: a package of the ``ai`` extra is missing, or its model cannot
        be loaded (no model card, weights that do not match it). One line, no traceback.
    """
    try:
        target = _PIPELINES[name]
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r} (available: {', '.join(pipeline_names())})") from None
    module, _, factory = target.partition(":")
    try:
        build = getattr(import_module(module), factory)
        if name in PRECISION_AWARE:
            pipeline: Pipeline = build(model_dir, precision)
        else:
            pipeline = build(model_dir) if name in MODEL_OF else build()
    except ModuleNotFoundError as exc:
        raise PipelineError(
            f"pipeline {name} needs {exc.name!r}, which this installation lacks: pip install 'dicom-node[ai]'"
        ) from None
    except (FileNotFoundError, RuntimeError, ValueError) as exc:  # no card, weights mismatch
        raise PipelineError(f"pipeline {name}: its model cannot be loaded: {exc}") from None
    return pipeline
