"""``dicom-node models``: which models this installation has, which version each pipeline
runs (the newest shipped one, or the one ``[models]`` in the config pins), and whether the
weights on disk are the ones their card describes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dicom_node.cli.common import ConfigOpt, HomeOpt, JsonOpt, app, console, fail, print_json, read_config
from dicom_node.config import LoadedConfig
from dicom_node.jobs.inventory import model_inventory

models_app = typer.Typer(
    help="Models in the zoo: versions, which one runs, weights check, model card.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")


def _rows(loaded: LoadedConfig) -> list[dict[str, Any]]:
    return model_inventory(loaded.config, loaded.environment_pins)


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
                r["pinned_by"] or "",
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
