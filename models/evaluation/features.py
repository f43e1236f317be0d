"""Level 3c: distribution distances in a feature space (FID, KID, MMD) and the "sim-encoder" that defines it.

Distances
---------
* :func:`fid` — Fréchet distance between Gaussians fitted to two feature sets,
  ``|mu_x - mu_y|^2 + tr(C_x + C_y - 2 (C_x^1/2 C_y C_x^1/2)^1/2)`` (computed with symmetric
  eigendecompositions, so it is real and ``fid(X, X) == 0`` up to rounding).
* :func:`kid` — kernel inception distance: unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x·y / d + 1)^3``, averaged over random subsets (Bińkowski et al. 2018).
* :func:`mmd_rbf` — unbiased MMD^2 with a Gaussian kernel ``exp(-|x - y|^2 / (2 h^2))``, ``h`` by
  the median heuristic (median pairwise distance of the pooled sample).

The encoder
-----------
Published FIDs use Inception-v3 features of natural images and cannot be downloaded here; they
would also say little about CT noise texture. Instead **sim-encoder** is a small CNN trained in
this repository (:func:`train_sim_encoder`) on 64 x 64 patches of *simulated* CT
(:func:`models.sim.ldct.make_case`, 256 px, head and chest, low-dose images at dose fractions
0.1-1.0 and their full-dose references) with auxiliary supervised tasks: anatomy (head or chest),
the dose level (log10 dose fraction; references count as 1.0) and the patch's tissue fractions
(air, lung, fat, soft tissue, brain, bone). Its 64-d embedding therefore encodes anatomy, noise
level and texture. Every number computed with it must be labelled :data:`SIM_ENCODER_LABEL`;
:data:`FEATURE_NOTE` is the caption text the report uses.

The shipped weights live in ``models/zoo/sim-encoder/1.0/`` (``weights.safetensors``, read and
written with the safetensors package, plus ``card.json``, read and written by :mod:`models.zoo`);
:func:`load_sim_encoder` refuses a weights file whose sha256 differs from the pinned
:data:`SIM_ENCODER_SHA256` (shipped copy) or from the card (any other directory).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from models.evaluation._threads import torch_threads
from models.evaluation.results import FeatureResult
from models.zoo import CARD_FILE, read_card, sha256_of, write_card

#: Label every feature-based number and figure must carry.
SIM_ENCODER_LABEL = "sim-encoder"
SIM_ENCODER_VERSION = "1.0"
#: Caption text for feature-based tables and figures.
FEATURE_NOTE = (
    "Feature distances (FID, KID, MMD) use sim-encoder v1.0, a small CNN trained in this project on "
    "simulated CT patches; they are not comparable with published FID/KID values (Inception-v3 "
    "features of natural images)."
)
#: Where the shipped encoder lives.
SIM_ENCODER_DIR = Path(__file__).resolve().parents[1] / "zoo" / "sim-encoder" / SIM_ENCODER_VERSION
WEIGHTS_FILE = "weights.safetensors"
#: sha256 of the shipped ``weights.safetensors``, pinned in code so that an edited card cannot vouch for
#: edited weights.
SIM_ENCODER_SHA256 = "d1ff332f8061e493dc2a944c7080f99187337195b343c42486830fd1393b6cd8"
#: Patch side the encoder was trained on.
PATCH = 64
EMBED_DIM = 64
CHANNELS = (32, 48, 64, 96)
STRIDES = (2, 2, 2, 2)
#: Tissue groups of the auxiliary fraction task (values: :class:`models.sim.ctphysics.Tissue`).
TISSUE_GROUPS: dict[str, tuple[int, ...]] = {
    "air": (0,),
    "lung": (7,),
    "fat": (1,),
    "soft": (2, 8, 9, 10),
    "brain": (4, 5, 6),
    "bone": (3,),
}


class SimEncoderError(RuntimeError):
    """The sim-encoder files are missing, malformed or not the ones pinned."""


# -- distances ------------------------------------------------------------------------------------
def _features(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name}: expected (n >= 2, d) features, got shape {a.shape}")
    return a


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(c)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def fid(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets.

    Parameters
    ----------
    x, y : numpy.ndarray
        ``(n, d)`` and ``(m, d)`` feature vectors.

    Returns
    -------
    float
        FID (>= 0; 0 for identical sets up to rounding).
    """
    a, b = _features(x, "x"), _features(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError("feature dimensions differ")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    sa = _sqrt_psd(ca)
    m = sa @ cb @ sa
    cross = float(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2.0 * cross)
    return max(value, 0.0)


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    n, m = kxx.shape[0], kyy.shape[0]
    sxx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_subsets: int = 100,
    subset_size: int = 1000,
    rng: np.random.Generator | None = None,
) -> tuple[float, float]:
    """Kernel inception distance (unbiased MMD^2, cubic polynomial kernel) averaged over subsets.

    Parameters
    ----------
    x, y : numpy.ndarray
        ``(n, d)`` and ``(m, d)`` features.
    n_subsets : int, optional
        Number of random subsets.
    subset_size : int, optional
        Subset size, capped at ``min(n, m)`` (when the cap applies every subset is a whole set and
        the reported std is 0: use more samples for a spread).
    rng : numpy.random.Generator, optional
        Subset sampling (default seed 0, so the value is reproducible).

    Returns
    -------
    tuple of float
        ``(mean, std)`` over subsets.
    """
    a, b = _features(x, "x"), _features(y, "y")
    rng = np.random.default_rng(0) if rng is None else rng
    d = a.shape[1]
    size = min(subset_size, a.shape[0], b.shape[0])
    vals = []
    full = max(a.shape[0], b.shape[0]) <= 4096  # kernels of the whole sets fit: index them per subset
    if full:
        kxx_all = (a @ a.T / d + 1.0) ** 3
        kyy_all = (b @ b.T / d + 1.0) ** 3
        kxy_all = (a @ b.T / d + 1.0) ** 3
    for _ in range(n_subsets):
        ia = rng.choice(a.shape[0], size, replace=False)
        ib = rng.choice(b.shape[0], size, replace=False)
        if full:
            kxx, kyy, kxy = kxx_all[np.ix_(ia, ia)], kyy_all[np.ix_(ib, ib)], kxy_all[np.ix_(ia, ib)]
        else:
            xa, yb = a[ia], b[ib]
            kxx = (xa @ xa.T / d + 1.0) ** 3
            kyy = (yb @ yb.T / d + 1.0) ** 3
            kxy = (xa @ yb.T / d + 1.0) ** 3
        vals.append(_mmd2_unbiased(kxx, kyy, kxy))
    v = np.asarray(vals)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_heuristic(
    x: np.ndarray, y: np.ndarray, *, max_n: int = 2000, rng: np.random.Generator | None = None
) -> float:
    """Median pairwise Euclidean distance of the pooled sample (the RBF bandwidth ``h``).

    Parameters
    ----------
    x, y : numpy.ndarray
        Feature sets.
    max_n : int, optional
        Subsample the pooled set to at most this many points.
    rng : numpy.random.Generator, optional
        Subsampling (default seed 0).

    Returns
    -------
    float
        The median distance (1.0 if all points coincide).
    """
    z = np.concatenate([_features(x, "x"), _features(y, "y")])
    if z.shape[0] > max_n:
        rng = np.random.default_rng(0) if rng is None else rng
        z = z[rng.choice(z.shape[0], max_n, replace=False)]
    d2 = _sq_dists(z, z)
    iu = np.triu_indices(z.shape[0], k=1)
    h = float(np.sqrt(np.median(d2[iu])))
    return h if h > 0 else 1.0


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with the Gaussian kernel ``exp(-|x - y|^2 / (2 h^2))``.

    Parameters
    ----------
    x, y : numpy.ndarray
        ``(n, d)`` and ``(m, d)`` features.
    bandwidth : float, optional
        ``h``; default :func:`median_heuristic`.

    Returns
    -------
    float
        MMD^2 (can be slightly negative for equal distributions: the estimator is unbiased).
    """
    a, b = _features(x, "x"), _features(y, "y")
    h = median_heuristic(a, b) if bandwidth is None else float(bandwidth)
    g = 1.0 / (2.0 * h * h)
    return _mmd2_unbiased(
        np.exp(-g * _sq_dists(a, a)), np.exp(-g * _sq_dists(b, b)), np.exp(-g * _sq_dists(a, b))
    )


def feature_distances(
    x: np.ndarray,
    y: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> FeatureResult:
    """FID, KID and MMD between a method's features ``x`` and the reference features ``y``.

    Parameters
    ----------
    x, y : numpy.ndarray
        sim-encoder embeddings (:func:`embed`) of the method's and the reference's patches.
    rng : numpy.random.Generator, optional
        KID subset sampling.
    kid_subsets, kid_subset_size : int, optional
        See :func:`kid`.

    Returns
    -------
    FeatureResult
        ``encoder`` (:data:`SIM_ENCODER_LABEL`), ``fid``, ``kid``, ``kid_std``, ``mmd``,
        ``mmd_bandwidth``, ``n_x``, ``n_y``.
    """
    k_mean, k_std = kid(x, y, n_subsets=kid_subsets, subset_size=kid_subset_size, rng=rng)
    h = median_heuristic(x, y)
    return FeatureResult(
        encoder=SIM_ENCODER_LABEL,
        fid=fid(x, y),
        kid=k_mean,
        kid_std=k_std,
        mmd=mmd_rbf(x, y, h),
        mmd_bandwidth=h,
        n_x=int(np.asarray(x).shape[0]),
        n_y=int(np.asarray(y).shape[0]),
    )


# -- the network ----------------------------------------------------------------------------------
def to_input(patches_hu: np.ndarray) -> torch.Tensor:
    """HU patches ``(n, H, W)`` -> network input ``(n, 2, H, W)``: a wide and a soft-tissue window.

    Channel 0: ``clip(HU, -1000, 2000) / 1000``; channel 1: ``clip(HU - 40, -200, 200) / 100``.

    Parameters
    ----------
    patches_hu : numpy.ndarray
        Patches in HU.

    Returns
    -------
    torch.Tensor
        float32 tensor.
    """
    p = np.asarray(patches_hu, dtype=np.float32)
    if p.ndim == 2:
        p = p[None]
    wide = np.clip(p, -1000.0, 2000.0) / 1000.0
    soft = np.clip(p - 40.0, -200.0, 200.0) / 100.0
    return torch.from_numpy(np.stack([wide, soft], axis=1).astype(np.float32))


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(8, cout),
        nn.ReLU(inplace=True),
    )


class SimEncoder(nn.Module):
    """Small CNN: 2-channel 64 x 64 HU patch -> 64-d embedding (+ auxiliary heads used in training).

    Parameters
    ----------
    channels : sequence of int
        Widths of the 3 x 3 conv blocks (GroupNorm(8), ReLU).
    strides : sequence of int
        Their strides (four stride-2 blocks: 64 -> 4 px).
    embed_dim : int
        Embedding size (64).
    n_tissues : int
        Tissue-fraction outputs of the auxiliary head.
    """

    def __init__(
        self,
        channels: Sequence[int] = CHANNELS,
        strides: Sequence[int] = STRIDES,
        embed_dim: int = EMBED_DIM,
        n_tissues: int = len(TISSUE_GROUPS),
    ) -> None:
        super().__init__()
        layers = []
        cin = 2
        for cout, s in zip(channels, strides, strict=True):
            layers.append(_block(cin, cout, s))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(cin, embed_dim)
        #: outputs: [anatomy logit (chest), standardised log10 dose, tissue-fraction logits...]
        self.heads = nn.Linear(embed_dim, 2 + n_tissues)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding of a batch ``(n, 2, H, W)`` -> ``(n, embed_dim)``."""
        return self.embed(self.features(x).mean(dim=(2, 3)))

    def predict_tasks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding and the auxiliary-head outputs of a batch."""
        e = self.forward(x)
        return e, self.heads(e)


# -- weights file ---------------------------------------------------------------------------------
def _save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write a state dict as safetensors; byte-identical for identical tensors.

    The metadata has one key only: safetensors writes the metadata map in a random order
    (safetensors issue #584), so with more keys the same tensors would give different bytes and a
    retrained encoder's sha256 would not reproduce. Name and version are in the card.
    """
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise SimEncoderError(f"{path}: not a readable safetensors file ({exc})") from exc
    for name, tensor in state.items():
        if tensor.dtype != torch.float32:
            raise SimEncoderError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected float32")
    return state


def load_sim_encoder(
    directory: Path | str | None = None, *, expected_sha256: str | None = None
) -> SimEncoder:
    """Load the sim-encoder, verifying the sha256 of its weights first.

    Parameters
    ----------
    directory : pathlib.Path or str, optional
        Directory with ``card.json`` and the weights; default the shipped
        ``models/zoo/sim-encoder/1.0``.
    expected_sha256 : str, optional
        Digest the weights must have; default :data:`SIM_ENCODER_SHA256` for the shipped
        directory. The digest in ``card.json`` must match as well.

    Returns
    -------
    SimEncoder
        The network in eval mode.

    Raises
    ------
    SimEncoderError
        Missing card or weights, or a sha256 mismatch (the message names both digests).
    """
    shipped = directory is None
    path = SIM_ENCODER_DIR if directory is None else Path(directory)
    try:
        card = read_card(path)
    except FileNotFoundError as exc:
        raise SimEncoderError(f"no sim-encoder card at {path / CARD_FILE}") from exc
    weights = path / card.get("weights_file", WEIGHTS_FILE)
    if not weights.exists():
        raise SimEncoderError(f"sim-encoder weights missing: {weights}")
    actual = sha256_of(weights)
    wanted = [card.get("weights_sha256")]
    if expected_sha256 is not None:
        wanted.append(expected_sha256)
    elif shipped:
        wanted.append(SIM_ENCODER_SHA256)
    for want in wanted:
        if actual != want:
            raise SimEncoderError(
                f"sim-encoder weights sha256 mismatch for {weights}: expected {want}, got {actual}. "
                "The file was modified or corrupted; restore it from the repository or rebuild it "
                "with models.evaluation.features.train_sim_encoder (and update the pinned digest)."
            )
    arch = card.get("architecture", {})
    net = SimEncoder(
        channels=tuple(arch.get("channels", CHANNELS)),
        strides=tuple(arch.get("strides", STRIDES)),
        embed_dim=int(arch.get("embed_dim", EMBED_DIM)),
        n_tissues=int(arch.get("n_tissues", len(TISSUE_GROUPS))),
    )
    try:
        net.load_state_dict(_load_weights(weights))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise SimEncoderError(f"sim-encoder weights at {weights} do not fit the architecture: {exc}") from exc
    net.eval()
    return net


_CACHED: dict[str, SimEncoder] = {}


def embed(patches_hu: np.ndarray, encoder: SimEncoder | None = None, *, batch_size: int = 256) -> np.ndarray:
    """sim-encoder embeddings of HU patches.

    Parameters
    ----------
    patches_hu : numpy.ndarray
        ``(n, 64, 64)`` patches in HU (other sizes >= 16 work, the network is fully convolutional
        with global pooling, but the encoder was trained on 64 x 64).
    encoder : SimEncoder, optional
        Default: the shipped encoder (loaded and verified once per process).
    batch_size : int, optional
        Patches per forward pass.

    Returns
    -------
    numpy.ndarray
        ``(n, 64)`` float64 embeddings (label results :data:`SIM_ENCODER_LABEL`).
    """
    if encoder is None:
        if "shipped" not in _CACHED:
            _CACHED["shipped"] = load_sim_encoder()
        encoder = _CACHED["shipped"]
    p = np.asarray(patches_hu, dtype=np.float32)
    if p.ndim == 2:
        p = p[None]
    out = []
    with torch.inference_mode(), torch_threads(1):
        for start in range(0, p.shape[0], batch_size):
            out.append(encoder(to_input(p[start : start + batch_size])).numpy())
    if not out:
        return np.zeros((0, encoder.embed.out_features))
    return np.concatenate(out).astype(np.float64)


def extract_patches(
    images: np.ndarray | Sequence[np.ndarray],
    masks: np.ndarray | Sequence[np.ndarray] | None,
    n: int,
    rng: np.random.Generator,
    size: int = PATCH,
) -> np.ndarray:
    """Random square patches whose centre lies inside the mask, drawn evenly over the images.

    Use the same ``rng`` seed for every method so that the patches of all methods (and of the
    reference) come from the same positions.

    Parameters
    ----------
    images : numpy.ndarray or sequence of numpy.ndarray
        2-D images or a ``(slices, H, W)`` stack, in HU.
    masks : numpy.ndarray or sequence of numpy.ndarray, optional
        Matching boolean masks (e.g. body masks); default everywhere.
    n : int
        Number of patches.
    rng : numpy.random.Generator
        Source of the positions.
    size : int, optional
        Patch side (64).

    Returns
    -------
    numpy.ndarray
        ``(n, size, size)`` float32 patches.
    """
    imgs = [np.asarray(im, dtype=np.float32) for im in images]
    mks = [np.ones(im.shape, bool) for im in imgs] if masks is None else [np.asarray(m, bool) for m in masks]
    half = size // 2
    centres = []
    for im, m in zip(imgs, mks, strict=True):
        valid = np.zeros(im.shape, dtype=bool)
        valid[half : im.shape[0] - (size - half) + 1, half : im.shape[1] - (size - half) + 1] = True
        centres.append(np.flatnonzero(valid & m))
    usable = [k for k, c in enumerate(centres) if c.size]
    if not usable:
        raise ValueError("no patch fits inside any mask")
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        k = usable[i % len(usable)]
        r, c = np.unravel_index(int(rng.choice(centres[k])), imgs[k].shape)
        out[i] = imgs[k][r - half : r - half + size, c - half : c - half + size]
    return out


# -- training -------------------------------------------------------------------------------------
#: log10-dose standardisation of the dose head: target = (log10(dose) - DOSE_MU) / DOSE_SD.
DOSE_MU, DOSE_SD = -0.5, 0.3


def tissue_fractions(labels_patch: np.ndarray) -> np.ndarray:
    """Fractions of the :data:`TISSUE_GROUPS` in a label patch (sums to 1).

    Parameters
    ----------
    labels_patch : numpy.ndarray
        ``uint8`` tissue labels.

    Returns
    -------
    numpy.ndarray
        float32 fractions, one per group.
    """
    counts = np.bincount(np.asarray(labels_patch, dtype=np.int64).ravel(), minlength=16)
    out = np.array([counts[list(g)].sum() for g in TISSUE_GROUPS.values()], dtype=np.float64)
    total = out.sum()
    return (out / total if total else np.full(out.size, 1.0 / out.size)).astype(np.float32)


def simulated_patches(
    seed: int,
    n_cases: int,
    patches_per_image: int,
    *,
    size: int = 256,
    anatomies: Sequence[str] = ("head", "chest"),
    dose_range: tuple[float, float] = (0.1, 1.0),
    first_case: int = 0,
) -> dict[str, np.ndarray]:
    """Training patches for the sim-encoder from :func:`models.sim.ldct.make_case`.

    Case ``i`` (``first_case <= i < first_case + n_cases``) is ``anatomies[i % len(anatomies)]`` with
    seed ``seed * 100000 + i`` and a low dose drawn log-uniformly from ``dose_range``; patches come
    from both its low-dose image (that dose) and its full-dose reference (dose 1.0), centred inside
    the body.

    Parameters
    ----------
    seed : int
        Data seed.
    n_cases : int
        Number of cases.
    patches_per_image : int
        Patches from each of the two images of a case.
    size : int, optional
        Image matrix size (256).
    anatomies : sequence of str, optional
        Anatomies to alternate.
    dose_range : tuple of float, optional
        Low-dose fraction range.
    first_case : int, optional
        Index of the first case (to make disjoint validation sets).

    Returns
    -------
    dict
        ``patches`` (n, 64, 64) HU float32, ``anatomy`` (n,) 0 head / 1 chest, ``dose`` (n,),
        ``fractions`` (n, groups).
    """
    from models.sim.ldct import make_case

    patches, anat, dose, frac = [], [], [], []
    half = PATCH // 2
    for i in range(first_case, first_case + n_cases):
        name = anatomies[i % len(anatomies)]
        case_seed = seed * 100_000 + i
        rng = np.random.default_rng([seed, i, 7])
        d = float(math.exp(rng.uniform(math.log(dose_range[0]), math.log(dose_range[1]))))
        case = make_case(name, case_seed, size, d, measure_lesions=False)  # type: ignore[arg-type]
        body = ndimage.binary_erosion(case.body_mask, iterations=4)
        valid = np.zeros(body.shape, bool)
        valid[half : size - half + 1, half : size - half + 1] = True
        centres = np.flatnonzero(body & valid)
        for image, dd in ((case.low_dose_hu, d), (case.reference_hu, 1.0)):
            picks = rng.choice(centres, size=patches_per_image, replace=centres.size < patches_per_image)
            for p in picks:
                r, c = np.unravel_index(int(p), body.shape)
                win = (slice(r - half, r + half), slice(c - half, c + half))
                patches.append(image[win])
                frac.append(tissue_fractions(case.labels[win]))
                anat.append(0 if name == "head" else 1)
                dose.append(dd)
    return {
        "patches": np.stack(patches).astype(np.float32),
        "anatomy": np.asarray(anat, dtype=np.float32),
        "dose": np.asarray(dose, dtype=np.float32),
        "fractions": np.stack(frac).astype(np.float32),
    }


def _task_loss(
    out: torch.Tensor, anat: torch.Tensor, dose_t: torch.Tensor, frac: torch.Tensor
) -> tuple[torch.Tensor, list[float]]:
    l_anat = F.binary_cross_entropy_with_logits(out[:, 0], anat)
    l_dose = F.mse_loss(out[:, 1], dose_t)
    l_frac = -(frac * F.log_softmax(out[:, 2:], dim=1)).sum(1).mean()
    return l_anat + l_dose + l_frac, [float(l_anat.detach()), float(l_dose.detach()), float(l_frac.detach())]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    if int(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(3,))
    return x


def _evaluate(net: SimEncoder, data: dict[str, np.ndarray]) -> dict[str, float]:
    net.eval()
    with torch.inference_mode(), torch_threads(1):
        outs = [
            net.predict_tasks(to_input(data["patches"][s : s + 256]))[1]
            for s in range(0, len(data["patches"]), 256)
        ]
    out = torch.cat(outs).numpy()
    anat_acc = float(((out[:, 0] > 0).astype(np.float32) == data["anatomy"]).mean())
    log_dose = out[:, 1] * DOSE_SD + DOSE_MU
    dose_mae = float(np.abs(log_dose - np.log10(data["dose"])).mean())
    frac_pred = np.exp(out[:, 2:] - out[:, 2:].max(1, keepdims=True))
    frac_pred /= frac_pred.sum(1, keepdims=True)
    frac_mae = float(np.abs(frac_pred - data["fractions"]).mean())
    return {"anatomy_accuracy": anat_acc, "log10_dose_mae": dose_mae, "tissue_fraction_mae": frac_mae}


def train_sim_encoder(
    out_dir: Path | str,
    seed: int = 0,
    minutes: float = 4.5,
    *,
    n_cases: int = 96,
    n_val_cases: int = 8,
    patches_per_image: int = 16,
    size: int = 256,
    anatomies: Sequence[str] = ("head", "chest"),
    max_steps: int = 2500,
    min_steps: int = 1,
    batch_size: int = 64,
    lr: float = 2e-3,
    threads: int = 1,
) -> dict[str, Any]:
    """Train the sim-encoder on simulated patches and write ``weights.safetensors`` + ``card.json``.

    This is what built the shipped ``models/zoo/sim-encoder/1.0``. The loss is the sum of a
    binary cross-entropy (anatomy head/chest), a mean squared error on the standardised log10 dose
    (references are dose 1.0) and a soft-label cross-entropy on the tissue fractions of the patch
    (:data:`TISSUE_GROUPS`). AdamW (weight decay 1e-4), cosine learning-rate decay over
    ``max_steps``, batches of ``batch_size`` with random 90-degree rotations and flips. Training
    stops after ``max_steps`` or when ``minutes`` of CPU time of this process (``time.process_time``,
    all threads, data simulation included) are spent, whichever is first, but never before
    ``min_steps``. With the same seed, thread count, torch build and CPU it is bit-for-bit
    reproducible as long as the step budget, not the clock, ends it (the card records which); the
    weights file is then byte-identical too, but not to the shipped one (see the README). One
    thread is the default: on a busy 2-core machine OpenMP threads spin and a step gets ~10x slower.

    Parameters
    ----------
    out_dir : pathlib.Path or str
        Directory to write (created).
    seed : int, optional
        Seeds the data (cases, doses, patch positions) and the network initialisation/batches.
    minutes : float, optional
        CPU-time budget in minutes.
    n_cases, n_val_cases : int, optional
        Training cases and held-out validation cases (disjoint case indices).
    patches_per_image : int, optional
        Patches per image (two images per case).
    size : int, optional
        Simulated matrix size (256).
    anatomies : sequence of str, optional
        Anatomies alternated over cases.
    max_steps : int, optional
        Optimiser steps.
    min_steps : int, optional
        Steps done even when the budget is spent (e.g. to test determinism of the first losses).
    batch_size : int, optional
        Batch size.
    lr : float, optional
        Peak learning rate.
    threads : int, optional
        torch CPU threads during training (restored afterwards).

    Returns
    -------
    dict
        ``history`` (total loss per step), ``card`` (what was written), ``weights`` (path).
    """
    t0 = time.monotonic()
    c0 = time.process_time()
    budget = 60.0 * float(minutes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = simulated_patches(seed, n_cases, patches_per_image, size=size, anatomies=anatomies)
    val = (
        simulated_patches(
            seed, n_val_cases, patches_per_image, size=size, anatomies=anatomies, first_case=n_cases
        )
        if n_val_cases > 0
        else None
    )
    t_data = time.monotonic() - t0
    c_data = time.process_time() - c0

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = SimEncoder()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, max_steps) / max_steps))
        )
        x_all = to_input(train["patches"])
        anat = torch.from_numpy(train["anatomy"])
        dose_t = torch.from_numpy((np.log10(train["dose"]) - DOSE_MU) / DOSE_SD).float()
        frac = torch.from_numpy(train["fractions"])
        n = x_all.shape[0]
        history: list[float] = []
        parts: list[list[float]] = []
        hit_clock = False
        net.train()
        for _step in range(max_steps):
            if len(history) >= min_steps and time.process_time() - c0 > budget:
                hit_clock = True
                break
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
            x = _augment(x_all[idx], gen)
            _, outp = net.predict_tasks(x)
            loss, comp = _task_loss(outp, anat[idx], dose_t[idx], frac[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(float(loss.detach()))
            parts.append(comp)
        metrics = _evaluate(net, val) if val is not None else {}
        state = net.state_dict()
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)

    weights = out / WEIGHTS_FILE
    _save_weights(weights, state)
    digest = sha256_of(weights)
    tail = np.asarray(parts[-50:]).mean(0).tolist() if parts else [float("nan")] * 3
    card: dict[str, Any] = {
        "name": SIM_ENCODER_LABEL,
        "version": SIM_ENCODER_VERSION,
        "label": SIM_ENCODER_LABEL,
        "what": (
            "Small CNN (4 stride-2 3x3 conv blocks, GroupNorm, global average pool, linear 64-d "
            "embedding) that embeds 64x64 CT patches (HU, two input windows) for feature-space "
            "distances (FID/KID/MMD) between restored and reference images. Trained here with "
            "auxiliary supervised tasks."
        ),
        "intended_use": (
            "Feature space for comparing image sets of simulated CT in this project's evaluation "
            "reports. Not a diagnostic model. Distances are only comparable with other distances "
            "computed with this exact file, never with published Inception-based FID/KID."
        ),
        "training_data": (
            f"SIMULATED only: models.sim.ldct.make_case at {size} px, anatomies {list(anatomies)}, "
            f"{n_cases} training cases (seeds {seed * 100_000}..{seed * 100_000 + n_cases - 1}) and "
            f"{n_val_cases} validation cases (next seeds); per case one low-dose image at a dose fraction "
            "drawn log-uniformly in [0.1, 1.0] and its full-dose reference (dose 1.0); "
            f"{patches_per_image} random 64x64 patches per image centred inside the body."
        ),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": digest,
        "weights_bytes": weights.stat().st_size,
        "architecture": {
            "channels": list(CHANNELS),
            "strides": list(STRIDES),
            "embed_dim": EMBED_DIM,
            "n_tissues": len(TISSUE_GROUPS),
            "input": "(n, 2, 64, 64): clip(HU,-1000,2000)/1000 and clip(HU-40,-200,200)/100",
            "n_parameters": int(sum(p.numel() for p in net.parameters())),
        },
        "training": {
            "seed": seed,
            "data_seed_formula": (
                "case seed = seed * 100000 + case index i; per-case rng = default_rng([seed, i, 7])"
            ),
            "loss": "BCE(anatomy) + MSE(standardised log10 dose) + soft cross-entropy(tissue fractions)",
            "tissue_groups": {k: list(v) for k, v in TISSUE_GROUPS.items()},
            "dose_standardisation": {"mu": DOSE_MU, "sd": DOSE_SD},
            "optimizer": f"AdamW lr={lr} weight_decay=1e-4, cosine decay over {max_steps} steps",
            "batch_size": batch_size,
            "augmentation": "random rot90 and horizontal flip",
            "steps": len(history),
            "max_steps": max_steps,
            "stopped_by_cpu_budget": hit_clock,
            "cpu_budget_minutes": float(minutes),
            "n_train_patches": int(n),
            "n_val_patches": int(len(val["patches"])) if val is not None else 0,
            "first_losses": history[:5],
            "final_loss_components_mean_last_50": dict(
                zip(["anatomy_bce", "dose_mse", "fraction_ce"], tail, strict=True)
            ),
            "data_wall_s": round(t_data, 1),
            "data_cpu_s": round(c_data, 1),
            "wall_s": round(time.monotonic() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "threads": threads,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "metrics_validation_simulated": metrics,
        "caption": FEATURE_NOTE,
    }
    write_card(out, card, indent=2, sort_keys=False)  # the shipped card's layout: keys in this order
    return {"history": history, "card": card, "weights": weights}
