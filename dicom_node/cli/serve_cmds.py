"""``serve`` and ``worker``."""

from __future__ import annotations

import json
import logging
import os
import signal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from dicom_node.cli.common import ConfigOpt, HomeOpt, app, config_error, err_console, fail, open_runtime
from dicom_node.config import ConfigError, load_config
from dicom_node.paths import NodePaths
from dicom_node.runtime import setup_logging


def serve_overrides(
    host: str | None,
    port: int | None,
    ae_title: str | None,
    workers: int | None,
    web_port: int | None = None,
) -> dict[str, Any]:
    node: dict[str, Any] = {}
    if host is not None:
        node["host"] = host
    if port is not None:
        node["port"] = port
    if ae_title is not None:
        node["ae_title"] = ae_title
    overrides: dict[str, Any] = {"node": node} if node else {}
    if workers is not None:
        overrides["workers"] = {"processes": workers}
    if web_port is not None:
        overrides["web"] = {"port": web_port} if web_port else {"enabled": False}
    return overrides


@app.command()
def serve(
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="DICOM port (default 11112).")] = None,
    ae_title: Annotated[
        str | None, typer.Option("--ae-title", help="This node's AE title (default DICOM_NODE).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default 1).")] = None,
    web_port: Annotated[
        int | None, typer.Option(help="Port of the web pages (default 8480; 0 = off).")
    ] = None,
    receivers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=32,
            help="Receiving processes on the DICOM port (default 1; SO_REUSEPORT, load evened out).",
        ),
    ] = None,
    ready_file: Annotated[Path | None, typer.Option(hidden=True)] = None,
    receiver_of: Annotated[str | None, typer.Option("--receiver-of", hidden=True)] = None,
    more_overrides: Annotated[str, typer.Option("--overrides", hidden=True)] = "{}",
) -> None:
    """Receive studies, run the routed pipelines, deliver the results. Stops on SIGTERM/Ctrl-C.

    Listening beyond loopback needs \\[receiver] require_known_callers and require_called_ae
    (or accept_unknown_callers = true); one serve per --home."""
    from dicom_node.jobs.routing import PolicyError
    from dicom_node.serve import AlreadyRunning
    from dicom_node.serve import serve as run_serve

    overrides = serve_overrides(host, port, ae_title, workers, web_port)
    if receivers is not None:
        overrides["node"] = {**overrides.get("node", {}), "receivers": receivers}
    for section, values in json.loads(more_overrides).items():  # a receiving process's parent's
        overrides[section] = {**overrides.get(section, {}), **values}
    runtime = open_runtime(config, home, overrides, upgrade=True)  # a start upgrades the schema
    setup_logging(runtime.paths, runtime.config)
    try:
        code = run_serve(
            runtime, config_path=config, overrides=overrides, ready_file=ready_file, receiver_of=receiver_of
        )
    except ConfigError as exc:
        raise config_error(exc) from None
    except (AlreadyRunning, OSError) as exc:
        raise fail(str(exc)) from None
    except PolicyError as exc:
        for problem in exc.problems:
            err_console.print(Text(f"policy error: {problem}"), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        runtime.close()
    raise typer.Exit(code)


@app.command()
def worker(
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    queues: Annotated[
        str | None,
        typer.Option(
            "--queues",
            help="Celery engine: the pipelines this host runs, comma-separated (e.g. "
            "restoration,synthesis on a GPU host); default: every pipeline.",
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes", min=1, max=64, help="Celery engine: jobs at once (default \\[workers] processes)."
        ),
    ] = None,
    run_id: Annotated[str, typer.Option("--run-id", hidden=True)] = "standalone",
    overrides: Annotated[str, typer.Option("--overrides", hidden=True)] = "{}",
) -> None:
    """Run jobs on this host: a Celery worker, under `\\[workers] engine = "celery"`.

    It takes jobs of the given pipelines from the broker (the node's database, broker and
    storage must be reachable here). Under the local engine, `serve` starts its own workers."""
    from dicom_node.worker import Worker

    if run_id == "standalone":  # run by hand (serve names its own workers' run)
        celery_worker(config, home, queues, processes, json.loads(overrides))
        return
    runtime = open_runtime(config, home, json.loads(overrides), upgrade=True)
    setup_logging(runtime.paths, runtime.config)
    w = Worker(runtime.config, runtime.paths, runtime.db, runtime.audit, run_id, runtime.policy_path)

    def _stop(_signum: int, _frame: object) -> None:
        w.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        w.run()
    finally:
        logging.getLogger(__name__).info("worker %s stopped", w.worker_id)
        runtime.close()


def celery_worker(
    config: Path | None, home: Path, queues: str | None, processes: int | None, overrides: dict[str, Any]
) -> None:
    """``dicom-node worker`` run by hand: a Celery worker (the Celery engine only). It
    upgrades an older schema as ``serve`` does, before its pool children open the node."""
    try:
        engine = load_config(config, home, overrides).config.workers.engine
    except ConfigError as exc:
        raise config_error(exc) from None
    if engine != "celery":  # refused before the database is opened: nothing upgraded
        raise fail(
            'this node runs its jobs in `serve`\'s own workers ([workers] engine = "local"); '
            'set engine = "celery" to run them on separate worker hosts'
        )
    runtime = open_runtime(config, home, overrides, upgrade=True)
    node_config = runtime.config
    runtime.close()
    from dicom_node.broker import run_worker
    from pipelines.registry import pipeline_names

    known = pipeline_names()
    chosen = [q.strip() for q in (queues or ",".join(known)).split(",") if q.strip()]
    unknown = [q for q in chosen if q not in known]
    if unknown or not chosen:
        raise fail(
            f"--queues: unknown pipeline(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}"
        )
    setup_logging(NodePaths.for_home(home, node_config), node_config)
    if node_config.workers.nice:  # below a receiver on the same host (its pool processes inherit it)
        os.nice(node_config.workers.nice)
    run_worker(
        node_config, home.resolve(), config, overrides, chosen, processes or node_config.workers.processes
    )


class DemoPipeline(StrEnum):
    RESTORATION = "restoration"
    FORWARD = "forward"
    PROGNOSIS = "prognosis"
    SYNTHESIS = "synthesis"


@app.command()
def demo(
    home: Annotated[
        Path,
        typer.Option(
            "--home",
            help="Where the demo keeps its state. A home the demo made is cleared and reused; "
            "any other that holds a node's state is refused (see --fresh).",
        ),
    ] = Path("demo-home"),
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="Use a home that holds a node the demo did not make: its state (audit log "
            "included) is moved into <home>/before-demo-<UTC time>/ first, never deleted.",
        ),
    ] = False,
    slices: Annotated[int, typer.Option(min=1, max=500, help="Slices of the simulated CT.")] = 12,
    size: Annotated[int, typer.Option(min=64, max=1024, help="Rows/columns of the simulated CT.")] = 512,
    pipeline: Annotated[
        DemoPipeline, typer.Option(help="What the node runs on the study.")
    ] = DemoPipeline.RESTORATION,
    config: ConfigOpt = None,
) -> None:
    """Run the main job end to end: local PACS, node, simulated scanner, delivery, summary."""
    from dicom_node.cli.common import console
    from dicom_node.lab.demo_home import HomeNotTheDemos, claim_home

    if config is not None:
        raise fail("demo writes its own config and policy (its local PACS); run it without --config")
    try:
        claimed = claim_home(home, fresh=fresh)  # before anything is imported, started or written
    except HomeNotTheDemos as exc:
        raise fail(f"demo: {exc}") from None
    if claimed.moved_aside is not None:
        console.print(
            f"--fresh: moved {', '.join(claimed.moved)} from {claimed.path} to {claimed.moved_aside} "
            "(nothing was deleted)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    from dicom_node.lab.demo import DemoFailed, run_demo

    try:
        run_demo(claimed, console, slices=slices, size=size, pipeline=pipeline.value)
    except DemoFailed as exc:
        raise fail(f"demo failed: {exc}") from None
