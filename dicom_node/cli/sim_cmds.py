"""``simulate``: write simulated studies (the demo's and the tests' scanner)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from dicom_node.cli.common import app, console, fail, output_dir


def _patient_id(value: str) -> str:
    """A Patient ID the standard allows (LO: at most 64 characters, no backslash): a
    receiver, this node's included, refuses one that is longer."""
    if len(value) > 64 or "\\" in value or not value.strip():
        raise typer.BadParameter("a Patient ID has 1 to 64 characters and no backslash")
    return value


def _patient_id_option(help_text: str) -> Any:
    return typer.Option(callback=_patient_id, help=help_text)


simulate_app = typer.Typer(
    help="Write simulated DICOM studies (clearly labelled SIMULATED).", no_args_is_help=True
)
app.add_typer(simulate_app, name="simulate")


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """A disk that fills or a folder that goes while the study is written: said, not a traceback."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise fail(f"writing the simulated study to {out} failed: {exc.strerror or exc}{where}") from None


class Anatomy(StrEnum):
    CHEST = "chest"
    HEAD = "head"


class MrSequence(StrEnum):
    T1 = "t1"
    T2 = "t2"


@simulate_app.command("ct")
def simulate_ct(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the series into.")],
    slices: Annotated[int, typer.Option(min=1, max=2000, help="Number of axial slices.")] = 50,
    size: Annotated[int, typer.Option(min=32, max=1024, help="Rows and columns.")] = 512,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same pixels).")] = 0,
    patient_id: Annotated[str, _patient_id_option("Patient ID to write.")] = "SIM-0001",
) -> None:
    """A procedural torso CT phantom, one file per slice, int16 in HU."""
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    output_dir(out)
    with _writing(out):
        study = write_ct_series(
            out, PhantomSpec(rows=size, columns=size, slices=slices, seed=seed), patient_id=patient_id
        )
    console.print(f"wrote {len(study.files)} simulated CT slices to {out} (study {study.study_uid})")


@simulate_app.command("ldct")
def simulate_ldct(
    out: Annotated[Path, typer.Option("--out", help="Writes OUT/low-dose/ and OUT/reference/.")],
    dose: Annotated[float, typer.Option(min=0.01, max=1.0, help="Dose fraction of the reference.")] = 0.25,
    slices: Annotated[int, typer.Option(min=1, max=2000, help="Number of axial slices.")] = 24,
    size: Annotated[int, typer.Option(min=64, max=1024, help="Rows and columns.")] = 512,
    anatomy: Annotated[Anatomy, typer.Option(help="Body part (MNI152-based).")] = Anatomy.CHEST,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same study).")] = 0,
    fov_mm: Annotated[
        float | None,
        typer.Option(
            "--fov-mm",
            min=50.0,
            max=600.0,
            help="Reconstruction field of view in mm. Default: 512x512's pixel size at any --size "
            "(250 mm x size/512 head, 400 mm x size/512 chest: a targeted reconstruction below 512), "
            "the pixels the restoration model was trained and evaluated on (0.4-0.8 mm); "
            "coarser ones are refused by its input domain.",
        ),
    ] = None,
) -> None:
    """Physics-based low-dose CT: projection-domain noise at the given dose, plus the reference."""
    from rich.progress import Progress

    from dicom_node.lab.simulate import LdctSpec, write_ldct_study

    output_dir(out)
    spec = LdctSpec(anatomy=anatomy.value, slices=slices, size=size, dose=dose, seed=seed, fov_mm=fov_mm)
    with _writing(out), Progress(console=console, transient=True) as bar:
        task = bar.add_task("simulating slices", total=slices)
        low, ref = write_ldct_study(out, spec, progress=lambda done, total: bar.update(task, completed=done))
    console.print(
        f"wrote {slices} simulated low-dose slices (dose {dose:g}) to {out / 'low-dose'} and the full-dose "
        f"reference to {out / 'reference'} (study {low.study_uid})"
    )


@simulate_app.command("sct")
def simulate_sct(
    out: Annotated[Path, typer.Option("--out", help="Writes OUT/mr/ and OUT/reference-ct/.")],
    slices: Annotated[
        int, typer.Option(min=1, max=40, help="Contiguous 2.5 mm axial slices (the head model spans 102 mm).")
    ] = 24,
    size: Annotated[
        int,
        typer.Option(
            min=32,
            max=1024,
            help="Rows and columns over a 250 mm field: sct-head takes 256 or 512 (0.4-1.0 mm pixels).",
        ),
    ] = 256,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same pixels).")] = 0,
    sequence: Annotated[MrSequence, typer.Option(help="MR series to write (spin echo).")] = MrSequence.T1,
    patient_id: Annotated[str, _patient_id_option("Patient ID to write.")] = "SIM-SCT-0001",
) -> None:
    """Paired MR / CT head (MNI152-based): the MR planning series and, separately, the reference CT."""
    from dicom_node.lab.simulate import SctSpec, write_sct_study

    output_dir(out)
    spec = SctSpec(slices=slices, size=size, seed=seed, sequence=sequence.value)
    with _writing(out), console.status("simulating the paired MR / CT head"):
        mr, ct = write_sct_study(out, spec, patient_id=patient_id)
    console.print(
        f"wrote {len(mr.files)} SIMULATED MR slices ({sequence.upper()}-weighted spin echo) to {out / 'mr'} "
        f"and the SIMULATED reference CT (for evaluating synthetic CT only, not for planning) to "
        f"{out / 'reference-ct'} (study {mr.study_uid}, frame of reference {mr.frame_of_reference_uid})"
    )


@simulate_app.command("prognosis")
def simulate_prognosis(
    out: Annotated[
        Path, typer.Option("--out", help="Writes OUT/visit-1/, OUT/visit-2/, ... (one study each).")
    ],
    visits: Annotated[int, typer.Option(min=2, max=12, help="Number of visits (studies).")] = 4,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same patient).")] = 0,
    size: Annotated[int, typer.Option(min=32, max=512, help="Rows and columns.")] = 128,
    slices: Annotated[int, typer.Option(min=4, max=64, help="Contiguous 3 mm axial slices.")] = 32,
    t2w: Annotated[bool, typer.Option("--t2w/--no-t2w", help="Also write a T2-weighted series.")] = False,
    patient_id: Annotated[str, _patient_id_option("Patient ID shared by all visits.")] = "SIM-PROG-0001",
) -> None:
    """A simulated brain-tumour patient (MNI152, Fisher-Kolmogorov growth): T1c and FLAIR per visit."""
    from dicom_node.lab.simulate_prognosis import PrognosisSpec, write_prognosis_patient

    output_dir(out)
    spec = PrognosisSpec(visits=visits, seed=seed, size=size, slices=slices, t2w=t2w)
    with _writing(out), console.status("simulating the tumour's growth and the follow-up studies"):
        patient, studies = write_prognosis_patient(out, spec, patient_id=patient_id)
    previous = None
    for study, visit in zip(studies, patient.visits, strict=True):
        gap = "" if previous is None else f", {visit.day - previous} days after visit {visit.index - 1}"
        series = ", ".join(f"{name} ({len(s.files)} slices)" for name, s in study.series.items())
        console.print(
            f"visit {study.visit}: {study.directory} — SIMULATED MR study {study.study_uid} on "
            f"{study.study_date} (day {study.day}{gap}): {series}; "
            f"T2-visible tumour {visit.volumes_ml['whole_tumour']:.1f} ml"
        )
        previous = visit.day
    treatment = patient.params.treatment
    console.print(
        f"patient {patient_id}: {len(studies)} SIMULATED studies, intervals "
        f"{', '.join(str(d) for d in patient.intervals_days)} days"
        + (f"; treated on day {treatment.day}" if treatment else "")
    )


class MissingContrast(StrEnum):
    FLAIR = "flair"
    T2W = "t2w"
    NONE = "none"


class FieldStrength(StrEnum):
    T1_5 = "1.5"
    T3 = "3"


@simulate_app.command("synthesis")
def simulate_synthesis(
    out: Annotated[
        Path, typer.Option("--out", help="Writes OUT/<contrast>/, OUT/reference/<missing>/, OUT/truth.json.")
    ],
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same study).")] = 0,
    missing: Annotated[
        MissingContrast, typer.Option(help="Contrast kept aside under OUT/reference/ (none: write all).")
    ] = MissingContrast.FLAIR,
    size: Annotated[int, typer.Option(min=32, max=512, help="Rows and columns.")] = 128,
    slices: Annotated[int, typer.Option(min=4, max=64, help="Contiguous 3 mm axial slices.")] = 32,
    field: Annotated[
        FieldStrength | None, typer.Option(help="Main field in tesla (drawn per seed if omitted).")
    ] = None,
    pd: Annotated[bool, typer.Option("--pd/--no-pd", help="Also write a proton-density series.")] = False,
    patient_id: Annotated[str, _patient_id_option("Patient ID to write.")] = "SIM-SYN-0001",
) -> None:
    """Multi-contrast brain MR (MNI152, WM lesions): T1w, T2w, FLAIR (PD); one contrast kept aside."""
    from dicom_node.lab.simulate_synthesis import SynthesisSpec, write_synthesis_study

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise fail(f"{out} exists and is not an empty directory: choose a new --out")
    output_dir(out)
    spec = SynthesisSpec(
        seed=seed,
        size=size,
        slices=slices,
        field_strength_t=None if field is None else float(field.value),
        missing=() if missing is MissingContrast.NONE else (missing.value,),
        pd=pd,
    )
    try:
        with _writing(out), console.status("simulating the multi-contrast brain MR study"):
            sim, written = write_synthesis_study(out, spec, patient_id=patient_id)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    series = ", ".join(f"{name} ({len(s.files)} slices)" for name, s in written.acquired.items())
    kept = ", ".join(f"{name} in {out / 'reference' / name}" for name in written.reference) or "none"
    visible = sum(les.t1_visible for les in sim.lesions)
    console.print(
        f"wrote SIMULATED MR study {written.study_uid} ({sim.field_strength_t:g} T) to {out}: {series}; "
        f"kept aside (evaluation only): {kept}; {len(sim.lesions)} white-matter lesions "
        f"({visible} visible on T1w)"
        + ("; tumour with oedema" if sim.tumour is not None else "")
        + f"; truth in {written.truth_json}"
    )
