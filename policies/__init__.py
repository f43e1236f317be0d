"""Routing policies and safety gates: YAML rules (model, loader), decisions and the QC gate (engine)."""
