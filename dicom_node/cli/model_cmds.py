"""``dicom-node models``: which models this installation has, which version each pipeline
runs (the newest shipped one, or the one ``[models]`` in the config pins), and whether the
weights on disk are the ones their card describes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dicom_node.cli.common import ConfigOpt, HomeOpt, JsonOpt, app, console, fail, print_json, read_config
from dicom_node.config import LoadedConfig, model_env_var

models_app = typer.Typer(
    help="Models in the zoo: versions, which one runs, weights check, model card.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

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


def _rows(loaded: LoadedConfig) -> list[dict[str, Any]]:
    """Every model directory in the shipped and the site zoos, and any pinned directory
    outside them, each with the pipeline that runs it."""
    from models.zoo import ZOO, model_names, versions
    from pipelines.registry import MODEL_OF

    config, env_pins = loaded.config, loaded.environment_pins
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


@models_app.command("list")
def list_models(config: ConfigOpt = None, home: HomeOpt = Path("."), json_out: JsonOpt = False) -> None:
    """Every model version, the one each pipeline runs, and the weights hash check."""
    rows = _rows(read_config(config, home))
    if json_out:
        print_json(rows)
    else:
        table = Table(title="models (weights checked against their card's sha256)")
        for column in ("model", "version", "runs in", "pinned by", "weights", "size", "directory"):
            table.add_column(column)
        for r in rows:
            table.add_row(
                r["name"],
                r["version"],
                r["runs_in"] or "",
                escape(r["pinned_by"] or ""),
                "ok" if r["weights_ok"] else "MISMATCH",
                f"{(r['weights_bytes'] or 0) / 1e6:.1f} MB",
                r["directory"],
            )
        console.print(table)
    if not all(r["weights_ok"] for r in rows):
        bad = ", ".join(f"{r['name']} {r['version']} ({r['directory']})" for r in rows if not r["weights_ok"])
        raise fail(f"weights do not match their model card: {bad} (a pipeline refuses to load them)")


@models_app.command("show")
def show_model(
    name: Annotated[str, typer.Argument(help="Model name (see `dicom-node models list`).")],
    version: Annotated[str | None, typer.Option(help="Version (default: the one that runs).")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """The model card and the evaluation summary of one model version, as JSON."""
    from models.zoo import read_card

    rows = [r for r in _rows(read_config(config, home)) if r["name"] == name]
    if not rows:
        raise fail(f"no model {name!r} (see `dicom-node models list`)")
    if version is not None:
        chosen = [r for r in rows if r["version"] == version]
        if not chosen:
            raise fail(
                f"{name} has no version {version!r} (available: {', '.join(r['version'] for r in rows)})"
            )
    else:
        chosen = [r for r in rows if r["runs_in"]] or rows[-1:]
    row = chosen[0]
    directory = Path(row["directory"])
    evaluation = directory / "evaluation.json"
    print_json(
        {
            "card": read_card(directory),
            "evaluation": json.loads(evaluation.read_text()) if evaluation.exists() else None,
            "check": row,
        }
    )
