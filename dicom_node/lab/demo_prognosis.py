"""``dicom-node demo --pipeline prognosis``: a predicted brain-tumour follow-up, end to end.

Orthanc plays the hospital's PACS and archive: it holds three earlier visits of one SIMULATED
brain-tumour patient (:mod:`models.sim.prognosis`). The simulated MR scanner sends the fourth
visit to a real ``dicom-node serve`` running the shipped policy; its ``brain-tumour-prognosis``
rule fetches the two most recent earlier visits from Orthanc (C-GET), registers them, runs
``prognosis`` and holds the result for review, as the rule says. The demo shows the held job
and its figures, approves it as a reviewer would (``dicom-node review approve``), waits for
the delivery and lists what Orthanc holds under the current study. Every figure is computed
on simulated data and says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dicom_node.db import queries
from dicom_node.db.engine import Database
from dicom_node.lab.demo_home import DemoHome
from dicom_node.lab.localpeers import ORTHANC, STORESCU, NodeProcess, Orthanc, have, storescu
from dicom_node.lab.simulate_prognosis import PrognosisSpec, write_prognosis_patient
from models.zoo import read_card, version_dir

#: The simulated patient the demo follows.
SEED = 5


def _wait(db: Database, study_uid: str, states: set[str], timeout: float) -> dict[str, Any] | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = queries.list_jobs(db, study_uid=study_uid)
        if jobs and jobs[-1]["state"] in states:
            return jobs[-1]
        time.sleep(0.5)
    return None


def run_prognosis_demo(
    claimed: DemoHome,
    console: Console,
    *,
    config: Callable[[str, int], str],
    policy: str,
    timeout: float = 600,
) -> tuple[str, int, int, str, int, float]:
    """Run the demo; returns (study UID, instances sent, job id, PACS, instances in the PACS,
    seconds). ``config`` gives the node's config for the PACS's AE title and port."""
    from dicom_node.lab.demo import DemoFailed

    if not have(ORTHANC):
        raise DemoFailed(
            "the prognosis demo needs Orthanc as the archive of earlier studies: apt install orthanc"
        )
    if not have(STORESCU):
        raise DemoFailed("the prognosis demo sends with dcmtk storescu: apt install dcmtk")
    home = claimed.path
    started = time.time()
    pacs = Orthanc(
        home, aet="DEMO_PACS", extra_config={"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True}
    )
    pacs.start()
    node = NodeProcess(home, config(pacs.aet, pacs.dicom_port), policy=policy)
    try:
        console.print(f"[bold]1.[/] local PACS and archive up: Orthanc (REST {pacs.url}), AE {pacs.aet}")
        node.start()
        console.print(
            f"[bold]2.[/] dicom-node serve up: AE {node.ae_title} on 127.0.0.1:{node.port}, home {home}"
        )
        _, visits = write_prognosis_patient(home / "scanner-out", PrognosisSpec(visits=4, seed=SEED))
        for visit in visits[:3]:
            for series in visit.series.values():
                for path in series.files:
                    pacs.upload(path.read_bytes())
        days = ", ".join(f"day {v.day}" for v in visits[:3])
        console.print(
            f"[bold]3.[/] the archive holds three earlier visits of a SIMULATED brain-tumour patient "
            f"({days}; T1 post-contrast and FLAIR each)"
        )
        current = visits[3]
        files: list[Path] = [p for series in current.series.values() for p in series.files]
        sent = storescu(files, node.port, node.ae_title, calling="MR_SCANNER")
        if sent.returncode != 0:
            raise DemoFailed(f"storescu could not send the study: {sent.stderr.strip()[-500:]}")
        console.print(
            f"[bold]4.[/] the scanner sent visit 4 (day {current.day}): {len(files)} images "
            "with dcmtk storescu"
        )
        db = Database(f"sqlite:///{home / 'var' / 'node.db'}")
        try:
            job = _wait(db, current.study_uid, {"held", "failed", "refused", "delivered"}, timeout)
            if job is None:
                raise DemoFailed(f"no prognosis result within {timeout:.0f} s; see {home / 'var/log'}")
            if job["state"] != "held":
                raise DemoFailed(f"job {job['id']} ended {job['state']}: {job['reason']}")
            shown = node.cli_json("review", "show", str(job["id"]))
            if pacs.statistics()["CountInstances"] != sum(
                len(v.series[k].files) for v in visits[:3] for k in v.series
            ):
                raise DemoFailed("something reached the PACS before the review")
            console.print(
                f"[bold]5.[/] priors fetched and registered, job {job['id']} ran `{job['pipeline']}`, "
                f"nothing has left the node: {job['reason']}"
            )
            figures = Table(title="the forecast (SIMULATED patient)", title_justify="left", show_header=False)
            for name, value in shown.get("qc", {}).items():
                if "volume" in name or "extent" in name or "visits" in name:
                    figures.add_row(
                        name, f"{value:g}" + (" ml" if "volume" in name or "extent" in name else "")
                    )
            console.print(figures)
            approved = node.cli("review", "approve", str(job["id"]), "--reviewer", "demo-reviewer")
            console.print(f"[bold]6.[/] {approved.stdout.strip()}")
            job = _wait(db, current.study_uid, {"delivered", "failed"}, 180)
            if job is None or job["state"] != "delivered":
                raise DemoFailed(f"the approved outputs were not delivered: {job}")
        finally:
            db.dispose()
        stored = pacs.series_of_study(current.study_uid)
        in_pacs = sum(len(s["Instances"]) for s in stored)
        listing = Table(title="what Orthanc holds under visit 4", title_justify="left")
        listing.add_column("modality")
        listing.add_column("series")
        listing.add_column("instances", justify="right")
        for s in sorted(stored, key=lambda s: int(s["MainDicomTags"].get("SeriesNumber", 0) or 0)):
            tags = s["MainDicomTags"]
            listing.add_row(
                tags.get("Modality", "?"), tags.get("SeriesDescription", ""), str(len(s["Instances"]))
            )
        console.print(f"[bold]7.[/] delivered: {in_pacs} instances in {len(stored)} series")
        console.print(listing)
        card = read_card(version_dir("prognosis-growth"))
        metrics = Table(title="the shipped model's evaluation (SIMULATED patients)", title_justify="left")
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
        return current.study_uid, len(files), int(job["id"]), "Orthanc", in_pacs, time.time() - started
    finally:
        node.stop()
        pacs.stop()
