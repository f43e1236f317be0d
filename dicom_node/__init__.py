"""dicom-node: a DICOM node for generative-AI pipelines with provenance and an audit trail."""

__version__ = "0.1.0"
#: DICOM Implementation Class UID and Version Name written into every file meta we create.
IMPLEMENTATION_CLASS_UID = "2.25.123764771795364509351159022653974412353"
IMPLEMENTATION_VERSION_NAME = "DICOMNODE_010"
