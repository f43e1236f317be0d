"""``studies``, ``jobs``, ``outbox``, ``quarantine``: what the node holds and is doing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import select

from dicom_node.cli.common import ConfigOpt, HomeOpt, JsonOpt, app, console, fail, open_existing, print_json
from dicom_node.db import queries
from dicom_node.db import schema as t
from dicom_node.db.schema import MAX_ROW_ID
from dicom_node.delivery.ledger import DeliveryState
from dicom_node.ingest.completeness import waiting_reasons
from dicom_node.jobs.state import JobState
from pipelines.base import series_label


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def _series_of(row: dict[str, Any]) -> str:
    """The series a job took, as a person finds it (``#3 'LD CHEST B30f'``); its UID when the
    index holds neither number nor description; empty for a job of the whole study."""
    if not row.get("series_uid"):
        return ""
    label = series_label(
        {"SeriesNumber": row.get("series_number"), "SeriesDescription": row.get("series_description")}
    )
    return label or str(row["series_uid"])


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    return table


@app.command()
def studies(config: ConfigOpt = None, home: HomeOpt = Path("."), json_out: JsonOpt = False) -> None:
    """Studies the node has received, with their state."""
    runtime = open_existing(config, home)
    rows = queries.list_studies(runtime.db)
    receiving = [r["study_uid"] for r in rows if r["state"] == "receiving"]
    with runtime.db.read() as conn:
        waiting = waiting_reasons(conn, runtime.config, receiving)  # MPPS, expected counts, timer
    for r in rows:
        r["waiting"] = waiting.get(r["study_uid"])
    runtime.close()
    if json_out:
        print_json(rows)
        return
    console.print(
        _table(
            f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'}",
            [
                "study",
                "patient id",
                "modalities",
                "series",
                "instances",
                "from",
                "state",
                "waiting",
                "last received",
            ],
            [
                [
                    r["study_uid"],
                    r["patient_id"],
                    ",".join(r["modalities"]),
                    r["series"],
                    r["instances"],
                    r["source_ae"],
                    r["state"],
                    r["waiting"],
                    _when(r["last_received_at"]),
                ]
                for r in rows
            ],
        )
    )


jobs_app = typer.Typer(
    help="Jobs and their state (queued, running, succeeded, failed, refused, held, delivering, "
    "delivered); run a failed or refused one again.",
    invoke_without_command=True,
)
app.add_typer(jobs_app, name="jobs")


@jobs_app.callback()
def jobs(
    ctx: typer.Context,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state.")] = None,
    study: Annotated[str | None, typer.Option(help="Only jobs of this Study Instance UID.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Jobs and their state (queued, running, succeeded, failed, refused, held, delivering, delivered)."""
    if ctx.invoked_subcommand is not None:
        return
    runtime = open_existing(config, home)
    rows = queries.list_jobs(runtime.db, state=state.value if state else None, study_uid=study)
    runtime.close()
    if json_out:
        print_json(rows)
        return
    console.print(
        _table(
            f"{len(rows)} job(s)",
            [
                "id",
                "study",
                "v",
                "series",
                "pipeline",
                "inputs",
                "destinations",
                "state",
                "reason",
                "updated",
            ],
            [
                [
                    r["id"],
                    r["study_uid"],
                    r["study_version"],
                    _series_of(r),
                    r["pipeline"] + ("" if r["urgency"] == "normal" else f" ({r['urgency']})"),
                    r["inputs"],
                    ",".join(r["destinations"]),
                    r["state"],
                    r["reason"],
                    _when(r["updated_at"]),
                ]
                for r in rows
            ],
        )
    )


@jobs_app.command("rerun")
def jobs_rerun(
    job_id: Annotated[int, typer.Argument(help="A failed or refused job's id.", min=1, max=MAX_ROW_ID)],
    reason: Annotated[
        str, typer.Option(help="Why (kept in the job's history and the audit log), e.g. what was fixed.")
    ] = "",
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """Run a failed or refused job again, on the same input, once what stopped it is fixed
    (a model that could not load, a pin to a model whose input domain covers the series)."""
    from dicom_node.jobs.rerun import NotRerunnable, rerun_job
    from dicom_node.runtime import os_user

    runtime = open_existing(config, home, actor="cli")
    try:
        said = rerun_job(runtime.db, runtime.audit, job_id, os_user(), reason)
    except KeyError as exc:
        raise fail(str(exc).strip("'\"")) from None
    except NotRerunnable as exc:
        raise fail(str(exc)) from None
    finally:
        runtime.close()
    console.print(said)


outbox_app = typer.Typer(
    help="Deliveries to PACS/TPS: list, inspect attempts, retry dead letters.",
    invoke_without_command=True,
)
app.add_typer(outbox_app, name="outbox")


@outbox_app.callback()
def outbox(
    ctx: typer.Context,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    state: Annotated[
        DeliveryState | None,
        typer.Option(help="Only deliveries in this state (committing: awaiting storage commitment)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """List deliveries (one per output series per destination)."""
    if ctx.invoked_subcommand is not None:
        return
    runtime = open_existing(config, home)
    rows = queries.list_deliveries(runtime.db, state=state.value if state else None)
    runtime.close()
    if json_out:
        print_json(rows)
        return
    console.print(
        _table(
            f"{len(rows)} deliver{'y' if len(rows) == 1 else 'ies'}",
            ["id", "job", "series", "destination", "state", "attempts", "next try", "last error"],
            [
                [
                    r["id"],
                    r["job_id"],
                    r["series_uid"],
                    r["destination"],
                    r["state"],
                    r["attempts"],
                    _when(r["next_attempt_at"]) if r["state"] == "pending" else "",
                    r["last_error"],
                ]
                for r in rows
            ],
        )
    )


@outbox_app.command("attempts")
def outbox_attempts(
    delivery_id: Annotated[
        int, typer.Argument(help="Delivery id (see `dicom-node outbox`).", min=1, max=MAX_ROW_ID)
    ],
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    json_out: JsonOpt = False,
) -> None:
    """Every attempt of one delivery, with its outcome."""
    runtime = open_existing(config, home)
    rows = queries.list_delivery_attempts(runtime.db, delivery_id)
    if not rows:  # none yet, or no such delivery: say which
        with runtime.db.read() as conn:
            known = conn.execute(select(t.deliveries.c.id).where(t.deliveries.c.id == delivery_id)).first()
        if known is None:
            runtime.close()
            raise fail(f"no delivery {delivery_id} (see `dicom-node outbox`)")
    runtime.close()
    if json_out:
        print_json(rows)
        return
    console.print(
        _table(
            f"delivery {delivery_id}: {len(rows)} attempt(s)",
            ["#", "started", "finished", "outcome", "sent", "failed", "detail"],
            [
                [
                    i + 1,
                    _when(r["started_at"]),
                    _when(r["finished_at"]),
                    r["outcome"],
                    r["instances_sent"],
                    r["instances_failed"],
                    r["detail"],
                ]
                for i, r in enumerate(rows)
            ],
        )
    )


@outbox_app.command("retry")
def outbox_retry(
    delivery_id: Annotated[int, typer.Argument(help="A dead-lettered delivery id.", min=1, max=MAX_ROW_ID)],
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """Give a dead-lettered delivery a fresh set of attempts."""
    from dicom_node.delivery.outbox import Outbox

    runtime = open_existing(config, home, actor="cli")
    try:
        Outbox(runtime.config, runtime.db, runtime.audit, "cli").retry_dead(delivery_id, actor="cli")
    except (KeyError, ValueError) as exc:
        raise fail(str(exc).strip("'\"")) from None
    runtime.close()
    console.print(f"delivery {delivery_id} queued again")


@app.command()
def quarantine(config: ConfigOpt = None, home: HomeOpt = Path("."), json_out: JsonOpt = False) -> None:
    """Instances the node refused to index, with the reason; the bytes are kept."""
    runtime = open_existing(config, home)
    rows = queries.list_quarantine(runtime.db)
    runtime.close()
    if json_out:
        print_json(rows)
        return
    console.print(
        _table(
            f"{len(rows)} quarantined item(s)",
            ["id", "at", "from", "host", "claimed SOP UID", "reason", "file"],
            [
                [
                    r["id"],
                    _when(r["at"]),
                    r["calling_ae"],
                    r["peer_host"],
                    r["claimed_sop_uid"],
                    r["reason"],
                    r["path"],
                ]
                for r in rows
            ],
        )
    )
