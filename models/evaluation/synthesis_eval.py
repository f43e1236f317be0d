"""Evaluation harness of MR contrast synthesis on simulated studies (issue 18).

Any predictor plugs in: an object with a ``name`` and
``predict(inputs: dict[str, ndarray], brain: ndarray)`` that returns the target contrast in
white-matter units (:mod:`models.synthesis_norm`) as an array, or a :class:`SynthesisPrediction`
with a per-voxel σ. The two classical baselines (:mod:`models.evaluation.synthesis_baselines`)
are fitted on training seeds (:data:`TRAIN_SEEDS`) and every method is scored on test seeds
(:data:`TEST_SEEDS`) that nothing is fitted or tuned on. Every number is computed on SIMULATED
data (:mod:`models.sim.synthesis`).

Per test study, the predictor gets the raw input contrasts and the simulator's true
intracranial mask (all methods judged on the same voxels); the truth is the target contrast
normalised by its median over the inputs' white-matter mask
(:func:`models.synthesis_norm.normalise_target`).

* pixel: mean absolute error in the brain and per tissue (the simulator's labels: CSF, grey,
  white matter, lesion, tumour core, oedema; white-matter units), PSNR and SSIM over the brain
  (:func:`models.evaluation.pixel.pixel_metrics`, images clipped to :data:`WINDOWS` whose width is
  the data range) — mean over studies, and per-tissue MAE pooled over all voxels;
* task (FLAIR targets): the fixed detector :mod:`models.evaluation.wm_lesions` on the synthetic
  and on the true FLAIR (same brain mask; tumour core and oedema are known abnormalities, not
  false positives): sensitivity for lesions ≥ 5 mm (pooled over studies), false positives per
  study, lesion-wise Dice (mean over found lesions), and the synthetic/true ratios of the first
  two (the acceptance asks sensitivity ≥ 0.9 × and false positives ≤ 1.2 × the true FLAIR's);
* calibration (predictors that return σ): coverage of ``mean ± 1.645 σ`` (nominal 90 %) in the
  brain and per tissue; ``None`` for the baselines.

* task, tissues (both targets): the fixed segmenter :mod:`models.evaluation.tissue_seg` on the
  synthetic and on the true target, each scored against the simulator's CSF / grey / white
  labels (Dice per tissue, mean over studies) and the ratio of the mean Dice to the true's;
* feature: FID, KID and MMD between sim-encoder embeddings
  (:mod:`models.evaluation.features`) of :data:`FEATURE_PATCHES_PER_CASE` patches per study of
  the method's output and of the true target at the same positions — the encoder was trained
  on simulated CT, so the images are mapped to pseudo-HU and the figures rank the methods
  against each other only (:data:`FEATURE_MR_NOTE`, in ``evaluation.json``);

The hallucination AUROC (inserted and erased lesions) is its own harness:
:mod:`models.evaluation.synthesis_hallucination_eval`.

Command line::

    python -m models.evaluation.synthesis_eval --out DIR --task t1w+t2w->flair [--train N --test N]

fits both baselines on the first ``N`` training seeds, scores them on the first ``N`` test seeds,
writes ``DIR/evaluation.json`` and prints a table headed SIMULATED.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.evaluation import tissue_seg
from models.evaluation.features import FEATURE_NOTE, PATCH, embed, extract_patches, feature_distances
from models.evaluation.pixel import pixel_metrics
from models.evaluation.synthesis_baselines import HistogramMatching, TissueRegression
from models.evaluation.wm_lesions import detect, score
from models.sim.synthesis import SimulatedMultiContrast, SynthLabel, make_study
from models.synthesis_norm import TASKS, normalise_inputs, normalise_target, task_contrasts

#: Training-role seeds (baselines and, later, the network are fitted on these only).
TRAIN_SEEDS = range(20000, 20200)
#: Test-role seeds (never used to fit or tune anything).
TEST_SEEDS = range(30000, 30040)
#: Window (white-matter units) of PSNR and SSIM per target; its width is the data range.
WINDOWS: dict[str, tuple[float, float]] = {"flair": (0.0, 2.5), "t2w": (0.0, 4.0)}
#: Tissues of the per-tissue figures (the simulator's labels, inside the brain).
TISSUES: dict[str, SynthLabel] = {
    "csf": SynthLabel.CSF,
    "grey": SynthLabel.GREY,
    "white": SynthLabel.WHITE,
    "lesion": SynthLabel.LESION,
    "tumour core": SynthLabel.TUMOUR_CORE,
    "oedema": SynthLabel.OEDEMA,
}
#: Lesions of at least this diameter count for sensitivity.
MIN_LESION_MM = 5.0
#: Two-sided z of the nominal 90 % interval.
Z90 = 1.6448536269514722
SIMULATED = "SIMULATED data (models.sim.synthesis): not a clinical performance claim"
#: Feature level: patches per test study (same positions for every method and the truth).
FEATURE_PATCHES_PER_CASE = 16
#: sim-encoder reads HU: an image in white-matter units ``v`` is shown to it as
#: ``(v - 1) * 200 + 40`` (white matter at 40, the soft-tissue window's centre; 0-2.5 spans
#: -160 to 340). A fixed, labelled mapping: the distances compare methods with each other, not
#: with any published value.
FEATURE_HU_PER_UNIT, FEATURE_HU_AT_WHITE = 200.0, 40.0
FEATURE_MR_NOTE = (
    FEATURE_NOTE + " For MR synthesis the encoder sees white-matter units mapped linearly to "
    "pseudo-HU ((v - 1) x 200 + 40): an encoder trained on CT, so the distances rank methods "
    "against each other only."
)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SynthesisPrediction:
    """A prediction in white-matter units and, optionally, its per-voxel σ (same units)."""

    mean: np.ndarray
    sigma: np.ndarray | None = None


class Predictor(Protocol):
    """What the harness needs of a synthesis method."""

    name: str

    def predict(self, inputs: Mapping[str, np.ndarray], brain: np.ndarray) -> Any:
        """Target in white-matter units: an array or a :class:`SynthesisPrediction`.

        A predictor with ``takes_spacing = True`` is also given ``spacing=`` (slice, row,
        column mm) of the case, as the node gives the network the series' pixel size."""
        ...


@dataclass(frozen=True)
class SynthesisCase:
    """One test study, reduced to what scoring needs."""

    seed: int
    inputs: dict[str, np.ndarray]
    brain: np.ndarray
    truth: np.ndarray  # target in white-matter units
    tissue: np.ndarray
    lesion_labels: np.ndarray
    diameters_mm: dict[int, float]
    ignore: np.ndarray  # tumour core and oedema: known abnormalities
    spacing_mm: tuple[float, float, float]


@dataclass(frozen=True)
class TrainingStudy:
    """A training study reduced to the task's contrasts and the brain (memory)."""

    seed: int
    images: dict[str, np.ndarray]
    brain: np.ndarray


def simulate(seed: int, *, size: int = 128, slices: int = 32) -> SimulatedMultiContrast:
    """The simulated study of a seed (the harness's one door to the simulator)."""
    return make_study(seed, size=size, slices=slices)


def training_studies(
    seeds: Sequence[int], task: str, *, size: int = 128, slices: int = 32
) -> list[TrainingStudy]:
    """Training studies for fitting (refuses test seeds)."""
    clash = sorted(set(seeds) & set(TEST_SEEDS))
    if clash:
        raise ValueError(f"training seeds include test seeds {clash[:5]}")
    inputs, target = task_contrasts(task)
    out = []
    for seed in seeds:
        s = simulate(seed, size=size, slices=slices)
        out.append(TrainingStudy(seed, {c: s.images[c] for c in (*inputs, target)}, s.brain))
    return out


def make_case(study: SimulatedMultiContrast, task: str) -> SynthesisCase:
    """Scoring view of a simulated study for a task."""
    inputs, target = task_contrasts(task)
    raw = {c: study.images[c] for c in inputs}
    norm = normalise_inputs(raw, study.brain)
    ignore = (study.tissue == SynthLabel.TUMOUR_CORE) | (study.tissue == SynthLabel.OEDEMA)
    return SynthesisCase(
        seed=study.seed,
        inputs=raw,
        brain=study.brain,
        truth=normalise_target(study.images[target], norm.white),
        tissue=study.tissue,
        lesion_labels=study.lesion_labels,
        diameters_mm={les.id: les.diameter_mm for les in study.lesions},
        ignore=ignore,
        spacing_mm=study.spacing_mm,
    )


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _lesion_figures(case: SynthesisCase, image: np.ndarray) -> dict[str, Any]:
    s = score(
        detect(image, case.brain, case.spacing_mm),
        case.lesion_labels,
        case.diameters_mm,
        min_truth_mm=MIN_LESION_MM,
        ignore=case.ignore,
    )
    return {
        "lesions": s.lesions,
        "found": s.found,
        "false_positives": s.false_positives,
        "dice": s.lesion_dice,
    }


def _pool_lesions(per_case: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    lesions = sum(c["lesions"] for c in per_case)
    found = sum(c["found"] for c in per_case)
    fps = sum(c["false_positives"] for c in per_case)
    dice_sum = sum(c["dice"] * c["found"] for c in per_case if c["found"])
    return {
        "lesions": lesions,
        "found": found,
        "sensitivity": found / lesions if lesions else None,
        "false_positives": fps,
        "fp_per_case": fps / len(per_case) if per_case else None,
        "lesion_dice": dice_sum / found if found else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return None if a > 0 else 1.0
    return a / b


def _unpack(out: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(out, SynthesisPrediction):
        return np.asarray(out.mean, np.float32), None if out.sigma is None else np.asarray(
            out.sigma, np.float32
        )
    if isinstance(out, tuple):
        return np.asarray(out[0], np.float32), np.asarray(out[1], np.float32)
    return np.asarray(out, np.float32), None


def _tissue_figures(case: SynthesisCase, image: np.ndarray, target: str) -> dict[str, float | None]:
    truth = {t: case.brain & (case.tissue == TISSUES[t]) for t in tissue_seg.TISSUES}
    return tissue_seg.tissue_dice(image, case.brain, target, truth)


def _pool_tissues(
    per_case: Sequence[Mapping[str, float | None]], truth: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Mean Dice per tissue over studies (and, given the true target's, the ratio of the means)."""
    pooled: dict[str, Any] = {}
    for t in (*tissue_seg.TISSUES, "mean"):
        values = [v for c in per_case if (v := c.get(t)) is not None]
        pooled[t] = float(np.mean(values)) if values else None
    if truth is not None:
        pooled["mean_ratio_to_true"] = _ratio(pooled["mean"], truth["mean"])
    return pooled


def true_target_tissues(cases: Sequence[SynthesisCase], target: str) -> dict[str, Any]:
    """The fixed tissue segmenter (:mod:`models.evaluation.tissue_seg`) on the true target."""
    per = [_tissue_figures(c, c.truth, target) for c in cases]
    return {
        **_pool_tissues(per),
        "per_case": [{"seed": c.seed, **p} for c, p in zip(cases, per, strict=True)],
    }


def feature_patches(case: SynthesisCase, image: np.ndarray) -> np.ndarray:
    """:data:`FEATURE_PATCHES_PER_CASE` pseudo-HU patches of ``image`` centred in the brain, at
    positions fixed by the case's seed (the same for every method and the truth)."""
    rng = np.random.default_rng(case.seed)
    hu = (np.asarray(image, np.float32) - 1.0) * FEATURE_HU_PER_UNIT + FEATURE_HU_AT_WHITE
    size = min(PATCH, *image.shape[1:])
    with_brain = np.flatnonzero(case.brain.any(axis=(1, 2)))
    if with_brain.size == 0:
        raise ValueError(f"study {case.seed}: no brain to take feature patches from")
    # one patch per slice, the slices spread evenly over the brain's extent
    picks = np.unique(np.round(np.linspace(0, with_brain.size - 1, FEATURE_PATCHES_PER_CASE)).astype(int))
    chosen = with_brain[picks]
    return extract_patches(hu[chosen], case.brain[chosen], FEATURE_PATCHES_PER_CASE, rng, size=size)


def true_target_lesions(cases: Sequence[SynthesisCase]) -> dict[str, Any]:
    """The detector on the true (normalised) FLAIR of each case, pooled and per case."""
    per = [{"seed": c.seed, **_lesion_figures(c, c.truth)} for c in cases]
    return {**_pool_lesions(per), "per_case": per}


def score_method(
    predictor: Predictor,
    cases: Sequence[SynthesisCase],
    task: str,
    *,
    truth_lesions: Mapping[str, Any] | None = None,
    truth_tissues: Mapping[str, Any] | None = None,
    truth_features: np.ndarray | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Pixel, task, feature and calibration figures of one predictor on prepared cases
    (``truth_*``: the true target's figures, for the ratios and the feature distances)."""
    _, target = task_contrasts(task)
    window = WINDOWS[target]
    per_case: list[dict[str, Any]] = []
    abs_sum = dict.fromkeys(TISSUES, 0.0)
    n_vox = dict.fromkeys(TISSUES, 0)
    cover = {k: [0, 0] for k in ("brain", *TISSUES)}
    lesion_cases = []
    patches: list[np.ndarray] = []
    seconds = 0.0
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        if getattr(predictor, "takes_spacing", False):  # runs as in the node: on its pixel size
            out = predictor.predict(case.inputs, case.brain, spacing=case.spacing_mm)  # type: ignore[call-arg]
        else:
            out = predictor.predict(case.inputs, case.brain)
        mean, sigma = _unpack(out)
        seconds += time.perf_counter() - t0
        if mean.shape != case.truth.shape:
            raise ValueError(f"{predictor.name}: prediction {mean.shape} vs truth {case.truth.shape}")
        err = np.abs(mean - case.truth)
        pm = pixel_metrics(mean, case.truth, case.brain, window, with_ms_ssim=False)
        row: dict[str, Any] = {
            "seed": case.seed,
            "mae": float(err[case.brain].mean()),
            "psnr_db": pm["psnr_db"],
            "ssim": pm["ssim"],
        }
        for name, label in TISSUES.items():
            m = case.brain & (case.tissue == label)
            abs_sum[name] += float(err[m].sum())
            n_vox[name] += int(m.sum())
        if sigma is not None:
            inside = err <= Z90 * sigma
            for name, m in (
                ("brain", case.brain),
                *((t, case.brain & (case.tissue == lab)) for t, lab in TISSUES.items()),
            ):
                cover[name][0] += int(inside[m].sum())
                cover[name][1] += int(m.sum())
        if target == "flair":
            figures = _lesion_figures(case, mean)
            row["lesion_detection"] = figures
            lesion_cases.append(figures)
        row["tissue_dice"] = _tissue_figures(case, mean, target)
        patches.append(feature_patches(case, mean))
        per_case.append(row)
        if progress:
            progress(predictor.name, i + 1, len(cases))
    result: dict[str, Any] = {
        "mae": float(np.mean([r["mae"] for r in per_case])),
        "psnr_db": float(np.mean([r["psnr_db"] for r in per_case])),
        "ssim": float(np.mean([r["ssim"] for r in per_case])),
        "mae_by_tissue": {t: (abs_sum[t] / n_vox[t] if n_vox[t] else None) for t in TISSUES},
        "voxels_by_tissue": n_vox,
        "seconds_per_case": seconds / max(len(cases), 1),
    }
    if target == "flair":
        pooled = _pool_lesions(lesion_cases)
        if truth_lesions is not None:
            pooled["sensitivity_ratio_to_true"] = _ratio(pooled["sensitivity"], truth_lesions["sensitivity"])
            pooled["fp_ratio_to_true"] = _ratio(pooled["fp_per_case"], truth_lesions["fp_per_case"])
        result["lesion_detection"] = pooled
    else:
        result["lesion_detection"] = None
    result["coverage_90"] = (
        {k: (c[0] / c[1] if c[1] else None) for k, c in cover.items()} if cover["brain"][1] else None
    )
    result["tissue_segmentation"] = _pool_tissues([r["tissue_dice"] for r in per_case], truth_tissues)
    result["features"] = (
        feature_distances(embed(np.concatenate(patches)), truth_features)
        if truth_features is not None
        else None
    )
    result["per_case"] = per_case
    return result


def evaluate(
    predictor: Predictor,
    seeds: Sequence[int],
    task: str,
    *,
    size: int = 128,
    slices: int = 32,
    cases: Sequence[SynthesisCase] | None = None,
) -> dict[str, Any]:
    """One predictor on test seeds: ``{"task", "seeds", "true_target", predictor.name: figures}``."""
    return evaluate_methods([predictor], seeds, task, size=size, slices=slices, cases=cases)


def evaluate_methods(
    predictors: Sequence[Predictor],
    seeds: Sequence[int],
    task: str,
    *,
    size: int = 128,
    slices: int = 32,
    cases: Sequence[SynthesisCase] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Several predictors on the same test studies (simulated once).

    Returns
    -------
    dict
        ``task``, ``target``, ``test_seeds``, ``true_target`` (the detector on the true FLAIR,
        ``None`` for a T2w target), ``brain_mean_mae`` (:func:`brain_mean_mae`) and ``methods``
        (name → :func:`score_method` figures).
    """
    task_contrasts(task)
    clash = sorted(set(seeds) - set(TEST_SEEDS))
    if cases is None and clash:
        raise ValueError(
            f"seeds {clash[:5]} are not test-role seeds ({TEST_SEEDS.start}-{TEST_SEEDS.stop - 1})"
        )
    if cases is None:
        cases = [make_case(simulate(s, size=size, slices=slices), task) for s in seeds]
    _, target = task_contrasts(task)
    truth = true_target_lesions(cases) if target == "flair" else None
    tissues = true_target_tissues(cases, target)
    truth_features = embed(np.concatenate([feature_patches(c, c.truth) for c in cases]))
    methods = {
        p.name: score_method(
            p,
            cases,
            task,
            truth_lesions=truth,
            truth_tissues=tissues,
            truth_features=truth_features,
            progress=progress,
        )
        for p in predictors
    }
    return {
        "task": task,
        "target": target,
        "test_seeds": [c.seed for c in cases],
        "true_target": truth,
        "true_target_tissues": tissues,
        "feature_note": FEATURE_MR_NOTE,
        "brain_mean_mae": brain_mean_mae(cases),
        "methods": methods,
    }


def brain_mean_mae(cases: Sequence[SynthesisCase]) -> float:
    """MAE of the trivial reference that predicts each study's true brain mean everywhere (an
    oracle constant: a method that does not beat it has learned nothing voxel-wise)."""
    maes = [float(np.abs(c.truth[c.brain] - c.truth[c.brain].mean()).mean()) for c in cases]
    return float(np.mean(maes)) if maes else math.nan


def json_safe(v: Any) -> Any:
    """``v`` with non-finite floats as None and numpy scalars as Python numbers (for JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.generic):
        return json_safe(v.item())
    return v


def fmt(v: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; ``-`` for None or a non-finite float."""
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def table(results: Mapping[str, Any]) -> str:
    """Plain-text summary, headed SIMULATED."""
    meta = results.get("meta", {})
    lines = [
        f"SIMULATED — contrast synthesis {results['task']} ({SIMULATED})",
        f"train seeds {meta.get('train_seeds', '?')}, test seeds {meta.get('test_seeds', '?')}; "
        f"white-matter units, PSNR/SSIM window {WINDOWS[results['target']]}",
        "",
        f"{'method':<20}{'MAE':>7}{'PSNR dB':>9}{'SSIM':>7}"
        + "".join(f"{t[:6]:>8}" for t in TISSUES)
        + (
            f"{'sens':>7}{'FP/case':>8}{'Dice':>6}{'s.ratio':>8}{'fp.ratio':>9}"
            if results["true_target"]
            else ""
        ),
    ]
    rows = list(results["methods"].items())
    for name, r in rows:
        line = f"{name:<20}{fmt(r['mae']):>7}{fmt(r['psnr_db'], 2):>9}{fmt(r['ssim']):>7}" + "".join(
            f"{fmt(r['mae_by_tissue'][t]):>8}" for t in TISSUES
        )
        lesions = r["lesion_detection"]
        if lesions:
            line += (
                f"{fmt(lesions['sensitivity'], 2):>7}{fmt(lesions['fp_per_case'], 2):>8}"
                f"{fmt(lesions['lesion_dice'], 2):>6}{fmt(lesions.get('sensitivity_ratio_to_true'), 2):>8}"
                f"{fmt(lesions.get('fp_ratio_to_true'), 2):>9}"
            )
        lines.append(line)
    truth = results["true_target"]
    if truth:
        lines.append(
            f"{'true FLAIR':<20}{'':>23}{'':>{8 * len(TISSUES)}}{fmt(truth['sensitivity'], 2):>7}"
            f"{fmt(truth['fp_per_case'], 2):>8}{fmt(truth['lesion_dice'], 2):>6}"
        )
        lines.append(
            f"lesions >= {MIN_LESION_MM:g} mm: {truth['lesions']} in {len(results['test_seeds'])} test "
            "studies "
            f"(detector models.evaluation.wm_lesions on each image; tumour/oedema not counted as FP)"
        )
    lines.append(f"reference: the true brain mean everywhere gives MAE {fmt(results.get('brain_mean_mae'))}")
    tissues = results.get("true_target_tissues")
    if tissues:
        lines += [
            "",
            "tissue segmentation Dice (fixed k-means segmenter models.evaluation.tissue_seg) and feature "
            "distances to the true target (sim-encoder, CT-trained: ranks methods only)",
            f"{'method':<20}{'CSF':>7}{'grey':>7}{'white':>7}{'mean':>7}{'ratio':>7}{'FID':>9}{'KID':>9}{'MMD':>8}",
        ]
        for name, r in rows:
            seg, feat = r.get("tissue_segmentation") or {}, r.get("features") or {}
            lines.append(
                f"{name:<20}"
                + "".join(f"{fmt(seg.get(t)):>7}" for t in ("csf", "grey", "white", "mean"))
                + f"{fmt(seg.get('mean_ratio_to_true'), 2):>7}"
                + f"{fmt(feat.get('fid'), 2):>9}{fmt(feat.get('kid'), 4):>9}{fmt(feat.get('mmd'), 4):>8}"
            )
        lines.append(
            f"{'true ' + results['target']:<20}"
            + "".join(f"{fmt(tissues.get(t)):>7}" for t in ("csf", "grey", "white", "mean"))
        )
    for name, r in rows:
        if r["coverage_90"]:
            lines.append(f"{name}: 90 % coverage in brain {fmt(r['coverage_90']['brain'])}")
    return "\n".join(lines)


def run(
    out: Path,
    task: str,
    *,
    train: int = 40,
    test: int = len(TEST_SEEDS),
    test_first: int = 0,
    model_dir: Path | None = None,
    size: int = 128,
    slices: int = 32,
) -> dict[str, Any]:
    """Fit both baselines on training seeds, score them (and the network in ``model_dir``, if
    given) on test seeds; write ``evaluation.json`` and ``report.md`` into ``out``."""
    if not 1 <= train <= len(TRAIN_SEEDS) or not 1 <= test <= len(TEST_SEEDS) - test_first or test_first < 0:
        raise ValueError(
            f"train 1-{len(TRAIN_SEEDS)}, test 1-{len(TEST_SEEDS)} from the first "
            f"(--test-first skips that many; {len(TEST_SEEDS)} in all)"
        )
    start = time.perf_counter()
    train_seeds = list(TRAIN_SEEDS[:train])
    test_seeds = list(TEST_SEEDS[test_first : test_first + test])
    network: list[Any] = []
    if model_dir is not None:  # checked before anything is simulated
        from models.synthesis import SynthesisModel

        model = SynthesisModel(model_dir)
        if model.meta.task != task:
            raise ValueError(f"{model.name} is a {model.meta.task} model, not {task}")
        network.append(model)
    studies = training_studies(train_seeds, task, size=size, slices=slices)
    predictors: list[Any] = [
        *network,
        TissueRegression(task).fit(studies),
        HistogramMatching(task).fit(studies),
    ]
    del studies
    results = evaluate_methods(predictors, test_seeds, task, size=size, slices=slices)
    results["meta"] = {
        "simulated": True,
        "note": SIMULATED,
        "train_seeds": f"{train_seeds[0]}-{train_seeds[-1]} ({len(train_seeds)})",
        "test_seeds": f"{test_seeds[0]}-{test_seeds[-1]} ({len(test_seeds)})",
        "grid": [slices, size, size],
        "seconds": round(time.perf_counter() - start, 1),
    }
    results["parameters"] = {p.name: p.parameters() for p in predictors if hasattr(p, "parameters")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(json_safe(results), indent=1))
    (out / "report.md").write_text(
        f"# Contrast synthesis {task}: evaluation on SIMULATED data\n\n```\n{table(results)}\n```\n"
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Fit both baselines on training seeds, score them on test seeds, write evaluation.json."""
    ap = argparse.ArgumentParser(
        prog="python -m models.evaluation.synthesis_eval", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", type=Path, required=True, help="output folder (evaluation.json)")
    ap.add_argument("--task", choices=sorted(TASKS), default="t1w+t2w->flair")
    ap.add_argument("--train", type=int, default=40, help=f"training studies (first N of {len(TRAIN_SEEDS)})")
    ap.add_argument(
        "--test", type=int, default=len(TEST_SEEDS), help=f"test studies (first N of {len(TEST_SEEDS)})"
    )
    ap.add_argument(
        "--test-first", type=int, default=0, help="skip this many test seeds (score the next --test)"
    )
    ap.add_argument("--model", type=Path, help="a synthesis model directory to score beside the baselines")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--slices", type=int, default=32)
    args = ap.parse_args(argv)
    try:
        results = run(
            args.out,
            args.task,
            train=args.train,
            test=args.test,
            test_first=args.test_first,
            model_dir=args.model,
            size=args.size,
            slices=args.slices,
        )
    except ValueError as exc:
        ap.error(str(exc))
    print(table(results))
    print(f"wrote {args.out / 'evaluation.json'} in {results['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
