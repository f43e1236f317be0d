"""Audit-log exports: DICOM PS3.15 audit messages (XML) and FHIR R5 / R4B bundles."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
from fhir.resources.bundle import Bundle as BundleR5
from fhir.resources.R4B.bundle import Bundle as BundleR4B

from audit import AuditEvent, AuditRecord, Outcome
from audit.export import dicom_xml_document, event_mapping, fhir_bundle, to_dicom_xml
from audit.export.fhir import WEIGHTS_SYSTEM
from audit.export.mapping import EVENT_MAP
from audit.trail import GENESIS_HASH, HASHED_FIELDS, canonical_json, chain_hash

STUDY = "1.2.826.0.1.3680043.8.498.1001"
SERIES_IN = "1.2.826.0.1.3680043.8.498.1001.1"
SERIES_OUT = "1.2.826.0.1.3680043.8.498.1001.900"
INPUT_SOPS = [f"1.2.826.0.1.3680043.8.498.1001.1.{i}" for i in (1, 2, 3)]
INPUT_SHAS = [f"{i:x}" * 64 for i in (10, 11, 12)]
OUTPUT_SOPS = [f"1.2.826.0.1.3680043.8.498.1001.900.{i}" for i in (1, 2)]
WEIGHTS = "e3" * 32
PATIENT = "SIM-CT50"
FAKE_NAME = "SIMULATED^PHANTOM"
NASTY = 'association aborted: <TPS_AE> said "busy" & closed'
NODE = "serve@node-1:4242"
SCANNER_HOST = "10.1.2.3"
T0 = 1_714_550_000.125


def _chain(specs: list[tuple[str, int, dict[str, Any]]]) -> list[AuditRecord]:
    """Records as ``AuditTrail`` writes them: hash-chained, facts round-tripped through JSON."""
    records, prev = [], GENESIS_HASH
    for seq, (event, outcome, kw) in enumerate(specs, start=1):
        kw = dict(kw)
        row: dict[str, Any] = {
            "seq": seq,
            "at": T0 + seq * 0.75,
            "event": event,
            "outcome": outcome,
            "study_uid": kw.pop("study_uid", None),
            "patient_id": kw.pop("patient_id", None),
            "calling_ae": kw.pop("calling_ae", None),
            "called_ae": kw.pop("called_ae", None),
            "peer_host": kw.pop("peer_host", None),
            "actor": kw.pop("actor", NODE),
            "facts": canonical_json(kw),
        }
        digest = chain_hash(prev, row)
        records.append(AuditRecord(**{**row, "facts": json.loads(row["facts"])}, prev_hash=prev, hash=digest))
        prev = digest
    return records


def _sequence() -> list[AuditRecord]:
    inbound = {"calling_ae": "CT_SCANNER", "peer_host": SCANNER_HOST}
    delivery = {
        "study_uid": STUDY,
        "called_ae": "TPS_AE",
        "peer_host": "tps.example.org",
        "job_id": 7,
        "delivery_id": 3,
        "destination": "tps",
        "series_uid": SERIES_OUT,
    }
    specs: list[tuple[str, int, dict[str, Any]]] = [
        ("config-loaded", 0, {"source": "/etc/dicom-node.toml", "sha256": "ab" * 32}),
        ("application-start", 0, {"version": "0.1.0", "home": "/var/lib/dicom-node"}),
        ("association-accepted", 0, {**inbound, "called_ae": "DICOM_NODE", "max_pdu": 16384}),
    ]
    for sop, sha in zip(INPUT_SOPS, INPUT_SHAS, strict=True):
        specs.append(
            (
                "instance-stored",
                0,
                {
                    **inbound,
                    "study_uid": STUDY,
                    "patient_id": PATIENT,
                    "sop_uid": sop,
                    "series_uid": SERIES_IN,
                    "sha256": sha,
                    "version": 1,
                },
            )
        )
    specs += [
        ("association-closed", 0, {**inbound, "how": "released", "instances": {"stored": 3}}),
        (
            "instances-transferred",
            0,
            {
                **inbound,
                "study_uid": STUDY,
                "patient_id": PATIENT,
                "called_ae": "DICOM_NODE",
                "direction": "received",
                "instances": 3,
            },
        ),
        ("study-ready", 0, {"study_uid": STUDY, "calling_ae": "CT_SCANNER", "study_version": 1, "jobs": [7]}),
        ("job-transition", 0, _transition(None, "queued")),
        ("job-transition", 0, _transition("queued", "running")),
        (
            "provenance",
            0,
            {
                "study_uid": STUDY,
                "patient_id": PATIENT,
                "job_id": 7,
                "study_version": 1,
                "pipeline": "ct-organs",
                "pipeline_version": "2.1.0",
                "model": {"name": "unet-organs", "version": "1.4", "weights_sha256": WEIGHTS},
                "parameters": {"threshold": 0.5, "note": FAKE_NAME},
                "inputs": [{"sop_uid": u, "sha256": s} for u, s in zip(INPUT_SOPS, INPUT_SHAS, strict=True)],
                "output_series_uid": SERIES_OUT,
                "outputs": OUTPUT_SOPS,
                "qc": {"dice_vs_atlas": 0.91},
                "gate": "pass",
            },
        ),
        ("job-transition", 0, _transition("running", "delivering")),
        ("begin-transferring", 0, {**delivery, "instances": 2, "attempt": 1}),
        (
            "delivery-attempt",
            int(Outcome.MINOR_FAILURE),
            {**delivery, "attempt": 1, "result": "retry", "instances_sent": 0, "instances_failed": 2}
            | {"error": NASTY, "next_attempt_in": 30.0},
        ),
        (
            "delivery-attempt",
            0,
            {**delivery, "attempt": 2, "result": "delivered", "instances_sent": 2, "instances_failed": 0}
            | {"error": None},
        ),
        (
            "instances-transferred",
            0,
            {
                "study_uid": STUDY,
                "called_ae": "TPS_AE",
                "peer_host": "tps.example.org",
                "direction": "sent",
                "job_id": 7,
                "series_uid": SERIES_OUT,
                "sop_uids": OUTPUT_SOPS,
            },
        ),
        ("job-transition", 0, _transition("delivering", "delivered")),
        (
            "audit-log-used",
            0,
            {"actor": "cli", "what": "search", "user": "admin", "filters": {"study": STUDY}},
        ),
        (
            "security-alert",
            int(Outcome.MINOR_FAILURE),
            {
                "calling_ae": "UNKNOWN_AE",
                "peer_host": "192.0.2.9",
                "alert": "unauthorized-node",
                "reason": "calling AE not in allow-list",
            },
        ),
        (
            "delivery-dead-letter",
            int(Outcome.SERIOUS_FAILURE),
            {**delivery, "attempt": 5, "result": "dead", "instances_sent": 0, "instances_failed": 2}
            | {"error": "connection refused"},
        ),
        ("model-quantized", int(Outcome.MAJOR_FAILURE), {"model": "unet-organs", "detail": NASTY}),
        ("application-stop", 0, {"version": "0.1.0"}),
    ]
    return _chain(specs)


def _transition(from_state: str | None, to_state: str) -> dict[str, Any]:
    return {
        "study_uid": STUDY,
        "job_id": 7,
        "pipeline": "ct-organs",
        "study_version": 1,
        "from_state": from_state,
        "to_state": to_state,
        "reason": None,
    }


@pytest.fixture(scope="module")
def records() -> list[AuditRecord]:
    return _sequence()


@pytest.fixture(scope="module")
def xml_root(records: list[AuditRecord]) -> ET.Element:
    return ET.fromstring(dicom_xml_document(records).encode("utf-8"))


@pytest.fixture(scope="module", params=["R5", "R4B"])
def bundle(request: pytest.FixtureRequest, records: list[AuditRecord]) -> tuple[str, dict[str, Any]]:
    return request.param, fhir_bundle(records, version=request.param)


def _resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def _chain_details_xml(message: ET.Element) -> list[dict[str, Any]]:
    return [
        json.loads(base64.b64decode(d.get("value", "")))
        for d in message.iter("ParticipantObjectDetail")
        if d.get("type") == "dicom-node-chain"
    ]


def _verify(payload: dict[str, Any]) -> bool:
    row = dict(payload, facts=canonical_json(payload["facts"]))
    return chain_hash(payload["prev_hash"], {k: row[k] for k in HASHED_FIELDS}) == payload["hash"]


# --- FHIR -----------------------------------------------------------------------------------------


def test_bundle_revalidates_with_its_version(bundle: tuple[str, dict[str, Any]]) -> None:
    version, data = bundle
    cls = BundleR5 if version == "R5" else BundleR4B
    parsed = cls.model_validate(data)
    assert parsed.type == "collection"
    assert parsed.entry is not None
    urls = [e["fullUrl"] for e in data["entry"]]
    assert len(set(urls)) == len(urls)
    # The exports differ in structure, so each only validates as its own release.
    other = BundleR4B if version == "R5" else BundleR5
    with pytest.raises(ValueError):
        other.model_validate(data)


def test_bundle_counts(bundle: tuple[str, dict[str, Any]], records: list[AuditRecord]) -> None:
    _, data = bundle
    assert len(_resources(data, "AuditEvent")) == len(records)
    assert len(_resources(data, "Provenance")) == 1
    assert len(data["entry"]) == len(records) + 1


def test_provenance_lists_inputs_outputs_model_and_weights(bundle: tuple[str, dict[str, Any]]) -> None:
    version, data = bundle
    (prov,) = _resources(data, "Provenance")
    targets = [t["identifier"]["value"] for t in prov["target"]]
    assert targets == [f"urn:oid:{u}" for u in [SERIES_OUT, *OUTPUT_SOPS]]
    assert {t["identifier"]["system"] for t in prov["target"]} == {"urn:dicom:uid"}
    sources = [e for e in prov["entity"] if e["role"] == "source"]
    assert [e["what"]["identifier"]["value"] for e in sources] == [f"urn:oid:{u}" for u in INPUT_SOPS]
    assert [e["what"]["display"] for e in sources] == [f"sha256:{s}" for s in INPUT_SHAS]
    displays = [a["who"]["display"] for a in prov["agent"]]
    assert displays == ["dicom-node", "unet-organs 1.4"]
    model = prov["agent"][1]["who"]
    assert model["type"] == "Device"
    assert model["identifier"] == {"system": WEIGHTS_SYSTEM, "value": WEIGHTS}
    assert prov["activity"]["coding"][0]["code"] == "ct-organs"
    assert prov["activity"]["coding"][0]["version"] == "2.1.0"
    assert prov["recorded"].startswith("2024-05-01T")
    # The provenance AuditEvent points at the Provenance entry.
    prov_url = next(e["fullUrl"] for e in data["entry"] if e["resource"]["resourceType"] == "Provenance")
    refs = [v for p, v in _strings(_resources(data, "AuditEvent")) if p.endswith(".what.reference")]
    assert refs == [prov_url]
    if version == "R5":
        assert prov["patient"] == {"identifier": {"value": PATIENT}, "type": "Patient"}


def test_outcomes_map(bundle: tuple[str, dict[str, Any]], records: list[AuditRecord]) -> None:
    version, data = bundle
    events = _resources(data, "AuditEvent")
    seen = set()
    for record, event in zip(records, events, strict=True):
        if version == "R5":
            code = event["outcome"]["code"]
            assert code["code"] == str(record.outcome)
            assert code["system"] == "http://terminology.hl7.org/CodeSystem/audit-event-outcome"
            assert (code["display"] == "Success") == (record.outcome == 0)
            assert ("failure" in code["display"]) == (record.outcome != 0)
        else:
            assert event["outcome"] == str(record.outcome)
        seen.add(record.outcome)
    assert seen == {0, 4, 8, 12}


def test_fhir_event_codes_and_participants(
    bundle: tuple[str, dict[str, Any]], records: list[AuditRecord]
) -> None:
    version, data = bundle
    events = _resources(data, "AuditEvent")
    stored = events[[r.event for r in records].index("instance-stored")]
    event_id = stored["category"][0]["coding"][0] if version == "R5" else stored["type"]
    assert event_id["code"] == "110104"
    assert event_id["system"] == "http://dicom.nema.org/resources/ontology/DCM"
    assert stored["action"] == "C"
    scanner = next(a for a in stored["agent"] if a["who"]["identifier"]["value"] == "CT_SCANNER")
    assert scanner["requestor"] is True
    assert scanner["type"]["coding"][0]["code"] == "110153"
    if version == "R5":
        assert scanner["networkString"] == SCANNER_HOST
        assert stored["patient"]["identifier"]["value"] == PATIENT
    else:
        assert scanner["network"] == {"address": SCANNER_HOST, "type": "2"}
        assert scanner["altId"] == "AETITLES=CT_SCANNER"
    study = next(e for e in stored["entity"] if e["what"].get("type") == "ImagingStudy")
    assert study["what"]["identifier"] == {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}
    unknown = events[[r.event for r in records].index("model-quantized")]
    codes = unknown["code"]["coding"] if version == "R5" else unknown["subtype"]
    assert {"system": "urn:dicom-node:audit-event", "code": "model-quantized"}.items() <= codes[-1].items()


def test_fhir_special_characters_and_chain(
    bundle: tuple[str, dict[str, Any]], records: list[AuditRecord]
) -> None:
    version, data = bundle
    events = _resources(data, "AuditEvent")
    retry = events[[r.facts.get("result") for r in records].index("retry")]
    text = retry["outcome"]["detail"][0]["text"] if version == "R5" else retry["outcomeDesc"]
    assert text == NASTY
    # Every AuditEvent carries the stored row; the chain verifies from the export alone.
    prev = GENESIS_HASH
    for record, event in zip(records, events, strict=True):
        (payload,) = [
            json.loads(v) for p, v in _strings(event) if p.endswith("valueString") and '"prev_hash"' in v
        ]
        assert payload["seq"] == record.seq and payload["hash"] == record.hash
        assert payload["prev_hash"] == prev and _verify(payload)
        prev = payload["hash"]


def test_fhir_adds_no_names(bundle: tuple[str, dict[str, Any]], records: list[AuditRecord]) -> None:
    _, data = bundle
    hits = [path for path, value in _strings(data) if FAKE_NAME in value]
    prov_index = next(i for i, e in enumerate(data["entry"]) if e["resource"]["resourceType"] == "Provenance")
    # Only in the exported facts of the record that holds it: the chain detail of its AuditEvent.
    assert len(hits) == 1
    assert hits[0].startswith(f".entry[{prov_index - 1}].resource.entity[")
    assert hits[0].endswith(".valueString")
    assert not [path for path, _ in _strings(data) if path.rsplit(".", 1)[-1] == "name"]


def test_unsupported_fhir_version(records: list[AuditRecord]) -> None:
    with pytest.raises(ValueError, match="R5.*R4B"):
        fhir_bundle(records, version="R3")
    with pytest.raises(ValueError):
        fhir_bundle([], version="r5")


def test_empty_bundle() -> None:
    data = fhir_bundle([])
    assert data == {"resourceType": "Bundle", "type": "collection"}


# --- DICOM XML ------------------------------------------------------------------------------------


def test_document_structure(xml_root: ET.Element, records: list[AuditRecord]) -> None:
    assert dicom_xml_document(records).startswith('<?xml version="1.0" encoding="UTF-8"?>\n<AuditMessages>')
    assert xml_root.tag == "AuditMessages"
    messages = list(xml_root)
    assert len(messages) == len(records)
    for message, record in zip(messages, records, strict=True):
        tags = [child.tag for child in message]
        assert tags[0] == "EventIdentification"
        assert tags.count("AuditSourceIdentification") == 1
        n_active = tags.count("ActiveParticipant")
        assert n_active >= 1
        assert tags[1 : 1 + n_active] == ["ActiveParticipant"] * n_active
        assert tags[1 + n_active] == "AuditSourceIdentification"
        assert set(tags[2 + n_active :]) == {"ParticipantObjectIdentification"}
        requestors = [p for p in message.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
        assert len(requestors) == 1
        ident = message.find("EventIdentification")
        assert ident is not None
        assert ident.get("EventOutcomeIndicator") == str(record.outcome)
        assert ident.get("EventActionCode") in {"C", "R", "U", "D", "E"}
        assert str(ident.get("EventDateTime")).endswith("Z")
        source = message.find("AuditSourceIdentification")
        assert source is not None and source.get("AuditSourceID") == "dicom-node"
        source_type = source.find("AuditSourceTypeCode")
        assert source_type is not None and source_type.get("csd-code") == "4"
    assert to_dicom_xml(records[0]) == ET.tostring(messages[0], encoding="unicode")


def _message(xml_root: ET.Element, records: list[AuditRecord], event: str, nth: int = 0) -> ET.Element:
    indices = [i for i, r in enumerate(records) if r.event == event]
    return list(xml_root)[indices[nth]]


def _codes(message: ET.Element, tag: str) -> list[tuple[str | None, str | None]]:
    return [(c.get("csd-code"), c.get("codeSystemName")) for c in message.iter(tag)]


def test_instance_stored_message(xml_root: ET.Element, records: list[AuditRecord]) -> None:
    message = _message(xml_root, records, "instance-stored", 1)
    ident = message.find("EventIdentification")
    assert ident is not None and ident.get("EventActionCode") == "C"
    event_id = ident.find("EventID")
    assert event_id is not None
    assert (event_id.get("csd-code"), event_id.get("codeSystemName")) == ("110104", "DCM")
    assert event_id.get("originalText") == "DICOM Instances Transferred"
    assert _codes(message, "EventTypeCode") == [("instance-stored", "99DCMNODE")]
    (scanner,) = [p for p in message.findall("ActiveParticipant") if p.get("UserID") == "CT_SCANNER"]
    assert scanner.get("AlternativeUserID") == "AETITLES=CT_SCANNER"
    assert scanner.get("UserIsRequestor") == "true"
    assert (scanner.get("NetworkAccessPointID"), scanner.get("NetworkAccessPointTypeCode")) == (
        SCANNER_HOST,
        "2",
    )
    assert _codes(scanner, "RoleIDCode") == [("110153", "DCM")]
    node = message.findall("ActiveParticipant")[-1]
    assert node.get("UserID") == NODE
    assert _codes(node, "RoleIDCode") == [("110152", "DCM")]
    objects = {o.get("ParticipantObjectID"): o for o in message.findall("ParticipantObjectIdentification")}
    study = objects[STUDY]
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert _codes(study, "ParticipantObjectIDTypeCode") == [("110180", "DCM")]
    sop_class = study.find("ParticipantObjectDescription/SOPClass")
    assert sop_class is not None and sop_class.get("NumberOfInstances") == "1"
    assert [i.get("UID") for i in sop_class.findall("Instance")] == [INPUT_SOPS[1]]
    patient = objects[PATIENT]
    assert (patient.get("ParticipantObjectTypeCode"), patient.get("ParticipantObjectTypeCodeRole")) == (
        "1",
        "1",
    )
    id_type = patient.find("ParticipantObjectIDTypeCode")
    assert id_type is not None
    assert (id_type.get("csd-code"), id_type.get("codeSystemName"), id_type.get("originalText")) == (
        "2",
        "RFC-3881",
        "Patient Number",
    )
    assert patient.find("ParticipantObjectName") is None


def test_event_mapping_in_xml(xml_root: ET.Element, records: list[AuditRecord]) -> None:
    def ids(event: str, nth: int = 0) -> tuple[str | None, str | None, list[str | None]]:
        message = _message(xml_root, records, event, nth)
        ident = message.find("EventIdentification")
        assert ident is not None
        event_id = ident.find("EventID")
        assert event_id is not None
        return (
            event_id.get("csd-code"),
            ident.get("EventActionCode"),
            [c for c, _ in _codes(message, "EventTypeCode")],
        )

    assert ids("application-start") == ("110100", "E", ["110120"])
    assert ids("application-stop") == ("110100", "E", ["110121"])
    assert ids("association-accepted") == ("110114", "E", ["110122", "association-accepted"])
    assert ids("association-closed") == ("110114", "E", ["110123", "association-closed"])
    assert ids("instances-transferred", 0) == ("110104", "C", [])
    assert ids("instances-transferred", 1) == ("110104", "R", [])
    assert ids("begin-transferring") == ("110102", "E", [])
    assert ids("delivery-attempt") == ("110104", "R", ["delivery-attempt"])
    assert ids("provenance") == ("110103", "C", ["provenance"])
    assert ids("job-transition") == ("110100", "E", ["job-transition"])
    assert ids("audit-log-used") == ("110101", "R", [])
    assert ids("security-alert") == ("110113", "E", ["110126"])
    assert ids("config-loaded") == ("110113", "E", ["110131", "config-loaded"])
    assert ids("model-quantized") == ("110100", "E", ["model-quantized"])


def test_every_known_event_has_a_valid_mapping() -> None:
    for kind in AuditEvent:
        record = _chain([(kind.value, 0, {})])[0]
        mapping = event_mapping(record)
        assert mapping.action in {"C", "R", "U", "D", "E"}
        assert mapping.event_id.scheme == "DCM" and mapping.event_id.code.startswith("1101")
        if kind in EVENT_MAP and not EVENT_MAP[kind].local:
            assert all(c.scheme == "DCM" for c in mapping.type_codes)
        else:
            assert mapping.type_codes[-1].code == kind.value
        if kind is AuditEvent.SECURITY_ALERT:
            assert [c.code for c in mapping.type_codes] == ["110132"]  # no peer: restricted function
        ET.fromstring(to_dicom_xml(record))


def test_outbound_delivery_participants(xml_root: ET.Element, records: list[AuditRecord]) -> None:
    message = _message(xml_root, records, "delivery-attempt", 0)
    tps, node = message.findall("ActiveParticipant")
    assert (tps.get("UserID"), tps.get("AlternativeUserID")) == ("TPS_AE", "AETITLES=TPS_AE")
    assert (tps.get("NetworkAccessPointID"), tps.get("NetworkAccessPointTypeCode")) == (
        "tps.example.org",
        "1",
    )
    assert tps.get("UserIsRequestor") == "false"
    assert _codes(tps, "RoleIDCode") == [("110152", "DCM")]
    assert node.get("UserIsRequestor") == "true"
    assert _codes(node, "RoleIDCode") == [("110153", "DCM")]
    sent = _message(xml_root, records, "instances-transferred", 1)
    instances = [i.get("UID") for i in sent.iter("Instance")]
    assert instances == OUTPUT_SOPS


def test_audit_log_used_and_security_alert(xml_root: ET.Element, records: list[AuditRecord]) -> None:
    used = _message(xml_root, records, "audit-log-used")
    (log,) = [
        o for o in used.findall("ParticipantObjectIdentification") if o.findtext("ParticipantObjectName")
    ]
    assert log.findtext("ParticipantObjectName") == "Security Audit Log"
    assert log.get("ParticipantObjectID") == "urn:dicom-node:audit-log"
    details = {
        d.get("type"): base64.b64decode(d.get("value", "")).decode()
        for d in log.iter("ParticipantObjectDetail")
    }
    assert details["what"] == "search"
    assert json.loads(details["filters"]) == {"study": STUDY}
    assert (log.get("ParticipantObjectTypeCode"), log.get("ParticipantObjectTypeCodeRole")) == ("2", "13")
    assert _codes(log, "ParticipantObjectIDTypeCode") == [("12", "RFC-3881")]
    requestor = [
        p.get("UserID") for p in used.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"
    ]
    assert requestor == ["admin"]

    alert = _message(xml_root, records, "security-alert")
    subject = next(
        o
        for o in alert.findall("ParticipantObjectIdentification")
        if _codes(o, "ParticipantObjectIDTypeCode")[0][0] == "110182"
    )
    assert subject.get("ParticipantObjectID") == "192.0.2.9"
    description = next(
        d for d in subject.iter("ParticipantObjectDetail") if d.get("type") == "Alert Description"
    )
    assert (
        base64.b64decode(description.get("value", "")).decode()
        == "unauthorized-node calling AE not in allow-list"
    )


def test_xml_chain_details_verify(xml_root: ET.Element, records: list[AuditRecord]) -> None:
    prev = GENESIS_HASH
    for message, record in zip(xml_root, records, strict=True):
        (payload,) = _chain_details_xml(message)
        assert payload["seq"] == record.seq and payload["facts"] == record.facts
        assert payload["prev_hash"] == prev and _verify(payload)
        prev = payload["hash"]
    tampered = dict(_chain_details_xml(list(xml_root)[3])[0], patient_id="OTHER")
    assert not _verify(tampered)


def test_xml_special_characters_escaped(xml_root: ET.Element, records: list[AuditRecord]) -> None:
    text = dicom_xml_document(records)
    assert NASTY not in text
    assert "&lt;TPS_AE&gt;" in text and "&amp; closed" in text
    retry = _message(xml_root, records, "delivery-attempt", 0)
    assert retry.findtext("EventIdentification/EventOutcomeDescription") == NASTY
    unknown = _message(xml_root, records, "model-quantized")
    (payload,) = _chain_details_xml(unknown)
    assert payload["facts"]["detail"] == NASTY


def test_xml_attribute_and_control_characters_round_trip() -> None:
    odd = 'line one\nline "two" <&> \x00\x1b end'
    record = _chain([("security-alert", 8, {"calling_ae": 'A&B"<', "peer_host": "fe80::1", "reason": odd})])[
        0
    ]
    message = ET.fromstring(to_dicom_xml(record))
    (peer,) = [p for p in message.findall("ActiveParticipant") if p.get("AlternativeUserID")]
    assert peer.get("UserID") == 'A&B"<' and peer.get("AlternativeUserID") == 'AETITLES=A&B"<'
    assert peer.get("NetworkAccessPointTypeCode") == "2"
    # XML 1.0 cannot carry NUL or ESC: the readable text replaces them, the chain keeps them exactly.
    assert message.findtext("EventIdentification/EventOutcomeDescription") == odd.replace(
        "\x00", "\ufffd"
    ).replace("\x1b", "\ufffd")
    (payload,) = _chain_details_xml(message)
    assert payload["facts"]["reason"] == odd and _verify(payload)


def test_xml_adds_no_names(xml_root: ET.Element, records: list[AuditRecord]) -> None:
    text = dicom_xml_document(records)
    assert FAKE_NAME not in text  # facts travel base64-encoded, never as readable names
    assert "UserName" not in text
    names = {n.text for n in xml_root.iter("ParticipantObjectName")}
    assert names == {"Security Audit Log"}
    holders = [
        record.event
        for message, record in zip(xml_root, records, strict=True)
        if any(FAKE_NAME in json.dumps(p) for p in _chain_details_xml(message))
    ]
    assert holders == ["provenance"]
    for patient in (
        o
        for o in xml_root.iter("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCode") == "1"
    ):
        assert patient.get("ParticipantObjectID") == PATIENT
        assert patient.find("ParticipantObjectName") is None


def test_web_login_and_user_changed() -> None:
    login, refused, changed = _chain(
        [
            ("user-login", 0, {"actor": "web:alice", "peer_host": "192.168.7.20", "result": "signed in"}),
            ("user-login", 4, {"actor": "web:mallory", "peer_host": "192.168.7.21", "result": "refused"}),
            ("user-changed", 0, {"actor": "os:root", "action": "disabled", "user": "bob"}),
        ]
    )
    message = ET.fromstring(to_dicom_xml(login))
    assert [c for c, _ in _codes(message, "EventID")] == ["110114"]
    assert _codes(message, "EventTypeCode") == [("110122", "DCM")]
    (person,) = message.findall("ActiveParticipant")
    assert (person.get("UserID"), person.get("UserIsRequestor")) == ("web:alice", "true")
    assert (person.get("NetworkAccessPointID"), person.get("NetworkAccessPointTypeCode")) == (
        "192.168.7.20",
        "2",
    )
    failed = ET.fromstring(to_dicom_xml(refused))
    assert failed.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]

    message = ET.fromstring(to_dicom_xml(changed))
    assert [c for c, _ in _codes(message, "EventTypeCode")] == ["110137", "user-changed"]
    (operator,) = message.findall("ActiveParticipant")
    assert (operator.get("UserID"), operator.get("UserIsRequestor")) == ("os:root", "true")
    (account,) = [
        o for o in message.findall("ParticipantObjectIdentification") if o.get("ParticipantObjectID") == "bob"
    ]
    assert (account.get("ParticipantObjectTypeCode"), account.get("ParticipantObjectTypeCodeRole")) == (
        "1",
        "11",
    )
    assert _codes(account, "ParticipantObjectIDTypeCode") == [("11", "RFC-3881")]
    for version, cls in (("R5", BundleR5), ("R4B", BundleR4B)):
        cls.model_validate(fhir_bundle([login, refused, changed], version=version))


def test_web_audit_log_use_has_the_user_as_requestor() -> None:
    (record,) = _chain([("audit-log-used", 0, {"actor": "web:alice", "what": "report", "study_uid": STUDY})])
    message = ET.fromstring(to_dicom_xml(record))
    (person,) = message.findall("ActiveParticipant")
    assert (person.get("UserID"), person.get("UserIsRequestor")) == ("web:alice", "true")
    ids = [o.get("ParticipantObjectID") for o in message.findall("ParticipantObjectIdentification")]
    assert ids == [STUDY, "urn:dicom-node:audit-log", f"urn:dicom-node:audit-record:{record.seq}"]
