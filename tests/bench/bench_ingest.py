"""Ingest benchmark: dcmtk storescu → dcmtk storescp / Orthanc / dicom-node, same run.

A simulated 300-slice 512x512 CT study (~150 MB) is sent by dcmtk ``storescu`` with
TCP_NODELAY=1 to each receiver in turn, interleaved, ``--repeats`` times (default 5): every
repeat simulates a fresh study (new UIDs), and the order alternates (odd repeats run the
receivers in reverse) so no receiver always goes first. Each receiver starts on fresh
storage for each run and is stopped by PID afterwards. Prints median
images/s per receiver and the ratios. Not a timed test: it prints figures.

dicom-node runs as shipped: durable write (fsync) before each success status, SQL index,
hash-chained audit log. Orthanc runs with its Debian defaults (SyncStorageArea=true,
SQLite index). storescp writes files without fsync and keeps no index.

Fairness: on a VM, the first touch of a never-used guest memory page is several times
slower than reuse, so whoever writes first into "cold" page cache pays more. The bench
touches ``--warm-gb`` of memory first (and again after each new study: the simulator frees
gigabytes), and each run's storage is deleted before the next so every receiver writes into
reused pages. Each new study and each deletion is written
back (``sync``) before the next receiver starts: otherwise whoever runs first after them
waits behind that writeback in its own fsyncs. Each receiver is sent the study once it is at
rest (its processes under 5 % of a core for half a second: ``wait_idle``): dicom-node's
worker process still imports for about 2 s after the port opens, and a study sent into that
measured the start-up, not the ingest (1.66–1.79 s against 1.16–1.47 s after a 6 s wait,
4 interleaved pairs, 2026-12-07); Orthanc and storescp are at rest within the first check.

Usage: ``python tests/bench/bench_ingest.py [--slices 300] [--repeats 5]``
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dicom_node.lab.localpeers import (  # noqa: E402
    ORTHANC,
    DcmtkStoreSCP,
    NodeProcess,
    Orthanc,
    have,
    storescu,
    wait_idle,
)


def simulate(out: Path, slices: int, size: int) -> Path:
    """A fresh simulated CT study (new UIDs) in ``out``, read once into the page cache."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "simulate",
            "ct",
            "--out",
            str(out),
            "--slices",
            str(slices),
            "--size",
            str(size),
        ],
        check=True,
        capture_output=True,
    )
    for f in out.iterdir():
        f.read_bytes()  # page cache: the sender reads from memory for everyone
    settle_disk()
    return out


def settle_disk() -> None:
    """Write back every dirty page now, so no receiver's fsyncs wait behind the kernel
    flushing the study just simulated or the storage just deleted (the receiver run first
    after either paid for it: up to +20 % on the reference VM)."""
    os.sync()


def warm_memory(gigabytes: float) -> None:
    if gigabytes <= 0:
        return
    chunk = bytearray(256 * 1024 * 1024)
    blocks = [bytearray(chunk) for _ in range(int(gigabytes * 4))]
    del blocks


def timed_send(study: Path, port: int, aet: str) -> float:
    t0 = time.perf_counter()
    result = storescu(study, port, aet)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed:\n{result.stderr[-2000:]}")
    return elapsed


def run_storescp(work: Path, study: Path) -> float:
    peer = DcmtkStoreSCP(work).start()
    try:
        wait_idle(peer.proc)
        return timed_send(study, peer.port, peer.aet)
    finally:
        peer.stop()


def run_orthanc(work: Path, study: Path, n: int) -> float:
    peer = Orthanc(work).start()
    try:
        wait_idle(peer.proc)
        elapsed = timed_send(study, peer.dicom_port, peer.aet)
        stored = peer.statistics()["CountInstances"]
        if stored != n:
            raise RuntimeError(f"Orthanc holds {stored} instances, expected {n}")
        return elapsed
    finally:
        peer.stop()


def run_node(work: Path, study: Path, n: int) -> float:
    node = NodeProcess(work / "node", "[completeness]\nstable_seconds = 3600\n").start()
    try:
        wait_idle(node.proc)  # its worker process imports for ~2 s after the port opens
        elapsed = timed_send(study, node.port, node.ae_title)
        rows = node.wait_for(
            lambda: [s for s in node.cli_json("studies") if s["instances"] == n],
            timeout=60,
            what="all instances indexed",
        )
        assert rows, "instances not indexed"
        return elapsed
    finally:
        node.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warm-gb", type=float, default=4.0)
    args = ap.parse_args()

    missing = [p for p in ("/usr/bin/storescu", "/usr/bin/storescp", ORTHANC) if not have(p)]
    if missing:
        print(f"missing peers: {', '.join(missing)} (install dcmtk and orthanc)")
        return 2
    root = Path(tempfile.mkdtemp(prefix="dn-bench-"))
    try:
        study = simulate(root / "study-0", args.slices, args.size)
        size_mb = sum(f.stat().st_size for f in study.iterdir()) / 1e6
        print(
            f"study: {args.slices} slices {args.size}x{args.size} CT (simulated), {size_mb:.0f} MB; "
            f"warming {args.warm_gb:g} GB of memory"
        )
        warm_memory(args.warm_gb)
        runs: dict[str, list[float]] = {"dcmtk storescp": [], "Orthanc": [], "dicom-node": []}
        receivers = [
            ("dcmtk storescp", run_storescp),
            ("Orthanc", lambda w, s: run_orthanc(w, s, args.slices)),
            ("dicom-node", lambda w, s: run_node(w, s, args.slices)),
        ]
        for rep in range(args.repeats):
            if rep:  # a fresh study (new UIDs) for every repeat; the previous one is deleted
                shutil.rmtree(study)
                study = simulate(root / f"study-{rep}", args.slices, args.size)
                warm_memory(args.warm_gb)  # the simulator's freed memory is cold again
            # Who goes first alternates: odd repeats run the receivers in reverse order.
            for name, fn in receivers if rep % 2 == 0 else reversed(receivers):
                work = root / f"run-{rep}-{name.split()[0].lower()}"
                work.mkdir()
                elapsed = fn(work, study)
                runs[name].append(elapsed)
                shutil.rmtree(work)
                settle_disk()
                print(
                    f"  repeat {rep + 1} {name:15s} {elapsed:6.2f} s  {args.slices / elapsed:7.1f} img/s",
                    flush=True,
                )
        print()
        print(f"{'receiver':16s} {'median s':>9s} {'img/s':>8s} {'MB/s':>7s}")
        med = {k: statistics.median(v) for k, v in runs.items()}
        for name, m in med.items():
            print(f"{name:16s} {m:9.2f} {args.slices / m:8.1f} {size_mb / m:7.1f}")
        print()
        ratio = med["Orthanc"] / med["dicom-node"]
        print(f"dicom-node / Orthanc (images/s): {ratio:.2f}x   (target >= 1.2x)")
        print(f"dicom-node / dcmtk storescp (images/s): {med['dcmtk storescp'] / med['dicom-node']:.2f}x")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
