"""Hostile hold (issue 15, item 1): sockets that cost the node nothing but sockets.

64 sockets each send a 6-byte PDU header declaring 4 GB (``01 00 FF FF FF FF``) and keep
streaming zeros into it; 64 more connect and stay silent; all from 127.0.0.1, and the
attacker holds every one open for ``--hold`` seconds (it never closes one itself, and
never reconnects). Meanwhile dcmtk ``storescu`` sends a simulated 50-slice CT. Before the
guard, 16 such sockets locked every sender out for as long as they were held, and one of
them buffered +318 MB.

Prints: the storescu result and time, the instances stored, the node's RSS (the ``serve``
process: the receiver runs in it) idle and at its peak during the hold, and how many of
the hostile sockets the node closed, and when (seconds after each was opened).

Usage: ``python tests/bench/hostile_hold.py [--hold 120]``. The integration test
(``tests/integration/test_hostile_connections.py``) runs :func:`hold_under_attack` with
a short hold.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dicom_node.lab.localpeers import STORESCU, NodeProcess, have, storescu  # noqa: E402
from tests.state import state_rows  # noqa: E402

HUGE_HEADER = bytes([0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF])  # an A-ASSOCIATE-RQ of 4 GB
_STREAM_CHUNK = bytes(64 * 1024)


@dataclass
class Hostile:
    kind: str  # "header" (4 GB header, then streaming) or "idle"
    sock: socket.socket
    opened_at: float
    #: Seconds after opening when the node closed it (None: still open at the end).
    closed_after: float | None = None
    streamed: int = 0


@dataclass
class HoldResult:
    hold_seconds: float
    storescu_returncode: int
    storescu_seconds: float
    storescu_output: str
    #: C-STORE responses with status Success that storescu reported.
    acknowledged: int
    stored: int
    rss_idle: int
    rss_peak: int
    hostiles: list[Hostile] = field(default_factory=list)

    def closed(self, kind: str) -> list[float]:
        return sorted(h.closed_after for h in self.hostiles if h.kind == kind and h.closed_after is not None)

    def opened(self, kind: str) -> int:
        return sum(1 for h in self.hostiles if h.kind == kind)

    def report(self) -> str:
        mib = 1024 * 1024
        lines = [
            f"hold: {self.hold_seconds:g} s",
            f"storescu: exit {self.storescu_returncode} in {self.storescu_seconds:.2f} s,"
            f" {self.acknowledged} instances acknowledged (Success)",
            f"instances stored (indexed by the node): {self.stored}",
            f"node RSS: idle {self.rss_idle / mib:.1f} MiB, peak {self.rss_peak / mib:.1f} MiB"
            f" (+{(self.rss_peak - self.rss_idle) / mib:.1f} MiB)",
        ]
        for kind in ("header", "idle"):
            closed = self.closed(kind)
            line = f"{kind} sockets closed by the node: {len(closed)} of {self.opened(kind)}"
            if closed:
                line += (
                    f", after {closed[0]:.3f}-{closed[-1]:.3f} s (median {statistics.median(closed):.3f} s)"
                )
            lines.append(line)
        streamed = sum(h.streamed for h in self.hostiles)
        lines.append(
            f"bytes the header sockets streamed before the node closed them: {streamed / mib:.1f} MiB"
            " (into the kernel's socket buffers: the node reads 6 bytes of each)"
        )
        return "\n".join(lines)


class _Attacker(threading.Thread):
    """Holds the hostile sockets: streams into the header ones, watches all for the
    node closing them."""

    def __init__(self, hostiles: list[Hostile]) -> None:
        super().__init__(name="attacker", daemon=True)
        self.hostiles = hostiles
        self.stop = threading.Event()

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        for hostile in self.hostiles:
            hostile.sock.setblocking(False)
            events = selectors.EVENT_READ
            if hostile.kind == "header":
                events |= selectors.EVENT_WRITE
            selector.register(hostile.sock, events, hostile)
        while not self.stop.is_set() and selector.get_map():
            for key, mask in selector.select(0.1):
                hostile = key.data
                closed = False
                if mask & selectors.EVENT_READ:
                    try:
                        closed = not hostile.sock.recv(65536)  # an A-ABORT, then the close
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed = True
                elif mask & selectors.EVENT_WRITE:
                    try:
                        hostile.streamed += hostile.sock.send(_STREAM_CHUNK)
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed = True
                if closed:
                    hostile.closed_after = time.monotonic() - hostile.opened_at
                    selector.unregister(hostile.sock)
        selector.close()


class _RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(name="rss", daemon=True)
        self.process = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self.stop = threading.Event()

    def sample(self) -> int:
        rss = int(self.process.memory_info().rss)
        self.peak = max(self.peak, rss)
        return rss

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _stored(node: NodeProcess) -> int:
    rows = state_rows(node.home, "select count(*) from instances")
    return int(rows[0][0]) if rows else 0


def hold_under_attack(
    node: NodeProcess, study: Path, hold_seconds: float, *, headers: int = 64, idle: int = 64
) -> HoldResult:
    """Attack ``node`` (started, on a fresh home) for ``hold_seconds`` while storescu sends
    ``study``; then release the sockets and wait for the instances to be indexed."""
    assert node.proc is not None
    expected = len([p for p in study.rglob("*") if p.is_file()])
    sampler = _RssSampler(node.proc.pid)
    time.sleep(1.0)
    rss_idle = sampler.sample()
    sampler.peak = rss_idle
    sampler.start()

    started = time.monotonic()
    hostiles: list[Hostile] = []
    for _ in range(headers):
        sock = _connect(node.port)
        hostiles.append(Hostile("header", sock, time.monotonic()))
        sock.sendall(HUGE_HEADER)
    for _ in range(idle):
        hostiles.append(Hostile("idle", _connect(node.port), time.monotonic()))
    attacker = _Attacker(hostiles)
    attacker.start()

    sent_at = time.monotonic()
    sent = storescu(study, node.port, node.ae_title, extra=["-v"], timeout=max(hold_seconds, 60) + 60)
    storescu_seconds = time.monotonic() - sent_at

    while time.monotonic() - started < hold_seconds:
        time.sleep(0.1)
    attacker.stop.set()
    attacker.join(10)
    for hostile in hostiles:
        hostile.sock.close()
    deadline = time.monotonic() + 60
    while _stored(node) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    sampler.stop.set()
    sampler.join(5)
    return HoldResult(
        hold_seconds=hold_seconds,
        storescu_returncode=sent.returncode,
        storescu_seconds=storescu_seconds,
        storescu_output=(sent.stdout + sent.stderr)[-3000:],
        acknowledged=(sent.stdout + sent.stderr).count("Received Store Response (Success)"),
        stored=_stored(node),
        rss_idle=rss_idle,
        rss_peak=sampler.peak,
        hostiles=hostiles,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", type=float, default=120.0, help="seconds the attacker holds its sockets")
    parser.add_argument("--headers", type=int, default=64)
    parser.add_argument("--idle", type=int, default=64)
    args = parser.parse_args()
    if not have(STORESCU):
        print(f"needs dcmtk's {STORESCU}", file=sys.stderr)
        return 2

    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    with tempfile.TemporaryDirectory(prefix="hostile-hold-") as tmp:
        work = Path(tmp)
        study = work / "ct50"
        write_ct_series(study, PhantomSpec(slices=50, seed=1), patient_id="SIM-CT50")
        node = NodeProcess(work / "node").start()
        try:
            result = hold_under_attack(node, study, args.hold, headers=args.headers, idle=args.idle)
        finally:
            node.stop()
        print(result.report())
        if result.storescu_returncode != 0:
            print(result.storescu_output)
    return 0 if result.storescu_returncode == 0 and result.acknowledged == result.stored == 50 else 1


if __name__ == "__main__":
    raise SystemExit(main())
