"""The low-dose CT restoration model: restored image and its σ in one forward pass.

A MONAI 2-D U-Net with two output channels predicts, per pixel, the noise to remove
(residual learning: ``mean = input − residual``) and the log-variance of the remaining
error (heteroscedastic head). The variance is calibrated by a split-conformal scale
fitted on held-out cases and stored in the model card, so ``mean ± 1.645 σ`` covers 90 %
of the reference. Inputs and outputs are HU; the network sees ``HU / 1000``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import UNet
from torch import nn

from models.base import Prediction
from models.padding import pad_planes, size_multiple
from models.zoo import StoredCard, version_dir
from models.zoo import WeightsMismatch as WeightsMismatch
from models.zoo import sha256_of as sha256_of

HU_SCALE = 1000.0
HU_CLIP = (-1024.0, 3071.0)
Z90 = 1.6448536269514722

#: Low-pass widths (mm) the noise-adaptive put-back chooses from (the card's
#: ``residual_lowpass_mm`` is the narrowest one used).
PUTBACK_WIDTHS_MM = (0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.6, 2.0)
#: A slice's body: HU above this (after a 2-pixel Gaussian); lung: below LUNG_HU inside it.
BODY_HU = -500.0
LUNG_HU = -400.0
#: A slice whose body is more than this share lung is calibrated in the "thorax" group.
THORAX_LUNG_FRACTION = 0.05


@dataclass(frozen=True)
class SliceFacts:
    """What the blend and the calibration need to know about one input slice."""

    #: Median local noise σ estimate in the body (Immerkær; about half the true σ of
    #: FBP-textured CT noise — every use is calibrated against this same estimate).
    noise_hu: float
    #: Mondrian calibration group: "thorax" (lung in the slice) or "other".
    group: str
    #: Coarse noise: the noise σ of the 4×4-binned slice, from the median absolute
    #: Laplacian over the body (robust to edges), HU. Coarse, correlated noise (a smooth
    #: kernel, iterative reconstruction) is what the network and the put-back let through;
    #: the simulator's FBP noise, at the same fine-grained level, has less of it. 0: not
    #: measured (a body too small to bin).
    coarse_noise_hu: float = 0.0


#: The Laplacian kernel of Immerkær's estimator; its response to white noise of σ 1 has σ 6.
_LAPLACIAN = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
#: median |N(0, 1)|: a median absolute value over this is a robust σ.
_MAD_NORMAL = 0.6744897501960817
#: Binning of the coarse-noise estimate (4: noise at 4× the pixel size).
COARSE_BIN = 4


def _bin(plane: np.ndarray, factor: int) -> np.ndarray:
    h, w = (plane.shape[0] // factor) * factor, (plane.shape[1] // factor) * factor
    return plane[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _bins_inside(mask: np.ndarray, factor: int) -> np.ndarray:
    """The ``factor × factor`` bins (as :func:`_bin` cuts them) wholly inside ``mask``:
    ``_bin(mask.astype(np.float32), factor) > 0.99``, without the float copy and the
    multi-axis mean (a fifth of the cost)."""
    h, w = (mask.shape[0] // factor) * factor, (mask.shape[1] // factor) * factor
    cells = np.asarray(mask, bool)[:h, :w].reshape(h, w // factor, factor)
    rows = cells[..., 0].copy()
    for k in range(1, factor):
        rows &= cells[..., k]
    stacked = rows.reshape(h // factor, factor, w // factor)
    inside = stacked[:, 0].copy()
    for k in range(1, factor):
        inside &= stacked[:, k]
    return inside


def masked_median(values: np.ndarray, mask: np.ndarray) -> float:
    """``float(np.median(values[mask]))`` (``mask`` not empty), the same value at about a
    third of the cost: NumPy's median also partitions the maximum to the end to find a
    NaN; here a NaN is looked for directly, and gives NaN as there."""
    chosen = values[mask]
    if np.isnan(chosen).any():
        return float("nan")
    half = chosen.size // 2
    if chosen.size % 2:
        chosen.partition(half)
        return float(np.mean(chosen[half : half + 1]))
    chosen.partition((half - 1, half))
    return float(np.mean(chosen[half - 1 : half + 1]))


def coarse_noise(plane: np.ndarray, in_body: np.ndarray) -> float:
    """The noise σ (HU) of the 4×4-binned slice: median absolute Laplacian over the binned
    body, one binned pixel in from its edge, scaled to a σ (0 when fewer than 16 binned
    pixels are inside). The median ignores the edges of anatomy, which a mean would add."""
    from scipy import ndimage

    body = ndimage.binary_erosion(_bins_inside(in_body, COARSE_BIN))
    if int(body.sum()) < 16:
        return 0.0
    response = np.abs(ndimage.convolve(_bin(plane, COARSE_BIN), _LAPLACIAN, mode="reflect"))
    return masked_median(response, body) / (6.0 * _MAD_NORMAL)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes(mask)``, by labelling instead of iterated dilation (the
    same result: a hole is a 4-connected piece of background that does not touch the
    edge), several times faster on a 512² slice."""
    from scipy import ndimage

    labels, count = ndimage.label(~mask)
    if count == 0:
        return mask.copy()
    edge = np.concatenate((labels[0], labels[-1], labels[:, 0], labels[:, -1]))
    outside = np.zeros(count + 1, bool)
    outside[edge] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]


def slice_facts(plane: np.ndarray, noise_map: np.ndarray | None = None) -> SliceFacts:
    """Noise level, coarse noise and calibration group of one input slice (HU), from the
    image alone. ``noise_map``: the slice's ``local_noise_sigma`` when the caller has it
    (the hallucination score needs the same map; computed here otherwise)."""
    from scipy import ndimage

    from models.hallucination import local_noise_sigma

    plane = np.asarray(plane, np.float32)
    in_body = plane > BODY_HU
    if noise_map is None and in_body.any():
        noise_map = local_noise_sigma(plane[None])[0]
    noise = masked_median(noise_map, in_body) if noise_map is not None and in_body.any() else 0.0
    smooth = ndimage.gaussian_filter(plane, 2.0)
    body = fill_holes(smooth > BODY_HU)
    lung = body & (smooth < LUNG_HU)
    share = float(np.count_nonzero(lung)) / max(int(np.count_nonzero(body)), 1)
    group = "thorax" if share > THORAX_LUNG_FRACTION else "other"
    return SliceFacts(noise_hu=noise, group=group, coarse_noise_hu=coarse_noise(plane, in_body))


#: The keys of a card's ``sigma_adaptive`` (see :func:`adaptive_factor`).
ADAPTIVE_KEYS = ("sigma_weight", "coarse_weight", "min_factor", "max_factor")


def adaptive_factor(facts: SliceFacts, sigma_median_hu: float, coefficients: dict[str, float]) -> float:
    """The σ multiplier that follows the input's measured noise, on top of the group scale:
    ``sqrt(sigma_weight + coarse_weight · (c / s)²)``, clipped to ``[min_factor,
    max_factor]``, with ``c`` the slice's coarse noise (:attr:`SliceFacts.coarse_noise_hu`)
    and ``s`` the median group-scaled σ in its body. So the calibrated variance is
    ``sigma_weight · σ² + coarse_weight · c²`` (at the slice's median σ): part of it follows
    the network's σ, part the coarse noise measured in the input, which the network's σ
    (learnt on one noise texture) does not see. 1 when no coefficients are given or nothing
    was measured."""
    if not coefficients or facts.coarse_noise_hu <= 0 or sigma_median_hu <= 0:
        return 1.0
    x = facts.coarse_noise_hu / sigma_median_hu
    factor = float(np.sqrt(coefficients["sigma_weight"] + coefficients["coarse_weight"] * x * x))
    return float(np.clip(factor, coefficients["min_factor"], coefficients["max_factor"]))


#: The arithmetic a restoration network may run in. A card lists those its model was
#: evaluated in (``inference_precisions``); the node runs no other.
PRECISIONS = ("float32", "bfloat16")


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere
    bfloat16 is emulated and slower than float32, so ``auto`` never picks it there."""
    probes = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
        getattr(torch.cpu, "_is_amx_tile_supported", None),
    )
    try:
        return any(bool(probe()) for probe in probes if probe is not None)
    except RuntimeError:  # a torch build without the CPU probes
        return False


def choose_precision(requested: str, evaluated: Sequence[str]) -> str:
    """The precision to run: ``requested`` (``"float32"``, ``"bfloat16"`` or ``"auto"``:
    bfloat16 where the card lists it and the CPU has it in hardware, else float32).

    Raises ``ValueError`` for an unknown name or one the model was not evaluated in.
    """
    if requested == "auto":
        return "bfloat16" if "bfloat16" in evaluated and native_bfloat16() else "float32"
    if requested not in PRECISIONS:
        raise ValueError(f"unknown inference precision {requested!r} (choose auto, {', '.join(PRECISIONS)})")
    if requested not in evaluated:
        raise ValueError(
            f"inference precision {requested!r}: the model card lists only {', '.join(evaluated)} "
            "as evaluated; a model runs only in a precision its evaluation covers"
        )
    return requested


@dataclass(frozen=True)
class Architecture:
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1

    def build(self) -> nn.Module:
        return RestorationNet(self)


class RestorationNet(nn.Module):
    """U-Net → (residual, log-variance), both in normalised units."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.unet = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            channels=arch.channels,
            strides=arch.strides,
            num_res_units=arch.num_res_units,
            norm=None,  # type: ignore[arg-type]  # MONAI accepts None: no normalisation layer
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.unet(x)
        mean = x - out[:, :1]
        log_var = out[:, 1:].clamp(-16.0, 8.0)
        return mean, log_var


def to_network(hu: np.ndarray) -> np.ndarray:
    return (np.clip(hu, *HU_CLIP) / HU_SCALE).astype(np.float32)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` (shipped format) or a legacy ``.pt`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


class ScalarLeakyReLU(nn.Module):
    """A single-slope ``nn.PReLU`` for inference: ``leaky_relu`` with its learned slope,
    in place. The same values as the PReLU it replaces — in float32 and in bfloat16
    autocast, where PReLU multiplies by its slope rounded to bfloat16, so this does too —
    at a sixth of the restoration U-Net's time saved (issue 20: PReLU allocated a new
    activation map each time and took 12 % of a 512² forward pass). Out of place where
    autograd needs the input (training never runs this: it is swapped in at load)."""

    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = float(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.slope if x.dtype == torch.float32 else float(torch.tensor(self.slope).to(x.dtype))
        if x.requires_grad:
            return nn.functional.leaky_relu(x, slope)
        return nn.functional.leaky_relu_(x, slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


def scalar_prelus_in_place(net: nn.Module) -> int:
    """Replace every single-slope ``nn.PReLU`` in ``net`` by :class:`ScalarLeakyReLU`
    (after its weights are loaded: the slope becomes a constant, not a parameter).
    Returns how many were replaced."""
    replaced = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.PReLU) and child.weight.numel() == 1:
                setattr(module, name, ScalarLeakyReLU(float(child.weight.detach().item())))
                replaced += 1
    return replaced


def load_network(net: nn.Module, weights: Path) -> nn.Module:
    """``net`` with the state dict of ``weights``, channels-last, in eval mode, its
    single-slope PReLUs as in-place leaky ReLUs (:class:`ScalarLeakyReLU`): an inference
    network, whose ``state_dict`` no longer holds those slopes."""
    net.load_state_dict(load_weights(weights))
    scalar_prelus_in_place(net)
    # channels-last: oneDNN's convolutions run ~1.6x faster on the CPU here (same results to
    # 3e-6 of the normalised output for restoration, 6e-5 for sCT, i.e. 0.003 / 0.06 HU)
    return net.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]  # documented, not in the stubs


def putback_width(
    noise_hu: float, min_width_mm: float, max_noise_hu: float, factors: dict[str, float]
) -> float:
    """The narrowest width (from ``min_width_mm`` up) whose put-back noise, ``factors[width]``
    × the slice's noise estimate, is at most ``max_noise_hu``; the widest when none is.
    ``min_width_mm`` itself when the adaptation is off (no limit or no factors)."""
    if min_width_mm <= 0 or max_noise_hu <= 0 or not factors:
        return min_width_mm
    widths = sorted((float(w), f) for w, f in factors.items() if float(w) >= min_width_mm - 1e-9)
    for width, factor in widths:
        if factor * noise_hu <= max_noise_hu:
            return width
    return widths[-1][0] if widths else min_width_mm


@dataclass(kw_only=True)
class RestorationCard(StoredCard):
    """The model card as stored next to the weights (``card.json``, indent 2)."""

    JSON_INDENT = 2

    #: Multiply the network's σ by this to get σ whose ±1.645 interval covers 90 %.
    sigma_scale: float
    #: Spread factor of a window mean of this CT noise relative to white noise (used by
    #: the hallucination score), per window size.
    noise_correlation: dict[str, float] = field(default_factory=dict)
    #: Spread of a window mean of the model's own error, relative to the mean calibrated σ,
    #: per window size (measured on the calibration slices against the reference). Empty:
    #: the score falls back to a fixed fraction of σ.
    model_error_correlation: dict[str, float] = field(default_factory=dict)
    #: Low-frequency data consistency: the Gaussian low-pass (σ in mm) of what the network
    #: removed (input − output) is put back, so the network may only change fine detail —
    #: it cannot flatten a faint lesion or shift a tissue's mean. 0: off.
    residual_lowpass_mm: float = 0.0
    #: Noise-adaptive put-back: per slice, the narrowest low-pass width (from
    #: ``residual_lowpass_mm`` up) whose put-back noise — ``lowpass_noise_factor[width]`` ×
    #: the slice's noise estimate — stays at or below this many HU. A noisier input gets
    #: only coarser structure back (a faint small lesion cannot be told from noise there).
    #: 0: the fixed ``residual_lowpass_mm``.
    putback_noise_hu: float = 0.0
    #: Spread of the low-passed input noise over the slice noise estimate, per width (mm),
    #: measured on the calibration slices against their reference.
    lowpass_noise_factor: dict[str, float] = field(default_factory=dict)
    #: Mondrian (group-conditional) conformal scales, per :class:`SliceFacts` group; a
    #: group not listed uses ``sigma_scale`` (fitted on all calibration slices).
    sigma_scale_by_group: dict[str, float] = field(default_factory=dict)
    #: σ that follows the input (see :func:`adaptive_factor`): ``sigma_weight``,
    #: ``coarse_weight`` (fitted on calibration slices with varied noise textures),
    #: ``min_factor`` and ``max_factor`` (fixed bounds). Empty: the group scale alone.
    sigma_adaptive: dict[str, float] = field(default_factory=dict)
    #: The precisions the model was evaluated in (``evaluation.json`` for float32,
    #: ``evaluation-<precision>.json`` for each other one); it runs in no other.
    inference_precisions: list[str] = field(default_factory=lambda: ["float32"])

    def write_to(self, directory: Path | str) -> Path:
        """As :meth:`StoredCard.write_to`, leaving out an empty ``sigma_adaptive`` (a card
        without it reads and writes back byte-identically)."""
        from dataclasses import asdict

        from models.zoo import write_card

        data = asdict(self)
        if not data["sigma_adaptive"]:
            del data["sigma_adaptive"]
        if data["inference_precisions"] == ["float32"]:
            del data["inference_precisions"]
        return write_card(directory, data, indent=self.JSON_INDENT)

    def lowpass_for(self, noise_hu: float) -> float:
        """The put-back low-pass width (mm) for a slice with this noise estimate."""
        return putback_width(
            noise_hu, self.residual_lowpass_mm, self.putback_noise_hu, self.lowpass_noise_factor
        )

    def scale_for(self, group: str) -> float:
        return float(self.sigma_scale_by_group.get(group, self.sigma_scale))

    def scale_for_slice(self, facts: SliceFacts, sigma_raw: np.ndarray, body: np.ndarray) -> float:
        """The group's conformal scale times the input-adaptive factor (``sigma_raw``: the
        network's σ for the slice, ``body``: where to take its median)."""
        scale = self.scale_for(facts.group)
        if not self.sigma_adaptive:
            return scale
        median = masked_median(sigma_raw, body) * scale if body.any() else 0.0
        return scale * adaptive_factor(facts, median, self.sigma_adaptive)


class RestorationModel:
    """Loads a model from its zoo directory (weights hash checked) and predicts volumes."""

    #: ``predict`` reads its input a slice (or a batch) at a time: ``len``, ``shape`` and
    #: ``[k]`` / ``[a:b]`` are all it needs (see ``pipelines.fov.FilledSlices``).
    reads_slices = True

    def __init__(
        self, directory: Path, *, threads: int | None = None, batch: int = 4, precision: str = "auto"
    ) -> None:
        self.directory = Path(directory)
        #: Per-slice noise estimate and calibration group of the last ``predict`` call.
        self.last_facts: list[SliceFacts] = []
        self.meta = RestorationCard.read_from(self.directory)
        weights = self.meta.verified_weights(self.directory)
        a = self.meta.architecture
        arch = Architecture(tuple(a["channels"]), tuple(a["strides"]), int(a["num_res_units"]))
        self.net = load_network(arch.build(), weights)
        #: Rows and columns the network takes are multiples of this (any other size is padded).
        self.size_multiple = size_multiple(arch.strides)
        self.card = self.meta.model_card()
        self.batch = batch
        #: What the network computes in (see :func:`choose_precision`); the outputs' provenance says it.
        self.precision = choose_precision(precision, self.meta.inference_precisions)
        if threads:
            torch.set_num_threads(threads)

    @classmethod
    def shipped(
        cls, name: str = "ldct-restoration", version: str | None = None, *, precision: str = "auto"
    ) -> RestorationModel:
        return cls(version_dir(name, version), precision=precision)

    @torch.inference_mode()
    def predict_raw(self, volume_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Restored HU and uncalibrated σ (HU) for a (slices, H, W) volume of any H × W
        (padded by reflection to what the network takes, outputs cropped back)."""
        if not hasattr(volume_hu, "shape"):  # an array, or slices read one by one (reads_slices)
            volume_hu = np.asarray(volume_hu)
        means = np.empty(volume_hu.shape, np.float32)  # filled batch by batch: no stacked copies
        sigmas = np.empty(volume_hu.shape, np.float32)
        batch = self.slices_per_pass(volume_hu.shape[1:])
        for start in range(0, len(volume_hu), batch):
            part = slice(start, start + batch)
            padded, padding = pad_planes(to_network(volume_hu[part])[:, None], self.size_multiple)
            x = torch.from_numpy(padded).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
                mean, log_var = self.net(x)
            # ``mean = x − residual`` is float32 either way (float32 input minus the residual)
            means[part] = padding.crop(mean[:, 0].float().numpy()) * HU_SCALE
            sigmas[part] = padding.crop(torch.exp(0.5 * log_var[:, 0].float()).numpy()) * HU_SCALE
        return means, sigmas

    def slices_per_pass(self, plane_shape: tuple[int, ...]) -> int:
        """Slices per forward pass: ``batch`` slices of 256², fewer of larger ones (one
        512² slice a pass ran 10–20 % faster per slice than four here in float32: the
        activations of one stay in cache; two in bfloat16, whose activations are half)."""
        pixels = int(np.prod(plane_shape)) if plane_shape else 1
        per_pass = self.batch * 256 * 256 * (2 if self.precision == "bfloat16" else 1)
        return max(1, min(self.batch, per_pass // max(pixels, 1)))

    def score(
        self,
        observed: np.ndarray,
        restored: np.ndarray,
        sigma: np.ndarray,
        noise_map: np.ndarray | None = None,
    ) -> np.ndarray:
        """The restoration hallucination map with this model's measured correlations
        (``noise_map``: ``local_noise_sigma(observed)`` when the caller has it — the
        restoration pipeline computes it once per slice for :meth:`finish_slice` and this;
        computed here otherwise)."""
        from models.hallucination import restoration_score

        return restoration_score(
            observed,
            restored,
            sigma,
            noise_sigma=noise_map,
            correlation=self.meta.noise_correlation,
            model_correlation=self.meta.model_error_correlation or None,
        )

    def predict(
        self,
        volume: np.ndarray,
        spacing: tuple[float, float, float],
        pixel_mm: Sequence[float] | None = None,
    ) -> Prediction:
        """Restored volume and calibrated σ. ``spacing`` is (slice, row, column) in mm;
        ``pixel_mm`` gives each slice its own in-plane pixel size (a stack of cases)."""
        mean, sigma = self.predict_raw(volume)
        sizes = list(pixel_mm) if pixel_mm is not None else [None] * len(volume)

        def finish(k: int) -> SliceFacts:
            # everything after the network is per slice: the put-back and σ's scale, on
            # as many threads as cores (SciPy's filters and NumPy release the GIL)
            px = sizes[k]
            pixel = (px, px) if px is not None else spacing[1:]
            return self.finish_slice(np.asarray(volume[k], np.float32), mean[k], sigma[k], pixel)

        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            self.last_facts = list(pool.map(finish, range(len(volume))))
        return Prediction(mean=mean, sigma=sigma)

    def finish_slice(
        self,
        plane: np.ndarray,
        mean: np.ndarray,
        sigma: np.ndarray,
        pixel_mm: Sequence[float],
        noise_map: np.ndarray | None = None,
    ) -> SliceFacts:
        """What follows the network for one slice, in place: the put-back into ``mean``
        (the network's restored slice, HU) and σ's calibrated scale on ``sigma`` (its raw
        σ), from the input ``plane`` (float32 HU). ``noise_map``: the plane's
        ``local_noise_sigma`` when the caller has it (the score needs the same map)."""
        facts = slice_facts(plane, noise_map)
        put_back(plane, mean, self.meta.lowpass_for(facts.noise_hu), pixel_mm)
        sigma *= np.float32(self.meta.scale_for_slice(facts, sigma, plane > BODY_HU))
        return facts


def put_back(plane: np.ndarray, restored: np.ndarray, width_mm: float, pixel_mm: Sequence[float]) -> None:
    """``restored += G_σ * (plane − restored)`` in place (σ = ``width_mm``; 0: unchanged):
    the low frequencies of what the network removed go back (see ``residual_lowpass_mm``)."""
    if width_mm <= 0:
        return
    from scipy import ndimage

    restored += ndimage.gaussian_filter(plane - restored, (width_mm / pixel_mm[0], width_mm / pixel_mm[1]))


def data_consistent(
    volume: np.ndarray,
    restored: np.ndarray,
    lowpass_mm: float | Sequence[float],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    pixel_mm: Sequence[float] | None = None,
    *,
    inplace: bool = False,
) -> np.ndarray:
    """``restored + G_σ * (volume − restored)`` per slice (σ = ``lowpass_mm`` in mm, one
    for all slices or one per slice; 0 leaves a slice as it is); ``inplace`` writes into
    ``restored`` (a float32 array the caller owns)."""
    widths = [float(lowpass_mm)] * len(volume) if np.isscalar(lowpass_mm) else list(lowpass_mm)  # type: ignore[arg-type]
    if all(w <= 0 for w in widths):
        return restored
    sizes = list(pixel_mm) if pixel_mm is not None else [None] * len(volume)
    out = restored if inplace and restored.dtype == np.float32 else np.array(restored, dtype=np.float32)
    for k, (v, px, w) in enumerate(zip(volume, sizes, widths, strict=True)):
        put_back(np.asarray(v, np.float32), out[k], w, (px, px) if px is not None else spacing[1:])
    return out
