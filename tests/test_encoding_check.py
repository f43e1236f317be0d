"""dicom_node.ingest.encoding: the encoding check (is a data set encoded as its transfer
syntax says?) and the bounded inflate — on pydicom's bundled files, and on lies and bombs."""

from __future__ import annotations

import functools
import io
import statistics
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from dicom_node.ingest.encoding import (
    DEFLATED_SYNTAXES,
    INFLATE_MARGIN,
    MIB,
    check_encoding,
    inflate,
)
from dicom_node.ingest.instance import StoreStatus, check_instance
from dicom_node.ingest.part10 import split_part10
from dicom_node.ingest.receiver import error_comment

UNDEFINED = 0xFFFFFFFF
DEFAULT_LIMIT = 1024 * MIB


def bundled(name: str) -> tuple[str, bytes]:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} missing"
    meta, data = split_part10(Path(path).read_bytes())
    return str(meta.TransferSyntaxUID), data


def element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` overrides the value's."""
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, size) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, size) + value


def item(value: bytes, tag: int = 0xE000, length: int | None = None) -> bytes:
    return struct.pack("<HHL", 0xFFFE, tag, len(value) if length is None else length) + value


SEQUENCE_END = item(b"", 0xE0DD)


def ct(rows: int = 4, columns: int = 4, **attrs: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1500"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1501"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1502"
    ds.Modality = "CT"
    ds.PatientID = "ENC-1"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = bytes(rows * columns * 2)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return split_part10(buf.getvalue())[1]


def without_pixels(data: bytes) -> bytes:
    at = data.rfind(b"\xe0\x7f\x10\x00O")
    assert at > 0
    return data[:at]


def encapsulated(*items: bytes, header: bytes | None = None) -> bytes:
    head = header if header is not None else without_pixels(encode(ct()))
    return head + element(0x7FE00010, b"OB", b"".join(items), length=UNDEFINED)


def deflate(chunks: bytes | Iterator[bytes]) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [chunks] if isinstance(chunks, bytes) else chunks
    return b"".join([*(packer.compress(c) for c in parts), packer.flush()])


def zeros(total: int) -> Iterator[bytes]:
    block = bytes(MIB)
    for _ in range(total // MIB):
        yield block


def mismatch(data: bytes, ts: str) -> str:
    found = check_encoding(data, ts)
    assert found is not None, "the check found nothing wrong"
    return found.reason


# -- pydicom's bundled files: no false refusals -------------------------------------------------


@functools.cache
def readable_files() -> list[tuple[str, bool]]:
    """(path, pydicom found the other VR encoding) for every bundled file pydicom reads."""
    found = []
    for path in get_testdata_files():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = pydicom.dcmread(path)
                ds.file_meta.TransferSyntaxUID  # noqa: B018 - a file without meta is not one of ours
                for _elem in ds:  # read every top-level element, as a receiver would
                    pass
            except Exception:
                continue
        switched = any("Expected explicit VR, but found implicit VR" in str(w.message) for w in caught)
        found.append((path, switched))
    return found


def test_every_bundled_file_pydicom_reads_passes_under_its_own_transfer_syntax() -> None:
    checked = 0
    for path, switched in readable_files():
        if switched:
            continue
        meta, data = split_part10(Path(path).read_bytes())
        ts = str(meta.TransferSyntaxUID)
        if ts in DEFLATED_SYNTAXES:
            body, refused = inflate(data, DEFAULT_LIMIT)
            assert refused is None and body is not None, (path, refused)
            data = body
        assert check_encoding(data, ts) is None, (Path(path).name, check_encoding(data, ts))
        checked += 1
    assert checked >= 200, f"only {checked} bundled files were read"


def test_the_bundled_file_pydicom_reads_only_by_switching_vr_is_refused() -> None:
    """SC_rgb_jpeg.dcm (highdicom 0.1.0) says JPEG Baseline — explicit VR — and holds an
    implicit VR data set: pydicom warns and switches; a receiving tool that does not is lost."""
    switched = [Path(path).name for path, did in readable_files() if did]
    assert switched == ["SC_rgb_jpeg.dcm"]
    ts, data = bundled("SC_rgb_jpeg.dcm")
    found = check_encoding(data, ts)
    assert found is not None and found.reads_as_other_vr
    assert error_comment(found.reason) == "implicit VR data set on an explicit VR context"


# -- lies about the encoding ------------------------------------------------------------------------


def test_implicit_vr_bytes_on_an_explicit_vr_context() -> None:
    _ts, data = bundled("MR_small_implicit.dcm")
    reason = mismatch(data, ExplicitVRLittleEndian)
    assert reason == (
        "not encoded as Explicit VR Little Endian: element (0008,0008) has no valid VR, "
        "the data set reads as implicit VR"
    )
    facts, rejection = check_instance(data, ExplicitVRLittleEndian)
    assert facts is None and rejection is not None
    assert (rejection.status, rejection.reason) == (StoreStatus.CANNOT_UNDERSTAND, reason)
    assert error_comment(reason) == "implicit VR data set on an explicit VR context"


def test_explicit_vr_bytes_on_an_implicit_vr_context() -> None:
    _ts, data = bundled("MR_small.dcm")
    reason = mismatch(data, ImplicitVRLittleEndian)
    assert (
        reason == "not encoded as Implicit VR Little Endian: explicit VR data set on an implicit VR context"
    )
    # pydicom cannot walk it at all; the reason says why rather than "truncated".
    facts, rejection = check_instance(data, ImplicitVRLittleEndian)
    assert facts is None and rejection is not None and rejection.reason == reason


@pytest.mark.parametrize("ts", [JPEGBaseline8Bit, JPEG2000Lossless, RLELossless])
def test_native_pixels_on_an_encapsulated_context(ts: str) -> None:
    data = encode(ct())
    reason = mismatch(data, ts)
    assert reason.endswith(": native pixel data, the transfer syntax needs it encapsulated")
    facts, rejection = check_instance(data, ts)
    assert facts is None and rejection is not None and rejection.status == StoreStatus.CANNOT_UNDERSTAND
    assert error_comment(reason) == "native pixel data, the transfer syntax needs it encapsulated"


def test_encapsulated_pixels_on_a_native_context() -> None:
    _ts, data = bundled("JPEG2000.dcm")
    reason = mismatch(data, ExplicitVRLittleEndian)
    assert error_comment(reason) == "encapsulated pixel data, the transfer syntax needs it native"


@pytest.mark.parametrize(
    ("items", "comment"),
    [
        ((SEQUENCE_END,), "pixel data has no Basic Offset Table item"),
        ((item(b""), SEQUENCE_END), "pixel data has no fragment after its Basic Offset Table"),
        (
            (item(b""), item(b"\xff\xd8", length=UNDEFINED), SEQUENCE_END),
            "pixel data item 2 has undefined length",
        ),
        (
            (item(b""), element(0x00080008, b"CS", b"AB"), SEQUENCE_END),
            "pixel data holds (0008,0008) where a fragment item belongs",
        ),
    ],
    ids=["no-offset-table", "no-fragment", "undefined-fragment", "not-an-item"],
)
def test_malformed_encapsulation(items: tuple[bytes, ...], comment: str) -> None:
    reason = mismatch(encapsulated(*items), JPEGBaseline8Bit)
    assert error_comment(reason) == comment


def test_well_formed_encapsulation_passes_with_and_without_an_offset_table() -> None:
    fragment = b"\xff\xd8" + bytes(30) + b"\xff\xd9"
    assert check_encoding(encapsulated(item(b""), item(fragment), SEQUENCE_END), JPEGBaseline8Bit) is None
    table = struct.pack("<2L", 0, 42)
    two = encapsulated(item(table), item(fragment), item(fragment), SEQUENCE_END)
    assert check_encoding(two, JPEGBaseline8Bit) is None


def test_structural_lies_inside_an_explicit_data_set() -> None:
    head = without_pixels(encode(ct()))
    undefined_text = head + element(0x00204000, b"UT", b"", length=UNDEFINED) + SEQUENCE_END
    assert error_comment(mismatch(undefined_text, ExplicitVRLittleEndian)) == (
        "element (0020,4000) has undefined length but VR UT"
    )
    stray_item = head + item(b"abcd")
    assert (
        error_comment(mismatch(stray_item, ExplicitVRLittleEndian))
        == "item tag (FFFE,E000) outside a sequence"
    )
    bad_sequence = (
        head + element(0x00081140, b"SQ", b"", length=UNDEFINED) + element(0x00080008, b"CS", b"AB")
    )
    assert error_comment(mismatch(bad_sequence, ExplicitVRLittleEndian)) == (
        "element (0008,1140) holds (0008,0008) where an item belongs"
    )
    no_vr = head + b"\x09\x00\x10\x00\x01\x02\x04\x00ABCD"
    assert (
        error_comment(mismatch(no_vr, ExplicitVRLittleEndian))
        == "not explicit VR: element (0009,0010) has no valid VR"
    )


def test_a_vr_added_after_this_code_is_not_a_mismatch() -> None:
    """Two capital letters are a VR (pydicom reads an unknown one with a 16-bit length)."""
    data = without_pixels(encode(ct())) + element(0x00091010, b"ZZ", b"ABCD")
    assert check_encoding(data, ExplicitVRLittleEndian) is None


def test_a_cut_data_set_is_left_to_the_attribute_walk() -> None:
    data = encode(ct())
    assert check_encoding(data[:-10], ExplicitVRLittleEndian) is None
    _facts, rejection = check_instance(data[:-10], ExplicitVRLittleEndian)
    assert rejection is not None and "needs 10 more bytes" in rejection.reason


def test_big_endian_and_nested_sequences_walk() -> None:
    ts, data = bundled("MR_small_bigendian.dcm")
    assert ts == ExplicitVRBigEndian and check_encoding(data, ts) is None
    ds = ct()
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3"
    ds.ReferencedImageSequence = [inner, inner]
    for seq_ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        encoded = encode(ds, seq_ts)
        assert check_encoding(encoded, seq_ts) is None


# -- the bounded inflate ------------------------------------------------------------------------------


def test_inflate_gives_back_exactly_what_was_deflated() -> None:
    _ts, data = bundled("image_dfl.dcm")
    body, refused = inflate(data, DEFAULT_LIMIT)
    assert refused is None and body == zlib.decompress(data, -zlib.MAX_WBITS)


def _peak_allocated(run: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        result = run()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_pixel_bomb_is_refused_at_its_pixel_data_header() -> None:
    """512x512x16 bit declared, 200 MiB of pixels: refused before they are inflated."""
    head = without_pixels(encode(ct(512, 512)))
    bomb = deflate(iter([head + element(0x7FE00010, b"OW", b"", length=200 * MIB), *zeros(200 * MIB)]))
    assert len(bomb) < 256 * 1024
    (body, refused), peak = _peak_allocated(lambda: inflate(bomb, DEFAULT_LIMIT))
    assert body is None and refused is not None and not refused.over_configured_limit
    assert error_comment(refused.reason) == "deflated data set inflates past its declared size"
    assert f"declare {512 * 512 * 2} pixel bytes" in refused.reason
    assert peak < 8 * MIB, f"the bomb occupied {peak / MIB:.1f} MiB"


def test_a_bomb_without_lengths_is_refused_at_the_margin() -> None:
    """An undefined-length sequence of tiny elements announces no size: the margin holds."""
    head = element(0x00081140, b"SQ", b"", length=UNDEFINED) + item(b"", length=UNDEFINED)
    unit = element(0x00081150, b"UI", b"1.2\0") * 8192
    bomb = deflate(iter([head, *(unit for _ in range((INFLATE_MARGIN + 16 * MIB) // len(unit)))]))
    (body, refused), peak = _peak_allocated(lambda: inflate(bomb, DEFAULT_LIMIT))
    assert body is None and refused is not None
    assert refused.reason.startswith(f"deflated data set inflates past {INFLATE_MARGIN} bytes")
    # The inflated bytes live in a memory mapping tracemalloc does not see; what it sees is
    # the working set of one step.
    assert peak < 8 * MIB


def test_the_configured_limit_answers_out_of_resources() -> None:
    """A consistent 1024x1024x16 bit, 3-frame image (6 MiB) against a 4 MiB limit."""
    big = encode(ct(1024, 1024, NumberOfFrames="3", PixelData=bytes(1024 * 1024 * 2 * 3)))
    data = deflate(big)
    body, refused = inflate(data, 4 * MIB)
    assert body is None and refused is not None and refused.over_configured_limit
    assert refused.reason == "deflated data set inflates past the configured limit of 4 MB"
    facts, rejection = check_instance(data, DeflatedExplicitVRLittleEndian, max_inflated_bytes=4 * MIB)
    assert facts is None and rejection is not None
    assert (rejection.status, rejection.reason) == (StoreStatus.OUT_OF_RESOURCES, refused.reason)
    assert error_comment(rejection.reason) == refused.reason
    # Under the default limit the same instance is fine: 6 MiB of declared pixels.
    facts, rejection = check_instance(data, DeflatedExplicitVRLittleEndian)
    assert rejection is None and facts is not None and facts.sop_instance_uid.endswith(".1500")


def test_a_large_non_image_data_set_inflates_within_the_margin() -> None:
    ds = ct()
    del ds.PixelData, ds.Rows, ds.Columns
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "OB", bytes(INFLATE_MARGIN // 2))
    data = deflate(encode(ds))
    body, refused = inflate(data, DEFAULT_LIMIT)
    assert refused is None and body is not None and len(body) > INFLATE_MARGIN // 2


@pytest.mark.parametrize(
    ("mangle", "comment"),
    [
        (lambda d: d[: len(d) // 2], "cannot parse data set: the deflate stream ends early"),
        (lambda d: b"\xff" * 64 + d, "cannot parse data set: the deflate stream is invalid"),
    ],
    ids=["cut", "garbage"],
)
def test_broken_deflate_streams(mangle: Any, comment: str) -> None:
    _ts, data = bundled("image_dfl.dcm")
    body, refused = inflate(mangle(data), DEFAULT_LIMIT)
    assert body is None and refused is not None and refused.reason == comment
    assert error_comment(comment) == comment


# -- cost --------------------------------------------------------------------------------------------


def test_the_check_costs_well_under_a_millisecond_per_512x512_ct() -> None:
    data = encode(ct(512, 512, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], Manufacturer="ACME"))
    timings = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(100):
            assert check_encoding(data, ExplicitVRLittleEndian) is None
        timings.append((time.perf_counter() - started) / 100)
    cost = statistics.median(timings)
    assert cost < 0.5e-3, f"check_encoding took {cost * 1e6:.0f} µs per instance"
