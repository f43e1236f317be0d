"""The real-file corpus: every CT and MR file of pydicom's and pydicom-data's test files,
sent to a running node and run through every pipeline whose modality matches.

Files no one here wrote (41 cases, about 9 MB): legacy CT without a Frame of Reference,
enhanced multi-frame CT and MR, JPEG 2000 / JPEG-LS / RLE / big-endian encodings, a
perfusion map, reformatted and oblique MR, truncated streams, DICOMDIR trees whose
"series" mix orientations or hold no pixels. None is larger than 1024×1024 pixels.

*Cases.* Each file is a case of its own; the files of a DICOMDIR tree (pydicom's
``dicomdirtests``, pydicom-data's ``ST000000``) that share a folder and a Series Instance
UID are one multi-file case. pydicom ships the same image in several encodings under one
SOP Instance UID, so each case is sent under new Study, Series and SOP Instance UIDs —
every other element, the pixel data and the transfer syntax as shipped — and no two
cases are one instance to the node. Each case goes in one association (pynetdicom,
streaming each file's bytes: dcmtk's storescu cannot read the truncated JPEG 2000 file).

*Route.* C-STORE → the node (policy ``all-matches``, one rule per pipeline, gate
``shadow``: run and audit, send nothing) → CT: ``restoration`` and ``denoise-classical``;
MR: ``sct``.

*Outcome of each (case, pipeline).* Acceptable: ``ok`` (the job succeeded, its output
validation passed and every object it wrote passes dciodvfy with no error, the stale
Debian dictionary's Synthetic Data line aside); ``refused`` / ``failed`` with a one-line
reason the pipeline gave; ``rejected`` at C-STORE with the reason the receiver gave.
Never: a crash (``internal error``, a traceback in the log), a job not final within
:data:`LIMIT_S`, a stored study without its jobs, outputs that fail validation or
dciodvfy. The test prints the table (case, pipeline, outcome, seconds, reason) and fails
listing the rows that are not acceptable.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_files
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

from tests.conftest import db_rows, require, state_rows
from tests.peers import DCIODVFY, NodeProcess
from tests.test_writers import STALE_SYNTHETIC_DATA_ERROR

pytestmark = pytest.mark.integration

#: The pipelines each modality goes through.
PIPELINES_FOR = {"CT": ("restoration", "denoise-classical"), "MR": ("sct",)}
#: States a job ends in (under a shadow gate: succeeded, failed, refused).
FINAL = {"succeeded", "failed", "refused", "held", "delivered"}
#: Every job must be final this many seconds after the last case was sent.
LIMIT_S = 120.0
ACCEPTABLE = {"ok", "refused", "failed", "rejected"}

CONFIG = """
[completeness]
stable_seconds = 1

[workers]
processes = 3
poll_seconds = 0.2
lease_seconds = 60

[policy]
file = "policy.yaml"
reload_seconds = 0.5
"""


@dataclass(frozen=True)
class Case:
    """One file, or one series of a DICOMDIR tree, and the modality that routes it."""

    name: str
    modality: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Sent:
    """A case as sent: its new Study Instance UID and each instance's C-STORE answer."""

    case: Case
    study_uid: str
    #: SOP Instance UID → (status, Error Comment); status -1: not sent (association failed).
    answers: dict[str, tuple[int, str]]

    @property
    def stored(self) -> bool:
        return any(status == 0 or status >> 12 == 0xB for status, _ in self.answers.values())


@dataclass
class Row:
    case: str
    pipeline: str
    outcome: str
    reason: str
    seconds: float | None = None

    @property
    def acceptable(self) -> bool:
        return self.outcome in ACCEPTABLE


# -- the corpus ------------------------------------------------------------------------------------
def _label(path: Path) -> str:
    return path.name if path.suffix == ".dcm" else "/".join(path.parts[-3:])


def corpus() -> list[Case]:
    """Every CT and MR file pydicom finds (its own and pydicom-data's), as cases."""
    groups: dict[tuple[Path, str], list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for name in sorted(set(get_testdata_files())):
        path = Path(name)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError):
            continue  # not a data set pydicom reads as one (e.g. a bare JPEG stream)
        if str(ds.get("Modality", "")) in PIPELINES_FOR:
            groups[(path.parent, str(ds.get("SeriesInstanceUID", "")))].append((path, ds))
    cases = []
    for (folder, series), members in groups.items():
        modality = str(members[0][1].Modality)
        sops = [str(ds.get("SOPInstanceUID", "")) for _, ds in members]
        if len(members) > 1 and len(set(sops)) == len(sops):
            name = f"{'/'.join(folder.parts[-2:])} series …{series[-6:]} ({len(members)} files)"
            cases.append(Case(name, modality, tuple(p for p, _ in members)))
        else:  # one file, or the same image in several encodings: each file is a case
            cases.extend(Case(_label(p), modality, (p,)) for p, _ in members)
    return sorted(cases, key=lambda c: (c.modality, c.name))


def prepare(case: Case, folder: Path) -> tuple[str, list[Path]]:
    """``case`` written into ``folder`` under new UIDs: its Study Instance UID and files.

    The data set up to the pixel data is re-encoded (new UIDs, retired group lengths
    dropped); the pixel data and whatever follows are the shipped bytes, so a truncated
    stream stays truncated (pydicom reads no element of one file when asked for all).
    """
    folder.mkdir(parents=True)
    study = generate_uid(entropy_srcs=[case.name, "study"])
    series = generate_uid(entropy_srcs=[case.name, "series"])
    files = []
    for k, path in enumerate(case.files):
        with path.open("rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            tail = f.read()  # from the Pixel Data tag on, byte for byte
        sop = generate_uid(entropy_srcs=[case.name, "instance", str(k)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        for tag in [t for t in ds.keys() if t.element == 0]:
            del ds[tag]
        head = BytesIO()
        ds.save_as(head, enforce_file_format=True)
        files.append(folder / f"{k:03d}.dcm")
        files[-1].write_bytes(head.getvalue() + tail)
    return study, files


def policy() -> str:
    """All matches: one shadow rule per pipeline, on the modality it takes."""
    rules = [
        {"name": f"corpus-{name}", "match": {"modality": modality}, "pipeline": name, "gate": "shadow"}
        for modality, names in PIPELINES_FOR.items()
        for name in names
    ]
    return str(yaml.safe_dump({"version": 1, "mode": "all-matches", "rules": rules}, sort_keys=False))


def send(case: Case, folder: Path, node: NodeProcess) -> Sent:
    """C-STORE the case's files in one association, each file's bytes as written."""
    study, files = prepare(case, folder)
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ae = AE(ae_title="CORPUS")
    for sop_class, syntax in sorted(
        {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in heads}
    ):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        return Sent(case, study, {str(h.SOPInstanceUID): (-1, "association not established") for h in heads})
    answers = {}
    try:
        for path, head in zip(files, heads, strict=True):
            try:
                status = assoc.send_c_store(path)
            except (ValueError, AttributeError, OSError, RuntimeError) as exc:  # a file pynetdicom refuses
                answers[str(head.SOPInstanceUID)] = (-1, f"not sent: {type(exc).__name__}: {exc}")
                continue
            code = int(status.get("Status", -1)) if status else -1  # empty: no answer (aborted)
            answers[str(head.SOPInstanceUID)] = (code, str(status.get("ErrorComment", "")) if status else "")
    finally:
        assoc.release()
    return Sent(case, study, answers)


# -- what the node did -----------------------------------------------------------------------------
def jobs_of(node: NodeProcess, study: str) -> dict[str, tuple[int, str, str | None, float | None]]:
    """Pipeline → (job id, state, reason, seconds from its last start to its last move)."""
    rows = db_rows(
        node,
        "select j.pipeline, j.id, j.state, j.reason, j.updated_at - (select max(t.at) from"
        " job_transitions t where t.job_fk = j.id and t.to_state = 'running') from jobs j"
        " join studies s on j.study_fk = s.id where s.study_uid = ? order by j.id",
        (study,),
    )
    return {str(r[0]): (int(r[1]), str(r[2]), r[3], r[4]) for r in rows}


def rejection_reasons(node: NodeProcess) -> dict[str, str]:
    """SOP Instance UID → the receiver's whole reason (the Error Comment is cut at 64)."""
    rows = state_rows(
        node.home,
        "select facts from audit_events where event in ('instance-quarantined', 'instance-rejected')",
        audit=True,
    )
    reasons = {}
    for (facts,) in rows:
        data = json.loads(facts) if isinstance(facts, str) else dict(facts or {})
        reasons[str(data.get("sop_uid", ""))] = str(data.get("reason", ""))
    return reasons


def settled(node: NodeProcess, sent: list[Sent]) -> bool:
    for case in sent:
        if case.stored:
            jobs = jobs_of(node, case.study_uid)
            if set(jobs) != set(PIPELINES_FOR[case.case.modality]):
                return False
            if any(state not in FINAL for _, state, _, _ in jobs.values()):
                return False
    return True


def one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def outcome(
    sent: Sent, pipeline: str, job: tuple[int, str, str | None, float | None] | None, crashed: set[int]
) -> Row:
    """How one (case, pipeline) ended, before dciodvfy has looked at the outputs."""
    name = sent.case.name
    if not sent.stored:
        comments = sorted({one_line(c) for _, c in sent.answers.values()})
        codes = sorted({f"0x{s:04X}" if s >= 0 else "not sent" for s, _ in sent.answers.values()})
        kind = (
            "rejected" if all(comments) and min(s for s, _ in sent.answers.values()) >= 0 else "not received"
        )
        return Row(name, pipeline, kind, f"{', '.join(codes)}: {'; '.join(comments)}")
    if job is None:
        return Row(name, pipeline, "no job", f"no {pipeline} job within {LIMIT_S:.0f} s of the send")
    job_id, state, reason, seconds = job
    text = reason or ""
    if state not in FINAL:
        return Row(name, pipeline, "stuck", f"still {state} {LIMIT_S:.0f} s after the send", seconds)
    if job_id in crashed or "Traceback" in text or text.startswith("internal error"):
        return Row(name, pipeline, "crashed", one_line(text), seconds)
    if "\n" in text.strip():
        return Row(name, pipeline, "multi-line reason", one_line(text), seconds)
    if state in ("refused", "failed"):
        return Row(name, pipeline, state, text, seconds)
    if state == "held" or "output validation failed" in text:
        return Row(name, pipeline, "invalid outputs", text, seconds)
    return Row(name, pipeline, "ok", "", seconds)


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", ""))
    if modality in ("CT", "MR"):
        errors = [e for e in errors if not e.startswith(STALE_SYNTHETIC_DATA_ERROR)]
    return [f"{modality}: {e}" for e in errors]


def check_outputs(rows: list[Row], outputs: dict[tuple[str, str], list[Path]]) -> None:
    """dciodvfy every object of every ``ok`` row; a row with an error becomes ``dciodvfy``."""
    checks = [(key, path) for key, paths in outputs.items() for path in paths]
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda item: dciodvfy_errors(item[1]), checks))
    errors: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (key, _), problems in zip(checks, found, strict=True):
        errors[key].extend(problems)
    for row in rows:
        key = (row.case, row.pipeline)
        if row.outcome == "ok" and errors[key]:
            distinct = sorted(set(errors[key]))
            row.outcome = "dciodvfy"
            row.reason = f"{len(distinct)} distinct error(s): " + " | ".join(distinct[:4])
        elif row.outcome == "ok":
            row.reason = f"{len(outputs[key])} objects, dciodvfy clean"


def run_corpus(tmp: Path, cases: list[Case]) -> tuple[list[Row], dict[str, float], str]:
    """Send every case to one node, wait for every job, classify, dciodvfy the outputs."""
    timings: dict[str, float] = {}
    node = NodeProcess(tmp / "node", CONFIG, policy=policy()).start()
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream each file's bytes; no re-encoding
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            folders = [tmp / "cases" / f"{i:03d}" for i in range(len(cases))]
            sent = list(pool.map(lambda c, f: send(c, f, node), cases, folders))
        timings["send"] = time.perf_counter() - started
        started = time.perf_counter()
        while not settled(node, sent) and time.perf_counter() - started < LIMIT_S:
            time.sleep(0.5)
        timings["jobs"] = time.perf_counter() - started
        crashed = {int(m) for m in re.findall(r"job (\d+): pipeline crashed", node.log_text())}
        reasons = rejection_reasons(node)
        rows, outputs = [], {}
        for case in sent:
            jobs = jobs_of(node, case.study_uid)
            for pipeline in PIPELINES_FOR[case.case.modality]:
                row = outcome(case, pipeline, jobs.get(pipeline), crashed)
                if row.outcome == "rejected":  # the receiver's whole reason, not the cut comment
                    row.reason = "; ".join(
                        sorted({reasons.get(sop, c) for sop, (_, c) in case.answers.items()})
                    )
                if row.outcome == "ok":
                    written = db_rows(
                        node, "select path from job_outputs where job_fk = ?", (jobs[pipeline][0],)
                    )
                    outputs[(row.case, pipeline)] = [Path(p) for (p,) in written]
                rows.append(row)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        node.stop()
    started = time.perf_counter()
    check_outputs(rows, outputs)
    timings["dciodvfy"] = time.perf_counter() - started
    return rows, timings, node.log_text()


def table(rows: list[Row]) -> Iterator[str]:
    width = max(len(r.case) for r in rows)
    yield f"  {'case':{width}}  {'pipeline':17}  {'outcome':16}  {'s':>5}  reason"
    for r in rows:
        seconds = f"{r.seconds:5.1f}" if r.seconds is not None else "    -"
        mark = " " if r.acceptable else "✗"
        yield f"{mark} {r.case:{width}}  {r.pipeline:17}  {r.outcome:16}  {seconds}  {r.reason[:500]}"


def test_every_real_ct_and_mr_file_is_processed_or_refused_with_a_reason(tmp_path: Path) -> None:
    require(DCIODVFY)
    cases = corpus()
    # pydicom's own CT/MR files and pydicom-data's (the test extra installs it): both found
    assert any(c.name == "CT_small.dcm" for c in cases), "pydicom's test files not found"
    assert any(c.name == "693_UNCI.dcm" for c in cases), "pydicom-data's files not found"
    rows, timings, log = run_corpus(tmp_path, cases)
    lines = list(table(rows))
    counts = Counter(r.outcome for r in rows)
    summary = (
        f"{len(cases)} cases, {len(rows)} runs: "
        + ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
        + " | "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    )
    print("\n" + "\n".join(lines) + "\n" + summary)
    bad = [line for line, r in zip(lines[1:], rows, strict=True) if not r.acceptable]
    tracebacks = log.count("Traceback")
    assert not bad and not tracebacks, (
        f"{len(bad)} of {len(rows)} runs neither processed cleanly nor refused with a reason; "
        f"{tracebacks} traceback(s) in the node's log\n" + "\n".join([lines[0], *bad]) + "\n" + summary
    )
