"""Audit log benchmark: append rate and full-chain verification time, on SQLite.

Appends 10,000 events one `record()` call each (a transaction per event, as the node's
call sites do), then grows the log to 100,000 events and times `verify()` over all of them
(hash chain + external checkpoints). Prints the figures; not a timed test.

Usage: ``python tests/bench/bench_audit.py``
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from audit import AuditEvent, AuditTrail  # noqa: E402


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="dn-audit-bench-"))
    try:
        trail = AuditTrail(
            f"sqlite:///{root / 'audit.db'}",
            actor="bench",
            checkpoint_file=root / "cp.jsonl",
            checkpoint_every=100,
        )
        facts = {"series_uid": "1.2.826.0.1.3680043.8.498.1", "sha256": "ab" * 32, "version": 1}
        n = 10_000
        t0 = time.perf_counter()
        for i in range(n):
            trail.record(
                AuditEvent.INSTANCE_STORED,
                study_uid="1.2.826.0.1.3680043.8.498.2",
                patient_id="SIM-0001",
                calling_ae="CT1",
                peer_host="127.0.0.1",
                sop_uid=f"1.2.826.0.1.3680043.8.498.3.{i}",
                **facts,
            )
        append = time.perf_counter() - t0
        print(
            f"append: {n} events, one transaction each: {append:.2f} s = {n / append:,.0f} events/s "
            "(target >= 2,000)"
        )

        batch = [
            (AuditEvent.INSTANCE_STORED, {"study_uid": "1.2.3", "sop_uid": f"1.2.3.{i}", **facts})
            for i in range(1000)
        ]
        t0 = time.perf_counter()
        while trail.head()[0] < 100_000:
            trail.record_many(batch)
        grow = time.perf_counter() - t0
        total = trail.head()[0]
        print(
            f"batched append (the indexer's path): {total - n} events in {grow:.2f} s = "
            f"{(total - n) / grow:,.0f} events/s"
        )

        t0 = time.perf_counter()
        result = trail.verify()
        elapsed = time.perf_counter() - t0
        assert result.ok, result.problem
        print(
            f"verify: {result.records:,} events, {result.checkpoints_checked} checkpoints in {elapsed:.2f} s "
            f"(target < 10 s)"
        )
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
