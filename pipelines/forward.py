"""``forward``: deliver the study unchanged (proves the receive → job → deliver path)."""

from __future__ import annotations

from pipelines.base import OutputInstance, PipelineResult, RunEnvironment, StudyInput


class ForwardPipeline:
    name = "forward"
    version = "1.0"

    def run(self, study: StudyInput, env: RunEnvironment) -> PipelineResult:
        return PipelineResult(
            outputs=tuple(
                OutputInstance(
                    sop_uid=i.sop_uid,
                    series_uid=i.series_uid,
                    sop_class_uid=i.sop_class_uid,
                    transfer_syntax_uid=i.transfer_syntax_uid,
                    path=i.path,
                )
                for i in study.instances
            )
        )
