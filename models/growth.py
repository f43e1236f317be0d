"""Fisher–Kolmogorov (reaction–diffusion) growth of a glioma cell density on a voxel grid.

The normalised tumour cell density ``c`` (0 .. 1, 1 = carrying capacity) obeys

    dc/dt = div( D(x) grad c ) + rho c (1 - c)

with a tissue-dependent diffusivity ``D`` (scalar per voxel, or a tensor per voxel for spread along
white-matter tracts) and zero flux (Neumann) through every face that touches a barrier voxel (CSF,
ventricles, outside the skull) and at the edge of the grid.

Scheme
    Explicit finite volumes: the flux through the face between two voxels is the harmonic mean of
    their diffusivities times the difference of ``c`` over the spacing, so a barrier voxel (``D``
    = 0) closes all its faces and the diffusion part conserves ``sum(c)`` exactly. Forward Euler in
    time with ``dt = 0.9 / (2 sum_a D_max / h_a^2)`` (the von Neumann limit of the 7-point
    Laplacian), also kept below ``0.25 / rho`` for the logistic term; with these the isotropic
    update keeps ``c`` in [0, 1]. The tensor case adds the off-diagonal fluxes (transverse
    gradients averaged onto the face) and is clipped to [0, 1] (the 19-point stencil is not
    monotone; the clip costs a negligible amount of mass).
Speed
    Work is restricted to the bounding box of voxels with ``c > active_threshold`` plus a margin
    of as many voxels as steps between box updates (the explicit support grows one voxel a step),
    so a small tumour in a large domain costs little; outside the box ``c`` is unchanged. float32.

:func:`grow` is the one entry point; :func:`tissue_diffusivity` and :func:`fibre_tensor` build its
inputs from tissue fractions and an orientation field; :func:`stable_dt` and
:func:`front_speed` are the numbers behind it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Steps between updates of the active bounding box (also its margin, in voxels).
BOX_EVERY = 8


def tissue_diffusivity(
    white: np.ndarray,
    grey: np.ndarray,
    d_white: float,
    d_grey: float,
    *,
    min_tissue: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Diffusivity map from white and grey matter fractions (Swanson et al. 2000).

    Parameters
    ----------
    white, grey : numpy.ndarray
        Tissue fractions per voxel (0 .. 1; the remainder is CSF or non-brain).
    d_white, d_grey : float
        Diffusivity in pure white and pure grey matter, mm^2/day.
    min_tissue : float, optional
        Voxels with less brain tissue (``white + grey``) than this are barrier: no cells, no flux.

    Returns
    -------
    diffusivity : numpy.ndarray
        float32 mm^2/day, the fraction-weighted mean of ``d_white`` and ``d_grey`` over the brain
        tissue of the voxel; 0 in the barrier.
    barrier : numpy.ndarray
        Boolean barrier mask (CSF, ventricles, outside the brain).
    """
    if d_white < 0 or d_grey < 0:
        raise ValueError("diffusivities must be >= 0 (mm^2/day)")
    w = np.asarray(white, dtype=np.float32)
    g = np.asarray(grey, dtype=np.float32)
    tissue = w + g
    barrier = tissue < min_tissue
    d = (np.float32(d_white) * w + np.float32(d_grey) * g) / np.maximum(tissue, np.float32(1e-6))
    d[barrier] = 0.0
    return d.astype(np.float32), barrier


def fibre_tensor(orientation: np.ndarray, anisotropy: float | np.ndarray) -> np.ndarray:
    """Unit-determinant diffusion tensor elongated along a fibre orientation.

    Eigenvalue ``a^(2/3)`` along the fibre and ``a^(-1/3)`` across it, so the ratio is ``a`` and the
    geometric mean (the volume of the diffusion ellipsoid) is 1: multiplied by a scalar
    diffusivity it redistributes the spread between directions without changing its overall rate.

    Parameters
    ----------
    orientation : numpy.ndarray
        ``(3, *shape)`` fibre direction per voxel in array-axis order (need not be normalised; a
        zero vector gives the identity).
    anisotropy : float or numpy.ndarray
        Ratio ``a >= 1`` of along-fibre to across-fibre diffusivity (per voxel if an array; 1 =
        isotropic).

    Returns
    -------
    numpy.ndarray
        ``(6, *shape)`` float32 components ``(00, 11, 22, 01, 02, 12)``.
    """
    v = np.asarray(orientation, dtype=np.float32)
    norm = np.sqrt((v * v).sum(axis=0))
    v = v / np.maximum(norm, np.float32(1e-12))
    a = np.broadcast_to(np.asarray(anisotropy, dtype=np.float32), norm.shape)
    if np.any(a < 1.0):
        raise ValueError("anisotropy must be >= 1 (along-fibre over across-fibre diffusivity)")
    a = np.where(norm > 1e-12, a, np.float32(1.0))
    across = a ** np.float32(-1.0 / 3.0)
    extra = a ** np.float32(2.0 / 3.0) - across
    pairs = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
    out = np.empty((6, *norm.shape), dtype=np.float32)
    for k, (i, j) in enumerate(pairs):
        out[k] = extra * v[i] * v[j] + (across if i == j else 0.0)
    return out


def stable_dt(
    max_diffusivity: float, rho: float, spacing_mm: Sequence[float], *, tensor_bound: float = 1.0
) -> float:
    """Largest time step (days) the explicit scheme is run with.

    ``0.9 / (2 lambda D_max sum_a 1/h_a^2)`` for diffusion (``lambda`` bounds the tensor's largest
    eigenvalue, 1 when isotropic) and ``0.25 / rho`` for the logistic term.

    Parameters
    ----------
    max_diffusivity : float
        Largest diffusivity in the domain, mm^2/day.
    rho : float
        Largest proliferation rate, 1/day.
    spacing_mm : sequence of float
        Voxel spacing per axis.
    tensor_bound : float, optional
        Bound on the largest eigenvalue of the normalised tensor.

    Returns
    -------
    float
        Time step in days (``inf`` if nothing moves or grows).
    """
    inv_h2 = sum(1.0 / float(h) ** 2 for h in spacing_mm)
    limits = [math.inf]
    if max_diffusivity > 0:
        limits.append(0.9 / (2.0 * tensor_bound * max_diffusivity * inv_h2))
    if rho > 0:
        limits.append(0.25 / rho)
    return min(limits)


def front_speed(diffusivity: float, rho: float) -> float:
    """Asymptotic speed ``2 sqrt(D rho)`` (mm/day) of a Fisher–Kolmogorov front in a uniform medium."""
    return 2.0 * math.sqrt(max(diffusivity, 0.0) * max(rho, 0.0))


def _harmonic_faces(d: np.ndarray, axis: int) -> np.ndarray:
    lo = np.take(d, np.arange(d.shape[axis] - 1), axis=axis)
    hi = np.take(d, np.arange(1, d.shape[axis]), axis=axis)
    total = lo + hi
    return np.where(total > 0, 2.0 * lo * hi / np.maximum(total, np.float32(1e-30)), 0.0).astype(np.float32)


def _mean_faces(t: np.ndarray, axis: int) -> np.ndarray:
    lo = np.take(t, np.arange(t.shape[axis] - 1), axis=axis)
    hi = np.take(t, np.arange(1, t.shape[axis]), axis=axis)
    return (0.5 * (lo + hi)).astype(np.float32)


def _cut(axis: int, start: int | None, stop: int | None) -> tuple[slice, ...]:
    out = [slice(None)] * 3
    out[axis] = slice(start, stop)
    return tuple(out)


def _active_box(c: np.ndarray, threshold: float, margin: int) -> tuple[slice, ...] | None:
    active = c > threshold
    if not active.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(active.any(axis=other))
        box.append(slice(max(0, int(hit[0]) - margin), min(c.shape[axis], int(hit[-1]) + margin + 1)))
    return tuple(box)


def _face_box(box: tuple[slice, ...], axis: int) -> tuple[slice, ...]:
    """The faces inside ``box`` along ``axis`` (one fewer than the voxels)."""
    out = list(box)
    out[axis] = slice(box[axis].start, box[axis].stop - 1)
    return tuple(out)


def grow(
    c0: np.ndarray,
    diffusivity: float | np.ndarray,
    rho: float | np.ndarray,
    days: float,
    spacing_mm: Sequence[float],
    *,
    dt: float | None = None,
    barrier_mask: np.ndarray | None = None,
    tensor: np.ndarray | None = None,
    active_threshold: float = 1e-7,
) -> np.ndarray:
    """Run the Fisher–Kolmogorov model ``dc/dt = div(D grad c) + rho c (1 - c)`` forward.

    Parameters
    ----------
    c0 : numpy.ndarray
        ``(n0, n1, n2)`` initial density in [0, 1].
    diffusivity : float or numpy.ndarray
        mm^2/day, scalar or per voxel (0 closes a voxel like the barrier).
    rho : float or numpy.ndarray
        Proliferation rate, 1/day, scalar or per voxel.
    days : float
        Time to run (>= 0).
    spacing_mm : sequence of float
        Voxel spacing per axis.
    dt : float, optional
        Time step in days; default :func:`stable_dt`, shortened so a whole number of steps ends
        exactly at ``days``. A larger one than the stability limit is refused.
    barrier_mask : numpy.ndarray, optional
        Boolean voxels where no cells live and through whose faces nothing flows (CSF, skull).
        Density there is set to 0.
    tensor : numpy.ndarray, optional
        ``(6, n0, n1, n2)`` normalised diffusion tensor per voxel (:func:`fibre_tensor`); the local
        diffusion tensor is ``diffusivity * tensor``.
    active_threshold : float, optional
        Density below which a voxel far from the tumour is left alone (see the module docstring);
        0 computes everywhere.

    Returns
    -------
    numpy.ndarray
        float32 density after ``days``.
    """
    c = np.array(c0, dtype=np.float32, copy=True)
    if c.ndim != 3:
        raise ValueError(f"c0 must be a 3-D volume, got shape {c.shape}")
    if days < 0:
        raise ValueError("days must be >= 0")
    spacing = tuple(float(h) for h in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError("spacing_mm must be three positive numbers")
    d = np.broadcast_to(np.asarray(diffusivity, dtype=np.float32), c.shape).copy()
    if np.any(d < 0):
        raise ValueError("diffusivity must be >= 0")
    if barrier_mask is not None:
        barrier = np.asarray(barrier_mask, dtype=bool)
        if barrier.shape != c.shape:
            raise ValueError("barrier_mask must have the shape of c0")
        d[barrier] = 0.0
        c[barrier] = 0.0
    rho_map = np.asarray(rho, dtype=np.float32)
    rho_max = float(rho_map.max()) if rho_map.size else 0.0
    tensor_bound = 1.0
    if tensor is not None:
        if tensor.shape != (6, *c.shape):
            raise ValueError(f"tensor must have shape (6, *c0.shape) = {(6, *c.shape)}, got {tensor.shape}")
        t = np.asarray(tensor, dtype=np.float32)
        # Gershgorin bound on the largest eigenvalue.
        rows = (
            np.abs(t[0]) + np.abs(t[3]) + np.abs(t[4]),
            np.abs(t[1]) + np.abs(t[3]) + np.abs(t[5]),
            np.abs(t[2]) + np.abs(t[4]) + np.abs(t[5]),
        )
        tensor_bound = float(max(float(r[d > 0].max()) if np.any(d > 0) else 1.0 for r in rows))
    limit = stable_dt(float(d.max()), rho_max, spacing, tensor_bound=tensor_bound)
    if dt is not None and dt > limit * (1.0 + 1e-9) / 0.9:
        raise ValueError(f"dt = {dt:g} days is above the stability limit {limit / 0.9:g} days")
    step = min(limit, days) if dt is None else float(dt)
    if days == 0 or not math.isfinite(step) or step <= 0:
        return c
    n_steps = max(1, math.ceil(days / step - 1e-9))
    step = days / n_steps

    # Face coefficients, pre-multiplied by dt / h^2 (axis a: shape n_a - 1 along a).
    k_faces = [_harmonic_faces(d, a) * np.float32(step / spacing[a] ** 2) for a in range(3)]
    cross: list[list[tuple[int, np.ndarray]]] = [[], [], []]
    if tensor is not None:
        t = np.asarray(tensor, dtype=np.float32)
        index = {(0, 0): 0, (1, 1): 1, (2, 2): 2, (0, 1): 3, (1, 0): 3, (0, 2): 4, (2, 0): 4, (1, 2): 5}
        index[(2, 1)] = 5
        for a in range(3):
            harm = _harmonic_faces(d, a)
            k_faces[a] = harm * _mean_faces(t[a], a) * np.float32(step / spacing[a] ** 2)
            for b in range(3):
                if b != a:
                    # Flux along a from the gradient along b: dt / h_a * D_ab * dc/db (central, averaged).
                    coeff = harm * _mean_faces(t[index[(a, b)]], a)
                    cross[a].append((b, coeff * np.float32(step / (spacing[a] * 2.0 * spacing[b]))))
    rho_dt = rho_map * np.float32(step)
    rho_is_map = rho_dt.ndim == 3

    done = 0
    while done < n_steps:
        chunk = min(BOX_EVERY, n_steps - done)
        box = (
            _active_box(c, active_threshold, BOX_EVERY + 1)
            if active_threshold > 0
            else tuple(slice(0, n) for n in c.shape)
        )
        if box is None:
            break
        u = c[box].copy()
        kb = [k_faces[a][_face_box(box, a)] for a in range(3)]
        cb = [[(b, coeff[_face_box(box, a)]) for b, coeff in cross[a]] for a in range(3)]
        rb = rho_dt[box] if rho_is_map else rho_dt
        for _ in range(chunk):
            du = rb * u * (1.0 - u)
            grads = [_central(u, b) for b in range(3)] if tensor is not None else []
            for a in range(3):
                lo, hi = _cut(a, None, -1), _cut(a, 1, None)
                flux = kb[a] * (u[hi] - u[lo])
                for b, coeff in cb[a]:
                    flux += coeff * (grads[b][lo] + grads[b][hi])
                du[lo] += flux
                du[hi] -= flux
            u += du
            if tensor is not None:
                np.clip(u, 0.0, 1.0, out=u)
        c[box] = u
        done += chunk
    return c


def _central(u: np.ndarray, axis: int) -> np.ndarray:
    """``u[i+1] - u[i-1]`` along ``axis`` (one-sided, doubled, at the ends)."""
    g = np.empty_like(u)
    g[_cut(axis, 1, -1)] = u[_cut(axis, 2, None)] - u[_cut(axis, None, -2)]
    g[_cut(axis, 0, 1)] = 2.0 * (u[_cut(axis, 1, 2)] - u[_cut(axis, 0, 1)])
    g[_cut(axis, -1, None)] = 2.0 * (u[_cut(axis, -1, None)] - u[_cut(axis, -2, -1)])
    return g
