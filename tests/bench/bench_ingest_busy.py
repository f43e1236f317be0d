"""Ingest while a job runs: the worker's CPU priority (``[workers] nice``) against none.

A scanner sends its next study while the node restores the last one on every core. Per
repeat, on a fresh node and Orthanc for each setting (``nice`` 0 and the default 10,
interleaved, who goes first alternating): the node is left to load its models and settle,
study A (a SIMULATED 300-slice 512² low-dose CT) is sent and timed (the node at rest), then,
4 s after A's restoration job started, study B is sent and timed (the job's model stages
run meanwhile). The same study B sent to an Orthanc at rest gives the floor. Memory is
warmed and the disk synced before each run, as in ``bench_ingest.py``. Prints each run and
the medians. Not a timed test: it prints figures.

Usage: ``python tests/bench/bench_ingest_busy.py [--slices 300] [--repeats 4]``
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import settle_disk, timed_send, warm_memory  # noqa: E402
from bench_restoration_e2e import _orthanc_alone, _wait_preloaded, restoration_node  # noqa: E402

from dicom_node.lab.localpeers import Orthanc, wait_idle  # noqa: E402
from dicom_node.lab.simulate import LdctSpec, write_ldct_study  # noqa: E402


def _job_states(db: Path) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [row[0] for row in con.execute("select state from jobs")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _one_run(home: Path, studies: dict[str, Path], nice: int) -> tuple[float, float]:
    """(seconds for A at rest, seconds for B during A's job) on a fresh node."""
    home.mkdir()
    pacs = Orthanc(home).start()
    node = restoration_node(home, pacs, f"nice = {nice}", associations=1)
    try:
        _wait_preloaded(node)
        wait_idle(node.proc)
        at_rest = timed_send(studies["A"], node.port, node.ae_title)
        db = home / "node" / "var" / "node.db"
        node.wait_for(lambda: "running" in _job_states(db), timeout=120, every=0.1, what="the job to start")
        time.sleep(4.0)  # past loading the study: the network and what follows run on every core
        during = timed_send(studies["B"], node.port, node.ae_title)
        if _job_states(db)[:1] != ["running"]:
            raise RuntimeError("the job ended before study B was in: use more --slices")
        return at_rest, during
    finally:
        node.stop()
        pacs.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-busy-"))
    try:
        studies = {}
        for name, seed in (("A", 11), ("B", 12)):
            write_ldct_study(root / name, LdctSpec(slices=args.slices, size=512, dose=0.25, seed=seed))
            studies[name] = root / name / "low-dose"
            for f in studies[name].iterdir():
                f.read_bytes()  # page cache: the sender reads from memory
        print(f"studies A and B: {args.slices} slices 512x512 low-dose CT each (SIMULATED)", flush=True)
        runs: dict[int, list[tuple[float, float]]] = {0: [], 10: []}
        floor = []
        for rep in range(args.repeats):
            for nice in (0, 10) if rep % 2 == 0 else (10, 0):
                warm_memory(4)  # reused guest pages for every run (see bench_ingest.py)
                settle_disk()
                at_rest, during = _one_run(root / f"run{rep}-{nice}", studies, nice)
                runs[nice].append((at_rest, during))
                print(
                    f"  repeat {rep + 1} nice {nice:2d}: A at rest {at_rest:.2f} s, "
                    f"B during A's job {during:.2f} s",
                    flush=True,
                )
            warm_memory(4)
            settle_disk()
            floor.append(_orthanc_alone(root / f"orthanc{rep}", studies["B"]))
            print(f"  repeat {rep + 1} Orthanc at rest, study B: {floor[-1]:.2f} s", flush=True)
        print()
        orthanc = statistics.median(floor)
        print(f"Orthanc at rest: {orthanc:.2f} s (median)")
        for nice, pairs in runs.items():
            rest = statistics.median(p[0] for p in pairs)
            during = statistics.median(p[1] for p in pairs)
            print(
                f"dicom-node, [workers] nice = {nice:2d}: at rest {rest:.2f} s "
                f"({orthanc / rest:.2f}x Orthanc), during a job {during:.2f} s "
                f"({orthanc / during:.2f}x Orthanc at rest)"
            )
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
