"""Checks before a series goes to a treatment planning system, and on the planning MR.

A TPS takes a CT series into dose calculation: it must be CT Image Storage in Hounsfield
units, one evenly spaced stack without gaps or duplicates, on the planning MR's frame of
reference, with every attribute the IOD makes mandatory. :func:`validate_for_tps`
returns every problem it finds (empty: the series may go); :func:`validate_input_series`
does the same for the MR a synthetic CT is made from (one stack, no slice missing). Both
read the headers only, except for the pixel values the HU check needs, one file at a
time. Slice geometry is judged by :mod:`pipelines.geometry` (tolerances documented
there), as the volume loader judges it.

When ``dciodvfy`` (dicom3tools) is installed its ``Error`` lines for the first, middle
and last file are added; consistency across the series is checked here for every file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, CTImageStorage

from pipelines.geometry import Plane, planes_of, series_problems, stack_problems

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
#: Rescaled values outside this are not Hounsfield units of any tissue, air or metal
#: (air is -1000; extended-scale CT stops at about 30 000).
HU_RANGE = (-1200.0, 30000.0)
#: A body CT has air around the patient: no voxel below this means the rescale is missing.
AIR_BELOW_HU = -500.0
MAX_PROBLEMS = 20
#: dciodvfy lines that say nothing about the object: dicom3tools builds whose dictionary
#: predates Synthetic Data (0008,001C) (e.g. Debian bookworm's 1.00~20220618) call that
#: standard attribute unrecognised, and a synthetic CT must carry it (Synthetic Data YES).
#: The same builds predate the clinical-trial issuers and codes (0012,00xx) and Ethnic
#: Group Code Sequence (0010,2161), which an output copies from a trial patient's source
#: with the rest of its Patient and Study modules.
_UNRECOGNISED = "Error - Attribute with an even group number is not a recognized standard attribute - "
STALE_DCIODVFY_ERRORS = tuple(
    _UNRECOGNISED + tag
    for tag in (
        "(0x0008,0x001c)",  # Synthetic Data
        "(0x0010,0x2161)",  # Ethnic Group Code Sequence
        "(0x0012,0x0022)",  # Issuer of Clinical Trial Protocol ID
        "(0x0012,0x0023)",  # Other Clinical Trial Protocol IDs Sequence
        "(0x0012,0x0032)",  # Issuer of Clinical Trial Site ID
        "(0x0012,0x0041)",  # Issuer of Clinical Trial Subject ID
        "(0x0012,0x0043)",  # Issuer of Clinical Trial Subject Reading ID
        "(0x0012,0x0054)",  # Clinical Trial Time Point Type Code Sequence
        "(0x0012,0x0055)",  # Issuer of Clinical Trial Time Point ID
    )
)

#: Attributes a TPS needs with a value (PS3.3 Type 1, plus Patient ID and Patient
#: Position, which the IOD lets be empty but a TPS cannot plan without).
REQUIRED = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "PatientID",
    "PatientPosition",
    "ImageType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
)
#: Type 2 attributes of the CT Image IOD: present, possibly empty.
PRESENT = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "InstanceNumber",
    "Manufacturer",
    "PositionReferenceIndicator",
    "SliceThickness",
    "KVP",
    "AcquisitionNumber",
)


class _Tally:
    """Per-file problems, reported once each with how many files have them."""

    def __init__(self) -> None:
        self.files: dict[str, list[str]] = defaultdict(list)

    def add(self, problem: str, sop_uid: str) -> None:
        self.files[problem].append(sop_uid)

    def lines(self, total: int) -> list[str]:
        out = []
        for problem, uids in self.files.items():
            which = (
                f"all {total} instances" if len(uids) == total else f"{len(uids)} of {total}, first {uids[0]}"
            )
            out.append(f"{problem} ({which})")
        return out


def _read(path: Path, *, pixels: bool) -> tuple[Dataset | None, str | None]:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels), None
    except (OSError, InvalidDicomError) as exc:
        return None, f"{path.name}: cannot be read as DICOM: {exc}"


def _hu_range(ds: Dataset) -> tuple[float, float] | None:
    """Smallest and largest rescaled value of the instance (None: no decodable pixels)."""
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception:  # any decoder failure is a finding, not a crash
        return None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return float(stored.min()) * slope + intercept, float(stored.max()) * slope + intercept


def dciodvfy_errors(path: Path, executable: str = DCIODVFY, timeout: float = 60.0) -> list[str]:
    """dciodvfy's ``Error`` lines for one file (empty when it is not installed), less the
    stale-dictionary reports of :data:`STALE_DCIODVFY_ERRORS`."""
    if not (Path(executable).is_file() and os.access(executable, os.X_OK)):
        return []
    try:
        run = subprocess.run([executable, str(path)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"dciodvfy could not check {path.name}: {exc}"]
    lines = (run.stdout + run.stderr).splitlines()
    return [
        line.strip()
        for line in lines
        if line.startswith("Error") and not line.startswith(STALE_DCIODVFY_ERRORS)
    ]


def _sample(items: Sequence[Path]) -> list[Path]:
    """First, middle and last."""
    picks = sorted({0, len(items) // 2, len(items) - 1}) if items else []
    return [items[i] for i in picks]


def validate_for_tps(
    files: Sequence[Path],
    expected_frame_of_reference: str | None = None,
    *,
    dciodvfy: str | None = DCIODVFY,
    max_problems: int = MAX_PROBLEMS,
) -> list[str]:
    """Why a TPS should not receive this CT series (empty: it may be sent).

    Parameters
    ----------
    files
        Every file of the series, as it would be sent.
    expected_frame_of_reference
        The planning MR's Frame of Reference UID, which the CT must share (None: the
        series must only be consistent in itself).
    dciodvfy
        The dciodvfy executable; None skips it. Used only when installed.
    max_problems
        Stop listing after this many problems.
    """
    if not files:
        return ["the series has no instances"]
    problems: list[str] = []
    tally, attributes = _Tally(), _Tally()
    planes: list[Plane] = []
    values: dict[str, set[str]] = defaultdict(set)
    lowest, highest = np.inf, -np.inf
    total = len(files)
    for path in files:
        ds, why = _read(path, pixels=True)
        if ds is None:
            problems.append(str(why))
            continue
        sop = str(ds.get("SOPInstanceUID", path.name))
        if str(ds.get("SOPClassUID", "")) != CTImageStorage:
            name = UID(str(ds.get("SOPClassUID", ""))).name or "no SOP Class UID"
            tally.add(f"not CT Image Storage ({name})", sop)
        empty = [k for k in REQUIRED if ds.get(k) in (None, "")]
        if empty:
            attributes.add(f"mandatory attribute(s) missing or empty: {', '.join(empty)}", sop)
        absent = [k for k in PRESENT if k not in ds]
        if absent:
            attributes.add(
                f"type 2 attribute(s) missing (may be empty, must be present): {', '.join(absent)}", sop
            )
        if ds.get("RescaleType") not in (None, "", "HU"):
            tally.add(f"Rescale Type is {ds.RescaleType!r}, not HU", sop)
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or ds.get("PhotometricInterpretation") not in (
            None,
            "MONOCHROME1",
            "MONOCHROME2",
        ):
            tally.add("not a single-sample grey-scale image (MONOCHROME1/2)", sop)
        if ds.get("BitsAllocated") not in (None, 16):
            tally.add(f"Bits Allocated is {ds.BitsAllocated}, CT Image Storage needs 16", sop)
        for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
            values[keyword].add(str(ds.get(keyword, "")))
        values["PixelSpacing"].add(str(list(ds.get("PixelSpacing", []) or [])))
        plane, why = planes_of(ds)
        if why:
            tally.add(why.replace(f"instance {sop} ", ""), sop)
        planes.extend(plane)
        if "PixelData" in ds:
            span = _hu_range(ds)
            if span is None:
                tally.add("pixel data cannot be decoded", sop)
            else:
                lowest, highest = min(lowest, span[0]), max(highest, span[1])
            del ds.PixelData  # keep one file's pixels in memory at a time
    problems.extend(tally.lines(total))
    problems.extend(_consistency(values, expected_frame_of_reference))
    if np.isfinite(lowest):
        lo, hi = HU_RANGE
        if lowest < lo or highest > hi:
            problems.append(
                f"rescaled values run {lowest:.0f} to {highest:.0f}, outside Hounsfield units "
                f"({lo:.0f} to {hi:.0f}): check Rescale Slope and Intercept"
            )
        elif lowest > AIR_BELOW_HU:
            problems.append(
                f"no voxel below {AIR_BELOW_HU:.0f} HU (lowest {lowest:.0f}): air should be about -1000 HU; "
                "is the rescale intercept missing?"
            )
    if planes and len(values["SeriesInstanceUID"]) == 1:
        problems.extend(stack_problems(planes, what="the series"))
    problems.extend(attributes.lines(total))
    if dciodvfy:
        found: dict[str, list[str]] = defaultdict(list)
        for path in _sample(files):
            for line in dciodvfy_errors(path, dciodvfy):
                found[line].append(path.name)
        problems.extend(f"dciodvfy: {line} ({', '.join(names)})" for line, names in found.items())
    if len(problems) > max_problems:
        problems = problems[:max_problems] + [f"… and {len(problems) - max_problems} more problem(s)"]
    return problems


def _consistency(values: dict[str, set[str]], expected_frame_of_reference: str | None) -> list[str]:
    problems = []
    for keyword, what in (
        ("StudyInstanceUID", "studies"),
        ("SeriesInstanceUID", "series"),
        ("FrameOfReferenceUID", "frames of reference"),
    ):
        found = values[keyword] - {""}
        if len(found) > 1:
            problems.append(f"instances of {len(found)} {what} mixed in ({', '.join(sorted(found)[:3])})")
    found_for = values["FrameOfReferenceUID"] - {""}
    if expected_frame_of_reference and found_for and found_for != {expected_frame_of_reference}:
        problems.append(
            f"Frame of Reference UID {', '.join(sorted(found_for)[:2])} is not the planning MR's "
            f"({expected_frame_of_reference}): the TPS would not place the CT on the MR"
        )
    if len(values["Rows"]) > 1 or len(values["Columns"]) > 1:
        problems.append(
            f"image sizes differ between slices (rows {', '.join(sorted(values['Rows']))}; "
            f"columns {', '.join(sorted(values['Columns']))})"
        )
    if len(values["PixelSpacing"]) > 1:
        problems.append(
            f"pixel spacing differs between slices ({', '.join(sorted(values['PixelSpacing'])[:3])})"
        )
    return problems


def validate_input_series(files: Iterable[Path], *, what: str = "the MR series") -> list[str]:
    """Why a planning MR series cannot be made into one volume (empty: it can).

    Refuses a series that mixes orientations, has duplicate positions, gaps, uneven
    spacing, or fewer slices than its Spacing Between Slices or Images in Acquisition
    say it should have — each with a reason that names the numbers
    (:func:`pipelines.geometry.series_problems`, on the headers).
    """
    problems: list[str] = []
    datasets: list[Dataset] = []
    for path in files:
        ds, why = _read(path, pixels=False)
        if ds is None:
            problems.append(str(why))
        else:
            datasets.append(ds)
    return problems + series_problems(datasets, what=what)
