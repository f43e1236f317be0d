"""``dicom-node review list | show | approve | reject``: the outputs the gate held.

Approve and reject are recorded with the reviewer's identity (``os:<login>``, or
``--reviewer`` for a named person at a shared console).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from dicom_node.cli.common import (
    ConfigOpt,
    HomeOpt,
    JsonOpt,
    app,
    console,
    fail,
    open_existing,
    os_user,
    print_json,
)
from dicom_node.db.schema import MAX_ROW_ID

review_app = typer.Typer(
    help="Outputs held for review: list, show, approve (deliver) or reject (never sent).",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")

JobArg = Annotated[int, typer.Argument(help="Job id (see `dicom-node review list`).", min=1, max=MAX_ROW_ID)]
ReviewerOpt = Annotated[
    str | None,
    typer.Option("--reviewer", help="Who decides, for the audit trail (default: os:<your login>)."),
]


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


@review_app.command("list")
def review_list(config: ConfigOpt = None, home: HomeOpt = Path("."), json_out: JsonOpt = False) -> None:
    """Jobs waiting for review, oldest first, with why they were held."""
    from dicom_node.jobs.review import held_jobs

    runtime = open_existing(config, home)
    rows = held_jobs(runtime.db)
    runtime.close()
    if json_out:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} job(s) held for review", title_justify="left")
    for col in ("job", "study", "patient id", "rule", "pipeline", "to", "held since", "why"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["study_uid"],
            r["patient_id"] or "",
            r["rule"] or "",
            r["pipeline"],
            ",".join(r["destinations"]),
            _when(r["held_since"]),
            "; ".join(r["reasons"] + _newer(r)),
        )
    console.print(table)


def _newer(job: dict[str, Any]) -> list[str]:
    """The line saying that a later version of the study has a job by the same rule."""
    newer = job.get("newer_version")
    if not newer:
        return []
    return [
        f"the study changed: job {newer['job']} ({newer['state']}) was made from version "
        f"{newer['study_version']}; review that one (this one cannot be approved)"
    ]


@review_app.command("show")
def review_show(
    job_id: JobArg,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    png_dir: Annotated[
        Path | None,
        typer.Option("--png", help="Also write PNG previews (series, uncertainty, hallucination) here."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """One job: why it was held, its QC figures, its output series; optionally PNG previews."""
    from dicom_node.jobs.previews import previews
    from dicom_node.jobs.review import ReviewError, job_detail

    runtime = open_existing(config, home)
    try:
        detail = job_detail(runtime.db, runtime.audit, job_id)
        written: list[str] = []
        if png_dir is not None:
            made = previews(runtime.db, job_id)
            png_dir.mkdir(parents=True, exist_ok=True)
            for kind, data in made.images.items():
                target = png_dir / f"job{job_id}-{kind}.png"
                target.write_bytes(data)
                written.append(str(target))
            detail["previews"] = {"z_mm": made.z, "slice": made.why, "files": written}
    except ReviewError as exc:
        raise fail(str(exc)) from None
    finally:
        runtime.close()
    if json_out:
        print_json(detail)
        return
    console.print(
        Text(
            f"job {detail['id']}: {detail['state']} — rule {detail['rule']}, pipeline {detail['pipeline']}, "
            f"gate {detail['gate']}, destinations {', '.join(detail['destinations']) or 'none'}",
            style="bold",
        )
    )
    console.print(
        Text(f"study {detail['study_uid']} (patient id {detail['patient_id']}) from {detail['from']}")
    )
    for reason in detail["reasons"]:
        console.print(Text(f"  held because: {reason}"))
    for line in _newer(detail):
        console.print(Text(f"  {line}", style="bold"))
    if detail["qc"]:
        console.print(Text("QC figures: " + "; ".join(f"{k} {v:.4g}" for k, v in detail["qc"].items())))
    for o in detail["outputs"]:
        console.print(
            Text(f"  output {o['kind']:<13} series {o['series_uid']} ({o['instances']} instance(s))")
        )
    for path in written:
        console.print(Text(f"  preview: {path}"))


@review_app.command("approve")
def review_approve(
    job_id: JobArg,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    note: Annotated[str | None, typer.Option(help="Optional note for the audit trail.")] = None,
    reviewer: ReviewerOpt = None,
) -> None:
    """Release a held job: its outputs are queued for delivery to the rule's destinations."""
    from dicom_node.delivery.profiles import DestinationProfiles
    from dicom_node.jobs.review import ReviewError, approve

    who = reviewer or os_user()
    runtime = open_existing(config, home, actor=who)
    try:
        n = approve(
            runtime.db,
            runtime.audit,
            job_id,
            who,
            note,
            handover=DestinationProfiles(runtime.config),
            uid_root=runtime.config.node.uid_root,
        )
    except ReviewError as exc:
        raise fail(str(exc)) from None
    finally:
        runtime.close()
    console.print(f"job {job_id} approved by {who}: {n} delivery(ies) queued")


@review_app.command("reject")
def review_reject(
    job_id: JobArg,
    reason: Annotated[str, typer.Option("--reason", help="Why (required; goes into the audit trail).")],
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    reviewer: ReviewerOpt = None,
) -> None:
    """Reject a held job: it is marked failed with the reason and nothing is ever sent."""
    from dicom_node.jobs.review import ReviewError, reject

    who = reviewer or os_user()
    runtime = open_existing(config, home, actor=who)
    try:
        reject(runtime.db, runtime.audit, job_id, who, reason)
    except ReviewError as exc:
        raise fail(str(exc)) from None
    finally:
        runtime.close()
    console.print(f"job {job_id} rejected by {who}: nothing will be sent")
