"""Prior studies from archives: query (C-FIND, QIDO-RS) and retrieve (C-MOVE, C-GET, WADO-RS).

An archive is named in ``[archives.NAME]`` (:class:`~dicom_node.config.ArchiveSection`).
:class:`Archives` holds the configured ones for a process (with their limits on concurrent
retrievals); :meth:`Archives.get` gives an :class:`Archive` with the four operations a job
or the CLI calls:

* :meth:`Archive.echo` — is it there and does it accept us (C-ECHO, or a QIDO-RS request);
* :meth:`Archive.find_studies` — Study Root C-FIND at STUDY level (or QIDO-RS) for a
  :class:`StudyQuery` (patient, modality, date range, ...);
* :meth:`Archive.find_series` — the series of one study (C-FIND at SERIES level);
* :meth:`Archive.retrieve` — a study, or some of its series, into this node's store:
  **c-move** asks the archive to send it to this node's own AE title, and the C-STORE
  sub-operations arrive at the receiver (``serve`` must run; the receiver recognises them
  by Move Originator AE Title = this node and the archive's AE as caller); **c-get** takes
  the C-STORE sub-operations on the query association itself and hands each to
  :meth:`InstanceStore.accept`; **dicomweb** fetches each instance by WADO-RS and hands it
  to the store as if received. Every retrieved instance is stored with the role ``prior``
  (:func:`dicom_node.ingest.origin.retrieved`): it never opens a study version, never
  starts a job and is never forwarded.

Nothing waits without a bound: associations and each response wait ``timeout_seconds``,
a retrieval ``retrieve_timeout_seconds`` (or the caller's ``timeout``) in all, after which
the association is aborted — as it is at once by :meth:`Archives.abort_retrievals` (the
node is stopping: an open association's thread would otherwise keep the process alive).
:meth:`Archive.retrieve` never raises for the archive's problems: its
:class:`RetrieveResult` says what arrived (the SOP Instance UIDs now in the index), what
failed and why. The queries and errors of ``find_*`` and ``echo`` raise
:class:`ArchiveError`, one line naming the archive and the problem.

Audit (PS3.15): every C-FIND / QIDO-RS is a ``query`` (110112) record with the archive,
the level and the query keys; a retrieval is a ``begin-transferring`` (110102) record and,
when it ends, an ``instances-transferred`` (110104) record with ``direction = "retrieved"``,
the archive, the counts and the reason of a failure.
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmwrite
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy import select

from audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import ArchiveSection, NodeConfig
from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.ingest.part10 import split_part10
from dicom_node.ingest.receiver import failure_status
from dicom_node.ingest.store import Expected, InstanceStore, StoreOutcome
from dicom_node.net.dicomweb import client_for
from dicom_node.net.tls import ClientTls, TlsConfigError
from dicom_node.net.tuning import on_connection_open, tune_pynetdicom

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
#: What a retrieval asks a C-GET archive to send in: native first, then lossless encodings.
_GET_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    RLELossless,
]
#: Most matches asked of one QIDO-RS search: one request, no paging (some servers, e.g.
#: Orthanc's DICOMweb 1.7, ignore ``offset``, so paging until an empty page never ends).
_QIDO_LIMIT = 1000
#: Seconds to wait for the index after a C-MOVE the archive reported done, at the least.
_INDEX_GRACE_SECONDS = 10.0
_MOVE_STATUS = {
    0xA701: "out of resources: unable to calculate the number of matches",
    0xA702: "out of resources: unable to perform the sub-operations",
    0xA801: "move destination unknown (register this node's AE title, host and port with the archive)",
    0xA900: "identifier does not match SOP class",
    0xFE00: "cancelled",
}
#: A C-MOVE's "unable to process" (0xCxxx): Orthanc, for one, answers 0xC000 to a move
#: destination it does not know.
_MOVE_UNABLE = (
    "unable to process (does the archive know this node's AE title, host and port as a move "
    "destination? its log says why)"
)


class ArchiveError(Exception):
    """A problem with an archive a user can act on: one line naming the archive."""


# -- queries and their answers ---------------------------------------------------------


def _date_range(since: date | None, until: date | None) -> str | None:
    if since is None and until is None:
        return None
    return f"{since.strftime('%Y%m%d') if since else ''}-{until.strftime('%Y%m%d') if until else ''}"


@dataclass(frozen=True)
class StudyQuery:
    """What to look for at STUDY level (all given keys must match; none: every study)."""

    patient_id: str | None = None
    modality: str | None = None
    since: date | None = None
    until: date | None = None
    study_uid: str | None = None
    accession_number: str | None = None

    def keys(self) -> dict[str, str]:
        """The matching keys, as DICOM keywords (for the C-FIND identifier and the audit)."""
        found = {
            "PatientID": self.patient_id,
            "ModalitiesInStudy": self.modality,
            "StudyDate": _date_range(self.since, self.until),
            "StudyInstanceUID": self.study_uid,
            "AccessionNumber": self.accession_number,
        }
        return {k: v for k, v in found.items() if v}

    def identifier(self) -> Dataset:
        """The Study Root C-FIND identifier: the matching keys and the return keys."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for keyword in _STUDY_RETURN_KEYS:
            setattr(ds, keyword, "")
        for keyword, value in self.keys().items():
            setattr(ds, keyword, value)
        return ds


_STUDY_RETURN_KEYS = (
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_SERIES_RETURN_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return None if value in (None, "") else str(value)


def _count(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value in (None, ""):
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split("\\") if v)
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class StudyMatch:
    """One study an archive holds (what a STUDY-level C-FIND or QIDO-RS returned)."""

    study_uid: str
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    accession_number: str | None
    modalities: tuple[str, ...]
    description: str | None
    series_count: int | None
    instance_count: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> StudyMatch:
        return cls(
            study_uid=str(ds.get("StudyInstanceUID", "")),
            patient_id=_text(ds, "PatientID"),
            patient_name=_text(ds, "PatientName"),
            study_date=_text(ds, "StudyDate"),
            accession_number=_text(ds, "AccessionNumber"),
            modalities=_values(ds, "ModalitiesInStudy"),
            description=_text(ds, "StudyDescription"),
            series_count=_count(ds, "NumberOfStudyRelatedSeries"),
            instance_count=_count(ds, "NumberOfStudyRelatedInstances"),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SeriesMatch:
    """One series of a study an archive holds (SERIES-level C-FIND or QIDO-RS)."""

    study_uid: str
    series_uid: str
    modality: str | None
    series_number: int | None
    description: str | None
    body_part: str | None
    instance_count: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SeriesMatch:
        return cls(
            study_uid=str(ds.get("StudyInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            modality=_text(ds, "Modality"),
            series_number=_count(ds, "SeriesNumber"),
            description=_text(ds, "SeriesDescription"),
            body_part=_text(ds, "BodyPartExamined"),
            instance_count=_count(ds, "NumberOfSeriesRelatedInstances"),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def keep_study(match: StudyMatch, query: StudyQuery) -> bool:
    """Matching an archive may have skipped: not every archive matches ModalitiesInStudy
    or date ranges, so the answers are checked again here."""
    if query.modality and match.modalities and query.modality not in match.modalities:
        return False
    if match.study_date and (query.since or query.until):
        day = match.study_date[:8]
        if query.since and day < query.since.strftime("%Y%m%d"):
            return False
        if query.until and day > query.until.strftime("%Y%m%d"):
            return False
    return True


@dataclass
class RetrieveResult:
    """What one retrieval did. ``sop_uids``: the instances of the study (or of the asked
    series) that are now in this node's index; ``failures``: one reason per failed
    instance or sub-operation; ``error``: why the retrieval stopped short, if it did."""

    archive: str
    method: str
    study_uid: str
    series_uids: tuple[str, ...] = ()
    completed: int = 0
    failed: int = 0
    warning: int = 0
    sop_uids: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Everything asked for arrived and nothing failed."""
        return self.error is None and self.failed == 0 and not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# -- the archives of a process ----------------------------------------------------------


class Archives:
    """The configured archives, each with its limit on concurrent retrievals (per process).

    ``store`` is where c-get and dicomweb retrievals put what arrives; ``db`` is read to
    tell which instances of a c-move arrived (the receiver stores them). Either may be
    None in a process that only queries; ``audit`` may be None only where nothing but
    :meth:`Archive.echo` is called (queries and retrievals are audited).
    """

    def __init__(
        self,
        config: NodeConfig,
        home: Path,
        audit: AuditTrail | None,
        *,
        db: Database | None = None,
        store: InstanceStore | None = None,
        actor: str | None = None,
    ) -> None:
        self.config = config
        self.home = home
        self.audit = audit
        self.db = db
        self.store = store
        self.actor = actor
        self.tls = ClientTls(config.tls, home)
        self._slots = {
            name: threading.BoundedSemaphore(section.max_concurrent_retrievals)
            for name, section in config.archives.items()
        }
        self._stopping = threading.Event()
        self._retrieving: set[Any] = set()  # the associations of retrievals under way
        self._retrieving_lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        """:meth:`abort_retrievals` was called: no retrieval waits any longer."""
        return self._stopping.is_set()

    def abort_retrievals(self) -> None:
        """Abort every retrieval under way, and any started from now on (the process is
        stopping): each ends at once, its result saying so."""
        with self._retrieving_lock:
            self._stopping.set()
            under_way = list(self._retrieving)
        for assoc in under_way:
            _abort(assoc)

    def _retrieval_began(self, assoc: Any) -> bool:
        """Track a retrieval's association (False: stopping, it must not begin)."""
        with self._retrieving_lock:
            if self.stopping:
                return False
            self._retrieving.add(assoc)
            return True

    def _retrieval_ended(self, assoc: Any) -> None:
        with self._retrieving_lock:
            self._retrieving.discard(assoc)

    def names(self) -> list[str]:
        return sorted(self.config.archives)

    def get(self, name: str) -> Archive:
        """The archive ``name``; :class:`ArchiveError` when none is configured by that name."""
        section = self.config.archives.get(name)
        if section is None:
            known = ", ".join(self.names()) or "none"
            raise ArchiveError(f"no archive {name!r} in [archives] (configured: {known})")
        return Archive(name, section, self, self._slots[name])


class Archive:
    """One configured archive: echo, find studies and series, retrieve. See the module doc."""

    def __init__(
        self, name: str, section: ArchiveSection, archives: Archives, slots: threading.BoundedSemaphore
    ) -> None:
        self.name = name
        self.section = section
        self.archives = archives
        self._slots = slots

    @property
    def config(self) -> NodeConfig:
        return self.archives.config

    @property
    def audit(self) -> AuditTrail:
        if self.archives.audit is None:
            raise ValueError("queries and retrievals are audited: Archives needs the audit trail")
        return self.archives.audit

    @property
    def where(self) -> str:
        s = self.section
        if s.method == "dicomweb":
            return f"archive {self.name} ({s.dicomweb_url})"
        return f"archive {self.name} ({s.ae_title}@{s.host}:{s.port})"

    # -- echo -----------------------------------------------------------------------

    def echo(self) -> str:
        """Check the archive answers: a C-ECHO (c-move, c-get) or a QIDO-RS search for one
        study (dicomweb). Returns what answered; raises :class:`ArchiveError`."""
        if self.section.method == "dicomweb":
            client = self._dicomweb()
            _http(self, lambda: client.search_for_studies(limit=1))
            return f"{self.where} answered QIDO-RS"
        with self._association([Verification]) as assoc:
            status = assoc.send_c_echo()
        if "Status" not in status:
            raise ArchiveError(
                f"no C-ECHO response from {self.where} within {self.section.timeout_seconds:g} s"
            )
        if int(status.Status) != 0:
            raise ArchiveError(f"{self.where} answered C-ECHO with status 0x{int(status.Status):04X}")
        return f"{self.where} answered C-ECHO{' over TLS' if self.section.tls else ''}"

    # -- queries --------------------------------------------------------------------

    def find_studies(self, query: StudyQuery, deadline: float | None = None) -> list[StudyMatch]:
        """The studies matching ``query``, oldest first (audited as a Query); by
        ``deadline`` (``time.monotonic()``; see :meth:`_c_find`)."""

        def run() -> list[Dataset]:
            if self.section.method == "dicomweb":
                return self._qido_studies(query)
            return self._c_find(query.identifier(), deadline)

        found = self._audited_query("STUDY", query.keys(), query.patient_id, run)
        matches = [m for m in map(StudyMatch.from_dataset, found) if keep_study(m, query)]
        return sorted(matches, key=lambda m: (m.study_date or "", m.study_uid))

    def find_series(
        self, study_uid: str, modality: str | None = None, deadline: float | None = None
    ) -> list[SeriesMatch]:
        """The series of ``study_uid`` (of ``modality`` when given), by Series Number."""
        keys = {"StudyInstanceUID": study_uid, **({"Modality": modality} if modality else {})}

        def run() -> list[Dataset]:
            if self.section.method == "dicomweb":
                client = self._dicomweb()
                filters = {k: v for k, v in keys.items() if k != "StudyInstanceUID"}  # in the path
                found = _http(
                    self,
                    lambda: client.search_for_series(
                        study_uid,
                        search_filters=filters,
                        fields=list(_SERIES_RETURN_KEYS),
                        limit=_QIDO_LIMIT,
                    ),
                )
                return _datasets_from_json(self, found)
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES"
            for keyword in _SERIES_RETURN_KEYS:
                setattr(ds, keyword, "")
            for keyword, value in keys.items():
                setattr(ds, keyword, value)
            return self._c_find(ds, deadline)

        found = self._audited_query("SERIES", keys, None, run)
        matches = [SeriesMatch.from_dataset(ds) for ds in found]
        if modality:
            matches = [m for m in matches if m.modality in (None, modality)]
        return sorted(matches, key=lambda m: (m.series_number is None, m.series_number or 0, m.series_uid))

    def _qido_studies(self, query: StudyQuery) -> list[Dataset]:
        client = self._dicomweb()
        filters = query.keys()
        found = _http(
            self,
            lambda: client.search_for_studies(
                search_filters=filters, fields=list(_STUDY_RETURN_KEYS), limit=_QIDO_LIMIT
            ),
        )
        return _datasets_from_json(self, found)

    def _audited_query(
        self, level: str, keys: dict[str, str], patient_id: str | None, run: Callable[[], list[Dataset]]
    ) -> list[Dataset]:
        method = "qido-rs" if self.section.method == "dicomweb" else "c-find"
        common: dict[str, Any] = {
            "patient_id": patient_id,
            "calling_ae": self.config.node.ae_title,
            "called_ae": self.section.ae_title,
            "peer_host": self.section.host,
            "actor": self.archives.actor,
            "archive": self.name,
            "method": method,
            "level": level,
            "query": keys,
        }
        try:
            found = run()
        except ArchiveError as exc:
            self.audit.record(AuditEvent.QUERY, Outcome.MINOR_FAILURE, **common, reason=str(exc))
            raise
        self.audit.record(AuditEvent.QUERY, Outcome.SUCCESS, **common, matches=len(found))
        return found

    def _c_find(self, identifier: Dataset, deadline: float | None = None) -> list[Dataset]:
        """The matches of one C-FIND. It ends by ``deadline`` (default: the archive's
        ``retrieve_timeout_seconds`` from now), however many pending answers come: the
        association is aborted when it passes."""
        found: list[Dataset] = []
        if deadline is None:
            deadline = time.monotonic() + self.section.retrieve_timeout_seconds
        limit = max(0.0, deadline - time.monotonic())
        with self._association([StudyRootQueryRetrieveInformationModelFind], deadline=deadline) as assoc:
            for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                if "Status" not in status:
                    if time.monotonic() >= deadline - 0.5:
                        raise ArchiveError(f"{self.where} did not finish the C-FIND within {limit:.0f} s")
                    raise ArchiveError(
                        f"no C-FIND response from {self.where} within {self.section.timeout_seconds:g} s"
                    )
                code = int(status.Status)
                if code in _PENDING:
                    if answer is not None:
                        found.append(answer)
                    continue
                if code != 0x0000:
                    comment = f" ({status.ErrorComment})" if status.get("ErrorComment") else ""
                    raise ArchiveError(f"{self.where} answered C-FIND with status 0x{code:04X}{comment}")
        return found

    # -- retrieval ------------------------------------------------------------------

    def retrieve(
        self,
        study_uid: str,
        series_uids: Sequence[str] | None = None,
        timeout: float | None = None,
        patient: tuple[str, str] | None = None,
    ) -> RetrieveResult:
        """Bring ``study_uid`` (only ``series_uids`` of it, when given) into this node's store
        as priors, within ``timeout`` seconds (default ``retrieve_timeout_seconds``).

        ``patient``: (Patient ID, issuer) the study must belong to. A data set of another
        study or patient is refused and quarantined, never stored as a prior (C-GET and
        WADO-RS check each one here; C-MOVE's arrive at the receiver, which refuses one of a
        study held under another patient, and only the asked study's count).

        Never raises for the archive's problems: the result says what arrived and why the
        rest did not.
        """
        started = time.monotonic()
        deadline = started + (timeout if timeout is not None else self.section.retrieve_timeout_seconds)
        series = tuple(series_uids or ())
        result = RetrieveResult(self.name, self.section.method, study_uid, series)
        expected = Expected(study_uid, *(patient or (None, "")))
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            result.error = (
                f"{self.section.max_concurrent_retrievals} retrieval(s) from {self.where} already running; "
                "none ended in time (raise max_concurrent_retrievals or the timeout)"
            )
            self._audit_transfer(AuditEvent.INSTANCES_TRANSFERRED, result)
            return result
        try:
            self._audit_transfer(AuditEvent.BEGIN_TRANSFERRING, result)
            try:
                if self.section.method == "c-move":
                    self._move(result, deadline)
                elif self.section.method == "c-get":
                    self._get(result, deadline, expected)
                else:
                    self._wado(result, deadline, expected)
            except ArchiveError as exc:
                result.error = str(exc)
            except RuntimeError:  # pynetdicom: a request on the association just aborted
                if not self.archives.stopping:
                    raise
                result.error = result.error or f"{self.where}: retrieval aborted, this node is stopping"
        finally:
            self._slots.release()
            result.seconds = round(time.monotonic() - started, 3)
        self._audit_transfer(AuditEvent.INSTANCES_TRANSFERRED, result)
        if result.error:
            log.warning("retrieve of study %s from %s: %s", study_uid, self.name, result.error)
        return result

    def _audit_transfer(self, event: AuditEvent, result: RetrieveResult) -> None:
        facts: dict[str, Any] = {
            "archive": self.name,
            "method": result.method,
            "direction": "retrieved",
            "series_uids": list(result.series_uids),
        }
        outcome = Outcome.SUCCESS
        if event == AuditEvent.INSTANCES_TRANSFERRED:
            facts |= {
                "instances": len(result.sop_uids),
                "completed": result.completed,
                "failed": result.failed,
                "warning": result.warning,
                "seconds": result.seconds,
            }
            if not result.ok:
                outcome = Outcome.MINOR_FAILURE if result.sop_uids else Outcome.SERIOUS_FAILURE
                facts["reason"] = result.error or "; ".join(result.failures[:5])
        self.audit.record(
            event,
            outcome,
            study_uid=result.study_uid,
            calling_ae=self.config.node.ae_title,
            called_ae=self.section.ae_title,
            peer_host=self.section.host,
            actor=self.archives.actor,
            **facts,
        )

    def _move(self, result: RetrieveResult, deadline: float) -> None:
        """C-MOVE to this node's own AE; then wait for the index to hold what was sent."""
        db = self.archives.db
        if db is None:
            raise ValueError("a c-move retrieval needs the node's database (Archives(db=...))")
        own_ae = self.config.node.ae_title
        with self._association([StudyRootQueryRetrieveInformationModelMove], deadline=deadline) as assoc:
            for identifier in _retrieve_identifiers(result.study_uid, result.series_uids):
                responses = assoc.send_c_move(identifier, own_ae, StudyRootQueryRetrieveInformationModelMove)
                if not self._tally(result, responses, deadline, "C-MOVE"):
                    break
        expected = result.completed + result.warning
        now = time.monotonic()
        wait_until = min(max(deadline, now + 1.0), now + _INDEX_GRACE_SECONDS) if expected else now
        while True:
            result.sop_uids = indexed_instances(db, result.study_uid, result.series_uids)
            if len(result.sop_uids) >= expected or time.monotonic() >= wait_until or self.archives.stopping:
                break
            time.sleep(0.2)
        if len(result.sop_uids) < expected:
            reason = (
                f"{self.where} reported {expected} instance(s) sent, {len(result.sop_uids)} are in this "
                f"node's index (is `dicom-node serve` running on this home, listening as {own_ae}?)"
            )
            result.failures.append(reason)
            result.error = result.error or reason

    def _get(self, result: RetrieveResult, deadline: float, expected: Expected) -> None:
        """C-GET: the archive's C-STORE sub-operations arrive on this association."""
        store = self.archives.store
        if store is None:
            raise ValueError("a c-get retrieval needs the node's store (Archives(store=...))")
        stored: list[str] = []
        rejected: list[str] = []

        def on_store(event: Any) -> int | Dataset:
            claimed = str(event.request.AffectedSOPInstanceUID or "")
            outcome = self._store(
                event.encoded_dataset(include_meta=False),
                str(UID(event.context.transfer_syntax)),
                claimed,
                expected,
            )
            if isinstance(outcome, str):
                stored.append(outcome)
                return 0x0000
            rejected.append(f"{claimed}: {outcome[1]}")
            return failure_status(*outcome)

        contexts = [StudyRootQueryRetrieveInformationModelGet] + [
            str(cx.abstract_syntax) for cx in StoragePresentationContexts
        ]
        roles = [build_role(str(cx.abstract_syntax), scp_role=True) for cx in StoragePresentationContexts]
        with self._association(
            contexts, deadline=deadline, roles=roles, handlers=[(evt.EVT_C_STORE, on_store)]
        ) as assoc:
            for identifier in _retrieve_identifiers(result.study_uid, result.series_uids):
                responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
                if not self._tally(result, responses, deadline, "C-GET"):
                    break
        result.failures += rejected
        store.indexer.flush(timeout=max(1.0, deadline - time.monotonic()))
        result.sop_uids = sorted(set(stored))

    def _store(
        self, data: bytes, transfer_syntax: str, claimed: str | None, expected: Expected
    ) -> str | tuple[int, str]:
        """Hand one retrieved data set to the store as a prior: its SOP Instance UID, or
        (status, reason) when it was refused (quarantined, audited)."""
        store = self.archives.store
        assert store is not None
        result = store.accept(
            data,
            transfer_syntax,
            expected=expected,
            claimed_sop_uid=claimed,
            calling_ae=self.section.ae_title,
            peer_host=self.section.host,
            called_ae=self.config.node.ae_title,
            max_inflated_bytes=self.config.receiver.max_inflated_mb * 1024 * 1024,
            retrieved_from=self.name,
        )
        if result.outcome == StoreOutcome.REJECTED:
            assert result.rejection is not None
            self.audit.record(
                AuditEvent.INSTANCE_QUARANTINED,
                Outcome.MINOR_FAILURE,
                calling_ae=self.section.ae_title,
                peer_host=self.section.host,
                sop_uid=claimed,
                status=f"0x{result.rejection.status:04X}",
                reason=result.rejection.reason,
                quarantine_path=str(result.quarantine_path),
                archive=self.name,
            )
            return int(result.rejection.status), result.rejection.reason
        assert result.facts is not None
        return result.facts.sop_instance_uid

    def _tally(
        self,
        result: RetrieveResult,
        responses: Iterator[tuple[Dataset, Dataset | None]],
        deadline: float,
        what: str,
    ) -> bool:
        """Count a C-MOVE / C-GET's sub-operations from its responses; False when it ended
        in an error (set on ``result``) and no further request should follow."""
        completed = failed = warning = 0
        for status, identifier in responses:
            if "Status" not in status:
                late = time.monotonic() >= deadline - 0.05
                result.error = (
                    f"{what} from {self.where} aborted: this node is stopping"
                    if self.archives.stopping
                    else f"{what} from {self.where} timed out (retrieve timeout reached)"
                    if late
                    else f"{what} from {self.where} ended without a final response (association aborted)"
                )
                result.completed += completed
                result.failed += failed
                result.warning += warning
                return False
            code = int(status.Status)
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or 0)
            failed = int(status.get("NumberOfFailedSuboperations", failed) or 0)
            warning = int(status.get("NumberOfWarningSuboperations", warning) or 0)
            if code in _PENDING:
                continue
            result.completed += completed
            result.failed += failed
            result.warning += warning
            if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
                uids = _values(identifier, "FailedSOPInstanceUIDList")
                result.failures += [f"{uid}: the archive reports its sub-operation failed" for uid in uids]
            if code == 0x0000:
                if completed + warning + failed == 0:
                    result.error = f"{self.where} holds nothing to send for this request"
                    return False
                return True
            if code == 0xB000:
                if failed and not result.failures:
                    result.failures.append(f"{what}: {failed} sub-operation(s) failed")
                return True
            comment = status.get("ErrorComment")
            known = _MOVE_STATUS.get(code) or (
                _MOVE_UNABLE if what == "C-MOVE" and code >> 12 == 0xC else "failed"
            )
            result.error = f"{self.where} answered {what} with status 0x{code:04X}: {known}" + (
                f" ({comment})" if comment else ""
            )
            return False
        return True

    def _wado(self, result: RetrieveResult, deadline: float, expected: Expected) -> None:
        """WADO-RS: each instance of the study (or of the series) into the store."""
        if self.archives.store is None:
            raise ValueError("a dicomweb retrieval needs the node's store (Archives(store=...))")
        client = self._dicomweb()
        stored: list[str] = []
        study = result.study_uid
        fetches: list[Callable[[], Iterator[Dataset]]] = (
            [partial(client.iter_series, study, series) for series in result.series_uids]
            if result.series_uids
            else [partial(client.iter_study, study)]
        )
        for fetch in fetches:
            instances: Iterator[Dataset] = _http(self, fetch)
            while True:
                if time.monotonic() >= deadline:
                    result.error = f"WADO-RS from {self.where} timed out (retrieve timeout reached)"
                    break
                if self.archives.stopping:
                    result.error = f"WADO-RS from {self.where} aborted: this node is stopping"
                    break
                ds = _http(self, partial(next, instances, None))
                if ds is None:
                    break
                claimed = str(ds.get("SOPInstanceUID", ""))
                try:
                    transfer_syntax, data = _encode(ds)
                except Exception as exc:  # an instance pydicom cannot write back: report, go on
                    result.failed += 1
                    result.failures.append(
                        f"{claimed}: cannot encode the WADO-RS response ({type(exc).__name__})"
                    )
                    continue
                outcome = self._store(data, transfer_syntax, claimed, expected)
                if isinstance(outcome, str):
                    result.completed += 1
                    stored.append(outcome)
                else:
                    result.failed += 1
                    result.failures.append(f"{claimed}: {outcome[1]}")
            if result.error:
                break
        assert self.archives.store is not None
        self.archives.store.indexer.flush(timeout=max(1.0, deadline - time.monotonic()))
        result.sop_uids = sorted(set(stored))
        if not stored and not result.error and not result.failures:
            result.error = f"{self.where} holds nothing to send for this request"

    # -- connections ----------------------------------------------------------------

    @contextmanager
    def _association(
        self,
        contexts: Sequence[str],
        *,
        deadline: float | None = None,
        roles: list[Any] | None = None,
        handlers: list[Any] | None = None,
    ) -> Iterator[Any]:
        """An established association with the archive (raises :class:`ArchiveError`),
        released when the block ends.

        With ``deadline``, each response may take until then (the whole retrieval is bounded
        by it) and the association is aborted when it passes.
        """
        s = self.section
        assert s.ae_title is not None and s.host is not None and s.port is not None
        tune_pynetdicom()
        try:
            tls_args = self.archives.tls.args_for(s.as_peer())
        except TlsConfigError as exc:
            raise ArchiveError(f"archives.{self.name}: {exc}") from None
        ae = AE(ae_title=self.config.node.ae_title)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = s.timeout_seconds
        ae.dimse_timeout = s.timeout_seconds if deadline is None else max(1.0, deadline - time.monotonic())
        for sop_class in contexts:
            syntaxes = _GET_SYNTAXES if roles else [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            ae.add_requested_context(sop_class, syntaxes)
        assoc = ae.associate(
            s.host,
            s.port,
            ae_title=s.ae_title,
            ext_neg=roles,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open), *(handlers or [])],
            tls_args=tls_args,
        )
        if not assoc.is_established:
            if assoc.is_rejected:
                rj = assoc.acceptor.primitive
                raise ArchiveError(
                    f"{self.where} rejected the association ({rj.reason_str if rj else 'rejected'}; "
                    f"does it know this node as {self.config.node.ae_title}?)"
                )
            raise ArchiveError(_why_unreachable(s.host, s.port, self.where, s.timeout_seconds))
        watchdog = None
        if deadline is not None:
            if not self.archives._retrieval_began(assoc):
                assoc.abort()
                raise ArchiveError(f"{self.where}: not retrieved, this node is stopping")
            watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _abort, (assoc,))
            watchdog.daemon = True
            watchdog.start()
        try:
            yield assoc
        finally:
            if watchdog is not None:
                watchdog.cancel()
                self.archives._retrieval_ended(assoc)
            if assoc.is_established:
                assoc.release()

    def _dicomweb(self) -> Any:
        """A dicomweb-client for the archive, with its authentication and CA file."""
        try:
            return client_for(self.section, self.archives.home)
        except ValueError as exc:  # a secret file that cannot be read
            raise ArchiveError(f"archives.{self.name}: {exc}") from None


def _abort(assoc: Any) -> None:
    """Abort an association and wake whoever waits on its responses: pynetdicom queues the
    "no more responses" marker when the peer aborts or the connection drops, not when we
    abort, so a C-MOVE / C-GET waiting for a response would sit out its DIMSE timeout."""
    assoc.abort()
    assoc.dimse.msg_queue.put((None, None))


def _retrieve_identifiers(study_uid: str, series_uids: Sequence[str]) -> list[Dataset]:
    """One identifier per C-MOVE / C-GET: the study, or each of its series in turn."""
    found = []
    wanted: Sequence[str | None] = series_uids or [None]
    for series_uid in wanted:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY" if series_uid is None else "SERIES"
        ds.StudyInstanceUID = study_uid
        if series_uid is not None:
            ds.SeriesInstanceUID = series_uid
        found.append(ds)
    return found


def indexed_instances(db: Database, study_uid: str, series_uids: Sequence[str] = ()) -> list[str]:
    """The SOP Instance UIDs of ``study_uid`` (of ``series_uids`` when given) in the index."""
    query = (
        select(t.instances.c.sop_uid)
        .join(t.studies, t.studies.c.id == t.instances.c.study_fk)
        .join(t.series, t.series.c.id == t.instances.c.series_fk)
        .where(t.studies.c.study_uid == study_uid, t.instances.c.current.is_(True))
    )
    if series_uids:
        query = query.where(t.series.c.series_uid.in_(list(series_uids)))
    with db.read() as conn:
        return sorted(set(conn.execute(query).scalars()))


def _encode(ds: Dataset) -> tuple[str, bytes]:
    """A data set from WADO-RS as the store takes it: its transfer syntax, its bytes."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    meta, data = split_part10(buffer.getvalue())
    return str(meta.TransferSyntaxUID), data


def _http(archive: Archive, call: Callable[[], Any]) -> Any:
    """Run one DICOMweb request; its failure as one line (no URL: it may hold a patient ID)."""
    import requests

    try:
        return call()
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        raise ArchiveError(f"{archive.where} answered HTTP {code}") from None
    except requests.Timeout:
        raise ArchiveError(
            f"{archive.where} did not answer within {archive.section.timeout_seconds:g} s"
        ) from None
    except requests.TooManyRedirects:
        raise ArchiveError(
            f"{archive.where} answered with a redirect, which is not followed (configure the URL it names)"
        ) from None
    except requests.ConnectionError as exc:
        text = str(exc)
        why = "connection refused (is it running?)" if "refused" in text.lower() else "cannot connect"
        if isinstance(exc, requests.exceptions.SSLError):
            why = "TLS failed (check ca_file)"
        raise ArchiveError(f"{archive.where}: {why}") from None
    except ValueError:  # a body that is not JSON (requests' JSONDecodeError is one)
        raise ArchiveError(f"{archive.where} answered something that is not DICOM JSON") from None
    except requests.RequestException as exc:
        raise ArchiveError(f"{archive.where}: the request failed ({type(exc).__name__})") from None


def _datasets_from_json(archive: Archive, found: Any) -> list[Dataset]:
    """A QIDO-RS answer as data sets; anything but a list of DICOM JSON objects is the
    archive's fault, said in one line."""
    try:
        if not isinstance(found, list):
            raise TypeError("not a list")
        return [Dataset.from_json(item) for item in found]
    except Exception:  # pydicom raises several kinds for JSON that is not DICOM's
        raise ArchiveError(f"{archive.where} answered something that is not DICOM JSON") from None


def _why_unreachable(host: str, port: int, where: str, timeout: float) -> str:
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 5.0)):
            pass
    except ConnectionRefusedError:
        return f"cannot connect to {where}: connection refused (is it running on that port?)"
    except TimeoutError:
        return f"cannot connect to {where}: timed out (host down or a firewall in between?)"
    except (OSError, ssl.SSLError) as exc:
        return f"cannot connect to {where}: {getattr(exc, 'strerror', None) or exc}"
    return f"{where} accepted the connection but aborted the association (check its AE title and config)"


__all__ = [
    "Archive",
    "ArchiveError",
    "Archives",
    "RetrieveResult",
    "SeriesMatch",
    "StudyMatch",
    "StudyQuery",
    "indexed_instances",
    "keep_study",
]
