"""FHIR ``Bundle``s (R5 or R4B) of audit records, each an ``AuditEvent`` plus, for a
``provenance`` record, the ``Provenance`` of the instances it derived.

See :mod:`audit.export.mapping` for the event each record becomes and
:mod:`audit.export.record_view` for its agents and entities.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from audit.events import AuditEvent
from audit.export.mapping import AUDIT_SOURCE_ID, LOCAL_SCHEME, Code
from audit.export.record_view import (
    RECORD_SYSTEM,
    Participant,
    ParticipantObject,
    RecordView,
    fact_text,
    record_view,
)
from audit.trail import AuditRecord

FHIR_VERSIONS = ("R5", "R4B")

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
LOCAL_SYSTEM = "urn:dicom-node:audit-event"
UID_SYSTEM = "urn:dicom:uid"
AE_TITLE_SYSTEM = "urn:dicom-node:ae-title"
ACTOR_SYSTEM = "urn:dicom-node:actor"
USER_SYSTEM = "urn:dicom-node:user"
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
_OUTCOME_TEXT = {0: "Success", 4: "Minor failure", 8: "Serious failure", 12: "Major failure"}
_SEVERITY_R5 = {0: "informational", 4: "warning", 8: "error", 12: "critical"}


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


def _agent_who(p: Participant) -> dict[str, Any]:
    system = {"calling": AE_TITLE_SYSTEM, "called": AE_TITLE_SYSTEM, "actor": ACTOR_SYSTEM}.get(
        p.kind, USER_SYSTEM
    )
    who: dict[str, Any] = {"identifier": {"system": system, "value": p.user_id}}
    if p.kind == "actor":
        who["type"] = "Device"
    return who


def _what(obj: ParticipantObject) -> dict[str, Any]:
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


def _entity_details(obj: ParticipantObject, version: str) -> list[dict[str, Any]]:
    details: list[tuple[str, str]] = list(obj.details)
    if obj.sop_class_uid:
        details.append(("SOPClassUID", obj.sop_class_uid))
    if obj.instance_count is not None and not obj.sop_uids:
        details.append(("NumberOfInstances", str(obj.instance_count)))
    if version == "R5":
        return [{"type": {"text": t}, "valueString": v} for t, v in details]
    return [{"type": t, "valueString": v} for t, v in details]


def _entities(view: RecordView, version: str, provenance_url: str | None) -> list[dict[str, Any]]:
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


def _audit_event_r5(view: RecordView, provenance_url: str | None) -> Any:
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


def _audit_event_r4b(view: RecordView, provenance_url: str | None) -> Any:
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
    pipeline = fact_text(facts.get("pipeline"))
    if pipeline:
        coding: dict[str, Any] = {"system": PIPELINE_SYSTEM, "code": pipeline, "display": pipeline}
        version = fact_text(facts.get("pipeline_version"))
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
        view = record_view(record)
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
