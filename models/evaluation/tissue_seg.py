"""A fixed tissue segmenter for the task level of the synthesis evaluation (issue 18, item 6).

The question it answers: does a downstream tissue segmentation work as well on the synthetic
contrast as on the acquired one? The same fixed method runs on both images and each result is
scored against the simulator's tissue labels; the evaluation reports the two and their ratio.

The method: 1-D k-means (:func:`scipy.cluster.vq.kmeans2`) of the image's intensities inside the
brain, the clusters started at fixed quantiles of those intensities per target contrast
(:data:`START_QUANTILES`, in the contrasts' tissue order: FLAIR nulls CSF and shows grey matter
at or above white; T2w shows CSF brightest; a fourth FLAIR cluster takes the hyperintense
lesions, which would otherwise pull the grey-matter centre up). Every voxel takes the tissue of
its nearest final centre. Nothing is fitted beyond those centres, per image. Where the
simulated field strength leaves grey and white matter at one FLAIR intensity, no segmenter can
part them: the figure that matters is the synthetic's Dice against the true image's.

Dice per tissue (CSF, grey, white) is computed over brain voxels whose true label is one of the
three: lesions, tumour core and oedema are left out of both sides (the lesion figures score
them).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from scipy.cluster.vq import kmeans2, vq

#: Quantiles of the brain's intensities the clusters start at, per target contrast.
START_QUANTILES: dict[str, dict[str, float]] = {
    "flair": {"csf": 0.03, "white": 0.35, "grey": 0.8, "hyperintense": 0.998},
    "t2w": {"white": 0.2, "grey": 0.6, "csf": 0.97},
}
TISSUES = ("csf", "grey", "white")


def segment(image: np.ndarray, brain: np.ndarray, target: str) -> dict[str, np.ndarray]:
    """Boolean masks per tissue of ``image`` (white-matter units) inside ``brain``."""
    try:
        start = START_QUANTILES[target]
    except KeyError:
        raise ValueError(f"no tissue segmenter for {target!r}: {', '.join(START_QUANTILES)}") from None
    names = list(start)
    values = np.asarray(image, np.float64)[brain]
    if values.size < len(names):
        return {name: np.zeros(brain.shape, bool) for name in names}
    init = np.quantile(values, [start[n] for n in names])[:, None]
    with warnings.catch_warnings():  # an empty cluster keeps its start centre
        warnings.simplefilter("ignore")
        centres, _ = kmeans2(values[:, None], init, iter=30, minit="matrix", missing="warn")
    nearest, _ = vq(values[:, None], centres)  # each voxel to its nearest final centre
    out = {}
    for k, name in enumerate(names):
        mask = np.zeros(brain.shape, bool)
        mask[brain] = nearest == k
        out[name] = mask
    return out


def tissue_dice(
    image: np.ndarray, brain: np.ndarray, target: str, truth: Mapping[str, np.ndarray]
) -> dict[str, float | None]:
    """Dice of :func:`segment` against ``truth`` (tissue → mask), per tissue and their mean,
    over brain voxels whose true label is one of :data:`TISSUES`."""
    scored = brain & np.logical_or.reduce([truth[t] for t in TISSUES])
    found = segment(image, brain, target)
    out: dict[str, float | None] = {}
    for t in TISSUES:
        a, b = found[t] & scored, truth[t] & scored
        total = int(a.sum()) + int(b.sum())
        out[t] = None if total == 0 else 2.0 * int((a & b).sum()) / total
    values = [v for v in out.values() if v is not None]
    out["mean"] = float(np.mean(values)) if values else None
    return out
