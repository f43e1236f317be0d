"""``dicom-node audit verify | search | report | export`` — every read is itself audited,
but for ``verify --audit-db``, which reads a handed-over audit database alone and writes nothing."""

from __future__ import annotations

import datetime as dt
import json
import stat
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from audit import AuditEvent, AuditTrail, NoAuditLog, Outcome
from audit.trail import VerifyResult
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
from dicom_node.config import check_database_url
from dicom_node.db.engine import first_line

audit_app = typer.Typer(
    help="The tamper-evident audit log: verify, search, report, export.", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")


class ExportFormat(StrEnum):
    FHIR_R5 = "fhir-r5"
    FHIR_R4B = "fhir-r4b"
    DICOM_XML = "dicom-xml"


def _log_used(trail: AuditTrail, what: str, outcome: Outcome = Outcome.SUCCESS, **facts: Any) -> None:
    trail.record(AuditEvent.AUDIT_LOG_USED, outcome, actor=os_user(), what=what, **facts)


def parse_when(value: str | None, option: str) -> float | None:
    """ISO date or date-time (local time unless it carries an offset) → UNIX time."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise fail(
            f"{option} {value!r}: expected an ISO date or date-time, e.g. 2026-11-26 or 2026-11-26T14:30"
        ) from None
    try:
        return parsed.timestamp()
    except (ValueError, OverflowError, OSError) as exc:  # e.g. 0001-01-01 as local time
        raise fail(f"{option} {value!r}: outside the dates this system can convert ({exc})") from None


def _check_named_checkpoints(path: Path) -> None:
    """A checkpoint file named on the command line must be there: a mistyped name must not
    read as "no checkpoints yet" (as a configured file that a fresh node has not written)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise fail(f"--checkpoint-file {path}: no such file") from None
    except OSError as exc:
        raise fail(f"--checkpoint-file {path}: cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise fail(f"--checkpoint-file {path}: a directory, not a checkpoint file")


@audit_app.command("verify")
def verify(
    ctx: typer.Context,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    checkpoint_file: Annotated[
        Path | None, typer.Option(help="Checkpoints to hold the log against (default: the configured file).")
    ] = None,
    audit_db: Annotated[
        str | None,
        typer.Option(
            "--audit-db",
            metavar="PATH_OR_URL",
            help="Verify this audit database alone (an SQLite file, or a database URL), read-only: "
            "no node home is opened, nothing is created or written (not even the record of this "
            "check). Hold it against checkpoints with --checkpoint-file.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Check the hash chain and the external checkpoints. Exit 0 when intact, 1 otherwise.

    A checkpoint that cannot be read leaves the log not shown intact (exit 1).
    """
    if checkpoint_file is not None:
        _check_named_checkpoints(checkpoint_file)
    if audit_db is not None:
        for name in ("config", "home"):
            source = ctx.get_parameter_source(name)  # Typer's own click: compared by name
            if source is not None and source.name == "COMMANDLINE":
                raise fail(f"--audit-db verifies that database alone: leave out --{name}", 2)
        _verify_alone(audit_db, checkpoint_file, json_out)
        return
    runtime = open_existing(config, home)
    started = time.perf_counter()
    result = runtime.audit.verify(checkpoint_file)
    elapsed = time.perf_counter() - started
    _log_used(
        runtime.audit,
        "verify",
        Outcome.SUCCESS if result.ok else Outcome.SERIOUS_FAILURE,
        intact=result.ok,
        first_bad_seq=result.first_bad_seq,
    )
    runtime.close()
    _show_verified(result, elapsed, json_out)


def _show_verified(result: VerifyResult, elapsed: float, json_out: bool, **more: Any) -> None:
    """Print what ``verify`` found; exit 1 unless the log is intact."""
    if json_out:
        print_json({**result.__dict__, "seconds": round(elapsed, 3), **more})
    elif result.ok:
        console.print(
            f"audit log intact: {result.records} records, head {result.head_seq}, "
            f"{result.checkpoints_checked} checkpoint(s) match ({elapsed:.2f} s)"
        )
    elif result.first_bad_seq is None:  # the records hold, but cannot be shown against the checkpoints
        console.print(f"AUDIT LOG NOT INTACT — {result.problem}", markup=False, soft_wrap=True)
    else:
        console.print(
            f"AUDIT LOG NOT INTACT — first bad record: {result.first_bad_seq}: {result.problem}", markup=False
        )
    if not result.ok:
        raise typer.Exit(1)


def _audit_db_url(value: str) -> tuple[str, str]:
    """``--audit-db`` as (SQLAlchemy URL, how to name it): a URL as given (checked, shown
    without its password), anything else an SQLite file's path."""
    if "://" not in value:
        return f"sqlite:///{Path(value).absolute()}", value
    try:
        check_database_url(value)
    except ValueError as exc:
        raise fail(f"--audit-db: {exc}") from None
    return value, make_url(value).render_as_string(hide_password=True)


def _verify_alone(audit_db: str, checkpoint_file: Path | None, json_out: bool) -> None:
    """``verify --audit-db``: that database's chain (and the named checkpoints), nothing else."""
    url, shown = _audit_db_url(audit_db)
    try:
        trail = AuditTrail(url, read_only=True)
    except FileNotFoundError:
        raise fail(f"--audit-db {shown}: no such file (nothing was created)") from None
    except IsADirectoryError:
        raise fail(f"--audit-db {shown}: a directory, not an audit database") from None
    except NoAuditLog:
        raise fail(f"--audit-db {shown}: holds no audit log (no audit_events table)") from None
    except DBAPIError as exc:
        raise fail(f"--audit-db {shown}: cannot be read: {first_line(exc)}") from None
    try:
        started = time.perf_counter()
        result = trail.verify(checkpoint_file)
        elapsed = time.perf_counter() - started
    except DBAPIError as exc:
        raise fail(f"--audit-db {shown}: cannot be read: {first_line(exc)}") from None
    finally:
        trail.dispose()
    if result.ok and checkpoint_file is None and not json_out:
        console.print(
            f"{shown}: no checkpoint file given (--checkpoint-file), so a cut-off tail would not show",
            markup=False,
            soft_wrap=True,
            highlight=False,
        )
    _show_verified(result, elapsed, json_out, database=shown)


@audit_app.command("search")
def search(
    patient: Annotated[str | None, typer.Option(help="Patient ID.")] = None,
    study: Annotated[str | None, typer.Option(help="Study Instance UID.")] = None,
    since: Annotated[str | None, typer.Option(help="From (ISO date/date-time).")] = None,
    until: Annotated[str | None, typer.Option(help="Until (ISO date/date-time).")] = None,
    event: Annotated[
        list[str] | None, typer.Option(help="Event name (repeatable), e.g. instance-stored.")
    ] = None,
    ae: Annotated[str | None, typer.Option(help="Calling or called AE title.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many records.")] = 1000,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    json_out: JsonOpt = False,
) -> None:
    """Find audit records by patient, study, time, event or AE title."""
    known = {e.value for e in AuditEvent}
    for name in event or []:
        if name not in known:
            raise fail(f"--event {name!r}: unknown event (known: {', '.join(sorted(known))})")
    filters = {"patient": patient, "study": study, "since": since, "until": until, "event": event, "ae": ae}
    since_at, until_at = parse_when(since, "--since"), parse_when(until, "--until")
    runtime = open_existing(config, home)
    records = runtime.audit.search(
        patient_id=patient,
        study_uid=study,
        since=since_at,
        until=until_at,
        events=event,
        ae=ae,
        limit=limit,
    )
    _log_used(runtime.audit, "search", filters={k: v for k, v in filters.items() if v}, results=len(records))
    runtime.close()
    if json_out:
        print_json([r.__dict__ for r in records])
        return
    table = Table(title=f"{len(records)} audit record(s)", title_justify="left")
    for col in (
        "seq",
        "time",
        "event",
        "outcome",
        "study",
        "patient id",
        "calling → called",
        "host",
        "facts",
    ):
        table.add_column(col, overflow="fold")
    for r in records:
        facts = json.dumps(r.facts, default=str)
        table.add_row(
            str(r.seq),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.at)),
            r.event,
            Outcome(r.outcome).name.lower(),
            r.study_uid or "",
            r.patient_id or "",
            f"{r.calling_ae or ''} → {r.called_ae or ''}" if (r.calling_ae or r.called_ae) else "",
            r.peer_host or "",
            facts if len(facts) < 160 else facts[:157] + "...",
        )
    console.print(table)


@audit_app.command("report")
def report(
    study: Annotated[str, typer.Option(help="Study Instance UID.")],
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    json_out: JsonOpt = False,
) -> None:
    """What came in, what ran with which models, what went out where, and whether it was confirmed."""
    from audit.report import build_study_report, render_text

    runtime = open_existing(config, home)
    records = runtime.audit.search(study_uid=study)
    _log_used(runtime.audit, "report", study_uid=study)
    runtime.close()
    if not records:
        raise fail(f"no audit records for study {study}")
    built = build_study_report(study, records)
    if json_out:
        print_json(built.as_dict())
    else:
        console.print(render_text(built), markup=False, highlight=False)


@audit_app.command("export")
def export(
    format: Annotated[
        ExportFormat, typer.Option("--format", help="FHIR R5 or R4B Bundle, or DICOM audit messages.")
    ] = ExportFormat.FHIR_R5,
    study: Annotated[str | None, typer.Option(help="Only this Study Instance UID.")] = None,
    since: Annotated[str | None, typer.Option(help="From (ISO date/date-time).")] = None,
    until: Annotated[str | None, typer.Option(help="Until (ISO date/date-time).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write to this file (default: standard output).")
    ] = None,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """A FHIR Bundle of AuditEvent + Provenance (R5 or R4B), or DICOM audit messages (PS3.15 XML).

    The export is written first and recorded after, as a failure when it could not be written.
    """
    from audit import export as exporter

    since_at, until_at = parse_when(since, "--since"), parse_when(until, "--until")
    runtime = open_existing(config, home)
    try:
        records = runtime.audit.search(study_uid=study, since=since_at, until=until_at)
        if format is ExportFormat.DICOM_XML:
            text = exporter.dicom_xml_document(records)
        else:
            version = "R5" if format is ExportFormat.FHIR_R5 else "R4B"
            text = json.dumps(exporter.fhir_bundle(records, version=version), indent=2)
        error = None
        if out is None:
            typer.echo(text)
        else:
            try:
                out.write_text(text, encoding="utf-8")  # the XML declares UTF-8; JSON is UTF-8
            except OSError as exc:
                error = str(exc.strerror or exc)
        outcome = Outcome.SUCCESS if error is None else Outcome.SERIOUS_FAILURE
        failed = {} if error is None else {"error": error}
        _log_used(
            runtime.audit,
            "export",
            outcome,
            format=format.value,
            study_uid=study,
            records=len(records),
            **failed,
        )
        runtime.audit.record(
            AuditEvent.EXPORT,
            outcome,
            actor=os_user(),
            study_uid=study,
            format=format.value,
            records=len(records),
            to=str(out or "stdout"),
            **failed,
        )
    finally:
        runtime.close()
    if error is not None:
        raise fail(f"--out {out}: cannot write the export: {error}")
    if out is not None:
        console.print(f"wrote {len(records)} record(s) as {format.value} to {out}")
