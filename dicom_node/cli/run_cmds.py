"""``dicom-node run PIPELINE PATH... --out DIR``: a pipeline on files, without the network.

To try a pipeline on a study before routing to it, and for batch work. Same stages and
writers as the routed path; audited the same way (instances accessed, one provenance
record per output series) in the audit log of ``--home``.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

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
    fail,
    open_runtime,
    os_user,
    print_json,
)
from dicom_node.ingest.part10 import split_part10
from dicom_node.jobs.provenance import record_provenance
from pipelines.base import InputInstance, PipelineError, RunEnvironment, StudyInput
from pipelines.registry import get_pipeline, pipeline_names


def _study_inputs(paths: list[Path]) -> tuple[dict[str, list[InputInstance]], dict[str, str | None], int]:
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
    skipped = 0
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
            skipped += 1
            continue
        studies[study_uid].append(
            InputInstance(
                sop_uid=str(meta.MediaStorageSOPInstanceUID),
                series_uid=series_uid,
                sop_class_uid=str(meta.MediaStorageSOPClassUID),
                transfer_syntax_uid=str(meta.TransferSyntaxUID),
                path=f,
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        patients[study_uid] = str(ds.get("PatientID", "")) or None
    return studies, patients, skipped


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
        raise fail(f"no DICOM Part 10 files found in {', '.join(map(str, paths))}")
    runtime = open_runtime(config, home)
    try:
        chosen = get_pipeline(pipeline, runtime.config.models.directory(pipeline))
    except PipelineError as exc:
        runtime.close()
        raise fail(str(exc)) from None
    actor = os_user()
    summary: list[dict[str, Any]] = []
    failed = False
    for study_uid, instances in studies.items():
        study = StudyInput(job_id=0, study_uid=study_uid, study_version=0, instances=tuple(instances))
        target = out if len(studies) == 1 else out / study_uid
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
            result = chosen.run(
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
            study=study,
            pipeline=chosen,
            result=result,
            patient_id=patients.get(study_uid),
            actor=actor,
            run="dicom-node run",
        )
        series: dict[str, list[str]] = defaultdict(list)
        for o in result.outputs:
            path = o.path
            if target.resolve() not in path.resolve().parents:  # e.g. `forward`: outputs are the inputs
                path = target / o.series_uid / f"{o.sop_uid}.dcm"
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
        print_json({"pipeline": pipeline, "out": str(out), "studies": summary, "skipped_files": skipped})
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
                console.print(f"gate: {s['gate']}; QC: {s['qc']}", markup=False)
        if skipped:
            console.print(f"skipped {skipped} file(s) that are not DICOM Part 10")
    if failed:
        raise typer.Exit(1)
