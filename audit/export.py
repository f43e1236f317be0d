"""Exports of the audit log: DICOM PS3.15 A.5 audit messages (XML) and FHIR bundles.

Public API
----------
``to_dicom_xml(record)``
    One ``<AuditMessage>`` (PS3.15 A.5.1 schema, RFC 3881 lineage).
``dicom_xml_document(records)``
    The messages of several records under one ``<AuditMessages>`` root, with an XML declaration.
``fhir_bundle(records, version="R5")``
    A FHIR ``Bundle`` (type ``collection``, R5 or R4B) with one ``AuditEvent`` per record and
    one ``Provenance`` per ``provenance`` record, returned as a JSON-ready ``dict``.
``event_mapping(record)``
    The PS3.15 event (EventID, EventActionCode, EventTypeCodes) a record is exported as.

Event mapping
-------------
EventIDs and EventTypeCodes are DCM codes (PS3.16). Node-specific events keep their own name
as an extra EventTypeCode in the local coding scheme ``99DCMNODE`` (FHIR system
``urn:dicom-node:audit-event``), so a collector can tell them apart; the events that PS3.15
itself defines do not carry it.

========================  ======================================  ======  ==========================
node event                PS3.15 EventID                          action  EventTypeCode
========================  ======================================  ======  ==========================
application-start         110100 Application Activity             E       110120 Application Start
application-stop          110100 Application Activity             E       110121 Application Stop
begin-transferring        110102 Begin Transferring DICOM Inst.   E       --
instances-transferred     110104 DICOM Instances Transferred      C / R   -- (C received, R sent)
instances-accessed        110103 DICOM Instances Accessed         R       --
query                     110112 Query                            E       --
security-alert            110113 Security Alert                   E       from the ``alert`` fact (1)
audit-log-used            110101 Audit Log Used                   R       --
export                    110106 Export                           R       --
user-login                110114 User Authentication              E       110122 Login
association-accepted      110114 User Authentication              E       110122 Login + local
association-rejected      110114 User Authentication              E       110122 Login + local (2)
association-closed        110114 User Authentication              E       110123 Logout + local
instance-stored           110104 DICOM Instances Transferred      C       local
instance-new-version      110104 DICOM Instances Transferred      U       local
instance-duplicate        110104 DICOM Instances Transferred      R       local (3)
instance-rejected         110104 DICOM Instances Transferred      C       local (failed outcome)
instance-quarantined      110104 DICOM Instances Transferred      C       local (failed outcome)
delivery-attempt          110104 DICOM Instances Transferred      R       local
delivery-dead-letter      110104 DICOM Instances Transferred      R       local
provenance                110103 DICOM Instances Accessed         C       local (derived instances)
review-approved/rejected  110103 DICOM Instances Accessed         R       local
study-ready               110100 Application Activity             E       local
study-not-routed          110100 Application Activity             E       local
job-transition            110100 Application Activity             E       local (4)
gate-decision             110100 Application Activity             E       local
model-loaded              110100 Application Activity             E       local
config-loaded             110113 Security Alert                   E       110131 Software Config. + local
user-changed              110113 Security Alert                   E       110137 User Security Attr.
                                                                          Changed + local
anything else             110100 Application Activity             E       local (the stored name)
========================  ======================================  ======  ==========================

(1) ``unauthorized-node`` / ``node-authentication`` -> 110126 Node Authentication,
``emergency-override`` -> 110127, ``emergency-override-stopped`` -> 110138, ``network-configuration``
-> 110128, ``security-configuration`` -> 110129, ``hardware-configuration`` -> 110130,
``software-configuration`` -> 110131, ``restricted-function`` -> 110132 Use of Restricted Function,
``audit-recording-stopped`` / ``-started`` -> 110133 / 110134, ``object-security-attributes-changed``
-> 110135, ``security-roles-changed`` -> 110136, ``user-security-attributes-changed`` -> 110137.
An unknown alert falls back to 110126 Node Authentication when a peer (AE title or host) is named,
else to 110132 Use of Restricted Function. (PS3.15 makes the EventTypeCode mandatory here.)
(2) The receiver also records a ``security-alert`` (110126) for the same refusal.
(3) PS3.15: R when the receiver already holds the instances and needs no change; U when it
replaces its copy (a new version); C when it did not hold them.
(4) Job transitions carry no patient ID, and PS3.15 makes the patient mandatory for 110103,
so the job life cycle is reported as application activity naming the study.
The AuditSourceTypeCode is the schema's own value ``4`` (application server process), written as a
bare ``csd-code``.

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

import base64
import ipaddress
import json
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from audit.events import AuditEvent
from audit.trail import HASHED_FIELDS, AuditRecord

AUDIT_SOURCE_ID = "dicom-node"
LOCAL_SCHEME = "99DCMNODE"
CHAIN_DETAIL_TYPE = "dicom-node-chain"
FHIR_VERSIONS = ("R5", "R4B")

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
LOCAL_SYSTEM = "urn:dicom-node:audit-event"
UID_SYSTEM = "urn:dicom:uid"
AE_TITLE_SYSTEM = "urn:dicom-node:ae-title"
ACTOR_SYSTEM = "urn:dicom-node:actor"
USER_SYSTEM = "urn:dicom-node:user"
RECORD_SYSTEM = "urn:dicom-node:audit-record"
AUDIT_LOG_URI = "urn:dicom-node:audit-log"
PIPELINE_SYSTEM = "urn:dicom-node:pipeline"
WEIGHTS_SYSTEM = "urn:dicom-node:weights-sha256"
_OUTCOME_SYSTEM_R5 = "http://terminology.hl7.org/CodeSystem/audit-event-outcome"
_SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"
_ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/object-role"
_RESOURCE_TYPE_SYSTEM = "http://hl7.org/fhir/resource-types"
_PROVENANCE_AGENT_SYSTEM = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_SCHEME_SYSTEMS = {"DCM": DCM_SYSTEM, LOCAL_SCHEME: LOCAL_SYSTEM}
_FHIR_UUID_NAMESPACE = uuid.UUID("6f1b7c1e-3f0d-5a59-9a59-5d1c0de0a0d1")


@dataclass(frozen=True)
class Code:
    """A coded value: ``csd-code``, its meaning (``originalText``) and ``codeSystemName``."""

    code: str
    meaning: str
    scheme: str = "DCM"


# --- PS3.15 EventIDs (DCM) --------------------------------------------------------------------
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
AUDIT_LOG_USED = Code("110101", "Audit Log Used")
BEGIN_TRANSFERRING = Code("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
EXPORT = Code("110106", "Export")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")

# --- EventTypeCodes (DCM) ---------------------------------------------------------------------
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
LOGIN = Code("110122", "Login")
LOGOUT = Code("110123", "Logout")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
EMERGENCY_OVERRIDE_STARTED = Code("110127", "Emergency Override Started")
NETWORK_CONFIGURATION = Code("110128", "Network Configuration")
SECURITY_CONFIGURATION = Code("110129", "Security Configuration")
HARDWARE_CONFIGURATION = Code("110130", "Hardware Configuration")
SOFTWARE_CONFIGURATION = Code("110131", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "Use of Restricted Function")
AUDIT_RECORDING_STOPPED = Code("110133", "Audit Recording Stopped")
AUDIT_RECORDING_STARTED = Code("110134", "Audit Recording Started")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = Code("110135", "Object Security Attributes Changed")
SECURITY_ROLES_CHANGED = Code("110136", "Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", "User Security Attributes Changed")
EMERGENCY_OVERRIDE_STOPPED = Code("110138", "Emergency Override Stopped")

# --- RoleIDCodes and participant object ID types ----------------------------------------------
ROLE_APPLICATION = Code("110150", "Application")
ROLE_DESTINATION = Code("110152", "Destination Role ID")
ROLE_SOURCE = Code("110153", "Source Role ID")
ID_STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
ID_NODE = Code("110182", "Node ID")
ID_PATIENT_NUMBER = Code("2", "Patient Number", "RFC-3881")
ID_URI = Code("12", "URI", "RFC-3881")
ID_USER_IDENTIFIER = Code("11", "User Identifier", "RFC-3881")
#: PS3.15 A.5.1.2.1 Audit Source Type: 4 = application server process tier in a multi-tier system.
AUDIT_SOURCE_TYPE_CODE = "4"

_TRANSFER_EVENT_IDS = {BEGIN_TRANSFERRING.code, INSTANCES_TRANSFERRED.code}


@dataclass(frozen=True)
class EventMapping:
    """How one record is reported under PS3.15.

    Attributes
    ----------
    event_id
        The EventID (a DCM code).
    action
        EventActionCode: ``C``, ``R``, ``U``, ``D`` or ``E``.
    type_codes
        EventTypeCodes, standard ones first, then (for node-specific events) the local one.
    local
        Whether the node's own event name is added as a ``99DCMNODE`` EventTypeCode.
    """

    event_id: Code
    action: str
    type_codes: tuple[Code, ...] = ()
    local: bool = True


#: The static part of the mapping; ``event_mapping`` resolves the per-record parts
#: (transfer direction, alert type, the local code).
EVENT_MAP: dict[AuditEvent, EventMapping] = {
    AuditEvent.APPLICATION_START: EventMapping(APPLICATION_ACTIVITY, "E", (APPLICATION_START,), local=False),
    AuditEvent.APPLICATION_STOP: EventMapping(APPLICATION_ACTIVITY, "E", (APPLICATION_STOP,), local=False),
    AuditEvent.BEGIN_TRANSFERRING: EventMapping(BEGIN_TRANSFERRING, "E", local=False),
    AuditEvent.INSTANCES_TRANSFERRED: EventMapping(INSTANCES_TRANSFERRED, "R", local=False),
    AuditEvent.INSTANCES_ACCESSED: EventMapping(INSTANCES_ACCESSED, "R", local=False),
    AuditEvent.QUERY: EventMapping(QUERY, "E", local=False),
    AuditEvent.SECURITY_ALERT: EventMapping(SECURITY_ALERT, "E", local=False),
    AuditEvent.AUDIT_LOG_USED: EventMapping(AUDIT_LOG_USED, "R", local=False),
    AuditEvent.EXPORT: EventMapping(EXPORT, "R", local=False),
    AuditEvent.USER_LOGIN: EventMapping(USER_AUTHENTICATION, "E", (LOGIN,), local=False),
    AuditEvent.ASSOCIATION_ACCEPTED: EventMapping(USER_AUTHENTICATION, "E", (LOGIN,)),
    AuditEvent.ASSOCIATION_REJECTED: EventMapping(USER_AUTHENTICATION, "E", (LOGIN,)),
    AuditEvent.ASSOCIATION_CLOSED: EventMapping(USER_AUTHENTICATION, "E", (LOGOUT,)),
    AuditEvent.INSTANCE_STORED: EventMapping(INSTANCES_TRANSFERRED, "C"),
    AuditEvent.INSTANCE_NEW_VERSION: EventMapping(INSTANCES_TRANSFERRED, "U"),
    AuditEvent.INSTANCE_DUPLICATE: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.INSTANCE_REJECTED: EventMapping(INSTANCES_TRANSFERRED, "C"),
    AuditEvent.INSTANCE_QUARANTINED: EventMapping(INSTANCES_TRANSFERRED, "C"),
    AuditEvent.DELIVERY_ATTEMPT: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.DELIVERY_DEAD_LETTER: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.DELIVERY_REFUSED: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.STORAGE_COMMITMENT_REQUESTED: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.STORAGE_COMMITMENT_RESULT: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.STORAGE_COMMITMENT_TIMEOUT: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.PROVENANCE: EventMapping(INSTANCES_ACCESSED, "C"),
    AuditEvent.REVIEW_APPROVED: EventMapping(INSTANCES_ACCESSED, "R"),
    AuditEvent.REVIEW_REJECTED: EventMapping(INSTANCES_ACCESSED, "R"),
    AuditEvent.STUDY_READY: EventMapping(APPLICATION_ACTIVITY, "E"),
    AuditEvent.STUDY_NOT_ROUTED: EventMapping(APPLICATION_ACTIVITY, "E"),
    AuditEvent.JOB_TRANSITION: EventMapping(APPLICATION_ACTIVITY, "E"),
    AuditEvent.GATE_DECISION: EventMapping(APPLICATION_ACTIVITY, "E"),
    AuditEvent.MODEL_LOADED: EventMapping(APPLICATION_ACTIVITY, "E"),
    AuditEvent.CONFIG_LOADED: EventMapping(SECURITY_ALERT, "E", (SOFTWARE_CONFIGURATION,)),
    AuditEvent.USER_CHANGED: EventMapping(SECURITY_ALERT, "E", (USER_SECURITY_ATTRIBUTES_CHANGED,)),
}

#: Events the node does not know (yet): reported as application activity with the stored name.
GENERIC_MAPPING = EventMapping(APPLICATION_ACTIVITY, "E")

#: ``security-alert`` EventTypeCode by the record's ``alert`` fact.
ALERT_TYPES: dict[str, Code] = {
    "unauthorized-node": NODE_AUTHENTICATION,
    "node-authentication": NODE_AUTHENTICATION,
    "emergency-override": EMERGENCY_OVERRIDE_STARTED,
    "emergency-override-started": EMERGENCY_OVERRIDE_STARTED,
    "emergency-override-stopped": EMERGENCY_OVERRIDE_STOPPED,
    "network-configuration": NETWORK_CONFIGURATION,
    "security-configuration": SECURITY_CONFIGURATION,
    "hardware-configuration": HARDWARE_CONFIGURATION,
    "software-configuration": SOFTWARE_CONFIGURATION,
    "restricted-function": USE_OF_RESTRICTED_FUNCTION,
    "audit-recording-stopped": AUDIT_RECORDING_STOPPED,
    "audit-recording-started": AUDIT_RECORDING_STARTED,
    "object-security-attributes-changed": OBJECT_SECURITY_ATTRIBUTES_CHANGED,
    "security-roles-changed": SECURITY_ROLES_CHANGED,
    "user-security-attributes-changed": USER_SECURITY_ATTRIBUTES_CHANGED,
}

_OUTCOME_TEXT = {0: "Success", 4: "Minor failure", 8: "Serious failure", 12: "Major failure"}
_SEVERITY_R5 = {0: "informational", 4: "warning", 8: "error", 12: "critical"}


def event_mapping(record: AuditRecord) -> EventMapping:
    """The PS3.15 event a record is exported as.

    Parameters
    ----------
    record
        A stored audit record.

    Returns
    -------
    EventMapping
        EventID, EventActionCode and the complete EventTypeCodes (standard ones, then the
        local ``99DCMNODE`` code naming the node event when the event is node-specific).
    """
    try:
        kind: AuditEvent | None = AuditEvent(record.event)
    except ValueError:
        kind = None
    base = EVENT_MAP.get(kind, GENERIC_MAPPING) if kind is not None else GENERIC_MAPPING
    action, types = base.action, base.type_codes
    if kind is AuditEvent.INSTANCES_TRANSFERRED:
        # PS3.15: C when the receiver did not hold the instances; R when the audit source does not
        # know (a sender cannot tell what the receiver held).
        action = "C" if record.facts.get("direction") == "received" else "R"
    elif kind is AuditEvent.SECURITY_ALERT:
        alert = str(record.facts.get("alert") or "")
        peer = record.calling_ae or record.peer_host
        types = (ALERT_TYPES.get(alert, NODE_AUTHENTICATION if peer else USE_OF_RESTRICTED_FUNCTION),)
    if base.local:
        types = (*types, Code(record.event, record.event, LOCAL_SCHEME))
    return replace(base, action=action, type_codes=types)


# --- the shared, format-neutral view of a record ------------------------------------------------


@dataclass(frozen=True)
class _Participant:
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
class _Object:
    kind: str  # "study", "patient", "log", "alert-subject", "record"
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
class _View:
    record: AuditRecord
    mapping: EventMapping
    when: datetime
    outcome: int
    description: str | None
    participants: list[_Participant] = field(default_factory=list)
    objects: list[_Object] = field(default_factory=list)


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


def _text(value: Any) -> str | None:
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


def _participants(record: AuditRecord, mapping: EventMapping) -> list[_Participant]:
    facts = record.facts
    transfer = mapping.event_id.code in _TRANSFER_EVENT_IDS
    # A ``user`` fact names who acted -- except on user-changed, where it is the account changed.
    user = None if record.event == AuditEvent.USER_CHANGED.value else _text(facts.get("user"))
    bare_peer = record.peer_host is not None and not record.calling_ae and not record.called_ae
    # A login with no AE title (the web UI): the host is the client of the user who signs in.
    actor_host = record.peer_host if bare_peer and mapping.event_id == USER_AUTHENTICATION else None
    inbound = bool(record.calling_ae) or (bare_peer and actor_host is None)
    peer_is_requestor = inbound and record.peer_host is not None and user is None
    out: list[_Participant] = []
    if inbound:
        title = record.calling_ae
        out.append(
            _Participant(
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
            _Participant(
                user_id=record.called_ae,
                kind="called",
                alt_user_id=f"AETITLES={record.called_ae}",
                host=None if inbound else record.peer_host,
                roles=(ROLE_DESTINATION,) if transfer else (),
            )
        )
    if user is not None:
        out.append(_Participant(user_id=user, kind="user", requestor=True))
    node_roles: tuple[Code, ...] = ()
    if transfer:
        if not inbound:
            node_roles = (ROLE_SOURCE,)
        elif not record.called_ae:
            node_roles = (ROLE_DESTINATION,)
    elif mapping.event_id == APPLICATION_ACTIVITY:
        node_roles = (ROLE_APPLICATION,)
    out.append(
        _Participant(
            user_id=record.actor or AUDIT_SOURCE_ID,
            kind="actor",
            requestor=not peer_is_requestor and user is None,
            host=actor_host,
            roles=node_roles,
        )
    )
    return out


def _objects(record: AuditRecord) -> list[_Object]:
    facts = record.facts
    out: list[_Object] = []
    if record.study_uid:
        uids = _sop_uids(record)
        series = facts.get("output_series_uid") or facts.get("series_uid")
        out.append(
            _Object(
                kind="study",
                object_id=record.study_uid,
                id_type=ID_STUDY_INSTANCE_UID,
                type_code="2",
                role="3",
                details=(("SeriesInstanceUID", str(series)),) if series else (),
                sop_uids=uids,
                instance_count=_instance_count(record, uids),
                sop_class_uid=_text(facts.get("sop_class_uid")),
            )
        )
    if record.patient_id:
        out.append(
            _Object(
                kind="patient",
                object_id=record.patient_id,
                id_type=ID_PATIENT_NUMBER,
                type_code="1",
                role="1",
            )
        )
    if record.event == AuditEvent.AUDIT_LOG_USED.value:
        log_details = [(key, _text(facts.get(key))) for key in ("what", "filters")]
        out.append(
            _Object(
                kind="log",
                object_id=AUDIT_LOG_URI,
                id_type=ID_URI,
                type_code="2",
                role="13",
                name="Security Audit Log",
                details=tuple((key, text) for key, text in log_details if text is not None),
            )
        )
    if record.event == AuditEvent.USER_CHANGED.value and _text(facts.get("user")):
        out.append(
            _Object(
                kind="account",
                object_id=str(_text(facts.get("user"))),
                id_type=ID_USER_IDENTIFIER,
                type_code="1",
                role="11",
            )
        )
    if record.event == AuditEvent.SECURITY_ALERT.value and (record.peer_host or record.calling_ae):
        alert = " ".join(t for t in (_text(facts.get("alert")), _text(facts.get("reason"))) if t is not None)
        out.append(
            _Object(
                kind="alert-subject",
                object_id=str(record.peer_host or record.calling_ae),
                id_type=ID_NODE,
                type_code="2",
                details=(("Alert Description", alert),) if alert else (),
            )
        )
    out.append(
        _Object(
            kind="record",
            object_id=f"{RECORD_SYSTEM}:{record.seq}",
            id_type=ID_URI,
            type_code="2",
            role="13",
            details=((CHAIN_DETAIL_TYPE, _chain_json(record)),),
        )
    )
    return out


def _view(record: AuditRecord) -> _View:
    mapping = event_mapping(record)
    facts = record.facts
    description = _text(facts.get("error")) or _text(facts.get("reason"))
    view = _View(
        record=record,
        mapping=mapping,
        when=datetime.fromtimestamp(record.at, UTC),
        outcome=_outcome(int(record.outcome)),
        description=description,
    )
    view.participants = _participants(record, mapping)
    view.objects = _objects(record)
    return view


# --- DICOM XML ----------------------------------------------------------------------------------

_XML_INVALID = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_safe(text: str) -> str:
    """Text that XML 1.0 can carry: characters it forbids (most controls) become U+FFFD."""
    return _XML_INVALID.sub("\ufffd", text)


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {
            "csd-code": _xml_safe(code.code),
            "codeSystemName": code.scheme,
            "originalText": _xml_safe(code.meaning),
        },
    )


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _message_element(record: AuditRecord) -> ET.Element:
    view = _view(record)
    root = ET.Element("AuditMessage")
    event = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": view.mapping.action,
            "EventDateTime": view.when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "EventOutcomeIndicator": str(view.outcome),
        },
    )
    _coded(event, "EventID", view.mapping.event_id)
    for type_code in view.mapping.type_codes:
        _coded(event, "EventTypeCode", type_code)
    if view.description is not None:
        ET.SubElement(event, "EventOutcomeDescription").text = _xml_safe(view.description)

    for p in view.participants:
        attrs = {"UserID": _xml_safe(p.user_id), "UserIsRequestor": "true" if p.requestor else "false"}
        if p.alt_user_id:
            attrs["AlternativeUserID"] = _xml_safe(p.alt_user_id)
        if p.host:
            attrs["NetworkAccessPointID"] = _xml_safe(p.host)
            attrs["NetworkAccessPointTypeCode"] = str(p.host_type)
        participant = ET.SubElement(root, "ActiveParticipant", attrs)
        for role in p.roles:
            _coded(participant, "RoleIDCode", role)

    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": AUDIT_SOURCE_ID})
    # The schema's own value 4 (application server process), so no codeSystemName/originalText:
    # those would make it a code of that system, and "4" is no DCM code.
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": AUDIT_SOURCE_TYPE_CODE})

    for obj in view.objects:
        attrs = {"ParticipantObjectID": _xml_safe(obj.object_id)}
        if obj.type_code:
            attrs["ParticipantObjectTypeCode"] = obj.type_code
        if obj.role:
            attrs["ParticipantObjectTypeCodeRole"] = obj.role
        element = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
        _coded(element, "ParticipantObjectIDTypeCode", obj.id_type)
        if obj.name:
            ET.SubElement(element, "ParticipantObjectName").text = obj.name
        for detail_type, value in obj.details:
            ET.SubElement(element, "ParticipantObjectDetail", {"type": detail_type, "value": _b64(value)})
        if obj.sop_uids or obj.instance_count is not None:
            description = ET.SubElement(element, "ParticipantObjectDescription")
            sop_class: dict[str, str] = {"NumberOfInstances": str(obj.instance_count or 0)}
            if obj.sop_class_uid:
                sop_class["UID"] = _xml_safe(obj.sop_class_uid)
            sop_element = ET.SubElement(description, "SOPClass", sop_class)
            for uid in obj.sop_uids:
                ET.SubElement(sop_element, "Instance", {"UID": _xml_safe(uid)})
    return root


def to_dicom_xml(record: AuditRecord) -> str:
    """One DICOM audit message (PS3.15 A.5.1) for one record.

    Parameters
    ----------
    record
        A stored audit record.

    Returns
    -------
    str
        The ``<AuditMessage>`` element as XML text (no XML declaration).
    """
    return ET.tostring(_message_element(record), encoding="unicode")


def dicom_xml_document(records: Iterable[AuditRecord]) -> str:
    """Several audit messages in one XML document.

    Parameters
    ----------
    records
        Audit records, exported in the given order.

    Returns
    -------
    str
        ``<?xml version="1.0" encoding="UTF-8"?>`` and an ``<AuditMessages>`` root holding one
        ``<AuditMessage>`` per record.
    """
    root = ET.Element("AuditMessages")
    for record in records:
        root.append(_message_element(record))
    body = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


# --- FHIR ---------------------------------------------------------------------------------------


def _coding(code: Code) -> dict[str, str]:
    return {
        "system": _SCHEME_SYSTEMS.get(code.scheme, f"urn:dicom-node:{code.scheme}"),
        "code": code.code,
        "display": code.meaning,
    }


def _uid_identifier(uid: str) -> dict[str, str]:
    return {"system": UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _full_url(kind: str, record: AuditRecord) -> str:
    return f"urn:uuid:{uuid.uuid5(_FHIR_UUID_NAMESPACE, f'{kind}:{record.seq}:{record.hash}')}"


def _agent_who(p: _Participant) -> dict[str, Any]:
    system = {"calling": AE_TITLE_SYSTEM, "called": AE_TITLE_SYSTEM, "actor": ACTOR_SYSTEM}.get(
        p.kind, USER_SYSTEM
    )
    who: dict[str, Any] = {"identifier": {"system": system, "value": p.user_id}}
    if p.kind == "actor":
        who["type"] = "Device"
    return who


def _what(obj: _Object) -> dict[str, Any]:
    if obj.kind == "study":
        return {"identifier": _uid_identifier(obj.object_id), "type": "ImagingStudy"}
    if obj.kind == "patient":
        return {"identifier": {"value": obj.object_id}, "type": "Patient"}
    if obj.kind == "record":
        return {"identifier": {"system": RECORD_SYSTEM, "value": str(obj.object_id.rsplit(":", 1)[-1])}}
    if obj.kind == "account":
        return {"identifier": {"system": USER_SYSTEM, "value": obj.object_id}}
    reference: dict[str, Any] = {"identifier": {"value": obj.object_id}}
    if obj.name:
        reference["display"] = obj.name
    return reference


def _entity_details(obj: _Object, version: str) -> list[dict[str, Any]]:
    details: list[tuple[str, str]] = list(obj.details)
    if obj.sop_class_uid:
        details.append(("SOPClassUID", obj.sop_class_uid))
    if obj.instance_count is not None and not obj.sop_uids:
        details.append(("NumberOfInstances", str(obj.instance_count)))
    if version == "R5":
        return [{"type": {"text": t}, "valueString": v} for t, v in details]
    return [{"type": t, "valueString": v} for t, v in details]


def _entities(view: _View, version: str, provenance_url: str | None) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    for obj in view.objects:
        entity: dict[str, Any] = {"what": _what(obj)}
        if obj.role:
            role_code = {"system": _OBJECT_ROLE_SYSTEM, "code": obj.role}
            entity["role"] = {"coding": [role_code]} if version == "R5" else role_code
        if version == "R4B" and obj.type_code:
            entity["type"] = {"system": _ENTITY_TYPE_SYSTEM, "code": obj.type_code}
        details = _entity_details(obj, version)
        if details:
            entity["detail"] = details
        entities.append(entity)
        for uid in obj.sop_uids:
            instance: dict[str, Any] = {"what": {"identifier": _uid_identifier(uid)}}
            if version == "R5":
                instance["role"] = {"coding": [{"system": _OBJECT_ROLE_SYSTEM, "code": "3"}]}
            else:
                instance["role"] = {"system": _OBJECT_ROLE_SYSTEM, "code": "3"}
                instance["type"] = {"system": _ENTITY_TYPE_SYSTEM, "code": "2"}
            entities.append(instance)
    if provenance_url is not None:
        link: dict[str, Any] = {"what": {"reference": provenance_url, "type": "Provenance"}}
        if version == "R4B":
            link["type"] = {"system": _RESOURCE_TYPE_SYSTEM, "code": "Provenance"}
        entities.append(link)
    return entities


def _audit_event_r5(view: _View, provenance_url: str | None) -> Any:
    from fhir.resources.auditevent import AuditEvent as FhirAuditEvent

    mapping = view.mapping
    outcome: dict[str, Any] = {
        "code": {
            "system": _OUTCOME_SYSTEM_R5,
            "code": str(view.outcome),
            "display": _OUTCOME_TEXT[view.outcome],
        }
    }
    if view.description is not None:
        outcome["detail"] = [{"text": view.description}]
    agents = []
    for p in view.participants:
        agent: dict[str, Any] = {"who": _agent_who(p), "requestor": p.requestor}
        if p.roles:
            agent["type"] = {"coding": [_coding(p.roles[0])]}
        if p.host:
            agent["networkString"] = p.host
        agents.append(agent)
    data: dict[str, Any] = {
        "category": [{"coding": [_coding(mapping.event_id)]}],
        "code": {"coding": [_coding(c) for c in (mapping.type_codes or (mapping.event_id,))]},
        "action": mapping.action,
        "severity": _SEVERITY_R5[view.outcome],
        "occurredDateTime": view.when,
        "recorded": view.when,
        "outcome": outcome,
        "agent": agents,
        "source": {
            "observer": {"display": AUDIT_SOURCE_ID, "type": "Device"},
            "type": [
                {"coding": [{"system": _SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}]}
            ],
        },
        "entity": _entities(view, "R5", provenance_url),
    }
    if view.record.patient_id:
        data["patient"] = {"identifier": {"value": view.record.patient_id}, "type": "Patient"}
    return FhirAuditEvent.model_validate(data)


def _audit_event_r4b(view: _View, provenance_url: str | None) -> Any:
    from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

    mapping = view.mapping
    agents = []
    for p in view.participants:
        agent: dict[str, Any] = {"who": _agent_who(p), "requestor": p.requestor}
        if p.alt_user_id:
            agent["altId"] = p.alt_user_id
        if p.roles:
            agent["type"] = {"coding": [_coding(p.roles[0])]}
        if p.host:
            agent["network"] = {"address": p.host, "type": p.host_type}
        agents.append(agent)
    data: dict[str, Any] = {
        "type": _coding(mapping.event_id),
        "action": mapping.action,
        "recorded": view.when,
        "period": {"start": view.when, "end": view.when},
        "outcome": str(view.outcome),
        "agent": agents,
        "source": {
            "observer": {"display": AUDIT_SOURCE_ID, "type": "Device"},
            "type": [{"system": _SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}],
        },
        "entity": _entities(view, "R4B", provenance_url),
    }
    if mapping.type_codes:
        data["subtype"] = [_coding(c) for c in mapping.type_codes]
    if view.description is not None:
        data["outcomeDesc"] = view.description
    return FhirAuditEvent.model_validate(data)


def _provenance_data(record: AuditRecord, when: datetime) -> dict[str, Any]:
    facts = record.facts
    targets: list[dict[str, Any]] = []
    series = facts.get("output_series_uid")
    if series:
        targets.append({"identifier": _uid_identifier(str(series)), "display": "Series Instance UID"})
    for uid in facts.get("outputs") or []:
        targets.append({"identifier": _uid_identifier(str(uid)), "display": "SOP Instance UID"})
    if not targets:  # Provenance.target is 1..*: fall back on the study
        if record.study_uid:
            targets.append({"identifier": _uid_identifier(record.study_uid), "type": "ImagingStudy"})
        else:
            targets.append({"identifier": {"system": RECORD_SYSTEM, "value": str(record.seq)}})

    node: dict[str, Any] = {"type": "Device", "display": AUDIT_SOURCE_ID}
    if record.actor:
        node["identifier"] = {"system": ACTOR_SYSTEM, "value": record.actor}
    agents: list[dict[str, Any]] = [
        {"type": {"coding": [{"system": _PROVENANCE_AGENT_SYSTEM, "code": "performer"}]}, "who": node}
    ]
    model = facts.get("model")
    if isinstance(model, Mapping):
        label = " ".join(str(model[k]) for k in ("name", "version") if model.get(k)) or "model"
        who: dict[str, Any] = {"type": "Device", "display": label}
        if model.get("weights_sha256"):
            who["identifier"] = {"system": WEIGHTS_SYSTEM, "value": str(model["weights_sha256"])}
        agents.append(
            {"type": {"coding": [{"system": _PROVENANCE_AGENT_SYSTEM, "code": "author"}]}, "who": who}
        )

    entities: list[dict[str, Any]] = []
    for item in facts.get("inputs") or []:
        if isinstance(item, Mapping):
            uid, digest = item.get("sop_uid"), item.get("sha256")
        else:
            uid, digest = item, None
        if not uid:
            continue
        what: dict[str, Any] = {"identifier": _uid_identifier(str(uid))}
        if digest:
            # A Reference holds one identifier (the SOP Instance UID); the content digest rides
            # in its display. The full inputs are in the matching AuditEvent's chain detail.
            what["display"] = f"sha256:{digest}"
        entities.append({"role": "source", "what": what})

    data: dict[str, Any] = {"target": targets, "recorded": when, "occurredDateTime": when, "agent": agents}
    pipeline = _text(facts.get("pipeline"))
    if pipeline:
        coding: dict[str, Any] = {"system": PIPELINE_SYSTEM, "code": pipeline, "display": pipeline}
        version = _text(facts.get("pipeline_version"))
        if version:
            coding["version"] = version
        data["activity"] = {"coding": [coding], "text": f"{pipeline} {version}" if version else pipeline}
    if entities:
        data["entity"] = entities
    return data


def _provenance(record: AuditRecord, when: datetime, version: str) -> Any:
    data = _provenance_data(record, when)
    if version == "R5":
        from fhir.resources.provenance import Provenance

        if record.patient_id:
            data["patient"] = {"identifier": {"value": record.patient_id}, "type": "Patient"}
        return Provenance.model_validate(data)
    from fhir.resources.R4B.provenance import Provenance as ProvenanceR4B

    return ProvenanceR4B.model_validate(data)


def fhir_bundle(records: Iterable[AuditRecord], version: str = "R5") -> dict[str, Any]:
    """A FHIR ``Bundle`` (type ``collection``) of the records.

    Parameters
    ----------
    records
        Audit records, exported in the given order.
    version
        ``"R5"`` or ``"R4B"``: the FHIR release whose ``fhir.resources`` models build (and so
        validate) every resource.

    Returns
    -------
    dict
        The bundle as JSON-ready data (``model_dump(mode="json", exclude_none=True)``): one
        ``AuditEvent`` per record, and after the ``AuditEvent`` of each ``provenance`` record a
        ``Provenance`` (targets: the output series and instances; agents: the node and the model
        with its weights sha256; entities: the inputs), which that ``AuditEvent`` references.

    Raises
    ------
    ValueError
        When ``version`` is not one of ``FHIR_VERSIONS``.
    """
    if version not in FHIR_VERSIONS:
        raise ValueError(f"unsupported FHIR version {version!r}; allowed: {', '.join(FHIR_VERSIONS)}")
    if version == "R5":
        from fhir.resources.bundle import Bundle
    else:
        from fhir.resources.R4B.bundle import Bundle  # type: ignore[assignment]

    entries: list[dict[str, Any]] = []
    for record in records:
        view = _view(record)
        provenance_url = (
            _full_url("Provenance", record) if record.event == AuditEvent.PROVENANCE.value else None
        )
        build = _audit_event_r5 if version == "R5" else _audit_event_r4b
        entries.append({"fullUrl": _full_url("AuditEvent", record), "resource": build(view, provenance_url)})
        if provenance_url is not None:
            entries.append({"fullUrl": provenance_url, "resource": _provenance(record, view.when, version)})
    bundle = Bundle.model_validate({"type": "collection", "entry": entries})
    dumped: dict[str, Any] = bundle.model_dump(mode="json", exclude_none=True)
    return dumped
