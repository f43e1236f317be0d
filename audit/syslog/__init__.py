"""Shipping the audit trail to a syslog collector over TLS (IHE ATNA transport).

Each audit record becomes one RFC 5424 message (facility ``authpriv``, severity from the
record's outcome, the record's ``seq``, ``hash``, ``prev_hash``, ``event`` and ``outcome`` as
structured data, the payload as BOM + UTF-8) framed with RFC 5425 octet counting and sent
over a long-lived TLS connection.

Modules
-------
:mod:`~audit.syslog.messages`
    The wire format: RFC 5424 messages (records and checkpoints) and RFC 5425 frames.
:mod:`~audit.syslog.tls`
    :class:`SyslogTlsSender`, the TLS client (trust, IP SANs, mutual TLS, dead connections).
:mod:`~audit.syslog.forwarder`
    :class:`AuditForwarder`, which reads the audit database in ``seq`` order and keeps a small
    state file with the last shipped ``seq``; the database itself is the buffer while the
    collector is unreachable.

This package imports nothing from the rest of the project but :mod:`audit.trail`.
"""

from audit.syslog.forwarder import AuditForwarder, ForwarderStatus, FrameSender
from audit.syslog.tls import SYSLOG_TLS_PORT, SyslogTlsSender

__all__ = ["SYSLOG_TLS_PORT", "AuditForwarder", "ForwarderStatus", "FrameSender", "SyslogTlsSender"]
