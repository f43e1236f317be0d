"""The format-neutral view of one audit record that the XML and FHIR exports both render.

It decides who took part, which objects the record is about and what the chain detail
holds; :mod:`audit.export.dicom_xml` and :mod:`audit.export.fhir` only write it down.

Participants
------------
* The calling AE (``calling_ae``/``peer_host``): UserID = AE title (the host when there is no
  title), ``AlternativeUserID="AETITLES=<title>"``, ``NetworkAccessPointID`` = host with type 2 (IP
  address) or 1 (machine name). It is the requestor when the record names a live peer host.
* The called AE: for inbound records the node's own AE; for outbound ones (no calling AE, a
  called AE) the destination, and then ``peer_host`` is the destination's host.
* The actor (the node process, e.g. ``serve@host:pid``, a worker, ``cli``, or a person such as
  ``web:alice`` / ``os:bob``; ``dicom-node`` when the record has none). It is the requestor unless
  a peer or a ``user`` fact is. On a login without AE titles (``user-login`` from the web UI) the
  ``peer_host`` is the actor's client address.
* A ``user`` fact is the person who acted (added as the requestor) -- except on ``user-changed``,
  where it is the account changed and becomes a participant object instead.
* RoleIDCode: 110153 Source / 110152 Destination on transfers (110102, 110104), 110150
  Application on the node for application activity.

Participant objects: the study (type 2, role 3, ID type 110180 Study Instance UID, with a
``SOPClass`` description listing the SOP Instance UIDs or the count when known; the SOP Class
UID only when a ``sop_class_uid`` fact carries it), the patient (type 1, role 1, ID type RFC 3881
``2`` Patient Number; ID only -- records carry no names and none are invented), the audit log for
``audit-log-used`` (type 2, role 13, ID type RFC 3881 ``12`` URI, ID ``urn:dicom-node:audit-log``,
name ``Security Audit Log``, details ``what`` and ``filters``), the account for ``user-changed``
(type 1, role 11 Security User Entity, ID type RFC 3881 ``11`` User Identifier), the alert subject
for ``security-alert`` (ID type 110182 Node ID, detail ``Alert Description``), and -- always -- the audit
record itself (type 2, role 13, ID ``urn:dicom-node:audit-record:<seq>``) carrying
``ParticipantObjectDetail type="dicom-node-chain"``.

Chain detail
------------
The ``dicom-node-chain`` value (base64 of UTF-8 JSON in XML; the JSON text itself in FHIR
``entity.detail.valueString``) is the whole stored row: every hashed field (``facts`` as an
object) plus ``prev_hash`` and ``hash``. A collector verifies a record with::

    row = dict(payload); row["facts"] = canonical_json(row["facts"])
    sha256((payload["prev_hash"] + canonical_json({k: row[k] for k in HASHED_FIELDS})).encode())
        == payload["hash"]

and the chain by ``payload["prev_hash"]`` equal to the previous record's ``hash``.
The facts are exported there and, for a few well-known facts, in mapped fields
(``reason``/``error`` as EventOutcomeDescription, UIDs, counts); nowhere else.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from audit.events import AuditEvent
from audit.export.mapping import (
    APPLICATION_ACTIVITY,
    AUDIT_SOURCE_ID,
    BEGIN_TRANSFERRING,
    ID_NODE,
    ID_PATIENT_NUMBER,
    ID_STUDY_INSTANCE_UID,
    ID_URI,
    ID_USER_IDENTIFIER,
    INSTANCES_TRANSFERRED,
    ROLE_APPLICATION,
    ROLE_DESTINATION,
    ROLE_SOURCE,
    USER_AUTHENTICATION,
    Code,
    EventMapping,
    event_mapping,
)
from audit.trail import HASHED_FIELDS, AuditRecord

CHAIN_DETAIL_TYPE = "dicom-node-chain"
RECORD_SYSTEM = "urn:dicom-node:audit-record"
AUDIT_LOG_URI = "urn:dicom-node:audit-log"

_TRANSFER_EVENT_IDS = {BEGIN_TRANSFERRING.code, INSTANCES_TRANSFERRED.code}


@dataclass(frozen=True)
class Participant:
    """One ActiveParticipant / FHIR agent.

    ``kind`` is ``"calling"``, ``"called"`` (AE titles), ``"actor"`` (the node process or a
    person acting through it) or ``"user"`` (a ``user`` fact); ``host_type`` is the
    NetworkAccessPointTypeCode of ``host``.
    """

    user_id: str
    kind: str  # "calling", "called", "actor", "user"
    requestor: bool = False
    alt_user_id: str | None = None
    host: str | None = None
    roles: tuple[Code, ...] = ()

    @property
    def host_type(self) -> str | None:
        if not self.host:
            return None
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return "1"  # machine name
        return "2"  # IP address


@dataclass(frozen=True)
class ParticipantObject:
    """One ParticipantObjectIdentification / FHIR entity (see the module docstring)."""

    kind: str  # "study", "patient", "log", "account", "alert-subject", "record"
    object_id: str
    id_type: Code
    type_code: str | None = None
    role: str | None = None
    name: str | None = None
    details: tuple[tuple[str, str], ...] = ()
    sop_uids: tuple[str, ...] = ()
    instance_count: int | None = None
    sop_class_uid: str | None = None


@dataclass
class RecordView:
    """Everything an export writes about one record, decided once for both formats."""

    record: AuditRecord
    mapping: EventMapping
    when: datetime
    outcome: int
    description: str | None
    participants: list[Participant] = field(default_factory=list)
    objects: list[ParticipantObject] = field(default_factory=list)


def _outcome(value: int) -> int:
    """A valid EventOutcomeIndicator: the stored value, or the next more serious standard one."""
    if value <= 0:
        return 0
    return min((c for c in (4, 8, 12) if c >= value), default=12)


def _chain_payload(record: AuditRecord) -> dict[str, Any]:
    payload = {name: getattr(record, name) for name in HASHED_FIELDS}
    payload["prev_hash"] = record.prev_hash
    payload["hash"] = record.hash
    return payload


def _chain_json(record: AuditRecord) -> str:
    return json.dumps(
        _chain_payload(record), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )


def fact_text(value: Any) -> str | None:
    """A fact as text: ``None`` for a missing or empty one, JSON for anything not a string."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _sop_uids(record: AuditRecord) -> tuple[str, ...]:
    facts = record.facts
    if record.event == AuditEvent.PROVENANCE.value:
        outputs = facts.get("outputs") or []
        return tuple(str(u) for u in outputs if u)
    uids: list[str] = []
    if facts.get("sop_uid"):
        uids.append(str(facts["sop_uid"]))
    listed = facts.get("sop_uids")
    if isinstance(listed, list):
        uids.extend(str(u) for u in listed if u)
    return tuple(uids)


def _instance_count(record: AuditRecord, uids: tuple[str, ...]) -> int | None:
    if uids:
        return len(uids)
    count = record.facts.get("instances")
    if isinstance(count, bool) or not isinstance(count, int):
        return None
    return count


def _participants(record: AuditRecord, mapping: EventMapping) -> list[Participant]:
    facts = record.facts
    transfer = mapping.event_id.code in _TRANSFER_EVENT_IDS
    # A ``user`` fact names who acted -- except on user-changed, where it is the account changed.
    user = None if record.event == AuditEvent.USER_CHANGED.value else fact_text(facts.get("user"))
    bare_peer = record.peer_host is not None and not record.calling_ae and not record.called_ae
    # A login with no AE title (the web UI): the host is the client of the user who signs in.
    actor_host = record.peer_host if bare_peer and mapping.event_id == USER_AUTHENTICATION else None
    inbound = bool(record.calling_ae) or (bare_peer and actor_host is None)
    peer_is_requestor = inbound and record.peer_host is not None and user is None
    out: list[Participant] = []
    if inbound:
        title = record.calling_ae
        out.append(
            Participant(
                user_id=title or str(record.peer_host),
                kind="calling",
                requestor=peer_is_requestor,
                alt_user_id=f"AETITLES={title}" if title else None,
                host=record.peer_host,
                roles=(ROLE_SOURCE,) if transfer else (),
            )
        )
    if record.called_ae:
        out.append(
            Participant(
                user_id=record.called_ae,
                kind="called",
                alt_user_id=f"AETITLES={record.called_ae}",
                host=None if inbound else record.peer_host,
                roles=(ROLE_DESTINATION,) if transfer else (),
            )
        )
    if user is not None:
        out.append(Participant(user_id=user, kind="user", requestor=True))
    node_roles: tuple[Code, ...] = ()
    if transfer:
        if not inbound:
            node_roles = (ROLE_SOURCE,)
        elif not record.called_ae:
            node_roles = (ROLE_DESTINATION,)
    elif mapping.event_id == APPLICATION_ACTIVITY:
        node_roles = (ROLE_APPLICATION,)
    out.append(
        Participant(
            user_id=record.actor or AUDIT_SOURCE_ID,
            kind="actor",
            requestor=not peer_is_requestor and user is None,
            host=actor_host,
            roles=node_roles,
        )
    )
    return out


def _objects(record: AuditRecord) -> list[ParticipantObject]:
    facts = record.facts
    out: list[ParticipantObject] = []
    if record.study_uid:
        uids = _sop_uids(record)
        series = facts.get("output_series_uid") or facts.get("series_uid")
        out.append(
            ParticipantObject(
                kind="study",
                object_id=record.study_uid,
                id_type=ID_STUDY_INSTANCE_UID,
                type_code="2",
                role="3",
                details=(("SeriesInstanceUID", str(series)),) if series else (),
                sop_uids=uids,
                instance_count=_instance_count(record, uids),
                sop_class_uid=fact_text(facts.get("sop_class_uid")),
            )
        )
    if record.patient_id:
        out.append(
            ParticipantObject(
                kind="patient",
                object_id=record.patient_id,
                id_type=ID_PATIENT_NUMBER,
                type_code="1",
                role="1",
            )
        )
    if record.event == AuditEvent.AUDIT_LOG_USED.value:
        log_details = [(key, fact_text(facts.get(key))) for key in ("what", "filters")]
        out.append(
            ParticipantObject(
                kind="log",
                object_id=AUDIT_LOG_URI,
                id_type=ID_URI,
                type_code="2",
                role="13",
                name="Security Audit Log",
                details=tuple((key, text) for key, text in log_details if text is not None),
            )
        )
    if record.event == AuditEvent.USER_CHANGED.value and fact_text(facts.get("user")):
        out.append(
            ParticipantObject(
                kind="account",
                object_id=str(fact_text(facts.get("user"))),
                id_type=ID_USER_IDENTIFIER,
                type_code="1",
                role="11",
            )
        )
    if record.event == AuditEvent.SECURITY_ALERT.value and (record.peer_host or record.calling_ae):
        texts = (fact_text(facts.get("alert")), fact_text(facts.get("reason")))
        alert = " ".join(t for t in texts if t is not None)
        out.append(
            ParticipantObject(
                kind="alert-subject",
                object_id=str(record.peer_host or record.calling_ae),
                id_type=ID_NODE,
                type_code="2",
                details=(("Alert Description", alert),) if alert else (),
            )
        )
    out.append(
        ParticipantObject(
            kind="record",
            object_id=f"{RECORD_SYSTEM}:{record.seq}",
            id_type=ID_URI,
            type_code="2",
            role="13",
            details=((CHAIN_DETAIL_TYPE, _chain_json(record)),),
        )
    )
    return out


def record_view(record: AuditRecord) -> RecordView:
    """The format-neutral view of ``record``: its event mapping, participants and objects.

    Parameters
    ----------
    record
        A stored audit record.

    Returns
    -------
    RecordView
        What both :func:`audit.export.to_dicom_xml` and :func:`audit.export.fhir_bundle` render.
    """
    mapping = event_mapping(record)
    facts = record.facts
    description = fact_text(facts.get("error")) or fact_text(facts.get("reason"))
    view = RecordView(
        record=record,
        mapping=mapping,
        when=datetime.fromtimestamp(record.at, UTC),
        outcome=_outcome(int(record.outcome)),
        description=description,
    )
    view.participants = _participants(record, mapping)
    view.objects = _objects(record)
    return view
