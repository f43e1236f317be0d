"""End-to-end restoration benchmark: a 300-slice 512×512 simulated low-dose CT study sent
by dcmtk storescu to dicom-node (route: CTDIvol < 5 mGy → restoration → Orthanc).

Prints the time from the last instance received to the last delivery confirmed, the
stages of the job, and the peak resident memory of the node's processes (serve +
worker). Targets: ≤ 60 s and ≤ 3 GB on 2 cores. Not a timed test. The study is
SIMULATED (models.sim, projection-domain low dose).

Usage: ``python tests/bench/bench_restoration_e2e.py [--slices 300]``
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
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
    """Samples the summed RSS of a process tree every 0.1 s."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
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
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dn-e2e-"))
    try:
        t0 = time.perf_counter()
        write_ldct_study(root / "study", LdctSpec(slices=args.slices, size=args.size, dose=0.25, seed=11))
        print(
            f"simulated {args.slices} slices {args.size}x{args.size} (SIMULATED, dose 0.25) in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        pacs = Orthanc(root).start()
        config = f"""
[completeness]
stable_seconds = 2
[workers]
poll_seconds = 0.2
[destinations.pacs]
ae_title = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
[policy]
file = "policy.yaml"
"""
        low_dose_ct = {"modality": "CT", "attributes": [{"keyword": "CTDIvol", "op": "<", "value": 5.0}]}
        node = NodeProcess(
            root / "node", config, policy=policy_yaml("restoration", match=low_dose_ct)
        ).start()
        assert node.proc is not None
        try:
            with PeakRss(node.proc.pid) as rss:
                t_send = time.perf_counter()
                sent = storescu(root / "study" / "low-dose", node.port, node.ae_title)
                assert sent.returncode == 0, sent.stderr
                print(f"storescu: {args.slices} instances in {time.perf_counter() - t_send:.1f} s")
                db = root / "node" / "var" / "node.db"

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
            con.close()
            print(f"job: {state()}; deliveries delivered {deliveries[1]}/{deliveries[0]}")
            base = last_received
            for to, at in transitions:
                print(f"  {at - base:7.1f} s after the last instance: {to}")
            print(
                f"last instance received → last delivery confirmed: {last_delivered - last_received:.1f} s "
                "(target <= 60 s; includes the 2 s completeness wait)"
            )
            print(f"peak RSS of the node (serve + worker): {rss.peak / 2**30:.2f} GB (target <= 3 GB)")
            series = pacs.series_of_study(
                sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                .execute("select study_uid from studies")
                .fetchone()[0]
            )
            print(
                f"Orthanc holds {len(series)} series under the study: "
                + ", ".join(sorted(s["MainDicomTags"].get("Modality", "?") for s in series))
            )
        finally:
            node.stop()
            pacs.stop()
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
