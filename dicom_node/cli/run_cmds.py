"""``dicom-node run PIPELINE PATH... --out DIR``: a pipeline on files, without the network.

To try a pipeline on a study before routing to it, and for batch work. Same stages and
writers as the routed path; audited the same way (instances accessed, one provenance
record per output series) in the audit log of ``--home``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from rich.table import Table

from audit import AuditEvent, Outcome
from dicom_node import __version__
from dicom_node.cli.common import (
    ConfigOpt,
    HomeOpt,
    JsonOpt,
    app,
    console,
    err_console,
    fail,
    not_a_directory,
    open_runtime,
    os_user,
    output_dir,
    print_json,
)
from dicom_node.ingest.instance import valid_uid
from dicom_node.ingest.part10 import split_part10
from dicom_node.jobs.provenance import record_provenance
from models.zoo import read_card, version_dir
from pipelines.base import InputInstance, Pipeline, PipelineError, RunEnvironment, StudyInput
from pipelines.registry import MODEL_OF, PRECISION_AWARE, get_pipeline, pipeline_names

if TYPE_CHECKING:
    from pipelines.stages import Context, Stage

#: Told as each stage starts: (stage name, its number from 1, how many stages).
StageStarted = Callable[[str, int, int], None]


@dataclass(frozen=True)
class _Announced:
    """A pipeline stage that says when it starts (the pipeline itself is not changed)."""

    stage: Stage
    number: int
    total: int
    started: StageStarted

    @property
    def name(self) -> str:
        return self.stage.name

    def run(self, ctx: Context) -> Context:
        self.started(self.stage.name, self.number, self.total)
        return self.stage.run(ctx)


def announcing(pipeline: Pipeline, started: StageStarted) -> Pipeline:
    """``pipeline`` with each stage reported to ``started`` as it begins.

    A staged pipeline's stages are wrapped; any other pipeline is one stage, its own name.
    """
    from pipelines.stages import StagedPipeline

    if not isinstance(pipeline, StagedPipeline):
        started(pipeline.name, 1, 1)
        return pipeline
    stages = pipeline.stages
    return replace(
        pipeline,
        stages=tuple(_Announced(s, i, len(stages), started) for i, s in enumerate(stages, start=1)),
    )


@contextmanager
def stage_progress(pipeline: str, studies: int) -> Iterator[Callable[[str, int], StageStarted]]:
    """Progress on stderr: a bar on a terminal, otherwise one line per stage.

    Yields ``for_study(study_uid, index)``, which gives the callback for that study's stages.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not err_console.is_terminal:

        def lines(study_uid: str, index: int) -> StageStarted:
            def started(stage: str, number: int, total: int) -> None:
                err_console.print(
                    f"{pipeline}: study {index}/{studies} {study_uid}: stage {number}/{total} {stage}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )

            return started

        yield lines
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:

        def bars(study_uid: str, index: int) -> StageStarted:
            task = bar.add_task(f"{pipeline} study {index}/{studies}", total=None)

            def started(stage: str, number: int, total: int) -> None:
                bar.update(
                    task,
                    description=f"{pipeline} study {index}/{studies}: {stage}",
                    completed=number - 1,
                    total=total,
                )

            return started

        yield bars


def _figure(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def qc_tables(qc: dict[str, dict[str, Any]]) -> list[Table]:
    """One table of QC figures per output series; series with the same figures share one."""
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for series_uid, figures in qc.items():
        key = json.dumps(figures, sort_keys=True, default=str)
        groups.setdefault(key, (figures, []))[1].append(series_uid)
    tables = []
    for figures, series in groups.values():
        if len(series) == 1:
            title = f"QC of output series {series[0]}"
        elif len(groups) == 1:
            title = f"QC (the same for all {len(series)} output series)"
        else:
            title = f"QC of output series {', '.join(series)}"
        table = Table(title=title, title_justify="left", min_width=len(title))
        table.add_column("figure")
        table.add_column("value", justify="right")
        for name, value in figures.items():
            table.add_row(name, _figure(value))
        tables.append(table)
    return tables


#: Why ``run`` left a file out, as the --json key and the words of the text output.
SKIP_REASONS: dict[str, str] = {
    "not_part10": "not DICOM Part 10",
    "incomplete_file_meta": "without SOP Class, SOP Instance or Transfer Syntax UID in the file meta",
    "invalid_uid": "with an invalid UID (the receiver refuses these too)",
}


def skipped_line(skipped: dict[str, int]) -> str | None:
    """ "skipped 3 file(s): 2 not DICOM Part 10, 1 with an invalid UID (...)" (None: none skipped)."""
    total = sum(skipped.values())
    if not total:
        return None
    reasons = ", ".join(f"{n} {SKIP_REASONS[key]}" for key, n in skipped.items() if n)
    return f"skipped {total} file(s): {reasons}"


def _study_inputs(
    paths: list[Path],
) -> tuple[dict[str, list[InputInstance]], dict[str, str | None], dict[str, int]]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise fail(f"{p}: no such file or directory")
    studies: dict[str, list[InputInstance]] = defaultdict(list)
    patients: dict[str, str | None] = {}
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for f in files:
        try:
            raw = f.read_bytes()
            meta, data = split_part10(raw)
            ds = dcmread(
                f,
                stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "PatientID"],
            )
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, KeyError, ValueError, OSError):
            skipped["not_part10"] += 1
            continue
        try:
            sop_uid = str(meta.MediaStorageSOPInstanceUID)
            sop_class_uid = str(meta.MediaStorageSOPClassUID)
            transfer_syntax_uid = str(meta.TransferSyntaxUID)
        except AttributeError:
            skipped["incomplete_file_meta"] += 1
            continue
        if not all(valid_uid(u) for u in (sop_class_uid, sop_uid, study_uid, series_uid)):
            skipped["invalid_uid"] += 1
            continue
        studies[study_uid].append(
            InputInstance(
                sop_uid=sop_uid,
                series_uid=series_uid,
                sop_class_uid=sop_class_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                path=f,
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        patients[study_uid] = str(ds.get("PatientID", "")) or None
    return studies, patients, skipped


def run_job_id(pipeline: Pipeline, model_dir: Path | None, precision: str | None) -> str:
    """The job id ``run`` derives its output UIDs from: the pipeline, its version and the
    model that runs. The same run twice gives the same UIDs; another pipeline, another
    pipeline version or another model never does (a PACS would take one object for another)."""
    parts = ["run", pipeline.name, pipeline.version]
    if model_dir is not None:
        card = read_card(model_dir)
        parts += [str(card.get("name")), str(card.get("version")), str(card.get("weights_sha256"))]
    if precision is not None:
        parts.append(precision)
    return " ".join(parts)


@app.command("run")
def run(
    pipeline: Annotated[str, typer.Argument(help=f"Pipeline name ({', '.join(pipeline_names())}).")],
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or directories (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for every output object.")],
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    json_out: JsonOpt = False,
) -> None:
    """Run a pipeline on DICOM files and write its outputs to --out (no network)."""
    if pipeline not in pipeline_names():
        raise fail(f"unknown pipeline {pipeline!r} (available: {', '.join(pipeline_names())})")
    studies, patients, skipped = _study_inputs(paths)
    if not studies:
        why = skipped_line(skipped)
        raise fail(
            f"no DICOM Part 10 files found in {', '.join(map(str, paths))}" + (f" ({why})" if why else "")
        )
    targets = {study_uid: out if len(studies) == 1 else out / study_uid for study_uid in studies}
    for target in targets.values():
        blocker = not_a_directory(target)
        if blocker is not None:
            raise fail(f"--out {out}: {blocker} exists and is not a directory")
    output_dir(out)
    runtime = open_runtime(config, home)
    try:
        model_dir = runtime.config.models.directory(pipeline)
        chosen = get_pipeline(pipeline, model_dir, runtime.config.models.precision)
        job_id = run_job_id(
            chosen,
            model_dir or (version_dir(MODEL_OF[pipeline]) if pipeline in MODEL_OF else None),
            runtime.config.models.precision if pipeline in PRECISION_AWARE else None,
        )
    except (PipelineError, ValueError, OSError) as exc:
        runtime.close()
        raise fail(str(exc)) from None
    out_root = out.resolve()
    actor = os_user()
    summary: list[dict[str, Any]] = []
    failed = False
    with stage_progress(pipeline, len(studies)) as for_study:
        for index, (study_uid, instances) in enumerate(studies.items(), start=1):
            # job_key takes the text id (it names the pipeline and the model), so no two
            # pipelines or models give their outputs the same UIDs; the audit keeps job 0.
            study = StudyInput(
                job_id=job_id,
                study_uid=study_uid,
                study_version=0,
                instances=tuple(instances),
            )
            target = targets[study_uid]
            target.mkdir(parents=True, exist_ok=True)
            runtime.audit.record(
                AuditEvent.INSTANCES_ACCESSED,
                study_uid=study_uid,
                patient_id=patients.get(study_uid),
                actor=actor,
                what=f"dicom-node run {pipeline}",
                instances=len(instances),
            )
            started = time.perf_counter()
            try:
                result = announcing(chosen, for_study(study_uid, index)).run(
                    study,
                    RunEnvironment(
                        workdir=target, uid_root=runtime.config.node.uid_root, node_version=__version__
                    ),
                )
            except PipelineError as exc:
                failed = True
                runtime.audit.record(
                    AuditEvent.INSTANCES_ACCESSED,
                    Outcome.SERIOUS_FAILURE,
                    study_uid=study_uid,
                    actor=actor,
                    what=f"dicom-node run {pipeline}",
                    error=str(exc),
                )
                summary.append({"study_uid": study_uid, "error": str(exc)})
                continue
            record_provenance(
                runtime.audit,
                study=replace(study, job_id=0),
                pipeline=chosen,
                result=result,
                patient_id=patients.get(study_uid),
                actor=actor,
                run="dicom-node run",
                uid_job_id=job_id,
            )
            series: dict[str, list[str]] = defaultdict(list)
            for o in result.outputs:
                path = o.path
                if target.resolve() not in path.resolve().parents:  # e.g. `forward`: outputs are the inputs
                    path = target / o.series_uid / f"{o.sop_uid}.dcm"
                    if out_root not in path.resolve().parents:  # UIDs were checked: never happens
                        runtime.close()
                        raise fail(f"refusing to write {path}: outside --out {out}")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(o.path, path)
                series[o.series_uid].append(str(path))
            summary.append(
                {
                    "study_uid": study_uid,
                    "inputs": len(instances),
                    "seconds": round(time.perf_counter() - started, 2),
                    "model": None if result.model is None else result.model.__dict__,
                    "gate": result.gate,
                    "qc": result.qc,
                    "outputs": [{"series_uid": s, "files": f} for s, f in series.items()],
                }
            )
    runtime.close()
    if json_out:
        print_json(
            {
                "pipeline": pipeline,
                "out": str(out),
                "studies": summary,
                "skipped_files": sum(skipped.values()),
                "skipped_by_reason": skipped,
            }
        )
    else:
        for s in summary:
            if "error" in s:
                console.print(f"study {s['study_uid']}: {s['error']}", markup=False)
                continue
            table = Table(
                title=f"{pipeline} on study {s['study_uid']} ({s['inputs']} inputs, {s['seconds']} s)"
            )
            for col in ("output series", "files", "first file"):
                table.add_column(col, overflow="fold")
            for o in s["outputs"]:
                table.add_row(o["series_uid"], str(len(o["files"])), o["files"][0])
            console.print(table)
            if s["model"]:
                m = s["model"]
                console.print(f"model {m['name']} {m['version']} (weights sha256 {m['weights_sha256']})")
            if s["gate"]:
                console.print(f"gate: {s['gate']}", markup=False)
            for qc_table in qc_tables(s["qc"]):
                console.print(qc_table)
        why = skipped_line(skipped)
        if why:
            console.print(why, markup=False, highlight=False)
    if failed:
        raise typer.Exit(1)
