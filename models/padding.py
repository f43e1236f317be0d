"""Any image size for a U-Net: pad each slice to the multiple the network needs, crop back.

A U-Net with strides ``(2, 2, 2)`` halves the image three times and must add the skip
connections back at the same size, so rows and columns must be multiples of 8 (16 for
four strides). A slice of another size (122×122, 484×484, 500×400) is padded evenly on
both sides by reflection (numpy's ``reflect``: no new edge, no constant cliff) and
the network's outputs are cropped back to the input's rows and columns, so the outputs
keep the input's geometry exactly and the padding never reaches a pixel of the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

PadMode = Literal["reflect", "edge"]


def size_multiple(strides: Sequence[int]) -> int:
    """The multiple rows and columns must have for a U-Net with these strides."""
    return math.prod(int(s) for s in strides) or 1


@dataclass(frozen=True)
class PlanePadding:
    """How a batch of slices was padded: the rows and columns to crop the outputs back to."""

    rows: int
    columns: int
    padded_rows: int
    padded_columns: int

    @property
    def needed(self) -> bool:
        return (self.rows, self.columns) != (self.padded_rows, self.padded_columns)

    def widths(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(before, after) padding of the rows and of the columns: half on each side."""
        extra_rows, extra_columns = self.padded_rows - self.rows, self.padded_columns - self.columns
        return (
            (extra_rows // 2, extra_rows - extra_rows // 2),
            (extra_columns // 2, extra_columns - extra_columns // 2),
        )

    def crop(self, array: np.ndarray) -> np.ndarray:
        """The input's rows and columns of a padded output (last two axes; a view)."""
        (top, _), (left, _) = self.widths()
        return array[..., top : top + self.rows, left : left + self.columns]


def plane_padding(rows: int, columns: int, multiple: int) -> PlanePadding:
    """The padded size of a ``rows`` × ``columns`` slice for a network needing ``multiple``."""
    if rows < 1 or columns < 1:
        raise ValueError(f"an image of {rows}×{columns} pixels cannot be padded: it is empty")
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, not {multiple}")
    return PlanePadding(rows, columns, -(-rows // multiple) * multiple, -(-columns // multiple) * multiple)


def pad_planes(
    array: np.ndarray, multiple: int, mode: PadMode = "reflect"
) -> tuple[np.ndarray, PlanePadding]:
    """``array`` (any leading axes, then rows, columns) padded on its last two axes to
    multiples of ``multiple``, and the :class:`PlanePadding` to crop outputs with.

    Returns ``array`` itself (no copy) when its size already fits. ``reflect`` mirrors the
    image without repeating its border pixel (numpy reflects again when the padding is
    wider than the image, and repeats a single row or column); ``edge`` repeats the
    border pixel.
    """
    padding = plane_padding(int(array.shape[-2]), int(array.shape[-1]), multiple)
    if not padding.needed:
        return array, padding
    widths = [(0, 0)] * (array.ndim - 2) + list(padding.widths())
    return np.pad(array, widths, mode=mode), padding
