"""Classical denoisers with an uncertainty estimate — the reference for learned models.

No learned weights: the "weights hash" of these models is the sha256 of their parameter
set (canonical JSON), so two outputs made with the same definition name the same thing.
The uncertainty is a local-variance heuristic (the local RMS of what the filter removed),
not a calibrated interval; the model card says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.restoration import denoise_nl_means

from models.base import ModelCard, Prediction


@dataclass(frozen=True)
class ClassicalParameters:
    method: str = "nlm"  # "nlm" (non-local means) or "gaussian"
    #: Gaussian: sigma in mm. NLM: filter strength as a multiple of the estimated noise.
    strength: float = 0.8
    patch_size: int = 5
    patch_distance: int = 6
    #: Window (voxels, in-plane) of the local variance used as the uncertainty.
    uncertainty_window: int = 7

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


_LAPLACE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)


def immerkaer_sigma(image: np.ndarray) -> float:
    """Fast noise σ estimate of a 2-D image (Immerkær, CVIU 1996): robust to edges."""
    h, w = image.shape
    response = ndimage.convolve(np.asarray(image, np.float32), _LAPLACE, mode="reflect")[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(response).sum() / (6 * (w - 2) * (h - 2)))


class ClassicalDenoiser:
    """Slice-wise non-local means (scikit-image) or Gaussian smoothing, with σ maps."""

    def __init__(self, params: ClassicalParameters | None = None) -> None:
        self.params = params or ClassicalParameters()
        if self.params.method not in ("nlm", "gaussian"):
            raise ValueError(f"method {self.params.method!r}: choose 'nlm' or 'gaussian'")
        self.card = ModelCard(
            name=f"classical-{self.params.method}",
            version="1.0",
            weights_sha256=self.params.sha256(),
            intended_use="Reference denoiser for exercising the output path; not for diagnosis.",
            training_data="none (no learned parameters)",
            metrics={},
            calibration="uncertainty is the local RMS of the removed signal; not calibrated",
        )

    def noise_sigma(self, volume: np.ndarray) -> float:
        """Input noise estimate (Immerkær's Laplacian method), median over slices."""
        picks = volume[:: max(1, len(volume) // 8)]
        return float(np.median([immerkaer_sigma(s) for s in picks]))

    def predict(self, volume: np.ndarray, spacing: tuple[float, float, float]) -> Prediction:
        volume = np.asarray(volume, dtype=np.float32)
        p = self.params
        if p.method == "gaussian":
            sigma_px = (0.0, p.strength / spacing[1], p.strength / spacing[2])
            mean = ndimage.gaussian_filter(volume, sigma=sigma_px).astype(np.float32)
        else:
            noise = max(self.noise_sigma(volume), 1e-3)
            mean = np.stack(
                [
                    denoise_nl_means(
                        s,
                        h=p.strength * noise,
                        sigma=noise,
                        patch_size=p.patch_size,
                        patch_distance=p.patch_distance,
                        fast_mode=True,
                    )
                    for s in volume
                ]
            ).astype(np.float32)
        removed = volume - mean
        window = (1, p.uncertainty_window, p.uncertainty_window)
        # uniform_filter of a square can dip below zero by rounding: clip before the root
        sigma = np.sqrt(np.maximum(ndimage.uniform_filter(removed**2, size=window), 0.0)).astype(np.float32)
        return Prediction(mean=mean, sigma=sigma)
