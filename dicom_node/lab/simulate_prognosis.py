"""Simulated brain-tumour follow-up: one DICOM MR study per visit of one simulated patient.

The pixels come from :func:`models.sim.prognosis.make_patient`; the slice headers are the
paired MR / CT simulator's (:func:`dicom_node.lab.simulate.mr_slice`), completed for
inversion recovery (FLAIR) and gadolinium (T1 post-contrast). Every visit is its own study:
the same Patient ID, its own Study Instance UID, Study Date (the visit's day) and Frame of
Reference (the head lies differently at every visit, so priors must be registered), and
every Study and Series Description says ``SIMULATED``.

Layout: ``OUT/visit-1/t1c/``, ``OUT/visit-1/flair/`` (and ``t2w/``), ``OUT/visit-2/`` ...
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.lab.simulate import SeriesHeader, SimulatedStudy, mr_slice
from models.sim.mrct import SpinEcho
from models.sim.prognosis import (
    PROTOCOLS,
    InversionRecovery,
    SimulatedPatient,
    Visit,
    make_patient,
)

#: Series written per visit: (image key and directory, series number, description).
SERIES: tuple[tuple[str, int, str], ...] = (
    ("t1c", 1, "SIMULATED T1 SE POST-CONTRAST AXIAL"),
    ("flair", 2, "SIMULATED FLAIR AXIAL"),
    ("t2w", 3, "SIMULATED T2 SE AXIAL"),
)
#: Time of day of the simulated visits.
VISIT_TIME = dt.time(9, 30)
#: Contrast agent recorded on the T1 post-contrast series.
CONTRAST_AGENT = "gadobutrol 0.1 mmol/kg (SIMULATED)"


@dataclass(frozen=True)
class PrognosisSpec:
    """One simulated patient followed over several visits (:func:`make_patient`)."""

    visits: int = 4
    seed: int = 0
    size: int = 128
    slices: int = 32
    slice_thickness_mm: float = 3.0
    fov_mm: float = 240.0
    t2w: bool = False


@dataclass(frozen=True)
class VisitStudy:
    """What was written for one visit.

    Attributes
    ----------
    visit : int
        1-based visit number.
    day : int
        Days since the first visit.
    study_date : str
        ``YYYYMMDD``.
    study_uid, frame_of_reference_uid : str
        UIDs of the visit's study and frame of reference.
    series : dict
        :class:`SimulatedStudy` per sequence (``"t1c"``, ``"flair"``, ``"t2w"``).
    directory : pathlib.Path
        ``OUT/visit-N``.
    """

    visit: int
    day: int
    study_date: str
    study_uid: str
    frame_of_reference_uid: str
    series: dict[str, SimulatedStudy]
    directory: Path


def _complete_header(ds: Dataset, name: str, protocol: SpinEcho | InversionRecovery) -> None:
    """What :func:`mr_slice` (a plain spin echo) does not say about FLAIR and post-contrast T1."""
    if isinstance(protocol, InversionRecovery):
        ds.ScanningSequence = ["SE", "IR"]
        ds.InversionTime = f"{protocol.ti_ms:g}"
        ds.SequenceName = "SIM_IR_FLAIR"
    if name == "t1c":
        ds.ContrastBolusAgent = CONTRAST_AGENT
        ds.ContrastBolusRoute = "IV"
        ds.SequenceName = "SIM_SE_T1_GD"
    ds.ImageComments = "SIMULATED image (dicom-node models.sim.prognosis), not an acquisition."


def _window(volume: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    values = volume[mask] if mask.any() else volume.ravel()
    low, high = np.percentile(values, [1.0, 99.5])
    return float(low + high) / 2.0, max(float(high - low), 1.0)


def write_visit(
    out_dir: Path,
    patient: SimulatedPatient,
    visit: Visit,
    *,
    patient_id: str,
) -> VisitStudy:
    """Write one visit as one MR study (one series per sequence) under ``out_dir``.

    Parameters
    ----------
    out_dir : pathlib.Path
        The visit's directory; series go to ``out_dir/<sequence>/``.
    patient : SimulatedPatient
        The patient the visit belongs to.
    visit : Visit
        The visit.
    patient_id : str
        Patient ID written in every instance.

    Returns
    -------
    VisitStudy
        The UIDs and files written.
    """
    when = dt.datetime.combine(visit.date, VISIT_TIME)
    thickness, pixel, _ = patient.spacing_mm
    base = SeriesHeader(
        study_uid=generate_uid(),
        series_uid="",
        frame_uid=generate_uid(),
        patient_id=patient_id,
        patient_name="SIMULATED^TUMOUR",
        study_description=f"SIMULATED MR BRAIN TUMOUR FOLLOW-UP VISIT {visit.index} (DAY {visit.day})",
        body_part="BRAIN",
        station_name="SIMULATED MR",
        pixel_spacing_mm=pixel,
        slice_thickness_mm=thickness,
    )
    written: dict[str, SimulatedStudy] = {}
    # Instance 1 is the most superior slice (z = 0, then down), as the other simulated series.
    brain = visit.brain_mask[::-1]
    for name, number, description in SERIES:
        if name not in visit.images:
            continue
        protocol = PROTOCOLS[name]
        header_protocol = SpinEcho(name, protocol.tr_ms, protocol.te_ms)
        header = replace(
            base,
            series_uid=generate_uid(),
            series_number=number,
            series_description=f"{description} {thickness:g}mm",
        )
        volume = visit.images[name][::-1]
        window = _window(volume, brain)
        series_dir = out_dir / name
        series_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for k in range(volume.shape[0]):
            ds = mr_slice(volume[k], k, header, header_protocol, patient.field_strength_t, window, when)
            _complete_header(ds, name, protocol)
            path = series_dir / f"MR{k + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        written[name] = SimulatedStudy(base.study_uid, header.series_uid, base.frame_uid, tuple(files))
    return VisitStudy(
        visit=visit.index,
        day=visit.day,
        study_date=when.strftime("%Y%m%d"),
        study_uid=base.study_uid,
        frame_of_reference_uid=base.frame_uid,
        series=written,
        directory=out_dir,
    )


def write_prognosis_patient(
    out_dir: Path,
    spec: PrognosisSpec,
    *,
    patient_id: str = "SIM-PROG-0001",
) -> tuple[SimulatedPatient, tuple[VisitStudy, ...]]:
    """Simulate one patient and write ``out_dir/visit-N/`` for every visit.

    Parameters
    ----------
    out_dir : pathlib.Path
        Root directory.
    spec : PrognosisSpec
        What to simulate.
    patient_id : str, optional
        Patient ID shared by all visits.

    Returns
    -------
    tuple
        ``(patient, visit_studies)``: the simulated patient (truth included) and what was written.
    """
    patient = make_patient(
        spec.seed,
        spec.visits,
        size=spec.size,
        slices=spec.slices,
        slice_thickness_mm=spec.slice_thickness_mm,
        fov_mm=spec.fov_mm,
        with_t2w=spec.t2w,
    )
    studies = tuple(
        write_visit(out_dir / f"visit-{visit.index}", patient, visit, patient_id=patient_id)
        for visit in patient.visits
    )
    return patient, studies
