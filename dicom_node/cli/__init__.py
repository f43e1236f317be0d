"""The ``dicom-node`` command line.

Every command takes ``--config FILE`` and ``--home DIR``. Errors a user can cause print
one line and exit 2 (configuration) or 1 (everything else); tracebacks are for bugs.
The shared app, options and ``fail`` live in :mod:`dicom_node.cli.common`; each
``*_cmds`` module registers its commands on that app when imported here.
"""

from __future__ import annotations

from dicom_node.cli import (  # noqa: F401  (imported for their commands)
    archive_cmds,
    audit_cmds,
    db_cmds,
    eval_cmds,
    inspect_cmds,
    model_cmds,
    net_cmds,
    policy_cmds,
    retention_cmds,
    review_cmds,
    run_cmds,
    serve_cmds,
    sim_cmds,
    train_cmds,
    user_cmds,
)
from dicom_node.cli.common import app, fail
from dicom_node.safelog import protect_stderr

#: Packages of the optional extras, by the extra that brings them (pyproject.toml).
EXTRA_OF = {
    **dict.fromkeys(("torch", "monai", "SimpleITK", "safetensors", "scipy", "skimage", "matplotlib"), "ai"),
    **dict.fromkeys(("nilearn", "nibabel", "sklearn"), "lab"),
    "psycopg": "postgres",  # a postgresql+psycopg:// database URL
}


def main() -> None:
    protect_stderr()
    try:
        app()
    except ModuleNotFoundError as exc:
        # A command of an extra this installation lacks: one line, not a traceback.
        top = (exc.name or "").split(".")[0]
        if top not in EXTRA_OF:
            raise  # one of our own modules missing is a bug
        raise SystemExit(
            fail(
                f"this command needs {top}, which this installation lacks: "
                f"pip install 'dicom-node[{EXTRA_OF[top]}]'"
            ).exit_code
        ) from None
