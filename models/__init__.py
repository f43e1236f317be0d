"""Networks, model registry, uncertainty, simulators, training and evaluation. No DICOM here."""
