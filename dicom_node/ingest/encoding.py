"""Decoding limits: a received data set must be encoded as its transfer syntax says, and a
deflated one may inflate only so far.

:func:`check_encoding` walks the element headers of the top level (and through every
undefined-length value, which has no other way to find its end) and confirms what the
negotiated transfer syntax promises: explicit VR means a valid two-letter VR in every
element header; an encapsulated (compressed) syntax means Pixel Data of undefined length
made of a Basic Offset Table item, fragment items and a sequence delimiter; a native syntax
means Pixel Data of defined length. Values are skipped, never decoded. A data set that is
merely cut short is not its business: the attribute walk in :mod:`dicom_node.ingest.instance`
names the element that lacks bytes.

:func:`inflate` undoes a deflated transfer syntax a step at a time (``zlib`` with
``max_length``) and refuses a data set once it grows past the configured limit, or past the
pixel bytes its image attributes declare plus :data:`INFLATE_MARGIN` — at the header of an
element that announces more than that, or else at that size: a deflate bomb is never inflated
beyond it, and what was inflated goes straight back to the system.

Both return a reason (their own words, tags and counts: never a value of the data set)
instead of raising; the caller decides what to answer.
"""

from __future__ import annotations

import mmap
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_ITEM_GROUP = 0xFFFE

#: VRs whose explicit header has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
_LONG_VRS = frozenset(vr.encode() for vr in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: VRs that may have undefined length: sequences, UN holding one, encapsulated pixel data.
_UNDEFINED_OK = frozenset((b"SQ", b"UN", b"OB", b"OW"))
#: Value Representations pydicom reads (PS3.5 6.2).
_KNOWN_VRS = frozenset(vr.value.encode() for vr in VR)

#: Deflated data sets (PS3.5 A.5): pydicom knows the first; the JPIP Referenced Deflate
#: syntaxes (JPEG 2000 and HTJ2K) deflate their data sets the same way.
DEFLATED_SYNTAXES = frozenset(
    (DeflatedExplicitVRLittleEndian, UID("1.2.840.10008.1.2.4.95"), UID("1.2.840.10008.1.2.4.205"))
)

MIB = 1024 * 1024
#: Room a deflated data set gets beyond the pixel bytes its image attributes declare: every
#: other element, sequences and private data included. A data set without image attributes
#: (a structured report, an encapsulated document) gets this much in all.
INFLATE_MARGIN = 32 * MIB
#: Inflated bytes produced per step; the limits are checked after each.
_INFLATE_STEP = 1 * MIB
#: Reserve no swap for the mapping the inflated bytes go to (Python has the name from 3.13).
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)
#: Element headers read, in all, looking for the image attributes of a deflated data set.
_SCAN_BUDGET = 100_000

_ROWS, _COLUMNS, _SAMPLES, _BITS, _FRAMES = 0x00280010, 0x00280011, 0x00280002, 0x00280100, 0x00280008
_IMAGE_GROUP_END = 0x0028FFFF


_Bytes = bytes | bytearray | memoryview


class _NotAsDeclared(Exception):
    """The bytes are not encoded as the transfer syntax says (the message is the reason)."""


class _CutShort(Exception):
    """The bytes end inside an element: a truncation, reported by the attribute walk."""


class _OverBudget(Exception):
    """A walk read more element headers than it was allowed."""


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Header(NamedTuple):
    tag: int
    vr: bytes | None
    length: int
    value_at: int


class _Reader:
    """Element headers of one byte string, in one byte order."""

    def __init__(self, buf: _Bytes, little_endian: bool) -> None:
        self.buf = buf
        self.size = len(buf)
        order = "<" if little_endian else ">"
        self._tag = struct.Struct(order + "HH")
        self._u16 = struct.Struct(order + "H")
        self._u32 = struct.Struct(order + "L")

    def header(self, at: int, explicit: bool) -> _Header:
        if at + 8 > self.size:
            raise _CutShort
        group, element = self._tag.unpack_from(self.buf, at)
        tag = group << 16 | element
        if group == _ITEM_GROUP or not explicit:  # items and delimiters have no VR
            return _Header(tag, None, self._u32.unpack_from(self.buf, at + 4)[0], at + 8)
        vr = bytes(self.buf[at + 4 : at + 6])
        # Two capital letters: one of PS3.5 Table 6.2-1 or a VR added since, which pydicom
        # (and so this walk) reads with a 16-bit length. Anything else is no VR at all.
        if not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B):
            raise _NotAsDeclared(f"element {_tag(tag)} has no valid VR")
        if vr in _LONG_VRS:
            if at + 12 > self.size:
                raise _CutShort
            return _Header(tag, vr, self._u32.unpack_from(self.buf, at + 8)[0], at + 12)
        return _Header(tag, vr, self._u16.unpack_from(self.buf, at + 6)[0], at + 8)

    def skip(self, head: _Header, explicit: bool) -> int:
        """Where the element ends; walks an undefined-length value to its delimiter."""
        if head.length != _UNDEFINED:
            end = head.value_at + head.length
            if end > self.size:
                raise _CutShort
            return end
        if head.tag >> 16 == _ITEM_GROUP:
            raise _NotAsDeclared(f"item tag {_tag(head.tag)} outside a sequence")
        if explicit and head.vr not in _UNDEFINED_OK:
            raise _NotAsDeclared(f"element {_tag(head.tag)} has undefined length but VR {head.vr.decode()}")  # type: ignore[union-attr]
        if head.vr in (b"OB", b"OW") or (not explicit and head.tag == _PIXEL_DATA):
            return self.fragments(head)[0]
        if head.vr == b"UN":  # PS3.5 6.2.2: its content is implicit VR little endian
            try:
                return self.sequence(head, explicit=False)
            except _NotAsDeclared:  # a known writer bug: an explicit VR sequence labelled UN
                return self.sequence(head, explicit=True)
        return self.sequence(head, explicit)

    def sequence(self, head: _Header, explicit: bool) -> int:
        at = head.value_at
        while True:
            item = self.header(at, explicit=False)
            if item.tag == _SEQUENCE_END:
                return item.value_at
            if item.tag != _ITEM:
                raise _NotAsDeclared(f"element {_tag(head.tag)} holds {_tag(item.tag)} where an item belongs")
            if item.length != _UNDEFINED:
                at = item.value_at + item.length
                if at > self.size:
                    raise _CutShort
                continue
            try:
                at = self.data_set(item.value_at, explicit, in_item=True)
            except _NotAsDeclared:
                if not explicit:
                    raise
                # Some writers put implicit VR items in an explicit VR data set; pydicom
                # reads them, and only the top level decides what the data set is.
                at = self.data_set(item.value_at, explicit=False, in_item=True)

    def data_set(self, at: int, explicit: bool, in_item: bool = False) -> int:
        """Walk elements from ``at`` to the end (or, in an item, to its delimiter)."""
        while at < self.size:
            head = self.header(at, explicit)
            if in_item and head.tag == _ITEM_END:
                return head.value_at
            at = self.skip(head, explicit)
        if in_item:
            raise _CutShort
        return at

    def fragments(self, head: _Header) -> tuple[int, int]:
        """Encapsulated pixel data: (end, number of items before the sequence delimiter)."""
        at, count = head.value_at, 0
        while True:
            item = self.header(at, explicit=False)
            if item.tag == _SEQUENCE_END:
                return item.value_at, count
            if item.tag != _ITEM:
                raise _NotAsDeclared(f"pixel data holds {_tag(item.tag)} where a fragment item belongs")
            if item.length == _UNDEFINED:
                raise _NotAsDeclared(f"pixel data item {count + 1} has undefined length")
            at = item.value_at + item.length
            if at > self.size:
                raise _CutShort
            count += 1


class _BudgetedReader(_Reader):
    """A reader that stops after reading ``budget`` element headers in all."""

    def __init__(self, buf: _Bytes, little_endian: bool, budget: int) -> None:
        super().__init__(buf, little_endian)
        self.budget = budget

    def header(self, at: int, explicit: bool) -> _Header:
        self.budget -= 1
        if self.budget < 0:
            raise _OverBudget
        return super().header(at, explicit)


def _check_pixel_data(reader: _Reader, head: _Header, ts: UID) -> None:
    if ts.is_encapsulated:
        if head.length != _UNDEFINED:
            raise _NotAsDeclared("native pixel data, the transfer syntax needs it encapsulated")
        first = reader.header(head.value_at, explicit=False)
        if first.tag != _ITEM:
            raise _NotAsDeclared("pixel data has no Basic Offset Table item")
        _end, items = reader.fragments(head)
        if items < 2:
            raise _NotAsDeclared("pixel data has no fragment after its Basic Offset Table")
    elif head.length == _UNDEFINED:
        raise _NotAsDeclared("encapsulated pixel data, the transfer syntax needs it native")


def _walk_top_level(body: _Bytes, ts: UID, explicit: bool) -> None:
    reader = _Reader(body, ts.is_little_endian)
    at = 0
    while at < reader.size:
        head = reader.header(at, explicit)
        if head.tag >> 16 == _ITEM_GROUP:
            raise _NotAsDeclared(f"item tag {_tag(head.tag)} outside a sequence")
        if head.tag == _PIXEL_DATA:
            _check_pixel_data(reader, head, ts)
        at = reader.skip(head, explicit)


def _reads_as(body: _Bytes, ts: UID, explicit: bool) -> bool:
    try:
        _walk_top_level(body, ts, explicit)
    except (_NotAsDeclared, _CutShort, struct.error):
        return False
    return True


@dataclass(frozen=True)
class EncodingMismatch:
    """Why a data set is not encoded as its transfer syntax says."""

    #: ``"not encoded as <syntax>: <detail>"``.
    reason: str
    #: The whole data set reads cleanly in the other VR encoding (implicit for explicit, or
    #: the reverse): the sender encoded it for another transfer syntax.
    reads_as_other_vr: bool = False


def check_encoding(body: _Bytes, transfer_syntax: str) -> EncodingMismatch | None:
    """Is ``body`` (a data set, inflated if it was deflated) encoded as ``transfer_syntax`` says?

    Returns
    -------
    None when it is, or when it is merely cut short (the attribute walk says where);
    otherwise the mismatch.
    """
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax:
        return None  # nothing to compare with: the attribute walk refuses it
    explicit = not ts.is_implicit_VR
    try:
        _walk_top_level(body, ts, explicit)
    except _NotAsDeclared as exc:
        detail = str(exc)
        if explicit and detail.endswith("has no valid VR") and _reads_as(body, ts, explicit=False):
            return EncodingMismatch(
                f"not encoded as {ts.name}: {detail}, the data set reads as implicit VR", True
            )
        return EncodingMismatch(f"not encoded as {ts.name}: {detail}")
    except _CutShort:
        # Explicit VR bytes on an implicit VR context read as absurd lengths.
        if not explicit and _reads_as(body, ts, explicit=True):
            return EncodingMismatch(
                f"not encoded as {ts.name}: explicit VR data set on an implicit VR context", True
            )
        return None
    return None


_HEADERS = {order + f: struct.Struct(order + f).unpack_from for order in "<>" for f in ("HHL", "HH2sH", "L")}


def plain_elements(body: _Bytes, transfer_syntax: str, wanted: frozenset[int]) -> dict[int, _Header] | None:
    """The headers of the ``wanted`` top-level elements, in one pass over a plain data set.

    A plain data set is the common case: a native (not encapsulated) transfer syntax, every
    top-level element of defined length with a known VR (explicit VR) and inside the bytes.
    Such a data set is encoded as its transfer syntax says (:func:`check_encoding` finds
    nothing), so the receiver reads it without walking it twice.

    Returns None for anything else (an undefined length, an unknown or invalid VR, an item
    tag at the top level, bytes cut short): then the general path decides, and words the
    reason.
    """
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax or ts.is_encapsulated:
        return None
    order = "<" if ts.is_little_endian else ">"
    size = len(body)
    found: dict[int, _Header] = {}
    at = 0
    # The element header read inline (this runs for every instance received).
    if ts.is_implicit_VR:
        implicit = _HEADERS[order + "HHL"]
        while at + 8 <= size:
            group, element, length = implicit(body, at)
            if length == _UNDEFINED or group == _ITEM_GROUP:
                return None
            value_at = at + 8
            at = value_at + length
            tag = group << 16 | element
            if tag in wanted:
                found[tag] = _Header(tag, None, length, value_at)
    else:
        explicit = _HEADERS[order + "HH2sH"]
        long_length = _HEADERS[order + "L"]
        while at + 8 <= size:
            group, element, vr, length = explicit(body, at)
            if vr not in _KNOWN_VRS or group == _ITEM_GROUP:
                return None
            if vr in _LONG_VRS:
                if at + 12 > size:
                    return None
                length = long_length(body, at + 8)[0]
                if length == _UNDEFINED:
                    return None
                value_at = at + 12
            else:
                value_at = at + 8
            at = value_at + length
            tag = group << 16 | element
            if tag in wanted:
                found[tag] = _Header(tag, vr, length, value_at)
    if at != size:  # cut short, or bytes left that hold no element header
        return None
    return found


# -- inflating ---------------------------------------------------------------------------------


class _DeclaredImage:
    """Reads the image attributes (group 0028) off the front of a growing explicit VR little
    endian data set, to bound how far the rest of it may inflate.

    ``promised`` is where the data set will end at least, going by the defined lengths of the
    element headers read so far (the first element past group 0028, Pixel Data in an image,
    included): an element announcing more bytes than the limit is refused at its header.

    An undefined-length sequence not yet inflated to its end is walked again from its start
    at the next step; all walks together read at most :data:`_SCAN_BUDGET` headers (a real
    data set has hundreds before its pixels). Past that, or on bytes that are not explicit
    VR, the reading stops and only the margin and the configured limit bound the inflating.
    """

    def __init__(self) -> None:
        self.promised = 0
        self._at = 0
        self._done = False
        self._budget = _SCAN_BUDGET
        self._values: dict[int, int] = {}

    @property
    def pixel_bytes(self) -> int:
        """Rows × Columns × Samples per Pixel × Bits Allocated / 8 × Number of Frames so far."""
        v = self._values
        rows, columns, bits = v.get(_ROWS, 0), v.get(_COLUMNS, 0), v.get(_BITS, 0)
        samples, frames = v.get(_SAMPLES, 1) or 1, v.get(_FRAMES, 1) or 1
        return (rows * columns * samples * frames * bits + 7) // 8

    def feed(self, buf: memoryview) -> None:
        if self._done:
            return
        reader = _BudgetedReader(buf, little_endian=True, budget=self._budget)
        try:
            while self._at < reader.size:
                head = reader.header(self._at, explicit=True)
                if head.length != _UNDEFINED:
                    self.promised = max(self.promised, head.value_at + head.length)
                if head.tag > _IMAGE_GROUP_END:  # past the image attributes (Pixel Data included)
                    self._done = True
                    return
                end = reader.skip(head, explicit=True)
                if head.tag in (_ROWS, _COLUMNS, _SAMPLES, _BITS) and head.length == 2:
                    self._values[head.tag] = struct.unpack_from("<H", buf, head.value_at)[0]
                elif head.tag == _FRAMES and 0 < head.length <= 16:
                    text = bytes(buf[head.value_at : end]).strip(b" \0")
                    self._values[_FRAMES] = int(text) if text.isdigit() else 1
                self._at = end
        except _CutShort:
            pass  # the rest of this element has not been inflated yet
        except (_NotAsDeclared, _OverBudget, struct.error):
            self._done = True  # not explicit VR (check_encoding will say so), or no end in sight
        finally:
            self._budget = reader.budget


@dataclass(frozen=True)
class InflateRefusal:
    """Why a deflated data set was not inflated; ``over_configured_limit``: it is larger than
    this node accepts (its own limit), rather than inconsistent with itself."""

    reason: str
    over_configured_limit: bool = False


def inflate(data: bytes, max_bytes: int) -> tuple[bytes | None, InflateRefusal | None]:
    """Inflate a deflated data set (raw deflate, PS3.5 A.5), refusing it once it grows past
    ``max_bytes`` or past the pixel bytes its image attributes declare plus :data:`INFLATE_MARGIN`.

    The inflated bytes go to an anonymous memory mapping as large as ``max_bytes``: only the
    pages written become resident, and closing the mapping hands them straight back to the
    system — a refused bomb leaves nothing behind in the allocator (a growing ``bytearray``
    left ~17 MB per bomb in glibc's per-thread arenas).

    Returns
    -------
    (inflated bytes, None), or (None, refusal).
    """
    try:
        space = mmap.mmap(-1, max_bytes + 1, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    except OSError:
        return None, InflateRefusal(
            f"deflated data set: no memory for the configured limit of {max_bytes / MIB:g} MB",
            over_configured_limit=True,
        )
    try:
        return _inflate_into(space, data, max_bytes)
    finally:
        try:
            space.close()
        except BufferError:  # a view outlived the walk (an exception's traceback): unmapped with it
            pass


def _inflate_into(
    space: mmap.mmap, data: bytes, max_bytes: int
) -> tuple[bytes | None, InflateRefusal | None]:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    declared = _DeclaredImage()
    size = 0
    pending = data
    with memoryview(space) as out:
        try:
            while not inflater.eof:
                limit = min(max_bytes, INFLATE_MARGIN + declared.pixel_bytes)
                # One byte past the limit shows an overrun without inflating further.
                chunk = inflater.decompress(pending, max(1, min(_INFLATE_STEP, limit - size + 1)))
                pending = inflater.unconsumed_tail
                if not chunk and not pending:
                    break  # all input used, and the stream has not ended
                out[size : size + len(chunk)] = chunk
                size += len(chunk)
                declared.feed(out[:size])
                limit = min(max_bytes, INFLATE_MARGIN + declared.pixel_bytes)
                if max(size, declared.promised) > limit:
                    return None, _overrun(limit, max_bytes, declared.pixel_bytes)
        except zlib.error:
            return None, InflateRefusal("cannot parse data set: the deflate stream is invalid")
        if not inflater.eof:
            return None, InflateRefusal("cannot parse data set: the deflate stream ends early")
        return bytes(out[:size]), None


def _overrun(limit: int, max_bytes: int, pixel_bytes: int) -> InflateRefusal:
    if limit >= max_bytes:
        return InflateRefusal(
            f"deflated data set inflates past the configured limit of {max_bytes / MIB:g} MB",
            over_configured_limit=True,
        )
    return InflateRefusal(
        f"deflated data set inflates past {limit} bytes: its image attributes declare "
        f"{pixel_bytes} pixel bytes, and the margin for the rest is {INFLATE_MARGIN / MIB:g} MB"
    )
