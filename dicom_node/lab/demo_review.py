"""The demos whose shipped rule holds the result for review (``prognosis``, ``synthesis``).

Orthanc plays the hospital's PACS (and, for prognosis, its archive of earlier studies). A real
``dicom-node serve`` runs the shipped policy; the simulated scanner sends the study with dcmtk
``storescu``; the demo waits for the job to be held, shows the QC figures the reviewer sees,
checks that nothing reached the PACS before the review, approves as a reviewer would
(``dicom-node review approve``), waits for the delivery and lists what Orthanc holds under the
study, then the shipped model's evaluation figures (SIMULATED) and where everything is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dicom_node.db import queries
from dicom_node.db.engine import Database
from dicom_node.lab.demo_home import DemoHome
from dicom_node.lab.localpeers import ORTHANC, STORESCU, NodeProcess, Orthanc, have, storescu
from models.zoo import read_card, version_dir


@dataclass(frozen=True)
class ReviewedStudy:
    """What one reviewed demo sends, and how it talks about it."""

    study_uid: str
    files: list[Path]  # what the scanner sends
    calling_ae: str
    sent: str  # "the scanner sent ..." (after "the scanner sent")
    model: str  # zoo name of the model whose card figures are shown
    figures_title: str
    shows_figure: Callable[[str], bool]  # which QC figures of the held job to show
    archive: list[Path] = field(default_factory=list)  # uploaded to Orthanc first (priors)
    archived: str = ""  # what the archive holds, for the console


def _wait(db: Database, study_uid: str, states: set[str], timeout: float) -> dict[str, Any] | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = queries.list_jobs(db, study_uid=study_uid)
        if jobs and jobs[-1]["state"] in states:
            return jobs[-1]
        time.sleep(0.5)
    return None


def _figure(name: str, value: Any) -> str:
    if isinstance(value, (int, float)):
        unit = " ml" if "volume" in name or "extent" in name else ""
        return f"{value:g}{unit}"
    return str(value)


def run_reviewed_demo(
    claimed: DemoHome,
    console: Console,
    *,
    label: str,
    prepare: Callable[[Path], ReviewedStudy],
    config: Callable[[str, int], str],
    policy: str,
    timeout: float = 600,
) -> tuple[str, int, int, str, int, float]:
    """Run one reviewed demo (``label`` names it in errors; ``prepare`` writes the SIMULATED
    study under the given directory); returns (study UID, instances sent, job id, PACS,
    instances in the PACS, seconds). ``config`` gives the node's config for the PACS's AE
    title and port."""
    from dicom_node.lab.demo import DemoFailed

    if not have(ORTHANC):
        raise DemoFailed(f"the {label} demo needs Orthanc as the PACS: apt install orthanc")
    if not have(STORESCU):
        raise DemoFailed(f"the {label} demo sends with dcmtk storescu: apt install dcmtk")
    home = claimed.path
    started = time.time()
    pacs = Orthanc(
        home, aet="DEMO_PACS", extra_config={"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True}
    )
    pacs.start()
    node = NodeProcess(home, config(pacs.aet, pacs.dicom_port), policy=policy)
    try:
        console.print(f"[bold]1.[/] local PACS up: Orthanc (REST {pacs.url}), AE {pacs.aet}")
        node.start()
        console.print(
            f"[bold]2.[/] dicom-node serve up: AE {node.ae_title} on 127.0.0.1:{node.port}, home {home}"
        )
        study = prepare(home / "scanner-out")
        for path in study.archive:
            pacs.upload(path.read_bytes())
        step = 3
        if study.archive:
            console.print(f"[bold]{step}.[/] the archive holds {study.archived}")
            step += 1
        sent = storescu(study.files, node.port, node.ae_title, calling=study.calling_ae)
        if sent.returncode != 0:
            raise DemoFailed(f"storescu could not send the study: {sent.stderr.strip()[-500:]}")
        console.print(
            f"[bold]{step}.[/] the scanner sent {study.sent}: {len(study.files)} images with dcmtk storescu"
        )
        db = Database(f"sqlite:///{home / 'var' / 'node.db'}")
        try:
            job = _wait(db, study.study_uid, {"held", "failed", "refused", "delivered"}, timeout)
            if job is None:
                raise DemoFailed(f"no {label} result within {timeout:.0f} s; see {home / 'var/log'}")
            if job["state"] != "held":
                raise DemoFailed(f"job {job['id']} ended {job['state']}: {job['reason']}")
            shown = node.cli_json("review", "show", str(job["id"]))
            if pacs.statistics()["CountInstances"] != len(study.archive):
                raise DemoFailed("something reached the PACS before the review")
            console.print(
                f"[bold]{step + 1}.[/] job {job['id']} ran `{job['pipeline']}`, "
                f"nothing has left the node: {job['reason']}"
            )
            figures = Table(title=study.figures_title, title_justify="left", show_header=False)
            for name, value in shown.get("qc", {}).items():
                if study.shows_figure(name):
                    figures.add_row(name, _figure(name, value))
            console.print(figures)
            approved = node.cli("review", "approve", str(job["id"]), "--reviewer", "demo-reviewer")
            console.print(f"[bold]{step + 2}.[/] {approved.stdout.strip()}")
            job = _wait(db, study.study_uid, {"delivered", "failed"}, 180)
            if job is None or job["state"] != "delivered":
                raise DemoFailed(f"the approved outputs were not delivered: {job}")
        finally:
            db.dispose()
        stored = pacs.series_of_study(study.study_uid)
        in_pacs = sum(len(s["Instances"]) for s in stored)
        listing = Table(title="what Orthanc holds under the study", title_justify="left")
        listing.add_column("modality")
        listing.add_column("series")
        listing.add_column("instances", justify="right")
        for s in sorted(stored, key=lambda s: int(s["MainDicomTags"].get("SeriesNumber", 0) or 0)):
            tags = s["MainDicomTags"]
            listing.add_row(
                tags.get("Modality", "?"), tags.get("SeriesDescription", ""), str(len(s["Instances"]))
            )
        console.print(f"[bold]{step + 3}.[/] delivered: {in_pacs} instances in {len(stored)} series")
        console.print(listing)
        card = read_card(version_dir(study.model))
        metrics = Table(
            title=f"the shipped model's evaluation ({study.model}, SIMULATED data)", title_justify="left"
        )
        metrics.add_column("figure")
        metrics.add_column("value")
        for name, value in card.get("metrics", {}).items():
            metrics.add_row(name, str(value))
        console.print(metrics)
        where = Table(title="where everything is", title_justify="left", show_header=False)
        where.add_row("config", str(node.config_path))
        where.add_row("index + jobs", str(home / "var" / "node.db"))
        where.add_row("audit log", str(home / "var" / "audit.db"))
        where.add_row("PACS storage", str(pacs.dir))
        console.print(where)
        return study.study_uid, len(study.files), int(job["id"]), "Orthanc", in_pacs, time.time() - started
    finally:
        node.stop()
        pacs.stop()
