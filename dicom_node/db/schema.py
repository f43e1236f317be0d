"""The SQL schema of the index, the jobs and the outbox (SQLAlchemy Core tables).

Times are UNIX epoch seconds (float): they are compared for timers, leases and backoff far
more often than they are shown. The schema is created and upgraded by the Alembic
migrations in ``dicom_node/db/migrations``; never by ``create_all`` at run time.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

#: The largest row id: PostgreSQL's INTEGER (SQLite's ids are wider but never get there).
#: A larger id names no row on either backend.
MAX_ROW_ID = 2**31 - 1

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

UID = String(64)

patients = Table(
    "patients",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("issuer", String(64), nullable=False, default=""),
    Column("patient_name", String(324)),
    Column("birth_date", String(8)),
    Column("sex", String(16)),
    UniqueConstraint("patient_id", "issuer", name="uq_patients_patient_id_issuer"),
)

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False, unique=True),
    Column("patient_fk", ForeignKey("patients.id"), nullable=False),
    Column("study_date", String(8)),
    Column("accession_number", String(16)),
    Column("description", String(64)),
    #: Calling AE title of the first instance received; routes match on it.
    Column("source_ae", String(16)),
    Column("first_received_at", Float, nullable=False),
    #: Version that newly arriving instances join; bumped when the study becomes ready.
    Column("open_version", Integer, nullable=False, default=1),
    #: When the retention rule removed the study's files ([retention]); cleared when an
    #: instance of it arrives again. NULL: its files are on disk.
    Column("purged_at", Float),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_uid", UID, nullable=False, unique=True),
    Column("study_fk", ForeignKey("studies.id"), nullable=False, index=True),
    Column("modality", String(16)),
    Column("series_number", Integer),
    Column("description", String(64)),
    Column("body_part", String(16)),
    Column("frame_of_reference_uid", UID),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_uid", UID, nullable=False),
    #: 1 for the first bytes received under this SOP Instance UID; +1 per different resend.
    Column("version", Integer, nullable=False, default=1),
    #: False once a newer version of the same SOP Instance UID has arrived.
    Column("current", Boolean, nullable=False, default=True),
    Column("series_fk", ForeignKey("series.id"), nullable=False, index=True),
    Column("study_fk", ForeignKey("studies.id"), nullable=False),
    Column("study_version", Integer, nullable=False),
    Column("sop_class_uid", UID, nullable=False),
    Column("transfer_syntax_uid", UID, nullable=False),
    Column("instance_number", Integer),
    #: Path relative to the data directory.
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
    #: sha256 of the data set bytes exactly as received on the wire.
    Column("sha256", String(64), nullable=False),
    Column("calling_ae", String(16)),
    #: The AE title the sender called us by (policies may route on it).
    Column("called_ae", String(16)),
    Column("peer_host", String(255)),
    Column("received_at", Float, nullable=False),
    #: Tags routing and policies read (CTDIvol, KVP, slice thickness, protocol, ...).
    Column("tags", JSON, nullable=False, default=dict),
    #: Why this instance never opens a study version or a job: ``own-output`` (this node
    #: made it and it came back), ``ai-output`` (another AI node made it; rules decide),
    #: NULL for an acquired instance.
    Column("role", String(16)),
    #: When the retention rule removed this file (the row stays: the study's history). A
    #: purged instance is never current; the same SOP Instance UID sent again is stored as
    #: a new version, whatever its bytes.
    Column("purged_at", Float),
    #: When an identical copy last arrived (a duplicate: acknowledged, not stored again).
    #: The retention rule counts it as activity, and never removes a file a duplicate's
    #: acknowledgement relied on (the store records it, under the writers' lock, before it
    #: acknowledges; a purge that committed first makes the copy a new version instead).
    Column("last_seen_at", Float),
    UniqueConstraint("sop_uid", "version", name="uq_instances_sop_uid_version"),
    Index("ix_instances_study_version", "study_fk", "study_version"),
)

#: A rule's ``urgency`` as stored in ``jobs.urgency`` (higher runs first).
URGENCY: dict[str, int] = {"offpeak": -1, "normal": 0, "urgent": 1}


def urgency_name(value: int) -> str:
    """The word for a stored ``jobs.urgency`` (a number no rule can give: the number)."""
    return next((name for name, n in URGENCY.items() if n == value), str(value))


jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_fk", ForeignKey("studies.id"), nullable=False, index=True),
    Column("study_version", Integer, nullable=False),
    Column("pipeline", String(64), nullable=False),
    Column("destinations", JSON, nullable=False, default=list),
    #: The policy rule that made this job, its gate and QC limits, frozen at creation so a
    #: policy reload never changes a job already under way.
    Column("rule", String(64)),
    Column("gate", String(16), nullable=False, default="auto"),
    Column("qc_policy", JSON, nullable=False, default=dict),
    Column("options", JSON, nullable=False, default=dict),
    #: The series the policy selected for the pipeline (None: the pipeline chooses).
    Column("series_uid", UID),
    #: Why a destination would refuse the outputs (its profile's checks, run before the
    #: gate); a job with any is held, and approving it is refused. None: not checked.
    Column("destination_problems", JSON),
    #: The rule's ``priors`` (policies.model.Priors), frozen at creation; None: none asked.
    Column("priors", JSON),
    #: The rule's ``urgency`` (:data:`URGENCY`): queued jobs are taken most urgent first,
    #: then oldest first; a job's deliveries go before those of less urgent jobs.
    Column("urgency", Integer, nullable=False, default=0, server_default="0"),
    Column("state", String(16), nullable=False, index=True),
    Column("reason", Text),
    Column("runs", Integer, nullable=False, default=0),
    Column("claimed_by", String(128)),
    Column("lease_until", Float),
    #: When a message for the queued job was last published to the broker (Celery engine;
    #: None: never, or the job was requeued since).
    Column("dispatched_at", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

#: The prior series a job uses (fetched from an archive or already held here): what its
#: provenance lists. One row per series; ``sop_count`` instances of it were in the index.
job_priors = Table(
    "job_priors",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_fk", ForeignKey("jobs.id"), nullable=False, index=True),
    Column("study_uid", UID, nullable=False),
    Column("series_uid", UID, nullable=False),
    Column("study_date", String(8)),
    Column("archive", String(64), nullable=False),
    #: When it was retrieved for this job (None: already held here, nothing fetched).
    Column("retrieved_at", Float),
    Column("sop_count", Integer, nullable=False, default=0),
    UniqueConstraint("job_fk", "series_uid", name="uq_job_priors_job_fk_series_uid"),
)

job_inputs = Table(
    "job_inputs",
    metadata,
    Column("job_fk", ForeignKey("jobs.id"), primary_key=True),
    Column("instance_fk", ForeignKey("instances.id"), primary_key=True),
)

job_transitions = Table(
    "job_transitions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_fk", ForeignKey("jobs.id"), nullable=False, index=True),
    Column("from_state", String(16)),
    Column("to_state", String(16), nullable=False),
    Column("at", Float, nullable=False),
    Column("reason", Text),
    Column("actor", String(128)),
)

#: Seconds each stage of a job's run took (one row per stage per run): inference time by
#: pipeline and stage for /metrics.
job_stage_times = Table(
    "job_stage_times",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_fk", ForeignKey("jobs.id"), nullable=False, index=True),
    Column("stage", String(64), nullable=False),
    Column("seconds", Float, nullable=False),
    Column("at", Float, nullable=False),
)

job_outputs = Table(
    "job_outputs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_fk", ForeignKey("jobs.id"), nullable=False, index=True),
    Column("series_uid", UID, nullable=False),
    Column("sop_uid", UID, nullable=False, index=True),
    Column("sop_class_uid", UID, nullable=False),
    Column("transfer_syntax_uid", UID, nullable=False),
    #: Absolute path of the file to send.
    Column("path", Text, nullable=False),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_fk", ForeignKey("jobs.id"), nullable=False, index=True),
    Column("series_uid", UID, nullable=False),
    Column("destination", String(64), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_error", Text),
    Column("claimed_by", String(128)),
    Column("lease_until", Float),
    Column("created_at", Float, nullable=False),
    Column("delivered_at", Float),
    UniqueConstraint("job_fk", "series_uid", "destination", name="uq_deliveries_job_series_dest"),
)

delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("delivery_fk", ForeignKey("deliveries.id"), nullable=False, index=True),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("outcome", String(16)),
    Column("detail", Text),
    Column("instances_sent", Integer, nullable=False, default=0),
    Column("instances_failed", Integer, nullable=False, default=0),
)

storage_commitments = Table(
    "storage_commitments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("delivery_fk", ForeignKey("deliveries.id"), nullable=False, index=True),
    #: The attempt whose series this transaction asks the peer to commit.
    Column("attempt_fk", ForeignKey("delivery_attempts.id")),
    #: Storage Commitment Transaction UID: what the peer's N-EVENT-REPORT is matched by.
    Column("transaction_uid", UID, nullable=False, unique=True),
    #: requested → committed | failed | timed_out; cancelled when the N-ACTION never left.
    Column("state", String(16), nullable=False, index=True),
    #: [[SOP Class UID, SOP Instance UID], ...] as sent in the Referenced SOP Sequence.
    Column("references", JSON, nullable=False, default=list),
    Column("requested_at", Float, nullable=False),
    #: When the result is overdue (set once the N-ACTION was answered).
    Column("deadline", Float),
    Column("reported_at", Float),
    #: AE title that sent the N-EVENT-REPORT, and on which association.
    Column("reported_by", String(16)),
    Column("reported_via", String(16)),
    Column("committed", Integer),
    Column("failed", Integer),
    #: [{"sop_uid", "sop_class_uid", "reason"}] for failed or unreported instances.
    Column("failures", JSON),
    Column("detail", Text),
)

mpps = Table(
    "mpps",
    metadata,
    Column("id", Integer, primary_key=True),
    #: The Modality Performed Procedure Step's SOP Instance UID (the scanner's N-CREATE).
    Column("sop_uid", UID, nullable=False, unique=True),
    #: Study Instance UID of the first Scheduled Step Attributes item.
    Column("study_uid", UID, nullable=False, index=True),
    Column("calling_ae", String(16)),
    Column("peer_host", String(255)),
    #: "IN PROGRESS" → "COMPLETED" | "DISCONTINUED" (Performed Procedure Step Status).
    Column("status", String(16), nullable=False),
    #: SOP Instance UIDs the step lists (Performed Series Sequence: images and non-image
    #: composite instances); UIDs only, nothing else of the attribute list is kept.
    Column("referenced", JSON, nullable=False, default=list),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    #: When the study was made ready after this step had ended; a step counts once, so an
    #: instance arriving later waits for its own signal or the timer.
    Column("settled_at", Float),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("calling_ae", String(16)),
    Column("peer_host", String(255)),
    #: SOP Instance UID as claimed in the C-STORE request (the data set may lack one).
    Column("claimed_sop_uid", UID),
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    #: "auditor" (audit search, reports, chain status) or "operator" (studies, jobs, review).
    Column("role", String(16), nullable=False),
    #: scrypt$N$r$p$salt$hash (hex)
    Column("password_hash", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", Integer, primary_key=True),
    #: sha256 of the session token; the token itself lives only in the browser's cookie.
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("user_fk", ForeignKey("users.id"), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_fk", ForeignKey("users.id"), nullable=False, index=True),
    #: What the token is for ("nightly export", "ris-bridge"): shown in listings and the audit.
    Column("name", String(64), nullable=False),
    #: sha256 of the token; the token itself is shown once, when it is made.
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    #: None: valid until revoked.
    Column("expires_at", Float),
    Column("revoked_at", Float),
    #: Updated at most once a minute (a busy client must not make every request a write).
    Column("last_used_at", Float),
)
