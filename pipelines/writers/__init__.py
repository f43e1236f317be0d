"""DICOM encoders for AI outputs: every object says what it is, where it came from, how
sure the model was, and where it may have invented content.

One writer class per object kind, in the style of highdicom: the facts an object must
carry are required keyword arguments, and ``provenance`` (an
:class:`~pipelines.provenance.OutputProvenance`) is required by every writer and
checked when the writer is built, not when a PACS rejects the result.

* :class:`DerivedImageWriter` (``derived``) — CT / MR Image Storage, one single-frame
  instance per volume slice (built with pydicom: highdicom has no classic CT/MR builder);
* :class:`UncertaintyMapWriter` (``parametric``) — Parametric Map (highdicom), float32,
  e.g. one SD;
* :class:`HallucinationMapWriter` (``parametric``) — Parametric Map (highdicom), unitless
  score;
* :class:`SuspectRegionWriter` (``segmentation``) — Segmentation (highdicom), BINARY, one
  segment;
* :class:`ProbabilityMapWriter` (``parametric``) — Parametric Map (highdicom), a probability
  per voxel (the predicted tumour of ``prognosis``);
* :class:`TumourExtentWriter` (``segmentation``) — Segmentation (highdicom), BINARY, a segment
  per tumour extent (predicted and current);
* :class:`SummaryReportWriter` (``report``) — Comprehensive SR (highdicom): model card, QC
  figures, gate verdict, provenance, references to the sources and every output;
* :class:`OverlayWriter` (``overlay``) — Secondary Capture RGB heat map (highdicom),
  burned in; it illustrates a Parametric Map and never replaces it;
* :class:`SpatialRegistrationWriter` (``spatial_registration``) — Spatial Registration
  (pydicom: highdicom has none): a prior's Frame of Reference registered to the current's.

What they share (coded concepts, units, checks, equipment, the output kinds and
:func:`kind_of`) is in ``common``; ``files`` writes DICOM Part 10 files whose names sort
by series (:func:`save`). :func:`pipelines.encode.write_outputs` runs them all for one job;
:func:`pipelines.provenance.provenance_of` recovers, from any single object written here,
its source instances and the pipeline / model / weights that made it.
"""

from pipelines.writers.common import (
    KIND_DERIVED,
    KIND_EXTENT,
    KIND_HALLUCINATION,
    KIND_OVERLAY,
    KIND_PROBABILITY,
    KIND_REPORT,
    KIND_SUSPECT,
    KIND_UNCERTAINTY,
    LOCAL_SCHEME,
    NODE_MANUFACTURER,
    SMOOTHING,
    SYNTHESIS,
    kind_of,
    local_code,
    ucum,
    ucum_for_units,
    warm_up,
)
from pipelines.writers.derived import DerivedImageWriter
from pipelines.writers.files import file_name, save
from pipelines.writers.overlay import OverlayWriter
from pipelines.writers.parametric import (
    HallucinationMapWriter,
    ProbabilityMapWriter,
    UncertaintyMapWriter,
    map_values,
)
from pipelines.writers.report import SummaryReportWriter
from pipelines.writers.segmentation import (
    SUSPECT_CATEGORY,
    SUSPECT_LABEL,
    SUSPECT_TYPE,
    SuspectRegionWriter,
    TumourExtentWriter,
)
from pipelines.writers.spatial_registration import KIND_REGISTRATION, SpatialRegistrationWriter

__all__ = [
    "map_values",
    "KIND_DERIVED",
    "KIND_EXTENT",
    "KIND_HALLUCINATION",
    "KIND_OVERLAY",
    "KIND_PROBABILITY",
    "KIND_REGISTRATION",
    "KIND_REPORT",
    "KIND_SUSPECT",
    "KIND_UNCERTAINTY",
    "LOCAL_SCHEME",
    "NODE_MANUFACTURER",
    "SMOOTHING",
    "SUSPECT_CATEGORY",
    "SUSPECT_LABEL",
    "SUSPECT_TYPE",
    "SYNTHESIS",
    "DerivedImageWriter",
    "HallucinationMapWriter",
    "OverlayWriter",
    "ProbabilityMapWriter",
    "SpatialRegistrationWriter",
    "SummaryReportWriter",
    "SuspectRegionWriter",
    "TumourExtentWriter",
    "UncertaintyMapWriter",
    "file_name",
    "kind_of",
    "local_code",
    "save",
    "ucum",
    "ucum_for_units",
    "warm_up",
]
