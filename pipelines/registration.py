"""Registration of a prior study to the current one: SimpleITK, mutual information, rigid
then (where asked) affine, with a quality check that can refuse the prior.

:func:`register` takes two :class:`~pipelines.volume.Volume` objects — the *current*
series (fixed) and a *prior* series (moving), each in its own patient coordinate system
(LPS, mm, its own Frame of Reference) — and returns a :class:`Registration`:

- ``matrix``: the 4×4 homogeneous matrix ``M`` that maps a point of the **prior**'s patient
  coordinates to the **current**'s: ``p_current = M @ [x, y, z, 1]`` for ``(x, y, z)`` in the
  prior's Frame of Reference. This is DICOM's convention for a Spatial Registration object
  (PS3.3 C.20.2.1.1): the Frame of Reference Transformation Matrix of a Registration
  Sequence item transforms coordinates *from* the Registered RCS (here the prior's Frame
  of Reference) *to* the Registration RCS (the object's own Frame of Reference, here the
  current's). SimpleITK's optimised transform runs the other way (a current point → the
  prior point that images the same anatomy); ``matrix`` is its inverse.
- ``resampled``: the prior on the current volume's grid (linear interpolation), with
  ``resampled_fov``, where the prior had data;
- quality figures: the mutual information of the two images after registration (Mattes,
  nats, every voxel of the working grid) and the Dice overlap of the two body masks
  (threshold, closing, largest component, holes filled) inside the field of view both
  cover, and that common field of view's share of the current body.

:class:`RegistrationQuality` holds the limits; :attr:`Registration.quality_ok` and
:attr:`Registration.quality_reason` state the verdict, and :func:`require_quality` raises
:class:`RegistrationRefused` (an :class:`~pipelines.base.InputRefused`: the job ends
``refused`` with the one-line reason) for a prior that does not pass — a prior of another
anatomy, or one that overlaps the current too little to be compared with it.

The method (defaults of :class:`RegistrationSettings`): both volumes binned to a working
grid of about 2 mm; a rigid transform (``VersorRigid3DTransform``) initialised by the
centres of mass of the body masks (``"moments"``) or of the image grids (``"geometry"``);
Mattes mutual information (50 bins, 20 % of the voxels, a fixed seed); regular-step
gradient descent with scales from physical shift, over three resolution levels (shrink
4, 2, 1; smoothing 2, 1, 0 mm); for ``mode="affine"`` a 12-parameter affine transform
started from the rigid one, over two more levels. The run is single-threaded by default
and the metric's sampling seeded, so the same inputs give the same matrix to the last bit.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from pipelines.base import InputRefused
from pipelines.volume import Volume

__all__ = [
    "Registration",
    "RegistrationQuality",
    "RegistrationRefused",
    "RegistrationSettings",
    "METHOD_NAME",
    "METHOD_VERSION",
    "REGISTRATION_STAGE",
    "body_mask",
    "register",
    "require_quality",
    "to_sitk",
]

Mode = Literal["rigid", "affine"]

#: The name under which a refused registration is reported (``InputRefused.model``).
REGISTRATION_STAGE = "prior-registration"
#: The registration method as provenance names a model (no learned weights: its
#: "weights" hash is :meth:`RegistrationSettings.sha256`).
METHOD_NAME = "simpleitk-mattes-mi"
METHOD_VERSION = "1.0"


@dataclass(frozen=True)
class RegistrationSettings:
    """How :func:`register` runs. The defaults suit head and body series of 0.5-3 mm."""

    #: Working voxel size (mm): finer series are binned (averaged) to about this first.
    working_spacing_mm: float = 2.0
    #: Pyramid levels of the rigid stage (shrink factor per level, on the working grid).
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    #: Gaussian smoothing per level, mm (as many as ``shrink_factors``).
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    #: Pyramid levels of the affine stage (after the rigid one).
    affine_shrink_factors: tuple[int, ...] = (2, 1)
    affine_smoothing_sigmas_mm: tuple[float, ...] = (1.0, 0.0)
    histogram_bins: int = 50
    #: Share of the working grid's voxels the metric samples (random, seeded) per iteration.
    sampling_fraction: float = 0.2
    seed: int = 20240611
    #: Iterations per level.
    iterations: int = 200
    #: Largest step of the optimiser (mm, with scales from physical shift) and the smallest.
    max_step: float = 2.0
    min_step: float = 1e-3
    #: Centre of the initial transform: the body masks' centres of mass, or the grids' centres.
    initialiser: Literal["moments", "geometry"] = "moments"
    #: Threads of SimpleITK's filters and registration. 1 gives bit-identical results.
    threads: int = 1

    def __post_init__(self) -> None:
        if len(self.shrink_factors) != len(self.smoothing_sigmas_mm) or not self.shrink_factors:
            raise ValueError(
                "RegistrationSettings: 'shrink_factors' and 'smoothing_sigmas_mm' differ in length"
            )
        if (
            len(self.affine_shrink_factors) != len(self.affine_smoothing_sigmas_mm)
            or not self.affine_shrink_factors
        ):
            raise ValueError(
                "RegistrationSettings: 'affine_shrink_factors' and 'affine_smoothing_sigmas_mm' "
                "differ in length"
            )
        if not 0.0 < self.sampling_fraction <= 1.0:
            raise ValueError(
                f"RegistrationSettings: 'sampling_fraction' must be in (0, 1], got {self.sampling_fraction}"
            )
        if self.initialiser not in ("moments", "geometry"):
            raise ValueError(
                "RegistrationSettings: 'initialiser' must be 'moments' or 'geometry', "
                f"got {self.initialiser!r}"
            )
        if self.threads < 1 or self.working_spacing_mm <= 0 or self.iterations < 1:
            raise ValueError(
                "RegistrationSettings: 'threads', 'working_spacing_mm' and 'iterations' must be positive"
            )

    def sha256(self, mode: Mode) -> str:
        """sha256 of the method and every setting (the provenance's ``weights_sha256`` of a
        method without weights): the same definition always names the same thing."""
        definition = {"method": METHOD_NAME, "version": METHOD_VERSION, "mode": mode, **asdict(self)}
        return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class RegistrationQuality:
    """Limits a registration must meet for the prior to be used.

    The Dice overlap of the body masks is the landmark-free check of the alignment: after
    a good registration of the same anatomy the outlines coincide (≥ 0.9 on heads); a
    prior of another body region, or one registered to the wrong place, does not. The
    common field of view guards the Dice from a prior that covers little of the current.
    Mutual information depends on the modalities; it has no limit unless one is set.
    """

    min_dice: float = 0.85
    #: Smallest share of the current's body mask inside the prior's field of view.
    min_overlap: float = 0.5
    #: Smallest mutual information (nats, Mattes); None: not limited.
    min_mutual_information: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_dice <= 1.0 or not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError("RegistrationQuality: 'min_dice' and 'min_overlap' must lie in [0, 1]")

    def verdict(self, dice: float, overlap: float, mutual_information: float) -> tuple[bool, str]:
        """``(ok, reason)``: every limit missed, in one line; ``""`` when all are met."""
        missed = []
        if overlap < self.min_overlap:
            missed.append(
                f"the prior covers {overlap:.0%} of the current body (common field of view), "
                f"below {self.min_overlap:.0%}"
            )
        if dice < self.min_dice:
            missed.append(f"body-mask Dice {dice:.3f} below {self.min_dice:.3f}")
        if self.min_mutual_information is not None and mutual_information < self.min_mutual_information:
            missed.append(
                f"mutual information {mutual_information:.3f} nats below {self.min_mutual_information:.3f}"
            )
        return (not missed, "; ".join(missed))


@dataclass(frozen=True, eq=False)
class Registration:
    """A prior registered to the current series (see the module docstring for the convention)."""

    #: "rigid" or "affine".
    mode: str
    #: 4×4 float64: prior patient coordinates (LPS mm) → current patient coordinates.
    matrix: np.ndarray
    current_series_uid: str
    current_frame_of_reference_uid: str
    prior_series_uid: str
    prior_frame_of_reference_uid: str
    #: The prior on the current grid, ``(slices, rows, columns)`` float32 in the prior's units.
    resampled: np.ndarray
    #: Where ``resampled`` holds the prior's data (False outside the prior's field of view).
    resampled_fov: np.ndarray
    #: Mutual information after registration (Mattes, nats, full working grid).
    mutual_information: float
    #: Dice of the body masks inside the common field of view.
    dice: float
    #: Share of the current body mask inside the prior's field of view.
    overlap: float
    quality_ok: bool
    #: "" when ``quality_ok``; otherwise every limit missed, in one line.
    quality_reason: str
    quality: RegistrationQuality
    settings: RegistrationSettings
    #: Optimiser iterations at the finest level of each stage, and the last stop condition.
    iterations: dict[str, int] = field(default_factory=dict)
    stop_condition: str = ""
    seconds: float = 0.0

    @property
    def matrix_type(self) -> str:
        """Frame of Reference Transformation Matrix Type: ``RIGID`` or ``AFFINE``."""
        return "RIGID" if self.mode == "rigid" else "AFFINE"

    def to_current(self, points: Any) -> np.ndarray:
        """Prior patient coordinates ``(n, 3)`` (or one point) → current patient coordinates."""
        p = np.asarray(points, dtype=float)
        return p @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def to_prior(self, points: Any) -> np.ndarray:
        """Current patient coordinates → prior patient coordinates (the inverse mapping)."""
        inverse = np.linalg.inv(self.matrix)
        p = np.asarray(points, dtype=float)
        return p @ inverse[:3, :3].T + inverse[:3, 3]

    def figures(self) -> dict[str, float]:
        """The quality figures, for the job's QC and provenance record."""
        return {
            "registration_mutual_information": self.mutual_information,
            "registration_dice": self.dice,
            "registration_overlap": self.overlap,
        }

    def provenance(self) -> dict[str, Any]:
        """What the provenance record keeps: frames, series, matrix, method, figures, verdict."""
        s = self.settings
        return {
            "mode": self.mode,
            "matrix_type": self.matrix_type,
            "matrix": [float(v) for v in self.matrix.ravel()],
            "convention": (
                "prior (registered) patient coordinates -> current (registration) patient coordinates"
            ),
            "current_series_uid": self.current_series_uid,
            "current_frame_of_reference_uid": self.current_frame_of_reference_uid,
            "prior_series_uid": self.prior_series_uid,
            "prior_frame_of_reference_uid": self.prior_frame_of_reference_uid,
            "method": (
                f"SimpleITK {sitk.Version.VersionString()} Mattes MI ({s.histogram_bins} bins, "
                f"{s.sampling_fraction:g} sampled, seed {s.seed}), regular-step gradient descent, "
                f"shrink {list(s.shrink_factors)}, smoothing {list(s.smoothing_sigmas_mm)} mm, "
                f"working grid {s.working_spacing_mm:g} mm, initialiser {s.initialiser}"
            ),
            **self.figures(),
            "quality_ok": self.quality_ok,
            "quality_reason": self.quality_reason,
            "iterations": dict(self.iterations),
            "stop_condition": self.stop_condition,
            "seconds": self.seconds,
        }


class RegistrationRefused(InputRefused):
    """A prior whose registration misses the quality limits: the job ends ``refused``."""

    def __init__(self, registration: Registration) -> None:
        self.registration = registration
        super().__init__(
            REGISTRATION_STAGE,
            registration.prior_series_uid,
            [f"registration to the current series failed the quality check: {registration.quality_reason}"],
        )


def require_quality(registration: Registration) -> Registration:
    """``registration`` when it passed its quality check; else :class:`RegistrationRefused`."""
    if not registration.quality_ok:
        raise RegistrationRefused(registration)
    return registration


# --------------------------------------------------------------------------- images


def to_sitk(volume: Volume) -> sitk.Image:
    """The volume as a float32 SimpleITK image with its patient geometry (LPS).

    ITK's index is (column, row, slice); ``Volume.spacing`` is (slice, row, column), where
    the row spacing is the distance between rows (along the column direction).
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array, dtype=np.float32))
    image.SetSpacing((float(volume.spacing[2]), float(volume.spacing[1]), float(volume.spacing[0])))
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    image.SetDirection(tuple(float(v) for v in volume.direction().ravel()))
    return image


def resample_onto(volume: Volume, array: np.ndarray, reference: Volume, *, order: int = 1) -> np.ndarray:
    """``array`` (on ``volume``'s grid) on ``reference``'s grid, by patient coordinates
    (trilinear, ``order=0``: nearest); unchanged when the two grids are the same. Both volumes
    must be on one Frame of Reference (the caller checks: no registration happens here)."""
    if (
        volume.array.shape == reference.array.shape
        and np.allclose(volume.orientation, reference.orientation, atol=1e-4)
        and np.allclose(
            [s.position for s in volume.slices], [s.position for s in reference.slices], atol=0.01
        )
    ):
        return np.asarray(array, np.float32)
    moving = to_sitk(volume)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.CopyInformation(moving)
    out = sitk.Resample(
        image,
        to_sitk(reference),
        sitk.Transform(),
        sitk.sitkLinear if order else sitk.sitkNearestNeighbor,
        0.0,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out)


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _working(image: sitk.Image, spacing_mm: float, threads: int) -> sitk.Image:
    """Bin (average) each axis whose voxels are finer than ``spacing_mm`` to about it."""
    factors = [max(1, int(round(spacing_mm / s))) for s in image.GetSpacing()]
    if all(f == 1 for f in factors):
        return image
    binning = sitk.BinShrinkImageFilter()
    binning.SetShrinkFactors(factors)
    binning.SetNumberOfThreads(threads)
    return binning.Execute(image)


def body_mask(array: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The patient's body: above an Otsu threshold, closed (about 4 mm), the largest
    connected component, holes filled in 3-D and in every slice of each axis.

    ``spacing`` is the voxel size (mm) along the array's axes. A dark layer inside the
    outline (skull on MR, lung on CT) is filled; air outside stays out.
    """
    values = np.asarray(array, dtype=np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or float(finite.max()) <= float(finite.min()):
        return np.zeros(values.shape, bool)
    threshold = _otsu(finite)
    mask = values > threshold
    radius = [max(1, int(round(4.0 / s))) for s in spacing]
    structure = np.ones([2 * r + 1 for r in radius], bool)
    # close inside a padded copy so the body's edge at the border of the grid is not eaten
    padded = np.pad(mask, [(r, r) for r in radius])
    mask = ndi.binary_closing(padded, structure)[tuple(slice(r, -r) for r in radius)]
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    mask = ndi.binary_fill_holes(mask)
    for axis in range(mask.ndim):
        filled = np.stack([ndi.binary_fill_holes(s) for s in np.moveaxis(mask, axis, 0)])
        mask = np.moveaxis(filled, 0, axis)
    return np.asarray(mask, bool)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (clipped to their 0.5-99.5 percentiles)."""
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if hi <= lo:
        return lo
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight = np.cumsum(counts).astype(float)
    total = weight[-1]
    mean = np.cumsum(counts * centres)
    between = (mean[-1] * weight / total - mean) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return float(centres[int(np.argmax(between[:-1]))])


def _array_spacing(image: sitk.Image) -> tuple[float, float, float]:
    sx, sy, sz = image.GetSpacing()
    return (sz, sy, sx)


# --------------------------------------------------------------------------- registration


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """SimpleITK's default thread count set to ``count`` for the block, then restored.

    Filters that the registration method runs inside (pyramid smoothing, the metric's
    threader) take the global default, not the method's own setting; with several threads
    their partial sums are added in varying order, and the matrix differs in the 13th digit
    from run to run. One thread makes it bit-identical.
    """
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _method(
    settings: RegistrationSettings, shrink: Sequence[int], sigmas: Sequence[float]
) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(settings.threads)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(settings.sampling_fraction, settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.max_step,
        minStep=settings.min_step,
        numberOfIterations=settings.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(sigmas))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _mask_image(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    return _like(mask.astype(np.uint8), reference)


def _initial(
    fixed: sitk.Image, moving: sitk.Image, fixed_mask: np.ndarray, moving_mask: np.ndarray, how: str
) -> sitk.VersorRigid3DTransform:
    transform = sitk.VersorRigid3DTransform()
    if how == "moments" and fixed_mask.any() and moving_mask.any():
        return sitk.VersorRigid3DTransform(
            sitk.CenteredTransformInitializer(
                sitk.Cast(_mask_image(fixed_mask, fixed), sitk.sitkFloat32),
                sitk.Cast(_mask_image(moving_mask, moving), sitk.sitkFloat32),
                transform,
                sitk.CenteredTransformInitializerFilter.MOMENTS,
            )
        )
    return sitk.VersorRigid3DTransform(
        sitk.CenteredTransformInitializer(
            fixed, moving, transform, sitk.CenteredTransformInitializerFilter.GEOMETRY
        )
    )


def _homogeneous(transform: sitk.Transform) -> np.ndarray:
    """4×4 matrix of a matrix-offset transform (x → A x + b)."""
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(transform.GetMatrix())  # type: ignore[attr-defined]
    affine.SetCenter(transform.GetCenter())  # type: ignore[attr-defined]
    affine.SetTranslation(transform.GetTranslation())  # type: ignore[attr-defined]
    out = np.eye(4)
    out[:3, :3] = np.array(affine.GetMatrix(), dtype=float).reshape(3, 3)
    out[:3, 3] = np.array(affine.TransformPoint((0.0, 0.0, 0.0)), dtype=float)
    return out


def register(
    current: Volume,
    prior: Volume,
    *,
    mode: Mode = "rigid",
    settings: RegistrationSettings | None = None,
    quality: RegistrationQuality | None = None,
) -> Registration:
    """Register ``prior`` (moving) to ``current`` (fixed) and check the result.

    Parameters
    ----------
    current
        The current series: the fixed image, whose grid the prior is resampled onto.
    prior
        The prior series, in its own Frame of Reference.
    mode
        ``"rigid"`` (6 parameters) or ``"affine"`` (rigid, then 12 parameters).
    settings
        How to register (:class:`RegistrationSettings`; defaults when None).
    quality
        The limits (:class:`RegistrationQuality`; defaults when None). A registration that
        misses them is returned with ``quality_ok`` False; :func:`require_quality` refuses it.

    Returns
    -------
    Registration
        ``matrix`` maps prior patient coordinates to current patient coordinates.

    Raises
    ------
    ValueError
        ``mode`` unknown, or a volume without image content.
    """
    if mode not in ("rigid", "affine"):
        raise ValueError(f"register: 'mode' must be 'rigid' or 'affine', got {mode!r}")
    settings = settings or RegistrationSettings()
    quality = quality or RegistrationQuality()
    with _threads(settings.threads):
        return _register(current, prior, mode, settings, quality)


def _register(
    current: Volume, prior: Volume, mode: Mode, settings: RegistrationSettings, quality: RegistrationQuality
) -> Registration:
    started = time.perf_counter()
    threads = settings.threads

    fixed_full, moving_full = to_sitk(current), to_sitk(prior)
    fixed = _working(fixed_full, settings.working_spacing_mm, threads)
    moving = _working(moving_full, settings.working_spacing_mm, threads)
    fixed_mask = body_mask(sitk.GetArrayViewFromImage(fixed), _array_spacing(fixed))
    moving_mask = body_mask(sitk.GetArrayViewFromImage(moving), _array_spacing(moving))
    for volume, mask in ((current, fixed_mask), (prior, moving_mask)):
        if not mask.any():
            raise ValueError(f"register: series {volume.series_uid} has no body to register (blank image)")

    rigid = _initial(fixed, moving, fixed_mask, moving_mask, settings.initialiser)
    method = _method(settings, settings.shrink_factors, settings.smoothing_sigmas_mm)
    method.SetInitialTransform(rigid, inPlace=True)
    method.Execute(fixed, moving)
    iterations = {"rigid": int(method.GetOptimizerIteration())}
    stop = method.GetOptimizerStopConditionDescription()
    final: sitk.Transform = rigid
    if mode == "affine":
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetCenter(rigid.GetCenter())
        affine.SetTranslation(rigid.GetTranslation())
        method = _method(settings, settings.affine_shrink_factors, settings.affine_smoothing_sigmas_mm)
        method.SetInitialTransform(affine, inPlace=True)
        method.Execute(fixed, moving)
        iterations["affine"] = int(method.GetOptimizerIteration())
        stop = method.GetOptimizerStopConditionDescription()
        final = affine

    current_to_prior = _homogeneous(final)
    matrix = np.linalg.inv(current_to_prior)

    # Quality, on the working grid: full (unsampled) MI, body masks inside the common FOV.
    evaluation = sitk.ImageRegistrationMethod()
    evaluation.SetNumberOfThreads(threads)
    evaluation.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    evaluation.SetMetricSamplingStrategy(evaluation.NONE)
    evaluation.SetInterpolator(sitk.sitkLinear)
    evaluation.SetInitialTransform(final)
    mutual_information = -float(evaluation.MetricEvaluate(fixed, moving))
    warped_mask = sitk.GetArrayFromImage(
        sitk.Resample(_mask_image(moving_mask, moving), fixed, final, sitk.sitkNearestNeighbor, 0)
    ).astype(bool)
    prior_fov = sitk.GetArrayFromImage(
        sitk.Resample(
            _like(np.ones(sitk.GetArrayViewFromImage(moving).shape, np.uint8), moving),
            fixed,
            final,
            sitk.sitkNearestNeighbor,
            0,
        )
    ).astype(bool)
    current_body = fixed_mask & prior_fov
    prior_body = warped_mask & prior_fov
    denominator = int(current_body.sum()) + int(prior_body.sum())
    dice = 2.0 * int((current_body & prior_body).sum()) / denominator if denominator else 0.0
    overlap = int(current_body.sum()) / max(int(fixed_mask.sum()), 1)
    ok, reason = quality.verdict(dice, overlap, mutual_information)

    # The prior on the current's own grid, at full resolution.
    resampler = sitk.ResampleImageFilter()
    resampler.SetNumberOfThreads(threads)
    resampler.SetReferenceImage(fixed_full)
    resampler.SetTransform(final)
    resampler.SetInterpolator(sitk.sitkLinear)
    outside = float(np.min(prior.array)) if prior.array.size else 0.0
    resampler.SetDefaultPixelValue(outside)
    resampled = sitk.GetArrayFromImage(resampler.Execute(moving_full)).astype(np.float32)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    resampler.SetDefaultPixelValue(0)
    ones = _like(np.ones(prior.array.shape, np.uint8), moving_full)
    resampled_fov = sitk.GetArrayFromImage(resampler.Execute(ones)).astype(bool)

    return Registration(
        mode=mode,
        matrix=matrix,
        current_series_uid=current.series_uid,
        current_frame_of_reference_uid=current.frame_of_reference_uid,
        prior_series_uid=prior.series_uid,
        prior_frame_of_reference_uid=prior.frame_of_reference_uid,
        resampled=resampled,
        resampled_fov=resampled_fov,
        mutual_information=mutual_information,
        dice=float(dice),
        overlap=float(overlap),
        quality_ok=ok,
        quality_reason=reason,
        quality=quality,
        settings=settings,
        iterations=iterations,
        stop_condition=str(stop),
        seconds=time.perf_counter() - started,
    )
