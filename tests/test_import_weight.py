"""The CLI and the receiver must start without importing torch (startup time, memory)."""

from __future__ import annotations

import subprocess
import sys


def test_cli_and_serve_modules_do_not_import_torch() -> None:
    code = (
        "import sys, dicom_node.cli, dicom_node.serve, dicom_node.ingest.receiver; "
        "print(sorted(m for m in ('torch', 'monai', 'skimage') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
