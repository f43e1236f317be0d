"""Delivery to a PACS that misbehaves: stale or misnumbered C-STORE responses, contradictory
or malformed storage commitment reports, warning statuses, silence after the TCP connect.

An instance the PACS refused or failed is never recorded as delivered, and the delivery's
attempts and the audit say what happened. Each PACS is a pynetdicom SCP on 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE

from audit import AuditEvent, Outcome
from dicom_node.delivery.commitment import CommitmentState
from dicom_node.delivery.ledger import DeliveryState
from dicom_node.delivery.outbox import Outbox
from dicom_node.delivery.sender import SendReport
from dicom_node.jobs.claims import claim_id
from dicom_node.jobs.state import JobState
from dicom_node.net.commitment import (
    EVENT_FAILURES_EXIST,
    PUSH_MODEL,
    PUSH_MODEL_INSTANCE,
    CommitmentReportError,
    parse_event_report,
)
from tests import test_outbox
from tests.peers import free_port
from tests.test_outbox import SLICES, Env, _commitments, _config

#: A job with a stored 3-slice CT series and one pending delivery to "pacs" (the outbox's).
env = test_outbox.env

#: Builds the N-EVENT-REPORT (event type, event information) from the N-ACTION's information.
ReportBuilder = Callable[[Dataset], tuple[int, Dataset]]


class HostilePACS:
    """A storage (and storage commitment) SCP whose answers are wrong in a chosen way.

    ``statuses``: the C-STORE status per instance (1-based; default success).
    ``stale_before_failure``: before a non-success response, the previous success response
    is sent once more. ``msgid_offset``: added to every Message ID Being Responded To.
    ``report``: with it, an N-EVENT-REPORT on the requesting association after the N-ACTION.
    """

    aet = "HOSTILE"

    def __init__(
        self,
        *,
        statuses: dict[int, int] | None = None,
        stale_before_failure: bool = False,
        msgid_offset: int = 0,
        report: ReportBuilder | None = None,
    ) -> None:
        self.statuses = statuses or {}
        self.stale_before_failure = stale_before_failure
        self.msgid_offset = msgid_offset
        self.report = report
        self.port = free_port()
        self.message_ids: list[int] = []
        self.report_status: list[int | None] = []
        self._server: Any = None

    def start(self) -> HostilePACS:
        ae = AE(ae_title=self.aet)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(PUSH_MODEL, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_ESTABLISHED, self.on_established),
                (evt.EVT_C_STORE, self.on_store),
                (evt.EVT_N_ACTION, self.on_action),
            ],
        )
        return self

    def stop(self) -> None:
        self._server.shutdown()

    def on_established(self, event: Any) -> None:
        """Tamper with this association's C-STORE responses only (the node sends from this
        process too)."""
        dimse = event.assoc.dimse
        send_msg = dimse.send_msg
        previous: list[Any] = []

        def tampered(primitive: Any, context_id: int) -> None:
            if type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None:
                primitive.MessageIDBeingRespondedTo = (
                    primitive.MessageIDBeingRespondedTo + self.msgid_offset
                ) % 0x10000
                if self.stale_before_failure and primitive.Status != 0 and previous:
                    send_msg(previous[-1], context_id)
                previous.append(primitive)
            send_msg(primitive, context_id)

        dimse.send_msg = tampered

    def on_store(self, event: Any) -> int:
        self.message_ids.append(int(event.request.MessageID))
        return self.statuses.get(len(self.message_ids), 0x0000)

    def on_action(self, event: Any) -> tuple[int, None]:
        if self.report is not None:
            info = event.action_information
            threading.Thread(target=self._report, args=(event.assoc, info), daemon=True).start()
        return 0x0000, None

    def _report(self, assoc: Any, info: Dataset) -> None:
        time.sleep(0.1)  # after the N-ACTION response has gone
        assert self.report is not None
        event_type, ds = self.report(info)
        status, _ = assoc.send_n_event_report(ds, event_type, PUSH_MODEL, PUSH_MODEL_INSTANCE)
        self.report_status.append(int(status.Status) if "Status" in status else None)


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostilePACS]]:
    started: list[HostilePACS] = []

    def start(**kwargs: Any) -> HostilePACS:
        started.append(HostilePACS(**kwargs).start())
        return started[-1]

    try:
        yield start
    finally:
        for peer in started:
            peer.stop()


def _send(env: Env, peer: HostilePACS, *, commitment: bool = False, **destination: Any) -> SendReport:
    settings: dict[str, Any] = {"ae_title": peer.aet, **destination}
    if commitment:
        settings |= {"storage_commitment": True, "commitment_timeout_seconds": 30}
    outbox = Outbox(
        _config(peer.port, settings, backoff_initial_seconds=60), env.rt.db, env.rt.audit, claim_id("hostile")
    )
    task = outbox.claim_due()
    assert task is not None
    return outbox.send(task)


def _assert_retry_not_delivered(env: Env, sent: int, *, stored: bool = False) -> dict[str, Any]:
    """The delivery waits for a retry; nothing was recorded as transferred unless every
    C-STORE succeeded (``stored``: the storage commitment failed)."""
    d = env.delivery()
    assert d["state"] == DeliveryState.PENDING and d["delivered_at"] is None
    (attempt,) = env.attempts()
    assert (attempt["outcome"], attempt["instances_sent"]) == ("retry", sent)
    assert attempt["detail"] == d["last_error"]
    (audited,) = env.rt.audit.events(AuditEvent.DELIVERY_ATTEMPT)
    assert (audited.outcome, audited.facts["result"]) == (Outcome.MINOR_FAILURE, "retry")
    assert audited.facts["error"] == d["last_error"]
    assert len(env.rt.audit.events(AuditEvent.INSTANCES_TRANSFERRED)) == int(stored)
    assert env.job_state() == JobState.DELIVERING
    return attempt


# -- C-STORE responses -------------------------------------------------------------------------


def test_a_stale_success_response_before_a_refusal_is_not_taken_for_the_refused_instance(
    env: Env, hostile: Callable[..., HostilePACS]
) -> None:
    # the PACS refuses the last instance, but first re-sends the success of the one before
    peer = hostile(statuses={SLICES: 0xA900}, stale_before_failure=True)
    report = _send(env, peer)
    assert peer.message_ids == list(range(1, SLICES + 1))  # numbered, through the fast path
    assert not report.ok and report.retryable
    attempt = _assert_retry_not_delivered(env, sent=SLICES - 1)
    assert f"answered C-STORE request {SLICES} (instance {env.outputs[-1].sop_uid})" in attempt["detail"]
    assert f"with a response to message {SLICES - 1}; association aborted" in attempt["detail"]


def test_responses_with_a_wrong_message_id_are_not_success(
    env: Env, hostile: Callable[..., HostilePACS]
) -> None:
    peer = hostile(msgid_offset=100)
    report = _send(env, peer)
    assert not report.ok and report.retryable and report.sent == 0
    attempt = _assert_retry_not_delivered(env, sent=0)
    assert "answered C-STORE request 1" in attempt["detail"]
    assert "with a response to message 101; association aborted" in attempt["detail"]
    assert peer.message_ids == [1]  # the association went with the first mismatch


def test_warning_statuses_are_named_in_the_attempt_and_its_audit_record(
    env: Env, hostile: Callable[..., HostilePACS]
) -> None:
    peer = hostile(statuses={n: 0xB007 for n in range(1, SLICES + 1)} | {1: 0xB000})
    assert _send(env, peer).ok
    note = (
        f"{SLICES} instance(s) stored with a warning: 0xB000 coercion of data elements (1), "
        f"0xB007 data set does not match SOP class ({SLICES - 1})"
    )
    d = env.delivery()
    assert d["state"] == DeliveryState.DELIVERED and d["last_error"] is None  # still delivered
    (attempt,) = env.attempts()
    assert (attempt["outcome"], attempt["instances_sent"], attempt["detail"]) == ("delivered", SLICES, note)
    (audited,) = env.rt.audit.events(AuditEvent.DELIVERY_ATTEMPT)
    assert (audited.facts["note"], audited.facts["instances_warned"]) == (note, SLICES)


# -- storage commitment reports on the sending association ------------------------------------


def _failed_item(ref: Dataset, reason: Any) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
    item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
    item.FailureReason = reason
    return item


def _contradictory(info: Dataset) -> tuple[int, Dataset]:
    """Every reference echoed as committed, and the first one listed as failed too."""
    refs = list(info.ReferencedSOPSequence)
    ds = Dataset()
    ds.TransactionUID = info.TransactionUID
    ds.ReferencedSOPSequence = refs
    ds.FailedSOPSequence = [_failed_item(refs[0], 0x0112)]
    return EVENT_FAILURES_EXIST, ds


def _failures_without_failure(info: Dataset) -> tuple[int, Dataset]:
    """Event type 2 (failures exist), every reference committed, no Failed SOP Sequence."""
    ds = Dataset()
    ds.TransactionUID = info.TransactionUID
    ds.ReferencedSOPSequence = list(info.ReferencedSOPSequence)
    return EVENT_FAILURES_EXIST, ds


def _two_failure_reasons(info: Dataset) -> tuple[int, Dataset]:
    """A Failure Reason with two values (its VM is 1)."""
    refs = list(info.ReferencedSOPSequence)
    ds = Dataset()
    ds.TransactionUID = info.TransactionUID
    ds.ReferencedSOPSequence = refs[1:]
    ds.FailedSOPSequence = [_failed_item(refs[0], [0x0112, 0x0110])]
    return EVENT_FAILURES_EXIST, ds


def test_an_instance_both_committed_and_failed_is_failed(
    env: Env, hostile: Callable[..., HostilePACS]
) -> None:
    peer = hostile(report=_contradictory)
    _send(env, peer, commitment=True)
    (commitment,) = _commitments(env)
    assert (commitment["state"], commitment["committed"], commitment["failed"]) == (
        CommitmentState.FAILED,
        SLICES - 1,
        1,
    )
    assert [f["sop_uid"] for f in commitment["failures"]] == [env.outputs[0].sop_uid]
    attempt = _assert_retry_not_delivered(env, sent=SLICES, stored=True)
    why = "1 no such object instance (0x0112)"
    assert attempt["detail"] == f"pacs did not commit 1 of {SLICES} instance(s): {why}"
    (result,) = env.rt.audit.events(AuditEvent.STORAGE_COMMITMENT_RESULT)
    assert (result.outcome, result.facts["result"], result.facts["failed"]) == (
        Outcome.MINOR_FAILURE,
        "failed",
        1,
    )


def test_a_failures_exist_report_without_a_failure_is_contradictory_and_failed(
    env: Env, hostile: Callable[..., HostilePACS]
) -> None:
    peer = hostile(report=_failures_without_failure)
    _send(env, peer, commitment=True)
    (commitment,) = _commitments(env)
    assert commitment["state"] == CommitmentState.FAILED
    attempt = _assert_retry_not_delivered(env, sent=SLICES, stored=True)
    assert "contradictory storage commitment report: event type 2 (failures exist)" in attempt["detail"]
    (result,) = env.rt.audit.events(AuditEvent.STORAGE_COMMITMENT_RESULT)
    assert (result.outcome, result.facts["result"]) == (Outcome.MINOR_FAILURE, "failed")


def test_a_malformed_report_on_the_sending_association_fails_the_send_with_the_reason(
    env: Env, hostile: Callable[..., HostilePACS]
) -> None:
    info = Dataset()
    info.TransactionUID = "1.2.3"
    info.ReferencedSOPSequence = []
    with pytest.raises(CommitmentReportError, match="Failure Reason"):
        parse_event_report(*_two_failure_reasons(_with_refs(info)))

    peer = hostile(report=_two_failure_reasons)
    started = time.monotonic()
    report = _send(env, peer, commitment=True)
    assert time.monotonic() - started < 10  # no waiting for a result that came
    assert not report.ok and report.retryable
    assert peer.report_status == [0x0110]  # answered: processing failure
    attempt = _assert_retry_not_delivered(env, sent=SLICES)
    assert "sent a storage commitment report that cannot be used: Failure Reason" in attempt["detail"]
    (commitment,) = _commitments(env)
    assert (commitment["state"], commitment["detail"]) == (CommitmentState.CANCELLED, attempt["detail"])
    (result,) = env.rt.audit.events(AuditEvent.STORAGE_COMMITMENT_RESULT)
    assert (result.outcome, result.facts["result"], result.facts["via"]) == (
        Outcome.MINOR_FAILURE,
        "ignored",
        "same-association",
    )
    assert result.facts["reason"].startswith("Failure Reason")
    assert result.facts["transaction_uid"] == commitment["transaction_uid"]
    assert result.calling_ae == peer.aet


def _with_refs(info: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = "1.2.3.4"
    info.ReferencedSOPSequence = [ref]
    return info


# -- no answer to the association request -------------------------------------------------------


def test_a_peer_that_never_answers_the_association_request_is_reported_as_silent(env: Env) -> None:
    port = free_port()
    server = socket.create_server(("127.0.0.1", port))
    held: list[socket.socket] = []

    def accept() -> None:  # and never answer: the association attempt, then the probe
        for _ in range(2):
            held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        outbox = Outbox(
            _config(port, {"ae_title": "SILENT", "timeout_seconds": 1}),
            env.rt.db,
            env.rt.audit,
            claim_id("silent"),
        )
        task = outbox.claim_due()
        assert task is not None
        report = outbox.send(task)
    finally:
        server.close()
        for s in held:
            s.close()
    assert report.retryable
    expected = (
        f"SILENT@127.0.0.1:{port} accepted the connection but did not answer the association request "
        "within the ACSE timeout (1 s)"
    )
    attempt = _assert_retry_not_delivered(env, sent=0)
    assert attempt["detail"] == expected
