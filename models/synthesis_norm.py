"""Per-volume intensity normalisation shared by every MR contrast-synthesis method (issue 18).

MR intensities have no absolute scale: the receiver gain, the field strength and the protocol
change every series by an unknown factor. Every synthesis method (the baselines of
:mod:`models.evaluation.synthesis_baselines` and the network that will follow) therefore sees
its inputs, and predicts its target, in **white-matter units**:

1. *Brain.* The intracranial mask comes from the T1w input (:func:`brain_mask`, the classical
   mask of :mod:`models.brain_tumour_seg` with T1w standing in for both of its inputs). The
   evaluation passes the simulator's true mask instead, so all methods are scored on the same
   voxels.
2. *White matter.* Inside the brain, voxels darker than :data:`CSF_FRACTION` of the brain's
   median T1w are CSF; the rest are split in two by a 1-D two-means of their T1w (grey and
   white matter; white matter is the brighter class on T1w). The white-matter mask is found
   once, on T1w, and used for every contrast of the study (T1w is an input of every task).
3. *Scale.* Each contrast is divided by its own median over that white-matter mask, so white
   matter is 1.0 in every contrast (lesions, oedema and a few misclassified grey-matter voxels
   do not move a median). Outside the brain nothing is changed but the scale.

The **target** (FLAIR or T2w) is predicted in the same units: the true target is normalised by
its median over the *inputs'* white-matter mask (:func:`normalise_target`), which is what the
evaluation scores against; a pipeline multiplies a prediction by any display scale it wants.

Every step uses only ratios, ranks and Otsu's threshold, so the result does not change when a
volume is multiplied by a positive constant (checked in ``tests/test_synthesis_baselines.py``).
There is no bias-field correction: the simulated receive field (log-std 0.05–0.15) is shared by
all contrasts of a study, and whatever a method makes of it is part of the method.

This module is used at run time (it imports no simulator, training or evaluation code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models.brain_tumour_seg import _brain_mask, _two_means

#: Synthesis tasks: name -> (input contrasts, target contrast).
TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "t1w+t2w->flair": (("t1w", "t2w"), "flair"),
    "t1w->flair": (("t1w",), "flair"),
    "t1w->t2w": (("t1w",), "t2w"),
}
#: Brain voxels below this fraction of the brain's median T1w are CSF (not used for the scale).
CSF_FRACTION = 0.65
#: Fewest white-matter voxels a scale may rest on.
MIN_WHITE_VOXELS = 100


class NormalisationError(ValueError):
    """The inputs cannot be normalised (no brain, no white matter, missing contrast)."""


def task_contrasts(task: str) -> tuple[tuple[str, ...], str]:
    """Input contrasts and target of a task name of :data:`TASKS`."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown synthesis task {task!r}: choose one of {', '.join(TASKS)}") from None


def brain_mask(t1w: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Intracranial mask from a T1w volume ``(slices, rows, cols)`` (for run time; see the module).

    On the simulated studies of :mod:`models.sim.synthesis` its Dice with the true mask is
    ~0.98 (3 training seeds, 128 x 128 x 32).
    """
    t1w = np.asarray(t1w, np.float32)
    if t1w.ndim != 3:
        raise NormalisationError(f"T1w: expected a (slices, rows, cols) volume, got shape {t1w.shape}")
    mask, _, _ = _brain_mask(t1w, t1w, spacing_mm)
    return np.asarray(mask, bool)


def white_matter_mask(t1w: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """White matter: the brighter of the two T1w classes of non-CSF brain (see the module)."""
    t1w = np.asarray(t1w, np.float32)
    brain = np.asarray(brain, bool)
    if t1w.shape != brain.shape:
        raise NormalisationError(f"T1w {t1w.shape} and brain mask {brain.shape} differ")
    values = t1w[brain]
    if values.size < MIN_WHITE_VOXELS:
        raise NormalisationError("brain mask: too few voxels to find white matter")
    tissue = brain & (t1w > CSF_FRACTION * float(np.median(values)))
    tv = t1w[tissue]
    if tv.size < MIN_WHITE_VOXELS:
        raise NormalisationError("brain mask: too few non-CSF voxels to find white matter")
    _, _, cut = _two_means(tv, float(np.percentile(tv, 25)), float(np.percentile(tv, 90)))
    white = tissue & (t1w >= cut)
    if np.count_nonzero(white) < MIN_WHITE_VOXELS:
        raise NormalisationError("too few white-matter voxels for a scale")
    return np.asarray(white)


def white_matter_scale(image: np.ndarray, white: np.ndarray) -> float:
    """Median of ``image`` over the white-matter mask (the divisor of :func:`normalise_target`)."""
    image = np.asarray(image, np.float32)
    if image.shape != white.shape:
        raise NormalisationError(f"image {image.shape} and white-matter mask {white.shape} differ")
    scale = float(np.median(image[white])) if white.any() else 0.0
    if not np.isfinite(scale) or scale <= 0:
        raise NormalisationError(f"white-matter median {scale}: not a positive MR magnitude")
    return scale


@dataclass(frozen=True)
class Normalised:
    """The inputs in white-matter units.

    Attributes
    ----------
    images : dict
        Contrast -> float32 volume divided by its scale.
    scales : dict
        Contrast -> the divisor (its white-matter median, image units).
    white : numpy.ndarray
        The white-matter mask (from T1w) the scales were taken over.
    brain : numpy.ndarray
        The brain mask used.
    """

    images: dict[str, np.ndarray]
    scales: dict[str, float]
    white: np.ndarray
    brain: np.ndarray


def normalise_inputs(inputs: Mapping[str, np.ndarray], brain: np.ndarray) -> Normalised:
    """Each input contrast divided by its white-matter median; T1w must be among the inputs."""
    if "t1w" not in inputs:
        raise NormalisationError("synthesis inputs must include T1w (it defines the white-matter mask)")
    brain = np.asarray(brain, bool)
    white = white_matter_mask(inputs["t1w"], brain)
    images, scales = {}, {}
    for name, image in inputs.items():
        scale = white_matter_scale(image, white)
        images[name] = (np.asarray(image, np.float32) / np.float32(scale)).astype(np.float32)
        scales[name] = scale
    return Normalised(images=images, scales=scales, white=white, brain=brain)


def normalise_target(target: np.ndarray, white: np.ndarray) -> np.ndarray:
    """The target contrast in white-matter units (its median over the inputs' white matter)."""
    scale = white_matter_scale(target, white)
    return (np.asarray(target, np.float32) / np.float32(scale)).astype(np.float32)
