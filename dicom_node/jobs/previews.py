"""Previews for the review page: one slice of a job's output series and of its maps, as PNG.

One image per kind: for a job with several series of a kind (``prognosis``: predicted T1c
and FLAIR) the last one written.

Rendering reads whole series, so the last few jobs' previews are kept in memory. PNGs are
drawn with matplotlib's colour maps (imported when a preview is drawn: the ``ai`` extra).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ParametricMapStorage

from dicom_node.db.engine import Database
from dicom_node.jobs.review import ReviewError, job_outputs
from pipelines.geometry import frame_group
from pipelines.writers import (
    KIND_DERIVED,
    KIND_HALLUCINATION,
    KIND_PROBABILITY,
    KIND_UNCERTAINTY,
    map_values,
)

PREVIEW_KINDS = (KIND_DERIVED, KIND_UNCERTAINTY, KIND_HALLUCINATION, KIND_PROBABILITY)


def _slices(paths: tuple[Path, ...]) -> list[tuple[float, np.ndarray]]:
    """(z, 2-D values) for every frame of a series, single- or multi-frame, rescaled."""
    out: list[tuple[float, np.ndarray]] = []
    for path in paths:
        ds = pydicom.dcmread(path)
        # a Parametric Map's real-world values (an integer map through its mapping)
        pixels = (
            map_values(ds)
            if ds.get("SOPClassUID") == ParametricMapStorage
            else np.asarray(ds.pixel_array, dtype=np.float32)
        )
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            pixels = pixels.reshape(frames, *pixels.shape[-2:])
            for i, frame in enumerate(pixels):
                plane = frame_group(ds, i + 1, "PlanePositionSequence")
                z = float(plane.ImagePositionPatient[2])  # type: ignore[union-attr]
                out.append((z, frame))
        else:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            z = float(ds.ImagePositionPatient[2]) if "ImagePositionPatient" in ds else float(len(out))
            out.append((z, pixels * slope + intercept))
    return sorted(out, key=lambda s: s[0])


def _png(values: np.ndarray, vmin: float, vmax: float, cmap: str) -> bytes:
    from matplotlib import image

    buffer = io.BytesIO()
    image.imsave(buffer, values, vmin=vmin, vmax=max(vmax, vmin + 1e-6), cmap=cmap, format="png")
    return buffer.getvalue()


#: The web viewer keeps each kind as a float16 stack at most this many pixels a side (a
#: 300-slice 512² series and its maps: ~120 MB), for two jobs at a time.
VIEWER_SIDE = 256
KIND_OVERLAY = "overlay"


@dataclass(frozen=True)
class Previews:
    """One slice of the output series and of its maps, as PNG; ``z`` is where it is.
    ``index`` of ``count`` slices; ``peak`` is the slice the reviewer should see first."""

    z: float
    why: str
    images: dict[str, bytes]
    index: int = 0
    count: int = 1
    peak: int = 0


@dataclass(frozen=True)
class JobVolumes:
    """A job's previewable series as stacks on one set of slice positions (the reference
    series'), with the display window of each kind fixed over the whole volume (so a slice
    looks the same whichever one is shown first)."""

    z: list[float]
    stacks: dict[str, np.ndarray]
    windows: dict[str, tuple[float, float, str]]
    peak: int
    why: str

    def render(self, index: int | None = None) -> Previews:
        """PNGs of slice ``index`` (default: the peak) for every kind, and the derived
        series with the hallucination map overlaid where it is high (when both exist)."""
        at = self.peak if index is None else min(max(int(index), 0), len(self.z) - 1)
        images: dict[str, bytes] = {}
        for kind, stack in self.stacks.items():
            lo, hi, cmap = self.windows[kind]
            images[kind] = _png(stack[at].astype(np.float32), lo, hi, cmap)
        if KIND_DERIVED in self.stacks and KIND_HALLUCINATION in self.stacks:
            images[KIND_OVERLAY] = self._overlay(at)
        why = self.why if at == self.peak else f"slice {at + 1} of {len(self.z)}"
        return Previews(z=self.z[at], why=why, images=images, index=at, count=len(self.z), peak=self.peak)

    def _overlay(self, at: int) -> bytes:
        from matplotlib import colormaps, image

        lo, hi, _ = self.windows[KIND_DERIVED]
        gray = np.clip((self.stacks[KIND_DERIVED][at].astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
        _, top, cmap = self.windows[KIND_HALLUCINATION]
        score = np.clip(self.stacks[KIND_HALLUCINATION][at].astype(np.float32) / max(top, 1e-6), 0, 1)
        heat = colormaps[cmap](score)[..., :3]
        # the map shows where it is in the upper three quarters of its range, more opaque higher
        alpha = (np.clip((score - 0.25) / 0.75, 0, 1) * 0.75)[..., None]
        rgb = gray[..., None] * (1 - alpha) + heat * alpha
        buffer = io.BytesIO()
        image.imsave(buffer, rgb, format="png")
        return buffer.getvalue()


class PreviewCache:
    """The web viewer's volumes (two jobs) and rendered slices (the last 64)."""

    def __init__(self, jobs: int = 2, slices: int = 64) -> None:
        self._volumes: OrderedDict[int, JobVolumes] = OrderedDict()
        self._rendered: OrderedDict[tuple[int, int | None], Previews] = OrderedDict()
        self._lock = threading.Lock()
        self.jobs, self.slices = jobs, slices

    def volumes(self, db: Database, job_id: int) -> JobVolumes:
        with self._lock:
            if job_id in self._volumes:
                self._volumes.move_to_end(job_id)
                return self._volumes[job_id]
        made = load_volumes(db, job_id, max_side=VIEWER_SIDE)
        with self._lock:
            self._volumes[job_id] = made
            while len(self._volumes) > self.jobs:
                self._volumes.popitem(last=False)
        return made

    def get(self, db: Database, job_id: int, index: int | None = None) -> Previews:
        key = (job_id, index)
        with self._lock:
            if key in self._rendered:
                self._rendered.move_to_end(key)
                return self._rendered[key]
        made = self.volumes(db, job_id).render(index)
        with self._lock:
            self._rendered[key] = made
            while len(self._rendered) > self.slices:
                self._rendered.popitem(last=False)
        return made


def load_volumes(db: Database, job_id: int, max_side: int | None = None) -> JobVolumes:
    """The job's derived series and maps, on the reference series' slices (``max_side``:
    keep every ``k``-th pixel so no side is longer, as float16; None: full size)."""
    series = {o.kind: _slices(o.paths) for o in job_outputs(db, job_id) if o.kind in PREVIEW_KINDS}
    if not series:
        raise ReviewError(f"job {job_id} has no output series to preview")
    reference = KIND_DERIVED if KIND_DERIVED in series else next(iter(series))
    z = [position for position, _ in series[reference]]
    stacks: dict[str, np.ndarray] = {}
    for kind, slices in series.items():
        positions = np.array([position for position, _ in slices])
        chosen = [slices[int(np.argmin(np.abs(positions - at)))][1] for at in z]
        step = 1 if max_side is None else max(1, -(-max(chosen[0].shape) // max_side))
        dtype = np.float32 if max_side is None else np.float16
        stacks[kind] = np.stack([plane[::step, ::step] for plane in chosen]).astype(dtype)
    windows: dict[str, tuple[float, float, str]] = {}
    for kind, stack in stacks.items():
        values = stack.astype(np.float32)
        if kind == KIND_DERIVED:
            ct = float(np.min(values)) < -500
            lo, hi = (
                (-160.0, 240.0) if ct else (float(np.percentile(values, 1)), float(np.percentile(values, 99)))
            )
            windows[kind] = (lo, hi, "gray")
        elif kind == KIND_UNCERTAINTY:
            windows[kind] = (0.0, float(np.percentile(values, 99.5)), "viridis")
        elif kind == KIND_PROBABILITY:  # prognosis: the predicted tumour, 0 .. 1
            windows[kind] = (0.0, 1.0, "magma")
        else:
            windows[kind] = (0.0, max(1.0, float(np.max(values))), "inferno")
    if KIND_HALLUCINATION in stacks:
        peaks = [float(np.max(plane)) for plane in stacks[KIND_HALLUCINATION].astype(np.float32)]
        peak = int(np.argmax(peaks))
        why = f"slice where the hallucination map peaks ({peaks[peak]:.3g})"
    else:
        peak, why = len(z) // 2, "middle slice"
    return JobVolumes(z=z, stacks=stacks, windows=windows, peak=peak, why=why)


def previews(db: Database, job_id: int) -> Previews:
    """PNG previews of the derived series, the uncertainty and the hallucination map, full
    size, at the slice where the hallucination map peaks (what the reviewer must look at),
    or the middle slice when there is no hallucination map."""
    return load_volumes(db, job_id).render()
