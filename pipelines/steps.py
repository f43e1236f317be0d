"""Reusable pipeline stages: select → load → predict → score → gate (encode: ``encode.py``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
import pydicom

from models.base import Model, Prediction
from models.hallucination import data_consistency_score, largest_region_voxels, suspect_regions
from pipelines import fov, spill
from pipelines.base import EACH_SERIES_OPTION, GateOutcome, InputInstance, InputRefused, PipelineError
from pipelines.domain import MAX_AXIAL_TILT_DEG, REFUSED_IMAGE_TYPE_VALUES, InputDomain, header_reasons
from pipelines.geometry import frame_group
from pipelines.quantiles import upper_percentile_of_parts
from pipelines.stages import Context
from pipelines.volume import SeriesError, load_series

CT_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"})
MR_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"})
_OWN_MANUFACTURER = "dicom-node"


def written_by_this_node(ds: pydicom.Dataset) -> bool:
    """True for a data set this node wrote (its Contributing Equipment names the node)."""
    return any(
        str(item.get("Manufacturer", "")) == _OWN_MANUFACTURER
        for item in ds.get("ContributingEquipmentSequence", [])
    )


def made_by_this_node(path: str) -> bool:
    """True for objects this node wrote (never feed an AI output back into a pipeline)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ContributingEquipmentSequence"])
    return written_by_this_node(ds)


def image_type_values(ds: pydicom.Dataset) -> list[str]:
    """The instance's Image Type values, stripped and upper case ([] when it has none)."""
    image_type = ds.get("ImageType")
    values = [image_type] if isinstance(image_type, str) else list(image_type or ())
    return [str(v).strip().upper() for v in values]


def original_acquisition(image_type: list[str]) -> bool:
    """Whether Image Type values (:func:`image_type_values`) say an original primary image
    that is not a localizer, a map or a reformat (:data:`pipelines.domain.REFUSED_IMAGE_TYPE_VALUES`)."""
    return image_type[:2] == ["ORIGINAL", "PRIMARY"] and not REFUSED_IMAGE_TYPE_VALUES & set(image_type)


def axial_acquisition(ds: pydicom.Dataset) -> bool:
    """True for an instance of an original primary acquisition in axial slices (tilted up to
    :data:`pipelines.domain.MAX_AXIAL_TILT_DEG`): what every model here is given. A
    localizer, a map, a reformat (:data:`pipelines.domain.REFUSED_IMAGE_TYPE_VALUES`), a
    derived or secondary series, or a sagittal, coronal or oblique one is not."""
    if not original_acquisition(image_type_values(ds)):
        return False
    cosines = ds.get("ImageOrientationPatient")
    if not cosines:
        plane = frame_group(ds, 1, "PlaneOrientationSequence")
        cosines = plane.get("ImageOrientationPatient") if plane is not None else None
    try:
        row, column = np.asarray(cosines, dtype=float).reshape(2, 3)
    except (TypeError, ValueError):
        return False
    normal = np.cross(row, column)
    length = float(np.linalg.norm(normal))
    if not length:
        return False
    return bool(np.degrees(np.arccos(min(1.0, abs(float(normal[2])) / length))) <= MAX_AXIAL_TILT_DEG)


@dataclass(frozen=True)
class SelectSeries:
    """Pick the series to process.

    The policy's choice (``StudyInput.series_uid``) when the study holds it in one of the
    wanted SOP classes. Otherwise the pipeline chooses among the series of those classes
    (never one this node wrote), as a scanner sends a study: several series, of which one is
    the acquisition to process. It takes the largest series that ``domain`` (the model's
    input domain, when given) accepts by its first header; else the largest original primary
    axial acquisition (not a localizer, a map, a reformat or a screen capture); else the
    largest series, which the input-domain check then refuses with its reasons.
    """

    sop_classes: frozenset[str]
    what: str = "image"
    #: The model's input domain: a series inside it is preferred (None: not consulted).
    domain: InputDomain | None = None
    name: str = "select"

    def run(self, ctx: Context) -> Context:
        by_series: dict[str, list[InputInstance]] = defaultdict(list)
        for inst in ctx.study.instances:
            if inst.sop_class_uid in self.sop_classes:
                by_series[inst.series_uid].append(inst)
        if ctx.study.series_uid and ctx.study.series_uid in by_series:
            return ctx.evolve(series=tuple(by_series[ctx.study.series_uid]))  # the policy's choice
        if ctx.study.series_uid and ctx.study.options.get(EACH_SERIES_OPTION):
            # one job per series: choosing another would process a series twice (its own job's)
            raise InputRefused(
                f"this {self.what} pipeline",
                ctx.study.series_uid,
                [
                    f"the rule made this job for this series (select: each), which holds no "
                    f"{self.what} image of the classes the pipeline processes"
                ],
            )
        candidates = [s for s in by_series.values() if not made_by_this_node(str(s[0].path))]
        if not candidates:
            raise PipelineError(f"no {self.what} series in study {ctx.study.study_uid} to process")
        chosen = max(candidates, key=self._preference)  # the first of equals: the study's order
        return ctx.evolve(series=tuple(chosen))

    def _preference(self, series: list[InputInstance]) -> tuple[bool, bool, int]:
        """(inside the domain, an axial acquisition, size): larger is preferred."""
        first = pydicom.dcmread(series[0].path, stop_before_pixels=True)
        inside = self.domain is None or not header_reasons([first], self.domain, "the model")
        return inside, axial_acquisition(first), len(series)


@dataclass(frozen=True)
class LoadVolume:
    """Read the selected series and build the volume (refusing what is not one volume)."""

    resample: bool = False
    #: Keep the voxels in the job's spill file (:mod:`pipelines.spill`), not in memory: for
    #: pipelines whose later stages read the volume a slab at a time (``restoration``).
    spilled: bool = False
    name: str = "load"

    def run(self, ctx: Context) -> Context:
        datasets = [pydicom.dcmread(i.path) for i in ctx.series]
        try:
            volume = load_series(datasets, resample=self.resample)
        except SeriesError as exc:
            raise PipelineError(str(exc)) from None
        del datasets
        if self.spilled:
            volume = replace(volume, array=spill.Spill(ctx.env.workdir).copy("volume", volume.array))
        # the pixels are in the volume now; the data sets stay for their attributes (the
        # writers copy and reference them), without the encoded pixels: half a volume's
        # memory for a long CT series (issue 20)
        for ds in volume.datasets:
            for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                if keyword in ds:
                    del ds[keyword]
        return ctx.evolve(volume=volume)


@dataclass(frozen=True)
class Predict:
    """Run the model: restored volume and its per-voxel standard deviation.

    The model sees the outside of the field of view filled; the prediction keeps the
    source's values there, with σ 0 (:mod:`pipelines.fov`).
    """

    model: Model
    name: str = "predict"

    def run(self, ctx: Context) -> Context:
        volume = ctx.need_volume()
        # a model that reads its input slice by slice gets it filled a slice at a time, and
        # its fresh arrays take the source's values outside the field of view in place:
        # no volume-sized copies (memory, issue 20)
        by_slice = getattr(self.model, "reads_slices", False)
        given = fov.FilledSlices(volume) if by_slice else fov.model_input(volume)
        predicted = self.model.predict(given, volume.spacing)  # type: ignore[arg-type]  # duck-typed: reads_slices
        prediction = fov.as_delivered(volume, predicted, inplace=by_slice)
        drill = ctx.study.options.get("inject_hallucination_hu")
        if drill:
            prediction = inject_hallucination(prediction, float(drill), volume.spacing)
        precision = getattr(self.model, "precision", None)
        parameters = {**ctx.parameters, "inference_precision": precision} if precision else ctx.parameters
        return ctx.evolve(model=self.model.card, prediction=prediction, parameters=parameters)


def inject_hallucination(
    prediction: Prediction, contrast_hu: float, spacing: tuple[float, float, float]
) -> Prediction:
    """Gate fire drill: add a 6 mm disc the input does not contain to the middle slice.

    Set by a policy rule's ``options: {inject_hallucination_hu: 80}`` to prove, end to end
    on live traffic, that the hallucination map and the QC gate catch an invented
    structure and hold the output. Never set in a clinical rule.
    """
    mean = prediction.mean.copy()
    k = len(mean) // 2
    mean[k][drill_disc(mean.shape[1:], spacing)] += contrast_hu
    return Prediction(mean=mean, sigma=prediction.sigma)


def drill_disc(plane_shape: tuple[int, ...], spacing: tuple[float, float, float]) -> np.ndarray:
    """Where :func:`inject_hallucination` puts its disc in the middle slice: 6 mm across,
    at 45 % of the rows and half the columns."""
    rows, cols = int(plane_shape[0]), int(plane_shape[1])
    yy, xx = np.mgrid[0:rows, 0:cols]
    radius_px = 3.0 / max(spacing[1], 1e-3)
    return np.asarray((yy - rows * 0.45) ** 2 + (xx - cols * 0.5) ** 2 <= radius_px**2)


@dataclass(frozen=True)
class ScoreHallucination:
    """Data-consistency score of output vs input, and suspect regions above a threshold.

    Outside the field of view the score is 0 and the QC figures do not count it.
    """

    noise_sigma: float | None = None  # None: estimate from the input (Immerkær)
    threshold: float = 5.0
    window: int = 7
    min_voxels: int = 6
    name: str = "score"

    def run(self, ctx: Context) -> Context:
        from models.classical import immerkaer_sigma

        volume = ctx.need_volume()
        prediction = ctx.need_prediction()
        observed, predicted = fov.scoring_pair(volume, prediction)
        sigma = self.noise_sigma
        if sigma is None:  # of the image the model saw (as the denoiser estimates it)
            picks = observed[:: max(1, len(observed) // 8)]
            sigma = float(np.median([immerkaer_sigma(s) for s in picks]))
        score = data_consistency_score(observed, predicted, sigma, window=self.window)
        score = fov.clear_outside(volume, score)
        suspect = suspect_regions(score, self.threshold, min_voxels=self.min_voxels)
        voxel_ml = volume.spacing[0] * volume.spacing[1] * volume.spacing[2] / 1000.0
        units = volume.units or "1"
        within = volume.fov
        mean_sigma = prediction.sigma.mean() if within is None else prediction.sigma[within].mean()
        qc = {
            **ctx.qc,
            "input noise sigma": (round(sigma, 3), units),
            "mean uncertainty": (round(float(mean_sigma), 3), units),
            **suspect_figures(score, suspect, voxel_ml, self.threshold, within=within),
        }
        return ctx.evolve(hallucination=score, suspect=suspect, qc=qc)


def suspect_figures(
    score: np.ndarray,
    suspect: np.ndarray,
    voxel_ml: float,
    threshold: float,
    within: np.ndarray | None = None,
) -> dict[str, tuple[float, str]]:
    """The hallucination QC figures every pipeline reports (the gate's limits read them):
    score p99 and suspect fraction (over ``within``, default every voxel), total and
    largest suspect region (mL), and the threshold used."""
    fraction = suspect.mean() if within is None else suspect.sum() / within.sum()
    return {
        "hallucination score p99": (
            round(upper_percentile_of_parts(spill.values(score, within), 99.0), 3),
            "1",
        ),
        "suspect fraction": (round(float(fraction), 6), "1"),
        "suspect volume": (round(float(suspect.sum() * voxel_ml), 3), "mL"),
        "largest suspect region": (round(largest_region_voxels(suspect) * voxel_ml, 4), "mL"),
        "suspect threshold": (threshold, "1"),
    }


@dataclass(frozen=True)
class Gate:
    """The rule's verdict on the QC figures alone: the report's provisional verdict.

    The node re-applies the same gate after :class:`pipelines.validate.Validate` and its
    destination checks (a failed validation or a refusing destination also holds the job)
    and restates the report with that final verdict before anything may leave; a
    reviewer's approval writes a new report (:mod:`pipelines.writers.report`).
    """

    name: str = "gate"

    def run(self, ctx: Context) -> Context:
        policy = ctx.study.gate_policy
        if policy is None:
            verdict = GateOutcome("release", ("no policy gate",), final=False)
        else:
            figures = {k: float(v[0]) for k, v in ctx.qc.items() if isinstance(v[0], int | float)}
            action, reasons = policy(figures, ())
            verdict = GateOutcome(action, tuple(reasons), final=False)
        said = f"{verdict.action} on the QC figures: {'; '.join(verdict.reasons)}"
        return ctx.evolve(gate=said, verdict=verdict)
