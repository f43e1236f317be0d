"""What a pipeline receives and returns. Pipelines know nothing of sockets or SQL."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipelines.provenance import PriorReference

#: The rule's gate, applied to QC figures and validation problems → (action, reasons);
#: action is "release", "hold" or "shadow". Injected by the node (pipelines never import
#: policies), so the verdict a pipeline writes into its report is the rule's verdict.
GatePolicy = Callable[[Mapping[str, float], Sequence[str]], tuple[str, tuple[str, ...]]]


@dataclass(frozen=True)
class GateLimit:
    """One QC limit of the rule's gate, as the report names it."""

    #: What is limited, as the gate's reasons say it (e.g. "largest suspect region").
    label: str
    #: The largest value that passes.
    maximum: float
    #: The QC figures the limit reads, in order of preference.
    figures: tuple[str, ...] = ()
    #: UCUM unit of ``maximum``; None: the unit of the figure it reads.
    unit: str | None = None


@dataclass(frozen=True)
class GateOutcome:
    """What the gate decided, as the report states it.

    ``final`` is False for the pipeline's own verdict on its QC figures alone (its report
    is then a draft); the node restates the report with its final verdict — after output
    validation and the destination checks — before the outputs are recorded, and a
    reviewer's approval writes a new report (``pipelines.writers.report``).
    """

    #: "release", "hold" or "shadow".
    action: str
    reasons: tuple[str, ...] = ()
    #: The rule's gate: "auto", "review" or "shadow" (None: not known here).
    rule_gate: str | None = None
    #: The QC limits the figures were judged against.
    limits: tuple[GateLimit, ...] = ()
    #: What holds whatever the figures say (e.g. "any output validation problem holds").
    rules: tuple[str, ...] = ()
    final: bool = True


@dataclass(frozen=True)
class InputInstance:
    """One received instance of the study snapshot a job runs on."""

    sop_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class StudyInput:
    """The fixed snapshot of a study a job was created with."""

    #: The job's id; ``dicom-node run`` gives a string naming the pipeline and the model
    #: instead (its outputs' UIDs derive from it: another pipeline never shares them).
    job_id: int | str
    study_uid: str
    study_version: int
    instances: tuple[InputInstance, ...]
    #: Options from the policy rule (e.g. a gate fire drill); pipelines ignore unknown ones.
    options: dict[str, Any] = field(default_factory=dict)
    #: The series the policy selected; None lets the pipeline choose.
    series_uid: str | None = None
    #: The rule's gate (None: no policy; outputs are released).
    gate_policy: GatePolicy | None = None


@dataclass(frozen=True)
class OutputInstance:
    """One file a pipeline wants delivered."""

    sop_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


@dataclass(frozen=True)
class ModelIdentity:
    """The model that produced an output: what the provenance record and the DICOM
    headers carry. ``weights_sha256`` is checked at load."""

    name: str
    version: str
    weights_sha256: str


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline produced, and the facts its provenance record needs."""

    outputs: tuple[OutputInstance, ...]
    #: None when no learned model was involved (``forward``).
    model: ModelIdentity | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: Quality figures per output series UID (uncertainty, hallucination burden, ...).
    qc: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Gate verdict ("auto", "review", "shadow"), once policies decide it.
    gate: str | None = None
    #: Problems found when validating the written objects (a non-empty list holds the job).
    validation_errors: tuple[str, ...] = ()
    #: Seconds each stage took, in order (empty: the pipeline has no stages to time).
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class RegisteredPrior:
    """A prior series registered to the job's input series (the node registers before the
    pipeline runs when the rule asks for ``registration``), on the input series' grid."""

    reference: PriorReference
    #: The prior's first instance, without pixels (descriptions, dates, sequence facts).
    header: Any
    #: 4×4: prior patient coordinates (LPS mm) → the input series' patient coordinates.
    matrix: Any
    #: The prior's pixels resampled on the input series' grid ``(slices, rows, columns)``.
    resampled: Any
    #: Where ``resampled`` holds the prior's data (False outside its field of view).
    fov: Any
    #: The series the prior was registered to.
    input_series_uid: str


@dataclass(frozen=True)
class RunEnvironment:
    """What a run needs from the node: where to write, which UID root, which version."""

    workdir: Path
    uid_root: str = "2.25."
    node_version: str = "0.0"
    #: The node's AE title, written as Station Name of the node's Contributing Equipment
    #: item so the node recognises its own outputs when a PACS sends them back.
    node_ae_title: str | None = None
    #: The prior series the job fetched for its rule (every output cites them).
    priors: tuple[PriorReference, ...] = ()
    #: Those registered to the input series and passing the quality check, on its grid.
    registered_priors: tuple[RegisteredPrior, ...] = ()


class Pipeline(Protocol):
    """A pipeline turns a study snapshot into output files in ``env.workdir``."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def run(self, study: StudyInput, env: RunEnvironment) -> PipelineResult: ...


class PipelineError(Exception):
    """A failure a pipeline can explain (bad input, unsupported series): the job fails
    with this message as its reason."""


#: Job option set for a rule that makes one job per series (``select: {each: true}``): the
#: job's series is the only one its pipeline may process (another job has each other one).
EACH_SERIES_OPTION = "each_series"


class InputRefused(PipelineError):
    """The input is outside the model's declared input domain (:mod:`pipelines.domain`).

    Not a failure: the job ends ``refused`` with every reason, and the policy rule's
    ``fallback`` says what runs instead. ``series_uid`` is the series that was refused.
    """

    def __init__(
        self, model: str, series_uid: str | None, reasons: Sequence[str], *, series: str | None = None
    ) -> None:
        self.model = model
        self.series_uid = series_uid
        self.reasons = tuple(reasons)
        #: How a person knows the series: its number and description (see :func:`series_label`).
        self.series = series
        named = f"{series_uid or '?'}, {series}" if series else f"{series_uid or '?'}"
        super().__init__(f"input outside the domain of {model} (series {named}): {'; '.join(self.reasons)}")


def series_label(ds: object) -> str | None:
    """``#3 'T1 SE AX'``: a series as a person finds it on the scanner or in the PACS (its
    Series Number and Description, from one instance's header); None when it has neither."""
    get = getattr(ds, "get", None)
    if get is None:
        return None
    number = str(get("SeriesNumber", "") or "").strip()
    description = str(get("SeriesDescription", "") or "").strip()
    parts = ([f"#{number}"] if number else []) + ([repr(description)] if description else [])
    return " ".join(parts) or None
