"""Which models this installation has: every version in the shipped and the site zoos
(and any pinned directory outside them), the pipeline that runs each, why (a pin), and
whether the weights on disk are the ones their card describes. Read by ``dicom-node models``
and the REST API's ``/api/v1/models``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig, model_env_var

#: Models no pipeline runs, and what uses them instead.
OTHER_USES = {"sim-encoder": "evaluate (features)"}


def _entry(directory: Path, runs_in: str | None, pinned_by: str | None, *, in_zoo: bool) -> dict[str, Any]:
    from models.zoo import read_card, sha256_of

    card = read_card(directory)
    weights = directory / card["weights_file"]
    actual = sha256_of(weights) if weights.exists() else None
    return {
        # in a zoo, <model>/<version>/ names it; a directory elsewhere is named by its card
        "name": directory.parent.name if in_zoo else card["name"],
        "version": directory.name if in_zoo else card["version"],
        "directory": str(directory),
        "runs_in": runs_in,
        "pinned_by": pinned_by,
        "weights_sha256": card["weights_sha256"],
        "weights_ok": actual == card["weights_sha256"],
        "weights_bytes": weights.stat().st_size if weights.exists() else None,
        "training_data": card.get("training_data", ""),
        "calibration": card.get("calibration", ""),
        "has_evaluation": (directory / "evaluation.json").exists(),
    }


def model_inventory(config: NodeConfig, env_pins: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every model directory in the shipped and the site zoos, and any pinned directory
    outside them, each with the pipeline that runs it."""
    from models.zoo import ZOO, model_names, versions
    from pipelines.registry import MODEL_OF

    running: dict[Path, tuple[str | None, str | None]] = {}
    for pipeline in MODEL_OF:
        try:
            directory = config.models.directory(pipeline)
        except ValueError:
            continue  # its model is not installed here: it runs nothing
        assert directory is not None
        why: str | None = None
        if pipeline in env_pins:
            why = f"{model_env_var(pipeline)}={env_pins[pipeline]}"
        elif pipeline in config.models.pin:
            why = f"[models] pin.{pipeline} = {config.models.pin[pipeline]!r}"
        running[directory.resolve()] = (pipeline, why)
    directories = [
        zoo / name / version
        for zoo in (*(Path(z) for z in config.models.zoo), ZOO)
        for name in model_names(zoo)
        for version in versions(name, zoo)
    ]
    seen = {d.resolve() for d in directories}
    outside = [d for d in running if d not in seen]  # a pinned directory outside the zoos
    rows = []
    for directory in directories + outside:
        runs_in, pinned_by = running.get(directory.resolve(), (OTHER_USES.get(directory.parent.name), None))
        rows.append(_entry(directory, runs_in, pinned_by, in_zoo=directory not in outside))
    return rows
