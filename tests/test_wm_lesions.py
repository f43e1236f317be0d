"""The fixed white-matter lesion detector (models.evaluation.wm_lesions) on drawn volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation.wm_lesions import detect, score

SPACING = (3.0, 1.0, 1.0)


def _head(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, float]]:
    rng = np.random.default_rng(seed)
    shape = (20, 96, 96)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING, strict=True)], indexing="ij")
    brain = ((z - 30) / 28) ** 2 + ((y - 48) / 40) ** 2 + ((x - 48) / 40) ** 2 <= 1.0
    flair = np.where(brain, 100.0, 0.0) + rng.normal(0, 4.0, shape)
    labels = np.zeros(shape, np.int32)
    diameters = {}
    for i, (cz, cy, cx, d) in enumerate(
        [(30, 30, 30, 8.0), (30, 60, 60, 6.0), (24, 48, 70, 4.0), (36, 66, 34, 12.0)], 1
    ):
        inside = ((z - cz) / max(d / 2, 1.5)) ** 2 + ((y - cy) / (d / 2)) ** 2 + (
            (x - cx) / (d / 2)
        ) ** 2 <= 1.0
        labels[inside & brain] = i
        diameters[i] = d
    flair = np.where(labels > 0, flair + 40.0, flair).astype(np.float32)
    return flair, brain, labels, diameters


def test_lesions_of_5_mm_and_more_are_found_on_a_clean_flair() -> None:
    flair, brain, labels, diameters = _head()
    found = detect(flair, brain, SPACING)
    s = score(found, labels, diameters)
    assert s.lesions == 3 and s.found == 3 and s.sensitivity == 1.0
    assert s.false_positives == 0
    assert s.lesion_dice > 0.6


def test_an_erased_lesion_is_missed_and_an_invented_one_is_a_false_positive() -> None:
    flair, brain, labels, diameters = _head(1)
    synthetic = flair.copy()
    synthetic[labels == 4] = 100.0  # erased
    z, y, x = np.indices(flair.shape)
    invented = (z == 10) & ((y - 40) ** 2 + (x - 56) ** 2 <= 16)
    synthetic[invented] += 45.0
    s = score(detect(synthetic, brain, SPACING), labels, diameters)
    assert (s.found, s.false_positives) == (2, 1)
    oedema = invented  # a known abnormality other than a lesion is not a false positive
    assert score(detect(synthetic, brain, SPACING), labels, diameters, ignore=oedema).false_positives == 0


def test_nothing_to_find_gives_no_sensitivity_and_a_bad_mask_is_refused() -> None:
    flair, brain, _, _ = _head(2)
    empty = score(detect(flair * 0 + 100.0, brain, SPACING), np.zeros(flair.shape, np.int32), {})
    assert empty.lesions == 0 and math.isnan(empty.sensitivity) and empty.false_positives == 0
    with pytest.raises(ValueError, match="differ"):
        detect(flair, brain[1:], SPACING)
