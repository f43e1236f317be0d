"""Physics-based simulators of anatomy and acquisitions (numpy only)."""
