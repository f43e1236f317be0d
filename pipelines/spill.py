"""Volume-sized intermediates of one job kept in files, read and written a slab at a time.

A 300-slice 512² CT is 315 MB per float32 volume, and a restoration job has five of them
(input, restored image, σ, hallucination score, and the encoded maps): held in memory at
once they made the worker's peak 2.5 GB (issue 20). A stage that works a slab at a time
puts each finished slab into a :class:`Spill` — a memory-mapped file under the job's work
directory — and drops the slab's pages from the process as soon as they are written or
read (:func:`release`). The data stay in the file (and in the page cache while memory is
free), so any later reader still sees an ordinary ``numpy`` array: one that reads it a
slab at a time (:func:`slabs`) keeps its own memory to a slab; one that reads it whole
still works, it only maps the pages while it reads.

The spill directory is removed when the pipeline ends (:func:`remove`); a mapping that is
still open keeps its data readable until it is closed (POSIX unlink semantics).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: Slices a slab-wise reader takes at a time (a 512² float32 slab of 32: 32 MB).
SLAB = 32

_DIRECTORY = ".spill"


def directory(workdir: Path) -> Path:
    """Where a job's spill files go (inside its work directory, never an output)."""
    return Path(workdir) / _DIRECTORY


class Spill:
    """Creates the job's file-backed arrays (``(slices, rows, columns)``, any dtype)."""

    def __init__(self, workdir: Path) -> None:
        self.directory = directory(workdir)
        self.directory.mkdir(parents=True, exist_ok=True)

    def array(self, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """A new zero-filled file-backed array ``name`` (replaces one of that name).

        The file's blocks are allocated first, so a full disk is an ``OSError`` here and
        not a SIGBUS when a page is written later."""
        dtype, shape = np.dtype(dtype), tuple(int(n) for n in shape)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes == 0:
            return np.zeros(shape, dtype)
        path = self.directory / f"{name}.raw"
        with open(path, "wb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as exc:
                said = f"no room for the job's working file {path} ({nbytes / 1e6:.0f} MB): {exc.strerror}"
                raise OSError(exc.errno, said) from None
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)

    def copy(self, name: str, array: np.ndarray) -> np.ndarray:
        """``array`` copied into a new file-backed array, a slab at a time."""
        out = self.array(name, array.shape, array.dtype)
        for part in slabs(len(array)):
            out[part] = array[part]
            release(out)
        return out


def remove(workdir: Path) -> None:
    """Delete the job's spill files (open mappings stay readable until closed)."""
    shutil.rmtree(directory(workdir), ignore_errors=True)


def slabs(length: int, size: int = SLAB) -> Iterator[slice]:
    """``slice(0, size), slice(size, 2 size), …`` over ``length`` slices."""
    for start in range(0, length, size):
        yield slice(start, min(start + size, length))


def _mapping(array: Any) -> mmap.mmap | None:
    """The mmap behind ``array`` (a memmap, or a view of one), else None."""
    seen = array
    while seen is not None:
        found = getattr(seen, "_mmap", None)
        if isinstance(found, mmap.mmap):
            return found
        seen = getattr(seen, "base", None)
    return None


def file_backed(array: Any) -> bool:
    """True for an array (or a view of one) kept in a spill file."""
    return _mapping(array) is not None


def release(array: Any) -> None:
    """Drop the pages of a file-backed array from this process's memory (they stay in
    the file and the page cache; the next read maps them again). Nothing for an array in
    memory."""
    found = _mapping(array)
    if found is not None and not found.closed:
        found.madvise(mmap.MADV_DONTNEED)


def _libc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_TRIM = _libc_trim()


def trim() -> None:
    """Give the memory the allocator keeps from freed volume-sized temporaries back to the
    system (glibc's ``malloc_trim``; nothing elsewhere): a stage's slabs and encoded
    frames are freed, but glibc keeps the pages of its arenas for reuse, and the next
    stage's peak would start from them."""
    if _TRIM is not None:
        _TRIM(0)


def read(array: np.ndarray, part: slice) -> np.ndarray:
    """A copy of ``array[part]`` in memory; a file-backed array's pages are released."""
    out = np.array(array[part])
    release(array)
    return out


def values(array: np.ndarray, within: np.ndarray | None = None) -> Callable[[], Iterator[np.ndarray]]:
    """A fresh pass over ``array``'s values (those where ``within`` is True), a slab at a
    time, each time it is called: the ``parts`` of
    :func:`pipelines.quantiles.upper_percentile_of_parts`."""

    def passes() -> Iterator[np.ndarray]:
        for part in slabs(len(array)):
            yield np.array(array[part] if within is None else array[part][within[part]])
            release(array)

    return passes


def all_finite(array: np.ndarray) -> bool:
    """``np.isfinite(array).all()`` a slab at a time (no volume-sized boolean temporary)."""
    if array.dtype.kind not in "fc":
        return True
    for part in slabs(len(array)) if array.ndim else [slice(None)]:
        ok = bool(np.isfinite(array[part]).all())
        release(array)
        if not ok:
            return False
    return True


def min_max(array: np.ndarray) -> tuple[float, float]:
    """``(array.min(), array.max())`` a slab at a time."""
    if array.ndim == 0 or len(array) == 0:
        return float(np.min(array)), float(np.max(array))
    lo, hi = np.inf, -np.inf
    for part in slabs(len(array)):
        lo, hi = min(lo, float(array[part].min())), max(hi, float(array[part].max()))
        release(array)
    return lo, hi


def strided_sample(array: np.ndarray, step: int) -> np.ndarray:
    """``array.ravel()[::step]`` (C order), taken a slab at a time: the same values."""
    if array.ndim < 2 or step <= 1:
        out = np.ravel(array)[::step].copy()
        release(array)
        return out
    per_slice = int(np.prod(array.shape[1:]))
    picked = []
    for part in slabs(len(array)):
        flat = np.ravel(array[part])
        offset = part.start * per_slice
        first = (-offset) % step  # the first multiple of ``step`` at or after ``offset``
        picked.append(flat[first::step].copy())
        release(array)
    return np.concatenate(picked) if picked else np.empty(0, array.dtype)
