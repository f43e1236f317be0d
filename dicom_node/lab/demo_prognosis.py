"""``dicom-node demo --pipeline prognosis``: a predicted brain-tumour follow-up, end to end.

Orthanc plays the hospital's PACS and archive: it holds three earlier visits of one SIMULATED
brain-tumour patient (:mod:`models.sim.prognosis`). The simulated MR scanner sends the fourth
visit to a real ``dicom-node serve`` running the shipped policy; its ``brain-tumour-prognosis``
rule fetches the two most recent earlier visits from Orthanc (C-GET), registers them, runs
``prognosis`` and holds the result for review, as the rule says. :func:`prepare` writes the
patient; the rest is :func:`dicom_node.lab.demo_review.run_reviewed_demo`: the held job and
its figures, the approval, the delivery and what Orthanc holds under the current study. Every
figure is computed on simulated data and says so.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.lab.demo_review import ReviewedStudy
from dicom_node.lab.simulate_prognosis import PrognosisSpec, write_prognosis_patient

#: The simulated patient the demo follows.
SEED = 5


def prepare(out: Path) -> ReviewedStudy:
    """Write the SIMULATED study under ``out``: what the demo sends and shows."""
    _, visits = write_prognosis_patient(out, PrognosisSpec(visits=4, seed=SEED))
    days = ", ".join(f"day {v.day}" for v in visits[:3])
    current = visits[3]
    return ReviewedStudy(
        study_uid=current.study_uid,
        files=[p for series in current.series.values() for p in series.files],
        calling_ae="MR_SCANNER",
        sent=f"visit 4 (day {current.day})",
        model="prognosis-growth",
        figures_title="the forecast (SIMULATED patient)",
        shows_figure=lambda name: "volume" in name or "extent" in name or "visits" in name,
        archive=[p for visit in visits[:3] for series in visit.series.values() for p in series.files],
        archived=(
            f"three earlier visits of a SIMULATED brain-tumour patient ({days}; T1 post-contrast "
            "and FLAIR each)"
        ),
    )
