"""DICOM PS3.15 A.5.1 audit messages (XML, RFC 3881 lineage) for audit records.

See :mod:`audit.export.mapping` for the event each record becomes and
:mod:`audit.export.record_view` for its participants and objects.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable

from audit.export.mapping import AUDIT_SOURCE_ID, AUDIT_SOURCE_TYPE_CODE, Code
from audit.export.record_view import record_view
from audit.trail import AuditRecord

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
    view = record_view(record)
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
