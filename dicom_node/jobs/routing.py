"""Routing a ready study by the policy: what the study holds → which jobs to make.

The node builds the policy engine's view of a study from its index (modality, Series
Description, body part, calling/called AE, and the routing tags it keeps per instance);
an attribute the index does not keep is read from the series' first header, once. The
engine decides; this module turns the chosen rules into job plans, each with the rule's
gate, QC limits, options and selected series frozen into the job: one plan per rule, or,
for a rule with ``select: {each: true}``, one per series it takes (the same plan each time,
on its own series).

Instances the node wrote itself (role ``own-output``) and priors it retrieved from an
archive (role ``prior``) are not part of the view; series
another AI node made are marked, and a rule sees them only with ``ai_outputs: accept``. A
destination whose AE title is the AE the study came from is left out of the plan unless
the rule says ``return_to_sender: true`` (the plan names what was left out, for the audit).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import ColumnElement, Connection, func, or_, select

from dicom_node.db import schema as t
from dicom_node.ingest.origin import OWN_OUTPUT, PRIOR
from pipelines.base import EACH_SERIES_OPTION
from policies.engine import Decision, RuleVerdict, SeriesView, StudyView, decide, fits_select
from policies.loader import LoadedPolicy, PolicyError, load_policy
from policies.model import FALLBACK_OPTION, Rule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobPlan:
    rule: str
    pipeline: str
    destinations: list[str]
    gate: str
    qc_policy: dict[str, Any]
    options: dict[str, Any]
    series_uid: str | None
    #: The job's input includes series another AI node made (rule ``ai_outputs: accept``).
    include_ai_outputs: bool = False
    #: (destination, AE title) left out because that AE sent the study.
    skipped_destinations: tuple[tuple[str, str], ...] = ()
    #: What runs if the pipeline refuses the input (the rule's ``fallback``; frozen into the
    #: job's options unless ``nothing``: see :mod:`dicom_node.jobs.fallback`).
    fallback: str = "nothing"
    #: The rule's ``priors`` (frozen into the job; the job starts in ``fetching-priors``).
    priors: dict[str, Any] | None = None
    #: The rule's ``urgency`` (``normal``, ``urgent`` or ``offpeak``).
    urgency: str = "normal"


@dataclass
class _SeriesRow:
    uid: str
    modality: str | None
    description: str | None
    body_part: str | None
    instances: int
    tags: dict[str, Any]
    first_path: Path
    _header: Any = field(default=None, repr=False)

    def attribute(self, keyword: str) -> Any:
        if keyword in self.tags and self.tags[keyword] not in (None, ""):
            return self.tags[keyword]
        if self._header is None:
            try:
                self._header = dcmread(self.first_path, stop_before_pixels=True)
            except Exception:  # unreadable: treat the attribute as absent
                self._header = {}
        value = self._header.get(keyword) if hasattr(self._header, "get") else None
        return value if value is None else getattr(value, "value", value)


def not_own_output() -> ColumnElement[bool]:
    """Instances that are neither the node's own outputs sent back to it nor priors it
    retrieved (those never become a job's input by themselves)."""
    return or_(t.instances.c.role.is_(None), t.instances.c.role.not_in((OWN_OUTPUT, PRIOR)))


def acquired_only() -> ColumnElement[bool]:
    """Instances a scanner or a person made (no AI output of any node)."""
    return t.instances.c.role.is_(None)


def study_view(conn: Connection, study_id: int, data_dir: Path) -> StudyView:
    """The engine's view of a study, from the index (current instances only)."""
    study = conn.execute(
        select(t.studies.c.study_uid, t.studies.c.source_ae).where(t.studies.c.id == study_id)
    ).one()
    called = conn.execute(
        select(t.instances.c.called_ae).where(t.instances.c.study_fk == study_id).limit(1)
    ).scalar()
    rows = conn.execute(
        select(
            t.series.c.series_uid,
            t.series.c.modality,
            t.series.c.description,
            t.series.c.body_part,
            func.count(t.instances.c.id),
            func.min(t.instances.c.id),
            func.count(t.instances.c.role),
        )
        .join(t.instances, t.instances.c.series_fk == t.series.c.id)
        .where(
            t.series.c.study_fk == study_id,
            t.instances.c.current.is_(True),
            not_own_output(),
        )
        .group_by(t.series.c.id)
        .order_by(t.series.c.id)
    ).all()
    series = []
    for uid, modality, description, body_part, count, first_id, ai_count in rows:
        first = conn.execute(
            select(t.instances.c.tags, t.instances.c.path).where(t.instances.c.id == first_id)
        ).one()
        row = _SeriesRow(
            uid, modality, description, body_part, int(count), dict(first.tags or {}), data_dir / first.path
        )
        series.append(
            SeriesView(
                uid, modality, description, body_part, int(count), row.attribute, made_by_ai=ai_count > 0
            )
        )
    return StudyView(study.study_uid, study.source_ae, called, tuple(series))


def _selected_series(rule: Rule, study: StudyView, verdict: RuleVerdict) -> list[str | None]:
    """The series the rule's jobs take, one job each: with ``select: {each: true}`` every
    series the engine found (:attr:`RuleVerdict.each_series`); otherwise one, the largest
    series that fits ``select`` among those that met the match's series conditions (all, if
    it set none), else the matched one (None: the pipeline chooses)."""
    if rule.per_series:
        return list(verdict.each_series)
    if rule.select is None:
        return [verdict.series_uid]
    # never a series the match's series conditions refused (a full-dose series beside the
    # low-dose one a CTDIvol condition met): among those that met them, when it set any
    meeting = set(verdict.meeting)
    fitting = [
        s for s in study.series if fits_select(rule.select, s) and (not meeting or s.series_uid in meeting)
    ]
    return [max(fitting, key=lambda s: s.instances).series_uid if fitting else verdict.series_uid]


class PolicyRouter:
    """Holds the active policy (reloadable) and plans jobs for ready studies."""

    def __init__(
        self,
        loaded: LoadedPolicy | None,
        data_dir: Path,
        destination_aes: Mapping[str, str] | None = None,
        archives: set[str] | None = None,
    ) -> None:
        self._loaded = loaded
        #: The configured archives' names, which a rule's priors must name (None: unchecked).
        self.archives = archives
        self.data_dir = data_dir
        #: Destination name → AE title (to keep a study from going back to its sender).
        self.destination_aes = dict(destination_aes or {})
        self._lock = threading.Lock()

    @property
    def loaded(self) -> LoadedPolicy | None:
        with self._lock:
            return self._loaded

    def replace(self, loaded: LoadedPolicy | None) -> None:
        with self._lock:
            self._loaded = loaded

    def reload(self, path: Path, destinations: set[str]) -> LoadedPolicy:
        """Load ``path``; on success it becomes the active policy. Raises PolicyError."""
        loaded = load_policy(path, destinations, self.archives)
        self.replace(loaded)
        return loaded

    def decide(self, conn: Connection, study_id: int) -> tuple[StudyView, Decision | None]:
        view = study_view(conn, study_id, self.data_dir)
        loaded = self.loaded
        return view, (decide(loaded.policy, view) if loaded is not None else None)

    def accepts_ai_outputs(self) -> bool:
        """Does any rule of the active policy take series another AI node made?"""
        loaded = self.loaded
        return loaded is not None and any(r.ai_outputs == "accept" for r in loaded.policy.rules)

    def _destinations(self, rule: Rule, sender: str | None) -> tuple[list[str], tuple[tuple[str, str], ...]]:
        """The rule's destinations, less those that are the study's sender (unless allowed)."""
        if rule.return_to_sender or not sender:
            return list(rule.destinations), ()
        kept, skipped = [], []
        for name in rule.destinations:
            ae = self.destination_aes.get(name)
            if ae is not None and ae.strip() == sender.strip():
                skipped.append((name, ae))
            else:
                kept.append(name)
        return kept, tuple(skipped)

    def plan(self, conn: Connection, study_id: int) -> tuple[StudyView, Decision | None, list[JobPlan]]:
        view, decision = self.decide(conn, study_id)
        if decision is None:
            return view, None, []
        plans = []
        for v in decision.chosen:
            destinations, skipped = self._destinations(v.rule, view.calling_ae)
            rule_view = view
            if v.rule.ai_outputs == "ignore":
                rule_view = replace(view, series=tuple(s for s in view.series if not s.made_by_ai))
            # one plan per series the rule takes (one, unless it says select: {each: true})
            for series_uid in _selected_series(v.rule, rule_view, v):
                plans.append(
                    JobPlan(
                        rule=v.rule.name,
                        pipeline=v.rule.pipeline,
                        destinations=list(destinations),
                        gate=v.rule.gate,
                        qc_policy=v.rule.qc.model_dump(),
                        options=_job_options(v.rule),
                        series_uid=series_uid,
                        include_ai_outputs=v.rule.ai_outputs == "accept",
                        skipped_destinations=skipped,
                        fallback=v.rule.fallback,
                        priors=v.rule.priors.model_dump(mode="json") if v.rule.priors else None,
                        urgency=v.rule.urgency,
                    )
                )
        return view, decision, plans


def _job_options(rule: Rule) -> dict[str, Any]:
    """The rule's options as a job carries them: with its fallback, when it has one."""
    options: dict[str, Any] = dict(rule.options)
    if rule.fallback != "nothing":
        options[FALLBACK_OPTION] = rule.fallback
    if rule.per_series:  # the job's series is the only one its pipeline may take
        options[EACH_SERIES_OPTION] = True
    return options


__all__ = ["JobPlan", "PolicyError", "PolicyRouter", "acquired_only", "not_own_output", "study_view"]
