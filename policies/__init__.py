"""Routing policies and safety gates (the policy engine lands in a later issue)."""
