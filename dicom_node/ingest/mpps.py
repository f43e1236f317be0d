"""The MPPS SCP: a scanner's Modality Performed Procedure Step, kept as a completeness signal.

A modality opens a step with N-CREATE (status IN PROGRESS) when it starts acquiring and
ends it with N-SET (COMPLETED or DISCONTINUED), listing in the Performed Series Sequence
every instance it made. The node keeps only what completeness needs — the step's SOP
Instance UID, its study (Scheduled Step Attributes Sequence), the calling AE, the status
and the listed SOP Instance UIDs; no patient attribute — in the ``mpps`` table, audits
every request (the accepted ones after their commit), and then tells readiness
(``on_changed``), which makes the study ready as soon as the ended steps' instances are
all stored (:mod:`dicom_node.ingest.completeness`).

Answers (PS3.4 F.7.2, PS3.7 C): ``0x0106`` a status other than IN PROGRESS on N-CREATE,
or an unknown one on N-SET; ``0x0111`` an N-CREATE for a step already known; ``0x0112`` an
N-SET for a step never created; ``0x0110`` with Error ID ``0xA710`` an N-SET on a step
that has already ended ("may no longer be updated"); ``0x0120`` a missing Study Instance
UID or Affected SOP Instance UID; ``0x0110`` anything the node cannot decode or store.
Every failure carries a short, PHI-free Error Comment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import insert, select, update

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.audited import audited_write
from dicom_node.db.engine import Database
from dicom_node.ingest.completeness import StepStatus

log = logging.getLogger(__name__)

#: Modality Performed Procedure Step SOP Class (N-CREATE, N-SET).
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"

#: Told the Study Instance UID of a step that was created or changed (readiness).
OnStepChanged = Callable[[str], None]

_EVENT_OF = {
    StepStatus.IN_PROGRESS: AuditEvent.MPPS_IN_PROGRESS,
    StepStatus.COMPLETED: AuditEvent.MPPS_COMPLETED,
    StepStatus.DISCONTINUED: AuditEvent.MPPS_DISCONTINUED,
}


class MppsStatus(IntEnum):
    """The DIMSE statuses the MPPS SCP answers with."""

    SUCCESS = 0x0000
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_INSTANCE = 0x0112
    MISSING_ATTRIBUTE = 0x0120


#: Error ID (0000,0903) with 0x0110: "Performed Procedure Step Object may no longer be updated".
NO_LONGER_UPDATABLE = 0xA710


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: the status, a short PHI-free reason, an Error ID if any."""

    status: MppsStatus
    reason: str
    error_id: int | None = None

    def answer(self) -> Dataset:
        """The status data set pynetdicom puts in the response (Status + Error Comment)."""
        ds = Dataset()
        ds.Status = int(self.status)
        ds.ErrorComment = self.reason[:64]  # LO
        if self.error_id is not None:
            ds.ErrorID = self.error_id
        return ds


@dataclass(frozen=True)
class StepFacts:
    """What an N-CREATE or N-SET says about a step (None: not given in an N-SET).

    :func:`check_create` and :func:`check_set` return one, or the :class:`Refusal` saying why not.
    """

    status: StepStatus | None
    study_uid: str | None
    referenced: list[str] | None


def _status_of(ds: Dataset) -> StepStatus | Refusal:
    value = str(ds.get("PerformedProcedureStepStatus", "") or "").strip().upper()
    try:
        return StepStatus(value)
    except ValueError:
        shown = value[:16] or "empty"
        return Refusal(MppsStatus.INVALID_ATTRIBUTE_VALUE, f"Performed Procedure Step Status {shown}")


def referenced_instances(ds: Dataset) -> list[str]:
    """SOP Instance UIDs the Performed Series Sequence lists (images and other composites)."""
    found: list[str] = []
    for series in ds.get("PerformedSeriesSequence", None) or []:
        for keyword in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for item in series.get(keyword, None) or []:
                uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
                if uid and uid not in found:
                    found.append(uid)
    return found


def check_create(attributes: Dataset) -> StepFacts | Refusal:
    """An N-CREATE attribute list: a step IN PROGRESS with its study, or why not."""
    if "PerformedProcedureStepStatus" not in attributes:
        return Refusal(MppsStatus.MISSING_ATTRIBUTE, "no Performed Procedure Step Status")
    status = _status_of(attributes)
    if isinstance(status, Refusal):
        return status
    if status is not StepStatus.IN_PROGRESS:
        return Refusal(MppsStatus.INVALID_ATTRIBUTE_VALUE, f"N-CREATE with status {status}, not IN PROGRESS")
    study_uid = next(
        (
            str(item.StudyInstanceUID).strip()
            for item in attributes.get("ScheduledStepAttributesSequence", None) or []
            if str(item.get("StudyInstanceUID", "") or "").strip()
        ),
        None,
    )
    if study_uid is None:
        return Refusal(MppsStatus.MISSING_ATTRIBUTE, "no Study Instance UID in Scheduled Step Attributes")
    return StepFacts(status, study_uid, referenced_instances(attributes))


def check_set(modifications: Dataset) -> StepFacts | Refusal:
    """An N-SET modification list: the new status and list, where given, or why not."""
    status: StepStatus | None = None
    if "PerformedProcedureStepStatus" in modifications:
        given = _status_of(modifications)
        if isinstance(given, Refusal):
            return given
        status = given
    # An N-SET replaces a sequence whole (PS3.4 F.7.2.2): a new list, or the old one kept.
    referenced = referenced_instances(modifications) if "PerformedSeriesSequence" in modifications else None
    return StepFacts(status, None, referenced)


class PerformedProcedureSteps:
    """The N-CREATE and N-SET handlers for the MPPS SOP Class, over the ``mpps`` table."""

    def __init__(
        self, config: NodeConfig, db: Database, audit: AuditTrail, on_changed: OnStepChanged | None = None
    ) -> None:
        self.config = config
        self.db = db
        self.audit = audit
        #: Readiness (``StudyReadiness.steps_changed``); None: steps are only recorded.
        self.on_changed = on_changed

    # -- DIMSE ------------------------------------------------------------------------

    def on_create(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        calling_ae, peer_host = _caller(event)
        mpps_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        if not mpps_uid:
            # PS3.4 F.7.2.1: the modality names the step; this SCP does not make up UIDs.
            refusal = Refusal(MppsStatus.MISSING_ATTRIBUTE, "no Affected SOP Instance UID")
            return self._refused("N-CREATE", None, calling_ae, peer_host, refusal)
        try:
            facts = check_create(event.attribute_list)
        except Exception as exc:  # an undecodable attribute list is the sender's problem
            facts = Refusal(
                MppsStatus.PROCESSING_FAILURE, f"attribute list not decodable: {type(exc).__name__}"
            )
        if isinstance(facts, Refusal):
            return self._refused("N-CREATE", mpps_uid, calling_ae, peer_host, facts)
        assert facts.study_uid is not None
        try:
            refused = self._create(mpps_uid, facts, calling_ae, peer_host)
        except Exception:
            log.exception("MPPS N-CREATE %s: the step could not be recorded", mpps_uid)
            refused = Refusal(MppsStatus.PROCESSING_FAILURE, "the node could not record the step")
        if refused is not None:
            return self._refused("N-CREATE", mpps_uid, calling_ae, peer_host, refused, facts.study_uid)
        log.info("MPPS %s for study %s from %s: IN PROGRESS", mpps_uid, facts.study_uid, calling_ae)
        self._tell(facts.study_uid)
        return MppsStatus.SUCCESS, None

    def on_set(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        calling_ae, peer_host = _caller(event)
        mpps_uid = str(event.request.RequestedSOPInstanceUID or "").strip()
        try:
            facts = check_set(event.modification_list)
        except Exception as exc:
            facts = Refusal(
                MppsStatus.PROCESSING_FAILURE, f"modification list not decodable: {type(exc).__name__}"
            )
        if isinstance(facts, Refusal):
            return self._refused("N-SET", mpps_uid, calling_ae, peer_host, facts)
        study_uid: str | None = None
        try:
            study_uid, outcome = self._set(mpps_uid, facts, calling_ae, peer_host)
        except Exception:
            log.exception("MPPS N-SET %s: the change could not be recorded", mpps_uid)
            outcome = Refusal(MppsStatus.PROCESSING_FAILURE, "the node could not record the change")
        if isinstance(outcome, Refusal):
            return self._refused("N-SET", mpps_uid, calling_ae, peer_host, outcome, study_uid)
        assert study_uid is not None
        log.info("MPPS %s for study %s from %s: %s", mpps_uid, study_uid, calling_ae, outcome.value)
        self._tell(study_uid)
        return MppsStatus.SUCCESS, None

    # -- the mpps table -----------------------------------------------------------------

    def _create(self, mpps_uid: str, facts: StepFacts, calling_ae: str, peer_host: str) -> Refusal | None:
        """Insert the step and queue its audit record (None), or say why not."""
        assert facts.study_uid is not None and facts.status is not None
        now = time.time()
        with audited_write(self.db, self.audit) as work:
            if work.conn.execute(select(t.mpps.c.id).where(t.mpps.c.sop_uid == mpps_uid)).first():
                return Refusal(MppsStatus.DUPLICATE_SOP_INSTANCE, "MPPS instance already exists")
            referenced = facts.referenced or []
            work.conn.execute(
                insert(t.mpps).values(
                    sop_uid=mpps_uid,
                    study_uid=facts.study_uid,
                    calling_ae=calling_ae,
                    peer_host=peer_host,
                    status=facts.status.value,
                    referenced=referenced,
                    created_at=now,
                    updated_at=now,
                )
            )
            work.record(
                _EVENT_OF[facts.status],
                study_uid=facts.study_uid,
                calling_ae=calling_ae,
                peer_host=peer_host,
                mpps_uid=mpps_uid,
                operation="N-CREATE",
                instances=len(referenced),
            )
        return None

    def _set(
        self, mpps_uid: str, facts: StepFacts, calling_ae: str, peer_host: str
    ) -> tuple[str | None, StepStatus | Refusal]:
        """Apply an N-SET to a step IN PROGRESS: (its study, its new status), or why not."""
        with audited_write(self.db, self.audit) as work:
            step = work.conn.execute(
                select(t.mpps.c.id, t.mpps.c.study_uid, t.mpps.c.status, t.mpps.c.referenced).where(
                    t.mpps.c.sop_uid == mpps_uid
                )
            ).first()
            if step is None:
                return None, Refusal(MppsStatus.NO_SUCH_SOP_INSTANCE, "no such MPPS instance")
            if step.status != StepStatus.IN_PROGRESS:
                why = f"MPPS is {step.status}: it may no longer be updated"
                return step.study_uid, Refusal(MppsStatus.PROCESSING_FAILURE, why, NO_LONGER_UPDATABLE)
            status = facts.status or StepStatus.IN_PROGRESS
            referenced = step.referenced if facts.referenced is None else facts.referenced
            # The write lock is held since the select; the update still names the state it
            # expects, as every transition in the node does.
            work.conn.execute(
                update(t.mpps)
                .where(t.mpps.c.id == step.id, t.mpps.c.status == StepStatus.IN_PROGRESS.value)
                .values(status=status.value, referenced=referenced, updated_at=time.time())
            )
            mode: dict[str, Any] = {}
            if status is StepStatus.DISCONTINUED:  # what follows is the configured choice
                mode["mode"] = self.config.completeness.mpps_discontinued
            work.record(
                _EVENT_OF[status],
                study_uid=step.study_uid,
                calling_ae=calling_ae,
                peer_host=peer_host,
                mpps_uid=mpps_uid,
                operation="N-SET",
                instances=len(referenced),
                **mode,
            )
        return step.study_uid, status

    # -- shared -----------------------------------------------------------------------

    def _refused(
        self,
        operation: str,
        mpps_uid: str | None,
        calling_ae: str,
        peer_host: str,
        refusal: Refusal,
        study_uid: str | None = None,
    ) -> tuple[Dataset, None]:
        log.warning(
            "MPPS %s %s from %s@%s refused (0x%04X): %s",
            operation,
            mpps_uid or "(no UID)",
            calling_ae,
            peer_host,
            refusal.status,
            refusal.reason,
        )
        self.audit.record(
            AuditEvent.MPPS_REFUSED,
            Outcome.MINOR_FAILURE,
            study_uid=study_uid,
            calling_ae=calling_ae,
            peer_host=peer_host,
            mpps_uid=mpps_uid,
            operation=operation,
            status=f"0x{refusal.status:04X}",
            reason=refusal.reason,
        )
        return refusal.answer(), None

    def _tell(self, study_uid: str) -> None:
        """Hand the change to readiness; the step is committed whatever readiness does."""
        if self.on_changed is None:
            return
        try:
            self.on_changed(study_uid)
        except Exception:
            log.exception("MPPS: readiness could not assess study %s; the idle timer still runs", study_uid)


def _caller(event: Any) -> tuple[str, str]:
    return str(event.assoc.requestor.ae_title).strip(), str(event.assoc.requestor.address)
