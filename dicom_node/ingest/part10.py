"""The DICOM Part 10 file meta header this node writes in front of received data sets.

Written by hand because it sits on the C-STORE hot path: pydicom's general writer takes
~0.4 ms for these eight elements, this takes ~10 µs. The output is byte-for-byte what
``pydicom.filewriter.write_file_meta_info(enforce_standard=True)`` produces (tested).
"""

from __future__ import annotations

import io
import struct

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble

from dicom_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

PREAMBLE = b"\x00" * 128 + b"DICM"
_VERSION = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"


def _short(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


#: Private Information (0002,0102) of a stored instance the node retrieved from an archive
#: (a prior): this prefix + the archive's name. Private Information Creator UID (0002,0100)
#: is the node's implementation class UID. It keeps the instance a prior when the index is
#: rebuilt from the files (``InstanceStore.reconcile``) after a crash.
PRIOR_MARK = b"dicom-node prior from "


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    source_ae: str | None = None,
    retrieved_from: str | None = None,
) -> bytes:
    """Preamble, ``DICM`` and the group 0002 elements, explicit VR little endian
    (``retrieved_from``: the archive a prior came from, see :data:`PRIOR_MARK`)."""
    private = b""
    if retrieved_from:
        mark = PRIOR_MARK + retrieved_from.encode("utf-8", "replace")
        if len(mark) % 2:
            mark += b"\x00"
        private = (
            _short(0x0100, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00")
            + struct.pack("<HH2sHI", 0x0002, 0x0102, b"OB", 0, len(mark))
            + mark
        )
    body = b"".join(
        (
            _VERSION,
            _short(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00"),
            _short(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\x00"),
            _short(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
            _short(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00"),
            _short(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" "),
            _short(0x0016, b"AE", source_ae.encode("ascii", "replace"), b" ") if source_ae else b"",
            private,
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return PREAMBLE + group_length + body


def split_part10(raw: bytes) -> tuple[FileMetaDataset, bytes]:
    """Split a Part 10 file into its file meta and the data set bytes."""
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return meta, raw[fp.tell() :]


def retrieved_from(meta: FileMetaDataset) -> str | None:
    """The archive a stored file was retrieved from (its :data:`PRIOR_MARK`), or None."""
    if str(meta.get("PrivateInformationCreatorUID", "")) != IMPLEMENTATION_CLASS_UID:
        return None
    value = bytes(meta.get("PrivateInformation", b"") or b"").rstrip(b"\x00")
    if not value.startswith(PRIOR_MARK):
        return None
    return value[len(PRIOR_MARK) :].decode("utf-8", "replace")
