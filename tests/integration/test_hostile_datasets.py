"""Hostile input on the C-STORE SCP (issue 15, item 2: decoding limits).

Deflate bombs, data sets whose encoding does not match the negotiated transfer syntax, bad
command sets and byte-flipped data sets are sent to a real ``dicom-node serve`` on
loopback — over a negotiated presentation context, with the exact bytes on the wire ours
(pynetdicom negotiates; :class:`RawStoreSCU` writes the P-DATA-TF PDUs itself). Every
class also checks, while it runs, that:

* a concurrent legitimate dcmtk ``storescu`` keeps succeeding within :data:`STORESCU_BOUND_S`;
* nothing acknowledged is lost: every data set answered Success is on disk and pydicom
  reads it;
* every refusal is quarantined (its bytes kept with the reason) and audited, and every
  association the node aborted is audited as aborted.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dsutils import encode

from dicom_node.ingest.content import same_content
from dicom_node.ingest.part10 import split_part10
from tests.conftest import audit_rows, db_rows, node_config, require
from tests.peers import NODE_ENV, STORESCU, NodeProcess

pytestmark = pytest.mark.integration

#: How long one storescu run (process start, association, one 512x512 CT slice, release)
#: may take while the node is under attack. On this 2-core machine, shared with other work,
#: a run took 0.06-0.21 s with the node idle and at most 0.3 s under these attacks; the
#: issue's 2 s is kept: several times the worst seen, and still far from a hung node.
STORESCU_BOUND_S = 2.0
MIB = 1024 * 1024

_CONTEXTS = [
    (CTImageStorage, ExplicitVRLittleEndian),
    (CTImageStorage, ImplicitVRLittleEndian),
    (CTImageStorage, DeflatedExplicitVRLittleEndian),
    (CTImageStorage, JPEGBaseline8Bit),
]


# -- a C-STORE SCU that sends exactly the bytes it is given ------------------------------------


def _pdu(context_id: int, control: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 9.3.5)."""
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv


def command_set(
    sop_uid: str | None,
    *,
    message_id: int | None = 1,
    command_field: int = 0x0001,
    has_data_set: bool = True,
    sop_class: str | None = CTImageStorage,
    priority: int | None = 0,
) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian); None leaves a field out."""
    ds = Dataset()
    ds.CommandGroupLength = 0
    if sop_class is not None:
        ds.AffectedSOPClassUID = sop_class
    ds.CommandField = command_field
    if message_id is not None:
        ds.MessageID = message_id
    if priority is not None:
        ds.Priority = priority
    ds.CommandDataSetType = 0x0001 if has_data_set else 0x0101
    if sop_uid is not None:
        ds.AffectedSOPInstanceUID = sop_uid
    body = encode(ds, True, True)
    assert body is not None
    ds.CommandGroupLength = len(body) - 12  # everything after the group length element
    encoded = encode(ds, True, True)
    assert encoded is not None
    return bytes(encoded)


@dataclass
class Answer:
    """What the node answered one request with: a status, or an abort, or nothing."""

    status: int | None = None
    comment: str | None = None
    aborted: bool = False


class RawStoreSCU:
    """An association negotiated by pynetdicom on which we write P-DATA-TF PDUs by hand."""

    def __init__(self, node: NodeProcess, calling: str = "FUZZSCU", timeout: float = 10.0) -> None:
        ae = AE(ae_title=calling)
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        for abstract, ts in _CONTEXTS:
            ae.add_requested_context(abstract, ts)
        self.assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert self.assoc.is_established, "the node refused the fuzzing association"
        self.context = {str(cx.transfer_syntax[0]): int(cx.context_id) for cx in self.assoc.accepted_contexts}
        # Keep pynetdicom's own reactor away from the responses (as its send_* methods do).
        self.assoc._reactor_checkpoint.clear()
        while not self.assoc._is_paused:
            time.sleep(0.0001)

    def send_raw(self, pdus: list[bytes]) -> None:
        for pdu in pdus:
            self.assoc.dul.socket.send(pdu)

    def request(self, ts: str, command: bytes, data: bytes | None, fragment: int = 64 * 1024) -> list[bytes]:
        """The PDUs of one message: the command, then (when given) the data set in fragments."""
        cid = self.context[ts]
        pdus = [_pdu(cid, 0x03, command)]
        if data is not None:
            chunks = [data[i : i + fragment] for i in range(0, len(data), fragment)] or [b""]
            pdus += [_pdu(cid, 0x02 if i == len(chunks) - 1 else 0x00, c) for i, c in enumerate(chunks)]
        return pdus

    def answer(self, wait: float = 10.0) -> Answer:
        deadline = time.time() + wait
        while time.time() < deadline:
            _cid, rsp = self.assoc.dimse.get_msg(block=False)
            if rsp is not None:
                return Answer(int(rsp.Status), getattr(rsp, "ErrorComment", None))
            # The reactor that would notice is paused: ask the ACSE and the DUL directly.
            if self.assoc.acse.is_aborted() or not self.assoc.dul.is_alive():
                return Answer(aborted=True)
            time.sleep(0.005)
        return Answer()

    def store(self, ts: str, command: bytes, data: bytes | None, wait: float = 10.0) -> Answer:
        self.send_raw(self.request(ts, command, data))
        return self.answer(wait)

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc._reactor_checkpoint.set()
            self.assoc.release()
        self.assoc.abort()


# -- input: a real CT slice, re-encoded and deflated -------------------------------------------


@pytest.fixture(scope="module")
def ct_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One simulated 512x512 CT slice, as the legitimate storescu traffic and fuzz input."""
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    study = write_ct_series(
        tmp_path_factory.mktemp("hostile-ct"), PhantomSpec(slices=1, seed=15), patient_id="HOSTILE-1"
    )
    return sorted(study.files)[0]


def data_set(path: Path) -> tuple[str, bytes]:
    """(SOP Instance UID, data set bytes as stored in the file)."""
    meta, data = split_part10(path.read_bytes())
    return str(meta.MediaStorageSOPInstanceUID), data


def reencode(path: Path, ts: str, **changes: Any) -> bytes:
    """The data set of ``path`` written by pydicom in ``ts``, with attributes changed."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return split_part10(buf.getvalue())[1]


def deflate(data: bytes | Iterator[bytes]) -> bytes:
    """Raw deflate (PS3.5 A.5), from bytes or streamed from chunks."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [data] if isinstance(data, bytes) else data
    return b"".join([*(packer.compress(c) for c in chunks), packer.flush()])


def zeros(total: int, chunk: int = MIB) -> Iterator[bytes]:
    block = bytes(chunk)
    for _ in range(total // chunk):
        yield block


def element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` overrides the value's (a lie or undefined)."""
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, size) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, size) + value


def item(value: bytes, tag: int = 0xE000, length: int | None = None) -> bytes:
    return struct.pack("<HHL", 0xFFFE, tag, len(value) if length is None else length) + value


SEQUENCE_END = item(b"", 0xE0DD)
UNDEFINED = 0xFFFFFFFF


def header_and_pixels(data: bytes) -> tuple[bytes, bytes]:
    """Split an explicit VR little endian image at its Pixel Data element."""
    at = data.rfind(b"\xe0\x7f\x10\x00O")
    assert at > 0
    return data[:at], data[at:]


def encapsulated(header: bytes, *items: bytes) -> bytes:
    return header + element(0x7FE00010, b"OB", b"".join(items), length=UNDEFINED)


# -- what every class checks -------------------------------------------------------------------


class LegitTraffic:
    """dcmtk storescu sending one CT slice over and over, each run timed, while a class runs."""

    def __init__(self, node: NodeProcess, path: Path) -> None:
        self.node, self.path = node, path
        self.runs: list[tuple[float, bool, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            run = subprocess.run(
                [
                    STORESCU,
                    "-v",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    self.node.ae_title,
                    "127.0.0.1",
                    str(self.node.port),
                    str(self.path),
                ],
                env=NODE_ENV,
                capture_output=True,
                text=True,
                timeout=30,
            )
            out = run.stdout + run.stderr
            ok = run.returncode == 0 and "Received Store Response (Success)" in out
            self.runs.append((time.monotonic() - started, ok, out[-400:]))
            self._stop.wait(0.05)

    def __enter__(self) -> LegitTraffic:
        require(STORESCU)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def check(self) -> None:
        assert self.runs, "storescu never ran"
        for duration, ok, out in self.runs:
            assert ok, f"a legitimate storescu failed while the node was under attack:\n{out}"
            assert duration <= STORESCU_BOUND_S, (
                f"storescu took {duration:.2f} s (bound {STORESCU_BOUND_S} s)"
            )
        slowest = max(duration for duration, _ok, _out in self.runs)
        print(f"\nstorescu: {len(self.runs)} runs, slowest {slowest:.2f} s")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data_part(path: Path) -> bytes:
    raw = path.read_bytes()
    try:
        return split_part10(raw)[1]
    except Exception:  # quarantine keeps bytes alone when the claimed UID cannot be encoded
        return raw


@dataclass(frozen=True)
class Entry:
    label: str
    ts: str
    data: bytes
    answer: Answer


@dataclass
class Ledger:
    """Every hostile request of a class and how the node answered it."""

    node: NodeProcess
    calling: str = "FUZZSCU"
    entries: list[Entry] = field(default_factory=list)

    def record(self, label: str, ts: str, data: bytes | None, answer: Answer) -> Answer:
        self.entries.append(Entry(label, ts, data or b"", answer))
        return answer

    def _on_disk(self, acked: Entry, stored: dict[str, Path]) -> Path | None:
        if (path := stored.get(_sha(acked.data))) is not None:
            return path
        # A duplicate: the same content, already stored (in this or another transfer syntax).
        for path in stored.values():
            meta, data = split_part10(path.read_bytes())
            if same_content(data, str(meta.TransferSyntaxUID), acked.data, acked.ts):
                return path
        return None

    def verify(self) -> dict[str, int]:
        """Never silence; acknowledged means on disk and readable; refused means quarantined
        and audited; aborted means audited. Returns the counts."""
        silent = [e.label for e in self.entries if e.answer.status is None and not e.answer.aborted]
        assert not silent, f"no answer at all to: {silent}"
        acked = [e for e in self.entries if e.answer.status == 0]
        refused = [e for e in self.entries if e.answer.status not in (None, 0)]
        aborted = [e for e in self.entries if e.answer.aborted]

        studies = self.node.home / "var" / "data" / "studies"
        stored = {_sha(_data_part(p)): p for p in studies.rglob("*.dcm")}
        for entry in acked:
            path = self._on_disk(entry, stored)
            assert path is not None, f"acknowledged but not on disk: {entry.label}"
            ds = pydicom.dcmread(path)
            assert [elem.tag for elem in ds.iterall()], f"pydicom cannot read {path.name}"

        kept = {_sha(_data_part(p)) for p in (self.node.home / "var" / "quarantine").glob("*.dcm")}
        for entry in refused:
            assert _sha(entry.data) in kept, f"refused but not quarantined: {entry.label}"

        def audited(event: str, **facts: str) -> int:
            return sum(
                1
                for row in audit_rows(self.node, event)
                if row[3] == self.calling and all(json.loads(row[5]).get(k) == v for k, v in facts.items())
            )

        self.node.wait_for(
            lambda: audited("instance-quarantined") >= len(refused),
            timeout=15,
            what="a quarantine audit per refusal",
        )
        self.node.wait_for(
            lambda: audited("association-closed", how="aborted") >= len(aborted),
            timeout=15,
            what="an audit per aborted association",
        )
        return {"acked": len(acked), "refused": len(refused), "aborted": len(aborted)}


def send(
    node: NodeProcess, ledger: Ledger, label: str, ts: str, command: bytes, data: bytes | None
) -> Answer:
    """One request on its own association (an abort ends only that one)."""
    scu = RawStoreSCU(node, calling=ledger.calling)
    try:
        return ledger.record(label, ts, data, scu.store(ts, command, data))
    finally:
        scu.close()


# -- deflate bombs -----------------------------------------------------------------------------

BOMB_BYTES = 200 * MIB


def pixel_bomb(header: bytes) -> bytes:
    """A CT header declaring 512x512x16 bit, then 200 MiB of Pixel Data (zeros)."""
    head = header + element(0x7FE00010, b"OW", b"", length=BOMB_BYTES)
    return deflate(iter([head, *zeros(BOMB_BYTES)]))


def private_bomb(sop_uid: str) -> bytes:
    """No image attributes: a private OB element of 200 MiB right after the SOP UIDs."""
    head = element(0x00080016, b"UI", CTImageStorage.encode() + b"\0") + element(
        0x00080018, b"UI", sop_uid.encode() + (b"\0" if len(sop_uid) % 2 else b"")
    )
    head += element(0x00090010, b"LO", b"BOMB") + element(0x00091000, b"OB", b"", length=BOMB_BYTES)
    return deflate(iter([head, *zeros(BOMB_BYTES)]))


def sequence_bomb() -> bytes:
    """Lengths that announce nothing: an undefined-length sequence item of tiny elements."""
    head = element(0x00081140, b"SQ", b"", length=UNDEFINED) + item(b"", length=UNDEFINED)
    unit = element(0x00081150, b"UI", b"1.2\0") * 8192
    return deflate(iter([head, *(unit for _ in range(BOMB_BYTES // len(unit)))]))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRSS:
    """Samples a process's resident set every few milliseconds."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_deflate_bombs_are_refused_and_memory_stays_near_idle(tmp_path: Path, ct_slice: Path) -> None:
    uid, data = data_set(ct_slice)
    header, _pixels = header_and_pixels(data)
    bombs = {"pixel": pixel_bomb(header), "private": private_bomb(uid), "sequence": sequence_bomb()}
    assert all(len(b) < 1024 * 1024 for b in bombs.values())  # a few hundred KiB on the wire
    node = NodeProcess(tmp_path / "node", node_config()).start()
    ledger = Ledger(node)
    try:
        assert node.proc is not None
        # Warm up (imports, caches, allocator arenas) with legitimate traffic, deflated
        # included; then measure the node at rest.
        with LegitTraffic(node, ct_slice) as warm_up:
            warm = send(
                node,
                ledger,
                "legit deflated",
                DeflatedExplicitVRLittleEndian,
                command_set(uid),
                deflate(data),
            )
            assert warm.status == 0
            time.sleep(2.0)
        warm_up.check()
        time.sleep(0.5)
        idle = rss_bytes(node.proc.pid)
        with LegitTraffic(node, ct_slice) as traffic, PeakRSS(node.proc.pid) as rss:
            for name, bomb in bombs.items():
                answer = send(
                    node, ledger, f"{name} bomb", DeflatedExplicitVRLittleEndian, command_set(uid), bomb
                )
                assert answer.status == 0xC000, (name, answer)
                assert answer.comment and answer.comment.startswith("deflated data set inflates past"), answer
            time.sleep(0.3)
        traffic.check()
        growth = rss.peak - idle
        assert growth < 100 * MIB, f"the node's memory grew {growth / MIB:.0f} MB over idle"
        counts = ledger.verify()
        assert counts == {"acked": 1, "refused": 3, "aborted": 0}
        reasons = [json.loads(r[5])["reason"] for r in audit_rows(node, "instance-quarantined")]
        assert all("inflates past" in r for r in reasons) and len(reasons) == 3
    finally:
        node.stop()
    print(f"\nidle RSS {idle / MIB:.0f} MB, peak during bombs +{growth / MIB:.1f} MB")


def test_deflated_data_sets_within_and_beyond_the_configured_limit(tmp_path: Path, ct_slice: Path) -> None:
    uid, data = data_set(ct_slice)
    header, _pixels = header_and_pixels(data)
    # A consistent image larger than the configured 16 MB: 2048x2048x16 bit, 3 frames (24 MiB).
    big = reencode(
        ct_slice,
        ExplicitVRLittleEndian,
        Rows=2048,
        Columns=2048,
        NumberOfFrames="3",
        PixelData=bytes(2048 * 2048 * 2 * 3),
    )
    rng = random.Random(1502)
    node = NodeProcess(tmp_path / "node", node_config(extra="[receiver]\nmax_inflated_mb = 16\n")).start()
    ledger = Ledger(node)
    deflated = DeflatedExplicitVRLittleEndian
    try:
        with LegitTraffic(node, ct_slice) as traffic:
            assert send(node, ledger, "legit", deflated, command_set(uid), deflate(data)).status == 0
            over = send(node, ledger, "over the limit", deflated, command_set(uid), deflate(big))
            assert (over.status, over.comment) == (
                0xA700,
                "deflated data set inflates past the configured limit of 16 MB",
            )
            whole = deflate(data)
            cases = {
                "cut stream": whole[: len(whole) // 2],
                "not deflated": data,
                "random bytes": rng.randbytes(4096),
                "pixel bomb, 40 MiB": deflate(
                    iter([header + element(0x7FE00010, b"OW", b"", length=40 * MIB), *zeros(40 * MIB)])
                ),
            }
            for label, body in cases.items():
                answer = send(node, ledger, label, deflated, command_set(uid), body)
                assert answer.status in (0xC000, 0xA700), (label, answer)
        traffic.check()
        assert ledger.verify() == {"acked": 1, "refused": 1 + len(cases), "aborted": 0}
    finally:
        node.stop()


# -- encodings that do not match the negotiated transfer syntax ----------------------------------


def test_transfer_syntax_mismatches_are_refused_quarantined_and_audited(
    tmp_path: Path, ct_slice: Path
) -> None:
    uid = generate_uid()  # not the storescu traffic's instance
    data = reencode(ct_slice, ExplicitVRLittleEndian, SOPInstanceUID=uid)
    header, _pixels = header_and_pixels(data)
    implicit = reencode(ct_slice, ImplicitVRLittleEndian, SOPInstanceUID=uid)
    fragment = b"\xff\xd8\xff\xe0" + bytes(60) + b"\xff\xd9"  # not decoded by the node: any bytes
    explicit_ctx, implicit_ctx, jpeg_ctx = ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
    refused = {
        "implicit VR on explicit": (explicit_ctx, implicit, "implicit VR data set on an explicit VR context"),
        "native pixels on JPEG": (
            jpeg_ctx,
            data,
            "native pixel data, the transfer syntax needs it encapsulated",
        ),
        "explicit VR on implicit": (implicit_ctx, data, "explicit VR data set on an implicit VR context"),
        "encapsulated on explicit": (
            explicit_ctx,
            encapsulated(header, item(b""), item(fragment), SEQUENCE_END),
            "encapsulated pixel data, the transfer syntax needs it native",
        ),
        "no offset table": (
            jpeg_ctx,
            encapsulated(header, SEQUENCE_END),
            "pixel data has no Basic Offset Table item",
        ),
        "no fragment": (
            jpeg_ctx,
            encapsulated(header, item(b""), SEQUENCE_END),
            "pixel data has no fragment after its Basic Offset Table",
        ),
        "fragment of undefined length": (
            jpeg_ctx,
            encapsulated(header, item(b""), item(fragment, length=UNDEFINED), SEQUENCE_END),
            "pixel data item 2 has undefined length",
        ),
    }
    node = NodeProcess(tmp_path / "node", node_config()).start()
    ledger = Ledger(node)
    try:
        with LegitTraffic(node, ct_slice) as traffic:
            for label, (ts, body, comment) in refused.items():
                answer = send(node, ledger, label, ts, command_set(uid), body)
                assert (answer.status, answer.comment) == (0xC000, comment), label
            # The control: well-formed encapsulated pixel data on the JPEG context is stored.
            good = encapsulated(header, item(b""), item(fragment), SEQUENCE_END)
            assert send(node, ledger, "encapsulated on JPEG", jpeg_ctx, command_set(uid), good).status == 0
        traffic.check()
        assert ledger.verify() == {"acked": 1, "refused": len(refused), "aborted": 0}
        audited = [json.loads(r[5]) for r in audit_rows(node, "instance-quarantined")]
        assert [a["status"] for a in audited] == ["0xC000"] * len(refused)
        assert all(a["reason"].startswith("not encoded as ") for a in audited)
        node.wait_for(
            lambda: (
                db_rows(node, "select transfer_syntax_uid from instances where sop_uid = ?", (uid,))
                == [(JPEGBaseline8Bit,)]
            ),
            timeout=15,
            what="the JPEG instance indexed, and only it",
        )
    finally:
        node.stop()


# -- bad command sets ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns writing the 65-character UID
def test_bad_command_sets_get_a_failure_status_or_an_abort_never_silence(
    tmp_path: Path, ct_slice: Path
) -> None:
    uid = generate_uid()
    data = reencode(ct_slice, ExplicitVRLittleEndian, SOPInstanceUID=uid)
    long_uid = "1.2.826.0.1.3680043.8.498." + "1" * 39
    assert len(long_uid) == 65
    long_data = reencode(ct_slice, ExplicitVRLittleEndian, SOPInstanceUID=long_uid)
    explicit = ExplicitVRLittleEndian
    failures = {
        "no Affected SOP Instance UID": (command_set(None), data, 0xC000),
        "an invalid Affected SOP Instance UID": (command_set(long_uid), long_data, 0x0117),
        "no Affected SOP Class UID": (command_set(uid, sop_class=None), data, 0xC000),
        "no Priority": (command_set(uid, priority=None), data, 0xC000),
        "an invalid Priority": (command_set(uid, priority=7), data, 0xC000),
    }
    aborts = {
        "no Message ID": command_set(uid, message_id=None),
        "unknown Command Field": command_set(uid, command_field=0x7777),
        "C-FIND-RQ on a storage context": command_set(uid, command_field=0x0020),
        "C-ECHO-RQ with a data set": command_set(uid, command_field=0x0030),
        "C-STORE-RSP sent to the SCP": command_set(uid, command_field=0x8001),
    }
    rng = random.Random(1515)
    node = NodeProcess(tmp_path / "node", node_config()).start()
    ledger = Ledger(node)
    try:
        with LegitTraffic(node, ct_slice) as traffic:
            for label, (command, body, status) in failures.items():
                answer = send(node, ledger, label, explicit, command, body)
                assert answer.status == status, (label, answer)
                assert answer.comment == f"C-STORE request has {label}", (label, answer)
            for label, command in aborts.items():
                assert send(node, ledger, label, explicit, command, data).aborted, label
            # Command Data Set Type lies. "None follows", then a data set: the request is
            # refused for having no data set and the stray data set aborts the association
            # (which may come first: both are answers).
            scu = RawStoreSCU(node, calling=ledger.calling)
            scu.send_raw(
                scu.request(explicit, command_set(uid, has_data_set=False), None)
                + scu.request(explicit, command_set(uid), data)[1:]
            )
            first = ledger.record("says no data set, sends one", explicit, b"", scu.answer())
            if not first.aborted:
                assert (first.status, first.comment) == (0xC000, "C-STORE request has no data set")
                assert ledger.record("the stray data set", explicit, None, scu.answer()).aborted
            scu.close()
            # "A data set follows", then the next command instead.
            scu = RawStoreSCU(node, calling=ledger.calling)
            scu.send_raw(
                scu.request(explicit, command_set(uid), None) + scu.request(explicit, command_set(uid), data)
            )
            assert ledger.record("says a data set, sends a command", explicit, data, scu.answer()).aborted
            scu.close()
            # Cut short or flipped command sets: any answer but silence (pydicom decodes a
            # cut value as far as it goes, so some are refusals rather than aborts).
            for cut in (2, 6, 13, 40):
                answer = send(node, ledger, f"command cut by {cut}", explicit, command_set(uid)[:-cut], data)
                assert answer.aborted or (answer.status or 0) > 0, (cut, answer)
            for n in range(12):
                command = bytearray(command_set(uid, message_id=n + 1))
                for _ in range(rng.randint(1, 3)):
                    command[rng.randrange(len(command))] ^= 1 << rng.randrange(8)
                answer = send(node, ledger, f"flipped command {n}", explicit, bytes(command), data)
                assert answer.aborted or answer.status is not None, n
        traffic.check()
        counts = ledger.verify()
        assert counts["refused"] >= len(failures) and counts["aborted"] >= len(aborts) + 1
        # The two acceptance cases, by name: answered, quarantined with their reason, audited.
        audited = {
            json.loads(r[5])["reason"]: json.loads(r[5]) for r in audit_rows(node, "instance-quarantined")
        }
        assert audited["C-STORE request has no Affected SOP Instance UID"]["status"] == "0xC000"
        assert audited["C-STORE request has an invalid Affected SOP Instance UID"]["status"] == "0x0117"
        reasons = "".join(p.read_text() for p in (node.home / "var" / "quarantine").glob("*.reason.txt"))
        assert f"claimed_sop_instance_uid: {long_uid}\n" in reasons
        assert db_rows(node, "select count(*) from instances where sop_uid = ?", (long_uid,)) == [(0,)]
    finally:
        node.stop()


# -- byte-flipped data sets ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns reading mutated values back
def test_mutated_data_sets_are_stored_readable_or_refused_and_kept(tmp_path: Path, ct_slice: Path) -> None:
    from pydicom.data import get_testdata_file

    real = get_testdata_file("CT_small.dcm")  # a scanner's CT, explicit VR little endian
    assert real is not None
    uid = generate_uid()
    sources = [data_set(Path(real)), (uid, reencode(ct_slice, ExplicitVRLittleEndian, SOPInstanceUID=uid))]
    rng = random.Random(20260515)
    node = NodeProcess(tmp_path / "node", node_config()).start()
    ledger = Ledger(node)
    try:
        with LegitTraffic(node, ct_slice) as traffic:
            for n in range(60):
                sop_uid, original = rng.choice(sources)
                header_end = len(header_and_pixels(original)[0]) + 12
                mutant = bytearray(original)
                for _ in range(rng.randint(1, 4)):
                    # Mostly where the structure is (element headers, UIDs, lengths).
                    at = rng.randrange(header_end) if rng.random() < 0.8 else rng.randrange(len(mutant))
                    mutant[at] ^= 1 << rng.randrange(8)
                answer = send(
                    node, ledger, f"mutant {n}", ExplicitVRLittleEndian, command_set(sop_uid), bytes(mutant)
                )
                assert answer.status is not None, (n, answer)
            for n in range(10):
                sop_uid, original = rng.choice(sources)
                packed = bytearray(deflate(original))
                packed[rng.randrange(len(packed))] ^= 1 << rng.randrange(8)
                answer = send(
                    node,
                    ledger,
                    f"deflated mutant {n}",
                    DeflatedExplicitVRLittleEndian,
                    command_set(sop_uid),
                    bytes(packed),
                )
                assert answer.status is not None, (n, answer)
        traffic.check()
        counts = ledger.verify()
        assert counts["acked"] > 0 and counts["refused"] > 0 and counts["aborted"] == 0, counts
    finally:
        node.stop()
    print(f"\nmutants: {counts}")
