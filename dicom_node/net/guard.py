"""Bounds on what a connection to the DICOM port may cost (issue 15, item 1).

``guard_server`` is called on every listening server the receiver starts (plain and TLS),
right after ``AE.start_server``.
"""

from __future__ import annotations

from typing import Any

from dicom_node.config import ReceiverSection


def guard_server(server: Any, limits: ReceiverSection) -> None:
    """Apply the connection limits of ``limits`` to ``server`` (a pynetdicom AssociationServer)."""
    server._dn_limits = limits
