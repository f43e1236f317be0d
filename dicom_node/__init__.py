"""dicom-node: a DICOM node for generative-AI pipelines with provenance and an audit trail."""

__version__ = "0.1.0"
from pipelines.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = ["IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION_NAME", "__version__"]
