"""The ``dicom-node`` command line.

Every command takes ``--config FILE`` and ``--home DIR``. Errors a user can cause print
one line and exit 2 (configuration) or 1 (everything else); tracebacks are for bugs.
The shared app, options and ``fail`` live in :mod:`dicom_node.cli.common`; each
``*_cmds`` module registers its commands on that app when imported here.
"""

from __future__ import annotations

from dicom_node.cli import (  # noqa: F401  (imported for their commands)
    audit_cmds,
    eval_cmds,
    inspect_cmds,
    model_cmds,
    net_cmds,
    policy_cmds,
    review_cmds,
    run_cmds,
    serve_cmds,
    sim_cmds,
    train_cmds,
    user_cmds,
)
from dicom_node.cli.common import app


def main() -> None:
    app()
