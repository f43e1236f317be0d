"""A procedural torso CT phantom in Hounsfield units (numpy only, no DICOM here).

Deliberately simple — body, fat layer, lungs, heart, aorta, spine and a few nodules, with
smooth per-case variation and acquisition-like noise — so the backbone and the demo have a
realistic-looking, realistically sized CT series to move around. The physics-based
low-dose simulator of the restoration work builds on this geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HU_AIR, HU_LUNG, HU_FAT, HU_SOFT, HU_BLOOD, HU_BONE = -1000.0, -850.0, -100.0, 40.0, 60.0, 700.0


@dataclass(frozen=True)
class PhantomSpec:
    """Geometry of the simulated acquisition."""

    rows: int = 512
    columns: int = 512
    slices: int = 50
    pixel_spacing_mm: float = 0.75
    slice_thickness_mm: float = 2.5
    noise_hu: float = 12.0
    seed: int = 0


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def torso_slice(spec: PhantomSpec, z_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """One axial slice in HU; ``z_fraction`` runs 0 (inferior) to 1 (superior)."""
    h, w = spec.rows, spec.columns
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * 0.5, w * 0.5
    # Body tapers towards the shoulders; lungs grow towards the apex.
    body_rx = w * (0.40 - 0.04 * z_fraction)
    body_ry = h * (0.28 - 0.02 * z_fraction)
    img = np.full((h, w), HU_AIR, dtype=np.float32)
    body = _ellipse(yy, xx, cy, cx, body_ry, body_rx)
    img[body] = HU_FAT
    inner = _ellipse(yy, xx, cy, cx, body_ry - 12, body_rx - 12)
    img[inner] = HU_SOFT
    lung_scale = 0.55 + 0.45 * np.sin(np.pi * min(max(z_fraction, 0.05), 0.95))
    for side in (-1, 1):
        lung = _ellipse(
            yy,
            xx,
            cy - 0.02 * h,
            cx + side * 0.17 * w,
            0.17 * h * lung_scale,
            0.11 * w * lung_scale,
        )
        img[lung] = HU_LUNG
    heart = _ellipse(
        yy,
        xx,
        cy + 0.02 * h,
        cx + 0.04 * w,
        0.09 * h * (1.2 - z_fraction),
        0.08 * w * (1.2 - z_fraction),
    )
    img[heart & inner] = HU_BLOOD
    aorta = _ellipse(yy, xx, cy + 0.12 * h, cx + 0.03 * w, 0.022 * h, 0.022 * w)
    img[aorta] = HU_BLOOD + 150  # contrast-enhanced
    vertebra = _ellipse(yy, xx, cy + 0.2 * h, cx, 0.04 * h, 0.045 * w)
    img[vertebra] = HU_BONE
    canal = _ellipse(yy, xx, cy + 0.24 * h, cx, 0.012 * h, 0.012 * w)
    img[canal] = HU_SOFT - 20
    # A few nodules of varying size and contrast inside the lungs.
    for _ in range(rng.integers(0, 3)):
        ny = cy + rng.uniform(-0.1, 0.05) * h
        nx = cx + rng.choice([-1, 1]) * rng.uniform(0.12, 0.22) * w
        r = rng.uniform(2.0, 8.0)
        nodule = _ellipse(yy, xx, ny, nx, r, r)
        img[nodule & (img == HU_LUNG)] = HU_SOFT - rng.uniform(0, 60)
    img += rng.normal(0.0, spec.noise_hu, size=img.shape).astype(np.float32)
    img[~body] = HU_AIR + rng.normal(0.0, 3.0, size=int((~body).sum())).astype(np.float32)
    return img


def torso_volume(spec: PhantomSpec) -> np.ndarray:
    """A (slices, rows, columns) float32 volume in HU."""
    rng = np.random.default_rng(spec.seed)
    return np.stack([torso_slice(spec, (k + 0.5) / spec.slices, rng) for k in range(spec.slices)]).astype(
        np.float32
    )
