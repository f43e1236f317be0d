"""Transcoding on send, against dcmtk's storescp: a JPEG 2000 series reaches a peer that
accepts only uncompressed syntaxes decoded, pixel for pixel; a peer that accepts it as
stored gets it as stored; a peer that accepts nothing we offer gets an error naming the
syntaxes offered and accepted — not a hint at its AE title."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from dicom_node.config import Destination
from dicom_node.delivery.sender import send_series
from pipelines.base import OutputInstance
from tests.conftest import require
from tests.peers import STORESCP, DcmtkStoreSCP

pytestmark = pytest.mark.integration

SLICES = 4
J2K = "JPEG 2000 Image Compression (Lossless Only)"
StartSCP = Callable[..., DcmtkStoreSCP]

#: A storescp that takes CT in JPEG Baseline only: a syntax the sender never offers.
JPEG_BASELINE_ONLY = r"""
[[TransferSyntaxes]]
[JPEGBaselineOnly]
TransferSyntax1 = JPEGBaseline
[[PresentationContexts]]
[CTInJPEGBaseline]
PresentationContext1 = CTImageStorage\JPEGBaselineOnly
[[Profiles]]
[JPEGBaselineOnly]
PresentationContexts = CTInJPEGBaseline
"""


@pytest.fixture
def j2k_series(tmp_path: Path) -> list[OutputInstance]:
    """The simulator's CT series, compressed by pydicom (pylibjpeg-openjpeg) to JPEG 2000."""
    from dicom_node.lab.simulate import write_ct_series
    from models.sim.phantom import PhantomSpec

    sim = write_ct_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=SLICES, seed=13))
    out = []
    for path in sim.files:
        ds = dcmread(path)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        target = tmp_path / "j2k" / path.name
        target.parent.mkdir(exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        out.append(
            OutputInstance(ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, JPEG2000Lossless, target)
        )
    return out


@pytest.fixture
def start_storescp(tmp_path: Path) -> Iterator[StartSCP]:
    require(STORESCP)
    started: list[DcmtkStoreSCP] = []

    def start(*extra_args: str) -> DcmtkStoreSCP:
        scp = DcmtkStoreSCP(tmp_path / f"peer{len(started)}", extra_args=extra_args).start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def _to(scp: DcmtkStoreSCP) -> Destination:
    return Destination(ae_title=scp.aet, host="127.0.0.1", port=scp.port, timeout_seconds=15)


def _received(scp: DcmtkStoreSCP) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.dir.iterdir()}


@pytest.mark.parametrize(
    ("storescp_args", "wire"),
    [((), ExplicitVRLittleEndian), (("+xi",), ImplicitVRLittleEndian)],
    ids=["uncompressed-default", "implicit-only"],
)
def test_jpeg2000_reaches_an_uncompressed_only_peer_decoded(
    j2k_series: list[OutputInstance], start_storescp: StartSCP, storescp_args: tuple[str, ...], wire: UID
) -> None:
    scp = start_storescp(*storescp_args)

    report = send_series(_to(scp), j2k_series, calling_ae="DICOM_NODE")

    assert report.ok, report.error
    assert report.sent == SLICES
    assert report.transcoding_note == f"transcoded from {J2K} to {wire.name} for {SLICES} instance(s)"
    received = _received(scp)
    assert sorted(received) == sorted(f.sop_uid for f in j2k_series)  # the same instances
    for f in j2k_series:
        original, got = dcmread(f.path), dcmread(received[f.sop_uid])
        assert got.file_meta.TransferSyntaxUID == wire
        assert got.PhotometricInterpretation == "MONOCHROME2"
        assert got.SeriesInstanceUID == original.SeriesInstanceUID
        assert np.array_equal(got.pixel_array, original.pixel_array)


def test_a_peer_that_accepts_jpeg2000_gets_it_as_stored(
    j2k_series: list[OutputInstance], start_storescp: StartSCP
) -> None:
    scp = start_storescp("+xa")  # accepts the fallback too

    report = send_series(_to(scp), j2k_series, calling_ae="DICOM_NODE")

    assert report.ok, report.error
    assert (report.sent, report.transcoding_note) == (SLICES, None)
    received = _received(scp)
    for f in j2k_series:
        got = dcmread(received[f.sop_uid])
        assert got.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert got.PixelData == dcmread(f.path).PixelData  # the codestream, untouched


def test_a_peer_that_accepts_nothing_offered_is_told_by_its_syntaxes(
    j2k_series: list[OutputInstance], start_storescp: StartSCP, tmp_path: Path
) -> None:
    config = tmp_path / "jpeg-baseline-only.cfg"
    config.write_text(JPEG_BASELINE_ONLY)
    scp = start_storescp("-xf", str(config), "JPEGBaselineOnly")

    report = send_series(_to(scp), j2k_series, calling_ae="DICOM_NODE")

    assert not report.ok
    assert not report.retryable  # a configuration problem: retrying will not help
    assert report.error == (
        f"STORESCP@127.0.0.1:{scp.port} accepted none of the transfer syntaxes offered for "
        f"CT Image Storage: offered {J2K}, Explicit VR Little Endian, Implicit VR Little Endian; "
        "accepted: none"
    )
    assert "AE title" not in report.error
    assert report.sent == 0 and _received(scp) == {}
