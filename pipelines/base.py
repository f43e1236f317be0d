"""What a pipeline receives and returns. Pipelines know nothing of sockets or SQL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


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


@dataclass(frozen=True)
class OutputInstance:
    """One file a pipeline wants delivered."""

    sop_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


@dataclass(frozen=True)
class PipelineResult:
    outputs: tuple[OutputInstance, ...]


class Pipeline(Protocol):
    """A pipeline turns a study snapshot into output files in ``workdir``."""

    name: str
    version: str

    def run(self, study: StudyInput, workdir: Path) -> PipelineResult: ...


class PipelineError(Exception):
    """A failure a pipeline can explain (bad input, unsupported series): the job fails
    with this message as its reason."""
