"""The prognosis pipeline end to end on SIMULATED patients: images in, forecast out, scored.

``python -m dicom_node.lab.prognosis_chain --patients 10 --out DIR``

The forecast-level evaluation (:mod:`models.evaluation.prognosis_eval`) hands the model the
simulator's true extents. This one scores the chain a site runs: each patient's four visits
are written as DICOM studies (:mod:`dicom_node.lab.simulate_prognosis`), visits 1–2 are the
priors, registered to visit 3's T1c by the node's registration step
(:func:`dicom_node.jobs.prior_registration.compute_registrations`), and the ``prognosis``
pipeline segments every visit from its images and forecasts visit 4 at its true interval.
A job the pipeline refuses (e.g. visits whose extents do not overlap) is counted as
refused, the safe outcome, and left out of the figures. The predicted extent (the written
probability map, ``p ≥ 0.5``) is scored against the
simulator's truth at visit 4 brought into visit 3's scanner frame, next to "no change" at
the same level (the current extent the pipeline segmented) and the segmentation's own Dice
at visit 3 (how much of the error is reading the images). Test seeds are the forecast-level
evaluation's (:data:`models.evaluation.prognosis_eval.TEST_SEEDS`): the same patients.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from dicom_node.jobs.prior_registration import compute_registrations, registered_priors
from dicom_node.lab.simulate_prognosis import PrognosisSpec, write_prognosis_patient
from models.evaluation.brain_tumour_seg import dice
from models.evaluation.prognosis_eval import TEST_SEEDS
from models.sim.prognosis import TumourLabel, to_visit_frame
from pipelines.base import InputInstance, InputRefused, RunEnvironment, StudyInput
from pipelines.prognosis import PrognosisPipeline, prognosis
from pipelines.provenance import PriorReference
from pipelines.volume import load_series
from pipelines.writers import KIND_EXTENT, KIND_PROBABILITY, kind_of
from policies.model import Priors

SIMULATED = (
    "SIMULATED data: models.sim.prognosis patients written as DICOM, run through the prognosis pipeline"
)


def _instance(path: Path) -> InputInstance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InputInstance(
        str(ds.SOPInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPClassUID),
        "1.2.840.10008.1.2.1",
        path,
        "",
    )


def _on_volume(ds: pydicom.Dataset, volume: Any, segment: int | None = None) -> np.ndarray:
    """A multi-frame object's frames (of one segment, for a SEG) on the volume's slices, by
    Image Position (Patient) along the slice normal (frames may be stored in any order)."""
    normal = volume.normal
    slice_at = {round(float(np.dot(s.position, normal)), 2): k for k, s in enumerate(volume.slices)}
    pixels = np.asarray(ds.pixel_array)
    pixels = pixels.reshape(-1, *pixels.shape[-2:])
    out = np.zeros(volume.array.shape, pixels.dtype)
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        if (
            segment is not None
            and int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != segment
        ):
            continue
        at = round(
            float(np.dot([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], normal)), 2
        )
        out[slice_at[at]] = pixels[i]
    return out


def run_patient(seed: int, work: Path, pipeline: PrognosisPipeline, size: int = 128) -> dict[str, Any]:
    """One patient through the chain; its figures."""
    patient, visits = write_prognosis_patient(
        work / f"sim-{seed}", PrognosisSpec(visits=4, seed=seed, size=size)
    )
    current, follow = patient.visits[2], patient.visits[3]
    horizon = follow.day - current.day
    instances = tuple(_instance(p) for s in visits[2].series.values() for p in s.files)
    study = StudyInput(
        seed,
        visits[2].study_uid,
        1,
        instances,
        series_uid=visits[2].series["t1c"].series_uid,
        options={"horizons_days": horizon},
    )
    files: dict[str, list[Path]] = {}
    references = []
    for v in visits[:2]:
        for key in ("t1c", "flair"):
            s = v.series[key]
            files[s.series_uid] = list(s.files)
            refs = tuple((str(i.sop_class_uid), str(i.sop_uid)) for i in map(_instance, s.files))
            references.append(PriorReference(v.study_uid, s.series_uid, refs, v.study_date))
    computed = compute_registrations(study, Priors(archive="lab", count=2, registration="rigid"), files)
    env = RunEnvironment(work / f"job-{seed}", priors=tuple(references))
    env = RunEnvironment(
        env.workdir, priors=env.priors, registered_priors=registered_priors(computed, env.priors, files)
    )
    env.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        result = pipeline.run(study, env)
    except InputRefused as refused:  # the safe outcome: no prediction at all
        return {
            "seed": seed,
            "refused": "; ".join(refused.reasons),
            "treated": patient.params.treatment is not None,
        }
    seconds = time.monotonic() - started
    t1c_volume = load_series([pydicom.dcmread(i.path) for i in instances if i.series_uid == study.series_uid])
    probability = now_seg = None
    for out in result.outputs:
        ds = pydicom.dcmread(out.path)
        if kind_of(ds) == KIND_PROBABILITY:
            probability = _on_volume(ds, t1c_volume).astype(np.float32)
        elif kind_of(ds) == KIND_EXTENT:
            now_seg = _on_volume(ds, t1c_volume, segment=2) > 0  # segment 2: the current extent
    if probability is None or now_seg is None:
        raise RuntimeError(f"seed {seed}: the pipeline wrote no probability map or extent SEG")
    # truth in visit 3's scanner frame, in the pipeline's slice order (its T1c volume's)
    whole = (follow.labels != TumourLabel.NONE).astype(np.float32)
    truth_next = to_visit_frame(whole, current.pose, patient.spacing_mm, order=1) >= 0.5
    now_truth = (current.labels != TumourLabel.NONE).astype(np.float32)
    truth_now = to_visit_frame(now_truth, current.pose, patient.spacing_mm, order=1) >= 0.5
    t1c = t1c_volume.array
    image = current.images["t1c"]
    same = np.corrcoef(t1c.ravel(), image.ravel())[0, 1]
    reversed_ = np.corrcoef(t1c.ravel(), image[::-1].ravel())[0, 1]
    if reversed_ > same:
        truth_next, truth_now = truth_next[::-1], truth_now[::-1]
    predicted = probability >= 0.5
    qc = next(iter(result.qc.values()))
    key = f"+{horizon} d"
    volume = float(qc[f"predicted whole-tumour volume {key}"])
    low, high = (
        float(qc[f"predicted volume 90% interval low {key}"]),
        float(qc[f"predicted volume 90% interval high {key}"]),
    )
    voxel_ml = float(np.prod(patient.spacing_mm)) / 1000.0
    true_volume = follow.volumes_ml["whole_tumour"]
    return {
        "seed": seed,
        "horizon_days": horizon,
        "dice_model": dice(predicted, truth_next),
        "dice_no_change": dice(now_seg, truth_next),
        "segmentation_dice_now": dice(now_seg, truth_now),
        "volume_ml": volume,
        "true_volume_ml": true_volume,
        "volume_error_ml": abs(volume - true_volume),
        "no_change_volume_error_ml": abs(float(now_seg.sum()) * voxel_ml - true_volume),
        "interval_covers": low <= true_volume <= high,
        "seconds": seconds,
        "treated": patient.params.treatment is not None,
    }


def summarise(all_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for r in all_rows if "refused" not in r]

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows])) if rows else math.nan

    return {
        "patients": len(all_rows),
        "refused": len(all_rows) - len(rows),
        "dice_model": mean("dice_model"),
        "dice_no_change": mean("dice_no_change"),
        "segmentation_dice_now": mean("segmentation_dice_now"),
        "volume_error_ml": mean("volume_error_ml"),
        "no_change_volume_error_ml": mean("no_change_volume_error_ml"),
        "interval_coverage_90": float(np.mean([r["interval_covers"] for r in rows])),
        "seconds_per_patient": mean("seconds"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--size", type=int, default=128, help="rows and columns over the 240 mm field (128: 1.875 mm pixels)"
    )
    parser.add_argument("--model", type=Path, default=None, help="a prognosis-growth version directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline = prognosis(args.model)
    rows = []
    for seed in TEST_SEEDS[: args.patients]:
        row = run_patient(seed, args.out / "work", pipeline, args.size)
        rows.append(row)
        if "refused" in row:
            print(f"seed {seed}: refused: {row['refused']}", flush=True)
            continue
        print(
            f"seed {seed}: Dice model {row['dice_model']:.3f}, no change {row['dice_no_change']:.3f}, "
            f"segmentation now {row['segmentation_dice_now']:.3f}, {row['seconds']:.0f} s",
            flush=True,
        )
    summary = summarise(rows)
    (args.out / "chain.json").write_text(
        json.dumps({"data": SIMULATED, "summary": summary, "rows": rows}, indent=1)
    )
    print(f"{SIMULATED}; {args.size} x {args.size} pixels, {240.0 / args.size:.3g} mm")
    for k, v in summary.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) and not math.isnan(v) else f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
