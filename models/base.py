"""The model interface: numpy arrays and voxel spacing in, mean and uncertainty out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """A model's answer for a volume: the estimate and its per-voxel standard deviation.

    ``sigma`` is calibrated when the model card says so: the interval
    ``mean ± z · sigma`` covers the truth with the stated probability.
    """

    mean: np.ndarray
    sigma: np.ndarray


@dataclass(frozen=True)
class ModelCard:
    """What a model is, what it was trained on, and how well it does (plain facts)."""

    name: str
    version: str
    weights_sha256: str
    intended_use: str
    training_data: str
    metrics: dict[str, str]
    calibration: str


class Model(Protocol):
    card: ModelCard

    def predict(self, volume: np.ndarray, spacing: tuple[float, float, float]) -> Prediction: ...
