"""Delivery benchmark: a restoration job's outputs sent to Orthanc by dicom-node's sender and
by dcmtk ``storescu``, the same files, same run.

The ``restoration`` pipeline runs once on a SIMULATED low-dose CT (``models.sim``, 512²):
its derived CT series, the σ and hallucination Parametric Maps (uint16), the SEG, the
overlay and the SR. Each repeat then sends those files to a fresh Orthanc (Debian
defaults, its usual 16 KB maximum PDU length) three ways, in an order that alternates:

* ``storescu``: dcmtk ``storescu -R``, every file on one association (TCP_NODELAY=1);
* ``dicom-node, 1 association``: :func:`dicom_node.delivery.sender.send_series` per series,
  one after the other, as the outbox does with ``[outbox] associations = 1``;
* ``dicom-node, 2 associations``: two senders taking series as they free up, as the
  outbox does with ``associations = 2`` (Orthanc accepts several associations).

Prints the median seconds of each and the ratios (below 1: dicom-node is faster). Not a
timed test: it prints figures.

Usage: ``python tests/bench/bench_delivery.py [--slices 300] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dicom_node.cli.run_cmds import _study_inputs  # noqa: E402
from dicom_node.config import Destination  # noqa: E402
from dicom_node.delivery.sender import send_series  # noqa: E402
from dicom_node.lab.localpeers import Orthanc, storescu  # noqa: E402
from dicom_node.lab.simulate import LdctSpec, write_ldct_study  # noqa: E402
from pipelines.base import OutputInstance, RunEnvironment, StudyInput  # noqa: E402
from pipelines.registry import get_pipeline  # noqa: E402


def job_outputs(root: Path, slices: int) -> list[list[OutputInstance]]:
    """Run the restoration pipeline on a simulated study; its outputs, series by series."""
    write_ldct_study(root / "study", LdctSpec(slices=slices, size=512, dose=0.25, seed=11))
    studies, _, _ = _study_inputs([root / "study" / "low-dose"])
    ((study_uid, instances),) = studies.items()
    out = root / "outputs"
    out.mkdir()
    ctx = get_pipeline("restoration", None, "auto").execute(  # type: ignore[attr-defined]
        StudyInput(job_id=0, study_uid=study_uid, study_version=0, instances=tuple(instances)),
        RunEnvironment(workdir=out, uid_root="2.25.", node_version="bench"),
    )
    series: dict[str, list[OutputInstance]] = defaultdict(list)
    for output in ctx.outputs:
        series[output.series_uid].append(output)
    return list(series.values())


def send_node(pacs: Orthanc, series: list[list[OutputInstance]], associations: int) -> None:
    dest = Destination(ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port)
    work: queue.Queue[list[OutputInstance]] = queue.Queue()
    for files in series:
        work.put(files)
    errors: list[str] = []

    def sender() -> None:
        while True:
            try:
                files = work.get_nowait()
            except queue.Empty:
                return
            report = send_series(dest, files, calling_ae="DICOM_NODE")
            if not report.ok:
                errors.append(report.error or "failed")

    threads = [threading.Thread(target=sender) for _ in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"dicom-node's sender failed: {errors}")


def one(work: Path, how: str, files: list[Path], series: list[list[OutputInstance]]) -> float:
    work.mkdir()
    pacs = Orthanc(work).start()
    try:
        started = time.perf_counter()
        if how == "storescu":
            sent = storescu(files, pacs.dicom_port, pacs.aet, extra=["-R"])
            if sent.returncode != 0:
                raise RuntimeError(f"storescu failed:\n{sent.stderr[-2000:]}")
        else:
            send_node(pacs, series, 2 if how.endswith("2 associations") else 1)
        elapsed = time.perf_counter() - started
        stored = pacs.statistics()["CountInstances"]
        if stored != len(files):
            raise RuntimeError(f"Orthanc holds {stored} instances after {how}, expected {len(files)}")
        return elapsed
    finally:
        pacs.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dn-bench-delivery-"))
    try:
        t0 = time.perf_counter()
        series = job_outputs(root, args.slices)
        files = [f.path for s in series for f in s]
        size = sum(p.stat().st_size for p in files)
        print(
            f"a restoration job's outputs: {len(files)} files in {len(series)} series, {size / 1e6:.0f} MB "
            f"({args.slices} SIMULATED slices; made in {time.perf_counter() - t0:.0f} s)"
        )
        ways = ["storescu", "dicom-node, 1 association", "dicom-node, 2 associations"]
        times: dict[str, list[float]] = {w: [] for w in ways}
        for rep in range(args.repeats):
            for how in ways if rep % 2 == 0 else ways[::-1]:
                times[how].append(one(root / f"pacs-{rep}-{len(times[how])}-{how[:6]}", how, files, series))
                print(f"  repeat {rep + 1} {how:28s} {times[how][-1]:6.2f} s", flush=True)
        med = {w: statistics.median(v) for w, v in times.items()}
        print()
        for how in ways:
            print(f"{how:28s} median {med[how]:6.2f} s  {size / 1e6 / med[how]:6.0f} MB/s")
        for how in ways[1:]:
            print(f"{how} / storescu (time): {med[how] / med['storescu']:.2f}x")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
