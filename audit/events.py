"""The audit vocabulary: every event the node records, as an enum.

DICOM PS3.15 A.5 events come first (their EventID codes from DCM, used by the exports),
then the node's own. Outcomes are PS3.15 EventOutcomeIndicator values.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Outcome(IntEnum):
    """PS3.15 / RFC 3881 EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class AuditEvent(StrEnum):
    """What happened. The value is the stable name stored in the log."""

    # --- DICOM PS3.15 A.5.3 ------------------------------------------------------------
    APPLICATION_START = "application-start"  # Application Activity (110100), start
    APPLICATION_STOP = "application-stop"  # Application Activity (110100), stop
    BEGIN_TRANSFERRING = "begin-transferring"  # Begin Transferring DICOM Instances (110102)
    INSTANCES_TRANSFERRED = "instances-transferred"  # DICOM Instances Transferred (110104)
    INSTANCES_ACCESSED = "instances-accessed"  # DICOM Instances Accessed (110103)
    QUERY = "query"  # Query (110112)
    SECURITY_ALERT = "security-alert"  # Security Alert (110113)
    AUDIT_LOG_USED = "audit-log-used"  # Audit Log Used (110101)
    EXPORT = "export"  # Export (110106)

    # --- the node's own -----------------------------------------------------------------
    ASSOCIATION_ACCEPTED = "association-accepted"
    ASSOCIATION_REJECTED = "association-rejected"
    ASSOCIATION_CLOSED = "association-closed"
    INSTANCE_STORED = "instance-stored"
    INSTANCE_DUPLICATE = "instance-duplicate"
    INSTANCE_NEW_VERSION = "instance-new-version"
    INSTANCE_REJECTED = "instance-rejected"
    INSTANCE_QUARANTINED = "instance-quarantined"
    #: An object this node wrote came back (a PACS or a person sent it): stored, never a
    #: job. ``sop_uid, series_uid, calling_ae, recognised_by`` (what gave it away).
    OWN_OUTPUT_RETURNED = "own-output-returned"
    #: A rule's destination is the AE the study came from and the rule does not say
    #: ``return_to_sender: true``: the destination is left out. ``rule, destination, ae_title``.
    RETURN_TO_SENDER_SKIPPED = "return-to-sender-skipped"
    #: One STOW-RS request (``POST /dicomweb/studies``): ``result`` (stored, partly stored,
    #: none stored, refused), ``http_status``, ``stored``, ``duplicates``, ``failed``,
    #: ``bytes``, the token used; each instance has its own ``instance-*`` record.
    STOW_RECEIVED = "stow-received"
    #: The retention rule removed a study's files (``[retention]``): ``study_uid,
    #: patient_id, instances, bytes, outputs`` (job output files removed), ``reason`` (age
    #: or disk pressure) and ``last_activity``. Reported as DICOM Instances Accessed, action D.
    STUDY_PURGED = "study-purged"
    STUDY_READY = "study-ready"
    STUDY_NOT_ROUTED = "study-not-routed"
    #: A Modality Performed Procedure Step (MPPS N-CREATE / N-SET) from a scanner, by the
    #: status it now has: ``mpps_uid, operation, instances`` (how many SOP Instance UIDs
    #: it lists), ``mode`` for a discontinued one (``[completeness] mpps_discontinued``).
    MPPS_IN_PROGRESS = "mpps-in-progress"
    MPPS_COMPLETED = "mpps-completed"
    MPPS_DISCONTINUED = "mpps-discontinued"
    #: An MPPS request answered with a failure: ``mpps_uid, operation, status, reason``.
    MPPS_REFUSED = "mpps-refused"
    #: A completeness signal, not the idle timer, made the study ready: ``signal`` (``mpps``
    #: or ``expected-counts``), ``detail``, ``mpps`` (the steps it settled), ``jobs``; the
    #: ``study-ready`` record precedes it.
    STUDY_COMPLETE = "study-complete"
    JOB_TRANSITION = "job-transition"
    DELIVERY_ATTEMPT = "delivery-attempt"
    DELIVERY_DEAD_LETTER = "delivery-dead-letter"
    #: Checks before sending found problems (a ``tps`` destination's validation): nothing
    #: was sent. Facts: ``delivery_id, destination, series_uid, problems``. The checks run
    #: before the gate now (their problems are in the ``gate-decision`` reasons); the outbox
    #: still refuses a TPS delivery of a job made before that, whose series were never checked.
    DELIVERY_REFUSED = "delivery-refused"
    #: Storage Commitment (Push Model) N-ACTION sent after a series: ``transaction_uid,
    #: instances``; then one ``storage-commitment-result`` (``result`` committed/failed,
    #: ``committed``, ``failed``, ``failures``) or ``storage-commitment-timeout``.
    STORAGE_COMMITMENT_REQUESTED = "storage-commitment-requested"
    STORAGE_COMMITMENT_RESULT = "storage-commitment-result"
    STORAGE_COMMITMENT_TIMEOUT = "storage-commitment-timeout"
    CONFIG_LOADED = "config-loaded"
    #: The node database's schema was upgraded in place (``serve`` or ``worker`` at start, or
    #: ``dicom-node db upgrade``); written once per upgrade, after its migrations committed,
    #: by the process that ran them. Facts: ``database`` (SQLite file, or server URL without
    #: password), ``from_revision``, ``to_revision``, ``version`` (of dicom-node); the actor
    #: is who ran it (``os:<login>``). Reported as Security Alert, Software Configuration.
    SCHEMA_UPGRADED = "schema-upgraded"
    #: A worker built a pipeline with a learned model (once per process): ``pipeline, model,
    #: version, weights_sha256, directory``; the weights were checked against the card.
    MODEL_LOADED = "model-loaded"
    GATE_DECISION = "gate-decision"
    REVIEW_APPROVED = "review-approved"
    REVIEW_REJECTED = "review-rejected"
    #: One per output series: inputs (SOP UIDs + sha256), pipeline, model and weights
    #: sha256, parameters, QC, gate verdict, output UIDs. Facts:
    #: ``job_id, pipeline, pipeline_version, model ({name, version, weights_sha256} or
    #: null), parameters, inputs ([{sop_uid, sha256}]), output_series_uid, outputs
    #: ([sop_uid]), qc, gate``. Deliveries of the series are ``delivery-attempt`` events
    #: with the same ``job_id`` and ``series_uid``.
    PROVENANCE = "provenance"
    USER_LOGIN = "user-login"
    USER_CHANGED = "user-changed"
