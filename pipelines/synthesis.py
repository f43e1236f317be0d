"""``synthesis``: the MR contrast a brain study lacks, synthesised from the ones it has.

A reading protocol expects contrasts (by default T1w, T2w and FLAIR); when a study lacks one
— skipped, aborted, or so degraded by motion that it was not sent — this pipeline
synthesises it from the acquired ones with the newest shipped synthesis model
(``models/zoo/synthesis-t1w-t2w-to-flair``, :class:`models.synthesis.SynthesisModel`) and says
loudly where the synthesis may be wrong.

Which series is which contrast is read against the protocol: the rule's ``options:
{protocol_t1w: REGEX, protocol_t2w: REGEX, protocol_flair: REGEX}`` (Series Description
patterns; the defaults are :data:`DEFAULT_PROTOCOL`), else the acquisition (inversion time ≥ 1500 ms:
FLAIR; TR < 1000 ms and TE < 30 ms: T1w; TR ≥ 2000 ms and TE ≥ 60 ms: T2w). A
post-contrast T1 is never read as the native T1w. A series this node wrote is never read.

Refused, with the reason (the job ends ``refused``, nothing is synthesised): the study
already has the target contrast; an input contrast the model needs is missing (the reason
lists the series found and what each was read as); an input series outside the model
card's input domain (modality, SOP class, an original axial acquisition, spacing, image
size, body part, T1w / T2w timing) or whose pixels do not show a whole head; inputs on
different Frames of Reference (the node does not register within a study).

Outputs, on the T1w series' Frame of Reference, slice for slice on its grid (the T2w is
resampled onto it when its grid differs):

* the synthetic contrast — MR Image Storage, ``DERIVED\\SECONDARY``, Synthetic Data YES,
  Series Description "AI SYNTHETIC FLAIR from T1w+T2w - not acquired", no acquisition
  attributes claimed (Scanning Sequence ``RM``), in white-matter units × 1000 (white matter
  reads 1000; 0 outside the brain: the model synthesises the brain only);
* its calibrated σ as a Parametric Map (same units);
* the hallucination map (:mod:`models.synthesis_hallucination`: where the inputs show an
  abnormality the output lacks, or the output claims structure the inputs cannot support);
* a SEG of the suspect regions; the Comprehensive SR with the QC figures, the model card
  and the gate's verdict; a Secondary Capture overlay.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from models.base import Prediction
from models.hallucination import suspect_regions
from models.synthesis import SynthesisModel
from models.synthesis_hallucination import (
    MIN_REGION_MM3,
    SUSPECT_THRESHOLD,
    hallucination_score,
    hallucination_score_on_grid,
)
from models.synthesis_norm import NormalisationError, brain_mask
from pipelines.base import InputInstance, InputRefused, PipelineError, series_label
from pipelines.domain import (
    CheckInputHeaders,
    CheckInputImage,
    InputDomain,
    domain_of_card,
    header_reasons,
)
from pipelines.encode import Encode
from pipelines.registration import resample_onto
from pipelines.stages import Context, StagedPipeline
from pipelines.steps import (
    MR_CLASSES,
    Gate,
    LoadVolume,
    axial_acquisition,
    image_type_values,
    original_acquisition,
    suspect_figures,
    written_by_this_node,
)
from pipelines.validate import Validate
from pipelines.volume import SeriesError, Volume, load_series
from pipelines.writers import SYNTHESIS

#: The shipped model the pipeline runs by default.
MODEL_NAME = "synthesis-t1w-t2w-to-flair"
#: The shipped model of ``synthesis-t2w`` (a T2w from the T1w alone).
T2W_MODEL_NAME = "synthesis-t1w-to-t2w"
#: Series Description patterns of the contrasts a brain protocol expects (``(?i)``: any case).
DEFAULT_PROTOCOL: dict[str, str] = {
    "flair": r"(?i)flair|dark[ _-]?fluid",
    "t1w": r"(?i)\bt1(?!.*(post|\+ ?c\b|\bgd\b|gad|contrast|\bce\b))|\bmprage\b(?!.*(post|\bgd\b|gad))",
    "t2w": r"(?i)\bt2(?!.*(\*|star|swi|flair|map))",
}
#: A post-contrast T1 (never the native T1w input).
_POST_CONTRAST = re.compile(r"(?i)t1.*(post|\+ ?c\b|\bgd\b|gad|contrast|\bce\b)|\bt1c\b")
#: Contrast names as written in descriptions and messages.
LABELS = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR", "pd": "PD"}
#: The synthetic image is written in white-matter units times this (white matter reads 1000).
DISPLAY_SCALE = 1000.0
#: First Series Number of the outputs (``synthesis-t2w``: its own range, so a study that gets
#: a synthetic T2w and, once its T2w is acquired, a synthetic FLAIR has no number twice).
FIRST_SERIES_NUMBER = 1201
T2W_FIRST_SERIES_NUMBER = 1221

_TAGS = [
    "SeriesDescription",
    "SeriesInstanceUID",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "ScanningSequence",
    "ContrastBolusAgent",
    "FrameOfReferenceUID",
    "ContributingEquipmentSequence",
    "ImageType",
    "ImageOrientationPatient",
    "SharedFunctionalGroupsSequence",
]


#: Rule options that override a protocol pattern: ``protocol_t1w``, ``protocol_t2w``, ``protocol_flair``.
PROTOCOL_OPTION = "protocol_"


def protocol_of(options: Mapping[str, Any]) -> dict[str, re.Pattern[str]]:
    """The protocol's contrast patterns: :data:`DEFAULT_PROTOCOL`, each overridden by the
    rule's ``options: {protocol_<contrast>: REGEX}`` when given.

    Raises
    ------
    PipelineError
        A pattern that is not a regular expression (one line naming the option).
    """
    raw = dict(DEFAULT_PROTOCOL)
    for key, value in options.items():
        if str(key).startswith(PROTOCOL_OPTION) and str(value).strip():
            raw[str(key)[len(PROTOCOL_OPTION) :].lower()] = str(value)
    out = {}
    for name, pattern in raw.items():
        try:
            out[name] = re.compile(pattern)
        except re.error as exc:
            raise PipelineError(
                f"options.{PROTOCOL_OPTION}{name}: {pattern!r} is not a regular expression ({exc})"
            ) from None
    return out


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def contrast_of(ds: Dataset, protocol: Mapping[str, re.Pattern[str]]) -> str | None:
    """The contrast an MR series shows (``"t1w"``, ``"t2w"``, ``"flair"``, ``"t1c"``, a
    protocol's own name) or None, from its first instance's header: the Series Description
    against the protocol (FLAIR first, a post-contrast T1 is ``"t1c"``), else the acquisition."""
    return _reading(ds, protocol)[0]


def _timing_readable(ds: Dataset) -> bool:
    """Whether TR and TE may say what a series shows: an original primary image (not a
    localizer, a map or a reformat) that is neither a gradient echo nor echo planar. An SWI
    (gradient echo, short TR and TE) is no T1w, a DWI (echo planar, long TR and TE) no T2w,
    and a brain study usually holds both, larger than its T1w and T2w."""
    values = image_type_values(ds)
    if values and not original_acquisition(values):
        return False
    scanning = ds.get("ScanningSequence")
    letters = [scanning] if isinstance(scanning, str) else list(scanning or ())
    return not {str(v).strip().upper() for v in letters} & {"GR", "EP"}


def _reading(ds: Dataset, protocol: Mapping[str, re.Pattern[str]]) -> tuple[str | None, bool]:
    """(the contrast, whether the Series Description said it) — see :func:`contrast_of`."""
    description = str(ds.get("SeriesDescription", "") or "")
    agent = bool(str(ds.get("ContrastBolusAgent", "") or "").strip())
    if description:
        if protocol.get("flair") and protocol["flair"].search(description):
            return "flair", True
        if _POST_CONTRAST.search(description) or agent:
            return "t1c", True
        for name, pattern in protocol.items():
            if name != "flair" and pattern.search(description):
                return name, True
    tr, te, ti = (_number(ds, k) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    if ti is not None and ti >= 1500:
        return "flair", False
    if agent:
        return "t1c", False
    if tr is not None and te is not None and _timing_readable(ds):
        if tr < 1000 and te < 30:
            return "t1w", False
        if tr >= 2000 and te >= 60:
            return "t2w", False
    return None, False


@dataclass(frozen=True)
class Contrasts:
    """The study's MR series by contrast (largest series of each), and what each was read as."""

    series: dict[str, tuple[InputInstance, ...]]
    seen: tuple[str, ...]  # "'DESCRIPTION' (uid): t1w", one per series, for messages


def by_series(instances: Iterable[InputInstance]) -> dict[str, list[InputInstance]]:
    """Instances grouped by Series Instance UID, in their order."""
    groups: dict[str, list[InputInstance]] = defaultdict(list)
    for inst in instances:
        groups[inst.series_uid].append(inst)
    return groups


def read_contrasts(ctx: Context, protocol: Mapping[str, re.Pattern[str]]) -> Contrasts:
    """Each contrast's series: of several read as one contrast, a series the protocol's
    description names beats one read by its acquisition alone, then an original axial
    acquisition beats a localizer, map or reformat, then the larger wins (the first of
    equals)."""
    mr = by_series(i for i in ctx.study.instances if i.sop_class_uid in MR_CLASSES)
    found: dict[str, tuple[InputInstance, ...]] = {}
    rank: dict[str, tuple[bool, bool, int]] = {}
    seen = []
    for uid, instances in mr.items():
        ds = pydicom.dcmread(instances[0].path, stop_before_pixels=True, specific_tags=_TAGS)
        if written_by_this_node(ds):
            continue
        contrast, described = _reading(ds, protocol)
        seen.append(
            f"{str(ds.get('SeriesDescription', '') or '(no description)')!r} ({uid}): {contrast or 'unknown'}"
        )
        if contrast is None:
            continue
        preference = (described, axial_acquisition(ds), len(instances))
        if contrast not in rank or preference > rank[contrast]:
            found[contrast], rank[contrast] = tuple(instances), preference
    return Contrasts(found, tuple(seen))


@dataclass(frozen=True)
class SelectContrasts:
    """Find the model's input contrasts and check the target is missing.

    The T1w series (the grid and Frame of Reference of every output) becomes the selected
    series; the other inputs go to ``other_series``, in the model's order.
    """

    model: SynthesisModel
    name: str = "select"

    def run(self, ctx: Context) -> Context:
        protocol = protocol_of(ctx.study.options)
        contrasts = read_contrasts(ctx, protocol)
        label = self.model.name
        target = self.model.target
        seen = "; ".join(contrasts.seen) or "no MR series"
        if target in contrasts.series:
            uid = contrasts.series[target][0].series_uid
            raise InputRefused(
                label, uid, [f"the study has a {LABELS[target]} series ({uid}): nothing to synthesise"]
            )
        missing = [c for c in self.model.inputs if c not in contrasts.series]
        if missing:
            need = " and ".join(LABELS.get(c, c) for c in self.model.inputs)
            reason = (
                f"{label} synthesises {LABELS[target]} from {need}; the study has no "
                f"{' or '.join(LABELS.get(c, c) for c in missing)} series (series read as: {seen})"
            )
            raise InputRefused(label, None, [reason])
        reference = contrasts.series["t1w"]
        others = tuple(i for c in self.model.inputs if c != "t1w" for i in contrasts.series[c])
        inputs = {c: contrasts.series[c][0].series_uid for c in self.model.inputs}
        parameters = {**ctx.parameters, "target": target, "input_series": inputs}
        return ctx.evolve(series=reference, other_series=others, parameters=parameters)


@dataclass(frozen=True)
class CheckOtherInputs:
    """The input domain, by the tags, for every input series besides the T1w (its own
    sequence rule: a T2w must be T2-weighted)."""

    domain: InputDomain
    declared_by: str
    name: str = "check-domain-others"

    def run(self, ctx: Context) -> Context:
        inputs = {uid: c for c, uid in ctx.parameters.get("input_series", {}).items()}
        for uid, instances in by_series(ctx.other_series).items():
            contrast = inputs.get(uid)
            domain = self.domain.model_copy(update={"sequence": contrast if contrast == "t2w" else None})
            datasets = [pydicom.dcmread(i.path, stop_before_pixels=True) for i in instances]
            reasons = header_reasons(datasets, domain, self.declared_by)
            if reasons:
                raise InputRefused(
                    self.declared_by,
                    uid,
                    [f"{LABELS.get(contrast or '', 'input')}: {r}" for r in reasons],
                    series=series_label(datasets[0]) if datasets else None,
                )
        return ctx


def _load(instances: tuple[InputInstance, ...]) -> Volume:
    try:
        return load_series([pydicom.dcmread(i.path) for i in instances])
    except SeriesError as exc:
        raise PipelineError(str(exc)) from None


@dataclass(frozen=True)
class PredictSynthesis:
    """The synthetic contrast, its calibrated σ, the hallucination score and suspect regions.

    Suspect regions: connected voxels with a hallucination score above
    :data:`models.synthesis_hallucination.SUSPECT_THRESHOLD` and at least
    :data:`~models.synthesis_hallucination.MIN_REGION_MM3` (see that module for how both
    were measured). QC figures: the brain volume, the mean calibrated σ in the brain (white
    matter units × 1000), and the suspect figures every pipeline reports.
    """

    model: SynthesisModel
    name: str = "predict"

    def run(self, ctx: Context) -> Context:
        t1w = ctx.need_volume()
        arrays = {"t1w": t1w.array}
        others = by_series(ctx.other_series)
        inputs = ctx.parameters.get("input_series", {})
        for contrast, uid in inputs.items():
            if contrast == "t1w":
                continue
            other = _load(tuple(others[uid]))
            if (other.frame_of_reference_uid or "") != (t1w.frame_of_reference_uid or ""):
                raise InputRefused(
                    self.model.name,
                    uid,
                    [
                        f"{LABELS[contrast]} series {uid} is on another Frame of Reference than the T1w "
                        f"({other.frame_of_reference_uid or 'none'} vs "
                        f"{t1w.frame_of_reference_uid or 'none'}): "
                        "the node does not register series within a study"
                    ],
                )
            arrays[contrast] = resample_onto(other, other.array, t1w)
        grid = self.model.grid_for(t1w.array.shape, t1w.spacing)
        try:
            if grid is None:
                brain = brain_mask(t1w.array, t1w.spacing)
                out = self.model.predict_full(arrays, brain, t1w.spacing)
            else:  # the brain found where the network runs: the mask's method was built at 1.875 mm
                # (on 0.47 mm pixels it took in 45 % more than the brain, SIMULATED)
                cells_brain = brain_mask(grid.down(t1w.array), grid.cell_spacing)
                brain = grid.up(cells_brain.astype(np.float32)) >= 0.5
                out = self.model.predict_on_grid(arrays, brain, grid, cells_brain)
        except NormalisationError as exc:
            raise InputRefused(self.model.name, t1w.series_uid, [f"no brain to synthesise: {exc}"]) from None
        if not out.brain.any():
            raise InputRefused(self.model.name, t1w.series_uid, ["no brain found in the T1w images"])
        if out.grid is not None and out.on_grid is not None:
            # the score where the network ran (its thresholds were measured there), then back
            cells = out.on_grid
            score = hallucination_score_on_grid(
                out.grid, cells.normalised, cells.mean, cells.sigma, cells.brain, out.brain
            )
        else:
            normalised = {c: arrays[c] / out.scales[c] for c in self.model.inputs}
            score = hallucination_score(normalised, out.mean, out.sigma, out.brain, t1w.spacing)
        voxel_mm3 = float(np.prod(t1w.spacing))
        min_voxels = max(2, math.ceil(MIN_REGION_MM3 / voxel_mm3))
        suspect = suspect_regions(score, SUSPECT_THRESHOLD, min_voxels=min_voxels) & out.brain
        voxel_ml = voxel_mm3 / 1000.0
        qc: dict[str, tuple[float, str]] = {
            **ctx.qc,
            "brain volume": (round(float(out.brain.sum() * voxel_ml), 1), "mL"),
            "mean calibrated sigma in brain": (
                round(float(out.sigma[out.brain].mean() * DISPLAY_SCALE), 2),
                "1",
            ),
        }
        qc.update(suspect_figures(score, suspect, voxel_ml, SUSPECT_THRESHOLD, within=out.brain))
        if out.grid is not None:
            qc["network pixel size"] = (round(max(out.grid.cell_spacing[1:]), 3), "mm")
        prediction = Prediction(
            mean=(out.mean * DISPLAY_SCALE).astype(np.float32),
            sigma=(out.sigma * DISPLAY_SCALE).astype(np.float32),
        )
        parameters = {
            **ctx.parameters,
            **({"network_cells": list(out.grid.cells)} if out.grid is not None else {}),
            "display_scale": DISPLAY_SCALE,
            "suspect_threshold": SUSPECT_THRESHOLD,
            "suspect_min_region_mm3": MIN_REGION_MM3,
        }
        return ctx.evolve(
            model=self.model.card,
            prediction=prediction,
            hallucination=score.astype(np.float32),
            suspect=suspect,
            qc=qc,
            parameters=parameters,
        )


def description(model: SynthesisModel) -> str:
    """ "SYNTHETIC FLAIR from T1w+T2w - not acquired" (the writer puts "AI" in front)."""
    inputs = "+".join(LABELS.get(c, c) for c in model.inputs)
    return f"SYNTHETIC {LABELS[model.target]} from {inputs} - not acquired"


def synthesis(
    model_dir: Path | None = None,
    *,
    model_name: str = MODEL_NAME,
    name: str = "synthesis",
    first_series_number: int = FIRST_SERIES_NUMBER,
) -> StagedPipeline:
    """The pipeline with the model in ``model_dir`` (None: the newest shipped ``model_name``)."""
    model = SynthesisModel(model_dir) if model_dir else SynthesisModel.shipped(model_name)
    domain, label = domain_of_card(vars(model.meta), "MR")
    if model.resampling is not None and domain.pixel_spacing_mm:
        # finer pixels than the network's are taken on its grid (models.inplane_grid.Resampling)
        domain = domain.model_copy(
            update={"pixel_spacing_mm": model.resampling.widened(domain.pixel_spacing_mm)}
        )
    return StagedPipeline(
        name=name,
        version="1.0",
        stages=(
            SelectContrasts(model),
            CheckInputHeaders((domain,), label),
            CheckOtherInputs(domain, label),
            LoadVolume(),
            CheckInputImage((domain,), label),
            PredictSynthesis(model),
            Gate(),
            Encode(
                derived_description=description(model),
                synthetic=True,
                derivation_code=SYNTHESIS,
                output_modality="MR",
                output_units="",
                output_contrast=LABELS[model.target],
                first_series_number=first_series_number,
            ),
            Validate(),
        ),
    )


def synthesis_t2w(model_dir: Path | None = None) -> StagedPipeline:
    """``synthesis-t2w``: the missing T2w from the T1w (:data:`T2W_MODEL_NAME` by default)."""
    return synthesis(
        model_dir,
        model_name=T2W_MODEL_NAME,
        name="synthesis-t2w",
        first_series_number=T2W_FIRST_SERIES_NUMBER,
    )
