"""This software's DICOM identity, stamped on every file it writes (file meta, equipment)."""

#: DICOM Implementation Class UID (a fixed UUID-derived 2.25 UID) and Version Name.
IMPLEMENTATION_CLASS_UID = "2.25.123764771795364509351159022653974412353"
IMPLEMENTATION_VERSION_NAME = "DICOMNODE_010"
MANUFACTURER = "dicom-node"
