"""``dicom-node models``: which models this installation has, which version each pipeline
runs, and whether the weights on disk are the ones their card describes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dicom_node.cli.common import JsonOpt, app, console, fail, print_json

models_app = typer.Typer(
    help="Models in the zoo: versions, which one runs, weights check, model card.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

#: The pipeline that runs the newest version of each model, and the environment variable
#: that can point it at another model directory instead.
USED_BY: dict[str, tuple[str, str | None]] = {
    "ldct-restoration": ("restoration", "DICOM_NODE_RESTORATION_MODEL"),
    "sct-head": ("sct", "DICOM_NODE_SCT_MODEL"),
    "sim-encoder": ("evaluate (features)", None),
}


def _entry(name: str, version: str, newest: str) -> dict[str, Any]:
    from models.zoo import sha256_of, version_dir

    directory = version_dir(name, version)
    card = json.loads((directory / "card.json").read_text())
    weights = directory / card["weights_file"]
    actual = sha256_of(weights) if weights.exists() else None
    pipeline, override = USED_BY.get(name, (None, None))
    overridden = bool(override and os.environ.get(override, "").strip())
    return {
        "name": name,
        "version": version,
        "directory": str(directory),
        "runs_in": pipeline if version == newest and not overridden else None,
        "override": f"{override}={os.environ[override]}" if overridden and override else None,
        "weights_sha256": card["weights_sha256"],
        "weights_ok": actual == card["weights_sha256"],
        "weights_bytes": weights.stat().st_size if weights.exists() else None,
        "training_data": card.get("training_data", ""),
        "calibration": card.get("calibration", ""),
        "has_evaluation": (directory / "evaluation.json").exists(),
    }


@models_app.command("list")
def list_models(json_out: JsonOpt = False) -> None:
    """Every model version, the one each pipeline runs, and the weights hash check."""
    from models.zoo import model_names, versions

    rows = [_entry(n, v, versions(n)[-1]) for n in model_names() for v in versions(n)]
    if json_out:
        print_json(rows)
    else:
        table = Table(title="models (weights checked against their card's sha256)")
        for column in ("model", "version", "runs in", "weights", "size", "trained on"):
            table.add_column(column)
        for r in rows:
            runs = r["runs_in"] or (f"no: {r['override']}" if r["override"] else "")
            table.add_row(
                r["name"],
                r["version"],
                runs,
                "ok" if r["weights_ok"] else "MISMATCH",
                f"{(r['weights_bytes'] or 0) / 1e6:.1f} MB",
                r["training_data"].split(":")[0],
            )
        console.print(table)
    if not all(r["weights_ok"] for r in rows):
        bad = ", ".join(f"{r['name']} {r['version']}" for r in rows if not r["weights_ok"])
        raise fail(f"weights do not match their model card: {bad} (a pipeline refuses to load them)")


@models_app.command("show")
def show_model(
    name: Annotated[str, typer.Argument(help="Model name (see `dicom-node models list`).")],
    version: Annotated[str | None, typer.Option(help="Version (default: the one that runs).")] = None,
) -> None:
    """The model card and the evaluation summary of one model version, as JSON."""
    from models.zoo import model_names, version_dir, versions

    if name not in model_names():
        raise fail(f"no model {name!r} (available: {', '.join(model_names())})")
    if version is not None and version not in versions(name):
        raise fail(f"{name} has no version {version!r} (available: {', '.join(versions(name))})")
    directory: Path = version_dir(name, version)
    evaluation = directory / "evaluation.json"
    print_json(
        {
            "card": json.loads((directory / "card.json").read_text()),
            "evaluation": json.loads(evaluation.read_text()) if evaluation.exists() else None,
            "check": _entry(name, directory.name, versions(name)[-1]),
        }
    )
