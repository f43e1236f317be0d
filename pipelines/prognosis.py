"""``prognosis``: a predicted brain-tumour follow-up from the current MR study and its priors.

Input: the current study's T1 post-contrast (T1c) and FLAIR series, and the rule's priors —
earlier studies of the same patient with their T1c and FLAIR, fetched and registered to the
current T1c by the node before this pipeline runs (``RunEnvironment.registered_priors``; the
rule needs ``priors: {registration: rigid, ...}``). Each visit is segmented (brain, white /
grey matter, T1c-visible core, FLAIR-visible whole tumour: :mod:`models.brain_tumour_seg`) on
the current T1c grid; the extents and the current anatomy go to the growth model on a 2 mm
grid (:class:`models.prognosis.PrognosisModel`: a calibrated ensemble of per-patient
Fisher–Kolmogorov fits), which forecasts the tumour at each requested horizon (days after the
current visit; the rule's ``options: {horizons_days: [90]}``, default the model card's).

Outputs per horizon, on the current study and its Frame of Reference:

* the predicted T1c and FLAIR series — MR Image Storage, Image Type DERIVED\\SECONDARY,
  Synthetic Data YES, Series Description "AI PREDICTED T1c follow-up at +90 days - not an
  acquisition", no Acquisition Date/Time (:mod:`models.prognosis_images`);
* their σ as Parametric Maps (the current series' units);
* the tumour probability as a Parametric Map (0 .. 1, calibrated);
* the hallucination map: where the forecast claims tumour today's study does not show, the
  chance the claim is wrong (``1 − p``; :func:`models.prognosis_images.hallucination_map`);
* a SEG with the predicted extent (p ≥ 0.5) next to the current extent;

and one Comprehensive SR with the current and predicted volumes, their 90 % intervals and
the horizon of each, the model card, the gate's verdict and the priors used (Pertinent Other
Evidence). A study this cannot read — no T1c or FLAIR, no brain or no tumour found, fewer than
one usable earlier visit, dates missing — ends the job ``refused`` with the reason; so does a
T1c or FLAIR outside the model card's ``input_domain`` (:func:`check_input_headers` before a
pixel is decoded: a scanning sequence the role's images were not trained on, several echoes;
:func:`check_input_domain` on the loaded volume: anatomy, geometry, field strength). A prior
outside it is left out, with a note (``prior_notes``), not refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from scipy import ndimage

from models.brain_tumour_seg import BrainSegmentation, segment, segment_on_grid
from models.prognosis import (
    Anatomy,
    Observation,
    Prognosis,
    PrognosisModel,
    volume_ml,
)
from models.prognosis_images import hallucination_map, predict_images
from pipelines.base import (
    GateOutcome,
    InputInstance,
    InputRefused,
    ModelIdentity,
    OutputInstance,
    PipelineError,
    PipelineResult,
    RegisteredPrior,
    RunEnvironment,
    StudyInput,
    series_label,
)
from pipelines.domain import echo_reasons, field_strength_reasons, scanning_letters, scanning_sequence_reasons
from pipelines.encode import _card_facts
from pipelines.provenance import OutputProvenance
from pipelines.registration import resample_onto
from pipelines.stages import Context
from pipelines.steps import MR_CLASSES, Gate, axial_acquisition, made_by_this_node, written_by_this_node
from pipelines.uids import UidFactory, job_key
from pipelines.validate import validate_outputs
from pipelines.volume import SeriesError, Volume, load_series
from pipelines.writers import (
    SYNTHESIS,
    DerivedImageWriter,
    HallucinationMapWriter,
    ProbabilityMapWriter,
    SummaryReportWriter,
    TumourExtentWriter,
    UncertaintyMapWriter,
    file_name,
    save,
    ucum_for_units,
)

#: The growth model's grid (mm): the one its calibration was learned on.
MODEL_GRID_MM = 2.0
#: Brain bounding box margin on the model grid (mm), room for the tumour to grow into.
MARGIN_MM = 12.0
#: First Series Number of the outputs; each horizon takes ten, the report is 1199.
FIRST_SERIES_NUMBER = 1101
REPORT_SERIES_NUMBER = 1199
_NO_PRIORS = "prognosis needs at least one earlier visit with a T1c and a FLAIR registered to this study"
_NONE_REGISTERED = "no prior series was registered (the rule needs priors with registration: rigid)"
#: Least overlap of consecutive visits' extents (shared over the smaller) below which the
#: job is refused. On 60 consecutive visit pairs of 20 SIMULATED patients (seeds 2000–2019,
#: the segmentation's evaluation set) whose segmentations were right (whole-tumour Dice
#: 0.74–0.98) the overlap was 0.85–1.00; a segmentation that picks the wrong region (seed
#: 9015's treated, oedema-only visit 3: Dice 0.05) overlaps the previous visit far less.
MIN_VISIT_OVERLAP = 0.5
#: Longest horizon accepted (days).
MAX_HORIZON_DAYS = 730

#: The series roles the card's per-role keys name, and what each is called in a reason.
SERIES_ROLES = {"t1c": "the T1c series", "flair": "the FLAIR series"}

_FLAIR = re.compile(r"FLAIR|DARK[ _-]?FLUID", re.IGNORECASE)
_T1C = re.compile(
    r"T1.*(POST|\+ ?C\b|\bGD\b|GAD|CONTRAST|\bCE\b)|\bT1C\b|T1\+C|\bMPRAGE\b.*(POST|GD)", re.IGNORECASE
)


def sequence_of(ds: Dataset) -> str | None:
    """``"t1c"``, ``"flair"`` or None for an MR series, from its first instance's header:
    the Series Description first, then the acquisition (inversion time ≥ 1500 ms: FLAIR; a
    contrast agent with a short TR: T1 post-contrast)."""
    description = str(ds.get("SeriesDescription", "") or "")
    if _FLAIR.search(description):
        return "flair"
    if _T1C.search(description):
        return "t1c"
    try:
        inversion = float(ds.get("InversionTime", 0) or 0)
        repetition = float(ds.get("RepetitionTime", 0) or 0)
    except (TypeError, ValueError):
        return None
    if inversion >= 1500:
        return "flair"
    if str(ds.get("ContrastBolusAgent", "") or "").strip() and 0 < repetition < 1200:
        return "t1c"
    return None


def _synthetic(ds: Dataset) -> bool:
    """True for an image no scanner acquired: Synthetic Data YES, or written by this node
    (a PACS may hold our predictions under the patient's earlier studies)."""
    return str(ds.get("SyntheticData", "") or "").upper() == "YES" or written_by_this_node(ds)


def scanning_by_role(domain: Mapping[str, Any], model: str) -> dict[str, tuple[str, ...]]:
    """The card's ``input_domain.scanning_sequences`` per series role: the Scanning Sequence
    values (0018,0020) the role's training images had, e.g. ``{"t1c": ["SE"], "flair": ["SE",
    "IR"]}``; one list applies to both roles. The letters are the role's whole combination: a
    series must carry every one (a FLAIR that says ``SE`` alone is refused, whatever its
    inversion time). {} when the card declares none (not checked).

    Raises
    ------
    PipelineError
        One line naming the card and the key, when the value is malformed.
    """
    raw = domain.get("scanning_sequences") or {}
    key = f"prognosis: model card {model}: input_domain.scanning_sequences"
    if isinstance(raw, list | tuple):
        raw = dict.fromkeys(SERIES_ROLES, raw)
    if not isinstance(raw, Mapping):
        raise PipelineError(f'{key}: expected {{"t1c": [...], "flair": [...]}} or one list, got {raw!r}')
    unknown = sorted(set(raw) - set(SERIES_ROLES))
    if unknown:
        raise PipelineError(f"{key}: unknown series role {unknown} (known: {', '.join(SERIES_ROLES)})")
    try:
        return {role: scanning_letters(values) for role, values in raw.items() if values}
    except ValueError as exc:
        raise PipelineError(f"{key}: {exc}") from None


def check_input_headers(
    datasets: Sequence[Dataset], domain: Mapping[str, Any], model: str, role: str
) -> None:
    """Refuse, before a pixel is decoded, the current T1c or FLAIR series (``role``) whose tags
    put it outside the card's ``input_domain``: a Scanning Sequence other than the role's
    training images had, or none given (:func:`scanning_by_role`); several echoes at the same
    slice positions. The shared checks of :mod:`pipelines.domain`, as the other MR pipelines
    run them; a multi-echo series would not even load as one volume."""
    what = SERIES_ROLES[role]
    allowed = scanning_by_role(domain, model).get(role, ())
    reasons = scanning_sequence_reasons(datasets, allowed, model, exact=True) if allowed else []
    reasons += echo_reasons(datasets, model)
    if reasons:
        first = datasets[0]
        series_uid = str(first.get("SeriesInstanceUID", "") or "") or None
        raise InputRefused(model, series_uid, [f"{what}: {r}" for r in reasons], series=series_label(first))


def check_input_domain(volume: Volume, domain: dict[str, Any], model: str, what: str) -> None:
    """Refuse a series outside the model card's ``input_domain`` (body part when the header
    names one, pixel spacing, slice thickness, number of slices)."""
    first = volume.datasets[0]
    reasons = []
    body = str(first.get("BodyPartExamined", "") or "").upper()
    allowed = [b.upper() for b in domain.get("body_parts", [])]
    if body and allowed and body not in allowed:
        reasons.append(f"{what}: Body Part Examined {body} is not one of {', '.join(allowed)}")
    lo, hi = domain.get("pixel_spacing_mm", (0.0, math.inf))
    if not all(lo <= s <= hi for s in volume.spacing[1:]):
        reasons.append(
            f"{what}: pixel spacing {volume.spacing[1]:g} x {volume.spacing[2]:g} mm is outside {lo}-{hi} mm"
        )
    lo, hi = domain.get("slice_spacing_mm", (0.0, math.inf))
    if not lo <= volume.spacing[0] <= hi:
        reasons.append(f"{what}: slice spacing {volume.spacing[0]:g} mm is outside {lo}-{hi} mm")
    trained = tuple(float(t) for t in domain.get("field_strengths_t", ()))
    if trained:
        reasons += [f"{what}: {r}" for r in field_strength_reasons(volume.datasets, trained, model)]
    least = int(domain.get("min_slices", 1))
    if len(volume.slices) < least:
        reasons.append(f"{what}: {len(volume.slices)} slices, fewer than {least} (the brain must be covered)")
    if reasons:
        label = series_label(volume.datasets[0]) if volume.datasets else None
        raise InputRefused(model, volume.series_uid, reasons, series=label)


def _study_day(value: Any, what: str) -> date:
    text = str(value or "").strip()
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        raise InputRefused("prognosis", None, [f"{what} has no valid Study Date ({text!r})"]) from None


# -- the visits --------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisitImages:
    """One visit's T1c and FLAIR on the current T1c grid."""

    day: date
    study_uid: str
    t1c: np.ndarray
    flair: np.ndarray
    fov: np.ndarray | None = None


def _series(study: StudyInput) -> dict[str, list[InputInstance]]:
    by_series: dict[str, list[InputInstance]] = {}
    for inst in study.instances:
        if inst.sop_class_uid in MR_CLASSES:
            by_series.setdefault(inst.series_uid, []).append(inst)
    return by_series


def select_current(study: StudyInput, model: str) -> tuple[list[InputInstance], list[InputInstance]]:
    """The current study's T1c and FLAIR series (the rule's series, when it chose one, is the
    T1c); InputRefused naming what was found when either is missing."""
    found: dict[str, list[list[InputInstance]]] = {"t1c": [], "flair": []}
    rank: dict[str, tuple[bool, bool, int]] = {}
    seen = []
    for uid, instances in _series(study).items():
        if made_by_this_node(str(instances[0].path)):
            continue  # never feed an output back in
        header = pydicom.dcmread(instances[0].path, stop_before_pixels=True)
        kind = sequence_of(header)
        seen.append(f"{header.get('SeriesDescription', '') or uid} ({kind or 'other'})")
        if kind is not None:
            # the rule's series first, then an original axial acquisition (not a larger
            # coronal reformat of it), then the larger
            preference = (study.series_uid == uid, axial_acquisition(header), len(instances))
            if kind not in rank or preference > rank[kind]:
                found[kind], rank[kind] = [instances], preference
    missing = [k for k in ("t1c", "flair") if not found[k]]
    if missing:
        names = {"t1c": "a T1 post-contrast", "flair": "a FLAIR"}
        reason = (
            f"prognosis needs {' and '.join(names[m] for m in missing)} series in the current study "
            f"(found: {', '.join(seen) or 'no MR series'})"
        )
        raise InputRefused(model, study.series_uid, [reason])
    return found["t1c"][0], found["flair"][0]


def _read(instances: Sequence[InputInstance], what: str) -> list[Dataset]:
    """The series' data sets, read once: their headers are checked, then the same data sets
    are loaded (:func:`_load`); no pixel is decoded here."""
    try:
        return [pydicom.dcmread(i.path) for i in instances]
    except (ValueError, OSError) as exc:
        raise PipelineError(f"prognosis: cannot load {what}: {exc}") from None


def _load(datasets: Sequence[Dataset], what: str) -> Volume:
    try:
        volume = load_series(list(datasets))
    except (SeriesError, ValueError, OSError) as exc:
        raise PipelineError(f"prognosis: cannot load {what}: {exc}") from None
    return volume


def prior_visits(
    priors: Sequence[RegisteredPrior],
    current_day: date,
    field_strengths_t: Sequence[float] = (),
    scanning_sequences: Mapping[str, Sequence[str]] | None = None,
) -> tuple[list[VisitImages], list[str]]:
    """Earlier visits with both a T1c and a FLAIR registered to the current T1c, oldest first;
    and a note per prior series or study that could not be used. With ``field_strengths_t``
    and ``scanning_sequences`` (the card's; the latter per role, :func:`scanning_by_role`),
    a prior series acquired at another field strength, or with a scanning sequence its
    role's training images did not have, is not used: its tumour would be segmented
    outside what the model was made for."""
    by_study: dict[str, dict[str, RegisteredPrior]] = {}
    notes = []
    for prior in priors:
        if _synthetic(prior.header):
            uid = prior.reference.series_uid
            notes.append(f"prior series {uid}: an AI output (synthetic), not an acquisition; not used")
            continue
        off_field = (
            field_strength_reasons([prior.header], tuple(field_strengths_t), "the model")
            if field_strengths_t
            else []
        )
        if off_field:
            notes.append(f"prior series {prior.reference.series_uid}: {off_field[0]}; not used")
            continue
        kind = sequence_of(prior.header)
        if kind is None:
            notes.append(f"prior series {prior.reference.series_uid}: neither T1c nor FLAIR, not used")
            continue
        allowed = tuple((scanning_sequences or {}).get(kind, ()))
        off_sequence = (
            scanning_sequence_reasons([prior.header], allowed, "the model", exact=True) if allowed else []
        )
        if off_sequence:
            notes.append(f"prior series {prior.reference.series_uid}: {off_sequence[0]}; not used")
            continue
        by_study.setdefault(prior.reference.study_uid, {})[kind] = prior
    visits = []
    for study_uid, kinds in by_study.items():
        if set(kinds) != {"t1c", "flair"}:
            have = ", ".join(sorted(kinds))
            notes.append(f"prior study {study_uid}: only {have} registered, the visit is not used")
            continue
        t1c, flair = kinds["t1c"], kinds["flair"]
        day = _study_day(t1c.reference.study_date or t1c.header.get("StudyDate"), f"prior study {study_uid}")
        if day >= current_day:
            notes.append(f"prior study {study_uid}: dated {day}, not before the current study, not used")
            continue
        fov = np.asarray(t1c.fov, bool) & np.asarray(flair.fov, bool)
        visits.append(
            VisitImages(day, study_uid, np.asarray(t1c.resampled), np.asarray(flair.resampled), fov)
        )
    visits.sort(key=lambda v: v.day)
    unique: dict[date, VisitImages] = {}
    for visit in visits:  # one visit per day: the last study of the day
        unique[visit.day] = visit
    return list(unique.values()), notes


def check_consistency(extents: Sequence[tuple[date, np.ndarray]]) -> float:
    """The least overlap of consecutive visits' whole-tumour extents on one grid: shared
    voxels over the smaller extent (1: one inside the other). A tumour grows or shrinks in
    place between visits weeks apart; a low overlap means a visit was segmented (or
    registered) wrongly."""
    least = 1.0
    for (_, before), (_, after) in zip(extents, extents[1:], strict=False):
        smaller = min(int(before.sum()), int(after.sum()))
        if smaller == 0:
            continue
        least = min(least, int((before & after).sum()) / smaller)
    return least


# -- the model grid ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelGrid:
    """A 2 mm grid over the brain's bounding box, axis-aligned with the current T1c grid."""

    start: tuple[int, int, int]  # first voxel of the box (current grid)
    spacing: tuple[float, float, float]  # current grid spacing (mm)
    shape: tuple[int, int, int]  # model grid shape
    current_shape: tuple[int, int, int]

    @classmethod
    def around(cls, brain: np.ndarray, spacing: Sequence[float]) -> ModelGrid:
        idx = np.argwhere(brain)
        margin = [int(math.ceil(MARGIN_MM / s)) for s in spacing]
        lo = [max(0, int(idx[:, a].min()) - margin[a]) for a in range(3)]
        hi = [min(brain.shape[a], int(idx[:, a].max()) + 1 + margin[a]) for a in range(3)]
        shape = tuple(max(2, int(math.ceil((hi[a] - lo[a]) * spacing[a] / MODEL_GRID_MM))) for a in range(3))
        return cls(
            (lo[0], lo[1], lo[2]),
            (float(spacing[0]), float(spacing[1]), float(spacing[2])),
            (shape[0], shape[1], shape[2]),
            (brain.shape[0], brain.shape[1], brain.shape[2]),
        )

    def to_model(self, array: np.ndarray) -> np.ndarray:
        """Linear interpolation of a current-grid array at the model grid's points."""
        axes = [self.start[a] + np.arange(self.shape[a]) * MODEL_GRID_MM / self.spacing[a] for a in range(3)]
        coords = np.meshgrid(*axes, indexing="ij")
        return ndimage.map_coordinates(np.asarray(array, np.float32), coords, order=1, mode="nearest").astype(
            np.float32
        )

    def to_current(self, array: np.ndarray) -> np.ndarray:
        """Linear interpolation of a model-grid array at the current grid's points (0 outside)."""
        axes = [
            (np.arange(self.current_shape[a]) - self.start[a]) * self.spacing[a] / MODEL_GRID_MM
            for a in range(3)
        ]
        coords = np.meshgrid(*axes, indexing="ij")
        return ndimage.map_coordinates(
            np.asarray(array, np.float32), coords, order=1, mode="constant", cval=0.0
        ).astype(np.float32)


def _mask_to_model(grid: ModelGrid, mask: np.ndarray) -> np.ndarray:
    return grid.to_model(np.asarray(mask, np.float32)) >= 0.5


# -- the pipeline ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HorizonForecast:
    """One horizon's forecast on the current T1c grid."""

    days: int
    prognosis: Prognosis
    p_whole: np.ndarray
    p_core: np.ndarray


class PrognosisPipeline:
    """The ``prognosis`` pipeline (see the module)."""

    name = "prognosis"
    version = "1.0"

    def __init__(self, model: PrognosisModel) -> None:
        self.model = model
        self.label = f"{model.card.name} {model.card.version}"

    # -- inputs
    def horizons(self, study: StudyInput) -> list[int]:
        asked = study.options.get("horizons_days", self.model.meta.horizons_days)
        values = asked if isinstance(asked, list | tuple) else [asked]
        out = []
        for value in values:
            try:
                days = int(value)
            except (TypeError, ValueError):
                raise PipelineError(
                    f"prognosis: horizons_days {asked!r}: whole days, e.g. [90, 180]"
                ) from None
            if not 1 <= days <= MAX_HORIZON_DAYS:
                raise PipelineError(f"prognosis: horizon {days} days is outside 1 .. {MAX_HORIZON_DAYS}")
            out.append(days)
        if not out:
            raise PipelineError("prognosis: no horizon asked (options.horizons_days is empty)")
        return sorted(set(out))

    def segment_visit(
        self, t1c: np.ndarray, flair: np.ndarray, spacing: Sequence[float]
    ) -> BrainSegmentation:
        """One visit's segmentation on the current T1c's grid; pixels finer than the card's
        own range are segmented on its ``resample`` grid and brought back."""
        grid = None if self.model.resampling is None else self.model.resampling.grid(t1c.shape, spacing)
        if grid is not None:
            return segment_on_grid(t1c, flair, grid)
        return segment(t1c, flair, spacing)

    # -- run
    def run(self, study: StudyInput, env: RunEnvironment) -> PipelineResult:
        horizons = self.horizons(study)
        t1c_series, flair_series = select_current(study, self.label)
        domain = dict(self.model.meta.input_domain)
        if self.model.resampling is not None and domain.get("pixel_spacing_mm"):
            # finer pixels are segmented on the resample grid (segment_visit)
            domain["pixel_spacing_mm"] = list(self.model.resampling.widened(domain["pixel_spacing_mm"]))
        current = {
            "t1c": (t1c_series, "the current T1c series"),
            "flair": (flair_series, "the current FLAIR series"),
        }
        read = {role: _read(instances, what) for role, (instances, what) in current.items()}
        for role, datasets in read.items():  # before a pixel is decoded
            check_input_headers(datasets, domain, self.label, role)
        t1c, flair = (_load(read[role], current[role][1]) for role in ("t1c", "flair"))
        check_input_domain(t1c, domain, self.label, "the T1c series")
        check_input_domain(flair, domain, self.label, "the FLAIR series")
        if not t1c.frame_of_reference_uid:
            raise InputRefused(self.label, t1c.series_uid, ["the T1c series has no Frame of Reference UID"])
        current_day = _study_day(t1c.datasets[0].get("StudyDate"), "the current study")
        fields = tuple(float(t) for t in domain.get("field_strengths_t", ()))
        scanning = scanning_by_role(domain, self.label)
        visits, notes = prior_visits(env.registered_priors, current_day, fields, scanning)
        if not visits:  # refused before any segmentation or model runs
            raise InputRefused(self.label, t1c.series_uid, [_NO_PRIORS, *(notes or [_NONE_REGISTERED])])
        flair_on_t1c = resample_onto(flair, flair.array, t1c)
        now = self.segment_visit(t1c.array, flair_on_t1c, t1c.spacing)
        if not now.ok:
            raise InputRefused(self.label, t1c.series_uid, [f"current visit: {p}" for p in now.problems])
        if not now.whole.any():
            raise InputRefused(self.label, t1c.series_uid, ["no tumour found in the current visit"])
        observations_now: list[tuple[date, BrainSegmentation]] = []
        for visit in visits:
            seg = self.segment_visit(visit.t1c, visit.flair, t1c.spacing)
            if not seg.ok:
                notes.append(f"prior study {visit.study_uid}: {'; '.join(seg.problems)}; not used")
                continue
            observations_now.append((visit.day, seg))
        if not observations_now:
            raise InputRefused(self.label, t1c.series_uid, [_NO_PRIORS, *notes])
        overlap = check_consistency([(d, s.whole) for d, s in observations_now] + [(current_day, now.whole)])
        if overlap < MIN_VISIT_OVERLAP:
            raise InputRefused(
                self.label,
                t1c.series_uid,
                [
                    f"the tumour extents of consecutive visits overlap by only {overlap:.2f} (limit "
                    f"{MIN_VISIT_OVERLAP}): the segmentation or the registration of a visit cannot be "
                    "trusted, so no follow-up is predicted; read the study without a prediction"
                ],
            )
        grid = ModelGrid.around(now.brain, t1c.spacing)
        first_day = observations_now[0][0]
        observations = [
            Observation(
                float((day - first_day).days), _mask_to_model(grid, s.core), _mask_to_model(grid, s.whole)
            )
            for day, s in observations_now
        ]
        current_offset = float((current_day - first_day).days)
        observations.append(
            Observation(current_offset, _mask_to_model(grid, now.core), _mask_to_model(grid, now.whole))
        )
        anatomy = Anatomy(
            grid.to_model(now.white), grid.to_model(now.grey), (MODEL_GRID_MM, MODEL_GRID_MM, MODEL_GRID_MM)
        )
        forecasts = []
        for days in horizons:
            prognosis = self.model.forecast(observations, anatomy, current_offset + days)
            p_whole = np.clip(grid.to_current(prognosis.probability), 0.0, 1.0)
            p_core = np.minimum(np.clip(grid.to_current(prognosis.core_probability), 0.0, 1.0), p_whole)
            forecasts.append(HorizonForecast(days, prognosis, p_whole, p_core))
        voxel = t1c.spacing
        qc: dict[str, tuple[float, str]] = {
            "current whole-tumour volume": (round(volume_ml(now.whole, voxel), 2), "ml"),
            "current core volume": (round(volume_ml(now.core, voxel), 2), "ml"),
            "earlier visits used": (float(len(observations_now)), "1"),
            "least overlap of consecutive visits' extents": (round(overlap, 3), "1"),
        }
        for f in forecasts:
            lo, hi = f.prognosis.interval_ml
            qc |= {
                f"predicted whole-tumour volume +{f.days} d": (round(f.prognosis.volume_ml, 2), "ml"),
                f"predicted volume 90% interval low +{f.days} d": (round(lo, 2), "ml"),
                f"predicted volume 90% interval high +{f.days} d": (round(hi, 2), "ml"),
                f"predicted core volume +{f.days} d": (round(f.prognosis.core_volume_ml, 2), "ml"),
                f"predicted new extent +{f.days} d": (
                    round(volume_ml((f.p_whole >= 0.5) & ~now.whole, voxel), 2),
                    "ml",
                ),
            }
        parameters: dict[str, Any] = {
            "horizons_days": horizons,
            "visit_days": [(day - first_day).days for day, _ in observations_now] + [int(current_offset)],
            "prior_studies": [v.study_uid for v in visits],
            "prior_notes": notes,
            "t1c_series_uid": t1c.series_uid,
            "flair_series_uid": flair.series_uid,
            "model_grid_mm": MODEL_GRID_MM,
            "interval": "90% (5th-95th percentile, split-conformal widened)",
        }
        card = self.model.card
        ctx = Context(
            study=study,
            env=env,
            pipeline=self.name,
            pipeline_version=self.version,
            series=tuple(t1c_series),
            other_series=tuple(flair_series),
            volume=t1c,
            model=card,
            qc=qc,
        )
        ctx = Gate().run(ctx)  # the rule's verdict on the QC figures, as every pipeline's report states it
        ctx = ctx.evolve(outputs=self.write(ctx, flair, flair_on_t1c, now, forecasts))
        qc_plain = {k: v[0] for k, v in qc.items()}
        return PipelineResult(
            outputs=ctx.outputs,
            model=ModelIdentity(card.name, card.version, card.weights_sha256),
            parameters=parameters,
            qc={o.series_uid: qc_plain for o in ctx.outputs},
            gate=ctx.gate,
            validation_errors=tuple(validate_outputs(ctx)),
        )

    # -- outputs
    def write(
        self,
        ctx: Context,
        flair: Volume,
        flair_on_t1c: np.ndarray,
        now: BrainSegmentation,
        forecasts: Sequence[HorizonForecast],
    ) -> tuple[OutputInstance, ...]:
        """Every output object, saved in the job's directory (``ctx.volume``: the T1c)."""
        study, env, t1c, card = ctx.study, ctx.env, ctx.need_volume(), self.model.card
        provenance = OutputProvenance(
            pipeline=self.name,
            pipeline_version=self.version,
            model_name=card.name,
            model_version=card.version,
            weights_sha256=card.weights_sha256,
            node_version=env.node_version,
            synthetic=True,
            station=env.node_ae_title,
            priors=env.priors,
        )
        uids = UidFactory(env.uid_root, job_key(study.job_id, [i.sop_uid for i in study.instances]))
        written: list[Dataset] = []
        for k, f in enumerate(forecasts):
            n = FIRST_SERIES_NUMBER + 10 * k
            images = predict_images(
                {"t1c": t1c.array, "flair": flair_on_t1c},
                brain=now.brain,
                core_now=now.core,
                whole_now=now.whole,
                p_core=f.p_core,
                p_whole=f.p_whole,
            )
            for j, (key, source) in enumerate((("t1c", t1c), ("flair", flair))):
                name = "T1c" if key == "t1c" else "FLAIR"
                mean, sigma = images[key].mean, images[key].sigma
                if source is flair:  # back onto the FLAIR's own grid (a no-op when they share it)
                    mean = resample_onto(t1c, mean, flair)
                    sigma = np.maximum(resample_onto(t1c, sigma, flair), 0.0)
                written += DerivedImageWriter(
                    provenance=provenance,
                    uids=uids,
                    series_number=n + j,
                    series_description=f"PREDICTED {name} follow-up at +{f.days} days - not an acquisition",
                    derivation_description_extra=(
                        f"predicted follow-up {f.days} days after this study from this study and "
                        f"{len(env.priors)} prior series; not an acquisition"
                    ),
                    derivation_code=SYNTHESIS,
                    name=f"predicted-{key}-{f.days}",
                    output_modality="MR",
                ).write(source, mean)
                pm = UncertaintyMapWriter(
                    provenance=provenance,
                    uids=uids,
                    series_number=n + 2 + j,
                    units=ucum_for_units(source.units),
                    name=f"sigma-{key}-{f.days}",
                ).write(source, sigma)
                pm.SeriesDescription = f"AI sigma of PREDICTED {name} +{f.days} d (1 SD)"
                written.append(pm)
            written.append(
                ProbabilityMapWriter(
                    provenance=provenance,
                    uids=uids,
                    series_number=n + 4,
                    what=f"tumour at +{f.days} days",
                    name=f"probability-{f.days}",
                ).write(t1c, f.p_whole)
            )
            written.append(
                HallucinationMapWriter(
                    provenance=provenance,
                    uids=uids,
                    series_number=n + 5,
                    score_description="chance a predicted new tumour extent is invented (1 - p)",
                    name=f"hallucination-{f.days}",
                ).write(t1c, hallucination_map(f.p_whole, now.whole))
            )
            written.append(
                TumourExtentWriter(
                    provenance=provenance,
                    uids=uids,
                    series_number=n + 6,
                    description=f"tumour extent predicted at +{f.days} d and current",
                    name=f"extent-{f.days}",
                ).write(
                    t1c,
                    [
                        (f"predicted tumour extent +{f.days} d (p >= 0.5)", f.p_whole >= 0.5),
                        ("current tumour extent", now.whole),
                    ],
                )
            )
        report = SummaryReportWriter(
            provenance=provenance, uids=uids, series_number=REPORT_SERIES_NUMBER, model_card=_card_facts(ctx)
        ).write(t1c, outputs=written, qc=ctx.qc, gate=ctx.verdict or GateOutcome("release", final=False))
        datasets = [*written, report]
        save(datasets, env.workdir)
        return tuple(
            OutputInstance(
                sop_uid=str(ds.SOPInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=Path(env.workdir) / file_name(ds),
            )
            for ds in datasets
        )


def prognosis(model_dir: Path | None = None) -> PrognosisPipeline:
    """The pipeline with the model in ``model_dir`` (None: the newest shipped version)."""
    return PrognosisPipeline(PrognosisModel(model_dir) if model_dir else PrognosisModel.shipped())
