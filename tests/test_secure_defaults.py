"""Issue 15, item 4: secure defaults.

* A node that listens beyond loopback refuses to start unless it requires known callers
  and its own called AE title, or ``accept_unknown_callers`` says otherwise, knowingly.
* Host names in a caller's ``hosts`` match the addresses they resolve to (cached for
  ``caller_hosts_refresh_seconds``; one that does not resolve matches nothing, warned once).
* A calling AE title with line breaks cannot forge a line of the log file.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import Caller, NodeConfig
from dicom_node.ingest.receiver import Receiver
from dicom_node.net.hostnames import HostNames, parse_address
from dicom_node.runtime import Runtime, setup_logging
from dicom_node.serve import exposure_problem, is_loopback
from tests.peers import NODE_ENV, NodeProcess, free_port


def config(host: str = "127.0.0.1", **receiver: Any) -> NodeConfig:
    callers = receiver.pop("callers", ())
    return NodeConfig.model_validate({"node": {"host": host}, "receiver": receiver, "callers": callers})


# -- refusing to start exposed ---------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_keeps_the_easy_default(host: str) -> None:
    assert is_loopback(host)
    assert exposure_problem(config(host)) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.20.30.40"])
def test_beyond_loopback_with_the_defaults_is_refused_saying_what_to_set(host: str) -> None:
    assert not is_loopback(host)
    problem = exposure_problem(config(host))
    assert problem is not None
    assert problem.startswith(f"[node] host = {host!r} listens beyond loopback")
    assert "require_known_callers and require_called_ae are off" in problem
    assert "any AE from any host could store here" in problem
    assert "list the senders under [[callers]]" in problem
    assert "set [receiver] require_known_callers = true and require_called_ae = true" in problem
    assert problem.endswith("or set [receiver] accept_unknown_callers = true to accept that knowingly")
    assert "\n" not in problem


def test_each_missing_setting_is_named_alone() -> None:
    known = [{"ae_title": "CT1", "hosts": ["10.0.0.5"]}]
    only_called = exposure_problem(config("0.0.0.0", require_known_callers=True, callers=known))
    assert only_called is not None
    assert "require_called_ae is off" in only_called and "require_known_callers" not in only_called
    assert "[[callers]]" not in only_called, "the callers are listed already"
    only_known = exposure_problem(config("0.0.0.0", require_called_ae=True, callers=known))
    assert only_known is not None and "require_known_callers is off" in only_known


@pytest.mark.parametrize(
    "receiver",
    [
        {"require_known_callers": True, "require_called_ae": True, "callers": [{"ae_title": "CT1"}]},
        {"accept_unknown_callers": True},
        {"accept_unknown_callers": True, "require_called_ae": True},
    ],
    ids=["known-callers", "accepted-knowingly", "accepted-with-called-ae"],
)
def test_beyond_loopback_starts_when_callers_are_known_or_accepted(receiver: dict[str, Any]) -> None:
    assert exposure_problem(config("0.0.0.0", **receiver)) is None


def serve_argv(home: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dicom_node", "serve", "--home", str(home), "--web-port", "0", *extra]


@pytest.mark.integration
def test_serve_on_all_interfaces_exits_2_before_binding_anything(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        serve_argv(tmp_path / "home", "--host", "0.0.0.0", "--port", str(port)),
        capture_output=True,
        text=True,
        timeout=120,
        env=NODE_ENV,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "config error: [node] host = '0.0.0.0' listens beyond loopback, but [receiver] "
        "require_known_callers and require_called_ae are off: any AE from any host could store here; "
        "list the senders under [[callers]] and set [receiver] require_known_callers = true and "
        "require_called_ae = true, or set [receiver] accept_unknown_callers = true to accept that knowingly"
    ]
    assert not (tmp_path / "home" / "var" / "run" / "serve.pid").exists(), "refused before taking the home"
    with socket.socket() as probe:  # nothing was listening on the port, nor is now
        probe.bind(("0.0.0.0", port))


@pytest.mark.integration
def test_serve_on_all_interfaces_starts_when_accepted_knowingly(tmp_path: Path) -> None:
    node = NodeProcess(
        tmp_path / "node", "[workers]\nprocesses = 0\n[receiver]\naccept_unknown_callers = true\n"
    )
    node.config_path.write_text(node.config_path.read_text() + '[node]\nhost = "0.0.0.0"\n')
    node.start(timeout=60)
    try:
        assert "receiver listening on 0.0.0.0:" in node.log_text()
    finally:
        node.stop()
    assert node.proc is not None and node.proc.returncode == 0


# -- caller host names ------------------------------------------------------------------


class CountingResolver:
    def __init__(self, answers: dict[str, set[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, name: str) -> frozenset[Any]:
        self.asked.append(name)
        found = (parse_address(a) for a in self.answers.get(name, set()))
        return frozenset(a for a in found if a is not None)


def test_a_name_matches_the_addresses_it_resolves_to_and_is_resolved_once_per_period() -> None:
    resolver = CountingResolver({"ct1.ward.example": {"10.0.0.5", "fd00::5"}})
    names = HostNames(refresh_seconds=0.3, resolve=resolver)
    assert names.matches("ct1.ward.example", "10.0.0.5")
    assert names.matches("CT1.ward.example", "::ffff:10.0.0.5"), "case and IPv4-mapped form do not matter"
    assert names.matches("ct1.ward.example", "fd00::5")
    assert not names.matches("ct1.ward.example", "10.0.0.6")
    assert resolver.asked == ["ct1.ward.example"], "one look-up while the cache is fresh"
    resolver.answers["ct1.ward.example"] = {"10.0.0.6"}  # the modality moved
    time.sleep(0.35)
    assert names.matches("ct1.ward.example", "10.0.0.6")
    assert not names.matches("ct1.ward.example", "10.0.0.5")
    assert resolver.asked == ["ct1.ward.example"] * 2


def test_addresses_are_compared_as_addresses_without_a_look_up() -> None:
    resolver = CountingResolver({})
    names = HostNames(refresh_seconds=300, resolve=resolver)
    assert names.matches("10.0.0.5", "::ffff:10.0.0.5")
    assert names.matches("fd00:0::5", "fd00::5")
    assert not names.matches("10.0.0.5", "10.0.0.50")
    assert resolver.asked == []


def test_a_name_that_does_not_resolve_matches_nothing_and_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = CountingResolver({})
    names = HostNames(refresh_seconds=0.05, resolve=resolver)
    with caplog.at_level(logging.WARNING, logger="dicom_node.net.hostnames"):
        for _ in range(3):
            assert not names.matches("gone.ward.example", "10.0.0.5")
            time.sleep(0.06)
    assert len(resolver.asked) == 3, "tried again each period"
    warned = [r.getMessage() for r in caplog.records if r.name == "dicom_node.net.hostnames"]
    assert warned == [
        "host name 'gone.ward.example' does not resolve: it matches no peer until it does "
        "(tried again every 0.05 s)"
    ]


def test_a_caller_given_by_host_name_is_allowed_from_its_address(tmp_path: Path) -> None:
    """``localhost`` resolves (through the system resolver) to 127.0.0.1."""
    runtime = Runtime.open(None, tmp_path / "home")
    try:
        cfg = runtime.config.model_copy(
            update={
                "callers": (Caller(ae_title="CT1", hosts=("localhost",)),),
                "receiver": runtime.config.receiver.model_copy(update={"require_known_callers": True}),
            }
        )
        receiver = Receiver(cfg, runtime.paths, store=None, audit=runtime.audit)  # type: ignore[arg-type]
        assert receiver.caller_allowed("CT1", "127.0.0.1") == (True, None)
        ok, why = receiver.caller_allowed("CT1", "10.0.0.9")
        assert not ok and why == "calling AE 'CT1' is not allowed from host 10.0.0.9"
        ok, why = receiver.caller_allowed("STRANGER", "127.0.0.1")
        assert not ok and why == "calling AE 'STRANGER' is not on the allow-list"
    finally:
        runtime.close()


# -- log lines cannot be forged -----------------------------------------------------------

_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +\S+\[\d+\] \S+: ")


def association_request(calling: bytes, called: bytes = b"DICOM_NODE") -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing Verification, titles as raw bytes."""

    def item(kind: int, data: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(data)) + data

    context = item(
        0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2")
    )
    user = item(0x50, struct.pack(">BBHI", 0x51, 0, 4, 16384))
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1") + context + user
    return struct.pack(">BBI", 1, 0, len(body)) + body


def send_request(port: int, calling: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(association_request(calling))
        return sock.recv(64)


FORGED = b"A\r\nFORGED RECORD"  # 16 bytes: what fits in an AE title


def assert_no_forged_line(log_text: str) -> None:
    lines = log_text.splitlines()
    assert lines, "the node logged"
    for line in lines:
        assert _RECORD.match(line), f"not a record of its own: {line!r}"
        assert not line.startswith("FORGED")


@pytest.fixture
def node_log(tmp_path: Path) -> Iterator[tuple[Runtime, Path]]:
    """This process logging as ``serve`` does (``setup_logging``), to a fresh home's log file."""
    runtime = Runtime.open(None, tmp_path / "home", {"receiver": {"require_known_callers": True}})
    root = logging.getLogger()
    before = list(root.handlers)
    saved = (root.level, warnings.showwarning, sys.excepthook, threading.excepthook)
    setup_logging(runtime.paths, runtime.config, to_stderr=False)
    try:
        yield runtime, runtime.paths.log_file
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved[0])
        warnings.showwarning, sys.excepthook, threading.excepthook = saved[1:]
        runtime.close()


def test_an_ae_title_with_a_line_break_is_one_line_of_the_log(
    node_log: tuple[Runtime, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom refuses control characters in AE titles while decoding; here its check is
    switched off, standing in for any peer text that gets past a library, so that the
    receiver's own rejection line is what carries the title to the log file."""
    from pynetdicom import _config

    monkeypatch.setitem(_config.VALIDATORS, "AE", lambda _value: (True, ""))
    runtime, log_file = node_log
    receiver = Receiver(runtime.config, runtime.paths, store=None, audit=runtime.audit)  # type: ignore[arg-type]
    receiver.start()
    port = receiver._servers[0].server_address[1]
    try:
        answer = send_request(port, FORGED)
    finally:
        receiver.stop()
    assert answer[:1] == b"\x03", "A-ASSOCIATE-RJ: the caller is not on the allow-list"
    text = log_file.read_text()
    rejected = [line for line in text.splitlines() if "rejected: calling AE" in line]
    assert rejected == [next(line for line in text.splitlines() if line.endswith("is not on the allow-list"))]
    assert "association from A\\x0d\\x0aFORGED RECORD@127.0.0.1 rejected" in rejected[0]
    assert_no_forged_line(text)


@pytest.mark.integration
def test_a_real_node_logs_no_forged_line_for_such_a_title(tmp_path: Path) -> None:
    """The same request to a real ``serve``: refused while decoding (pynetdicom's check), and
    every line of its log file is a record of its own."""
    node = NodeProcess(
        tmp_path / "node", "[workers]\nprocesses = 0\n[receiver]\nrequire_known_callers = true\n"
    ).start()
    try:
        assert send_request(node.port, FORGED)[:1] in (b"\x03", b"\x07", b"")
        time.sleep(0.5)
    finally:
        node.stop()
    text = (node.home / "var" / "log" / "dicom-node.log").read_text()
    assert "stopped cleanly" in text
    assert_no_forged_line(text)
