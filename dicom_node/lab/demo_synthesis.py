"""``dicom-node demo --pipeline synthesis``: the missing FLAIR of a brain MR study, end to end.

The simulated MR scanner sends a SIMULATED brain study with a T1w and a T2w but no FLAIR
(:mod:`models.sim.synthesis`: white-matter lesions, the FLAIR kept aside for evaluation only)
to a real ``dicom-node serve`` running the shipped policy; its ``brain-mr-missing-flair``
rule runs ``synthesis`` and holds the result for review, as the rule says. :func:`prepare`
writes the study; the rest is :func:`dicom_node.lab.demo_review.run_reviewed_demo`: the held
job and its figures, the approval, the delivery (the synthetic FLAIR, its σ and hallucination
maps, the SEG, the SR) and what Orthanc holds under the study. Every figure is computed on
simulated data and says so.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.lab.demo_review import ReviewedStudy
from dicom_node.lab.simulate_synthesis import SynthesisSpec, write_synthesis_study

#: The simulated study the demo sends (a held-out seed of the synthesis evaluation).
SEED = 30001


def prepare(out: Path) -> ReviewedStudy:
    """Write the SIMULATED study under ``out``: what the demo sends and shows."""
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
