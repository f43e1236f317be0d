"""Is a re-sent instance the same content in another encoding?

Two data sets under one SOP Instance UID whose bytes differ may still be the same
instance: a PACS or a scanner re-sends it in another transfer syntax (implicit instead of
explicit VR, JPEG-LS or JPEG 2000 lossless instead of native pixels, deflated...). The
node compares what the bytes *mean*: every attribute's value (the Pixel Data encoding and
its offset tables aside) and the decoded pixel values, decompressed by pydicom's
plugins. Equal content is a duplicate, not a version; anything that cannot be decoded
counts as different (a version is kept, never a change hidden).
"""

from __future__ import annotations

import io
import logging
import zlib
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

log = logging.getLogger(__name__)

_PIXEL_GROUP = 0x7FE0
_PIXEL_DATA = 0x7FE00010
_ENCODING_ONLY = frozenset(
    {
        0x7FE00001,  # Extended Offset Table
        0x7FE00002,  # Extended Offset Table Lengths
        0xFFFCFFFC,  # Data Set Trailing Padding
    }
)


def _read(data: bytes, transfer_syntax: str) -> Dataset:
    ts = UID(transfer_syntax)
    body = zlib.decompress(data, -zlib.MAX_WBITS) if ts.is_deflated else data
    ds = read_dataset(io.BytesIO(body), ts.is_implicit_VR, ts.is_little_endian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    if ts.is_compressed and _PIXEL_DATA in ds:
        # Native pixels, and the attributes that go with them (Photometric Interpretation
        # of a lossless colour J2K, Planar Configuration) as a native encoding has them.
        ds.decompress(generate_instance_uid=False)
    return ds


def _values(ds: Dataset) -> dict[str, Any]:
    """Attribute values by tag, without their VRs (implicit and explicit VR read alike)."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "vr"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    kept = Dataset()
    for elem in ds:
        if elem.tag in _ENCODING_ONLY or elem.tag == _PIXEL_DATA:
            continue
        kept.add(elem)
    return strip(kept.to_json_dict(bulk_data_threshold=1 << 62))


def same_content(old: bytes, old_syntax: str, new: bytes, new_syntax: str) -> bool:
    """True when both encodings carry the same attributes and the same decoded pixels."""
    try:
        a, b = _read(old, old_syntax), _read(new, new_syntax)
        if _values(a) != _values(b):
            return False
        if (_PIXEL_DATA in a) != (_PIXEL_DATA in b):
            return False
        if _PIXEL_DATA not in a:
            return True
        pa, pb = a.pixel_array, b.pixel_array
        # kind and size, not byte order: a big endian re-send decodes to ">i2"
        same_type = pa.dtype.kind == pb.dtype.kind and pa.dtype.itemsize == pb.dtype.itemsize
        return bool(pa.shape == pb.shape and same_type and np.array_equal(pa, pb))
    except Exception as exc:  # an undecodable side: keep the new bytes as a version
        # The exception text may quote attribute values: name its type only.
        log.info("content comparison not possible (%s); treating as a new version", type(exc).__name__)
        return False
