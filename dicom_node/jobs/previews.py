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


@dataclass(frozen=True)
class Previews:
    """One slice of the output series and of both maps, as PNG; ``z`` is where it is."""

    z: float
    why: str
    images: dict[str, bytes]


class PreviewCache:
    """Rendering reads whole series; keep the last few jobs' previews in memory."""

    def __init__(self, size: int = 16) -> None:
        self._items: OrderedDict[int, Previews] = OrderedDict()
        self._lock = threading.Lock()
        self.size = size

    def get(self, db: Database, job_id: int) -> Previews:
        with self._lock:
            if job_id in self._items:
                self._items.move_to_end(job_id)
                return self._items[job_id]
        made = previews(db, job_id)
        with self._lock:
            self._items[job_id] = made
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return made


def previews(db: Database, job_id: int) -> Previews:
    """PNG previews of the derived series, the uncertainty and the hallucination map.

    All three at the same slice: the one where the hallucination map peaks (what the
    reviewer must look at), or the middle slice when there is no hallucination map.
    """
    series = {o.kind: _slices(o.paths) for o in job_outputs(db, job_id) if o.kind in PREVIEW_KINDS}
    if not series:
        raise ReviewError(f"job {job_id} has no output series to preview")
    if KIND_HALLUCINATION in series:
        peaks = [float(np.max(v)) for _z, v in series[KIND_HALLUCINATION]]
        index, reference = int(np.argmax(peaks)), KIND_HALLUCINATION
        why = f"slice where the hallucination map peaks ({peaks[index]:.3g})"
    else:
        reference = next(iter(series))
        index = len(series[reference]) // 2
        why = "middle slice"
    z = series[reference][index][0]
    images: dict[str, bytes] = {}
    for kind, slices in series.items():
        nearest = min(slices, key=lambda s: abs(s[0] - z))[1]
        if kind == KIND_DERIVED:
            lo, hi = (-160.0, 240.0) if float(np.min(nearest)) < -500 else np.percentile(nearest, [1, 99])
            images[kind] = _png(nearest, float(lo), float(hi), "gray")
        elif kind == KIND_UNCERTAINTY:
            images[kind] = _png(nearest, 0.0, float(np.percentile(nearest, 99.5)), "viridis")
        elif kind == KIND_PROBABILITY:  # prognosis: the predicted tumour, 0 .. 1
            images[kind] = _png(nearest, 0.0, 1.0, "magma")
        else:
            images[kind] = _png(nearest, 0.0, max(1.0, float(np.max(nearest))), "inferno")
    return Previews(z=z, why=why, images=images)
