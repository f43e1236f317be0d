"""Scale-out benchmark: concurrent ingest against Orthanc and dcmtk storescp, and jobs per
minute with one and two Celery workers. Not a timed test: it prints figures.

Ingest: ``--studies`` simulated CT studies of ``--slices`` 512x512 slices each (SIMULATED),
sent over each of ``--associations`` (default 1 and 4) in turn: the studies split over that
many dcmtk ``storescu`` processes (TCP_NODELAY=1), one association each, all at once.
Receivers, each on fresh storage per run and interleaved (who goes first rotates): dcmtk
storescp (no fsync, no index), Orthanc (Debian defaults: SyncStorageArea, SQLite index),
dicom-node with one receiving process and with ``--receivers`` processes on one port
(SO_REUSEPORT, connections evened out by ``dicom_node.net.balance``; durable write, index
and audit log on, SQLite). Wall time from the first storescu started to the last one done, and for
dicom-node until every instance is indexed. Median of ``--repeats``. Each receiver is sent
the studies once it is at rest (``wait_idle``: dicom-node's worker and extra receiving
processes import for seconds after the port opens; see ``bench_ingest.py``).

Celery: ``--jobs`` simulated low-dose CT studies (24 slices, 512x512) routed to
``restoration``, run by one and then two ``dicom-node worker`` processes (Celery, Redis,
PostgreSQL on loopback). Jobs per minute from the first study sent to the last job
delivered to Orthanc. On a 2-core machine a second worker competes for the same two
cores as the first (and with the receiver, PostgreSQL and Redis): the figure says how much
of a second machine's worth that is, not what a second machine gives.

Usage: ``python tests/bench/bench_scaleout.py [--studies 4] [--slices 150] [--associations 1,4]
[--repeats 3] [--jobs 4] [--skip-celery]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dicom_node.lab.localpeers import (  # noqa: E402
    ORTHANC,
    REDIS_SERVER,
    STORESCU,
    DcmtkStoreSCP,
    NodeProcess,
    Orthanc,
    RedisServer,
    have,
    policy_yaml,
    wait_idle,
)
from tests.pg import PostgresServer, find_bin_dir  # noqa: E402
from tests.state import state_rows  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def send_all(groups: list[list[Path]], port: int, aet: str) -> float:
    """Each group of studies over its own association, all at once; seconds until the last
    is done."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", "BENCH", "-aec", aet, "+sd", "+r", "127.0.0.1", str(port), *map(str, group)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
        )  # fmt: skip
        for group in groups
    ]
    for p in procs:
        _, err = p.communicate(timeout=1200)
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {aet} failed:\n{err.decode(errors='replace')[-2000:]}")
    return time.perf_counter() - t0


def run_storescp(work: Path, studies: list[list[Path]], _n: int) -> float:
    peer = DcmtkStoreSCP(work).start()
    try:
        wait_idle(peer.proc)
        return send_all(studies, peer.port, peer.aet)
    finally:
        peer.stop()


def run_orthanc(work: Path, studies: list[list[Path]], n: int) -> float:
    peer = Orthanc(work).start()
    try:
        wait_idle(peer.proc)
        elapsed = send_all(studies, peer.dicom_port, peer.aet)
        if (stored := peer.statistics()["CountInstances"]) != n:
            raise RuntimeError(f"Orthanc holds {stored} instances, expected {n}")
        return elapsed
    finally:
        peer.stop()


def run_node(receivers: int) -> Callable[[Path, list[list[Path]], int], float]:
    def run(work: Path, studies: list[list[Path]], n: int) -> float:
        config = f"[completeness]\nstable_seconds = 3600\n[node]\nreceivers = {receivers}\n"
        node = NodeProcess(work / "node", config).start()
        try:
            wait_idle(node.proc)  # its worker (and second receiver) import for seconds after the port opens
            t0 = time.perf_counter()
            send_all(studies, node.port, node.ae_title)
            while state_rows(node.home, "select count(*) from instances") != [(n,)]:
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError("instances not indexed")
                time.sleep(0.02)
            return time.perf_counter() - t0
        finally:
            node.stop()

    return run


def simulate(out: Path, kind: str, slices: int, seed: int) -> Path:
    cmd = [sys.executable, "-m", "dicom_node", "simulate", kind, "--out", str(out), "--slices", str(slices)]
    subprocess.run([*cmd, "--seed", str(seed)], check=True, capture_output=True)
    return out if kind == "ct" else out / "low-dose"


def ingest(root: Path, args: argparse.Namespace) -> None:
    studies = [simulate(root / f"study{k}", "ct", args.slices, seed=k) for k in range(args.studies)]
    n = args.studies * args.slices
    size_mb = sum(f.stat().st_size for s in studies for f in s.iterdir()) / 1e6
    for s in studies:
        for f in s.iterdir():
            f.read_bytes()  # page cache: the senders read from memory for everyone
    receivers = [
        ("dcmtk storescp", run_storescp),
        ("Orthanc", run_orthanc),
        ("dicom-node x1", run_node(1)),
        (f"dicom-node x{args.receivers}", run_node(args.receivers)),
    ]
    for associations in args.associations:
        # the same studies, sent over `associations` associations at once
        groups = [studies[k::associations] for k in range(associations)]
        print(
            f"ingest: {args.studies} x {args.slices} slices 512x512 CT (SIMULATED), {size_mb:.0f} MB, "
            f"{associations} association(s) at once"
        )
        runs: dict[str, list[float]] = {name: [] for name, _ in receivers}
        for rep in range(args.repeats):
            order = receivers[rep % len(receivers) :] + receivers[: rep % len(receivers)]
            for name, fn in order:
                work = root / f"run-{associations}-{rep}-{name.replace(' ', '-')}"
                work.mkdir()
                elapsed = fn(work, groups, n)
                shutil.rmtree(work)
                runs[name].append(elapsed)
                print(f"  repeat {rep + 1} {name:16s} {elapsed:6.2f} s  {n / elapsed:7.1f} img/s", flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"\n{'receiver':18s} {'median s':>9s} {'img/s':>8s}   ({associations} association(s))")
        for name, m in med.items():
            print(f"{name:18s} {m:9.2f} {n / m:8.1f}")
        for name in med:
            if name.startswith("dicom-node"):
                print(
                    f"{name} / Orthanc: {med['Orthanc'] / med[name]:.2f}x   "
                    f"/ dcmtk storescp: {med['dcmtk storescp'] / med[name]:.2f}x   (images/s, "
                    f"{associations} association(s))"
                )
        print()


def celery_jobs(root: Path, args: argparse.Namespace) -> None:
    bin_dir = find_bin_dir()
    if bin_dir is None or not have(REDIS_SERVER):
        print("celery: skipped (needs Debian postgresql and redis-server)")
        return
    studies = [simulate(root / f"ldct{k}", "ldct", 24, seed=k) for k in range(args.jobs)]
    print(f"celery: {args.jobs} low-dose CT studies (24 x 512x512, SIMULATED) -> restoration -> Orthanc")
    pg = PostgresServer(bin_dir).start()
    try:
        rates = {}
        for workers in (1, 2):
            work = root / f"celery-{workers}"
            redis, orthanc = RedisServer(work / "redis").start(), Orthanc(work / "orthanc").start()
            index, audit = pg.create_database("bench"), pg.create_database("benchaudit")
            config = f"""
[completeness]
stable_seconds = 2
[workers]
engine = "celery"
broker_url = "{redis.url}"
poll_seconds = 0.2
[storage]
database_url = "{pg.url(index)}"
audit_database_url = "{pg.url(audit)}"
[destinations.pacs]
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
[policy]
file = "policy.yaml"
"""
            node = NodeProcess(work / "node", config, policy=policy_yaml("restoration")).start()
            procs = []
            try:
                for k in range(workers):
                    out = (work / f"worker{k}.out").open("ab")
                    cmd = [sys.executable, "-m", "dicom_node", "worker", "--home", str(node.home)]
                    cmd += ["--config", str(node.config_path), "--queues", "restoration", "--processes", "1"]
                    procs.append(
                        subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True, env=ENV)
                    )
                time.sleep(8)  # the workers start (imports, broker connection)
                t0 = time.perf_counter()
                send_all([[study] for study in studies], node.port, node.ae_title)
                settled = (
                    "select count(*) from jobs where state in ('delivered', 'held', 'failed', 'refused')"
                )
                while state_rows(node.home, settled) != [(args.jobs,)]:
                    if time.perf_counter() - t0 > 1800:
                        raise RuntimeError("jobs not settled")
                    time.sleep(0.5)
                elapsed = time.perf_counter() - t0
                states = state_rows(node.home, "select state, count(*) from jobs group by state")
            finally:
                for p in procs:
                    p.terminate()
                    p.wait(60)
                node.stop()
                orthanc.stop()
                redis.stop()
            rates[workers] = args.jobs / elapsed * 60
            print(
                f"  {workers} worker(s): {elapsed:6.1f} s for {args.jobs} jobs = "
                f"{rates[workers]:5.2f} jobs/min (settled: {dict(states)})"  # type: ignore[arg-type]
            )
        print(
            f"2 workers / 1 worker: {rates[2] / rates[1]:.2f}x on {os.cpu_count()} cores "
            "(the second worker shares the same cores as the first)"
        )
    finally:
        pg.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--slices", type=int, default=150)
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument(
        "--associations",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[1, 4],
        help="comma-separated: the studies are sent over this many associations at once, each in turn",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--skip-celery", action="store_true")
    args = ap.parse_args()
    missing = [p for p in (STORESCU, "/usr/bin/storescp", ORTHANC) if not have(p)]
    if missing:
        print(f"missing peers: {', '.join(missing)} (install dcmtk and orthanc)")
        return 2
    root = Path(tempfile.mkdtemp(prefix="dn-bench-scale-"))
    try:
        ingest(root, args)
        if not args.skip_celery:
            celery_jobs(root, args)
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
