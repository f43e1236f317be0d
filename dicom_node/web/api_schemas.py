"""The REST API's JSON bodies (pydantic): what ``/api/openapi.json`` publishes and every
response is validated against. A field is added, never renamed or removed, within ``v1``.

Times are Unix seconds (float, UTC); ids are the node's row ids; DICOM UIDs are strings.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Problem(Body):
    """Every error: what went wrong, in words a person can act on."""

    detail: str


class Page(Body, Generic[T]):
    """One page of a listing. Pass ``next_cursor`` back as ``cursor`` for the next page;
    null: this was the last."""

    items: list[T]
    limit: int
    next_cursor: int | None


class Study(Body):
    id: int
    study_uid: str
    patient_id: str
    study_date: str | None
    accession_number: str | None
    description: str | None
    source_ae: str | None
    modalities: list[str]
    series: int
    instances: int
    #: The study version the last job ran on (a later arrival opens the next).
    version: int
    #: ``receiving``, ``stored`` (no rule matched), ``purged`` (the retention rule removed
    #: its files; the rows stay) or the state of its newest job.
    state: str
    first_received_at: float
    last_received_at: float | None
    #: When the retention rule removed its files (None: they are on disk).
    purged_at: float | None = None


class Series(Body):
    series_uid: str
    modality: str | None
    series_number: int | None
    description: str | None
    body_part: str | None
    frame_of_reference_uid: str | None
    instances: int


class JobSummary(Body):
    id: int
    study_uid: str
    patient_id: str
    study_version: int
    pipeline: str
    rule: str | None
    #: The series the rule took (None: the pipeline chose among the study's).
    series_uid: str | None = None
    #: The rule's urgency: ``normal``, ``urgent`` (runs and is sent first) or ``offpeak``
    #: (runs only inside ``[workers] offpeak_hours``).
    urgency: str = "normal"
    gate: str
    destinations: list[str]
    state: str
    reason: str | None
    runs: int
    inputs: int
    source_ae: str | None
    created_at: float
    updated_at: float


class StudyDetail(Study):
    series_list: list[Series] = Field(description="The study's series, by series number.")
    jobs: list[JobSummary]


class Transition(Body):
    from_state: str | None
    to_state: str
    at: float
    reason: str | None
    actor: str | None


class StageTime(Body):
    stage: str
    seconds: float
    at: float


class Output(Body):
    series_uid: str
    #: What the series is: ``image``, ``uncertainty``, ``hallucination``, ``seg``, ``sr``, ...
    kind: str
    instances: int


class Commitment(Body):
    transaction_uid: str
    state: str
    detail: str | None


class Delivery(Body):
    id: int
    job_id: int
    study_uid: str
    series_uid: str
    destination: str
    #: ``pending``, ``sending``, ``committing``, ``delivered`` or ``dead`` (dead letter).
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    delivered_at: float | None
    job_outputs: int
    commitment: Commitment | None


class Attempt(Body):
    id: int
    started_at: float
    finished_at: float | None
    outcome: str | None
    detail: str | None
    instances_sent: int
    instances_failed: int


class DeliveryDetail(Delivery):
    attempt_log: list[Attempt]


class JobDetail(JobSummary):
    #: Why the gate held the job (each a sentence), empty when it did not.
    gate_reasons: list[str]
    destination_problems: list[str]
    #: The QC figures the gate saw (hallucination burden, calibrated uncertainty, ...).
    qc: dict[str, Any]
    transitions: list[Transition]
    stages: list[StageTime]
    outputs: list[Output]
    deliveries: list[Delivery]


class NewerVersion(Body):
    """A later version of the held job's study has a job by the same rule: the held one
    cannot be approved; review this one."""

    job: int
    study_version: int
    state: str


class HeldJob(Body):
    id: int
    study_uid: str
    patient_id: str
    study_version: int
    rule: str | None
    pipeline: str
    destinations: list[str]
    reasons: list[str]
    destination_problems: list[str]
    held_since: float
    newer_version: NewerVersion | None = None


class ApproveBody(Body):
    note: str = Field("", max_length=2000, description="Kept with the approval and in the report.")


class RejectBody(Body):
    reason: str = Field(min_length=1, max_length=2000, description="Why: goes into the audit trail.")


class ReviewDone(Body):
    job_id: int
    state: str
    deliveries_queued: int = 0


class RetryDone(Body):
    delivery_id: int
    state: str


class RerunDone(Body):
    job_id: int
    state: str
    #: What was done, in words.
    detail: str


class RerunRequest(Body):
    #: Why (kept in the job's history and the audit log), e.g. what was fixed.
    reason: str = Field("", max_length=500)


class AuditEventOut(Body):
    seq: int
    at: float
    event: str
    #: ``success``, ``minor_failure``, ``serious_failure`` or ``major_failure`` (PS3.15).
    outcome: str
    study_uid: str | None
    patient_id: str | None
    calling_ae: str | None
    called_ae: str | None
    peer_host: str | None
    actor: str | None
    facts: dict[str, Any]
    hash: str


class ChainStatus(Body):
    intact: bool
    records: int
    head_seq: int
    first_bad_seq: int | None
    problem: str | None
    checkpoints_checked: int
    seconds: float


class Model(Body):
    name: str
    version: str
    directory: str
    #: The pipeline that runs this version (or what else uses it); null: none.
    runs_in: str | None
    pinned_by: str | None
    weights_sha256: str
    #: The weights on disk match the card's sha256 (a pipeline refuses them otherwise).
    weights_ok: bool
    weights_bytes: int | None
    training_data: str
    calibration: str
    has_evaluation: bool


class ReportTransition(Body):
    at: float
    to: str
    reason: str | None


class ReportJob(Body):
    job_id: int | None
    pipeline: str | None
    study_version: int | None
    state: str | None
    transitions: list[ReportTransition]
    provenance: list[dict[str, Any]]


class ReportDelivery(Body):
    job_id: int | None
    series_uid: str | None
    destination: str | None
    result: str
    #: Storage commitment: ``committed``, ``failed``, ``waiting`` ... or ``-`` (not asked).
    confirmed: str
    attempts: list[dict[str, Any]]


class StudyReport(Body):
    """What happened to one study, folded from its audit records (the auditor's report)."""

    study_uid: str
    patient_id: str | None
    received_instances: int
    new_versions: int
    duplicates: int
    senders: list[str]
    first_received: float | None
    last_received: float | None
    jobs: list[ReportJob]
    deliveries: list[ReportDelivery]
    audit_records: int
