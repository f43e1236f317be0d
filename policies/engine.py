"""Deciding: which rules a study matches (with every condition's result, for ``explain``),
and whether an output may leave (the QC gate).

The engine sees plain data: a :class:`StudyView` built by the node from its index (and,
for attributes the index does not keep, the series' first header). It never imports the
node and never evaluates text as code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from policies.model import Comparison, Gate, Match, Policy, QcGates, Rule, Select, SeriesConditions


@dataclass(frozen=True)
class SeriesView:
    series_uid: str
    modality: str | None
    description: str | None
    body_part: str | None
    instances: int
    #: Value of a DICOM attribute (by keyword) in the series, or None when absent.
    attribute: Callable[[str], Any]
    #: Another AI node made this series (rules with ``ai_outputs: ignore`` do not see it).
    made_by_ai: bool = False


@dataclass(frozen=True)
class StudyView:
    study_uid: str
    calling_ae: str | None
    called_ae: str | None
    series: tuple[SeriesView, ...]


@dataclass(frozen=True)
class Check:
    """One condition of one rule: what was asked, whether it held, and what was seen."""

    condition: str
    passed: bool
    seen: str


@dataclass(frozen=True)
class RuleVerdict:
    rule: Rule
    matched: bool
    checks: tuple[Check, ...]
    #: The series that met the series conditions (the one the rule is about).
    series_uid: str | None
    #: A rule with ``select: {each: true}`` that matched: every series it takes, one job
    #: each, in the study's order (empty for a rule that makes one job per study).
    each_series: tuple[str, ...] = ()
    #: A matching rule with series-level ``match`` conditions: every series that met them
    #: (a one-job-per-study ``select`` chooses among these; empty: the match asked nothing
    #: of a series).
    meeting: tuple[str, ...] = ()

    @property
    def deciding(self) -> Check | None:
        """The first failed condition; for a matching rule, its last condition."""
        for check in self.checks:
            if not check.passed:
                return check
        return self.checks[-1] if self.checks else None


@dataclass(frozen=True)
class Decision:
    verdicts: tuple[RuleVerdict, ...]
    chosen: tuple[RuleVerdict, ...]


def _compare(c: Comparison, value: Any) -> tuple[bool, str]:
    if value is None or value == "":
        return False, f"{c.keyword} absent"
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(c.value, int | float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False, f"{c.keyword} = {value!r} (not a number)"
        ops: dict[str, Callable[[float, float], bool]] = {
            "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b,
            ">": lambda a, b: a > b,
            ">=": lambda a, b: a >= b,
            "==": lambda a, b: a == b,
            "!=": lambda a, b: a != b,
        }
        return ops[c.op](number, float(c.value)), f"{c.keyword} = {number:g}"
    text = str(value).strip()
    if c.op not in ("==", "!="):
        return False, f"{c.keyword}: {c.op} needs a number"
    equal = text == str(c.value)
    return (equal if c.op == "==" else not equal), f"{c.keyword} = {text!r}"


def _series_checks(cond: SeriesConditions, s: SeriesView, prefix: str = "") -> list[Check]:
    checks = []
    if cond.modality is not None:
        checks.append(
            Check(
                f"{prefix}modality in {list(cond.modality)}",
                (s.modality or "").upper() in {m.upper() for m in cond.modality},
                f"{s.modality}",
            )
        )
    if cond.body_part is not None:
        checks.append(
            Check(
                f"{prefix}body part in {list(cond.body_part)}",
                (s.body_part or "").upper() in {b.upper() for b in cond.body_part},
                f"{s.body_part}",
            )
        )
    if cond.series_description is not None:
        checks.append(
            Check(
                f"{prefix}series description ~ /{cond.series_description}/",
                re.search(cond.series_description, s.description or "") is not None,
                repr(s.description or ""),
            )
        )
    localizer = _is_localizer(s)
    for c in cond.attributes:
        if localizer and c.keyword != "ImageType":
            # a topogram's CTDIvol, kVp or thickness are its own, not the acquisition's: a
            # low-dose rule must not match a full-dose CT by its scout
            checks.append(
                Check(f"{prefix}{c.describe()}", False, "a localizer (its figures are not the scan's)")
            )
            continue
        ok, seen = _compare(c, s.attribute(c.keyword))
        checks.append(Check(f"{prefix}{c.describe()}", ok, seen))
    return checks


def _is_localizer(s: SeriesView) -> bool:
    """Whether the series is a localizer, scout or topogram (by its Image Type)."""
    image_type = s.attribute("ImageType")
    values = [image_type] if isinstance(image_type, str) else list(image_type or ())
    return bool({str(v).strip().upper() for v in values} & {"LOCALIZER", "SCOUT"})


def fits_select(select: Select | None, s: SeriesView) -> bool:
    """Whether series ``s`` meets a rule's ``select`` conditions (no ``select``: any series)."""
    if select is None:
        return True
    return (select.modality is None or (s.modality or "") in select.modality) and (
        select.series_description is None
        or re.search(select.series_description, s.description or "") is not None
    )


def _match_checks(m: Match, s: SeriesView) -> list[Check]:
    """The series-level conditions of a rule's ``match`` (``any_of``: one alternative) on ``s``."""
    own = _series_checks(m, s, prefix=f"series {s.series_uid}: ")
    if m.any_of:
        alternatives = [
            _series_checks(alt, s, prefix=f"series {s.series_uid}: any_of[{i}] ")
            for i, alt in enumerate(m.any_of)
        ]
        ok_alt = next((a for a in alternatives if all(c.passed for c in a)), None)
        if ok_alt is not None:
            own = [*own, *ok_alt]
        else:
            seen = "; ".join(f"{c.condition} → {c.seen}" for a in alternatives for c in a)
            own = [*own, Check(f"series {s.series_uid}: one of {len(m.any_of)} alternatives", False, seen)]
    return own


def _each_series(
    rule: Rule, checks: list[Check], meeting: list[tuple[SeriesView, list[Check]]]
) -> RuleVerdict:
    """The verdict of a rule with ``select: {each: true}`` whose study conditions held: it
    takes every series of ``meeting`` (those that met its series conditions, each with its
    checks) that fits ``select`` and is not a localizer, and names the first (with its
    checks); taking none is a failed condition (the rule does not match)."""
    taken: list[tuple[SeriesView, list[Check]]] = []
    left = []
    for s, own in meeting:
        if _is_localizer(s):
            left.append(f"{s.series_uid}: a localizer")
        elif not fits_select(rule.select, s):
            left.append(f"{s.series_uid}: {s.modality} {s.description or ''!r} does not fit select")
        else:
            taken.append((s, own))
    if not taken:
        condition = "select.each: a series meeting the match and select conditions, not a localizer"
        seen = "; ".join(left) or "the study has no series"
        return RuleVerdict(rule, False, (*checks, Check(condition, False, seen)), None)
    first, own = taken[0]
    return RuleVerdict(
        rule,
        True,
        tuple(checks + own) or (Check("no conditions", True, "every study"),),
        first.series_uid,
        tuple(s.series_uid for s, _ in taken),
    )


def evaluate_rule(rule: Rule, study: StudyView) -> RuleVerdict:
    if rule.ai_outputs == "ignore" and any(s.made_by_ai for s in study.series):
        acquired = tuple(s for s in study.series if not s.made_by_ai)
        if not acquired:
            seen = f"{len(study.series)} series, all made by another AI node"
            return RuleVerdict(rule, False, (Check("a series not made by an AI node", False, seen),), None)
        study = replace(study, series=acquired)
    m = rule.match
    checks: list[Check] = []
    if m.calling_ae is not None:
        checks.append(
            Check(
                f"calling AE in {list(m.calling_ae)}",
                (study.calling_ae or "") in m.calling_ae,
                f"{study.calling_ae}",
            )
        )
    if m.called_ae is not None:
        checks.append(
            Check(
                f"called AE in {list(m.called_ae)}",
                (study.called_ae or "") in m.called_ae,
                f"{study.called_ae}",
            )
        )
    descriptions = [s.description or "" for s in study.series]
    if m.has_series is not None:
        present = any(re.search(m.has_series, d) for d in descriptions)
        checks.append(Check(f"study has a series ~ /{m.has_series}/", present, f"{descriptions}"))
    if m.lacks_series is not None:
        present = any(re.search(m.lacks_series, d) for d in descriptions)
        checks.append(Check(f"study lacks any series ~ /{m.lacks_series}/", not present, f"{descriptions}"))
    if not all(c.passed for c in checks):
        return RuleVerdict(rule, False, tuple(checks), None)
    if not m.series_conditions():
        if rule.per_series:
            return _each_series(rule, checks, [(s, []) for s in study.series])
        return RuleVerdict(rule, True, tuple(checks) or (Check("no conditions", True, "every study"),), None)
    meeting: list[tuple[SeriesView, list[Check]]] = []
    best: list[Check] | None = None
    for s in study.series:
        own = _match_checks(m, s)
        if all(c.passed for c in own):
            meeting.append((s, own))  # the rule is about the first; a select chooses among all
        elif best is None or sum(c.passed for c in own) > sum(c.passed for c in best):
            best = own
    if meeting and rule.per_series:
        return _each_series(rule, checks, meeting)
    if meeting:
        first, own = meeting[0]
        return RuleVerdict(
            rule, True, tuple(checks + own), first.series_uid, meeting=tuple(s.series_uid for s, _ in meeting)
        )
    if best is None:
        best = [Check("a series meeting the series conditions", False, "the study has no series")]
    return RuleVerdict(rule, False, tuple(checks + best), None)


def decide(policy: Policy, study: StudyView) -> Decision:
    """Every rule's verdict (priority order) and the rule(s) the policy's mode chooses."""
    verdicts = tuple(evaluate_rule(rule, study) for rule in policy.ordered())
    matched = tuple(v for v in verdicts if v.matched)
    chosen = matched[:1] if policy.mode == "first-match" else matched
    return Decision(verdicts, chosen)


@dataclass(frozen=True)
class GateVerdict:
    """``release`` (deliver), ``hold`` (review queue) or ``shadow`` (record, send nothing)."""

    action: str
    reasons: tuple[str, ...]


_SIGMA_KEYS = ("mean calibrated sigma in body", "mean uncertainty")


@dataclass(frozen=True)
class QcLimit:
    """One QC limit a rule sets: the figures it reads (in order of preference), the largest
    value that passes, how the gate's reasons name it, and its UCUM unit (None: the
    figure's own, e.g. σ in the output's units)."""

    figures: tuple[str, ...]
    maximum: float
    label: str
    unit: str | None


def qc_limits(qc: QcGates) -> tuple[QcLimit, ...]:
    """The limits ``qc`` sets (one left unset is no limit): what the gate judges against."""
    table: tuple[tuple[tuple[str, ...], float | None, str, str | None], ...] = (
        (("suspect fraction",), qc.max_suspect_fraction, "suspect fraction", "1"),
        (("suspect volume",), qc.max_suspect_volume_ml, "suspect volume", "mL"),
        (("largest suspect region",), qc.max_suspect_region_ml, "largest suspect region", "mL"),
        (_SIGMA_KEYS, qc.max_mean_sigma, "mean calibrated sigma", None),
        (
            ("mean sigma at bone/air interfaces",),
            qc.max_interface_sigma_hu,
            "mean sigma at bone/air interfaces",
            "[hnsf'U]",
        ),
    )
    return tuple(QcLimit(keys, limit, label, unit) for keys, limit, label, unit in table if limit is not None)


#: How a reason writes a limit's unit after the number.
_UNIT_SUFFIX = {"mL": " mL", "[hnsf'U]": " HU"}


def gate_output(
    gate: Gate,
    qc: QcGates,
    figures: Mapping[str, float],
    validation_errors: list[str] | None = None,
    destination_problems: list[str] | None = None,
) -> GateVerdict:
    """Apply a rule's gate and QC thresholds to a finished job's QC figures.

    ``destination_problems`` (why a destination would refuse the outputs) always hold the
    job, whatever the rule says about validation: no rule can send a TPS what it refuses.
    """
    reasons: list[str] = list(destination_problems or [])
    if qc.hold_on_failed_validation and validation_errors:
        reasons += [f"output validation failed: {e}" for e in validation_errors]
    for limit in qc_limits(qc):
        value = next((figures[k] for k in limit.figures if k in figures), None)
        unit = _UNIT_SUFFIX.get(limit.unit or "", "")
        if value is None:  # a limit the rule sets but the pipeline did not report: fail closed
            reasons.append(f"{limit.label} not reported by the pipeline (the rule sets a limit)")
        elif value > limit.maximum:
            reasons.append(f"{limit.label} {value:g}{unit} > {limit.maximum:g}{unit}")
    if gate == "shadow":
        return GateVerdict("shadow", ("shadow mode: run and audit, send nothing", *reasons))
    if gate == "review":
        return GateVerdict("hold", ("the rule requires review", *reasons))
    return (
        GateVerdict("hold", tuple(reasons))
        if reasons
        else GateVerdict("release", ("QC within the rule's limits",))
    )
