"""``dicom-node demo``: the main job end to end, on embedded defaults, in one command.

Starts a local PACS (Orthanc when installed, otherwise a bare pynetdicom store SCP) and a
real ``dicom-node serve`` process whose policy (the shipped ``policies/default.yaml``)
sends low-dose CT (CTDIvol below 5 mGy) to the ``restoration`` pipeline and the results to
the PACS. A simulated low-dose CT scanner (the physics-based simulator) sends a study with
dcmtk ``storescu``; the demo waits for the delivery, checks that the PACS holds the
restored series, both maps, the SEG and the SR under the original study, prints what
happened, the shipped model's evaluation figures (computed on simulated data) and where
everything is, and stops what it started. ``--pipeline forward`` runs the plain backbone
instead (the study delivered unchanged); ``--pipeline prognosis`` a predicted brain-tumour
follow-up from priors in the archive (:mod:`dicom_node.lab.demo_prognosis`), ``--pipeline
synthesis`` the missing FLAIR of a brain MR study (:mod:`dicom_node.lab.demo_synthesis`). It
runs only in a home :func:`dicom_node.lab.demo_home.claim_home` gave it: never over a node it
did not make.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dicom_node.db import queries
from dicom_node.db.engine import Database
from dicom_node.delivery.sender import send_series
from dicom_node.lab.demo_home import DemoHome
from dicom_node.lab.localpeers import (
    ORTHANC,
    STORESCU,
    MiniPACS,
    NodeProcess,
    Orthanc,
    have,
    policy_yaml,
    storescu,
)
from dicom_node.lab.simulate import FULL_DOSE_CTDIVOL, LdctSpec, write_ct_series, write_ldct_study
from models.sim.phantom import PhantomSpec
from pipelines.base import OutputInstance


class DemoFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class DemoResult:
    study_uid: str
    instances: int
    job_id: int
    pacs: str
    pacs_instances: int
    seconds_to_delivered: float


def _config(pacs_aet: str, pacs_port: int, pipeline: str) -> str:
    return f"""# Written by `dicom-node demo`: {pipeline} for every matching study, results to the local PACS.
[completeness]
stable_seconds = 3

[outbox]
backoff_initial_seconds = 1
backoff_max_seconds = 5

[workers]
poll_seconds = 0.2

[destinations.pacs]
ae_title = "{pacs_aet}"
host = "127.0.0.1"
port = {pacs_port}
profile = "pacs"

# The shipped policy's MR planning rule (sct) delivers to "tps"; the local PACS stands in.
[destinations.tps]
ae_title = "{pacs_aet}"
host = "127.0.0.1"
port = {pacs_port}
profile = "tps"

# The shipped policy's prognosis rule fetches a patient's earlier studies from an archive
# named "pacs": the local PACS is it (C-GET: the PACS needs no entry for the node).
[archives.pacs]
ae_title = "{pacs_aet}"
host = "127.0.0.1"
port = {pacs_port}
method = "c-get"

[policy]
file = "policy.yaml"
"""


def _policy(pipeline: str) -> str:
    """The shipped default policy for the restoration, prognosis and synthesis demos; a
    forward-all rule otherwise."""
    if pipeline in ("restoration", "prognosis", "synthesis"):
        return (resources.files("policies") / "default.yaml").read_text()
    return policy_yaml(pipeline, name=f"demo-{pipeline}-everything")


def _send(study_dir: Path, port: int, aet: str, console: Console) -> str:
    if have(STORESCU):
        result = storescu(study_dir, port, aet, calling="SIMCT")
        if result.returncode != 0:
            raise DemoFailed(f"storescu could not send the study: {result.stderr.strip()[-500:]}")
        return "dcmtk storescu"
    from pydicom import dcmread

    files = sorted(study_dir.iterdir())
    first = dcmread(files[0], stop_before_pixels=True)
    outputs = [
        OutputInstance(
            sop_uid=str(dcmread(f, stop_before_pixels=True).SOPInstanceUID),
            series_uid=str(first.SeriesInstanceUID),
            sop_class_uid=str(first.SOPClassUID),
            transfer_syntax_uid=str(first.file_meta.TransferSyntaxUID),
            path=f,
        )
        for f in files
    ]
    from dicom_node.config import Destination

    report = send_series(Destination(ae_title=aet, host="127.0.0.1", port=port), outputs, calling_ae="SIMCT")
    if not report.ok:
        raise DemoFailed(f"could not send the study: {report.error}")
    return "pynetdicom (dcmtk storescu not installed)"


def _evaluation_table(console: Console) -> None:
    """The shipped restoration model's evaluation figures (from its evaluation summary)."""
    from models.zoo import version_dir

    try:
        summary_path: Path | None = version_dir("ldct-restoration") / "evaluation.json"
    except FileNotFoundError:
        summary_path = None
    if summary_path is None or not summary_path.exists():
        console.print("(no evaluation summary shipped with the model; run `dicom-node evaluate restoration`)")
        return
    summary = json.loads(summary_path.read_text())
    table = Table(
        title=f"shipped model ldct-restoration {summary_path.parent.name}, held-out SIMULATED test set "
        "(dicom-node evaluate restoration)",
        title_justify="left",
    )
    for col in (
        "dose",
        "PSNR input",
        "PSNR model",
        "gain",
        "vs NLM",
        "vs BM3D",
        "90% coverage",
        "lesion contrast",
    ):
        table.add_column(col)
    for dose, d in summary.get("doses", {}).items():
        psnr = d["psnr_db"]
        table.add_row(
            dose,
            f"{psnr['low-dose input']:.2f} dB",
            f"{psnr['model']:.2f} dB",
            f"+{d['psnr_gain_over_input_db']:.2f} dB",
            f"{d['psnr_gain_over_nlm_db']:+.2f} dB",
            f"{d['psnr_gain_over_bm3d_db']:+.2f} dB" if "psnr_gain_over_bm3d_db" in d else "-",
            f"{d['coverage_90']:.3f}",
            f"{d['lesion_contrast_ratio'].get('model', float('nan')):.2f} "
            f"(full dose {d.get('lesion_contrast_ratio_reference', float('nan')):.2f})",
        )
    console.print(table)
    aurocs: dict[str, float] = next(
        (d["hallucination_auroc"] for d in summary.get("doses", {}).values() if "hallucination_auroc" in d),
        {},
    )
    if aurocs:
        console.print(
            "hallucination map AUROC (simulated): " + "; ".join(f"{k} {v:.3f}" for k, v in aurocs.items())
        )
    if "inference_slices_per_s_512" in summary:
        # read from the shipped evaluation.json, not timed by this demo
        console.print(
            f"inference speed (from the shipped evaluation, measured on the evaluation machine, "
            f"not this one): {summary['inference_slices_per_s_512']} slices/s at 512x512 incl. maps"
        )


def run_demo(
    claimed: DemoHome,
    console: Console,
    *,
    slices: int = 12,
    size: int = 512,
    pipeline: str = "restoration",
    timeout: float = 300,
) -> DemoResult:
    """Run the demo in a home :func:`~dicom_node.lab.demo_home.claim_home` gave it."""
    home = claimed.path
    started = time.time()
    if pipeline in ("prognosis", "synthesis"):
        from dicom_node.lab import demo_prognosis, demo_synthesis
        from dicom_node.lab.demo_review import run_reviewed_demo

        prepare = demo_prognosis.prepare if pipeline == "prognosis" else demo_synthesis.prepare
        study_uid, sent, job_id, pacs_label, in_pacs, seconds = run_reviewed_demo(
            claimed,
            console,
            label=pipeline,
            prepare=prepare,
            config=lambda aet, port: _config(aet, port, pipeline),
            policy=_policy(pipeline),
            timeout=timeout * 2,
        )
        return DemoResult(study_uid, sent, job_id, pacs_label, in_pacs, seconds)

    pacs: Orthanc | MiniPACS
    if have(ORTHANC):
        pacs = Orthanc(home, aet="DEMO_PACS").start()
        pacs_name = f"Orthanc (REST {pacs.url})"
    else:
        pacs = MiniPACS(home, aet="DEMO_PACS").start()
        pacs_name = f"pynetdicom store SCP in {pacs.dir} (Orthanc not installed)"
    node = NodeProcess(home, _config(pacs.aet, pacs.dicom_port, pipeline), policy=_policy(pipeline))
    try:
        console.print(f"[bold]1.[/] local PACS up: {pacs_name}, AE {pacs.aet} on 127.0.0.1:{pacs.dicom_port}")
        node.start()
        console.print(
            f"[bold]2.[/] dicom-node serve up: AE {node.ae_title} on 127.0.0.1:{node.port}, home {home}"
        )
        study_dir = home / "scanner-out"
        if study_dir.exists():
            shutil.rmtree(study_dir)
        if pipeline == "restoration":
            study, _reference = write_ldct_study(
                study_dir, LdctSpec(slices=slices, size=size, dose=0.25, seed=7)
            )
            sent_dir = study_dir / "low-dose"
            what = (
                f"a SIMULATED low-dose chest CT (25% dose, CTDIvol {0.25 * FULL_DOSE_CTDIVOL['chest']:g} mGy)"
            )
        else:
            study = write_ct_series(study_dir, PhantomSpec(rows=size, columns=size, slices=slices, seed=7))
            sent_dir = study_dir
            what = "a SIMULATED CT"
        console.print(
            f"[bold]3.[/] simulated scanner wrote {what}: {slices} slices ({size}x{size}) to {study_dir}"
        )
        how = _send(sent_dir, node.port, node.ae_title, console)
        console.print(f"[bold]4.[/] scanner sent the study with {how}")
        db = Database(f"sqlite:///{home / 'var' / 'node.db'}")
        deadline = time.time() + timeout
        job = None
        while time.time() < deadline:
            jobs = queries.list_jobs(db, study_uid=study.study_uid)
            if jobs and jobs[-1]["state"] in ("delivered", "failed", "held"):
                job = jobs[-1]
                break
            time.sleep(0.5)
        if job is None:
            raise DemoFailed(f"the study was not delivered within {timeout:.0f} s; see {home / 'var/log'}")
        if job["state"] != "delivered":
            raise DemoFailed(f"job {job['id']} ended {job['state']}: {job['reason']}")
        deliveries = [d for d in queries.list_deliveries(db) if d["job_id"] == job["id"]]
        expected = slices + (len(deliveries) - 1 if pipeline == "restoration" else 0)
        if isinstance(pacs, Orthanc):
            series = pacs.series_of_study(study.study_uid)
            in_pacs = sum(len(s["Instances"]) for s in series)
            kinds = ", ".join(sorted(s["MainDicomTags"].get("SeriesDescription", "?") for s in series))
        else:
            in_pacs, kinds = pacs.count(), ""
        if in_pacs != expected:
            raise DemoFailed(f"the PACS holds {in_pacs} of {expected} instances")
        console.print(
            f"[bold]5.[/] study ready, job {job['id']} ran `{pipeline}`, PACS confirms {in_pacs} instances "
            f"in {len(deliveries)} series under the original study"
        )
        if kinds:
            console.print(f"   series in the PACS: {kinds}")
        studies = queries.list_studies(db)
        db.dispose()
        summary = Table(title="what happened", title_justify="left", show_header=False)
        summary.add_row("study", study.study_uid)
        summary.add_row("received", f"{studies[0]['instances']} instances from {studies[0]['source_ae']}")
        summary.add_row(
            "job", f"#{job['id']} {pipeline} (study version {job['study_version']}) → {job['state']}"
        )
        for d in deliveries:
            summary.add_row(
                "delivery",
                f"series {d['series_uid']} → {d['destination']}: "
                f"{d['state']} after {d['attempts']} attempt(s)",
            )
        summary.add_row("end to end", f"{time.time() - started:.1f} s (includes the 3 s completeness wait)")
        console.print(summary)
        if pipeline == "restoration":
            _evaluation_table(console)
        where = Table(title="where everything is", title_justify="left", show_header=False)
        where.add_row("config", str(node.config_path))
        where.add_row("received files", str(home / "var" / "data" / "studies"))
        where.add_row("index + jobs", str(home / "var" / "node.db"))
        where.add_row("audit log", str(home / "var" / "audit.db"))
        where.add_row("application log", str(home / "var" / "log" / "dicom-node.log"))
        where.add_row("PACS storage", str(pacs.dir))
        console.print(where)
        console.print(
            f"explore: dicom-node studies --home {home} · dicom-node jobs --home {home} · "
            f"dicom-node outbox --home {home}"
        )
        return DemoResult(
            study_uid=study.study_uid,
            instances=slices,
            job_id=int(job["id"]),
            pacs=pacs_name,
            pacs_instances=in_pacs,
            seconds_to_delivered=time.time() - started,
        )
    finally:
        node.stop()
        pacs.stop()
