"""``echo`` and ``send``: talk to a DICOM peer, over DICOM TLS with ``--tls`` (the node's
[tls] certificate, key and CA file; see docs/tls.md)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from rich.table import Table

from dicom_node.cli.common import (
    ConfigOpt,
    HomeOpt,
    JsonOpt,
    app,
    config_error,
    console,
    fail,
    print_json,
    read_config,
)
from dicom_node.config import Destination, NodeConfig, _check_ae_title
from dicom_node.delivery.sender import echo as c_echo
from dicom_node.delivery.sender import send_series
from dicom_node.net.tls import ClientTls, TlsConfigError
from pipelines.base import OutputInstance

_PEER = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


TlsOpt = Annotated[
    bool,
    typer.Option(
        "--tls",
        help="DICOM TLS: verify the peer against \\[tls] ca_file (or --ca-file), present \\[tls] cert_file.",
    ),
]
CaFileOpt = Annotated[
    str | None, typer.Option("--ca-file", help="With --tls: CA file for the peer's certificate.")
]
ServerNameOpt = Annotated[
    str | None,
    typer.Option(
        "--tls-server-name", help="With --tls: the name the peer's certificate must carry (default HOST)."
    ),
]


def parse_peer(value: str) -> tuple[str, str, int]:
    m = _PEER.match(value.strip())
    if not m:
        raise fail(f"--to {value!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    return m["aet"], m["host"], int(m["port"])


def calling_title(calling: str | None, config: NodeConfig) -> str:
    """--calling, checked as the node's own AE title is (default: the node's)."""
    if calling is None:
        return config.node.ae_title
    try:
        return _check_ae_title(calling)
    except ValueError as exc:
        raise fail(f"--calling: {exc}") from None


def destination(options: dict[str, str], **fields: Any) -> Destination:
    """The peer as a :class:`Destination`; a bad value is one line naming the option it
    came from (``options``: field name → option, e.g. ``{"port": "PORT"}``)."""
    try:
        return Destination(**fields)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            option = options.get(field, field)
            message = str(error["msg"]).removeprefix("Value error, ")
            value = repr(fields.get(field))
            problems.append(f"{option}: {message}" if value in message else f"{option} {value}: {message}")
        raise fail("; ".join(problems)) from None


def _absolute(ca_file: str | None) -> str:
    """--ca-file as given on the command line: relative to the working directory."""
    return str(Path(ca_file).resolve()) if ca_file else ""


def tls_client(config: NodeConfig, home: Path, destination: Destination) -> ClientTls | None:
    """The node's TLS client settings for ``destination`` (None: plain), checked here so a
    missing or unusable file is one config error line before anything connects."""
    if not destination.tls:
        return None
    tls = ClientTls(config.tls, home)
    try:
        tls.args_for(destination)
    except TlsConfigError as exc:
        raise config_error(exc) from None
    return tls


@app.command()
def echo(
    host: Annotated[str, typer.Argument(help="Peer host.")],
    port: Annotated[int, typer.Argument(help="Peer DICOM port.")],
    aet: Annotated[str, typer.Option("--aet", help="Called AE title.")] = "ANY-SCP",
    calling: Annotated[
        str | None, typer.Option("--calling", help="Calling AE title (default: this node's).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds.")] = 10.0,
    tls: TlsOpt = False,
    ca_file: CaFileOpt = None,
    tls_server_name: ServerNameOpt = None,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """C-ECHO a peer: is it up, and does it accept us?"""
    node_config = read_config(config, home).config  # writes nothing to disk
    calling_ae = calling_title(calling, node_config)
    if not timeout > 0:
        raise fail(f"--timeout {timeout:g}: must be more than 0 seconds")
    peer = destination(
        {"ae_title": "--aet", "host": "HOST", "port": "PORT"},
        ae_title=aet,
        host=host,
        port=port,
        tls=tls,
        ca_file=_absolute(ca_file),
        tls_server_name=tls_server_name,
    )
    client = tls_client(node_config, home, peer)
    result = c_echo(
        host,
        port,
        called_ae=aet,
        calling_ae=calling_ae,
        timeout=timeout,
        tls_args=client.args_for(peer) if client else None,
    )
    status = result.status
    if status is None:
        raise fail(f"no association with {aet}@{host}:{port}: {result.error}")
    if status != 0:
        raise fail(f"{aet}@{host}:{port} answered C-ECHO with status 0x{status:04X}")
    console.print(f"{aet}@{host}:{port} answered C-ECHO{' over TLS' if tls else ''}: success")


def _collect(paths: list[Path]) -> tuple[dict[str, list[OutputInstance]], list[Path]]:
    by_series: dict[str, list[OutputInstance]] = defaultdict(list)
    skipped: list[Path] = []
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise fail(f"{p}: no such file or directory")
    for f in files:
        try:
            ds = dcmread(
                f,
                stop_before_pixels=True,
                specific_tags=["SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"],
            )
            meta = ds.file_meta
            by_series[str(ds.SeriesInstanceUID)].append(
                OutputInstance(
                    sop_uid=str(meta.MediaStorageSOPInstanceUID),
                    series_uid=str(ds.SeriesInstanceUID),
                    sop_class_uid=str(meta.MediaStorageSOPClassUID),
                    transfer_syntax_uid=str(meta.TransferSyntaxUID),
                    path=f,
                )
            )
        except (InvalidDicomError, AttributeError, KeyError, OSError, ValueError):
            skipped.append(f)
    return by_series, skipped


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or directories (searched recursively).")],
    to: Annotated[str, typer.Option("--to", help="Destination as AET@HOST:PORT.")],
    calling: Annotated[
        str | None, typer.Option("--calling", help="Calling AE title (default: this node's).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per association step.")] = 60.0,
    tls: TlsOpt = False,
    ca_file: CaFileOpt = None,
    tls_server_name: ServerNameOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
) -> None:
    """C-STORE files to a peer, one association per series, bytes as stored.

    A compressed file goes decompressed (Explicit VR Little Endian) only to a peer that
    accepts none of its stored transfer syntax.
    """
    aet, host, port = parse_peer(to)
    node_config = read_config(config, home).config  # writes nothing to disk
    calling_ae = calling_title(calling, node_config)
    peer = destination(
        {
            "ae_title": f"--to {to!r}: AE title",
            "host": f"--to {to!r}: host",
            "port": f"--to {to!r}: port",
            "timeout_seconds": "--timeout",
        },
        ae_title=aet,
        host=host,
        port=port,
        timeout_seconds=timeout,
        tls=tls,
        ca_file=_absolute(ca_file),
        tls_server_name=tls_server_name,
    )
    client = tls_client(node_config, home, peer)
    by_series, skipped = _collect(paths)
    if not by_series:
        raise fail(f"no DICOM Part 10 files found in {', '.join(map(str, paths))}")
    results = []
    for series_uid, files in by_series.items():
        report = send_series(peer, files, calling_ae=calling_ae, tls=client)
        results.append(
            {
                "series_uid": series_uid,
                "instances": len(files),
                "sent": report.sent,
                "failed": len(report.failed),
                "error": report.error,
            }
        )
    if json_out:
        print_json({"destination": to, "series": results, "skipped_files": [str(s) for s in skipped]})
    else:
        table = Table(title=f"sent to {to}")
        for col in ("series", "instances", "sent", "failed", "error"):
            table.add_column(col)
        for r in results:
            table.add_row(
                str(r["series_uid"]),
                str(r["instances"]),
                str(r["sent"]),
                str(r["failed"]),
                str(r["error"] or ""),
            )
        console.print(table)
        if skipped:
            console.print(f"skipped {len(skipped)} file(s) that are not DICOM Part 10")
    if any(r["error"] for r in results):
        raise typer.Exit(1)
