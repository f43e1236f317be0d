"""Node configuration: one TOML file, validated once, frozen, passed in.

Every key has a default, so ``dicom-node serve`` runs with no file at all. Precedence is
embedded defaults < TOML file < command-line flags < ``DICOM_NODE_<PIPELINE>_MODEL`` model
pins in the environment. A bad file raises :class:`ConfigError`
whose message is one line naming the key and the problem; the CLI prints it and exits 2.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

CONFIG_FILENAME = "dicom-node.toml"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII except backslash

Port = Annotated[int, Field(ge=1, le=65535)]


class ConfigError(Exception):
    """Configuration problems a user caused: each one line, ``file: key: problem``.

    ``problems`` holds every problem found; ``str()`` joins them on one line.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__(*problems)
        self.problems: tuple[str, ...] = problems

    def __str__(self) -> str:
        return "; ".join(self.problems)


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    """This node's own DICOM identity and listening address."""

    ae_title: str = "DICOM_NODE"
    host: str = "127.0.0.1"
    port: Port = 11112
    #: Receiving processes on the DICOM port(s): with more than one, each listens with
    #: SO_REUSEPORT and the kernel spreads the associations over them (one GIL each).
    receivers: int = Field(1, ge=1, le=32)
    #: Organisation UID root for UIDs this node creates. The default "2.25." derives UIDs
    #: from a hash (ISO/IEC 9834-8 UUID form) and needs no registration.
    uid_root: str = "2.25."

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str) -> str:
        from pipelines.uids import derive_uid

        derive_uid(value, "config check")  # ValueError: not a UID prefix, or too long for one
        return value


class ReceiverSection(_Section):
    """C-STORE SCP behaviour."""

    max_associations: int = Field(16, ge=1, le=512)
    #: Maximum PDU we announce; large PDUs mean fewer round trips (0 = unlimited).
    max_pdu_bytes: int = Field(4 * 1024 * 1024, ge=0)
    acse_timeout_seconds: float = Field(30.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    network_timeout_seconds: float = Field(120.0, gt=0)
    #: Refuse associations from AE titles not listed under [[callers]].
    require_known_callers: bool = False
    #: Refuse associations whose Called AE Title is not ours.
    require_called_ae: bool = False
    #: Answer 0xA700 (out of resources) when free space under var/ drops below this.
    min_free_disk_mb: int = Field(1024, ge=0)
    #: Listening beyond loopback needs ``require_known_callers`` and ``require_called_ae``
    #: on, unless this says, knowingly, that any AE from any host may store here.
    accept_unknown_callers: bool = False
    #: A connection must deliver its whole A-ASSOCIATE-RQ within this many seconds of being
    #: accepted (the ARTIM timer), or it is closed.
    association_request_seconds: float = Field(5.0, gt=0, le=300)
    #: Once a PDU has begun to arrive, all of it must arrive within this many seconds.
    pdu_read_seconds: float = Field(120.0, gt=0)
    #: Connections that have not (yet) become an association, in all and per peer address;
    #: more are closed at once. Established associations count against max_associations.
    max_pending_connections: int = Field(256, ge=1)
    max_pending_per_host: int = Field(128, ge=1)
    #: Established associations per peer address (0 = only max_associations applies).
    max_associations_per_host: int = Field(0, ge=0)
    #: Largest data set accepted after inflating a Deflated transfer syntax, in MB (a data
    #: set is also refused when it inflates well beyond what its image attributes declare).
    max_inflated_mb: int = Field(1024, ge=1)
    #: Largest data set received in one C-STORE, in MB (0 = no limit): one arriving beyond it
    #: is aborted while it streams (it is held in memory and in its staging file as it comes).
    #: The free-disk floor (min_free_disk_mb) is also checked every 64 MB of a data set.
    max_dataset_mb: int = Field(2048, ge=0)
    #: How often host names in [[callers]] hosts are resolved again, in seconds.
    caller_hosts_refresh_seconds: float = Field(300.0, gt=0)


class TlsSection(_Section):
    """DICOM TLS (PS3.15 BCP 195) for the receiver (a TLS port beside or instead of the plain
    one). Destinations use TLS with their own ``tls`` keys; reports of storage commitment
    arrive on whichever port the peer uses."""

    #: The TLS listening port (None: no TLS listener).
    port: Port | None = None
    #: Keep the plain [node].port listening too (false: TLS only).
    plain: bool = True
    #: This node's certificate chain and private key (PEM), used as server and as client.
    cert_file: str = ""
    key_file: str = ""
    #: CA certificates (PEM) trusted for peers' certificates (callers and destinations).
    ca_file: str = ""
    #: Require a client certificate signed by ca_file on the TLS port (mutual TLS). A caller
    #: with ``certificate_subject`` or ``certificate_sha256`` must present a matching one.
    require_client_certificate: bool = True
    #: "bcp195-nd": TLS 1.2 or 1.3 with BCP 195's recommended cipher suites (dcmtk's
    #: default); "bcp195-extended": TLS 1.2 or 1.3, ECDHE with AES-GCM only.
    profile: Literal["bcp195-nd", "bcp195-extended"] = "bcp195-nd"


class Caller(_Section):
    """A sending modality or system the node knows."""

    ae_title: str
    #: Hosts (IP addresses or names) this AE may connect from; empty means any host.
    hosts: tuple[str, ...] = ()
    #: Override of completeness.stable_seconds for studies this AE sends.
    stable_seconds: float | None = Field(None, gt=0)
    #: A study from this AE is ready, without waiting for the timer, as soon as its newest
    #: version holds this many acquired instances (and ``expected_series`` series, if set).
    expected_instances: int | None = Field(None, ge=1)
    #: ... or this many series (with ``expected_instances`` too, both must be reached).
    expected_series: int | None = Field(None, ge=1)
    #: Over TLS: the client certificate this AE must present — its subject Common Name
    #: and/or SHA-256 fingerprints (hex, colons allowed). A known AE presenting another
    #: certificate is rejected and audited as a security alert.
    certificate_subject: str | None = None
    certificate_sha256: tuple[str, ...] = ()

    _ae = field_validator("ae_title")(_check_ae_title)


class CompletenessSection(_Section):
    """When a study is considered complete ("ready")."""

    stable_seconds: float = Field(30.0, gt=0)
    #: What an MPPS that ends DISCONTINUED does to its study (it is always audited):
    #: "wait-for-timer" — nothing, the idle timer decides as if no MPPS had come (safe: no
    #: study is lost or made ready early); "ready-now" — as COMPLETED: ready once every
    #: instance it lists is stored; "hold" — the timer does not make the study ready; a
    #: later MPPS of the study that completes does.
    mpps_discontinued: Literal["wait-for-timer", "ready-now", "hold"] = "wait-for-timer"


def _check_http_credentials(username: str, password_file: str, token_file: str) -> None:
    """A DICOMweb peer's authentication: a user with a password file, or a token file."""
    if password_file and not username:
        raise ValueError("password_file needs username")
    if username and not password_file:
        raise ValueError("username needs password_file (a password is never written in the config)")
    if username and token_file:
        raise ValueError("choose username/password_file or token_file, not both")


class Destination(_Section):
    """A peer results are delivered to: by C-STORE (``protocol = "dimse"``, the default)
    to ``ae_title`` at ``host``:``port``, or by STOW-RS (``protocol = "dicomweb"``) to
    ``dicomweb_url``, with the same outbox: retries with backoff, dead letters, audit."""

    #: For a dicomweb destination: the sender name (AE title) it uses when it sends to
    #: this node over STOW-RS (the return-to-sender guard reads it); default DICOMWEB.
    ae_title: str
    host: str
    port: Port
    protocol: Literal["dimse", "dicomweb"] = "dimse"
    #: Base URL of the peer's DICOMweb service, e.g. ``https://pacs.example/dicom-web``:
    #: series are posted to ``<url>/studies``. An https URL is verified against
    #: ``ca_file`` (default: the system's CAs).
    dicomweb_url: str = ""
    #: DICOMweb authentication, as for [archives]: HTTP basic (``username`` and a file with
    #: the password) or a file holding a bearer token; relative to <home>. Secrets are never
    #: written in the config.
    username: str = ""
    password_file: str = ""
    token_file: str = ""
    #: Instances per STOW-RS request (a series goes in as many requests as it needs).
    stow_batch: int = Field(50, ge=1, le=1000)
    #: "tps": the job's series are checked before the gate (CT Image Storage, the planning
    #: MR's frame of reference, HU rescale, one evenly spaced stack, mandatory attributes,
    #: dciodvfy when installed); a job whose series would be refused is held with the
    #: reasons, and approving it is refused. A TPS is sent image series only, not the AI
    #: maps, SEG, SR and overlay (delivery.profiles.NOT_FOR_TPS).
    profile: Literal["pacs", "tps"] = "pacs"
    #: Seconds to wait for the association and for each DIMSE response.
    timeout_seconds: float = Field(60.0, gt=0)
    #: Maximum PDU we announce to this peer (0 = unlimited).
    max_pdu_bytes: int = Field(4 * 1024 * 1024, ge=0)
    #: Ask the peer to commit to the series (Storage Commitment Push Model, N-ACTION) after
    #: sending it; the delivery is "delivered" only when its N-EVENT-REPORT says every
    #: instance is committed. The peer must know this node (AE title, host, port) to
    #: report back on a new association.
    storage_commitment: bool = False
    #: Seconds to wait for the commitment result; then the series is sent again.
    commitment_timeout_seconds: float = Field(120.0, gt=0)
    #: Connect over DICOM TLS, verifying the peer's certificate against [tls].ca_file (or
    #: ``ca_file`` here) and presenting [tls].cert_file when the peer asks for one.
    tls: bool = False
    ca_file: str = ""
    #: The name the peer's certificate must carry (default: ``host``).
    tls_server_name: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="before")
    @classmethod
    def _dicomweb_address(cls, data: Any) -> Any:
        """A dicomweb destination is addressed by its URL: host and port come from it (for
        the audit), and it needs no AE title."""
        if not isinstance(data, dict) or data.get("protocol") != "dicomweb":
            return data
        url = str(data.get("dicomweb_url", ""))
        found = re.match(r"^(https?)://(\[[^\]]+\]|[^/:\s]+)(?::(\d+))?(/|$)", url)
        if found is None:
            raise ValueError(
                f"protocol 'dicomweb' needs dicomweb_url (http:// or https://), not {url[:80]!r}"
            )
        scheme, host, port = found.group(1), found.group(2).strip("[]"), found.group(3)
        return {
            "ae_title": "DICOMWEB",
            "host": host,
            "port": int(port) if port else (443 if scheme == "https" else 80),
            **data,
        }

    @model_validator(mode="after")
    def _protocol_needs(self) -> Destination:
        if self.protocol == "dimse":
            if self.dicomweb_url or self.username or self.password_file or self.token_file:
                raise ValueError(
                    "dicomweb_url, username, password_file and token_file need protocol = 'dicomweb'"
                )
            return self
        if self.storage_commitment:
            raise ValueError(
                "storage_commitment is DIMSE (N-ACTION): a dicomweb destination confirms by its STOW-RS"
                " answer"
            )
        if self.tls:
            raise ValueError("tls is DICOM TLS: a dicomweb destination is encrypted by an https:// URL")
        _check_http_credentials(self.username, self.password_file, self.token_file)
        return self


class ArchiveSection(_Section):
    """An archive the node queries and retrieves prior studies from (see docs/priors.md).

    ``c-move`` asks the archive to send the study to this node's own AE title: the archive
    must know [node] ae_title with this node's host and port, and the instances arrive at
    the receiver (so ``serve`` must run). ``c-get`` takes them on the query association
    itself, for archives that cannot reach the node. ``dicomweb`` searches with QIDO-RS and
    retrieves with WADO-RS from ``dicomweb_url``. Secrets are never written here: a
    password or bearer token is read from its file when the archive is used.
    """

    #: The archive's AE title, host and DICOM port (c-move, c-get; and the C-ECHO of
    #: ``dicom-node archives echo``).
    ae_title: str | None = None
    host: str | None = None
    port: Port | None = None
    method: Literal["c-move", "c-get", "dicomweb"] = "c-move"
    #: Base URL of the DICOMweb service (QIDO-RS and WADO-RS below it), e.g.
    #: ``https://pacs.example/dicom-web``; needed for ``dicomweb``.
    dicomweb_url: str = ""
    #: HTTP basic authentication for DICOMweb: the user name, and a file holding the
    #: password (relative to <home> unless absolute).
    username: str = ""
    password_file: str = ""
    #: A file holding a bearer token for DICOMweb (instead of username / password_file).
    token_file: str = ""
    #: Seconds to wait for the association and each query response (or HTTP request).
    timeout_seconds: float = Field(30.0, gt=0)
    #: Seconds one retrieval (a study, or the chosen series of it) may take in all; then
    #: it is abandoned and reported as timed out.
    retrieve_timeout_seconds: float = Field(600.0, gt=0)
    #: Retrievals from this archive running at once in one process; more wait their turn
    #: (within their own timeout).
    max_concurrent_retrievals: int = Field(2, ge=1, le=64)
    #: DICOM TLS (c-move, c-get) as for destinations: the archive's certificate is verified
    #: against ``ca_file`` (default [tls].ca_file) and must name ``tls_server_name`` (default
    #: ``host``). For DICOMweb, ``ca_file`` verifies an https URL (default: system CAs).
    tls: bool = False
    ca_file: str = ""
    tls_server_name: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @model_validator(mode="after")
    def _method_needs(self) -> ArchiveSection:
        if self.method in ("c-move", "c-get"):
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"method {self.method!r} needs {', '.join(missing)}")
        elif not re.match(r"^https?://[^/\s]+", self.dicomweb_url):
            raise ValueError("method 'dicomweb' needs dicomweb_url (http:// or https://)")
        _check_http_credentials(self.username, self.password_file, self.token_file)
        return self

    def as_peer(self) -> Destination:
        """The archive as a DICOM peer (AE title, address, TLS), for the TLS settings and
        the association; ``method`` must be c-move or c-get (a DICOM archive)."""
        if self.ae_title is None or self.host is None or self.port is None:
            raise ValueError("a dicomweb archive without ae_title, host and port is no DICOM peer")
        return Destination(
            ae_title=self.ae_title,
            host=self.host,
            port=self.port,
            timeout_seconds=self.timeout_seconds,
            tls=self.tls,
            ca_file=self.ca_file,
            tls_server_name=self.tls_server_name,
        )


class PolicySection(_Section):
    """Which studies go to which pipeline, and what gates the outputs (a YAML policy file)."""

    #: The policy file (relative to <home> unless absolute). None: no study is processed —
    #: the node stores only. Start from policies/default.yaml.
    file: str | None = None
    #: How often the file is checked for changes (SIGHUP reloads at once).
    reload_seconds: float = Field(2.0, gt=0)


class OutboxSection(_Section):
    """Delivery retries: exponential backoff with a cap, then dead-letter."""

    max_attempts: int = Field(10, ge=1)
    #: Series each worker process sends at once, one association each (1: one after the
    #: other). A PACS that accepts several associations from the node takes a job's
    #: outputs faster with 2–4; each series is still claimed and sent once.
    associations: int = Field(1, ge=1, le=16)
    backoff_initial_seconds: float = Field(5.0, gt=0)
    backoff_factor: float = Field(2.0, ge=1.0)
    backoff_max_seconds: float = Field(600.0, gt=0)


def offpeak_window(text: str) -> tuple[datetime.time, datetime.time]:
    """``"19:00-07:00"`` as (start, end) times; ValueError with what is wrong."""
    parts = text.replace(" ", "").split("-")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (datetime.time.fromisoformat(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r}: give the off-peak window as HH:MM-HH:MM, e.g. 19:00-07:00") from None
    if start == end:
        raise ValueError(f"{text!r}: the off-peak window starts and ends at the same time")
    return start, end


class WorkersSection(_Section):
    """Worker processes (separate from the receiver so inference never starves the network)."""

    processes: int = Field(1, ge=0, le=64)
    poll_seconds: float = Field(0.5, gt=0)
    #: A claimed job or delivery whose worker stops renewing its lease is taken over after this.
    lease_seconds: float = Field(60.0, gt=5)
    #: Who runs the jobs: ``local`` (the worker processes ``serve`` starts; the embedded
    #: default) or ``celery`` (``dicom-node worker`` processes on any host, fed through a
    #: broker; ``serve``'s own worker processes then only deliver).
    engine: Literal["local", "celery"] = "local"
    #: The Celery broker (``DICOM_NODE_BROKER_URL`` in the environment overrides it).
    broker_url: str = "redis://127.0.0.1:6379/0"
    #: Build the pipelines the policy's rules name (imports, model weights) when a worker
    #: starts, before it takes its first job: the first study does not wait for them.
    preload: bool = True
    #: Write each job's derived series in a helper process (spawned when the worker starts,
    #: beside the preload) while the worker writes the maps and the rest: encoding is Python
    #: under one GIL, so the helper puts a second core to work (:mod:`pipelines.parallel`).
    #: About 0.15 GB more memory (on 2 cores: a 300-slice job's encode 7.4–9.2 → 5.6–6.7 s,
    #: the node's peak 1.20 → 1.33 GB). A helper that is gone only means the worker writes
    #: everything itself; false: never start one. ``serve``'s worker processes start one;
    #: a Celery worker host does not (its pool's processes may not have children).
    encode_helper: bool = True
    #: How much lower the worker processes' CPU priority is than the receiver's (a Unix nice
    #: increment, 0–19; the encode helper inherits it). The scanner waits for each instance's
    #: acknowledgement, and the receiver needs the CPU for that while a job runs inference on
    #: every core; a worker at nice 10 gets about a tenth of a contended core against it and
    #: all of an idle one, so jobs lose nothing when nothing arrives. 0: the same priority.
    nice: int = Field(10, ge=0, le=19)
    #: A queued job whose message no worker took is published again after this.
    redispatch_seconds: float = Field(120.0, gt=0)
    #: Longest run of a job, by pipeline (``default`` for the rest): past it the job fails
    #: with that reason (Celery's soft time limit; the hard one is a minute later).
    time_limit_seconds: dict[str, float] = Field(default_factory=lambda: {"default": 3600.0})
    #: When the jobs of rules with ``urgency: offpeak`` run (the node's local time,
    #: ``HH:MM-HH:MM``, across midnight when the end is earlier than the start): outside it
    #: they wait, queued, so research and batch work leave the cores to the day's clinical
    #: jobs. The other urgencies run at any hour.
    offpeak_hours: str = "19:00-07:00"

    @field_validator("offpeak_hours")
    @classmethod
    def _offpeak_window(cls, value: str) -> str:
        offpeak_window(value)  # ValueError: not a window
        return value

    def in_offpeak(self, when: datetime.datetime | None = None) -> bool:
        """Whether ``when`` (default now, local time) is inside ``offpeak_hours``."""
        start, end = offpeak_window(self.offpeak_hours)
        now = (when or datetime.datetime.now()).time()
        return start <= now < end if start < end else now >= start or now < end

    @field_validator("time_limit_seconds")
    @classmethod
    def _positive_limits(cls, limits: dict[str, float]) -> dict[str, float]:
        bad = [name for name, seconds in limits.items() if not seconds > 0]
        if bad:
            raise ValueError(f"time limits must be positive seconds: {', '.join(bad)}")
        return {"default": 3600.0, **limits}

    def time_limit(self, pipeline: str) -> float:
        return self.time_limit_seconds.get(pipeline, self.time_limit_seconds["default"])


class StorageSection(_Section):
    """Where state lives. Relative paths are under <home>/var/."""

    #: SQLAlchemy URL of the index and job database; default SQLite at var/node.db.
    database_url: str | None = None
    #: SQLAlchemy URL of the audit log; default SQLite at var/audit.db.
    audit_database_url: str | None = None
    data_dir: str = "data"
    quarantine_dir: str = "quarantine"
    #: fsync each stored file and its directory before answering success.
    fsync: bool = True

    @field_validator("database_url", "audit_database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value:
            check_database_url(value)
        return value


def check_database_url(url: str) -> None:
    """Raise ``ValueError`` (one line, no password) unless ``url`` is a SQLAlchemy URL of a
    database kind SQLAlchemy knows (the driver itself is imported only when connecting)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(
            "not a database URL (e.g. postgresql+psycopg://node@db.example/dicom_node, sqlite:///path)"
        ) from None
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise ValueError(
            f"unknown database kind {parsed.drivername!r} (sqlite or postgresql+psycopg)"
        ) from None


class RetentionSection(_Section):
    """When received studies and their outputs leave this node's disk. Off by default:
    nothing is removed until ``keep_days`` or ``free_disk_mb`` says so.

    A study is removed only when nothing still needs its files: no job of it queued,
    running, waiting for priors, held for review or delivering; no delivery of its outputs
    still under way; not a prior of such a job. Index, job and delivery rows stay (the
    history the web pages and the audit log show); each removal is an audit record.
    """

    #: Remove a study once this many days have passed since its last activity (an instance
    #: received, a job of it moving); 0: never for age.
    keep_days: float = Field(0.0, ge=0)
    #: When free space under the data directory is below this many MB, remove the studies
    #: with the oldest activity first, down to ``min_age_hours``, until it is above; 0: off.
    #: Set it above ``[receiver] min_free_disk_mb``, where the receiver starts refusing.
    free_disk_mb: int = Field(0, ge=0)
    #: Under disk pressure, never remove a study active within this many hours.
    min_age_hours: float = Field(24.0, ge=1)
    #: How often ``serve`` applies the rule, in minutes.
    check_minutes: float = Field(60.0, gt=0)

    @property
    def enabled(self) -> bool:
        return self.keep_days > 0 or self.free_disk_mb > 0


class SyslogSection(_Section):
    """Audit records to a syslog collector over TLS (RFC 5425 / RFC 5424, IHE ATNA)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 6514
    #: CA bundle (PEM) that signs the collector's certificate; empty = system CAs.
    ca_file: str = ""
    #: Client certificate and key (PEM) for mutual TLS; empty = none.
    cert_file: str = ""
    key_file: str = ""
    app_name: str = "dicom-node"


class AuditSection(_Section):
    """The tamper-evident audit log."""

    #: Write the chain head (sequence number + hash) outside the database every N events
    #: (and at every shutdown), so a cut-off tail is detectable.
    checkpoint_every: int = Field(100, ge=1)
    #: The checkpoint file, relative to var/ unless absolute.
    checkpoint_file: str = "audit/checkpoints.jsonl"
    syslog: SyslogSection = SyslogSection()


class WebSection(_Section):
    """The web pages (studies, the review queue, audit search and reports). Login required."""

    enabled: bool = True
    #: Loopback by default; put a TLS-terminating reverse proxy in front to expose it.
    host: str = "127.0.0.1"
    port: Port = 8480
    session_hours: float = Field(8.0, gt=0, le=168)
    #: Mark the session cookie Secure (set when served over HTTPS through a proxy; always
    #: on when cert_file is set).
    secure_cookies: bool = False
    #: Serve the pages over HTTPS with this certificate chain and key (PEM); empty = HTTP.
    cert_file: str = ""
    key_file: str = ""
    #: Origins (scheme://host:port) besides the page's own allowed to post forms, e.g. a
    #: reverse proxy's public address.
    trusted_origins: tuple[str, ...] = ()
    #: ``/metrics`` from beyond loopback needs ``Authorization: Bearer <token>`` whose
    #: sha256 (hex) is this (the token itself is never stored); empty: loopback only.
    metrics_token_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    #: Largest STOW-RS request body (``POST /dicomweb/studies``) taken, in MB.
    stow_max_mb: int = Field(4096, ge=1, le=1_048_576)
    #: The reverse proxies in front of the pages (addresses or networks, e.g. "127.0.0.1",
    #: "10.20.0.0/24"), whose X-Forwarded-For and X-Forwarded-Proto are believed. Behind
    #: one, the address the login throttle counts, the audit log records and /metrics'
    #: loopback rule tests is then the browser's (the nearest one the proxies did not add),
    #: not the proxy's. Empty: the headers are ignored, as any client could set them.
    trusted_proxies: tuple[str, ...] = ()

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        checked = []
        for entry in value:
            entry = entry.strip()
            try:
                checked.append(
                    str(ipaddress.ip_network(entry, strict=False))
                    if "/" in entry
                    else str(ipaddress.ip_address(entry))
                )
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or network (e.g. 127.0.0.1 or 10.20.0.0/24); "
                    'name each proxy by address: trusting every sender ("*") would let any '
                    "client choose the address the audit log records"
                ) from None
        return tuple(checked)


class ModelsSection(_Section):
    """Which model version each pipeline runs. Unpinned: the newest version shipped with
    dicom-node (a site's own zoo never runs unless pinned)."""

    #: A site's zoo directories (absolute), each holding ``<model>/<version>/card.json`` and
    #: the weights; a pin by version looks here first, then in the shipped zoo.
    zoo: tuple[str, ...] = ()
    #: Pipeline → a version of its model (``"1.2"``) or a model directory (an absolute path).
    #: ``DICOM_NODE_<PIPELINE>_MODEL`` in the environment overrides it (e.g.
    #: ``DICOM_NODE_SCT_MODEL=/srv/models/sct-site``).
    pin: dict[str, str] = {}
    #: What networks compute in: ``auto`` (bfloat16 where the model card lists it as
    #: evaluated and the CPU multiplies bfloat16 in hardware, else float32), ``float32``,
    #: or ``bfloat16`` (refused at the first job for a model not evaluated in it).
    precision: Literal["auto", "float32", "bfloat16"] = "auto"

    @field_validator("zoo")
    @classmethod
    def _absolute_zoos(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if not Path(entry).is_absolute():
                raise ValueError(f"{entry!r}: a zoo directory must be an absolute path")
        return value

    @model_validator(mode="after")
    def _pins_resolve(self) -> ModelsSection:
        for pipeline in self.pin:
            self.directory(pipeline)  # a pin that names nothing fails at load, not at the first job
        return self

    def directory(self, pipeline: str) -> Path | None:
        """The model directory ``pipeline`` runs (None: the pipeline has no learned model).

        Raises ``ValueError`` naming the key when a pin names no model.
        """
        from models.zoo import ModelNotFound, resolve
        from pipelines.registry import MODEL_OF

        model = MODEL_OF.get(pipeline)
        if model is None:
            if pipeline in self.pin:
                raise ValueError(
                    f"pin.{pipeline}: no pipeline {pipeline!r} runs a learned model "
                    f"(pipelines with one: {', '.join(sorted(MODEL_OF))})"
                )
            return None
        try:
            return resolve(model, self.pin.get(pipeline), tuple(Path(z) for z in self.zoo))
        except ModelNotFound as exc:
            raise ValueError(f"pin.{pipeline}: {exc}") from None


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Application log file under var/ (UIDs and ids only, never patient names).
    file: str = "log/dicom-node.log"
    #: ``text`` (one readable line a record) or ``json`` (one object a line, for log
    #: shippers: time, level, logger, event, message, process; never patient data).
    format: Literal["text", "json"] = "text"
    #: Where records go: ``auto`` (under systemd, stderr only: journald keeps it; else the
    #: file and stderr), ``file``, ``stderr`` or ``both``.
    destination: Literal["auto", "file", "stderr", "both"] = "auto"


class NodeConfig(_Section):
    """The whole configuration, frozen once loaded."""

    node: NodeSection = NodeSection()
    receiver: ReceiverSection = ReceiverSection()
    tls: TlsSection = TlsSection()
    callers: tuple[Caller, ...] = ()
    completeness: CompletenessSection = CompletenessSection()
    destinations: dict[str, Destination] = {}
    archives: dict[str, ArchiveSection] = {}
    policy: PolicySection = PolicySection()
    outbox: OutboxSection = OutboxSection()
    workers: WorkersSection = WorkersSection()
    storage: StorageSection = StorageSection()
    retention: RetentionSection = RetentionSection()
    audit: AuditSection = AuditSection()
    web: WebSection = WebSection()
    models: ModelsSection = ModelsSection()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="before")
    @classmethod
    def _routes_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "routes" in data:
            raise ValueError("[[routes]] moved to a policy file: set [policy] file (policies/default.yaml)")
        return data

    def caller(self, ae_title: str) -> Caller | None:
        for caller in self.callers:
            if caller.ae_title == ae_title:
                return caller
        return None

    def archive_of(self, ae_title: str) -> str | None:
        """The name of the DICOM archive (c-move, c-get) whose AE title is ``ae_title``."""
        for name, archive in self.archives.items():
            if archive.method != "dicomweb" and archive.ae_title == ae_title:
                return name
        return None

    def stable_seconds_for(self, calling_ae: str | None) -> float:
        caller = self.caller(calling_ae) if calling_ae else None
        if caller is not None and caller.stable_seconds is not None:
            return caller.stable_seconds
        return self.completeness.stable_seconds


class LoadedConfig(BaseModel):
    """A validated config plus where it came from (for the audit and the banner)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    config: NodeConfig
    source: Path | None
    sha256: str
    #: Model pins that came from ``DICOM_NODE_<PIPELINE>_MODEL`` (pipeline → value).
    environment_pins: dict[str, str] = {}


def _format_errors(err: ValidationError, source: str) -> list[str]:
    """Every problem pydantic found, each as one line ``source: key: problem``."""
    return [_format_problem(problem, source) for problem in err.errors()]


def _format_problem(problem: ErrorDetails, source: str) -> str:
    loc = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in problem["loc"]).replace(".[", "[")
    msg = problem["msg"]
    if problem["type"] == "extra_forbidden":
        msg = "unknown key (check spelling; see deploy/dicom-node.example.toml)"
    elif (
        "input" in problem
        and problem["type"] not in ("missing",)
        and not isinstance(problem["input"], dict | list)
        # a URL may hold a password (postgresql://user:secret@host/db): never echo one
        and not str(problem["loc"][-1] if problem["loc"] else "").endswith("url")
    ):
        msg = f"{msg} (got {problem['input']!r})"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    where = f"{loc}: " if problem["loc"] else ""
    line = f"{source}: {where}{msg}"
    return line.replace("\r", "\\r").replace("\n", "\\n")


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def model_env_var(pipeline: str) -> str:
    """The environment variable that pins ``pipeline``'s model: ``DICOM_NODE_<PIPELINE>_MODEL``."""
    return f"DICOM_NODE_{pipeline.upper().replace('-', '_')}_MODEL"


def model_pins_from_environment() -> dict[str, str]:
    """Model pins set in the environment, by pipeline (read once, when the config is loaded)."""
    from pipelines.registry import MODEL_OF

    found = {p: os.environ.get(model_env_var(p), "").strip() for p in MODEL_OF}
    return {p: value for p, value in found.items() if value}


def load_config(
    path: Path | None = None,
    home: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Load and validate the configuration.

    Parameters
    ----------
    path
        The TOML file. When ``None``, ``<home>/dicom-node.toml`` is used if it exists,
        otherwise the embedded defaults alone.
    home
        The node's home directory (state lives under ``<home>/var``).
    overrides
        Nested mapping applied over the file (command-line flags). Model pins from the
        environment (:func:`model_pins_from_environment`) are applied over both.

    Raises
    ------
    ConfigError
        Every problem found, each one line naming the file, the key and the problem.
    """
    raw_bytes = b""
    source: Path | None = None
    if path is None and home is not None and (home / CONFIG_FILENAME).is_file():
        path = home / CONFIG_FILENAME
    data: dict[str, Any] = {}
    if path is not None:
        source = Path(path)
        try:
            raw_bytes = source.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config file: {exc.strerror}") from None
        try:
            data = tomllib.loads(raw_bytes.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}".replace("\n", " ")) from None
    overrides = {**(overrides or {})}
    pins = model_pins_from_environment()
    if pins:
        overrides = _deep_merge(overrides, {"models": {"pin": pins}})
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        config = NodeConfig.model_validate(data)
    except ValidationError as exc:
        problems = _format_errors(exc, str(source) if source else "config")
        for i, line in enumerate(problems):
            pinned = next((p for p in pins if f"pin.{p}:" in line), None)
            if pinned is not None:
                problems[i] = f"{line} (set by {model_env_var(pinned)} in the environment)"
        raise ConfigError(*problems) from None
    digest = hashlib.sha256(raw_bytes + repr(sorted((overrides or {}).items())).encode()).hexdigest()
    return LoadedConfig(config=config, source=source, sha256=digest, environment_pins=pins)
