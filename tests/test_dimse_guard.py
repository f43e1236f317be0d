"""dicom_node.net.dimse_guard: a plain C-STORE request's primitive, built in one pass, is
the primitive the general (lenient, defect-recording) path builds."""

from __future__ import annotations

import io
import struct
from typing import Any

import pytest
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pynetdicom.dimse_messages import C_STORE_RQ

from dicom_node.net import dimse_guard
from dicom_node.net.dimse_guard import _plain_store_primitive, _to_primitive, command_defect

CT = "1.2.840.10008.5.1.4.1.1.2"
SOP = "1.2.826.0.1.3680043.8.498.1234567890.12"


def command(**values: Any) -> bytes:
    """An implicit VR little endian C-STORE-RQ command set, encoded by hand so that it can
    be wrong: a None value leaves the element out, bytes go in as they are, a str is padded
    with a null (UI) or a space (AE) to even length, an int is one US value."""
    fields = {
        "AffectedSOPClassUID": CT,
        "CommandField": 0x0001,
        "MessageID": 7,
        "Priority": 0,
        "CommandDataSetType": 0x0000,
        "AffectedSOPInstanceUID": SOP,
        **values,
    }
    elements = []
    for keyword, value in fields.items():
        if value is None:
            continue
        if isinstance(value, int):
            raw = struct.pack("<H", value)
        elif isinstance(value, str):
            raw = value.encode("latin-1")
            if len(raw) % 2:
                raw += b" " if keyword.endswith("Title") else b"\0"
        else:
            raw = value
        elements.append((int(Tag(keyword)), raw))
    body = b"".join(
        struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(raw)) + raw for tag, raw in sorted(elements)
    )
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


#: Read before the primitive is built (pynetdicom's decoder, the staging hook): pydicom
#: then holds them converted, the others still raw.
READ_EARLY = ("CommandField", "CommandDataSetType", "AffectedSOPClassUID", "AffectedSOPInstanceUID")


def message(raw: bytes, read_early: bool = True) -> C_STORE_RQ:
    msg = C_STORE_RQ()
    msg.command_set = read_dataset(io.BytesIO(raw), True, True)
    if read_early:
        for keyword in READ_EARLY:
            try:
                getattr(msg.command_set, keyword, None)
            except Exception:
                pass  # what cannot be converted stays raw
    msg.data_set = io.BytesIO(b"data set")
    msg.context_id = 3
    return msg


def view(primitive: Any, msg: C_STORE_RQ) -> tuple[Any, ...]:
    defect = command_defect(primitive)
    return (
        type(primitive).__name__,
        primitive.MessageID,
        primitive.AffectedSOPClassUID,
        primitive.AffectedSOPInstanceUID,
        primitive.Priority,
        primitive.MoveOriginatorApplicationEntityTitle,
        primitive.MoveOriginatorMessageID,
        primitive.DataSet is msg.data_set,
        primitive._context_id,
        None if defect is None else (defect.reason, defect.claimed_sop_uid, defect.invalid_sop_instance_uid),
    )


def outcome(raw: bytes, read_early: bool) -> Any:
    """The primitive's view, or the exception building it raises (the DIMSE layer then
    aborts the association)."""
    msg = message(raw, read_early)
    try:
        return view(_to_primitive(msg), msg)
    except Exception as exc:
        return ("raises", type(exc).__name__)


def both(raw: bytes, monkeypatch: pytest.MonkeyPatch, read_early: bool = True) -> tuple[Any, Any]:
    plain = outcome(raw, read_early)
    with monkeypatch.context() as m:
        m.setattr(dimse_guard, "_PLAIN_REQUESTS", False)
        general = outcome(raw, read_early)
    return plain, general


PLAIN = {
    "plain": {},
    "odd-length UID padded with a null": {"AffectedSOPInstanceUID": SOP + "3"},
    "highest message id, low priority": {"MessageID": 0xFFFF, "Priority": 2},
    "message id 0": {"MessageID": 0},
    "UID padded with a space": {"AffectedSOPInstanceUID": (SOP + " ").encode()},
    # pynetdicom's setters take these; the data set's own UIDs are checked when it is stored
    "a UID with letters": {"AffectedSOPInstanceUID": "1.2.abc"},
    "a UID with a leading zero": {"AffectedSOPClassUID": "1.02.3"},
}
OTHERS = {
    "no Affected SOP Instance UID": {"AffectedSOPInstanceUID": None},
    "no Affected SOP Class UID": {"AffectedSOPClassUID": None},
    "no Message ID": {"MessageID": None},
    "no Priority": {"Priority": None},
    "a priority outside 0-2": {"Priority": 7},
    "no Command Data Set Type": {"CommandDataSetType": None},
    "no data set announced": {"CommandDataSetType": 0x0101},
    "empty Affected SOP Instance UID": {"AffectedSOPInstanceUID": b""},
    "a UID over 64 characters": {"AffectedSOPInstanceUID": "1.2." + "3" * 70},
    "a UID that is not ASCII": {"AffectedSOPInstanceUID": "1.2.3\xe9".encode("latin-1")},
    "two UIDs": {"AffectedSOPInstanceUID": b"1.2.3\\1.2.4"},
    "Message ID of two values": {"MessageID": b"\x01\x00\x02\x00"},
    "Message ID of one byte": {"MessageID": b"\x01"},
    "a move originator": {"MoveOriginatorApplicationEntityTitle": "PACS", "MoveOriginatorMessageID": 3},
    "a move originator title too long": {"MoveOriginatorApplicationEntityTitle": b"A" * 20},
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the invalid values written
@pytest.mark.parametrize("read_early", [True, False], ids=["some read early", "all raw"])
@pytest.mark.parametrize("case", sorted(PLAIN) + sorted(OTHERS))
def test_plain_and_general_path_build_the_same_primitive(
    case: str, read_early: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = command(**{**PLAIN, **OTHERS}[case])
    plain, general = both(raw, monkeypatch, read_early)
    assert plain == general
    try:
        taken = _plain_store_primitive(message(raw, read_early)) is not None
    except Exception:
        taken = False
    assert taken is (case in PLAIN)  # the cases the one pass is for, and only those


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flipped_bytes_in_a_command_set_change_nothing_but_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    raw = command()
    rng = random.Random(20261206)
    compared = taken = 0
    for _ in range(600):
        at = rng.randrange(len(raw))
        mutant = raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1 :]
        try:
            read_dataset(io.BytesIO(mutant), True, True)
        except Exception:
            continue  # pydicom cannot decode it: the DIMSE layer aborts before any primitive
        plain, general = both(mutant, monkeypatch)
        assert plain == general
        compared += 1
        try:
            taken += _plain_store_primitive(message(mutant)) is not None
        except Exception:
            pass
    assert compared > 300 and taken > 50, (compared, taken)
