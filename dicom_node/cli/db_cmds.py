"""``dicom-node db upgrade``: bring the node database's schema up to this release's."""

from __future__ import annotations

from pathlib import Path

import typer

from dicom_node.cli.common import ConfigOpt, HomeOpt, app, console, fail, open_existing, os_user, read_config
from dicom_node.db.engine import newest_revision
from dicom_node.paths import NodePaths

db_app = typer.Typer(help="The node database's schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def upgrade(config: ConfigOpt = None, home: HomeOpt = Path(".")) -> None:
    """Upgrade the node database's schema to this release's; stop the running node first.

    Every pending migration runs in one transaction (a failure leaves the schema as it was)
    and the upgrade is recorded in the audit log (schema-upgraded). `serve` upgrades at start
    too; every other command refuses a schema older than this release's.
    """
    from dicom_node.serve import AlreadyRunning, ServeLock, lock_holder_pid

    paths = NodePaths.for_home(home, read_config(config, home).config)
    pidfile = paths.run / "serve.pid"
    try:  # a serve on this home holds this lock for its life (serve.ServeLock): refuse
        lock = ServeLock(pidfile, paths.home).acquire() if paths.run.is_dir() else None
    except AlreadyRunning:
        other = lock_holder_pid(pidfile)
        who = f"a dicom-node serve (pid {other})" if other else "a dicom-node serve"
        raise fail(
            f"{who} is running on {paths.home} (it holds {pidfile}): stop it first; "
            "the schema was not changed"
        ) from None
    except OSError as exc:
        raise fail(f"cannot use {pidfile}: {exc.strerror or exc}") from None
    try:
        runtime = open_existing(config, home, actor=os_user(), upgrade=True)
    finally:
        if lock is not None:
            lock.release()
    change, where = runtime.schema_change, runtime.db.where
    runtime.close()
    if change is None:
        console.print(
            f"the database {where} is at schema revision {newest_revision()} already: nothing to upgrade",
            highlight=False,
            soft_wrap=True,
        )
    elif change.created:
        console.print(
            f"created the schema of the database {where} at revision {change.after}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(
            f"upgraded the database {where} from schema revision {change.before_text} to "
            f"{change.after} (audit record schema-upgraded)",
            highlight=False,
            soft_wrap=True,
        )
