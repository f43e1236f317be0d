"""Which pipeline a ready study goes to, and where its results are delivered.

A placeholder until the policy engine lands: ``[[routes]]`` in the config map the calling
AE title that sent the study (``"*"`` for any) to a pipeline and destinations. Every
matching route yields its own job.
"""

from __future__ import annotations

from dicom_node.config import NodeConfig, Route


def routes_for(config: NodeConfig, calling_ae: str | None) -> list[Route]:
    """All routes that match a study sent by ``calling_ae``, in file order."""
    return [r for r in config.routes if r.calling_ae in ("*", calling_ae)]
