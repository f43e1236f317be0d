"""The DICOM PS3.15 event (EventID, EventActionCode, EventTypeCodes) each audit record is reported as.

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
own-output-returned       110104 DICOM Instances Transferred      C       local
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
schema-upgraded           110113 Security Alert                   E       110131 Software Config. + local
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
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from audit.events import AuditEvent
from audit.trail import AuditRecord

#: AuditSourceID of every message: the node itself.
AUDIT_SOURCE_ID = "dicom-node"
LOCAL_SCHEME = "99DCMNODE"


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
    AuditEvent.OWN_OUTPUT_RETURNED: EventMapping(INSTANCES_TRANSFERRED, "C"),
    AuditEvent.STOW_RECEIVED: EventMapping(INSTANCES_TRANSFERRED, "C"),
    AuditEvent.DELIVERY_ATTEMPT: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.DELIVERY_DEAD_LETTER: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.DELIVERY_REFUSED: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.STORAGE_COMMITMENT_REQUESTED: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.STORAGE_COMMITMENT_RESULT: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.STORAGE_COMMITMENT_TIMEOUT: EventMapping(INSTANCES_TRANSFERRED, "R"),
    AuditEvent.PROVENANCE: EventMapping(INSTANCES_ACCESSED, "C"),
    AuditEvent.STUDY_PURGED: EventMapping(INSTANCES_ACCESSED, "D"),
    AuditEvent.REVIEW_APPROVED: EventMapping(INSTANCES_ACCESSED, "R"),
    AuditEvent.REVIEW_REJECTED: EventMapping(INSTANCES_ACCESSED, "R"),
    AuditEvent.STUDY_READY: EventMapping(APPLICATION_ACTIVITY, "E"),
    AuditEvent.STUDY_NOT_ROUTED: EventMapping(APPLICATION_ACTIVITY, "E"),
    AuditEvent.JOB_TRANSITION: EventMapping(APPLICATION_ACTIVITY, "E"),
    AuditEvent.GATE_DECISION: EventMapping(APPLICATION_ACTIVITY, "E"),
    AuditEvent.MODEL_LOADED: EventMapping(APPLICATION_ACTIVITY, "E"),
    AuditEvent.CONFIG_LOADED: EventMapping(SECURITY_ALERT, "E", (SOFTWARE_CONFIGURATION,)),
    # a change to the software's own data structures: PS3.15's "software configuration"
    # change (Application Activity has event types for start and stop only)
    AuditEvent.SCHEMA_UPGRADED: EventMapping(SECURITY_ALERT, "E", (SOFTWARE_CONFIGURATION,)),
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
