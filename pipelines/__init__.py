"""Staged pipelines, series <-> volume I/O and DICOM encoders. Imports models and audit."""
