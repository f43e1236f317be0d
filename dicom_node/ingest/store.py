"""Durable storage of received instances; their index rows follow from a batching thread.

An instance is acknowledged only once its bytes are on disk for good: written to a
staging file and fsync'd, renamed into ``studies/<Study>/<Series>/<SOP>.dcm``, and the
directory fsync'd. On the receiver the staging file is written while the data set arrives
(:mod:`dicom_node.ingest.staging`). The data set bytes are kept exactly as they came off
the wire; the node only prepends its own Part 10 file meta header.

The file is the record; the SQL index is derived from it. Index rows (and the matching
audit events) are written by :class:`~dicom_node.ingest.indexer.Indexer` in batches just after
the acknowledgement, so the C-STORE round trip pays for the durable write alone. If the
process dies in between, :meth:`InstanceStore.reconcile` re-indexes the file at the next
start — an acknowledged instance is never lost.

A re-sent identical instance is stored once — identical bytes, or the same content in
another transfer syntax (:mod:`dicom_node.ingest.content`); a changed instance under a
known SOP Instance UID becomes a new version (``<SOP>.v2.dcm``). Unusable bytes go to
``quarantine/`` with their reason — never dropped. Each stored instance carries its
origin (:mod:`dicom_node.ingest.origin`): the node's own outputs sent back to it are
stored with the role ``own-output`` and never open a study version or a job.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from sqlalchemy import bindparam, func, insert, select, update

from dicom_node.db import schema as t
from dicom_node.db.engine import Database
from dicom_node.ingest.content import same_content
from dicom_node.ingest.indexer import Indexer, PendingInstance
from dicom_node.ingest.instance import (
    DEFAULT_MAX_INFLATED_BYTES,
    InstanceFacts,
    Rejection,
    StoreStatus,
    check_instance,
)
from dicom_node.ingest.origin import ACQUIRED, PRIOR, Origin, OriginRules, retrieved
from dicom_node.ingest.part10 import encode_file_meta, split_part10
from dicom_node.ingest.part10 import retrieved_from as part10_retrieved_from
from dicom_node.ingest.staging import StagedDataSet, Stager
from dicom_node.paths import NodePaths

log = logging.getLogger(__name__)

_LOCK_STRIPES = 64
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: Studies whose patient one store remembers (the rest are looked up again).
_STUDY_PATIENTS_KEPT = 10_000

_NEWEST_VERSION = (
    select(
        t.instances.c.version,
        t.instances.c.sha256,
        t.instances.c.path,
        t.instances.c.transfer_syntax_uid,
        t.instances.c.role,
        t.instances.c.purged_at,
    )
    .where(t.instances.c.sop_uid == bindparam("sop_uid"))
    .order_by(t.instances.c.version.desc())
    .limit(1)
)


class StoreOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    NEW_VERSION = "new-version"
    REJECTED = "rejected"


@dataclass(frozen=True)
class StoreResult:
    outcome: StoreOutcome
    facts: InstanceFacts | None = None
    rejection: Rejection | None = None
    version: int = 1
    quarantine_path: Path | None = None
    #: Why a duplicate is one ("identical bytes" or "same content in <syntax>").
    duplicate_of: str | None = None
    #: own-output / ai-output / prior (see :mod:`dicom_node.ingest.origin`); None: acquired.
    role: str | None = None


class InstanceStore:
    """Stores, deduplicates and versions received instances; indexes them via an Indexer."""

    def __init__(
        self,
        paths: NodePaths,
        db: Database,
        indexer: Indexer,
        *,
        fsync: bool = True,
        origin: OriginRules | None = None,
    ) -> None:
        self.paths = paths
        self.db = db
        self.indexer = indexer
        self.fsync = fsync
        #: Recognises the node's own outputs; None (tools, tests): everything is acquired.
        self.origin = origin
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        #: Study Instance UID -> (Patient ID, issuer) of the studies seen by this process.
        self._study_patients: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._study_patients_lock = threading.Lock()

    def close(self) -> None:
        self.indexer.stop()

    # -- filesystem -------------------------------------------------------------------

    def _fsync_dir(self, path: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, path: Path) -> None:
        if path in self._known_dirs:
            return
        with self._dirs_lock:
            missing = []
            probe = path
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            path.mkdir(parents=True, exist_ok=True)
            for created in reversed(missing):
                self._fsync_dir(created.parent)
            self._known_dirs.add(path)

    def _stage(self, chunks: Iterable[bytes]) -> Path:
        """Write a staging file and flush it to disk; returns its path."""
        staging = self.paths.tmp / f"{uuid.uuid4().hex}.part"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            if self.fsync:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            staging.unlink(missing_ok=True)
            raise
        os.close(fd)
        return staging

    def _commit(self, staging: Path, final: Path) -> None:
        """Rename a flushed staging file into place and make the rename durable."""
        self._ensure_dir(final.parent)
        try:
            os.replace(staging, final)
        except FileNotFoundError:
            if not staging.exists():
                raise
            # the folder went after this process made it: the retention rule removes a
            # study's emptied folders (an instance of it arriving again comes here)
            with self._dirs_lock:
                self._known_dirs.discard(final.parent)
            self._ensure_dir(final.parent)
            os.replace(staging, final)
        self._fsync_dir(final.parent)

    def write_durably(self, final: Path, chunks: Iterable[bytes]) -> None:
        """Staging file + fsync + rename + directory fsync."""
        self._commit(self._stage(chunks), final)

    def stager(self) -> Stager:
        """Staging files written while data sets arrive (one per association, see
        :mod:`dicom_node.ingest.staging`)."""
        return Stager(self.paths.tmp, durable=self.fsync)

    # -- the public operation ---------------------------------------------------------

    def _current_version(self, sop_uid: str) -> _Current | None:
        pending = self.indexer.pending(sop_uid)
        if pending is not None:
            data = pending.data
            return _Current(
                pending.version,
                pending.sha256(),
                pending.transfer_syntax,
                lambda: data,
                pending.role,
                indexed=False,
            )
        row = self.db.lookup(_NEWEST_VERSION, sop_uid=sop_uid)
        if row is None:
            return None
        path = self.paths.data / str(row[2])
        return _Current(
            int(row[0]),
            str(row[1]),
            str(row[3]),
            lambda: split_part10(path.read_bytes())[1],
            row[4],
            purged=row[5] is not None,
        )

    @staticmethod
    def _duplicate_of(current: _Current, data: bytes, transfer_syntax: str) -> str | None:
        """Why ``data`` is a duplicate of ``current`` (identical bytes or the same content in
        another lossless syntax), or None when it is not one."""
        if current.sha256 == hashlib.sha256(data).hexdigest():
            return "identical bytes"
        if same_content(current.data(), current.transfer_syntax, data, transfer_syntax):
            return (
                f"same content as version {current.version} "
                f"({UID(current.transfer_syntax).name}), re-sent in {UID(transfer_syntax).name}"
            )
        return None

    def _seen_again(self, sop_uid: str, current: _Current) -> bool:
        """Record that a duplicate of the indexed ``current`` arrived (``last_seen_at``),
        unless the retention rule has purged it meanwhile: False then, and the copy must be
        stored as a new version. One write under the writers' lock, before the duplicate is
        acknowledged: either it commits first, and the purge sees the activity and keeps the
        study, or the purge commits first, and this finds no row to mark. So an
        acknowledged duplicate never stands for a file the purge is deleting."""
        if not current.indexed:  # received moments ago, not yet indexed: nothing to purge
            return True
        with self.db.write() as conn:
            marked = conn.execute(
                update(t.instances)
                .where(
                    t.instances.c.sop_uid == sop_uid,
                    t.instances.c.version == current.version,
                    t.instances.c.purged_at.is_(None),
                )
                .values(last_seen_at=time.time())
            ).rowcount
        return bool(marked)

    def _classify(self, facts: InstanceFacts) -> Origin:
        return self.origin.classify(facts) if self.origin is not None else ACQUIRED

    def accept(
        self,
        data: bytes,
        transfer_syntax: str,
        *,
        claimed_sop_uid: str | None = None,
        calling_ae: str | None = None,
        peer_host: str | None = None,
        called_ae: str | None = None,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
        retrieved_from: str | None = None,
        staged: StagedDataSet | None = None,
        expected: Expected | None = None,
    ) -> StoreResult:
        """Store one received data set; durable on disk before it returns.

        The index row and the audit record follow asynchronously (see the module doc).
        ``max_inflated_bytes`` bounds a deflated data set once inflated
        (``[receiver] max_inflated_mb``). ``retrieved_from``: the archive the node
        retrieved it from (C-MOVE, C-GET, WADO-RS): it is stored as a ``prior``
        (:func:`~dicom_node.ingest.origin.retrieved`), which never starts a job.
        ``staged``: the same bytes already in a staging file (written as they arrived);
        used when its header gap fits, else the bytes are written here. The caller
        discards it afterwards (a no-op once it is used). ``expected``: the study and patient
        a retrieval asked for; an instance of another is refused (quarantined).

        A prior (retrieved, or a sub-operation of the node's own C-MOVE) is refused when it
        would make a new version of an instance the node did not retrieve, or belongs to a
        study this node holds under another patient: an archive's answer must never change
        what was acquired, nor put one patient's images into another's study.
        """
        facts, rejection = check_instance(
            data, transfer_syntax, claimed_sop_uid, max_inflated_bytes=max_inflated_bytes
        )
        if rejection is not None:
            return self.refuse(
                data,
                transfer_syntax,
                rejection,
                claimed_sop_uid=claimed_sop_uid,
                calling_ae=calling_ae,
                peer_host=peer_host,
            )
        assert facts is not None
        lock = self._locks[hash(facts.sop_instance_uid) % _LOCK_STRIPES]
        origin = self._classify(facts)
        if retrieved_from is not None:
            origin = retrieved(retrieved_from, origin)
        refused = self._admission(facts, origin, expected)
        if refused is not None:
            return self.refuse(
                data,
                transfer_syntax,
                refused,
                claimed_sop_uid=claimed_sop_uid,
                calling_ae=calling_ae,
                peer_host=peer_host,
            )
        with lock:
            current = self._current_version(facts.sop_instance_uid)
            if current is not None and not current.purged:
                duplicate = self._duplicate_of(current, data, transfer_syntax)
                if duplicate is not None:
                    if self._seen_again(facts.sop_instance_uid, current):
                        return StoreResult(
                            StoreOutcome.DUPLICATE,
                            facts=facts,
                            version=current.version,
                            duplicate_of=duplicate,
                            role=origin.role,
                        )
                    current = replace(current, purged=True)  # removed meanwhile: a new version
            if current is not None and not current.purged and origin.role == PRIOR and current.role != PRIOR:
                return self.refuse(
                    data,
                    transfer_syntax,
                    Rejection(
                        StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                        "a retrieved instance may not replace one this node received otherwise "
                        "(same SOP Instance UID, other content)",
                    ),
                    claimed_sop_uid=claimed_sop_uid,
                    calling_ae=calling_ae,
                    peer_host=peer_host,
                )
            version = 1 if current is None else current.version + 1
            relative = relative_path(facts, version)
            meta = encode_file_meta(
                facts.sop_class_uid, facts.sop_instance_uid, transfer_syntax, calling_ae, retrieved_from
            )
            final = self.paths.data / relative
            ready = staged.finish(meta, len(data)) if staged is not None else None
            if ready is not None:
                self._commit(ready, final)
            else:
                self.write_durably(final, (meta, data))
            self.indexer.submit(
                PendingInstance(
                    facts=facts,
                    version=version,
                    transfer_syntax=transfer_syntax,
                    relative_path=relative,
                    size=len(meta) + len(data),
                    data=data,
                    calling_ae=calling_ae,
                    peer_host=peer_host,
                    received_at=time.time(),
                    called_ae=called_ae,
                    role=origin.role,
                    role_reason=origin.why,
                )
            )
        outcome = StoreOutcome.STORED if version == 1 else StoreOutcome.NEW_VERSION
        return StoreResult(outcome, facts=facts, version=version, role=origin.role)

    def _admission(self, facts: InstanceFacts, origin: Origin, expected: Expected | None) -> Rejection | None:
        """Why an instance may not be stored where it claims to belong, or None: a prior
        that is not the one asked for (0xA900), a study held under another patient (0xC000)."""
        if origin.role == PRIOR:
            problem = self._prior_problem(facts, expected)
            if problem is not None:
                return Rejection(StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, problem)
        other_patient = self._study_patient_problem(facts)
        if other_patient is not None:
            return Rejection(StoreStatus.CANNOT_UNDERSTAND, other_patient)
        return None

    def _study_holder(self, study_uid: str) -> Any:
        """The index's (patient_id, issuer) row of the patient holding ``study_uid``, or None."""
        with self.db.read() as conn:
            return conn.execute(
                select(t.patients.c.patient_id, t.patients.c.issuer)
                .join(t.studies, t.studies.c.patient_fk == t.patients.c.id)
                .where(t.studies.c.study_uid == study_uid)
            ).first()

    def _prior_problem(self, facts: InstanceFacts, expected: Expected | None) -> str | None:
        """Why a prior must not be stored, or None (see :meth:`accept`)."""
        if expected is not None:
            if facts.study_uid != expected.study_uid:
                return f"retrieved for study {expected.study_uid}, but the data set is of {facts.study_uid}"
            if expected.patient_id is not None and (facts.patient_id, facts.issuer_of_patient_id) != (
                expected.patient_id,
                expected.issuer,
            ):
                return (
                    "retrieved for another patient (Patient ID or its issuer differs from the one asked for)"
                )
        holder = self._study_holder(facts.study_uid)
        if holder is not None and (holder.patient_id, holder.issuer) != (
            facts.patient_id,
            facts.issuer_of_patient_id,
        ):
            return "this node holds the study under another patient (Patient ID or its issuer differs)"
        return None

    def _study_patient_problem(self, facts: InstanceFacts) -> str | None:
        """Why an instance may not join its study: the node holds that Study Instance UID
        under another patient (Patient ID or issuer). A study never mixes patients: a job
        would process both patients' images as one study and label its outputs with one name.
        An instance without a Patient ID (Type 2: it may be empty) does not decide it, nor
        does a missing Issuer of Patient ID beside the same Patient ID: modalities fill the
        issuer unevenly (the images from the worklist, a dose report or a screen capture
        without it), and a Study Instance UID shared by two patients of the same Patient ID
        is not a thing the issuer's absence makes likely. Two different issuers do decide.

        One database lookup per study per process; the first instance of a new study sets
        its patient for those that follow, also while it is still waiting for the index.
        """
        if not facts.patient_id:
            return None
        patient = (facts.patient_id, facts.issuer_of_patient_id)
        with self._study_patients_lock:
            known = self._study_patients.get(facts.study_uid)
        if known is None:
            row = self._study_holder(facts.study_uid)
            found = (
                (str(row.patient_id), str(row.issuer or ""))
                if row is not None and row.patient_id
                else patient
            )
            with self._study_patients_lock:
                known = self._study_patients.setdefault(facts.study_uid, found)
                while len(self._study_patients) > _STUDY_PATIENTS_KEPT:
                    self._study_patients.popitem(last=False)
        if known[0] == patient[0] and not known[1] and patient[1]:
            with self._study_patients_lock:  # the first issuer named decides for the rest here
                self._study_patients[facts.study_uid] = patient
        if known[0] != patient[0] or (known[1] and patient[1] and known[1] != patient[1]):
            return (
                f"study {facts.study_uid} is held here under another patient (Patient ID or its issuer "
                "differs): a study never mixes patients"
            )
        return None

    def refuse(
        self,
        data: bytes,
        transfer_syntax: str,
        rejection: Rejection,
        *,
        claimed_sop_uid: str | None = None,
        calling_ae: str | None = None,
        peer_host: str | None = None,
    ) -> StoreResult:
        """Refuse one received data set: its bytes go to quarantine with the reason."""
        qpath = self.quarantine(
            data, transfer_syntax, rejection.reason, claimed_sop_uid, calling_ae, peer_host
        )
        return StoreResult(StoreOutcome.REJECTED, rejection=rejection, quarantine_path=qpath)

    def put(self, data: bytes, transfer_syntax: str, **kwargs: Any) -> StoreResult:
        """:meth:`accept`, then wait until the index row is written (tools and tests)."""
        result = self.accept(data, transfer_syntax, **kwargs)
        self.indexer.flush()
        return result

    @staticmethod
    def discard(staging: Path) -> None:
        """Remove a staging file that will not be committed (never acknowledged)."""
        staging.unlink(missing_ok=True)

    def quarantine(
        self,
        data: bytes,
        transfer_syntax: str,
        reason: str,
        claimed_sop_uid: str | None,
        calling_ae: str | None,
        peer_host: str | None,
    ) -> Path:
        """Keep unusable bytes, with their reason, and index them in the quarantine table."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{uuid.uuid4().hex[:12]}"
        target = self.paths.quarantine / f"{name}.dcm"
        sop = (claimed_sop_uid or "").strip("\0 ")
        try:
            meta = encode_file_meta(_SECONDARY_CAPTURE, sop or "2.25.0", transfer_syntax, calling_ae)
        except UnicodeEncodeError:  # a claimed UID too broken to encode: keep the raw bytes alone
            meta = b""
        self.write_durably(target, (meta, data))
        (self.paths.quarantine / f"{name}.reason.txt").write_text(
            f"reason: {reason}\ncalling_ae: {calling_ae}\npeer_host: {peer_host}\n"
            f"claimed_sop_instance_uid: {sop}\ntransfer_syntax: {transfer_syntax}\n"
            "note: the file meta header was written by dicom-node; the data set bytes "
            "follow exactly as received\n"
        )
        with self.db.write() as conn:
            conn.execute(
                insert(t.quarantine).values(
                    at=time.time(),
                    reason=reason,
                    calling_ae=calling_ae,
                    peer_host=peer_host,
                    claimed_sop_uid=sop[:64] or None,
                    path=str(target),
                    size=len(meta) + len(data),
                )
            )
        # A parse error's text may quote bytes of the data set: the log names its kind only
        # (the whole reason is in the reason file next to the bytes).
        said = reason.split(":", 1)[0] if reason.startswith(("cannot parse", "cannot decode")) else reason
        log.warning("quarantined %s from %s: %s", target.name, calling_ae, said)
        return target

    # -- recovery ---------------------------------------------------------------------

    def reconcile(self, since: float | None = None, *, staging: bool = True) -> int:
        """Index files on disk that have no index row (after a crash or a power loss).

        Only series directories modified at or after ``since`` are scanned (all when
        ``None``). Staging files left by an interrupted write were never acknowledged:
        empty ones (created ahead of a data set) are removed, the others moved to
        quarantine (``staging``: only when no other process of the node may be writing
        one). Returns the number of instances re-indexed.
        """
        for part in sorted(self.paths.tmp.glob("*.part")) if staging else ():
            if part.stat().st_size == 0:  # created ahead of a data set that never came
                part.unlink()
                continue
            self.quarantine(
                part.read_bytes(),
                "1.2.840.10008.1.2.1",
                "staging file left by an interrupted store (never acknowledged)",
                None,
                None,
                None,
            )
            part.unlink()
        recovered = 0
        if not self.paths.studies.exists():
            return 0
        for study_dir in sorted(self.paths.studies.iterdir()):
            if not study_dir.is_dir():
                continue
            for series_dir in sorted(study_dir.iterdir()):
                if since is not None and series_dir.stat().st_mtime < since:
                    continue
                with self.db.read() as conn:
                    known = set(
                        conn.execute(
                            select(t.instances.c.path)
                            .join(t.series, t.series.c.id == t.instances.c.series_fk)
                            .where(t.series.c.series_uid == series_dir.name)
                        ).scalars()
                    )
                for path in sorted(series_dir.glob("*.dcm")):
                    relative = str(path.relative_to(self.paths.data))
                    if relative not in known:
                        recovered += self._reindex(path, relative)
        self.indexer.flush()
        if recovered:
            log.warning("reconcile: re-indexed %d instance(s) found on disk", recovered)
        return recovered

    def _reindex(self, path: Path, relative: str) -> int:
        raw = path.read_bytes()
        try:
            meta, data = split_part10(raw)
            transfer_syntax = str(meta.TransferSyntaxUID)
        except Exception as exc:
            log.error("reconcile: %s is not a Part 10 file (%s); left in place", path, exc)
            return 0
        facts, rejection = check_instance(data, transfer_syntax)
        if facts is None:
            log.error("reconcile: %s unusable (%s); left in place", path, rejection)
            return 0
        stem = path.name[: -len(".dcm")]
        version = int(stem.rsplit(".v", 1)[1]) if ".v" in stem and stem.rsplit(".v", 1)[1].isdigit() else 1
        source_ae = meta.get("SourceApplicationEntityTitle")
        self.indexer.submit(
            PendingInstance(
                facts=facts,
                version=version,
                transfer_syntax=transfer_syntax,
                relative_path=relative,
                size=len(raw),
                data=data,
                calling_ae=str(source_ae).strip() if source_ae else None,
                peer_host=None,
                received_at=path.stat().st_mtime,
                recovered=True,
                role=(origin := self._origin_on_disk(meta, facts)).role,
                role_reason=origin.why,
            )
        )
        return 1

    def _origin_on_disk(self, meta: FileMetaDataset, facts: InstanceFacts) -> Origin:
        """A stored file's origin: a prior when its file meta says so, else from its content."""
        origin = self._classify(facts)
        archive = part10_retrieved_from(meta)
        return origin if archive is None else retrieved(archive, origin)


@dataclass(frozen=True)
class Expected:
    """What a retrieval asked for: a data set of another study or patient is refused."""

    study_uid: str
    #: None: any patient (a retrieval by study alone, e.g. ``dicom-node archives retrieve``).
    patient_id: str | None = None
    issuer: str = ""


@dataclass(frozen=True)
class _Current:
    """The newest version of a SOP Instance UID, with its data set bytes on demand."""

    version: int
    sha256: str
    transfer_syntax: str
    data: Callable[[], bytes]
    #: own-output / ai-output / prior; None: acquired.
    role: str | None = None
    #: The retention rule removed its file: the same SOP Instance UID arriving again is a
    #: new version whatever its bytes (nothing to compare with, nothing to be a duplicate of).
    purged: bool = False
    #: In the index (False: submitted to the indexer moments ago, not yet written).
    indexed: bool = True


def relative_path(facts: InstanceFacts, version: int) -> str:
    name = facts.sop_instance_uid + (".dcm" if version == 1 else f".v{version}.dcm")
    return f"studies/{facts.study_uid}/{facts.series_uid}/{name}"


__all__ = [
    "InstanceStore",
    "StoreOutcome",
    "StoreResult",
    "latest_received_at",
    "relative_path",
    "split_part10",
]


def latest_received_at(db: Database) -> float | None:
    """When the newest indexed instance arrived (reconcile scans from shortly before)."""
    with db.read() as conn:
        return conn.execute(select(func.max(t.instances.c.received_at))).scalar()
