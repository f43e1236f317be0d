"""The C-STORE SCU: which presentation contexts it proposes, files the peer accepts as stored
go out byte for byte, and what it says when nothing the peer accepted fits."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from dicom_node.config import Destination
from dicom_node.delivery.sender import TooManyContexts, propose_contexts, send_series
from dicom_node.ingest.part10 import split_part10
from dicom_node.lab.localpeers import free_port
from dicom_node.lab.simulate import write_ct_series
from models.sim.phantom import PhantomSpec
from pipelines.base import OutputInstance

ELE, ILE = ExplicitVRLittleEndian, ImplicitVRLittleEndian


def _out(ts: str, sop_class: str = CTImageStorage, path: Path = Path("/x.dcm")) -> OutputInstance:
    return OutputInstance("1.2.3", "1.2", sop_class, ts, path)


# -- the contexts proposed -------------------------------------------------------------------


def test_each_stored_syntax_gets_a_context_of_its_own_and_the_uncompressed_a_fallback() -> None:
    files = [_out(JPEG2000Lossless), _out(JPEG2000Lossless), _out(JPEGLSLossless)]
    assert propose_contexts(files) == [
        (CTImageStorage, (JPEG2000Lossless,)),
        (CTImageStorage, (JPEGLSLossless,)),
        (CTImageStorage, (ELE, ILE)),
    ]


def test_uncompressed_files_propose_their_own_syntax_alone_and_the_others_as_fallback() -> None:
    assert propose_contexts([_out(ELE)]) == [(CTImageStorage, (ELE,)), (CTImageStorage, (ILE,))]
    assert propose_contexts([_out(ELE), _out(ILE)]) == [(CTImageStorage, (ELE,)), (CTImageStorage, (ILE,))]
    files = [_out(DeflatedExplicitVRLittleEndian), _out(RLELossless, MRImageStorage), _out(ILE)]
    assert propose_contexts(files) == [
        (CTImageStorage, (DeflatedExplicitVRLittleEndian,)),
        (CTImageStorage, (ILE,)),
        (CTImageStorage, (ELE,)),
        (MRImageStorage, (RLELossless,)),
        (MRImageStorage, (ELE, ILE)),
    ]


def test_fallbacks_give_way_when_the_association_is_short_of_contexts() -> None:
    # 64 SOP classes stored compressed: 64 own contexts + 64 fallbacks = 128, one too many
    # with storage commitment; the last SOP class then goes without its fallback.
    classes = [f"1.2.840.10008.5.1.4.1.1.{n}" for n in range(64)]
    files = [_out(JPEG2000Lossless, c) for c in classes]
    assert len(propose_contexts(files)) == 128
    short = propose_contexts(files, reserved=1)
    assert len(short) == 127
    assert short[-1] == (classes[-1], (JPEG2000Lossless,))
    assert [c for c, ts in short if ts == (ELE, ILE)] == classes[:-1]
    many = [_out(JPEG2000Lossless, f"1.2.3.{n}") for n in range(128)]
    with pytest.raises(TooManyContexts, match="series needs 129 presentation contexts"):
        propose_contexts(many, reserved=1)


# -- a real pynetdicom peer --------------------------------------------------------------------


@dataclass
class Peer:
    """A storage SCP accepting CT in ``syntaxes`` only; keeps what it received, raw."""

    syntaxes: Sequence[str]
    sop_classes: Sequence[str] = (CTImageStorage,)
    port: int = field(default_factory=free_port)
    #: (transfer syntax of the context, the data set's bytes as they came)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    server: Any = None

    def on_store(self, event: Any) -> int:
        self.received.append((str(event.context.transfer_syntax), bytes(event.request.DataSet.getvalue())))
        return 0x0000

    def start(self) -> Peer:
        ae = AE(ae_title="PEER")
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, list(self.syntaxes))
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.on_store)]
        )
        return self

    @property
    def destination(self) -> Destination:
        return Destination(ae_title="PEER", host="127.0.0.1", port=self.port, timeout_seconds=10)


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.server.shutdown()


def _j2k_series(tmp_path: Path, slices: int = 2) -> list[OutputInstance]:
    sim = write_ct_series(tmp_path / "sim", PhantomSpec(rows=32, columns=32, slices=slices, seed=5))
    out = []
    for n, path in enumerate(sim.files):
        ds = dcmread(path)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        target = tmp_path / f"j2k-{n}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(
            OutputInstance(ds.SOPInstanceUID, ds.SeriesInstanceUID, CTImageStorage, JPEG2000Lossless, target)
        )
    return out


def test_a_syntax_the_peer_accepts_is_sent_as_stored(tmp_path: Path, peers: list[Peer]) -> None:
    files = _j2k_series(tmp_path)
    peer = Peer(ALL_TRANSFER_SYNTAXES).start()  # accepts the JPEG 2000 context and the fallback
    peers.append(peer)

    report = send_series(peer.destination, files, calling_ae="NODE")

    assert report.ok, report.error
    assert (report.sent, report.transcoded, report.transcoding_note) == (2, {}, None)
    for (syntax, raw), f in zip(peer.received, files, strict=True):
        assert syntax == JPEG2000Lossless
        _meta, stored = split_part10(f.path.read_bytes())
        assert raw == stored  # byte for byte: never transcoded


def test_a_refused_compressed_syntax_is_decoded_for_an_uncompressed_peer(
    tmp_path: Path, peers: list[Peer]
) -> None:
    files = _j2k_series(tmp_path)
    peer = Peer([ILE]).start()
    peers.append(peer)

    report = send_series(peer.destination, files, calling_ae="NODE")

    assert report.ok, report.error
    assert report.transcoded == {(JPEG2000Lossless, ILE): 2}
    assert report.transcoding_note == (
        "transcoded from JPEG 2000 Image Compression (Lossless Only) to Implicit VR Little Endian "
        "for 2 instance(s)"
    )
    assert [syntax for syntax, _ in peer.received] == [ILE, ILE]


def test_a_file_that_cannot_be_decoded_fails_naming_the_syntaxes(tmp_path: Path, peers: list[Peer]) -> None:
    (good, broken) = _j2k_series(tmp_path)
    ds = dcmread(broken.path)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    ds.save_as(broken.path, enforce_file_format=True)
    peer = Peer([ELE, ILE]).start()
    peers.append(peer)

    report = send_series(peer.destination, [good, broken], calling_ae="NODE")

    assert not report.ok and not report.retryable
    where = f"PEER@127.0.0.1:{peer.port}"
    assert report.error is not None
    assert report.error.startswith(
        f"{where} does not accept CT Image Storage in JPEG 2000 Image Compression (Lossless Only), "
        f"and decompressing instance {broken.sop_uid} failed ("
    )
    assert report.error.endswith(
        "offered JPEG 2000 Image Compression (Lossless Only), Explicit VR Little Endian, "
        "Implicit VR Little Endian; accepted: Explicit VR Little Endian"
    )
    assert report.sent == 1  # the good one went, decoded, before the broken one stopped it


def test_a_peer_that_refuses_every_context_is_not_blamed_on_the_ae_title(
    tmp_path: Path, peers: list[Peer]
) -> None:
    files = _j2k_series(tmp_path, slices=1)
    big_endian_only = Peer([ExplicitVRBigEndian]).start()
    no_ct = Peer(ALL_TRANSFER_SYNTAXES, sop_classes=[MRImageStorage]).start()
    peers += [big_endian_only, no_ct]

    report = send_series(big_endian_only.destination, files, calling_ae="NODE")
    assert not report.ok and not report.retryable
    assert report.error == (
        f"PEER@127.0.0.1:{big_endian_only.port} accepted none of the transfer syntaxes offered for "
        "CT Image Storage: offered JPEG 2000 Image Compression (Lossless Only), Explicit VR Little Endian, "
        "Implicit VR Little Endian; accepted: none"
    )

    report = send_series(no_ct.destination, files, calling_ae="NODE")
    assert not report.ok and not report.retryable
    assert report.error == (
        f"PEER@127.0.0.1:{no_ct.port} does not accept CT Image Storage at all (abstract syntax not "
        "supported): offered JPEG 2000 Image Compression (Lossless Only), Explicit VR Little Endian, "
        "Implicit VR Little Endian; accepted: none"
    )
    assert big_endian_only.received == no_ct.received == []


def test_a_syntax_with_no_fit_among_those_accepted_is_named_before_anything_is_sent(
    tmp_path: Path, peers: list[Peer]
) -> None:
    (j2k,) = _j2k_series(tmp_path, slices=1)
    # Only checked, never sent: the series stops before its first C-STORE.
    jls = OutputInstance("1.2.3.4", j2k.series_uid, CTImageStorage, JPEGLSLossless, j2k.path)
    peer = Peer([JPEGLSLossless]).start()
    peers.append(peer)

    report = send_series(peer.destination, [jls, j2k], calling_ae="NODE")

    assert not report.ok and not report.retryable
    assert report.error == (
        f"PEER@127.0.0.1:{peer.port} accepted none of the transfer syntaxes "
        "JPEG 2000 Image Compression (Lossless Only) CT Image Storage can be sent in: "
        "offered JPEG-LS Lossless Image Compression, JPEG 2000 Image Compression (Lossless Only), "
        "Explicit VR Little Endian, Implicit VR Little Endian; "
        "accepted: JPEG-LS Lossless Image Compression"
    )
    assert (report.sent, peer.received) == (0, [])


def test_a_release_that_never_completes_is_aborted_in_time() -> None:
    """pynetdicom's release can wait for ever for a reactor that will not pause; the sender
    bounds it and aborts (a fresh-clone CI run hung 10 minutes there)."""
    import threading
    import time as _time

    from dicom_node.delivery.sender import release_within

    class Stuck:
        is_established = True

        def __init__(self) -> None:
            self.aborted = threading.Event()

        def release(self) -> None:
            self.aborted.wait(30)  # as pynetdicom's pause loop: only an abort ends it

        def abort(self) -> None:
            self.aborted.set()

    stuck = Stuck()
    started = _time.monotonic()
    release_within(stuck, 0.3, "PACS@127.0.0.1:104")
    assert stuck.aborted.is_set() and _time.monotonic() - started < 2.0

    class Fine(Stuck):
        def release(self) -> None:
            self.released = True

    fine = Fine()
    release_within(fine, 5.0, "PACS@127.0.0.1:104")
    assert fine.released and not fine.aborted.is_set()
