"""Hash-chained audit log, event vocabulary and exports. Imports no other project folder."""

from audit.events import AuditEvent, Outcome
from audit.trail import AuditRecord, AuditTrail, NoAuditLog

__all__ = ["AuditEvent", "AuditRecord", "AuditTrail", "NoAuditLog", "Outcome"]
