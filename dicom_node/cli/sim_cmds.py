"""``simulate``: write simulated studies (the demo's and the tests' scanner)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dicom_node.cli import app, console

simulate_app = typer.Typer(
    help="Write simulated DICOM studies (clearly labelled SIMULATED).", no_args_is_help=True
)
app.add_typer(simulate_app, name="simulate")


@simulate_app.command("ct")
def simulate_ct(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the series into.")],
    slices: Annotated[int, typer.Option(min=1, max=2000, help="Number of axial slices.")] = 50,
    size: Annotated[int, typer.Option(min=32, max=1024, help="Rows and columns.")] = 512,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same pixels).")] = 0,
    patient_id: Annotated[str, typer.Option(help="Patient ID to write.")] = "SIM-0001",
) -> None:
    """A procedural torso CT phantom, one file per slice, int16 in HU."""
    from dicom_node.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    study = write_ct_series(
        out, PhantomSpec(rows=size, columns=size, slices=slices, seed=seed), patient_id=patient_id
    )
    console.print(f"wrote {len(study.files)} simulated CT slices to {out} (study {study.study_uid})")
