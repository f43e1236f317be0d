"""Commit, then audit: a write transaction whose audit records are appended once it has committed.

An audit record must never describe something that did not happen, so a state change is
recorded only after its transaction commits; and it must never be forgotten, so the records
are gathered inside the transaction, where the facts are at hand, by the same code that
makes the change. :func:`audited_write` does both, for every caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.db.engine import Database


class AuditedWrite:
    """The open transaction (``conn``) and the audit records to append once it commits."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._records: list[tuple[AuditEvent, dict[str, Any]]] = []

    def record(self, event: AuditEvent, outcome: Outcome = Outcome.SUCCESS, **facts: Any) -> None:
        """Queue an audit record (keywords as for :meth:`audit.AuditTrail.record`)."""
        self._records.append((event, {**facts, "outcome_code": outcome}))

    def flush(self, audit: AuditTrail) -> None:
        """Append the queued records, in order, in one audit transaction."""
        records, self._records = self._records, []
        audit.record_many(records)


@contextmanager
def audited_write(db: Database, audit: AuditTrail, *, claim: bool = False) -> Iterator[AuditedWrite]:
    """A write transaction (``claim``: a :meth:`Database.claim` one); the records queued on
    it are appended after it commits.

    If the block raises, the transaction rolls back and nothing is recorded.
    """
    with db.claim() if claim else db.write() as conn:
        work = AuditedWrite(conn)
        yield work
    work.flush(audit)
