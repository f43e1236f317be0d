"""What every ``dicom-node`` command shares: the Typer app, the common options, ``fail``.

Every command takes ``--config FILE`` and ``--home DIR``. Errors a user can cause print
one line and exit 2 (configuration) or 1 (everything else); tracebacks are for bugs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from dicom_node import __version__
from dicom_node.config import ConfigError, LoadedConfig, load_config
from dicom_node.runtime import NoNodeState, Runtime, StateUnavailable
from dicom_node.runtime import os_user as os_user  # who runs a command, for the audit trail

app = typer.Typer(
    name="dicom-node",
    help="A DICOM node that routes studies through AI pipelines and delivers provenance-stamped results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def make_console(stderr: bool = False) -> Console:
    """Rich console; when output is not a terminal, wide enough that UIDs are never cut.

    Without Rich markup: what the commands print comes from the network and the database (a
    calling AE title, a Patient ID, a Series Description, a refusal reason), and under
    markup a "[b]" in it would be taken as a style and a "[/x]" would raise. Styles are
    given as ``Text`` objects instead.
    """
    probe = Console(stderr=stderr, markup=False)
    return probe if probe.is_terminal else Console(stderr=stderr, width=240, markup=False)


console = make_console()
err_console = make_console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (default: <home>/dicom-node.toml if present, else defaults).",
    ),
]
HomeOpt = Annotated[
    Path,
    typer.Option("--home", help="Node home; state lives under <home>/var/.", envvar="DICOM_NODE_HOME"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def not_a_directory(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists and is not a directory (None: none;
    ``mkdir(parents=True)`` can make ``path``)."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def output_dir(path: Path, option: str = "--out") -> None:
    """A directory a command will write into (``--out``, ``--report``): made now (when
    missing) and checked writable, before any work that could take minutes or hours is
    spent. A file in its way, a folder that cannot be made or is not writable: one line."""
    blocker = not_a_directory(path)
    if blocker is not None:
        raise fail(f"{option} {path}: {blocker} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"{option} {path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise fail(f"{option} {path}: not writable by this user")


def config_error(exc: ConfigError) -> typer.Exit:
    """Print every configuration problem (one line each) and return the exit to raise (code 2)."""
    for problem in exc.problems:
        err_console.print(Text(f"config error: {problem}"), highlight=False, soft_wrap=True)
    return typer.Exit(2)


def read_config(config: Path | None, home: Path) -> LoadedConfig:
    """The config alone, for commands that need no database (exit 2 on a config error)."""
    try:
        return load_config(config, home)
    except ConfigError as exc:
        raise config_error(exc) from None


def open_runtime(
    config: Path | None,
    home: Path,
    overrides: dict[str, Any] | None = None,
    actor: str | None = None,
    *,
    upgrade: bool = False,
) -> Runtime:
    """Open the home, creating its state when it has none (``serve``, ``run``, ``user add``).

    ``upgrade``: bring an older release's schema up to date (``serve`` and ``worker`` only);
    without it such a home is refused in one line, exit 1 (:meth:`Runtime.open`).
    """
    try:
        return Runtime.open(config, home, overrides, actor=actor, upgrade=upgrade)
    except ConfigError as exc:
        raise config_error(exc) from None
    except StateUnavailable as exc:
        raise fail(str(exc)) from None


def open_existing(
    config: Path | None, home: Path, actor: str | None = None, *, upgrade: bool = False
) -> Runtime:
    """Open a home that already holds a node's state; on one that holds none, say so and
    exit 1, creating nothing (a mistyped --home must not read as an empty node).

    ``upgrade`` as for :func:`open_runtime` (``db upgrade`` only); without it an older
    release's schema is refused, exit 1, and left as it is.
    """
    try:
        return Runtime.open(config, home, actor=actor, existing=True, upgrade=upgrade)
    except ConfigError as exc:
        raise config_error(exc) from None
    except (NoNodeState, StateUnavailable) as exc:
        raise fail(str(exc)) from None


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def version_callback(value: bool) -> None:
    if value:
        console.print(f"dicom-node {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """dicom-node: receive, route, process, deliver — with provenance and an audit trail."""
