"""Hash-chained audit log, event vocabulary and exports. Imports no other project folder."""

from audit.events import AuditEvent, Outcome
from audit.trail import AuditRecord, AuditTrail

__all__ = ["AuditEvent", "AuditRecord", "AuditTrail", "Outcome"]
