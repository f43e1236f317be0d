"""Output validation: re-read every written object before anything may leave.

Checks what a receiving PACS or TPS would otherwise find the hard way: each file parses;
it belongs to the input study and carries the identity the job recorded; its provenance
names sources that are in the processed series; pixel data decode to the declared
geometry with finite values; the derived series has one image per source slice, in the
source's frame of reference. Any problem is returned (not raised) — the node's gate then
holds the job for a person, whatever the rule's gate says.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pipelines.provenance import provenance_of
from pipelines.stages import Context
from pipelines.uids import derived_frame_of_reference
from pipelines.writers import KIND_DERIVED, KIND_HALLUCINATION, KIND_PROBABILITY, KIND_UNCERTAINTY

_PIXEL_KINDS = (KIND_DERIVED, KIND_UNCERTAINTY, KIND_HALLUCINATION, KIND_PROBABILITY)


def validate_outputs(ctx: Context, *, max_problems: int = 20) -> list[str]:
    """Problems with the objects in ``ctx.outputs`` (empty: all good)."""
    problems: list[str] = []
    # what the pipeline read: its series, any other series of the study it read (e.g. the
    # current FLAIR of `prognosis`) and the job's priors
    read = (*ctx.series, *ctx.other_series)
    source_sops = {i.sop_uid for i in read} | {u for p in ctx.env.priors for _, u in p.instances}
    source_series = {i.series_uid for i in read} | {p.series_uid for p in ctx.env.priors}
    # an overlay illustrates a map of this job: its own outputs are legitimate sources too
    known_series = source_series | {o.series_uid for o in ctx.outputs}
    frame_of_reference = _expected_frame_of_reference(ctx)
    kinds: Counter[str] = Counter()
    derived_series: Counter[str] = Counter()
    if not ctx.outputs:
        return ["the pipeline wrote no output objects"]
    for out in ctx.outputs:
        if len(problems) >= max_problems:
            problems.append("… (more problems not listed)")
            break
        where = f"{out.path.name}"
        try:
            ds = pydicom.dcmread(out.path)
        except (OSError, InvalidDicomError) as exc:
            problems.append(f"{where}: cannot be read back: {exc}")
            continue
        if str(ds.get("StudyInstanceUID", "")) != ctx.study.study_uid:
            problems.append(f"{where}: Study Instance UID is not the input study's")
        if (
            str(ds.get("SOPInstanceUID", "")) != out.sop_uid
            or str(ds.get("SOPClassUID", "")) != out.sop_class_uid
        ):
            problems.append(f"{where}: SOP Instance/Class UID differ from what the job recorded")
        try:
            facts = provenance_of(ds)
        except ValueError as exc:
            problems.append(f"{where}: provenance: {exc}")
            continue
        kind = str(facts["kind"])
        kinds[kind] += 1
        if kind == KIND_DERIVED:
            derived_series[out.series_uid] += 1
        if source_series and not set(facts["source_series_instance_uids"]) <= known_series:
            problems.append(f"{where}: references a source series that was not processed")
        if kind == KIND_DERIVED and not set(facts["source_sop_instance_uids"]) <= source_sops:
            problems.append(f"{where}: references a source image that was not processed")
        if frame_of_reference is not None and kind in _PIXEL_KINDS:
            found = facts.get("frame_of_reference_uid")
            if not found:
                problems.append(f"{where}: no Frame of Reference UID")
            elif found != frame_of_reference:
                problems.append(f"{where}: Frame of Reference UID is not the source's ({frame_of_reference})")
        if kind in _PIXEL_KINDS:
            problems.extend(f"{where}: {p}" for p in _pixel_problems(ds))
    # one derived image per slice of the volume (a multi-frame source has several per file),
    # in each derived series
    slices = len(ctx.volume.slices) if ctx.volume is not None else len(ctx.series)
    for series_uid, count in derived_series.items():
        if ctx.series and count != slices:
            problems.append(f"derived series {series_uid} has {count} images for {slices} source slices")
    return problems


def _expected_frame_of_reference(ctx: Context) -> str | None:
    """The Frame of Reference UID the pixel outputs must carry: the source series' own, or
    for a legacy series without one, the one derived from the series under the job's UID
    root (:func:`pipelines.uids.derived_frame_of_reference`), whatever the encode stage
    says it used. None: nothing to compare with (no source series)."""
    if not ctx.series:
        return None
    first = pydicom.dcmread(ctx.series[0].path, stop_before_pixels=True)
    own = str(first.get("FrameOfReferenceUID", "") or "")
    return own or derived_frame_of_reference(ctx.env.uid_root, ctx.series[0].series_uid)


def _native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """Uncompressed little-endian pixel data — 32-bit float, or 8/16-bit single-sample
    integers — as a view of the file's bytes (no decoded copy: a map of a long series is
    hundreds of MB), shaped (frames, rows, columns); else None (decode it)."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or ts.is_compressed or not ts.is_little_endian:
        return None
    if "FloatPixelData" in ds:
        data, dtype = ds.FloatPixelData, np.dtype("<f4")
    elif "PixelData" in ds and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        bits, signed = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("PixelRepresentation", 0) or 0)
        if bits not in (8, 16):
            return None
        data, dtype = ds.PixelData, np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    else:
        return None
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if len(data) < frames * rows * cols * dtype.itemsize:
        return None  # short: let the decoder say what is wrong
    flat = np.frombuffer(data, dtype=dtype, count=frames * rows * cols)
    return flat.reshape(frames, rows, cols)


def _pixel_problems(ds: pydicom.Dataset) -> list[str]:
    try:
        pixels = _native_pixels(ds)
        if pixels is None:
            pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # any decoder failure is a validation failure, not a crash
        return [f"pixel data do not decode: {exc}"]
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = (rows, cols) if frames == 1 else (frames, rows, cols)
    if frames == 1 and pixels.ndim == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    problems = []
    if pixels.shape[-len(expected) :] != expected and pixels.shape[:3] != expected:
        problems.append(f"pixel data shape {pixels.shape} does not match {expected}")
    if pixels.dtype.kind == "f" and not all(
        np.isfinite(part).all() for part in np.array_split(pixels.ravel(), 16)
    ):
        problems.append("pixel data hold NaN or infinite values")
    return problems


@dataclass(frozen=True)
class Validate:
    """Stage: re-read and check the written objects (see :func:`validate_outputs`)."""

    name: str = "validate"

    def run(self, ctx: Context) -> Context:
        return ctx.evolve(validation_errors=tuple(validate_outputs(ctx)))
