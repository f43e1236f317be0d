"""C-STORE SCU: send one series to one destination in one association.

Presentation contexts are built from what is being sent: one per SOP class, proposing the
stored transfer syntax first (and the uncompressed ones as alternatives when it is itself
uncompressed). Files are streamed from disk unchanged when the stored transfer syntax is
accepted. Failures are classified: *retryable* (peer down, timeouts, transient rejection,
out of resources) or *permanent* (rejected permanently, no usable presentation context,
the peer refuses the data), so the outbox retries only what can succeed later.

When the destination does storage commitment, the N-ACTION follows the last C-STORE on
the same association, which then stays open a moment for a report on it (most peers,
Orthanc among them, report on a new association to the node's receiver instead).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from dicom_node.config import Destination
from dicom_node.net.commitment import (
    ACTION_REQUEST_COMMITMENT,
    PUSH_MODEL,
    PUSH_MODEL_INSTANCE,
    CommitmentReport,
    CommitmentReportError,
    ReportStatus,
    action_information,
    parse_event_report,
)
from dicom_node.net.tuning import on_connection_open, tune_pynetdicom
from pipelines.base import OutputInstance

log = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128
#: N-ACTION statuses no retry will change: not authorised, no such SOP class / action.
_PERMANENT_ACTION_STATUSES = (0x0124, 0x0118, 0x0123)


@dataclass(frozen=True)
class CommitmentRequest:
    """Ask the peer to commit to the series once it is sent (Storage Commitment Push Model)."""

    transaction_uid: str
    #: Records a report that arrives on this association; returns the N-EVENT-REPORT status.
    on_report: Callable[[CommitmentReport], int]
    #: Called just before the N-ACTION goes out (record the transaction first: the
    #: peer may answer on another association before the N-ACTION response is read).
    before_request: Callable[[], None]
    #: True once the result is known (it may arrive on another association meanwhile).
    settled: Callable[[], bool]
    #: How long the association stays open after the N-ACTION for a report on it.
    linger_seconds: float = 2.0


@dataclass
class SendReport:
    """What happened to one series on one association."""

    sent: int = 0
    warnings: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    retryable: bool = False
    #: The peer accepted the N-ACTION: a commitment result is now awaited.
    commitment_requested: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed


def _why_no_association(destination: Destination, where: str) -> str:
    """A clear reason for an operator: refused, unreachable, or aborted after connecting."""
    try:
        with socket.create_connection((destination.host, destination.port), timeout=5):
            pass
    except ConnectionRefusedError:
        return f"cannot connect to {where}: connection refused (is the peer running on that port?)"
    except TimeoutError:
        return f"cannot connect to {where}: timed out (host down or a firewall in between?)"
    except OSError as exc:
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"{where} accepted the connection but aborted the association (check its AE title and config)"


def _status_is_retryable(status: int) -> bool:
    # 0xA7xx out of resources, 0x0110 processing failure, 0x0213 resource limitation
    return (status & 0xFF00) == 0xA700 or status in (0x0110, 0x0213)


def _status_is_success(status: int) -> bool:
    return status == 0x0000 or (status & 0xF000) == 0xB000 or status == 0x0107


def send_series(
    destination: Destination,
    files: Sequence[OutputInstance],
    *,
    calling_ae: str,
    commitment: CommitmentRequest | None = None,
) -> SendReport:
    """Send ``files`` (one series) to ``destination`` in a single association.

    With ``commitment``, the N-ACTION asking the peer to commit to every file follows
    the last C-STORE on the same association (only when all were stored).
    """
    tune_pynetdicom()
    report = SendReport()
    if not files:
        return report
    contexts: dict[str, list[UID]] = defaultdict(list)
    for f in files:
        proposed = contexts[f.sop_class_uid]
        for ts in (UID(f.transfer_syntax_uid),) + (
            _UNCOMPRESSED if not UID(f.transfer_syntax_uid).is_compressed else ()
        ):
            if ts not in proposed:
                proposed.append(ts)
    needed = len(contexts) + (commitment is not None)
    if needed > _MAX_CONTEXTS:
        report.error = f"series needs {needed} presentation contexts; one association allows 128"
        return report

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = destination.timeout_seconds
    ae.dimse_timeout = destination.timeout_seconds
    ae.network_timeout = destination.timeout_seconds
    ae.connection_timeout = min(destination.timeout_seconds, 15)
    ae.maximum_pdu_size = destination.max_pdu_bytes
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, on_connection_open)]
    if commitment is not None:
        ae.add_requested_context(PUSH_MODEL, list(_UNCOMPRESSED))
        handlers.append((evt.EVT_N_EVENT_REPORT, _report_handler(commitment)))

    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, evt_handlers=handlers
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            permanent = rj is not None and rj.result == 0x01
            reason = rj.reason_str if rj is not None else "rejected"
            report.error = f"{where} rejected the association ({reason})"
            report.retryable = not permanent
        else:
            # pynetdicom reports a refused connection as an abort; find out which it was.
            report.error = _why_no_association(destination, where)
            report.retryable = True
        return report

    try:
        accepted: dict[str, UID] = {
            cx.abstract_syntax: UID(cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax and cx.transfer_syntax
        }
        missing = sorted(set(contexts) - set(accepted))
        if missing:
            names = ", ".join(UID(m).name for m in missing)
            report.error = f"{where} accepts no presentation context for {names}"
            return report
        if commitment is not None and PUSH_MODEL not in accepted:
            report.error = (
                f"{where} does not accept Storage Commitment Push Model; "
                "turn storage_commitment off for this destination or enable it on the peer"
            )
            return report
        for f in files:
            wire_ts = accepted[f.sop_class_uid]
            if wire_ts == UID(f.transfer_syntax_uid):
                payload: object = f.path
            elif not UID(f.transfer_syntax_uid).is_compressed:
                payload = dcmread(f.path)  # pynetdicom converts between uncompressed syntaxes
            else:
                report.error = (
                    f"{where} does not accept {UID(f.transfer_syntax_uid).name} "
                    f"for {UID(f.sop_class_uid).name}"
                )
                return report
            status_ds = assoc.send_c_store(payload)  # type: ignore[arg-type]
            if "Status" not in status_ds:
                report.error = f"no C-STORE response from {where} (timeout or abort)"
                report.retryable = True
                return report
            status = int(status_ds.Status)
            if _status_is_success(status):
                report.sent += 1
                report.warnings += status != 0x0000
                continue
            report.failed.append((f.sop_uid, f"0x{status:04X}"))
            if _status_is_retryable(status):
                report.error = f"{where} answered 0x{status:04X} (out of resources / busy)"
                report.retryable = True
                return report
        if report.failed:
            first_uid, first_status = report.failed[0]
            report.error = f"{where} refused {len(report.failed)} instance(s), first status {first_status}"
        elif commitment is not None:
            _request_commitment(assoc, commitment, files, where, report)
        return report
    except (OSError, RuntimeError) as exc:
        report.error = f"connection to {where} lost: {exc}"
        report.retryable = True
        return report
    finally:
        if assoc.is_established:
            assoc.release()


def _report_handler(commitment: CommitmentRequest) -> Callable[[Any], tuple[int, None]]:
    """EVT_N_EVENT_REPORT handler for a report on the association of the request."""

    def on_event_report(event: Any) -> tuple[int, None]:
        if str(event.request.AffectedSOPClassUID) != PUSH_MODEL:
            return ReportStatus.PROCESSING_FAILURE, None
        try:
            result = parse_event_report(event.event_type, event.event_information)
        except CommitmentReportError as exc:
            log.warning("storage commitment report on the sending association ignored: %s", exc)
            return ReportStatus.PROCESSING_FAILURE, None
        return commitment.on_report(result), None

    return on_event_report


def _request_commitment(
    assoc: Any,
    commitment: CommitmentRequest,
    files: Sequence[OutputInstance],
    where: str,
    report: SendReport,
) -> None:
    """N-ACTION for every sent file, then linger briefly for a report on this association."""
    info = action_information(commitment.transaction_uid, ((f.sop_class_uid, f.sop_uid) for f in files))
    commitment.before_request()
    status_ds, _reply = assoc.send_n_action(info, ACTION_REQUEST_COMMITMENT, PUSH_MODEL, PUSH_MODEL_INSTANCE)
    if "Status" not in status_ds:
        report.error = f"no N-ACTION (storage commitment) response from {where} (timeout or abort)"
        report.retryable = True
        return
    status = int(status_ds.Status)
    if status != 0x0000:
        report.error = f"{where} refused the storage commitment request (N-ACTION status 0x{status:04X})"
        report.retryable = status not in _PERMANENT_ACTION_STATUSES
        return
    report.commitment_requested = True
    until = time.monotonic() + commitment.linger_seconds
    while time.monotonic() < until and assoc.is_established and not commitment.settled():
        time.sleep(0.05)


def echo(host: str, port: int, *, called_ae: str, calling_ae: str, timeout: float = 10.0) -> int | None:
    """C-ECHO; returns the status, or None when no association could be made."""
    tune_pynetdicom()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(
        host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open)]
    )
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()
