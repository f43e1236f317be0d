"""Storage Commitment Push Model (PS3.4 Annex J), the SCU's side of the wire.

The node asks a peer to commit to instances it sent with an N-ACTION (Action Type 1)
carrying a Transaction UID and the Referenced SOP Sequence; the peer answers later with
an N-EVENT-REPORT (Event Type 1: all committed; 2: failures exist) carrying the same
Transaction UID, the committed instances and the Failed SOP Sequence with a reason per
instance. The report may come on the association of the request or, usually, on a new
association the peer opens to this node; both arrive here as a :class:`CommitmentReport`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

#: The SOP Class, and its well-known SOP Instance that every request and report names.
PUSH_MODEL = UID(str(StorageCommitmentPushModel))
PUSH_MODEL_INSTANCE = UID("1.2.840.10008.1.20.1.1")
ACTION_REQUEST_COMMITMENT = 1
EVENT_ALL_COMMITTED, EVENT_FAILURES_EXIST = 1, 2

#: PS3.3 C.14.1.1 Failure Reason.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class/instance conflict",
    0x0131: "duplicate transaction UID",
}


class ReportStatus(IntEnum):
    """What the node answers an N-EVENT-REPORT with."""

    SUCCESS = 0x0000
    #: Not a result the node can use: unknown transaction, wrong peer, malformed report.
    PROCESSING_FAILURE = 0x0110


class CommitmentReportError(ValueError):
    """An N-EVENT-REPORT that is not a usable storage commitment result."""


@dataclass(frozen=True)
class Failure:
    sop_class_uid: str
    sop_uid: str
    reason: int | None

    @property
    def reason_text(self) -> str:
        if self.reason is None:
            return "no reason given"
        return FAILURE_REASONS.get(self.reason, "unknown reason") + f" (0x{self.reason:04X})"


@dataclass(frozen=True)
class CommitmentReport:
    """One storage commitment result as the peer sent it."""

    transaction_uid: str
    event_type: int
    #: (SOP Class UID, SOP Instance UID) the peer commits to.
    committed: tuple[tuple[str, str], ...]
    failed: tuple[Failure, ...]


def action_information(transaction_uid: str, references: Iterable[tuple[str, str]]) -> Dataset:
    """The N-ACTION's Action Information: Transaction UID and Referenced SOP Sequence."""
    info = Dataset()
    info.TransactionUID = transaction_uid
    items = []
    for sop_class_uid, sop_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    info.ReferencedSOPSequence = items
    return info


def parse_event_report(event_type: int | None, info: Dataset | None) -> CommitmentReport:
    """The storage commitment result in an N-EVENT-REPORT's Event Information.

    Raises
    ------
    CommitmentReportError
        The report lacks a Transaction UID, has an event type other than 1 or 2, or holds
        a value that cannot be decoded (a Failure Reason that is not one number, a
        sequence item that is not a data set, …).
    """
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_FAILURES_EXIST):
        raise CommitmentReportError(f"event type {event_type} is not a storage commitment result (1 or 2)")
    try:
        if info is None or not info.get("TransactionUID"):
            raise CommitmentReportError("the report has no Transaction UID")
        committed = tuple(
            (str(item.get("ReferencedSOPClassUID", "")), str(item.get("ReferencedSOPInstanceUID", "")))
            for item in info.get("ReferencedSOPSequence", [])
        )
        failed = tuple(
            Failure(
                str(item.get("ReferencedSOPClassUID", "")),
                str(item.get("ReferencedSOPInstanceUID", "")),
                _failure_reason(item),
            )
            for item in info.get("FailedSOPSequence", [])
        )
        return CommitmentReport(str(info.TransactionUID), int(event_type), committed, failed)
    except CommitmentReportError:
        raise
    except Exception as exc:  # pydicom raises what it likes on a malformed element
        raise CommitmentReportError(f"the report cannot be decoded: {exc}") from exc


def _failure_reason(item: Dataset) -> int | None:
    """A Failed SOP Sequence item's Failure Reason (None: not given)."""
    value = item.get("FailureReason")
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise CommitmentReportError(
            f"Failure Reason {value!r} of instance {item.get('ReferencedSOPInstanceUID', '?')} "
            "is not one 16-bit value"
        )
    return int(value)
