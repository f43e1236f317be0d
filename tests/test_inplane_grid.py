"""models.inplane_grid: cells tiling the field, area means down, linear interpolation up."""

from __future__ import annotations

import numpy as np
import pytest

from models.inplane_grid import InPlaneGrid, finer_than


def test_cells_tile_the_field_at_about_the_asked_size() -> None:
    grid = InPlaneGrid((3, 512, 480), (3.0, 0.47, 0.5), 1.875)
    assert grid.cells == (128, 128)
    spacing = grid.cell_spacing
    assert spacing[0] == 3.0
    assert spacing[1] * 128 == pytest.approx(512 * 0.47)  # the same field, exactly
    assert spacing[2] * 128 == pytest.approx(480 * 0.5)
    assert abs(spacing[1] - 1.875) < 0.02 and abs(spacing[2] - 1.875) < 0.01


def test_integer_ratio_is_the_block_mean() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(2, 64, 48)).astype(np.float32)
    grid = InPlaneGrid(volume.shape, (3.0, 0.5, 0.5), 2.0)
    assert grid.cells == (16, 12)
    block = volume.reshape(2, 16, 4, 12, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(grid.down(volume), block, atol=1e-6)


def test_any_ratio_keeps_the_mean_and_constants() -> None:
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(2, 37, 53)).astype(np.float32)
    grid = InPlaneGrid(volume.shape, (2.0, 0.6, 0.55), 1.875)  # 3.1x and 3.4x: no pixel fits a cell
    down = grid.down(volume)
    assert down.shape == (2, *grid.cells)
    # equal cells tile the field, so the cells' mean is the pixels' mean (area conserved)
    np.testing.assert_allclose(down.mean(axis=(1, 2)), volume.mean(axis=(1, 2)), atol=1e-5)
    constant = np.full(volume.shape, 7.5, np.float32)
    np.testing.assert_allclose(grid.down(constant), 7.5, atol=1e-5)
    np.testing.assert_allclose(grid.up(grid.down(constant)), 7.5, atol=1e-5)


def test_up_interpolates_a_ramp_between_cell_centres() -> None:
    grid = InPlaneGrid((1, 64, 64), (1.0, 0.5, 0.5), 2.0)
    x = (np.arange(64) + 0.5) * 0.5  # pixel centres, mm
    ramp = np.broadcast_to(x[None, None, :], (1, 64, 64)).astype(np.float32)
    back = grid.up(grid.down(ramp))
    # a linear ramp survives both ways wherever a pixel lies between two cell centres
    inner = slice(4, 60)
    np.testing.assert_allclose(back[0, :, inner], ramp[0, :, inner], atol=1e-4)
    # beyond the outermost centres the edge cell's value is kept (no extrapolation)
    assert back[0, 0, 0] == pytest.approx(1.0, abs=1e-4)  # first cell's mean: centres 0.25-1.75 mm


def test_masks_are_cells_at_least_half_covered() -> None:
    mask = np.zeros((1, 8, 8), bool)
    mask[0, :4, :2] = True  # half of each top-left 4x4 cell... of one cell only
    grid = InPlaneGrid(mask.shape, (1.0, 1.0, 1.0), 4.0)
    assert grid.down_mask(mask).tolist() == [[[True, False], [False, False]]]


def test_a_volume_of_another_shape_is_refused() -> None:
    grid = InPlaneGrid((2, 32, 32), (3.0, 0.5, 0.5), 2.0)
    with pytest.raises(ValueError, match="expects"):
        grid.down(np.zeros((2, 32, 31), np.float32))
    with pytest.raises(ValueError, match="expects"):
        grid.up(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ValueError, match="positive"):
        InPlaneGrid((2, 32, 32), (3.0, 0.0, 0.5), 2.0)


def test_finer_than_tolerates_decimal_rounding() -> None:
    assert finer_than(0.47, 0.9)
    assert not finer_than(0.9, 0.9)
    assert not finer_than(0.8915, 0.9)  # 0.9 written with DICOM's rounding
    assert not finer_than(float("nan"), 0.9)
