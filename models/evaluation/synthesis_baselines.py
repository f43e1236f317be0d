"""Classical MR contrast-synthesis baselines, for the synthesis network to beat (issue 18).

Both see what a network would see — the raw input contrasts and the brain mask — normalise
them with :func:`models.synthesis_norm.normalise_inputs` (white-matter units) and predict the
target contrast in the same units inside the brain (0 outside). They are fitted on
training-role simulated studies only (:data:`models.evaluation.synthesis_eval.TRAIN_SEEDS`),
never on test studies, and are deterministic (fixed-seed voxel subsample, fixed k-means start).

* :class:`TissueRegression` — per-tissue intensity regression. Brain voxels are put in
  :data:`N_CLASSES` classes by k-means on their normalised input intensities (T1w, plus T2w
  when it is an input; the centres are fitted on the training voxels, a new voxel joins the
  nearest centre); per class, the target is a polynomial of degree :data:`DEGREE` in the inputs
  (least squares on the training voxels of that class). It knows each voxel's own intensities
  and nothing of its neighbourhood; lesions that the inputs show only faintly (T1w-only tasks)
  fall into the white-matter class and are predicted as white matter.
* :class:`HistogramMatching` — the nearest acquired contrast, its in-brain histogram mapped onto
  the pooled training histogram of the target (quantile mapping: a voxel at rank ``q`` of the
  source's brain voxels gets the target's training quantile ``q``). The source is T2w for FLAIR
  when T2w is an input, else T1w; T1w for T2w. The map is monotone; its direction (increasing
  or decreasing) is the one with the smaller mean absolute error on (up to 8 of) the training
  studies. T1w → T2w inverts (CSF is dark on T1w, bright on T2w); T1w → FLAIR keeps the
  increasing direction. T2w → FLAIR has no good direction: increasing paints the CSF (nulled
  on FLAIR) bright, decreasing paints the lesions dark; the training error picks decreasing
  (CSF is the larger volume), so this baseline finds no lesions — its known failure.

Both return float32 volumes ``(slices, rows, cols)`` and expose their parameters for the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from models.synthesis_norm import normalise_inputs, normalise_target, task_contrasts

#: Brain voxels sampled per fitting study (fixed-seed subsample: deterministic).
SAMPLES_PER_STUDY = 20_000
#: Tissue classes of the regression baseline (CSF, grey, white matter).
N_CLASSES = 3
#: Polynomial degree of the per-class regression (2: quadratic with cross terms).
DEGREE = 2
#: Quantile levels of the histogram-matching reference.
N_QUANTILES = 1001
_KMEANS_ITERATIONS = 50


class NotFitted(RuntimeError):
    """``predict`` was called before ``fit``."""


class FittingStudy(Protocol):
    """What fitting needs of a study (:class:`models.sim.synthesis.SimulatedMultiContrast` has it)."""

    @property
    def images(self) -> Mapping[str, np.ndarray]: ...

    @property
    def brain(self) -> np.ndarray: ...


@dataclass(frozen=True)
class _Samples:
    inputs: np.ndarray  # (n, n_inputs) normalised input intensities
    target: np.ndarray  # (n,) normalised target


def _sample(
    studies: Sequence[FittingStudy], inputs: tuple[str, ...], target: str, per_study: int, seed: int = 0
) -> _Samples:
    if not studies:
        raise ValueError("studies: need at least one fitting study")
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for s in studies:
        norm = normalise_inputs({c: s.images[c] for c in inputs}, s.brain)
        truth = normalise_target(s.images[target], norm.white)
        idx = np.flatnonzero(norm.brain)
        pick = np.sort(rng.choice(idx, size=min(per_study, idx.size), replace=False))
        xs.append(np.stack([norm.images[c].ravel()[pick] for c in inputs], axis=1))
        ys.append(truth.ravel()[pick])
    return _Samples(np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64))


def _design(x: np.ndarray, degree: int) -> np.ndarray:
    """Polynomial features of ``x`` ``(n, d)`` up to ``degree`` (1, x_i, x_i x_j, ...)."""
    cols = [np.ones(len(x))]
    d = x.shape[1]
    if degree >= 1:
        cols += [x[:, i] for i in range(d)]
    if degree >= 2:
        cols += [x[:, i] * x[:, j] for i in range(d) for j in range(i, d)]
    if degree >= 3:
        raise ValueError("degree: 0, 1 or 2")
    return np.stack(cols, axis=1)


def _kmeans(x: np.ndarray, k: int) -> np.ndarray:
    """Deterministic k-means centres of ``x`` ``(n, d)``, started at quantiles of the first column."""
    start = np.quantile(x[:, 0], (np.arange(k) + 0.5) / k)
    centres = np.stack([x[np.argmin(np.abs(x[:, 0] - q))] for q in start])
    for _ in range(_KMEANS_ITERATIONS):
        labels = _nearest(x, centres)
        new = np.stack([x[labels == c].mean(axis=0) if np.any(labels == c) else centres[c] for c in range(k)])
        if np.allclose(new, centres, atol=1e-6):
            break
        centres = new
    return centres[np.argsort(centres[:, 0])]  # ordered by T1w: CSF, grey, white


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d2 = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    return np.asarray(np.argmin(d2, axis=1))


def _check_inputs(inputs: Mapping[str, np.ndarray], names: tuple[str, ...], brain: np.ndarray) -> None:
    missing = [c for c in names if c not in inputs]
    if missing:
        raise ValueError(f"inputs: missing contrast(s) {', '.join(missing)}")
    for c in names:
        if np.shape(inputs[c]) != np.shape(brain):
            raise ValueError(f"inputs: {c} {np.shape(inputs[c])} and brain {np.shape(brain)} differ")


@dataclass(frozen=True)
class TissueRegressionParameters:
    """Class centres (normalised input intensities) and per-class polynomial coefficients."""

    inputs: list[str]
    centres: list[list[float]]
    coefficients: list[list[float]]
    degree: int
    voxels_per_class: list[int]


class TissueRegression:
    """Per-tissue intensity regression of the target on the inputs (see the module).

    Examples
    --------
    >>> baseline = TissueRegression("t1w+t2w->flair").fit(training_studies)  # doctest: +SKIP
    >>> flair_wm_units = baseline.predict({"t1w": t1w, "t2w": t2w}, brain)   # doctest: +SKIP
    """

    name = "tissue regression"

    def __init__(self, task: str, *, n_classes: int = N_CLASSES, degree: int = DEGREE) -> None:
        self.task = task
        self.inputs, self.target = task_contrasts(task)
        self.n_classes = n_classes
        self.degree = degree
        self.params: TissueRegressionParameters | None = None

    def fit(self, studies: Sequence[FittingStudy]) -> TissueRegression:
        """Class centres and per-class regressions on training studies (never test studies)."""
        s = _sample(studies, self.inputs, self.target, SAMPLES_PER_STUDY)
        centres = _kmeans(s.inputs, self.n_classes)
        labels = _nearest(s.inputs, centres)
        coefs, counts = [], []
        for c in range(self.n_classes):
            sel = labels == c
            design = _design(s.inputs[sel], self.degree)
            if sel.sum() < 10 * design.shape[1]:
                raise ValueError(f"class {c}: {int(sel.sum())} voxels are too few to fit")
            beta, *_ = np.linalg.lstsq(design, s.target[sel], rcond=None)
            coefs.append([float(b) for b in beta])
            counts.append(int(sel.sum()))
        self.params = TissueRegressionParameters(
            inputs=list(self.inputs),
            centres=[[round(float(v), 4) for v in row] for row in centres],
            coefficients=coefs,
            degree=self.degree,
            voxels_per_class=counts,
        )
        return self

    def classes(self, inputs: Mapping[str, np.ndarray], brain: np.ndarray) -> np.ndarray:
        """``int8`` class per voxel (0 CSF-like … by increasing T1w; −1 outside the brain)."""
        if self.params is None:
            raise NotFitted("TissueRegression.classes: call fit(studies) first")
        _check_inputs(inputs, self.inputs, brain)
        norm = normalise_inputs({c: inputs[c] for c in self.inputs}, brain)
        x = np.stack([norm.images[c][norm.brain] for c in self.inputs], axis=1).astype(np.float64)
        out = np.full(norm.brain.shape, -1, np.int8)
        out[norm.brain] = _nearest(x, np.asarray(self.params.centres))
        return out

    def predict(self, inputs: Mapping[str, np.ndarray], brain: np.ndarray) -> np.ndarray:
        """The target in white-matter units inside the brain, 0 outside."""
        if self.params is None:
            raise NotFitted("TissueRegression.predict: call fit(studies) first")
        _check_inputs(inputs, self.inputs, brain)
        norm = normalise_inputs({c: inputs[c] for c in self.inputs}, brain)
        x = np.stack([norm.images[c][norm.brain] for c in self.inputs], axis=1).astype(np.float64)
        labels = _nearest(x, np.asarray(self.params.centres))
        design = _design(x, self.params.degree)
        coefs = np.asarray(self.params.coefficients)
        values = np.einsum("nk,nk->n", design, coefs[labels])
        out = np.zeros(norm.brain.shape, np.float32)
        out[norm.brain] = np.maximum(values, 0.0)
        return out

    def parameters(self) -> dict[str, Any]:
        """The fitted parameters, for the report."""
        if self.params is None:
            raise NotFitted("TissueRegression.parameters: call fit(studies) first")
        return asdict(self.params)


def matching_source(task: str) -> str:
    """T2w for FLAIR when T2w is an input, else T1w; T1w for T2w."""
    inputs, target = task_contrasts(task)
    if target == "flair" and "t2w" in inputs:
        return "t2w"
    return "t1w"


@dataclass(frozen=True)
class HistogramMatchingParameters:
    """Source contrast, direction of the map and the target's pooled training quantiles."""

    source: str
    decreasing: bool
    levels: list[float]
    quantiles: list[float]


class HistogramMatching:
    """Quantile mapping of the nearest acquired contrast onto the target's training histogram.

    Examples
    --------
    >>> baseline = HistogramMatching("t1w->t2w").fit(training_studies)  # doctest: +SKIP
    >>> t2w_wm_units = baseline.predict({"t1w": t1w}, brain)             # doctest: +SKIP
    """

    name = "histogram matching"

    def __init__(self, task: str, *, source: str | None = None, n_quantiles: int = N_QUANTILES) -> None:
        self.task = task
        self.inputs, self.target = task_contrasts(task)
        self.source = matching_source(task) if source is None else source
        if self.source not in self.inputs:
            raise ValueError(f"source {self.source!r} is not an input of {task!r}")
        self.levels = np.linspace(0.0, 1.0, n_quantiles)
        self.params: HistogramMatchingParameters | None = None

    def fit(self, studies: Sequence[FittingStudy]) -> HistogramMatching:
        """Pooled target quantiles over the training studies' brains; the direction with the
        smaller mean absolute error on those studies."""
        s = _sample(studies, self.inputs, self.target, SAMPLES_PER_STUDY)
        quantiles = np.quantile(s.target, self.levels)
        errors = {}
        for decreasing in (False, True):
            self.params = HistogramMatchingParameters(
                self.source, decreasing, [float(v) for v in self.levels], [float(v) for v in quantiles]
            )
            err = []
            for st in studies[: min(len(studies), 8)]:
                norm = normalise_inputs({c: st.images[c] for c in self.inputs}, st.brain)
                truth = normalise_target(st.images[self.target], norm.white)
                pred = self._map(norm.images[self.source], norm.brain)
                err.append(float(np.mean(np.abs(pred[norm.brain] - truth[norm.brain]))))
            errors[decreasing] = float(np.mean(err))
        self.params = HistogramMatchingParameters(
            self.source,
            errors[True] < errors[False],
            [float(v) for v in self.levels],
            [float(v) for v in quantiles],
        )
        return self

    def _map(self, source: np.ndarray, brain: np.ndarray) -> np.ndarray:
        assert self.params is not None
        values = source[brain].astype(np.float64)
        order = np.argsort(values, kind="stable")
        ranks = np.empty(values.size, np.float64)
        ranks[order] = (np.arange(values.size) + 0.5) / values.size
        if self.params.decreasing:
            ranks = 1.0 - ranks
        out = np.zeros(brain.shape, np.float32)
        out[brain] = np.interp(ranks, self.params.levels, self.params.quantiles)
        return out

    def predict(self, inputs: Mapping[str, np.ndarray], brain: np.ndarray) -> np.ndarray:
        """The target in white-matter units inside the brain, 0 outside."""
        if self.params is None:
            raise NotFitted("HistogramMatching.predict: call fit(studies) first")
        _check_inputs(inputs, self.inputs, brain)
        norm = normalise_inputs({c: inputs[c] for c in self.inputs}, brain)
        return self._map(norm.images[self.source], norm.brain)

    def parameters(self) -> dict[str, Any]:
        """Source, direction and a coarse view of the reference quantiles (every 5 %)."""
        if self.params is None:
            raise NotFitted("HistogramMatching.parameters: call fit(studies) first")
        step = max(1, (len(self.params.levels) - 1) // 20)
        return {
            "source": self.params.source,
            "decreasing": self.params.decreasing,
            "levels": [round(v, 3) for v in self.params.levels[::step]],
            "quantiles": [round(v, 4) for v in self.params.quantiles[::step]],
        }
