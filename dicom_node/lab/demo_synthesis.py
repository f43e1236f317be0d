"""``dicom-node demo --pipeline synthesis``: the missing FLAIR of a brain MR study, end to end.

The simulated MR scanner sends a SIMULATED brain study with a T1w and a T2w but no FLAIR
(:mod:`models.sim.synthesis`: white-matter lesions, the FLAIR kept aside for evaluation only)
to a real ``dicom-node serve`` running the shipped policy; its ``brain-mr-missing-flair``
rule runs ``synthesis`` and holds the result for review, as the rule says. The rest is
:func:`dicom_node.lab.demo_review.run_reviewed_demo`: the held job and its figures, the
approval, the delivery (the synthetic FLAIR, its σ and hallucination maps, the SEG, the SR)
and what Orthanc holds under the study. Every figure is computed on simulated data and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from dicom_node.lab.demo_home import DemoHome
from dicom_node.lab.demo_review import ReviewedStudy, run_reviewed_demo
from dicom_node.lab.simulate_synthesis import SynthesisSpec, write_synthesis_study

#: The simulated study the demo sends (a held-out seed of the synthesis evaluation).
SEED = 30001


def _prepare(out: Path) -> ReviewedStudy:
    sim, written = write_synthesis_study(out, SynthesisSpec(seed=SEED))
    return ReviewedStudy(
        study_uid=written.study_uid,
        files=[p for series in written.acquired.values() for p in series.files],
        calling_ae="MR_SCANNER",
        sent=(
            f"a SIMULATED brain MR study without FLAIR (T1w and T2w, {sim.field_strength_t:g} T, "
            f"{len(sim.lesions)} white-matter lesions)"
        ),
        model="synthesis-t1w-t2w-to-flair",
        figures_title="what the reviewer sees (SIMULATED study)",
        shows_figure=lambda name: True,
    )


def run_synthesis_demo(
    claimed: DemoHome,
    console: Console,
    *,
    config: Callable[[str, int], str],
    policy: str,
    timeout: float = 600,
) -> tuple[str, int, int, str, int, float]:
    """Run the demo; returns (study UID, instances sent, job id, PACS, instances in the PACS,
    seconds). ``config`` gives the node's config for the PACS's AE title and port."""
    return run_reviewed_demo(
        claimed, console, label="synthesis", prepare=_prepare, config=config, policy=policy, timeout=timeout
    )
