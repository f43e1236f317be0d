"""Which prior studies a rule's ``priors`` wants for a job, and which of them must be fetched.

The selection is pure (:func:`choose`): candidates — the studies of the patient this node
already holds (:func:`local_priors`) merged with what the archive answered
(:func:`archive_priors`) — are filtered by the rule's window (``min_interval_days`` ..
``within_days`` before the current study's date), modality, Series Description regex and
``same`` attributes, and the ``count`` most recent are kept. A series already held locally
is never fetched again (:attr:`Selection.to_fetch` lists only what is not).

See docs/priors.md, "Priors in policies".
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, or_, select

from dicom_node.db import schema as t
from dicom_node.ingest.archives import Archive, ArchiveError, StudyQuery, keep_study
from dicom_node.ingest.origin import PRIOR
from pipelines.provenance import PriorReference
from policies.model import Priors


def parse_da(value: str | None) -> date | None:
    """A DICOM DA (YYYYMMDD) as a date; None when absent or not a date."""
    if not value:
        return None
    try:
        return datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


@dataclass(frozen=True)
class CurrentStudy:
    """What the priors are chosen against: the job's study and its input series."""

    study_uid: str
    patient_id: str
    study_date: date | None
    #: The job's input series' Modality and Body Part Examined (for ``same``).
    modality: str | None = None
    body_part: str | None = None
    #: Issuer of Patient ID ("" when the study names none): the same Patient ID from another
    #: issuer is another patient.
    issuer: str = ""


@dataclass(frozen=True)
class PriorSeries:
    series_uid: str
    modality: str | None
    description: str | None
    body_part: str | None
    instances: int | None = None
    #: Already in this node's index (never fetched again).
    local: bool = False


@dataclass(frozen=True)
class PriorStudy:
    study_uid: str
    patient_id: str | None
    study_date: date | None
    series: tuple[PriorSeries, ...] = ()

    @property
    def local(self) -> bool:
        """Every (wanted) series of it is held here."""
        return bool(self.series) and all(s.local for s in self.series)


@dataclass(frozen=True)
class Selection:
    """The priors chosen for a job (newest first, wanted series only)."""

    wanted: int
    chosen: tuple[PriorStudy, ...] = ()
    #: Why fewer than wanted qualify (None when enough do).
    shortfall: str | None = None

    @property
    def to_fetch(self) -> dict[str, tuple[str, ...]]:
        """Study UID → the series UIDs of it not held locally (studies held whole: absent)."""
        out: dict[str, tuple[str, ...]] = {}
        for study in self.chosen:
            missing = tuple(s.series_uid for s in study.series if not s.local)
            if missing:
                out[study.study_uid] = missing
        return out

    @property
    def held(self) -> tuple[PriorStudy, ...]:
        return tuple(s for s in self.chosen if s.local)


def window(priors: Priors, current_date: date | None) -> tuple[date | None, date | None]:
    """The earliest and latest study date a prior may have (None: unbounded / unknown)."""
    if current_date is None:
        return None, None
    since = current_date - timedelta(days=priors.within_days) if priors.within_days else None
    return since, current_date - timedelta(days=priors.min_interval_days)


def query(priors: Priors, current: CurrentStudy) -> StudyQuery:
    """The STUDY-level query the archive is sent (the window's dates, the modality)."""
    since, until = window(priors, current.study_date)
    return StudyQuery(patient_id=current.patient_id, modality=priors.modality, since=since, until=until)


def describe_query(priors: Priors, current: CurrentStudy) -> str:
    keys = query(priors, current).keys()
    text = ", ".join(f"{k}={v}" for k, v in keys.items())
    then = f"; then series {priors.series!r}" if priors.series else ""
    return f"C-FIND STUDY to {priors.archive}: {text}{then}"


def series_wanted(priors: Priors, current: CurrentStudy, s: PriorSeries) -> bool:
    """A series of a candidate prior study the rule wants (modality, regex, ``same``)."""
    if priors.modality and (s.modality or "") != priors.modality:
        return False
    if priors.series and not re.search(priors.series, s.description or ""):
        return False
    if "Modality" in priors.same and (s.modality or "") != (current.modality or ""):
        return False
    if "BodyPartExamined" in priors.same and (s.body_part or "").upper() != (current.body_part or "").upper():
        return False
    return True


def _study_fits(priors: Priors, current: CurrentStudy, study: PriorStudy) -> bool:
    if study.study_uid == current.study_uid:
        return False
    if study.patient_id is not None and study.patient_id != current.patient_id:
        return False
    if current.study_date is None or study.study_date is None:
        return False  # the window cannot be judged: no prior by guesswork
    since, until = window(priors, current.study_date)
    if until is not None and study.study_date > until:
        return False
    return since is None or study.study_date >= since


def merge(local: Iterable[PriorStudy], remote: Iterable[PriorStudy]) -> list[PriorStudy]:
    """One candidate per study UID; a series held locally is marked so (the local copy wins)."""
    studies: dict[str, PriorStudy] = {}
    for study in [*local, *remote]:
        known = studies.get(study.study_uid)
        if known is None:
            studies[study.study_uid] = study
            continue
        series = {s.series_uid: s for s in known.series}
        for s in study.series:
            series.setdefault(s.series_uid, s)
        studies[study.study_uid] = replace(
            known,
            patient_id=known.patient_id or study.patient_id,
            study_date=known.study_date or study.study_date,
            series=tuple(series.values()),
        )
    return list(studies.values())


def choose(priors: Priors, current: CurrentStudy, candidates: Sequence[PriorStudy]) -> Selection:
    """The ``count`` most recent qualifying studies, each with its wanted series only."""
    fitting = []
    for study in candidates:
        if not _study_fits(priors, current, study):
            continue
        wanted = tuple(s for s in study.series if series_wanted(priors, current, s))
        if wanted:
            fitting.append(replace(study, series=wanted))
    # Newest first; among equal dates a study held here first (nothing to fetch), then by UID.
    fitting.sort(key=lambda s: (s.study_date or date.min, s.local, s.study_uid), reverse=True)
    chosen = tuple(fitting[: priors.count])
    shortfall = None
    if len(chosen) < priors.count:
        since, until = window(priors, current.study_date)
        where = (
            "the current study has no Study Date"
            if current.study_date is None
            else f"dated {since or 'any time'}..{until}"
        )
        shortfall = (
            f"{len(chosen)} of {priors.count} prior(s) found ({priors.modality or 'any modality'}, "
            f"{where}{', series ' + repr(priors.series) if priors.series else ''})"
        )
    return Selection(wanted=priors.count, chosen=chosen, shortfall=shortfall)


# -- where the candidates come from --------------------------------------------------------


def current_study(conn: Connection, study_id: int, series_uid: str | None) -> CurrentStudy:
    """The job's study, from the index; its input series ``series_uid`` (None: the study's
    largest acquired series) gives the Modality and Body Part ``same`` compares with."""
    row = conn.execute(
        select(t.studies.c.study_uid, t.studies.c.study_date, t.patients.c.patient_id, t.patients.c.issuer)
        .join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
        .where(t.studies.c.id == study_id)
    ).one()
    modality = body_part = None
    which = select(t.series.c.modality, t.series.c.body_part)
    if series_uid:
        s = conn.execute(which.where(t.series.c.series_uid == series_uid)).first()
    else:
        s = conn.execute(
            which.join(t.instances, t.instances.c.series_fk == t.series.c.id)
            .where(t.series.c.study_fk == study_id, t.instances.c.role.is_(None))
            .group_by(t.series.c.id)
            .order_by(func.count(t.instances.c.id).desc(), t.series.c.id)
            .limit(1)
        ).first()
    if s is not None:
        modality, body_part = s.modality, s.body_part
    return CurrentStudy(
        row.study_uid, row.patient_id, parse_da(row.study_date), modality, body_part, row.issuer or ""
    )


def local_priors(conn: Connection, current: CurrentStudy) -> list[PriorStudy]:
    """The other studies of the patient this node holds (acquired or retrieved as priors;
    never an AI output)."""
    rows = conn.execute(
        select(
            t.studies.c.study_uid,
            t.studies.c.study_date,
            t.series.c.series_uid,
            t.series.c.modality,
            t.series.c.description,
            t.series.c.body_part,
            func.count(t.instances.c.id),
        )
        .join(t.patients, t.patients.c.id == t.studies.c.patient_fk)
        .join(t.series, t.series.c.study_fk == t.studies.c.id)
        .join(t.instances, t.instances.c.series_fk == t.series.c.id)
        .where(
            t.patients.c.patient_id == current.patient_id,
            t.patients.c.issuer == current.issuer,
            t.studies.c.study_uid != current.study_uid,
            t.instances.c.current.is_(True),
            or_(t.instances.c.role.is_(None), t.instances.c.role == PRIOR),
        )
        .group_by(t.studies.c.id, t.series.c.id)
        .order_by(t.studies.c.study_uid, t.series.c.id)
    ).all()
    studies: dict[str, PriorStudy] = {}
    for uid, day, series_uid, modality, description, body_part, count in rows:
        study = studies.get(uid) or PriorStudy(uid, current.patient_id, parse_da(day))
        studies[uid] = replace(
            study,
            series=(
                *study.series,
                PriorSeries(series_uid, modality, description, body_part, int(count), local=True),
            ),
        )
    return list(studies.values())


def archive_priors(
    archive: Archive, priors: Priors, current: CurrentStudy, deadline: float | None = None
) -> list[PriorStudy]:
    """The archive's studies that could qualify, with their series (raises ArchiveError).

    Series are asked for only for studies inside the window, newest first, until ``count``
    studies with a wanted series are found (a patient's long history costs few queries).
    Everything ends by ``deadline`` (``time.monotonic()``): an archive that keeps answering
    "pending", or offers thousands of studies none of which has a wanted series, cannot hold
    the job past its rule's timeout.
    """
    q = query(priors, current)
    matches = [m for m in archive.find_studies(q, deadline) if keep_study(m, q)]
    candidates = [
        PriorStudy(m.study_uid, m.patient_id, parse_da(m.study_date))
        for m in matches
        if m.study_uid and m.study_uid != current.study_uid
    ]
    candidates = [c for c in candidates if _study_fits(priors, current, c)]
    candidates.sort(key=lambda c: (c.study_date or date.min, c.study_uid), reverse=True)
    out: list[PriorStudy] = []
    found = 0
    for asked, study in enumerate(candidates):
        if deadline is not None and time.monotonic() >= deadline:
            raise ArchiveError(
                f"the series of {len(candidates)} candidate studies could not all be asked for within "
                f"{priors.timeout_seconds:g} s ({asked} were, none with a wanted series)"
            )
        series = tuple(
            PriorSeries(s.series_uid, s.modality, s.description, s.body_part, s.instance_count)
            for s in archive.find_series(study.study_uid, priors.modality, deadline)
        )
        out.append(replace(study, series=series))
        if any(series_wanted(priors, current, s) for s in series):
            found += 1
            if found >= priors.count:
                break
    return out


def job_prior_records(conn: Connection, job_id: int) -> list[dict[str, object]]:
    """The priors a job used, for its provenance records: per series its study, archive,
    retrieval time and every current instance's SOP Instance UID and sha256 (as stored)."""
    rows = conn.execute(
        select(t.job_priors).where(t.job_priors.c.job_fk == job_id).order_by(t.job_priors.c.id)
    ).all()
    out: list[dict[str, object]] = []
    for row in rows:
        instances = conn.execute(
            select(t.instances.c.sop_uid, t.instances.c.sop_class_uid, t.instances.c.sha256)
            .join(t.series, t.series.c.id == t.instances.c.series_fk)
            .where(t.series.c.series_uid == row.series_uid, t.instances.c.current.is_(True))
            .order_by(t.instances.c.instance_number.asc().nulls_first(), t.instances.c.id)
        ).all()
        out.append(
            {
                "study_uid": row.study_uid,
                "series_uid": row.series_uid,
                "study_date": row.study_date,
                "archive": row.archive,
                "retrieved_at": row.retrieved_at,
                "instances": [
                    {"sop_uid": i.sop_uid, "sop_class_uid": i.sop_class_uid, "sha256": i.sha256}
                    for i in instances
                ],
            }
        )
    return out


def prior_references(records: Iterable[Mapping[str, Any]]) -> tuple[PriorReference, ...]:
    """:func:`job_prior_records` as the references a pipeline writes into every output."""
    return tuple(
        PriorReference(
            study_uid=str(r["study_uid"]),
            series_uid=str(r["series_uid"]),
            instances=tuple((str(i["sop_class_uid"]), str(i["sop_uid"])) for i in r["instances"]),
            study_date=str(r["study_date"]) if r.get("study_date") else None,
            archive=str(r["archive"]) if r.get("archive") else None,
        )
        for r in records
    )
