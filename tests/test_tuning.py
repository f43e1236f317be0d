"""TCP_NODELAY is set on sockets we open or accept."""

from __future__ import annotations

import socket
from types import SimpleNamespace

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
