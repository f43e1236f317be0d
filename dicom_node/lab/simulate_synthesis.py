"""Simulated multi-contrast brain MR study with one contrast kept aside (contrast synthesis).

The pixels come from :func:`models.sim.synthesis.make_study`; the slice headers are the paired
MR / CT simulator's (:func:`dicom_node.lab.simulate.mr_slice`), completed for inversion recovery
(FLAIR). One study, one Frame of Reference and one slice geometry for every series; every Study
and Series Description says ``SIMULATED`` and every Image Comments says so. Synthetic Data is not
set: the acquired series stand in for a scanner's (as the other simulators' do), and a node
ignores Synthetic Data YES series as another AI's output.

Layout::

    OUT/t1w/MR*.dcm, OUT/t2w/MR*.dcm, ...     the acquired series (what a scanner sends)
    OUT/reference/flair/MR*.dcm               the missing contrast(s): evaluation only
    OUT/truth.json                            seed, field, missing contrasts, lesions, tumour
    OUT/truth.npz                             brain mask, tissue / lesion / tumour labels (0: none)

Arrays in ``truth.npz`` are in instance order (index 0 = instance 1 = most superior slice), the
order the DICOM series is written in.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.lab.simulate import SeriesHeader, SimulatedStudy, mr_slice
from dicom_node.lab.simulate_prognosis import _window
from models.sim.mrct import SpinEcho
from models.sim.prognosis import InversionRecovery
from models.sim.synthesis import CONTRASTS, SimulatedMultiContrast, make_study

#: Series per contrast: (series number, description stem).
SERIES: dict[str, tuple[int, str]] = {
    "t1w": (1, "SIMULATED T1W SE AXIAL"),
    "t2w": (2, "SIMULATED T2W SE AXIAL"),
    "flair": (3, "SIMULATED FLAIR AXIAL"),
    "pd": (4, "SIMULATED PD AXIAL"),
}
#: Contrasts that may be kept aside as the reference.
MISSABLE: tuple[str, ...] = ("flair", "t2w")
STUDY_TIME = dt.time(10, 15)


@dataclass(frozen=True)
class SynthesisSpec:
    """One simulated multi-contrast study (:func:`make_study`) and what to keep aside.

    Attributes
    ----------
    seed : int
        Study seed.
    size, slices : int
        Rows/columns and slices.
    slice_thickness_mm, fov_mm : float
        Slice thickness (= spacing) and in-plane field of view.
    field_strength_t : float or None
        1.5 or 3; drawn per seed when None.
    missing : tuple of str
        Contrasts written under ``reference/`` instead of as acquired series (``()``: none).
    pd : bool
        Also write the proton-density series (acquired, or reference if listed in ``missing``).
    """

    seed: int = 0
    size: int = 128
    slices: int = 32
    slice_thickness_mm: float = 3.0
    fov_mm: float = 240.0
    field_strength_t: float | None = None
    missing: tuple[str, ...] = ("flair",)
    pd: bool = False


@dataclass(frozen=True)
class SynthesisStudy:
    """What was written.

    Attributes
    ----------
    study_uid, frame_of_reference_uid : str
        Shared by every series, reference included.
    acquired : dict
        :class:`SimulatedStudy` per acquired contrast (``OUT/<contrast>/``).
    reference : dict
        :class:`SimulatedStudy` per missing contrast (``OUT/reference/<contrast>/``).
    truth_json, truth_npz : pathlib.Path
        The truth files.
    directory : pathlib.Path
        ``OUT``.
    """

    study_uid: str
    frame_of_reference_uid: str
    acquired: dict[str, SimulatedStudy]
    reference: dict[str, SimulatedStudy]
    truth_json: Path
    truth_npz: Path
    directory: Path


def check_spec(spec: SynthesisSpec) -> None:
    """Raise ``ValueError`` (one line) for a spec that cannot be written."""
    unknown = [m for m in spec.missing if m not in MISSABLE and m != "pd"]
    if unknown:
        raise ValueError(
            f"cannot keep {', '.join(unknown)} aside: choose from {', '.join(MISSABLE)} (or none)"
        )
    if "pd" in spec.missing and not spec.pd:
        raise ValueError("pd listed as missing but the PD series is not written (set pd=True)")
    if spec.field_strength_t is not None and float(spec.field_strength_t) not in (1.5, 3.0):
        raise ValueError(f"field strength {spec.field_strength_t} T is not simulated: choose 1.5 or 3")


def _complete_header(ds: Dataset, protocol: SpinEcho | InversionRecovery, reference: bool) -> None:
    """What :func:`mr_slice` (a plain spin echo) does not say."""
    if isinstance(protocol, InversionRecovery):
        ds.ScanningSequence = ["SE", "IR"]
        ds.InversionTime = f"{protocol.ti_ms:g}"
        ds.SequenceName = "SIM_IR_FLAIR"
    ds.ImageComments = "SIMULATED image (dicom-node models.sim.synthesis), not an acquisition." + (
        " Reference contrast kept aside for evaluating synthesis only." if reference else ""
    )


def _lesion_json(sim: SimulatedMultiContrast) -> list[dict[str, Any]]:
    """Lesions with centres in stack, DICOM patient and instance-order voxel coordinates."""
    out = []
    thickness = sim.spacing_mm[0]
    slices = sim.shape[0]
    for les in sim.lesions:
        x, y, z = les.centre_mm
        k = slices - 1 - les.centre_voxel[0]  # instance index (0 = most superior)
        out.append(
            {
                "id": les.id,
                "centre_mm_stack": [round(x, 3), round(y, 3), round(z, 3)],
                "centre_patient_mm": [round(x, 3), round(y, 3), round(-k * thickness, 3)],
                "centre_voxel_instance_order": [
                    round(k, 3),
                    round(les.centre_voxel[1], 3),
                    round(les.centre_voxel[2], 3),
                ],
                "diameter_mm": round(les.diameter_mm, 3),
                "axes_mm": [round(a, 3) for a in les.axes_mm],
                "volume_mm3": round(les.volume_mm3, 3),
                "n_voxels": les.n_voxels,
                "t1_visible": les.t1_visible,
                "location": les.location,
                "t1_ms": round(les.t1_ms, 1),
                "t2_ms": round(les.t2_ms, 1),
                "pd": round(les.pd, 4),
                "contrast_vs_wm": {k2: round(v, 4) for k2, v in les.contrast.items()},
            }
        )
    return out


def write_synthesis_study(
    out_dir: Path,
    spec: SynthesisSpec,
    *,
    patient_id: str = "SIM-SYN-0001",
) -> tuple[SimulatedMultiContrast, SynthesisStudy]:
    """Simulate one study and write its acquired series, its reference series and the truth.

    Parameters
    ----------
    out_dir : pathlib.Path
        Root directory (created).
    spec : SynthesisSpec
        What to simulate and what to keep aside.
    patient_id : str, optional
        Patient ID of every instance.

    Returns
    -------
    tuple
        ``(simulation, written)``: the simulated study (truth included) and what was written.

    Raises
    ------
    ValueError
        An impossible spec (:func:`check_spec`).
    """
    check_spec(spec)
    sim = make_study(
        spec.seed,
        size=spec.size,
        slices=spec.slices,
        slice_thickness_mm=spec.slice_thickness_mm,
        fov_mm=spec.fov_mm,
        field_strength_t=spec.field_strength_t,
    )
    thickness, pixel, _ = sim.spacing_mm
    when = dt.datetime.combine(dt.date.today(), STUDY_TIME)
    base = SeriesHeader(
        study_uid=generate_uid(),
        series_uid="",
        frame_uid=generate_uid(),
        patient_id=patient_id,
        patient_name="SIMULATED^SYNTHESIS",
        study_description=f"SIMULATED MR BRAIN MULTI-CONTRAST {sim.field_strength_t:g}T",
        body_part="BRAIN",
        station_name="SIMULATED MR",
        pixel_spacing_mm=pixel,
        slice_thickness_mm=thickness,
    )
    # Instance 1 is the most superior slice (z = 0, then down), as the other simulated series.
    brain = sim.brain[::-1]
    acquired: dict[str, SimulatedStudy] = {}
    reference: dict[str, SimulatedStudy] = {}
    for name in CONTRASTS:
        if name == "pd" and not spec.pd:
            continue
        is_reference = name in spec.missing
        number, stem = SERIES[name]
        protocol = sim.protocols[name]
        header_protocol = SpinEcho(name, protocol.tr_ms, protocol.te_ms)
        description = f"{stem} {thickness:g}mm" + (" REFERENCE EVAL ONLY" if is_reference else "")
        header = replace(
            base,
            series_uid=generate_uid(),
            series_number=number + (100 if is_reference else 0),
            series_description=description,
        )
        volume = sim.images[name][::-1]
        window = _window(volume, brain)
        series_dir = out_dir / "reference" / name if is_reference else out_dir / name
        series_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for k in range(volume.shape[0]):
            ds = mr_slice(volume[k], k, header, header_protocol, sim.field_strength_t, window, when)
            _complete_header(ds, protocol, is_reference)
            path = series_dir / f"MR{k + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        study = SimulatedStudy(base.study_uid, header.series_uid, base.frame_uid, tuple(files))
        (reference if is_reference else acquired)[name] = study

    tumour = sim.tumour
    truth = {
        "simulated": True,
        "generator": "dicom-node models.sim.synthesis.make_study",
        "seed": sim.seed,
        "field_strength_t": sim.field_strength_t,
        "missing": list(spec.missing),
        "acquired": list(acquired),
        "reference_dirs": {name: f"reference/{name}" for name in reference},
        "shape": list(sim.shape),
        "spacing_mm": list(sim.spacing_mm),
        "study_instance_uid": base.study_uid,
        "frame_of_reference_uid": base.frame_uid,
        "series_instance_uids": {n: s.series_uid for n, s in {**acquired, **reference}.items()},
        "protocols": {n: {k: v for k, v in vars(p).items() if k != "name"} for n, p in sim.protocols.items()},
        "motion": {
            n: {"rotation_deg": round(p.rotation_deg, 4), "shift_mm": [round(v, 4) for v in p.shift_mm]}
            for n, p in sim.poses.items()
        },
        "coordinates": (
            "centre_mm_stack: LPS mm about the stack centre (T1w frame); centre_patient_mm: DICOM "
            "patient coordinates of the written series; voxel indices in instance order"
        ),
        "lesions": _lesion_json(sim),
        "tumour": None
        if tumour is None
        else {
            "centre_mm_stack": [round(v, 3) for v in tumour.centre_mm],
            "core_radius_mm": round(tumour.core_radius_mm, 3),
            "oedema_radius_mm": round(tumour.oedema_radius_mm, 3),
            "necrosis_radius_mm": round(tumour.necrosis_radius_mm, 3),
            "core_voxels": int(tumour.core.sum()),
            "oedema_voxels": int(tumour.oedema.sum()),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    truth_json = out_dir / "truth.json"
    truth_json.write_text(json.dumps(truth, indent=2) + "\n")
    truth_npz = out_dir / "truth.npz"
    np.savez_compressed(
        truth_npz,
        brain=np.ascontiguousarray(sim.brain[::-1]),
        tissue=np.ascontiguousarray(sim.tissue[::-1]),
        lesion_labels=np.ascontiguousarray(sim.lesion_labels[::-1]),
        tumour_labels=np.ascontiguousarray(
            np.zeros(sim.shape, np.uint8) if tumour is None else tumour.labels[::-1]
        ),
    )
    written = SynthesisStudy(
        study_uid=base.study_uid,
        frame_of_reference_uid=base.frame_uid,
        acquired=acquired,
        reference=reference,
        truth_json=truth_json,
        truth_npz=truth_npz,
        directory=out_dir,
    )
    return sim, written
