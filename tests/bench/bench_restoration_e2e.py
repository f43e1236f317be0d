"""End-to-end restoration benchmark: a 300-slice 512×512 simulated low-dose CT study sent
by dcmtk storescu to dicom-node (route: CTDIvol < 5 mGy → restoration → Orthanc).

Prints, for each of ``--runs`` runs (a fresh node and a fresh Orthanc each), the time from
the last instance received to the last delivery confirmed, the stages of the job, and the
peak resident memory of the node's processes (serve + workers + their encode helpers, and
each); then the median against the targets (≤ 30 s and ≤ 1.5 GB on 2 cores, issue 20).
Those runs send the study to a running node: one whose worker has loaded its models (it
logs "DICOM writer tables loaded"), as a node serving a department is. ``--cold-runs``
more runs (default 1) send it as soon as a freshly started node listens, so the job also
waits for the worker to import torch and MONAI and load the weights (its ``model-load``
stage): that first study after a start is printed apart. The floor to compare with is the
time Orthanc alone takes to receive the same slices (dcmtk storescu, one association),
measured in the same session. The node sends two series at once (``[outbox] associations =
2``: Orthanc accepts several associations). Not a timed test. The study is SIMULATED
(models.sim, projection-domain low dose).

Usage: ``python tests/bench/bench_restoration_e2e.py [--slices 300] [--runs 3] [--cold-runs 1]
[--study DIR]``
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dicom_node.lab.localpeers import NodeProcess, Orthanc, policy_yaml, storescu  # noqa: E402
from dicom_node.lab.simulate import LdctSpec, write_ldct_study  # noqa: E402


class PeakRss:
    """Samples the summed RSS of a process tree every 0.1 s (and each process's own peak)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        #: When the peak was sampled (epoch seconds).
        self.peak_at = 0.0
        #: Peak RSS by process (pid → (command tail, bytes)).
        self.each: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                sizes = {p.pid: p.memory_info().rss for p in procs if p.is_running()}
                if sum(sizes.values()) > self.peak:
                    self.peak, self.peak_at = sum(sizes.values()), time.time()
                for p in procs:
                    if p.pid in sizes and sizes[p.pid] > self.each.get(p.pid, ("", 0))[1]:
                        self.each[p.pid] = ("serve" if p.pid == self.root.pid else "worker", sizes[p.pid])
            except psutil.Error:
                pass

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3, help="runs on a running node (models loaded)")
    ap.add_argument(
        "--cold-runs", type=int, default=1, help="runs that send as soon as a freshly started node listens"
    )
    ap.add_argument(
        "--study",
        type=Path,
        help="a directory this bench's simulation wrote before (DIR/low-dose, same --slices and --size): "
        "sent as it is instead of simulating it again",
    )
    ap.add_argument(
        "--encode-helper",
        choices=("on", "off"),
        help="[workers] encode_helper (the derived series written in a helper process); "
        "default: the node's default",
    )
    ap.add_argument(
        "--nice",
        type=int,
        choices=range(20),
        metavar="0-19",
        help="[workers] nice (the workers' CPU priority below the receiver's); default: the node's default",
    )
    args = ap.parse_args()
    print(f"[workers] encode_helper: {args.encode_helper or 'the node default'}")
    print(f"[workers] nice: {'the node default' if args.nice is None else args.nice}")
    root = Path(tempfile.mkdtemp(prefix="dn-e2e-"))
    try:
        if args.study:
            (root / "study").symlink_to(args.study.resolve())
            print(f"study: {args.study} (SIMULATED, written by an earlier run)")
        else:
            t0 = time.perf_counter()
            write_ldct_study(root / "study", LdctSpec(slices=args.slices, size=args.size, dose=0.25, seed=11))
            print(
                f"simulated {args.slices} slices {args.size}x{args.size} (SIMULATED, dose 0.25) in "
                f"{time.perf_counter() - t0:.0f} s"
            )
        floors, totals, peaks, colds = [], [], [], []
        for run in range(args.runs + args.cold_runs):
            cold = run >= args.runs
            print(f"run {run + 1}: " + ("a node started just before the study" if cold else "a running node"))
            floors.append(_orthanc_alone(root / f"floor-{run}", root / "study" / "low-dose"))
            total, peak = _one_run(
                root / f"run-{run}",
                root / "study" / "low-dose",
                args.slices,
                warm=not cold,
                encode_helper=None if args.encode_helper is None else args.encode_helper == "on",
                nice=args.nice,
            )
            if cold:
                colds.append((total, peak))
                continue
            totals.append(total)
            peaks.append(peak)
        floor, total, peak = (statistics.median(v) for v in (floors, totals, peaks))
        print()
        print(
            f"median of {args.runs} runs on a running node "
            f"({args.slices} slices {args.size}x{args.size}, SIMULATED):"
        )
        print(
            f"  last instance received -> last delivery confirmed: {total:.1f} s (target <= 30 s; "
            f"runs {', '.join(f'{t:.1f}' for t in totals)}; includes the 2 s completeness wait)"
        )
        print(
            f"  Orthanc alone receiving the same {args.slices} slices (storescu, one association): "
            f"{floor:.1f} s (runs {', '.join(f'{f:.1f}' for f in floors)}); "
            f"end to end = {total / floor:.1f}x that floor"
        )
        print(
            f"  peak RSS of the node (serve + worker + encode helper): {peak / 2**30:.2f} GB "
            f"(target <= 1.5 GB; "
            f"runs {', '.join(f'{p / 2**30:.2f}' for p in peaks)})"
        )
        if colds:
            print(
                "  the first study after a start (sent as soon as the node listened; the job waits for the "
                f"worker's models, its model-load stage): {', '.join(f'{t:.1f} s' for t, _ in colds)}, "
                f"peak {', '.join(f'{p / 2**30:.2f} GB' for _, p in colds)}"
            )
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _orthanc_alone(home: Path, study: Path) -> float:
    """Seconds Orthanc takes to receive ``study`` from storescu (the floor)."""
    home.mkdir()
    pacs = Orthanc(home).start()
    try:
        started = time.perf_counter()
        sent = storescu(study, pacs.dicom_port, pacs.aet)
        elapsed = time.perf_counter() - started
        assert sent.returncode == 0, sent.stderr
        return elapsed
    finally:
        pacs.stop()


#: What the worker logs when its preload is done (dicom_node.worker.Worker.preload).
PRELOADED = "DICOM writer tables loaded"
#: ... or when a pipeline could not be built at start.
NOT_PRELOADED = "not built at start"


def _wait_preloaded(node: NodeProcess, timeout: float = 300.0) -> float:
    """Seconds until the node's worker has built its pipelines (its log says so)."""
    started = time.perf_counter()

    def preloaded() -> bool:
        text = node.stdout.read_text(errors="replace")
        if NOT_PRELOADED in text:
            raise RuntimeError(f"the worker could not build its pipelines:\n{text[-2000:]}")
        return PRELOADED in text

    node.wait_for(preloaded, timeout=timeout, every=0.2, what="the worker to load its models")
    return time.perf_counter() - started


#: The policy's match: restoration for low-dose CT (the simulated study's CTDIvol is lower).
LOW_DOSE_CT = {"modality": "CT", "attributes": [{"keyword": "CTDIvol", "op": "<", "value": 5.0}]}


def restoration_node(home: Path, pacs: Orthanc, workers: str = "", associations: int = 2) -> NodeProcess:
    """A node started in ``home/node`` that routes low-dose CT to ``restoration`` and
    delivers to ``pacs`` (a 2 s completeness wait); ``workers``: more ``[workers]`` lines;
    ``associations``: ``[outbox] associations``."""
    config = f"""
[completeness]
stable_seconds = 2
[workers]
poll_seconds = 0.2
{workers}
[outbox]
associations = {associations}
[destinations.pacs]
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
[policy]
file = "policy.yaml"
"""
    return NodeProcess(home / "node", config, policy=policy_yaml("restoration", match=LOW_DOSE_CT)).start()


def _one_run(
    home: Path,
    study: Path,
    slices: int,
    *,
    warm: bool = True,
    encode_helper: bool | None = None,
    nice: int | None = None,
) -> tuple[float, int]:
    """One end-to-end run on a fresh node and Orthanc: (seconds, peak RSS bytes). ``warm``:
    send once the worker has loaded its models; else as soon as the node listens.
    ``encode_helper``: ``[workers] encode_helper`` (the derived series in a helper process;
    None: the node's default). ``nice``: ``[workers] nice`` (None: the node's default)."""
    home.mkdir()
    pacs = Orthanc(home).start()
    workers = "" if encode_helper is None else f"encode_helper = {str(encode_helper).lower()}\n"
    workers += "" if nice is None else f"nice = {nice}\n"
    node = restoration_node(home, pacs, workers)
    assert node.proc is not None
    try:
        if warm:
            print(f"the worker loaded its models {_wait_preloaded(node):.1f} s after the node listened")
        with PeakRss(node.proc.pid) as rss:
            t_send = time.perf_counter()
            sent = storescu(study, node.port, node.ae_title)
            assert sent.returncode == 0, sent.stderr
            print(f"storescu: {slices} instances in {time.perf_counter() - t_send:.1f} s")
            db = home / "node" / "var" / "node.db"

            def state() -> str | None:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                try:
                    row = con.execute("select state from jobs").fetchone()
                except sqlite3.OperationalError:
                    row = None
                con.close()
                return row[0] if row else None

            deadline = time.time() + 1800
            while state() not in ("delivered", "failed") and time.time() < deadline:
                time.sleep(0.5)
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        last_received = con.execute("select max(received_at) from instances").fetchone()[0]
        last_delivered = con.execute("select max(delivered_at) from deliveries").fetchone()[0]
        transitions = con.execute("select to_state, at from job_transitions order by id").fetchall()
        deliveries = con.execute("select count(*), sum(state = 'delivered') from deliveries").fetchone()
        study_uid = con.execute("select study_uid from studies").fetchone()[0]
        stages = con.execute("select stage, seconds from job_stage_times order by id").fetchall()
        con.close()
        print(f"job: {state()}; deliveries delivered {deliveries[1]}/{deliveries[0]}")
        for to, at in transitions:
            print(f"  {at - last_received:7.1f} s after the last instance: {to}")
        print("  the pipeline's stages: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stages))
        total = last_delivered - last_received
        each = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in sorted(rss.each.values()))
        print(f"last instance received -> last delivery confirmed: {total:.1f} s")
        print(
            f"peak RSS of the node: {rss.peak / 2**30:.2f} GB, {rss.peak_at - last_received:.1f} s after the "
            f"last instance (each process's own peak, GB: {each})"
        )
        series = pacs.series_of_study(study_uid)
        print(
            f"Orthanc holds {len(series)} series under the study: "
            + ", ".join(sorted(s["MainDicomTags"].get("Modality", "?") for s in series))
        )
        return total, rss.peak
    finally:
        node.stop()
        pacs.stop()


if __name__ == "__main__":
    raise SystemExit(main())
