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

Modules
-------
:mod:`~audit.export.mapping`
    The PS3.15 codes and the event each node event is reported as (the mapping table).
:mod:`~audit.export.record_view`
    The format-neutral view of a record both formats render: participants, participant
    objects, and the ``dicom-node-chain`` detail a collector verifies the chain with.
:mod:`~audit.export.dicom_xml`
    Writes that view as DICOM audit messages.
:mod:`~audit.export.fhir`
    Writes it as FHIR ``AuditEvent`` and ``Provenance`` resources in a ``Bundle``.
"""

from audit.export.dicom_xml import dicom_xml_document, to_dicom_xml
from audit.export.fhir import FHIR_VERSIONS, fhir_bundle
from audit.export.mapping import EventMapping, event_mapping

__all__ = [
    "FHIR_VERSIONS",
    "EventMapping",
    "dicom_xml_document",
    "event_mapping",
    "fhir_bundle",
    "to_dicom_xml",
]
