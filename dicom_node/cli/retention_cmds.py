"""``retention``: which studies the retention rule removes, which it keeps and why; ``--run`` applies it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dicom_node.cli.common import ConfigOpt, HomeOpt, JsonOpt, app, console, open_existing, print_json


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _age(ts: float, now: float) -> str:
    days = (now - ts) / 86400.0
    return f"{days:.1f} d" if days >= 1 else f"{days * 24:.1f} h"


@app.command()
def retention(
    run: Annotated[
        bool, typer.Option("--run", help="Apply the rule now (serve applies it every check_minutes).")
    ] = False,
    config: ConfigOpt = None,
    home: HomeOpt = Path("."),
    json_out: JsonOpt = False,
) -> None:
    """What the \\[retention] rule removes now, what it keeps and why; --run removes it."""
    from dicom_node.delivery.retention import Retention, review

    runtime = open_existing(config, home, actor="cli")
    section = runtime.config.retention
    keeper = Retention(
        runtime.db, runtime.audit, section, runtime.paths.data, runtime.paths.outputs, actor="cli"
    )
    now = time.time()
    try:
        free = keeper.free_mb()
        with runtime.db.read() as conn:
            plan = review(conn, section, now)
        outcome = keeper.apply(now) if run and section.enabled else None
    finally:
        runtime.close()
    rule = {
        "enabled": section.enabled,
        "keep_days": section.keep_days,
        "free_disk_mb": section.free_disk_mb,
        "min_age_hours": section.min_age_hours,
        "free_mb": free,
    }
    under_pressure = [c for c in plan.younger if section.free_disk_mb and free < section.free_disk_mb]
    if json_out:
        body: dict[str, Any] = {
            "rule": rule,
            "due": [vars(c) for c in plan.due],
            "under_disk_pressure": [vars(c) for c in under_pressure],
            "kept": [vars(k) for k in plan.kept],
        }
        if outcome is not None:
            body["removed"] = [c.study_uid for c in outcome.removed]
            body["files_removed"] = outcome.files
            body["swept"] = outcome.swept
        print_json(body)
        return
    if not section.enabled:
        console.print(
            "retention is off ([retention] keep_days = 0 and free_disk_mb = 0): nothing is ever removed; "
            f"{free} MB free under {runtime.paths.data}"
        )
    else:
        parts = []
        if section.keep_days:
            parts.append(f"studies go {section.keep_days:g} days after their last activity")
        if section.free_disk_mb:
            parts.append(
                f"below {section.free_disk_mb} MB free the oldest go first, none active within "
                f"{section.min_age_hours:g} h"
            )
        console.print(f"retention: {'; '.join(parts)}; {free} MB free under {runtime.paths.data}")
    rows: list[tuple[str, str, str, str, int | str, str]] = [
        ("due", c.study_uid, c.patient_id, _age(c.last_activity, now), c.instances, "") for c in plan.due
    ]
    rows += [
        ("disk", c.study_uid, c.patient_id, _age(c.last_activity, now), c.instances, "")
        for c in under_pressure
    ]
    rows += [("kept", k.study_uid, "", _age(k.last_activity, now), "", k.why) for k in plan.kept]
    if rows:
        table = Table(
            title=f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'} old enough to go", title_justify="left"
        )
        for column in ("", "study", "patient id", "inactive", "instances", "kept because"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(str(v) for v in row))
        console.print(table)
    elif section.enabled:
        console.print("no study is old enough to go")
    if run and not section.enabled:
        console.print("nothing removed: the rule is off")
    elif outcome is not None:
        console.print(
            f"removed {len(outcome.removed)} stud{'y' if len(outcome.removed) == 1 else 'ies'} "
            f"({outcome.files} files, {outcome.bytes / 1e6:.1f} MB)"
            + (f"; {outcome.swept} file(s) left by an interrupted removal deleted" if outcome.swept else "")
        )
