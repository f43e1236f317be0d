"""Even load over a node's receiving processes (``dicom_node.net.balance``, issue 19).

The board's bookkeeping on its own, then two receivers sharing one plain and one TLS port
(in one process, as two receiving processes would: SO_REUSEPORT, one board): whichever
socket the kernel picks, associations held open end up spread evenly, and a sibling that
is gone or deaf never costs a connection.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from audit import AuditTrail
from dicom_node.config import NodeConfig
from dicom_node.ingest.receiver import Receiver
from dicom_node.net.balance import ROWS, LoadBoard
from dicom_node.net.tuning import tune_pynetdicom
from dicom_node.paths import NodePaths
from dicom_node.runtime import Runtime
from dicom_node.web.metrics import NodeCollector
from tests.peers import free_port
from tests.test_tls import Pki, client, pki, tls_section  # noqa: F401  (pki: the fixture)


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_rows_are_taken_lowest_first_and_a_dead_process_frees_its_own(tmp_path: Path) -> None:
    path = tmp_path / "board"
    LoadBoard.reset(path)
    me, parent = LoadBoard(path), LoadBoard(path)
    assert me.join() == 0
    assert parent.join(pid=os.getppid()) == 1
    dead = LoadBoard(path)
    assert dead.join(pid=_gone_pid()) == 2
    later = LoadBoard(path)
    assert later.join(pid=os.getppid()) == 2, "the row of a process that is gone is free again"
    me.leave()
    assert LoadBoard(path).join(pid=os.getppid()) == 0, "and so is one left"


def test_a_connection_in_flight_counts_for_the_row_it_goes_to(tmp_path: Path) -> None:
    path = tmp_path / "board"
    LoadBoard.reset(path)
    a, b = LoadBoard(path), LoadBoard(path)
    a.join(), b.join(pid=os.getppid())
    a.publish(3)
    b.publish(1)
    assert a.lighter_than(3) == [(1, os.getppid())]
    assert b.lighter_than(1) == [], "only a sibling with fewer connections takes one"
    a.handed(1)
    a.handed(1)
    assert a.load(1) == 3 and a.lighter_than(3) == [], "two on their way: b is as busy as a"
    b.taken(0)
    b.publish(2)
    assert a.load(1) == 3, "taken: now in b's own count, not twice"
    # b's process goes and another takes its row: what was on its way to b is not owed
    b.leave()
    c = LoadBoard(path)
    assert c.join(pid=os.getppid()) == 1
    assert a.load(1) == 0


# -- two receivers on shared ports --------------------------------------------------------


def _receiver(home: Path, plain: int, tls: int, certs: Pki, name: str) -> tuple[Receiver, AuditTrail]:
    config = NodeConfig.model_validate(
        {
            "node": {"port": plain, "receivers": 2},
            "tls": tls_section(certs, port=tls).model_dump(),
            "callers": [{"ae_title": "WORKSTATION"}],
        }
    )
    audit = AuditTrail(f"sqlite:///{home / f'audit-{name}.db'}")
    # C-ECHO and association policy only: no instance is stored, so no store (nor staging).
    store = cast(Any, SimpleNamespace(stager=lambda: None))
    return Receiver(config, NodePaths.for_home(home, config), store, audit), audit


@pytest.fixture
def pair(pki: Pki, tmp_path: Path) -> Iterator[tuple[Receiver, Receiver, int, int]]:  # noqa: F811
    plain, tls = free_port(), free_port()
    (one, audit_one), (two, audit_two) = (
        _receiver(tmp_path, plain, tls, pki, "one"),
        _receiver(tmp_path, plain, tls, pki, "two"),
    )
    one.board_path.parent.mkdir(parents=True, exist_ok=True)
    LoadBoard.reset(one.board_path)
    one.start()
    two.start()
    try:
        yield one, two, plain, tls
    finally:
        two.stop()
        one.stop()
        audit_one.dispose()
        audit_two.dispose()


def _associations(receiver: Receiver) -> int:
    return sum(1 for s in receiver._servers for a in s.active_associations if a.is_established)


def _associate(port: int, tls_args: Any = None) -> Any:
    tune_pynetdicom()
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE", tls_args=tls_args)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    return assoc


def test_associations_held_open_are_spread_evenly_plain_and_tls(
    pair: tuple[Receiver, Receiver, int, int],
    pki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    one, two, plain, tls = pair
    held = [_associate(plain) for _ in range(4)]
    assert sorted([_associations(one), _associations(two)]) == [2, 2]
    tls_args = (client(pki, pki.rogue, tmp_path), "localhost")  # any certificate of the CA
    held += [_associate(tls, tls_args) for _ in range(4)]
    assert [_associations(one), _associations(two)] == [4, 4], "TLS connections go over unopened, too"
    # what /metrics shows an operator: each receiving process's open connections
    rt = Runtime.open(None, tmp_path / "metrics-home", {})
    try:
        collector = NodeCollector(
            rt.db,
            rt.audit,
            tmp_path,
            tmp_path / "checkpoints",
            connections_by_process=one.connections_by_process,
        )
        family = next(f for f in collector.collect() if f.name == "dicomnode_receiver_connections_open")
        assert sorted((s.labels["receiver"], s.value) for s in family.samples) == [("0", 4), ("1", 4)]
    finally:
        rt.close()
    balancers = [one._balancer, two._balancer]
    assert all(b is not None for b in balancers)
    moved = sum(b.handed_off for b in balancers if b is not None)
    assert moved == sum(b.taken_in for b in balancers if b is not None)
    for assoc in held:
        assoc.release()


def test_a_sibling_that_is_gone_or_deaf_costs_no_connection(
    pair: tuple[Receiver, Receiver, int, int],
) -> None:
    one, two, plain, _ = pair
    b1, b2 = one._balancer, two._balancer
    assert b1 is not None and b2 is not None
    # two's row names a running process that has no socket bound (as after its intake
    # thread failed): what one sends there is refused
    b1.board._set(b2.board.row, 0, os.getppid())
    # one is the busier (the kernel decides who accepts what, so say so here): its hand-off
    # is refused, and it keeps the connection
    counted, b1.connections = b1.connections, lambda: 5
    mine, other = socket.socketpair()
    try:
        assert b1.hand_off(plain, mine) is False
        assert b1.refused == 1 and b1.handed_off == 0
    finally:
        mine.close()
        other.close()
    b1.connections = counted
    held = [_associate(plain) for _ in range(6)]  # whoever the kernel picks, each is served
    assert _associations(one) + _associations(two) == len(held)
    for assoc in held:
        assoc.release()
    b1.board._set(b2.board.row, 0, os.getpid())
    two.stop()  # gone: off the board, its port closed
    held = [_associate(plain) for _ in range(3)]
    assert _associations(one) == 3
    for assoc in held:
        assoc.release()


def test_a_board_that_cannot_be_joined_leaves_receiving_as_it_was(pki: Pki, tmp_path: Path) -> None:  # noqa: F811
    plain, tls = free_port(), free_port()
    receiver, audit = _receiver(tmp_path, plain, tls, pki, "full")
    receiver.board_path.parent.mkdir(parents=True, exist_ok=True)
    LoadBoard.reset(receiver.board_path)
    for _ in range(ROWS):  # every row taken by a running process
        LoadBoard(receiver.board_path).join(pid=os.getppid())
    receiver.start()
    try:
        assert receiver._balancer is None and receiver.connections_by_process() is None
        _associate(plain).release()
    finally:
        receiver.stop()
        audit.dispose()
