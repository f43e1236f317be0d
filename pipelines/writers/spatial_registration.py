"""Spatial Registration Storage: a prior registered to the current study, as a viewer fuses it.

Built with pydicom (highdicom 0.28 has no Spatial Registration class), per PS3.3 A.39
(Spatial Registration IOD) and C.20.2 (Spatial Registration module). See
:class:`SpatialRegistrationWriter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import SpatialRegistrationStorage

from pipelines.provenance import OutputProvenance
from pipelines.uids import UidFactory
from pipelines.volume import Volume
from pipelines.writers.common import (
    KIND_REGISTRATION,
    NODE_MANUFACTURER,
    _check_provenance,
    _check_series_number,
    _check_uids,
    _code_item,
    _contributing_equipment,
    _copy_anatomy,
    _copy_patient_and_study,
    _ds,
    _finish,
    _keep_request,
    _keep_timezone,
    _lo,
    _now,
    _reference_item,
    _referenced_series,
    _software_versions,
)
from pipelines.writers.derived import _TYPE2_EMPTY
from pipelines.writers.files import _file_meta, save

if TYPE_CHECKING:  # SimpleITK (the 'ai' extra) is not loaded to write or read the object
    from pipelines.registration import Registration

__all__ = ["KIND_REGISTRATION", "SpatialRegistrationWriter"]

#: The output kind of a Spatial Registration object.

#: CID 7100 "RCS Registration Method": the current's own frame (identity) and the prior's.
_FRAME_IDENTITY = CodedConcept("125021", "DCM", "Frame of Reference Identity")
_IMAGE_CONTENT_ALIGNMENT = CodedConcept("125024", "DCM", "Image Content-based Alignment")

#: Words in a source's identity that mark a simulated study (the lab's simulators write them).
_SIMULATED_MARKS = ("SIMULATED", "SIMULATOR")


def _simulated(volume: Volume) -> bool:
    if not volume.datasets:
        return False
    first = volume.datasets[0]
    text = " ".join(
        str(first.get(k, "") or "")
        for k in (
            "Manufacturer",
            "ManufacturerModelName",
            "StudyDescription",
            "SeriesDescription",
            "ImageComments",
        )
    ).upper()
    return any(mark in text for mark in _SIMULATED_MARKS)


def _matrix_values(matrix: np.ndarray) -> list[str]:
    """Frame of Reference Transformation Matrix: 16 Decimal Strings, row by row."""
    return [_ds(v) for v in np.asarray(matrix, dtype=float).ravel()]


def _image_references(volume: Volume) -> list[Dataset]:
    """One Referenced Image item per source instance (a multi-frame file once, whole)."""
    seen: dict[str, str] = {}
    for ref in volume.slices:
        seen.setdefault(ref.sop_instance_uid, ref.sop_class_uid)
    return [_reference_item(sop_class, sop_uid) for sop_uid, sop_class in seen.items()]


class SpatialRegistrationWriter:
    """A registration of a prior series to the current series, as one Spatial Registration
    Storage object (SOP Class 1.2.840.10008.5.1.4.1.1.66.1, Modality ``REG``).

    The object belongs to the current study and sits on the current series' Frame of
    Reference (its Registration RCS). Its Registration Sequence has two items:

    1. the current series' Frame of Reference, with the identity matrix (Registration
       Type DCM 125021 "Frame of Reference Identity");
    2. the prior series' Frame of Reference, with :attr:`Registration.matrix`, which maps
       the prior's patient coordinates to the current's (Registration Type DCM 125024
       "Image Content-based Alignment"; Matrix Type ``RIGID`` or ``AFFINE``), the quality
       figures in its Frame of Reference Transformation Comment.

    Each item lists its series' images (Referenced Image Sequence); Common Instance
    Reference names the current series and, under its own study, the prior series.
    Patient, study and Frame of Reference are the current study's; equipment and
    Contributing Equipment say the node made it, with ``provenance``. When either series is
    simulated (the lab's simulators mark their studies), Series and Content Description
    say SIMULATED.

    Parameters
    ----------
    provenance
        Pipeline, registration method and node identity; required.
    uids
        The job's deterministic UID factory.
    series_number
        Series Number of the registration series.
    content_label
        Content Label (CS: capitals, digits, space and underscore, ≤ 16 characters).
    name
        Name of the object in ``uids`` (distinct per registration of one job, e.g. one
        per prior).
    simulated
        Label the object SIMULATED; None: when either source series is simulated.
    """

    kind: ClassVar[str] = KIND_REGISTRATION

    def __init__(
        self,
        *,
        provenance: OutputProvenance,
        uids: UidFactory,
        series_number: int,
        content_label: str = "PRIOR_REGISTERED",
        name: str = "registration",
        simulated: bool | None = None,
    ) -> None:
        owner = type(self).__name__
        self.provenance = _check_provenance(owner, provenance)
        self.uids = _check_uids(owner, uids)
        self.series_number = _check_series_number(owner, series_number)
        label = content_label.strip()
        if (
            not label
            or len(label) > 16
            or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _" for c in label)
        ):
            raise ValueError(
                f"{owner}: argument 'content_label' must be 1-16 capitals, digits, spaces or "
                f"underscores (a CS value), got {content_label!r}"
            )
        self.content_label = label
        self.name = name
        self.simulated = simulated

    @property
    def series_instance_uid(self) -> str:
        return self.uids.series(self.name)

    @property
    def sop_instance_uid(self) -> str:
        return self.uids.instance(self.name, 1)

    def write(
        self, registration: Registration, current: Volume, prior: Volume, out_dir: Path | None = None
    ) -> Dataset:
        """The Spatial Registration object of ``registration`` (current ← prior).

        Parameters
        ----------
        registration
            From :func:`pipelines.registration.register` (``current`` fixed, ``prior`` moving).
        current, prior
            The two volumes registered (their ``datasets`` and ``slices`` give the headers
            and the image references).
        out_dir
            When given, the object is also saved there (see :func:`save`).

        Raises
        ------
        ValueError
            The volumes are not the registration's, a series has no Frame of Reference, or
            both share one.
        """
        owner = type(self).__name__
        needed = ("matrix", "matrix_type", "mode", "current_series_uid", "prior_series_uid", "dice")
        if not all(hasattr(registration, a) for a in needed):
            raise TypeError(
                f"{owner}: 'registration' must be a pipelines.registration.Registration, "
                f"got {type(registration).__name__}"
            )
        for role, volume, expected in (
            ("current", current, registration.current_series_uid),
            ("prior", prior, registration.prior_series_uid),
        ):
            if not isinstance(volume, Volume):
                raise TypeError(
                    f"{owner}: '{role}' must be a pipelines.volume.Volume, got {type(volume).__name__}"
                )
            if volume.series_uid != expected:
                raise ValueError(
                    f"{owner}: '{role}' is series {volume.series_uid}, "
                    f"the registration's {role} is {expected}"
                )
            if not volume.frame_of_reference_uid or not volume.datasets:
                raise ValueError(
                    f"{owner}: the {role} series {volume.series_uid} has no Frame of Reference UID "
                    "(or no headers); put it on one first (pipelines.volume.on_frame_of_reference)"
                )
        if current.frame_of_reference_uid == prior.frame_of_reference_uid:
            raise ValueError(
                f"{owner}: current and prior share Frame of Reference {current.frame_of_reference_uid}: "
                "they are registered already; no Spatial Registration object is needed"
            )
        matrix = np.asarray(registration.matrix, dtype=float)
        if (
            matrix.shape != (4, 4)
            or not np.all(np.isfinite(matrix))
            or not np.allclose(matrix[3], [0, 0, 0, 1])
        ):
            raise ValueError(f"{owner}: the registration's matrix is not a finite 4x4 affine matrix")
        simulated = (
            self.simulated if self.simulated is not None else (_simulated(current) or _simulated(prior))
        )

        source = current.datasets[0]
        prov = self.provenance
        now = _now()
        ds = Dataset()
        if "SpecificCharacterSet" in source:
            ds.SpecificCharacterSet = source.SpecificCharacterSet
        # SOP Common
        ds.SOPClassUID = SpatialRegistrationStorage
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        # Patient, Clinical Trial Subject, General Study, Patient Study: the current study's
        _copy_patient_and_study(ds, source)
        for keyword in _TYPE2_EMPTY:
            if keyword not in ds:
                setattr(ds, keyword, "")
        ds.StudyInstanceUID = current.study_uid
        # General Series + Spatial Registration Series
        ds.Modality = "REG"
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SeriesNumber = self.series_number
        ds.SeriesDate, ds.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        what = f"{registration.mode} registration of prior to current"
        ds.SeriesDescription = _lo(("SIMULATED " if simulated else "") + what)
        _copy_anatomy(ds, source, empty_laterality=True)
        # Frame of Reference: the Registration RCS is the current's
        ds.FrameOfReferenceUID = current.frame_of_reference_uid
        ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
        # General Equipment: the node made this object
        ds.Manufacturer = NODE_MANUFACTURER
        ds.ManufacturerModelName = _lo(prov.pipeline)
        ds.DeviceSerialNumber = prov.weights_sha256
        ds.SoftwareVersions = list(_software_versions(prov))
        if prov.station:
            ds.StationName = prov.station[:16]
        # Spatial Registration
        ds.InstanceNumber = 1
        ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.ContentLabel = self.content_label
        prior_source = prior.datasets[0]
        ds.ContentDescription = _lo(
            ("SIMULATED: " if simulated else "")
            + f"prior series {prior_source.get('SeriesNumber', '?')} "
            + f"of {prior_source.get('StudyDate', '') or '?'} "
            + f"on the current frame ({registration.matrix_type})"
        )
        ds.RegistrationSequence = [
            self._item(current, np.eye(4), "RIGID", _FRAME_IDENTITY, "the current series' own frame"),
            self._item(
                prior,
                matrix,
                registration.matrix_type,
                _IMAGE_CONTENT_ALIGNMENT,
                f"MI {registration.mutual_information:.3f} nats; Dice {registration.dice:.3f}; "
                f"overlap {registration.overlap:.2f}",
            ),
        ]
        # Common Instance Reference: the current series in this study, the prior in its own
        current_refs = [(current.series_uid, r.sop_class_uid, r.sop_instance_uid) for r in current.slices]
        prior_refs = [(prior.series_uid, r.sop_class_uid, r.sop_instance_uid) for r in prior.slices]
        if prior.study_uid == current.study_uid:
            ds.ReferencedSeriesSequence = _referenced_series(current_refs + prior_refs)
        else:
            ds.ReferencedSeriesSequence = _referenced_series(current_refs)
            other = Dataset()
            other.StudyInstanceUID = prior.study_uid
            other.ReferencedSeriesSequence = _referenced_series(prior_refs)
            ds.StudiesContainingOtherReferencedInstancesSequence = [other]
        ds.ContributingEquipmentSequence = _contributing_equipment(prov, source, include_acquisition=False)
        _keep_timezone(ds, source)
        _keep_request(ds, source)
        _file_meta(ds)
        _finish(ds, prov)
        if out_dir is not None:
            save([ds], out_dir)
        return ds

    @staticmethod
    def _item(
        volume: Volume, matrix: np.ndarray, matrix_type: str, method: CodedConcept, comment: str
    ) -> Dataset:
        transformation = Dataset()
        transformation.FrameOfReferenceTransformationMatrixType = matrix_type
        transformation.FrameOfReferenceTransformationMatrix = _matrix_values(matrix)
        registration = Dataset()
        registration.RegistrationTypeCodeSequence = [_code_item(method)]
        registration.FrameOfReferenceTransformationComment = _lo(comment)
        registration.MatrixSequence = [transformation]
        item = Dataset()
        item.ReferencedImageSequence = _image_references(volume)
        item.FrameOfReferenceUID = volume.frame_of_reference_uid
        item.MatrixRegistrationSequence = [registration]
        return item
