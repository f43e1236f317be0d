"""``archives echo|find|retrieve``: check an archive of [archives.NAME], look for a patient's
studies in it, bring one in as a prior (see docs/priors.md, "Archives")."""

from __future__ import annotations

import socket
from datetime import date, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
    read_config,
)
from dicom_node.delivery.sender import unresolvable
from dicom_node.ingest.archives import Archive, ArchiveError, Archives, StudyQuery
from dicom_node.ingest.indexer import Indexer
from dicom_node.ingest.origin import OriginRules, job_output_lookup
from dicom_node.ingest.store import InstanceStore
from dicom_node.serve import running_serve

archives_app = typer.Typer(
    help="Archives to query and retrieve prior studies from (\\[archives.NAME]).", no_args_is_help=True
)
app.add_typer(archives_app, name="archives")

NameArg = Annotated[str, typer.Argument(help="The archive, as named in \\[archives.NAME].")]


def _day(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        raise fail(f"{option} {value!r}: expected a date as YYYY-MM-DD, e.g. 2024-01-01") from None


def _unresolvable(archive: Archive, exc: socket.gaierror) -> typer.Exit:
    """An archive whose host name does not resolve: one line naming it."""
    return fail(unresolvable(str(archive.section.host), archive.where, exc))


@archives_app.command("echo")
def echo_cmd(name: NameArg, config: ConfigOpt = None, home: HomeOpt = Path(".")) -> None:
    """C-ECHO the archive (a QIDO-RS request for a dicomweb one): is it up, does it accept us?"""
    loaded = read_config(config, home)  # writes nothing to disk
    try:
        archive = Archives(loaded.config, home, None).get(name)
        said = archive.echo()
    except ArchiveError as exc:
        raise fail(str(exc)) from None
    except socket.gaierror as exc:
        raise _unresolvable(archive, exc) from None
    console.print(f"{said}: success", highlight=False)


@archives_app.command("find")
def find_cmd(
    name: NameArg,
    patient: Annotated[str | None, typer.Option("--patient", help="Patient ID.")] = None,
    modality: Annotated[str | None, typer.Option("--modality", help="e.g. MR, CT.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Studies on or after YYYY-MM-DD.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Studies on or before YYYY-MM-DD.")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study Instance UID.")] = None,
    series: Annotated[bool, typer.Option("--series", help="List each study's series too.")] = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """Studies in the archive (Study Root C-FIND, or QIDO-RS), oldest first; audited as a Query."""
    query = StudyQuery(
        patient_id=patient,
        modality=modality.upper() if modality else None,
        since=_day(since, "--since"),
        until=_day(until, "--until"),
        study_uid=study,
    )
    if not query.keys():
        raise fail("give at least one of --patient, --modality, --since, --until, --study")
    runtime = open_existing(config, home, actor=os_user())
    try:
        archive = Archives(runtime.config, runtime.paths.home, runtime.audit, actor=os_user()).get(name)
        studies = archive.find_studies(query)
        series_of = {s.study_uid: archive.find_series(s.study_uid) for s in studies} if series else {}
    except ArchiveError as exc:
        raise fail(str(exc)) from None
    except socket.gaierror as exc:
        raise _unresolvable(archive, exc) from None
    finally:
        runtime.close()
    if json_out:
        print_json(
            {
                "archive": name,
                "query": query.keys(),
                "studies": [
                    {
                        **s.as_dict(),
                        **({"series": [x.as_dict() for x in series_of[s.study_uid]]} if series else {}),
                    }
                    for s in studies
                ],
            }
        )
        return
    table = Table(title=f"{len(studies)} study(ies) in archive {name}")
    for column in ("date", "patient", "modalities", "description", "series", "instances", "study"):
        table.add_column(column)
    for s in studies:
        table.add_row(
            s.study_date or "",
            s.patient_id or "",
            "/".join(s.modalities),
            s.description or "",
            "" if s.series_count is None else str(s.series_count),
            "" if s.instance_count is None else str(s.instance_count),
            s.study_uid,
        )
        for x in series_of.get(s.study_uid, []):
            table.add_row(
                "", "", x.modality or "", f"  #{x.series_number or ''} {x.description or ''}", "",
                "" if x.instance_count is None else str(x.instance_count), f"  {x.series_uid}",
            )  # fmt: skip
    console.print(table)


@archives_app.command("retrieve")
def retrieve_cmd(
    name: NameArg,
    study: Annotated[str, typer.Option("--study", help="Study Instance UID to retrieve.")],
    series: Annotated[
        list[str] | None, typer.Option("--series", help="Only this series of it (repeatable).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Seconds in all (default: retrieve_timeout_seconds).")
    ] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """Bring a study (or some of its series) into this node's store as a prior: it never
    starts a job and is never forwarded. c-move needs `dicom-node serve` running on this
    home (the archive sends to its receiver); c-get and dicomweb store directly."""
    runtime = open_existing(config, home, actor=os_user())
    store: InstanceStore | None = None
    try:
        node = runtime.config
        section = node.archives.get(name)
        if section is not None and section.method == "c-move":
            if running_serve(runtime.paths.run / "serve.pid") is None:
                raise fail(
                    f"archive {name} retrieves by C-MOVE to this node's receiver, and no `dicom-node serve` "
                    f"runs on {runtime.paths.home}: start it first (or use an archive with method c-get)"
                )
        elif section is not None:
            indexer = Indexer(runtime.db, runtime.audit)
            store = InstanceStore(
                runtime.paths,
                runtime.db,
                indexer,
                fsync=node.storage.fsync,
                origin=OriginRules(node.node.ae_title, node.node.uid_root, job_output_lookup(runtime.db)),
            )
        archives = Archives(
            node, runtime.paths.home, runtime.audit, db=runtime.db, store=store, actor=os_user()
        )
        try:
            result = archives.get(name).retrieve(study, series or None, timeout=timeout)
        except ArchiveError as exc:
            raise fail(str(exc)) from None
    finally:
        if store is not None:
            store.close()
        runtime.close()
    if json_out:
        print_json(result.as_dict())
    else:
        console.print(
            f"archive {name} ({result.method}): {len(result.sop_uids)} instance(s) of study {study} "
            f"in the store as priors; completed {result.completed}, failed {result.failed}, "
            f"warning {result.warning} ({result.seconds:g} s)",
            highlight=False,
        )
        for reason in result.failures[:20]:
            console.print(f"  failed: {reason}", highlight=False)
    if result.error:
        raise fail(result.error)
    if not result.ok:
        raise typer.Exit(1)
