"""The fixed tissue segmenter of the synthesis evaluation's task level."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation import tissue_seg

Phantom = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]


def _phantom(target: str, noise: float, seed: int = 0) -> Phantom:
    """Three tissue bands inside a brain, with a few bright FLAIR lesions in the white matter."""
    rng = np.random.default_rng(seed)
    shape = (4, 48, 48)
    brain = np.zeros(shape, bool)
    brain[:, 4:44, 4:44] = True
    labels = np.zeros(shape, int)
    labels[:, 4:44, 4:12], labels[:, 4:44, 12:28], labels[:, 4:44, 28:44] = 1, 2, 3  # csf, grey, white
    level = {"flair": {1: 0.15, 2: 1.25, 3: 0.95}, "t2w": {1: 3.4, 2: 1.6, 3: 0.95}}[target]
    image = np.zeros(shape, np.float32)
    for k, v in level.items():
        image[labels == k] = v
    if target == "flair":
        image[:, 30:33, 35:38] = 2.2  # lesions: scored as white by neither side's truth below
    image += rng.normal(0.0, noise, shape).astype(np.float32)
    truth = {"csf": labels == 1, "grey": labels == 2, "white": (labels == 3)}
    if target == "flair":
        truth["white"] = truth["white"].copy()
        truth["white"][:, 30:33, 35:38] = False
    return image, brain, truth


@pytest.mark.parametrize("target", ["flair", "t2w"])
def test_tissues_apart_by_their_contrast_are_found(target: str) -> None:
    image, brain, truth = _phantom(target, noise=0.05)
    dice = tissue_seg.tissue_dice(image, brain, target, truth)
    assert all(dice[t] is not None and dice[t] > 0.97 for t in tissue_seg.TISSUES), dice
    assert dice["mean"] == pytest.approx(np.mean([dice[t] for t in tissue_seg.TISSUES]))


def test_noise_that_blurs_the_tissues_lowers_the_dice() -> None:
    image, brain, truth = _phantom("flair", noise=0.05)
    clean = tissue_seg.tissue_dice(image, brain, "flair", truth)
    image, brain, truth = _phantom("flair", noise=0.25)
    noisy = tissue_seg.tissue_dice(image, brain, "flair", truth)
    assert noisy["mean"] < clean["mean"] - 0.05


def test_a_flat_image_gives_figures_not_an_error() -> None:
    _, brain, truth = _phantom("t2w", noise=0.0)
    dice = tissue_seg.tissue_dice(np.ones(brain.shape, np.float32), brain, "t2w", truth)
    assert dice["mean"] is not None and 0.0 <= dice["mean"] < 0.7


def test_an_unknown_target_is_refused() -> None:
    image, brain, _ = _phantom("t2w", noise=0.05)
    with pytest.raises(ValueError, match="no tissue segmenter for 'pd'"):
        tissue_seg.segment(image, brain, "pd")
