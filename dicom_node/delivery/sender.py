"""C-STORE SCU: send one series to one destination in one association.

Presentation contexts are built from what is being sent (:func:`propose_contexts`): per
SOP class, one context for each transfer syntax the files are stored in, and one
proposing the uncompressed syntaxes not stored. A file whose stored syntax the peer
accepts is streamed from disk unchanged — never transcoded. A compressed file whose
syntax the peer refuses is decoded by pydicom's pixel plugins and sent uncompressed
(Explicit VR Little Endian, or Implicit when that is what the peer accepted); an
uncompressed one is converted by pynetdicom. The report counts what was transcoded. When
nothing the peer accepted fits, the error names the syntaxes offered and accepted.
Failures are classified: *retryable* (peer down, timeouts, transient rejection, out of
resources) or *permanent* (rejected permanently, no usable presentation context, the peer
refuses the data), so the outbox retries only what can succeed later.

When the destination does storage commitment, the N-ACTION follows the last C-STORE on
the same association, which then stays open a moment for a report on it (most peers,
Orthanc among them, report on a new association to the node's receiver instead).

A destination with ``tls`` is reached over DICOM TLS (:class:`~dicom_node.net.tls.ClientTls`:
its certificate verified against the CA file and its name, the node's certificate presented
when asked); a failed handshake is reported with OpenSSL's reason.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE, N_ACTION
from pynetdicom.presentation import PresentationContext

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
from dicom_node.net.tls import ClientTls, TlsConfigError
from dicom_node.net.tuning import on_connection_open, tune_pynetdicom
from pipelines.base import OutputInstance

log = logging.getLogger(__name__)

#: How much longer than the destination's timeout a release may take before it is aborted.
_RELEASE_GRACE_SECONDS = 5.0


def release_within(assoc: Any, seconds: float, where: str) -> None:
    """``assoc.release()``, aborted after ``seconds``.

    pynetdicom's release first waits, without a limit, for the association's reactor to
    pause. When the reactor has just released the association itself (its network idle
    timer ran out while the sender waited for a storage commitment report), that wait can
    last for ever: a fresh-clone CI run hung in it for 10 minutes. Whatever was sent is
    settled before the release, so an association that will not release is aborted."""
    if not assoc.is_established:
        return
    done = threading.Event()

    def release() -> None:
        try:
            assoc.release()
        except Exception:  # the association went meanwhile: nothing to release
            log.debug("releasing the association with %s failed", where, exc_info=True)
        finally:
            done.set()

    threading.Thread(target=release, name="release", daemon=True).start()
    if not done.wait(seconds):
        log.warning("the association with %s did not release within %g s; aborted", where, seconds)
        assoc.abort()


_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128
#: Presentation context result: the peer does not support the SOP class at all.
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
#: Syntaxes that are lossy whatever the encoder did, and the method (0028,2114) names them
#: by; a decoded copy must still say it was lossy (the others' encoders set the flags).
_ALWAYS_LOSSY = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1"}
#: N-ACTION statuses no retry will change: not authorised, no such SOP class / action.
_PERMANENT_ACTION_STATUSES = (0x0124, 0x0118, 0x0123)
#: PS3.4 B.2.3 / C.4.2.1.4 warning statuses of a C-STORE (the instance is stored).
WARNING_STATUSES = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0x0107: "attribute list error",
}


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
    #: Records (audits) a report on this association that is not a usable result (why).
    on_unusable: Callable[[str], None] | None = None


@dataclass
class SendReport:
    """What happened to one series on one association."""

    sent: int = 0
    warnings: int = 0
    #: Warning status (0xB007, …) → instances stored with it.
    warning_statuses: dict[int, int] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    retryable: bool = False
    #: The peer accepted the N-ACTION: a commitment result is now awaited.
    commitment_requested: bool = False
    #: (stored transfer syntax, syntax sent) → instances stored by the peer after transcoding.
    transcoded: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed

    @property
    def transcoding_note(self) -> str | None:
        """What was sent otherwise than as stored, for the attempt's record (None: nothing)."""
        if not self.transcoded:
            return None
        return "; ".join(
            f"transcoded from {UID(stored).name} to {UID(sent).name} for {n} instance(s)"
            for (stored, sent), n in self.transcoded.items()
        )

    @property
    def warning_note(self) -> str | None:
        """The instances the peer stored with a warning status, and the codes (None: none)."""
        if not self.warnings:
            return None
        codes = ", ".join(
            f"0x{status:04X} {WARNING_STATUSES.get(status, 'warning')} ({n})"
            for status, n in sorted(self.warning_statuses.items())
        )
        return f"{self.warnings} instance(s) stored with a warning: {codes}"


class TooManyContexts(ValueError):
    """A series whose SOP classes and transfer syntaxes need more than one association allows."""


def propose_contexts(
    files: Sequence[OutputInstance], *, reserved: int = 0
) -> list[tuple[str, tuple[UID, ...]]]:
    """The presentation contexts to propose for ``files``: (SOP class, transfer syntaxes).

    Per SOP class, in the order the files come, each transfer syntax its files are stored
    in gets a context of its own — a peer that accepts it gets the bytes as stored, and
    cannot pick another syntax instead — and one more context proposes the uncompressed
    syntaxes not stored: what a compressed file is decoded into, or an uncompressed one
    converted to, when the peer refuses its own syntax. Those fallbacks are left out, from
    the last SOP class back, when the association has no room for them.

    Parameters
    ----------
    files
        The series to send.
    reserved
        Contexts the association needs besides these (storage commitment: 1).

    Raises
    ------
    TooManyContexts
        When even the contexts without fallbacks exceed the 128 of one association.
    """
    stored: dict[str, list[UID]] = {}
    for f in files:
        syntaxes = stored.setdefault(f.sop_class_uid, [])
        if UID(f.transfer_syntax_uid) not in syntaxes:
            syntaxes.append(UID(f.transfer_syntax_uid))
    needed = sum(len(syntaxes) for syntaxes in stored.values())
    if needed + reserved > _MAX_CONTEXTS:
        raise TooManyContexts(
            f"series needs {needed + reserved} presentation contexts; one association allows 128"
        )
    room_for_fallbacks = _MAX_CONTEXTS - reserved - needed
    contexts: list[tuple[str, tuple[UID, ...]]] = []
    for sop_class, syntaxes in stored.items():
        contexts += [(sop_class, (ts,)) for ts in syntaxes]
        fallback = tuple(ts for ts in _UNCOMPRESSED if ts not in syntaxes)
        if fallback and room_for_fallbacks > 0:
            room_for_fallbacks -= 1
            contexts.append((sop_class, fallback))
    return contexts


def _route(stored: UID, accepted: Sequence[UID]) -> UID | None:
    """The syntax a file stored in ``stored`` goes out in: its own when accepted, else an
    accepted uncompressed one pynetdicom can encode it in (None: no fit)."""
    if stored in accepted:
        return stored
    # Decoded pixels are Explicit VR Little Endian; pynetdicom sends a data set in the
    # accepted syntax equal to its own, else in the first it can convert it to (the same
    # endianness, uncompressed), in the order of the contexts: so does this.
    encoded = ExplicitVRLittleEndian if stored.is_compressed else stored
    if encoded in accepted:
        return encoded
    little = encoded.is_little_endian
    return next((ts for ts in accepted if not ts.is_compressed and ts.is_little_endian == little), None)


def decompressed(path: Path) -> Dataset:
    """The data set of the file at ``path`` with its pixel data decoded (Explicit VR Little
    Endian), by pydicom's pixel plugins.

    pydicom fixes Photometric Interpretation, Planar Configuration and Number of Frames to
    match the decoded pixels; the SOP Instance UID is kept (the encoding changes, not the
    instance). A syntax that is always lossy keeps saying so in Lossy Image Compression.
    """
    ds = dcmread(path)
    stored = UID(ds.file_meta.TransferSyntaxUID)
    if "PixelData" not in ds:  # nothing encapsulated: the data set is explicit VR little endian
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds
    ds.decompress(generate_instance_uid=False)
    if stored in _ALWAYS_LOSSY and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = _ALWAYS_LOSSY[stored]
    return ds


def _names(syntaxes: Iterable[str]) -> str:
    return ", ".join(UID(ts).name for ts in syntaxes) or "none"


def _no_fit(
    where: str,
    sop_class: str,
    stored: UID | None,
    offered: Sequence[UID],
    accepted: Sequence[UID],
    rejected: Sequence[PresentationContext],
) -> str:
    """Why no file of ``sop_class`` stored in ``stored`` can be sent, naming the syntaxes."""
    listed = f"offered {_names(offered)}; accepted: {_names(accepted)}"
    sop = UID(sop_class).name
    refusals = [cx.result for cx in rejected if cx.abstract_syntax == sop_class]
    if not accepted and refusals and all(r == _ABSTRACT_SYNTAX_NOT_SUPPORTED for r in refusals):
        return f"{where} does not accept {sop} at all (abstract syntax not supported): {listed}"
    if not accepted:
        return f"{where} accepted none of the transfer syntaxes offered for {sop}: {listed}"
    what = f"{stored.name} {sop}" if stored is not None else sop
    return f"{where} accepted none of the transfer syntaxes {what} can be sent in: {listed}"


def _offered_by_sop_class(contexts: Sequence[tuple[str, tuple[UID, ...]]]) -> dict[str, list[UID]]:
    offered: dict[str, list[UID]] = defaultdict(list)
    for sop_class, syntaxes in contexts:
        offered[sop_class] += [ts for ts in syntaxes if ts not in offered[sop_class]]
    return offered


def unresolvable(host: str, where: str, exc: socket.gaierror) -> str:
    """The one line for a host name that does not resolve."""
    return f"cannot connect to {where}: host {host!r} not found ({exc.strerror or exc})"


def _why_no_association(
    host: str,
    port: int,
    where: str,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
    *,
    acse_timeout: float | None = None,
    waited: float = 0.0,
) -> str:
    """A clear reason for an operator: refused, unreachable, a failed TLS handshake, no
    answer to the association request within ``acse_timeout`` (``waited``: how long the
    attempt took), or aborted after connecting."""
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            if tls_args is not None:
                return _why_no_tls_association(sock, where, *tls_args)
    except ConnectionRefusedError:
        return f"cannot connect to {where}: connection refused (is the peer running on that port?)"
    except TimeoutError:
        return f"cannot connect to {where}: timed out (host down or a firewall in between?)"
    except OSError as exc:
        return f"cannot connect to {where}: {exc.strerror or exc}"
    if acse_timeout is not None and waited >= acse_timeout:
        return (
            f"{where} accepted the connection but did not answer the association request "
            f"within the ACSE timeout ({acse_timeout:g} s)"
        )
    return f"{where} accepted the connection but aborted the association (check its AE title and config)"


def _why_no_tls_association(
    sock: socket.socket, where: str, context: ssl.SSLContext, server_name: str
) -> str:
    """Handshake again to name what failed: the peer's certificate, ours, or neither."""
    try:
        with context.wrap_socket(sock, server_hostname=server_name) as tls:
            # Under TLS 1.3 a server refuses the client's certificate after the client's
            # side of the handshake is done: its alert arrives on the first read.
            tls.settimeout(1.0)
            try:
                tls.recv(1)
            except TimeoutError:
                pass
    except ssl.SSLCertVerificationError as exc:
        return (
            f"TLS handshake with {where} failed: its certificate is not accepted ({exc.verify_message}; "
            f"expected name {server_name!r}, check ca_file and tls_server_name)"
        )
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc).replace("_", " ").lower()
        if exc.reason == "WRONG_VERSION_NUMBER" or isinstance(exc, ssl.SSLEOFError):
            return f"TLS handshake with {where} failed: {reason} (is that port the peer's TLS port?)"
        return f"TLS handshake with {where} failed: {reason} (does the peer trust this node's certificate?)"
    except OSError as exc:
        return (
            f"TLS connection to {where} lost during the handshake: {exc.strerror or exc} "
            "(is that port the peer's TLS port?)"
        )
    return (
        f"{where} accepted the TLS connection but aborted the association "
        "(check its AE title, its config and that it trusts this node's certificate)"
    )


def status_is_retryable(status: int) -> bool:
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
    tls: ClientTls | None = None,
) -> SendReport:
    """Send ``files`` (one series) to ``destination`` in a single association.

    Each file goes as stored when the peer accepts its transfer syntax, else decoded
    (compressed) or converted (uncompressed) to an uncompressed syntax the peer accepted;
    :attr:`SendReport.transcoded` counts those. A series with a file that fits nothing
    the peer accepted is not sent at all, and the error names the syntaxes.

    With ``commitment``, the N-ACTION asking the peer to commit to every file follows
    the last C-STORE on the same association (only when all were stored).

    ``tls``: the node's TLS client settings, needed for a destination with ``tls`` on.
    """
    tune_pynetdicom()
    report = SendReport()
    if not files:
        return report
    try:
        contexts = propose_contexts(files, reserved=int(commitment is not None))
    except TooManyContexts as exc:
        report.error = str(exc)
        return report
    offered = _offered_by_sop_class(contexts)

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = destination.timeout_seconds
    ae.dimse_timeout = destination.timeout_seconds
    ae.network_timeout = destination.timeout_seconds
    ae.connection_timeout = min(destination.timeout_seconds, 15)
    ae.maximum_pdu_size = destination.max_pdu_bytes
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, on_connection_open)]
    unusable: list[str] = []  # why a report on this association could not be used
    if commitment is not None:
        ae.add_requested_context(PUSH_MODEL, list(_UNCOMPRESSED))
        handlers.append((evt.EVT_N_EVENT_REPORT, _report_handler(commitment, unusable)))

    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        tls_args = _tls_args(destination, tls)
    except TlsConfigError as exc:
        report.error = str(exc)  # the config must change: retrying cannot help
        return report
    started = time.monotonic()
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=handlers,
            tls_args=tls_args,
        )
    except socket.gaierror as exc:  # DNS may answer later: retryable
        report.error = unresolvable(destination.host, where, exc)
        report.retryable = True
        return report
    except ValueError as exc:  # pynetdicom refuses the address or an AE title
        report.error = f"cannot associate with {where}: {exc}"
        return report
    if not assoc.is_established:
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            permanent = rj is not None and rj.result == 0x01
            reason = rj.reason_str if rj is not None else "rejected"
            report.error = f"{where} rejected the association ({reason})"
            report.retryable = not permanent
        elif assoc.rejected_contexts and not assoc.accepted_contexts:
            # The peer answered A-ASSOCIATE-AC refusing every context; pynetdicom then aborts.
            report.error = ". ".join(
                _no_fit(where, sop_class, None, syntaxes, [], assoc.rejected_contexts)
                for sop_class, syntaxes in offered.items()
            )
        else:
            # pynetdicom reports a refused connection as an abort; find out which it was.
            report.error = _why_no_association(
                destination.host,
                destination.port,
                where,
                tls_args,
                acse_timeout=ae.acse_timeout,
                waited=time.monotonic() - started,
            )
            report.retryable = True
        return report

    responses = _Responses(assoc)
    try:
        accepted: dict[str, list[UID]] = defaultdict(list)
        for cx in assoc.accepted_contexts:
            if cx.abstract_syntax and cx.transfer_syntax:
                accepted[str(cx.abstract_syntax)].append(UID(cx.transfer_syntax[0]))
        routes = [_route(UID(f.transfer_syntax_uid), accepted.get(f.sop_class_uid, [])) for f in files]
        # Checked before anything is sent: no half-delivered series for want of a syntax.
        no_fit = dict.fromkeys(
            (f.sop_class_uid, UID(f.transfer_syntax_uid))
            for f, route in zip(files, routes, strict=True)
            if route is None
        )
        if no_fit:
            report.error = ". ".join(
                _no_fit(
                    where,
                    sop_class,
                    stored,
                    offered[sop_class],
                    accepted.get(sop_class, []),
                    assoc.rejected_contexts,
                )
                for sop_class, stored in no_fit
            )
            return report
        if commitment is not None and PUSH_MODEL not in accepted:
            report.error = (
                f"{where} does not accept Storage Commitment Push Model; "
                "turn storage_commitment off for this destination or enable it on the peer"
            )
            return report
        for f, wire_ts in zip(files, routes, strict=True):
            stored = UID(f.transfer_syntax_uid)
            if wire_ts == stored:
                payload: object = f.path  # as stored, never transcoded
            elif not stored.is_compressed:
                payload = dcmread(f.path)  # pynetdicom converts between uncompressed syntaxes
            else:
                try:
                    payload = decompressed(f.path)
                except Exception as exc:  # the pixel plugins raise what they like
                    why = " ".join(str(exc).split()) or type(exc).__name__
                    report.error = (
                        f"{where} does not accept {UID(f.sop_class_uid).name} in {stored.name}, "
                        f"and decompressing instance {f.sop_uid} failed ({why}): "
                        f"offered {_names(offered[f.sop_class_uid])}; "
                        f"accepted: {_names(accepted[f.sop_class_uid])}"
                    )
                    return report
            msg_id = responses.next_id()
            status_ds = assoc.send_c_store(payload, msg_id=msg_id)  # type: ignore[arg-type]
            mismatch = responses.mismatch(C_STORE, msg_id, f.sop_uid)
            if mismatch is not None:
                assoc.abort()
                report.error = (
                    f"{where} answered C-STORE request {msg_id} (instance {f.sop_uid}) with {mismatch}; "
                    "association aborted"
                )
                report.retryable = True
                return report
            if "Status" not in status_ds:
                report.error = f"no C-STORE response from {where} (timeout or abort)"
                report.retryable = True
                return report
            status = int(status_ds.Status)
            if _status_is_success(status):
                report.sent += 1
                if status != 0x0000:
                    report.warnings += 1
                    report.warning_statuses[status] = report.warning_statuses.get(status, 0) + 1
                if wire_ts != stored:
                    key = (str(stored), str(wire_ts))
                    report.transcoded[key] = report.transcoded.get(key, 0) + 1
                continue
            report.failed.append((f.sop_uid, f"0x{status:04X}"))
            if status_is_retryable(status):
                report.error = f"{where} answered 0x{status:04X} (out of resources / busy)"
                report.retryable = True
                return report
        if report.failed:
            first_uid, first_status = report.failed[0]
            report.error = f"{where} refused {len(report.failed)} instance(s), first status {first_status}"
        elif commitment is not None:
            _request_commitment(assoc, commitment, files, where, report, responses, unusable)
        if report.transcoded:
            log.info("sent to %s: %s", where, report.transcoding_note)
        if report.warnings:
            log.warning("sent to %s: %s", where, report.warning_note)
        return report
    except (OSError, RuntimeError) as exc:
        report.error = f"connection to {where} lost: {exc}"
        report.retryable = True
        return report
    finally:
        release_within(assoc, destination.timeout_seconds + _RELEASE_GRACE_SECONDS, where)


def _tls_args(destination: Destination, tls: ClientTls | None) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``destination`` (None: plain TCP)."""
    if not destination.tls:
        return None
    if tls is None:
        raise TlsConfigError(
            f"destination {destination.ae_title}@{destination.host}:{destination.port} has tls = true, "
            "but no [tls] client settings were given to the sender"
        )
    return tls.args_for(destination)


class _Responses:
    """Numbers the requests of one association and checks the response each takes.

    pynetdicom's ``send_*()`` calls take the next message off the DIMSE queue as their
    response and return only its status: a stale or duplicated response would be taken
    for the answer to the request just sent. The response taken is kept here (by wrapping
    the association's ``get_msg`` for its blocking calls) so that its Message ID Being
    Responded To and Affected SOP Instance UID can be checked against the request.
    """

    def __init__(self, assoc: Any) -> None:
        self._last_id = 0
        self._taken: Any = None
        dimse = assoc.dimse
        get_msg = dimse.get_msg

        def taking(block: bool = False) -> Any:
            item = get_msg(block)
            if block:  # a send_*() call waiting for its response (the reactor does not block)
                self._taken = item[1]
            return item

        dimse.get_msg = taking

    def next_id(self) -> int:
        """The Message ID of the next request (1, 2, 3 … unique on the association)."""
        self._last_id = self._last_id % 0xFFFF + 1
        self._taken = None
        return self._last_id

    def mismatch(self, kind: type, msg_id: int, sop_uid: str | None) -> str | None:
        """What is wrong with the response taken for request ``msg_id`` (None: it answers
        it, or there was none: the caller reports the missing response)."""
        rsp = self._taken
        if rsp is None:
            return None
        if type(rsp) is not kind:
            return f"a {type(rsp).__name__.replace('_', '-')} message instead of its response"
        answered = getattr(rsp, "MessageIDBeingRespondedTo", None)
        if answered != msg_id:
            return f"a response to message {answered}"
        affected = getattr(rsp, "AffectedSOPInstanceUID", None)
        if sop_uid is not None and affected and str(affected) != sop_uid:
            return f"a response naming another instance ({affected})"
        return None


def _report_handler(commitment: CommitmentRequest, unusable: list[str]) -> Callable[[Any], tuple[int, None]]:
    """EVT_N_EVENT_REPORT handler for a report on the association of the request; why a
    report could not be used is appended to ``unusable`` (and audited)."""

    def on_event_report(event: Any) -> tuple[int, None]:
        if str(event.request.AffectedSOPClassUID) != PUSH_MODEL:
            return ReportStatus.PROCESSING_FAILURE, None
        try:
            result = parse_event_report(event.event_type, event.event_information)
        except CommitmentReportError as exc:
            why = str(exc)
        except Exception as exc:  # an undecodable data set is the peer's problem, not a crash
            why = f"the report cannot be decoded: {exc}"
        else:
            return commitment.on_report(result), None
        log.warning("storage commitment report on the sending association refused: %s", why)
        if commitment.on_unusable is not None:
            try:
                commitment.on_unusable(why)
            except Exception:  # the audit's failure must not leave the peer unanswered
                log.exception("recording an unusable storage commitment report failed")
        unusable.append(why)  # last: the sender releases the association once it sees it
        return ReportStatus.PROCESSING_FAILURE, None

    return on_event_report


def _request_commitment(
    assoc: Any,
    commitment: CommitmentRequest,
    files: Sequence[OutputInstance],
    where: str,
    report: SendReport,
    responses: _Responses,
    unusable: list[str],
) -> None:
    """N-ACTION for every sent file, then linger briefly for a report on this association.

    A report on it that cannot be used fails the send (retryable) with the reason."""
    info = action_information(commitment.transaction_uid, ((f.sop_class_uid, f.sop_uid) for f in files))
    commitment.before_request()
    msg_id = responses.next_id()
    status_ds, _reply = assoc.send_n_action(
        info, ACTION_REQUEST_COMMITMENT, PUSH_MODEL, PUSH_MODEL_INSTANCE, msg_id=msg_id
    )
    mismatch = responses.mismatch(N_ACTION, msg_id, None)
    if mismatch is not None:
        assoc.abort()
        report.error = (
            f"{where} answered the storage commitment request (message {msg_id}) with {mismatch}; "
            "association aborted"
        )
        report.retryable = True
        return
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
    while time.monotonic() < until and assoc.is_established and not commitment.settled() and not unusable:
        time.sleep(0.05)
    if unusable and not commitment.settled():
        time.sleep(0.1)  # the N-EVENT-REPORT response goes out before the A-RELEASE request
        report.error = f"{where} sent a storage commitment report that cannot be used: {unusable[0]}"
        report.retryable = True


@dataclass(frozen=True)
class EchoResult:
    """A C-ECHO's status, or why there was no association (``status`` None)."""

    status: int | None
    error: str | None = None


def echo(
    host: str,
    port: int,
    *,
    called_ae: str,
    calling_ae: str,
    timeout: float = 10.0,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> EchoResult:
    """C-ECHO, over TLS with ``tls_args`` (context, server name)."""
    tune_pynetdicom()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    where = f"{called_ae}@{host}:{port}"
    try:
        assoc = ae.associate(
            host,
            port,
            ae_title=called_ae,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open)],
            tls_args=tls_args,
        )
    except socket.gaierror as exc:
        return EchoResult(None, unresolvable(host, where, exc))
    except ValueError as exc:  # pynetdicom refuses the address or an AE title
        return EchoResult(None, f"cannot associate with {where}: {exc}")
    if not assoc.is_established:
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            return EchoResult(
                None, f"{where} rejected the association ({rj.reason_str if rj else 'rejected'})"
            )
        return EchoResult(None, _why_no_association(host, port, where, tls_args))
    try:
        status = assoc.send_c_echo()
        if "Status" not in status:
            return EchoResult(None, f"no C-ECHO response from {where} (timeout or abort)")
        return EchoResult(int(status.Status))
    finally:
        assoc.release()
