"""The policy file's schema: rules that say which studies go to which pipeline, where the
results go, and what gates them. Validated with pydantic (unknown keys refused); no
``eval`` anywhere — conditions are data, compared by the engine.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

Gate = Literal["auto", "review", "shadow"]
#: What runs when a job's input is outside the model's declared domain (the job is ``refused``).
Fallback = Literal["forward", "classical", "nothing"]
#: The job option that carries the rule's fallback, and the one a fallback job names the
#: refused job by (reserved: a rule's ``options`` may not set them).
FALLBACK_OPTION = "fallback"
FALLBACK_OF_OPTION = "fallback_of"
Op = Literal["<", "<=", ">", ">=", "==", "!="]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


def _names(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list | tuple)
        or not items
        or any(not isinstance(v, str) or not v.strip() for v in items)
    ):
        raise ValueError(f"expected a name or a non-empty list of names, got {value!r}")
    return tuple(v.strip() for v in items)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Comparison(_Strict):
    """``{keyword: CTDIvol, op: "<", value: 5}`` — any DICOM attribute by keyword."""

    keyword: str
    op: Op
    value: float | str

    @field_validator("keyword")
    @classmethod
    def _known_keyword(cls, value: str) -> str:
        if tag_for_keyword(value) is None:
            raise ValueError(
                f"{value!r} is not a DICOM attribute keyword (e.g. CTDIvol, KVP, SliceThickness)"
            )
        return value

    @model_validator(mode="after")
    def _ordering_needs_a_number(self) -> Comparison:
        if self.op in ("<", "<=", ">", ">=") and isinstance(self.value, str):
            raise ValueError(
                f"value: {self.op!r} compares numbers; write {self.value} without quotes"
                if _is_number(self.value)
                else f"value: {self.op!r} compares numbers, got text {self.value!r}"
            )
        return self

    def describe(self) -> str:
        return f"{self.keyword} {self.op} {self.value}"


class SeriesConditions(_Strict):
    """Conditions one series of the study must meet (all of them)."""

    modality: tuple[str, ...] | None = None
    body_part: tuple[str, ...] | None = None
    #: Regular expression searched in Series Description (add ``(?i)`` for case-insensitive).
    series_description: str | None = None
    attributes: tuple[Comparison, ...] = ()

    _names = field_validator("modality", "body_part", mode="before")(_names)
    _regex = field_validator("series_description")(_regex)


class Match(SeriesConditions):
    """When a rule applies: study-level conditions, plus one series meeting the series-level
    conditions and, when ``any_of`` is given, at least one of its alternatives."""

    calling_ae: tuple[str, ...] | None = None
    called_ae: tuple[str, ...] | None = None
    #: The study must hold a series whose description matches / must not hold one.
    has_series: str | None = None
    lacks_series: str | None = None
    any_of: tuple[SeriesConditions, ...] = ()

    _ae = field_validator("calling_ae", "called_ae", mode="before")(_names)
    _present = field_validator("has_series", "lacks_series")(_regex)

    def series_conditions(self) -> bool:
        """Does the rule ask anything of a series (not only of the study)?"""
        return bool(
            self.modality or self.body_part or self.series_description or self.attributes or self.any_of
        )


class Select(_Strict):
    """Which series the pipeline processes (default: the largest of its kind, one job per
    study); with ``each: true``, every series that fits, one job per series."""

    modality: tuple[str, ...] | None = None
    series_description: str | None = None
    #: One job per series instead of one per study: every series of the study that meets
    #: the rule's series-level ``match`` conditions and these (never a localizer, an AI
    #: output or the node's own output), e.g. both reconstructions (two kernels) of one
    #: acquisition, or the halves of an acquisition a scanner split into two series. Not for
    #: pipelines that read several series of the study together (synthesis, prognosis).
    each: bool = False

    _names = field_validator("modality", mode="before")(_names)
    _regex = field_validator("series_description")(_regex)

    def conditions(self) -> bool:
        """Does it name the series it takes (a modality or a description)?"""
        return self.modality is not None or self.series_description is not None


class QcGates(_Strict):
    """Hold the output for review when the model's own evidence says it may be wrong."""

    #: Fraction of voxels in suspect (possible hallucination) regions.
    max_suspect_fraction: float | None = Field(None, ge=0, le=1)
    #: Volume of all suspect regions together, millilitres (diffuse trouble).
    max_suspect_volume_ml: float | None = Field(None, ge=0)
    #: Volume of the largest connected suspect region, millilitres (one invented or erased
    #: structure; unlike the total it does not grow with the length of the scan).
    max_suspect_region_ml: float | None = Field(None, ge=0)
    #: Mean calibrated σ of the output (in its units, e.g. HU) inside the body.
    max_mean_sigma: float | None = Field(None, gt=0)
    #: Mean calibrated σ, HU, at bone/air interfaces of a synthetic CT: the dose-relevant
    #: uncertainty (where the MR cannot tell bone from air and a dose calculation is most
    #: sensitive to the HU).
    max_interface_sigma_hu: float | None = Field(None, gt=0)
    #: Any failed validation of the written objects holds the job (always on).
    hold_on_failed_validation: bool = True


#: The attributes ``priors.same`` may name: what a prior must share with the current study
#: (PatientID always; BodyPartExamined and Modality compared with the rule's series).
PRIOR_SAME_KEYS = ("PatientID", "BodyPartExamined", "Modality")


class Priors(_Strict):
    """Earlier studies of the same patient a rule asks for, fetched from an archive before the
    job runs (see docs/priors.md, "Priors in policies").

    ``{archive: pacs, count: 2, same: [PatientID, BodyPartExamined], modality: MR,
    series: "T1.*post|T1C", within_days: 1100, min_interval_days: 30}``
    """

    #: The ``[archives.NAME]`` of the config to query and retrieve from.
    archive: str
    #: How many prior studies (the most recent that qualify).
    count: int = Field(1, ge=1, le=10)
    #: Attributes a prior must share with the current study; PatientID always.
    same: tuple[str, ...] = ("PatientID",)
    #: Modality of the prior (the study-level query key and each prior series').
    modality: str | None = None
    #: Regular expression searched in the prior's Series Description (``(?i)`` for any case).
    series: str | None = None
    #: A prior is at most this many days older than the current study.
    within_days: int | None = Field(None, ge=1)
    #: ... and at least this many days older (0: any earlier date, the same day included).
    min_interval_days: int = Field(0, ge=0)
    #: How long the job waits in ``fetching-priors`` for the archive, seconds.
    timeout_seconds: float = Field(300, gt=0, le=86400)
    #: Fewer than ``count`` priors (archive down, failures, none found, a failed quality
    #: check): ``run`` with what arrived, or ``refuse`` the job with the reason.
    on_missing: Literal["run", "refuse"] = "run"
    #: Register each prior series to the job's input series (and write a Spatial
    #: Registration object): ``none``, ``rigid`` or ``affine``.
    registration: Literal["none", "rigid", "affine"] = "none"
    #: The registration quality check's body-mask Dice limit (default: the node's, 0.85).
    min_dice: float | None = Field(None, gt=0, le=1)

    _regex = field_validator("series")(_regex)

    @field_validator("archive")
    @classmethod
    def _archive_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name a configured archive ([archives.NAME] in the config)")
        return value.strip()

    @field_validator("modality")
    @classmethod
    def _one_modality(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Z0-9_]{1,16}", value):
            raise ValueError(f"{value!r}: one DICOM modality, e.g. MR or CT")
        return value

    @field_validator("same", mode="before")
    @classmethod
    def _same_keys(cls, value: object) -> tuple[str, ...]:
        names = _names(value) or ()
        unknown = [n for n in names if n not in PRIOR_SAME_KEYS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: priors.same compares {', '.join(PRIOR_SAME_KEYS)}")
        return ("PatientID", *[n for n in dict.fromkeys(names) if n != "PatientID"])

    @model_validator(mode="after")
    def _window(self) -> Priors:
        if self.within_days is not None and self.min_interval_days > self.within_days:
            raise ValueError(
                f"min_interval_days {self.min_interval_days} is more than within_days "
                f"{self.within_days}: no study could qualify"
            )
        return self

    def describe(self) -> str:
        window = f"{self.min_interval_days}-{self.within_days if self.within_days else '∞'} days earlier"
        what = " ".join(p for p in (self.modality, f"series /{self.series}/" if self.series else None) if p)
        return (
            f"{self.count} prior(s) {what + ' ' if what else ''}from {self.archive}, {window}, "
            f"same {', '.join(self.same)}; wait {self.timeout_seconds:g} s, then "
            f"{'run with what arrived' if self.on_missing == 'run' else 'refuse'}"
            + (f"; register {self.registration}" if self.registration != "none" else "")
        )


class Rule(_Strict):
    name: str
    priority: int = 0
    match: Match = Match()
    select: Select | None = None
    pipeline: str
    destinations: tuple[str, ...] = ()
    gate: Gate = "auto"
    qc: QcGates = QcGates()
    #: Options passed to the pipeline (e.g. a gate fire drill: {inject_hallucination_hu: 80}).
    options: dict[str, float | int | str | bool] = {}
    #: When the pipeline refuses the input (outside its model's declared input domain, the
    #: job ends ``refused``): ``nothing`` (default) — nothing more; ``classical`` — the shipped
    #: non-AI pipeline for the task runs instead (restoration → denoise-classical; a pipeline
    #: without one, e.g. sct, behaves as ``nothing`` and the refusal says so); ``forward`` —
    #: the refused series goes unchanged to this rule's destinations.
    fallback: Fallback = "nothing"
    #: Series another AI node made (Synthesizing Equipment, Synthetic Data YES, another
    #: dicom-node): ``ignore`` (default) — the rule neither matches on them nor processes
    #: them, so an AI output never feeds an AI model by accident; ``accept`` to use them.
    ai_outputs: Literal["ignore", "accept"] = "ignore"
    #: Allow a destination whose AE title is the AE the study came from (a PACS that
    #: forwards studies and takes the results back). Off: such a destination is skipped,
    #: audited, so a study is never bounced back to its sender by accident.
    return_to_sender: bool = False
    #: Earlier studies of the patient to fetch before the job runs (None: none).
    priors: Priors | None = None
    #: How soon the job must run (``priority`` decides which rule matches; this decides when
    #: its job runs): ``urgent`` jobs are taken before every ``normal`` one queued (e.g. a
    #: synthetic CT a planning physicist waits for, behind a morning's low-dose CTs), and
    #: their outputs are sent before those of normal jobs. Oldest first within each.
    #: ``offpeak`` jobs run only inside ``[workers] offpeak_hours`` (default 19:00-07:00),
    #: after every other queued job: research and batch work that must not take the cores
    #: from the day's clinical jobs.
    urgency: Literal["normal", "urgent", "offpeak"] = "normal"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ValueError(
                f"{value!r}: a rule name is 1-64 letters, digits, '-', '_' or '.' (no spaces); "
                "it appears in job records and the audit trail"
            )
        return value

    @field_validator("pipeline")
    @classmethod
    def _known_pipeline(cls, value: str) -> str:
        from pipelines.registry import pipeline_names

        if value not in pipeline_names():
            raise ValueError(f"unknown pipeline {value!r} (available: {', '.join(pipeline_names())})")
        return value

    @field_validator("options")
    @classmethod
    def _no_reserved_option(
        cls, value: dict[str, float | int | str | bool]
    ) -> dict[str, float | int | str | bool]:
        reserved = sorted({FALLBACK_OPTION, FALLBACK_OF_OPTION} & set(value))
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)}: reserved for the node (say `fallback:` on the rule itself)"
            )
        return value

    @field_validator("destinations", mode="before")
    @classmethod
    def _dest_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _sends_somewhere(self) -> Rule:
        if self.gate != "shadow" and not self.destinations:
            raise ValueError(
                "destinations: a rule that is not gate: shadow must name at least one destination"
            )
        return self

    @model_validator(mode="after")
    def _each_names_its_series(self) -> Rule:
        named = self.select is not None and self.select.conditions()
        if self.per_series and not (named or self.match.series_conditions()):
            raise ValueError(
                "select.each: one job per series needs conditions that say which series — a "
                "series-level match condition (modality, body_part, series_description, "
                "attributes, any_of) or select's modality / series_description; as written it "
                "would make a job for every series of the study, dose reports and screen "
                "captures included"
            )
        return self

    @property
    def per_series(self) -> bool:
        """One job per series (``select: {each: true}``) rather than one per study."""
        return self.select is not None and self.select.each


class Policy(_Strict):
    version: Literal[1] = 1
    #: first-match: the highest-priority matching rule alone; all-matches: every match.
    mode: Literal["first-match", "all-matches"]
    rules: tuple[Rule, ...] = ()

    def ordered(self) -> list[Rule]:
        """Rules by priority (highest first), file order among equals."""
        return sorted(self.rules, key=lambda r: -r.priority)
