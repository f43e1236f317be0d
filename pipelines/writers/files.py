"""DICOM Part 10 files of the written objects: file meta, names that sort, atomic saves.

Every writer's ``out_dir`` and :func:`pipelines.encode.write_outputs` save through
:func:`save`; :func:`file_name` is how the encode stage finds each object's file again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import pydicom.uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = ["file_name", "save"]


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta


def _file_meta_keep(ds: Dataset) -> None:
    """highdicom sets the file meta; make sure the media storage UIDs are there too."""
    if "file_meta" not in ds.__dict__ or not getattr(ds, "file_meta", None):
        _file_meta(ds)
        return
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def file_name(ds: Dataset) -> str:
    """``S<series:06>_<modality>_<instance:06>.dcm``: files sort by series, then instance."""
    series = int(ds.get("SeriesNumber") or 0)
    instance = int(ds.get("InstanceNumber") or 0)
    modality = re.sub(r"[^A-Z0-9]", "", str(ds.get("Modality", "OT")).upper()) or "OT"
    return f"S{series:06d}_{modality}_{instance:06d}.dcm"


def save(datasets: Iterable[Dataset], out_dir: Path) -> list[Path]:
    """Write DICOM Part 10 files (``enforce_file_format=True``), named by :func:`file_name`.

    Each file is written beside its final name and renamed into place, so a reader never
    sees half a file. Two objects that would share a name (same series and instance
    number) are refused.

    Returns
    -------
    list of Path
        The files, in the order of ``datasets``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = list(datasets)
    names: dict[str, str] = {}
    for ds in datasets:
        name = file_name(ds)
        uid = str(ds.SOPInstanceUID)
        if names.setdefault(name, uid) != uid:
            raise ValueError(
                f"two objects would be saved as {name} ({names[name]} and {uid}): series numbers clash"
            )
    paths = []
    for ds in datasets:
        if "file_meta" not in ds.__dict__ or "TransferSyntaxUID" not in ds.file_meta:
            _file_meta(ds)
        ds.file_meta.ImplementationClassUID = pydicom.uid.UID(IMPLEMENTATION_CLASS_UID)
        ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        path = out_dir / file_name(ds)
        tmp = path.with_suffix(".part")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        paths.append(path)
    return paths
