"""A coarser in-plane grid over the same field of view, and the way there and back.

A network trained at one pixel size (the synthesis models: 1.875 mm, 128 × 128 over 240 mm)
does worse on much finer pixels (a clinical 512² brain series, 0.47 mm: measured in
``docs/synthesis.md``). :class:`InPlaneGrid` puts such a series' slices on cells of about
the training's size that tile exactly the series' field of view, runs whatever is asked
there, and brings the results back onto the series' own pixels:

* **down** — each cell is the area-weighted mean of the pixels it covers (a pixel cut by a
  cell border counts in both by its overlap), which is what a scanner reconstructing at the
  coarser pixel would have averaged; no interpolation, so nothing aliases;
* **up** — linear interpolation between cell centres, clamped at the edges (a pixel beyond
  the outermost cell centre takes that cell's value).

Rows and columns are resampled separately; slices are left as they are (the models are
2-D or 2.5-D on the series' own slices, so the outputs stay slice for slice). Both ways are
matrix products with small dense matrices (cells × pixels), so a 32-slice 512² series takes
a few tens of milliseconds each way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _area_weights(pixels: int, cells: int) -> np.ndarray:
    """(cells × pixels): cell j's share of each pixel, rows summing to 1 (both tile [0, 1])."""
    edges_p = np.arange(pixels + 1, dtype=np.float64) / pixels
    edges_c = np.arange(cells + 1, dtype=np.float64) / cells
    lo = np.maximum(edges_c[:-1, None], edges_p[None, :-1])
    hi = np.minimum(edges_c[1:, None], edges_p[None, 1:])
    overlap = np.clip(hi - lo, 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _interpolation(pixels: int, cells: int) -> np.ndarray:
    """(pixels × cells): linear interpolation from cell centres to pixel centres, clamped."""
    # pixel i's centre in cell units, where cell j's centre sits at j
    at = np.clip((np.arange(pixels, dtype=np.float64) + 0.5) * cells / pixels - 0.5, 0.0, cells - 1.0)
    left = np.floor(at).astype(int)
    right = np.minimum(left + 1, cells - 1)
    frac = at - left
    out = np.zeros((pixels, cells))
    rows = np.arange(pixels)
    np.add.at(out, (rows, left), 1.0 - frac)
    np.add.at(out, (rows, right), frac)
    return out


@dataclass(frozen=True)
class InPlaneGrid:
    """Cells of about ``cell_mm`` over the field of ``shape`` (slices, rows, columns) at
    ``spacing`` (slice, row, column) mm; see the module."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    cell_mm: float
    cells: tuple[int, int] = field(init=False)
    _down: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)
    _up: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or len(self.spacing) != 3:
            raise ValueError(f"a 3-D volume is needed, not shape {self.shape}")
        if not self.cell_mm > 0 or not all(s > 0 for s in self.spacing[1:]):
            raise ValueError(f"pixel {self.spacing[1:]} mm and cell {self.cell_mm} mm must be positive")
        sides = zip(self.shape[1:], self.spacing[1:], strict=True)
        cells = tuple(max(1, round(n * p / self.cell_mm)) for n, p in sides)
        object.__setattr__(self, "cells", cells)
        object.__setattr__(
            self, "_down", tuple(_area_weights(n, m) for n, m in zip(self.shape[1:], cells, strict=True))
        )
        object.__setattr__(
            self, "_up", tuple(_interpolation(n, m) for n, m in zip(self.shape[1:], cells, strict=True))
        )

    @property
    def cell_spacing(self) -> tuple[float, float, float]:
        """(slice, row, column) mm of the cells: the field divided by the cell counts."""
        rows, cols = self.cells
        return (
            float(self.spacing[0]),
            self.shape[1] * self.spacing[1] / rows,
            self.shape[2] * self.spacing[2] / cols,
        )

    def down(self, volume: np.ndarray) -> np.ndarray:
        """The volume's area-weighted mean in each cell (float32)."""
        self._check(volume, self.shape)
        rows, cols = self._down
        out = np.einsum("rh,shw,cw->src", rows, np.asarray(volume, np.float64), cols, optimize=True)
        return out.astype(np.float32)

    def down_mask(self, mask: np.ndarray) -> np.ndarray:
        """Cells at least half covered by ``mask``."""
        return self.down(np.asarray(mask, np.float32)) >= 0.5

    def up(self, cells: np.ndarray) -> np.ndarray:
        """A cell volume interpolated back onto the pixels (float32)."""
        self._check(cells, (self.shape[0], *self.cells))
        rows, cols = self._up
        out = np.einsum("hr,src,wc->shw", rows, np.asarray(cells, np.float64), cols, optimize=True)
        return out.astype(np.float32)

    @staticmethod
    def _check(volume: np.ndarray, shape: tuple[int, ...]) -> None:
        if tuple(volume.shape) != tuple(shape):
            raise ValueError(f"volume of shape {tuple(volume.shape)}, the grid expects {tuple(shape)}")


def finer_than(pixel_mm: float, lowest_mm: float) -> bool:
    """Whether a pixel of ``pixel_mm`` is finer than a model's range starting at ``lowest_mm``
    (with a 1 % tolerance, as DICOM's decimal strings round)."""
    return math.isfinite(pixel_mm) and pixel_mm < lowest_mm * 0.99


@dataclass(frozen=True)
class Resampling:
    """A model card's ``resample: {"pixel_spacing_mm": [lo, hi], "to_mm": P}``: a series whose
    pixels lie in that range (finer than the card's own ``input_domain``, which starts at
    ``hi``) is taken on cells of about ``P`` mm (:class:`InPlaneGrid`)."""

    pixel_spacing_mm: tuple[float, float]
    to_mm: float

    @classmethod
    def from_card(cls, values: Mapping[str, Any], label: str) -> Resampling | None:
        if not values:
            return None
        try:
            lo, hi = (float(v) for v in values["pixel_spacing_mm"])
            to_mm = float(values["to_mm"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"model card {label}: resample needs pixel_spacing_mm [low, high] and to_mm ({exc})"
            ) from None
        if not 0 < lo < hi < to_mm:
            raise ValueError(
                f"model card {label}: resample.pixel_spacing_mm {lo}-{hi} must be finer than to_mm {to_mm}"
            )
        return cls((lo, hi), to_mm)

    def applies(self, spacing: Sequence[float]) -> bool:
        """Whether a series of ``spacing`` (slice, row, column mm) is resampled: no pixel side
        below the range, one at least finer than its top (which is where the input domain's
        own range starts)."""
        lo, hi = self.pixel_spacing_mm
        sides = (float(spacing[1]), float(spacing[2]))
        return all(p >= lo * 0.99 for p in sides) and any(finer_than(p, hi) for p in sides)

    def grid(self, shape: Sequence[int], spacing: Sequence[float]) -> InPlaneGrid | None:
        """The grid a series of ``shape`` and ``spacing`` (slice, row, column) is taken on, or
        None when it is taken on its own pixels."""
        if not self.applies(spacing):
            return None
        return InPlaneGrid(
            (int(shape[0]), int(shape[1]), int(shape[2])),
            (float(spacing[0]), float(spacing[1]), float(spacing[2])),
            self.to_mm,
        )

    def widened(self, pixel_spacing_mm: Sequence[float]) -> tuple[float, float]:
        """An ``input_domain`` pixel range (low, high) taken down to this range's low end."""
        low, high = float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1])
        return (min(low, self.pixel_spacing_mm[0]), high)
