"""What a pipeline receives and returns. Pipelines know nothing of sockets or SQL."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

#: The rule's gate, applied to QC figures and validation problems → (action, reasons);
#: action is "release", "hold" or "shadow". Injected by the node (pipelines never import
#: policies), so the verdict a pipeline writes into its report is the rule's verdict.
GatePolicy = Callable[[Mapping[str, float], Sequence[str]], tuple[str, tuple[str, ...]]]


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

    job_id: int
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


@dataclass(frozen=True)
class RunEnvironment:
    """What a run needs from the node: where to write, which UID root, which version."""

    workdir: Path
    uid_root: str = "2.25."
    node_version: str = "0.0"
    #: The node's AE title, written as Station Name of the node's Contributing Equipment
    #: item so the node recognises its own outputs when a PACS sends them back.
    node_ae_title: str | None = None


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
