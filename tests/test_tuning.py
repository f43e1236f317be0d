"""TCP_NODELAY is set on sockets we open or accept."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from dicom_node.net.tuning import on_connection_open


def test_nodelay_set_on_association_socket() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        event = SimpleNamespace(
            assoc=SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=accepted)))
        )
        on_connection_open(event)
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (client, accepted, server):
            s.close()


def test_the_idle_association_reactor_never_keeps_a_response_from_its_waiter() -> None:
    """The reactor's idle wait shares the DIMSE queue's condition with the thread that
    waits for a response; ``put`` wakes one waiter, the first. When that is the reactor, the
    response must still reach the waiting thread at once, not after its DIMSE timeout
    (which once stalled deliveries for 30 s until the network timeout aborted them)."""
    import queue
    import threading
    import time

    from dicom_node.net.tuning import _association_idle

    messages: queue.Queue[str] = queue.Queue()
    assoc = SimpleNamespace(dimse=SimpleNamespace(msg_queue=messages))
    reactor = threading.Thread(target=_association_idle, args=(assoc, 5.0))
    reactor.start()
    time.sleep(0.2)  # the reactor waits first, so the put below wakes it, not the waiter
    got: list[tuple[str, float]] = []

    def wait_for_response() -> None:
        started = time.monotonic()
        got.append((messages.get(timeout=5.0), time.monotonic() - started))

    waiter = threading.Thread(target=wait_for_response)
    waiter.start()
    time.sleep(0.2)
    messages.put("C-STORE-RSP")
    waiter.join(10)
    reactor.join(10)
    assert got and got[0][0] == "C-STORE-RSP"
    assert got[0][1] < 1.5, f"the response waited {got[0][1]:.1f} s for a wake-up the reactor took"


def test_an_acceptor_whose_connection_ends_before_its_request_ends_at_once() -> None:
    """pynetdicom's acceptor thread waits ``acse_timeout`` for the A-ASSOCIATE-RQ even after
    the connection is gone, and counts against ``maximum_associations`` all that time: a
    few connect-and-close probes refused every sender for the ACSE timeout."""
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicom_node.net.tuning import tune_pynetdicom

    tune_pynetdicom()
    ae = AE(ae_title="TUNED")
    ae.add_supported_context(Verification)
    ae.acse_timeout = 30
    ae.maximum_associations = 2
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]
        for _ in range(3):
            socket.create_connection(("127.0.0.1", port)).close()
        started = time.monotonic()
        time.sleep(0.2)
        while server.active_associations and time.monotonic() - started < 10:
            time.sleep(0.02)
        took = time.monotonic() - started
        assert not server.active_associations and took < 1.0, f"acceptors lingered {took:.1f} s"
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="TUNED")
        assert assoc.is_established
        assoc.release()
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("state", "queued", "handlers", "straight"),
    [
        ("Sta6", 0, 0, True),
        ("Sta7", 0, 0, False),  # release requested: the state machine decides
        ("Sta6", 1, 0, False),  # an earlier event first (order kept)
        ("Sta6", 0, 1, False),  # someone listens for the transitions
    ],
)
def test_a_p_data_goes_straight_to_dimse_only_in_plain_data_transfer(
    state: str, queued: int, handlers: int, straight: bool
) -> None:
    import queue

    from dicom_node.net.tuning import _straight_to_dimse

    events: queue.Queue[str] = queue.Queue()
    for _ in range(queued):
        events.put("Evt19")
    dul = SimpleNamespace(
        state_machine=SimpleNamespace(current_state=state),
        event_queue=events,
        assoc=SimpleNamespace(get_handlers=lambda event: [object()] * handlers),
    )
    assert _straight_to_dimse(dul) is straight


def test_checked_transfer_syntaxes_give_what_pynetdicom_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The negotiation's transfer syntax cache: the same lists, the same refusals."""
    from pynetdicom.presentation import PresentationContext

    from dicom_node.net import tuning

    monkeypatch.setattr(tuning, "_CHECKED_SYNTAXES", {})
    proposals = [
        ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"],  # a repeat
        [
            "1.2.840.10008.1.2.4.50",
            b"1.2.840.10008.1.2.4.70",
            "1.2.826.0.1.3680043.8.498.1",
        ],  # bytes, private
        ["1.2.840.10008.5.1.4.1.1.2", "", None],  # not a transfer syntax, empty, none
    ]
    for _ in range(2):  # the second round finds every good UID in the cache
        for proposal in proposals:
            ours, theirs = PresentationContext(), PresentationContext()
            for syntax in proposal:
                outcomes = []
                for add, context in (
                    (tuning._add_transfer_syntax, ours),
                    (tuning._original_add_transfer_syntax, theirs),
                ):
                    try:
                        add(context, syntax)
                        outcomes.append(None)
                    except ValueError:
                        outcomes.append("refused")
                assert outcomes[0] == outcomes[1], syntax
            assert ours.transfer_syntax == theirs.transfer_syntax
    assert "1.2.840.10008.1.2.1" in tuning._CHECKED_SYNTAXES
    assert "1.2.840.10008.5.1.4.1.1.2" not in tuning._CHECKED_SYNTAXES  # warned about: checked each time
    for odd in ("1.2.abc", "1.02.3", "1." + "2" * 70):  # non-conformant, or too long
        outcomes = []
        for add in (tuning._add_transfer_syntax, tuning._original_add_transfer_syntax):
            context = PresentationContext()
            try:
                add(context, odd)
                outcomes.append(context.transfer_syntax)
            except ValueError:
                outcomes.append("refused")
        assert outcomes[0] == outcomes[1], odd
        assert odd not in tuning._CHECKED_SYNTAXES


def test_the_transfer_syntax_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom.presentation import PresentationContext

    from dicom_node.net import tuning

    monkeypatch.setattr(tuning, "_CHECKED_SYNTAXES", {})
    monkeypatch.setattr(tuning, "_CHECKED_SYNTAXES_MAX", 5)
    context = PresentationContext()
    for k in range(20):
        tuning._add_transfer_syntax(context, f"1.2.826.0.1.3680043.8.498.{k + 1}")
    assert len(tuning._CHECKED_SYNTAXES) == 5
    assert len(context.transfer_syntax) == 20


def test_the_reactor_takes_no_message_while_a_call_holds_it_paused() -> None:
    """An association's own reactor gets nothing off the DIMSE queue while a send_*() call
    has cleared its checkpoint (the call takes its response); it gets it once the call is
    done, and any other thread gets it as pynetdicom's get_msg gives it."""
    import threading

    from pynetdicom.dimse import DIMSEServiceProvider

    from dicom_node.net.tuning import tune_pynetdicom

    tune_pynetdicom()

    class Reactor(threading.Thread):
        def __init__(self) -> None:
            super().__init__()
            self._reactor_checkpoint = threading.Event()
            self.dimse_timeout = 1
            self.got: object = "not run"

        def run(self) -> None:
            self.got = self.dimse.get_msg(block=False)

    reactor = Reactor()
    reactor.dimse = DIMSEServiceProvider(reactor)  # type: ignore[arg-type,attr-defined]
    reactor.dimse.msg_queue.put((1, "C-STORE-RSP"))  # type: ignore[attr-defined]
    reactor.start()
    reactor.join(5)
    assert reactor.got == (None, None)  # paused by a call: the response is the call's
    assert reactor.dimse.get_msg(block=False) == (1, "C-STORE-RSP")  # type: ignore[attr-defined]

    again = Reactor()
    again.dimse = DIMSEServiceProvider(again)  # type: ignore[arg-type,attr-defined]
    again.dimse.msg_queue.put((3, "C-ECHO-RQ"))  # type: ignore[attr-defined]
    again._reactor_checkpoint.set()  # no call in progress: the reactor serves what comes
    again.start()
    again.join(5)
    assert again.got == (3, "C-ECHO-RQ")


def test_back_to_back_c_stores_never_lose_a_response_to_the_reactor() -> None:
    """2 000 C-STOREs in quick succession to a local pynetdicom SCP, 50 per association:
    every one answered. Before the reactor guard, a request sent straight after the
    previous call's end could have its response taken by the reactor, which had not yet
    noticed the new pause (1-7 in 2 000 here, each a DIMSE timeout)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE, evt

    from dicom_node.lab.localpeers import free_port
    from dicom_node.net.tuning import tune_pynetdicom

    tune_pynetdicom()
    port = free_port()
    scp = AE("PEER")
    scp.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)])
    try:
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.PatientName = "SIMULATED"
        ds.file_meta = Dataset()  # type: ignore[assignment]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        scu = AE("SCU")
        scu.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        scu.dimse_timeout = 2
        unanswered = 0
        for _ in range(40):
            assoc = scu.associate("127.0.0.1", port, evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open)])
            assert assoc.is_established
            for _ in range(50):
                ds.SOPInstanceUID = generate_uid()
                if "Status" not in assoc.send_c_store(ds):
                    unanswered += 1
                    break
            if assoc.is_established:
                assoc.release()
        assert unanswered == 0
    finally:
        server.shutdown()
