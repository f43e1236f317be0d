"""What a study's completeness signals say, beyond the idle timer: MPPS and expected counts.

The idle timer (:mod:`dicom_node.ingest.readiness`) knows only that instances stopped
arriving. Two signals can say more, and sooner:

- **MPPS.** A Modality Performed Procedure Step that ended COMPLETED lists the SOP
  Instance UIDs the scanner made (:mod:`dicom_node.ingest.mpps` keeps them). The study is
  complete when every instance its ended steps list is stored and indexed, and none of
  its steps is still IN PROGRESS. A step that lists nothing is no evidence: it leaves the
  study to the timer. A step ended DISCONTINUED counts as completed (``ready-now``), is
  left to the timer (``wait-for-timer``, the default) or keeps the timer from making the
  study ready until a later step of the study completes (``hold``), as
  ``[completeness] mpps_discontinued`` says.
- **Expected counts.** A ``[[callers]]`` entry with ``expected_instances`` and/or
  ``expected_series``: the study's open version is complete once it holds that many
  acquired instances (series) from that caller (the study's first sender).

Only acquired instances count (``instances.role`` NULL; the node's own outputs and other
AI outputs never do). A step counts once: when its study is made ready (by a signal or by
the timer) after the step ended with all of its instances stored, the step is *settled*,
so an instance arriving later waits for its own signal or the timer instead of riding on
an old one (:func:`settle_steps`).

:func:`assess` is the one place the signals are read: readiness acts on it and
``dicom-node studies`` shows its ``waiting`` reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Connection, distinct, func, select, update

from dicom_node.config import NodeConfig
from dicom_node.db import schema as t


class StepStatus(StrEnum):
    """Performed Procedure Step Status (0040,0252)."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


class Signal(StrEnum):
    """What said a study is complete, when the idle timer did not."""

    MPPS = "mpps"
    EXPECTED_COUNTS = "expected-counts"


@dataclass(frozen=True)
class Assessment:
    """What the signals say about one study's open version.

    Attributes
    ----------
    signal
        The signal that says the open version is complete; None when none does.
    detail
        Why (``signal`` set) — counts and UIDs only, never patient data.
    waiting
        What the study waits for when it is not complete (shown by ``dicom-node studies``).
    held
        A step ended DISCONTINUED and ``mpps_discontinued = "hold"``: the timer must not
        make the study ready.
    new_instances
        Acquired instances in the open version (0: nothing to make ready).
    """

    signal: Signal | None
    detail: str
    waiting: str
    held: bool = False
    new_instances: int = 0

    @property
    def complete(self) -> bool:
        return self.signal is not None


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _stored(conn: Connection, sop_uids: set[str]) -> set[str]:
    """The acquired instances among ``sop_uids`` that are in the index."""
    found: set[str] = set()
    uids = sorted(sop_uids)
    for start in range(0, len(uids), 500):  # keep each IN list well under SQLite's limit
        found.update(
            conn.execute(
                select(t.instances.c.sop_uid)
                .where(t.instances.c.sop_uid.in_(uids[start : start + 500]), t.instances.c.role.is_(None))
                .distinct()
            ).scalars()
        )
    return found


def _mpps(conn: Connection, config: NodeConfig, study_uid: str) -> tuple[str | None, str | None, bool]:
    """(detail when the steps say complete, what they wait for, held) — (None, None, False)
    when the study has no unsettled step."""
    steps = conn.execute(
        select(t.mpps.c.sop_uid, t.mpps.c.status, t.mpps.c.referenced)
        .where(t.mpps.c.study_uid == study_uid, t.mpps.c.settled_at.is_(None))
        .order_by(t.mpps.c.id)
    ).all()
    if not steps:
        return None, None, False
    mode = config.completeness.mpps_discontinued
    running = [s.sop_uid for s in steps if s.status == StepStatus.IN_PROGRESS]
    discontinued = [s.sop_uid for s in steps if s.status == StepStatus.DISCONTINUED]
    counted = [
        s
        for s in steps
        if s.status == StepStatus.COMPLETED or (s.status == StepStatus.DISCONTINUED and mode == "ready-now")
    ]
    held = mode == "hold" and bool(discontinued)
    if running:
        return None, f"MPPS {', '.join(running)} in progress", held
    if not counted:
        if held:
            return None, f"held: MPPS {', '.join(discontinued)} discontinued (mpps_discontinued = hold)", held
        return None, None, False  # discontinued, left to the timer
    listed = {uid for s in counted for uid in s.referenced}
    if not listed:
        return None, "MPPS completed without listing its instances", held
    missing = listed - _stored(conn, listed)
    if missing:
        return None, f"MPPS lists {_plural(len(missing), 'instance')} not received", held
    uids = ", ".join(s.sop_uid for s in counted)
    return f"MPPS {uids} ended; all {_plural(len(listed), 'listed instance')} stored", None, held


def assess(conn: Connection, config: NodeConfig, study_uid: str) -> Assessment:
    """What the completeness signals say about ``study_uid``'s open version (read-only)."""
    study = conn.execute(
        select(t.studies.c.id, t.studies.c.open_version, t.studies.c.source_ae).where(
            t.studies.c.study_uid == study_uid
        )
    ).one_or_none()
    new_instances = series = 0
    if study is not None:
        new_instances, series = conn.execute(
            select(
                func.count(distinct(t.instances.c.sop_uid)), func.count(distinct(t.instances.c.series_fk))
            ).where(
                t.instances.c.study_fk == study.id,
                t.instances.c.study_version == study.open_version,
                t.instances.c.role.is_(None),
            )
        ).one()
    reasons: list[str] = []
    mpps_detail, mpps_waiting, held = _mpps(conn, config, study_uid)
    if mpps_detail is not None:
        return Assessment(Signal.MPPS, mpps_detail, "", held, new_instances)
    if mpps_waiting is not None:
        reasons.append(mpps_waiting)
    caller = config.caller(study.source_ae) if study is not None and study.source_ae else None
    if caller is not None and (caller.expected_instances or caller.expected_series):
        counts = (
            ("instances", caller.expected_instances, new_instances),
            ("series", caller.expected_series, series),
        )
        short = [f"{have} of {want} expected {what}" for what, want, have in counts if want and have < want]
        if not short and new_instances:
            got = f"{_plural(new_instances, 'instance')} in {_plural(series, 'series', 'series')}"
            detail = f"{got} from {caller.ae_title} reach the expected counts"
            return Assessment(Signal.EXPECTED_COUNTS, detail, "", held, new_instances)
        reasons += short
    if not reasons:
        reasons.append(f"idle timer ({config.stable_seconds_for(study.source_ae if study else None):g} s)")
    return Assessment(None, "", "; ".join(reasons), held, new_instances)


def settle_steps(conn: Connection, study_uid: str, at: float | None = None) -> list[str]:
    """Mark the steps the study's newest ready version used up; returns their MPPS UIDs.

    Called once a version of the study has been made ready (by a signal or the timer).
    Settled: every DISCONTINUED step, and every COMPLETED one whose listed instances are all
    stored. A step still IN PROGRESS, or COMPLETED with instances still to come, stays
    open: when those arrive, it signals again for the version they join.
    """
    steps = conn.execute(
        select(t.mpps.c.id, t.mpps.c.sop_uid, t.mpps.c.status, t.mpps.c.referenced).where(
            t.mpps.c.study_uid == study_uid,
            t.mpps.c.settled_at.is_(None),
            t.mpps.c.status != StepStatus.IN_PROGRESS.value,
        )
    ).all()
    completed = {uid for s in steps if s.status == StepStatus.COMPLETED for uid in s.referenced}
    stored = _stored(conn, completed) if completed else set()
    done = [s for s in steps if s.status != StepStatus.COMPLETED or set(s.referenced) <= stored]
    if done:
        conn.execute(
            update(t.mpps)
            .where(t.mpps.c.id.in_([s.id for s in done]))
            .values(settled_at=time.time() if at is None else at)
        )
    return [s.sop_uid for s in done]


def waiting_reasons(conn: Connection, config: NodeConfig, study_uids: list[str]) -> dict[str, str]:
    """What each study still receiving waits for (``dicom-node studies``): study UID → reason."""
    reasons = {}
    for study_uid in study_uids:
        verdict = assess(conn, config, study_uid)
        reasons[study_uid] = f"nothing: {verdict.detail}" if verdict.complete else verdict.waiting
    return reasons
