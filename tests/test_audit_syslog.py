"""Audit records to a syslog collector over TLS: RFC 5424 format, RFC 5425 framing, the
TLS client (trust, IP SANs, mutual TLS) and the forwarder (order, pointer, outages),
against a real loopback TLS listener."""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trustme

from audit import AuditEvent, AuditRecord, AuditTrail, Outcome
from audit.syslog import AuditForwarder, SyslogTlsSender
from audit.syslog.forwarder import read_state, write_state
from audit.syslog.messages import (
    BOM,
    CHECKPOINT_MSGID,
    DEFAULT_MSGID,
    SD_ID,
    format_checkpoint,
    format_rfc5424,
    frame_rfc5425,
    sd_escape,
)

pytestmark = pytest.mark.timeout(60)

# --------------------------------------------------------------------------------------
# A minimal RFC 5425 collector
# --------------------------------------------------------------------------------------


def take_frames(buf: bytearray) -> list[bytes]:
    """Remove and return every complete ``MSG-LEN SP MSG`` frame at the start of ``buf``."""
    frames: list[bytes] = []
    while True:
        space = buf.find(b" ")
        if space < 0:
            assert len(buf) < 10, f"no MSG-LEN in {bytes(buf[:20])!r}"
            return frames
        assert re.fullmatch(rb"[1-9][0-9]*", bytes(buf[:space])), bytes(buf[: space + 1])
        length = int(buf[:space])
        if len(buf) < space + 1 + length:
            return frames
        frames.append(bytes(buf[space + 1 : space + 1 + length]))
        del buf[: space + 1 + length]


class Listener:
    """A TLS syslog listener on 127.0.0.1 that collects RFC 5425 frames.

    It reads ``read_size`` bytes at a time, so frames arrive split across reads.
    """

    def __init__(self, context: ssl.SSLContext, port: int = 0, read_size: int = 61) -> None:
        self.context = context
        self.port = port
        self.read_size = read_size
        self.messages: list[bytes] = []
        self.handshake_errors: list[BaseException] = []
        self.peer_certs: list[Any] = []
        self.split_reads = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sock: socket.socket | None = None

    def start(self) -> Listener:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        sock.settimeout(0.05)
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._accept, args=(sock,), daemon=True)]
        self._threads[0].start()
        return self

    def _accept(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except OSError as exc:
            with self._cond:
                self.handshake_errors.append(exc)
                self._cond.notify_all()
            raw.close()
            return
        self.peer_certs.append(tls.getpeercert())
        tls.settimeout(0.05)
        buf = bytearray()
        with tls:
            while not self._stopping.is_set():
                try:
                    data = tls.recv(self.read_size)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                buf += data
                frames = take_frames(buf)
                with self._cond:
                    self.split_reads += bool(buf)
                    self.messages += frames
                    self._cond.notify_all()

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        for thread in self._threads:
            thread.join(2)

    def wait_for(self, predicate: Callable[[Listener], bool], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def wait_messages(self, count: int, timeout: float = 5.0) -> list[bytes]:
        assert self.wait_for(lambda s: len(s.messages) >= count, timeout), (
            f"expected {count} messages, got {len(self.messages)}"
        )
        return list(self.messages)


# --------------------------------------------------------------------------------------
# A minimal RFC 5424 parser
# --------------------------------------------------------------------------------------


@dataclass
class Parsed:
    pri: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    sd: dict[str, dict[str, str]]
    msg: bytes

    @property
    def seq(self) -> int:
        return int(self.sd[SD_ID]["seq"])

    def payload(self) -> Any:
        assert self.msg.startswith(BOM)
        return json.loads(self.msg[len(BOM) :].decode("utf-8"))


def parse_5424(raw: bytes) -> Parsed:
    m = re.match(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) ", raw)
    assert m, raw[:120]
    header = [g.decode("ascii") for g in m.groups()]
    pos = m.end()
    sd: dict[str, dict[str, str]] = {}
    if raw[pos : pos + 1] == b"-":
        pos += 1
    while raw[pos : pos + 1] == b"[":
        end = pos + 1
        while raw[end] not in b" ]":
            end += 1
        sd_id = raw[pos + 1 : end].decode("ascii")
        pos = end
        params: dict[str, str] = {}
        while raw[pos : pos + 1] == b" ":
            eq = raw.index(b"=", pos)
            name = raw[pos + 1 : eq].decode("ascii")
            assert raw[eq + 1 : eq + 2] == b'"'
            pos = eq + 2
            value = bytearray()
            while True:
                c = raw[pos]
                if c == 0x5C and raw[pos + 1] in b'"\\]':
                    value.append(raw[pos + 1])
                    pos += 2
                elif c == 0x22:
                    pos += 1
                    break
                else:
                    assert c != 0x5D, "unescaped ] in a PARAM-VALUE"
                    value.append(c)
                    pos += 1
            params[name] = value.decode("utf-8")
        assert raw[pos : pos + 1] == b"]"
        pos += 1
        sd[sd_id] = params
    rest = raw[pos:]
    assert rest == b"" or rest.startswith(b" ")
    timestamp, hostname, app_name, procid, msgid = header[1:]
    return Parsed(int(header[0]), timestamp, hostname, app_name, procid, msgid, sd=sd, msg=rest[1:])


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *identities: str, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*identities).configure_cert(context)
    if require_client_cert:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture(scope="module")
def collector_context(ca: trustme.CA) -> ssl.SSLContext:
    return server_context(ca, "127.0.0.1", "localhost")


@pytest.fixture
def listener(collector_context: ssl.SSLContext) -> Iterator[Listener]:
    server = Listener(collector_context).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[AuditTrail]:
    audit = AuditTrail(f"sqlite:///{tmp_path}/audit.db", actor="test")
    try:
        yield audit
    finally:
        audit.dispose()


def sender_for(server: Listener, ca_file: str, **kwargs: Any) -> SyslogTlsSender:
    return SyslogTlsSender("127.0.0.1", server.port, cafile=ca_file, connect_timeout=3, timeout=3, **kwargs)


def forwarder(trail: AuditTrail, sender: Any, tmp_path: Path, **kwargs: Any) -> AuditForwarder:
    kwargs.setdefault("checkpoint_every", 0)
    return AuditForwarder(
        trail, sender, tmp_path / "state" / "syslog.json", app_name="dicom-node", hostname="node1", **kwargs
    )


def record_some(trail: AuditTrail) -> None:
    trail.record(AuditEvent.APPLICATION_START, version="1.0")
    trail.record(
        AuditEvent.INSTANCE_STORED,
        study_uid="1.2.3",
        patient_id="PAT-1",
        calling_ae="MODALITY",
        called_ae="NODE",
        peer_host="10.0.0.5",
        note='Müller^Jörg\nline two\r\n東京 ✓ "quoted" ]',
    )
    trail.record(AuditEvent.INSTANCE_REJECTED, Outcome.MINOR_FAILURE, reason="bad SOP class")
    trail.record(AuditEvent.DELIVERY_DEAD_LETTER, Outcome.SERIOUS_FAILURE, attempts=9)
    trail.record(AuditEvent.SECURITY_ALERT, Outcome.MAJOR_FAILURE, detail="x")


def check_message(raw: bytes, record: AuditRecord) -> None:
    parsed = parse_5424(raw)
    severity = {0: 5, 4: 4, 8: 3, 12: 3}[record.outcome]
    assert parsed.pri == 10 * 8 + severity
    assert (parsed.hostname, parsed.app_name, parsed.procid, parsed.msgid) == (
        "node1",
        "dicom-node",
        "-",
        DEFAULT_MSGID,
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", parsed.timestamp)
    assert parsed.sd[SD_ID] == {
        "seq": str(record.seq),
        "hash": record.hash,
        "prev_hash": record.prev_hash,
        "event": record.event,
        "outcome": str(record.outcome),
    }
    assert parsed.msg.startswith(BOM)
    assert parsed.payload() == asdict(record)


# --------------------------------------------------------------------------------------
# Format and framing
# --------------------------------------------------------------------------------------

RECORD = AuditRecord(
    seq=7,
    at=1714564800.123456,
    event="instance-stored",
    outcome=0,
    study_uid=None,
    patient_id=None,
    calling_ae=None,
    called_ae=None,
    peer_host=None,
    actor=None,
    facts={},
    prev_hash="a" * 64,
    hash="b" * 64,
)


def test_header_pri_and_timestamp() -> None:
    for outcome, pri in ((0, 85), (4, 84), (8, 83), (12, 83)):
        raw = format_rfc5424(replace(RECORD, outcome=outcome), app_name="app", hostname="h", payload="x")
        assert raw.startswith(f"<{pri}>1 2024-05-01T12:00:00.123456Z h app - IHE+RFC-3881 [".encode())
    raw = format_rfc5424(RECORD, app_name=None, hostname="", payload="", msgid=None, procid="7")
    assert raw.startswith(b'<85>1 2024-05-01T12:00:00.123456Z - - 7 - [dicomnode@32473 seq="7" ')
    assert raw.endswith(b"] " + BOM)


def test_header_field_rules() -> None:
    ok = format_rfc5424(RECORD, app_name="a" * 48, hostname="h" * 255, payload="x", msgid="m" * 32)
    assert b" " + b"a" * 48 + b" " in ok
    bad: list[dict[str, Any]] = [
        {"app_name": "a" * 49},
        {"hostname": "h" * 256},
        {"msgid": "m" * 33},
        {"hostname": "two words"},
        {"hostname": "hôte"},
        {"app_name": "tab\there"},
    ]
    for override in bad:
        kwargs: dict[str, Any] = {"app_name": "app", "hostname": "h", "payload": "x", **override}
        with pytest.raises(ValueError):
            format_rfc5424(RECORD, **kwargs)
    with pytest.raises(ValueError):
        AuditForwarder(Any, None, "unused.json", app_name="a" * 49, hostname="h")  # type: ignore[arg-type]


def test_sd_param_escaping() -> None:
    tricky = 'a"b\\c]d [x=y]'
    assert sd_escape(tricky) == 'a\\"b\\\\c\\]d [x=y\\]'
    raw = format_rfc5424(replace(RECORD, event=tricky), app_name="app", hostname="h", payload="p")
    assert b'event="a\\"b\\\\c\\]d [x=y\\]"' in raw
    assert parse_5424(raw).sd[SD_ID]["event"] == tricky


def test_framing_of_newlines_and_non_ascii() -> None:
    payload = "line one\nline two\r\nMüller 東京 ✓"
    message = format_rfc5424(RECORD, app_name="app", hostname="h", payload=payload)
    assert message.endswith(BOM + payload.encode("utf-8"))
    frame = frame_rfc5425(message)
    assert frame == str(len(message)).encode() + b" " + message
    assert len(message) > len(message.decode("utf-8"))  # counted in octets, not characters
    buf = bytearray(frame + frame_rfc5425(b"x"))
    assert take_frames(buf) == [message, b"x"] and not buf
    with pytest.raises(ValueError):
        frame_rfc5425(b"")


def test_checkpoint_message() -> None:
    parsed = parse_5424(format_checkpoint(9, "c" * 64, app_name="app", hostname="h", at=RECORD.at))
    assert (parsed.pri, parsed.msgid) == (85, CHECKPOINT_MSGID)
    assert parsed.sd[SD_ID] == {"seq": "9", "hash": "c" * 64, "event": "checkpoint"}
    assert parsed.payload() == {"checkpoint": {"seq": 9, "hash": "c" * 64}}


# --------------------------------------------------------------------------------------
# Over a real TLS connection
# --------------------------------------------------------------------------------------


def test_ships_every_record_in_order_once(
    trail: AuditTrail, listener: Listener, ca_file: str, tmp_path: Path
) -> None:
    record_some(trail)
    records = trail.events()
    sender = sender_for(listener, ca_file)
    fwd = forwarder(trail, sender, tmp_path, batch_size=2)
    assert fwd.ship_once() == 5
    messages = listener.wait_messages(5)
    assert len(messages) == 5
    for raw, record in zip(messages, records, strict=True):
        check_message(raw, record)
    assert listener.split_reads > 0  # frames did arrive split across reads
    assert json.loads((tmp_path / "state" / "syslog.json").read_text()) == {"last_seq": 5}
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["syslog.json"]
    status = fwd.status
    assert (status.last_shipped_seq, status.pending, status.last_error) == (5, 0, None)
    assert fwd.ship_once() == 0
    sender.close()

    # A second forwarder from the same state file sends nothing old, then only the new one.
    second = forwarder(trail, sender_for(listener, ca_file), tmp_path)
    assert second.last_shipped_seq == 5
    assert second.ship_once() == 0
    trail.record(AuditEvent.QUERY, level="STUDY")
    assert second.ship_once() == 1
    messages = listener.wait_messages(6)
    time.sleep(0.1)
    assert [parse_5424(m).seq for m in listener.messages] == [1, 2, 3, 4, 5, 6]
    check_message(messages[5], trail.events()[5])
    assert read_state(tmp_path / "state" / "syslog.json") == 6
    second.stop(1)


def test_collector_outage_loses_nothing_and_duplicates_nothing(
    trail: AuditTrail, listener: Listener, ca_file: str, tmp_path: Path
) -> None:
    fwd = forwarder(
        trail, sender_for(listener, ca_file), tmp_path, poll_seconds=0.05, retry_initial=0.05, retry_max=0.2
    )
    fwd.start()
    try:
        for i in range(3):
            trail.record(AuditEvent.JOB_TRANSITION, step=i)
        listener.wait_messages(3)
        deadline = time.monotonic() + 5
        while fwd.status.last_shipped_seq < 3 and time.monotonic() < deadline:
            time.sleep(0.01)

        listener.stop()  # the collector goes away, closing the open connection
        for i in range(3, 7):
            trail.record(AuditEvent.JOB_TRANSITION, step=i)
        deadline = time.monotonic() + 5
        while fwd.status.consecutive_failures < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        status = fwd.status
        assert status.consecutive_failures >= 2 and status.last_error, status
        assert "Connection" in status.last_error or "refused" in status.last_error.lower()
        assert status.last_shipped_seq == 3 and status.pending == 4
        assert read_state(tmp_path / "state" / "syslog.json") == 3
        assert len(listener.messages) == 3

        trail.record(AuditEvent.JOB_TRANSITION, step=7)
        listener.start()  # back, on the same port
        messages = listener.wait_messages(8)
        deadline = time.monotonic() + 5
        while fwd.status.last_error is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fwd.status.last_error is None and fwd.status.last_shipped_seq == 8
    finally:
        fwd.stop(2)
    time.sleep(0.1)
    assert [parse_5424(m).seq for m in listener.messages] == list(range(1, 9))
    for raw, record in zip(messages, trail.events(), strict=True):
        check_message(raw, record)
    assert read_state(tmp_path / "state" / "syslog.json") == 8
    assert not fwd.status.running


def test_untrusted_collector_fails_handshake(trail: AuditTrail, listener: Listener, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    sender = sender_for(listener, str(other))
    with pytest.raises(ssl.SSLCertVerificationError):
        sender.send([frame_rfc5425(b"hello")])

    record_some(trail)
    fwd = forwarder(trail, sender, tmp_path)
    assert fwd.ship_once() == 0
    status = fwd.status
    assert status.last_error and "CERTIFICATE_VERIFY_FAILED" in status.last_error
    assert status.last_shipped_seq == 0 and status.pending == 5
    assert not (tmp_path / "state" / "syslog.json").exists()
    assert listener.messages == []


def test_ip_literal_is_checked_against_ip_san(ca: trustme.CA, ca_file: str) -> None:
    server = Listener(server_context(ca, "collector.example")).start()
    try:
        sender = sender_for(server, ca_file)
        assert sender.verifies_ip
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            sender.send([frame_rfc5425(b"x")])
        named = sender_for(server, ca_file, server_hostname="collector.example")
        assert not named.verifies_ip
        named.send([frame_rfc5425(b"by name")])
        assert server.wait_messages(1) == [b"by name"]
        named.close()
        wrong = sender_for(server, ca_file, server_hostname="other.example")
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            wrong.send([frame_rfc5425(b"x")])
    finally:
        server.stop()


def test_mutual_tls(trail: AuditTrail, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    server = Listener(server_context(ca, "127.0.0.1", require_client_cert=True)).start()
    try:
        record_some(trail)
        # Without a client certificate the collector refuses us, and nothing counts as shipped.
        anonymous = forwarder(trail, sender_for(server, ca_file), tmp_path)
        assert anonymous.ship_once() == 0
        assert anonymous.status.last_error and "SSLError" in anonymous.status.last_error
        assert anonymous.last_shipped_seq == 0
        assert server.wait_for(lambda s: bool(s.handshake_errors))
        assert server.messages == []

        client_pem = tmp_path / "client.pem"
        ca.issue_cert("dicom-node.example").private_key_and_cert_chain_pem.write_to_path(str(client_pem))
        sender = sender_for(server, ca_file, certfile=str(client_pem))
        fwd = forwarder(trail, sender, tmp_path)
        assert fwd.ship_once() == 5
        messages = server.wait_messages(5)
        assert [parse_5424(m).seq for m in messages] == [1, 2, 3, 4, 5]
        assert server.peer_certs[-1]["subjectAltName"] == (("DNS", "dicom-node.example"),)
        fwd.stop(1)
    finally:
        server.stop()


# --------------------------------------------------------------------------------------
# The forwarder with an injected sender
# --------------------------------------------------------------------------------------


class FakeSender:
    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.fail: Exception | None = None
        self.closed = 0

    def send(self, frames: list[bytes]) -> None:
        if self.fail is not None:
            raise self.fail
        self.batches.append(list(frames))

    def close(self) -> None:
        self.closed += 1

    def messages(self) -> list[Parsed]:
        buf = bytearray(b"".join(f for batch in self.batches for f in batch))
        parsed = [parse_5424(m) for m in take_frames(buf)]
        assert not buf
        return parsed


def test_checkpoints_every_n(trail: AuditTrail, tmp_path: Path) -> None:
    for i in range(7):
        trail.record(AuditEvent.JOB_TRANSITION, step=i)
    records = trail.events()
    sender = FakeSender()
    fwd = forwarder(trail, sender, tmp_path, batch_size=2, checkpoint_every=3)
    assert fwd.ship_once() == 7
    parsed = sender.messages()
    kinds = [(p.msgid, p.seq) for p in parsed]
    assert kinds == [
        (DEFAULT_MSGID, 1),
        (DEFAULT_MSGID, 2),
        (DEFAULT_MSGID, 3),
        (CHECKPOINT_MSGID, 3),
        (DEFAULT_MSGID, 4),
        (DEFAULT_MSGID, 5),
        (DEFAULT_MSGID, 6),
        (CHECKPOINT_MSGID, 6),
        (DEFAULT_MSGID, 7),
    ]
    assert parsed[3].payload() == {"checkpoint": {"seq": 3, "hash": records[2].hash}}
    assert parsed[7].payload() == {"checkpoint": {"seq": 6, "hash": records[5].hash}}
    assert len(sender.batches) == 4


def test_failed_batch_keeps_pointer_and_resends_whole_batch(trail: AuditTrail, tmp_path: Path) -> None:
    for i in range(5):
        trail.record(AuditEvent.JOB_TRANSITION, step=i)
    sender = FakeSender()
    fwd = forwarder(trail, sender, tmp_path, batch_size=2, payload=lambda r: f"seq {r.seq}")
    assert fwd.ship_once() == 5
    trail.record(AuditEvent.JOB_TRANSITION, step=5)
    sender.fail = ConnectionResetError("reset by peer")
    assert fwd.ship_once() == 0
    assert fwd.status.last_error == "ConnectionResetError: reset by peer"
    assert fwd.status.pending == 1 and read_state(fwd.state_file) == 5
    sender.fail = None
    assert fwd.ship_once() == 1
    assert [p.seq for p in sender.messages()] == [1, 2, 3, 4, 5, 6]
    assert sender.messages()[5].msg == BOM + b"seq 6"
    assert fwd.status.last_error is None and fwd.status.consecutive_failures == 0


def test_stop_ships_what_is_pending(trail: AuditTrail, tmp_path: Path) -> None:
    sender = FakeSender()
    fwd = forwarder(trail, sender, tmp_path, poll_seconds=30)
    fwd.start()
    assert fwd.status.running
    time.sleep(0.05)
    for i in range(3):
        trail.record(AuditEvent.JOB_TRANSITION, step=i)
    started = time.monotonic()
    fwd.stop(5)
    assert time.monotonic() - started < 2
    assert not fwd.status.running and sender.closed == 1
    assert [p.seq for p in sender.messages()] == [1, 2, 3]
    assert read_state(fwd.state_file) == 3


def test_state_file(trail: AuditTrail, tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    assert read_state(state) == 0
    write_state(state, 42)
    assert json.loads(state.read_text()) == {"last_seq": 42}
    assert not list(tmp_path.glob(".s.json.*"))  # no temp file left behind

    # Ahead of the log (a replaced database): refuse, report, send nothing.
    trail.record(AuditEvent.QUERY)
    sender = FakeSender()
    fwd = AuditForwarder(trail, sender, state, hostname="h")
    assert fwd.ship_once() == 0
    assert fwd.status.last_error and "ends at seq 1" in fwd.status.last_error
    assert sender.batches == []

    state.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        read_state(state)
    state.write_text('{"last_seq": -1}')
    with pytest.raises(ValueError):
        AuditForwarder(trail, sender, state, hostname="h")
